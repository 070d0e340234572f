"""The default detector in real training runs: a small CNN on the bundled digits whose learning rate jumps 50x
(the issue's new-user scenario) alarms within three checks of the jump (two before issue 22's stricter calibration,
per 10,000 healthy steps: seed 1 now fires 28 steps after it); its healthy twin, checked every 5 steps,
stays silent. Through each adapter, the per-step channels are fed and the alarm says which channel fired."""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

STEPS, JUMP = 400, 250


def digits() -> TensorDataset:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    return TensorDataset(x, torch.tensor(data.target))


class DigitsCNN(pl.LightningModule):
    """Two conv layers, an ``embed`` layer (the watched one) and a linear head; SGD with momentum. From optimizer
    step ``jump`` on, the learning rate is 50 times higher."""

    def __init__(self, jump: int | None) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        )  # fmt: skip
        self.embed = nn.Sequential(nn.Linear(128, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)
        self.jump = jump

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(self.features(x)))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        jump = self.jump

        def rule(done: int) -> float:
            return 50.0 if jump is not None and done + 1 >= jump else 1.0

        sched = torch.optim.lr_scheduler.LambdaLR(opt, rule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def fit(jump: int | None, every: int, seed: int = 0, **kwargs: Any) -> Any:
    from topo_callbacks.lightning import CollapseMonitor

    pl.seed_everything(seed, verbose=False)
    loader = DataLoader(digits(), batch_size=64, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))  # fmt: skip
    monitor = CollapseMonitor(layer="embed", every_n_train_steps=every, max_samples=256, **kwargs, max_overhead=None)
    trainer = pl.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, callbacks=[monitor], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(DigitsCNN(jump), loader)
    monitor.caught = [str(w.message) for w in caught]
    return monitor, trainer


@pytest.mark.parametrize("seed", [0, 1])
def test_the_collapsing_cnn_alarms_within_three_checks_of_the_jump(seed: int) -> None:
    every = 10
    monitor, trainer = fit(JUMP, every, seed, stop_on_alarm=True)
    assert monitor.first_alarm_step is not None
    assert JUMP <= monitor.first_alarm_step <= JUMP + 3 * every, monitor.summary()
    assert monitor.stopped_step == monitor.first_alarm_step == trainer.global_step
    alarm = next(m for m in monitor.caught if "Collapse alarm" in m)
    assert "detector alarmed" in alarm
    # a CUSUM alarm gives the value, baseline and score; an absolute rule what it saw (the loss 100x its window's
    # largest, for the 50x learning rate)
    assert ("baseline" in alarm and "standardised score" in alarm) or "(extreme)" in alarm or "(abrupt)" in alarm
    assert monitor.summary()["first_alarm_channel"] in {*monitor.detector.channels, *monitor.step_channels}


@pytest.mark.parametrize("seed", [0, 1])
def test_the_healthy_twin_checked_every_5_steps_raises_no_alarm(seed: int) -> None:
    monitor, _ = fit(None, 5, seed)
    assert monitor.first_alarm_step is None, monitor.summary()
    assert len(monitor.history) == STEPS // 5
    # the per-step channels were fed every optimizer step, the check channels at every check past calibration
    for name in monitor.step_channels:
        assert len(monitor.detector.states[name].reference) == 200
    assert all(h["detector"] < 1.0 for h in monitor.history if "detector" in h)


def test_the_rise_rule_stays_available_by_name() -> None:
    monitor, _ = fit(JUMP, 10, 0, alarm="rise")
    assert monitor.detector is None
    assert monitor.step_channels == ()
    assert monitor.rule.max_rise == 0.2
    assert all("detector" not in h for h in monitor.history)


def test_lightning_feeds_each_optimizer_steps_mean_loss_and_gradient_norm() -> None:
    """Under ``accumulate_grad_batches=2``: the loss channel is the mean of the step's two training-step losses, the
    gradient norm that of the accumulated gradients before the step (read by another callback, directly)."""
    from tests.lightning_helpers import TinyModel, loader
    from topo_callbacks.lightning import CollapseMonitor

    losses: list[float] = []
    norms: list[float] = []

    class Witness(pl.Callback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            losses.append(float(outputs["loss"]))

        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    pl.seed_everything(0, verbose=False)
    monitor = CollapseMonitor(layer="encoder", every_n_train_steps=50, max_samples=64, max_overhead=None)
    trainer = pl.Trainer(max_steps=230, accumulate_grad_batches=2, accelerator="cpu", devices=1, logger=False,
                         callbacks=[Witness(), monitor], enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(TinyModel(), loader(n=32 * 460, batch_size=32))
    step_losses = [(a + b) / 2 for a, b in zip(losses[::2], losses[1::2], strict=True)]
    assert len(step_losses) == len(norms) == monitor.last_observed_step == 230
    states = monitor.detector.states
    assert list(states["loss"].reference) == pytest.approx(step_losses[-200:], rel=1e-6)
    assert [math.exp(v) for v in states["grad_norm"].reference] == pytest.approx(norms[-200:], rel=1e-5)
