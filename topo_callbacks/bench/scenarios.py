"""Collapse scenarios: small CPU training runs, each a healthy arm and a twin in which one switch flips at ``t0``.

Every scenario trains in a plain PyTorch loop with a `CollapseMonitorCore` attached (the same core the Lightning,
Accelerate and HF adapters drive), and records, for the detectors in `topo_callbacks.bench.detectors` to replay:

- per optimizer step: the training loss and the global gradient norm (before the optimizer step);
- per evaluation: the task metric (kNN-probe accuracy, validation accuracy or validation perplexity, never an input
  of any detector) and the validation loss;
- per check: the monitor's history row (the CI with the published weights, every term and channel).

Data ships with the packages: scikit-learn's bundled digits and CPython's own standard-library source text.
"""

from __future__ import annotations

import dataclasses
import math
import sysconfig
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

__all__ = ["SCENARIOS", "RunRecord", "Scenario", "run_scenario"]

Arm = Literal["healthy", "collapse", "control"]


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One benchmark scenario: what flips at ``t0`` and how downstream quality is measured."""

    name: str
    title: str
    #: "collapse": a healthy arm and a collapse arm; "control": one arm in which nothing bad should happen.
    kind: Literal["collapse", "control"]
    switch: str
    steps: int
    t0: int
    eval_every: int
    check_every: int
    #: the task metric: "knn_acc" / "val_acc" (percent, higher is better) or "val_ppl" (lower is better)
    metric: str
    layer: str
    quick_steps: int
    quick_t0: int

    @property
    def arms(self) -> tuple[Arm, ...]:
        return ("healthy", "collapse") if self.kind == "collapse" else ("control",)

    @property
    def metric_mode(self) -> Literal["max", "min"]:
        return "min" if self.metric == "val_ppl" else "max"


@dataclasses.dataclass
class RunRecord:
    """What one run produced, as plain data (JSON-ready)."""

    scenario: str
    arm: str
    seed: int
    steps: int
    t0: int | None
    loss: list[float]
    grad_norm: list[float]
    #: (step, task metric, validation loss)
    evals: list[tuple[int, float, float]]
    checks: list[dict[str, Any]]
    monitor_alarm_step: int | None
    wall_s: float
    monitor_s: float

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        data = dict(data)
        data["evals"] = [tuple(e) for e in data["evals"]]
        return cls(**data)


# ---------------------------------------------------------------------------------------------------- data
def _digits(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    cut = int(0.8 * len(x))
    return x[:cut], y[:cut], x[cut:], y[cut:]


def _augment(x: Tensor, g: torch.Generator) -> Tensor:
    """Random +-1 pixel shifts, 20% pixel masking and Gaussian noise on 8x8 images."""
    img = x.view(-1, 8, 8)
    dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
    img = torch.roll(img, shifts=(dy, dx), dims=(1, 2))
    keep = (torch.rand(img.shape, generator=g) > 0.2).float()
    return (img * keep + 0.1 * torch.randn(img.shape, generator=g)).view(-1, 64)


def _augment_each(x: Tensor, g: torch.Generator) -> Tensor:
    """`_augment` with a shift drawn per image (``_augment`` shifts a whole batch alike, as a cheap training view)."""
    img = x.view(-1, 8, 8).clone()
    shifts = torch.randint(-1, 2, (len(img), 2), generator=g)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            rows = ((shifts[:, 0] == dy) & (shifts[:, 1] == dx)).nonzero().flatten()
            img[rows] = torch.roll(img[rows], shifts=(dy, dx), dims=(1, 2))
    keep = (torch.rand(img.shape, generator=g) > 0.2).float()
    return (img * keep + 0.1 * torch.randn(img.shape, generator=g)).view(-1, 64)


def _knn_accuracy(train_z: Tensor, train_y: Tensor, test_z: Tensor, test_y: Tensor, k: int = 5) -> float:
    a = nn.functional.normalize(train_z, dim=1)
    b = nn.functional.normalize(test_z, dim=1)
    idx = (b @ a.T).topk(k, dim=1).indices
    votes = nn.functional.one_hot(train_y[idx], 10).sum(dim=1)
    return float((votes.argmax(dim=1) == test_y).float().mean()) * 100.0


def _batches(n: int, batch_size: int, seed: int) -> Iterator[Tensor]:
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i : i + batch_size]


_STDLIB_TEXT: bytes | None = None


def stdlib_text(max_bytes: int = 1_500_000) -> bytes:
    """A deterministic byte corpus: CPython's own standard-library ``.py`` files, sorted by path, concatenated."""
    global _STDLIB_TEXT
    if _STDLIB_TEXT is None or len(_STDLIB_TEXT) < max_bytes:
        root = Path(sysconfig.get_paths()["stdlib"])
        chunks, total = [], 0
        for path in sorted(root.glob("*.py")):
            data = path.read_bytes()
            chunks.append(data)
            total += len(data)
            if total >= max_bytes:
                break
        _STDLIB_TEXT = b"".join(chunks)
    return _STDLIB_TEXT[:max_bytes]


# ---------------------------------------------------------------------------------------------------- loop
@dataclasses.dataclass
class _Setup:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    #: loss of one training step; receives the number of optimizer steps already taken
    step_loss: Callable[[int], Tensor]
    #: (task metric, validation loss) of the current model after this many optimizer steps
    evaluate: Callable[[int], tuple[float, float]]
    #: learning-rate multiplier for the step about to be taken (None: constant)
    lr_factor: Callable[[int], float] | None = None
    pool: str = "mean"


def _train(setup: _Setup, scenario: Scenario, arm: str, seed: int, steps: int, t0: int | None) -> RunRecord:
    from topo_callbacks.core import CollapseMonitorCore

    monitor = CollapseMonitorCore(
        scenario.layer,
        every_n_train_steps=scenario.check_every,
        max_samples=512,
        pool=setup.pool,
        # the published CI and the pre-benchmark rule, so that the "rule before the benchmark" rows stay comparable
        # across versions; every term is recorded, so any other weighting is replayed exactly
        weights="paper",
        max_rise=0.15,
        stop_on_alarm=False,
    )
    model, opt = setup.model, setup.optimizer
    base_lrs = [group["lr"] for group in opt.param_groups]
    monitor.attach(model)
    losses: list[float] = []
    grad_norms: list[float] = []
    evals: list[tuple[int, float, float]] = []
    monitor_s = 0.0
    start = time.perf_counter()

    def evaluate(step: int) -> None:
        was = model.training
        model.eval()
        with torch.no_grad():
            metric, val_loss = setup.evaluate(step)
        model.train(was)
        evals.append((step, metric, val_loss))

    import warnings

    from topo_callbacks.core import CollapseWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CollapseWarning)
        evaluate(0)
        model.train()
        for step in range(1, steps + 1):
            if setup.lr_factor is not None:
                for group, lr in zip(opt.param_groups, base_lrs, strict=True):
                    group["lr"] = lr * setup.lr_factor(step - 1)
            monitor.prepare_step(step)
            loss = setup.step_loss(step - 1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grads = [p.grad.detach().norm() for p in model.parameters() if p.grad is not None]
            grad_norms.append(float(torch.stack(grads).norm()) if grads else 0.0)
            opt.step()
            losses.append(float(loss.detach()))
            if monitor.is_check_step(step):
                tick = time.perf_counter()
                monitor.run_check(step)
                monitor_s += time.perf_counter() - tick
            if step % scenario.eval_every == 0:
                evaluate(step)
    monitor.detach()
    return RunRecord(
        scenario=scenario.name,
        arm=arm,
        seed=seed,
        steps=steps,
        t0=t0,
        loss=losses,
        grad_norm=grad_norms,
        evals=evals,
        checks=[dict(h) for h in monitor.history],
        monitor_alarm_step=monitor.first_alarm_step,
        wall_s=time.perf_counter() - start,
        monitor_s=monitor_s,
    )


# ------------------------------------------------------------------------------------------ SSL scenarios
class _SSLNet(nn.Module):
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


def _simsiam_loss(model: _SSLNet, x: Tensor, g: torch.Generator, stop_gradient: bool) -> Tensor:
    z1, z2 = model(_augment(x, g)), model(_augment(x, g))
    p1, p2 = model.predictor(z1), model.predictor(z2)
    t1, t2 = (z1.detach(), z2.detach()) if stop_gradient else (z1, z2)
    cos = nn.functional.cosine_similarity
    return -(cos(p1, t2).mean() + cos(p2, t1).mean()) / 2


def _info_nce(model: _SSLNet, x: Tensor, g: torch.Generator, temperature: float) -> Tensor:
    z1, z2 = model(_augment(x, g)), model(_augment(x, g))
    z = nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(-math.inf)
    n = x.shape[0]
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return nn.functional.cross_entropy(sim, target)


def _ssl_setup(kind: str, switch: bool, seed: int, t0: int, steps: int) -> _Setup:
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = _digits(seed)
    model = _SSLNet(predictor=kind in ("simsiam", "schedule"))
    batches = _batches(len(x_train), 128, seed)
    g = torch.Generator().manual_seed(seed + 1)
    g_val = torch.Generator()

    def loss_of(x: Tensor, step: int, gen: torch.Generator) -> Tensor:
        after = switch and step >= t0
        if kind in ("simsiam", "schedule"):
            return _simsiam_loss(model, x, gen, stop_gradient=not after)
        return _info_nce(model, x, gen, temperature=0.02 if after else 0.2)

    def step_loss(step: int) -> Tensor:
        return loss_of(x_train[next(batches)], step, g)

    def evaluate(step: int) -> tuple[float, float]:
        # kNN on clean training images vs augmented held-out views: raw pixels or random features score ~35%
        # here (98% on clean views, which leaves nothing to degrade); invariance learnt by SSL raises it.
        g_val.manual_seed(12345)  # the same held-out views at every evaluation
        bank = model.backbone(_augment_each(x_train, g_val))
        acc = _knn_accuracy(bank, y_train, model.backbone(_augment_each(x_test, g_val)), y_test)
        return acc, float(loss_of(x_test, step, g_val))  # the objective in force at this step

    if kind in ("simsiam", "schedule"):
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    lr_factor = None
    if kind == "schedule":  # linear warm-up over the first 10%, then a 10x decay at t0
        warm = max(steps // 10, 1)

        def lr_factor(step: int) -> float:
            return min((step + 1) / warm, 1.0) * (0.1 if step >= t0 else 1.0)

    return _Setup(model, opt, step_loss, evaluate, lr_factor)


# ------------------------------------------------------------------------------------- classifier scenarios
def _lr_jump(t0: int, factor: float) -> Callable[[int], float]:
    """Learning-rate multiplier 1 until ``t0``, then ``factor``: a sudden break (detection, not warning)."""
    return lambda step: factor if step >= t0 else 1.0


def _lr_ramp(t0: int, length: int, top: float = 30.0) -> Callable[[int], float]:
    """Learning-rate multiplier 1 until ``t0``, then a linear ramp to ``top`` over ``length`` steps.

    A ramp, not a jump: a jump breaks the run within one evaluation, which leaves no time in which any rule
    could warn; a ramp crosses the stable range at a step the run itself decides, as a mis-set schedule does.
    """

    def factor(step: int) -> float:
        return 1.0 + (top - 1.0) * min(max((step - t0) / length, 0.0), 1.0)

    return factor


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU())
        self.head = nn.Linear(128, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def _classifier_setup(kind: str, arm: str, seed: int, t0: int) -> _Setup:
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = _digits(seed)
    model = _MLP()
    batches = _batches(len(x_train), 64, seed)
    ce = nn.functional.cross_entropy
    if kind == "classifier_lr":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    else:  # long training into the terminal phase: neural collapse of the last layer is expected and benign
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    def step_loss(step: int) -> Tensor:
        idx = next(batches)
        return ce(model(x_train[idx]), y_train[idx])

    def evaluate(step: int) -> tuple[float, float]:
        logits = model(x_test)
        acc = float((logits.argmax(1) == y_test).float().mean()) * 100.0
        return acc, float(ce(logits, y_test))

    lr_factor = _lr_ramp(t0, 300) if kind == "classifier_lr" and arm == "collapse" else None

    return _Setup(model, opt, step_loss, evaluate, lr_factor)


# ---------------------------------------------------------------------------------------- byte-level LM
class _ByteLM(nn.Module):
    mask: Tensor

    def __init__(self, d: int = 64, layers: int = 2, heads: int = 4, context: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, d)
        self.pos = nn.Parameter(torch.randn(context, d) * 0.02)
        block = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, 256)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        h = self.embed(idx) + self.pos[:t]
        h = self.blocks(h, mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.ln_f(h))


def _lm_setup(arm: str, seed: int, t0: int) -> _Setup:
    torch.manual_seed(seed)
    data = torch.frombuffer(bytearray(stdlib_text()), dtype=torch.uint8).long()
    cut = int(0.9 * len(data))
    train, val = data[:cut], data[cut:]
    context, batch = 64, 32
    model = _ByteLM(context=context)
    g = torch.Generator().manual_seed(seed)
    val_starts = torch.arange(0, len(val) - context - 1, (len(val) - context - 1) // 64)[:64]

    def windows(source: Tensor, starts: Tensor) -> tuple[Tensor, Tensor]:
        offs = starts[:, None] + torch.arange(context + 1)
        chunk = source[offs]
        return chunk[:, :-1], chunk[:, 1:]

    def step_loss(step: int) -> Tensor:
        x, y = windows(train, torch.randint(0, len(train) - context - 1, (batch,), generator=g))
        return nn.functional.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))

    def evaluate(step: int) -> tuple[float, float]:
        x, y = windows(val, val_starts)
        loss = float(nn.functional.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1)))
        return (math.exp(loss) if math.isfinite(loss) and loss < 50 else math.inf), loss

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    # Wortsman et al.: attention-logit growth at a high learning rate (no qk-layernorm here). A jump, not a ramp:
    # this pre-LN model under Adam absorbed a ramp to 30x and to 100x and trained *better* (measured, seed 0).
    lr_factor = _lr_jump(t0, 30.0) if arm == "collapse" else None

    return _Setup(model, opt, step_loss, evaluate, lr_factor, pool="last")


# ------------------------------------------------------------------------------------------------ registry
SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("simsiam", "SimSiam on digits", "collapse", "stop-gradient removed", 2000, 600, 50, 50,
                 "knn_acc", "projector", 400, 150),
        Scenario("classifier_lr", "MLP classifier on digits", "collapse",
                 "learning rate ramped x1 -> x30 over 300 steps", 1200, 400, 25, 25,
                 "val_acc", "body", 500, 100),
        Scenario("byte_lm", "byte-level transformer on CPython's stdlib", "collapse",
                 "Adam learning rate x30 (a jump)",
                 1000, 400, 50, 50, "val_ppl", "ln_f", 300, 150),
        Scenario("benign_neural_collapse", "MLP classifier on digits, long training", "control",
                 "none (terminal phase, weight decay 5e-4)", 3000, 0, 50, 50, "val_acc", "body", 400, 0),
        Scenario("lr_schedule", "SimSiam on digits, warm-up then 10x decay", "control",
                 "learning-rate warm-up ends, then a 10x decay at t0", 2000, 1000, 50, 50, "knn_acc", "projector",
                 400, 200),
        # Meant as a dimensional-collapse scenario (Jing et al.); on digits the kNN probe did not degrade (it rose),
        # so it serves as a control: the representation changes at t0, quality does not.
        Scenario("contrastive_temperature", "InfoNCE on digits", "control", "InfoNCE temperature 0.2 -> 0.02 at t0",
                 2000, 600, 50, 50, "knn_acc", "projector", 400, 150),
    )
}  # fmt: skip


def run_scenario(name: str, arm: Arm, seed: int = 0, *, quick: bool = False) -> RunRecord:
    """Train one arm of one scenario with the monitor attached and return its `RunRecord`.

    Example:
        >>> rec = run_scenario("classifier_lr", "healthy", seed=0, quick=True)
        >>> rec.steps, len(rec.loss), [c["step"] for c in rec.checks][:2]
        (500, 500, [25, 50])
    """
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; accepted: {sorted(SCENARIOS)}.")
    sc = SCENARIOS[name]
    if arm not in sc.arms:
        raise ValueError(f"scenario {name!r} has arms {sc.arms}; got {arm!r}.")
    steps, t0 = (sc.quick_steps, sc.quick_t0) if quick else (sc.steps, sc.t0)
    if name == "simsiam":
        setup = _ssl_setup(name, arm == "collapse", seed, t0, steps)
    elif name == "contrastive_temperature":
        setup = _ssl_setup(name, True, seed, t0, steps)
    elif name == "lr_schedule":
        setup = _ssl_setup("schedule", False, seed, t0, steps)
    elif name in ("classifier_lr", "benign_neural_collapse"):
        setup = _classifier_setup(name, arm, seed, t0)
    else:
        setup = _lm_setup(arm, seed, t0)
    return _train(setup, sc, arm, seed, steps, t0 if sc.t0 else None)
