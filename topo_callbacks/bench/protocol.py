"""The benchmark's protocol: ground truth, detectors, leave-one-family-out calibration, scoring with intervals.

Pre-registered, the same for every family and detector:

- **Ground truth** ``t_c``: the first evaluation at which the task metric is at least 5 points (accuracy) or 10%
  (perplexity) worse than its best so far, and stays so for 3 evaluations; evaluations in the first 10% of the run
  (warm-up) are not counted, as reference or as drop, except from the fork ``t0`` on: the warm-up ends at 10% of
  the run or at ``t0``, whichever comes first (a family whose switch flips earlier than 10% of the run is measured
  against its metric at the fork).
- **Runs.** A *failure run* is the switched arm of a failure family whose metric dropped after the fork
  (``t_c >= t0``). A *clean run* is a healthy twin (of any family) or either arm of a control whose metric did not
  drop. Arms that did not behave as designed (a failure arm without a drop after ``t0``, a clean arm whose metric
  dropped anyway) are reported in the verification and not scored: an alarm there is neither a hit nor a false
  alarm.
- **Outcomes.** In a failure run an alarm in ``[t0, t_c)`` is a *detection* (lead ``t_c - alarm``), at or after
  ``t_c`` is *late*, before ``t0`` is a *false alarm before the fork*. Any alarm in a clean run is a *false alarm*.
- **Calibration.** A detector is a statistic series; at threshold h it alarms at the first point where the
  statistic reaches h. "Calibrated" sets h on calibration seeds to the smallest value at which at most
  ``alpha`` (5%) of the calibration negatives (clean runs, and failure runs up to their fork) alarm: every
  calibrated detector is then compared at the same false-alarm rate. "Stock" keeps the rule's usual setting.
- **Leave one family out.** For failure family F, everything fit (thresholds, the learned CI weights) uses the
  calibration seeds of the other families and the controls only; F's test seeds are then scored. False alarms
  on clean test runs are counted at the threshold fit on every family's calibration seeds (the one a user would
  get); each family's own healthy twins are also scored at its held-out threshold.
- **Intervals.** Detection rate: 95% Clopper-Pearson interval. False-alarm rate: its 95% Clopper-Pearson upper
  bound. Median lead: a 95% percentile-bootstrap interval over runs (2000 resamples, seeded).
- **Curves.** Each detector's threshold swept over the test runs: detection rate against false-alarm rate.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from topo_callbacks.bench.cusum import (
    DEFAULT_CANDIDATES,
    PER_STEPS,
    check_steps,
    fit_calibration,
    fused_series,
    host_batch_flushes,
    replay_channels,
    replay_episodes,
)
from topo_callbacks.bench.detectors import (
    ALPHA,
    calibrated_threshold,
    channel_series,
    drop_step,
    ema_zscore,
    first_at_or_above,
    mad_score,
    patience_count,
    rise_score,
    running_mean_ratio,
)
from topo_callbacks.bench.families import FAMILIES
from topo_callbacks.bench.record import RunRecord
from topo_callbacks.core.detector import CHANNELS, DetectorCalibration
from topo_callbacks.functional.collapse import TERMS, resolve_weights

__all__ = ["ALPHA", "DETECTORS", "Detector", "analyse", "clopper_pearson", "ground_truth", "holdout_calibration"]

Series = tuple[np.ndarray, np.ndarray]


#: Evaluations before this share of the run (or before the fork, if that comes first) are not a reference for the
#: drop (see `ground_truth`).
WARMUP = 0.1


def warmup_end(rec: RunRecord) -> float:
    """The first step whose evaluation counts for the ground truth: 10% of the run, or the fork if that is earlier."""
    return min(WARMUP * rec.steps, rec.t0)


def ground_truth(rec: RunRecord) -> int | None:
    """``t_c``: the first evaluation 5 points (accuracy) or 10% (perplexity) worse than the best so far, for 3 evals;
    evaluations before ``WARMUP`` of the run are left out (a kNN probe of a barely trained self-supervised network
    can peak by chance at steps 50-150 and then dip; with them, 13 of 15 unscored test runs of the first full run
    were such "drops" before the fork, in both arms), unless the fork comes first: then evaluations count from the
    fork on (the evaluation at ``t0`` is the reference a failure that starts early is measured against)."""
    fam = FAMILIES[rec.family]
    metric = [(s, m) for s, m, _ in rec.evals if s >= warmup_end(rec)]
    if fam.metric_mode == "min":
        return drop_step(metric, mode="min", relative=0.1)
    return drop_step(metric, mode="max", points=5.0)


def is_failure(rec: RunRecord) -> bool:
    return FAMILIES[rec.family].kind == "failure" and rec.arm == "failure"


def is_scored(rec: RunRecord, t_c: int | None) -> bool:
    """A failure arm whose metric dropped after the fork, or a clean arm whose metric did not drop."""
    return (t_c is not None and t_c >= rec.t0) if is_failure(rec) else t_c is None


# ---------------------------------------------------------------------------------------------------- detectors
@dataclass(frozen=True)
class Detector:
    """A replayable rule: ``series(run) -> (steps, statistic)``, its stock threshold (None: none, calibrate only),
    what it reads (``"step"``, ``"check"`` or ``"eval"``: its cost) and a one-line description."""

    name: str
    series: Callable[[RunRecord], Series]
    stock: float | None
    reads: str
    description: str
    calibrate: bool = True


def _per_step(values: Callable[[RunRecord], Sequence[float]], stat: Callable[[Sequence[float]], np.ndarray]) -> Any:
    def series(rec: RunRecord) -> Series:
        v = values(rec)
        return np.arange(1, len(v) + 1), stat(v)

    return series


def _checks(weights: Mapping[str, float]) -> Callable[[RunRecord], Series]:
    w = resolve_weights(dict(weights))

    def series(rec: RunRecord) -> Series:
        steps = np.array([int(c["step"]) for c in rec.checks], dtype=np.int64)
        return steps, rise_score(channel_series(rec.checks, w))

    return series


def _val_patience(rec: RunRecord) -> Series:
    return np.array([s for s, _, _ in rec.evals]), patience_count([(s, v) for s, _, v in rec.evals])


BENCHMARK_WEIGHTS = {"betti": 1.0, "entropy": 1.0, "anisotropy": 1.0, "rank": 1.0}
PAPER = {"betti": 0.4, "entropy": 0.3, "anisotropy": 0.3}


def _detectors() -> dict[str, Detector]:
    out = [
        Detector("CI, benchmark weights, rise (alarm='rise')", _checks(BENCHMARK_WEIGHTS), 0.2, "check",
                 "CI = mean of the betti, entropy, anisotropy, rank terms; alarm 0.2 above baseline for 2 checks"),
        Detector("CI, paper weights, rise", _checks(PAPER), 0.15, "check",
                 "CI = 0.4 betti + 0.3 entropy + 0.3 anisotropy (the write-up's); the pre-benchmark rule"),
        Detector("RankMe alone, rise", _checks({"rank": 1.0}), None, "check", "effective-rank term, rise rule"),
        Detector("std of L2-normalised embeddings alone, rise", _checks({"std": 1.0}), None, "check",
                 "std term (lightly's SimSiam statistic), rise rule"),
        Detector("Betti term alone, rise", _checks({"betti": 1.0}), None, "check", "Betti term, rise rule"),
        Detector("persistence-entropy term alone, rise", _checks({"entropy": 1.0}), None, "check",
                 "entropy term, rise rule"),
        Detector("anisotropy term alone, rise", _checks({"anisotropy": 1.0}), None, "check",
                 "anisotropy term, rise rule"),
        Detector("loss spike (Lightning SpikeDetection)", _per_step(lambda r: r.loss, running_mean_ratio), 2.0,
                 "step", "loss above its running mean (10 steps) by rtol x the mean; stock rtol = 2"),
        Detector("loss spike (median + k MAD over 200 steps)", _per_step(lambda r: r.loss, mad_score), 6.0, "step",
                 "loss above the median of the previous 200 steps by k MADs; stock k = 6"),
        Detector("gradient-norm z-score (ZClip EMA)", _per_step(lambda r: r.grad_norm, ema_zscore), 2.5, "step",
                 "global gradient norm against an EMA mean/std (alpha 0.97, 25 warm-up steps); stock z = 2.5"),
        Detector("gradient-norm spike (median + k MAD over 200 steps)", _per_step(lambda r: r.grad_norm, mad_score),
                 None, "step", "global gradient norm above its 200-step median by k MADs"),
        Detector("EarlyStopping(patience=3) on the validation loss", _val_patience, 3.0, "eval",
                 "Lightning EarlyStopping's rule on the validation loss, stock patience 3", calibrate=False),
    ]  # fmt: skip
    return {d.name: d for d in out}


DETECTORS: dict[str, Detector] = _detectors()


# ---------------------------------------------------------------------------------------------------- scoring
def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact two-sided binomial interval for ``k`` successes out of ``n``.

    Example:
        >>> lo, hi = clopper_pearson(0, 60)
        >>> round(lo, 3), round(hi, 4)
        (0.0, 0.0596)
    """
    from scipy.stats import beta

    if n == 0:
        return 0.0, 1.0
    a = (1 - level) / 2
    lo = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    return lo, hi


def fa_upper_bound(k: int, n: int) -> float:
    """One-sided 95% Clopper-Pearson upper bound of a false-alarm rate (``3/n`` for ``k = 0``, about).

    Example:
        >>> round(fa_upper_bound(0, 60), 4)
        0.0487
    """
    from scipy.stats import beta

    if n == 0:
        return 1.0
    return 1.0 if k == n else float(beta.ppf(0.95, k + 1, n - k))


def bootstrap_median(values: Sequence[float], reps: int = 2000, seed: int = 0) -> tuple[float, float] | None:
    """95% percentile-bootstrap interval of the median (None for no values)."""
    if not values:
        return None
    rng = np.random.default_rng(seed)
    arr = np.asarray(values, dtype=np.float64)
    meds = np.median(rng.choice(arr, size=(reps, len(arr)), replace=True), axis=1)
    return float(np.percentile(meds, 2.5)), float(np.percentile(meds, 97.5))


class _Replay:
    """Each detector's statistic series per run, computed once; alarms at any threshold from them."""

    def __init__(self, records: Sequence[RunRecord], detectors: Mapping[str, Detector]) -> None:
        self.records = list(records)
        self.truth = {r.key: ground_truth(r) for r in records}
        self.series: dict[str, dict[str, Series]] = {
            name: {r.key: d.series(r) for r in records} for name, d in detectors.items()
        }

    def alarm(self, name: str, rec: RunRecord, threshold: float, before: int | None = None) -> int | None:
        steps, stat = self.series[name][rec.key]
        if before is not None:  # only the points up to the fork (false alarms before t0)
            keep = steps < before
            steps, stat = steps[keep], stat[keep]
        return first_at_or_above(steps, stat, threshold)

    def negative_maxima(self, name: str, records: Sequence[RunRecord]) -> list[float]:
        """Per negative unit (clean run, or a failure run up to its fork), the statistic's maximum."""
        out = []
        for rec in records:
            if not is_scored(rec, self.truth[rec.key]):
                continue
            steps, stat = self.series[name][rec.key]
            if is_failure(rec):
                stat = stat[steps < rec.t0]
            out.append(float(stat.max()) if stat.size else -math.inf)
        return out


def _outcome(replay: _Replay, name: str, rec: RunRecord, threshold: float) -> dict[str, Any]:
    alarm = replay.alarm(name, rec, threshold)
    if not is_failure(rec):
        return {"run": rec.key, "alarm": alarm, "clean": True, "false_alarm": alarm is not None}
    t_c = replay.truth[rec.key]
    early = alarm is not None and alarm < rec.t0
    detected = alarm is not None and not early and t_c is not None and alarm < t_c
    return {
        "run": rec.key,
        "alarm": alarm,
        "clean": False,
        "dropped": t_c is not None,
        "early": early,
        "detected": detected,
        "late": alarm is not None and not early and t_c is not None and alarm >= t_c,
        "lead": (t_c - alarm) if detected and t_c is not None and alarm is not None else None,
    }


def _summary(outcomes: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    fail = [o for o in outcomes if not o["clean"]]
    clean = [o for o in outcomes if o["clean"]]
    detected = [o for o in fail if o["detected"]]
    leads = [float(o["lead"]) for o in detected]
    fa = sum(o["false_alarm"] for o in clean)
    early = sum(o["early"] for o in outcomes if not o["clean"])
    det_ci = clopper_pearson(len(detected), len(fail))
    return {
        "detected": len(detected),
        "failure_runs": len(fail),
        "detection_rate": len(detected) / len(fail) if fail else None,
        "detection_ci95": list(det_ci) if fail else None,
        "late": sum(o["late"] for o in fail),
        "early": early,
        "false_alarms": fa,
        "clean_runs": len(clean),
        "fa_rate": fa / len(clean) if clean else None,
        "fa_upper95": fa_upper_bound(fa, len(clean)) if clean else None,
        "median_lead": statistics.median(leads) if leads else None,
        "median_lead_ci95": bootstrap_median(leads),
    }


def _curve(replay: _Replay, name: str, test: Sequence[RunRecord]) -> list[tuple[float, float, float]]:
    """(threshold, false-alarm rate, detection rate) over the test runs, for every distinct threshold."""
    scored = [r for r in test if is_scored(r, replay.truth[r.key])]
    clean = [r for r in scored if not is_failure(r)]
    fail = [r for r in scored if is_failure(r)]
    candidates = {float(v) for r in test for v in replay.series[name][r.key][1] if math.isfinite(v)}
    grid = sorted(candidates)
    if len(grid) > 200:
        grid = [grid[int(i)] for i in np.linspace(0, len(grid) - 1, 200)]
    out = []
    for h in [*grid, math.inf]:
        fa = sum(replay.alarm(name, r, h) is not None for r in clean) / max(len(clean), 1)
        det = sum(_outcome(replay, name, r, h)["detected"] for r in fail) / max(len(fail), 1)
        out.append((h, fa, det))
    return out


def _cost(detector: Detector, records: Sequence[RunRecord]) -> dict[str, float | None]:
    steps = sum(r.steps for r in records)
    step_s = sum(r.step_s for r in records)
    if detector.reads == "eval":
        spent = 0.0  # the user evaluates anyway
    elif detector.reads == "step":
        spent = sum(r.channels_s for r in records)  # every per-step channel recorded: an upper bound
    else:
        spent = sum(r.monitor_s for r in records)
    ms = 1000 * spent / max(steps, 1)
    return {"cost_ms_per_step": ms, "cost_pct_of_step": 100 * spent / step_s if step_s else None}


# --------------------------------------------------------------------------------------------- weight search
def _learn_weights(replay: _Replay, train: Sequence[RunRecord], alpha: float) -> dict[str, float]:
    """Equal weights over the subset of CI terms that detects most failure runs of ``train`` at a threshold
    calibrated to ``alpha`` on its negatives (ties: fewer terms)."""
    best: tuple[int, int, dict[str, float]] | None = None
    fail = [r for r in train if is_failure(r) and is_scored(r, replay.truth[r.key])]
    for size in range(1, len(TERMS) + 1):
        for subset in itertools.combinations(TERMS, size):
            w = dict.fromkeys(subset, 1.0)
            name = "weights:" + "+".join(subset)
            if name not in replay.series:
                series = _checks(w)
                replay.series[name] = {r.key: series(r) for r in replay.records}
            h = calibrated_threshold(replay.negative_maxima(name, train), alpha)
            hits = sum(_outcome(replay, name, r, h)["detected"] for r in fail)
            if best is None or (hits, -size) > (best[0], -best[1]):
                best = (hits, size, w)
    assert best is not None
    return best[2]


# ---------------------------------------------------------------------------------------------- CUSUM detector
CUSUM = "CUSUM detector (the monitor's default)"
#: The default detector, and ablations: which channels each may choose from (None: `DEFAULT_CANDIDATES`, what the
#: monitor computes live with its default source). Without the Betti channels, the cheap per-step channels only,
#: the embedding channels only; and two measurements of channels the default cannot use: the probe channels
#: (``source="probe"``) and every recorded channel (the update ratio, activation RMS and attention channels too).
CUSUM_VARIANTS: dict[str, list[str] | None] = {
    CUSUM: None,
    "CUSUM, without the Betti channels": [c for c in DEFAULT_CANDIDATES if c not in ("b0_fraction", "b1_fraction")],
    "CUSUM, loss and gradient norm only": ["loss", "loss_spike", "grad_norm"],
    "CUSUM, embedding channels only": [c for c in DEFAULT_CANDIDATES if CHANNELS[c].reads == "check"],
    "CUSUM, with the probe channels (source='probe')": [
        c for c in CHANNELS if CHANNELS[c].live and c != "curvature_ratio"
    ],
    "CUSUM, with the curvature channel (loss_fn=)": [*DEFAULT_CANDIDATES, "curvature_ratio"],
    "CUSUM, every recorded channel (some not computed live)": list(CHANNELS),
}
#: The false-alarm rates the monitor accepts (``false_alarm_rate=``): one calibration each.
SHIPPED_RATES = (0.01, 0.02, 0.05, 0.1, 0.2)


def cusum_grids(rec: RunRecord) -> dict[str, np.ndarray]:
    """Every recorded channel's CUSUM statistic on the run's step grid, and the absolute rules' level
    (`topo_callbacks.bench.cusum.replay_channels`)."""
    return replay_channels(rec)


def fit_detector(
    train: Sequence[RunRecord],
    grids: Mapping[str, Mapping[str, np.ndarray]],
    truth: Mapping[str, int | None],
    alpha: float,
    fit_on: str = "",
    candidates: Sequence[str] | None = None,
) -> DetectorCalibration:
    """The detector's calibration fit on ``train`` (scored runs only; see `fit_calibration`): ``alpha`` false alarms
    per `PER_STEPS` healthy optimizer steps."""
    runs = [r for r in train if is_scored(r, truth[r.key])]
    return fit_calibration(
        [dict(grids[r.key]) for r in runs],
        [r.t0 - 1 if is_failure(r) else None for r in runs],
        [(r.t0, t) if is_failure(r) and (t := truth[r.key]) is not None else None for r in runs],
        alpha,
        fit_on=fit_on,
        candidates=candidates,
        per_steps=PER_STEPS,
    )


def holdout_calibration(
    calibration_runs: Sequence[RunRecord],
    grids: Mapping[str, Mapping[str, np.ndarray]],
    truth: Mapping[str, int | None],
    family: str,
    alpha: float = ALPHA,
    candidates: Sequence[str] | None = None,
) -> DetectorCalibration:
    """The detector's calibration with ``family`` held out: `fit_detector` on the calibration-seed runs of every other
    family and control (``family="all"``: on every family's, the fit the monitor ships). Pass calibration seeds only;
    ``grids`` holds `cusum_grids` of each run, ``truth`` its `ground_truth`.

    Example:
        >>> from topo_callbacks.bench.record import RunRecord
        >>> def run(family, seed):
        ...     return RunRecord(family, "healthy", seed, 300, 100, [1.0 + 0.01 * (s % 7) for s in range(300)],
        ...                      [2.0] * 300, [0.1] * 300, [[0.0]] * 300, [[1.0]] * 300, [0.0] * 300, [0.0] * 300,
        ...                      [0.0] * 300, [], [], None)
        >>> runs = [run("batch_size", 0), run("classifier_lr_decay", 0)]
        >>> grids = {r.key: cusum_grids(r) for r in runs}
        >>> cal = holdout_calibration(runs, grids, dict.fromkeys(grids), "batch_size")
        >>> cal.fit_on
        'calibration seeds of the families other than batch_size'
    """
    where = "every family" if family == "all" else f"the families other than {family}"
    train = [r for r in calibration_runs if r.family != family]
    return fit_detector(train, grids, truth, alpha, fit_on=f"calibration seeds of {where}", candidates=candidates)


def _fused(grids: Mapping[str, Mapping[str, np.ndarray]], cal: DetectorCalibration) -> Callable[[RunRecord], Series]:
    return lambda rec: fused_series(dict(grids[rec.key]), cal)


# ---------------------------------------------------------------------------------------------------- analysis
def analyse(
    records: Sequence[RunRecord],
    calibration_seeds: Sequence[int],
    *,
    alpha: float = ALPHA,
    detectors: Mapping[str, Detector] | None = None,
    learn_weights: bool = True,
) -> dict[str, Any]:
    """Score every detector on the test seeds, leave-one-family-out; see the module docstring for the protocol."""
    dets = dict(detectors or DETECTORS)
    replay = _Replay(records, dets)
    cal = [r for r in records if r.seed in calibration_seeds]
    test = [r for r in records if r.seed not in calibration_seeds and is_scored(r, replay.truth[r.key])]
    failure_families = sorted({r.family for r in records if FAMILIES[r.family].kind == "failure"})
    if learn_weights and failure_families:
        # the learned CI: weights (and threshold) fit per held-out family on the others' calibration seeds
        name = "CI, weights learned on the other families, rise"
        learned = {f: _learn_weights(replay, [r for r in cal if r.family != f], alpha) for f in failure_families}
        learned["all"] = _learn_weights(replay, cal, alpha)
        for key, w in learned.items():
            series = _checks(w)
            replay.series[f"{name}|{key}"] = {r.key: series(r) for r in records}
        why = "equal weights over the subset of CI terms that detects most other-family failures"
        dets[name] = Detector(name, _checks(learned["all"]), None, "check", why)
    else:
        learned = {}

    calibrations: dict[str, Any] = {}
    shipped: list[dict[str, Any]] = []
    if failure_families:
        # the default detector: channels, normalisers and threshold fit per held-out family on the others'
        # calibration seeds (and on every family's for the clean runs); its statistic is over the threshold, so the
        # fitted rule alarms at 1 in every fold
        grids = {r.key: cusum_grids(r) for r in records}
        cusums = {}
        for variant, candidates in CUSUM_VARIANTS.items():
            for fold in (*failure_families, "all"):
                fitted = holdout_calibration(cal, grids, replay.truth, fold, alpha, candidates)
                if variant == CUSUM:
                    calibrations[fold] = fitted.as_dict()
                if fold == "all":
                    full = fitted
                replay.series[f"{variant}|{fold}"] = {r.key: fused_series(grids[r.key], fitted) for r in records}
            pool = "the monitor's live channels" if candidates is None else ", ".join(candidates)
            why = (
                f"robust CUSUM per channel ({pool}) and the absolute rules, fused and calibrated to {alpha:g} false"
                " alarms per 10,000 healthy steps on the other families' calibration runs (channels chosen there)"
            )
            cusums[variant] = Detector(variant, _fused(grids, full), 1.0, "step", why, calibrate=False)
        # what the monitor ships (`topo_callbacks.core._calibration`, written by scripts/write_calibration.py): the
        # fit on every family's calibration seeds, at each false-alarm rate a user may ask for
        shipped = [
            fit_detector(cal, grids, replay.truth, rate, fit_on="calibration seeds of every family").as_dict()
            for rate in SHIPPED_RATES
        ]
        # the rollback arm (`topo_callbacks.bench.recovery`) runs the default live on every family's test seeds, the
        # controls' too: each with its own family held out, as the failure families are scored
        for fold in sorted({r.family for r in records} - set(failure_families)):
            calibrations[fold] = holdout_calibration(cal, grids, replay.truth, fold, alpha).as_dict()
        dets = {**cusums, **dets}

    def series_name(det: str, fold: str) -> str:
        return f"{det}|{fold}" if det.startswith("CI, weights learned") or det in CUSUM_VARIANTS else det

    results: dict[str, Any] = {
        "alpha": alpha, "detectors": {}, "learned_weights": learned, "detector_calibrations": calibrations,
        "shipped_calibrations": shipped,
    }  # fmt: skip
    for name, det in dets.items():
        settings: list[tuple[str, float | None]] = [("stock", det.stock)] if det.stock is not None else []
        if det.calibrate:
            settings.append(("calibrated", None))
        for setting, stock in settings:
            label = f"{name} [{setting}]"
            thresholds: dict[str, float] = {}
            per_family: dict[str, Any] = {}
            outcomes: list[dict[str, Any]] = []
            for fam in failure_families:
                sname = series_name(name, fam)
                if stock is not None:
                    h = stock
                else:
                    others = [r for r in cal if r.family != fam]
                    h = calibrated_threshold(replay.negative_maxima(sname, others), alpha)
                thresholds[fam] = h
                fam_runs = [r for r in test if r.family == fam]
                fam_out = [_outcome(replay, sname, r, h) for r in fam_runs]
                per_family[fam] = _summary(fam_out)
                outcomes += [o for o in fam_out if not o["clean"]]
            sname = series_name(name, "all")
            h_all = stock if stock is not None else calibrated_threshold(replay.negative_maxima(sname, cal), alpha)
            thresholds["all"] = h_all
            clean_out = [_outcome(replay, sname, r, h_all) for r in test if not is_failure(r)]
            for fam in sorted({r.family for r in test if FAMILIES[r.family].kind == "control"}):
                per_family[fam] = _summary([o for o in clean_out if o["run"].startswith(fam + "/")])
            pooled = _summary(outcomes + clean_out)
            results["detectors"][label] = {
                "detector": name,
                "setting": setting,
                "reads": det.reads,
                "description": det.description,
                "thresholds": thresholds,
                "pooled": pooled,
                "per_family": per_family,
                "alarms": {o["run"]: o["alarm"] for o in outcomes + clean_out},
                "curve": _curve(replay, sname, test),
                **_cost(det, test),
            }
    if failure_families:
        results["heldout_false_alarms"] = heldout_false_alarms(test, grids, calibrations)
    if "all" in calibrations:
        default_cal = DetectorCalibration.from_dict(calibrations["all"])
        results["healthy_steps"] = healthy_step_alarms(test, replay.truth, default_cal)
        # an overhead budget (`max_overhead`) spaces the checks out: the same calibration with fewer checks
        results["check_spacing"] = spaced_checks(test, replay.truth, default_cal)
        # on a GPU the per-step values reach the host in batches: the same alarms, known a few steps later
        results["batched_reads"] = batched_reads(test, replay.truth, default_cal)
    results["runs"] = [
        {"run": r.key, "family": r.family, "arm": r.arm, "seed": r.seed, "t0": r.t0, "steps": r.steps,
         "split": "calibration" if r.seed in calibration_seeds else "test", "t_c": replay.truth[r.key],
         "failure": is_failure(r), "scored": is_scored(r, replay.truth[r.key]), "wall_s": r.wall_s,
         "step_ms": 1000 * r.step_s / max(r.steps, 1),
         "monitor_alarm_step": r.monitor_alarm_step}
        for r in records
    ]  # fmt: skip
    results["verification"] = verify(records, replay.truth)
    return results


def heldout_false_alarms(
    test: Sequence[RunRecord], grids: Mapping[str, Mapping[str, np.ndarray]], calibrations: Mapping[str, Any]
) -> dict[str, Any]:
    """False alarms of the default detector on kinds of runs its fit did not see: each clean test run scored with the
    calibration fit with its own family held out (a control's arms with that control held out, a failure family's
    healthy twins with that family held out). The pooled FA column scores clean runs with the fit on every family's
    calibration seeds, the one a user gets, which has seen runs like them (other seeds of the same family); this is
    the rate on a kind of run no family of the benchmark was like. ``calibrations`` maps a family to its held-out
    `DetectorCalibration.as_dict`; runs of a family without one are skipped.

    Example:
        >>> heldout_false_alarms([], {}, {})
        {'false_alarms': 0, 'clean_runs': 0, 'fa_upper95': 1.0, 'alarms': []}
    """
    alarms: list[str] = []
    n = 0
    for rec in test:
        if is_failure(rec) or rec.family not in calibrations:
            continue
        n += 1
        fold = DetectorCalibration.from_dict(calibrations[rec.family])
        _, stat = fused_series(dict(grids[rec.key]), fold)
        above = np.flatnonzero(stat >= 1.0)
        if above.size:
            step = int(above[0]) + 1
            channel = next((e["channel"] for e in replay_episodes(rec, fold) if int(e["start"]) == step), "?")
            alarms.append(f"{rec.key}@{step} ({channel})")
    return {"false_alarms": len(alarms), "clean_runs": n, "fa_upper95": fa_upper_bound(len(alarms), n),
            "alarms": alarms}  # fmt: skip


def rate_upper_bound(k: int, exposure: float, level: float = 0.95) -> float:
    """One-sided ``level`` upper bound of a Poisson rate with ``k`` events over ``exposure`` (Garwood):
    ``chi2.ppf(level, 2k + 2) / 2 / exposure``; 3.0 / exposure for no event (the rule of three).

    Example:
        >>> round(rate_upper_bound(0, 1.0), 3), round(rate_upper_bound(2, 10.0), 3)
        (2.996, 0.63)
    """
    from scipy.stats import chi2

    return float(chi2.ppf(level, 2 * k + 2)) / 2.0 / exposure


def healthy_step_alarms(
    records: Sequence[RunRecord], truth: Mapping[str, int | None], cal: DetectorCalibration
) -> dict[str, Any]:
    """False alarms per 100,000 healthy optimizer steps of the live detector with calibration ``cal`` (re-armed after
    each episode): every episode of a clean run, and every episode that starts before the fork of a failure run,
    over their healthy steps (a clean run's all, a failure run's up to ``t0 - 1``), per family and pooled, with the
    one-sided 95% upper bound of the rate."""
    per_family: dict[str, list[int]] = {}
    where: list[str] = []
    for rec in records:
        if not is_scored(rec, truth[rec.key]):
            continue
        healthy = rec.t0 - 1 if is_failure(rec) else rec.steps
        alarms = [e for e in replay_episodes(rec, cal) if int(e["start"]) <= healthy]
        row = per_family.setdefault(rec.family, [0, 0])
        row[0] += len(alarms)
        row[1] += healthy
        where += [f"{rec.key}@{e['start']} ({e['channel']}, {e['kind']})" for e in alarms]
    k = sum(r[0] for r in per_family.values())
    steps = sum(r[1] for r in per_family.values())
    return {
        "alarms": k,
        "steps": steps,
        "per_100k": 1e5 * k / max(steps, 1),
        "upper_95_per_100k": 1e5 * rate_upper_bound(k, max(steps, 1)),
        "per_family": {f: {"alarms": a, "steps": n} for f, (a, n) in sorted(per_family.items())},
        "where": where,
    }


def spaced_checks(
    records: Sequence[RunRecord],
    truth: Mapping[str, int | None],
    cal: DetectorCalibration,
    strides: Sequence[int | tuple[int, ...]] = (
        1,
        2,
        4,
        10,
        50,
        (1, 2),
        (1, 4),
        (1, 8),
        (10, 2),
        (10, 4),
        (10, 8),
        (1, 1, 2),
        (1, 1, 4),
        (1, 1, 8),
        (10, 1, 4),
        (50, 1, 4),
    ),
    pull: bool = True,
) -> dict[str, Any]:
    """The live detector with calibration ``cal`` when an overhead budget spaces the checks ``k`` times further apart
    (every k-th recorded check kept), for each ``k`` in ``strides``, and for each pair ``(k, s)`` the checks ``k``
    times further apart and the per-step channels read at every ``s``-th step only (keyed ``"k/s"``), and for each
    triple ``(k, s, g)`` that with the gradient norm read at every ``g``-th read only (keyed ``"k/s/g"``): failure runs
    detected before their metric dropped (first episode at or after the fork and before the drop), clean runs with
    an alarm, alarms per 100,000 healthy steps. Pass the test seeds' records: ``cal`` is not refit per stride.
    ``pull``: a check the detector asks for is brought forward, as the monitor does (`replay_episodes`)."""
    out: dict[str, Any] = {}
    for setting in strides:
        k, s, g = (*setting, 1, 1)[:3] if isinstance(setting, tuple) else (setting, 1, 1)
        detected = failures = false_alarms = clean = alarms = steps = 0
        for rec in records:
            t_c = truth[rec.key]
            if not is_scored(rec, t_c):
                continue
            episodes = replay_episodes(rec, cal, check_stride=k, step_stride=s, grad_stride=g, pull=pull)
            healthy = rec.t0 - 1 if is_failure(rec) else rec.steps
            alarms += sum(int(e["start"]) <= healthy for e in episodes)
            steps += healthy
            if is_failure(rec):
                failures += 1
                first = min((int(e["start"]) for e in episodes), default=None)
                detected += first is not None and t_c is not None and rec.t0 <= first < t_c
            else:
                clean += 1
                false_alarms += bool(episodes)
        out["/".join(map(str, setting)) if isinstance(setting, tuple) else str(k)] = {
            "detected": detected,
            "failures": failures,
            "false_alarms": false_alarms,
            "clean": clean,
            "healthy_alarms": alarms,
            "healthy_steps": steps,
            "per_100k": 1e5 * alarms / max(steps, 1),
        }
    return out


def batched_reads(
    records: Sequence[RunRecord],
    truth: Mapping[str, int | None],
    cal: DetectorCalibration,
    everies: Sequence[int] = (2, 4, 8),
    host_every: int = 8,
) -> dict[str, Any]:
    """What reading the per-step values in batches costs detection: on a GPU the monitor reads the loss and the
    gradient norm once per k steps (`topo_callbacks.core.step_reads.StepReads`; k in ``everies``; the default
    `DEVICE_READ_EVERY` is 2), so an alarm those values
    raise is known when its batch reaches the host, not at the step that caused it. The detector sees the same
    values in the same order (its episodes are `replay_episodes`' with every check and every step); what moves is the
    step at which the monitor warns or acts: the first batch read at or after the alarm's step (a check reads
    everything queued at once), then on one process the step after (the copy lands while the next step runs) and
    under DDP the next batch (every rank picks it up at a step they agree on). Per setting: failure runs whose first
    alarm is known before their metric dropped, and the median steps between the alarm's step and that. Clean runs
    are not affected (the same alarms, later). Assumed: the device keeps up with the host (a device running behind
    computes the values later anyway, and its copies land later: up to `MAX_IN_FLIGHT` batches); a step a loss
    scaler skipped, which the monitor reads at once where the flag is a number, is not modelled (the benchmark's
    failure runs skip none). The last row: a CPU monitor scoring its per-step values in batches of ``host_every``
    (`host_batch_flushes`), which scores at once what the fast rules need."""
    settings: dict[str, tuple[int, int | None]] = {"at the step": (1, None)}
    for every in everies:
        settings[f"1 read in {every}, one process"] = (every, 1)
        settings[f"1 read in {every}, DDP"] = (every, every)
    host = f"CPU, scored in batches of {host_every} (urgent values at once)"
    settings[host] = (host_every, 0)
    out: dict[str, Any] = {}
    firsts: list[tuple[RunRecord, int | None, int | None, list[int]]] = []
    for rec in records:
        t_c = truth[rec.key]
        if not is_failure(rec) or not is_scored(rec, t_c):
            continue
        episodes, flushes = host_batch_flushes(rec, cal, host_every)
        first = min((int(e["start"]) for e in episodes), default=None)
        firsts.append((rec, first, t_c, flushes))
    for label, (every, lag) in settings.items():
        detected, delays, lost = 0, [], []
        for rec, first, t_c, flushes in firsts:
            if first is None or t_c is None or first < rec.t0:
                continue
            if label == host:
                known = next((f for f in flushes if f >= first), rec.steps)
            else:
                known = first if lag is None else known_after_batched_reads(first, every, lag, check_steps(rec))
            if known < t_c:
                detected += 1
                delays.append(known - first)
            elif first < t_c:
                lost.append(rec.key)
        out[label] = {
            "detected": detected,
            "failures": len(firsts),
            "median_delay": statistics.median(delays) if delays else None,
            "max_delay": max(delays) if delays else None,
            "lost": lost,
        }
    return out


def known_after_batched_reads(step: int, every: int, lag: int, checks: Sequence[int]) -> int:
    """The step at which a monitor reading its per-step values in batches of ``every`` knows optimizer step
    ``step``'s values: batches run from step 1 and from the step after each check (a check reads everything queued
    at once); a batch is sent at its last step and known ``lag`` steps later, or at a check that comes first.

    Example:
        >>> known_after_batched_reads(10, 8, 1, checks=[50]), known_after_batched_reads(49, 8, 1, checks=[50])
        (17, 50)
        >>> known_after_batched_reads(51, 8, 8, checks=[50, 100])  # batches 51-58, 59-66, ...: sent at 58
        66
        >>> known_after_batched_reads(95, 8, 8, checks=[50, 100])  # sent at 98, picked up by the check at 100
        100
    """
    marks = sorted(c for c in checks if c >= 1)
    start = 1
    for check in marks:
        if check >= step:
            break
        start = check + 1
    boundary = start + -(-(step - start + 1) // every) * every - 1
    forced = next((c for c in marks if c >= step), None)
    if forced is not None and forced <= boundary:
        return forced
    return boundary + lag if forced is None else min(boundary + lag, forced)


def verify(records: Sequence[RunRecord], truth: Mapping[str, int | None]) -> dict[str, Any]:
    """Per failure family: in how many seeds the failure arm's metric dropped (after t0) and the healthy twin's
    did not; per control, how many arms dropped. A family is kept ("verified") when at least 3/4 of its failure
    arms dropped after t0 and at most 1/4 of its clean arms dropped."""
    out: dict[str, Any] = {}
    for fam in sorted({r.family for r in records}):
        runs = [r for r in records if r.family == fam]
        kind = FAMILIES[fam].kind
        if kind == "failure":
            fail = [r for r in runs if r.arm == "failure"]
            healthy = [r for r in runs if r.arm == "healthy"]
            t_c = {r.key: truth[r.key] for r in fail}
            dropped = [r for r in fail if (t := t_c[r.key]) is not None and t >= r.t0]
            out[fam] = {
                "kind": kind,
                "seeds": len(fail),
                "failure_dropped": len(dropped),
                "dropped_before_t0": sum((t := t_c[r.key]) is not None and t < r.t0 for r in fail),
                "healthy_dropped": sum(truth[r.key] is not None for r in healthy),
                "verified": len(dropped) >= 0.75 * len(fail)
                and sum(truth[r.key] is not None for r in healthy) <= 0.25 * len(healthy),
            }
        else:
            dropped_clean = sum(truth[r.key] is not None for r in runs)
            out[fam] = {"kind": kind, "runs": len(runs), "dropped": dropped_clean,
                        "verified": dropped_clean <= 0.25 * len(runs)}  # fmt: skip
    return out
