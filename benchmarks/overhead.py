"""Training-step time with and without a CollapseMonitor, measured in one process.

``--model mlp`` (default; its setting and output are those of the first version of this script): a small MLP
classifier (784-1024-1024-D-10, batch 256, SGD; D = ``--dim``, default 256) trains on synthetic data in a plain
PyTorch loop; the monitor (every 50 optimizer steps, 1024 samples, on the D-wide layer) is driven through its
framework-agnostic core, so the number is the monitor's own cost, not a framework's. Runs alternate between "off"
and "on" so drift in machine load hits both; the ratio of the medians is printed.

    python benchmarks/overhead.py            # full setting: 5 repeats x 500 steps
    python benchmarks/overhead.py --dim 1024 # a wider watched layer (the check's spectra grow as D^3)
    python benchmarks/overhead.py --source probe  # a fixed probe batch embedded at each check
    python benchmarks/overhead.py --quick    # CI setting: 2 repeats x 150 steps

``--model resnet18`` / ``--model gpt2``: realistic shapes, random init, synthetic data, one check per 50 steps with
1024 and 4096 samples on a middle and the last block, driven (a) by `CollapseMonitorCore` in a plain PyTorch loop
and (b) by `topo_callbacks.lightning.CollapseMonitor` in a ``lightning.pytorch.Trainer`` (CSV logger, no progress
bar). ResNet-18 is the CIFAR variant (3x3 stem, no max-pool; 32x32 images, 10 classes; SGD with momentum); its
blocks ``layer2`` (128 channels, 16x16) and ``layer4`` (512 channels, 4x4) are watched, space mean-pooled. The
GPT-2-shaped model is a pre-LN decoder (d = 768, 12 heads, GPT-2's 50257-token vocabulary with a tied head,
AdamW); its blocks ``h.{L/2 - 1}`` and ``h.{L - 1}`` are watched, tokens mean-pooled. On the CPU it has 2 layers
and a 128-token context; on CUDA the full 12 layers and 1024 tokens, under bf16 autocast (Lightning:
``precision="bf16-mixed"``).

A stream check of S samples needs S rows captured in the 50 steps before it, i.e. a batch of at least S / 50
examples (images, or sequences for the GPT): 82 at S = 4096. At that batch a step of the CPU GPT-2-shaped model
takes ~22 s on 2 cores, and whole runs of >= 100 steps (2 checks) per configuration do not fit in a CPU budget.
So steps and checks are measured separately, both in the real training loop of each framework (protocol
"split"), on CPU batches (16 images, 4 sequences) and on GPU batches (128 images, 16 sequences) alike:

1. Step time: runs of ``--steps`` timed optimizer steps (after one untimed warm-up step) alternate between no
   monitor ("off") and a monitor on the layer ("on", every 50 steps, S samples; the runs end before step 50, so
   the hook is armed on every step, as in a capture window, and no check runs), in the order off-on, then on-off
   (so that drift and the order of runs hit both alike). Median over ``--repeats``; each run has a fresh model.
2. Check time: the layer's pooled outputs for S examples are captured once (the package's `EmbeddingCapture` on
   forward passes of fresh synthetic inputs, in train mode, no gradients). Then a training run (batch 2: its
   steps are not timed) with the monitor at ``every_n_train_steps=1`` puts S random rows of that cloud into the
   monitor's capture buffer after each step, as its hook would have, and times the check:
   `CollapseMonitorCore.run_check` in the plain loop, the callback's ``on_train_batch_end`` (check,
   ``pl_module.log``, CSV ``log_metrics``, diagram file, stop decision) in Lightning. The first 4 checks start the
   run (3 calibrate the scale, the 4th builds the engine at it); the ``--checks`` after them edit the engine kept
   across checks, as every later check of a run does: their median is the check cost.

Per configuration: step time off and on, the check (median of the steady checks; the start-up checks' median
beside it), the check as a share of the 50 steps it watches (``check / (50 x step off)``), and the ratio
``(50 x step on + check) / (50 x step off)``. When the benchmark's batch supplies fewer than S rows in 50 steps,
the steps that would supply them are longer, and the share printed is an upper bound.

    python benchmarks/overhead.py --model all                   # every model side by side, budget off and on
    python benchmarks/overhead.py --model resnet18              # CPU full setting (~2 min on 2 idle cores)
    python benchmarks/overhead.py --model gpt2                  # CPU full setting (~6 min on 2 idle cores)
    python benchmarks/overhead.py --model gpt2 --device cuda    # GPU: 12 layers, 1024 tokens, bf16 autocast
    python benchmarks/overhead.py --model gpt2 --quick          # a short CPU setting (256 samples)
    python benchmarks/overhead.py --model resnet18 --framework plain --layer last --samples 4096 --profile
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import logging
import math
import platform
import pstats
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from topo_callbacks.core import CollapseMonitorCore, EmbeddingCapture
from topo_callbacks.core.budget import LONGEST_SPACING, check_spacing
from topo_callbacks.core.detector import global_grad_norm

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the RSS high-water mark, read as benchmarks/wide_check.py reads it
from wide_check import _reset_peak, _status

WATCHED = "5"  # the D-wide Linear layer of `make_model`
EVERY = 50  # optimizer steps per check in the realistic settings
#: The checks that start a run: the monitor's default 3 calibration checks (they compute the scale), then the
#: check that builds the engine at the calibrated scale. Every later check edits that engine (stream: remove the
#: previous sample, insert the new one); those are the steady checks timed here.
STARTUP_CHECKS = 3 + 1
#: The batch of the (untimed) training steps between the timed checks.
CHECK_RUN_BATCH = 2


def make_model(dim: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, dim), nn.Linear(dim, 10)
    )


def monitored_step(
    monitor: CollapseMonitorCore | None,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    step: int,
    lr: float | None = None,
) -> Tensor:
    """One cross-entropy training step, with ``monitor`` (if any) fed as the adapters feed it: armed before the
    forward, the loss and the gradient norm (the latter only at the steps it reads: `CollapseMonitorCore.observes`)
    as tensors, then `observe_step` with the learning rate ``lr``. The check, if due, is the caller's (it times it)."""
    if monitor is not None:
        monitor.prepare_step(step)
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = None
    if monitor is not None:
        monitor.add_loss(loss)
        grad_norm = monitor.step_grad_norm(model, step)
    opt.step()
    if monitor is not None:
        monitor.observe_step(step, grad_norm=grad_norm, lr=lr)
    return loss


def run(
    steps: int,
    monitored: bool,
    every: int,
    samples: int,
    dim: int,
    seed: int = 0,
    source: Literal["stream", "probe"] = "stream",
    budget: float | None = None,
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
            WATCHED, every_n_train_steps=every, max_samples=samples, source=source, probe=probe, max_overhead=budget
        )
        monitor.attach(model)
    checks: list[float] = []
    start = time.perf_counter()
    for i in range(steps):
        step = i + 1
        monitored_step(monitor, model, opt, x[i], y[i], step)  # the default detector's per-step channels
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


def main_mlp(args: argparse.Namespace) -> None:
    """The MLP benchmark (``--model mlp``): alternating whole runs with and without the monitor."""
    samples = args.samples[0]
    repeats, steps = (2, 150) if args.quick else (5, 500)
    warnings.simplefilter("ignore")
    # Warm-up through one check: the first check pays the lazy imports (ripser, scipy.sparse), ~1 s, once per process.
    run(args.every, True, args.every, samples, args.dim, source=args.source)
    off, on, check_times = [], [], []
    kept, moves = 0, 0
    for r in range(repeats):
        off.append(run(steps, False, args.every, samples, args.dim, seed=r)[0])
        t, checks, (k, m) = run(steps, True, args.every, samples, args.dim, seed=r, source=args.source)
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
        f" every {args.every} steps, {samples} samples, source={args.source}"
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


# ------------------------------------------------------------------------------------------------ small models


def _digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled 8x8 digits (1797 images), scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.tensor(data.images / 16.0, dtype=torch.float32), torch.tensor(data.target)


def small_model(name: str) -> tuple[nn.Module, str, int]:
    """A small model, the layer watched and its batch size: the digits MLP (64-128-128-10), the digits CNN (conv
    32-64, 3x3, space mean-pooled), or the MLP of ``--model mlp`` (784-1024-1024-256-10 on synthetic data)."""
    if name == "digits_mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                             nn.Linear(128, 10)), "4", 64  # fmt: skip
    if name == "digits_cnn":
        return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(64, 10)), "4", 64  # fmt: skip
    return make_model(256), WATCHED, 256


SMALL_MODELS = ("digits_mlp", "digits_cnn", "mlp")


def small_run(name: str, steps: int, arm: str, seed: int) -> dict[str, Any]:
    """One whole training run of a small model in a plain loop: ``arm`` is "off" (no monitor), "all" (a check every
    50 steps: ``max_overhead=None``) or "budget" (the defaults: ``max_overhead=0.02``). The monitor is fed as the
    adapters feed it (the loss and the gradient norm as tensors, the learning rate)."""
    torch.manual_seed(seed)
    model, layer, batch = small_model(name)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if name == "mlp":
        gen = torch.Generator().manual_seed(seed)
        xs = [torch.randn(batch, 784, generator=gen) for _ in range(16)]
        ys = [torch.randint(0, 10, (batch,), generator=gen) for _ in range(16)]
    else:
        images, labels = _digits()
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        xs = [images[order[i : i + batch]].reshape(-1, 64) for i in range(0, len(labels) - batch, batch)]
        ys = [labels[order[i : i + batch]] for i in range(0, len(labels) - batch, batch)]
    monitor = None
    if arm != "off":
        monitor = CollapseMonitorCore(layer, max_overhead=None if arm == "all" else 0.02)
        monitor.attach(model)
    checks: list[float] = []
    peaks: list[float] = []
    cpu = torch.device("cpu")
    start = time.perf_counter()
    for i in range(steps):
        step = i + 1
        monitored_step(monitor, model, opt, xs[i % len(xs)], ys[i % len(ys)], step, lr=opt.param_groups[0]["lr"])
        if monitor is not None and monitor.is_check_step(step):
            seconds, extra = timed_call(lambda m=monitor, s=step: m.run_check(s), cpu)  # type: ignore[misc]
            checks.append(seconds)
            peaks.append(extra)
    elapsed = time.perf_counter() - start
    out: dict[str, Any] = {"step_s": elapsed / steps, "checks": checks, "peaks": peaks}
    if monitor is not None:
        info = monitor.summary()
        out.update(own_share=info["overhead"], check_every=info["check_every"], max_samples=info["max_samples"],
                   observe_every=info["observe_every"], grad_every=info.get("grad_every"))  # fmt: skip
        monitor.detach()
    return out


SMALL_ARMS = ("off", "all", "budget")


def small_arms(name: str, steps: int, repeats: int) -> dict[str, list[dict[str, Any]]]:
    """`small_run` of ``name`` in each arm, ``repeats`` times in rotating order (so that drift in machine load hits
    every arm alike), after a short untimed warm-up run (lazy imports, the first check's one-time costs)."""
    small_run(name, 60, "all", seed=99)
    runs: dict[str, list[dict[str, Any]]] = {a: [] for a in SMALL_ARMS}
    for r in range(repeats):
        for arm in SMALL_ARMS[r % 3 :] + SMALL_ARMS[: r % 3]:
            runs[arm].append(small_run(name, steps, arm, seed=r))
    return runs


def _median_check_ms(runs: list[dict[str, Any]]) -> str:
    times = [t for x in runs for t in x["checks"]]
    return f"{statistics.median(times) * 1e3:7.1f}ms" if times else f"{'-':>8}"


def main_small(args: argparse.Namespace) -> None:
    """``--model small``: whole runs of the small models, alternating no monitor, every check and the budget."""
    repeats, steps = (2, 400) if args.quick else (3, 2000)
    warnings.simplefilter("ignore")
    print(_machine(torch.device("cpu")))
    print(f"whole runs of {steps} steps, {repeats} repeats per arm (rotating order); monitor defaults"
          " (every_n_train_steps=50, max_samples=1024) with max_overhead=None ('all') and 0.02 ('budget')")  # fmt: skip
    header = (f"{'model':<11} {'step off':>9} {'all: ratio':>10} {'checks':>6} {'check':>8} {'budget: ratio':>13}"
              f" {'checks':>6} {'check':>8} {'every':>6} {'read 1/k':>8} {'grad 1/g':>8} {'samples':>7}"
              f" {'own share':>9} {'off: spread':>11}")  # fmt: skip
    print(header)
    for name in SMALL_MODELS:
        runs = small_arms(name, steps, repeats)
        step = {a: statistics.median(x["step_s"] for x in runs[a]) for a in SMALL_ARMS}
        last = runs["budget"][-1]
        # the spread of the unmonitored runs (max/min step time): a ratio closer to 1 than this is within the noise
        spread = max(x["step_s"] for x in runs["off"]) / min(x["step_s"] for x in runs["off"])
        print(f"{name:<11} {step['off'] * 1e3:7.2f}ms {step['all'] / step['off']:10.3f}"
              f" {len(runs['all'][-1]['checks']):6d} {_median_check_ms(runs['all'])}"
              f" {step['budget'] / step['off']:13.3f} {len(last['checks']):6d} {_median_check_ms(runs['budget'])}"
              f" {last['check_every']:6d} {last['observe_every']:8d} {last['grad_every']:8d} {last['max_samples']:7d}"
              f" {statistics.median(x['own_share'] for x in runs['budget']):9.3f} {spread:11.3f}")  # fmt: skip


# --------------------------------------------------------------------------------------------- realistic models


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 convolutions with batch norm, and a 1x1 projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 images (CIFAR variant: 3x3 stem, no max-pool), stages ``layer1``-``layer4``.

    ``width`` is the first stage's channels (64 in ResNet-18; the stages have width x 1, 2, 4, 8).
    """

    def __init__(self, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        chans = [width, 2 * width, 4 * width, 8 * width]
        self.layer1 = nn.Sequential(BasicBlock(width, chans[0], 1), BasicBlock(chans[0], chans[0], 1))
        self.layer2 = nn.Sequential(BasicBlock(chans[0], chans[1], 2), BasicBlock(chans[1], chans[1], 1))
        self.layer3 = nn.Sequential(BasicBlock(chans[1], chans[2], 2), BasicBlock(chans[2], chans[2], 1))
        self.layer4 = nn.Sequential(BasicBlock(chans[2], chans[3], 2), BasicBlock(chans[3], chans[3], 1))
        self.fc = nn.Linear(chans[3], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean(dim=(2, 3)))


class GPTBlock(nn.Module):
    """A GPT-2 block: pre-LN causal self-attention and a 4x GELU MLP, both residual."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(d)
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.c_proj(y)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """A GPT-2-shaped decoder: token and position embeddings, ``layers`` blocks ``h.0``..., final LN, tied head."""

    def __init__(self, layers: int, context: int, d: int = 768, heads: int = 12, vocab: int = 50257) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(context, d)
        self.h = nn.ModuleList(GPTBlock(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def hidden(self, idx: Tensor, blocks: int | None = None) -> Tensor:
        """The residual stream after the first ``blocks`` blocks (all when None)."""
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h[:blocks]:
            x = block(x)
        return x

    def forward(self, idx: Tensor) -> Tensor:
        return self.lm_head(self.ln_f(self.hidden(idx)))


@dataclasses.dataclass
class Workload:
    """A model to train on synthetic data: how to build it, feed it, step it, and which blocks to watch."""

    name: str
    description: str
    device: torch.device
    batch: int
    make_model: Callable[[], nn.Module]
    make_inputs: Callable[[int, torch.Generator], Tensor]  # (count, generator) -> inputs on the CPU
    make_targets: Callable[[Tensor, torch.Generator], Tensor]  # (inputs, generator) -> targets on the CPU
    loss: Callable[[Tensor, Tensor], Tensor]  # (model output, targets) -> loss
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    layers: dict[str, str]  # "middle"/"last" -> dotted path of the watched block
    widths: dict[str, int]  # "middle"/"last" -> features per example after pooling
    forward_to: Callable[[nn.Module, Tensor, str], None]  # run the model far enough to call the named block
    capture_chunk: int = 64  # examples per forward in the capture pass
    amp: bool = False  # bf16 autocast (CUDA)

    def batches(self, count: int, seed: int) -> list[tuple[Tensor, Tensor]]:
        gen = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(count):
            x = self.make_inputs(self.batch, gen)
            out.append((x, self.make_targets(x, gen)))
        return out


def resnet18_workload(device: torch.device, batch: int, width: int = 64) -> Workload:
    """ResNet-18 (CIFAR variant) on random 32x32 images with random labels of 10 classes; SGD, momentum 0.9."""
    return Workload(
        name="resnet18",
        description=f"ResNet-18 (CIFAR stem, width {width}), 32x32x3 inputs, 10 classes, batch {batch}, SGD+momentum",
        device=device,
        batch=batch,
        make_model=lambda: ResNet18(10, width),
        make_inputs=lambda n, gen: torch.randn(n, 3, 32, 32, generator=gen),
        make_targets=lambda x, gen: torch.randint(0, 10, (x.shape[0],), generator=gen),
        loss=F.cross_entropy,
        make_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4),
        layers={"middle": "layer2", "last": "layer4"},
        widths={"middle": 2 * width, "last": 8 * width},
        forward_to=lambda m, x, path: m(x),
        capture_chunk=256 if device.type == "cuda" else 64,
        amp=device.type == "cuda",
    )


def gpt2_workload(
    device: torch.device,
    batch: int,
    layers: int,
    context: int,
    d: int = 768,
    heads: int = 12,
    vocab: int = 50257,
) -> Workload:
    """A GPT-2-shaped decoder on synthetic token sequences (next-token targets); AdamW."""

    # Zipf-like unigram draws (rank r with weight 1/r): a skewed vocabulary as in text, without any text
    cdf = torch.cumsum(1.0 / torch.arange(1, vocab + 1, dtype=torch.float64), 0)
    cdf /= cdf[-1].clone()

    def tokens(n: int, gen: torch.Generator) -> Tensor:
        u = torch.rand(n, context + 1, generator=gen, dtype=torch.float64)
        return torch.searchsorted(cdf, u).clamp_(max=vocab - 1)

    def loss(logits: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    def forward_to(model: nn.Module, x: Tensor, path: str) -> None:
        assert isinstance(model, GPT)
        model.hidden(x, int(path.split(".")[1]) + 1)

    middle = max(layers // 2 - 1, 0)
    return Workload(
        name="gpt2",
        description=(
            f"GPT-2-shaped decoder, {layers} layers, d={d}, {heads} heads, context {context}, vocabulary {vocab},"
            f" batch {batch} sequences ({batch * context} tokens), AdamW"
        ),
        device=device,
        batch=batch,
        make_model=lambda: GPT(layers, context, d, heads, vocab),
        make_inputs=lambda n, gen: tokens(n, gen),
        make_targets=lambda x, gen: x[:, 1:],
        loss=loss,
        make_optimizer=lambda m: torch.optim.AdamW(m.parameters(), lr=3e-4, weight_decay=0.1),
        layers={"middle": f"h.{middle}", "last": f"h.{layers - 1}"},
        widths={"middle": d, "last": d},
        forward_to=forward_to,
        capture_chunk=64 if device.type == "cuda" else 32,
        amp=device.type == "cuda",
    )


def _inputs(workload: Workload, x: Tensor) -> Tensor:
    """The model's input from a stored batch: GPT batches hold ``context + 1`` tokens (inputs and targets)."""
    return x[:, :-1] if workload.name == "gpt2" else x


@dataclasses.dataclass(frozen=True)
class Setting:
    """How long to measure: timed steps per run, alternating repeats, steady checks (after the start-up ones)."""

    steps: int
    repeats: int
    checks: int


@dataclasses.dataclass
class Result:
    """One configuration's measurement (times in seconds)."""

    model: str
    framework: str
    layer: str
    path: str
    width: int
    samples: int
    n_checked: int
    batch: int
    step_off: float
    step_on: float
    check: float
    startup_check: float
    check_times: list[float]
    #: the default detector's per-step work (loss, gradient norm, CUSUM update) per step, plain loop only
    channels: float = math.nan
    #: the largest peak extra memory of a check (start-up checks included), MB (`timed_call`; plain loop only)
    check_peak: float = math.nan

    @property
    def channels_share(self) -> float:
        """The per-step channels' cost as a share of a step without the monitor."""
        return self.channels / self.step_off

    @property
    def share(self) -> float:
        """The check's cost as a share of the ``EVERY`` steps it watches (without the monitor)."""
        return self.check / (EVERY * self.step_off)

    @property
    def ratio(self) -> float:
        """``(EVERY x step on + check) / (EVERY x step off)``: time with the monitor over time without."""
        return (EVERY * self.step_on + self.check) / (EVERY * self.step_off)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(workload: Workload) -> Any:
    if workload.amp:
        return torch.autocast(device_type=workload.device.type, dtype=torch.bfloat16)
    return torch.autocast(device_type="cpu", enabled=False)


def _train_step(
    workload: Workload,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    feed: _DetectorFeed | None = None,
) -> None:
    with _autocast(workload):
        loss = workload.loss(model(_inputs(workload, x)), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if feed is not None:
        feed.before_step(loss, model)
    opt.step()
    if feed is not None:
        feed.after_step()


class _DetectorFeed:
    """What an adapter does every optimizer step for the default detector (the loss, the global gradient norm, the
    CUSUM update), timed on its own: each call is bracketed by device syncs, so pending training work is not
    counted. Its reference windows are filled first, so every step pays the steady cost (a median over 200)."""

    def __init__(self, monitor: CollapseMonitorCore, device: torch.device) -> None:
        self.monitor = monitor
        self.device = device
        self.step = 0
        self.seconds = 0.0
        self.steps = 0
        self._grad: float | None = None
        gen = torch.Generator().manual_seed(0)
        assert monitor.detector is not None
        for name in monitor.step_channels:
            for value in torch.exp(0.1 * torch.randn(200, generator=gen)).tolist():
                monitor.detector.update(name, value, 0)

    def before_step(self, loss: Tensor, model: nn.Module) -> None:
        _sync(self.device)
        start = time.perf_counter()
        self.monitor.add_loss(loss)
        if "grad_norm" in self.monitor.step_channels:
            self._grad = global_grad_norm(model.parameters())
        _sync(self.device)
        self.seconds += time.perf_counter() - start

    def after_step(self) -> None:
        start = time.perf_counter()
        self.step += 1
        self.monitor.observe_step(self.step, grad_norm=self._grad)
        self.seconds += time.perf_counter() - start
        self.steps += 1


def _fresh(workload: Workload, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    with workload.device:  # initialised where it trains (GPT-2's 124M parameters: seconds on a CPU, per run)
        model = workload.make_model()
    model.train()
    return model, workload.make_optimizer(model)


def capture_clouds(workload: Workload, layers: Sequence[str], rows: int, seed: int = 12345) -> dict[str, Tensor]:
    """Each watched block's pooled outputs for ``rows`` fresh synthetic examples, by the package's own capture
    (`EmbeddingCapture`, default ``pool="mean"``): train mode, no gradients, on the workload's device."""
    model, _ = _fresh(workload, seed)
    captures = {}
    for layer in layers:
        cap = EmbeddingCapture(rows)
        cap.attach(model.get_submodule(workload.layers[layer]))
        cap.armed = True
        captures[layer] = cap
    deepest = max(layers, key=lambda layer: list(workload.layers).index(layer))
    gen = torch.Generator().manual_seed(seed)
    done = 0
    with torch.no_grad():
        while done < rows:
            n = min(workload.capture_chunk, rows - done)
            x = _inputs(workload, workload.make_inputs(n, gen)).to(workload.device)
            with _autocast(workload):
                workload.forward_to(model, x, workload.layers[deepest])
            done += n
    clouds = {}
    for layer, cap in captures.items():
        cap.detach()
        cloud = cap.take()
        assert cloud is not None, "the capture pass captured nothing"
        assert cloud.shape[0] == rows, "the capture pass lost rows"
        clouds[layer] = cloud
    return clouds


def timed_call(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """Wall seconds of ``fn()`` and the peak extra memory it took, in MB: on the CPU the process's resident-set
    high-water mark (reset just before, Linux ``/proc``) over its resident set before the call, counting torch,
    numpy and Python alike; on CUDA the device's peak allocation over its allocation before. NaN where unknown."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before: float | None = torch.cuda.memory_allocated(device) / 2**20
        reset = True
    else:
        before, reset = _status("VmRSS"), _reset_peak()
    start = time.perf_counter()
    fn()
    _sync(device)
    seconds = time.perf_counter() - start
    high = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else _status("VmHWM")
    extra = high - before if reset and high is not None and before is not None else math.nan
    return seconds, extra


def _inject(monitor: CollapseMonitorCore, rows: Tensor) -> None:
    """Fill the monitor's capture buffer with ``rows``, as if its hook had captured them in the last steps."""
    monitor.capture.add(rows)
    monitor.capture.seen += rows.shape[0]


def _sample(cloud: Tensor, samples: int, gen: torch.Generator) -> Tensor:
    """``samples`` random rows of ``cloud`` (a different draw, or order, at each check: a stream sample)."""
    keep = torch.randperm(cloud.shape[0], generator=gen)[:samples].to(cloud.device)
    return cloud[keep]


# ------------------------------------------------------------------------------------------ plain PyTorch loop


def plain_step_time(workload: Workload, steps: int, layer: str | None, samples: int, seed: int) -> float:
    """Seconds per optimizer step over ``steps`` steps after one warm-up step; with the monitor's hook armed on
    every step when ``layer`` is given (``every_n_train_steps=50``, and the run ends before step 50)."""
    assert steps + 1 < EVERY, "a step-time run must end before the first check"
    model, opt = _fresh(workload, seed)
    data = [(x.to(workload.device), y.to(workload.device)) for x, y in workload.batches(steps + 1, seed)]
    monitor = feed = None
    if layer is not None:
        monitor = CollapseMonitorCore(
            workload.layers[layer], every_n_train_steps=EVERY, max_samples=samples, max_overhead=None
        )
        monitor.attach(model)
        feed = _DetectorFeed(monitor, workload.device)
    start = 0.0
    for i, (x, y) in enumerate(data):
        if i == 1:
            _sync(workload.device)
            start = time.perf_counter()
            if feed is not None:
                feed.seconds, feed.steps = 0.0, 0
        if monitor is not None:
            monitor.prepare_step(i + 1)
            assert monitor.capture.armed
        _train_step(workload, model, opt, x, y, feed)
    _sync(workload.device)
    elapsed = time.perf_counter() - start
    if monitor is not None and feed is not None:
        monitor.detach()
        CHANNEL_TIMES.append(feed.seconds / max(feed.steps, 1))
    return elapsed / steps


#: The per-step detector cost of each plain "on" run (seconds per step), for `Result.channels`.
CHANNEL_TIMES: list[float] = []


def plain_check_times(
    workload: Workload,
    configs: Sequence[tuple[str, int]],
    clouds: dict[str, Tensor],
    checks: int,
    seed: int,
    profile: bool = False,
) -> dict[tuple[str, int], tuple[list[float], list[int], list[float]]]:
    """Per (layer, samples): the time of each check (the start-up checks first), its number of points and its peak
    extra memory in MB (`timed_call`), from a plain training loop with one monitor per configuration at
    ``every_n_train_steps=1``, fed from ``clouds``.

    ``profile``: one more steady check per configuration, under cProfile, printed and not timed.
    """
    timed = STARTUP_CHECKS + checks
    model, opt = _fresh(workload, seed)
    data = [(x.to(workload.device), y.to(workload.device)) for x, y in workload.batches(timed + profile, seed)]
    monitors = {}
    for layer, samples in configs:
        mon = CollapseMonitorCore(  # every check timed: no overhead budget spacing them
            workload.layers[layer],
            every_n_train_steps=1,
            max_samples=samples,
            monitor=f"collapse/{layer}/{samples}/ci",
            max_overhead=None,
        )
        mon.attach(model)
        monitors[(layer, samples)] = mon
    gen = torch.Generator().manual_seed(seed)
    times: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
    peaks: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
    for step, (x, y) in enumerate(data, start=1):
        for mon in monitors.values():
            mon.prepare_step(step)
        _train_step(workload, model, opt, x, y)
        for (layer, samples), mon in monitors.items():
            assert mon.is_check_step(step)
            _inject(mon, _sample(clouds[layer], samples, gen))
            if step > timed:
                profiler = cProfile.Profile()
                profiler.runcall(mon.run_check, step)
                _sync(workload.device)
                _print_profile(profiler, f"{workload.name} {layer} `{workload.layers[layer]}`, {samples} samples")
                continue
            seconds, extra = timed_call(lambda m=mon, s=step: m.run_check(s), workload.device)  # type: ignore[misc]
            times[(layer, samples)].append(seconds)
            peaks[(layer, samples)].append(extra)
    out = {}
    for config, mon in monitors.items():
        mon.detach()
        out[config] = (times[config], [int(h["n"]) for h in mon.history], peaks[config])
    return out


def _print_profile(profiler: cProfile.Profile, title: str) -> None:
    """Where a check's time went: the package's functions by cumulative time, then the costliest single calls."""
    print(f"\nprofile of one steady check: {title}")
    for sort, restriction, lines in (("cumulative", r"topo_callbacks", 16), ("tottime", r".", 8)):
        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).sort_stats(sort).print_stats(restriction, lines)
        body = buf.getvalue()
        at = body.find("   ncalls")
        print(f"by {sort}:")
        print(body[at:].rstrip() if at >= 0 else body.rstrip())


# ---------------------------------------------------------------------------------------------------- Lightning


def _lightning_parts(workload: Workload) -> tuple[type, type, type]:
    """(LightningModule, step-timer Callback, timed CollapseMonitor) classes for ``workload``."""
    import lightning.pytorch as pl

    from topo_callbacks.lightning import CollapseMonitor

    class BenchModule(pl.LightningModule):
        def __init__(self, seed: int) -> None:
            super().__init__()
            torch.manual_seed(seed)
            with workload.device:
                self.net = workload.make_model()

        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            x, y = batch
            return workload.loss(self.net(_inputs(workload, x)), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return workload.make_optimizer(self.net)

    class StepTimer(pl.Callback):
        """Wall time from the end of the first optimizer step to the end of the last (synchronised)."""

        def __init__(self, last_step: int) -> None:
            self.last_step = last_step
            self.start = 0.0
            self.elapsed = 0.0

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if trainer.global_step in (1, self.last_step):
                _sync(pl_module.device)
                now = time.perf_counter()
                if trainer.global_step == 1:
                    self.start = now
                else:
                    self.elapsed = now - self.start

    class TimedCollapseMonitor(CollapseMonitor):  # type: ignore[valid-type,misc]
        """The Lightning callback, its buffer filled from a cloud before each check, the check's hook timed."""

        def __init__(self, cloud: Tensor, gen: torch.Generator, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.cloud = cloud
            self.gen = gen
            self.check_times: list[float] = []

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if not self.is_check_step(trainer.global_step):
                super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
                return
            _inject(self, _sample(self.cloud, self.max_samples, self.gen))
            _sync(pl_module.device)
            start = time.perf_counter()
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            _sync(pl_module.device)
            self.check_times.append(time.perf_counter() - start)

    return BenchModule, StepTimer, TimedCollapseMonitor


def _trainer(workload: Workload, steps: int, callbacks: list[Any], log_dir: str) -> Any:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    cuda = workload.device.type == "cuda"
    return pl.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=1,
        precision="bf16-mixed" if workload.amp else "32-true",
        max_steps=steps,
        logger=CSVLogger(log_dir, name="overhead"),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )


def _loader(workload: Workload, count: int, seed: int) -> Any:
    from torch.utils.data import DataLoader

    batches = workload.batches(count, seed)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    return DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=workload.batch, shuffle=False)


def lightning_step_time(
    workload: Workload, steps: int, layer: str | None, samples: int, seed: int, log_dir: str
) -> float:
    """As `plain_step_time`, through ``Trainer.fit`` with `topo_callbacks.lightning.CollapseMonitor`."""
    from topo_callbacks.lightning import CollapseMonitor

    assert steps + 1 < EVERY, "a step-time run must end before the first check"
    module_cls, timer_cls, _ = _lightning_parts(workload)
    timer = timer_cls(steps + 1)
    callbacks: list[Any] = [timer]
    if layer is not None:
        path = "net." + workload.layers[layer]
        monitor = CollapseMonitor(path, every_n_train_steps=EVERY, max_samples=samples, max_overhead=None)
        _DetectorFeed(monitor, workload.device)  # steady reference windows: the callback feeds the detector itself
        callbacks.append(monitor)
    trainer = _trainer(workload, steps + 1, callbacks, log_dir)
    trainer.fit(module_cls(seed), train_dataloaders=_loader(workload, steps + 1, seed))
    assert trainer.global_step == steps + 1
    return timer.elapsed / steps


def lightning_check_times(
    workload: Workload,
    configs: Sequence[tuple[str, int]],
    clouds: dict[str, Tensor],
    checks: int,
    seed: int,
    log_dir: str,
) -> dict[tuple[str, int], tuple[list[float], list[int], list[float]]]:
    """As `plain_check_times`, through ``Trainer.fit``: the time of the callback's check step (its memory is not
    measured: NaN)."""
    module_cls, _, monitor_cls = _lightning_parts(workload)
    total = STARTUP_CHECKS + checks
    gen = torch.Generator().manual_seed(seed)
    monitors = {
        (layer, samples): monitor_cls(
            clouds[layer],
            gen,
            layer="net." + workload.layers[layer],
            every_n_train_steps=1,
            max_samples=samples,
            monitor=f"collapse/{layer}/{samples}/ci",
            max_overhead=None,
        )
        for layer, samples in configs
    }
    trainer = _trainer(workload, total, list(monitors.values()), log_dir)
    trainer.fit(module_cls(seed), train_dataloaders=_loader(workload, total, seed))
    return {c: (m.check_times, [int(h["n"]) for h in m.history], [math.nan]) for c, m in monitors.items()}


# -------------------------------------------------------------------------------------------------- the protocol


def measure(
    workload: Workload,
    frameworks: Sequence[str],
    layers: Sequence[str],
    samples: Sequence[int],
    setting: Setting,
    profile: bool = False,
    log: Callable[[str], None] = print,
) -> list[Result]:
    """Step times (alternating off/on runs per layer) and check times (steady, start-up) per framework, layer
    and sample size; see the module docstring."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's hints on tiny runs, the monitor's "no check ran" at the end
        return _measure(workload, frameworks, layers, samples, setting, profile, log)


def _measure(
    workload: Workload,
    frameworks: Sequence[str],
    layers: Sequence[str],
    samples: Sequence[int],
    setting: Setting,
    profile: bool,
    log: Callable[[str], None],
) -> list[Result]:
    configs = [(layer, s) for layer in layers for s in samples]
    started = time.perf_counter()
    clouds = capture_clouds(workload, layers, max(samples))
    log(f"captured {max(samples)} pooled rows of {', '.join(layers)} in {time.perf_counter() - started:.0f} s")
    results = []
    with tempfile.TemporaryDirectory() as log_dir:
        for framework in frameworks:
            started = time.perf_counter()

            def step_time(
                layer: str | None, seed: int, steps: int = setting.steps, framework: str = framework
            ) -> float:
                if framework == "plain":
                    return plain_step_time(workload, steps, layer, max(samples), seed)
                return lightning_step_time(workload, steps, layer, max(samples), seed, log_dir)

            step_time(layers[0], seed=99, steps=1)  # warm-up: first-call costs (kernels, lazy imports, Trainer)
            CHANNEL_TIMES.clear()
            off: list[float] = []
            on: dict[str, list[float]] = {layer: [] for layer in layers}
            for r in range(setting.repeats):
                for layer in layers:  # alternate: off, on(middle), off, on(last); on(middle), off, on(last), off; ...
                    for monitored in (False, True) if r % 2 == 0 else (True, False):
                        if monitored:
                            on[layer].append(step_time(layer, seed=r))
                        else:
                            off.append(step_time(None, seed=r))
            # The check's cost does not depend on the batch the loop trains on (its rows come from `clouds`): the
            # steps between checks, which are not timed, use a small batch.
            small = dataclasses.replace(workload, batch=min(workload.batch, CHECK_RUN_BATCH))
            if framework == "plain":
                timed = plain_check_times(small, configs, clouds, setting.checks, seed=7, profile=profile)
            else:
                timed = lightning_check_times(small, configs, clouds, setting.checks, 7, log_dir)
            for layer, s in configs:
                times, ns, peaks = timed[(layer, s)]
                results.append(
                    Result(
                        model=workload.name,
                        framework=framework,
                        layer=layer,
                        path=workload.layers[layer],
                        width=workload.widths[layer],
                        samples=s,
                        n_checked=min(ns) if ns else 0,
                        batch=workload.batch,
                        step_off=statistics.median(off),
                        step_on=statistics.median(on[layer]),
                        check=statistics.median(times[STARTUP_CHECKS:]),
                        startup_check=statistics.median(times[:STARTUP_CHECKS]),
                        check_times=times,
                        channels=statistics.median(CHANNEL_TIMES) if CHANNEL_TIMES else math.nan,
                        check_peak=max(peaks, default=math.nan),
                    )
                )
            log(f"{framework}: measured in {time.perf_counter() - started:.0f} s")
    return results


def format_table(results: Sequence[Result]) -> str:
    """A Markdown table, one row per configuration."""
    lines = [
        "| framework | layer | samples (n) | step off | step on | check (start-up) | check / 50 steps | ratio"
        " | per-step channels | budget 2%: checks every | budget: share |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        every, share = _budgeted(r)
        lines.append(
            f"| {r.framework} | {r.layer} `{r.path}` (d={r.width}) | {r.samples} ({r.n_checked}) "
            f"| {r.step_off * 1e3:.1f} ms | {r.step_on * 1e3:.1f} ms "
            f"| {r.check * 1e3:.1f} ms ({r.startup_check * 1e3:.1f} ms) "
            f"| {100 * r.share:.2f}% | {r.ratio:.3f} "
            f"| {_channels(r)} | {every} steps | {100 * share:.2f}% |"
        )
    return "\n".join(lines)


def _budgeted(r: Result, budget: float = 0.02) -> tuple[int, float]:
    """What the default ``max_overhead=0.02`` makes of this configuration, computed from the measured times with the
    monitor's own rule (`check_spacing`): the checks' spacing (a multiple of 50 steps, at most 100 times) and the
    monitor's share of the wall time then. The step time "on" already holds the hook's and the per-step work."""
    per_step = max(r.step_on - r.step_off, 0.0)
    need = check_spacing(r.check, per_step, r.step_off, budget)
    every = EVERY * min(max(math.ceil(need / EVERY), 1), LONGEST_SPACING) if math.isfinite(need) else EVERY * 100
    share = (r.check + every * per_step) / (every * (r.step_off + per_step) + r.check)
    return every, share


def _channels(r: Result) -> str:
    if math.isnan(r.channels):
        return "in step on"
    return f"{r.channels * 1e3:.3f} ms ({100 * r.channels_share:.2f}%)"


def _machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    where = f"{cpu}, {torch.get_num_threads()} threads"
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)}; host {where}"
    return where


def build_workload(args: argparse.Namespace, device: torch.device) -> Workload:
    """The workload of ``--model`` at the device's size (full GPT-2 depth and context on CUDA) or ``--quick``."""
    cuda = device.type == "cuda"
    if args.model == "resnet18":
        batch = args.batch or (128 if cuda else 8 if args.quick else 16)
        return resnet18_workload(device, batch)
    layers = args.gpt_layers or (12 if cuda else 2)
    context = args.context or (1024 if cuda else 32 if args.quick else 128)
    batch = args.batch or (16 if cuda else 2 if args.quick else 4)
    return gpt2_workload(device, batch, layers, context)


def default_setting(args: argparse.Namespace, device: torch.device) -> Setting:
    if args.quick:
        setting = Setting(steps=3, repeats=1, checks=1)
    elif device.type == "cuda":
        setting = Setting(steps=10, repeats=2, checks=2)
    else:
        setting = Setting(steps=8, repeats=2, checks=3)
    return Setting(
        steps=args.steps or setting.steps,
        repeats=args.repeats or setting.repeats,
        checks=args.checks or setting.checks,
    )


def main_realistic(args: argparse.Namespace) -> None:
    """``--model resnet18|gpt2``: the split protocol over frameworks, layers and sample sizes."""
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    warnings.simplefilter("ignore")
    frameworks = ["plain", "lightning"] if args.framework == "both" else [args.framework]
    if "lightning" in frameworks:
        import lightning.pytorch  # noqa: F401  (it sets its loggers' levels on import)

        for name in ("lightning.pytorch", "lightning.fabric"):  # "GPU available: ..." at every Trainer, summaries
            logging.getLogger(name).setLevel(logging.WARNING)
    workload = build_workload(args, device)
    setting = default_setting(args, device)
    samples = args.samples or ([256] if args.quick else [1024, 4096])
    layers = ["middle", "last"] if args.layer == "both" else [args.layer]
    started = time.perf_counter()
    print(f"date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"machine: {_machine(device)}; torch {torch.__version__}; device {device}")
    print(f"model: {workload.description}" + ("; bf16 autocast" if workload.amp else "; float32"))
    print(
        f"monitor: every {EVERY} steps, samples {', '.join(map(str, samples))}, stream source, defaults otherwise;"
        f" watched: {', '.join(f'{layer} `{workload.layers[layer]}`' for layer in layers)}"
    )
    print(
        f"protocol: split; step time = median of {setting.repeats} alternating off/on runs of {setting.steps} timed"
        f" steps (hook armed on every step); check = median of {setting.checks} steady checks after"
        f" {STARTUP_CHECKS} start-up checks (3 calibrate the scale, 1 builds the engine), timed in the training loop"
        " on the layer's captured rows"
    )
    results = measure(workload, frameworks, layers, samples, setting, profile=args.profile)
    print()
    print(format_table(results))
    print()
    for s in samples:
        if EVERY * workload.batch < s:
            print(
                f"note: at batch {workload.batch}, 50 steps supply {EVERY * workload.batch} rows; a stream check of"
                f" {s} samples needs a batch of at least {math.ceil(s / EVERY)}, whose steps are longer, so the"
                f" share and ratio printed for {s} samples are upper bounds."
            )
    print(
        "ratio = (50 x step on + check) / (50 x step off); check / 50 steps = check / (50 x step off);"
        " step off/on are run-to-run noisy on a shared machine (on < off happens), the check share is the stable part."
    )
    print(f"total time: {time.perf_counter() - started:.0f} s")


# --------------------------------------------------------------------------------------------------- every model


def _share(ratio: float) -> str:
    """The monitor's share of the wall time, from (time with) / (time without)."""
    return f"{100 * (1 - 1 / ratio):.1f}%"


def main_all(args: argparse.Namespace) -> None:
    """``--model all``: every model of this benchmark in one run, side by side, with the overhead budget off (a check
    every 50 steps, ``max_overhead=None``) and on (the default ``max_overhead=0.02``): the monitor's share of the
    wall time, the time and peak extra memory of a check. The small models are whole training runs (`small_arms`,
    CPU only); the ResNet-18 and GPT-2 shapes use the split protocol in the plain loop (last block, 1024 samples;
    256 with ``--quick``), and their budget-on share is computed from the measured parts with the monitor's own
    spacing rule (`_budgeted`), since a budgeted run of them spaces its checks by thousands of steps."""
    device = torch.device(args.device)
    warnings.simplefilter("ignore")
    started = time.perf_counter()
    print(f"date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"machine: {_machine(device)}; torch {torch.__version__}; device {device}")
    lines = [
        "| model | step, no monitor | budget off: check (every 50) | peak extra memory of a check"
        " | budget off: share of wall time | budget on: checks every | samples | budget on: share of wall time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    if device.type == "cpu":
        repeats, steps = (1, 300) if args.quick else (3, 2000)
        print(f"small models: whole runs of {steps} steps, {repeats} repeat(s) per arm, rotating order")
        for name in SMALL_MODELS:
            runs = small_arms(name, steps, repeats)
            step = {a: statistics.median(x["step_s"] for x in runs[a]) for a in SMALL_ARMS}
            peak = max((p for x in runs["all"] for p in x["peaks"]), default=math.nan)
            last = runs["budget"][-1]
            own = statistics.median(x["own_share"] for x in runs["budget"])
            lines.append(
                f"| {name} | {step['off'] * 1e3:.2f} ms | {_median_check_ms(runs['all']).strip()} | {peak:.0f} MB"
                f" | {_share(step['all'] / step['off'])} (measured) | {last['check_every']} | {last['max_samples']}"
                f" | {_share(step['budget'] / step['off'])} (measured; monitor's own timing: {100 * own:.1f}%) |"
            )
            print(f"{name}: done at {time.perf_counter() - started:.0f} s")
    samples = 256 if args.quick else 1024
    for model in ("resnet18", "gpt2"):
        workload = build_workload(argparse.Namespace(**{**vars(args), "model": model}), device)
        setting = default_setting(args, device)
        (r,) = measure(workload, ["plain"], ["last"], [samples], setting, log=lambda _: None)
        every, share = _budgeted(r)
        lines.append(
            f"| {model} (batch {workload.batch}; last block d={r.width}) | {r.step_off * 1e3:.1f} ms"
            f" | {r.check * 1e3:.1f} ms | {r.check_peak:.0f} MB"
            f" | {_share(r.ratio)} (split protocol) | {every} | {samples} | {100 * share:.2f}% (computed) |"
        )
        print(f"{model}: done at {time.perf_counter() - started:.0f} s")
    print()
    print("\n".join(lines))
    print()
    print(
        "share of wall time = 1 - (time without the monitor) / (time with it); peak extra memory: resident-set"
        " high-water mark during a check over the resident set before it (CPU), peak allocation (CUDA)"
    )
    print(f"total time: {time.perf_counter() - started:.0f} s")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["mlp", "small", "resnet18", "gpt2", "all"], default="mlp")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: resnet18 and gpt2 only")
    parser.add_argument("--quick", action="store_true", help="short CI setting")
    parser.add_argument("--every", type=int, default=50, help="mlp only (the realistic models check every 50)")
    parser.add_argument(
        "--samples", type=int, nargs="+", default=None, help="mlp: one value (1024); others: default 1024 4096"
    )
    parser.add_argument("--dim", type=int, default=256, help="mlp: width of the watched layer")
    parser.add_argument(
        "--source", choices=["stream", "probe"], default="stream", help="mlp: what the monitor embeds (see the core)"
    )
    parser.add_argument("--layer", choices=["middle", "last", "both"], default="both", help="resnet18/gpt2")
    parser.add_argument("--framework", choices=["plain", "lightning", "both"], default="both", help="resnet18/gpt2")
    parser.add_argument("--batch", type=int, default=None, help="resnet18/gpt2: override the batch size")
    parser.add_argument("--steps", type=int, default=None, help="resnet18/gpt2: timed steps per run (< 49)")
    parser.add_argument("--repeats", type=int, default=None, help="resnet18/gpt2: alternating off/on repeats")
    parser.add_argument(
        "--checks", type=int, default=None, help="resnet18/gpt2: steady checks timed after the 4 start-up checks"
    )
    parser.add_argument("--gpt-layers", type=int, default=None, help="gpt2: blocks (2 on the CPU, 12 on CUDA)")
    parser.add_argument("--context", type=int, default=None, help="gpt2: tokens per sequence (128 CPU, 1024 CUDA)")
    parser.add_argument("--profile", action="store_true", help="resnet18/gpt2: cProfile one check per configuration")
    args = parser.parse_args(argv)
    if args.model in ("small", "all"):
        return args
    if args.model == "mlp":
        realistic_only = ("batch", "steps", "repeats", "checks", "gpt_layers", "context")
        if args.device != "cpu" or any(getattr(args, name) is not None for name in realistic_only):
            parser.error("--device cuda, --batch, --steps, --repeats, --checks: for --model resnet18 or gpt2")
        if args.layer != "both" or args.framework != "both" or args.profile:
            parser.error("--layer, --framework, --profile: for --model resnet18 or gpt2 (mlp: plain loop, --dim)")
        if args.samples is not None and len(args.samples) != 1:
            parser.error("--model mlp takes one --samples value")
        args.samples = args.samples or [1024]
    else:
        if args.every != 50 or args.dim != 256 or args.source != "stream":
            parser.error("--every, --dim, --source: for --model mlp (the realistic models check every 50 steps)")
        if args.steps is not None and not 1 <= args.steps < EVERY - 1:
            parser.error(f"--steps must be in [1, {EVERY - 2}] (a step-time run ends before the first check)")
        if args.samples is not None and min(args.samples) < 8:
            parser.error("--samples must be at least 8")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.model == "mlp":
        main_mlp(args)
    elif args.model == "small":
        main_small(args)
    elif args.model == "all":
        main_all(args)
    else:
        main_realistic(args)


if __name__ == "__main__":
    main()
