"""The CUSUM detector on recorded runs: each channel's statistic, the fit of a calibration, the fused replay.

The replay computes what `topo_callbacks.core.detector.CusumDetector` computes live (the same functions of
`topo_callbacks.functional.detector`; a test checks that both give the same statistic on a recorded run), from the
channels a `RunRecord` holds. A calibration is fit on training runs only (calibration seeds; in leave-one-family-out,
the other families): each channel's normaliser is the level its CUSUM alone reaches on ``alpha`` of the negatives
(clean runs, and failure runs up to their fork), channels are added greedily while they add detections of the
training failures at a threshold calibrated to ``alpha``, and the threshold is that calibrated level.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from topo_callbacks.bench.detectors import calibrated_threshold
from topo_callbacks.bench.record import RunRecord
from topo_callbacks.core.detector import ALLOWANCE, CHANNELS, CLIP, DetectorCalibration
from topo_callbacks.functional.detector import standardized_cusum

__all__ = [
    "DEFAULT_CANDIDATES",
    "channel_statistic",
    "channel_values",
    "fit_calibration",
    "fused_series",
    "on_step_grid",
]

#: What the default detector may be built from: the channels the monitor computes live with ``source="stream"``.
DEFAULT_CANDIDATES = [c for c, spec in CHANNELS.items() if spec.live and spec.source == "any"]


def channel_values(rec: RunRecord, name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Channel ``name``'s recorded ``(steps, values)``, or None when the run did not record it. Check channels are
    read from checks past the scale's calibration (the live monitor feeds them from then on)."""
    spec = CHANNELS[name]
    if spec.reads == "step":
        steps = np.arange(1, len(rec.loss) + 1)
        if name == "loss":
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


def channel_statistic(rec: RunRecord, name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Channel ``name``'s CUSUM statistic at each point it was read (None when not recorded)."""
    data = channel_values(rec, name)
    if data is None:
        return None
    spec = CHANNELS[name]
    steps, values = data
    stat = standardized_cusum(
        values, window=spec.window, k=ALLOWANCE, floor=spec.floor, clip=CLIP, log=spec.log, side=spec.side,
        min_reference=spec.min_reference,
    )  # fmt: skip
    return steps, stat


def on_step_grid(steps: np.ndarray, stat: np.ndarray, total: int) -> np.ndarray:
    """A statistic read at ``steps``, held until its next reading, at every step ``1..total`` (0 before the first)."""
    grid = np.arange(1, total + 1)
    idx = np.searchsorted(steps, grid, side="right") - 1
    return np.where(idx >= 0, stat[np.clip(idx, 0, None)], 0.0)


def fused_series(grids: dict[str, np.ndarray], cal: DetectorCalibration) -> tuple[np.ndarray, np.ndarray]:
    """The detector's statistic over the threshold (it alarms at 1) at every step, from each channel's step grid."""
    total = len(next(iter(grids.values())))
    out = np.zeros(total)
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
) -> DetectorCalibration:
    """Fit a calibration on training runs.

    ``candidates`` defaults to the channels the monitor computes live with its default source
    (`DEFAULT_CANDIDATES`). ``grids[i]`` holds run i's channel statistics on its step grid;
    ``negatives_until[i]`` is how many of its steps count as healthy (all for a clean run, ``t0 - 1`` for a
    failure run); ``failures[i]`` is ``(t0, t_c)`` for a failure run whose metric dropped (a detection is an
    alarm in ``[t0, t_c)``), else None.
    """
    pool = candidates if candidates is not None else DEFAULT_CANDIDATES
    names = [c for c in pool if any(c in g for g in grids)]
    zero = {i: np.zeros(len(next(iter(g.values())))) for i, g in enumerate(grids)}
    norm: dict[str, float] = {}
    for c in names:
        maxima = _negative_maxima([g.get(c, zero[i]) for i, g in enumerate(grids)], negatives_until)
        norm[c] = max(calibrated_threshold(maxima, alpha), 1e-6)

    def score(chosen: Sequence[str]) -> tuple[tuple[int, int], float]:
        fused = [np.max([g.get(c, zero[i]) / norm[c] for c in chosen], axis=0) for i, g in enumerate(grids)]
        h = max(calibrated_threshold(_negative_maxima(fused, negatives_until), alpha), 1e-6)
        hits = lead = 0
        for f, window in zip(fused, failures, strict=True):
            if window is None:
                continue
            t0, t_c = window
            above = np.flatnonzero(f >= h)  # index i is step i + 1
            if above.size and t0 <= above[0] + 1 < t_c:
                hits, lead = hits + 1, lead + t_c - (above[0] + 1)
        return (hits, lead), h

    # greedy: add the channel that detects most training failures (then: the largest total lead) while that improves
    chosen: list[str] = []
    best: tuple[tuple[int, int], float] = ((-1, 0), 1.0)
    while len(chosen) < len(names):
        (value, h), c = max(((score([*chosen, c]), c) for c in names if c not in chosen), key=lambda t: t[0][0])
        if value <= best[0]:
            break
        chosen.append(c)
        best = (value, h)
    return DetectorCalibration(alpha, tuple(chosen), {c: norm[c] for c in chosen}, best[1], fit_on)
