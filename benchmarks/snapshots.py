"""What ``on_alarm="rollback"``'s snapshots cost on a realistic model (issue 23), and that a restore is exact.

The overhead benchmark's ResNet-18 and GPT-2 workloads train in a plain loop; a `RollbackController` (the one the
monitor uses; ``keep=3``) takes a snapshot every ``--every`` steps. Blocks of steps with and without the controller
alternate, so that drift hits both arms alike; the extra wall time of the arm with snapshots, divided by the
snapshots it took, is a snapshot's cost as the run feels it (on CUDA the device-to-host copies go to pinned buffers
with ``non_blocking=True``, so the host-side time of the call alone would understate it; each block's snapshot comes
at its last step and the block's closing sync waits for the copies, so the figure is an upper bound: in a run they
overlap the steps after). The ring fills first (``keep`` snapshots with new buffers, a one-off cost printed apart),
then the arms alternate with its buffers reused. Printed: the step time, the host memory per snapshot, the call's
host time while the ring fills and once buffers are reused, the copies' device time (CUDA events), the cost per
snapshot, its share of the training time at the default interval (``RollbackPolicy().snapshot_every``), and a
restore's time, checked bit for bit against a direct copy of the state taken at the snapshot.

    python benchmarks/snapshots.py --model resnet18 --device cuda
    python benchmarks/snapshots.py --model gpt2 --device cuda
    python benchmarks/snapshots.py --model resnet18 --quick          # CPU, small: the script's own check
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from overhead import _fresh, _sync, _train_step, build_workload  # run as a script: benchmarks/ is on sys.path

from topo_callbacks.core import RollbackPolicy, TrainingState
from topo_callbacks.core.rollback import RollbackController


def _copy(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_copy(v) for v in obj)
    return obj


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu())
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the alternating blocks and the restore; returns the figures ``main`` prints."""
    device = torch.device(args.device)
    workload = build_workload(args, device)
    model, opt = _fresh(workload, seed=0)
    batches = [(x.to(device), y.to(device)) for x, y in workload.batches(args.every, seed=1)]

    def block(controller: RollbackController | None, step: int) -> tuple[float, int]:
        _sync(device)
        t0 = time.perf_counter()
        for x, y in batches:
            _train_step(workload, model, opt, x, y)
            step += 1
            if controller is not None:
                controller.maybe_snapshot(step, quiet=True)
        _sync(device)
        return time.perf_counter() - t0, step

    step = 0
    for _ in range(2):  # warm-up: kernels chosen, the optimizer's state made, the allocator settled
        _, step = block(None, step)
    controller = RollbackController(TrainingState(model, opt), RollbackPolicy(snapshot_every=args.every, keep=3))
    # the ring fills first (keep=3 snapshots, each allocating its buffers: pinned host memory on CUDA, slow to
    # allocate), a one-off cost reported apart; the arms then compare steady snapshots, whose buffers are reused
    # (with the controller's clock set to the step before a block, its snapshot comes at the block's last step: the
    # block's closing sync waits for the copies, so a block holds a snapshot's whole cost, none of it overlapped with
    # steps outside the block: an upper bound of what a run feels)
    filling: list[float] = []
    for _ in range(3):
        controller._last_step = step
        seconds, step = block(controller, step)
        filling.append(seconds)
    plain: list[float] = []
    watched: list[float] = []
    for _ in range(args.blocks):
        seconds, step = block(None, step)
        plain.append(seconds)
        controller._last_step = step  # one snapshot in the block, at its last step (above)
        seconds, step = block(controller, step)
        watched.append(seconds)
    snaps = controller.snapshots
    for snap in snaps:
        snap.wait()
    taken = controller.stats()
    fill_ms = 1000.0 * (sum(filling) - 3 * statistics.median(plain))
    # a snapshot, more steps, then a restore: exactly the state a direct copy held at the snapshot
    expected = _copy({"model": model.state_dict(), "opt": opt.state_dict()})
    snap = controller.snapshot(step + 1)
    _, step = block(None, step + 1)
    _sync(device)
    t0 = time.perf_counter()
    controller.state.restore(snap)
    _sync(device)
    restore_ms = (time.perf_counter() - t0) * 1000.0
    exact = _same(_copy({"model": model.state_dict(), "opt": opt.state_dict()}), expected)
    step_ms = 1000.0 * statistics.median(plain) / args.every
    cost_ms = 1000.0 * (statistics.median(watched) - statistics.median(plain))
    return {
        "workload": workload.description,
        "step_ms": step_ms,
        "mib": snaps[-1].nbytes / 2**20,
        "taken": taken["taken"],
        "max_ms": taken["max_ms"],
        "fill_ms": fill_ms,
        "ring_ms": [entry["ms"] for entry in taken["per_snapshot"]],
        "ring_device_ms": [entry["device_ms"] for entry in taken["per_snapshot"]],
        "last_ms": snap.ms,
        "device_ms": snap.device_ms,
        "cost_ms": cost_ms,
        "spread_ms": 1000.0 * (max(plain) - min(plain)),
        "restore_ms": restore_ms,
        "exact": exact,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["resnet18", "gpt2"], default="resnet18")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--every", type=int, default=None, help="steps per block (one snapshot each); default 10")
    parser.add_argument("--blocks", type=int, default=None, help="blocks per arm (default 6; --quick 2)")
    parser.add_argument("--quick", action="store_true", help="small sizes on the CPU: the script's own check")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--gpt-layers", type=int, default=None)
    parser.add_argument("--context", type=int, default=None)
    args = parser.parse_args(argv)
    args.every = args.every or (3 if args.quick else 10)
    args.blocks = args.blocks or (2 if args.quick else 6)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    r = measure(args)
    interval = RollbackPolicy().snapshot_every
    share = max(r["cost_ms"], 0.0) / (interval * r["step_ms"])
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{r['workload']}; {where}")
    print(f"step {r['step_ms']:.2f} ms (median of {args.blocks} blocks of {args.every}; spread {r['spread_ms']:.1f} ms"
          f" per block); {r['mib']:.0f} MiB per snapshot, {r['taken']} taken, keep=3")  # fmt: skip
    host = ", ".join(f"{ms:.1f}" for ms in r["ring_ms"])
    on_device = "n/a (CPU)"
    if r["device_ms"] is not None:
        ring = ", ".join(f"{ms:.1f}" for ms in r["ring_device_ms"] if ms is not None)
        on_device = f"{ring}; {r['device_ms']:.1f} ms"
    print(f"snapshot call, host time: slowest {r['max_ms']:.1f} ms (the ring filling: new buffers); the last three"
          f" {host} ms; one more, buffers reused, {r['last_ms']:.1f} ms;"
          f" the copies on the device: {on_device}")  # fmt: skip
    print(f"filling the ring (3 snapshots, new buffers, once per run): {r['fill_ms']:.0f} ms in all")
    print(f"cost per snapshot as the run feels it (blocks with minus without): {r['cost_ms']:.1f} ms;"
          f" at the default interval ({interval} steps): {100 * share:.3f}% of the training time")  # fmt: skip
    print(f"restore: {r['restore_ms']:.1f} ms; bit-identical to a direct copy: {r['exact']}")
    if not r["exact"]:
        raise SystemExit("the restored state differs from the state at the snapshot")


if __name__ == "__main__":
    main()
