"""The default alarm on training runs the benchmark does not hold (nothing here was used to fit it).

The detector's calibration is fit on the benchmark's families (``topo-callbacks bench``). This script trains other
runs, as a user would, with the shipped defaults (`CollapseMonitorCore` in a plain PyTorch loop, fed as the adapters
feed it) and reports what the alarm did: healthy runs with schedules, optimizers, models and lengths the benchmark
does not use (false alarms per 100,000 optimizer steps), and runs that break (detected before their metric dropped,
or not). The model is trained on scikit-learn's digits (a 64-128-64-10 MLP or a small CNN); accuracy on a held-out
third is measured every 25 steps; a run's metric "dropped" at the first evaluation 5 points under its best so far
(after its failure; for a healthy run, after its first 8 evaluations: such a run is not scored, as in the benchmark).

    python benchmarks/outside_runs.py               # every run, seeds 0 and 1 (about 10 min on 2 cores)
    python benchmarks/outside_runs.py --seeds 1 --quick   # short runs: a smoke test, not results
    python benchmarks/outside_runs.py --max-overhead none # the per-step channels read at every step
    python benchmarks/outside_runs.py --on-alarm rollback # each run again with on_alarm="rollback" (and the failures'
                                                          # healthy twins): what acting on the alarm saves or costs

Runs (healthy unless marked):
- ``adamw_warmup_cosine``: the CNN, AdamW, linear warm-up over 200 steps, cosine to 0 (3000 steps)
- ``onecycle``: the MLP, SGD with Nesterov momentum, `OneCycleLR` (3000 steps)
- ``fp16_scaler``: the MLP under fp16 autocast with a real `torch.amp.GradScaler` (growth every 100 steps)
- ``resumed_finetune``: 1500 steps, then a new monitor and a new Adam at a tenth of the rate on the other half of
  the training set (1500 steps)
- ``accumulate_clip``: the CNN, 4 micro-batches per step, clipping at 1.0, RMSprop (2000 steps)
- ``long_restarts``: the MLP, SGD, `CosineAnnealingWarmRestarts` every 2000 steps (20,000 steps)
- ``simsiam_adamw``: SimSiam (the benchmark's SSL network, watched at its projector) under AdamW at 3e-4, warm-up over
  200 steps, cosine to 0, batches of 128 augmented pairs; the metric: a kNN probe on its backbone's clean views
  (2000 steps)
- ``unfreeze_backbone``: transfer, as Lightning's ``BackboneFinetuning`` does it: the CNN pretrained on the digits 0-4
  (800 Adam steps, no monitor), a new 10-class head trained alone under Adam at 1e-3, the rest unfrozen at step 500
  as a new parameter group at 1e-4 (1500 steps)
- ``bf16_autocast``: the MLP under bf16 autocast (no loss scaler: bf16 needs none), SGD with momentum (3000 steps)
- ``mixup_step_decay``: the CNN on mixup batches (alpha 0.4: every loss is a mix of two labels), SGD with momentum,
  the rate x0.1 at steps 1000 and 2000 (3000 steps)
- ``preempted_resume``: the MLP, AdamW with warm-up and cosine, preempted at step 1500: the model, optimizer,
  scheduler and monitor states saved, a new process (new objects, the states loaded, a new data order) goes on
  (3000 steps)
- ``plateau_decay``: the CNN under SGD with momentum, `ReduceLROnPlateau` (halved after 3 stretches of 100 steps
  without a 5% better mean training loss) (3000 steps)
- ``inverse_sqrt``: the MLP under Adam, a transformer's schedule: linear warm-up over 200 steps, then 1/sqrt(step)
  (6000 steps)
  (these five added 2026-12-05 as kinds of healthy run nothing was fit on, written before they were run)
- ``lr_x50_at_40`` (failure, at 40): the MLP's rate x50 from step 40
- ``lr_x20_jump`` (failure, at 1500): the CNN under Adam, rate x20 from step 1500
- ``cnn_sgd_x30_at_1000`` (failure, at 1000): the CNN under SGD with momentum, its rate x30 from step 1000 (a
  milestone whose factor was written 30 for 1/30); added 2026-12-05 after `RollbackPolicy.undo_rate_rise`, to try it
  on a run it was not designed on
- ``labels_shuffled`` (failure, at 1000): the MLP's training labels shuffled from step 1000
- ``dead_layer`` (failure, at 30): the watched layer's biases pushed to -50 at step 30 (its output constant 0)
- ``simsiam_adamw_collapse`` (failure, at 600): ``simsiam_adamw`` whose stop-gradient is removed from step 600
- ``late_shuffle`` (failure, at 2400): ``preempted_resume``'s schedule without the preemption (AdamW, warm-up, cosine
  to 0 over 3000 steps), the training labels shuffled from step 2400, where the rate is a tenth of its peak
- ``late_shuffle_cnn`` (failure, at 2400): the same on the CNN
- ``late_dormant_linear`` (failure, at 2000): the MLP under SGD with momentum and a linear decay to 0 over 3000 steps
  (the HF Trainer's default schedule), ``dormant_units``' regulariser from step 2000
  (the three added 2026-12-05: ``late_shuffle`` showed that a run read one step in 6-66 went unscored for the last
  third of a cosine decay; the other two were written before the mend was run on them. A fourth written then,
  ``simsiam_adamw`` without its stop-gradient from step 1400, is not kept: its kNN probe never dropped in 4 seeds)
- ``dormant_units`` (failure, at 300): the MLP under SGD, a buggy regulariser from step 300 pushing both hidden layers'
  biases down (0.1 per bias): units stop firing one after another
- ``lm_adamw_cosine``: a small GPT-style byte-level language model built from PyTorch's own
  ``nn.TransformerEncoderLayer`` (pre-LN, causal, dropout 0.1; 2 layers, width 64, context 32, batches of 16) on
  CPython's standard library, the recipe most language models use: AdamW (betas 0.9/0.95, weight decay 0.1), warm-up
  over 100 steps, cosine to a tenth, clipping at 1.0; watched at its final LayerNorm (mean over positions); the
  metric: validation perplexity, "dropped" 10% over its best (2000 steps)
- ``lm_lr_x50_at_1000`` (failure, at 1000): the same with its rate x50 from step 1000 (a resumed job given the wrong
  rate). Written first at x10, which was no failure: its perplexity rose 10% for one evaluation, then ended better
  than its twin's (6.3-6.4 against 7.1-7.4; the base rate is low for this model), with no alarm in 4 seeds
- ``lm_off_by_one_at_1000`` (failure, at 1000): the targets shifted by one byte too many from step 1000 (the classic
  off-by-one of a data pipeline: the model is taught to predict the byte after next)
- ``lm_repeated_batch_at_1000`` (failure, at 1000): the data loader stuck on one batch from step 1000 (the training
  loss falls, the model memorises it and validation perplexity rises)
  (the four added 2026-12-05 as a kind of model the outside runs did not hold, written before they were run, but
  the rate's factor)
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from topo_callbacks.bench.families import SSLNet
from topo_callbacks.bench.recovery import RESCUE_POINTS, RESCUE_RELATIVE, metric_gap
from topo_callbacks.bench.tasks import DigitsMLP, augment, knn_accuracy, stdlib_text
from topo_callbacks.core.monitor import CollapseMonitorCore

EVAL_EVERY = 25
#: ``plateau_decay``: `ReduceLROnPlateau` is stepped with the mean training loss of every this many steps
PLATEAU_EVERY = 100
DROP_POINTS = 5.0
#: a healthy run's metric "dropped" (and the run is not scored, as in the benchmark) if it falls 5 points under its
#: best after this many evaluations
WARMUP_EVALS = 8


@dataclass(frozen=True)
class Run:
    name: str
    model: str  # "mlp", "cnn", "ssl" or "lm"
    steps: int
    make_opt: Callable[[nn.Module, int], tuple[torch.optim.Optimizer, Any]]
    fail_at: int | None = None
    lr_factor: Callable[[int], float] = lambda step: 1.0
    fp16: bool = False
    accumulate: int = 1
    clip: float | None = None
    shuffle_from: int | None = None
    dead_at: int | None = None
    resume_at: int | None = None
    #: SimSiam only: the step from which the stop-gradient is gone (its collapse)
    no_stop_gradient_from: int | None = None
    #: MLP only: the step from which a regulariser pushes the hidden biases down (dormant units)
    push_biases_from: int | None = None
    #: a transfer run: the model pretrained on digits 0-4 (no monitor), a new 10-class head trained alone until this
    #: step, then the rest unfrozen as a new parameter group at a tenth of the rate (Lightning's BackboneFinetuning)
    unfreeze_at: int | None = None
    #: bf16 autocast (no loss scaler)
    bf16: bool = False
    #: mixup's alpha: each batch mixed with itself shuffled, the loss the same mix of the two labels' losses
    mixup: float | None = None
    #: the job is preempted after this step and resumed from its saved states in a new "process"
    preempt_at: int | None = None
    #: LM only: from this step the targets are shifted one byte too far (an off-by-one in the data pipeline)
    off_by_one_from: int | None = None
    #: LM only: from this step every batch is the batch of that step (a data loader stuck on one batch)
    repeat_batch_from: int | None = None


@dataclass
class Outcome:
    run: str
    seed: int
    steps: int
    fail_at: int | None
    dropped_at: int | None
    alarms: list[dict[str, Any]] = field(default_factory=list)
    skipped_steps: int = 0
    wall_s: float = 0.0
    #: the accuracy (kNN probe for SimSiam, validation perplexity for the LM: lower is better) at the last
    #: evaluation, or at the step the run stopped
    final_metric: float = math.nan
    on_alarm: str = "warn"
    rollbacks: list[dict[str, Any]] = field(default_factory=list)
    stopped_at: int | None = None
    stop_reason: str | None = None

    @property
    def detected(self) -> bool:
        first = self.alarms[0]["start"] if self.alarms else None
        limit = self.dropped_at if self.dropped_at is not None else self.steps + 1
        return self.fail_at is not None and first is not None and self.fail_at <= first < limit


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU())
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(32 * 64, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(self.body(x.view(-1, 1, 8, 8))))


class TinyGPT(nn.Module):
    """A small GPT-style byte-level language model from PyTorch's own pre-LN ``nn.TransformerEncoderLayer`` under a
    causal mask, as users build one."""

    def __init__(self, d: int = 64, layers: int = 2, heads: int = 4, context: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, d)
        self.pos = nn.Parameter(torch.randn(context, d) * 0.02)
        block = nn.TransformerEncoderLayer(
            d, heads, 4 * d, dropout=0.1, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, 256)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        h = self.embed(idx) + self.pos[:t]
        return self.head(self.ln_f(self.blocks(h, mask=self.mask[:t, :t], is_causal=True)))  # type: ignore[index]


#: the language model's context and batch (`TinyGPT`), and how many validation windows its perplexity is measured on
LM_CONTEXT, LM_BATCH, LM_VAL_WINDOWS = 32, 16, 128


def _lm_data() -> tuple[torch.Tensor, torch.Tensor]:
    """CPython's standard library as bytes (the benchmark's corpus), 90% to train on, the rest to validate."""
    data = torch.frombuffer(bytearray(stdlib_text()), dtype=torch.uint8).long()
    cut = int(0.9 * len(data))
    return data[:cut], data[cut:]


def _lm_windows(source: torch.Tensor, starts: torch.Tensor, shift: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs of `LM_CONTEXT` bytes from each start and their targets ``shift`` bytes on (1: the next byte)."""
    chunk = source[starts[:, None] + torch.arange(LM_CONTEXT + shift)]
    return chunk[:, :LM_CONTEXT], chunk[:, shift : shift + LM_CONTEXT]


def _perplexity(model: nn.Module, val: torch.Tensor) -> float:
    span = len(val) - LM_CONTEXT - 2
    xv, yv = _lm_windows(val, torch.arange(0, span, span // LM_VAL_WINDOWS)[:LM_VAL_WINDOWS])
    loss = float(nn.functional.cross_entropy(model(xv).reshape(-1, 256), yv.reshape(-1)))
    return math.exp(loss) if math.isfinite(loss) and loss < 50 else math.inf


def _lm_recipe(model: nn.Module, steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """What most language models are trained with: AdamW (0.9, 0.95), weight decay 0.1, linear warm-up, cosine to a
    tenth of the peak."""
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
    warm = 100

    def factor(i: int) -> float:
        if i < warm:
            return (i + 1) / warm
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(i - warm, steps - warm) / max(steps - warm, 1)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _sgd(model: nn.Module, steps: int) -> tuple[torch.optim.Optimizer, Any]:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return opt, None


def _warmup_cosine(model: nn.Module, steps: int, lr: float = 2e-3) -> tuple[torch.optim.Optimizer, Any]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warm = 200

    def factor(i: int) -> float:
        return (i + 1) / warm if i < warm else 0.5 * (1 + math.cos(math.pi * (i - warm) / max(steps - warm, 1)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _onecycle(model: nn.Module, steps: int) -> tuple[torch.optim.Optimizer, Any]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps)


def _rmsprop(model: nn.Module, steps: int) -> tuple[torch.optim.Optimizer, Any]:
    return torch.optim.RMSprop(model.parameters(), lr=5e-4), None


def _restarts(model: nn.Module, steps: int) -> tuple[torch.optim.Optimizer, Any]:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return opt, torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=2000, eta_min=5e-4)


def _plateau(model: nn.Module, steps: int) -> tuple[torch.optim.Optimizer, Any]:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return opt, torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=2, threshold=0.05)


def _inverse_sqrt(model: nn.Module, steps: int) -> tuple[torch.optim.Optimizer, Any]:
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    warm = 200
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min((i + 1) / warm, math.sqrt(warm / (i + 1))))


def _sgd_step_decay(model: nn.Module, steps: int) -> tuple[torch.optim.Optimizer, Any]:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return opt, torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[steps // 3, 2 * steps // 3], gamma=0.1)


def _sgd_linear_decay(model: nn.Module, steps: int) -> tuple[torch.optim.Optimizer, Any]:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda i: max(0.0, 1.0 - i / steps))


def _adam(model: nn.Module, steps: int) -> tuple[torch.optim.Optimizer, Any]:
    return torch.optim.Adam(model.parameters(), lr=1e-3), None


def bias_push(model: DigitsMLP) -> torch.Tensor:
    """``dormant_units``' buggy regulariser: 0.1 times the sum of both hidden layers' biases, added to the loss, so
    that every step pushes each of those biases down by 0.1 x the learning rate and units stop firing."""
    return 0.1 * (model.body[0].bias.sum() + model.embed[0].bias.sum())  # type: ignore[index]


#: optimizer steps of `_pretrain_on_half`
PRETRAIN_STEPS = 800


def _pretrain_on_half(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int) -> list[nn.Parameter]:
    """A transfer run's start: ``model`` trained on the digits 0-4 with Adam (no monitor), its head replaced by a new
    10-class one, everything else frozen; returns the frozen parameters."""
    g = torch.Generator().manual_seed(2000 + seed)
    half = torch.nonzero(y < 5).flatten()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(PRETRAIN_STEPS):
        idx = half[torch.randint(0, len(half), (64,), generator=g)]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    model.head = nn.Linear(model.head.in_features, 10)  # type: ignore[union-attr, arg-type]
    backbone = [p for name, p in model.named_parameters() if not name.startswith("head.")]
    for p in backbone:
        p.requires_grad_(False)
    return backbone


def _simsiam_loss(model: SSLNet, x: torch.Tensor, g: torch.Generator, stop_gradient: bool) -> torch.Tensor:
    z1, z2 = model(augment(x, g)), model(augment(x, g))
    p1, p2 = model.predictor(z1), model.predictor(z2)
    t1, t2 = (z1.detach(), z2.detach()) if stop_gradient else (z1, z2)
    cos = nn.functional.cosine_similarity
    return -(cos(p1, t2).mean() + cos(p2, t1).mean()) / 2


def _accuracy(run: Run, model: nn.Module, data: tuple[torch.Tensor, ...]) -> float:
    x, y, xv, yv = data
    if run.model != "ssl":
        return 100.0 * float((model(xv).argmax(1) == yv).float().mean())
    assert isinstance(model, SSLNet)
    # clean views: the benchmark's augmented ones move this probe by 5 points between evaluations of a healthy run
    return knn_accuracy(model.backbone(x), y, model.backbone(xv), yv)


RUNS = [
    Run("adamw_warmup_cosine", "cnn", 3000, _warmup_cosine),
    Run("onecycle", "mlp", 3000, _onecycle),
    Run("fp16_scaler", "mlp", 3000, _sgd, fp16=True),
    Run("resumed_finetune", "mlp", 3000, _adam, resume_at=1500),
    Run("accumulate_clip", "cnn", 2000, _rmsprop, accumulate=4, clip=1.0),
    Run("long_restarts", "mlp", 20000, _restarts),
    Run("simsiam_adamw", "ssl", 2000, partial(_warmup_cosine, lr=3e-4)),
    Run("unfreeze_backbone", "cnn", 1500, _adam, unfreeze_at=500),
    Run("bf16_autocast", "mlp", 3000, _sgd, bf16=True),
    Run("mixup_step_decay", "cnn", 3000, _sgd_step_decay, mixup=0.4),
    Run("preempted_resume", "mlp", 3000, _warmup_cosine, preempt_at=1500),
    Run("plateau_decay", "cnn", 3000, _plateau),
    Run("inverse_sqrt", "mlp", 6000, _inverse_sqrt),
    Run("lr_x50_at_40", "mlp", 600, _sgd, fail_at=40, lr_factor=lambda s: 50.0 if s >= 40 else 1.0),
    Run("lr_x20_jump", "cnn", 2500, _adam, fail_at=1500, lr_factor=lambda s: 20.0 if s >= 1500 else 1.0),
    Run("cnn_sgd_x30_at_1000", "cnn", 2000, _sgd, fail_at=1000, lr_factor=lambda s: 30.0 if s >= 1000 else 1.0),
    Run("labels_shuffled", "mlp", 1500, _sgd, fail_at=1000, shuffle_from=1000),
    Run("dead_layer", "mlp", 600, _sgd, fail_at=30, dead_at=30),
    Run(
        "simsiam_adamw_collapse", "ssl", 2000, partial(_warmup_cosine, lr=3e-4), fail_at=600, no_stop_gradient_from=600
    ),
    Run("dormant_units", "mlp", 1500, _sgd, fail_at=300, push_biases_from=300),
    Run("late_shuffle", "mlp", 3000, _warmup_cosine, fail_at=2400, shuffle_from=2400),
    Run("late_shuffle_cnn", "cnn", 3000, _warmup_cosine, fail_at=2400, shuffle_from=2400),
    Run("late_dormant_linear", "mlp", 3000, _sgd_linear_decay, fail_at=2000, push_biases_from=2000),
    Run("lm_adamw_cosine", "lm", 2000, _lm_recipe, clip=1.0),
    Run(
        "lm_lr_x50_at_1000",
        "lm",
        2000,
        _lm_recipe,
        clip=1.0,
        fail_at=1000,
        lr_factor=lambda s: 50.0 if s >= 1000 else 1.0,
    ),
    Run("lm_off_by_one_at_1000", "lm", 2000, _lm_recipe, clip=1.0, fail_at=1000, off_by_one_from=1000),
    Run("lm_repeated_batch_at_1000", "lm", 2000, _lm_recipe, clip=1.0, fail_at=1000, repeat_batch_from=1000),
]


def _data(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1000 + seed))
    x, y = x[order], y[order]
    cut = 2 * len(x) // 3
    return x[:cut], y[:cut], x[cut:], y[cut:]


def _monitor(max_overhead: float | None, layer: str = "embed", on_alarm: str = "warn") -> CollapseMonitorCore:
    return CollapseMonitorCore(
        layer, every_n_train_steps=25, max_samples=256, max_overhead=max_overhead, on_alarm=on_alarm
    )


def twin(run: Run) -> Run:
    """A failure run's healthy twin: the same model, optimizer, schedule, data and seed without the failure."""
    return dataclasses.replace(
        run, name=f"{run.name}/twin", fail_at=None, lr_factor=lambda step: 1.0, shuffle_from=None, dead_at=None,
        no_stop_gradient_from=None, push_biases_from=None, off_by_one_from=None, repeat_batch_from=None,
    )  # fmt: skip


def _worse(run: Run, metric: float, best: float) -> bool:
    """Whether ``metric`` "dropped" from ``best``: `DROP_POINTS` under it, or for the LM a perplexity 10% over it
    (the benchmark's rule)."""
    return metric > 1.1 * best if run.model == "lm" else metric < best - DROP_POINTS


def _better(run: Run, a: float, b: float) -> float:
    return min(a, b) if run.model == "lm" else max(a, b)


def train(run: Run, seed: int, max_overhead: float | None, quick: bool, on_alarm: str = "warn") -> Outcome:
    """Train ``run`` with the default monitor and return what its alarm did (``on_alarm="rollback"``: what the
    monitor's default `RollbackPolicy` did with it; a rollback that gives up stops the run)."""
    torch.manual_seed(seed)
    steps = min(run.steps, 600) if quick else run.steps
    x, y, xv, yv = _data(seed)
    model = {"mlp": DigitsMLP, "cnn": CNN, "ssl": lambda: SSLNet(predictor=True), "lm": TinyGPT}[run.model]()
    layer = {"ssl": "projector", "lm": "ln_f"}.get(run.model, "embed")
    batch = {"ssl": 128, "lm": LM_BATCH}.get(run.model, 64)
    text, val_text = _lm_data() if run.model == "lm" else (torch.empty(0), torch.empty(0))
    stuck: torch.Tensor | None = None  # `Run.repeat_batch_from`: the batch the data loader is stuck on
    backbone: list[nn.Parameter] = []
    if run.unfreeze_at is not None:
        backbone = _pretrain_on_half(model, x, y, seed)
    opt, sched = run.make_opt(model.head if backbone else model, steps)  # type: ignore[arg-type]
    base_lrs = [g["lr"] for g in opt.param_groups]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=100) if run.fp16 else None
    monitor = _monitor(max_overhead, layer, on_alarm)
    monitor.attach(model)
    monitor.track(models=model, optimizers=opt, schedulers=sched, scaler=scaler)  # a no-op unless rolling back
    episodes: list[dict[str, Any]] = []
    g = torch.Generator().manual_seed(seed)
    pool = torch.arange(len(x)) if run.resume_at is None else torch.arange(len(x) // 2)
    best, dropped, acc = (math.inf if run.model == "lm" else -1.0), None, math.nan
    skipped_total = 0
    rollbacks: list[dict[str, Any]] = []
    stopped_at, stop_reason = None, None
    plateau_losses: list[float] = []
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(1, steps + 1):
            if run.resume_at is not None and step == run.resume_at + 1:
                # a fine-tuning run: a new process would build a new monitor and optimizer
                episodes += monitor.summary().get("episodes", [])
                skipped_total += int(monitor.summary().get("skipped_steps", 0))
                rollbacks += monitor.rollbacks
                monitor.detach()
                if monitor.rollback_controller is not None:
                    monitor.rollback_controller.remove_hooks()
                monitor = _monitor(max_overhead, on_alarm=on_alarm)
                monitor.attach(model)
                opt = torch.optim.Adam(model.parameters(), lr=1e-4)
                sched, base_lrs = None, [1e-4]
                monitor.track(models=model, optimizers=opt, scaler=scaler)
                pool = torch.arange(len(x) // 2, len(x))
            if run.preempt_at is not None and step == run.preempt_at + 1:
                # preempted: what a checkpoint holds, loaded into new objects, as a new process would
                saved = io.BytesIO()
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                            "sched": None if sched is None else sched.state_dict(),
                            "monitor": monitor.state_dict()}, saved)  # fmt: skip
                monitor.detach()
                if monitor.rollback_controller is not None:
                    monitor.rollback_controller.remove_hooks()
                saved.seek(0)
                state = torch.load(saved, weights_only=True)
                model = {"mlp": DigitsMLP, "cnn": CNN, "lm": TinyGPT}[run.model]()
                model.load_state_dict(state["model"])
                opt, sched = run.make_opt(model, steps)
                opt.load_state_dict(state["opt"])
                if sched is not None:
                    sched.load_state_dict(state["sched"])
                monitor = _monitor(max_overhead, layer, on_alarm)
                monitor.attach(model)
                monitor.load_state_dict(state["monitor"])
                monitor.track(models=model, optimizers=opt, schedulers=sched, scaler=scaler)
                g = torch.Generator().manual_seed(500 + seed)  # the new process's data order
            if run.unfreeze_at is not None and step == run.unfreeze_at + 1:
                for p in backbone:
                    p.requires_grad_(True)
                opt.add_param_group({"params": backbone, "lr": base_lrs[0] / 10})
                base_lrs.append(base_lrs[0] / 10)
            if run.dead_at is not None and step == run.dead_at:
                with torch.no_grad():
                    model.embed[-2].bias.sub_(50.0)  # type: ignore[index]
            for i, (group, lr0) in enumerate(zip(opt.param_groups, base_lrs, strict=True)):
                if sched is None:
                    group["lr"] = lr0 * run.lr_factor(step)
                elif run.lr_factor(step) != 1.0:  # on top of a closed-form schedule, which sets the rate afresh
                    group["lr"] = sched.get_last_lr()[i] * run.lr_factor(step)
            lr = float(opt.param_groups[0]["lr"])
            monitor.prepare_step(step)
            opt.zero_grad(set_to_none=True)
            total = torch.zeros(())
            for _ in range(run.accumulate):
                idx = pool[torch.randint(0, len(pool), (batch,), generator=g)]
                labels = y[idx]
                if run.shuffle_from is not None and step >= run.shuffle_from:
                    labels = labels[torch.randperm(len(labels), generator=g)]
                dtype = torch.bfloat16 if run.bf16 else torch.float16
                with torch.autocast("cpu", dtype=dtype, enabled=run.fp16 or run.bf16):
                    if run.model == "lm":
                        starts = torch.randint(0, len(text) - LM_CONTEXT - 2, (batch,), generator=g)
                        if run.repeat_batch_from is not None and step >= run.repeat_batch_from:
                            stuck = starts if stuck is None else stuck
                            starts = stuck
                        late = run.off_by_one_from is not None and step >= run.off_by_one_from
                        xb, yb = _lm_windows(text, starts, shift=2 if late else 1)
                        loss = nn.functional.cross_entropy(model(xb).reshape(-1, 256), yb.reshape(-1)) / run.accumulate
                    elif isinstance(model, SSLNet):
                        cut = run.no_stop_gradient_from
                        loss = _simsiam_loss(model, x[idx], g, stop_gradient=cut is None or step < cut)
                    elif run.mixup is not None:
                        lam = float(torch.distributions.Beta(run.mixup, run.mixup).sample())
                        perm = torch.randperm(len(idx), generator=g)
                        out = model(lam * x[idx] + (1 - lam) * x[idx][perm])
                        ce = nn.functional.cross_entropy
                        loss = (lam * ce(out, labels) + (1 - lam) * ce(out, labels[perm])) / run.accumulate
                    else:
                        loss = nn.functional.cross_entropy(model(x[idx]), labels) / run.accumulate
                    if run.push_biases_from is not None and step >= run.push_biases_from:
                        assert isinstance(model, DigitsMLP)
                        loss = loss + bias_push(model)
                (scaler.scale(loss) if scaler is not None else loss).backward()
                total = total + loss.detach().float()
            if scaler is not None:
                scaler.unscale_(opt)
            monitor.add_loss(total)
            grad_norm = monitor.step_grad_norm(model.parameters(), step)
            if run.clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), run.clip)
            skipped = False
            if scaler is not None:
                before = scaler.get_scale()
                scaler.step(opt)
                scaler.update()
                skipped = scaler.get_scale() < before
            else:
                opt.step()
            if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                plateau_losses.append(float(total))
                if step % PLATEAU_EVERY == 0:  # the mean training loss of the last stretch, as a user would pass it
                    sched.step(sum(plateau_losses) / len(plateau_losses))
                    plateau_losses.clear()
            elif sched is not None:
                sched.step()
            fired = monitor.observe_step(step, grad_norm=grad_norm, lr=lr, skipped=skipped)
            checked = monitor.run_check(step) if monitor.is_check_step(step) else None
            monitor.after_step(step)  # on_alarm="rollback": a snapshot when one is due; else nothing
            stop = next((r for r in (fired, checked) if r is not None and r.should_stop), None)
            if step % EVAL_EVERY == 0 or stop is not None:
                model.eval()
                with torch.no_grad():
                    acc = _perplexity(model, val_text) if run.model == "lm" else _accuracy(run, model, (x, y, xv, yv))
                model.train()
                since = run.fail_at if run.fail_at is not None else WARMUP_EVALS * EVAL_EVERY
                if dropped is None and step >= since and _worse(run, acc, best):
                    dropped = step
                best = _better(run, best, acc)
            if stop is not None:  # only a rollback that gave up stops a run (the default only warns)
                monitor.record_stop(step, stop)
                stopped_at, stop_reason = step, monitor.rollback_stop
                break
    summary = monitor.summary()
    monitor.detach()
    if monitor.rollback_controller is not None:
        monitor.rollback_controller.remove_hooks()
    episodes += summary.get("episodes", [])
    skipped_total += int(summary.get("skipped_steps", 0))
    rollbacks += monitor.rollbacks
    alarms = [{k: e.get(k) for k in ("start", "end", "channel", "kind")} for e in episodes]
    kept = [{k: e.get(k) for k in ("step", "restored_step", "channel", "total_factor")} for e in rollbacks]
    return Outcome(run.name, seed, steps, run.fail_at, dropped, alarms, skipped_total, time.perf_counter() - start,
                   acc, on_alarm, kept, stopped_at, stop_reason)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--runs", nargs="+", default=[r.name for r in RUNS], choices=[r.name for r in RUNS])
    parser.add_argument("--max-overhead", default="0.02", help="the monitor's max_overhead (a share, or 'none')")
    parser.add_argument("--quick", action="store_true", help="runs cut to 600 steps: a smoke test")
    parser.add_argument("--json", help="write the outcomes here")
    parser.add_argument("--on-alarm", default="warn", choices=("warn", "rollback"),
                        help="rollback: each run is trained again with on_alarm='rollback', and each failure's healthy"
                             " twin, to show what the default rollback policy saves or costs")  # fmt: skip
    args = parser.parse_args(argv)
    budget = None if args.max_overhead.lower() == "none" else float(args.max_overhead)
    torch.set_num_threads(1)
    outcomes = []
    for run in [r for r in RUNS if r.name in args.runs]:
        for seed in range(args.seeds):
            out = train(run, seed, budget, args.quick)
            outcomes.append(out)
            what = (
                f"healthy{'' if out.dropped_at is None else f' (but its metric dropped at {out.dropped_at})'}"
                if run.fail_at is None
                else f"fails at {run.fail_at}, metric dropped at {out.dropped_at}"
            )
            found = "" if run.fail_at is None else ("  DETECTED" if out.detected else "  missed")
            print(f"{run.name:22s} seed {seed}: {out.steps:6d} steps, {what}; alarms "
                  f"{[(a['start'], a['channel'], a['kind']) for a in out.alarms]}; skipped {out.skipped_steps}"
                  f"{found}  ({out.wall_s:.0f} s)", flush=True)  # fmt: skip
    # as in the benchmark: a healthy run whose metric dropped anyway is not scored
    healthy = [o for o in outcomes if o.fail_at is None and o.dropped_at is None]
    unscored = [o for o in outcomes if o.fail_at is None and o.dropped_at is not None]
    h_steps = sum(o.steps for o in healthy)
    # failure runs count as healthy up to their failure
    pre = [(o, [a for a in o.alarms if a["start"] < o.fail_at]) for o in outcomes if o.fail_at is not None]
    h_steps += sum(o.fail_at - 1 for o, _ in pre if o.fail_at is not None)
    h_alarms = sum(len(o.alarms) for o in healthy) + sum(len(a) for _, a in pre)
    failing = [o for o in outcomes if o.fail_at is not None and o.dropped_at is not None]
    print(f"\nmax_overhead={budget}: {h_alarms} alarm episodes in {h_steps:,} healthy optimizer steps "
          f"({1e5 * h_alarms / max(h_steps, 1):.2f} per 100,000); failures detected before the metric dropped: "
          f"{sum(o.detected for o in failing)}/{len(failing)} (runs whose metric did not drop: "
          f"{sum(1 for o in outcomes if o.fail_at is not None and o.dropped_at is None)}); healthy runs whose metric "
          f"dropped anyway, not scored: {[(o.run, o.seed, o.dropped_at) for o in unscored]}")  # fmt: skip
    if args.on_alarm == "rollback":
        outcomes += rollback_arms([r for r in RUNS if r.name in args.runs], outcomes, budget, args.quick)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([o.__dict__ for o in outcomes], fh, indent=1)
    return 0


def _gap(run: Run, value: float, reference: float) -> tuple[float, str]:
    """How much worse ``value`` is than ``reference`` (the benchmark's `metric_gap`): points of accuracy, or for the LM
    percent of perplexity; and its unit."""
    lm = run.model == "lm"
    gap = metric_gap(value, reference, "min" if lm else "max")
    assert gap is not None  # both are numbers
    return gap, "% perplexity" if lm else " pt"


def rollback_arms(runs: list[Run], plain: list[Outcome], budget: float | None, quick: bool) -> list[Outcome]:
    """Each run and seed of ``plain`` trained again with ``on_alarm="rollback"``, and each failure's healthy twin;
    prints what the rollback did: a failure rescued (final metric within `RESCUE_POINTS`, or for the LM
    `RESCUE_RELATIVE` of perplexity, of its twin's: the benchmark's rule), stopped
    with the configuration diagnosis, or not rescued; a healthy run's cost (its final metric against the plain
    arm's, the same run without rollbacks)."""
    print(f"\non_alarm='rollback' (default RollbackPolicy), max_overhead={budget}:")
    out: list[Outcome] = []
    rescued, failures, stopped, costs = 0, 0, 0, {}
    for o in plain:
        run = next(r for r in runs if r.name == o.run)
        rb = train(run, o.seed, budget, quick, on_alarm="rollback")
        out.append(rb)
        done = [(e["step"], e["restored_step"]) for e in rb.rollbacks]
        stop = "" if rb.stopped_at is None else f", stopped at {rb.stopped_at} ({rb.stop_reason})"
        line = (f"{run.name:22s} seed {o.seed}: plain {o.final_metric:5.1f} (alarms {[a['start'] for a in o.alarms]});"
                f" rollback {rb.final_metric:5.1f}: rollbacks {done}{stop}")  # fmt: skip
        if run.fail_at is None:
            if rb.rollbacks or rb.stopped_at is not None:
                cost, unit = _gap(run, rb.final_metric, o.final_metric)
                costs.setdefault(unit, []).append(cost)
                line += f"; cost {cost:+.1f}{unit}"
            print(line, flush=True)
            continue
        healthy = train(twin(run), o.seed, budget, quick)
        out.append(healthy)
        failures += 1
        if rb.stopped_at is not None:
            verdict = "stopped: configuration diagnosis"
            stopped += 1
        elif _gap(run, rb.final_metric, healthy.final_metric)[0] <= (
            100 * RESCUE_RELATIVE if run.model == "lm" else RESCUE_POINTS
        ):
            verdict = "rescued"
            rescued += 1
        else:
            verdict = "not rescued"
        print(f"{line}; twin {healthy.final_metric:5.1f}, without rollback {o.final_metric:5.1f}: {verdict}",
              flush=True)  # fmt: skip
    worst = ", ".join(f"{max(v):+.1f}{unit}" for unit, v in costs.items()) or "-"
    print(
        f"failures: {rescued}/{failures} rescued (within {RESCUE_POINTS:g} points, or {100 * RESCUE_RELATIVE:g}%"
        f" perplexity, of the healthy twin), {stopped} stopped with the configuration diagnosis; healthy runs rolled"
        f" back: {sum(len(v) for v in costs.values())}, worst cost {worst}"
    )
    return out


if __name__ == "__main__":
    sys.exit(main())
