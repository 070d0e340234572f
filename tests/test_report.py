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
    mon = CollapseMonitor(
        layer="encoder", every_n_train_steps=4, max_samples=64, divergence_threshold=0.9, max_overhead=None
    )
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


# ---- the default alarm (the CUSUM detector), alarm episodes, skipped steps, resumed runs, unreadable files ----


def csv_rows(folder: Path, columns: list[str], rows: list[tuple]) -> Path:
    """A ``metrics.csv`` with explicit rows: ``(step, value of each column or None)``, as ``CSVLogger`` writes it
    (every row has every column; an alarm logged between checks is a row of its own)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [",".join(["step", *columns])]
    lines += [",".join(str(c) if c is not None else "" for c in row) for row in rows]
    path = folder / "metrics.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


DETECTOR_COLUMNS = [
    "collapse/ci",
    "collapse/alarm",
    "collapse/detector",
    "collapse/detector_loss",
    "collapse/detector_grad_norm",
    "collapse/detector_b0_fraction",
    "collapse/episodes",
    "collapse/skipped_steps",
]
# checks every 10 steps; the detector fires at step 47 between checks (the alarm flag logged there), stays over its
# threshold at the checks 50 and 60, is off at 70 (episode 1: 47-70); fires again at the check at 90, open to 100.
# The loss scaler skipped 2 steps before the check at 30 and 3 more before the one at 80: 5 in all.
DETECTOR_ROWS = [
    # step, ci, alarm, detector, loss, grad_norm, b0_fraction, episodes, skipped_steps
    (10, 0.30, 0, 0.10, 0.05, 0.04, 0.01, 0, 0),
    (20, 0.31, 0, 0.12, 0.06, 0.05, 0.01, 0, 0),
    (30, 0.30, 0, 0.20, 0.10, 0.09, 0.01, 0, 2),
    (40, 0.32, 0, 0.60, 0.40, 0.19, 0.01, 0, 2),
    (47, None, 1, None, None, None, None, None, None),
    (50, 0.33, 1, 1.30, 0.90, 0.39, 0.01, 1, 2),
    (60, 0.34, 1, 1.10, 0.80, 0.29, 0.01, 1, 2),
    (70, 0.33, 0, 0.70, 0.50, 0.19, 0.01, 1, 2),
    (80, 0.35, 0, 0.80, 0.60, 0.19, 0.01, 1, 5),
    (90, 0.36, 1, 1.60, 0.70, 0.80, 0.10, 2, 5),
    (100, 0.38, 1, 1.90, 0.80, 1.00, 0.10, 2, 5),
]


def test_alarm_episodes_and_resumed_at_from_logged_values():
    from topo_callbacks.report import alarm_episodes, resumed_at

    flags = [(s, a) for s, _, a, *_ in DETECTOR_ROWS]
    assert alarm_episodes(flags) == [{"start": 47, "end": 70}, {"start": 90, "end": None}]
    assert alarm_episodes([]) == []
    assert alarm_episodes([(5, 1.0), (10, 0.0), (15, 0.0)]) == [{"start": 5, "end": 10}]  # on from the first
    # a firing and a check at one step: on; an alarm logged in any order of steps is sorted
    assert alarm_episodes([(20, 0.0), (10, 0.0), (20, 1.0), (30, 1.0)]) == [{"start": 20, "end": None}]
    assert resumed_at([50, 100, 150, 200]) is None  # fresh: first check one spacing in
    assert resumed_at([100, 150, 200]) is None  # its first check skipped: two spacings in, still fresh
    assert resumed_at([101, 150, 200]) == 101
    assert resumed_at([1250, 1300, 1400, 1450]) == 1250  # a skipped check later does not move the median (50)
    assert resumed_at([1250]) is None  # one check: no spacing to tell by


def test_report_draws_the_detector_panel_without_the_rise_threshold(tmp_path):
    from topo_callbacks.report import write_report

    csv_rows(tmp_path, DETECTOR_COLUMNS, DETECTOR_ROWS)
    summary = write_report(tmp_path, tmp_path / "r.png")
    assert summary["alarm_rule"] == "detector"
    assert summary["detector"] == "collapse/detector"
    assert summary["detector_channels"] == [
        "collapse/detector_b0_fraction",
        "collapse/detector_grad_norm",
        "collapse/detector_loss",
    ]
    assert summary["detector_threshold"] == 1.0
    assert summary["detector_peak"] == (100, 1.9)
    detector = summary["panels"]["detector"]
    assert detector["hlines"] == [1.0]  # the detector's threshold, drawn
    assert detector["labels"][:4] == ["collapse/detector (fused)", *(c[9:] for c in summary["detector_channels"])]
    # the CI panel: calibration marked, but no baseline and no rise threshold the CI never had to cross
    ci = summary["panels"]["ci"]
    assert ci["hlines"] == []
    assert summary["baseline"] is None
    assert summary["threshold"] is None
    assert summary["calibration_steps"] == [10, 20, 30]
    assert "rise" not in summary["rule"]
    assert (
        "collapse/detector, its statistic over its threshold, alarms at 1, highest 1.9 at step 100" in summary["rule"]
    )
    assert not any("threshold" in label for label in ci["labels"])
    # --max-rise given: the rise rule's baseline and threshold are drawn beside the detector
    both = write_report(tmp_path, tmp_path / "r.png", max_rise=0.05)
    assert both["baseline"] == pytest.approx(0.33)  # the CI's checks only: 47 logged the alarm, not the CI
    assert both["baseline_steps"] == [40, 50, 60]
    assert both["panels"]["ci"]["hlines"] == pytest.approx([0.33, 0.38])
    assert both["panels"]["detector"]["hlines"] == [1.0]


def test_report_without_the_detector_keeps_the_rise_threshold(tmp_path):
    from topo_callbacks.report import write_report

    csv_run(tmp_path, {"collapse/ci": CI, "collapse/alarm": [0] * 8 + [1]})
    summary = write_report(tmp_path, tmp_path / "r.png")
    assert summary["alarm_rule"] == "rise"
    assert summary["detector"] is None
    assert summary["panels"]["ci"]["hlines"] == pytest.approx([0.32, 0.52])  # baseline, baseline + max_rise
    assert "detector" not in summary["panels"]  # nothing for a second row: one row, as before
    assert summary["episodes"] == [{"start": 45, "end": None}]


def test_report_lists_alarm_episodes_and_skipped_steps(tmp_path, capsys):
    from topo_callbacks.report import write_report

    csv_rows(tmp_path, DETECTOR_COLUMNS, DETECTOR_ROWS)
    summary = write_report(tmp_path, tmp_path / "r.png")
    assert summary["episodes"] == [{"start": 47, "end": 70}, {"start": 90, "end": None}]
    assert summary["alarm_steps"] == [47, 50, 60, 90, 100]
    assert summary["first_alarm_step"] == 47  # the detector's firing between checks
    assert summary["episodes_logged"] == 2
    assert summary["skipped_steps"] == 5
    assert summary["events"] == (
        "2 alarm episodes (steps 47-70, 90-open); 5 optimizer steps skipped by the loss scaler"
        " (collapse/skipped_steps: overflowing fp16 gradients, not failures)"
    )
    # each episode shaded on the CI and detector panels, from its start to the check that saw it off / the end
    for panel in ("ci", "detector"):
        assert summary["panels"][panel]["spans"][-2:] == [(47.0, 70.0), (90.0, 100.0)]
    assert summary["panels"]["counts"]["labels"] == ["skipped_steps (loss scaler; not failures): 5", "episodes: 2"]
    # the command line: an HTML page with the episodes listed, and the same line printed
    out = tmp_path / "r.html"
    assert main(["report", str(tmp_path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "first alarm at step 47" in printed
    assert "2 alarm episodes (steps 47-70, 90-open); 5 optimizer steps skipped" in printed
    page = out.read_text()
    assert "<tr><td>1</td><td>47</td><td>70</td></tr><tr><td>2</td><td>90</td><td>open</td></tr>" in page
    assert "5 optimizer steps skipped by the loss scaler" in page
    assert (tmp_path / "r.png").stat().st_size > 10_000
    none_skipped = tmp_path / "fp32"
    csv_rows(
        none_skipped, ["collapse/ci", "collapse/alarm", "collapse/skipped_steps"], [(10, 0.3, 0, 0), (20, 0.3, 0, 0)]
    )
    summary = write_report(none_skipped, tmp_path / "fp32.png")
    assert summary["skipped_steps"] == 0
    assert summary["events"] == "no alarm episode; no optimizer step skipped by the loss scaler" + (
        " (collapse/skipped_steps: overflowing fp16 gradients, not failures)"
    )
    assert "detector" in summary["panels"]  # the counts give the figure its second row; no detector is said there
    assert summary["panels"]["detector"]["title"] == "CUSUM detector"


def test_report_says_when_the_episode_count_differs(tmp_path):
    from topo_callbacks.report import write_report

    # a resumed run: the monitor's count includes an episode from before the resume
    rows = [(s, 0.3, a, 0.5 + a, e) for s, a, e in [(510, 0, 1), (520, 1, 2), (530, 0, 2), (540, 0, 2)]]
    csv_rows(tmp_path, ["collapse/ci", "collapse/alarm", "collapse/detector", "collapse/episodes"], rows)
    summary = write_report(tmp_path, tmp_path / "r.png")
    assert summary["episodes"] == [{"start": 520, "end": 530}]
    assert summary["episodes_logged"] == 2
    assert summary["skipped_steps"] is None
    assert summary["events"] == (
        "1 alarm episode (steps 520-530); the monitor counted 2 (collapse/episodes, since the run's start)"
    )


def test_report_labels_a_resumed_run(tmp_path, capsys):
    from topo_callbacks.report import write_report

    # resumed from a checkpoint at step 1200: checks every 50 steps from 1250 on
    resumed = tmp_path / "resumed"
    rows = [(1200 + 50 * i, v, 0, 0.2) for i, v in enumerate([0.9, 0.8, 0.7, 0.3, 0.3, 0.3], 1)]
    csv_rows(resumed, ["collapse/ci", "collapse/alarm", "collapse/detector"], rows)
    summary = write_report(resumed, tmp_path / "r.png")
    assert summary["resumed_at"] == 1250
    assert summary["calibration_steps"] == []
    assert summary["baseline_steps"] == []
    assert summary["rule"].startswith("resumed at step 1250: the checks that calibrated the scale ran before")
    ci = summary["panels"]["ci"]
    assert ci["title"] == "collapse index (resumed at step 1250)"
    assert ci["spans"] == []  # no calibration or baseline window
    assert not any("calibration" in label for label in ci["labels"])
    # the same run under the rise rule: its baseline is not in these logs, so no threshold is made up
    rise = tmp_path / "rise"
    csv_rows(rise, ["collapse/ci", "collapse/alarm"], [r[:3] for r in rows])
    summary = write_report(rise, rise / "r.png")
    assert summary["resumed_at"] == 1250
    assert summary["baseline"] is None
    assert summary["threshold"] is None
    assert summary["panels"]["ci"]["hlines"] == []
    assert "the rise rule's baseline was set before the resume" in summary["rule"]
    # and a fresh run of the same checks is calibrated as before
    fresh = tmp_path / "fresh"
    csv_rows(fresh, ["collapse/ci", "collapse/alarm"], [(s - 1200, v, a) for s, v, a in (r[:3] for r in rows)])
    summary = write_report(fresh, fresh / "r.png")
    assert summary["resumed_at"] is None
    assert summary["calibration_steps"] == [50, 100, 150]
    assert main(["report", str(resumed), "--out", str(tmp_path / "r.html")]) == 0
    assert "resumed at step 1250" in capsys.readouterr().out
    assert "<h1>Collapse report: collapse/ci (resumed at step 1250)</h1>" in (tmp_path / "r.html").read_text()


def test_report_follows_the_monitors_prefix_to_its_detector(tmp_path):
    from topo_callbacks.report import write_report

    columns = ["collapse/ci", "collapse/detector", "collapse/enc/ci", "collapse/enc/alarm", "collapse/enc/detector"]
    columns.append("collapse/enc/detector_loss")
    rows = [(10 * i, 0.3, 0.1, 0.3, a, 0.5 + a, 0.4 + a) for i, a in enumerate([0, 0, 1, 0], 1)]
    csv_rows(tmp_path, columns, rows)
    summary = write_report(tmp_path, tmp_path / "r.png", monitor="collapse/enc/ci")
    assert summary["detector"] == "collapse/enc/detector"
    assert summary["detector_channels"] == ["collapse/enc/detector_loss"]
    assert summary["episodes"] == [{"start": 30, "end": 40}]
    assert summary["panels"]["detector"]["labels"][0] == "collapse/enc/detector (fused)"
    other = write_report(tmp_path, tmp_path / "r.png")  # collapse/ci: its own detector, no channel of enc's
    assert (other["detector"], other["detector_channels"]) == ("collapse/detector", [])


def test_report_reads_the_detector_under_hf_train_prefix(tmp_path):
    from topo_callbacks.report import write_report

    tags = {
        **HF_TAGS,
        "train/collapse/detector": [0.2, 0.4, 0.7, 1.2],
        "train/collapse/detector_loss": [0.1, 0.2, 0.5, 1.0],
        "train/collapse/detector_grad_norm": [0.1, 0.2, 0.2, 0.2],
        "train/collapse/episodes": [0, 0, 0, 1],
        "train/collapse/skipped_steps": [0, 1, 1, 4],
    }
    tb_run(tmp_path / "runs" / "hf", tags)
    summary = write_report(tmp_path, tmp_path / "r.png")
    assert summary["detector"] == "train/collapse/detector"
    assert summary["detector_channels"] == ["train/collapse/detector_grad_norm", "train/collapse/detector_loss"]
    assert summary["panels"]["detector"]["hlines"] == [1.0]
    assert summary["panels"]["ci"]["hlines"] == []
    assert summary["episodes"] == [{"start": 40, "end": None}]
    assert summary["episodes_logged"] == 1
    assert summary["skipped_steps"] == 4
    assert summary["skipped_steps_key"] == "train/collapse/skipped_steps"


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
