"""The demo as a real training run: the alarm fires before the accuracy drop, and not at all when healthy."""

from __future__ import annotations

import json

import pytest

from topo_callbacks.cli import main
from topo_callbacks.demo import drop_step


@pytest.mark.slow
def test_demo_collapse_run_alarms_before_the_accuracy_drop(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (tmp_path / "timeline.png").stat().st_size > 10_000
    assert summary["t0_step"] == 600
    assert summary["drop_step"] is not None  # the collapse really degrades the kNN probe
    assert summary["drop_step"] == drop_step([tuple(p) for p in summary["knn_acc"]])
    assert summary["t0_step"] <= summary["alarm_step"] < summary["drop_step"]
    assert summary["lead_steps"] == summary["drop_step"] - summary["alarm_step"]
    assert {"t0_step", "alarm_step", "drop_step", "lead_steps", "ci", "knn_acc"} <= set(summary)
    out = capsys.readouterr().out
    assert "knn_acc" in out
    assert "as expected" in out


@pytest.mark.slow
def test_demo_healthy_run_raises_no_alarm_and_keeps_accuracy(tmp_path):
    assert main(["demo", "--healthy", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["t0_step"] is None
    assert summary["alarm_step"] is None
    assert summary["drop_step"] is None
    # the monitor at its defaults: checks on multiples of 50 steps, the first a trial of the check's cost, the next
    # ones spaced further by the 2% overhead budget
    steps = [int(step) for step, _ in summary["ci"]]
    assert steps[0] == 50
    assert steps[1] > 100
    assert len(steps) >= 2
    assert all(step % 50 == 0 for step in steps)
