"""The notebooks run top to bottom (a reduced setting, TOPO_NOTEBOOK_QUICK=1) and show what they claim."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.procs import ROOT

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")


def execute(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("TOPO_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("TOPO_NOTEBOOK_LOGS", str(tmp_path / "logs"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    notebook = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    return "".join(
        out.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
    )


@pytest.mark.slow
def test_quickstart_notebook(tmp_path, monkeypatch):
    text = execute("quickstart.ipynb", tmp_path, monkeypatch)
    assert "step  100" in text  # the history was printed, up to the learning-rate jump and beyond
    first = int(text.split("first alarm: ")[1].split()[0])
    assert 220 <= first <= 260  # the alarm came after the jump at 220, not before, within two checks
    assert (tmp_path / "logs" / "report.html").exists()


@pytest.mark.slow
def test_benchmark_notebook(tmp_path, monkeypatch, quick_bench_dir):
    # the quick set's runs as the suite trained them once (`quick_bench_dir`): the notebook's `run_benchmark` finds
    # them cached and analyses them again, as a reader's second run of the notebook does
    for cached in ("runs", "recovery"):
        if (quick_bench_dir / cached).is_dir():
            shutil.copytree(quick_bench_dir / cached, tmp_path / "logs" / cached)
    text = execute("benchmark.ipynb", tmp_path, monkeypatch)
    assert "families: classifier_lr, dead_units, batch_size" in text
    assert "CUSUM detector (the monitor's default) [stock]" in text
    assert "quick: True" in text
    assert "3 timelines shown" in text
    assert (tmp_path / "logs" / "results.json").exists()
