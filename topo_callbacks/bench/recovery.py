"""The rollback arm: the benchmark's runs trained again with ``on_alarm="rollback"``, and what the rollback bought.

Each run of a test seed is trained again, from step 1, by the same loop as its plain arm (`record._train`), with a
monitor that acts on its alarms: ``on_alarm=POLICY`` (the default `RollbackPolicy` users get) and, in place of the
shipped calibration, the detector fit with the run's own family held out, on calibration seeds only
(`topo_callbacks.bench.protocol.holdout_calibration`: the fit the protocol scores that family with; a control gets
its own held-out fit too). Nothing of the rollback is fit or tuned: the policy is the product's default, and only test
seeds are trained. A rollback restores the newest snapshot taken before the alarm's onset and lowers the learning
rate for the rest of the run; the step counter and the data streams do not rewind, so a switch that flipped at
``t0`` stays flipped (a configuration error stays an error), and the run still ends at its last step (or earlier, when
the policy gives up: `StoppingReason.ROLLBACK_GAVE_UP`).

Until its first alarm a rollback run is bit-identical to its plain arm (the snapshots change nothing), and the
replayed detector alarms exactly where the live one does; so a run whose replay (`cusum.replay_episodes`) does not
alarm under the held-out calibration would give its plain arm's record back. Failure arms are always trained live;
clean runs (healthy twins and control arms) are trained live where the replay alarms on them, or all of them with
``mode="all"``. Every live run records how long it stayed identical to its plain arm and where its first alarm came,
beside the replay's prediction: `score_recovery` reports any mismatch.

Scored (`score_recovery`), per family and pooled, on the test seeds:

- a failure run is **rescued** when it ran to its end and its final metric is within `RESCUE_POINTS` points
  (accuracy) or `RESCUE_RELATIVE` (perplexity) of its healthy twin's; **stopped** when the policy gave up (after
  ``max_rollbacks`` rollbacks, or when the failure came back with no older snapshot left: the configuration
  diagnosis; or with no snapshot older than the onset before any rollback);
- the cost: optimizer steps a rollback discarded (alarm step minus restored step, summed) and their wall time
  (measured), plus the snapshots' own time;
- a clean run that alarmed: its final metric against the same run without a rollback (the plain arm).

Targets (issue 23): at least `TARGET_RESCUED` of the detected failure runs of the optimizer-instability families
(`OPTIMIZER`) rescued; the failures a rollback cannot fix (`CONFIGURATION`) stopped with the diagnosis; a clean run
that alarms loses at most `CLEAN_COST_POINTS` points (`CLEAN_COST_RELATIVE` perplexity).
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from topo_callbacks.bench.families import FAMILIES, Family
from topo_callbacks.bench.record import RunRecord, _evaluate, _monitor, _Recorder, _train
from topo_callbacks.core.detector import DetectorCalibration
from topo_callbacks.core.rollback import RollbackPolicy, RollbackReason

__all__ = [
    "CONFIGURATION",
    "OPTIMIZER",
    "POLICY",
    "RecoveryRun",
    "metric_gap",
    "plan_recovery",
    "recovery_class",
    "run_recovery",
    "score_recovery",
    "train_rollback_arm",
]

#: The policy the rollback arm runs: the default users get (nothing is tuned on the benchmark).
POLICY = RollbackPolicy()

#: Optimizer instability (a learning rate past stable, a regulariser pushing units dead): a rollback to an older
#: state with a lower learning rate is meant to rescue these.
OPTIMIZER = ("classifier_lr", "cnn_bn_lr", "byte_lm", "lr_too_high_early", "loss_jump", "dead_units")
#: An objective, architecture or data switch: no learning rate fixes it, so the policy should give up with its
#: configuration diagnosis.
CONFIGURATION = ("simsiam", "vicreg", "rank_collapse", "label_break")

#: Rescued: the final metric within this many accuracy points of the healthy twin's ...
RESCUE_POINTS = 2.0
#: ... or, for perplexity, at most this much (relative) above it.
RESCUE_RELATIVE = 0.05
#: Target share of the detected optimizer-instability failure runs rescued.
TARGET_RESCUED = 0.75
#: What a clean run that alarms may lose to the rollback: points of accuracy, or relative perplexity (half the rescue
#: tolerance, as 1 point is half of 2).
CLEAN_COST_POINTS = 1.0
CLEAN_COST_RELATIVE = 0.025


#: The stop reasons (`RollbackReason` values, as a `RecoveryRun` stores them) that carry the configuration diagnosis.
DIAGNOSIS = (
    RollbackReason.MAX_ROLLBACKS.value,
    RollbackReason.CAME_BACK.value,
    RollbackReason.COLLAPSED_AGAIN.value,
)


def recovery_class(family: str) -> str:
    """``"optimizer"`` (`OPTIMIZER`), ``"configuration"`` (`CONFIGURATION`), ``"other"`` (a failure family in neither:
    reported, no target) or ``"control"``.

    Example:
        >>> [recovery_class(f) for f in ("loss_jump", "simsiam", "forgetting", "batch_size")]
        ['optimizer', 'configuration', 'other', 'control']
    """
    if FAMILIES[family].kind == "control":
        return "control"
    return "optimizer" if family in OPTIMIZER else "configuration" if family in CONFIGURATION else "other"


def metric_gap(value: float | None, reference: float | None, mode: str) -> float | None:
    """How much worse ``value`` is than ``reference``: accuracy points (``mode="max"``), or percent of perplexity
    (``mode="min"``); negative when better, ``inf`` for a non-finite value, None without both.

    Example:
        >>> metric_gap(91.0, 94.5, "max"), metric_gap(12.5, 10.0, "min"), metric_gap(float("nan"), 10.0, "min")
        (3.5, 25.0, inf)
    """
    if value is None or reference is None:
        return None
    if not math.isfinite(value):
        return math.inf
    return reference - value if mode == "max" else 100.0 * (value / reference - 1.0)


def final_metric(rec: RunRecord) -> float | None:
    """The task metric of a run's last evaluation (a stopped run: the model it stopped with)."""
    return float(rec.evals[-1][1]) if rec.evals else None


@dataclasses.dataclass
class RecoveryRun:
    """One run trained with ``on_alarm="rollback"``: its record (``record.arm`` is the plain arm's name: the switch
    flips as there) and what the rollback did, as plain data (JSON-ready)."""

    record: RunRecord
    #: the held-out detector calibration the live monitor ran (`DetectorCalibration.as_dict`)
    calibration: dict[str, Any]
    policy: dict[str, Any]
    #: the monitor's rollback entries: ``step`` (of the alarm), ``restored_step``, ``onset``, ``channel``, factors
    rollbacks: list[dict[str, Any]]
    first_alarm: int | None
    #: the step the run stopped at (the policy gave up), its reason (``"max_rollbacks"``, ``"came_back"`` or
    #: ``"collapsed_again"``: the configuration diagnosis; ``"no_snapshot"``) and the monitor's message
    stopped_step: int | None = None
    stop_reason: str | None = None
    stop_message: str | None = None
    #: optimizer steps the rollbacks discarded, and their wall time (restores included); the snapshots' own time
    steps_lost: int = 0
    seconds_lost: float = 0.0
    snapshot_s: float = 0.0
    snapshots_taken: int = 0
    #: the first alarm the replay of the plain arm predicts under the same calibration (None: none), and how many
    #: leading steps' losses equal the plain arm's (filled in by `run_recovery` when the plain arm is known)
    predicted_alarm: int | None = None
    identical_steps: int | None = None

    @property
    def key(self) -> str:
        return self.record.key

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["record"] = self.record.as_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RecoveryRun:
        data = dict(data)
        data["record"] = RunRecord.from_dict(data["record"])
        return cls(**data)


def train_rollback_arm(
    family: Family,
    seed: int,
    quick: bool,
    arm: str,
    calibration: DetectorCalibration,
    policy: RollbackPolicy = POLICY,
) -> RecoveryRun:
    """Train seed ``seed`` of ``family`` as ``arm`` from step 1 with ``on_alarm=policy`` and the detector calibrated by
    ``calibration``; the loop, the switch at ``t0`` and the evaluations are the plain arm's (`record._train`).

    Example (the tiny run never alarms, so nothing is rolled back and no snapshot is ever read):
        >>> import dataclasses
        >>> from topo_callbacks.core.detector import default_calibration
        >>> fam = dataclasses.replace(FAMILIES["batch_size"], quick_steps=40, quick_t0=20, eval_every=10,
        ...                           check_every=10)
        >>> run = train_rollback_arm(fam, 0, True, "control", default_calibration(0.05), RollbackPolicy(keep=1))
        >>> run.rollbacks, run.stopped_step, len(run.record.loss), run.snapshots_taken
        ([], None, 40, 1)
    """
    steps, t0 = family.schedule(quick)
    task = family.build(seed, t0)
    monitor = _monitor(task, family, on_alarm=policy, calibration=calibration)
    monitors = [monitor]
    recorder = _Recorder(task, family, arm, seed, steps, t0)
    rec = recorder.rec
    restart = arm != "healthy" and task.fresh_monitor
    start = time.perf_counter()
    recorder.clock[0] = start
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monitor.attach(task.model)
        _evaluate(task, rec, 0)
        _train(task, family, monitor, recorder, 1, t0 if restart else steps)
        if restart and monitor.stopped_step is None:
            # a new run from a checkpoint of the weights (as `record.train_arm`): a new monitor, with its own snapshots
            monitor.detach()
            monitor.end_of_training(t0)
            if monitor.rollback_controller is not None:
                monitor.rollback_controller.remove_hooks()
            monitor = _monitor(task, family, on_alarm=policy, calibration=calibration)
            monitors.append(monitor)
            rec.monitor_restart = t0
            monitor.attach(task.model)
            _train(task, family, monitor, recorder, t0 + 1, steps)
        monitor.detach()
    rec.wall_s = time.perf_counter() - start
    rec.checks = [dict(c) for m in monitors for c in m.history]
    alarms = [m.first_alarm_step for m in monitors if m.first_alarm_step is not None]
    rec.monitor_alarm_step = alarms[0] if alarms else None
    rollbacks = [dict(e) for m in monitors for e in m.rollbacks]
    clock = recorder.clock
    stats = [m.rollback_controller.stats() for m in monitors if m.rollback_controller is not None]
    out = RecoveryRun(
        record=rec,
        calibration=calibration.as_dict(),
        policy=policy.as_dict(),
        rollbacks=rollbacks,
        first_alarm=rec.monitor_alarm_step,
        stopped_step=monitor.stopped_step,
        stop_reason=monitor.rollback_stop,
        stop_message=monitor.stopping_reason_message if monitor.stopped_step is not None else None,
        # the step counter does not rewind: steps restored_step + 1 .. step were trained and then discarded
        steps_lost=sum(int(e["step"]) - int(e["restored_step"]) for e in rollbacks),
        seconds_lost=sum(clock[int(e["step"])] - clock[int(e["restored_step"])] for e in rollbacks),
        # (a restore's own time is inside the discarded steps' time: it happens at the alarm step)
        snapshot_s=sum(int(s["taken"]) * float(s["mean_ms"] or 0.0) for s in stats) / 1000.0,
        snapshots_taken=sum(int(s["taken"]) for s in stats),
    )
    for m in monitors:
        m.end_of_training(rec.steps if m.stopped_step is None else m.stopped_step)
    return out


# ---------------------------------------------------------------------------------------------------- which runs
def plan_recovery(
    records: Sequence[RunRecord],
    calibrations: Mapping[str, Mapping[str, Any]],
    test_seeds: Sequence[int],
    mode: str = "alarmed",
) -> list[dict[str, Any]]:
    """The rollback arm of every test-seed run in ``records`` whose family has a held-out calibration in
    ``calibrations`` (`analyse`'s ``detector_calibrations``): ``{run, family, arm, seed, calibration,
    predicted_alarm, live}``. ``predicted_alarm``: the first alarm the detector with that calibration has on the
    plain run (replayed); ``live``: whether it is trained (every failure arm; a clean run only when it alarms, or
    with ``mode="all"``: otherwise it would be its plain arm again, bit for bit).

    Example:
        >>> rec = RunRecord("batch_size", "control", 1, 300, 100, [1.0 + 0.01 * (s % 7) for s in range(300)],
        ...                 [2.0] * 300, [0.1] * 300, [[0.0]] * 300, [[1.0]] * 300, [0.0] * 300, [0.0] * 300,
        ...                 [0.0] * 300, [], [], None)
        >>> cal = {"false_alarm_rate": 0.05, "channels": ["loss"], "normalisers": {"loss": 50.0}, "threshold": 1.0}
        >>> [(p["run"], p["predicted_alarm"], p["live"]) for p in plan_recovery([rec], {"batch_size": cal}, [1])]
        [('batch_size/control/1', None, False)]
    """
    from topo_callbacks.bench.cusum import replay_episodes

    if mode not in ("alarmed", "all"):
        raise ValueError(f"`mode` must be 'alarmed' or 'all'; got {mode!r}.")
    plan = []
    for rec in records:
        data = calibrations.get(rec.family)
        if rec.seed not in test_seeds or data is None:
            continue
        cal = DetectorCalibration.from_dict(dict(data))
        predicted = min((int(e["start"]) for e in replay_episodes(rec, cal)), default=None)
        failure = FAMILIES[rec.family].kind == "failure" and rec.arm == "failure"
        plan.append({
            "run": rec.key, "family": rec.family, "arm": rec.arm, "seed": rec.seed, "calibration": cal.as_dict(),
            "predicted_alarm": predicted, "live": failure or predicted is not None or mode == "all",
        })  # fmt: skip
    return plan


def recovery_path(out: Path, family: str, arm: str, seed: int, quick: bool) -> Path:
    # beside `runs/`, not in it: `runner.load_records` reads every run there into the detection analysis
    return out / "recovery" / f"{family}__{arm}__{seed}{'__quick' if quick else ''}.json"


def run_recovery_unit(
    out: str | Path, family: str, arm: str, seed: int, quick: bool, calibration: dict[str, Any], threads: int = 1
) -> RecoveryRun:
    """One rollback arm: loaded from ``out/recovery`` when cached with the same calibration and policy, else trained
    (a cached run fit under another calibration, after the plain runs changed, is trained again)."""
    import torch

    torch.set_num_threads(threads)
    path = recovery_path(Path(out), family, arm, seed, quick)
    if path.exists():
        cached = RecoveryRun.from_dict(json.loads(path.read_text()))
        if cached.calibration == calibration and cached.policy == POLICY.as_dict():
            return cached
    cal = DetectorCalibration.from_dict(calibration)
    run = train_rollback_arm(FAMILIES[family], seed, quick, arm, cal)
    run.calibration = dict(calibration)  # as given (JSON round trip): the cache compares it as such
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(run.as_dict(), default=_jsonable))
    tmp.replace(path)  # never read half-written
    return run


def _jsonable(value: Any) -> Any:
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _identical_steps(a: Sequence[float], b: Sequence[float]) -> int:
    """Leading steps whose losses are equal (NaN equal to NaN: both diverged alike)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if not (x == y or (math.isnan(x) and math.isnan(y))):
            break
        n += 1
    return n


def run_recovery(
    out: str | Path,
    records: Sequence[RunRecord],
    plan: Sequence[Mapping[str, Any]],
    *,
    quick: bool = False,
    jobs: int = 1,
    log: Callable[[str], None] = print,
) -> list[RecoveryRun]:
    """Train (or load from ``out/recovery``) the live runs of ``plan`` (`plan_recovery`), ``jobs`` in parallel; each
    gets its replay prediction and how many leading steps equal its plain arm's."""
    live = [p for p in plan if p["live"]]
    plain = {r.key: r for r in records}
    runs: list[RecoveryRun] = []
    start = time.perf_counter()

    def done(entry: Mapping[str, Any], run: RecoveryRun) -> None:
        run.predicted_alarm = entry["predicted_alarm"]
        run.identical_steps = _identical_steps(run.record.loss, plain[entry["run"]].loss)
        runs.append(run)
        what = ", ".join(f"{e['step']}->{e['restored_step']}" for e in run.rollbacks) or "no rollback"
        stop = f", stopped at {run.stopped_step} ({run.stop_reason})" if run.stopped_step is not None else ""
        log(f"rollback {entry['run']:<34} alarm {run.first_alarm}: {what}{stop}, {run.record.wall_s:.0f} s"
            f"  [{len(runs)}/{len(live)}, {time.perf_counter() - start:.0f} s]")  # fmt: skip

    args = [(str(out), p["family"], p["arm"], p["seed"], quick, dict(p["calibration"]), 1) for p in live]
    if jobs == 1:
        for entry, a in zip(live, args, strict=True):
            done(entry, run_recovery_unit(*a))
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            futures = {pool.submit(run_recovery_unit, *a): entry for entry, a in zip(live, args, strict=True)}
            for future in as_completed(futures):
                done(futures[future], future.result())
    runs.sort(key=lambda r: (r.record.family, r.record.seed, r.record.arm))
    return runs


# ---------------------------------------------------------------------------------------------------- scoring
def score_recovery(
    records: Sequence[RunRecord], runs: Sequence[RecoveryRun], plan: Sequence[Mapping[str, Any]], mode: str
) -> dict[str, Any]:
    """The ``recovery`` section: one row per planned run, per family and pooled figures, the three targets, and the
    consistency of the live runs with their plain arms (module docstring)."""
    from topo_callbacks.bench.protocol import clopper_pearson, ground_truth, is_failure, is_scored

    plain = {r.key: r for r in records}
    live = {r.key: r for r in runs}
    rows = []
    for entry in plan:
        rec = plain[entry["run"]]
        run = live.get(rec.key)
        fam = FAMILIES[rec.family]
        t_c = ground_truth(rec)
        failure = is_failure(rec)
        twin = plain.get(f"{rec.family}/healthy/{rec.seed}") if failure else rec
        final = final_metric(run.record if run is not None else rec)
        gap = metric_gap(final, final_metric(twin) if twin is not None else None, fam.metric_mode)
        tolerance = (
            (RESCUE_POINTS, 100 * RESCUE_RELATIVE) if failure else (CLEAN_COST_POINTS, 100 * CLEAN_COST_RELATIVE)
        )
        within = gap is not None and gap <= tolerance[0 if fam.metric_mode == "max" else 1]
        alarm = run.first_alarm if run is not None else None
        stop = run.stop_reason if run is not None else None
        if alarm is None:
            outcome = "no alarm"
        elif stop is not None:
            outcome = "stopped: configuration diagnosis" if stop in DIAGNOSIS else f"stopped: {stop}"
        elif failure:
            outcome = "rescued" if within else "not rescued"
        else:
            outcome = "kept" if within else "hurt"
        rows.append({
            "run": rec.key, "family": rec.family, "class": recovery_class(rec.family), "arm": rec.arm,
            "seed": rec.seed, "failure": failure, "scored": is_scored(rec, t_c), "t0": rec.t0, "t_c": t_c,
            "alarm": alarm, "predicted_alarm": entry["predicted_alarm"],
            "detected": failure and alarm is not None and t_c is not None and rec.t0 <= alarm < t_c,
            "rollbacks": [[int(e["step"]), int(e["restored_step"])] for e in (run.rollbacks if run else [])],
            "stopped_step": run.stopped_step if run is not None else None, "stop_reason": stop,
            "final": final, "reference": final_metric(twin) if twin is not None else None,
            "plain_final": final_metric(rec), "metric": fam.metric, "gap": gap, "within": within,
            "outcome": outcome, "steps_lost": run.steps_lost if run else 0,
            "seconds_lost": run.seconds_lost if run else 0.0, "snapshot_s": run.snapshot_s if run else 0.0,
            "wall_s": run.record.wall_s if run else None, "live": run is not None,
            "identical_steps": run.identical_steps if run else None,
            "consistent": run is None or (
                run.first_alarm == entry["predicted_alarm"]
                and (run.identical_steps or 0) >= (run.first_alarm or len(rec.loss))
            ),
        })  # fmt: skip

    def family_row(name: str) -> dict[str, Any]:
        mine = [r for r in rows if r["family"] == name]
        fail = [r for r in mine if r["failure"] and r["scored"]]
        alarmed = [r for r in fail if r["alarm"] is not None]
        clean = [r for r in mine if not r["failure"] and r["scored"]]
        clean_alarmed = [r for r in clean if r["alarm"] is not None]
        lost = [r["steps_lost"] for r in alarmed + clean_alarmed]
        return {
            "class": recovery_class(name),
            "failure_runs": len(fail),
            "alarmed": len(alarmed),
            "detected": sum(r["detected"] for r in fail),
            "rescued": sum(r["outcome"] == "rescued" for r in alarmed),
            "rescued_of_detected": sum(r["outcome"] == "rescued" for r in fail if r["detected"]),
            "stopped_diagnosis": sum(r["outcome"] == "stopped: configuration diagnosis" for r in alarmed),
            "stopped_other": sum(r["stop_reason"] not in (None, *DIAGNOSIS) for r in alarmed),
            "not_rescued": sum(r["outcome"] == "not rescued" for r in alarmed),
            "rollbacks": sum(len(r["rollbacks"]) for r in alarmed + clean_alarmed),
            "median_steps_lost": statistics.median(lost) if lost else None,
            "steps_lost": sum(lost),
            "seconds_lost": sum(r["seconds_lost"] for r in alarmed + clean_alarmed),
            "clean_runs": len(clean),
            "clean_alarmed": len(clean_alarmed),
            "clean_worst_cost": max((r["gap"] for r in clean_alarmed if r["gap"] is not None), default=None),
            "clean_stopped": sum(r["stopped_step"] is not None for r in clean_alarmed),
            "not_scored": sum(not r["scored"] for r in mine),
        }

    families = sorted({r["family"] for r in rows})
    per_family = {f: family_row(f) for f in families}

    def rate(k: int, n: int, target: float | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"k": k, "n": n, "rate": k / n if n else None,
                               "ci95": list(clopper_pearson(k, n)) if n else None}  # fmt: skip
        if target is not None:
            out["target"] = target
            out["met"] = None if not n else k / n >= target
        return out

    scored_fail = [r for r in rows if r["failure"] and r["scored"]]
    opt = [r for r in scored_fail if r["class"] == "optimizer"]
    conf = [r for r in scored_fail if r["class"] == "configuration" and r["alarm"] is not None]
    clean_alarmed = [r for r in rows if not r["failure"] and r["scored"] and r["alarm"] is not None]

    def worst(metric_mode: str) -> float | None:
        mine = [r for r in clean_alarmed if FAMILIES[r["family"]].metric_mode == metric_mode]
        return max((r["gap"] for r in mine if r["gap"] is not None), default=None)

    live_rows = [r for r in rows if r["live"]]
    return {
        "policy": POLICY.as_dict(),
        "mode": mode,
        "live_runs": len(live_rows),
        "planned_runs": len(rows),
        "targets": {
            "optimizer_rescued_of_detected": rate(
                sum(r["outcome"] == "rescued" for r in opt if r["detected"]),
                sum(r["detected"] for r in opt),
                TARGET_RESCUED,
            ),
            "optimizer_rescued_of_alarmed": rate(
                sum(r["outcome"] == "rescued" for r in opt), sum(r["alarm"] is not None for r in opt)
            ),
            "configuration_stopped_with_diagnosis": rate(
                sum(r["outcome"] == "stopped: configuration diagnosis" for r in conf), len(conf), 1.0
            ),
            "clean_alarmed": {
                "n": len(clean_alarmed),
                # accuracy points, and percent of perplexity (positive: worse than without the rollback)
                "worst_points": worst("max"),
                "worst_ppl_pct": worst("min"),
                "met": None if not clean_alarmed else all(r["within"] for r in clean_alarmed),
            },
        },
        "per_family": per_family,
        "inconsistent": [r["run"] for r in live_rows if not r["consistent"]],
        "runs": rows,
    }
