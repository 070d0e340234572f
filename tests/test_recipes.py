"""The per-framework examples in recipes/, launched on two processes exactly as the README says."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.procs import ROOT, run_checked, torchrun

RECIPES = ROOT / "recipes"


def launch(framework: str) -> list[str]:
    """The README's two-process command; ports are picked at launch, not at import (tests run minutes later)."""
    if framework == "lightning":
        return [sys.executable, str(RECIPES / "lightning_example.py"), "--devices", "2"]
    return torchrun(RECIPES / f"{framework}_example.py")


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["lightning", "accelerate", "hf_trainer"])
def test_example_on_two_processes_alarms_after_the_lr_jump_and_stops(tmp_path: Path, framework: str):
    pytest.importorskip({"hf_trainer": "transformers"}.get(framework, framework))
    cmd = [*launch(framework), "--steps", "300", "--collapse-at", "200", "--out", str(tmp_path)]
    proc = run_checked(cmd, tmp_path, timeout=180)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["framework"] == framework
    assert summary["world_size"] == 2
    assert [h[0] for h in summary["history"]][:10] == list(range(20, 201, 20))
    assert all(h[2] == 512 for h in summary["history"])  # the global budget, 256 rows from each process
    # no alarm while the learning rate is sane; the jump at 200 kills the encoder and the monitor stops the run
    assert 200 < summary["first_alarm_step"] <= 260
    assert summary["stopped_step"] == summary["first_alarm_step"]
    assert "stopped at" in proc.stdout


@pytest.mark.slow
def test_lr_critical_point_sweep_quick(tmp_path: Path):
    pytest.importorskip("matplotlib")
    cmd = [sys.executable, str(RECIPES / "lr_critical_point.py"), "--quick", "--out", str(tmp_path)]
    proc = run_checked(cmd, tmp_path, timeout=300)
    assert (tmp_path / "lr_critical_point.png").stat().st_size > 10_000
    sweeps = json.loads((tmp_path / "results.json").read_text())["sweeps"]
    assert set(sweeps) == {"0.0", "0.01"}
    for results in sweeps.values():
        assert [r["lr"] for r in results] == [0.03, 0.3, 3.0, 30.0]
        for r in results:
            assert r["checks"] == 21  # step 0 and every 5 steps up to 100
            if r["stability_ratio_max"] < 1:  # below the edge of stability: the step map stays bi-Lipschitz
                assert r["lip_min"] > 0.9
                assert r["breaking_checks"] == 0
                assert r["merged_fraction_max"] == 0
    far = sweeps["0.01"][-1]  # lr 30 with weight decay: neurons merge
    assert far["merged_fraction_max"] > 0.1
    assert far["b0_last"] < 64
    assert far["lip_min"] < 0.5
    assert "weight decay 0.01" in proc.stdout
