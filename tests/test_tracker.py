"""The monitor's engine per layer: probe checks feed it moves, stream checks removes and inserts (gudhi oracle)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.clouds import gudhi_betti
from topo_callbacks.core import CollapseMonitorCore
from topo_callbacks.core.probe import embed_probe
from topo_callbacks.core.tracker import EngineTracker, unit_rows
from topo_callbacks.functional import collapse_index


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 12), nn.Dropout(0.1), nn.Linear(12, 1))


def train_step(model: nn.Module, opt: torch.optim.Optimizer, g: torch.Generator) -> None:
    x = torch.randn(32, 8, generator=g)
    loss = (model(x).squeeze(1) - x[:, 0]).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def oracle(rows: torch.Tensor, eps: float) -> tuple[float, float]:
    b0, b1 = gudhi_betti(unit_rows(rows, "l2").double().numpy(), eps)
    return float(b0), float(b1)


def test_probe_checks_move_the_engine_points_and_match_gudhi():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    probe = torch.randn(60, 8, generator=torch.Generator().manual_seed(1))
    monitor = CollapseMonitorCore(
        "2", every_n_train_steps=4, max_samples=64, source="probe", probe=probe, max_overhead=None
    )
    monitor.calibration_checks = 2
    monitor.attach(model)
    g = torch.Generator().manual_seed(2)
    checked = 0
    for step in range(1, 25):
        monitor.prepare_step(step)
        train_step(model, opt, g)
        if monitor.is_check_step(step):
            result = monitor.run_check(step)
            assert result.report is not None
            if monitor.history[-1]["calibrating"]:
                continue
            rows = embed_probe(model, model[2], probe)
            assert (result.report.b0, result.report.b1) == oracle(rows, monitor.eps)
            assert monitor.tracker.last_edit == ("reset 60" if checked == 0 else "move 60")  # training moved all
            checked += 1
    assert checked == 4
    assert monitor.tracker.resets == 1  # one engine since eps was fixed, fed moves afterwards
    assert monitor.tracker.stats()["points"] == 60
    assert monitor.capture.seen == 0  # the training forwards were never captured
    assert model.training


def test_stream_checks_take_the_betti_numbers_from_the_sample_and_match_gudhi():
    """A stream's sample is replaced whole at each check: the Betti numbers come from its own distances (no engine
    kept), exact against gudhi at the held scale."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    outputs: list[torch.Tensor] = []
    model[2].register_forward_hook(lambda m, i, o: outputs.append(o.detach().clone()))
    monitor = CollapseMonitorCore("2", every_n_train_steps=4, max_samples=48, eps=0.9, max_overhead=None)
    monitor.attach(model)
    g = torch.Generator().manual_seed(3)
    checked = 0
    for step in range(1, 17):
        monitor.prepare_step(step)
        train_step(model, opt, g)
        if monitor.is_check_step(step):
            result = monitor.run_check(step)
            sample = torch.cat(outputs[-2:])[-48:]  # the capture keeps the newest 48 rows (two batches)
            assert result.report is not None
            assert (result.report.b0, result.report.b1) == oracle(sample, 0.9)
            checked += 1
    assert checked == 4
    assert monitor.tracker.engine is None
    assert monitor.tracker.resets == 0


def test_tracker_starts_over_on_a_new_eps_or_row_count():
    tracker = EngineTracker("probe")
    x = torch.randn(30, 5, generator=torch.Generator().manual_seed(0))
    tracker.betti(x, 1.0)
    tracker.betti(x, 1.0)
    assert tracker.last_edit == "move 0"
    tracker.betti(x, 1.1)
    tracker.betti(x[:20], 1.1)
    assert tracker.resets == 3
    assert tracker.betti(x[:20], 1.1) == gudhi_betti(x[:20].double().numpy(), 1.1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"source": "window"}, "`source` must be one of"),
        ({"source": "probe"}, "`probe` must be a batch of model inputs"),
        ({"source": "probe", "probe": torch.zeros(100, 8)}, "more than `max_samples=64`"),
        ({"probe": torch.zeros(10, 8)}, "only used with source='probe'"),
    ],
)
def test_bad_source_or_probe_fails_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CollapseMonitorCore("0", max_samples=64, **kwargs, max_overhead=None)


class KeywordModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(4)
        self.proj = nn.Linear(4, 6)

    def forward(self, features: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.proj(self.norm(features) * scale)


def test_probe_mapping_inputs_run_in_eval_mode_and_leave_batchnorm_stats_alone():
    model = KeywordModel().train()
    before = model.norm.running_mean.clone()
    probe = {"features": torch.randn(16, 4) + 3.0, "scale": 2.0}
    rows = embed_probe(model, model.proj, probe)
    assert rows.shape == (16, 6)
    assert torch.equal(model.norm.running_mean, before)
    assert model.training
    assert model.norm.training


def test_probe_forward_errors_skip_the_check_with_a_warning():
    model = KeywordModel()
    monitor = CollapseMonitorCore(
        "proj", every_n_train_steps=1, max_samples=64, source="probe", probe=torch.zeros(4), max_overhead=None
    )
    monitor.attach(model)
    with pytest.warns(UserWarning, match="skipped"):
        result = monitor.run_check(1)
    assert result.skipped is not None


def test_collapse_index_takes_known_betti_numbers():
    x = torch.randn(80, 6, generator=torch.Generator().manual_seed(0))
    plain = collapse_index(x, eps=0.8)
    given = collapse_index(x, eps=0.8, betti=(int(plain.b0), int(plain.b1)))
    assert given.ci == plain.ci
    assert collapse_index(x, eps=0.8, betti=(int(plain.b0) + 5, 0)).b0 == plain.b0 + 5
    with pytest.raises(ValueError, match="needs the `eps`"):
        collapse_index(x, betti=(1, 0))
    with pytest.raises(ValueError, match="b0 >= 1"):
        collapse_index(x, eps=0.8, betti=(0, 0))
