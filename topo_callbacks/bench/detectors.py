"""Alarm rules replayed on recorded runs: the CI and its terms, cheap baselines, and the standard warnings.

All functions are pure: they take the series a run recorded and return a statistic series (or, for the ground
truth, a step). Replaying (rather than attaching one live monitor per rule) lets every rule see exactly the same
training run, and lets thresholds be chosen on calibration seeds after the fact.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "ALPHA",
    "calibrated_threshold",
    "channel_series",
    "drop_step",
    "ema_zscore",
    "first_at_or_above",
    "mad_score",
    "patience_count",
    "rise_score",
    "rolling_median_mad",
    "running_mean_ratio",
]


def channel_series(checks: Sequence[Mapping[str, Any]], weights: Mapping[str, float]) -> list[float]:
    """The CI with other ``weights`` at each recorded check: the CI is a weighted mean of its terms.

    Example:
        >>> checks = [{"betti_term": 1.0, "rank_term": 0.0}, {"betti_term": 0.5, "rank_term": 0.5}]
        >>> channel_series(checks, {"betti": 1, "rank": 3})
        [0.25, 0.5]
    """
    total = sum(weights.values())
    return [sum(w * float(c[f"{t}_term"]) for t, w in weights.items()) / total for c in checks]


def rolling_median_mad(values: Sequence[float] | np.ndarray, window: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Median and median absolute deviation of the ``window`` values before each index (NaN before ``window``)."""
    v = np.asarray(values, dtype=np.float64)
    med = np.full(len(v), np.nan)
    mad = np.full(len(v), np.nan)
    if len(v) > window:
        past = np.lib.stride_tricks.sliding_window_view(v[:-1], window)  # past[i] = v[i : i + window]
        m = np.median(past, axis=1)
        med[window:] = m
        mad[window:] = np.median(np.abs(past - m[:, None]), axis=1)
    return med, mad


def _worst(value: float, mode: str) -> float:
    return value if math.isfinite(value) else (-math.inf if mode == "max" else math.inf)


def drop_step(
    evals: Sequence[tuple[int, float]],
    *,
    mode: str = "max",
    points: float = 5.0,
    relative: float | None = None,
    evals_needed: int = 3,
) -> int | None:
    """Ground truth: the first evaluation ``points`` worse than the best so far (or ``relative`` worse, e.g. 0.1 for
    +10% perplexity) that stays so for ``evals_needed`` evaluations. Non-finite values count as worst.

    Example:
        >>> drop_step([(0, 90.0), (10, 91.0), (20, 80.0), (30, 70.0), (40, 60.0)])
        20
        >>> drop_step([(0, 10.0), (10, 9.0), (20, 12.0), (30, 13.0), (40, float("nan"))], mode="min", relative=0.1)
        20
    """
    vals = [(int(s), _worst(float(v), mode)) for s, v in evals]
    best = -math.inf if mode == "max" else math.inf

    def bad(value: float, ref: float) -> bool:
        if mode == "max":
            return value <= ref - points
        limit = ref * (1.0 + relative) if relative is not None else ref + points
        return value >= limit

    for i, (step, value) in enumerate(vals):
        best = max(best, value) if mode == "max" else min(best, value)
        window = vals[i : i + evals_needed]
        if len(window) == evals_needed and all(bad(v, best) for _, v in window):
            return step
    return None


# ------------------------------------------------------------------------------ alarm statistics (threshold-free)
# A detector is replayed as a statistic series s_t over the points it sees (steps, checks or evaluations): at
# threshold h it alarms at the first point with s_t >= h. One series per run serves every threshold, so a
# detector is calibrated to a false-alarm rate, and swept into a detection-versus-false-alarm curve, cheaply.


def first_at_or_above(steps: np.ndarray, stat: np.ndarray, threshold: float, start: int = 0) -> int | None:
    """The first step (at index >= ``start``) whose statistic reaches ``threshold``, or None.

    Example:
        >>> first_at_or_above(np.array([1, 2, 3]), np.array([0.5, 2.0, 1.0]), 1.5)
        2
    """
    hits = np.flatnonzero(stat[start:] >= threshold)
    return int(steps[start + hits[0]]) if hits.size else None


def running_mean_ratio(values: Sequence[float], window: int = 10, warmup: int = 1) -> np.ndarray:
    """Lightning ``SpikeDetection``'s statistic: ``|x_t - mean| / |mean|`` over the previous ``window`` values, when
    ``x_t`` is not better (lower) than ``x_{t-1}``, else 0; infinite for a non-finite value; 0 before ``warmup``.

    Lightning raises at the first spike and updates its mean only with non-spikes, so before the first alarm at any
    threshold the mean is the plain mean of the previous values: this replay is exact for the first alarm.

    Example:
        >>> [round(float(v), 2) for v in running_mean_ratio([1.0, 1.0, 4.0, 1.0], window=2)]
        [0.0, 0.0, 3.0, 0.0]
    """
    v = np.asarray(values, dtype=np.float64)
    out = np.zeros(len(v))
    for t in range(max(warmup, 1), len(v)):
        x = v[t]
        if not math.isfinite(x):
            out[t] = math.inf
            continue
        if x <= v[t - 1]:
            continue
        past = v[max(0, t - window) : t]
        past = past[np.isfinite(past)]
        if past.size == 0:
            continue
        mean = float(past.mean())
        out[t] = abs(x - mean) / max(abs(mean), 1e-12)
    return out


def mad_score(values: Sequence[float], window: int = 200) -> np.ndarray:
    """``(x_t - median) / MAD`` over the previous ``window`` values (0 before ``window``; inf if not finite).

    Example:
        >>> float(mad_score([1.0, 1.1, 0.9, 1.0, 5.0], window=3)[-1]) > 6
        True
    """
    v = np.asarray(values, dtype=np.float64)
    med, mad = rolling_median_mad(v, window)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (v - med) / np.maximum(mad, 1e-12 * np.abs(med) + 1e-30)
    out = np.where(np.isfinite(med), out, 0.0)
    return np.where(np.isfinite(v), np.nan_to_num(out, nan=0.0), math.inf)


def ema_zscore(values: Sequence[float], alpha: float = 0.97, warmup: int = 25) -> np.ndarray:
    """ZClip's statistic: ``(x_t - mu) / sigma`` against an EMA mean and variance (``alpha``) of the values before
    ``t``; 0 during ``warmup``, inf for a non-finite value.

    Example:
        >>> z = ema_zscore([1.0, 1.1] * 20 + [3.0], warmup=5)
        >>> bool(z[-1] > 10), float(z[3])
        (True, 0.0)
    """
    v = np.asarray(values, dtype=np.float64)
    out = np.zeros(len(v))
    mu, var = math.nan, 0.0
    for t, x in enumerate(v):
        if not math.isfinite(x):
            out[t] = math.inf
            continue
        if t >= warmup and math.isfinite(mu):
            out[t] = (x - mu) / max(math.sqrt(var), 1e-12 * abs(mu) + 1e-30)
        if math.isnan(mu):
            mu = x
        else:
            diff = x - mu
            mu += (1 - alpha) * diff
            var = alpha * (var + (1 - alpha) * diff * diff)
    return out


def rise_score(values: Sequence[float], *, skip: int = 3, baseline_checks: int = 3, patience: int = 2) -> np.ndarray:
    """The monitor's rise rule as a statistic: at each check, the smallest rise over the baseline among the last
    ``patience`` checks (the rule alarms at threshold h when all of them rose by more than h): the monitor's rise rule.

    Example:
        >>> [round(float(v), 2) for v in rise_score([0.9, 0.1, 0.1, 0.2, 0.5, 0.5, 0.5], skip=1)]
        [-inf, -inf, -inf, -inf, -inf, 0.4, 0.4]
    """
    v = np.asarray(values, dtype=np.float64)
    out = np.full(len(v), -math.inf)
    first = skip + baseline_checks
    if len(v) > first:
        base = float(np.median(v[skip:first]))
        rise = v - base
        for i in range(first, len(v)):
            window = rise[max(first, i - patience + 1) : i + 1]
            out[i] = float(window.min()) if len(window) == patience else -math.inf
    return np.where(np.isfinite(v), out, math.inf)


def patience_count(evals: Sequence[tuple[int, float]], *, mode: str = "min", min_delta: float = 0.0) -> np.ndarray:
    """``EarlyStopping``'s wait count at each evaluation (inf for a non-finite value); it alarms at ``patience``.

    Example:
        >>> patience_count([(0, 1.0), (10, 0.9), (20, 0.95), (30, 0.91), (40, 0.92)]).tolist()
        [0.0, 0.0, 1.0, 2.0, 3.0]
    """
    out = np.zeros(len(evals))
    best, wait = math.nan, 0
    for i, (_, value) in enumerate(evals):
        value = float(value)
        if not math.isfinite(value):
            out[i] = math.inf
            continue
        better = math.isnan(best) or (value < best - min_delta if mode == "min" else value > best + min_delta)
        if better:
            best, wait = value, 0
        else:
            wait += 1
        out[i] = wait
    return out


#: The false-alarm rate detectors are calibrated to.
ALPHA = 0.05


def calibrated_threshold(maxima: Sequence[float], alpha: float = ALPHA, *, exposure: float | None = None) -> float:
    """The smallest threshold at which at most ``alpha`` of the negatives alarm (their maxima reach it), or, given
    ``exposure`` (e.g. the negatives' healthy steps over 10,000), at most ``alpha x exposure`` of them.

    Example:
        >>> calibrated_threshold([0.1, 0.2, 0.3, 0.9], alpha=0.25)  # one in four may alarm: just above 0.3
        0.30000000000000004
        >>> calibrated_threshold([0.1, 0.2, 0.3, 0.9], alpha=0.05, exposure=10.0)  # 0.05 per 10,000 steps, of 100,000
        0.9000000000000001
    """
    allowed = math.floor(alpha * (len(maxima) if exposure is None else exposure) + 1e-9)
    ordered = sorted(maxima, reverse=True)
    if allowed >= len(ordered):
        return -math.inf
    return float(np.nextafter(ordered[allowed], math.inf))
