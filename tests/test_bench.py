"""`topo-callbacks bench`: real (short) training runs, replayed detectors, calibration on disjoint seeds."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from topo_callbacks.bench.detectors import channel_series, drop_step, patience_step, rise_step, spike_step
from topo_callbacks.bench.runner import ground_truth, score
from topo_callbacks.bench.scenarios import SCENARIOS, RunRecord, run_scenario
from topo_callbacks.cli import main
from topo_callbacks.functional.collapse import PAPER_WEIGHTS

SUBSET = ["classifier_lr", "benign_neural_collapse"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert main(["bench", "--quick", "--seeds", "2", "--out", str(out), "--scenarios", *SUBSET]) == 0
    records = [RunRecord.from_dict(json.loads(p.read_text())) for p in sorted((out / "runs").glob("*.json"))]
    return out, json.loads((out / "results.json").read_text()), records


@pytest.mark.slow
def test_bench_writes_its_outputs_and_splits_seeds(bench):
    out, results, records = bench
    assert len(records) == 2 * (2 + 1)  # 2 seeds x (healthy + collapse, one control arm)
    assert results["calibration_seeds"] == [0]
    assert results["test_seeds"] == [1]
    md = (out / "results.md").read_text()
    assert "| CI, paper weights |" in md
    assert "QUICK setting" in md
    for name in SUBSET:
        assert (out / f"timeline_{name}.png").stat().st_size > 10_000
    paper = results["detectors"]["CI, paper weights"]
    assert set(paper["alarms"]) == {f"{r.scenario}/{r.arm}/{r.seed}" for r in records if r.seed == 1}
    assert paper["overall"]["runs"] == 3


@pytest.mark.slow
def test_collapse_arm_really_degrades_and_healthy_arm_does_not(bench):
    _, _, records = bench
    for rec in records:
        if rec.scenario != "classifier_lr":
            continue
        t_c = ground_truth(rec)["t_c"]
        if rec.arm == "collapse":
            assert t_c is not None, (rec.seed, rec.evals)
            assert t_c >= rec.t0, (rec.seed, rec.evals)
        else:
            assert t_c is None, (rec.seed, rec.evals)


@pytest.mark.slow
def test_replayed_rule_reproduces_the_live_monitor(bench):
    """Replaying the rise rule at the shipped 0.15 on the logged paper CI gives the live monitor's alarm step."""
    _, _, records = bench
    alarms = []
    for rec in records:
        steps = [c["step"] for c in rec.checks]
        replay = rise_step(steps, channel_series(rec.checks, PAPER_WEIGHTS), 0.15)
        assert replay == rec.monitor_alarm_step, rec.scenario
        assert channel_series(rec.checks, PAPER_WEIGHTS) == pytest.approx([c["ci"] for c in rec.checks])
        alarms.append(replay)
    assert any(a is not None for a in alarms)  # the comparison is not between two Nones only


@pytest.mark.slow
def test_cached_runs_are_reused(bench, capsys):
    out, results, _ = bench
    assert main(["bench", "--quick", "--seeds", "2", "--out", str(out), "--scenarios", *SUBSET]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["detectors"]["CI, paper weights"]["alarms"] == results["detectors"]["CI, paper weights"]["alarms"]
    assert again["wall_s"] < 5.0  # nothing retrained


def test_bench_rejects_bad_arguments(tmp_path, capsys):
    assert main(["bench", "--scenarios", "simsam", "--out", str(tmp_path)]) == 2
    assert "simsiam" in capsys.readouterr().err
    assert main(["bench", "--seeds", "1", "--out", str(tmp_path)]) == 2
    assert "seeds" in capsys.readouterr().err
    with pytest.raises(ValueError, match="arms"):
        run_scenario("benign_neural_collapse", "collapse")


def test_every_scenario_declares_consistent_arms():
    for sc in SCENARIOS.values():
        assert sc.quick_steps < sc.steps
        assert sc.quick_t0 < sc.quick_steps
        assert sc.t0 < sc.steps
        assert sc.eval_every <= sc.check_every * 2
        assert sc.arms == (("healthy", "collapse") if sc.kind == "collapse" else ("control",))


def _spike_brute(values, k, window):
    for i, v in enumerate(values):
        if not np.isfinite(v):
            return i + 1
        if i < window:
            continue
        past = np.asarray(values[i - window : i])
        med = np.median(past)
        mad = np.median(np.abs(past - med))
        if v > med + k * max(mad, 1e-12 * abs(med)):
            return i + 1
    return None


def test_spike_rule_matches_a_direct_implementation():
    rng = random.Random(0)
    for trial in range(200):
        n = rng.randint(1, 80)
        values = [rng.gauss(1.0, 0.1) for _ in range(n)]
        if trial % 3 == 0 and n > 10:
            values[rng.randrange(n)] += rng.choice([0.5, 5.0, float("nan")])
        k, window = rng.choice([2.0, 6.0]), rng.randint(1, 20)
        assert spike_step(values, k, window=window) == _spike_brute(values, k, window)


def test_ground_truth_rules():
    evals = [(0, 90.0), (10, 92.0), (20, 86.0), (30, 85.0), (40, 86.9)]
    assert drop_step(evals, points=5.0) == 20
    assert drop_step(evals, points=5.0, evals_needed=4) is None
    assert drop_step([(0, 10.0), (10, float("inf")), (20, float("nan")), (30, 12.0)], mode="min", relative=0.1) == 10
    assert patience_step([(0, 1.0), (1, 0.5), (2, 0.6), (3, 0.7)]) is None
    assert patience_step([(0, 1.0), (1, float("nan"))]) == 1
    assert patience_step([(0, 1.0), (1, 1.5), (2, 1.2), (3, 1.1), (4, 1.5)], mode="max") == 4


def test_scoring_counts_hits_late_alarms_and_false_positives():
    outcomes = [
        {"kind": "positive", "collapsed": True, "hit": True, "late": False, "false_positive": False,
         "lead_vs_drop": 100, "lead_vs_standard": 50},
        {"kind": "positive", "collapsed": True, "hit": False, "late": True, "false_positive": False,
         "lead_vs_drop": -20, "lead_vs_standard": -40},
        {"kind": "positive", "collapsed": True, "hit": False, "false_positive": True},  # alarm before t0
        {"kind": "positive", "collapsed": False, "hit": False, "late": False, "false_positive": False},
        {"kind": "negative", "false_positive": True},
        {"kind": "negative", "false_positive": False},
    ]  # fmt: skip
    s = score(outcomes)
    assert (s["collapsed_runs"], s["detected"], s["late"], s["false_positives"], s["runs"]) == (3, 1, 1, 2, 6)
    assert s["detection_rate"] == pytest.approx(1 / 3)
    assert s["false_positive_rate"] == pytest.approx(2 / 6)
    assert s["median_lead_vs_drop"] == 100
    assert s["median_lead_vs_standard"] == 5
