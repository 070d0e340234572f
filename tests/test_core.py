"""Core pieces without a framework: capture, pooling, layer resolution, alarm rule, gather, metric, state."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from topo_callbacks.core import (
    AlarmRule,
    CollapseMonitorCore,
    EmbeddingCapture,
    StoppingReason,
    gather_samples,
    pool_output,
    resolve_layer,
    select_tensor,
)
from topo_callbacks.metrics import CollapseIndex

FRAMEWORKS = ("lightning", "pytorch_lightning", "accelerate", "transformers")


def imported_frameworks(*imports: str) -> list[list[str]]:
    """The frameworks in ``sys.modules`` after each import statement in turn, in one fresh interpreter."""
    seen = f"print([m for m in {FRAMEWORKS!r} if m in sys.modules])"
    code = "; ".join(["import sys", *(f"{statement}; {seen}" for statement in imports)])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return [eval(line) for line in out.stdout.splitlines()]  # printed lists of str


def test_import_pulls_in_no_framework():
    assert imported_frameworks("import topo_callbacks, topo_callbacks.functional, topo_callbacks.core") == [[]]
    # torchmetrics itself imports transformers when that is installed; the metric module must add nothing more
    with_torchmetrics, with_metrics = imported_frameworks("import torchmetrics", "import topo_callbacks.metrics")
    assert with_metrics == with_torchmetrics


def test_pooling_rules():
    assert pool_output(torch.ones(4, 7)).shape == (4, 7)
    tokens = torch.arange(24.0).reshape(2, 3, 4)
    assert torch.equal(pool_output(tokens), tokens.mean(dim=1))
    assert torch.equal(pool_output(tokens, "first"), tokens[:, 0])
    assert torch.equal(pool_output(tokens, "last"), tokens[:, -1])
    assert pool_output(tokens, "flatten").shape == (2, 12)
    maps = torch.randn(2, 5, 4, 4)
    assert torch.allclose(pool_output(maps), maps.mean(dim=(2, 3)))
    assert pool_output(maps, lambda t: t[:, :, 0, 0]).shape == (2, 5)
    with pytest.raises(ValueError, match="accepted"):
        pool_output(maps, "first")


def test_select_rule_for_non_tensor_outputs():
    t = torch.ones(2, 3)
    assert select_tensor((t, None)) is t
    assert select_tensor([None, t]) is t
    assert select_tensor({"logits": torch.zeros(1), "last_hidden_state": t}) is t
    assert select_tensor({"a": None, "b": t}) is t
    with pytest.raises(TypeError, match="select="):
        select_tensor({"a": 1})


class Wrapped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
        self.head = nn.Linear(4, 1)


def test_resolve_layer_paths_prefixes_and_close_matches():
    model = Wrapped()
    assert resolve_layer(model, "encoder.0") is model.encoder[0]
    assert resolve_layer(model, "module.encoder") is model.encoder
    assert resolve_layer(model, lambda m: m.head) is model.head
    compiled = torch.compile(model)
    assert resolve_layer(compiled, "_orig_mod.encoder") is model.encoder
    assert resolve_layer(compiled, "encoder") is model.encoder
    with pytest.raises(ValueError, match=r"Close matches: \['encoder'"):
        resolve_layer(model, "encodr")
    with pytest.raises(ValueError, match=r"nn\.Module"):
        resolve_layer(model, lambda m: 3)


def test_resolve_layer_through_activation_checkpoint_wrappers():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    plain, wrapped = Wrapped(), Wrapped()
    apply_activation_checkpointing(wrapped, check_fn=lambda m: isinstance(m, nn.Linear))
    inner_names = [n for n, _ in wrapped.named_modules() if "_checkpoint_wrapped_module" in n]
    assert inner_names  # the wrapper really changed the names
    for name in inner_names:  # a name copied from the wrapped model resolves on the plain one ...
        assert isinstance(resolve_layer(plain, name), nn.Linear)
    # ... and the plain name resolves on the wrapped model (to the wrapper, whose forward runs the layer)
    assert type(resolve_layer(wrapped, "encoder.0")).__name__ == "CheckpointWrapper"


def test_capture_budget_nonfinite_and_disarmed_cost():
    layer = nn.Identity()
    cap = EmbeddingCapture(max_samples=10)
    cap.attach(layer)
    layer(torch.randn(4, 2))
    assert cap.take() is None  # disarmed: nothing kept
    cap.armed = True
    for i in range(5):
        x = torch.full((4, 2), float(i))
        x[0, 0] = float("nan")
        layer(x)
    rows = cap.take()
    # the newest 10 rows, less the 2 non-finite among them: the rows are dropped at `take` (counted on the device as
    # they leave the buffer), so that an armed step never waits for the GPU
    assert rows.shape == (8, 2)
    assert torch.isfinite(rows).all()
    assert rows[-1, 1] == 4.0
    assert rows[0, 1] == 2.0
    assert (cap.seen, cap.nonfinite) == (20, 5)
    # a batch larger than the buffer, infinities of both signs, a huge finite value: every non-finite row is counted
    # once, whether it was cut from the batch, pushed out by a later batch or kept
    cap.reset()
    big = torch.ones(25, 2)
    big[[0, 7, 20], 1] = torch.tensor([float("inf"), float("-inf"), float("nan")])
    big[3, 0] = 3e38
    layer(big)
    layer(torch.tensor([[float("-inf"), 1.0], [2.0, 2.0], [3.0, 3.0]]))
    rows = cap.take()
    assert rows.shape == (8, 2)  # the newest 10: big[18:] and the 3 rows, less the 2 non-finite
    assert torch.isfinite(rows).all()
    assert (cap.seen, cap.nonfinite) == (28, 4)
    cap.detach()
    assert not layer._forward_hooks


def test_capture_never_raises_into_the_forward_pass():
    layer = nn.Identity()
    cap = EmbeddingCapture(max_samples=10, select=lambda out: out.no_such_field)
    cap.attach(layer)
    cap.armed = True
    out = layer(torch.ones(2, 2))  # the user's forward pass completes
    assert torch.equal(out, torch.ones(2, 2))
    assert isinstance(cap.error, AttributeError)  # kept for the next check to report (or raise, with strict=True)


def test_alarm_rule_reasons_in_early_stopping_order():
    rule = AlarmRule(check_finite=True)
    assert rule.evaluate(math.nan)[0] is StoppingReason.NON_FINITE_METRIC
    assert AlarmRule(stopping_threshold=0.2).evaluate(0.1)[0] is StoppingReason.STOPPING_THRESHOLD
    reason, message = AlarmRule(divergence_threshold=0.5).evaluate(0.7)
    assert reason is StoppingReason.DIVERGENCE_THRESHOLD
    assert "0.7000 > 0.5" in message
    patient = AlarmRule(patience=2, max_rise=None)
    assert [patient.evaluate(v)[0].name for v in (0.5, 0.6, 0.7)] == [
        "NOT_STOPPED",
        "NOT_STOPPED",
        "PATIENCE_EXHAUSTED",
    ]
    maxed = AlarmRule(mode="max", divergence_threshold=0.5)
    assert maxed.evaluate(0.4)[0] is StoppingReason.DIVERGENCE_THRESHOLD


def test_alarm_rule_baseline_rise():
    rule = AlarmRule(max_rise=0.15, baseline_checks=3, rise_patience=2)
    assert rule.evaluate(0.9, baseline_ready=False)[0] is StoppingReason.NOT_STOPPED  # calibrating: not in base
    for v in (0.30, 0.32, 0.28):
        assert rule.evaluate(v)[0] is StoppingReason.NOT_STOPPED
    assert rule.baseline == pytest.approx(0.30)
    assert rule.evaluate(0.50)[0] is StoppingReason.NOT_STOPPED  # first elevated check
    assert rule.evaluate(0.31)[0] is StoppingReason.NOT_STOPPED  # back down resets the count
    assert rule.evaluate(0.50)[0] is StoppingReason.NOT_STOPPED
    reason, message = rule.evaluate(0.60)
    assert reason is StoppingReason.BASELINE_RISE
    assert "baseline 0.3000" in message
    restored = AlarmRule()
    restored.load_state_dict(json.loads(json.dumps(rule.state_dict())))
    assert restored.state_dict() == rule.state_dict()


def test_gather_single_process_subsamples_to_budget():
    x = torch.arange(20.0).reshape(10, 2)
    assert gather_samples(x, max_samples=100) is x
    assert gather_samples(x, max_samples=4).shape == (4, 2)
    assert gather_samples(None, max_samples=4).shape[0] == 0


def test_monitor_core_in_a_plain_loop_and_state_is_plain_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8))
    mon = CollapseMonitorCore(
        "0", every_n_train_steps=3, max_samples=64, calibration_checks=1, baseline_checks=1, max_overhead=None
    )
    mon.attach(model)
    for step in range(1, 13):
        mon.prepare_step(step)
        model(torch.randn(16, 8))
        if mon.is_check_step(step):
            result = mon.run_check(step)
            assert result.report is not None
            assert result.logged["collapse/ci"] == result.report.ci
            assert set(result.logged) >= {"collapse/betti_term", "collapse/entropy_term", "collapse/anisotropy_term"}
    assert [h["step"] for h in mon.history] == [3, 6, 9, 12]
    assert mon.history[0]["n"] == 48  # first period: armed throughout, 3 steps x 16 rows
    assert mon._capture_steps == 3  # 64 samples at 16 rows per step: 4 steps, capped at the period
    state = mon.state_dict()
    assert json.loads(json.dumps(state)) == state  # plain types only
    again = CollapseMonitorCore("0", every_n_train_steps=3, max_overhead=None)
    again.load_state_dict(state)
    assert again.state_dict() == state
    assert not mon.is_check_step(12)  # already checked at this step


def test_collapse_index_metric_drops_nonfinite_and_merges():
    g = torch.Generator().manual_seed(0)
    metric = CollapseIndex()
    x = torch.randn(100, 8, generator=g)
    x[:10] = float("nan")
    metric.update(x)
    metric.update(torch.zeros(0, 8))
    value = metric.compute()
    assert value.shape == ()
    assert metric.report.n == 90
    assert metric.report.nonfinite_fraction == pytest.approx(0.1)
    assert float(value) == pytest.approx(metric.report.ci)
    capped = CollapseIndex(max_samples=32)
    capped.update(torch.randn(100, 8, generator=g))
    capped.compute()
    assert capped.report.n == 32
    with pytest.raises(ValueError, match="eps"):
        CollapseIndex(eps=0)
    with pytest.raises(ValueError, match=r"\(N, d\)"):
        metric.update(torch.zeros(3))


def test_capture_copies_so_later_inplace_ops_do_not_corrupt_it():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True))
    cap = EmbeddingCapture(max_samples=10)
    cap.attach(model[0])
    cap.armed = True
    x = torch.randn(6, 3)
    expected = model[0](x).detach().clone()
    cap.take()
    model(x)
    assert torch.equal(cap.take(), expected)  # negative values kept, not zeroed by the in-place ReLU
    assert (expected < 0).any()


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_activation_checkpointing_does_not_capture_twice(use_reentrant):
    from torch.utils.checkpoint import checkpoint

    layer = nn.Linear(3, 4)
    cap = EmbeddingCapture(max_samples=100)
    cap.attach(layer)
    cap.armed = True
    x = torch.randn(5, 3, requires_grad=True)
    checkpoint(layer, x, use_reentrant=use_reentrant).sum().backward()  # the recompute runs inside backward
    assert cap.take().shape == (5, 4)
    assert cap.seen == 5


def test_monitor_skips_a_failed_capture_or_raises_when_strict():
    from topo_callbacks.core import CollapseWarning

    model = nn.Sequential(nn.Linear(4, 4))
    for strict in (False, True):
        mon = CollapseMonitorCore(
            "0", every_n_train_steps=1, select=lambda out: out.no_such_field, strict=strict, max_overhead=None
        )
        mon.attach(model)
        mon.prepare_step(1)
        model(torch.randn(8, 4))
        if strict:
            with pytest.raises(RuntimeError, match="capturing the layer output failed: AttributeError"):
                mon.run_check(1)
        else:
            with pytest.warns(CollapseWarning, match="skipped at step 1: capturing the layer output failed"):
                result = mon.run_check(1)
            assert result.report is None
            assert mon.history == []
        mon.detach()


def test_a_logged_ci_is_recomputed_offline_from_the_recorded_weights_and_scale():
    """The monitors default to `weights="benchmark"`, `collapse_index` to `"paper"`: each check records its weights
    and scale, and with them the functional API gives back the logged value."""
    import topo_callbacks as tc

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8))
    probe = torch.randn(48, 8)
    mon = CollapseMonitorCore(
        "1", every_n_train_steps=1, max_samples=64, source="probe", probe=probe, strict=True, max_overhead=None
    )
    mon.attach(model)
    for step in range(1, 6):
        mon.prepare_step(step)
        mon.run_check(step)
    last = mon.history[-1]
    assert last["weights"] == "benchmark"
    rows = model[1](model[0](probe)).detach()
    offline = tc.collapse_index(rows, eps=last["eps"], weights=last["weights"], strict_eps=False)
    assert offline.ci == pytest.approx(last["ci"], abs=1e-6)
    assert tc.collapse_index(rows, eps=last["eps"], strict_eps=False).ci != pytest.approx(last["ci"], abs=1e-6)
    from topo_callbacks.core.monitor import CollapseWarning

    assert tc.CollapseWarning is CollapseWarning


@pytest.mark.parametrize("name", ["stopping_threshold", "divergence_threshold", "max_rise", "min_delta"])
def test_thresholds_given_as_strings_fail_at_construction(name):
    with pytest.raises(ValueError, match=f"`{name}` must be a number"):
        CollapseMonitorCore("0", **{name: "0.9"}, max_overhead=None)
