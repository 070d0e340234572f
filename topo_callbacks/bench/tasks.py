"""The benchmark's training tasks: small CPU runs built from a seed, whose whole state can be saved and restored.

A `Task` holds a model, its optimizer, the random generators and batch streams it draws from, and the switch that
a family flips at ``t0``. Everything a run depends on is in `Task.state`, so a run trained once up to ``t0`` is
forked into its arms from exactly the same state (`topo_callbacks.bench.runner`). Data ships with the packages:
scikit-learn's bundled digits and CPython's own standard-library source text; nothing is downloaded.
"""

from __future__ import annotations

import copy
import math
import sysconfig
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["BatchStream", "DigitsMLP", "Task", "digits", "stdlib_text"]


# ------------------------------------------------------------------------------------------------------ data
def digits(seed: int, classes: tuple[int, ...] | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's 8x8 digits in [0, 1], shuffled by ``seed``, 80/20 train/test (optionally some classes only).

    Example:
        >>> x, y, xt, yt = digits(0)
        >>> x.shape, xt.shape, float(x.max()) <= 1.0
        (torch.Size([1437, 64]), torch.Size([360, 64]), True)
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    cut = int(0.8 * len(x))
    x_train, y_train, x_test, y_test = x[:cut], y[:cut], x[cut:], y[cut:]
    if classes is not None:
        keep = torch.tensor(classes)
        a, b = torch.isin(y_train, keep), torch.isin(y_test, keep)
        x_train, y_train, x_test, y_test = x_train[a], y_train[a], x_test[b], y_test[b]
    return x_train, y_train, x_test, y_test


class DigitsMLP(nn.Module):
    """A 64-128-64-10 ReLU classifier for the digits, its 64-wide hidden layer named ``embed`` (the layer to watch):
    the model of the alarm's tests and of ``benchmarks/outside_runs.py``.

    Example:
        >>> DigitsMLP()(torch.zeros(5, 64)).shape
        torch.Size([5, 10])
    """

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 128), nn.ReLU())
        self.embed = nn.Sequential(nn.Linear(128, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.embed(self.body(x)))


def augment(x: Tensor, g: torch.Generator) -> Tensor:
    """Random +-1 pixel shift (one per batch), 20% pixel masking and Gaussian noise on 8x8 images."""
    img = x.view(-1, 8, 8)
    dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
    img = torch.roll(img, shifts=(dy, dx), dims=(1, 2))
    keep = (torch.rand(img.shape, generator=g) > 0.2).float()
    return (img * keep + 0.1 * torch.randn(img.shape, generator=g)).view(-1, 64)


def augment_each(x: Tensor, g: torch.Generator) -> Tensor:
    """`augment` with a shift drawn per image (held-out views for the kNN probe)."""
    img = x.view(-1, 8, 8).clone()
    shifts = torch.randint(-1, 2, (len(img), 2), generator=g)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            rows = ((shifts[:, 0] == dy) & (shifts[:, 1] == dx)).nonzero().flatten()
            img[rows] = torch.roll(img[rows], shifts=(dy, dx), dims=(1, 2))
    keep = (torch.rand(img.shape, generator=g) > 0.2).float()
    return (img * keep + 0.1 * torch.randn(img.shape, generator=g)).view(-1, 64)


def mask_and_noise(x: Tensor, g: torch.Generator, mask: float, noise: float) -> Tensor:
    """A share ``mask`` of the pixels zeroed and Gaussian noise of std ``noise`` added (pixels are in [0, 1]).

    Example:
        >>> x = torch.ones(100, 64)
        >>> round(float((mask_and_noise(x, torch.Generator().manual_seed(0), 0.3, 0.0) == 0).float().mean()), 2)
        0.3
    """
    keep = (torch.rand(x.shape, generator=g) > mask).float()
    return x * keep + noise * torch.randn(x.shape, generator=g)


def knn_accuracy(train_z: Tensor, train_y: Tensor, test_z: Tensor, test_y: Tensor, k: int = 5) -> float:
    """Cosine kNN accuracy in percent (a non-finite embedding scores as a wrong vote)."""
    a = nn.functional.normalize(torch.nan_to_num(train_z), dim=1)
    b = nn.functional.normalize(torch.nan_to_num(test_z), dim=1)
    idx = (b @ a.T).topk(k, dim=1).indices
    votes = nn.functional.one_hot(train_y[idx], 10).sum(dim=1)
    return float((votes.argmax(dim=1) == test_y).float().mean()) * 100.0


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


class BatchStream:
    """Index batches over ``n`` examples in reshuffled epochs, with a state that can be saved and restored.

    Example:
        >>> s = BatchStream(10, 4, seed=0)
        >>> first = s.next()
        >>> state = s.state()
        >>> a = s.next()
        >>> s.load(state)
        >>> bool((s.next() == a).all()), len(first)
        (True, 4)
    """

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size = n, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.perm = torch.randperm(n, generator=self.gen)
        self.pos = 0

    def next(self) -> Tensor:
        if self.pos + self.batch_size > self.n:
            self.perm = torch.randperm(self.n, generator=self.gen)
            self.pos = 0
        idx = self.perm[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return idx

    def state(self) -> dict[str, Any]:
        return {"gen": self.gen.get_state(), "perm": self.perm.clone(), "pos": self.pos}

    def load(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["gen"])
        self.perm, self.pos = state["perm"].clone(), int(state["pos"])


# ------------------------------------------------------------------------------------------------------ task
class Task:
    """One training run of a family: built from a seed; `state`/`load` cover everything it depends on.

    Subclasses set ``model``, ``optimizer``, ``layer`` (the watched submodule) and fill ``gens`` and ``streams``,
    and implement `step_loss` and `evaluate`. ``switched`` is True in the arm whose switch has flipped (from
    step ``t0`` on); `lr_factor` multiplies every group's base learning rate at each step.

    Optional training-loop capabilities, off by default (a task that sets none trains exactly as before):
    `micro_batches` (gradient accumulation), ``clip_norm`` (gradient-norm clipping after the pre-clip norm is
    recorded), ``scaler`` (a loss scaler such as ``torch.amp.GradScaler("cpu")``: steps it skips are recorded),
    `on_fork` (e.g. a new optimizer at ``t0``) and ``fresh_monitor`` (the switched arm gets a new monitor at ``t0``,
    as a fine-tuning run started from a checkpoint of the weights would).
    """

    layer: str = ""
    pool: str = "mean"
    model: nn.Module
    optimizer: torch.optim.Optimizer
    #: clip the global gradient norm to this after it is read (``torch.nn.utils.clip_grad_norm_``); None: no clipping
    clip_norm: float | None = None
    #: a loss scaler: the loss is scaled before backward, the gradients unscaled before their norm is read, and the
    #: scaler steps the optimizer (it skips the update on non-finite gradients) and updates its scale
    scaler: torch.amp.GradScaler | None = None
    #: whether the switched arm's monitor starts afresh at ``t0`` (no reference, no history), as a new run would
    fresh_monitor: bool = False

    def __init__(self, seed: int, t0: int) -> None:
        self.seed, self.t0 = seed, t0
        self.switched = False
        self.gens: dict[str, torch.Generator] = {}
        self.streams: dict[str, BatchStream] = {}

    def lr_factor(self, step: int) -> float:
        """Learning-rate multiplier for optimizer step ``step`` (0-based), by default 1."""
        return 1.0

    def step_loss(self, step: int) -> Tensor:
        """The loss of optimizer step ``step`` (0-based) on the next training batch."""
        raise NotImplementedError

    def evaluate(self) -> tuple[float, float]:
        """(task metric, validation loss) of the current model (called in eval mode, without gradients)."""
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """Called after each optimizer step ``step`` (0-based); a switch that edits weights acts here."""

    def micro_batches(self, step: int) -> int:
        """How many micro-batches optimizer step ``step`` (0-based) accumulates: `step_loss` is called that many
        times, each loss divided by the count before its backward, and the recorded loss is their mean."""
        return 1

    def on_fork(self) -> None:
        """Called once in the switched arm, before its first switched step (``t0``, 0-based): a switch that replaces
        training objects (a new optimizer, a new scaler) acts here. The training loop reads ``optimizer`` again."""

    def fixed_batch_loss(self) -> Tensor:
        """The training objective on a fixed batch (the same at every check), for the curvature channel."""
        raise NotImplementedError(f"{type(self).__name__} defines no fixed-batch loss")

    def probe_inputs(self) -> Tensor:
        """A fixed batch of held-out inputs (the same at every check) for the consecutive-check channels: the first
        256 test inputs by default."""
        x_test = getattr(self, "x_test", None)
        if not isinstance(x_test, Tensor):
            raise NotImplementedError(f"{type(self).__name__} has no `x_test`; override `probe_inputs`")
        return x_test[:256]

    def state(self) -> dict[str, Any]:
        return {
            "model": {k: v.clone() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "gens": {k: g.get_state() for k, g in self.gens.items()},
            "streams": {k: s.state() for k, s in self.streams.items()},
            "torch": torch.get_rng_state(),
            **({"scaler": self.scaler.state_dict()} if self.scaler is not None else {}),
        }

    def load(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        # a copy: `Optimizer.load_state_dict` keeps the given state tensors (momentum buffers, Adam's moments and step
        # counts) and updates them in place, so an arm loaded from a shared snapshot would change the snapshot under
        # the next arm (which would then start from the first arm's final optimizer state)
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        for k, g in self.gens.items():
            g.set_state(state["gens"][k])
        for k, s in self.streams.items():
            s.load(state["streams"][k])
        torch.set_rng_state(state["torch"])


def ramp(step: int, t0: int, length: int, top: float) -> float:
    """1 until ``t0``, then linear to ``top`` over ``length`` steps, then ``top``.

    Example:
        >>> [ramp(s, 10, 10, 3.0) for s in (0, 10, 15, 20, 99)]
        [1.0, 1.0, 2.0, 3.0, 3.0]
    """
    return 1.0 + (top - 1.0) * min(max((step - t0) / length, 0.0), 1.0)


def finite_or_inf(value: float) -> float:
    return value if math.isfinite(value) else math.inf
