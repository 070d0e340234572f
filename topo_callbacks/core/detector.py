"""The default alarm: per-channel robust CUSUMs fused into one statistic calibrated to a false-alarm rate.

Each channel (the loss and the global gradient norm every optimizer step; the collapse report's terms every check)
is scored against its own recent past (`topo_callbacks.functional.detector`) and accumulated by a two-sided CUSUM.
Channel ``c``'s CUSUM is divided by its *normaliser* ``q_c`` (the level its CUSUM alone reaches on a share of healthy
calibration runs), so that channels of different noise count alike; the detector's statistic is the largest
normalised CUSUM, and it alarms when that reaches ``threshold``. The channels, normalisers and threshold for each
false-alarm rate are fit by the benchmark (``topo-callbacks bench``) on its healthy calibration runs and shipped in
`topo_callbacks.core._calibration`; see ``docs/benchmark.md`` for what "a 5% false-alarm rate" means there.

State is plain data (``state_dict``): reference windows, accumulators, the step of the first alarm.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from topo_callbacks.functional.detector import channel_scale, cusum_update, robust_location_scale

__all__ = [
    "CHANNELS",
    "Channel",
    "CusumDetector",
    "DetectorCalibration",
    "DetectorFiring",
    "default_calibration",
    "global_grad_norm",
    "gradient_curvature",
]

#: Per-step channels are scored against the 200 values before them, check channels against the 8 checks before
#: them (from the 4th on); the CUSUM allowance is one robust standard deviation, and one point adds at most 8.
STEP_WINDOW = 200
CHECK_WINDOW = 8
CHECK_MIN_REFERENCE = 4
ALLOWANCE = 1.0
CLIP = 8.0


@dataclass(frozen=True)
class Channel:
    """One monitored series: when it is read (``"step"`` or ``"check"``), which direction is bad (``"up"``,
    ``"down"`` or ``"both"``), whether it is scored on a log scale (norms), and the floor of its robust scale."""

    name: str
    reads: str
    side: str
    log: bool
    floor: float
    description: str
    #: computed by the monitor during training (the others are recorded by the benchmark only, to measure them)
    live: bool = True
    #: ``"any"``: always available; ``"probe"``: only with ``source="probe"`` (consecutive checks see the same
    #: examples); ``"loss_fn"``: only when the user gives a loss on a fixed batch
    source: str = "any"

    @property
    def window(self) -> int:
        return STEP_WINDOW if self.reads == "step" else CHECK_WINDOW

    @property
    def min_reference(self) -> int:
        return STEP_WINDOW if self.reads == "step" else CHECK_MIN_REFERENCE


CHANNELS: dict[str, Channel] = {
    c.name: c
    for c in (
        Channel("loss", "step", "up", False, 1e-3, "training loss against its median over the last 200 steps"),
        Channel("grad_norm", "step", "both", True, 0.01, "global gradient norm (log) against the last 200 steps"),
        Channel("update_ratio", "step", "both", True, 0.01,
                "||delta theta|| / (lr ||theta||) of the first parameter group (log)", live=False),
        Channel("act_rms", "step", "both", True, 0.01, "the watched layer's activation RMS (log)", live=False),
        Channel("b0_fraction", "check", "both", False, 0.01, "components at the fixed scale over n (b0/n)"),
        Channel("b1_fraction", "check", "both", False, 1 / 512, "loops at the fixed scale over n (b1/n)"),
        Channel("persistence_entropy", "check", "both", False, 0.005, "normalised H0 persistence entropy"),
        Channel("effective_rank", "check", "both", True, 0.01, "RankMe effective rank (log)"),
        Channel("std_l2", "check", "both", True, 0.01, "std of L2-normalised rows (log)"),
        Channel("anisotropy_term", "check", "both", False, 0.01, "the CI's anisotropy term"),
        Channel("mean_cosine", "check", "both", False, 0.01, "mean cosine similarity over pairs of rows"),
        Channel("knn_preservation", "check", "both", False, 0.01,
                "overlap of each probe example's 10 nearest neighbours with the previous check's", source="probe"),
        Channel("contracted_pairs", "check", "both", False, 0.005,
                "share of the previous check's 10-NN pairs now closer than half their distance", source="probe"),
        Channel("h0_distance", "check", "both", False, 0.01,
                "1-Wasserstein distance of the H0 diagram to the previous check's, relative", source="probe"),
        Channel("curvature_ratio", "check", "both", False, 0.01,
                "lr x the loss's curvature along its gradient on the user's fixed batch, over the optimizer's"
                " stability level (2 for SGD, 2 + 2 momentum)", source="loss_fn"),
        Channel("attn_max_logit", "step", "both", False, 0.01, "largest attention logit", live=False),
        Channel("attn_min_entropy", "step", "both", False, 0.01, "smallest per-head attention entropy", live=False),
    )
}  # fmt: skip


@dataclass(frozen=True)
class DetectorCalibration:
    """What the benchmark fit for one false-alarm rate: the channels, each one's normaliser, the threshold."""

    false_alarm_rate: float
    channels: tuple[str, ...]
    normalisers: dict[str, float]
    threshold: float
    fit_on: str = ""

    def __post_init__(self) -> None:
        unknown = [c for c in self.channels if c not in CHANNELS]
        if unknown:
            raise ValueError(f"unknown detector channels {unknown}; known: {sorted(CHANNELS)}")
        missing = [c for c in self.channels if c not in self.normalisers]
        if missing:
            raise ValueError(f"channels {missing} have no normaliser")

    def as_dict(self) -> dict[str, Any]:
        return {
            "false_alarm_rate": self.false_alarm_rate,
            "channels": list(self.channels),
            "normalisers": dict(self.normalisers),
            "threshold": self.threshold,
            "fit_on": self.fit_on,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DetectorCalibration:
        return cls(
            float(data["false_alarm_rate"]),
            tuple(data["channels"]),
            {k: float(v) for k, v in data["normalisers"].items()},
            float(data["threshold"]),
            str(data.get("fit_on", "")),
        )


def default_calibration(false_alarm_rate: float = 0.05) -> DetectorCalibration:
    """The shipped calibration for ``false_alarm_rate`` (one of the rates the benchmark fit).

    Example:
        >>> cal = default_calibration(0.05)
        >>> cal.false_alarm_rate, "loss" in cal.channels
        (0.05, True)
    """
    from topo_callbacks.core._calibration import CALIBRATIONS

    for data in CALIBRATIONS:
        if math.isclose(float(data["false_alarm_rate"]), float(false_alarm_rate)):
            return DetectorCalibration.from_dict(data)
    rates = sorted(float(d["false_alarm_rate"]) for d in CALIBRATIONS)
    raise ValueError(f"`false_alarm_rate` must be one of the calibrated rates {rates}; got {false_alarm_rate!r}.")


@dataclass(frozen=True)
class DetectorFiring:
    """Why the detector alarmed: the channel, its value, its baseline (reference median), its standardised score,
    and its normalised CUSUM against the threshold."""

    step: int
    channel: str
    value: float
    baseline: float
    score: float
    statistic: float
    threshold: float

    def message(self, prefix: str = "collapse") -> str:
        spec = CHANNELS[self.channel]
        scale = " (log scale)" if spec.log else ""
        return (
            f"{prefix}/detector alarmed at step {self.step} on `{self.channel}`: value {self.value:.4g}, baseline"
            f" {self.baseline:.4g} (median of the last {spec.window} {spec.reads}s), standardised score"
            f" {self.score:+.2f}{scale}; normalised CUSUM {self.statistic:.2f} >= threshold {self.threshold:.2f}."
        )


@dataclass
class _ChannelState:
    reference: deque[float]
    s_pos: float = 0.0
    s_neg: float = 0.0
    value: float = math.nan
    baseline: float = math.nan
    score: float = 0.0

    def statistic(self, side: str) -> float:
        return max(self.s_pos, self.s_neg) if side == "both" else (self.s_pos if side == "up" else self.s_neg)


@dataclass
class CusumDetector:
    """Online detector: feed channel values with `update`; it returns a `DetectorFiring` at the first alarm.

    Example:
        >>> cal = DetectorCalibration(0.05, ("b0_fraction",), {"b0_fraction": 2.0}, 1.0)
        >>> det = CusumDetector(cal)
        >>> fired = [det.update("b0_fraction", v, step) for step, v in enumerate([0.5, 0.51, 0.49, 0.5, 0.5, 0.2])]
        >>> fired[-1].channel, fired[-1].step, fired[:-1] == [None] * 5
        ('b0_fraction', 5, True)
    """

    calibration: DetectorCalibration
    states: dict[str, _ChannelState] = field(default_factory=dict)
    fired: DetectorFiring | None = None

    def __post_init__(self) -> None:
        for name in self.calibration.channels:
            self.states.setdefault(name, _ChannelState(deque(maxlen=CHANNELS[name].window)))

    @property
    def channels(self) -> tuple[str, ...]:
        return self.calibration.channels

    def normalised(self, name: str) -> float:
        """Channel ``name``'s CUSUM over its normaliser (the share of the threshold it has reached, times h)."""
        state = self.states[name]
        return state.statistic(CHANNELS[name].side) / self.calibration.normalisers[name]

    def statistic(self) -> float:
        """The fused statistic: the largest normalised CUSUM over the channels."""
        return max((self.normalised(c) for c in self.channels), default=0.0)

    def update(self, name: str, value: float, step: int) -> DetectorFiring | None:
        """Feed one value of channel ``name`` (ignored when the calibration does not use it); returns the firing
        when this value makes the detector alarm for the first time."""
        state = self.states.get(name)
        if state is None:
            return None
        spec = CHANNELS[name]
        x = channel_scale(float(value), spec.log)
        state.value = float(value)
        if not math.isfinite(x):
            state.score = math.inf
            state.s_pos, state.s_neg = cusum_update(state.s_pos, state.s_neg, math.inf, ALLOWANCE)
        elif len(state.reference) >= spec.min_reference:
            med, scale = robust_location_scale(state.reference, spec.floor)
            state.baseline = _untransform(med, spec.log)
            state.score = min(max((x - med) / scale, -CLIP), CLIP)
            state.s_pos, state.s_neg = cusum_update(state.s_pos, state.s_neg, state.score, ALLOWANCE)
        if math.isfinite(x):
            state.reference.append(x)
        if self.fired is None:
            stat = self.normalised(name)
            if stat >= self.calibration.threshold:
                self.fired = DetectorFiring(
                    step, name, state.value, state.baseline, state.score, stat, self.calibration.threshold
                )
                return self.fired
        return None

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """The fused statistic and each channel's normalised CUSUM over the threshold (the detector alarms at 1), as
        log keys ``{prefix}detector`` and ``{prefix}detector_<channel>``.

        Example:
            >>> det = CusumDetector(DetectorCalibration(0.05, ("loss",), {"loss": 2.0}, 4.0))
            >>> det.as_dict("collapse/")
            {'collapse/detector': 0.0, 'collapse/detector_loss': 0.0}
        """
        threshold = self.calibration.threshold
        out = {f"{prefix}detector": self.statistic() / threshold}
        for name in self.channels:
            out[f"{prefix}detector_{name}"] = self.normalised(name) / threshold
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "calibration": self.calibration.as_dict(),
            # NaN (nothing seen yet) is stored as None: a state compares equal to its reload, and stays valid JSON
            "channels": {
                name: {"reference": list(s.reference), "s_pos": s.s_pos, "s_neg": s.s_neg, "value": _nan_none(s.value),
                       "baseline": _nan_none(s.baseline), "score": s.score}
                for name, s in self.states.items()
            },
            "fired": None if self.fired is None else vars(self.fired).copy(),
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, data in state.get("channels", {}).items():
            if name not in self.states:
                continue
            s = self.states[name]
            s.reference = deque((float(v) for v in data["reference"]), maxlen=CHANNELS[name].window)
            s.s_pos, s.s_neg = float(data["s_pos"]), float(data["s_neg"])
            s.value, s.baseline = _none_nan(data["value"]), _none_nan(data["baseline"])
            s.score = float(data["score"])
        fired = state.get("fired")
        self.fired = None if fired is None else DetectorFiring(**fired)


def _nan_none(x: float) -> float | None:
    return None if math.isnan(x) else x


def _none_nan(x: float | None) -> float:
    return math.nan if x is None else float(x)


def _untransform(x: float, log: bool) -> float:
    return math.exp(x) if log and math.isfinite(x) else x


def global_grad_norm(parameters: Any) -> float | None:
    """The L2 norm of all gradients of ``parameters`` together (what ``clip_grad_norm_`` returns), or None when no
    parameter has a gradient. One device-to-host copy.

    Example:
        >>> import torch
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> p.grad = torch.tensor([3.0, 4.0])
        >>> global_grad_norm([p])
        5.0
    """
    import torch

    grads = [p.grad.detach() for p in parameters if getattr(p, "grad", None) is not None]
    if not grads:
        return None
    norms = torch._foreach_norm(grads) if hasattr(torch, "_foreach_norm") else [g.norm() for g in grads]
    return float(torch.linalg.vector_norm(torch.stack([n.float() for n in norms])))


def gradient_curvature(model: Any, loss_fn: Any, optimizer: Any = None) -> dict[str, float]:
    """The loss's curvature along its own gradient on a fixed batch, ``g^T H g / ||g||^2`` (one Hessian-vector
    product), and, given the optimizer, ``curvature_ratio``: the learning rate times it over the optimizer's
    edge-of-stability level (2 for SGD, 2 + 2 beta with momentum, (2 + 2 beta1)/(1 - beta1) for Adam, where it is an
    approximation: Adam's step is preconditioned). Loss spikes come when it passes 1 (Bai et al. 2025). The model's
    buffers (batch-norm statistics) and the random state are left as they were; ``.grad`` is not touched.

    Example:
        >>> import torch
        >>> w = torch.nn.Linear(1, 1, bias=False)
        >>> _ = torch.nn.init.ones_(w.weight)
        >>> x = torch.ones(4, 1)
        >>> out = gradient_curvature(w, lambda m: 3 * m(x).pow(2).mean(), torch.optim.SGD(w.parameters(), lr=0.1))
        >>> out["grad_curvature"], round(out["curvature_ratio"], 6)
        (6.0, 0.3)
    """
    import torch

    from topo_callbacks.functional.neurons import directional_curvature, stability_threshold

    params = [p for p in model.parameters() if p.requires_grad]
    buffers = {k: b.detach().clone() for k, b in model.named_buffers()}
    devices = [p.device for p in params if p.device.type == "cuda"][:1]
    try:
        with torch.random.fork_rng(devices=devices):
            curvature = directional_curvature(lambda: loss_fn(model), params)
    finally:
        with torch.no_grad():
            for key, buffer in model.named_buffers():
                buffer.copy_(buffers[key])
    out = {"grad_curvature": curvature}
    if optimizer is not None:
        level, _ = stability_threshold(optimizer)
        out["curvature_ratio"] = float(optimizer.param_groups[0]["lr"]) * curvature / level
    return out
