"""AccelerateCollapseMonitor in a plain Accelerate loop: a digits classifier whose learning rate jumps 30x.

One process:      python recipes/accelerate_example.py
Two processes:    torchrun --nproc_per_node 2 recipes/accelerate_example.py
                  (or: accelerate launch --multi_gpu --num_processes 2 recipes/accelerate_example.py)
Healthy twin:     add --healthy
"""

from __future__ import annotations

import warnings

import torch
from _digits import DigitsNet, digits_dataset, finish_distributed, lr_multiplier, parse_args, write_summary
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from topo_callbacks.accelerate import AccelerateCollapseMonitor
from topo_callbacks.core import CollapseWarning


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    # without CUDA, cpu=True is what makes torchrun's processes one distributed job (not independent runs)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    set_seed(0)
    warnings.simplefilter("ignore", CollapseWarning)  # the summary below reports the alarms
    model = DigitsNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(args.collapse_at))
    loader = DataLoader(digits_dataset(), batch_size=64, shuffle=True, drop_last=True)
    # the schedule stays out of prepare(): a prepared scheduler advances once per process at each step, and this
    # example needs the learning-rate jump at the same optimizer step on any number of processes
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    with AccelerateCollapseMonitor(
        accelerator,
        model,
        layer="encoder",
        every_n_train_steps=args.every,
        max_samples=512,
        stop_on_alarm=True,
        # a digits model's step takes a millisecond: the default 2% budget (max_overhead=0.02) would space the
        # checks 10x further apart; this example shows a check every `--every` steps
        max_overhead=None,
    ) as monitor:
        accelerator.register_for_checkpointing(monitor)  # saved and restored by save_state / load_state
        step, stop = 0, False
        while step < args.steps and not stop:
            for x, y in loader:
                loss = torch.nn.functional.cross_entropy(model(x), y)
                accelerator.backward(loss)
                optimizer.step()
                schedule.step()
                step += 1
                # the same answer on every process; before zero_grad, so the detector reads the gradient norm
                stop = monitor.step(loss=loss)
                optimizer.zero_grad()
                if stop or step == args.steps:
                    break
    if accelerator.is_main_process:
        write_summary(args.out, "accelerate", accelerator.num_processes, args, monitor)
    # free the prepared (DDP-wrapped) model before end_training destroys the process group (see finish_distributed)
    del model, optimizer, loader, schedule
    accelerator.free_memory()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    finish_distributed()  # in case this accelerate version leaves the group up


if __name__ == "__main__":
    main()
