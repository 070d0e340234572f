"""CollapseMonitorCallback in a real HF Trainer: one process in-test, two processes under torchrun."""

from __future__ import annotations

import json
import logging
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from transformers import Trainer, TrainerCallback, TrainingArguments

from tests.lightning_helpers import Collapser
from tests.procs import run_script
from topo_callbacks.core import CollapseWarning, StoppingReason
from topo_callbacks.transformers import CollapseMonitorCallback


class TinyRegressor(nn.Module):
    """A model the Trainer accepts: ``forward(x, labels) -> {"loss", "logits"}``, with a switchable collapse.

    On process 1 (``uneven=True``) it trains on 8 of its rows, and on none in steps 5-8 (the whole capture window
    of the check at step 8).
    """

    def __init__(self, uneven: bool = False) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16), Collapser(False))
        self.head = nn.Linear(16, 1)
        self.uneven = uneven
        self.step = 0

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.uneven and torch.distributed.is_initialized() and torch.distributed.get_rank() == 1:
            keep = 0 if 5 <= self.step <= 8 else 8
            x, labels = x[:keep], labels[:keep]
        pred = self.head(self.encoder(x))
        loss = ((pred - labels) ** 2).sum() / max(len(x), 1)
        return {"loss": loss, "logits": pred}


class Rows(torch.utils.data.Dataset):
    def __init__(self, n: int = 4096, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 16, generator=g)
        self.y = self.x[:, :1] * 2 + 0.1 * torch.randn(n, 1, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


class CollapseAt(TrainerCallback):
    """Tells the model its step and switches the encoder to constant output from optimizer step ``at`` on."""

    def __init__(self, at: int | None) -> None:
        self.at = at

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        model.step = state.global_step + 1
        model.encoder[3].enabled = self.at is not None and state.global_step + 1 >= self.at


def make_trainer(
    out: Path, max_steps: int, collapse_at: int | None, uneven: bool = False, callbacks: list | None = None, **kwargs
) -> Trainer:
    torch.manual_seed(0)
    settings = {"report_to": "none", "logging_steps": 10_000, **kwargs}
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=32,
        max_steps=max_steps,
        learning_rate=0.05,
        optim="sgd",
        lr_scheduler_type="constant",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_drop_last=True,
        seed=0,
        **settings,
    )
    return Trainer(
        model=TinyRegressor(uneven),
        args=args,
        train_dataset=Rows(),
        callbacks=[CollapseAt(collapse_at), *(callbacks or [])],
    )


def monitor_entries(trainer: Trainer, key: str = "collapse/ci") -> list[tuple[int, float]]:
    return [(e["step"], e[key]) for e in trainer.state.log_history if key in e]


def test_checks_log_through_trainer_and_stop_on_threshold(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=60, collapse_at=31)
    mon = CollapseMonitorCallback(
        trainer=trainer, layer="encoder", every_n_train_steps=5, max_samples=64, divergence_threshold=0.9,
        stop_on_alarm=True, max_overhead=None,
    )  # fmt: skip
    trainer.add_callback(mon)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CollapseWarning)
        trainer.train()
    assert [h["step"] for h in mon.history] == [5, 10, 15, 20, 25, 30, 35]
    assert trainer.state.global_step == mon.stopped_step == 35
    # the collapse at step 31 makes the encoder's output constant: no gradient reaches its weights, so the dead-layer
    # rule (5 steps in a row) fires at step 35 just before that step's check crosses the divergence threshold
    assert mon.stopping_reason in (StoppingReason.DIVERGENCE_THRESHOLD, StoppingReason.DETECTOR)
    if mon.stopping_reason is StoppingReason.DETECTOR:
        assert mon.summary()["episodes"][0]["kind"] == "dead_layer"
    assert mon.history[-1]["ci"] > 0.9
    # through trainer.log: in log_history with the Trainer's own fields, every term beside the CI
    assert monitor_entries(trainer) == [(h["step"], h["ci"]) for h in mon.history]
    last = trainer.state.log_history[-2]  # the final entry is the Trainer's train summary
    assert {"epoch", "collapse/betti_term", "collapse/effective_rank", "collapse/b0"} <= set(last)
    assert not trainer.model.encoder._forward_hooks  # detached at the end of training


def test_unbound_callback_still_records_and_says_so(tmp_path):
    mon = CollapseMonitorCallback(layer="encoder", every_n_train_steps=5, max_samples=64, max_overhead=None)
    trainer = make_trainer(tmp_path, max_steps=10, collapse_at=None)
    trainer.add_callback(mon)
    with pytest.warns(CollapseWarning, match="report_to"):
        trainer.train()
    assert [s for s, _ in monitor_entries(trainer)] == [5, 10]


def test_wrong_layer_fails_when_the_trainer_is_built(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=1)
    with pytest.raises(ValueError, match=r"encodr.*Close matches: \['encoder'"):
        Trainer(
            model=TinyRegressor(),
            args=args,
            train_dataset=Rows(64),
            callbacks=[CollapseMonitorCallback("encodr", max_overhead=None)],
        )


def test_arguments_are_json_and_callables_must_be_importable():
    mon = CollapseMonitorCallback(
        "encoder", pool="tests.test_transformers:first_row", weights={"betti": 1.0}, max_overhead=None
    )
    json.dumps(mon.state())
    assert mon.state()["args"]["pool"] == "tests.test_transformers:first_row"
    assert (
        CollapseMonitorCallback("encoder", pool=first_row, max_overhead=None).state()["args"]["pool"]
        == mon.state()["args"]["pool"]
    )
    with pytest.raises(ValueError, match="`select` must be a string or a module-level function"):
        CollapseMonitorCallback("encoder", select=lambda out: out, max_overhead=None)
    with pytest.raises(ValueError, match="`layer` must be a dotted module path"):
        CollapseMonitorCallback(nn.Linear(2, 2), max_overhead=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not available in the HF callback"):
        CollapseMonitorCallback("encoder", source="probe", probe=torch.zeros(4, 2), max_overhead=None)


def first_row(out: torch.Tensor) -> torch.Tensor:
    return out.reshape(out.shape[0], -1)


def test_resume_restores_scale_baseline_and_history_into_the_users_object(tmp_path):
    kwargs = {"layer": "encoder", "every_n_train_steps": 5, "max_samples": 64}
    common = {"save_strategy": "steps", "save_steps": 30, "restore_callback_states_from_checkpoint": True}
    first = make_trainer(tmp_path, max_steps=30, collapse_at=None, **common)
    first.add_callback(CollapseMonitorCallback(trainer=first, **kwargs, max_overhead=None))
    first.train()
    saved = json.loads((tmp_path / "checkpoint-30" / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"]["CollapseMonitorCallback"]["attributes"]["monitor_state"]["eps"] > 0

    second = make_trainer(tmp_path, max_steps=40, collapse_at=None, **common)
    mine = CollapseMonitorCallback(trainer=second, **kwargs, max_overhead=None)
    second.add_callback(mine)
    second.train(resume_from_checkpoint=str(tmp_path / "checkpoint-30"))
    # the Trainer rebuilt a copy from the JSON state; the object the user holds is the one that kept watching
    before = saved["stateful_callbacks"]["CollapseMonitorCallback"]["attributes"]["monitor_state"]
    assert mine.eps == before["eps"]
    assert mine.rule.state_dict()["baseline_values"] == before["rule"]["baseline_values"]
    assert [h["step"] for h in mine.history] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert [h["ci"] for h in mine.history[:6]] == [h["ci"] for h in before["history"]]
    (live,) = [cb for cb in second.callback_handler.callbacks if isinstance(cb, CollapseMonitorCallback)]
    assert live.state() == mine.state()
    assert not second.model.encoder._forward_hooks  # one hook, the user's object's, removed at the end
    # the new checks went through trainer.log
    assert [s for s, _ in monitor_entries(second)][-2:] == [35, 40]


def _two_monitors(trainer: Trainer | None, keys: tuple[str, str]) -> list[CollapseMonitorCallback]:
    return [
        CollapseMonitorCallback(
            trainer=trainer, layer=layer, monitor=key, every_n_train_steps=5, max_samples=64, max_overhead=None
        )
        for layer, key in zip(("encoder.0", "encoder.2"), keys, strict=True)
    ]


@pytest.mark.parametrize("pattern", ["add_callback", "callbacks"])
def test_two_monitors_resume_from_their_own_latest_state(tmp_path, pattern):
    """Two callbacks of one class: the Trainer appends each save's states to a list that starts with the states at
    the start of training, and restores by position, so the first (stale) entries used to win."""
    keys = ("collapse/e0/ci", "collapse/e2/ci")
    common = {"save_strategy": "steps", "save_steps": 20, "restore_callback_states_from_checkpoint": True}

    def build(max_steps: int) -> tuple[Trainer, list[CollapseMonitorCallback]]:
        if pattern == "add_callback":
            trainer = make_trainer(tmp_path, max_steps=max_steps, collapse_at=None, **common)
            monitors = _two_monitors(trainer, keys)
            for mon in monitors:
                trainer.add_callback(mon)
            return trainer, monitors
        monitors = _two_monitors(None, keys)
        trainer = make_trainer(tmp_path, max_steps=max_steps, collapse_at=None, callbacks=monitors, **common)
        for mon in monitors:
            mon.bind(trainer)
        return trainer, monitors

    first, before = build(40)
    first.train()
    saved = json.loads((tmp_path / "checkpoint-40" / "trainer_state.json").read_text())
    entries = saved["stateful_callbacks"]["CollapseMonitorCallback"]
    assert len(entries) == 2  # the current states only, not those of step 0 and step 20 as well
    second, after = build(60)
    second.train(resume_from_checkpoint=str(tmp_path / "checkpoint-40"))
    for old, new in zip(before, after, strict=True):
        assert new.eps == old.eps
        assert [h["step"] for h in new.history] == list(range(5, 65, 5))
        assert [h["ci"] for h in new.history[:8]] == [h["ci"] for h in old.history]
    assert after[0].history[-1]["ci"] != after[1].history[-1]["ci"]  # each restored its own, not its twin's


def test_two_monitors_with_one_key_are_refused(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=10, collapse_at=None)
    for mon in _two_monitors(trainer, ("collapse/ci", "collapse/ci")):
        trainer.add_callback(mon)
    with pytest.raises(ValueError, match="two CollapseMonitorCallbacks log under 'collapse/ci'"):
        trainer.train()


@pytest.mark.parametrize(("logging_steps", "every"), [(10, 10), (10, 5), (4, 6)])
@pytest.mark.parametrize("pattern", ["add_callback", "callbacks"])
def test_the_trainers_own_logs_are_kept_at_the_same_steps(tmp_path, logging_steps, every, pattern):
    """`trainer.log` from a callback runs the handler's `on_log`, which cleared `control.should_log`, so the Trainer
    skipped its own loss/grad_norm/learning_rate logs at every check step."""

    def trainers_logs(trainer: Trainer) -> list[tuple[int, list[str]]]:
        return [
            (e["step"], sorted(k for k in e if k not in ("train_runtime", "train_samples_per_second",
                                                         "train_steps_per_second")))
            for e in trainer.state.log_history
            if not any(k.startswith("collapse/") for k in e)
        ]  # fmt: skip

    plain = make_trainer(tmp_path / "plain", max_steps=30, collapse_at=None, logging_steps=logging_steps)
    plain.train()
    mon = CollapseMonitorCallback(layer="encoder", every_n_train_steps=every, max_samples=64, max_overhead=None)
    watched = make_trainer(tmp_path / "watched", max_steps=30, collapse_at=None, logging_steps=logging_steps,
                           callbacks=[mon] if pattern == "callbacks" else [])  # fmt: skip
    if pattern == "add_callback":
        watched.add_callback(mon)
    mon.bind(watched)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CollapseWarning)
        watched.train()
    expected = trainers_logs(plain)
    assert [s for s, keys in expected if "loss" in keys] == list(range(logging_steps, 31, logging_steps))
    assert trainers_logs(watched) == expected
    assert [s for s, _ in monitor_entries(watched)] == list(range(every, 31, every))


def test_tensorboard_receives_the_trainers_loss_and_the_checks(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = make_trainer(tmp_path, max_steps=20, collapse_at=None, logging_steps=10, report_to="tensorboard")
    trainer.add_callback(CollapseMonitorCallback(trainer=trainer, layer="encoder", every_n_train_steps=10,
                                                 max_samples=64, max_overhead=None))  # fmt: skip
    trainer.train()
    (events,) = list(tmp_path.rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events.parent))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [10, 20]
    assert [e.step for e in acc.Scalars("train/collapse/ci")] == [10, 20]
    # the barcode panel of `topo-callbacks report` reads the latest H0 diagram next to the event file
    diagram = json.loads((events.parent / "collapse_diagram_collapse_ci.json").read_text())
    assert diagram["step"] == 20
    assert len(diagram["h0_deaths"]) > 0


def test_logger_false_keeps_values_out_of_the_logs_and_a_summary_ends_the_run(tmp_path, caplog):
    trainer = make_trainer(tmp_path, max_steps=10, collapse_at=None, logging_steps=5)
    mon = CollapseMonitorCallback(trainer=trainer, layer="encoder", every_n_train_steps=5, max_samples=64,
                                  logger=False, max_overhead=None)  # fmt: skip
    trainer.add_callback(mon)
    with caplog.at_level(logging.INFO, logger="transformers.topo_callbacks"):
        trainer.train()
    assert [h["step"] for h in mon.history] == [5, 10]
    assert monitor_entries(trainer) == []
    assert any("collapse/ci: 2 checks (steps 5-10), no alarm" in r.message for r in caplog.records)


def test_a_run_shorter_than_the_check_interval_warns(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=10, collapse_at=None)
    trainer.add_callback(
        CollapseMonitorCallback(trainer=trainer, layer="encoder", every_n_train_steps=50, max_overhead=None)
    )
    with pytest.warns(CollapseWarning, match=r"no collapse check ran \(the run ended at step 10, before the first"):
        trainer.train()


WORKER = textwrap.dedent(
    """
    import json, sys, warnings
    import torch
    from tests.procs import finish_distributed
    from tests.test_transformers import make_trainer
    from topo_callbacks.transformers import CollapseMonitorCallback

    warnings.simplefilter("ignore")
    out = sys.argv[1]
    trainer = make_trainer(out, max_steps=60, collapse_at=13, uneven=True, ddp_backend="gloo")
    mon = CollapseMonitorCallback(trainer=trainer, layer="encoder", every_n_train_steps=4, max_samples=96,
                                  divergence_threshold=0.9, stop_on_alarm=True, max_overhead=None)
    trainer.add_callback(mon)
    trainer.train()
    rank = torch.distributed.get_rank()
    result = {"rank": rank, "world": torch.distributed.get_world_size(), "global_step": trainer.state.global_step,
              "stopped_step": mon.stopped_step, "ci": [[h["step"], h["ci"], h["n"]] for h in mon.history],
              "logged": [[e["step"], e["collapse/ci"]] for e in trainer.state.log_history if "collapse/ci" in e]}
    with open(f"{out}/rank{rank}.json", "w") as fh:
        json.dump(result, fh)
    del trainer, mon
    finish_distributed()
    """
)


@pytest.mark.slow
def test_torchrun_two_processes_uneven_and_empty_rank_same_ci_and_stop(tmp_path: Path):
    run_script(WORKER, tmp_path, launcher="torchrun", timeout=300)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["ci"] == r1["ci"]
    assert r0["logged"] == r1["logged"] == [[s, ci] for s, ci, _ in r0["ci"]]
    n_by_step = {s: n for s, _, n in r0["ci"]}
    assert n_by_step[4] == 80  # 48 rows from rank 0 (its share of 96) + 32 from rank 1 (8 per step)
    assert n_by_step[8] == 48  # rank 1 contributed nothing to this check
    # collapse from step 13: the check at 16 is the first whose capture windows (rank 1: steps 13-16) are all collapsed
    assert r0["stopped_step"] == r1["stopped_step"] == r0["global_step"] == r1["global_step"] == 16


@pytest.mark.parametrize("layer", ["encoder", "encoder.layer.1", "encoder.layer.1.attention"])
def test_hf_model_outputs_are_selected_by_the_documented_rule(layer):
    """A randomly initialised tiny BERT (nothing downloaded): ModelOutput, tuple and tensor outputs all yield rows."""
    from transformers import BertConfig, BertModel

    from topo_callbacks.core import CollapseMonitorCore

    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=16)  # fmt: skip
    torch.manual_seed(0)
    bert = BertModel(config).train()
    mon = CollapseMonitorCore(layer, every_n_train_steps=1, max_samples=64, strict=True, max_overhead=None)
    mon.attach(bert)
    mon.prepare_step(1)
    bert(input_ids=torch.randint(0, 50, (24, 10)))
    result = mon.run_check(1)
    assert result.report is not None
    assert (result.report.n, result.report.d) == (24, 32)  # one mean-pooled row per sequence


@pytest.mark.slow
@pytest.mark.parametrize("clip", [1.0, 0.0])
def test_the_detector_reads_the_losses_and_gradient_norms_the_trainer_logs(tmp_path, clip):
    """With ``logging_steps=1`` the Trainer logs every step's loss and its pre-clip gradient norm; the detector's
    reference windows hold the same numbers (clipping on: read from the clipping call; off: from the gradients)."""
    trainer = make_trainer(tmp_path, 230, None, logging_steps=1, max_grad_norm=clip)
    monitor = CollapseMonitorCallback(
        trainer=trainer, layer="encoder", every_n_train_steps=50, max_samples=128, max_overhead=None
    )
    trainer.add_callback(monitor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    logged = [e for e in trainer.state.log_history if "loss" in e and "grad_norm" in e]
    assert [e["step"] for e in logged] == list(range(1, 231))
    states = monitor.detector.states
    assert list(states["loss"].reference) == pytest.approx([e["loss"] for e in logged[-200:]], abs=1e-4)
    grads = [float(torch.tensor(v).exp()) for v in states["grad_norm"].reference]
    assert grads == pytest.approx([e["grad_norm"] for e in logged[-200:]], rel=1e-5)
    if clip:  # the clipped norm would sit at 1.0 whenever clipping acts; the detector saw the norms above it
        assert max(grads) > 1.5
    assert monitor.last_observed_step == 230
    # the wrapper is gone after training
    assert "clip_grad_norm_" not in trainer.accelerator.__dict__
