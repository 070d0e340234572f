"""Training-step time with and without a CollapseMonitor, measured in one process.

A small MLP classifier (784-1024-1024-D-10, batch 256, SGD; D = ``--dim``, default 256) trains on synthetic data
in a plain PyTorch loop; the monitor (every 50 optimizer steps, 1024 samples, on the D-wide layer) is driven
through its framework-agnostic core, so the number is the monitor's own cost, not a framework's. Runs alternate between
"off" and "on" so drift in machine load hits both; the ratio of the medians is printed.

    python benchmarks/overhead.py            # full setting: 5 repeats x 500 steps
    python benchmarks/overhead.py --dim 1024 # a wider watched layer (the check's spectra grow as D^3)
    python benchmarks/overhead.py --source probe  # a fixed probe batch embedded at each check
    python benchmarks/overhead.py --quick    # CI setting: 2 repeats x 150 steps
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings

import torch
from torch import nn

from topo_callbacks.core import CollapseMonitorCore

WATCHED = "5"  # the D-wide Linear layer of `make_model`


def make_model(dim: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, dim), nn.Linear(dim, 10)
    )


def run(
    steps: int, monitored: bool, every: int, samples: int, dim: int, seed: int = 0, source: str = "stream"
) -> tuple[float, list[float], tuple[int, int]]:
    """Mean wall time per training step, the wall time of each check (timed around `run_check`), and how many
    of the checks that moved the engine's points kept every module (the engine's link condition), of how many.

    ``source="probe"``: the monitor embeds a fixed batch of ``samples`` inputs at each check instead of keeping
    the training batches' outputs.
    """
    torch.manual_seed(seed)
    model = make_model(dim)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(steps, 256, 784)
    y = torch.randint(0, 10, (steps, 256))
    monitor = None
    if monitored:
        probe = torch.randn(samples, 784, generator=torch.Generator().manual_seed(1)) if source == "probe" else None
        monitor = CollapseMonitorCore(
            WATCHED, every_n_train_steps=every, max_samples=samples, source=source, probe=probe
        )
        monitor.attach(model)
    checks: list[float] = []
    start = time.perf_counter()
    for i in range(steps):
        step = i + 1
        if monitor is not None:
            monitor.prepare_step(step)
        loss = nn.functional.cross_entropy(model(x[i]), y[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if monitor is not None and monitor.is_check_step(step):
            t = time.perf_counter()
            monitor.run_check(step)
            checks.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - start
    kept = (0, 0)
    if monitor is not None:
        monitor.detach()
        stats = monitor.tracker.stats()
        if source == "probe" and "kept_moves" in stats:
            kept = (stats["kept_moves"], len(checks) - stats["resets"])
    return elapsed / steps, checks, kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short CI setting")
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=256, help="width of the watched layer")
    parser.add_argument(
        "--source", choices=["stream", "probe"], default="stream", help="what the monitor embeds (see the core)"
    )
    args = parser.parse_args()
    repeats, steps = (2, 150) if args.quick else (5, 500)
    warnings.simplefilter("ignore")
    # Warm-up through one check: the first check pays the lazy imports (ripser, scipy.sparse), ~1 s, once per process.
    run(args.every, True, args.every, args.samples, args.dim, source=args.source)
    off, on, check_times = [], [], []
    kept, moves = 0, 0
    for r in range(repeats):
        off.append(run(steps, False, args.every, args.samples, args.dim, seed=r)[0])
        t, checks, (k, m) = run(steps, True, args.every, args.samples, args.dim, seed=r, source=args.source)
        on.append(t)
        check_times += checks
        kept, moves = kept + k, moves + m
    m_off, m_on = statistics.median(off), statistics.median(on)
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        f"model: MLP 784-1024-1024-{args.dim}-10, batch 256; monitor on the {args.dim}-wide layer"
        f" every {args.every} steps, {args.samples} samples, source={args.source}"
    )
    print(f"steps per run: {steps} ({len(check_times) // repeats} checks), repeats: {repeats}")
    print(f"step time without monitor: {m_off * 1e3:.2f} ms (median)")
    print(f"step time with monitor:    {m_on * 1e3:.2f} ms (median)")
    med_check = statistics.median(check_times)
    print(f"check time (timed directly): median {med_check * 1e3:.1f} ms, max {max(check_times) * 1e3:.1f} ms")
    # Whole-run step times drift by several percent on a shared machine; the check-time ratio is the stable one.
    print(f"overhead ratio (step time with / without; noisy on a shared machine): {m_on / m_off:.3f}")
    print(f"overhead ratio from the check time alone: {1 + med_check / (args.every * m_off):.3f}")
    if args.source == "probe":
        print(f"probe checks that moved the engine's points: {moves}; of them kept every module: {kept}")


if __name__ == "__main__":
    main()
