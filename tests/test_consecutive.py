"""The consecutive-check channels and the mean cosine against direct computations, and the monitor's probe
channels against the functions applied to the probe's own embeddings."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance

from topo_callbacks.core import CollapseMonitorCore
from topo_callbacks.core.probe import embed_probe
from topo_callbacks.functional import (
    contracted_pairs,
    h0_death_scales,
    h0_diagram_distance,
    mean_cosine,
    neighbourhood_preservation,
)


def unit(x: torch.Tensor) -> np.ndarray:
    a = x.double().numpy()
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def knn_lists(z: np.ndarray, k: int) -> list[list[int]]:
    out = []
    for i in range(len(z)):
        d = [(float(np.linalg.norm(z[i] - z[j])), j) for j in range(len(z)) if j != i]
        out.append([j for _, j in sorted(d)[:k]])
    return out


@pytest.mark.parametrize("seed", range(6))
def test_mean_cosine_is_the_mean_over_pairs(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(30, 5, generator=g) + (seed % 3) * torch.ones(5)
    z = unit(x)
    direct = np.mean([z[i] @ z[j] for i, j in itertools.permutations(range(30), 2)])
    assert mean_cosine(x) == pytest.approx(direct, abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_neighbourhood_channels_match_loops(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    before = torch.randn(40, 6, generator=g)
    after = before + (0.3 + 0.2 * seed) * torch.randn(40, 6, generator=g)
    after[:10] = after[0] + 1e-3 * torch.randn(10, 6, generator=g)  # ten examples merge
    k = 5
    a, b = unit(before), unit(after)
    nn_a, nn_b = knn_lists(a, k), knn_lists(b, k)
    overlap = np.mean([len(set(nn_a[i]) & set(nn_b[i])) / k for i in range(40)])
    shrunk = np.mean(
        [np.linalg.norm(b[i] - b[j]) < 0.5 * np.linalg.norm(a[i] - a[j]) for i in range(40) for j in nn_a[i]]
    )
    assert neighbourhood_preservation(before, after, k) == pytest.approx(overlap)
    assert contracted_pairs(before, after, k, 0.5) == pytest.approx(shrunk)
    assert contracted_pairs(before, after, k) > 0


@pytest.mark.parametrize("seed", range(6))
def test_h0_distance_is_the_transport_cost_of_the_death_scales(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a, b = rng.uniform(0, 1, 25).tolist(), rng.uniform(0, 2, 25).tolist()
    # scipy's 1-D Wasserstein distance of equal-size samples is the mean gap of the sorted values
    assert h0_diagram_distance(a, b) == pytest.approx(25 * wasserstein_distance(a, b) / sum(a))
    assert h0_diagram_distance(a, a) == 0.0
    # a diagram with fewer bars: the missing ones are bars of length 0
    assert h0_diagram_distance(a, b[:20]) == pytest.approx(
        25 * wasserstein_distance(a, [*b[:20], 0, 0, 0, 0, 0]) / sum(a)
    )


def test_bad_inputs_name_the_argument() -> None:
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match="same examples"):
        neighbourhood_preservation(x, x[:9])
    with pytest.raises(ValueError, match="`k`"):
        contracted_pairs(x, x, k=10)
    with pytest.raises(ValueError, match="`factor`"):
        contracted_pairs(x, x, factor=1.5)


def test_the_probe_monitor_logs_how_its_examples_moved() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    probe = torch.randn(48, 8, generator=torch.Generator().manual_seed(1))
    monitor = CollapseMonitorCore(
        "1", every_n_train_steps=5, max_samples=64, source="probe", probe=probe, max_overhead=None
    )
    monitor.attach(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    rows = []
    for step in range(1, 31):
        loss = model(torch.randn(32, 8)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if monitor.is_check_step(step):
            monitor.run_check(step)
            rows.append(embed_probe(model, model[1], probe).float())
    monitor.detach()
    first, *later = monitor.history
    assert "knn_preservation" not in first  # nothing to compare with at the first check
    for i, h in enumerate(later, start=1):
        assert h["knn_preservation"] == pytest.approx(neighbourhood_preservation(rows[i - 1], rows[i], 10))
        assert h["contracted_pairs"] == pytest.approx(contracted_pairs(rows[i - 1], rows[i], 10))
        expected = h0_diagram_distance(h0_death_scales(rows[i - 1]), h0_death_scales(rows[i]))
        assert h["h0_distance"] == pytest.approx(expected, rel=1e-6, abs=1e-9)
        assert 0 <= h["knn_preservation"] <= 1
        assert math.isfinite(h["h0_distance"])


def fixed_batch_loss(model: torch.nn.Module) -> torch.Tensor:
    """A module-level loss on a fixed batch (what the HF callback can store by import path)."""
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(3))
    return model(x).pow(2).mean()


def test_the_curvature_channel_is_one_hessian_vector_product_and_leaves_training_alone() -> None:
    from topo_callbacks.functional.neurons import directional_curvature

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Tanh(), torch.nn.Linear(16, 4)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    monitor = CollapseMonitorCore(
        "2", every_n_train_steps=5, max_samples=64, loss_fn=fixed_batch_loss, max_overhead=None
    )
    monitor.attach(model)
    monitor.optimizer = opt
    for step in range(1, 21):
        monitor.prepare_step(step)
        loss = model(torch.randn(32, 8)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if monitor.is_check_step(step):
            grads = [p.grad.clone() for p in model.parameters()]
            stats = model[1].running_mean.clone()
            state = torch.get_rng_state()
            expected = directional_curvature(lambda: fixed_batch_loss(model), list(model.parameters()))
            model[1].running_mean.copy_(stats)  # the reference call above ran BatchNorm in train mode
            torch.set_rng_state(state)
            monitor.run_check(step)
            h = monitor.history[-1]
            assert h["grad_curvature"] == pytest.approx(expected, rel=1e-6)
            assert h["curvature_ratio"] == pytest.approx(0.2 * expected / 3.8, rel=1e-6)  # SGD, momentum 0.9
            assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
            assert torch.equal(model[1].running_mean, stats)
            assert torch.equal(torch.get_rng_state(), state)
    monitor.detach()


def test_a_failing_loss_fn_warns_and_skips_the_channel() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))

    def broken(m: torch.nn.Module) -> torch.Tensor:
        raise RuntimeError("no batch")

    monitor = CollapseMonitorCore("1", every_n_train_steps=1, max_samples=64, loss_fn=broken, max_overhead=None)
    monitor.attach(model)
    monitor.prepare_step(1)
    model(torch.randn(32, 8))
    with pytest.warns(UserWarning, match="`loss_fn` failed at step 1"):
        monitor.run_check(1)
    assert "grad_curvature" not in monitor.history[-1]
    with pytest.raises(ValueError, match="`loss_fn` must be a callable"):
        CollapseMonitorCore("1", loss_fn="not callable", max_overhead=None)
