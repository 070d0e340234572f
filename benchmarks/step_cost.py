"""Where the monitor's per-step cost goes on a realistic model (issue 24): wall time, its own timing, kernel launches.

On an H200 (2026-12-04) a ResNet-18 at batch 128, whose steps are bound by the host (Python and kernel launches:
the GPU idles between them), trained 16% slower with the monitor reading every step and no check due, while a
GPT-2-shaped model, bound by the GPU, paid 0.4%. This script tells the parts apart, in one process, with blocks of
each arm alternating so that drift hits them alike:

- ``off``: no monitor;
- ``steps``: the per-step path alone (loss, gradient norm, learning rate; every step read; no check due);
- ``every``: that plus a check every 50 steps (``max_overhead=None``);
- ``budget``: the defaults (``max_overhead=0.02``): the budget spaces the checks and thins the per-step reads.

For each arm: wall ms per step and the difference to ``off``; the monitor's own timing of its calls (``time_s``, the
figure the budget steers by: what it cannot see, it cannot bound) per step; the strides the budget chose; from a
short profiled window, the kernel launches (CUDA) or ATen calls (CPU) per step beside ``off``'s; the host time
inside each of the monitor's calls, timed around the call here (the forward hook's copies are inside the forward);
and the ATen calls made inside each of them (a `TorchDispatchMode` over a short window: every call is host time on
a GPU whose step the host bounds, so their count is what the CPU can measure of that cost). The monitor is fed as
the adapters feed it (`overhead.monitored_step`'s order, with the workload's autocast).

    python benchmarks/step_cost.py --model resnet18 --device cuda
    python benchmarks/step_cost.py --device-path      # CPU: the GPU's per-step path (tensors read in batches)
    python benchmarks/step_cost.py --quick            # CPU, small: the script's own check
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from overhead import _autocast, _fresh, _inputs, _sync, build_workload  # run as a script: benchmarks/ is on sys.path
from torch.utils._python_dispatch import TorchDispatchMode

from topo_callbacks.core import CollapseMonitorCore

ARMS = ("off", "steps", "every", "budget")
CALLS = ("prepare_step", "add_loss", "step_grad_norm", "observe_step", "run_check")


class Arm:
    """One arm's model, optimizer and monitor, trained block by block."""

    def __init__(self, name: str, workload: Any, batches: list[Any], device_path: bool = False) -> None:
        self.name, self.workload, self.batches = name, workload, batches
        self.model, self.opt = _fresh(workload, seed=0)
        self.monitor: CollapseMonitorCore | None = None
        if name != "off":
            self.monitor = CollapseMonitorCore(
                workload.layers["last"],
                every_n_train_steps=10**9 if name == "steps" else 50,
                max_samples=1024,
                max_overhead=0.02 if name == "budget" else None,
            )
            self.monitor._device_path = device_path  # the accelerator's per-step path on the CPU (`--device-path`)
            self.monitor.attach(self.model)
        self.step = 0
        self.seconds = 0.0
        self.timed_steps = 0
        #: host seconds inside each of the monitor's calls over the timed steps (no device sync: what the host pays)
        self.calls: dict[str, float] = dict.fromkeys(CALLS, 0.0)
        #: ATen calls inside each of the monitor's calls over the counted steps (`count_calls`)
        self.aten: dict[str, int] = dict.fromkeys(CALLS, 0)
        self._timing = False
        self._counting = False

    def train(self, steps: int, timed: bool = True) -> None:
        device = self.workload.device
        _sync(device)
        self._timing = timed
        start = time.perf_counter()
        for _ in range(steps):
            self._one()
        _sync(device)
        self._timing = False
        if timed:
            self.seconds += time.perf_counter() - start
            self.timed_steps += steps

    def _one(self) -> None:
        self.step += 1
        step, mon, w = self.step, self.monitor, self.workload
        x, y = self.batches[step % len(self.batches)]
        call = self._call
        if mon is not None:
            call("prepare_step", mon.prepare_step, step)
        with _autocast(w):
            loss = w.loss(self.model(_inputs(w, x)), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = None
        if mon is not None:
            call("add_loss", mon.add_loss, loss)
            grad_norm = call("step_grad_norm", mon.step_grad_norm, self.model, step)
        self.opt.step()
        if mon is not None:
            call("observe_step", mon.observe_step, step, grad_norm=grad_norm, lr=self.opt.param_groups[0]["lr"])
            if mon.is_check_step(step):
                call("run_check", mon.run_check, step)

    def _call(self, name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if self._counting:
            with _Calls() as counter:
                out = fn(*args, **kwargs)
            self.aten[name] += counter.count
            return out
        if not self._timing:
            return fn(*args, **kwargs)
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        self.calls[name] += time.perf_counter() - start
        return out

    def count_calls(self, steps: int) -> None:
        """ATen calls inside each of the monitor's calls over ``steps`` steps (`aten`)."""
        self._counting = True
        try:
            self.train(steps, timed=False)
        finally:
            self._counting = False

    def launches(self, steps: int) -> float:
        """Kernel launches (CUDA) or ATen calls (CPU) per step over ``steps`` profiled steps."""
        from torch.profiler import ProfilerActivity, profile

        cuda = self.workload.device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            self.train(steps, timed=False)
        count = 0
        for event in prof.key_averages():
            if (cuda and event.key.startswith("cudaLaunchKernel")) or (not cuda and event.key.startswith("aten::")):
                count += event.count
        return count / steps


class _Calls(TorchDispatchMode):
    """Counts the ATen calls made inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.count += 1
        return func(*args, **(kwargs or {}))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["resnet18", "gpt2"], default="resnet18")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per arm (default 400 on CUDA, 60 CPU)")
    parser.add_argument("--blocks", type=int, default=4, help="blocks per arm, alternating (default 4)")
    parser.add_argument("--quick", action="store_true", help="small sizes on the CPU: the script's own check")
    parser.add_argument(
        "--device-path",
        action="store_true",
        help="on the CPU, the monitor takes the accelerator's per-step path (tensors read in batches)",
    )
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--gpt-layers", type=int, default=None)
    parser.add_argument("--context", type=int, default=None)
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda:
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    steps = args.steps or (400 if cuda else 8 if args.quick else 60)
    warm_up = 2 if args.quick else 10
    blocks = 2 if args.quick else args.blocks
    per_block = max(steps // blocks, 1)
    warnings.simplefilter("ignore")
    device = torch.device(args.device)
    workload = build_workload(args, device)
    batches = [(x.to(device), y.to(device)) for x, y in workload.batches(8, seed=1)]
    if args.device_path and cuda:
        raise SystemExit("--device-path is for the CPU: on CUDA the monitor takes that path anyway")
    arms = {name: Arm(name, workload, batches, args.device_path) for name in ARMS}
    for arm in arms.values():
        arm.train(warm_up, timed=False)  # warm-up: kernels chosen, optimizer state made, the first steps' one-off costs
    spent0 = {name: (a.monitor.time_spent_s if a.monitor else 0.0) for name, a in arms.items()}
    for b in range(blocks):
        for name in ARMS if b % 2 == 0 else reversed(ARMS):
            arms[name].train(per_block)
    profiled = 2 if args.quick else 30
    launches = {name: arm.launches(profiled) for name, arm in arms.items()}
    for arm in arms.values():
        arm.count_calls(profiled)
    where = torch.cuda.get_device_name(0) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"{workload.description}; {where}"
        + ("; the accelerator's per-step path (--device-path)" if args.device_path else "")
    )
    print(f"{blocks} alternating blocks of {per_block} timed steps per arm, after {warm_up} warm-up steps;"
          f" launches over {profiled} profiled steps ({'cudaLaunchKernel' if cuda else 'ATen calls'})")  # fmt: skip
    off = arms["off"].seconds / arms["off"].timed_steps
    print(f"| arm | ms/step | vs off | monitor's own timing, ms/step | strides (check, observe, grad) | checks |"
          f" {'launches' if cuda else 'ATen calls'}/step |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name, arm in arms.items():
        per_step = arm.seconds / arm.timed_steps
        mon = arm.monitor
        own = "-" if mon is None else f"{1000 * (mon.time_spent_s - spent0[name]) / arm.timed_steps:.3f}"
        strides = "-" if mon is None else f"{mon.check_every}, {mon.observe_every}, {mon.grad_every}"
        checks = "-" if mon is None else str(len(mon.history))
        diff = 1000 * (per_step - off)
        print(f"| {name} | {1000 * per_step:.2f} | {diff:+.2f} ms ({100 * (per_step / off - 1):+.1f}%) | {own} |"
              f" {strides} | {checks} | {launches[name]:.0f} ({launches[name] - launches['off']:+.0f}) |")  # fmt: skip
    print("the monitor's own timing includes its checks; strides: the check interval, and 1 read in N steps")
    print()
    print("host time per step inside each call (timed around the call, no device sync), us:")
    print("| arm | " + " | ".join(CALLS) + " |")
    print("|---|" + "---|" * len(CALLS))
    for name, arm in arms.items():
        if arm.monitor is not None:
            cells = " | ".join(f"{1e6 * arm.calls[c] / arm.timed_steps:.0f}" for c in CALLS)
            print(f"| {name} | {cells} |")

    print()
    print(f"ATen calls per step inside each call (over {profiled} steps):")
    print("| arm | " + " | ".join(CALLS) + " | all |")
    print("|---|" + "---|" * (len(CALLS) + 1))
    for name, arm in arms.items():
        if arm.monitor is not None:
            cells = " | ".join(f"{arm.aten[c] / profiled:.1f}" for c in CALLS)
            print(f"| {name} | {cells} | {sum(arm.aten.values()) / profiled:.1f} |")


if __name__ == "__main__":
    main()
