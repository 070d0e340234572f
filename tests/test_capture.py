"""The capture hook: the warning for a degenerate or secondary watched tensor, and torch.compile'd models."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from torch import nn

import topo_callbacks.core.capture as capture_module
from topo_callbacks.core import CollapseMonitorCore, EmbeddingCapture, select_tensor
from topo_callbacks.core.capture import selection_warning


class AuxAndFeatures(nn.Module):
    """A layer whose output mapping starts with an auxiliary 1-D tensor; the features come second."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 16)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.proj(x)
        return {"aux": z.norm(dim=1), "z": z}


class ScoreAndTokens(nn.Module):
    """A layer returning a tuple: (per-example scores of width 2, token features (B, T, 32))."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        tokens = x[:, None, :].expand(-1, 5, -1).repeat(1, 1, 8)
        return tokens[:, 0, :2], tokens, None


def armed_capture(layer: nn.Module, **kwargs: Any) -> EmbeddingCapture:
    cap = EmbeddingCapture(max_samples=100, **kwargs)
    cap.attach(layer)
    cap.armed = True
    return cap


def test_degenerate_mapping_selection_warns_once_and_keeps_capturing():
    layer = AuxAndFeatures().train()
    cap = armed_capture(layer)
    for batch in (8, 8, 5):
        layer(torch.randn(batch, 4))
    (message,) = cap.pop_warnings()
    assert "'aux' (8,), 'z' (8, 16)" in message  # every tensor of the output, by key, with its shape
    assert "watches 'aux'" in message
    assert "1 feature per example" in message  # d < 2
    assert "more features (16 > 1)" in message  # and a wider tensor beside it
    assert 'select=lambda out: out["z"]' in message
    assert '"module:function"' in message  # the HF adapter's way to pass it
    assert cap.pop_warnings() == []  # popped: handed over once
    layer(torch.randn(8, 4))
    layer(torch.randn(3, 4))
    assert cap.pop_warnings() == []  # once per capture object, not per forward or per batch size
    cap.reset()  # a check resets the counters, not what was already said
    layer(torch.randn(8, 4))
    assert cap.pop_warnings() == []
    rows = cap.take()
    assert rows is not None
    assert rows.shape == (8, 1)  # still captured: the user decides
    assert cap.error is None


def test_tuple_output_with_a_wider_tensor_names_its_index():
    layer = ScoreAndTokens()
    cap = armed_capture(layer)
    layer(torch.randn(6, 4))
    (message,) = cap.pop_warnings()
    assert "[0] (6, 2), [1] (6, 5, 32)" in message  # the None is not listed
    assert "more features (32 > 2)" in message
    assert "select=lambda out: out[1]" in message
    assert "1 feature" not in message  # d = 2 is not degenerate; only the wider sibling is reported


def test_user_selection_is_trusted_unless_it_is_degenerate():
    layer = AuxAndFeatures()
    cap = armed_capture(layer, select=lambda out: out["z"])
    layer(torch.randn(8, 4))
    assert cap.pop_warnings() == []
    assert cap.take().shape == (8, 16)
    chosen_aux = armed_capture(layer, select=lambda out: out["aux"])
    layer(torch.randn(8, 4))
    (message,) = chosen_aux.pop_warnings()
    assert "1 feature per example" in message
    assert "more features" not in message  # a deliberate `select=` is not second-guessed


def test_plain_tensor_outputs():
    wide, narrow = nn.Linear(4, 8), nn.Linear(4, 1)
    cap_wide, cap_narrow = armed_capture(wide), armed_capture(narrow)
    wide(torch.randn(5, 4))
    narrow(torch.randn(5, 4))
    assert cap_wide.pop_warnings() == []
    (message,) = cap_narrow.pop_warnings()
    assert message.startswith("The watched layer returns a tensor of shape (5, 1), which gives 1 feature")
    assert "Watch a wider layer" in message


def test_inspection_only_on_armed_forwards_and_once_per_structure(monkeypatch):
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[2])
        return selection_warning(*args, **kwargs)

    monkeypatch.setattr(capture_module, "selection_warning", counting)
    layer = AuxAndFeatures()
    cap = EmbeddingCapture(max_samples=100)
    cap.attach(layer)
    for _ in range(3):
        layer(torch.randn(8, 4))  # disarmed: nothing looked at
    assert calls == []
    cap.armed = True
    for batch in (8, 8, 8, 3, 8):  # a smaller last batch is the same structure
        layer(torch.randn(batch, 4))
    assert calls == [1]
    cap.select = lambda out: out["z"]  # a new structure (the selected tensor changed): inspected once more
    for _ in range(3):
        layer(torch.randn(8, 4))
    assert calls == [1, 16]


def test_select_rule_skips_scalars():
    logits = torch.zeros(2, 5)
    assert select_tensor({"loss": torch.tensor(0.3), "logits": logits}) is logits
    assert select_tensor((torch.tensor(1.0), logits)) is logits
    with pytest.raises(TypeError, match="select="):
        select_tensor({"loss": torch.tensor(0.3)})


class Block(nn.Module):
    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.lin = nn.Linear(n_in, n_out)
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.lin(x))


class Blocks(nn.Module):
    """No loop in its forward: dynamo resumes after the graph break at the watched layer and compiles the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.mid, self.head = Block(8, 32), Block(32, 32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mid(self.enc(x)))


def sequential() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))


MODELS = {"sequential": (sequential, "_orig_mod.3"), "blocks": (Blocks, "_orig_mod.mid.act")}


def compiled_training_run(model_name: str, backend: str, steps: int) -> tuple[list[tuple[int, int, int]], list]:
    """Train a torch.compile'd MLP with a monitor on an inner layer: each check's (step, n, d), and the expected."""
    torch.manual_seed(0)
    make, layer = MODELS[model_name]
    net = make()
    model = torch.compile(net, backend=backend)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    # a window of 10 armed steps out of every 12: more armed forwards per check than dynamo's recompile limit (8)
    monitor = CollapseMonitorCore(
        layer, every_n_train_steps=12, max_samples=160, calibration_checks=1, max_overhead=None
    )
    watched = monitor.attach(model)  # resolved through unwrap_model; attached before the first forward
    assert watched is net.get_submodule(layer.removeprefix("_orig_mod."))
    reports, expected = [], []
    armed_rows = 0
    for step in range(1, steps + 1):
        monitor.prepare_step(step)
        batch = 12 if step % 7 == 0 else 16  # an odd batch size too: shapes vary
        if monitor.capture.armed:
            armed_rows += batch
        loss = model(torch.randn(batch, 8)).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if monitor.is_check_step(step):
            result = monitor.run_check(step)
            assert result.report is not None, result.skipped
            reports.append((step, result.report.n, result.report.d))
            expected.append((step, min(armed_rows, 160), 32))
            armed_rows = 0
    monitor.detach()
    return reports, expected


@pytest.mark.parametrize("model_name", ["sequential", "blocks"])
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_model_checks_without_recompiles(backend, model_name, caplog):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    with caplog.at_level(logging.WARNING, logger="torch._dynamo"):
        reports, expected = compiled_training_run(model_name, backend, steps=36)
    limit_hits = [r.getMessage() for r in caplog.records if "recompile_limit" in r.getMessage()]
    limit_hits += [r.getMessage() for r in caplog.records if "cache_size_limit" in r.getMessage()]
    assert limit_hits == []
    assert reports == expected
    assert [n for _, n, _ in reports[1:]] == [160, 160]  # the capture window was learned: armed and disarmed steps
    frames, graphs = counters["frames"]["total"], counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    # The old hook was traced: `.item()` broke graphs in it and `add` was recompiled for every armed forward (dynamo
    # guarded the buffer's length) until the recompile limit: 21 frames and 10 graphs for the sequential model.
    # Now the hook's body runs eagerly (one graph break per armed forward); what is compiled is the model: the
    # frames around that break, the disarmed and armed variants and one recompile for the odd batch size.
    assert frames <= (8 if model_name == "sequential" else 14), dict(counters["frames"])
    assert graphs <= 8, dict(counters["stats"])
    if model_name == "blocks":
        assert graphs >= 2  # the layers outside the watched one really run compiled


@pytest.mark.slow
def test_compiled_model_with_the_default_backend():
    # Inductor's code generation on the sequential model only: on "blocks" (a graph break in the watched layer, the
    # armed and disarmed variants, the odd batch size) it compiles ~10 graphs with their backward, 34 s of CI for
    # nothing that aot_eager does not already check above (the same graphs, recompiles and captured rows).
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=4, fail_on_recompile_limit_hit=True):
        reports, expected = compiled_training_run("sequential", "inductor", steps=24)
    torch._dynamo.reset()
    assert reports == expected


def test_monitor_emits_the_selection_warning_once_or_raises_when_strict():
    import warnings

    from topo_callbacks.core import CollapseWarning

    model = nn.Sequential(AuxAndFeatures())
    for strict in (False, True):
        monitor = CollapseMonitorCore("0", every_n_train_steps=2, max_samples=64, strict=strict, max_overhead=None)
        monitor.attach(model)
        for step in (1, 2):
            monitor.prepare_step(step)
            model(torch.randn(16, 4))
        if strict:
            with pytest.raises(ValueError, match=r'strict=True.*select=lambda out: out\["z"\]'):
                monitor.run_check(2)
            continue
        with pytest.warns(CollapseWarning, match=r"collapse/ci: The watched layer .*'aux' \(16,\), 'z' \(16, 16\)"):
            monitor.run_check(2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in (3, 4):
                monitor.prepare_step(step)
                model(torch.randn(16, 4))
            monitor.run_check(4)
        assert not [w for w in caught if "watched layer" in str(w.message)]  # once per monitor, not per check
        monitor.detach()
