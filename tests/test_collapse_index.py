"""Anisotropy, effective rank, the std channel and the collapse index on isotropic and collapsed batches."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from topo_callbacks.functional import (
    CollapseReport,
    anisotropy,
    collapse_index,
    dead_unit_fraction,
    effective_rank,
    l2_normalized_std,
)

NS = (32, 128, 512, 2048)
DS = (16, 128, 768)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("d", DS)
@pytest.mark.parametrize("n", NS)
def test_anisotropy_of_isotropic_batches_is_small(n, d):
    g = gen(n * 1000 + d)
    for _ in range(3):
        assert anisotropy(torch.randn(n, d, generator=g)) <= 0.1


@pytest.mark.parametrize("d", DS)
@pytest.mark.parametrize("n", NS)
def test_anisotropy_of_low_rank_batches_is_large(n, d):
    g = gen(n + d)
    for k in sorted({1, 2, max(1, d // 10)}):
        if k >= 0.9 * min(n - 1, d):
            continue  # a batch of n points cannot tell rank k from full rank (documented limit)
        low_rank = torch.randn(n, k, generator=g) @ torch.randn(k, d, generator=g)
        assert anisotropy(low_rank + 0.01 * torch.randn(n, d, generator=g)) >= 0.9, k


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 70), d=st.integers(2, 90), scale=st.floats(1e-6, 1e6), seed=st.integers(0, 2**31 - 1))
def test_anisotropy_finite_and_bounded_for_any_shape(n, d, scale, seed):
    x = scale * torch.randn(n, d, generator=gen(seed))
    value = anisotropy(x)
    assert math.isfinite(value)
    assert 0.0 <= value <= 1.0


def test_anisotropy_degenerate_batches():
    assert anisotropy(torch.ones(10, 4)) == 1.0  # all points equal: no spread in any direction
    assert 0.0 <= anisotropy(torch.randn(2, 50)) <= 1.0


def test_effective_rank_and_std_channels():
    g = gen(0)
    iso = torch.randn(1024, 128, generator=g)
    assert effective_rank(iso) > 110
    four = torch.randn(1024, 4, generator=g) @ torch.randn(4, 128, generator=g)
    assert effective_rank(four + 1e-3 * torch.randn(1024, 128, generator=g)) < 5
    assert effective_rank(torch.zeros(5, 3)) == 0.0
    assert l2_normalized_std(iso) == pytest.approx(1 / math.sqrt(128), rel=0.05)
    assert l2_normalized_std(iso[:1].repeat(10, 1)) == 0.0


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), d=st.integers(1, 60), p=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1))
def test_dead_unit_fraction_is_the_share_of_columns_zero_on_every_row(n, d, p, seed):
    """Against a plain loop over the columns, on ReLU outputs with whole columns and single entries zeroed (a column
    zero on some rows only is alive) and negative values kept (a column of negatives is not silent)."""
    g = gen(seed)
    x = torch.randn(n, d, generator=g)
    x = torch.where(torch.rand(n, d, generator=g) < p, torch.zeros(()), x)  # scattered zeros
    dead = torch.rand(d, generator=g) < p
    x[:, dead] = 0.0
    expected = sum(all(float(v) == 0.0 for v in x[:, j]) for j in range(d)) / d
    assert dead_unit_fraction(x) == pytest.approx(expected)
    assert dead_unit_fraction(torch.relu(x)) >= dead_unit_fraction(x)
    if n >= 2 and d >= 2:
        assert collapse_index(x + 0.0).dead_fraction == pytest.approx(expected)


@pytest.mark.parametrize("d", DS)
@pytest.mark.parametrize("n", NS)
def test_ci_healthy_below_collapsed(n, d):
    g = gen(7 * n + d)
    healthy = torch.randn(n, d, generator=g)
    rep = collapse_index(healthy)
    eps = rep.eps  # the scale calibrated on healthy data, held fixed as the monitors do
    complete = healthy[:1].repeat(n, 1)
    noisy_complete = complete + 1e-4 * torch.randn(n, d, generator=g)
    q, _ = torch.linalg.qr(torch.randn(d, 2, generator=g, dtype=torch.float64))
    rank2 = (healthy.double() @ q @ q.T).float()
    held = {"eps": eps, "strict_eps": False}  # collapse may put every distance below the held scale
    assert rep.ci < collapse_index(complete).ci
    assert rep.ci < collapse_index(complete, **held).ci
    assert rep.ci < collapse_index(noisy_complete, **held).ci
    assert rep.ci < collapse_index(rank2).ci
    assert rep.ci < collapse_index(rank2, **held).ci


def test_report_fields_and_weights():
    g = gen(3)
    x = torch.randn(200, 16, generator=g)
    rep = collapse_index(x)
    assert isinstance(rep, CollapseReport)
    paper = 0.4 * rep.betti_term + 0.3 * rep.entropy_term + 0.3 * rep.anisotropy_term
    assert rep.ci == pytest.approx(paper)
    assert rep.n == 200
    assert rep.d == 16
    assert rep.betti_term == pytest.approx(1 - min(rep.b1 / rep.b0, 1))
    assert rep.entropy_term == pytest.approx(1 - rep.persistence_entropy)
    only_rank = collapse_index(x, weights={"rank": 2.0})
    assert only_rank.ci == pytest.approx(only_rank.rank_term)
    logged = rep.as_dict("collapse/")
    assert logged["collapse/ci"] == rep.ci
    assert all(isinstance(v, float) for v in logged.values())
    for term in ("betti", "entropy", "anisotropy", "rank", "std"):
        assert 0.0 <= rep.term(term) <= 1.0


def test_ci_is_invariant_to_row_order_and_duplicates_only_change_b0_fraction():
    g = gen(4)
    x = torch.randn(100, 8, generator=g)
    perm = torch.randperm(100, generator=g)
    a, b = collapse_index(x, eps=1.0), collapse_index(x[perm], eps=1.0)
    assert (a.b0, a.b1, a.ci) == (b.b0, b.b1, pytest.approx(b.ci))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"x": torch.zeros(4)}, "2-D"),
        ({"x": torch.zeros(1, 4)}, "at least 2 row"),
        ({"x": torch.zeros(0, 4)}, "at least 2 row"),
        ({"x": torch.tensor([[1.0, float("inf")], [0.0, 0.0]])}, "NaN or Inf"),
        ({"x": torch.randn(5, 3), "eps": -1.0}, "eps"),
        ({"x": torch.randn(5, 3), "weights": "fancy"}, "'paper'"),
        ({"x": torch.randn(5, 3), "weights": {"loops": 1.0}}, "accepted terms"),
        ({"x": torch.randn(5, 3), "weights": {"betti": -1.0}}, ">= 0"),
        ({"x": torch.randn(5, 3), "weights": {"betti": 0.0}}, "at least one weight"),
        ({"x": torch.randn(5, 3), "normalize": "l1"}, "normalize"),
        ({"x": torch.randn(5, 3), "eps_quantile": 1.5}, "eps_quantile"),
    ],
)
def test_collapse_index_bad_input(kwargs, match):
    x = kwargs.pop("x")
    with pytest.raises(ValueError, match=match):
        collapse_index(x, **kwargs)
