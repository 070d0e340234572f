"""The alarm on ordinary training runs outside the benchmark, each a defect a new user met: fp16 with a real loss
scaler in every adapter (skipped steps are not failures), a NaN loss without a scaler, a run broken from its first
steps, a CNN leaving its loss plateau, a loss that jumps a millionfold, and the detector after a non-finite value
(finite, re-armed, every episode told)."""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from tests.scripts import load_benchmark
from topo_callbacks.bench.tasks import DigitsMLP
from topo_callbacks.core import CollapseMonitorCore
from topo_callbacks.core.detector import CAP, CHECK_WINDOW, CusumDetector, DetectorCalibration, default_calibration
from topo_callbacks.core.rollback import RISE_KEPT


def digits(n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    return (x, y) if n is None else (x[:n], y[:n])


def plain_loop(
    steps: int,
    *,
    lr: Any = 0.05,
    every: int = 10,
    seed: int = 0,
    model: nn.Module | None = None,
    loss_hook: Any = None,
    momentum: float = 0.9,
    grad_norms: list[float] | None = None,
    shuffle_labels_from: int | None = None,
    smoothing_from: int | None = None,
    restart_at: int | None = None,
    **monitor_kwargs: Any,
) -> tuple[CollapseMonitorCore, list[str], list[float]]:
    """A plain PyTorch loop on the digits with the core monitor, fed as the adapters feed it (loss, gradient norm,
    learning rate). ``lr`` may be a function of the 1-based step; ``loss_hook(step, loss)`` may replace the loss;
    ``grad_norms`` collects the gradient norms; from ``shuffle_labels_from`` on the labels are shuffled; from
    ``smoothing_from`` on the loss has label smoothing 0.3; before step ``restart_at`` the loop calls
    `CollapseMonitorCore.restart_references`."""
    from topo_callbacks.core.detector import global_grad_norm

    torch.manual_seed(seed)
    x, y = digits()
    model = model or DigitsMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=momentum)
    monitor = CollapseMonitorCore(
        "embed", every_n_train_steps=every, max_samples=256, **monitor_kwargs, max_overhead=None
    )
    monitor.attach(model)
    g = torch.Generator().manual_seed(seed)
    losses = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, steps + 1):
            rate = lr(step) if callable(lr) else lr
            for group in opt.param_groups:
                group["lr"] = rate
            if step == restart_at:
                monitor.restart_references()
            monitor.prepare_step(step)
            idx = torch.randint(0, len(x), (64,), generator=g)
            labels = y[idx]
            if shuffle_labels_from is not None and step >= shuffle_labels_from:  # a data-loading bug
                labels = labels[torch.randperm(len(labels), generator=g)]
            smoothing = 0.3 if smoothing_from is not None and step >= smoothing_from else 0.0
            loss = nn.functional.cross_entropy(model(x[idx]), labels, label_smoothing=smoothing)
            if loss_hook is not None:
                loss = loss_hook(step, loss)
            opt.zero_grad()
            loss.backward()
            norm = global_grad_norm(model.parameters())
            if grad_norms is not None and norm is not None:
                grad_norms.append(norm)
            opt.step()
            losses.append(float(loss))
            result = monitor.observe_step(step, loss=float(loss), grad_norm=norm, lr=rate)
            if monitor.is_check_step(step):
                result = monitor.run_check(step)
            if result is not None and result.should_stop:
                break
    monitor.detach()
    return monitor, [str(w.message) for w in caught], losses


# ------------------------------------------------------------------------------------------ deliberate changes
@pytest.mark.parametrize("seed", [0, 1])
def test_a_deliberate_change_told_to_the_monitor_is_learned_and_a_later_failure_still_alarms(seed: int) -> None:
    """Label smoothing 0.3 switched on at step 300: the loss of the converged MLP jumps from ~0.05 to ~3 at once,
    which the detector cannot tell from a failure (`loss_spike` alarms at 300). Told first
    (``restart_references()`` before step 300), it learns the new level and stays quiet; labels shuffled from step 450
    (a data bug) still alarm, before the end."""
    plain, _, losses = plain_loop(400, seed=seed, smoothing_from=300)
    assert plain.detector is not None
    assert [e["start"] for e in plain.detector.episodes] == [300], plain.detector.episodes
    assert losses[299] > 20 * max(losses[280:299])  # the jump the alarm was about
    told, _, _ = plain_loop(450, seed=seed, smoothing_from=300, restart_at=300)
    assert told.detector is not None
    assert told.detector.episodes == []
    assert told.summary()["reference_restarts"] == [[300, "told"]]
    assert plain.summary()["reference_restarts"] == []
    broken, _, _ = plain_loop(600, seed=seed, smoothing_from=300, restart_at=300, shuffle_labels_from=450)
    assert broken.detector is not None
    starts = [e["start"] for e in broken.detector.episodes]
    assert starts, "the data bug after the restart did not alarm"
    assert 450 <= starts[0] < 500, broken.detector.episodes


class SmoothedDigits(nn.Module):
    """The digits MLP as the HF Trainer takes it (``forward(x, labels) -> {"loss", "logits"}``), and as a
    LightningModule's network; ``smoothing``: the label smoothing of its cross-entropy (switched on by the runs)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = DigitsMLP()
        self.smoothing = 0.0

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.net(x)
        loss = nn.functional.cross_entropy(logits, labels, label_smoothing=self.smoothing)
        return {"loss": loss, "logits": logits}


#: the deliberate change in the adapters' runs: label smoothing 0.3 from this optimizer step on, of RUN_STEPS
SMOOTH_FROM, RUN_STEPS = 300, 400


def lightning_smoothing_run(tell: bool) -> Any:
    """Lightning: the digits MLP, SGD with momentum; a user's callback switches label smoothing on for the steps
    from `SMOOTH_FROM` and (``tell``) calls the monitor's `restart_references` there, as the docs say."""
    pl = pytest.importorskip("lightning.pytorch")
    from topo_callbacks.lightning import CollapseMonitor

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = SmoothedDigits()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.model(*batch)["loss"]

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    class Smoothing(pl.Callback):
        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if trainer.global_step + 1 == SMOOTH_FROM:  # the step about to run
                pl_module.model.smoothing = 0.3
                if tell:
                    monitor.restart_references()

    pl.seed_everything(0, verbose=False)
    x, y = digits()
    data = DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=True, drop_last=True,
                      generator=torch.Generator().manual_seed(0))  # fmt: skip
    monitor = CollapseMonitor(layer="model.net.embed", every_n_train_steps=10, max_samples=256, max_overhead=None)
    trainer = pl.Trainer(max_steps=RUN_STEPS, accelerator="cpu", devices=1, callbacks=[monitor, Smoothing()],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Module(), data)
    assert trainer.global_step == RUN_STEPS
    return monitor


def hf_smoothing_run(tmp_path: Path, tell: bool) -> Any:
    """The same through the HF Trainer (its SGD, clipping at norm 1, a constant rate): a user's `TrainerCallback`
    switches label smoothing on and (``tell``) calls the monitor's `restart_references` at ``on_step_begin``."""
    transformers = pytest.importorskip("transformers")
    from topo_callbacks.transformers import CollapseMonitorCallback

    class Smoothing(transformers.TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            if state.global_step + 1 == SMOOTH_FROM:
                model.smoothing = 0.3
                if tell:
                    monitor.restart_references()

    class Rows(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.x, self.y = digits()

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"x": self.x[i], "labels": self.y[i]}

    torch.manual_seed(0)
    monitor = CollapseMonitorCallback(layer="net.embed", every_n_train_steps=10, max_samples=256, max_overhead=None)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=64, max_steps=RUN_STEPS, learning_rate=0.1, optim="sgd",
        lr_scheduler_type="constant", use_cpu=True, disable_tqdm=True, dataloader_drop_last=True, seed=0,
        report_to="none", logging_steps=10_000, save_strategy="no",
    )  # fmt: skip
    trainer = transformers.Trainer(model=SmoothedDigits(), args=args, train_dataset=Rows(),
                                   callbacks=[monitor, Smoothing()])  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert trainer.state.global_step == RUN_STEPS
    return monitor


@pytest.mark.parametrize("adapter", ["lightning", "hf"])
def test_restart_references_through_the_adapters_learns_a_deliberate_change(adapter: str, tmp_path: Path) -> None:
    """`restart_references` called from a user's own callback, in a real Lightning and HF Trainer run: label
    smoothing switched on at step 300 alarms without the call (the loss of the converged MLP jumps), and with it the
    new level is learned, no episode, the restart listed at step 300 in ``summary()``."""
    run = (lambda tell: lightning_smoothing_run(tell)) if adapter == "lightning" else (
        lambda tell: hf_smoothing_run(tmp_path / str(tell), tell))  # fmt: skip
    plain = run(False)
    starts = [e["start"] for e in plain.detector.episodes]
    assert starts, "the deliberate change did not alarm without the call"
    assert SMOOTH_FROM <= starts[0] < SMOOTH_FROM + 20, plain.detector.episodes
    assert plain.summary()["reference_restarts"] == []
    told = run(True)
    assert told.detector.episodes == [], told.detector.episodes
    assert told.summary()["reference_restarts"] == [[SMOOTH_FROM, "told"]]
    assert told.first_alarm_step is None


# ------------------------------------------------------------------------------------------------ fp16 scalers
def test_lightning_fp16_with_a_real_grad_scaler_counts_skipped_steps_and_never_alarms() -> None:
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.plugins import MixedPrecision

    from tests.test_detector_runs import DigitsCNN
    from tests.test_detector_runs import digits as digit_images
    from topo_callbacks.lightning import CollapseMonitor

    pl.seed_everything(0, verbose=False)
    loader = DataLoader(digit_images(), batch_size=64, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    monitor = CollapseMonitor(
        layer="embed", every_n_train_steps=10, max_samples=256, stop_on_alarm=True, max_overhead=None
    )
    # a large initial scale and a short growth interval: skips at the start and every 25 steps, as fp16 runs have
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24, growth_interval=25)
    trainer = pl.Trainer(max_steps=150, accelerator="cpu", devices=1, callbacks=[monitor], logger=False,
                         plugins=[MixedPrecision("16-mixed", "cpu", scaler)], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(DigitsCNN(None), loader)
    assert monitor.skipped_steps >= 5, monitor.summary()
    assert monitor.first_alarm_step is None, monitor.summary()
    assert trainer.global_step == 150  # stop_on_alarm=True, and the run was not stopped
    assert monitor.history[-1]["skipped_steps"] == monitor.skipped_steps
    assert all(math.isfinite(h["detector"]) and h["detector"] < 1.0 for h in monitor.history)


def test_the_report_of_an_fp16_run_shows_its_skipped_steps_and_its_episode(tmp_path: Path) -> None:
    """A real fp16 Lightning run whose loss is NaN at step 60 (one episode) and whose scaler skips steps: the report
    read from its CSV logs finds the same episode start and the same skipped-step count as the monitor."""
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.plugins import MixedPrecision

    from tests.test_detector_runs import DigitsCNN
    from tests.test_detector_runs import digits as digit_images
    from topo_callbacks.lightning import CollapseMonitor
    from topo_callbacks.report import write_report

    class NaNAt60(DigitsCNN):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if self.trainer.global_step == 59 else loss

    pl.seed_everything(0, verbose=False)
    loader = DataLoader(digit_images(), batch_size=64, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    monitor = CollapseMonitor(layer="embed", every_n_train_steps=10, max_samples=256, max_overhead=None)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24, growth_interval=25)
    trainer = pl.Trainer(max_steps=200, accelerator="cpu", devices=1, callbacks=[monitor],
                         logger=CSVLogger(tmp_path, name="run"), plugins=[MixedPrecision("16-mixed", "cpu", scaler)],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(NaNAt60(None), loader)
    episodes = monitor.summary()["episodes"]
    assert [(e["start"], e["kind"]) for e in episodes] == [(60, "nonfinite")], episodes
    assert episodes[0]["end"] is not None
    report = write_report(tmp_path, tmp_path / "report.png")
    assert report["skipped_steps"] == monitor.skipped_steps >= 5
    assert [e["start"] for e in report["episodes"]] == [60]
    end = report["episodes"][0]["end"]
    assert end is not None
    assert episodes[0]["end"] <= end <= episodes[0]["end"] + 10  # the report sees the end at the next check
    assert report["panels"]["detector"]["hlines"] == [1.0]


def test_accelerate_fp16_with_the_users_grad_scaler_counts_skipped_steps_and_never_alarms() -> None:
    pytest.importorskip("accelerate")
    from accelerate import Accelerator

    from topo_callbacks.accelerate import AccelerateCollapseMonitor

    torch.manual_seed(0)
    x, y = digits()
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(DigitsMLP())
    opt = accelerator.prepare(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24, growth_interval=25)
    g = torch.Generator().manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with AccelerateCollapseMonitor(accelerator, model, "embed", every_n_train_steps=25, max_samples=256,
                                       scaler=scaler, optimizer=opt, stop_on_alarm=True,
                                       max_overhead=None) as monitor:  # fmt: skip
            for step in range(150):
                idx = torch.randint(0, len(x), (64,), generator=g)
                with torch.autocast("cpu", dtype=torch.float16):
                    loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                stop = monitor.step(loss=loss)
                opt.zero_grad()
                assert not stop, (step, monitor.summary())
    assert monitor.skipped_steps >= 5, monitor.summary()
    assert monitor.first_alarm_step is None, [str(w.message) for w in caught]
    assert monitor.global_step == 150


def test_hf_trainer_with_a_grad_scaler_counts_skipped_steps_and_never_alarms(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from tests.test_transformers import make_trainer
    from topo_callbacks.transformers import CollapseMonitorCallback

    trainer = make_trainer(tmp_path, 120, None)
    monitor = CollapseMonitorCallback(trainer=trainer, layer="encoder", every_n_train_steps=10, max_samples=128,
                                      stop_on_alarm=True, max_overhead=None)  # fmt: skip
    trainer.add_callback(monitor)
    # on the CPU Accelerate makes no scaler for `fp16=True`: set up what it does on a GPU (a scaler, native AMP in
    # fp16: autocast, `clip_grad_norm_` unscaling first) with a real CPU scaler; it skips at the start and each growth
    accelerator = trainer.accelerator
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24, growth_interval=20)
    accelerator.native_amp = True
    precision, accelerator.state._mixed_precision = accelerator.state._mixed_precision, "fp16"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train()
    finally:
        accelerator.state._mixed_precision = precision
    assert monitor.skipped_steps >= 3, monitor.summary()
    assert monitor.first_alarm_step is None, monitor.summary()
    assert trainer.state.global_step == 120


# ------------------------------------------------------------------------------------------- what does alarm
def test_a_nan_loss_without_a_scaler_alarms_at_that_step() -> None:
    def poison(step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if step == 40 else loss

    monitor, caught, _ = plain_loop(60, loss_hook=poison, stop_on_alarm=True)
    assert monitor.first_alarm_step == 40
    assert monitor.summary()["episodes"][0]["kind"] == "nonfinite"
    assert any("alarmed at step 40 on `loss` (nonfinite)" in m for m in caught), caught


def test_a_loss_scale_that_keeps_falling_alarms() -> None:
    monitor = CollapseMonitorCore("0", max_overhead=None)
    fired = [monitor.observe_step(s, loss=1.0, grad_norm=math.inf, skipped=True, loss_scale=2.0 ** (17 - s))
             for s in range(1, 25)]  # fmt: skip
    first = next(i for i, f in enumerate(fired, 1) if f is not None)
    assert first == 18  # the scale fell under 1
    assert monitor.summary()["episodes"][0]["kind"] == "loss_scale"


def test_a_run_diverging_from_step_50_alarms() -> None:
    """A learning rate far too high from step 50 (loss to the thousands, accuracy to chance): the reference windows
    never learn the broken state as normal."""
    monitor, _caught, losses = plain_loop(300, lr=lambda s: 0.05 if s < 50 else 3.0)
    assert min(losses[100:]) > 2.0 > losses[45]  # at chance from step 100 on
    assert monitor.first_alarm_step is not None, monitor.summary()
    assert 50 <= monitor.first_alarm_step <= 80, monitor.summary()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_learning_rate_twenty_times_too_high_alarms_within_four_steps(seed: int) -> None:
    """The rate x20 at step 150 of a trained classifier: the loss leaps 10-400x for a step or two and settles near
    chance, under the extreme rule's 100x of the window's largest (the window still holds the first steps' losses).
    The loss's large-rise CUSUM (`loss_spike`, up to 100 a step) alarms within 4 steps; the loss channel alone (up to
    8 a step) took 14-19 steps (steps 164-169 with the calibration before it)."""
    monitor, _caught, losses = plain_loop(170, lr=lambda s: 0.05 if s < 150 else 1.0, seed=seed)
    assert max(losses[100:149]) < 0.5 < 2.0 < losses[152]
    assert monitor.first_alarm_step is not None, monitor.summary()
    assert 150 <= monitor.first_alarm_step <= 154, monitor.summary()
    assert monitor.summary()["episodes"][0]["channel"] == "loss_spike"


def test_a_layer_constant_from_the_start_alarms() -> None:
    model = DigitsMLP()
    nn.init.zeros_(model.embed[0].weight)
    nn.init.constant_(model.embed[0].bias, -1.0)  # every unit dead from step 1: the embeddings are all 0
    monitor, _, _ = plain_loop(120, model=model)
    assert monitor.first_alarm_step is not None
    assert monitor.first_alarm_step <= 30, monitor.summary()
    assert monitor.summary()["episodes"][0]["kind"] == "collapsed"


def test_a_loss_jump_of_a_millionfold_alarms_within_two_steps() -> None:
    def jump(step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * 1e6 if step >= 120 else loss

    monitor, _, _ = plain_loop(130, loss_hook=jump, lr=0.0)  # lr 0: the jump is in the loss alone
    assert monitor.first_alarm_step is not None
    assert 120 <= monitor.first_alarm_step <= 121
    assert monitor.summary()["episodes"][0]["kind"] == "extreme"


def test_labels_that_break_at_once_alarm_within_three_steps() -> None:
    """The labels of the data go wrong at step 300 of a well-trained classifier: the loss rises more than 50 robust
    standard deviations and stays there (30x, not the 100x of the extreme rule): the loss's large-rise CUSUM
    (`loss_spike`) or the fast rule fires by the third step, where the loss channel's CUSUM (at most 8 a step) needs
    about 14."""
    monitor, _, losses = plain_loop(320, shuffle_labels_from=300, every=25)
    assert min(losses[300:303]) > 10 * max(losses[250:299])
    assert monitor.first_alarm_step is not None
    assert 300 <= monitor.first_alarm_step <= 302, monitor.summary()
    first = monitor.summary()["episodes"][0]
    assert first["kind"] in ("abrupt", "extreme") or first["channel"] == "loss_spike", first


def test_a_gradient_norm_of_zero_says_what_is_wrong_once() -> None:
    monitor = CollapseMonitorCore("0", max_overhead=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for s in range(1, 200):
            assert monitor.observe_step(s, loss=2.0 * 0.99**s, grad_norm=0.0) is None
    notes = [str(w.message) for w in caught if "zeroed" in str(w.message)]
    assert len(notes) == 1, notes
    assert math.isfinite(monitor.detector.level())


def test_a_gradient_norm_of_zero_while_the_loss_stays_at_its_first_values_alarms() -> None:
    monitor = CollapseMonitorCore("0", max_overhead=None)
    fired = [monitor.observe_step(s, loss=2.3 + 0.01 * (s % 3), grad_norm=0.0) for s in range(1, 60)]
    first = next(i for i, f in enumerate(fired, 1) if f is not None)
    assert first == 20
    assert monitor.summary()["episodes"][0]["kind"] == "no_gradient"


def test_no_loss_and_zeroed_gradients_are_reported_at_the_first_check() -> None:
    torch.manual_seed(0)
    model = DigitsMLP()
    monitor = CollapseMonitorCore("embed", every_n_train_steps=25, max_samples=64, max_overhead=None)
    monitor.attach(model)
    x, _ = digits(64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, 51):
            monitor.prepare_step(step)
            model(x)
            monitor.observe_step(step)  # no loss, gradients already gone
            if monitor.is_check_step(step):
                monitor.run_check(step)
    said = [str(w.message) for w in caught if "received no loss and no gradient norm" in str(w.message)]
    assert len(said) == 1


# ------------------------------------------------------------------------------------------- what does not
def test_a_cnn_leaving_its_loss_plateau_does_not_alarm() -> None:
    """A small CNN with a tiny initialisation sits on its initial loss for a while; when it starts learning its
    gradient norm rises several-fold while the loss falls. That is not a failure."""

    class PlateauCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                                          nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                                          nn.Flatten())  # fmt: skip
            self.embed = nn.Sequential(nn.Linear(64, 32), nn.ReLU())
            self.head = nn.Linear(32, 10)
            for p in self.parameters():
                p.data.mul_(0.6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.embed(self.features(x)))

    norms: list[float] = []
    monitor, _, losses = plain_loop(700, model=PlateauCNN(), lr=0.1, every=25, grad_norms=norms)
    start = next(i for i in range(len(losses)) if sum(losses[i : i + 20]) / 20 < 2.2)
    assert start >= 120, start  # the loss sat at ln(10) for 120 steps or more, then fell
    assert sum(losses[-100:]) / 100 < 0.5
    assert max(norms[start : start + 100]) > 5 * sorted(norms[:100])[50]  # the gradient norm rose several-fold
    assert monitor.first_alarm_step is None, monitor.summary()


@pytest.fixture(scope="module")
def outside() -> Any:
    """``benchmarks/outside_runs.py``: the training runs the alarm was not fit on."""
    return load_benchmark("outside_runs.py", "outside_runs")


def test_an_adamw_run_converging_after_its_warm_up_does_not_alarm(outside: Any) -> None:
    """``benchmarks/outside_runs.py``'s AdamW run (a CNN on the digits, warm-up over 200 steps, then cosine over 3000):
    after the warm-up its gradient norm falls tenfold in 200 steps while its loss falls from 0.2 to 0.003, which the
    gradient-norm channel alone scored as a failure at step 406. The embeddings keep their spread, so it is not."""
    run = outside.Run("adamw_warmup_cosine", "cnn", 420, lambda model, _: outside._warmup_cosine(model, 3000))
    out = outside.train(run, seed=1, max_overhead=None, quick=False)
    assert out.dropped_at is None
    assert out.alarms == []


def test_a_language_models_off_by_one_targets_alarm_and_its_twin_does_not(outside: Any) -> None:
    """``benchmarks/outside_runs.py``'s language model (PyTorch's own pre-LN transformer layers, AdamW with warm-up and
    cosine, clipping at 1.0) whose data pipeline starts shifting the targets one byte too far at step 600: the loss
    rises by about half (at step 1000 of the outside run: ~2.1 to 3.0-3.4, 4-7 robust standard deviations), and the
    default alarm (every step read) fires on the loss within 20 steps (619: the perplexity was found 10% worse at
    625), while the same run without the bug stays quiet."""
    recipe = lambda model, _: outside._lm_recipe(model, 2000)  # noqa: E731
    run = outside.Run("lm_off_by_one", "lm", 640, recipe, clip=1.0, fail_at=600, off_by_one_from=600)
    broken = outside.train(run, seed=0, max_overhead=None, quick=False)
    healthy = outside.train(outside.twin(run), seed=0, max_overhead=None, quick=False)
    assert healthy.alarms == [], healthy.alarms
    assert healthy.final_metric < 0.9 * broken.final_metric  # perplexity: the bug costs the metric
    assert broken.alarms, broken
    assert 600 <= broken.alarms[0]["start"] <= 620, broken.alarms
    assert broken.detected, (broken.alarms, broken.dropped_at)  # before the evaluation that found it 10% worse
    assert broken.alarms[0]["channel"] in ("loss", "loss_spike"), broken.alarms


@pytest.mark.parametrize("seed", [0, 3])
def test_a_onecycle_run_read_one_step_in_22_does_not_alarm_on_its_converging_gradient(
    outside: Any, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    """``benchmarks/outside_runs.py``'s OneCycle run with the budget's stride fixed at 1 step in 22 (the gradient norm
    at 1 read in 4: every 88 steps). Its gradient norm falls 30x while it converges; the reference keeps at least 20
    reads, 1760 steps here, and lagged that fall, which counted 4 reads' worth per read and alarmed at 1320 and 1408
    (the healthy runs' quiet depended on where the budget's stride fell). A read stands for fewer reads while the
    reference spans more than `LAG_SPAN` x `STEP_WINDOW` steps."""
    import topo_callbacks.core.monitor as monitor_module

    monkeypatch.setattr(monitor_module, "step_stride", lambda *args, **kwargs: 22)
    run = next(r for r in outside.RUNS if r.name == "onecycle")
    out = outside.train(run, seed=seed, max_overhead=0.02, quick=False)
    assert out.final_metric > 90.0  # healthy: it learned
    assert out.alarms == []


def test_a_simsiam_collapse_whose_loss_and_gradient_fall_alarms_once_a_check_sees_it(outside: Any) -> None:
    """SimSiam under AdamW whose stop-gradient goes at step 300: its loss falls to -1 and its gradient norm with it, as
    a converging run's do; the check that finds its embeddings' spread fallen lets the fall count from its start."""
    mons: list[CollapseMonitorCore] = []
    make = outside._monitor
    outside._monitor = lambda *a, **k: mons.append(make(*a, **k)) or mons[-1]
    try:
        schedule = lambda model, _: outside._warmup_cosine(model, 2000, lr=3e-4)  # noqa: E731
        run = outside.Run("simsiam_adamw_collapse", "ssl", 450, schedule, fail_at=300, no_stop_gradient_from=300)
        out = outside.train(run, seed=0, max_overhead=None, quick=False)
    finally:
        outside._monitor = make
    first = out.alarms[0]
    assert first["channel"] == "grad_norm", out.alarms
    assert first["kind"] == "cusum", out.alarms
    spread = {h["step"]: h["std_l2"] for h in mons[0].history}
    fell = min(s for s in spread if s > 300 and spread[s] < 0.8 * spread[300])
    assert 300 < first["start"] <= fell + 25, (first, spread)  # at the check that saw it, or the steps after
    assert mons[0].detector is not None
    assert mons[0].detector.episodes[0]["start"] == first["start"]


@pytest.mark.parametrize("seed", [0, 1])
def test_units_going_dormant_alarm_at_the_check_that_sees_them(outside: Any, seed: int) -> None:
    """A buggy regulariser pushes the hidden biases down from step 300 (``benchmarks/outside_runs.py``'s
    ``dormant_units``): a third of the watched layer's units stop firing within 50 steps while the loss keeps falling
    (accuracy goes at 375-400). The default monitor alarms on the dead-unit share (the dormant-unit rule, fit on clean
    runs only) at the first check that sees it or the next; the detector before the rule did not alarm at all."""
    torch.manual_seed(seed)
    model = DigitsMLP()

    def push(step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss if step < 300 else loss + outside.bias_push(model)

    monitor, messages, _ = plain_loop(400, model=model, every=25, seed=seed, loss_hook=push)
    dead = {h["step"]: h["dead_fraction"] for h in monitor.history}
    assert dead[300] < 0.2 < dead[350], dead
    assert monitor.detector is not None
    first = monitor.detector.episodes[0]
    assert (first["channel"], first["kind"]) == ("dead_fraction", "dormant"), monitor.detector.episodes
    assert 300 < first["start"] <= 350, (first, dead)
    assert any("units are going dormant" in m for m in messages), messages
    checks = [h["step"] for h in monitor.history]
    assert (
        first["onset"] == checks[checks.index(first["start"]) - 1] + 1
    )  # after the check before: a rollback goes past it
    state = monitor.detector.state_dict()  # the rule's reference travels with the state (resume, rollback)
    assert state["dead"] == [h["dead_fraction"] for h in monitor.history][-CHECK_WINDOW:]
    again = CusumDetector(monitor.detector.calibration)
    again.load_state_dict(state)
    assert again.state_dict() == state
    # the same checks replayed with the sample halved from the failure on: fewer rows, more units 0 on all of them,
    # so the reference starts again and these checks cannot be scored against the larger samples before
    replay = CusumDetector(monitor.detector.calibration)
    for h in monitor.history:
        values = {k: v for k, v in h.items() if isinstance(v, float)}
        replay.observe_check(h["step"], {**values, "n": values["n"] / (2 if h["step"] > 300 else 1)}, calibrating=False)
    assert [e for e in replay.episodes if e["kind"] == "dormant" and e["start"] <= 375] == [], replay.episodes


@pytest.mark.parametrize("seed", [0, 1])
def test_a_layer_broken_once_outside_the_benchmark_is_rolled_back_to_before_it(outside: Any, seed: int) -> None:
    """``benchmarks/outside_runs.py``'s ``dead_layer`` with ``on_alarm="rollback"``: the watched layer's biases are
    pushed to -50 once, at step 30 (its output constant 0; without a rollback the run ends near 10%). The dead-layer
    rule alarms at 34, the rollback restores step 1's snapshot (taken before the damage), and the run, at a quarter of
    the rate from then on, ends within 2 points of the same run never broken (its healthy twin)."""
    run = next(r for r in outside.RUNS if r.name == "dead_layer")
    rolled = outside.train(run, seed, None, False, on_alarm="rollback")
    healthy = outside.train(outside.twin(run), seed, None, False)
    assert [(e["step"], e["restored_step"]) for e in rolled.rollbacks] == [(34, 1)], rolled.rollbacks
    assert rolled.stopped_at is None
    assert healthy.alarms == []
    assert healthy.rollbacks == []
    assert rolled.final_metric >= healthy.final_metric - outside.RESCUE_POINTS, (rolled, healthy)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_rate_50x_too_high_outside_the_benchmark_is_rolled_back_to_a_rate_it_learns_at(
    outside: Any, seed: int
) -> None:
    """``lr_x50_at_40`` with ``on_alarm="rollback"``: the loop sets the rate 50x from step 40 on (computed from the step
    count: a rollback does not put it back). At a quarter (12.5x) three of four seeds plateaued near their first
    loss without another alarm (2026-12-04); with ``undo_rate_rise`` the first rollback brings the retry down to
    `RISE_KEPT` (4) times the rate of before the onset, and the run ends within 2 points of its healthy twin (with
    every step read, seed 1 alarms once more at 413, on its converging gradient norm, and rolls back to 241 at a
    quarter of that: later rollbacks are the policy's own)."""
    run = next(r for r in outside.RUNS if r.name == "lr_x50_at_40")
    rolled = outside.train(run, seed, None, False, on_alarm="rollback")
    healthy = outside.train(outside.twin(run), seed, None, False)
    first = rolled.rollbacks[0]
    assert (first["step"], first["restored_step"]) == (41, 1), rolled.rollbacks
    assert first["total_factor"] == pytest.approx(RISE_KEPT / 50)
    assert rolled.stopped_at is None
    assert rolled.final_metric >= healthy.final_metric - outside.RESCUE_POINTS, (rolled, healthy)


def test_labels_shuffled_outside_the_benchmark_stop_with_the_configuration_diagnosis(outside: Any) -> None:
    """``labels_shuffled`` (a data bug from step 1000) with ``on_alarm="rollback"``: the failure is in the data, so it
    comes back after every rollback whatever the rate; after `max_rollbacks` (4) the run stops, on the restored
    weights of before the bug, with the configuration diagnosis."""
    run = next(r for r in outside.RUNS if r.name == "labels_shuffled")
    rolled = outside.train(run, 0, None, False, on_alarm="rollback")
    assert len(rolled.rollbacks) == 4, rolled.rollbacks
    assert {e["restored_step"] for e in rolled.rollbacks} == {901}, rolled.rollbacks
    assert rolled.stop_reason == "max_rollbacks"
    assert rolled.stopped_at is not None
    assert rolled.stopped_at < run.steps
    assert rolled.final_metric > 90.0  # the weights of step 901, not the broken ones (without rollback: ~10%)


@pytest.mark.parametrize("seed", [0, 1])
def test_units_going_dormant_alarm_between_the_checks_the_budget_spaced_out(outside: Any, seed: int) -> None:
    """The same failure (``dormant_units``) with the default ``max_overhead``: on this MLP's sub-millisecond steps the
    budget spaces the checks thousands of steps apart, so the dormant-unit rule, which compares a check with the three
    before, never ran (0 of 4 outside the benchmark, 2026-12-04). The unit checks between them (the rows captured at
    every ``every_n_train_steps``, their share of dead units alone) feed it: it alarms within three intervals of the
    units going, and no check is added to the history."""
    mons: list[CollapseMonitorCore] = []
    make = outside._monitor
    outside._monitor = lambda *a, **k: mons.append(make(*a, **k)) or mons[-1]
    try:
        run = next(r for r in outside.RUNS if r.name == "dormant_units")
        out = outside.train(dataclasses.replace(run, steps=450), seed, 0.02, False)
    finally:
        outside._monitor = make
    monitor = mons[0]
    assert monitor.check_every >= 10 * monitor.every_n_train_steps  # spaced out
    assert len(monitor.history) <= 2
    assert monitor.unit_checks >= 10
    first = out.alarms[0]
    assert (first["channel"], first["kind"]) == ("dead_fraction", "dormant"), out.alarms
    assert 300 < first["start"] <= 375, out.alarms
    assert monitor.summary()["unit_checks"] == monitor.unit_checks


def test_a_healthy_run_whose_units_fall_silent_as_it_learns_does_not_alarm_on_them() -> None:
    """The same MLP without the regulariser, checked every 5 steps from its first: a tenth to a sixth of its units
    fall silent and fire again as it learns, the dead-unit share moving by a few units from check to check."""
    monitor, _, _ = plain_loop(600, every=5, seed=1)
    dead = [h["dead_fraction"] for h in monitor.history]
    assert max(dead) - min(dead) > 0.02, dead  # the share does move
    assert monitor.detector is not None
    assert [e for e in monitor.detector.episodes if e["kind"] == "dormant"] == [], monitor.detector.episodes


# ------------------------------------------------------------------------------------ state after an episode
def test_after_an_infinite_value_the_detector_is_finite_rearmed_and_tells_the_second_episode() -> None:
    monitor = CollapseMonitorCore("0", max_overhead=None)
    base = [1.0 + 0.01 * (s % 5) for s in range(600)]
    starts = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for s in range(1, 601):
            grad = math.inf if s == 250 else (500.0 if 480 <= s < 500 else 2.0)  # 250x for 20 steps
            if monitor.observe_step(s, loss=base[s - 1], grad_norm=grad) is not None:
                starts.append(s)
            level = monitor.detector.level()
            assert math.isfinite(level)
            assert level <= CAP
    assert len(starts) == 2, starts
    assert starts[0] == 250
    assert 480 <= starts[1] < 500
    episodes = monitor.summary()["episodes"]
    assert episodes[0]["end"] is not None
    assert episodes[0]["end"] < 480
    assert [e["kind"] for e in episodes] == ["nonfinite", "abrupt"]  # 250x for 3 steps: the fast rule
    messages = [str(w.message) for w in caught]
    assert sum("Collapse alarm" in m for m in messages) == 2
    assert any("ended at step" in m for m in messages)


def test_the_state_round_trip_keeps_episodes_and_skips() -> None:
    det = CusumDetector(default_calibration(0.05))
    det.observe_step(1, {"loss": math.nan, "grad_norm": 1.0})
    det.observe_step(2, {"loss": 1.0, "grad_norm": math.inf}, skipped=True, loss_scale=4.0)
    again = CusumDetector(default_calibration(0.05))
    again.load_state_dict(det.state_dict())
    assert again.state_dict() == det.state_dict()
    assert again.episodes[0]["kind"] == "nonfinite"
    assert again.skipped_steps == 1
    import json

    json.dumps(det.state_dict())  # HF Trainer keeps callback state as JSON


def test_a_schedule_decay_restarts_the_step_references_and_a_rise_past_the_peak_does_not() -> None:
    det = CusumDetector(DetectorCalibration(0.05, ("loss",), {"loss": 10.0}, 1.0))
    for s in range(1, 100):
        det.observe_step(s, {"loss": 1.0}, lr=0.1)
    det.observe_step(100, {"loss": 1.0}, lr=0.01)  # a decay
    assert len(det.states["loss"].reference) == 1
    for s in range(101, 200):
        det.observe_step(s, {"loss": 1.0}, lr=0.01)
    det.observe_step(200, {"loss": 1.0}, lr=0.1)  # a warm restart back to the peak
    assert len(det.states["loss"].reference) == 1
    for s in range(201, 300):
        det.observe_step(s, {"loss": 1.0}, lr=0.1)
    det.observe_step(300, {"loss": 1.0}, lr=3.0)  # 30x past every rate the run trained at: scored, not excused
    assert len(det.states["loss"].reference) == 101


# ---------------------------------------------------------------------------------------------- said once each
def test_an_integer_or_boolean_layer_output_is_named_once() -> None:
    class Argmax(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.stack([x.argmax(dim=1), x.argmin(dim=1)], dim=1)  # int64 indices

    model = nn.Sequential(nn.Linear(8, 8), Argmax())
    monitor = CollapseMonitorCore("1", every_n_train_steps=2, max_samples=64, max_overhead=None)
    monitor.attach(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, 9):
            monitor.prepare_step(step)
            model(torch.randn(16, 8))
            if monitor.is_check_step(step):
                monitor.run_check(step)
    said = [str(w.message) for w in caught if "dtype torch.int64" in str(w.message)]
    assert len(said) == 1, said


def test_a_check_skipped_again_and_again_is_said_once() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    monitor = CollapseMonitorCore("0", every_n_train_steps=1, select=lambda out: out.no_such_field, max_overhead=None)
    monitor.attach(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, 6):
            monitor.prepare_step(step)
            model(torch.randn(8, 4))
            monitor.run_check(step)
    said = [str(w.message) for w in caught if "Collapse check skipped" in str(w.message)]
    assert len(said) == 1, said
    assert monitor.skipped_checks == 5
