"""Issue 23, "which layer": an alarm names the layers whose gradient norm moved most between the steps before its
onset and the alarm (the first step of a diagnosis). Shown on training runs; the rollback record's copy is checked in
tests/test_rollback.py in every adapter."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from topo_callbacks.core import CollapseMonitorCore
from topo_callbacks.core.layer_norms import LayerGradNorms
from topo_callbacks.functional.detector import layer_shifts


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))


@pytest.mark.parametrize("bad", ["0", "2", "4"])
def test_a_penalty_on_one_layer_is_named_by_the_alarm(bad: str) -> None:
    """From step 250 a weight penalty with a large coefficient is added on one layer only (an objective term gone
    wrong): the gradient norm rises, the detector alarms, and the diagnosis names that layer first, its gradient norm
    many times its reference."""
    model = _model()
    monitor = CollapseMonitorCore("2", every_n_train_steps=10_000, max_overhead=None)
    monitor.attach(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(1)
    first = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, 301):
            x = torch.randn(64, 16, generator=gen)
            loss = (model(x) - x[:, :4]).pow(2).mean()
            if step >= 250:
                loss = loss + 50.0 * dict(model.named_children())[bad].weight.pow(2).sum()
            opt.zero_grad()
            loss.backward()
            grad = monitor.step_grad_norm(model.parameters(), step)
            monitor.add_loss(loss)
            fired = monitor.observe_step(step, grad_norm=grad, lr=0.01)
            opt.step()
            first = first or fired
    assert first is not None
    summary = monitor.summary()
    assert 250 <= summary["first_alarm_step"] <= 255
    layers = summary["first_alarm_layers"]
    assert layers[0][0] == bad, layers
    assert layers[0][1] > 10.0, layers
    assert summary["episodes"][0]["layers"] == layers
    said = [str(w.message) for w in caught if "Collapse alarm" in str(w.message)]
    assert f"in: {bad} (x" in said[0]


def test_no_diagnosis_without_steps_on_both_sides() -> None:
    norms = LayerGradNorms()
    params = list(_model().parameters())
    norms.record(5, params, [1.0] * len(params))
    assert norms.diagnose(onset=5, step=5) is None  # nothing before the onset
    assert norms.diagnose(onset=6, step=6) is None  # nothing from the onset on
    norms.record(6, params, [2.0] * len(params))
    # without the model the tensors are named by position, each its own layer
    diagnosis = norms.diagnose(onset=6, step=6, top=10)
    assert diagnosis is not None
    assert sorted(name for name, _ in diagnosis) == sorted(f"parameter {i}" for i in range(len(params)))
    assert all(math.isclose(factor, 2.0) for _, factor in diagnosis)


def test_layer_shifts_ranks_falls_and_rises_alike_and_skips_what_did_not_move() -> None:
    before = {"a": [1.0, 1.0], "b": [1.0, 1.0], "c": [0.0, 0.0], "d": [1.0]}
    after = {"a": [0.01], "b": [10.0], "c": [0.0], "e": [5.0]}
    assert layer_shifts(before, after, top=5) == [("a", pytest.approx(0.01)), ("b", pytest.approx(10.0))]


def test_the_record_is_cleared_by_a_rollback_and_bounded() -> None:
    norms = LayerGradNorms(window=4)
    params = list(_model().parameters())
    for step in range(10):
        norms.record(step, params, [1.0] * len(params))
    assert len(norms) == 4
    norms.clear()
    assert len(norms) == 0


def _dead_layer_run(
    dead_at: int | None, steps: int, *, zero_init: bool = False, every_other: bool = False
) -> CollapseMonitorCore:
    """A plain loop on a small ReLU MLP. ``dead_at``: the middle layer's biases drop by 50 (every unit dead, its output
    constant 0: no gradient reaches it or the layer before); ``zero_init``: the middle layer starts at 0 (its input
    layer gets no gradient at step 1, then does); ``every_other``: the first layer is skipped at every other step
    with its gradient zeroed in place (``set_to_none=False``: conditional computation)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    if zero_init:
        nn.init.zeros_(model[2].weight)
    monitor = CollapseMonitorCore("3", every_n_train_steps=10_000, max_overhead=None)
    monitor.attach(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(1, steps + 1):
            if dead_at is not None and step == dead_at:
                with torch.no_grad():
                    model[2].bias -= 50.0
            x = torch.randn(64, 16, generator=gen)
            h = x.new_zeros(64, 32) if every_other and step % 2 else model[1](model[0](x))
            out = model[4](model[3](model[2](h)))
            loss = (out - x[:, :4]).pow(2).mean()
            opt.zero_grad(set_to_none=False)
            loss.backward()
            grad = monitor.step_grad_norm(model.parameters(), step)
            monitor.add_loss(loss)
            monitor.observe_step(step, grad_norm=grad, lr=0.01)
            opt.step()
    return monitor


def test_a_layer_that_dies_alarms_within_a_few_steps_and_is_named() -> None:
    """The middle layer dies at step 50 (as the benchmark's constant_layer_early, whose metric is gone by step 60; the
    check's collapsed rule needed 3 checks: step 125): its gradient and its input layer's are exactly 0 from step 50
    while the head still learns, so the global norm never reads 0. The dead-layer rule alarms at the 5th such step."""
    summary = _dead_layer_run(dead_at=50, steps=80).summary()
    assert summary["first_alarm_step"] == 54, summary["episodes"]
    episode = summary["episodes"][0]
    assert (episode["kind"], episode["onset"]) == ("dead_layer", 50)
    names = {name for name, factor in summary["first_alarm_layers"] if factor == 0.0}
    assert names == {"0", "2"}, summary["first_alarm_layers"]


@pytest.mark.parametrize("case", ["healthy", "zero_init", "every_other"])
def test_no_dead_layer_alarm_where_gradients_are_zero_by_design(case: str) -> None:
    """A layer without gradient at the start (a zero-initialised layer in front of it) or at every other step
    (conditional computation with gradients zeroed in place) never had a gradient at 20 reads in a row: no alarm."""
    monitor = _dead_layer_run(None, 300, zero_init=case == "zero_init", every_other=case == "every_other")
    kinds = [e["kind"] for e in monitor.summary()["episodes"]]
    assert "dead_layer" not in kinds, monitor.summary()["episodes"]
