"""CollapseMonitor in a Lightning run: a digits classifier whose learning rate jumps 30x at a known step.

One process:      python recipes/lightning_example.py
Two processes:    python recipes/lightning_example.py --devices 2      (Lightning's ddp launches the second one)
Healthy twin:     add --healthy
"""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import torch
from _digits import DigitsNet, digits_dataset, finish_distributed, lr_multiplier, parse_args, write_summary
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch.utils.data import DataLoader

from topo_callbacks.core import CollapseWarning
from topo_callbacks.lightning import CollapseMonitor


class DigitsModule(pl.LightningModule):
    def __init__(self, collapse_at: int | None) -> None:
        super().__init__()
        self.net = DigitsNet()
        self.collapse_at = collapse_at

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(self.collapse_at))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], devices=True)
    pl.seed_everything(0, verbose=False)
    warnings.simplefilter("ignore", CollapseWarning)  # the summary below reports the alarms
    # max_overhead=None: a check every `--every` steps (a digits model's steps are too cheap for the default 2% budget,
    # which would space the checks out)
    monitor = CollapseMonitor(
        layer="net.encoder", every_n_train_steps=args.every, max_samples=512, stop_on_alarm=True, max_overhead=None
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_steps=args.steps,
        callbacks=[monitor],
        logger=CSVLogger(args.out, name="lightning"),
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        log_every_n_steps=args.every,
    )
    loader = DataLoader(digits_dataset(), batch_size=64, shuffle=True, drop_last=True)
    trainer.fit(DigitsModule(args.collapse_at), loader)
    if trainer.is_global_zero:
        write_summary(args.out, "lightning", trainer.world_size, args, monitor)
    del trainer
    finish_distributed()


if __name__ == "__main__":
    main()
