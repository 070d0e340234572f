"""The CUSUM detector on recorded runs: each channel's statistic, the fit of a calibration, the fused replay.

The replay runs the live `topo_callbacks.core.detector.CusumDetector` itself over the channels a `RunRecord` holds,
step by step, in the order the monitor feeds them (the learning rate, the step's values or its skip, then the check
at that step), so that every rule (warm-up references, schedule events, skipped steps, absolute rules, caps) is the
same code live and replayed; a test checks the replay against the live monitor's record.

A calibration is fit on training runs only (calibration seeds; in leave-one-family-out, the other families). Its
false-alarm rate is per 10,000 healthy optimizer steps (`PER_STEPS`): over negatives (clean runs, and failure runs up
to their fork) of ``S`` steps in all, at most ``floor(rate x S / 10,000)`` may alarm. Each channel's normaliser is
the level its CUSUM alone reaches on that many negatives; channels are added greedily while they add detections of
the training failures (a gain in lead alone does not add one) at a threshold calibrated the same way, and the
threshold is that calibrated level. The absolute rules alarm whatever the threshold: negatives they alarm on use up
the allowance first.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from topo_callbacks.bench.detectors import calibrated_threshold
from topo_callbacks.bench.record import RunRecord
from topo_callbacks.core.detector import (
    ABSOLUTE_HOLD,
    CHANNELS,
    DEAD_ROWS_CHANGE,
    STEP_MIN_REFERENCE,
    STEP_WINDOW,
    CusumDetector,
    DetectorCalibration,
)

__all__ = [
    "ABSOLUTE",
    "BASE_CHANNELS",
    "DEFAULT_CANDIDATES",
    "PER_STEPS",
    "channel_values",
    "check_steps",
    "fit_calibration",
    "fused_series",
    "host_batch_flushes",
    "on_step_grid",
    "replay_channels",
    "replay_episodes",
]

#: The benchmark's false-alarm rates are per this many healthy optimizer steps.
PER_STEPS = 10_000

#: The channels every fit starts from (where the candidates hold them): the per-step channels are read at every
#: step and cost nothing more, and a failure family the training families happen to cover through other channels
#: may show only there (a byte-level LM's divergence is seen by the loss; a greedy fit that started from nothing
#: chose the Betti channels instead and missed it). ``loss_spike`` is among them because the greedy step adds a
#: channel only for a detection: with the lr_too_high_early family held out, ``loss_spike`` added lead but no
#: detection on the other families' runs, and the fold without it missed 2 of that family's 4 calibration runs.
BASE_CHANNELS: tuple[str, ...] = ("loss", "grad_norm", "loss_spike")

#: What the default detector may be built from: the channels the monitor computes live with ``source="stream"`` and
#: offers to the default fit (`Channel.default_fit`).
DEFAULT_CANDIDATES = [c for c, spec in CHANNELS.items() if spec.live and spec.source == "any" and spec.default_fit]


def channel_values(rec: RunRecord, name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Channel ``name``'s recorded ``(steps, values)``, or None when the run did not record it. Check channels are
    read from checks past the scale's calibration (the live monitor feeds them from then on)."""
    spec = CHANNELS[name]
    if spec.reads == "step":
        steps = np.arange(1, len(rec.loss) + 1)
        if name == "loss" or spec.of == "loss":
            values = np.asarray(rec.loss, dtype=np.float64)
        elif name == "grad_norm":
            values = np.asarray(rec.grad_norm, dtype=np.float64)
        elif name == "act_rms":
            values = np.asarray(rec.act_rms, dtype=np.float64)
        elif name in ("attn_max_logit", "attn_min_entropy"):
            values = np.asarray(getattr(rec, name), dtype=np.float64)
        elif name == "update_ratio":
            upd = np.array([u[0] for u in rec.update_norm], dtype=np.float64)
            wn = np.array([w[0] for w in rec.weight_norm], dtype=np.float64)
            with np.errstate(divide="ignore", invalid="ignore"):
                values = upd / (np.asarray(rec.lr, dtype=np.float64) * wn)
        else:  # pragma: no cover - every step channel is listed above
            raise KeyError(name)
        return (steps, values) if np.isfinite(values).any() else None
    if spec.source in ("probe", "loss_fn"):  # measured beside every check (`RunRecord.side_checks`)
        rows = [c for c in rec.side_checks if name in c]
        if not rows:
            return None
        return (np.array([int(c["step"]) for c in rows], dtype=np.int64),
                np.array([float(c[name]) for c in rows], dtype=np.float64))  # fmt: skip
    checks = [c for c in rec.checks if not c.get("calibrating") and c.get("reason") != "SKIPPED"]
    key = "b1" if name == "b1_fraction" else name
    if not checks or key not in checks[0]:
        return None
    steps = np.array([int(c["step"]) for c in checks], dtype=np.int64)
    values = np.array([float(c[key]) for c in checks], dtype=np.float64)
    if name == "b1_fraction":
        values = values / np.array([max(float(c["n"]), 1.0) for c in checks])
    return steps, values


#: The key of the absolute rules' level in `replay_channels`'s grids (the detector's level from its absolute rules,
#: in threshold units: it alarms at 1 whatever the calibration).
ABSOLUTE = "absolute"


def replay_channels(rec: RunRecord, channels: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Each channel's CUSUM statistic at every step ``1..rec.steps`` (channels the run did not record are left
    out), and under `ABSOLUTE` the level of the absolute rules, from one replay of the live detector with every
    channel calibrated at normaliser 1 and no threshold (so nothing caps the statistics).

    Example:
        >>> from topo_callbacks.bench.record import RunRecord
        >>> rec = RunRecord("f", "healthy", 0, 40, 10, [1.0] * 39 + [float("nan")], [1.0] * 40, [0.1] * 40,
        ...                 [[0.0]] * 40, [[1.0]] * 40, [0.0] * 40, [0.0] * 40, [0.0] * 40, [], [], None)
        >>> grids = replay_channels(rec, ["loss", "grad_norm"])
        >>> float(grids["loss"].max()), float(grids[ABSOLUTE][-1])  # the NaN loss: an absolute alarm, at once
        (0.0, 2.0)
    """
    names = [c for c in (channels if channels is not None else CHANNELS) if channel_values(rec, c) is not None]
    grids = {c: np.zeros(rec.steps) for c in (*names, ABSOLUTE)}
    for step, detector in _replay(rec, names, lambda: _uncapped(names)):
        for c in names:
            grids[c][step - 1] = detector.states[c].statistic(CHANNELS[c].side)
        grids[ABSOLUTE][step - 1] = detector.absolute_level(step)
    return grids


def replay_episodes(
    rec: RunRecord,
    cal: DetectorCalibration,
    check_stride: int = 1,
    step_stride: int = 1,
    grad_stride: int = 1,
    pull: bool = True,
) -> list[dict[str, Any]]:
    """The alarm episodes the live detector with calibration ``cal`` has on ``rec`` (re-armed after each): what a
    user of the monitor would be warned about, for false alarms per healthy step. ``check_stride``: keep every
    ``check_stride``-th check only (the first, then every k-th), as a monitor whose overhead budget spaced its checks
    ``check_stride`` times further apart would have seen the run. ``step_stride``: read the per-step channels at
    every ``step_stride``-th step (and at the checks kept, and every step of the monitor's first `STEP_WINDOW`) only,
    the loss of the steps between averaged into the next read, as the budget does on steps of a millisecond.
    ``grad_stride``: of those reads, the gradient norm at every ``grad_stride``-th only (every
    ``step_stride x grad_stride``-th step, the checks kept and the first `STEP_WINDOW` steps), as the budget reads it
    where computing it costs most of the per-step work. With either stride, the `STEP_MIN_REFERENCE` steps after a
    restart of the references (a schedule's decay or warm restart) are read in full, as the monitor reads them
    (`CollapseMonitorCore._refill_after_restart`). ``pull``: when the detector `wants_check` after a step, the
    first recorded check a whole check interval later is taken too, and the spaced ones count on from it, as the
    monitor brings its next check forward (False: the fixed spacing alone)."""
    detectors = _Rearmed(cal)
    for _ in _replay(rec, cal.channels, detectors.make, check_stride, step_stride, grad_stride, pull):
        pass
    return detectors.episodes()


class _Rearmed:
    """The detectors `_replay` makes (a fresh one for each monitor a record holds), and every episode they had."""

    def __init__(self, cal: DetectorCalibration) -> None:
        self.cal = cal
        self._finished: list[dict[str, Any]] = []
        self._current: CusumDetector | None = None

    def make(self) -> CusumDetector:
        if self._current is not None:
            self._finished.extend(self._current.episodes)
        self._current = CusumDetector(self.cal)
        return self._current

    def episodes(self) -> list[dict[str, Any]]:
        return self._finished + (self._current.episodes if self._current is not None else [])


def check_steps(rec: RunRecord) -> list[int]:
    """The steps at which ``rec``'s monitor ran a check (skipped ones included: a check step reads everything
    queued, whatever the check then does)."""
    return [int(c["step"]) for c in rec.checks if c.get("step") is not None]


def _uncapped(names: Sequence[str]) -> CusumDetector:
    return CusumDetector(DetectorCalibration(0.05, tuple(names), dict.fromkeys(names, 1.0), math.inf))


def host_batch_flushes(rec: RunRecord, cal: DetectorCalibration, every: int) -> tuple[list[dict[str, Any]], list[int]]:
    """`replay_episodes` of ``rec`` (every check, every step), and the steps at which a CPU monitor that scores its
    per-step values in batches of ``every`` (what ``max_overhead`` does on small models:
    `topo_callbacks.core.step_reads.HOST_READ_EVERY`) would score them, so that an alarm is known at the first such
    step at or after its own: a batch is scored when ``every`` steps are queued, at a check, and at once for a step
    the monitor finds urgent (`CusumDetector.urgent_above` as of the last batch scored: a loss or gradient norm over
    twice its reference's largest, non-finite or 0; a step the loss scaler skipped). Batches from the first step on:
    the budget turns them on at its first check, so this is the most they can cost."""
    detectors = _Rearmed(cal)
    checks = set(check_steps(rec))
    skipped = set(getattr(rec, "skipped_steps", ()))
    restart = getattr(rec, "monitor_restart", None)
    flushes: list[int] = []
    above, queued = (math.inf, math.inf), 0
    for step, detector in _replay(rec, cal.channels, detectors.make):
        if restart is not None and step == restart + 1:  # a new monitor: nothing queued, nothing learned
            above, queued = (math.inf, math.inf), 0
        loss = float(rec.loss[step - 1]) if step - 1 < len(rec.loss) else -1.0
        norm = float(rec.grad_norm[step - 1]) if step - 1 < len(rec.grad_norm) else -1.0
        queued += 1
        urgent = (
            not (-math.inf < loss < above[0] and -math.inf < norm < above[1])
            or loss == 0.0
            or norm == 0.0
            or step in skipped
        )
        if urgent or queued >= every or step in checks:
            flushes.append(step)
            queued = 0
            above = detector.urgent_above()
    return detectors.episodes(), flushes


def _replay(
    rec: RunRecord,
    channels: Sequence[str],
    make: Callable[[], CusumDetector],
    check_stride: int = 1,
    step_stride: int = 1,
    grad_stride: int = 1,
    pull: bool = True,
) -> Iterator[tuple[int, CusumDetector]]:
    """Feed ``rec`` to a detector from ``make`` as the monitor does, yielding it after each step (a fresh one after
    the record's ``monitor_restart``, as a fine-tuning run's new monitor); the checks as `replay_episodes` keeps
    them."""
    step_channels = {c for c in (*channels, "loss", "grad_norm") if CHANNELS[c].reads == "step"}
    series = {c: data[1] for c in step_channels if (data := channel_values(rec, c)) is not None}
    recorded = {int(c["step"]): c for c in rec.checks if c.get("reason") != "SKIPPED"}
    order = sorted(recorded)
    every = int(np.median(np.diff(order))) if len(order) > 1 else 50  # the monitor's every_n_train_steps
    # the checks kept: the first, then every check_stride-th counted from the last one kept (a pull moves it closer)
    next_index = 0  # the index in ``order`` of the next check kept
    side = {int(c["step"]): c for c in rec.side_checks}
    # records written before the benchmark held loss scalers and fine-tuning restarts have none
    skipped = set(getattr(rec, "skipped_steps", ()))
    scales = list(getattr(rec, "loss_scale", ()))
    # records written before the dead-layer rule have None: the rule is not fed (as a monitor that cannot tell)
    lost_steps = getattr(rec, "layer_lost_steps", None)
    lost = None if lost_steps is None else set(lost_steps)
    restart = getattr(rec, "monitor_restart", None)
    kept = order[::check_stride]  # the schedule without pulls
    spacing = int(np.median(np.diff(kept))) if len(kept) > 1 else 50
    hold = max(ABSOLUTE_HOLD, 2 * spacing)
    detector = make()
    # unit checks between spaced checks from the monitor's first check on (its width is known then)
    units_from: int | None = None
    last_rows = 0.0
    read_all_until = STEP_WINDOW  # a monitor reads every step of its first STEP_WINDOW
    unread: list[float] = []  # losses of the steps not read since the last read
    reads_since_grad = 0
    restart_seen = None  # the detector's last reference restart read after (`reference_restarts`)
    for step in range(1, rec.steps + 1):
        if restart is not None and step == restart + 1:
            detector = make()
            units_from, last_rows = None, 0.0
            read_all_until = restart + STEP_WINDOW
            unread = []  # a new monitor averages none of the old one's losses
            reads_since_grad = 0
        is_check = next_index < len(order) and step == order[next_index]
        values = {c: float(v[step - 1]) for c, v in series.items() if step - 1 < len(v)}
        lr = float(rec.lr[step - 1]) if step - 1 < len(rec.lr) else None
        # the scale after this step's update is the one the next step used
        scale = float(scales[step]) if step < len(scales) else None
        # `CollapseMonitorCore.observes`: the loss of a step not read is fed averaged with the next read's
        if (step_stride > 1 or grad_stride > 1) and step == read_all_until + 1:
            detector.set_step_window(step_stride, grad_stride)
        if step_stride == 1 or step <= read_all_until or step % step_stride == 0 or is_check:
            # `CollapseMonitorCore.reads_grad_norm`: of the reads, the gradient norm at every grad_stride-th only,
            # standing for the reads since the last one
            reads_since_grad += 1
            grad_steps, lost_here = 1, None if lost is None else step in lost
            if grad_stride > 1 and step > read_all_until:
                if step % (step_stride * grad_stride) and not is_check:
                    values.pop("grad_norm", None)
                    lost_here = None
                else:
                    grad_steps = min(reads_since_grad, grad_stride)
            if "grad_norm" in values:
                reads_since_grad = 0
            read_steps = 1
            if unread and "loss" in values:
                read_steps = len(unread) + 1
                values["loss"] = (sum(unread) + values["loss"]) / read_steps
            unread = []
            detector.observe_step(step, values, lr=lr, skipped=step in skipped, loss_scale=scale,
                                  layer_lost=lost_here, read_steps=read_steps, grad_steps=grad_steps)  # fmt: skip
            restarts = detector.reference_restarts
            if (step_stride > 1 or grad_stride > 1) and restarts and restarts[-1] is not restart_seen:
                # the monitor reads the steps after a restart in full (`_refill_after_restart`), on references of
                # single steps as in its first STEP_WINDOW
                restart_seen = restarts[-1]
                if step >= read_all_until:
                    detector.set_step_window(1)
                read_all_until = max(read_all_until, step + STEP_MIN_REFERENCE)
        elif "loss" in values:
            unread.append(values["loss"])
        if step in recorded and units_from is None:  # a monitor's first check (a new one's after a restart)
            units_from, last_rows = step, float(recorded[step].get("n", 0.0))
        if check_stride > 1 and not is_check and step in recorded and units_from is not None and step > units_from:
            # a recorded check the spaced schedule skips: the monitor's unit check there (`_units_check`), after the
            # step's own values, feeds the dormant-unit rule its share of dead units (a sample much smaller than the
            # last check's is not fed)
            unit = recorded[step]
            rows = float(unit.get("n", 0.0))
            if unit.get("dead_fraction") is not None and unit.get("d") and rows >= (1 - DEAD_ROWS_CHANGE) * last_rows:
                detector.observe_units(step, float(unit["dead_fraction"]), d=int(unit["d"]), n=int(rows),
                                       hold=max(ABSOLUTE_HOLD, 2 * every))  # fmt: skip
        if is_check:
            last_rows = float(recorded[step].get("n", 0.0))
            next_index += check_stride
            row = recorded[step]
            check = {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            check["b1_fraction"] = check.get("b1", 0.0) / max(check.get("n", 1.0), 1.0)
            check.update({k: float(v) for k, v in side.get(step, {}).items() if k != "step"})
            detector.observe_check(step, check, calibrating=bool(row.get("calibrating")), hold=hold)
        if pull and check_stride > 1 and detector.wants_check():
            # `CollapseMonitorCore` brings its next check to a whole interval from now (a full capture window); the
            # spaced schedule then counts on from it
            next_index = min(next_index, bisect.bisect_left(order, step + every))
        yield step, detector


def on_step_grid(steps: np.ndarray, stat: np.ndarray, total: int) -> np.ndarray:
    """A statistic read at ``steps``, held until its next reading, at every step ``1..total`` (0 before the first)."""
    grid = np.arange(1, total + 1)
    idx = np.searchsorted(steps, grid, side="right") - 1
    return np.where(idx >= 0, stat[np.clip(idx, 0, None)], 0.0)


def fused_series(grids: dict[str, np.ndarray], cal: DetectorCalibration) -> tuple[np.ndarray, np.ndarray]:
    """The detector's statistic over the threshold (it alarms at 1) at every step, from each channel's step grid."""
    total = len(next(iter(grids.values())))
    out = np.array(grids.get(ABSOLUTE, np.zeros(total)), dtype=np.float64)
    for name in cal.channels:
        if name in grids:
            out = np.maximum(out, grids[name] / (cal.normalisers[name] * cal.threshold))
    return np.arange(1, total + 1), out


def _negative_maxima(grids: Sequence[np.ndarray], cut: Sequence[int | None]) -> list[float]:
    pairs = zip(grids, cut, strict=True)
    return [float(g[: c if c is not None else len(g)].max(initial=0.0)) for g, c in pairs]


def fit_calibration(
    grids: Sequence[dict[str, np.ndarray]],
    negatives_until: Sequence[int | None],
    failures: Sequence[tuple[int, int] | None],
    alpha: float,
    *,
    candidates: Sequence[str] | None = None,
    fit_on: str = "",
    per_steps: int | None = None,
    base: Sequence[str] = BASE_CHANNELS,
) -> DetectorCalibration:
    """Fit a calibration on training runs.

    ``alpha`` is a share of the negatives, or with ``per_steps`` (the benchmark: `PER_STEPS`) a number of alarms per
    that many healthy steps.

    ``candidates`` defaults to the channels the monitor computes live with its default source
    (`DEFAULT_CANDIDATES`). ``grids[i]`` holds run i's channel statistics on its step grid;
    ``negatives_until[i]`` is how many of its steps count as healthy (all for a clean run, ``t0 - 1`` for a
    failure run); ``failures[i]`` is ``(t0, t_c)`` for a failure run whose metric dropped (a detection is an
    alarm in ``[t0, t_c)``), else None. The fit starts from the ``base`` channels the candidates hold and adds the
    others one by one while that adds detections.
    """
    pool = candidates if candidates is not None else DEFAULT_CANDIDATES
    names = [c for c in pool if any(c in g for g in grids)]
    zero = {i: np.zeros(len(next(iter(g.values())))) for i, g in enumerate(grids)}
    healthy = sum(len(zero[i]) if c is None else c for i, c in enumerate(negatives_until))
    exposure = None if per_steps is None else healthy / per_steps
    # the absolute rules alarm (level >= 1) whatever the threshold
    absolute = [np.where(g.get(ABSOLUTE, zero[i]) >= 1.0, np.inf, 0.0) for i, g in enumerate(grids)]
    norm: dict[str, float] = {}
    for c in names:
        maxima = _negative_maxima([g.get(c, zero[i]) for i, g in enumerate(grids)], negatives_until)
        norm[c] = max(calibrated_threshold(maxima, alpha, exposure=exposure), 1e-6)

    def score(chosen: Sequence[str]) -> tuple[tuple[int, int], float]:
        fused = [np.max([absolute[i], *(g.get(c, zero[i]) / norm[c] for c in chosen)], axis=0)
                 for i, g in enumerate(grids)]  # fmt: skip
        h = max(calibrated_threshold(_negative_maxima(fused, negatives_until), alpha, exposure=exposure), 1e-6)
        hits = lead = 0
        for f, window in zip(fused, failures, strict=True):
            if window is None:
                continue
            t0, t_c = window
            above = np.flatnonzero(f >= h)  # index i is step i + 1
            if above.size and t0 <= above[0] + 1 < t_c:
                hits, lead = hits + 1, lead + t_c - (above[0] + 1)
        return (hits, lead), h

    # the base channels, then greedily the channel that detects most training failures (a tie goes to the first in
    # ``names``) while that detects more of them: a channel that only moves alarms earlier on the training families
    # adds nothing a held-out run can count on, and every channel is a way for an unseen healthy run to alarm (an
    # `effective_rank` chosen for its lead alone alarmed on every held-out loss_plateau run)
    chosen = [c for c in base if c in names]
    best: tuple[tuple[int, int], float] = score(chosen) if chosen else ((-1, 0), 1.0)
    while len(chosen) < len(names):
        (value, h), c = max(((score([*chosen, c]), c) for c in names if c not in chosen), key=lambda t: t[0][0])
        if value[0] <= best[0][0]:
            break
        chosen.append(c)
        best = (value, h)
    return DetectorCalibration(alpha, tuple(chosen), {c: norm[c] for c in chosen}, best[1], fit_on)
