"""CollapseMonitor inside a real Lightning Trainer (single process, CPU)."""

from __future__ import annotations

import csv
import math
import pickle
import warnings

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from tests.lightning_helpers import TinyModel, loader, trainer
from topo_callbacks.core import CollapseWarning, StoppingReason
from topo_callbacks.core.probe import embed_probe
from topo_callbacks.core.tracker import unit_rows
from topo_callbacks.functional import betti_numbers
from topo_callbacks.lightning import CollapseMonitor


def logged_rows(tmp_path) -> list[dict[str, str]]:
    (path,) = tmp_path.glob("logs/version_*/metrics.csv")
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_ci_and_terms_logged_at_check_steps(tmp_path):
    mon = CollapseMonitor(layer="encoder", every_n_train_steps=5, max_samples=128, max_overhead=None)
    t = trainer(tmp_path, max_steps=23, log_every_n_steps=1)
    t.callbacks.append(mon)
    t.fit(TinyModel(), loader())
    assert [h["step"] for h in mon.history] == [5, 10, 15, 20]
    assert "collapse/ci" in t.callback_metrics
    assert float(t.callback_metrics["collapse/ci"]) == pytest.approx(mon.history[-1]["ci"])
    assert "collapse/ci" in t.progress_bar_metrics
    rows = [r for r in logged_rows(tmp_path) if r.get("collapse/betti_term")]
    assert [int(r["step"]) for r in rows] == [5, 10, 15, 20]
    for row, h in zip(rows, mon.history, strict=True):
        for key in ("ci", "betti_term", "entropy_term", "anisotropy_term", "effective_rank", "b0", "b1"):
            assert float(row[f"collapse/{key}"]) == pytest.approx(h[key], rel=1e-6)
    assert all(0.0 <= h["ci"] <= 1.0 for h in mon.history)
    assert mon.eps is not None  # calibrated after 3 checks
    assert mon.history[0]["calibrating"]
    assert not mon.history[3]["calibrating"]


@pytest.mark.parametrize("log_every_n_steps", [1, 7])
def test_each_check_is_logged_once_at_its_step(tmp_path, log_every_n_steps):
    """The CI went to the loggers through `pl_module.log` (at the step before, and again at every later logging
    step) and through `logger.log_metrics`: metrics.csv had it at 4 and 5, 9 and 10, ... and 57 rows for 6 checks."""
    mon = CollapseMonitor(layer="encoder", every_n_train_steps=5, max_samples=128, max_overhead=None)
    t = trainer(tmp_path, max_steps=30, log_every_n_steps=log_every_n_steps, callbacks=[mon])
    t.fit(TinyModel(), loader())
    rows = logged_rows(tmp_path)
    ci_rows = [(int(r["step"]), float(r["collapse/ci"])) for r in rows if r.get("collapse/ci")]
    assert ci_rows == [(h["step"], pytest.approx(h["ci"], rel=1e-6)) for h in mon.history]
    assert [s for s, _ in ci_rows] == [5, 10, 15, 20, 25, 30]
    # the user's own metric is still logged as without the monitor
    plain = trainer(tmp_path / "plain", max_steps=30, log_every_n_steps=log_every_n_steps)
    plain.fit(TinyModel(), loader())
    mine = [r["step"] for r in rows if r.get("train_loss")]
    assert mine == [r["step"] for r in logged_rows(tmp_path / "plain") if r.get("train_loss")]
    assert mine


def test_prog_bar_and_logger_switches(tmp_path, caplog):
    import logging

    mon = CollapseMonitor(
        layer="encoder", every_n_train_steps=5, max_samples=64, prog_bar=False, logger=False, max_overhead=None
    )
    t = trainer(tmp_path, max_steps=10, log_every_n_steps=1, callbacks=[mon])
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        t.fit(TinyModel(), loader())
    assert len(mon.history) == 2
    assert "collapse/ci" in t.callback_metrics  # EarlyStopping and ModelCheckpoint still see it
    assert "collapse/ci" not in t.progress_bar_metrics
    assert not any(k.startswith("collapse/") for r in logged_rows(tmp_path) for k, v in r.items() if v)
    assert not list(tmp_path.rglob("collapse_diagram_*.json"))
    summaries = [r.message for r in caplog.records if r.message.startswith("collapse/ci:")]
    assert summaries == [mon.summary_message()]
    assert "2 checks (steps 5-10), no alarm" in summaries[0]


def test_a_run_shorter_than_the_check_interval_warns(tmp_path):
    t = trainer(
        tmp_path, max_steps=10, callbacks=[CollapseMonitor(layer="encoder", every_n_train_steps=50, max_overhead=None)]
    )
    with pytest.warns(CollapseWarning, match=r"no collapse check ran \(the run ended at step 10, before the first"):
        t.fit(TinyModel(), loader())


def test_probe_source_embeds_the_probe_and_moves_the_engine_points(tmp_path):
    probe = torch.randn(40, 16, generator=torch.Generator().manual_seed(5))
    mon = CollapseMonitor(
        layer="encoder",
        every_n_train_steps=5,
        max_samples=128,
        source="probe",
        probe=probe,
        calibration_checks=1,
        max_overhead=None,
    )
    t = trainer(tmp_path, max_steps=20, log_every_n_steps=1)
    t.callbacks.append(mon)
    model = TinyModel()
    t.fit(model, loader())
    assert [h["step"] for h in mon.history] == [5, 10, 15, 20]
    assert [h["n"] for h in mon.history] == [40] * 4
    assert mon.tracker.resets == 1
    assert mon.tracker.last_edit == "move 40"
    assert mon.capture.seen == 0
    # the last check saw the final weights: same probe rows, same Betti numbers
    z = unit_rows(embed_probe(model, model.encoder, probe), "l2")
    assert (mon.history[-1]["b0"], mon.history[-1]["b1"]) == tuple(float(b) for b in betti_numbers(z, mon.eps))
    assert model.training


def test_stop_on_divergence_threshold(tmp_path):
    mon = CollapseMonitor(
        layer="encoder",
        every_n_train_steps=4,
        max_samples=64,
        divergence_threshold=0.5,
        stop_on_alarm=True,
        max_overhead=None,
    )
    t = trainer(tmp_path, max_steps=100, callbacks=[mon])
    with pytest.warns(CollapseWarning) as caught:
        t.fit(TinyModel(collapse=True), loader())
    messages = [str(w.message) for w in caught]
    assert any("step 4: Divergence threshold exceeded: collapse/ci = 1.0000 > 0.5" in m for m in messages)
    # the run's end is explained as EarlyStopping explains its own: which monitor stopped it, when, why
    stop = "collapse/ci: stopping training at step 4 (stop_on_alarm=True). Divergence"
    assert any(m.startswith(stop) for m in messages)
    assert t.global_step == 4
    assert mon.stopped_step == 4
    assert mon.stopping_reason is StoppingReason.DIVERGENCE_THRESHOLD
    assert "Divergence threshold" in mon.stopping_reason_message


def test_alarm_without_stop_warns_once_per_episode(tmp_path):
    mon = CollapseMonitor(
        layer="encoder", every_n_train_steps=4, max_samples=64, divergence_threshold=0.5, max_overhead=None
    )
    t = trainer(tmp_path, max_steps=24, callbacks=[mon])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(TinyModel(collapse=True), loader())
    alarms = [w for w in caught if issubclass(w.category, CollapseWarning)]
    assert len(alarms) == 1
    assert "step 4" in str(alarms[0].message)
    assert t.global_step == 24
    assert mon.stopped_step is None
    assert all(h["alarm"] for h in mon.history)
    assert mon.first_alarm_step == 4


def test_resume_from_checkpoint_restores_monitor_state(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=20, save_top_k=-1)
    mon = CollapseMonitor(layer="encoder", every_n_train_steps=4, max_samples=64, max_overhead=None)
    t = trainer(tmp_path, max_steps=20, callbacks=[mon, ckpt], enable_checkpointing=True)
    t.fit(TinyModel(), loader())
    saved = mon.state_dict()
    assert len(saved["history"]) == 5
    (path,) = (tmp_path / "ckpt").glob("*.ckpt")
    state = torch.load(path, weights_only=True)["callbacks"][mon.state_key]  # plain types only
    assert state["eps"] == saved["eps"]

    resumed = CollapseMonitor(layer="encoder", every_n_train_steps=4, max_samples=64, max_overhead=None)
    t2 = trainer(tmp_path, max_steps=32, callbacks=[resumed])
    t2.fit(TinyModel(), loader(), ckpt_path=str(path))
    assert resumed.eps == saved["eps"]
    assert [h["step"] for h in resumed.history] == [4, 8, 12, 16, 20, 24, 28, 32]
    assert resumed.history[:5] == saved["history"]
    assert resumed.rule.baseline_values[:2] == saved["rule"]["baseline_values"]


def test_wrong_layer_fails_at_setup_with_close_matches(tmp_path):
    mon = CollapseMonitor(layer="encodr.2", max_overhead=None)
    t = trainer(tmp_path, max_steps=5, callbacks=[mon])
    model = TinyModel()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"encodr\.2.*Close matches: \['encoder\.2'"):
        t.fit(model, loader())
    assert t.global_step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_nan_embeddings_do_not_crash_training(tmp_path):
    mon = CollapseMonitor(layer="encoder", every_n_train_steps=5, max_samples=128, max_overhead=None)
    t = trainer(tmp_path, max_steps=15, callbacks=[mon])
    t.fit(TinyModel(nan_rows=4), loader(batch_size=32))
    assert t.global_step == 15
    assert [h["step"] for h in mon.history] == [5, 10, 15]
    for h in mon.history:
        assert h["nonfinite_fraction"] == pytest.approx(4 / 32)
        assert math.isfinite(h["ci"])


def test_all_nan_check_is_skipped_with_a_warning(tmp_path):
    mon = CollapseMonitor(layer="encoder", every_n_train_steps=5, max_samples=128, max_overhead=None)
    t = trainer(tmp_path, max_steps=10, callbacks=[mon])
    with pytest.warns(CollapseWarning, match="skipped at step 5: fewer than 2 finite embeddings"):
        t.fit(TinyModel(nan_rows=32), loader(batch_size=32))
    assert t.global_step == 10
    assert mon.history == []


def test_gradient_accumulation_checks_once_per_optimizer_step(tmp_path):
    mon = CollapseMonitor(layer="encoder", every_n_train_steps=2, max_samples=64, max_overhead=None)
    t = trainer(tmp_path, max_steps=6, accumulate_grad_batches=3, callbacks=[mon])
    calls = []
    original = mon.run_check
    mon.run_check = lambda step: calls.append(step) or original(step)
    t.fit(TinyModel(), loader())
    assert calls == [2, 4, 6]
    # the capture window spans all micro-batches of the armed steps: 2 steps x 3 micro-batches x 32 rows
    assert mon.history[0]["n"] == 64


def test_two_monitors_on_two_layers(tmp_path):
    a = CollapseMonitor(
        layer="encoder.0", every_n_train_steps=5, max_samples=64, monitor="collapse/enc0/ci", max_overhead=None
    )
    b = CollapseMonitor(
        layer="encoder", every_n_train_steps=5, max_samples=64, monitor="collapse/enc/ci", max_overhead=None
    )
    assert a.state_key != b.state_key
    t = trainer(tmp_path, max_steps=10, callbacks=[a, b])
    t.fit(TinyModel(), loader())
    assert {"collapse/enc0/ci", "collapse/enc/ci"} <= set(t.callback_metrics)
    assert a.history[0]["d"] == 32
    assert b.history[0]["d"] == 16


def test_two_monitors_sharing_a_key_are_rejected(tmp_path):
    t = trainer(
        tmp_path,
        max_steps=5,
        callbacks=[
            CollapseMonitor(layer="encoder", max_overhead=None),
            CollapseMonitor(layer="head", max_overhead=None),
        ],
    )
    with pytest.raises(ValueError, match="own key"):
        t.fit(TinyModel(), loader())


def test_hook_removed_after_fit_and_callback_pickles(tmp_path):
    mon = CollapseMonitor(layer="encoder", every_n_train_steps=5, max_samples=64, max_overhead=None)
    model = TinyModel()
    trainer(tmp_path, max_steps=5, callbacks=[mon]).fit(model, loader())
    assert not model.encoder._forward_hooks
    clone = pickle.loads(
        pickle.dumps(CollapseMonitor(layer="encoder", max_overhead=None))
    )  # ddp_spawn pickles callbacks
    assert type(clone) is CollapseMonitor


def test_bad_arguments_fail_at_construction():
    with pytest.raises(ValueError, match="every_n_train_steps"):
        CollapseMonitor(layer="encoder", every_n_train_steps=0, max_overhead=None)
    with pytest.raises(ValueError, match="mode"):
        CollapseMonitor(layer="encoder", mode="up", max_overhead=None)
    with pytest.raises(ValueError, match="pool"):
        CollapseMonitor(layer="encoder", pool="median", max_overhead=None)
    with pytest.raises(ValueError, match="accepted terms"):
        CollapseMonitor(layer="encoder", weights={"loops": 1.0}, max_overhead=None)
    with pytest.raises(ValueError, match="layer"):
        CollapseMonitor(layer="", max_overhead=None)


def test_standalone_pytorch_lightning_flavour(tmp_path):
    import pytorch_lightning as ptl

    from topo_callbacks.pytorch_lightning import CollapseMonitor as PTLCollapseMonitor

    class PTLModel(ptl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh())
            self.head = torch.nn.Linear(16, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.head(self.encoder(x)), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    mon = PTLCollapseMonitor(layer="encoder", every_n_train_steps=5, max_samples=64, max_overhead=None)
    assert isinstance(mon, ptl.Callback)
    assert not isinstance(mon, CollapseMonitor)
    t = ptl.Trainer(
        max_steps=10,
        accelerator="cpu",
        devices=1,
        callbacks=[mon],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    t.fit(PTLModel(), loader())
    assert [h["step"] for h in mon.history] == [5, 10]
    assert "collapse/ci" in t.callback_metrics


def test_wandb_logger_offline_gets_each_check_once(tmp_path, monkeypatch):
    """The W&B logger (offline: nothing leaves the machine) beside CSV and TensorBoard: one `wandb.log` call per
    check on top of the user's own, and the last values in the run summary."""
    pytest.importorskip("wandb")
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))

    def run(monitor: CollapseMonitor | None) -> dict:
        torch.manual_seed(0)
        logger = WandbLogger(project="topo-callbacks-test", save_dir=str(tmp_path), offline=True)
        t = trainer(tmp_path, max_steps=10, log_every_n_steps=1, logger=logger, callbacks=[monitor] if monitor else [])
        t.fit(TinyModel(), loader())
        summary = dict(logger.experiment.summary)
        wandb.finish()
        return summary

    mon = CollapseMonitor(layer="encoder", every_n_train_steps=5, max_samples=64, max_overhead=None)
    watched, plain = run(mon), run(None)
    assert [h["step"] for h in mon.history] == [5, 10]
    assert watched["_step"] == plain["_step"] + len(mon.history)
    assert watched["collapse/ci"] == pytest.approx(mon.history[-1]["ci"])
    assert watched["train_loss"] == pytest.approx(plain["train_loss"])
