"""The detector's statistics: robust standardisation against a run's own recent past, and a two-sided CUSUM.

Pure functions on plain floats (a channel is a scalar series: a loss, a gradient norm, a check's term), so the same
code runs live in `topo_callbacks.core.detector` one value at a time and offline on a recorded series in the
benchmark. The live state (reference windows, accumulators) lives in ``core``.

A channel value ``x_t`` is scored against the ``window`` values before it (its *reference*): ``z_t = (x_t - m) / s``
with ``m`` the reference's median and ``s`` its MAD scaled to a normal standard deviation (1.4826 MAD), floored at
``floor`` so that a flat reference (a Betti number that sat at 0) does not turn every move into an infinite score.
Norms are scored on a log scale (``log=True``): a gradient norm that doubles moves as much at any size. ``z`` is
clipped to ``[-clip, clip]``: one healthy outlier adds at most ``clip`` to the CUSUM, while a sustained departure
adds up. A non-finite value scores infinity (an immediate alarm).

The two-sided CUSUM (Page 1954) accumulates departures larger than the allowance ``k`` (in standard deviations):
``S+_t = max(0, S+_{t-1} + z_t - k)`` and ``S-_t = max(0, S-_{t-1} - z_t - k)``; the channel's statistic is
``max(S+, S-)`` (or one of them, for a channel with one bad direction). A small consistent shift, invisible step by
step, crosses a threshold ``h`` after about ``h / (shift - k)`` points.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence

import numpy as np

#: A scalar series: a list of floats or a 1-d array.
Series = Sequence[float] | np.ndarray

__all__ = [
    "MAD_TO_STD",
    "channel_scale",
    "cusum",
    "cusum_update",
    "layer_shifts",
    "robust_location_scale",
    "robust_zscore",
    "rolling_robust_zscores",
    "sorted_location_scale",
    "standardized_cusum",
]

#: A normal distribution's standard deviation over its median absolute deviation.
MAD_TO_STD = 1.4826


def robust_location_scale(reference: Series, floor: float) -> tuple[float, float]:
    """Median and ``1.4826 x`` MAD of the finite values of ``reference``, the scale floored at ``floor``.

    Example:
        >>> robust_location_scale([1.0, 2.0, 3.0, 4.0, 100.0], floor=0.1)
        (3.0, 1.4826)
        >>> robust_location_scale([0.0, 0.0, 0.0], floor=0.5)
        (0.0, 0.5)
    """
    return sorted_location_scale(sorted(v for v in reference if math.isfinite(v)), floor)


def sorted_location_scale(ordered: Sequence[float], floor: float) -> tuple[float, float]:
    """`robust_location_scale` of finite values already in ascending order, in time linear in half their number: the
    detector keeps its windows sorted and calls this at every optimizer step (numpy's per-call overhead on ~200
    values was most of the monitor's per-step cost; the results are the same).

    Example:
        >>> sorted_location_scale([1.0, 2.0, 3.0, 4.0, 100.0], floor=0.1)
        (3.0, 1.4826)
    """
    n = len(ordered)
    if n == 0:
        return math.nan, math.nan
    half = n // 2
    med = float(ordered[half]) if n % 2 else (ordered[half - 1] + ordered[half]) / 2.0
    # the deviations |v - med| are two ascending runs, med - v leftwards from the middle and v - med rightwards: their
    # middle order statistics by a binary search over how many come from the left run (logarithmic, no merge)
    split = bisect.bisect_right(ordered, med)
    if n % 2:
        mad = _kth_deviation(ordered, med, split, half)
    else:
        mad = (_kth_deviation(ordered, med, split, half - 1) + _kth_deviation(ordered, med, split, half)) / 2.0
    return med, max(MAD_TO_STD * mad, floor)


def _kth_deviation(ordered: Sequence[float], med: float, split: int, k: int) -> float:
    """The ``k``-th smallest (from 0) of ``|v - med|`` over ``ordered``, whose first ``split`` values are at most
    ``med``: take ``x`` deviations from the left run (``med - ordered[split - 1 - a]``, ascending in ``a``) and
    ``k + 1 - x`` from the right one (``ordered[split + b] - med``). Written without helper calls: the detector runs it
    twice per channel at every optimizer step."""
    right_len = len(ordered) - split
    lo, hi = max(0, k + 1 - right_len), min(k + 1, split)
    while True:
        x = (lo + hi) // 2
        # too few from the left: its x-th deviation is smaller than the right run's (k - x)-th
        if x < hi and ordered[split + k - x] - med > med - ordered[split - 1 - x]:
            lo = x + 1
        # too many: its (x - 1)-th is larger than the right run's (k + 1 - x)-th
        elif x > lo and med - ordered[split - x] > ordered[split + k + 1 - x] - med:
            hi = x - 1
        else:
            left = med - ordered[split - x] if x > 0 else -math.inf
            right = ordered[split + k - x] - med if x <= k else -math.inf
            return max(left, right)


def robust_zscore(value: float, reference: Series, *, floor: float, clip: float = math.inf) -> float:
    """``value`` standardised against ``reference`` (see the module docstring); 0 when the reference is empty,
    infinite when ``value`` is not finite.

    Example:
        >>> robust_zscore(7.0, [1.0, 2.0, 3.0, 4.0, 100.0], floor=0.1, clip=2.0)
        2.0
        >>> robust_zscore(float("nan"), [1.0, 2.0], floor=0.1)
        inf
    """
    if not math.isfinite(value):
        return math.inf
    med, scale = robust_location_scale(reference, floor)
    if math.isnan(med):
        return 0.0
    return float(min(max((value - med) / scale, -clip), clip))


def cusum_update(s_pos: float, s_neg: float, z: float, k: float) -> tuple[float, float]:
    """One step of the two-sided CUSUM with allowance ``k``: returns the new ``(S+, S-)`` (both infinite for a
    non-finite score).

    Example:
        >>> cusum_update(0.0, 0.0, 2.0, 0.5)
        (1.5, 0.0)
        >>> cusum_update(1.5, 0.0, -2.0, 0.5)
        (0.0, 1.5)
    """
    if not math.isfinite(z):  # a non-finite value alarms on either side
        return math.inf, math.inf
    return max(0.0, s_pos + z - k), max(0.0, s_neg - z - k)


def cusum(z: Series, k: float) -> tuple[np.ndarray, np.ndarray]:
    """The two-sided CUSUM ``(S+, S-)`` of a series of scores.

    Example:
        >>> pos, neg = cusum([0.2, 1.0, 1.0, -3.0], k=0.5)
        >>> pos.tolist(), neg.tolist()
        ([0.0, 0.5, 1.0, 0.0], [0.0, 0.0, 0.0, 2.5])
    """
    pos = np.zeros(len(z))
    neg = np.zeros(len(z))
    sp = sn = 0.0
    for i, value in enumerate(z):
        sp, sn = cusum_update(sp, sn, float(value), k)
        pos[i], neg[i] = sp, sn
    return pos, neg


def standardized_cusum(
    values: Series,
    *,
    window: int,
    k: float,
    floor: float,
    clip: float = math.inf,
    log: bool = False,
    side: str = "both",
    min_reference: int | None = None,
) -> np.ndarray:
    """A channel's detector statistic at every point: each value scored against the ``window`` finite values before
    it (after at least ``min_reference`` of them, ``window`` by default; 0 before), then the two-sided CUSUM.
    ``side`` is ``"both"`` (``max(S+, S-)``), ``"up"`` (``S+``: only a rise is bad) or ``"down"`` (``S-``).

    Example:
        >>> values = [1.0, 1.1, 0.9, 1.0, 1.05, 0.95] * 5 + [1.6] * 4
        >>> s = standardized_cusum(values, window=20, k=0.5, floor=0.01, clip=8.0)
        >>> bool(s[:30].max() < 3.0), bool(s[-1] > 20.0)
        (True, True)
    """
    if side not in ("both", "up", "down"):
        raise ValueError(f"`side` must be 'both', 'up' or 'down'; got {side!r}.")
    z = rolling_robust_zscores(values, window=window, floor=floor, clip=clip, log=log, min_reference=min_reference)
    pos, neg = cusum(z, k)
    return np.maximum(pos, neg) if side == "both" else (pos if side == "up" else neg)


def rolling_robust_zscores(
    values: Series,
    *,
    window: int,
    floor: float,
    clip: float = math.inf,
    log: bool = False,
    min_reference: int | None = None,
) -> np.ndarray:
    """Each value scored by `robust_zscore` against the ``window`` finite values before it (0 until there are
    ``min_reference`` of them, ``window`` by default; infinite for a non-finite value). Vectorised: the same
    numbers as calling `robust_zscore` point by point, which is what the live detector does.

    Example:
        >>> rolling_robust_zscores([1.0, 2.0, 3.0, 10.0], window=3, floor=0.1).round(3).tolist()
        [0.0, 0.0, 0.0, 5.396]
    """
    need = window if min_reference is None else min_reference
    if not 1 <= need <= window:
        raise ValueError(f"`min_reference` must be in [1, window]; got {min_reference!r} with window={window}.")
    x = np.array([channel_scale(float(v), log) for v in values], dtype=np.float64)
    finite = np.isfinite(x)
    z = np.where(finite, 0.0, np.inf)
    where = np.flatnonzero(finite)
    fv = x[where]
    m = len(fv)
    for j in range(need, min(window, m)):  # fewer than `window` finite values so far
        z[where[j]] = robust_zscore(fv[j], fv[:j], floor=floor, clip=clip)
    if m > window:
        ref = np.lib.stride_tricks.sliding_window_view(fv[:-1], window)  # ref[i] precedes fv[i + window]
        med = np.median(ref, axis=1)
        scale = np.maximum(MAD_TO_STD * np.median(np.abs(ref - med[:, None]), axis=1), floor)
        z[where[window:]] = np.clip((fv[window:] - med) / scale, -clip, clip)
    return z


def channel_scale(x: float, log: bool) -> float:
    """``x`` on the scale a channel is scored on: itself, or its log (``-inf`` for ``x <= 0``, which alarms) for a
    norm. Non-finite values pass through.

    Example:
        >>> channel_scale(1.0, log=True), channel_scale(0.0, log=True), channel_scale(-2.0, log=False)
        (0.0, -inf, -2.0)
    """
    if not log or not math.isfinite(x):
        return x
    return math.log(x) if x > 0 else -math.inf


def layer_shifts(
    before: Mapping[str, Sequence[float]], after: Mapping[str, Sequence[float]], top: int = 3
) -> list[tuple[str, float]]:
    """The layers whose gradient norm moved most between a reference and a change: for each layer in both, the median
    of its norms in ``after`` over the median in ``before`` (a factor), ranked by how far the factor is from 1 on a
    log scale; the first ``top``. A layer with a 0 median on either side is ranked by the side that is not (0 -> 0 is
    no move); one whose gradient is now 0 has factor 0.

    Example:
        >>> before = {"fc1": [1.0, 1.1, 0.9], "fc2": [0.5, 0.5, 0.6], "head": [2.0, 2.0, 2.0]}
        >>> after = {"fc1": [1.0, 1.2], "fc2": [20.0, 30.0], "head": [0.2, 0.2]}
        >>> [(name, round(f, 2)) for name, f in layer_shifts(before, after, top=2)]
        [('fc2', 50.0), ('head', 0.1)]
    """
    tiny = 1e-30
    moved = []
    for name, ref in before.items():
        now = after.get(name)
        ref_values = [v for v in ref if math.isfinite(v)]
        now_values = [v for v in (now or ()) if math.isfinite(v)]
        if not ref_values or not now_values:
            continue
        ref_median, now_median = float(np.median(ref_values)), float(np.median(now_values))
        if ref_median <= 0.0 and now_median <= 0.0:
            continue
        factor = max(now_median, tiny) / max(ref_median, tiny)
        moved.append((abs(math.log(factor)), name, factor if now_median > 0.0 else 0.0))
    moved.sort(key=lambda m: (-m[0], m[1]))
    return [(name, factor) for _, name, factor in moved[: max(int(top), 0)]]
