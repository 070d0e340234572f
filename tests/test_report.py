"""`topo-callbacks report` on the logs of real Lightning runs (CSVLogger and TensorBoard)."""

from __future__ import annotations

import json
import warnings

import pytest

from tests.lightning_helpers import TinyModel, loader, trainer
from topo_callbacks.cli import main
from topo_callbacks.lightning import CollapseMonitor


def collapsing_run(tmp_path, logger=None) -> CollapseMonitor:
    mon = CollapseMonitor(layer="encoder", every_n_train_steps=4, max_samples=64, divergence_threshold=0.9)
    kwargs = {} if logger is None else {"logger": logger}
    t = trainer(tmp_path, max_steps=24, callbacks=[mon], **kwargs)
    model = TinyModel()

    class SwitchOn:  # the encoder collapses from step 13 on
        def __call__(self, module, args):
            module[3].enabled = t.global_step >= 12

    model.encoder.register_forward_pre_hook(SwitchOn())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(model, loader())
    return mon


def test_report_from_csv_logs_marks_alarms_and_draws_the_diagram(tmp_path, capsys):
    mon = collapsing_run(tmp_path)
    (logdir,) = tmp_path.glob("logs/version_*")
    (diagram_file,) = logdir.glob("collapse_diagram_*.json")
    diagram = json.loads(diagram_file.read_text())
    assert diagram["step"] == 24
    assert diagram["h0_deaths"] == []  # complete collapse: every row the same point, only the infinite bar
    first = json.loads(json.dumps(mon.latest_diagram(4, _healthy_report())))
    assert len(first["h0_deaths"]) == 63  # 64 distinct rows: n - 1 finite bars
    out = tmp_path / "report.html"
    assert main(["report", str(logdir), "--out", str(out)]) == 0
    alarms = [h["step"] for h in mon.history if h["alarm"]]
    assert alarms  # the collapse raised the alarm
    printed = capsys.readouterr().out
    assert f"6 checks of collapse/ci, last at step 24; first alarm at step {alarms[0]}" in printed
    page = out.read_text()
    assert "data:image/png;base64," in page
    assert f"first alarm at step {alarms[0]}" in page
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_report_from_tensorboard_logs(tmp_path):
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger

    from topo_callbacks.report import write_report

    mon = collapsing_run(tmp_path, TensorBoardLogger(str(tmp_path), name="tb"))
    (logdir,) = tmp_path.glob("tb/version_*")
    summary = write_report(logdir, tmp_path / "tb.png")
    assert summary["checks"] == len(mon.history) == 6
    assert summary["alarm_steps"] == [h["step"] for h in mon.history if h["alarm"]]
    assert summary["diagram_step"] == 24
    assert "html" not in summary


def test_report_errors_name_the_problem(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no metrics.csv or events.out.tfevents" in capsys.readouterr().err
    collapsing_run(tmp_path)
    (logdir,) = tmp_path.glob("logs/version_*")
    assert main(["report", str(logdir), "--monitor", "collapse/nope"]) == 2
    assert "collapse/ci" in capsys.readouterr().err  # the logged keys are listed


def _healthy_report():
    import torch

    from topo_callbacks.functional import collapse_index

    return collapse_index(torch.randn(64, 16, generator=torch.Generator().manual_seed(0)))
