"""Shared by the framework examples: scikit-learn's bundled digits and a small classifier with a named encoder."""

from __future__ import annotations

import argparse
import gc
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset


def digits_dataset(seed: int = 0) -> TensorDataset:
    """The 1797 8x8 digits (bundled with scikit-learn, nothing downloaded), scaled to [0, 1], shuffled."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return TensorDataset(x[perm], y[perm])


class DigitsNet(nn.Module):
    """``encoder`` (the watched layer: 64 -> 128 -> 64) and a linear ``head`` over 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def lr_multiplier(collapse_at: int | None, factor: float = 30.0) -> Callable[[int], float]:
    """A ``LambdaLR`` rule: 1, then ``factor`` from optimizer step ``collapse_at`` on (far above the stable range:
    the ReLUs of the encoder die and its embeddings collapse to one point)."""

    def rule(scheduler_steps: int) -> float:  # LambdaLR's count: optimizer steps taken so far
        return factor if collapse_at is not None and scheduler_steps + 1 >= collapse_at else 1.0

    return rule


def parse_args(description: str, devices: bool = False) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    if devices:  # Lightning launches the other processes itself, re-running this command line
        parser.add_argument("--devices", type=int, default=1, help="processes (Lightning ddp when > 1)")
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps (default 400)")
    parser.add_argument("--every", type=int, default=20, help="check every this many steps (default 20)")
    parser.add_argument("--collapse-at", type=int, default=200, help="step at which the learning rate jumps 30x")
    parser.add_argument("--healthy", action="store_true", help="keep the learning rate (no collapse)")
    parser.add_argument("--out", default="recipe_out", help="directory for summary.json (and logs)")
    args = parser.parse_args()
    if args.healthy:
        args.collapse_at = None
    return args


def write_summary(out: str, framework: str, world_size: int, args: argparse.Namespace, monitor: Any) -> None:
    """Print the monitor's checks and write ``summary.json`` (call on the main process only)."""
    for h in monitor.history:
        ci, b0, rank = h["ci"], h["b0"], h["effective_rank"]
        print(f"step {h['step']:4d}  CI {ci:.3f}  b0 {b0:4.0f}  rank {rank:5.1f}  {h['reason']}")
    summary = {
        "framework": framework,
        "world_size": world_size,
        "collapse_at": args.collapse_at,
        "first_alarm_step": monitor.first_alarm_step,
        "stopped_step": monitor.stopped_step,
        "stopping_reason": monitor.stopping_reason.name,
        "history": [[h["step"], h["ci"], h["n"]] for h in monitor.history],
    }
    print(
        f"{framework}: collapse at {args.collapse_at}, first alarm {monitor.first_alarm_step},"
        f" stopped at {monitor.stopped_step} ({monitor.stopping_reason.name}), {world_size} process(es)"
    )
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "summary.json").write_text(json.dumps(summary, indent=1))


def finish_distributed() -> None:
    """Wait for every process, collect garbage, then destroy the process group (call after dropping the model).

    A DDP-wrapped model freed after its process group is gone (when the script's locals go) intermittently hung
    a process at exit in our tests; freeing it first, then destroying the group, did not.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        gc.collect()
        torch.distributed.destroy_process_group()
