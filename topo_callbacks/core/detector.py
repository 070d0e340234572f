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

import bisect
import math
import statistics
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from topo_callbacks.functional.detector import cusum_update, sorted_location_scale

__all__ = [
    "CHANNELS",
    "MAX_CONSECUTIVE_SKIPS",
    "MIN_LOSS_SCALE",
    "SCALE_DEPENDENT",
    "AlarmKind",
    "Channel",
    "CusumDetector",
    "DetectorCalibration",
    "DetectorFiring",
    "LrState",
    "default_calibration",
    "global_grad_norm",
    "grad_norms",
    "gradient_curvature",
    "loss_scale",
    "lr_event",
]

#: Per-step channels are scored against the 200 values before them, check channels against the 8 checks before
#: them; the CUSUM allowance is one robust standard deviation, and one point adds at most 8.
STEP_WINDOW = 200
CHECK_WINDOW = 8
#: A per-step channel is scored from its 21st value on, against the (growing) values before it: a run broken from
#: its first steps is not given 200 steps to teach the reference its broken state.
STEP_MIN_REFERENCE = 20
#: A strided gradient-norm read adds what the reads it stands for would (`update`) while its reference spans at most
#: this many times `STEP_WINDOW` optimizer steps; beyond (the reference keeps at least `STEP_MIN_REFERENCE` reads, 1760
#: steps at a read every 88), that share of them: the reference then lags a trend (a converging run's falling gradient
#: norm) and the lag counted several times over. Chosen on the calibration seeds' replay (checks 10x apart, gradient
#: norm every 8/16/32/88 steps: 40/37/34/19 of 47 detected, 3/1/2/2 of 160 clean runs alarmed, against 40/37/35/20 and
#: 3/1/4/13 before; at 1x `STEP_WINDOW` 35/47 at every 16 steps). Test seeds, once: 37/39/32/17 of 46, 2/3/1/0 of 158
#: (before: the same detections, 2/3/2/2 false alarms). Outside the benchmark, OneCycle read 1 step in 22 alarmed 2/4
#: healthy runs before, 0/4 after.
LAG_SPAN = 2
CHECK_MIN_REFERENCE = 4
ALLOWANCE = 1.0
CLIP = 8.0
#: The loss's second CUSUM, for large rises (a CUSUM paired with a Shewhart-like one, Lucas 1982): the loss
#: channel's own scores (same reference), with allowance 3 and up to 100 a step. Chosen on the benchmark's calibration
#: seeds (allowances 2-10, clips 20-100: most failures detected at a threshold with at most 2 healthy calibration runs
#: over it). Its fitted normaliser (32 at the default rate, since 2026-12-04) is under one step's most (97): one batch
#: far enough up alarms on its own, as Lightning's `SpikeDetection` flags one.
SPIKE_ALLOWANCE = 3.0
SPIKE_CLIP = 100.0
#: A step adds to `loss_spike` only when its loss at least triples the reference median (``loss - median >= SPIKE_RTOL
#: median``, Lightning's `SpikeDetection` default ``rtol=2``; a read of the mean of k steps: the mean; a median of 0
#: or less has no zero to be relative to and is not gated). A z-score alone made any
#: level shift of a low-noise loss a spike: a contrastive temperature change (its loss 2.1-3.2x the median for a few
#: steps, most under 3x, calibration seeds) crossed at once and set the channel's normaliser; the failures' spikes on
#: the calibration seeds are 4.6-15x (a rate 50x too high), 48-62x (labels broken) and orders of magnitude. Smaller
#: lasting rises are the loss channel's (its CUSUM needs ~10-15 steps of them). A loss with a large offset (a constant
#: added) never triples: only its loss channel and the absolute rules watch it.
SPIKE_RTOL = 2.0
#: ...and its robust scale is at least this share of the largest of the run's first `STEP_WINDOW` losses (where it
#: started; a later spike does not raise it): at a converged loss the spread of the batches can be a thousandth of
#: that, and a batch 40x the median is still a small loss (RMSprop at a loss of 0.003, a run outside the benchmark: 71
#: robust SD, 5 so floored). A loss that falls over 4 orders of magnitude (an MSE) leaves spikes under ~300x of its
#: converged value to the loss channel, those over 100x its window's largest to the extreme rule.
SPIKE_SCALE_SHARE = 0.01
#: A channel's CUSUM is held at or under ``CAP`` times its share of the threshold, so that no value, however
#: extreme, keeps the detector in alarm for longer than about ``CAP x threshold`` quiet points.
CAP = 2.0
#: An episode ends when the detector's level (its statistic over the threshold) falls under this.
END_LEVEL = 0.5
#: Extreme values alarm at once, without accumulating: a loss this many times the largest of its reference window,
#: a gradient norm this many times the largest of its, and either past every value the run has shown.
EXTREME_RATIO = {"loss": 100.0, "grad_norm": 1000.0}
#: The fast rule for abrupt breaks: the loss or the gradient norm further than these many robust standard deviations
#: from its reference (unclipped) for `ABRUPT_STEPS` steps in a row alarms at once. Set at about twice the largest
#: such 3-step departure on the benchmark's healthy calibration runs (a rise: 24 for the loss, 21 for the gradient
#: norm, both at a contrastive temperature change; a fall of the gradient norm: 3.6).
ABRUPT_UP = 50.0
ABRUPT_DOWN = 10.0
ABRUPT_STEPS = 3
#: Consecutive checks whose embeddings are collapsed to a point (std of L2-normalised rows under
#: ``COLLAPSED_STD / sqrt(d)``) or to rank 1 (effective rank under ``COLLAPSED_RANK``) before that alarms.
COLLAPSED_CHECKS = 3
COLLAPSED_STD = 1e-3  # the rows are the same vector: a network on its initial plateau reached 0.0055, healthy 0.12
COLLAPSED_RANK = 1.1
#: Optimizer steps whose gradient norm read exactly 0 before that is reported.
ZERO_GRAD_STEPS = 20
#: Steps read in a row in which some parameter tensor's gradient is exactly 0 (while the others' are not) before the
#: dead-layer rule alarms, after at least `STEP_MIN_REFERENCE` reads in a row in which every tensor had a gradient.
DEAD_LAYER_STEPS = 5
#: The loss "stays at its first values" while the median of the second half of a zero-gradient streak is within this
#: relative distance of the first half's.
LOSS_STUCK = 0.05
#: A learning-rate change by more than this factor, made by the schedule (a decay, or a return to a rate the run
#: already trained at: a warm restart), restarts the per-step channels' references.
LR_EVENT = 1.5
#: A fall to a rate under this share of the highest the run has trained at restarts nothing: the updates are then too
#: small to move the levels the references hold, and a decay to 0 (cosine, linear) would otherwise restart them every
#: few steps through its last ~5%, leaving it unscored.
LR_EVENT_FLOOR = 0.01
#: A fall of the rate fewer than this many optimizer steps after the last restart of the references (a schedule's event
#: or `CusumDetector.restart_references`) waits until then, the fall accumulating: a decay to 0 over a short run
#: brings its 1.5x falls closer together than a reference refills (`STEP_MIN_REFERENCE`), through the last ~90 steps
#: of a cosine over 300-1000 steps and ~40 of a linear decay (a short fine-tune), so nothing was scored there. Twice
#: the refill: a restarted reference refills, then scores for as long again before the next fall restarts it. A jump
#: (a warm restart) restarts at once.
LR_EVENT_GAP = 2 * STEP_MIN_REFERENCE
#: The rises of the highest rate read are kept when they add more than this factor (1%): a warm-up from 1e-6 to 1e-3
#: keeps ~700, and the highest rate before a step is known to 1% (`CusumDetector.highest_rate_before`).
LR_RISE_STEP = 1.01
#: `CusumDetector.reference_restarts` keeps the last this many.
MAX_RESTARTS_KEPT = 100
#: A loss scale under this alarms (DeepSpeed's and Megatron's ``min_loss_scale`` default): halved at every skipped
#: step, it gets there only when overflows keep coming.
MIN_LOSS_SCALE = 1.0
#: Consecutive optimizer steps a loss scaler skipped before that alarms (when the scale itself is not known).
MAX_CONSECUTIVE_SKIPS = 30
#: The floor of b0/n's robust scale, in binomial standard deviations ``sqrt(p (1 - p) / n)`` of a sample of n rows
#: (rows of one batch are not independent: twice the binomial noise).
SAMPLING_NOISE = 2.0
#: The floor of the dead-unit share's robust scale, in units of the layer: this many units (of rare firing) may fall
#: silent in one sample and fire in the next.
DEAD_UNITS = 2.0
#: The dormant-unit rule: a check whose share of dead units (0 on every sampled row: ``dead_fraction``) lies more than
#: this many robust standard deviations above the median of the checks before (at least `DEAD_RISE_REFERENCE` of the
#: last `CHECK_WINDOW`; the scale floored at `DEAD_UNITS` units of the layer) alarms at once: units fall silent faster
#: than training silences them (Sokar et al. 2023, dormant neurons; Lu et al. 2019, dying ReLU). Set from clean runs
#: only, never from a failure: twice the largest such rise on the benchmark's clean calibration runs (3.5, an
#: augmented stream early in training; every failure family's calibration seeds held out, as any would be).
DEAD_RISE = 7.0
DEAD_RISE_REFERENCE = 3
#: A change of the rows a check samples by more than this share restarts the dormant-unit rule's reference.
DEAD_ROWS_CHANGE = 0.1
#: An absolute rule's level: it starts at ``CAP`` and falls to 0 over this many optimizer steps (at least twice the
#: spacing of the observations that raised it), so its episode ends ``(CAP - END_LEVEL) / CAP`` of the way.
ABSOLUTE_HOLD = 100
#: A gradient norm that falls while the loss falls is what converging looks like, and also what a collapse of
#: self-supervised embeddings looks like (SimSiam's trivial solution; BYOL's too, whose loss falls to 0 as a
#: classifier's does): the loss and the gradient cannot tell them apart. The embeddings can: such a fall is scored
#: only once a check finds the spread of the L2-normalised rows (``std_l2``) under this share of its median over the
#: checks before, and from then on until the fall is over. On the benchmark's records the healthy runs' and the
#: failure runs' before their switch never went under 0.36 (a contrastive temperature change), SimSiam's collapse goes
#: to 0.2-0.5 at its first check after the switch.
SPREAD_FELL = 0.8
#: Checks before one whose spread can count as fallen (the overhead budget may space checks hundreds of steps apart).
SPREAD_MIN_REFERENCE = 1


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
    #: the CUSUM's allowance and the largest score one point adds
    allowance: float = ALLOWANCE
    clip: float = CLIP
    #: a channel that accumulates another channel's scores with its own allowance and clip (it is never fed itself)
    of: str | None = None
    #: a derived channel counts a value only when it is over the reference median by ``rtol`` times the median's
    #: size (as Lightning's `SpikeDetection`); None: always
    rtol: float | None = None
    #: a derived channel's robust scale is at least this share of the largest value the run has shown; None: no floor
    scale_share: float | None = None
    #: offered to the fit of the shipped detector (`topo_callbacks.bench.cusum.DEFAULT_CANDIDATES`); a channel that is
    #: logged and measured but lost that place on runs outside the benchmark is not
    default_fit: bool = True

    @property
    def window(self) -> int:
        return STEP_WINDOW if self.reads == "step" else CHECK_WINDOW

    @property
    def min_reference(self) -> int:
        return STEP_MIN_REFERENCE if self.reads == "step" else CHECK_MIN_REFERENCE


CHANNELS: dict[str, Channel] = {
    c.name: c
    for c in (
        Channel("loss", "step", "up", False, 1e-3, "training loss against its median over the last 200 steps"),
        Channel("loss_spike", "step", "up", False, 1e-3,
                "the loss channel's scores accumulated for large rises only (allowance 3, at most 100 a step, a loss at"
                " least 3x a positive median)",
                allowance=SPIKE_ALLOWANCE, clip=SPIKE_CLIP, of="loss", rtol=SPIKE_RTOL,
                scale_share=SPIKE_SCALE_SHARE),
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
        # the fit on every family picks it (it catches dead_units on the calibration seeds) but held out it detects
        # nothing more, and a healthy CNN checked every 5 steps alarmed on it in early training (its silent share
        # drifts 0.27 -> 0.47 in 60 steps): logged and measured, not in the default
        Channel("dead_fraction", "check", "up", False, 0.01,
                "share of the watched layer's units that are 0 on every sampled row (dead ReLU units)",
                default_fit=False),
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


class AlarmKind(str, Enum):
    """Why an episode started: a channel's CUSUM reached the threshold, or an absolute rule (no reference needed)."""

    CUSUM = "cusum"
    NONFINITE = "nonfinite"
    EXTREME = "extreme"
    ABRUPT = "abrupt"
    COLLAPSED = "collapsed"
    NO_GRADIENT = "no_gradient"
    LOSS_SCALE = "loss_scale"
    DEAD_LAYER = "dead_layer"
    DORMANT = "dormant"


@dataclass(frozen=True)
class DetectorFiring:
    """Why the detector alarmed: the channel, its value, its baseline (reference median), its standardised score,
    and its normalised CUSUM against the threshold; ``kind`` says which rule fired, ``detail`` says more for an
    absolute rule."""

    step: int
    channel: str
    value: float
    baseline: float
    score: float
    statistic: float
    threshold: float
    kind: str = AlarmKind.CUSUM.value
    detail: str = ""
    #: the estimated first step of the change: for a CUSUM, the step after its accumulator last stood at 0 (the
    #: change point); for an abrupt break, the first step of the streak; else the step of the alarm
    onset: int | None = None

    def message(self, prefix: str = "collapse") -> str:
        if self.kind != AlarmKind.CUSUM.value:
            return f"{prefix}/detector alarmed at step {self.step} on `{self.channel}` ({self.kind}): {self.detail}"
        spec = CHANNELS[self.channel]
        scale = " (log scale)" if spec.log else ""
        return (
            f"{prefix}/detector alarmed at step {self.step} on `{self.channel}`: value {self.value:.4g}, baseline"
            f" {self.baseline:.4g} (median of the last {spec.window} {spec.reads}s), standardised score"
            f" {self.score:+.2f}{scale}; normalised CUSUM {self.statistic:.2f} >= threshold {self.threshold:.2f}"
            + ("." if self.onset is None or self.onset >= self.step else f"; its rise began at step {self.onset}.")
        )


class ReferenceWindow:
    """The last ``maxlen`` values of a channel, in arrival order and kept sorted beside it, so that the robust
    location and scale the detector needs at every optimizer step cost a merge of half the window, not a sort.

    Example:
        >>> window = ReferenceWindow([3.0, 1.0, 2.0], maxlen=3)
        >>> window.append(10.0)  # 3.0 leaves
        >>> list(window), window.max(), window.location_scale(floor=0.0)
        ([1.0, 2.0, 10.0], 10.0, (2.0, 1.4826))
    """

    def __init__(self, values: Iterable[float] = (), maxlen: int = 200) -> None:
        self.maxlen = maxlen
        self._order: deque[float] = deque(maxlen=maxlen)
        self._sorted: list[float] = []
        for value in values:
            self.append(value)

    def append(self, value: float) -> None:
        if len(self._order) == self.maxlen:
            oldest = self._order[0]
            del self._sorted[bisect.bisect_left(self._sorted, oldest)]
        self._order.append(value)
        bisect.insort(self._sorted, value)

    def clear(self) -> None:
        self._order.clear()
        self._sorted.clear()

    def __len__(self) -> int:
        return len(self._order)

    def __iter__(self) -> Iterator[float]:
        return iter(self._order)

    def max(self) -> float:
        return self._sorted[-1]

    def location_scale(self, floor: float) -> tuple[float, float]:
        """Median and ``1.4826 x`` MAD (floored), as `robust_location_scale` computes them."""
        return sorted_location_scale(self._sorted, floor)


@dataclass
class _ChannelState:
    reference: ReferenceWindow
    s_pos: float = 0.0
    s_neg: float = 0.0
    value: float = math.nan
    baseline: float = math.nan
    score: float = 0.0
    #: the step of the last value scored (the gradient-norm channel reads the loss's score of the same step)
    step: int = -1
    #: consecutive reads past the fast rule's limits, up and down, and the step after the last read before them (a read
    #: may stand for several optimizer steps: the onset is a step, not a count back)
    up: int = 0
    down: int = 0
    streak_start: int = -1
    #: the last step (or check's step) at which the channel's CUSUM stood at 0: the change point of an alarm on it
    zero_step: int = 0
    #: the largest value fed (on the channel's scale), kept when the reference restarts
    peak: float = -math.inf
    #: the largest of the first `STEP_WINDOW` (or `CHECK_WINDOW`) values fed, and how many were fed up to that many:
    #: the run's starting scale, which a later spike does not raise
    early_peak: float = -math.inf
    fed: int = 0

    def statistic(self, side: str) -> float:
        return max(self.s_pos, self.s_neg) if side == "both" else (self.s_pos if side == "up" else self.s_neg)


#: Check channels read at the calibrated Vietoris-Rips scale: fed once the scale is held (the others from the first
#: check).
SCALE_DEPENDENT = ("b0_fraction", "b1_fraction")

_LOG_TWO = math.log(2.0)

#: Channels every detector keeps a reference for, calibrated or not: the absolute rules read them.
_ALWAYS = ("loss", "grad_norm")


@dataclass
class CusumDetector:
    """Online detector: feed channel values with `update` (and `observe_lr`, `observe_embedding`,
    `absolute_event`); it returns a `DetectorFiring` when an alarm episode starts.

    Two kinds of rules raise an episode. A calibrated channel's CUSUM (against the channel's own recent past) reaching
    the threshold; or an absolute rule that needs no reference: a non-finite loss or gradient norm, an extreme value
    (`EXTREME_RATIO` times the largest of the reference), embeddings collapsed to a point or to rank 1 for
    `COLLAPSED_CHECKS` checks, a gradient norm of 0 for `ZERO_GRAD_STEPS` steps while the loss stays at its first
    values, and whatever the monitor reports (a loss scale that keeps falling). No accumulator ever exceeds `CAP`
    times the threshold and non-finite values never enter one, so the detector's `level` stays finite, falls back
    when the cause goes, and the episode ends under `END_LEVEL`; the next crossing is a new episode (`episodes`).

    Example:
        >>> cal = DetectorCalibration(0.05, ("b0_fraction",), {"b0_fraction": 2.0}, 1.0)
        >>> det = CusumDetector(cal)
        >>> fired = [det.update("b0_fraction", v, step) for step, v in enumerate([0.5, 0.51, 0.49, 0.5, 0.5, 0.2])]
        >>> fired[-1].channel, fired[-1].step, fired[:-1] == [None] * 5
        ('b0_fraction', 5, True)
        >>> det.update("loss", float("nan"), 6) is None  # in the open episode already: no second firing
        True
        >>> CusumDetector(cal).update("loss", float("nan"), 1).kind  # absolute: whatever the calibration's channels
        'nonfinite'
        >>> len(det.episodes), det.level()  # finite: at most CAP
        (1, 2.0)
    """

    calibration: DetectorCalibration
    states: dict[str, _ChannelState] = field(default_factory=dict)
    fired: DetectorFiring | None = None
    #: one dict per alarm episode: ``start``, ``end`` (None while open), ``channel``, ``kind``, ``peak`` (the largest
    #: level, in threshold units), ``message``
    episodes: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in (*self.calibration.channels, *_ALWAYS):
            self.states.setdefault(name, _ChannelState(ReferenceWindow(maxlen=CHANNELS[name].window)))
        self._calibrated = frozenset(self.calibration.channels)
        self._caps = {name: self._cap(name) for name in self.calibration.channels}
        # a CUSUM under this cannot have reached the threshold (`_crossed` decides; the margin covers the rounding
        # of ``statistic / normaliser >= threshold`` against ``statistic >= threshold x normaliser``)
        self._limits = {
            name: self.calibration.threshold * self.calibration.normalisers[name] * (1.0 - 1e-9)
            for name in self.calibration.channels
        }
        #: calibrated channels that accumulate another channel's scores, by the channel they read
        self._derived: dict[str, tuple[str, ...]] = {}
        for name in self.calibration.channels:
            source = CHANNELS[name].of
            if source is not None:
                self._derived[source] = (*self._derived.get(source, ()), name)
        #: optimizer steps whose update a loss scaler skipped, and how many of the last ones in a row
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self._absolute_step = -1
        self._absolute_hold = ABSOLUTE_HOLD
        self._step = 0
        self._collapsed_checks = 0
        self._zero_grad_steps = 0
        #: reads in a row in which every parameter tensor had a gradient (the dead-layer rule's reference), and in
        #: which some tensor's gradient was exactly 0
        self._gradient_steps = 0
        self._lost_steps = 0
        self._lost_since = -1
        self._layer_read = -1
        self._lr_reference: float | None = None
        self._lr_previous: float | None = None
        self._lr_max = 0.0
        #: ``[step, rate]`` each time the rate read passed every rate before it by more than `LR_RISE_STEP` (a
        #: warm-up adds at most a few hundred): the highest rate read before a step, for `highest_rate_before`
        self._lr_rises: list[list[float]] = []
        #: ``[step, why]`` for each restart of the references (`restart_references`): ``"lr"`` at a schedule's event,
        #: ``"told"`` when the user said so; the last `MAX_RESTARTS_KEPT`
        self.reference_restarts: list[list[Any]] = []
        #: ``std_l2`` of the last checks, and whether the embeddings' spread has fallen (`SPREAD_FELL`) since the
        #: gradient norm's downward CUSUM last stood at 0
        self._spread: deque[float] = deque(maxlen=CHECK_WINDOW)
        self._spread_fell = False
        #: the dead-unit share of the last checks (the dormant-unit rule's reference), the rows they sampled and the
        #: step of the last one (a unit counts as dead when 0 on every sampled row: fewer rows, more such units)
        self._dead: deque[float] = deque(maxlen=CHECK_WINDOW)
        self._dead_rows = 0.0
        self._dead_step = 0
        #: the gradient norm's downward CUSUM with no fall held back (`SPREAD_FELL`), and the last step it stood at 0
        self._fall = 0.0
        self._fall_peak = 0.0
        #: the share of the reads a strided gradient-norm read stands for that it adds (`set_step_window`)
        self._grad_lag = 1.0
        self._fall_zero_step = 0
        #: how many times the threshold the held-back fall had reached at the last check (`wants_check`)
        self._fall_checked = 0
        #: messages about how the detector is fed (said once each by the monitor); keys name the problem
        self.notes: dict[str, str] = {}

    @property
    def channels(self) -> tuple[str, ...]:
        return self.calibration.channels

    @property
    def in_alarm(self) -> bool:
        """Whether an episode is open."""
        return bool(self.episodes) and self.episodes[-1]["end"] is None

    def _cap(self, name: str) -> float:
        return CAP * self.calibration.threshold * self.calibration.normalisers.get(name, math.inf)

    def normalised(self, name: str) -> float:
        """Channel ``name``'s CUSUM over its normaliser (the share of the threshold it has reached, times h)."""
        state = self.states[name]
        return state.statistic(CHANNELS[name].side) / self.calibration.normalisers[name]

    def statistic(self) -> float:
        """The fused CUSUM statistic: the largest normalised CUSUM over the calibrated channels."""
        return max((self.normalised(c) for c in self.channels), default=0.0)

    def absolute_level(self, step: int | None = None) -> float:
        """The level of the last absolute rule that fired: `CAP` when it fired, falling linearly to 0."""
        if self._absolute_step < 0:
            return 0.0
        since = (self._step if step is None else step) - self._absolute_step
        return max(0.0, CAP * (1.0 - since / self._absolute_hold))

    def level(self, step: int | None = None) -> float:
        """The detector's level in threshold units (it alarms at 1): the fused CUSUM statistic over the threshold, or
        the level of a recent absolute rule, whichever is higher. Always finite, at most `CAP`."""
        return max(self.statistic() / self.calibration.threshold, self.absolute_level(step))

    # ----------------------------------------------------------------------------------------- feeding
    def update(
        self, name: str, value: float, step: int, floor: float | None = None, steps: int = 1
    ) -> DetectorFiring | None:
        """Feed one value of channel ``name`` at optimizer step ``step``; returns the firing when an episode starts.

        A channel the calibration does not use is only read by the absolute rules (the loss and the gradient norm).
        ``floor`` raises the floor of the channel's robust scale for this value (a sampled channel's own noise).
        ``steps``: the loss given is the mean of this many optimizer steps (an overhead budget that reads every k-th
        step only; its reference holds such means, whose spread is ``1 / sqrt(k)`` of a step's). Its CUSUMs then add
        what that many reads would: ``k (min(z / sqrt(k), clip) - allowance)``, the sum of the steps' own scores
        when they rose alike (``z / sqrt(k)`` is their mean), and per read at most half the threshold (or a one-step
        read's most, ``clip - allowance``, where that is more): in a mean, one outlier batch and a lasting rise look
        alike, so where half the threshold is the more, two reads in a row must agree (`loss_spike`'s shipped
        normaliser, 32, is under one read's most, 97: there its tripling rule asks the mean itself to triple). Read at
        one step of the k, the gradient norm is a sample of them and counts as one read. Replayed on the benchmark
        (shipped calibration, test seeds, reading 1 step in 2, 4 and 8 with every check): 38, 36 and 35 of the 46
        failure runs that every step detects 42 of, with 2, 1 and 1 of 158 clean runs alarmed; one read's worth
        detected 36, 24 and 23 (of 41), with none.
        """
        state = self.states.get(name)
        spec = CHANNELS[name]
        if state is None or spec.of is not None:  # a derived channel is fed by the channel it reads
            return None
        if name == "grad_norm":
            grad_steps, steps = steps, 1
            if grad_steps > 1 and self._grad_lag < 1.0:
                grad_steps = max(1, int(grad_steps * self._grad_lag))
        else:
            grad_steps = 1
            if name != "loss":
                steps = 1  # only the loss is fed as the mean of the steps a read stands for
        # written out (no helper calls on the common path): this runs for two or three channels at every optimizer
        # step, and on a small model the monitor's per-step work is most of its cost
        if step > self._step:
            self._step = step
        value = float(value)
        state.value = value
        if not math.isfinite(value):
            if name not in _ALWAYS:  # a check's value that could not be computed: no evidence either way
                return None
            return self.absolute_event(step, name, value, AlarmKind.NONFINITE,
                                       f"the {spec.description.split(' against')[0]} is {value}.")  # fmt: skip
        fired = None
        if name == "grad_norm":
            if value == 0.0:
                fired = self._zero_gradient(step)
                self._close(step)
                return fired
            self._zero_grad_steps = 0
        log = spec.log
        x = (math.log(value) if value > 0 else -math.inf) if log else value
        reference = state.reference
        enough = len(reference) >= (STEP_MIN_REFERENCE if spec.reads == "step" else CHECK_MIN_REFERENCE)
        ratio = EXTREME_RATIO.get(name)
        if ratio is not None and enough:
            top = reference.max()
            # and past every value the run has shown (its first losses included): a converged loss near 0 whose hard
            # batch is 100x the window's largest is not extreme
            far = x > top + (math.log(ratio) if log else (ratio - 1.0) * abs(top)) and x > state.peak
            if far and (log or top != 0.0):
                largest = _untransform(top, log)
                fired = self.absolute_event(step, name, value, AlarmKind.EXTREME,
                                            f"value {value:.4g} is over {ratio:g}x the largest of its last"
                                            f" {len(reference)} values ({largest:.4g}).")  # fmt: skip
        calibrated = name in self._calibrated
        always = name in _ALWAYS
        scored = enough and (calibrated or always)
        raw = mean = 0.0
        if scored:
            med, scale = reference.location_scale(max(spec.floor, floor or 0.0))
            state.baseline = _untransform(med, log)
            raw = (x - med) / scale
            # a mean loss of ``steps`` steps: the mean of their own scores, clipped and weighted as they would be
            mean = raw / math.sqrt(steps) if steps > 1 else raw
            clip = spec.clip
            state.score = -clip if raw < -clip else (clip if raw > clip else raw)
            if always:
                fired = self._abrupt(step, name, value, raw, state) or fired
            if calibrated:
                z = state.score
                if name == "grad_norm":
                    loss = self.states["loss"]
                    if z > 0.0 and loss.step == step and loss.score < -ALLOWANCE:
                        z = 0.0  # a gradient norm that rises while the loss falls: learning, leaving a plateau
                    # the downward CUSUM as if no fall were held back: what a later check's contraction brings in
                    down = -z - spec.allowance
                    if grad_steps > 1:  # what the reads it stands for would bring, as `_accumulate` counts them
                        down = min(grad_steps * down, self._most_per_read(name))
                    fall = self._fall + down
                    if fall <= 0.0:
                        fall, self._fall_peak, self._fall_zero_step, self._fall_checked = 0.0, 0.0, step, 0
                    self._fall = min(fall, self._caps[name])
                    self._fall_peak = max(self._fall_peak, self._fall)
                    if z < 0.0 and loss.s_neg > 0.0 and not self._spread_fell:
                        z = 0.0  # falls while the loss falls, embeddings as spread as before: converging, so far
                if steps > 1:
                    z = -clip if mean < -clip else (clip if mean > clip else mean)
                self._accumulate(name, state, z, steps if grad_steps == 1 else grad_steps)
        if state.statistic(spec.side) == 0.0:
            state.zero_step = step
        state.step = step
        reference.append(x)
        shown = state.early_peak  # the largest of the first values, before this one
        if state.fed < spec.window:
            state.fed += 1
            if x > state.early_peak:
                state.early_peak = x
        if x > state.peak:
            state.peak = x
        limit = self._limits.get(name, math.inf)
        if calibrated and (state.s_pos >= limit or state.s_neg >= limit) and not self.in_alarm:
            fired = self._crossed(name, step, value, state) or fired
        for derived in self._derived.get(name, ()):
            d_state = self.states[derived]
            d_spec = CHANNELS[derived]
            if scored:
                d_state.baseline = state.baseline
                d_clip = d_spec.clip
                d_raw, d_mean = raw, mean
                share = d_spec.scale_share
                if share is not None and shown > 0.0:
                    # a step's scale floored at ``share`` of the largest of the run's first losses; a mean of k steps',
                    # whose spread is 1 / sqrt(k) of a step's, at that over sqrt(k)
                    least = share * shown / (math.sqrt(steps) if steps > 1 else 1.0)
                    if scale < least:
                        d_raw = (x - med) / least
                        d_mean = d_raw / math.sqrt(steps) if steps > 1 else d_raw
                d_state.score = -d_clip if d_raw < -d_clip else (d_clip if d_raw > d_clip else d_raw)
                d_z = d_state.score if steps == 1 else (-d_clip if d_mean < -d_clip else min(d_mean, d_clip))
                d_rtol = d_spec.rtol
                # a mean of k steps must itself triple (in a mean one outlier batch and a lasting rise look alike;
                # gating the k steps' rise in all instead alarmed 5-6 of 160 clean calibration runs read 1 step in
                # 2-8, against 1-3, with the same detections). Only a positive loss has a zero to be relative to: a
                # negative one (a negative cosine, a loss plus a reward) is gated by its z alone
                if d_rtol is not None and d_z > 0.0 and med > 0.0 and x - med < d_rtol * med:
                    d_z = 0.0  # up, but not by the relative tolerance: no evidence of a spike
                self._accumulate(derived, d_state, d_z, steps)
            if d_state.statistic(d_spec.side) == 0.0:
                d_state.zero_step = step
            d_state.step, d_state.value = step, value
            limit = self._limits[derived]
            if (d_state.s_pos >= limit or d_state.s_neg >= limit) and not self.in_alarm:
                fired = self._crossed(derived, step, value, d_state) or fired
        if self.episodes and self.episodes[-1]["end"] is None:
            self._close(step)
        return fired

    def _accumulate(self, name: str, state: _ChannelState, z: float, steps: int = 1) -> None:
        cap = self._caps[name]
        if steps > 1 and math.isfinite(z):
            # a read standing for ``steps`` optimizer steps (`update`): what they would add, at most half the threshold
            # (or what one read adds at most, where that is more: never less than a read of one step)
            k = CHANNELS[name].allowance
            most = self._most_per_read(name)
            up, down = steps * (z - k), steps * (-z - k)
            s_pos = state.s_pos + (up if up < most else most)
            s_neg = state.s_neg + (down if down < most else most)
            s_pos = s_pos if s_pos > 0.0 else 0.0
            s_neg = s_neg if s_neg > 0.0 else 0.0
        elif math.isfinite(z):  # `cusum_update` written out (the per-step path)
            k = CHANNELS[name].allowance
            s_pos, s_neg = state.s_pos + z - k, state.s_neg - z - k
            s_pos = s_pos if s_pos > 0.0 else 0.0
            s_neg = s_neg if s_neg > 0.0 else 0.0
        else:
            s_pos, s_neg = cusum_update(state.s_pos, state.s_neg, z, CHANNELS[name].allowance)
        state.s_pos = s_pos if s_pos < cap else cap
        state.s_neg = s_neg if s_neg < cap else cap

    def _most_per_read(self, name: str) -> float:
        """What one read standing for several steps adds to a CUSUM at most: half the threshold, or a one-step read's
        most (``clip - allowance``) where that is more."""
        spec = CHANNELS[name]
        return max(0.5 * self._limits[name], spec.clip - spec.allowance)

    def _crossed(self, name: str, step: int, value: float, state: _ChannelState) -> DetectorFiring | None:
        """The firing when calibrated channel ``name``'s CUSUM reached the threshold outside an episode."""
        if name not in self.channels or self.in_alarm:
            return None
        stat = self.normalised(name)
        if stat < self.calibration.threshold:
            return None
        onset = min(state.zero_step + 1, step)
        threshold = self.calibration.threshold
        return self._start(DetectorFiring(step, name, value, state.baseline, state.score, stat, threshold, onset=onset))

    def observe_step(
        self,
        step: int,
        values: dict[str, float],
        *,
        lr: float | None = None,
        skipped: bool = False,
        loss_scale: float | None = None,
        layer_lost: bool | None = None,
        read_steps: int = 1,
        grad_steps: int = 1,
    ) -> DetectorFiring | None:
        """One optimizer step's per-step channel values (the loss first: the gradient norm reads its score); what
        `topo_callbacks.core.CollapseMonitorCore.observe_step` calls after averaging them over ranks, and what the
        benchmark replays. A step a loss scaler skipped feeds nothing but a non-finite loss, and is counted; a loss
        scale under `MIN_LOSS_SCALE`, or `MAX_CONSECUTIVE_SKIPS` skipped steps in a row, alarm. ``layer_lost``: some
        parameter tensor's gradient is exactly 0 at this step while the global norm is not (None: not known); for
        `DEAD_LAYER_STEPS` steps in a row, after `STEP_MIN_REFERENCE` in which every tensor had one, it alarms: a
        layer that stopped passing gradient (its units dead, or its output constant). ``read_steps``: the loss given
        is the mean of this many optimizer steps, this one and those not read since the last read (`update`'s
        ``steps``)."""
        fired = None
        if lr is not None:
            self.observe_lr(step, lr)
        if skipped:
            self.skipped_steps += 1
            self.consecutive_skips += 1
            low = loss_scale is not None and loss_scale < MIN_LOSS_SCALE
            if low or self.consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
                detail = (
                    f"the loss scaler skipped {self.consecutive_skips} optimizer step(s) in a row"
                    + ("" if loss_scale is None else f" and its scale fell to {loss_scale:.4g}")
                    + ": the gradients overflow whatever the scale (a diverging run, or values beyond fp16's range)."
                )
                value = math.nan if loss_scale is None else loss_scale
                fired = self.absolute_event(step, "loss_scale", value, AlarmKind.LOSS_SCALE, detail)
            loss = values.get("loss")
            if loss is not None and not math.isfinite(loss):
                fired = self.update("loss", loss, step) or fired
            self._close(step)
            return fired
        self.consecutive_skips = 0
        if layer_lost is not None and values.get("grad_norm"):
            fired = self._layer_gradient(step, bool(layer_lost))
        for name in _ALWAYS:  # the loss first: the gradient norm reads its score
            if name in values:
                fired = self.update(name, values[name], step,
                                    steps=read_steps if name == "loss" else grad_steps) or fired  # fmt: skip
        for name, value in values.items():
            if name not in _ALWAYS:
                fired = self.update(name, value, step) or fired
        return fired

    def urgent(self, values: dict[str, float]) -> bool:
        """Whether a per-step value must be scored at once rather than with the next batch of steps (a monitor that
        reads the CPU's values in batches to save time): a non-finite or zero value, or one over twice the largest of
        its reference (where the extreme rule and the fast rule act). Costs a few comparisons.

        Example:
            >>> det = CusumDetector(default_calibration(0.05))
            >>> _ = [det.observe_step(s, {"loss": 1.0, "grad_norm": 1.0}) for s in range(1, 30)]
            >>> det.urgent({"loss": 1.5, "grad_norm": 1.2}), det.urgent({"loss": 5.0}), det.urgent({"loss": math.nan})
            (False, True, True)
        """
        for name, value in values.items():
            if not math.isfinite(value) or value == 0.0:
                return True
            state = self.states.get(name)
            if state is None or not len(state.reference):
                continue
            top = state.reference.max()
            if CHANNELS[name].log:
                if value > 0.0 and math.log(value) > top + _LOG_TWO:
                    return True
            elif value > 2.0 * top and top > 0.0:
                return True
        return False

    def urgent_above(self) -> tuple[float, float]:
        """`urgent` as two numbers to compare with, for a caller that checks every step: whatever `urgent` flags
        is not strictly between ``-inf`` and the number returned for it, or is 0 (a value at the bound may be flagged
        too: that changes when it is scored, never what). The numbers hold until the next value is fed or the
        references change (`set_step_window`, `load_state_dict`).

        Example:
            >>> det = CusumDetector(default_calibration(0.05))
            >>> _ = [det.observe_step(s, {"loss": 1.0, "grad_norm": 1.0}) for s in range(1, 30)]
            >>> det.urgent_above()
            (2.0, 2.0)
        """
        out = []
        for name in _ALWAYS:
            state = self.states.get(name)
            if state is None or not len(state.reference):
                out.append(math.inf)
                continue
            top = state.reference.max()
            if CHANNELS[name].log:
                out.append(2.0 * math.exp(top) if top < 700.0 else math.inf)
            else:
                out.append(2.0 * top if top > 0.0 else math.inf)
        return out[0], out[1]

    def observe_check(
        self, step: int, values: dict[str, float], *, calibrating: bool, hold: int = ABSOLUTE_HOLD
    ) -> DetectorFiring | None:
        """One check's channel values (a `CollapseReport`'s, ``b1_fraction`` and any probe channels): the absolute
        collapse rule and the channels that do not depend on the Vietoris-Rips scale from the first check, the Betti
        channels (`SCALE_DEPENDENT`) once the scale is held (``calibrating`` False)."""
        limit = self._limits.get("grad_norm")
        if limit is not None:  # never lowered until the fall ends: a fall hovering at the threshold pulls once
            self._fall_checked = max(self._fall_checked, int(self._fall // limit))
        fired = self.observe_embedding(
            step,
            std_l2=float(values.get("std_l2", math.nan)),
            d=int(values.get("d", 0)),
            effective_rank=float(values.get("effective_rank", math.nan)),
            hold=hold,
        )
        n = values.get("n", 0.0)
        fired = self._dead_rise(step, values.get("dead_fraction"), int(values.get("d", 0)), float(n), hold) or fired
        for name in self.channels:
            if CHANNELS[name].reads == "check" and name in values and not (calibrating and name in SCALE_DEPENDENT):
                floor = None
                if name == "dead_fraction" and values.get("d", 0.0) > 0:
                    floor = DEAD_UNITS / values["d"]  # a unit or two that fire rarely are silent in some samples
                if name == "b0_fraction" and n > 0:
                    # b0/n of a sample of n rows: at least a binomial proportion's sampling noise around its median
                    p = min(max(statistics.median(self.states[name].reference or [0.5]), 1.0 / n), 1.0 - 1.0 / n)
                    floor = SAMPLING_NOISE * math.sqrt(p * (1.0 - p) / n)
                fired = self.update(name, float(values[name]), step, floor) or fired
        self._close(step)
        return fired

    def wants_check(self) -> bool:
        """Whether the next check would decide an alarm that only a check can: the gradient norm's fall, held back
        until the embeddings confirm it (`SPREAD_FELL`), has reached the threshold (or another multiple of it since
        the last check), or the last check's embeddings were collapsed (`COLLAPSED_CHECKS` in a row alarm). A monitor
        whose overhead budget spaces its checks out brings the next one forward then.

        Example:
            >>> det = CusumDetector(default_calibration(0.05))
            >>> det.wants_check()
            False
        """
        if self.in_alarm:
            return False
        if 0 < self._collapsed_checks < COLLAPSED_CHECKS:
            return True
        limit = self._limits.get("grad_norm")
        return limit is not None and not self._spread_fell and self._fall >= limit * (self._fall_checked + 1)

    def _abrupt(self, step: int, name: str, value: float, raw: float, state: _ChannelState) -> DetectorFiring | None:
        """The fast rule: `ABRUPT_STEPS` steps in a row further than `ABRUPT_UP` (a rise of the loss or the
        gradient norm) or `ABRUPT_DOWN` (a fall of the gradient norm) robust standard deviations from the reference.
        A rise of the gradient norm at a step whose loss falls is learning (leaving a plateau), as for the CUSUM."""
        loss = self.states["loss"]
        learning = name == "grad_norm" and loss.step == step and loss.score < -ALLOWANCE
        state.up = state.up + 1 if raw >= ABRUPT_UP and not learning else 0
        state.down = state.down + 1 if name == "grad_norm" and raw <= -ABRUPT_DOWN else 0
        if state.up == 1 or state.down == 1:  # (a value is past one limit at most)
            # from the step after the last read not past it: a read may stand for steps not read
            state.streak_start = state.step + 1 if 0 <= state.step < step else step
        if ABRUPT_STEPS not in (state.up, state.down):
            return None
        way, limit = ("risen", ABRUPT_UP) if state.up == ABRUPT_STEPS else ("fallen", ABRUPT_DOWN)
        onset = state.streak_start if 0 <= state.streak_start <= step else step - ABRUPT_STEPS + 1
        scale = " (log scale)" if CHANNELS[name].log else ""
        detail = (
            f"it has {way} more than {limit:g} robust standard deviations{scale} from its baseline"
            f" {state.baseline:.4g} for {ABRUPT_STEPS} reads in a row, from step {onset} (now {value:.4g})."
        )
        return self.absolute_event(step, name, value, AlarmKind.ABRUPT, detail, onset=onset)

    def observe_units(
        self, step: int, dead_fraction: float, *, d: int, n: int, hold: int = ABSOLUTE_HOLD
    ) -> DetectorFiring | None:
        """The share of the watched layer's ``d`` units that are 0 on every one of ``n`` sampled rows, seen between two
        checks: the dormant-unit rule alone (`DEAD_RISE`), as a check feeds it (`observe_check`), so that a monitor
        whose overhead budget spaces its checks out still compares each interval with the ones before.

        Example:
            >>> det = CusumDetector(default_calibration(0.05))
            >>> [det.observe_units(s, 0.05, d=64, n=256) for s in (25, 50, 75)]
            [None, None, None]
            >>> fired = det.observe_units(100, 0.5, d=64, n=256)  # a third of the layer fell silent at once
            >>> fired.channel, fired.kind, fired.onset
            ('dead_fraction', 'dormant', 76)
        """
        # no episode is closed here: episodes end where they did without unit checks (at reads and checks), so that a
        # failure the per-step rules keep raising at a stride does not become one episode per interval
        return self._dead_rise(step, float(dead_fraction), int(d), float(n), hold)

    def _dead_rise(self, step: int, dead: float | None, d: int, rows: float, hold: int) -> DetectorFiring | None:
        """The dormant-unit rule (`DEAD_RISE`): a check's dead-unit share far above the checks before, on samples
        of about as many rows (the overhead budget may lower the sample: the reference starts again)."""
        if dead is None or d <= 0 or not math.isfinite(dead):
            return None
        if self._dead_rows > 0 and abs(rows - self._dead_rows) > DEAD_ROWS_CHANGE * self._dead_rows:
            self._dead.clear()
        reference, previous = sorted(self._dead), self._dead_step  # the checks before this one
        self._dead.append(float(dead))
        self._dead_rows, self._dead_step = rows, step
        if len(reference) < DEAD_RISE_REFERENCE:
            return None
        baseline, scale = sorted_location_scale(reference, DEAD_UNITS / d)
        z = (dead - baseline) / scale
        if z < DEAD_RISE:
            return None
        detail = (
            f"{dead:.0%} of the layer's {d} units are 0 on every sampled row, against {baseline:.0%} over the last"
            f" {len(reference)} checks ({z:.3g} robust standard deviations): units are going dormant (a learning"
            " rate too high, a regulariser or a shift of the data pushing pre-activations under 0)."
        )
        # the units fell silent after the check before: that is the change point a rollback must go back past
        return self.absolute_event(step, "dead_fraction", dead, AlarmKind.DORMANT, detail, hold, onset=previous + 1)

    def absolute_event(self, step: int, channel: str, value: float, kind: AlarmKind | str, detail: str,
                       hold: int = ABSOLUTE_HOLD, onset: int | None = None) -> DetectorFiring | None:  # fmt: skip
        """An absolute rule fired at ``step`` (the monitor's own rules come here too): the level goes to `CAP` and
        falls back over ``hold`` steps; returns the firing when this starts an episode."""
        self._step = max(self._step, step)
        self._absolute_step, self._absolute_hold = step, max(int(hold), 1)
        kind = AlarmKind(kind).value
        if self.in_alarm:
            self._touch(step)
            return None
        return self._start(DetectorFiring(step, channel, float(value), math.nan, math.nan, math.inf,
                                          self.calibration.threshold, kind, detail,
                                          onset=step if onset is None else onset))  # fmt: skip

    def observe_embedding(self, step: int, *, std_l2: float, d: int, effective_rank: float,
                          hold: int = ABSOLUTE_HOLD) -> DetectorFiring | None:  # fmt: skip
        """A check's embeddings, for the absolute rule on a collapse to a point or to rank 1 (from the first check,
        the scale's calibration included): `COLLAPSED_CHECKS` such checks in a row alarm, and each one after keeps
        the episode open."""
        if math.isfinite(std_l2) and std_l2 > 0.0:
            spread = self._spread
            fell = len(spread) >= SPREAD_MIN_REFERENCE and std_l2 < SPREAD_FELL * statistics.median(spread)
            grad = self.states["grad_norm"]
            if fell and not self._spread_fell and self._fall_peak > grad.s_neg:
                # the falls held back while the embeddings kept their spread count from where they began, as far as
                # they went (checks spaced by the overhead budget come long after; the reference has caught up since)
                grad.s_neg, grad.zero_step = self._fall_peak, min(grad.zero_step, self._fall_zero_step)
            self._spread_fell = fell or (self._spread_fell and grad.s_neg > 0.0)
            spread.append(std_l2)
        point = math.isfinite(std_l2) and std_l2 * math.sqrt(max(d, 1)) < COLLAPSED_STD
        rank_one = math.isfinite(effective_rank) and effective_rank < COLLAPSED_RANK
        self._collapsed_checks = self._collapsed_checks + 1 if point or rank_one else 0
        if self._collapsed_checks < COLLAPSED_CHECKS:
            self._close(step)
            return None
        what = "all rows point the same way" if point else "they span one direction"
        detail = (
            f"the embeddings have been collapsed for {self._collapsed_checks} checks: {what} (std of L2-normalised"
            f" rows {std_l2:.3g} over width {d}, effective rank {effective_rank:.3g})."
        )
        return self.absolute_event(step, "embeddings", effective_rank, AlarmKind.COLLAPSED, detail, hold)

    def set_step_window(self, stride: int, grad_stride: int = 1) -> None:
        """The per-step channels read at every ``stride``-th optimizer step (the gradient norm at every
        ``stride x grad_stride``-th): their references keep the last ``STEP_WINDOW // stride`` values (the gradient
        norm's ``STEP_WINDOW // (stride x grad_stride)``; at least `STEP_MIN_REFERENCE`), about as many optimizer steps
        as a monitor reading every step keeps, so that a trend (a warm-up, a decay) leaves them no further behind.
        Costs two comparisons when the lengths are already those (a loaded or restored state comes back with
        `STEP_WINDOW`). A read's loss, the mean of the steps it stands for, is weighted by their number where it is
        fed (`update`'s ``steps``)."""
        stride = max(int(stride), 1)
        reads = max(STEP_WINDOW // stride, STEP_MIN_REFERENCE)
        grad_every = stride * max(int(grad_stride), 1)
        grad_reads = max(STEP_WINDOW // grad_every, STEP_MIN_REFERENCE)
        # past STEP_WINDOW // STEP_MIN_REFERENCE steps per read the reference spans more optimizer steps than
        # STEP_WINDOW and lags a trend: a read then stands for fewer of the reads between (`update`)
        span = grad_reads * grad_every
        self._grad_lag = LAG_SPAN * STEP_WINDOW / span if span > LAG_SPAN * STEP_WINDOW else 1.0
        if self.states["loss"].reference.maxlen == reads and self.states["grad_norm"].reference.maxlen == grad_reads:
            return
        for name, state in self.states.items():
            want = grad_reads if name == "grad_norm" else reads
            if CHANNELS[name].reads == "step" and state.reference.maxlen != want:
                state.reference = ReferenceWindow(list(state.reference)[-want:], maxlen=want)

    def observe_lr(self, step: int, lr: float) -> bool:
        """The learning rate of optimizer step ``step``. A change the schedule made restarts every channel's reference
        (the per-step channels score again after `STEP_MIN_REFERENCE` steps, the check channels after
        `CHECK_MIN_REFERENCE` checks; the absolute rules go on), so that the new level is learned and not scored as a
        failure: a fall by more than a factor
        `LR_EVENT` from the rate the references were learned at (a decay, stepped or gradual; not to under
        `LR_EVENT_FLOOR` of the highest rate, the tail of a decay to 0; not within `LR_EVENT_GAP` steps of the last
        restart: it waits, accumulating, so that a short decay's tail is scored), or a jump by more than
        `LR_EVENT` in one step back to a rate the run already trained at (a warm restart). A rise past every rate the
        run has trained at, or a gradual rise (a warm-up, or a ramp to a rate far too high), is scored. Returns
        whether the references restarted.

        Example:
            >>> det = CusumDetector(DetectorCalibration(0.05, ("loss",), {"loss": 10.0}, 1.0))
            >>> [det.observe_lr(s, lr) for s, lr in enumerate([0.1, 0.1, 0.01, 0.01, 0.1, 0.2, 3.0])]
            [False, False, True, False, True, False, False]
        """
        lr = float(lr)
        if not math.isfinite(lr) or lr <= 0.0:
            return False
        top = self._lr_max
        if lr > top and (not self._lr_rises or lr > self._lr_rises[-1][1] * LR_RISE_STEP):
            self._lr_rises.append([step, lr])
        event, (self._lr_reference, self._lr_previous, self._lr_max, _) = lr_event(lr, self.lr_state(), step)
        if event:
            self.restart_references(step, why="lr")
        return event

    def lr_state(self) -> LrState:
        """What `observe_lr` keeps of the rates read: the rate the references were learned at (the highest since the
        last event), the last rate, the highest rate (None, None, 0 before the first), and the step of the last
        restart of the references (None before the first); `lr_event`'s ``state``."""
        last = self.reference_restarts[-1][0] if self.reference_restarts else None
        return self._lr_reference, self._lr_previous, self._lr_max, last

    def lr_event_due(self, lr: float, step: int | None = None) -> bool:
        """Whether the learning rate ``lr``, read next, would restart the references (`observe_lr`); changes nothing.

        Example:
            >>> det = CusumDetector(DetectorCalibration(0.05, ("loss",), {"loss": 10.0}, 1.0))
            >>> _ = [det.observe_lr(s, 0.1) for s in range(1, 4)]
            >>> det.lr_event_due(0.09), det.lr_event_due(0.05)
            (False, True)
        """
        return lr_event(float(lr), self.lr_state(), step)[0]

    def restart_references(self, step: int, why: str = "told") -> None:
        """Forget every channel's reference and accumulators from optimizer step ``step`` on, as a schedule's
        learning-rate event does (`observe_lr`): the per-step channels score again after `STEP_MIN_REFERENCE` values,
        the check channels after `CHECK_MIN_REFERENCE` checks, the extreme-value rule (it compares with the reference)
        after `STEP_MIN_REFERENCE` too; the rules that need no reference go on. For a change made on purpose that is
        not a learning rate (`topo_callbacks.core.CollapseMonitorCore.restart_references`). Recorded in
        `reference_restarts` as ``[step, why]``.

        Example:
            >>> det = CusumDetector(DetectorCalibration(0.05, ("loss",), {"loss": 10.0}, 1.0))
            >>> _ = [det.observe_step(s, {"loss": 1.0 + 0.01 * (s % 3)}) for s in range(1, 41)]
            >>> det.restart_references(41)
            >>> len(det.states["loss"].reference), det.observe_step(41, {"loss": 3.0})  # not scored: no reference
            (0, None)
        """
        for state in self.states.values():
            state.reference.clear()
            state.s_pos = state.s_neg = 0.0
            state.zero_step = step
        self._fall, self._fall_peak, self._fall_zero_step, self._fall_checked = 0.0, 0.0, step, 0
        self.reference_restarts = [*self.reference_restarts[-(MAX_RESTARTS_KEPT - 1) :], [int(step), str(why)]]

    def highest_rate_before(self, step: int) -> float | None:
        """The highest learning rate read (`observe_lr`) at the optimizer steps before ``step`` (to 1%: `LR_RISE_STEP`),
        or None when none was read. A rollback whose alarm's first suspect state is the one after step ``step``
        compares the schedule's rate with it (`topo_callbacks.core.rollback.RollbackPolicy.undo_rate_rise`).

        Example:
            >>> det = CusumDetector(DetectorCalibration(0.05, ("loss",), {"loss": 10.0}, 1.0))
            >>> for s in range(1, 51):
            ...     _ = det.observe_lr(s, 0.05 if s < 40 else 2.5)  # 50x from step 40
            >>> det.highest_rate_before(40), det.highest_rate_before(41), det.highest_rate_before(1)
            (0.05, 2.5, None)
        """
        before = [rate for at, rate in self._lr_rises if at < step]
        return before[-1] if before else None

    def quiet_channels(self) -> frozenset[str]:
        """The channels whose statistic stands at 0 (for the gradient norm: no fall held back either): a change on
        one of them begins after now, whatever its change point says (a check channel's is its last quiet check).

        Example:
            >>> det = CusumDetector(default_calibration(0.05))
            >>> sorted(det.quiet_channels())
            ['grad_norm', 'loss', 'loss_spike']
        """
        quiet = {name for name, state in self.states.items() if state.statistic(CHANNELS[name].side) == 0.0}
        if self._fall > 0.0:
            quiet.discard("grad_norm")
        return frozenset(quiet)

    # ----------------------------------------------------------------------------------------- episodes
    def _zero_gradient(self, step: int) -> DetectorFiring | None:
        self._zero_grad_steps += 1
        if self._zero_grad_steps < ZERO_GRAD_STEPS:
            return None
        # the losses of the streak: flat while no gradient flows; falling while the optimizer works on gradients that
        # were zeroed before the monitor read them
        streak = list(self.states["loss"].reference)[-self._zero_grad_steps :]
        half = len(streak) // 2
        early, late = statistics.median(streak[:half] or [math.nan]), statistics.median(streak[half:] or [math.nan])
        stuck = early != 0 and abs(late / early - 1.0) <= LOSS_STUCK
        if stuck:
            return self.absolute_event(step, "grad_norm", 0.0, AlarmKind.NO_GRADIENT,
                                       f"the gradient norm has been 0 for {self._zero_grad_steps} optimizer steps while"
                                       " the loss stays where it was: no gradient reaches the parameters (a"
                                       " detached graph, dead units, a frozen model).")  # fmt: skip
        self.notes.setdefault(
            "zero_grad",
            f"the gradient norm read {self._zero_grad_steps} optimizer steps in a row is 0"
            + (" while the loss moves" if streak else "")
            + ": the gradients were probably zeroed before the monitor read them (call the monitor before"
            " `optimizer.zero_grad()`, or pass `grad_norm=`). The gradient-norm channel is not fed these values.",
        )
        return None

    def _layer_gradient(self, step: int, lost: bool) -> DetectorFiring | None:
        """The dead-layer rule: some parameter tensors' gradients exactly 0 for `DEAD_LAYER_STEPS` reads in a row,
        after `STEP_MIN_REFERENCE` reads in a row in which every tensor had a gradient (a layer without one from the
        start, or one that gets it only now and then, never arms it)."""
        previous, self._layer_read = self._layer_read, step
        if not lost:
            self._gradient_steps += 1
            self._lost_steps = 0
            return None
        if self._gradient_steps < STEP_MIN_REFERENCE:
            self._gradient_steps = 0
            return None
        self._lost_steps += 1
        if self._lost_steps == 1:  # from the step after the last read with every gradient (reads may skip steps)
            self._lost_since = previous + 1 if 0 <= previous < step else step
        if self._lost_steps < DEAD_LAYER_STEPS:
            return None
        onset = self._lost_since if 0 <= self._lost_since <= step else step - self._lost_steps + 1
        detail = (
            f"some parameters' gradient has been exactly 0 for {self._lost_steps} reads in a row (from step"
            f" {onset}) after {self._gradient_steps} in which every parameter had one: a layer stopped passing"
            " gradient (its units dead, or its output constant); the layers are named below."
        )
        return self.absolute_event(step, "grad_norm", 0.0, AlarmKind.DEAD_LAYER, detail,
                                   onset=onset)  # fmt: skip

    def _start(self, firing: DetectorFiring) -> DetectorFiring:
        if self.fired is None:
            self.fired = firing
        self.episodes.append({"start": firing.step, "end": None, "channel": firing.channel, "kind": firing.kind,
                              "peak": min(self.level(firing.step), CAP), "message": firing.message(),
                              "onset": firing.step if firing.onset is None else firing.onset})  # fmt: skip
        return firing

    def _touch(self, step: int) -> None:
        if self.in_alarm:
            episode = self.episodes[-1]
            episode["peak"] = max(float(episode["peak"]), self.level(step))

    def _close(self, step: int) -> None:
        """Track the open episode's peak, and end it once the level is under `END_LEVEL`."""
        if not self.in_alarm:
            return
        self._touch(step)
        if self.level(step) < END_LEVEL:
            self.episodes[-1]["end"] = step

    def close_episode_if_quiet(self, step: int) -> dict[str, Any] | None:
        """End the open episode if the level is under `END_LEVEL` at ``step`` (also when nothing was fed); returns
        the episode it ended."""
        was = self.episodes[-1] if self.in_alarm else None
        self._close(step)
        return was if was is not None and was["end"] is not None else None

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """The detector's level (its statistic over the threshold: it alarms at 1, finite, at most `CAP`) and each
        channel's normalised CUSUM over the threshold, as log keys ``{prefix}detector`` and
        ``{prefix}detector_<channel>``.

        Example:
            >>> det = CusumDetector(DetectorCalibration(0.05, ("loss",), {"loss": 2.0}, 4.0))
            >>> det.as_dict("collapse/")
            {'collapse/detector': 0.0, 'collapse/detector_loss': 0.0}
        """
        threshold = self.calibration.threshold
        out = {f"{prefix}detector": self.level()}
        for name in self.channels:
            out[f"{prefix}detector_{name}"] = self.normalised(name) / threshold
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "calibration": self.calibration.as_dict(),
            # NaN (nothing seen yet) is stored as None: a state compares equal to its reload, and stays valid JSON
            "channels": {
                name: {"reference": list(s.reference), "s_pos": s.s_pos, "s_neg": s.s_neg, "value": _nan_none(s.value),
                       "baseline": _nan_none(s.baseline), "score": s.score, "step": s.step, "up": s.up, "down": s.down,
                       "streak_start": s.streak_start,
                       "zero_step": s.zero_step, "peak": None if s.peak == -math.inf else s.peak,
                       "early_peak": None if s.early_peak == -math.inf else s.early_peak, "fed": s.fed}
                for name, s in self.states.items()
            },
            "fired": None if self.fired is None else _plain(vars(self.fired)),
            "episodes": [_plain(e) for e in self.episodes],
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self.consecutive_skips,
            "absolute_step": self._absolute_step,
            "absolute_hold": self._absolute_hold,
            "step": self._step,
            "collapsed_checks": self._collapsed_checks,
            "zero_grad_steps": self._zero_grad_steps,
            "gradient_steps": self._gradient_steps,
            "lost_steps": self._lost_steps,
            "lost_since": self._lost_since,
            "layer_read": self._layer_read,
            "lr_reference": self._lr_reference,
            "lr_previous": self._lr_previous,
            "lr_max": self._lr_max,
            "lr_rises": [list(r) for r in self._lr_rises],
            "reference_restarts": [list(r) for r in self.reference_restarts],
            "spread": list(self._spread),
            "spread_fell": self._spread_fell,
            "dead": list(self._dead),
            "dead_rows": self._dead_rows,
            "dead_step": self._dead_step,
            "fall": self._fall,
            "fall_peak": self._fall_peak,
            "fall_zero_step": self._fall_zero_step,
            "fall_checked": self._fall_checked,
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, data in state.get("channels", {}).items():
            if name not in self.states:
                continue
            s = self.states[name]
            s.reference = ReferenceWindow((float(v) for v in data["reference"]), maxlen=CHANNELS[name].window)
            s.s_pos, s.s_neg = float(data["s_pos"]), float(data["s_neg"])
            s.value, s.baseline = _none_nan(data["value"]), _none_nan(data["baseline"])
            s.score = float(data["score"])
            s.step = int(data.get("step", -1))
            s.up, s.down = int(data.get("up", 0)), int(data.get("down", 0))
            s.streak_start = int(data.get("streak_start", -1))
            s.zero_step = int(data.get("zero_step", 0))
            peak = data.get("peak")
            s.peak = -math.inf if peak is None else float(peak)
            # a state saved before `early_peak` was kept: the largest value then stands for it
            early = data.get("early_peak", peak)
            s.early_peak = -math.inf if early is None else float(early)
            s.fed = int(data.get("fed", CHANNELS[name].window if peak is not None else 0))
        fired = state.get("fired")
        self.fired = None if fired is None else DetectorFiring(**_unplain(fired))
        self.episodes = [_unplain(dict(e)) for e in state.get("episodes", [])]
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.consecutive_skips = int(state.get("consecutive_skips", 0))
        self._absolute_step = int(state.get("absolute_step", -1))
        self._absolute_hold = int(state.get("absolute_hold", ABSOLUTE_HOLD))
        self._step = int(state.get("step", 0))
        self._collapsed_checks = int(state.get("collapsed_checks", 0))
        self._zero_grad_steps = int(state.get("zero_grad_steps", 0))
        self._gradient_steps = int(state.get("gradient_steps", 0))
        self._lost_steps = int(state.get("lost_steps", 0))
        self._lost_since = int(state.get("lost_since", -1))
        self._layer_read = int(state.get("layer_read", -1))
        lr_ref = state.get("lr_reference")
        self._lr_reference = None if lr_ref is None else float(lr_ref)
        previous = state.get("lr_previous")
        self._lr_previous = None if previous is None else float(previous)
        self._lr_max = float(state.get("lr_max", 0.0))
        self._lr_rises = [[int(at), float(rate)] for at, rate in state.get("lr_rises", ())]
        self.reference_restarts = [[int(at), str(why)] for at, why in state.get("reference_restarts", ())]
        self._spread = deque((float(v) for v in state.get("spread", ())), maxlen=CHECK_WINDOW)
        self._spread_fell = bool(state.get("spread_fell", False))
        self._dead = deque((float(v) for v in state.get("dead", ())), maxlen=CHECK_WINDOW)
        self._dead_rows = float(state.get("dead_rows", 0.0))
        self._dead_step = int(state.get("dead_step", 0))
        self._fall = float(state.get("fall", 0.0))
        self._fall_peak = float(state.get("fall_peak", 0.0))
        self._fall_zero_step = int(state.get("fall_zero_step", 0))
        self._fall_checked = int(state.get("fall_checked", 0))


#: `CusumDetector.lr_state`: the rate the references were learned at, the last rate, the highest rate, the step of the
#: last restart of the references
LrState = tuple[float | None, float | None, float, int | None]


def lr_event(lr: float, state: LrState, step: int | None = None) -> tuple[bool, LrState]:
    """Whether a learning rate ``lr`` read at optimizer step ``step`` after the rates summed up in ``state``
    (`CusumDetector.lr_state`) is a change the schedule made, which restarts the references
    (`CusumDetector.observe_lr`), and the state after it: a fall by more than `LR_EVENT` from the rate the references
    were learned at, unless that rate is already under `LR_EVENT_FLOOR` of the highest (the tail of a decay to 0: its
    updates are too small to move the levels the references hold; the fall that crosses the floor still restarts them
    once) or the references restarted fewer than `LR_EVENT_GAP` steps before (the fall waits, accumulating), or a
    jump by more than `LR_EVENT` in one read back to a rate the run already trained at (a warm restart). A rate that
    is not a positive number changes nothing. Pure: a monitor that scores its reads in batches runs it over the rates
    it queues.

    Example:
        >>> state = (None, None, 0.0, None)
        >>> events = []
        >>> for lr in [0.1, 0.1, 0.01, 0.01, 0.1, 0.2, 3.0, 0.01, 0.005]:
        ...     event, state = lr_event(lr, state)  # no step: no gap kept
        ...     events.append(event)
        >>> events  # a decay, a warm restart, rises; a fall to 1/300 of the highest, then none under it
        [False, False, True, False, True, False, False, True, False]
        >>> state, restarts = (None, None, 0.0, None), []
        >>> for step in range(100):  # a fall by 1.5x every 10 steps: restarts at most every LR_EVENT_GAP steps
        ...     event, state = lr_event(0.96**step, state, step)
        ...     restarts += [step] if event else []
        >>> restarts
        [10, 50, 90]
    """
    ref, previous, top, restarted = state
    if not (math.isfinite(lr) and lr > 0.0):
        return False, state
    highest = top if top > lr else lr
    if ref is None or previous is None:
        return False, (lr, lr, highest, restarted)
    fell = lr * LR_EVENT < ref and ref >= LR_EVENT_FLOOR * top * (1 - 1e-9)
    jumped = lr > previous * LR_EVENT and lr <= top * (1 + 1e-9)
    if fell and not jumped and step is not None and restarted is not None and step - restarted < LR_EVENT_GAP:
        return False, (ref, lr, highest, restarted)  # too soon after the last restart: the fall accumulates
    if fell or jumped:
        return True, (lr, lr, highest, step if step is not None else restarted)
    # a decay is measured from the highest rate since the last event
    return False, (max(ref, lr), lr, highest, restarted)


def _plain(data: dict[str, Any]) -> dict[str, Any]:
    """Non-finite floats as strings, so that the state stays valid JSON (HF Trainer) and loads with
    ``weights_only=True``."""
    return {k: (repr(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in data.items()}


def _unplain(data: dict[str, Any]) -> dict[str, Any]:
    return {k: (float(v) if v in ("inf", "-inf", "nan") else v) for k, v in data.items()}


def _nan_none(x: float) -> float | None:
    return None if math.isnan(x) else x


def _none_nan(x: float | None) -> float:
    return math.nan if x is None else float(x)


def _untransform(x: float, log: bool) -> float:
    return math.exp(x) if log and math.isfinite(x) else x


#: Up to this many gradient tensors `global_grad_norm` reads one norm per tensor on the CPU, else one stacked read.
FEW_TENSORS = 16


def global_grad_norm(parameters: Any, *, as_tensor: bool = False) -> Any:
    """The L2 norm of all gradients of ``parameters`` together (what ``clip_grad_norm_`` returns), or None when no
    parameter has a gradient. A float (one device-to-host copy), or with ``as_tensor=True`` a 0-d float32 tensor on
    the gradients' device, not read (what the adapters pass the monitor, which reads GPU values in batches).

    Example:
        >>> import torch
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> p.grad = torch.tensor([3.0, 4.0])
        >>> global_grad_norm([p]), global_grad_norm([p], as_tensor=True)
        (5.0, tensor(5.))
    """
    norms = grad_norms(parameters, as_tensor=as_tensor)
    return None if norms is None else norms[0]


def grad_norms(
    parameters: Any, *, as_tensor: bool = False, device_path: bool = False
) -> tuple[Any, Any, list[Any]] | None:
    """`global_grad_norm` with what it is made of: ``(total, per_tensor, params)``, the parameters that have a
    gradient and the norm of each one's gradient (a list of floats on the CPU; on an accelerator a 1-d float32
    tensor on the gradients' device, not read). None when no parameter has a gradient. ``device_path``: compute
    them as on an accelerator whatever the device (for tests and benchmarks of that path on the CPU).

    Example:
        >>> import torch
        >>> a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
        >>> a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([12.0])
        >>> total, per_tensor, params = grad_norms([a, b])
        >>> total, per_tensor, params[1] is b
        (13.0, [5.0, 12.0], True)
    """
    import torch

    params = [p for p in parameters if getattr(p, "grad", None) is not None]
    if not params:
        return None
    grads = [p.grad for p in params]
    # a plain tensor is not sharded: the common case skips the DTensor test (on a small model this runs right after
    # the backward pass, where each call costs several times its warm time)
    sharded = not all(type(g) is torch.Tensor for g in grads) and any(_is_dtensor(g) for g in grads)
    if sharded:
        # sharded gradients (FSDP2, tensor parallel): a DTensor's norm read as a number is its own shard's norm, so
        # each rank would read a different value; the shards' squares are summed over their meshes instead
        stacked = _sharded_norms(grads)
        norm = torch.linalg.vector_norm(stacked)
        if stacked.device.type == "cpu":
            return (norm if as_tensor else float(norm)), stacked.tolist(), params
        return (norm if as_tensor else float(norm)), stacked, params
    if not device_path and all(g.is_cpu for g in grads):
        # the CPU: the per-tensor norms are read as numbers and summed here (no second norm: there is no device to keep
        # waiting for). Right after a backward pass, reading each of `_foreach_norm`'s outputs cost 2x more than a norm
        # per tensor on a model of a few tensors (0.12 ms against 0.05 on the digits CNN), one stacked read less on
        # many tensors; the values are the same
        if len(grads) <= FEW_TENSORS:
            per_tensor = [torch.linalg.vector_norm(g).item() for g in grads]
        else:
            per_tensor = torch.stack(torch._foreach_norm(grads)).tolist()
        total = math.sqrt(sum(n * n for n in per_tensor))
        return (torch.tensor(total, dtype=torch.float32) if as_tensor else total), per_tensor, params
    norm, stacked = _device_grad_norms(grads)
    return (norm if as_tensor else float(norm)), stacked, params


def _device_grad_norms(grads: list[Any]) -> tuple[Any, Any]:
    """The global norm (0-d) and the per-tensor norms (1-d float32) of ``grads``, computed where they are and not
    read: what `grad_norms` does on an accelerator. A fixed handful of calls whatever the number of tensors (each
    call is host time on a GPU whose step the host bounds), the per-tensor norms in one ``_foreach_norm``.

    Example:
        >>> import torch
        >>> total, per_tensor = _device_grad_norms([torch.tensor([3.0, 4.0]), torch.tensor([12.0])])
        >>> total, per_tensor
        (tensor(13.), tensor([ 5., 12.]))
    """
    import torch

    if any(g.requires_grad for g in grads):  # gradients of a double backward: a detach per tensor only then
        grads = [g.detach() for g in grads]
    if len(grads) == 1:
        stacked = torch.linalg.vector_norm(grads[0], dtype=torch.float32).reshape(1)
    else:
        norms = torch._foreach_norm(grads) if hasattr(torch, "_foreach_norm") else [g.norm() for g in grads]
        first = norms[0].device
        if any(n.device != first for n in norms):  # a model split over devices (pipeline): meet on the first one
            norms = [n.to(first) for n in norms]
        stacked = torch.stack(norms)
        if stacked.dtype != torch.float32:
            stacked = stacked.float()
    return torch.linalg.vector_norm(stacked), stacked


def _is_dtensor(t: Any) -> bool:
    # no import of torch.distributed unless sharded; torch < 2.5 keeps DTensor in torch.distributed._tensor
    return type(t).__module__.startswith(("torch.distributed.tensor", "torch.distributed._tensor"))


def _sharded_norms(grads: list[Any]) -> Any:
    """The full norm of each gradient, some of them DTensors, as a 1-d float32 tensor equal on every rank: the
    squares of the local shards' norms, summed over the mesh dimensions each gradient is sharded on (one collective
    per mesh and layout, not one per tensor)."""
    import torch

    try:
        from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
    except ImportError:  # torch < 2.5
        from torch.distributed._tensor import DTensor, Partial, Replicate, Shard  # type: ignore[no-redef]

    squares: list[Any] = [None] * len(grads)
    groups: dict[tuple[Any, tuple[Any, ...]], list[int]] = {}
    for i, g in enumerate(grads):
        if isinstance(g, DTensor):
            groups.setdefault((g.device_mesh, tuple(g.placements)), []).append(i)
        else:
            squares[i] = torch.linalg.vector_norm(g.detach(), dtype=torch.float32) ** 2
    for (mesh, placements), members in groups.items():
        if not all(isinstance(p, (Shard, Replicate)) for p in placements):  # unreduced (Partial): DTensor's own norm
            for i in members:
                squares[i] = torch.linalg.vector_norm(grads[i].detach(), dtype=torch.float32).full_tensor() ** 2
            continue
        local = torch.stack(
            [torch.linalg.vector_norm(grads[i].to_local().detach(), dtype=torch.float32) for i in members]
        )
        summed = [Partial("sum") if isinstance(p, Shard) else Replicate() for p in placements]
        total = DTensor.from_local(local**2, mesh, summed, run_check=False).full_tensor()
        for j, i in enumerate(members):
            squares[i] = total[j]
    device = squares[0].device
    return torch.stack([sq.to(device) for sq in squares]).sqrt()


def learning_rate(optimizer: Any) -> float | None:
    """The learning rate of ``optimizer``'s first parameter group (what the adapters feed the detector), or None.

    Example:
        >>> import torch
        >>> learning_rate(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)), learning_rate(None)
        (0.1, None)
    """
    groups = getattr(optimizer, "param_groups", None)
    return float(groups[0]["lr"]) if groups else None


def loss_scale(scaler: Any, *, as_tensor: bool = False) -> Any:
    """The current scale of an enabled fp16 loss scaler (``torch.amp.GradScaler``), or None (no scaler, disabled,
    or no scale yet). A skipped step shows as a scale lower after ``scaler.update()`` than before the step.
    ``as_tensor=True``: a copy of the scale tensor on the scaler's device, not read (``get_scale()`` waits for the
    GPU); a scaler without a scale tensor gives its float.

    Example:
        >>> import torch
        >>> loss_scale(torch.amp.GradScaler("cpu", init_scale=1024.0)), loss_scale(None)
        (1024.0, None)
    """
    if scaler is None or not getattr(scaler, "is_enabled", lambda: False)():
        return None
    if as_tensor:
        scale = getattr(scaler, "_scale", None)
        if scale is not None and hasattr(scale, "clone"):
            return scale.detach().reshape(()).clone()  # `update()` changes it in place
    scale = scaler.get_scale()
    return float(scale) if scale else None


def scale_fell(before: Any, after: Any) -> Any:
    """Whether a loss scaler's scale is lower ``after`` a step than ``before`` it (the step was skipped): a bool
    tensor, not read, when both are tensors; False when either is unknown.

    Example:
        >>> import torch
        >>> scale_fell(torch.tensor(1024.0), torch.tensor(512.0)), scale_fell(None, 512.0), scale_fell(1024.0, 2048.0)
        (tensor(True), False, False)
    """
    if before is None or after is None:
        return False
    return after < before


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
