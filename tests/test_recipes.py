"""The per-framework examples in recipes/, launched on two processes exactly as the README says."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.procs import ROOT, clean_env, free_port

RECIPES = ROOT / "recipes"


def torchrun(script: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), str(RECIPES / script)]  # fmt: skip


def launch(framework: str) -> list[str]:
    """The README's two-process command; ports are picked at launch, not at import (tests run minutes later)."""
    if framework == "lightning":
        return [sys.executable, str(RECIPES / "lightning_example.py"), "--devices", "2"]
    return torchrun(f"{framework}_example.py")


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["lightning", "accelerate", "hf_trainer"])
def test_example_on_two_processes_alarms_after_the_lr_jump_and_stops(tmp_path: Path, framework: str):
    pytest.importorskip({"hf_trainer": "transformers"}.get(framework, framework))
    cmd = [*launch(framework), "--steps", "300", "--collapse-at", "200", "--out", str(tmp_path)]
    env = clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["framework"] == framework
    assert summary["world_size"] == 2
    assert [h[0] for h in summary["history"]][:10] == list(range(20, 201, 20))
    assert all(h[2] == 512 for h in summary["history"])  # the global budget, 256 rows from each process
    # no alarm while the learning rate is sane; the jump at 200 kills the encoder and the monitor stops the run
    assert 200 < summary["first_alarm_step"] <= 260
    assert summary["stopped_step"] == summary["first_alarm_step"]
    assert "stopped at" in proc.stdout
