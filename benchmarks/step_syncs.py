"""Host synchronisations per optimizer step with and without the monitor (issue 24: no per-step GPU stalls).

A small classifier trains in a plain loop fed to `CollapseMonitorCore` as the adapters feed it (the loss and the
global gradient norm as device tensors, the learning rate); checks are off (``every_n_train_steps`` beyond the run)
so that only the per-step path is measured. On CUDA every step runs under ``torch.cuda.set_sync_debug_mode("warn")``
and the synchronising calls it reports are counted, per step, for the steps between reads and for the steps that
read a batch (every ``read_every_n_steps``); the same loop without the monitor is the baseline. On the CPU, where
nothing synchronises, the script counts the monitor's device reads instead (``StepReads.reads``).

    python benchmarks/step_syncs.py --device cuda
    python benchmarks/step_syncs.py --device cpu --steps 64
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Sequence

import torch
from overhead import monitored_step  # run as a script: benchmarks/ is on sys.path
from torch import nn

from topo_callbacks.core import CollapseMonitorCore


def run(device: torch.device, steps: int, monitored: bool) -> tuple[list[int], int]:
    """Synchronising calls per step (CUDA; zeros on the CPU), and the monitor's reads."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(steps, 128, 256, device=device)
    y = torch.randint(0, 10, (steps, 128), device=device)
    monitor = None
    if monitored:
        monitor = CollapseMonitorCore("2", every_n_train_steps=10 * steps, max_overhead=None)
        monitor.attach(model)
    per_step: list[int] = []
    cuda = device.type == "cuda"
    for i in range(steps):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                monitored_step(monitor, model, opt, x[i], y[i], i + 1, lr=opt.param_groups[0]["lr"])
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")
        per_step.append(sum("synchroniz" in str(w.message) for w in caught))
    reads = 0 if monitor is None or monitor._step_reads is None else monitor._step_reads.reads
    return per_step, reads


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    run(device, 20, True)  # warm-up: lazy initialisation, allocator
    off, _ = run(device, args.steps, False)
    on, reads = run(device, args.steps, True)
    every = CollapseMonitorCore("0", max_overhead=None)
    every._device = device
    batch = every._reads().read_every
    read_steps = {s for s in range(args.steps) if (s + 1) % batch == 0}
    between = [n for s, n in enumerate(on) if s not in read_steps]
    at_reads = [n for s, n in enumerate(on) if s in read_steps]
    if device.type == "cpu":
        print(f"device cpu, {args.steps} steps: values are read as they come (a CPU read synchronises nothing)")
    else:
        print(f"device {device}, {args.steps} steps, the monitor reads every {batch} step(s): {reads} reads")
    print(f"synchronising calls per step without the monitor: {sum(off) / len(off):.2f}")
    print(f"with it, between reads: {sum(between) / max(len(between), 1):.2f} (max {max(between, default=0)})")
    print(f"with it, at a read step: {sum(at_reads) / max(len(at_reads), 1):.2f}")


if __name__ == "__main__":
    main()
