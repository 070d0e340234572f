"""The benchmark's families: failure families (a healthy arm and a twin in which one switch flips at ``t0``) and
controls (a switch at ``t0`` after which nothing bad should happen, beside its unswitched twin).

Each family names its mechanism and the work it comes from (`Family.mechanism`, `Family.source`), builds its
`Task` from a seed, and says what it measures downstream (`Family.metric`, never an input of any detector).
Families that did not pass verification (the metric must degrade in the failure arm and not in the healthy twin)
are kept in `DROPPED` with the reason, so the benchmark's documentation can report them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Literal, cast

import torch
from torch import Tensor, nn

from topo_callbacks.bench.tasks import (
    BatchStream,
    Task,
    augment,
    augment_each,
    digits,
    knn_accuracy,
    mask_and_noise,
    ramp,
    stdlib_text,
)

__all__ = ["DROPPED", "FAMILIES", "Family"]


@dataclasses.dataclass(frozen=True)
class Family:
    """One family of runs: what flips at ``t0``, why it matters, and how downstream quality is measured."""

    name: str
    kind: Literal["failure", "control"]
    title: str
    switch: str
    mechanism: str
    source: str
    build: Callable[[int, int], Task]
    steps: int
    t0: int
    eval_every: int
    check_every: int
    #: "knn_acc", "val_acc", "task_a_knn" (percent, higher is better) or "val_ppl" (lower is better)
    metric: str
    quick_steps: int
    quick_t0: int

    @property
    def arms(self) -> tuple[str, str]:
        return ("healthy", "failure") if self.kind == "failure" else ("healthy", "control")

    @property
    def metric_mode(self) -> Literal["max", "min"]:
        return "min" if self.metric == "val_ppl" else "max"

    def schedule(self, quick: bool) -> tuple[int, int]:
        """(steps, t0) of the full or the quick setting."""
        return (self.quick_steps, self.quick_t0) if quick else (self.steps, self.t0)


# ------------------------------------------------------------------------------------------------ SSL tasks
class SSLNet(nn.Module):
    def __init__(self, predictor: bool) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(64, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 128))
        # No normalisation after the last projector layer: nothing then stops the output collapsing to a point.
        self.projector = nn.Sequential(nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 128))
        self.predictor = (
            nn.Sequential(nn.Linear(128, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 128))
            if predictor
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.projector(self.backbone(x))


class SSLTask(Task):
    """Self-supervised training on digits; the metric is a kNN probe on the backbone over augmented held-out views
    (raw pixels score ~35% there; invariance learnt by SSL raises it)."""

    layer = "projector"
    objective = "simsiam"

    def __init__(self, seed: int, t0: int) -> None:
        super().__init__(seed, t0)
        torch.manual_seed(seed)
        self.x_train, self.y_train, self.x_test, self.y_test = digits(seed)
        self.model = SSLNet(predictor=self.objective == "simsiam")
        self.streams["train"] = BatchStream(len(self.x_train), 128, seed)
        self.gens["augment"] = torch.Generator().manual_seed(seed + 1)
        self.optimizer = self.make_optimizer()

    def make_optimizer(self) -> torch.optim.Optimizer:
        if self.objective == "simsiam":
            return torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        return torch.optim.Adam(self.model.parameters(), lr=1e-3)

    def objective_loss(self, x: Tensor, g: torch.Generator) -> Tensor:
        model = self.model
        assert isinstance(model, SSLNet)
        z1, z2 = model(augment(x, g)), model(augment(x, g))
        if self.objective == "simsiam":
            p1, p2 = model.predictor(z1), model.predictor(z2)
            stop = not self.switched or not self.switch_removes_stop_gradient
            t1, t2 = (z1.detach(), z2.detach()) if stop else (z1, z2)
            cos = nn.functional.cosine_similarity
            return -(cos(p1, t2).mean() + cos(p2, t1).mean()) / 2
        if self.objective == "vicreg":
            return vicreg_loss(
                z1, z2, variance=0.0 if self.switched else 25.0, covariance=0.0 if self.switched else 1.0
            )
        temperature = 0.02 if self.switched else 0.2
        z = nn.functional.normalize(torch.cat([z1, z2]), dim=1)
        sim = z @ z.T / temperature
        sim.fill_diagonal_(-math.inf)
        n = x.shape[0]
        target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
        return nn.functional.cross_entropy(sim, target)

    switch_removes_stop_gradient = True

    def step_loss(self, step: int) -> Tensor:
        return self.objective_loss(self.x_train[self.streams["train"].next()], self.gens["augment"])

    def fixed_batch_loss(self) -> Tensor:
        return self.objective_loss(self.x_train[:256], torch.Generator().manual_seed(4321))

    def evaluate(self) -> tuple[float, float]:
        g = torch.Generator().manual_seed(12345)  # the same held-out views at every evaluation
        model = self.model
        assert isinstance(model, SSLNet)
        bank = model.backbone(augment_each(self.x_train, g))
        acc = knn_accuracy(bank, self.y_train, model.backbone(augment_each(self.x_test, g)), self.y_test)
        return acc, float(self.objective_loss(self.x_test, g))  # the objective in force at this step


def vicreg_loss(z1: Tensor, z2: Tensor, *, variance: float, covariance: float, invariance: float = 25.0) -> Tensor:
    """VICReg (Bardes et al. 2022): invariance + variance hinge on each dimension's std + off-diagonal covariance."""
    inv = nn.functional.mse_loss(z1, z2)
    loss = invariance * inv
    if variance:
        std = lambda z: torch.sqrt(z.var(dim=0) + 1e-4)  # noqa: E731
        loss = loss + variance * (nn.functional.relu(1 - std(z1)).mean() + nn.functional.relu(1 - std(z2)).mean())
    if covariance:
        n, d = z1.shape

        def cov_term(z: Tensor) -> Tensor:
            z = z - z.mean(dim=0)
            c = (z.T @ z) / (n - 1)
            off = c - torch.diag(torch.diag(c))
            return off.pow(2).sum() / d

        loss = loss + covariance * (cov_term(z1) + cov_term(z2))
    return loss


class SimSiamTask(SSLTask):
    objective = "simsiam"


class SimSiamScheduleTask(SSLTask):
    """SimSiam with a linear warm-up over the first 10% of steps; the switch is a 10x learning-rate decay."""

    objective = "simsiam"
    switch_removes_stop_gradient = False

    def lr_factor(self, step: int) -> float:
        return min((step + 1) / 100, 1.0) * (0.1 if self.switched else 1.0)


class InfoNCETask(SSLTask):
    objective = "infonce"


class VICRegTask(SSLTask):
    objective = "vicreg"

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.model.parameters(), lr=1e-3)


# --------------------------------------------------------------------------------------------- classifiers
class MLP(nn.Module):
    def __init__(self, width: int = 256) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 128), nn.ReLU())
        self.head = nn.Linear(128, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class ClassifierTask(Task):
    """An MLP classifier on digits; the metric is validation accuracy."""

    layer = "body"
    lr, momentum, weight_decay, batch = 0.02, 0.9, 0.0, 64

    def __init__(self, seed: int, t0: int) -> None:
        super().__init__(seed, t0)
        torch.manual_seed(seed)
        self.x_train, self.y_train, self.x_test, self.y_test = digits(seed)
        self.model = self.make_model()
        self.streams["train"] = BatchStream(len(self.x_train), self.batch, seed)
        self.streams["large"] = BatchStream(len(self.x_train), 4 * self.batch, seed + 7)
        self.optimizer = self.make_optimizer()

    def make_model(self) -> nn.Module:
        return MLP()

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            self.model.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )

    @property
    def body(self) -> nn.Sequential:
        return cast(nn.Sequential, self.model.get_submodule("body"))

    def batch_indices(self, step: int) -> Tensor:
        return self.streams["train"].next()

    def extra_loss(self) -> Tensor | float:
        return 0.0

    def step_loss(self, step: int) -> Tensor:
        idx = self.batch_indices(step)
        return nn.functional.cross_entropy(self.model(self.x_train[idx]), self.y_train[idx]) + self.extra_loss()

    def fixed_batch_loss(self) -> Tensor:
        return nn.functional.cross_entropy(self.model(self.x_train[:256]), self.y_train[:256])

    def evaluate(self) -> tuple[float, float]:
        logits = self.model(self.x_test)
        acc = float((logits.argmax(1) == self.y_test).float().mean()) * 100.0
        return acc, float(nn.functional.cross_entropy(logits, self.y_test))


class ClassifierLRRampTask(ClassifierTask):
    def lr_factor(self, step: int) -> float:
        return ramp(step, self.t0, 300, 30.0) if self.switched else 1.0


class NeuralCollapseTask(ClassifierTask):
    """Long training into the terminal phase with weight decay: neural collapse of the last layers, benign."""

    lr, weight_decay = 0.05, 5e-4


class LRDecayTask(ClassifierTask):
    """The switch decays the learning rate 10x (a reorganisation that helps: accuracy rises or holds)."""

    def lr_factor(self, step: int) -> float:
        return 0.1 if self.switched else 1.0


class BatchSizeTask(ClassifierTask):
    """The switch quadruples the batch size (a benign change of gradient noise)."""

    def batch_indices(self, step: int) -> Tensor:
        return self.streams["large" if self.switched else "train"].next()


class DeadUnitsTask(ClassifierTask):
    """A buggy regulariser from ``t0`` on pushes the hidden ReLU layers' biases down by a constant gradient: units
    go dormant one after another (their pre-activations fall below zero on every input), then accuracy falls."""

    def extra_loss(self) -> Tensor | float:
        if not self.switched:
            return 0.0
        first, second = (cast(nn.Linear, self.body[i]) for i in (0, 2))
        return self.push * (first.bias.sum() + second.bias.sum())

    push = 0.1


class ForgettingTask(ClassifierTask):
    """A backbone trained on digits 0-4, then fine-tuned on digits 5-9 from ``t0`` (both arms): the healthy arm at a
    tenth of the pre-training learning rate (at the full rate, task A's probe fell 5 points in 6 of 9 seeds), the
    failure arm at a rate ramped to 200x that (20x the pre-training rate; at 20x and 60x of the healthy rate only 0
    and 2 of 3 seeds dropped). The metric is a kNN probe of the backbone on held-out digits 0-4."""

    def __init__(self, seed: int, t0: int) -> None:
        super().__init__(seed, t0)
        a = torch.isin(self.y_train, torch.arange(5))
        self.idx_a, self.idx_b = a.nonzero().flatten(), (~a).nonzero().flatten()
        self.streams["a"] = BatchStream(len(self.idx_a), self.batch, seed + 11)
        self.streams["b"] = BatchStream(len(self.idx_b), self.batch, seed + 13)
        self.test_a = torch.isin(self.y_test, torch.arange(5))

    def batch_indices(self, step: int) -> Tensor:
        if step < self.t0:
            return self.idx_a[self.streams["a"].next()]
        return self.idx_b[self.streams["b"].next()]

    top, length, fine_tune = 200.0, 300, 0.1

    def lr_factor(self, step: int) -> float:
        if step < self.t0:
            return 1.0
        return self.fine_tune * (ramp(step + 1, self.t0, self.length, self.top) if self.switched else 1.0)

    def evaluate(self) -> tuple[float, float]:
        body = self.body
        train_a = self.idx_a
        acc = knn_accuracy(
            body(self.x_train[train_a]), self.y_train[train_a], body(self.x_test[self.test_a]), self.y_test[self.test_a]
        )
        logits = self.model(self.x_test)
        return acc, float(nn.functional.cross_entropy(logits, self.y_test))


# ----------------------------------------------------------------------------------------------- CNN + BN
class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.short = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        out = nn.functional.relu(self.bn1(self.conv1(x)))
        return nn.functional.relu(self.bn2(self.conv2(out)) + self.short(x))


class SmallResNet(nn.Module):
    """A ResNet-shaped CNN (stem, two residual stages, global pooling) for 16x16 single-channel images."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.stage1 = ResBlock(16, 16, 1)
        self.stage2 = ResBlock(16, 32, 2)
        self.head = nn.Linear(32, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stage2(self.stage1(self.stem(x)))
        return self.head(h.mean(dim=(2, 3)))


class CNNTask(ClassifierTask):
    """Digits upsampled to 16x16 through a small ResNet with BatchNorm; the switch ramps the learning rate x40."""

    layer = "stage2"
    lr = 0.02

    def __init__(self, seed: int, t0: int) -> None:
        super().__init__(seed, t0)
        up = lambda x: nn.functional.interpolate(x.view(-1, 1, 8, 8), size=16, mode="bilinear")  # noqa: E731
        self.x_train, self.x_test = up(self.x_train), up(self.x_test)

    def make_model(self) -> nn.Module:
        return SmallResNet()

    top, length = 40.0, 200

    def lr_factor(self, step: int) -> float:
        return ramp(step, self.t0, self.length, self.top) if self.switched else 1.0


# ----------------------------------------------------------------------------------------- transformers
class Attention(nn.Module):
    """Causal multi-head self-attention that keeps the step's max attention logit and minimum per-head entropy
    (read by the benchmark's per-step channels) and has a logit scale the attention-entropy family turns up."""

    logit_scale: Tensor

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.register_buffer("logit_scale", torch.tensor(1.0))
        self.max_logit = math.nan
        self.min_entropy = math.nan

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        logits = (q @ k.transpose(-1, -2)) * (self.logit_scale / math.sqrt(d // self.heads))
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        logits = logits.masked_fill(mask, -math.inf)
        attn = logits.softmax(dim=-1)
        with torch.no_grad():  # nearly free: the tensors exist already
            self.max_logit = float(logits.masked_fill(mask, -math.inf).amax())
            ent = -(attn * torch.log(attn.clamp_min(1e-12))).sum(-1).mean(dim=(0, 2))
            self.min_entropy = float(ent.min())
        out = (attn @ v).transpose(1, 2).reshape(b, t, d)
        return self.proj(out)  # type: ignore[no-any-return]


class Block(nn.Module):
    skip: Tensor

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.register_buffer("skip", torch.tensor(1.0))

    def forward(self, x: Tensor) -> Tensor:
        x = self.skip * x + self.attn(self.ln1(x))
        return self.skip * x + self.mlp(self.ln2(x))  # type: ignore[no-any-return]


class ByteLM(nn.Module):
    """A small pre-LN GPT-style byte-level language model."""

    def __init__(self, d: int = 64, layers: int = 2, heads: int = 4, context: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, d)
        self.pos = nn.Parameter(torch.randn(context, d) * 0.02)
        self.blocks = nn.Sequential(*(Block(d, heads) for _ in range(layers)))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, 256)

    def forward(self, idx: Tensor) -> Tensor:
        h = self.embed(idx) + self.pos[: idx.shape[1]]
        return self.head(self.ln_f(self.blocks(h)))  # type: ignore[no-any-return]


class LMTask(Task):
    """Byte-level language modelling on CPython's standard library; the metric is validation perplexity."""

    layer = "ln_f"
    pool = "last"
    context, batch = 64, 32

    def __init__(self, seed: int, t0: int) -> None:
        super().__init__(seed, t0)
        torch.manual_seed(seed)
        data = torch.frombuffer(bytearray(stdlib_text()), dtype=torch.uint8).long()
        cut = int(0.9 * len(data))
        self.train, self.val = data[:cut], data[cut:]
        self.model = ByteLM(context=self.context)
        self.gens["batches"] = torch.Generator().manual_seed(seed)
        span = len(self.val) - self.context - 1
        self.val_starts = torch.arange(0, span, span // 64)[:64]
        self.optimizer = self.make_optimizer()

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.model.parameters(), lr=1e-3)

    def windows(self, source: Tensor, starts: Tensor) -> tuple[Tensor, Tensor]:
        chunk = source[starts[:, None] + torch.arange(self.context + 1)]
        return chunk[:, :-1], chunk[:, 1:]

    def step_loss(self, step: int) -> Tensor:
        starts = torch.randint(0, len(self.train) - self.context - 1, (self.batch,), generator=self.gens["batches"])
        x, y = self.windows(self.train, starts)
        return nn.functional.cross_entropy(self.model(x).reshape(-1, 256), y.reshape(-1))

    def evaluate(self) -> tuple[float, float]:
        x, y = self.windows(self.val, self.val_starts)
        loss = float(nn.functional.cross_entropy(self.model(x).reshape(-1, 256), y.reshape(-1)))
        return (math.exp(loss) if math.isfinite(loss) and loss < 50 else math.inf), loss

    def fixed_batch_loss(self) -> Tensor:
        x, y = self.windows(self.train, torch.arange(0, 32 * 4099, 4099))
        return nn.functional.cross_entropy(self.model(x).reshape(-1, 256), y.reshape(-1))

    def probe_inputs(self) -> Tensor:
        span = len(self.val) - self.context - 1
        return self.windows(self.val, torch.arange(0, span, span // 256)[:256])[0]

    def blocks(self) -> list[Block]:
        return [cast(Block, b) for b in self.model.get_submodule("blocks").children()]


class LMJumpTask(LMTask):
    def lr_factor(self, step: int) -> float:
        return 30.0 if self.switched else 1.0


class AttentionEntropyTask(LMTask):
    """The switch ramps every attention layer's logit scale up x1 -> x12 over 200 steps (as a mis-set temperature or
    an attention-logit blow-up would): attention entropy falls, then the loss breaks (Zhai et al. 2023)."""

    top, length = 12.0, 200

    def after_step(self, step: int) -> None:
        if self.switched:
            for block in self.blocks():
                block.attn.logit_scale.fill_(ramp(step + 1, self.t0, self.length, self.top))


class RankCollapseTask(LMTask):
    """The switch scales the residual skip connections down to 0 over 25 steps: without skips, self-attention
    drives tokens towards uniformity (rank collapse, Dong et al. 2021), and the perplexity degrades (over 200
    steps the model adapted and its perplexity never stayed 10% above its best: measured, seed 0)."""

    length = 25

    def after_step(self, step: int) -> None:
        if self.switched:
            frac = min(max((step + 1 - self.t0) / self.length, 0.0), 1.0)
            for block in self.blocks():
                block.skip.fill_(1.0 - frac)


class LMWeightDecayTask(LMTask):
    """AdamW; the switch raises the weight decay 0 -> 0.1 (a common, benign recipe change)."""

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=0.0)

    def lr_factor(self, step: int) -> float:
        if self.switched and self.optimizer.param_groups[0]["weight_decay"] == 0.0:
            for group in self.optimizer.param_groups:
                group["weight_decay"] = 0.1
        return 1.0


# -------------------------------------------------------------------------- realistic healthy runs (controls)
# Runs as users train them: schedules, fine-tuning from a checkpoint, gradient accumulation with clipping, fp16 with a
# loss scaler, an initial loss plateau, strongly augmented streams, long runs. Each is a control: the switch at t0
# is a change a user makes on purpose, and neither arm should drop.
class WarmupCosineTask(ClassifierTask):
    """AdamW (lr 3e-3, weight decay 0.01) with a linear warm-up over the first ``t0`` steps (both arms); from ``t0``
    the switched arm decays the rate along a cosine to 0 at ``10 t0`` (the end of the run), its twin holds it."""

    lr, weight_decay = 3e-3, 0.01
    decay = 9

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    def lr_factor(self, step: int) -> float:
        if step < self.t0:
            return (step + 1) / self.t0
        if not self.switched:
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * min((step - self.t0) / (self.decay * self.t0), 1.0)))


class StepDecayTask(ClassifierTask):
    """SGD (lr 0.05, momentum 0.9, weight decay 5e-4); the switched arm decays the rate x0.1 at ``t0`` and x0.1
    again at ``2 t0`` (milestones at a third and two thirds of the run), its twin holds it."""

    lr, weight_decay = 0.05, 5e-4

    def lr_factor(self, step: int) -> float:
        if not self.switched:
            return 1.0
        return 0.01 if step >= 2 * self.t0 else 0.1


class CosineRestartsTask(ClassifierTask):
    """SGD (lr 0.05) annealed along a cosine to 1% over ``t0`` steps (both arms); from ``t0`` the switched arm
    restarts (SGDR: the rate jumps back to its peak) every ``t0`` steps, its twin stays annealed."""

    lr, floor = 0.05, 0.01

    def lr_factor(self, step: int) -> float:
        if step >= self.t0 and not self.switched:
            return self.floor
        phase = (step % self.t0) / self.t0
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * phase))


class FineTuneTask(ClassifierTask):
    """Adam (lr 1e-3) on two thirds of the training set. The switched arm is a fine-tuning run started from the
    checkpoint at ``t0``: a new Adam (fresh moments) at lr 1e-4, on the other third of the training set, with a
    monitor of its own (`Task.fresh_monitor`); its twin continues the first run."""

    lr = 1e-3
    fine_tune = 0.1
    fresh_monitor = True

    def __init__(self, seed: int, t0: int) -> None:
        super().__init__(seed, t0)
        cut = 2 * len(self.x_train) // 3
        self.idx_a, self.idx_b = torch.arange(cut), torch.arange(cut, len(self.x_train))
        self.streams["a"] = BatchStream(len(self.idx_a), self.batch, seed + 11)
        self.streams["b"] = BatchStream(len(self.idx_b), self.batch, seed + 13)

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.model.parameters(), lr=self.lr)

    def batch_indices(self, step: int) -> Tensor:
        return self.idx_b[self.streams["b"].next()] if self.switched else self.idx_a[self.streams["a"].next()]

    def on_fork(self) -> None:
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.lr * self.fine_tune)


class AccumulationClipTask(ClassifierTask):
    """SGD (lr 0.05, momentum 0.9) accumulating 4 micro-batches of 32 per optimizer step, the global gradient norm
    clipped to 0.5 (about one step in eight is clipped; the recorded norm is the one before clipping); the switched
    arm accumulates 8 micro-batches from ``t0`` (the effective batch doubles), its twin keeps 4."""

    lr, batch = 0.05, 32
    clip_norm = 0.5

    def micro_batches(self, step: int) -> int:
        return 8 if self.switched else 4


class FP16ScalerTask(ClassifierTask):
    """The forward pass under fp16 autocast on the CPU, with a real ``torch.amp.GradScaler("cpu")`` started at
    2**24 (its first steps overflow and are skipped while the scale backs off) that tries to double its scale every
    50 clean steps (a skipped step follows when the doubled scale overflows); the switched arm's scaler tries every
    10 steps from ``t0`` (more skipped steps), its twin's every 50."""

    def __init__(self, seed: int, t0: int) -> None:
        super().__init__(seed, t0)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24, growth_interval=50)

    def step_loss(self, step: int) -> Tensor:
        with torch.autocast("cpu", dtype=torch.float16):
            return super().step_loss(step)

    def on_fork(self) -> None:
        # a new scaler at the current scale, not `set_growth_interval(10)`: the scaler grows when its count of clean
        # steps *equals* the interval, so a count already past 10 would never grow again
        assert self.scaler is not None
        self.scaler = torch.amp.GradScaler("cpu", init_scale=self.scaler.get_scale(), growth_interval=10)


class PlateauMLP(nn.Module):
    """A deep tanh MLP whose weights start at a fifth of their default scale: its loss sits at ln 10 until the
    signal has grown through the layers (a saddle plateau), then falls."""

    def __init__(self, width: int = 128, init: float = 0.2) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh()
        )
        self.head = nn.Linear(width, 10)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    m.weight.mul_(init)
                    m.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class LossPlateauTask(ClassifierTask):
    """`PlateauMLP` with SGD (lr 0.05, momentum 0.9): the loss stays at its initial value for some hundred steps,
    then learning starts (the gradient norm grows about tenfold) and the run ends well trained; the switched arm
    halves the learning rate at ``t0``, on the plateau (it lasts longer)."""

    lr = 0.05

    def make_model(self) -> nn.Module:
        return PlateauMLP()

    def lr_factor(self, step: int) -> float:
        return 0.5 if self.switched else 1.0


class AugmentedStreamTask(ClassifierTask):
    """The MLP classifier trained on strongly augmented digits (30% of the pixels masked, Gaussian noise of std 0.3:
    the training loss stays near 1): the rows the monitor sees are noisy. The switched arm strengthens the
    augmentation to 40% and 0.4 at ``t0`` (a magnitude schedule), its twin keeps it. Accuracy is measured on clean
    held-out digits. (With a pixel shift per image as well, this MLP's clean accuracy swung by 10 points from one
    evaluation to the next: no ground truth could be read from it.)"""

    strength, stronger = (0.3, 0.3), (0.4, 0.4)

    def __init__(self, seed: int, t0: int) -> None:
        super().__init__(seed, t0)
        self.gens["augment"] = torch.Generator().manual_seed(seed + 1)

    def step_loss(self, step: int) -> Tensor:
        idx = self.batch_indices(step)
        mask, noise = self.stronger if self.switched else self.strength
        x = mask_and_noise(self.x_train[idx], self.gens["augment"], mask, noise)
        return nn.functional.cross_entropy(self.model(x), self.y_train[idx])


class LongRunTask(ClassifierTask):
    """The MLP classifier (SGD, lr 0.02, momentum 0.9) trained for a long time; the switched arm turns weight decay
    5e-4 on at ``t0``."""

    def on_fork(self) -> None:
        for group in self.optimizer.param_groups:
            group["weight_decay"] = 5e-4


# ---------------------------------------------------------------------------- failures that start early or at once
class LRJumpTask(ClassifierTask):
    """The switch multiplies the SGD learning rate by ``jump`` from ``t0`` on."""

    jump = 50.0

    def lr_factor(self, step: int) -> float:
        return self.jump if self.switched else 1.0


class LRTooHighEarlyTask(LRJumpTask):
    jump = 50.0


class LossJumpTask(LRJumpTask):
    jump = 1000.0


class DeadLayerTask(ClassifierTask):
    """At ``t0`` every unit of the watched layer dies at once: its last linear layer's biases drop by 50 (as one
    huge bad update or a corrupted checkpoint would do), so every ReLU output is 0 on every input (a constant), no
    gradient reaches the layers below, and the head can learn the class priors only."""

    shift = 50.0

    def after_step(self, step: int) -> None:
        if self.switched and step == self.t0:
            with torch.no_grad():
                cast(nn.Linear, self.body[2]).bias.sub_(self.shift)


class LabelBreakTask(ClassifierTask):
    """From ``t0`` the training stream's labels are shuffled against its images (a data-loading bug: labels read
    in another order than the images), so the labels carry no information; evaluated every 5 steps."""

    def __init__(self, seed: int, t0: int) -> None:
        super().__init__(seed, t0)
        perm = torch.randperm(len(self.y_train), generator=torch.Generator().manual_seed(seed + 17))
        self.y_broken = self.y_train[perm]

    def step_loss(self, step: int) -> Tensor:
        idx = self.batch_indices(step)
        y = (self.y_broken if self.switched else self.y_train)[idx]
        return nn.functional.cross_entropy(self.model(self.x_train[idx]), y)


# ------------------------------------------------------------------------------------------------ registry
def _family(
    name: str,
    kind: Literal["failure", "control"],
    task: type[Task],
    title: str,
    switch: str,
    mechanism: str,
    source: str,
    steps: int,
    t0: int,
    every: int,
    metric: str,
    quick: tuple[int, int],
    evals: int | None = None,
) -> Family:
    """A family checked every ``every`` steps and evaluated every ``evals`` steps (default: ``every``)."""
    return Family(name, kind, title, switch, mechanism, source, task, steps, t0, evals or every, every, metric, *quick)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        _family("simsiam", "failure", SimSiamTask, "SimSiam on digits", "stop-gradient removed",
                "complete collapse: without the stop-gradient the trivial constant solution is reachable",
                "Chen & He 2021 (SimSiam), section 4.1", 2000, 600, 50, "knn_acc", (150, 50)),
        _family("vicreg", "failure", VICRegTask, "VICReg on digits", "variance and covariance terms switched off",
                "invariance alone is minimised by a constant: the variance hinge is what keeps VICReg from collapse",
                "Bardes et al. 2022 (VICReg), ablation of the variance term", 1500, 500, 50, "knn_acc", (150, 50)),
        _family("classifier_lr", "failure", ClassifierLRRampTask, "MLP classifier on digits",
                "SGD learning rate ramped x1 -> x30 over 300 steps",
                "optimizer instability: the learning rate passes the edge of stability",
                "Cohen et al. 2021 (edge of stability)", 1200, 400, 25, "val_acc", (240, 100)),
        _family("dead_units", "failure", DeadUnitsTask, "MLP classifier on digits",
                "a regulariser pushes the ReLU biases down (constant gradient 0.1 per bias)",
                "dormant ReLU units: units stop firing on every input, capacity is lost, then accuracy",
                "Sokar et al. 2023 (dormant neurons, ReDo); Lu et al. 2019 (dying ReLU)", 1200, 400, 25,
                "val_acc", (240, 100)),
        _family("forgetting", "failure", ForgettingTask, "MLP on digits 0-4, fine-tuned on 5-9",
                "fine-tuning learning rate ramped x1 -> x200 (of the healthy fine-tune's) over 300 steps",
                "representation forgetting: the first task's features are overwritten by a too-fast fine-tune",
                "Kumar et al. 2022 (fine-tuning distorts features); Kirkpatrick et al. 2017", 1000, 400, 25,
                "task_a_knn", (240, 100)),
        _family("cnn_bn_lr", "failure", CNNTask, "small ResNet with BatchNorm on 16x16 digits",
                "SGD learning rate ramped x1 -> x40 over 200 steps",
                "instability of a BatchNorm CNN past its stable learning rate",
                "Lewkowycz et al. 2020 (catapult); Cohen et al. 2021", 900, 300, 25, "val_acc", (150, 75)),
        _family("byte_lm", "failure", LMJumpTask, "byte-level transformer on CPython's stdlib",
                "Adam learning rate x30 (a jump)", "attention-logit growth and divergence at a high learning rate",
                "Wortsman et al. 2023 (small-scale proxies)", 1000, 400, 50, "val_ppl", (150, 50)),
        _family("rank_collapse", "failure", RankCollapseTask, "byte-level transformer on CPython's stdlib",
                "residual skip connections scaled to 0 over 25 steps",
                "rank collapse (token uniformity) of self-attention without skip connections",
                "Dong et al. 2021 (attention is not all you need)", 1000, 400, 50, "val_ppl", (150, 50)),
        _family("benign_neural_collapse", "control", NeuralCollapseTask, "MLP classifier on digits, long training",
                "none: the twin continues identically (terminal phase, weight decay 5e-4)",
                "neural collapse of the last layers: within-class variability shrinks, accuracy does not",
                "Papyan et al. 2020", 3000, 1500, 50, "val_acc", (250, 100)),
        _family("classifier_lr_decay", "control", LRDecayTask, "MLP classifier on digits",
                "learning rate decayed 10x", "a schedule change that helps: update scale falls, accuracy rises",
                "step decay (He et al. 2016)", 1200, 400, 25, "val_acc", (240, 100)),
        _family("contrastive_temperature", "control", InfoNCETask, "InfoNCE on digits",
                "InfoNCE temperature 0.2 -> 0.02", "uniformity changes, the kNN probe does not fall (it rose)",
                "Wang & Isola 2020", 2000, 600, 50, "knn_acc", (150, 50)),
        _family("batch_size", "control", BatchSizeTask, "MLP classifier on digits", "batch size 64 -> 256",
                "less gradient noise: geometry and update scale change, accuracy does not",
                "Smith et al. 2018 (don't decay the learning rate, increase the batch size)", 1200, 400, 25,
                "val_acc", (240, 100)),
        _family("lm_weight_decay", "control", LMWeightDecayTask, "byte-level transformer (AdamW)",
                "weight decay 0 -> 0.1", "weight norms shrink, the perplexity does not degrade",
                "Loshchilov & Hutter 2019 (AdamW)", 1000, 400, 50, "val_ppl", (150, 50)),
        # realistic healthy runs
        _family("warmup_cosine", "control", WarmupCosineTask, "MLP classifier on digits, AdamW with warm-up",
                "after a linear warm-up over the first t0 steps (both arms), the rate decays along a cosine to 0",
                "schedule-made changes: the update scale rises through the warm-up and falls along the cosine",
                "Goyal et al. 2017 (warm-up); Loshchilov & Hutter 2017 (cosine decay)", 2000, 200, 25, "val_acc",
                (250, 25)),
        _family("step_decay", "control", StepDecayTask, "MLP classifier on digits, SGD with weight decay",
                "learning rate x0.1 at t0 and x0.1 again at 2 t0",
                "step decays: the loss and the gradient norm fall in steps, accuracy rises or holds",
                "He et al. 2016 (ResNet's step schedule)", 1500, 500, 25, "val_acc", (225, 75)),
        _family("cosine_restarts", "control", CosineRestartsTask, "MLP classifier on digits, SGDR",
                "warm restarts every t0 steps (the rate jumps from 1% back to its peak), after one annealing cycle",
                "each restart raises the loss and the gradient norm at once, accuracy comes back within the cycle",
                "Loshchilov & Hutter 2017 (SGDR)", 1600, 400, 25, "val_acc", (250, 100)),
        _family("finetune", "control", FineTuneTask, "MLP classifier on digits (Adam), fine-tuned from a checkpoint",
                "a new run from the checkpoint: a new Adam at a tenth of the rate (fresh moments), a new monitor,"
                " the other third of the training set",
                "a fresh optimizer's first steps and new data move the per-step channels; a new monitor has no past",
                "Kornblith et al. 2019 (do better ImageNet models transfer better?); Howard & Ruder 2018", 1200, 400,
                25, "val_acc", (200, 100)),
        _family("accumulation_clip", "control", AccumulationClipTask,
                "MLP classifier on digits, gradient accumulation and clipping",
                "micro-batches per optimizer step 4 -> 8 (effective batch 128 -> 256), clipping at norm 0.5 throughout",
                "the accumulated gradient's norm (before clipping) falls with the larger effective batch",
                "Pascanu et al. 2013 (clipping); Goyal et al. 2017 (large effective batches)", 1200, 400, 25,
                "val_acc", (200, 100)),
        _family("fp16_scaler", "control", FP16ScalerTask, "MLP classifier on digits, fp16 autocast with a GradScaler",
                "the loss scaler tries to double its scale every 10 steps instead of 50 (more skipped steps)",
                "steps the scaler skips have a non-finite gradient norm and no update: not failures",
                "Micikevicius et al. 2018 (mixed precision training, loss scaling)", 1200, 400, 25, "val_acc",
                (200, 100)),
        _family("loss_plateau", "control", LossPlateauTask, "deep tanh MLP on digits, small initialisation",
                "learning rate halved at t0, on the initial plateau",
                "the loss sits at ln 10 for hundreds of steps, then learning starts and the gradient norm grows"
                " about tenfold",
                "Saxe et al. 2014 (plateaus of deep networks from small initialisations)", 2000, 200, 25, "val_acc",
                (300, 100)),
        _family("augmented_stream", "control", AugmentedStreamTask, "MLP classifier on strongly augmented digits",
                "augmentation 30% masking and noise 0.3 -> 40% and 0.4",
                "the monitored rows are noisy views, so the check channels (b0/n) are noisy",
                "Cubuk et al. 2020 (RandAugment: augmentation magnitude)", 1200, 400, 25, "val_acc", (200, 100)),
        _family("long_run", "control", LongRunTask, "MLP classifier on digits, 20,000 steps",
                "weight decay 0 -> 5e-4", "a long healthy run: false alarms per step, not per run",
                "Hoffer et al. 2017 (train longer, generalize better)", 20000, 2000, 50, "val_acc", (300, 100),
                evals=100),
        # failures that start early or at once
        _family("lr_too_high_early", "failure", LRTooHighEarlyTask, "MLP classifier on digits",
                "SGD learning rate x50 from step 40", "divergence from the first steps: the rate is far past stable",
                "Cohen et al. 2021 (edge of stability); Goyal et al. 2017 (why warm-up)", 600, 40, 20, "val_acc",
                (200, 40), evals=10),
        _family("constant_layer_early", "failure", DeadLayerTask, "MLP classifier on digits",
                "at step 50 the watched layer's biases drop by 50: every unit dead, its output constant (0)",
                "a dead (constant) layer: no signal and no gradient pass it, only the class priors are learnt",
                "Lu et al. 2019 (dying ReLU)", 600, 50, 25, "val_acc", (200, 50), evals=10),
        _family("label_break", "failure", LabelBreakTask, "MLP classifier on digits",
                "training labels shuffled against their images (a data-loading bug)",
                "the labels carry no information: the classifier unlearns", "Zhang et al. 2017 (random labels)", 800,
                300, 25, "val_acc", (200, 100), evals=5),
        _family("loss_jump", "failure", LossJumpTask, "MLP classifier on digits", "SGD learning rate x1000 (a jump)",
                "an abrupt blow-up: the loss jumps by orders of magnitude within a step",
                "Wortsman et al. 2023 (small-scale proxies: loss spikes)", 800, 300, 25, "val_acc", (200, 100),
                evals=5),
    )
}  # fmt: skip

#: Candidate families that failed verification: name -> why (kept for the documentation).
DROPPED: dict[str, str] = {
    "infonce_no_projector": "Jing et al.'s dimensional collapse (InfoNCE without a projector): the probe fell about 7"
    " points below the healthy twin but never 5 points below its own best, so it has no ground truth.",
    "attention_entropy": "the attention logit scale of the byte-level transformer ramped x1 -> x12 and x1 -> x60"
    " over 200 steps (AttentionEntropyTask): attention sharpened, but the perplexity rose at most 7% above the"
    " run's best and recovered; this pre-LN model adapts (measured, seed 0).",
    "lr_schedule": "SimSiam with warm-up, then a 10x learning-rate decay at t0 (a control): the kNN probe fell 5"
    " points below its best in 4 of 16 runs (both arms: SimSiam's probe sags late in training), so the control was"
    " not clean; replaced by a classifier's 10x decay (classifier_lr_decay).",
    "forgetting_full_rate": "representation forgetting with the healthy arm fine-tuning at the full pre-training"
    " rate: its task-A probe fell 5 points in 6 of 9 seeds too; the healthy arm now fine-tunes at a tenth.",
    "dead_units_0.02": "the bias push at 0.02 per bias: accuracy fell 3-4 points, short of the 5-point drop (seeds 0,"
    " 1); the family runs at 0.1.",
    "byte_lm_ramp": "a learning-rate ramp to 30x and to 100x on the byte-level LM: this pre-LN transformer under"
    " Adam trained better, not worse (it runs as a jump instead).",
    "augmented_stream_shift": "the strongly augmented stream with a +-1 pixel shift per image as well (and 30% masking,"
    " noise 0.3): the MLP's clean accuracy swung by up to 10 points between evaluations and the control arm dropped 5"
    " points for 3 evaluations (seed 0); the family runs without the shift.",
}
