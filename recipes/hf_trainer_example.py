"""CollapseMonitorCallback in an HF Trainer run: a digits classifier whose learning rate jumps 30x at a known step.

One process:      python recipes/hf_trainer_example.py
Two processes:    torchrun --nproc_per_node 2 recipes/hf_trainer_example.py
Healthy twin:     add --healthy
"""

from __future__ import annotations

import os
import warnings

import torch
from _digits import DigitsNet, digits_dataset, finish_distributed, lr_multiplier, parse_args, write_summary
from torch import nn
from transformers import Trainer, TrainingArguments

from topo_callbacks.core import CollapseWarning
from topo_callbacks.transformers import CollapseMonitorCallback


class DigitsForTrainer(nn.Module):
    """The Trainer's model contract: keyword inputs in, a dict with ``loss`` out."""

    def __init__(self) -> None:
        super().__init__()
        self.net = DigitsNet()

    def forward(self, pixels: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.net(pixels)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


class Digits(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.x, self.y = digits_dataset().tensors

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixels": self.x[i], "labels": self.y[i]}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    warnings.simplefilter("ignore", CollapseWarning)  # the summary below reports the alarms
    cpu = not torch.cuda.is_available()
    training_args = TrainingArguments(
        output_dir=f"{args.out}/hf",
        per_device_train_batch_size=64,
        max_steps=args.steps,
        use_cpu=cpu,
        ddp_backend="gloo" if cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        report_to="none",
        logging_steps=args.every,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_drop_last=True,
        max_grad_norm=0.0,  # the Trainer clips at 1.0 by default; the other examples train without clipping
        seed=0,
    )
    torch.manual_seed(0)
    model = DigitsForTrainer()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(args.collapse_at))
    trainer = Trainer(model=model, args=training_args, train_dataset=Digits(), optimizers=(optimizer, schedule))
    monitor = CollapseMonitorCallback(
        trainer=trainer,
        layer="net.encoder",
        every_n_train_steps=args.every,
        max_samples=512,
        stop_on_alarm=True,
        max_overhead=None,  # a check every `--every` steps: a digits model's steps are too cheap for a 2% budget
    )
    trainer.add_callback(monitor)
    trainer.train()
    if trainer.is_world_process_zero():
        write_summary(args.out, "hf_trainer", training_args.world_size, args, monitor)
    del trainer, model, optimizer, schedule
    finish_distributed()


if __name__ == "__main__":
    main()
