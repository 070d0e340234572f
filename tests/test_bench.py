"""`topo-callbacks bench`: forked training runs, replayed detectors, leave-one-family-out calibration, outputs."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch

from tests.conftest import QUICK_BENCH_FAMILIES
from topo_callbacks.bench.detectors import (
    ema_zscore,
    first_at_or_above,
    mad_score,
    patience_count,
    rise_score,
    rolling_median_mad,
    running_mean_ratio,
)
from topo_callbacks.bench.families import FAMILIES, AttentionEntropyTask, Family
from topo_callbacks.bench.protocol import analyse, calibrated_threshold, clopper_pearson, fa_upper_bound
from topo_callbacks.bench.record import RunRecord, _monitor, _Recorder, _train, train_arms
from topo_callbacks.cli import main

SUBSET = list(QUICK_BENCH_FAMILIES)


@pytest.fixture(scope="module")
def bench(quick_bench_dir):
    out = quick_bench_dir
    records = [RunRecord.from_dict(json.loads(p.read_text())) for p in sorted((out / "runs").glob("*.json"))]
    return out, json.loads((out / "results.json").read_text()), records


def test_forked_arms_continue_exactly_as_a_run_trained_straight_through():
    """The snapshot at t0 holds everything a run depends on (weights, optimizer, generators, batch streams, the
    global RNG, the monitor): the healthy arm forked from it equals the same seed trained without a fork."""
    fam = FAMILIES["simsiam"]
    steps, t0 = fam.schedule(quick=True)
    healthy, failure = train_arms(fam, seed=3, quick=True)
    task = fam.build(3, t0)
    monitor = _monitor(task, fam)
    recorder = _Recorder(task, fam, "healthy", 3, steps, t0)
    monitor.attach(task.model)
    _train(task, fam, monitor, recorder, 1, steps)
    straight = recorder.rec
    assert straight.loss == healthy.loss
    assert straight.grad_norm == healthy.grad_norm
    assert [c["ci"] for c in monitor.history] == [c["ci"] for c in healthy.checks]
    assert failure.loss[:t0] == healthy.loss[:t0]
    # the stop-gradient goes at step t0 + 1 (same loss value, other gradient): the arms part from the step after
    assert failure.loss[t0] == healthy.loss[t0]
    assert failure.loss[t0 + 1] != healthy.loss[t0 + 1]


def test_every_step_records_every_channel():
    # the logit-scale switch of the (dropped) attention-entropy candidate moves the attention channels for sure
    fam = dataclasses.replace(FAMILIES["byte_lm"], build=AttentionEntropyTask)
    healthy, failure = train_arms(fam, seed=0, quick=True)
    steps, t0 = fam.schedule(quick=True)
    for rec in (healthy, failure):
        for series in (rec.loss, rec.grad_norm, rec.lr, rec.act_rms, rec.attn_max_logit, rec.attn_min_entropy):
            assert len(series) == steps
            assert all(math.isfinite(v) for v in series[:t0])
        assert len(rec.update_norm) == len(rec.weight_norm) == steps
        assert all(u[0] > 0 for u in rec.update_norm)
        assert [s for s, _, _ in rec.evals][:2] == [0, fam.eval_every]
        assert rec.step_s > 0
        assert rec.channels_s > 0
        assert rec.monitor_s > 0
    # the logit scale ramps up after t0 in the failure arm: its max attention logit grows beyond the twin's
    assert max(failure.attn_max_logit[t0:]) > 2 * max(healthy.attn_max_logit[t0:])


@pytest.mark.slow
def test_bench_writes_its_outputs_and_the_summary_schema(bench):
    out, results, records = bench
    assert len(records) == 2 * len(SUBSET) * 2  # 2 seeds x 2 arms per family
    assert results["calibration_seeds"] == [0]
    assert results["test_seeds"] == [1]
    for name in ("results.md", "curves.png", *(f"timeline_{f}.png" for f in SUBSET)):
        assert (out / name).stat().st_size > 1000, name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["protocol"] == "leave-one-family-out"
    assert summary["families"] == ["classifier_lr", "dead_units"]
    assert summary["controls"] == ["batch_size"]
    assert summary["runs"]["clean_test"] == 4  # two healthy twins, both arms of the control
    default = summary["detectors"][summary["default"]]
    for key in ("detected", "failure_runs", "false_alarms", "clean_runs", "fa_upper95", "median_lead",
                "cost_ms_per_step", "per_family"):  # fmt: skip
        assert key in default
    assert set(default["per_family"]) == set(SUBSET)
    assert "QUICK setting" in (out / "results.md").read_text()
    # the rollback arm: every failure arm of the test seed trained live (cached beside the runs, not among them)
    recovery = summary["recovery"]
    assert set(recovery["per_family"]) == set(SUBSET)
    assert recovery["policy"] == {**recovery["policy"], "max_rollbacks": 4, "lr_factor": 0.25}
    assert recovery["inconsistent"] == []
    assert set(recovery["targets"]) >= {"optimizer_rescued_of_detected", "configuration_stopped_with_diagnosis"}
    cached = sorted(p.name for p in (out / "recovery").glob("*.json"))
    assert {"classifier_lr__failure__1__quick.json", "dead_units__failure__1__quick.json"} <= set(cached)
    assert not [name for name in cached if "__0__" in name]  # test seeds only
    assert "## Recovery" in (out / "results.md").read_text()
    # on a GPU the per-step values are read in batches: the detection each batch size keeps
    batched = summary["batched_reads"]
    assert list(batched)[:3] == ["at the step", "1 read in 2, one process", "1 read in 2, DDP"]
    at_once = batched["at the step"]
    assert at_once["failures"] == default["failure_runs"]
    assert all(v["detected"] <= at_once["detected"] for v in batched.values())
    assert "## Per-step values read in batches on a GPU" in (out / "results.md").read_text()


def test_host_batches_are_scored_at_checks_every_8_steps_and_at_once_when_urgent(bench):
    """`host_batch_flushes`: a CPU monitor scoring in batches of 8 scores at every check, never more than 8 steps
    apart, at once at a loss over twice its reference's largest; its alarms are `replay_episodes`' own."""
    from topo_callbacks.bench.cusum import host_batch_flushes, replay_episodes
    from topo_callbacks.core.detector import default_calibration

    _, _, records = bench
    cal = default_calibration(0.05)
    for rec in records:
        episodes, flushes = host_batch_flushes(rec, cal, 8)
        assert episodes == replay_episodes(rec, cal)
        assert flushes == sorted(set(flushes))
        gaps = [b - a for a, b in zip([0, *flushes], flushes, strict=False)]
        assert max(gaps) <= 8, rec.key
        assert {int(c["step"]) for c in rec.checks if c.get("reason") != "SKIPPED"} <= set(flushes)
    rec = records[0]
    _, flushes = host_batch_flushes(rec, cal, 8)
    step = next(s for s in range(3 * len(rec.loss) // 4, len(rec.loss)) if s not in flushes)  # queued, not scored
    loss = [*rec.loss[: step - 1], abs(rec.loss[step - 2]) * 100 + 1, *rec.loss[step:]]
    _, jumped = host_batch_flushes(dataclasses.replace(rec, loss=loss), cal, 8)
    assert step in jumped  # 100x the loss before: urgent, scored at its own step


@pytest.mark.slow
def test_cached_runs_are_reused(bench):
    out, results, _ = bench
    written = {p.name: p.stat().st_mtime_ns for p in (out / "recovery").glob("*.json")}
    assert main(["bench", "--quick", "--seeds", "2", "--out", str(out), "--families", *SUBSET]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "recovery").glob("*.json")} == written  # none retrained
    again = json.loads((out / "results.json").read_text())
    assert again["wall_s"] < 60  # nothing retrained (the analysis and plots remain)
    first = results["detectors"][json.loads((out / "summary.json").read_text())["default"]]["alarms"]
    assert again["detectors"][next(iter(again["detectors"]))]["alarms"] == first


@pytest.mark.slow
def test_leave_one_family_out_never_fits_on_the_held_out_family(bench):
    """Removing the held-out family's calibration runs leaves its thresholds unchanged, for every detector."""
    _, _, records = bench
    full = analyse(records, [0], learn_weights=True)
    for fam in ("classifier_lr", "dead_units"):
        rest = [r for r in records if not (r.family == fam and r.seed == 0)]
        part = analyse(rest, [0], learn_weights=True)
        for label, d in full["detectors"].items():
            assert part["detectors"][label]["thresholds"][fam] == d["thresholds"][fam], (label, fam)
        assert part["learned_weights"][fam] == full["learned_weights"][fam]
        assert part["detector_calibrations"][fam] == full["detector_calibrations"][fam]
    # a control's held-out fit (the rollback arm's live detector on its runs) never sees its calibration seeds either
    rest = [r for r in records if not (r.family == "batch_size" and r.seed == 0)]
    part = analyse(rest, [0])
    assert part["detector_calibrations"]["batch_size"] == full["detector_calibrations"]["batch_size"]
    # ... and the held-out false alarms score every clean test run, a control's with that fit
    held = full["heldout_false_alarms"]
    assert held["clean_runs"] == sum(not r["failure"] and r["scored"] for r in full["runs"] if r["split"] == "test")
    mine = [[a for a in res["heldout_false_alarms"]["alarms"] if a.startswith("batch_size/")] for res in (full, part)]
    assert mine[0] == mine[1]


@pytest.mark.slow
def test_the_replayed_detector_alarms_where_the_live_monitor_did():
    """The benchmark scores the detector by replaying recorded channels; the monitor attached to those runs ran the
    same detector live (shipped calibration). Both give the same first alarm: here a full-length classifier_lr
    seed, whose failure arm fires and whose healthy twin does not."""
    from topo_callbacks.bench.cusum import fused_series
    from topo_callbacks.bench.protocol import cusum_grids
    from topo_callbacks.core.detector import default_calibration

    torch.set_num_threads(1)
    shipped = default_calibration(0.05)
    records = train_arms(FAMILIES["classifier_lr"], seed=0, quick=False)
    for rec in records:
        steps, stat = fused_series(cusum_grids(rec), shipped)
        hits = np.flatnonzero(stat >= 1.0)
        replayed = int(steps[hits[0]]) if hits.size else None
        assert replayed == rec.monitor_alarm_step, rec.key
    healthy, failure = records
    assert healthy.monitor_alarm_step is None
    assert failure.monitor_alarm_step is not None
    assert failure.monitor_alarm_step >= failure.t0


#: The realistic healthy runs and the failures that start early or at once (issue: runs users train).
REALISTIC = ["warmup_cosine", "step_decay", "cosine_restarts", "finetune", "accumulation_clip", "fp16_scaler",
             "loss_plateau", "augmented_stream", "long_run"]  # fmt: skip
EARLY = ["lr_too_high_early", "constant_layer_early", "label_break", "loss_jump"]


def _tiny(name: str, t0: int = 20, steps: int = 60) -> Family:
    """A family's quick setting cut to a few steps (checked and evaluated every 10), for fast tests."""
    return dataclasses.replace(FAMILIES[name], quick_steps=steps, quick_t0=t0, eval_every=10, check_every=10)


def _straight(fam: Family, seed: int, arm: str) -> RunRecord:
    """The quick setting of ``fam`` trained without a fork, as ``arm`` (the switch flips at t0 all the same)."""
    steps, t0 = fam.schedule(quick=True)
    task = fam.build(seed, t0)
    monitor = _monitor(task, fam)
    recorder = _Recorder(task, fam, arm, seed, steps, t0)
    monitor.attach(task.model)
    _train(task, fam, monitor, recorder, 1, steps)
    return recorder.rec


def test_the_new_families_are_registered_with_their_settings():
    for name in REALISTIC:
        assert FAMILIES[name].kind == "control", name
    for name in EARLY:
        assert FAMILIES[name].kind == "failure", name
    assert FAMILIES["long_run"].steps >= 20_000
    assert FAMILIES["long_run"].check_every == 50
    for name in ("lr_too_high_early", "constant_layer_early"):
        assert FAMILIES[name].t0 <= 50
    for name in ("label_break", "loss_jump"):
        assert FAMILIES[name].eval_every == 5
    for name in REALISTIC + EARLY:
        assert FAMILIES[name].quick_steps <= 300, name


@pytest.mark.parametrize("name", REALISTIC + EARLY)
def test_a_new_family_trains_both_arms_and_records_every_step(name):
    torch.set_num_threads(1)
    fam = _tiny(name)
    healthy, switched = train_arms(fam, seed=0, quick=True)
    for rec in (healthy, switched):
        assert len(rec.loss) == len(rec.grad_norm) == len(rec.lr) == 60
        assert all(math.isfinite(v) for v in rec.loss[:20])
        assert [s for s, _, _ in rec.evals] == list(range(0, 61, 10))
        assert len(rec.checks) == 6
    assert healthy.loss[:20] == switched.loss[:20]
    assert healthy.lr[:20] == switched.lr[:20]


@pytest.mark.parametrize(
    "name", ["classifier_lr", "vicreg", "finetune", "accumulation_clip", "fp16_scaler", "long_run"]
)
def test_both_forked_arms_equal_runs_trained_straight_through(name):
    """Both arms forked at t0 continue exactly as the same seed trained without a fork, loss for loss: the second arm
    too: the first must not change the shared snapshot's optimizer state (SGD's momentum, Adam's moments) in place;
    and with a new optimizer at t0 (`Task.on_fork`), micro-batches and clipping, and a GradScaler's state."""
    torch.set_num_threads(1)
    fam = _tiny(name)
    forked = train_arms(fam, seed=1, quick=True)
    for rec in forked:
        straight = _straight(fam, 1, rec.arm)
        assert straight.loss == rec.loss, rec.arm
        assert np.array_equal(straight.grad_norm, rec.grad_norm, equal_nan=True), rec.arm  # skipped steps: NaN
        assert straight.update_norm == rec.update_norm, rec.arm
        assert straight.skipped_steps == rec.skipped_steps, rec.arm
        assert straight.loss_scale == rec.loss_scale, rec.arm
    assert forked[0].loss[20:] != forked[1].loss[20:]


def test_fp16_scaler_records_the_steps_a_real_gradscaler_skipped():
    torch.set_num_threads(1)
    fam = _tiny("fp16_scaler", t0=40, steps=120)
    task = fam.build(0, 40)
    assert isinstance(task.scaler, torch.amp.GradScaler)
    healthy, switched = train_arms(fam, seed=0, quick=True)
    for rec in (healthy, switched):
        assert len(rec.loss_scale) == rec.steps
        assert rec.loss_scale[0] == 2.0**24
        # the first steps overflow at 2**24 and are skipped while the scale backs off
        assert rec.skipped_steps[:3] == [1, 2, 3]
        for step in rec.skipped_steps:
            assert not math.isfinite(rec.grad_norm[step - 1])  # the unscaled norm a user's hook reads
            assert all(u == 0.0 for u in rec.update_norm[step - 1])  # the weights did not move
            if step < rec.steps:
                assert rec.loss_scale[step] == rec.loss_scale[step - 1] / 2
        clean = [s for s in range(1, rec.steps + 1) if s not in rec.skipped_steps]
        assert all(math.isfinite(rec.grad_norm[s - 1]) and rec.update_norm[s - 1][0] > 0 for s in clean)
        assert all(math.isfinite(v) for v in rec.loss)
    # the switched arm's scaler grows every 10 clean steps (its twin's every 50): it overflows and skips more
    assert len([s for s in switched.skipped_steps if s > 40]) > len([s for s in healthy.skipped_steps if s > 40])
    # runs without a scaler record no scale
    assert train_arms(_tiny("loss_jump"), seed=0, quick=True)[0].loss_scale == []


def test_accumulation_records_the_mean_micro_batch_loss_and_the_norm_before_clipping():
    torch.set_num_threads(1)
    fam = _tiny("accumulation_clip")
    healthy, _ = train_arms(fam, seed=0, quick=True)
    task = fam.build(0, 20)  # the same seed from scratch: the first step's 4 micro-batches, by hand
    with torch.no_grad():
        losses = [torch.nn.functional.cross_entropy(task.model(task.x_train[i]), task.y_train[i])
                  for i in (task.batch_indices(0) for _ in range(4))]  # fmt: skip
    assert healthy.loss[0] == pytest.approx(float(sum(losses)) / 4, rel=1e-6)
    clip = task.clip_norm
    assert clip is not None
    assert max(healthy.grad_norm) > clip  # recorded before clipping
    # clipped steps move the weights less: the update norm of SGD's first step is lr x the clipped norm
    assert healthy.update_norm[0][0] == pytest.approx(task.lr * min(healthy.grad_norm[0], clip), rel=1e-4)
    assert task.micro_batches(0) == 4
    task.switched = True
    assert task.micro_batches(40) == 8


def test_finetune_continues_with_a_new_optimizer_and_a_fresh_monitor():
    torch.set_num_threads(1)
    fam = _tiny("finetune")
    healthy, switched = train_arms(fam, seed=0, quick=True)
    assert healthy.monitor_restart is None
    assert switched.monitor_restart == 20
    assert switched.lr[:20] == healthy.lr[:20] == [1e-3] * 20
    assert switched.lr[20:] == pytest.approx([1e-4] * 40)  # the new Adam's rate
    assert [c["step"] for c in switched.checks] == [c["step"] for c in healthy.checks]
    assert switched.checks[:2] == healthy.checks[:2]


def test_the_rollback_arm_equals_its_plain_arm_until_the_alarm_then_goes_back_before_the_switch():
    """The rollback arm (`bench.recovery`): a tiny loss-jump run (SGD learning rate x1000 from step 20) trained with
    ``on_alarm="rollback"`` is its plain failure arm, step for step, until the first alarm, which comes where the
    replayed detector says; the rollback restores a state from before the jump, the steps it discards are counted, and
    the run ends or stops with a reason. Its healthy twin never alarms and is its plain arm again, bit for bit."""
    from topo_callbacks.bench.cusum import replay_episodes
    from topo_callbacks.bench.recovery import plan_recovery, score_recovery, train_rollback_arm
    from topo_callbacks.core import RollbackPolicy
    from topo_callbacks.core.detector import default_calibration

    torch.set_num_threads(1)
    fam, cal = _tiny("loss_jump"), default_calibration(0.05)
    policy = RollbackPolicy(snapshot_every=5, keep=3)  # a 60-step run: snapshots every 5 steps, so some predate t0
    healthy, failure = train_arms(fam, seed=0, quick=True)
    run = train_rollback_arm(fam, 0, True, "failure", cal, policy)
    alarm = run.first_alarm
    assert alarm is not None
    assert alarm > fam.quick_t0
    assert alarm == min(int(e["start"]) for e in replay_episodes(failure, cal)) == failure.monitor_alarm_step
    assert run.record.loss[:alarm] == failure.loss[:alarm]
    first = run.rollbacks[0]
    assert first["step"] == alarm
    assert first["restored_step"] <= fam.quick_t0  # the weights before the first step at x1000
    assert first["restored_step"] < first["onset"] - 1
    assert run.record.loss[alarm] != failure.loss[alarm]  # the step after the rollback trains the restored state
    assert run.steps_lost == sum(e["step"] - e["restored_step"] for e in run.rollbacks) > 0
    assert run.seconds_lost > 0
    if run.stopped_step is None:
        assert len(run.record.loss) == 60
    else:  # the policy gave up: the run stops there, its last evaluation is the model it stopped with
        assert run.stop_reason in ("max_rollbacks", "came_back", "no_snapshot", "collapsed_again")
        assert len(run.record.loss) == run.stopped_step == run.record.evals[-1][0]
        assert run.stop_message
    twin = train_rollback_arm(fam, 0, True, "healthy", cal, policy)
    assert twin.first_alarm is None
    assert twin.rollbacks == []
    assert twin.snapshots_taken > 1
    assert twin.record.loss == healthy.loss
    assert twin.record.evals == healthy.evals
    # scored against the plain arms: consistent, and the outcome follows from what the run did
    plan = plan_recovery([healthy, failure], {"loss_jump": cal.as_dict()}, [0])
    assert [(p["run"], p["live"], p["predicted_alarm"]) for p in plan] == [
        ("loss_jump/healthy/0", False, None), ("loss_jump/failure/0", True, alarm)]  # fmt: skip
    run.predicted_alarm, run.identical_steps = alarm, alarm
    section = score_recovery([healthy, failure], [run], plan, mode="alarmed")
    assert section["inconsistent"] == []
    (row,) = [r for r in section["runs"] if r["failure"]]
    assert row["rollbacks"] == [[e["step"], e["restored_step"]] for e in run.rollbacks]
    assert row["reference"] == healthy.evals[-1][1]
    expected = "rescued" if row["within"] else "not rescued"
    if run.stopped_step is not None:
        diagnosis = run.stop_reason in ("max_rollbacks", "came_back", "collapsed_again")
        expected = "stopped: configuration diagnosis" if diagnosis else "stopped: no_snapshot"
    assert row["outcome"] == expected


def test_old_records_without_the_new_fields_still_load():
    rec = train_arms(_tiny("loss_jump"), seed=0, quick=True)[0]
    data = rec.as_dict()
    for key in ("skipped_steps", "loss_scale", "monitor_restart"):
        del data[key]
    old = RunRecord.from_dict(json.loads(json.dumps(data)))
    assert old.skipped_steps == []
    assert old.loss_scale == []
    assert old.monitor_restart is None


def test_ground_truth_counts_evaluations_from_an_early_fork_and_leaves_the_others_alone():
    """The warm-up left out of the ground truth ends at 10% of the run or at t0, whichever comes first: a failure
    from step 40 of 600 is measured against its evaluation at the fork; no other family's ground truth moves."""
    from topo_callbacks.bench.protocol import WARMUP, ground_truth, warmup_end

    evals = [(s, 80.0 if s <= 40 else 10.0, 0.0) for s in range(0, 601, 10)]
    rec = RunRecord("lr_too_high_early", "failure", 0, 600, 40, *([[]] * 6), [], [], evals, [], None)
    assert warmup_end(rec) == 40
    assert ground_truth(rec) == 50
    assert ground_truth(dataclasses.replace(rec, t0=100)) is None  # evaluations before step 60 left out
    for fam in FAMILIES.values():
        if fam.name not in EARLY + REALISTIC:
            for quick in (False, True):
                steps, t0 = fam.schedule(quick)
                assert min(WARMUP * steps, t0) == WARMUP * steps, fam.name


def test_bench_rejects_bad_arguments(tmp_path, capsys):
    assert main(["bench", "--families", "simsam", "--out", str(tmp_path)]) == 2
    assert "simsiam" in capsys.readouterr().err
    assert main(["bench", "--seeds", "1", "--out", str(tmp_path)]) == 2
    assert "seeds" in capsys.readouterr().err
    assert main(["bench", "--jobs", "0", "--out", str(tmp_path)]) == 2
    assert "jobs" in capsys.readouterr().err


def test_every_family_declares_consistent_schedules():
    kinds = {f.kind for f in FAMILIES.values()}
    assert kinds == {"failure", "control"}
    assert sum(f.kind == "failure" for f in FAMILIES.values()) >= 8
    assert sum(f.kind == "control" for f in FAMILIES.values()) >= 5
    for fam in FAMILIES.values():
        for quick in (False, True):
            steps, t0 = fam.schedule(quick)
            assert 0 < t0 < steps
            assert t0 % fam.eval_every == 0  # an evaluation at the fork
        assert fam.arms == (("healthy", "failure") if fam.kind == "failure" else ("healthy", "control"))
        assert fam.mechanism
        assert fam.source


# ----------------------------------------------------------------------------------- statistics vs references
# The first-alarm rules as written directly (the benchmark used them before it replayed statistics): the references
# the threshold statistics are checked against.


def rise_step(
    steps: Sequence[int],
    values: Sequence[float],
    threshold: float,
    *,
    skip: int = 3,
    baseline_checks: int = 3,
    patience: int = 2,
) -> int | None:
    """The monitor's rise rule: ``values`` above the run's baseline by more than ``threshold`` for ``patience`` checks.

    The first ``skip`` checks calibrate the scale and are ignored; the median of the next ``baseline_checks`` is the
    baseline (the defaults are `CollapseMonitorCore`'s). A non-finite value alarms at once.

    Example:
        >>> rise_step([1, 2, 3, 4, 5, 6, 7], [0.9, 0.1, 0.1, 0.2, 0.5, 0.5, 0.5], 0.2, skip=1)
        6
    """
    base: list[float] = []
    count = 0
    for i, (step, value) in enumerate(zip(steps, values, strict=True)):
        if not math.isfinite(value):
            return int(step)
        if i < skip:
            continue
        if len(base) < baseline_checks:
            base.append(value)
            continue
        count = count + 1 if value - float(np.median(base)) > threshold else 0
        if count >= patience:
            return int(step)
    return None


def spike_step(
    values: Sequence[float],
    k: float,
    *,
    window: int = 200,
) -> int | None:
    """First optimizer step (1-based) whose value exceeds the median of the previous ``window`` by ``k`` MADs.

    The loss-spike rule of the benchmark protocol is ``k=6, window=200``; a non-finite value is a spike.

    Example:
        >>> spike_step([1.0, 1.1, 0.9, 1.0, 5.0], k=6, window=3)
        5
    """
    v = np.asarray(values, dtype=np.float64)
    med, mad = rolling_median_mad(v, window)
    bad = ~np.isfinite(v)
    with np.errstate(invalid="ignore"):
        spike = v > med + k * np.maximum(mad, 1e-12 * np.abs(med))
    hits = np.flatnonzero(bad | (spike & np.isfinite(med)))
    return int(hits[0]) + 1 if hits.size else None


def patience_step(
    evals: Sequence[tuple[int, float]], *, patience: int = 3, min_delta: float = 0.0, mode: str = "min"
) -> int | None:
    """Lightning ``EarlyStopping(patience=3)``'s rule: ``patience`` evaluations in a row without an improvement by
    more than ``min_delta`` (a non-finite value stops at once, as ``check_finite=True`` does).

    Example:
        >>> patience_step([(0, 1.0), (10, 0.9), (20, 0.95), (30, 0.91), (40, 0.92)])
        40
    """
    best = math.nan
    wait = 0
    for step, value in evals:
        value = float(value)
        if not math.isfinite(value):
            return int(step)
        better = math.isnan(best) or (value < best - min_delta if mode == "min" else value > best + min_delta)
        if better:
            best, wait = value, 0
        else:
            wait += 1
            if wait >= patience:
                return int(step)
    return None


def test_loss_spike_statistic_matches_lightnings_spike_detection():
    """The replayed statistic alarms where Lightning's own `SpikeDetection` (fed the same losses) first spikes."""
    from lightning.fabric.utilities.spike import SpikeDetection

    rng = random.Random(0)
    for trial in range(60):
        n = rng.randint(2, 60)
        values = [rng.uniform(0.5, 1.5) for _ in range(n)]
        if trial % 2:
            values[rng.randrange(1, n)] *= rng.choice([3.5, 10.0])
        rtol = rng.choice([0.5, 2.0])
        detector = SpikeDetection(rtol=rtol, window=10, warmup=1)
        expected = None
        for i, v in enumerate(values):
            loss = torch.tensor(v)
            if i >= detector.warmup and detector._is_spike(loss):
                expected = i + 1
                break
            detector._update_stats(loss)
        stat = running_mean_ratio(values, window=10, warmup=1)
        assert first_at_or_above(np.arange(1, n + 1), stat, rtol) == expected, (values, rtol)


def test_ema_zscore_matches_a_direct_loop():
    rng = random.Random(1)
    for _ in range(50):
        n = rng.randint(1, 80)
        v = [rng.gauss(1.0, 0.2) for _ in range(n)]
        mu = var = None
        expected = []
        for t, x in enumerate(v):
            z = 0.0
            if t >= 25 and mu is not None:
                z = (x - mu) / max(var**0.5, 1e-12 * abs(mu) + 1e-30)
            expected.append(z)
            if mu is None:
                mu, var = x, 0.0
            else:
                var = 0.97 * (var + 0.03 * (x - mu) ** 2)
                mu = mu + 0.03 * (x - mu)
        assert ema_zscore(v) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_threshold_statistics_agree_with_the_first_alarm_rules():
    rng = random.Random(2)
    for _ in range(100):
        n = rng.randint(1, 60)
        values = [rng.gauss(1.0, 0.1) for _ in range(n)]
        if n > 10:
            values[rng.randrange(n)] += rng.choice([0.5, 5.0])
        steps = np.arange(1, n + 1)
        k, window = rng.choice([2.0, 6.0]), rng.randint(1, 20)
        assert first_at_or_above(steps, mad_score(values, window), np.nextafter(k, math.inf)) == spike_step(
            values, k, window=window
        )
        h = rng.choice([0.05, 0.1, 0.2])
        assert first_at_or_above(steps, rise_score(values), np.nextafter(h, math.inf)) == rise_step(
            list(steps), values, h
        )
        evals = list(zip(range(n), values, strict=True))
        assert first_at_or_above(steps - 1, patience_count(evals), 3) == patience_step(evals, patience=3)


def test_calibrated_threshold_gives_at_most_alpha_false_alarms_and_no_lower_one_does():
    rng = random.Random(3)
    for _ in range(200):
        maxima = [rng.choice([rng.random(), 0.5]) for _ in range(rng.randint(1, 70))]
        alpha = rng.choice([0.05, 0.1, 0.3])
        h = calibrated_threshold(maxima, alpha)
        assert sum(m >= h for m in maxima) <= alpha * len(maxima) + 1e-9
        below = [m for m in maxima if m < h]
        if below:
            assert sum(m >= max(below) for m in maxima) > alpha * len(maxima)


def test_intervals_match_scipys_exact_binomial():
    from scipy.stats import binomtest

    for k, n in [(0, 60), (3, 60), (40, 40), (17, 45), (1, 1)]:
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
        assert clopper_pearson(k, n) == pytest.approx((ci.low, ci.high))
        one_sided = binomtest(k, n).proportion_ci(confidence_level=0.90, method="exact").high
        assert fa_upper_bound(k, n) == pytest.approx(one_sided)


def test_a_read_that_stands_for_k_steps_adds_the_evidence_of_k_steps():
    """`CusumDetector.update`'s ``steps``: read every k-th step (the budget on cheap steps), the mean loss of the k
    steps adds to its CUSUMs what k reads would, not one read's worth. A classifier whose
    learning rate ramps up from step 300 (past the monitor's first `STEP_WINDOW` steps, read in full): its loss alarm,
    replayed reading one step in 4 and in 8, comes less than 4k steps after the alarm of a detector reading every
    step (one read's worth, it came 30 and 34 steps after); its healthy twin, read the same ways, raises no alarm.
    The loss channel's alarm: `loss_spike` reading every step catches this run's first batches at 10x (steps 442 and
    444) 3 steps later, which a mean of 4 or 8 steps, its other batches near the median, cannot resolve as well."""
    from topo_callbacks.bench.cusum import replay_episodes
    from topo_callbacks.core.detector import DetectorCalibration, default_calibration

    torch.set_num_threads(1)
    cal = default_calibration(0.05)
    shipped = DetectorCalibration(cal.false_alarm_rate, ("loss", "grad_norm"),
                                  {c: cal.normalisers[c] for c in ("loss", "grad_norm")}, cal.threshold)  # fmt: skip
    fam = FAMILIES["classifier_lr"]
    late = dataclasses.replace(fam, quick_t0=300, quick_steps=600)
    failure, healthy = _straight(late, 0, "failure"), _straight(late, 0, "healthy")

    def first(rec: RunRecord, k: int) -> int | None:
        return min((int(e["start"]) for e in replay_episodes(rec, shipped, step_stride=k)), default=None)

    every = first(failure, 1)
    assert every is not None
    assert every > failure.t0
    for k in (4, 8):
        strided = first(failure, k)
        assert strided is not None, k
        assert every <= strided < every + 4 * k, (k, every, strided)
        assert first(healthy, k) is None, k


def test_replay_reads_every_kth_step_as_the_budget_does():
    """`replay_episodes(step_stride=k)` feeds the per-step channels at every step of the monitor's first
    `STEP_WINDOW`, then at every k-th step and at the checks only (`CollapseMonitorCore.observes`), the loss of the
    steps between averaged into the next read: a blow-up at step 100 alarms at the same step whatever k; one moved
    past the first STEP_WINDOW steps alarms at the first step read after the one a detector reading every step alarms
    at, never before it, and at most k - 1 steps later."""
    from topo_callbacks.bench.cusum import replay_episodes
    from topo_callbacks.core.detector import default_calibration

    torch.set_num_threads(1)
    shipped = default_calibration(0.05)
    rec = _straight(FAMILIES["loss_jump"], seed=0, arm="failure")
    checks = {int(c["step"]) for c in rec.checks}
    first = {}
    for k in (1, 3, 4):
        starts = [int(e["start"]) for e in replay_episodes(rec, shipped, step_stride=k) if e["start"] >= rec.t0]
        assert starts, k
        first[k] = starts[0]
    assert first[1] == first[3] == first[4]
    # the same family with its break at step 300, past the first STEP_WINDOW steps
    fam = FAMILIES["loss_jump"]
    late = _straight(
        dataclasses.replace(fam, quick_t0=300, quick_steps=300 + fam.quick_steps - fam.quick_t0), 0, "failure"
    )
    checks = {int(c["step"]) for c in late.checks}
    for k in (1, 3, 4):
        starts = [int(e["start"]) for e in replay_episodes(late, shipped, step_stride=k) if e["start"] >= late.t0]
        assert starts, k
        first[k] = starts[0]
    for k in (3, 4):
        assert first[1] <= first[k] < first[1] + k
        assert first[k] % k == 0 or first[k] in checks


@pytest.mark.parametrize("grad_every", [1, 2, 4])
def test_replay_reads_the_gradient_norm_as_the_live_monitor_does(grad_every: int) -> None:
    """`replay_episodes(grad_stride=g)` (how the budget's gradient-norm stride is scored on the benchmark) takes the
    decisions the live monitor takes with ``grad_every = g``, fed as an adapter feeds it (the norm computed only where
    `reads_grad_norm` says): the same episodes on a run whose gradient norm rises 1.6x at step 400 and on one without
    the rise; the rise alarms after it starts and at most g steps after reading every step does (a read standing for g
    reads can also bring the alarm a few steps earlier: one read's score counts g times)."""
    import random
    import warnings

    from topo_callbacks.bench.cusum import replay_episodes
    from topo_callbacks.core import CollapseMonitorCore
    from topo_callbacks.core.detector import default_calibration

    rng = random.Random(3)
    steps = 700
    loss = [1.0 + 0.02 * rng.gauss(0, 1) for _ in range(steps)]
    noise = [math.exp(0.05 * rng.gauss(0, 1)) for _ in range(steps)]
    cal = default_calibration(0.05)

    def record(rise: float) -> RunRecord:
        grad = [n * (rise if s >= 400 else 1.0) for s, n in enumerate(noise, 1)]
        zeros = [0.0] * steps
        return RunRecord("f", "healthy", 0, steps, 10, loss, grad, [0.1] * steps, [[0.0]] * steps, [[1.0]] * steps,
                         zeros, zeros, zeros, [], [], None, layer_lost_steps=None)  # fmt: skip

    def live(rec: RunRecord) -> list[tuple[int, str]]:
        monitor = CollapseMonitorCore("0", every_n_train_steps=10**6, max_overhead=None)
        monitor.grad_every = grad_every  # as the budget sets it
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for s in range(1, steps + 1):
                grad = rec.grad_norm[s - 1] if monitor.reads_grad_norm(s) else None
                monitor.observe_step(s, loss=rec.loss[s - 1], grad_norm=grad, lr=0.1)
        return [(e["start"], e["channel"]) for e in monitor.summary()["episodes"]]

    def replayed(rec: RunRecord, g: int) -> list[tuple[int, str]]:
        return [(e["start"], e["channel"]) for e in replay_episodes(rec, cal, grad_stride=g)]

    rising, flat = record(1.6), record(1.0)
    assert live(rising) == replayed(rising, grad_every)
    assert live(flat) == replayed(flat, grad_every) == []
    every = replayed(rising, 1)[0]
    strided = replayed(rising, grad_every)[0]
    assert every[1] == strided[1] == "grad_norm"
    assert every[0] >= 400
    assert 400 <= strided[0] <= every[0] + grad_every


def _flat_failure_with_checks(steps: int, t0: int, checks: list[dict[str, Any]]) -> RunRecord:
    """A failure record whose per-step channels are flat (loss and gradient norm 1, the rate 0.1) and whose checks are
    ``checks``: what a replay of its checks alone decides."""
    zeros = [0.0] * steps
    return RunRecord("f", "failure", 0, steps, t0, [1.0] * steps, [1.0] * steps, [0.1] * steps, [[0.0]] * steps,
                     [[1.0]] * steps, zeros, zeros, zeros, [], checks, None, layer_lost_steps=None)  # fmt: skip


def test_replay_brings_a_spaced_check_forward_as_the_monitor_does() -> None:
    """`replay_episodes(check_stride=k)` keeps every k-th check; when the detector `wants_check` (here: embeddings
    collapsed at a check, `COLLAPSED_CHECKS` in a row alarm) it takes the first recorded check a whole interval later
    too, and counts the spaced ones on from it (`CollapseMonitorCore._bring_check_forward`): the collapse at step 300
    alarms within a few intervals of the first spaced check that sees it, not after three spaced checks."""
    from topo_callbacks.bench.cusum import replay_episodes
    from topo_callbacks.core.detector import COLLAPSED_CHECKS, default_calibration

    steps, every, collapse = 1000, 10, 300
    checks = [
        {"step": s, "std_l2": 0.0 if s >= collapse else 0.5, "d": 16.0, "effective_rank": 1.0 if s >= collapse else 8.0,
         "n": 128.0, "b0": 10.0, "b1": 0.0, "calibrating": False}
        for s in range(every, steps + 1, every)
    ]  # fmt: skip
    rec = _flat_failure_with_checks(steps, collapse, checks)
    cal = default_calibration(0.05)

    def first(k: int, pull: bool) -> int:
        starts = [int(e["start"]) for e in replay_episodes(rec, cal, check_stride=k, pull=pull)]
        assert starts, (k, pull)
        return starts[0]

    every_check = first(1, pull=True)
    assert every_check == collapse + every * (COLLAPSED_CHECKS - 1)
    spaced = first(20, pull=False)
    pulled = first(20, pull=True)
    # the spaced checks are the first recorded one (step 10) and every 20th after it: the first to see the collapse
    seen = every + 20 * every * -(-(collapse - every) // (20 * every))
    assert seen == 410
    assert spaced == seen + (COLLAPSED_CHECKS - 1) * 20 * every  # two more spaced checks
    assert pulled == seen + (COLLAPSED_CHECKS - 1) * every  # each brought forward to the next interval


def test_replay_feeds_the_dormant_unit_rule_between_spaced_checks_as_the_monitor_does() -> None:
    """With the checks spaced out (`replay_episodes(check_stride=k)`), every recorded check the schedule skips is a
    unit check (`CollapseMonitorCore._units_check`): its share of dead units goes to the dormant-unit rule alone. Units
    going silent at step 500 alarm at 500 whatever the spacing, as with every check; fed at the spaced checks only,
    the rule needs three of them before it to compare with, and alarms 275 steps later."""
    from topo_callbacks.bench.cusum import replay_episodes
    from topo_callbacks.core.detector import CusumDetector, default_calibration

    steps, every, broken = 1000, 25, 500
    checks = [
        {"step": s, "dead_fraction": 0.5 if s >= broken else 0.05, "std_l2": 0.5, "d": 64.0, "effective_rank": 20.0,
         "n": 256.0, "b0": 10.0, "b1": 0.0, "calibrating": False}
        for s in range(every, steps + 1, every)
    ]  # fmt: skip
    rec = _flat_failure_with_checks(steps, broken, checks)
    cal = default_calibration(0.05)
    for k in (1, 10, 40):
        episodes = replay_episodes(rec, cal, check_stride=k)
        assert [(e["start"], e["channel"], e["kind"]) for e in episodes][:1] == [(broken, "dead_fraction", "dormant")]
    # the spaced checks alone (25, 275, 525, 775, ...): two before the units went, so 525 cannot be compared yet
    detector = CusumDetector(cal)
    for check in checks[::10]:
        detector.observe_check(int(check["step"]), check, calibrating=False)
    assert [(e["start"], e["kind"]) for e in detector.episodes] == [(775, "dormant")]
