"""`topo-callbacks report` on the logs of real Lightning runs (CSVLogger and TensorBoard)."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

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


def tb_run(folder: Path, scalars: dict[str, list[float]], *, mtime: float | None = None, every: int = 10) -> Path:
    """Write ``scalars`` (tag -> values at steps every, 2 every, ...) to a new TensorBoard event file in ``folder``."""
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    folder.mkdir(parents=True, exist_ok=True)
    before = set(folder.glob("events.out.tfevents.*"))
    writer = SummaryWriter(str(folder))
    for tag, values in scalars.items():
        for i, value in enumerate(values):
            writer.add_scalar(tag, value, global_step=(i + 1) * every)
    writer.close()
    (event,) = set(folder.glob("events.out.tfevents.*")) - before
    if mtime is not None:
        os.utime(event, (mtime, mtime))
    return event


def csv_run(folder: Path, scalars: dict[str, list[float]], *, every: int = 5) -> Path:
    """A ``metrics.csv`` as Lightning's ``CSVLogger`` writes it: a ``step`` column and one column per key."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(scalars)
    rows = [",".join(["step", *keys])]
    for i in range(max(len(v) for v in scalars.values())):
        cells = [str(scalars[k][i]) if i < len(scalars[k]) else "" for k in keys]
        rows.append(",".join([str((i + 1) * every), *cells]))
    path = folder / "metrics.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def write_diagram(folder: Path, monitor: str, step: int) -> Path:
    """The diagram file the adapters write: ``collapse_diagram_<monitor with / -> _>.json``."""
    path = folder / f"collapse_diagram_{monitor.replace('/', '_')}.json"
    path.write_text(json.dumps({"monitor": monitor, "step": step, "eps": 0.5, "h0_deaths": [0.1, 0.2, 0.4]}))
    return path


HF_TAGS = {  # what HF Trainer's TensorBoardCallback writes: every key of `logs` gets a `train/` prefix
    "train/loss": [1.0, 0.8, 0.7, 0.6],
    "train/collapse/ci": [0.2, 0.25, 0.3, 0.9],
    "train/collapse/alarm": [0.0, 0.0, 0.0, 1.0],
    "train/collapse/betti_term": [0.1, 0.1, 0.2, 0.8],
}


# (10a) HF runs log `train/collapse/ci`: the default monitor finds it by its suffix
def test_report_accepts_the_hf_train_prefix(tmp_path, capsys):
    from topo_callbacks.report import write_report

    tb_run(tmp_path / "runs" / "hf", HF_TAGS)
    summary = write_report(tmp_path, tmp_path / "r.png")
    assert summary["monitor"] == "train/collapse/ci"
    assert summary["checks"] == 4
    assert summary["alarm_steps"] == [40]  # `train/collapse/alarm`: the alarm key follows the monitor's prefix
    assert summary["terms"] == ["train/collapse/betti_term"]
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r.html")]) == 0
    assert "4 checks of train/collapse/ci" in capsys.readouterr().out
    # and the other way round: `--monitor train/collapse/ci` on a Lightning-style run without the prefix
    csv_run(tmp_path / "pl", {"collapse/ci": [0.1, 0.2]})
    assert write_report(tmp_path / "pl", tmp_path / "pl.png", monitor="train/collapse/ci")["monitor"] == "collapse/ci"


def test_report_asks_for_monitor_when_several_tags_match(tmp_path, capsys):
    tb_run(tmp_path, {"train/collapse/ci": [0.1, 0.2], "eval/collapse/ci": [0.3, 0.4]})
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "train/collapse/ci" in err
    assert "eval/collapse/ci" in err
    assert "--monitor" in err
    assert main(["report", str(tmp_path), "--monitor", "eval/collapse/ci", "--out", str(tmp_path / "e.png")]) == 0


# (10b) the H0 diagram file next to an HF/Accelerate event file, named after the monitor without `train/`
@pytest.mark.parametrize("monitor", ["collapse/ci", "train/collapse/ci"])
def test_report_finds_the_diagram_next_to_the_event_file(tmp_path, monitor):
    from topo_callbacks.report import write_report

    run = tmp_path / "out" / "runs" / "May01_host"
    tb_run(run, HF_TAGS)
    write_diagram(run, "collapse/ci", step=40)
    summary = write_report(tmp_path / "out", tmp_path / "r.png", monitor=monitor)
    assert summary["diagram_step"] == 40
    assert summary["diagram"] == str(run / "collapse_diagram_collapse_ci.json")


def test_report_takes_the_diagram_of_the_chosen_run(tmp_path):
    from topo_callbacks.report import ReportWarning, write_report

    old, new = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    tb_run(old, HF_TAGS, mtime=1_000_000)
    tb_run(new, HF_TAGS, mtime=2_000_000)
    write_diagram(old, "collapse/ci", step=30)
    write_diagram(new, "collapse/ci", step=40)
    os.utime(old / "collapse_diagram_collapse_ci.json", (3_000_000, 3_000_000))  # the newest file: not this run's
    with pytest.warns(ReportWarning, match="reporting run runs/b"):
        assert write_report(tmp_path, tmp_path / "r.png")["diagram_step"] == 40
    assert write_report(tmp_path, tmp_path / "r.png", run="runs/a")["diagram_step"] == 30


# (10c) several runs under LOGDIR: one is reported (the most recently written, or --run), the others named
def test_report_picks_one_run_and_names_the_others(tmp_path, capsys):
    from topo_callbacks.report import write_report

    for name, mtime, ci in [("a", 1_000_000, 0.1), ("b", 3_000_000, 0.5), ("c", 2_000_000, 0.9)]:
        tb_run(tmp_path / name, {"collapse/ci": [ci, ci + 0.01, ci + 0.02]}, mtime=mtime)
        (tmp_path / name / "hparams").mkdir()  # torch's add_hparams writes a run's hparams one folder down
        tb_run(tmp_path / name / "hparams", {"hp_metric": [0.0]})
    with pytest.warns(UserWarning, match="reporting run b"):
        summary = write_report(tmp_path, tmp_path / "r.png")
    assert summary["run"] == "b"
    assert summary["runs"] == ["a", "c", "b"]  # oldest to newest
    assert summary["checks"] == 3  # not 9 merged points from three runs
    assert summary["last_value"] == pytest.approx(0.52)
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r.html")]) == 0
    err = capsys.readouterr().err
    assert "reporting run b (the most recently written)" in err
    assert "a, c" in err
    assert "--run" in err
    assert main(["report", str(tmp_path), "--run", "a", "--out", str(tmp_path / "a.png")]) == 0
    assert "3 checks of collapse/ci" in capsys.readouterr().out
    assert write_report(tmp_path, tmp_path / "a.png", run="a/")["last_value"] == pytest.approx(0.12)
    assert main(["report", str(tmp_path), "--run", "nope"]) == 2
    assert "a, c, b" in capsys.readouterr().err  # the runs it knows


def test_report_splits_event_files_of_one_folder_into_runs(tmp_path):
    from topo_callbacks.report import ReportWarning, write_report

    # Accelerate with the same project name: every run appends an event file to the same folder
    first = tb_run(tmp_path, {"collapse/ci": [0.1, 0.1, 0.1]}, mtime=2_000_000)
    second = tb_run(tmp_path, {"collapse/ci": [0.9, 0.9]}, mtime=1_000_000)
    with pytest.warns(ReportWarning, match=f"reporting run {first.name}"):
        summary = write_report(tmp_path, tmp_path / "r.png")
    assert summary["run"] == first.name
    assert summary["runs"] == [second.name, first.name]
    assert summary["checks"] == 3
    assert write_report(tmp_path, tmp_path / "r.png", run=second.name)["checks"] == 2


# (10d) --out r.pdf is a PDF; an unknown extension is refused with the accepted ones named
def test_report_writes_a_real_pdf_and_refuses_unknown_extensions(tmp_path, capsys):
    csv_run(tmp_path, {"collapse/ci": [0.1, 0.2, 0.3]})
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r.pdf")]) == 0
    assert (tmp_path / "r.pdf").read_bytes().startswith(b"%PDF")
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r.jpg")]) == 2
    err = capsys.readouterr().err
    assert ".jpg" in err
    assert all(ext in err for ext in (".html", ".png", ".pdf", ".svg"))
    assert not (tmp_path / "r.jpg").exists()


# (10e) the calibration window, the baseline and the alarm threshold, with the monitor's defaults
CI = [0.9, 0.8, 0.7, 0.30, 0.34, 0.32, 0.40, 0.60, 0.70]  # 3 calibration checks, then 3 baseline checks


def test_report_marks_calibration_baseline_and_threshold(tmp_path, capsys):
    from topo_callbacks.report import write_report

    csv_run(tmp_path, {"collapse/ci": CI, "collapse/alarm": [0] * 8 + [1]})
    summary = write_report(tmp_path, tmp_path / "r.html")
    assert summary["calibration_steps"] == [5, 10, 15]
    assert summary["baseline_steps"] == [20, 25, 30]
    assert summary["baseline"] == pytest.approx(0.32)
    assert summary["threshold"] == pytest.approx(0.52)
    assert "alarm threshold 0.52" in (tmp_path / "r.html").read_text()
    argv = ["report", str(tmp_path), "--out", str(tmp_path / "r.png")]
    assert main([*argv, "--calibration-checks", "0", "--baseline-checks", "2", "--max-rise", "0.1"]) == 0
    assert "baseline 0.85 (median of the checks at steps 5, 10); alarm threshold 0.95" in capsys.readouterr().out
    assert write_report(tmp_path, tmp_path / "r.png", max_rise=None)["threshold"] is None
    short = write_report(tmp_path, tmp_path / "r.png", calibration_checks=8)  # one check after calibration
    assert short["baseline"] is None
    assert short["threshold"] is None


def test_report_rule_defaults_are_the_monitors(tmp_path, monkeypatch, capsys):
    import inspect

    from topo_callbacks.core.monitor import CollapseMonitorCore
    from topo_callbacks.report import rule_defaults, write_report

    params = inspect.signature(CollapseMonitorCore.__init__).parameters
    expected = {k: params[k].default for k in ("calibration_checks", "baseline_checks", "max_rise")}
    assert rule_defaults() == expected
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert (
        f"--max-rise MAX_RISE alarm when the CI is more than this above the baseline (default {expected['max_rise']},"
        in help_text
    )
    csv_run(tmp_path, {"collapse/ci": CI})
    monkeypatch.setitem(CollapseMonitorCore.__init__.__kwdefaults__, "max_rise", 0.3)
    assert write_report(tmp_path, tmp_path / "r.png")["threshold"] == pytest.approx(0.62)


# (10f) the terms drawn are the ones logged under the monitor's prefix, whatever they are
def test_report_plots_the_logged_terms(tmp_path):
    from topo_callbacks.report import write_report

    csv_run(
        tmp_path,
        {
            "collapse/ci": [0.1, 0.2],
            "collapse/cosine_term": [0.3, 0.4],  # a term the fixed list did not know
            "collapse/rank_term": [0.1, 0.1],
            "collapse/b0": [60, 50],  # a channel, not a term
            "collapse/enc/betti_term": [0.5, 0.5],  # another monitor's term
        },
    )
    assert write_report(tmp_path, tmp_path / "r.png")["terms"] == ["collapse/rank_term", "collapse/cosine_term"]


# (9) a run whose monitor never ran a check: an explanation and exit code 2, not a KeyError
def test_report_without_checks_explains_why(tmp_path, capsys):
    event = tb_run(tmp_path / "runs" / "hf", {"train/loss": [1.0, 0.9], "train/learning_rate": [0.1, 0.1]})
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no collapse/ci values" in err
    assert event.name in err
    assert "every_n_train_steps longer than the run" in err
    assert "train/learning_rate" in err
    assert "train/loss" in err
    assert "Traceback" not in err
    from topo_callbacks.report import ReportError, write_report

    with pytest.raises(ReportError, match="never have run a check"):
        write_report(tmp_path)


def _healthy_report():
    import torch

    from topo_callbacks.functional import collapse_index

    return collapse_index(torch.randn(64, 16, generator=torch.Generator().manual_seed(0)))


def _truncated_event_file(folder: Path) -> Path:
    event = tb_run(folder, {"collapse/ci": [0.1, 0.2, 0.3]})
    data = event.read_bytes()
    event.write_bytes(data[:-7])  # the last record cut short
    return event


def _garbage_event_file(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    event = folder / "events.out.tfevents.123.host"
    event.write_bytes(b"step,collapse/ci\n10,0.3\n" * 4)
    return event


UNREADABLE = {
    "csv cut mid-row": (lambda f: f.write_text("step,collapse/ci,collapse/alarm\n10,0.3,0\n20,0.3"), "truncated"),
    "csv row short": (lambda f: f.write_text("step,collapse/ci,collapse/alarm\n10,0.3,0\n20,0.3\n"), "line 3 has 2"),
    "csv not a number": (lambda f: f.write_text("step,collapse/ci\n10,0.3\n20,0.3e\n"), "'0.3e' is not a number"),
    "csv not text": (lambda f: f.write_bytes(b"step,collapse/ci\n10,\xff\xfe\n"), "byte 20 is not UTF-8"),
}


@pytest.mark.parametrize("case", sorted(UNREADABLE))
def test_report_names_an_unreadable_csv(tmp_path, capsys, case):
    from topo_callbacks.report import UnreadableLogError, write_report

    write, why = UNREADABLE[case]
    path = tmp_path / "version_0" / "metrics.csv"
    path.parent.mkdir()
    write(path)
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r.png")]) == 2
    err = capsys.readouterr().err
    assert f"cannot read {path}: " in err
    assert why in err
    assert "Traceback" not in err
    with pytest.raises(UnreadableLogError) as info:
        write_report(tmp_path, tmp_path / "r.png")
    assert info.value.path == path
    assert not (tmp_path / "r.png").exists()


def test_report_names_a_file_it_may_not_read(tmp_path, capsys, monkeypatch):
    path = csv_run(tmp_path, {"collapse/ci": [0.1, 0.2]})
    read_bytes = Path.read_bytes

    def denied(self: Path) -> bytes:  # as chmod 000 would, for a user other than root
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"cannot read {path}: Permission denied" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (_truncated_event_file, "truncated: the record at byte"),
        (_garbage_event_file, "not a TensorBoard event file: the record header at byte 0 fails its checksum"),
    ],
)
def test_report_names_an_unreadable_event_file(tmp_path, capsys, make, why):
    pytest.importorskip("tensorboard")
    tb_run(tmp_path / "good", {"collapse/ci": [0.1, 0.2]})
    event = make(tmp_path / "bad")
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"cannot read {event}: {why}" in err
    assert "Traceback" not in err
    assert main(["report", str(tmp_path / "good"), "--out", str(tmp_path / "g.png")]) == 0  # the other run reads
