"""Run the scenarios over seeds, replay every detector, choose thresholds on calibration seeds, report on test seeds.

Protocol (ARCHITECTURE section 9, `../shared/research/collapse_anchors.md` section 4.2):

- ground truth ``t_c``: the first evaluation at which the task metric is 5 points (accuracy) or 10% (perplexity)
  worse than its best so far and stays so for 3 evaluations;
- standard warning ``t_s``: the earliest of a loss spike (loss above the median of the previous 200 steps by 6
  MADs), ``EarlyStopping(patience=3)`` on the validation loss, and the metric drop ``t_c`` itself;
- a detector's alarm in a collapse arm is a *detection* when ``t0 <= alarm <= t_c``, *late* when after ``t_c``,
  a *false positive* when before ``t0``; any alarm in a healthy twin or a control run is a false positive;
- thresholds (and the chosen CI weights) maximise detection rate minus false-positive rate on the calibration
  seeds (ties: the larger threshold); every number reported is on the other seeds.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from topo_callbacks.bench.detectors import (
    channel_series,
    drop_step,
    patience_step,
    rise_step,
    rolling_median_mad,
    spike_step,
)
from topo_callbacks.bench.scenarios import SCENARIOS, RunRecord, run_scenario
from topo_callbacks.functional.collapse import PAPER_WEIGHTS, TERMS

__all__ = ["analyse", "ground_truth", "run_benchmark"]

RISE_GRID = (0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)
SPIKE_GRID = (3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0)
TERM_LABELS = {
    "betti": "Betti term alone",
    "entropy": "persistence-entropy term alone",
    "anisotropy": "anisotropy term alone",
    "rank": "effective rank (RankMe) alone",
    "std": "std of L2-normalised embeddings alone",
}


def ground_truth(rec: RunRecord) -> dict[str, int | None]:
    """``t_c`` (metric drop) and the standard warnings of one run."""
    sc = SCENARIOS[rec.scenario]
    metric = [(s, m) for s, m, _ in rec.evals]
    if sc.metric_mode == "min":
        t_c = drop_step(metric, mode="min", relative=0.1)
    else:
        t_c = drop_step(metric, mode="max", points=5.0)
    loss_spike = spike_step(rec.loss, 6.0, window=200)
    patience = patience_step([(s, v) for s, _, v in rec.evals], patience=3)
    standard = [s for s in (t_c, loss_spike, patience) if s is not None]
    return {
        "t_c": t_c,
        "loss_spike": loss_spike,
        "val_loss_patience": patience,
        "standard": min(standard) if standard else None,
    }


# -------------------------------------------------------------------------------------------------- detectors
Detector = Callable[[RunRecord, float], "int | None"]


def _rise_detector(weights: Mapping[str, float]) -> Detector:
    def detect(rec: RunRecord, threshold: float) -> int | None:
        steps = [int(c["step"]) for c in rec.checks]
        return rise_step(steps, channel_series(rec.checks, weights), threshold)

    return detect


_SPIKE_CACHE: dict[int, Any] = {}


def _grad_spike(rec: RunRecord, k: float) -> int | None:
    key = id(rec)
    if key not in _SPIKE_CACHE:
        _SPIKE_CACHE[key] = (rec, rolling_median_mad(rec.grad_norm, 200))
    return spike_step(rec.grad_norm, k, stats=_SPIKE_CACHE[key][1])


def _fixed(fn: Callable[[RunRecord], int | None]) -> Detector:
    return lambda rec, _threshold: fn(rec)


def detectors() -> dict[str, tuple[Detector, Sequence[float]]]:
    """Every rule the benchmark compares: name -> (alarm function, threshold grid; one value = fixed)."""
    out: dict[str, tuple[Detector, Sequence[float]]] = {
        "CI, paper weights, rule before the benchmark (rise 0.15)": (_fixed(lambda r: r.monitor_alarm_step), (0.15,)),
        "CI, paper weights": (_rise_detector(PAPER_WEIGHTS), RISE_GRID),
    }
    for term in TERMS:
        out[TERM_LABELS[term]] = (_rise_detector({term: 1.0}), RISE_GRID)
    out["gradient-norm spike"] = (_grad_spike, SPIKE_GRID)
    out["loss spike (6 MAD, standard)"] = (_fixed(lambda r: ground_truth(r)["loss_spike"]), (6.0,))
    out["val-loss patience 3 (standard)"] = (_fixed(lambda r: ground_truth(r)["val_loss_patience"]), (3.0,))
    return out


# ----------------------------------------------------------------------------------------------------- scoring
def _outcome(rec: RunRecord, alarm: int | None, truth: Mapping[str, int | None]) -> dict[str, Any]:
    sc = SCENARIOS[rec.scenario]
    if sc.kind == "control" or rec.arm == "healthy":
        return {"kind": "negative", "false_positive": alarm is not None}
    t0 = rec.t0 or 0
    t_c, t_s = truth["t_c"], truth["standard"]
    if alarm is not None and alarm < t0:
        return {"kind": "positive", "false_positive": True, "collapsed": t_c is not None, "hit": False}
    return {
        "kind": "positive",
        "false_positive": False,
        "collapsed": t_c is not None,
        "hit": alarm is not None and t_c is not None and alarm <= t_c,
        "late": alarm is not None and t_c is not None and alarm > t_c,
        "lead_vs_drop": None if alarm is None or t_c is None else t_c - alarm,
        "lead_vs_standard": None if alarm is None or t_s is None else t_s - alarm,
    }


def score(outcomes: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Detection rate over collapse runs whose metric dropped, false-positive rate over all runs, median leads."""
    positives = [o for o in outcomes if o["kind"] == "positive" and o["collapsed"]]
    hits = [o for o in positives if o["hit"]]
    leads = [o["lead_vs_drop"] for o in hits]
    std_leads = [o["lead_vs_standard"] for o in positives if o.get("lead_vs_standard") is not None]
    fp = sum(bool(o["false_positive"]) for o in outcomes)
    return {
        "runs": len(outcomes),
        "collapsed_runs": len(positives),
        "detected": len(hits),
        "late": sum(bool(o.get("late")) for o in positives),
        "detection_rate": len(hits) / len(positives) if positives else None,
        "false_positives": fp,
        "false_positive_rate": fp / len(outcomes) if outcomes else None,
        "median_lead_vs_drop": statistics.median(leads) if leads else None,
        "median_lead_vs_standard": statistics.median(std_leads) if std_leads else None,
    }


def _objective(s: Mapping[str, Any]) -> float:
    return (s["detection_rate"] or 0.0) - (s["false_positive_rate"] or 0.0)


def _evaluate(
    detect: Detector, threshold: float, records: Sequence[RunRecord], truths: Mapping[int, Mapping[str, Any]]
) -> list[dict[str, Any]]:
    alarms = [detect(r, threshold) for r in records]
    return [_outcome(r, a, truths[id(r)]) | {"alarm": a} for r, a in zip(records, alarms, strict=True)]


def _calibrate(
    detect: Detector, grid: Sequence[float], records: Sequence[RunRecord], truths: Mapping[int, Mapping[str, Any]]
) -> float:
    best_t, best = grid[-1], -math.inf
    for t in sorted(grid, reverse=True):  # ties keep the larger (more conservative) threshold
        val = _objective(score(_evaluate(detect, t, records, truths)))
        if val > best + 1e-12:
            best_t, best = t, val
    return best_t


def choose_weights(
    records: Sequence[RunRecord], truths: Mapping[int, Mapping[str, Any]]
) -> tuple[dict[str, float], float, list[dict[str, Any]]]:
    """Equal weights over each non-empty subset of the terms, threshold calibrated; the best on ``records``."""
    tried = []
    for size in range(1, len(TERMS) + 1):
        for subset in itertools.combinations(TERMS, size):
            w = dict.fromkeys(subset, 1.0)
            det = _rise_detector(w)
            thr = _calibrate(det, RISE_GRID, records, truths)
            s = score(_evaluate(det, thr, records, truths))
            tried.append({"weights": w, "threshold": thr, "objective": _objective(s), **s})
    # best objective; ties: fewer false positives, then fewer terms (cheaper, simpler)
    tried.sort(key=lambda d: (-d["objective"], d["false_positives"], len(d["weights"])))
    return dict(tried[0]["weights"]), float(tried[0]["threshold"]), tried


def analyse(records: Sequence[RunRecord], calibration_seeds: Sequence[int]) -> dict[str, Any]:
    """Calibrate on ``calibration_seeds``, score every detector on the other seeds, overall and per scenario."""
    _SPIKE_CACHE.clear()  # keyed by id(): valid only for the records of this call
    truths = {id(r): ground_truth(r) for r in records}
    cal = [r for r in records if r.seed in calibration_seeds]
    test = [r for r in records if r.seed not in calibration_seeds]
    dets = detectors()
    weights, _, tried = choose_weights(cal, truths)
    chosen_name = "CI, chosen weights " + "+".join(weights)
    dets[chosen_name] = (_rise_detector(weights), RISE_GRID)
    ablation_bases = {"paper": dict(PAPER_WEIGHTS), "chosen": weights}
    for base_name, base in ablation_bases.items():
        for term in base:
            rest = {t: w for t, w in base.items() if t != term}
            if rest:
                dets[f"ablation: {base_name} without {term}"] = (_rise_detector(rest), RISE_GRID)
    results: dict[str, Any] = {"detectors": {}, "chosen_weights": weights, "weight_search": tried}
    for name, (detect, grid) in dets.items():
        thr = _calibrate(detect, grid, cal, truths) if len(grid) > 1 else grid[0]
        outcomes = _evaluate(detect, thr, test, truths)
        per_scenario = {}
        for sc_name in sorted({r.scenario for r in test}):
            idx = [i for i, r in enumerate(test) if r.scenario == sc_name]
            per_scenario[sc_name] = score([outcomes[i] for i in idx])
        results["detectors"][name] = {
            "threshold": thr,
            "calibrated": len(grid) > 1,
            "overall": score(outcomes),
            "per_scenario": per_scenario,
            "alarms": {f"{r.scenario}/{r.arm}/{r.seed}": o["alarm"] for r, o in zip(test, outcomes, strict=True)},
        }
    results["runs"] = [
        {
            "scenario": r.scenario,
            "arm": r.arm,
            "seed": r.seed,
            "t0": r.t0,
            "split": "calibration" if r.seed in calibration_seeds else "test",
            "wall_s": r.wall_s,
            "monitor_s": r.monitor_s,
            **truths[id(r)],
        }
        for r in records
    ]
    return results


# --------------------------------------------------------------------------------------------------- running
def _record_path(out: Path, scenario: str, arm: str, seed: int, quick: bool) -> Path:
    return out / "runs" / f"{scenario}__{arm}__{seed}{'__quick' if quick else ''}.json"


def run_benchmark(
    out: str | Path = "bench_out",
    *,
    scenarios: Sequence[str] | None = None,
    seeds: int = 6,
    quick: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every arm of ``scenarios`` for seeds ``0..seeds-1`` (cached in ``out/runs``), analyse, write
    ``results.json``, ``results.md`` and one timeline plot per scenario. The first half of the seeds (rounded up)
    calibrates thresholds, the rest is reported.

    Example:
        >>> import tempfile
        >>> out = tempfile.mkdtemp()
        >>> res = run_benchmark(out, scenarios=["classifier_lr"], seeds=2, quick=True, log=lambda s: None)
        >>> res["calibration_seeds"], res["test_seeds"], "CI, paper weights" in res["detectors"]
        ([0], [1], True)
    """
    names = list(scenarios) if scenarios else list(SCENARIOS)
    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown:
        raise ValueError(f"unknown scenario(s) {unknown}; accepted: {sorted(SCENARIOS)}.")
    if seeds < 2:
        raise ValueError(f"`seeds` must be >= 2 (calibration and test seeds are disjoint); got {seeds}.")
    out = Path(out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    records: list[RunRecord] = []
    start = time.perf_counter()
    for seed in range(seeds):
        for name in names:
            for arm in SCENARIOS[name].arms:
                path = _record_path(out, name, arm, seed, quick)
                if path.exists():
                    rec = RunRecord.from_dict(json.loads(path.read_text()))
                else:
                    rec = run_scenario(name, arm, seed, quick=quick)
                    path.write_text(json.dumps(rec.as_dict()))
                records.append(rec)
                log(f"{name:<24} {arm:<8} seed {seed}: {rec.wall_s:5.1f} s, monitor alarm {rec.monitor_alarm_step}")
    calibration = list(range(math.ceil(seeds / 2)))
    results = analyse(records, calibration)
    results.update(
        {
            "scenarios": {
                n: {"title": SCENARIOS[n].title, "kind": SCENARIOS[n].kind, "switch": SCENARIOS[n].switch,
                    "metric": SCENARIOS[n].metric, "steps": records_steps(records, n), "t0": records_t0(records, n)}
                for n in names
            },
            "calibration_seeds": calibration,
            "test_seeds": [s for s in range(seeds) if s not in calibration],
            "quick": quick,
            "wall_s": time.perf_counter() - start,
        }
    )  # fmt: skip
    from topo_callbacks.bench.report import plot_timelines, write_markdown

    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(write_markdown(results))
    plot_timelines(records, results, out)
    return results


def records_steps(records: Sequence[RunRecord], name: str) -> int:
    return next(r.steps for r in records if r.scenario == name)


def records_t0(records: Sequence[RunRecord], name: str) -> int | None:
    return next(r.t0 for r in records if r.scenario == name)
