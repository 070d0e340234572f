"""Width-aware checks (issue 24, item 2): the collapse check from one Gram pass over column chunks against the
float64 reference it replaced, on random, clustered, low-rank and collapsed clouds of widths above and below n.

Tolerances (the same as docs in `topo_callbacks.functional._geometry` and benchmarks/RESULTS.md state):

- b0, b1: equal, at a scale no pair's exact distance is within 1e-9 (relative) of, and at the calibrated scale.
- eps from the quantile rule: the exact float64 quantile of the direct differences (rtol 1e-13); the float64 Gram
  formula the reference used is itself off by up to ~2e-7 on tight clusters (rtol 1e-6 against it).
- h0 deaths against the exact minimum spanning tree: rtol 1e-6 (against the float64 Gram formula the reference used,
  itself off by ~1e-6 on tight clusters: 1e-5); persistence entropy and its term: 1e-6.
- std of the normalised rows: rtol 1e-12; mean cosine: 1e-12.
- anisotropy term against float64: 1e-4 (float32 spectra where the reference took them in float32 too).
- effective rank: unchanged code for d <= n; float64 products: rtol 1e-6 (the float64 eigenvalue noise on the zero
  singular values of a rank-deficient batch adds up to ~1e-7, as it did before); float32 products: rtol 1e-6 on
  full-rank clouds, 3e-2 on rank-deficient ones (the float32 code before was off by up to 26% there, RESULTS.md).

No timings here: speed is shown by benchmarks/wide_check.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.sparse.csgraph import minimum_spanning_tree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tests.clouds import circle, gudhi_betti
from topo_callbacks.core.tracker import EngineTracker, unit_rows
from topo_callbacks.engine.graph import centre_rows, neighbour_mask
from topo_callbacks.functional import _geometry
from topo_callbacks.functional import spectral as S
from topo_callbacks.functional.collapse import (
    collapse_index,
    h0_death_scales,
    scale_from_quantile,
    topology_rows,
)
from topo_callbacks.functional.topology import (
    _h0_from_tree,
    _minimum_spanning_tree,
    betti_from_distances,
    pairwise_distances,
    persistence_entropy,
)

KINDS = ("random", "clusters", "tight", "rank2", "rank8", "collapsed", "offset", "duplicates")
RANK_DEFICIENT = ("tight", "rank2", "rank8", "duplicates")


def cloud(kind: str, n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        x = torch.randn(n, d, generator=g)
    elif kind in ("clusters", "tight"):
        centres = 4.0 * torch.randn(max(2, n // 12), d, generator=g)
        noise = 0.3 if kind == "clusters" else 1e-4
        x = centres[torch.randint(0, len(centres), (n,), generator=g)] + noise * torch.randn(n, d, generator=g)
    elif kind in ("rank2", "rank8"):
        k = int(kind[4:])
        x = torch.randn(n, k, generator=g) @ torch.randn(k, d, generator=g) + 1e-3 * torch.randn(n, d, generator=g)
    elif kind == "collapsed":  # one direction and a little noise: the distances are small against the norms
        x = torch.randn(1, d, generator=g) + 1e-3 * torch.randn(n, d, generator=g)
    elif kind == "offset":  # a large common mean
        x = 100.0 + torch.randn(n, d, generator=g)
    elif kind == "duplicates":
        base = torch.randn(max(1, n // 3), d, generator=g)
        x = base[torch.randint(0, len(base), (n,), generator=g)]
        x[: n // 10] *= 2.0  # a row and twice it normalise to the same row
    else:
        raise ValueError(kind)
    return x.float()


@pytest.fixture(params=["default", "float32"])
def products(request, monkeypatch):
    """``"float32"`` forces the float32 products (and their refinements) at these small sizes; ``"default"`` takes
    float64 products, as the sizes here would."""
    if request.param == "float32":
        monkeypatch.setattr(_geometry, "FLOAT64_FMAS", 0)
        monkeypatch.setattr(_geometry, "FLOAT64_MAX_DIM", 0)
    return request.param


def exact_distances(x: torch.Tensor, normalize: str = "l2") -> torch.Tensor:
    """float64 distances of the distinct topology rows from their differences (no Gram formula)."""
    z = torch.unique(topology_rows(x, normalize), dim=0)
    return torch.cdist(z, z, compute_mode="donot_use_mm_for_euclid_dist")


def reference_spectra(x: torch.Tensor) -> tuple[float, float]:
    """Anisotropy and effective rank from float64 singular values."""
    x64 = x.double()
    n, d = x64.shape
    s = torch.linalg.svdvals(x64)
    p = s / s.sum() + 1e-7
    erank = float(torch.exp(-(p * p.log()).sum()))
    eig = (torch.linalg.svdvals(x64 - x64.mean(dim=0)) ** 2).flip(0) / (n - 1)
    ratio = S._ratio_of_spectrum(eig[-min(n - 1, d) :], S._spectrum_eps(n, d))
    return S._anisotropy_of_ratio(ratio, n, d), erank


def reference_topology(x: torch.Tensor, eps: float | None) -> dict[str, object]:
    """The topological part of the check as computed before: float64 rows, float64 Gram-formula distances."""
    z = torch.unique(topology_rows(x), dim=0)
    dist = pairwise_distances(z, exact_near=eps)
    tree = _minimum_spanning_tree(dist)[0]
    eps = scale_from_quantile(dist) if eps is None else eps
    b0, b1 = betti_from_distances(dist, eps)
    return {"eps": eps, "betti": (b0, b1), "deaths": tree, "pe": persistence_entropy(_h0_from_tree(tree))}


def safe_scale(dist: torch.Tensor, quantile: float = 0.02) -> float:
    """A scale near the quantile with no pairwise distance within 1e-9 (relative) of it."""
    values = torch.unique(dist[torch.triu(torch.ones_like(dist, dtype=torch.bool), diagonal=1)])
    k = max(int(quantile * values.numel()), 0)
    for lo, hi in zip(values[k:].tolist(), values[k + 1 :].tolist(), strict=False):
        if hi - lo > 4e-9 * hi:
            return 0.5 * (lo + hi)
    raise AssertionError("no gap")


def exact_tree(dist: torch.Tensor) -> np.ndarray:
    return np.sort(minimum_spanning_tree(dist.numpy()).data)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("d", [48, 400])  # below and above n
def test_report_matches_the_float64_reference(kind, d, products):
    n = 120
    x = cloud(kind, n, d, seed=d + len(kind))
    dist = exact_distances(x)
    eps = safe_scale(dist)
    ours = collapse_index(x, eps=eps, weights="benchmark")  # eps checked against the exact range
    ref = reference_topology(x, eps)
    assert (int(ours.b0), int(ours.b1)) == ref["betti"] == gudhi_betti(topology_rows(x).numpy(), eps)
    deaths = np.asarray(ours.h0_deaths)
    np.testing.assert_allclose(deaths, exact_tree(dist), rtol=1e-6)
    # the reference's float64 Gram formula is itself off by ~1e-6 on tight clusters (distances 1e-5 of the norms)
    np.testing.assert_allclose(deaths, np.sort(ref["deaths"].numpy()), rtol=1e-5)
    assert ours.persistence_entropy == pytest.approx(ref["pe"], abs=1e-6)
    assert ours.std_l2 == pytest.approx(S.l2_normalized_std(x), rel=1e-12, abs=1e-300)
    assert ours.mean_cosine == pytest.approx(S.mean_cosine(x), abs=1e-12)
    aniso, erank = reference_spectra(x)
    assert ours.anisotropy_term == pytest.approx(aniso, abs=1e-4)
    if d <= n:  # the d x d side: the spectral functions as before
        assert ours.anisotropy_term == S.anisotropy(x)
        assert ours.effective_rank == S.effective_rank(x)
    elif products == "default":  # float64 eigenvalue noise on the zero ones of a rank-deficient batch: ~1e-7
        assert ours.effective_rank == pytest.approx(erank, rel=1e-6)
        assert ours.effective_rank == pytest.approx(S.effective_rank(x), rel=1e-6)
    else:
        assert ours.effective_rank == pytest.approx(erank, rel=3e-2 if kind in RANK_DEFICIENT else 1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("d", [48, 400])
def test_calibrated_scale_is_the_exact_quantile(kind, d, products):
    n = 120
    x = cloud(kind, n, d, seed=7 * d + len(kind))
    dist = exact_distances(x)
    ours = collapse_index(x)
    values = dist[torch.triu(torch.ones_like(dist, dtype=torch.bool), diagonal=1)]
    m = dist.shape[0]
    q = min(8.0 / (m - 1), 0.5)
    k = min(max(round(q * (values.numel() - 1)), 0), values.numel() - 1)
    assert ours.eps == pytest.approx(float(values.kthvalue(k + 1).values), rel=1e-13)
    ref = reference_topology(x, None)
    assert ours.eps == pytest.approx(ref["eps"], rel=1e-6)
    # the pair at the scale is an edge; every other pair is decided from its exact distance
    assert (int(ours.b0), int(ours.b1)) == gudhi_betti(topology_rows(x).numpy(), ours.eps * (1 + 1e-12))
    np.testing.assert_allclose(np.asarray(h0_death_scales(x)), exact_tree(dist), rtol=1e-6)


def test_a_ring_of_close_pairs_takes_float64_products(monkeypatch):
    """Points dense on a curve: every neighbour pair is small against the norms and they form one cluster, so the
    float32 products (forced here) cannot be refined cluster by cluster; the whole Gram matrix is summed again from
    float64 products, and the values are those of the exact distances."""
    monkeypatch.setattr(_geometry, "FLOAT64_FMAS", 0)
    monkeypatch.setattr(_geometry, "FLOAT64_MAX_DIM", 0)
    calls = []
    original = _geometry.BatchGeometry.of.__func__

    def spy(cls, x, normalize, *, precise=None):
        geo = original(cls, x, normalize, precise=precise)
        calls.append(geo.precise)
        return geo

    monkeypatch.setattr(_geometry.BatchGeometry, "of", classmethod(spy))
    x = torch.from_numpy(circle(200, np.random.default_rng(0), noise=0.0, dim=300)).float()
    x[:, 2:] += 1e-4 * torch.randn(200, 298, generator=torch.Generator().manual_seed(0))
    dist = exact_distances(x)
    report = collapse_index(x)
    assert calls == [False, True]
    np.testing.assert_allclose(np.asarray(report.h0_deaths), exact_tree(dist), rtol=1e-6)
    assert (int(report.b0), int(report.b1)) == gudhi_betti(topology_rows(x).numpy(), report.eps * (1 + 1e-12))


def test_pairs_left_imprecise_are_recomputed_exactly(monkeypatch):
    """With every pair taken as imprecise, one cluster and float64 products: the pairs are all recomputed."""
    monkeypatch.setattr(_geometry, "PRECISE_SHARE", 1e-30)  # every Gram value taken as imprecise
    x = cloud("random", 30, 50, seed=5)
    dist = exact_distances(x)
    report = collapse_index(x)
    np.testing.assert_allclose(np.asarray(report.h0_deaths), exact_tree(dist), rtol=1e-14)


def test_eps_range_check_reads_the_exact_extremes():
    x = cloud("random", 80, 300, seed=6)
    dist = exact_distances(x)
    low, high = float(dist[dist > 0].min()), float(dist.max())
    collapse_index(x, eps=high * (1 - 1e-9))
    collapse_index(x, eps=low * (1 + 1e-9))
    for eps in (high * (1 + 1e-9), low * (1 - 1e-9)):
        with pytest.raises(ValueError, match="lies outside"):
            collapse_index(x, eps=eps)


@pytest.mark.parametrize("d", [40, 300])
def test_unnormalised_rows(d, products):
    x = cloud("clusters", 100, d, seed=d)
    dist = exact_distances(x, "none")
    ours = collapse_index(x, normalize="none")
    values = dist[torch.triu(torch.ones_like(dist, dtype=torch.bool), diagonal=1)]
    k = round(8.0 / (dist.shape[0] - 1) * (values.numel() - 1))
    assert ours.eps == pytest.approx(float(values.kthvalue(k + 1).values), rel=1e-13)
    np.testing.assert_allclose(np.asarray(ours.h0_deaths), exact_tree(dist), rtol=1e-6)
    assert (int(ours.b0), int(ours.b1)) == betti_from_distances(dist, ours.eps)
    assert ours.std_l2 == pytest.approx(S.l2_normalized_std(x), rel=1e-12)  # the channels read normalised rows
    assert ours.mean_cosine == pytest.approx(S.mean_cosine(x), abs=1e-12)


def test_duplicates_are_merged_as_torch_unique_merges_them(products):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 30, generator=g)
    rows = torch.cat([x, x[:7], 2.0 * x[7:12], torch.zeros(3, 30), -torch.zeros(2, 30)])
    rows[-1, ::2] = 0.0  # -0.0 and 0.0 in one row: equal to the zero rows
    distinct = torch.unique(topology_rows(rows), dim=0).shape[0]
    assert len(h0_death_scales(rows)) == distinct - 1
    report = collapse_index(rows)
    assert len(report.h0_deaths) == distinct - 1
    assert report.eps == pytest.approx(collapse_index(torch.unique(topology_rows(rows), dim=0)).eps, rel=1e-13)
    point = x[:1].repeat(50, 1)  # one distinct row: no pair, no bar
    report = collapse_index(point)
    assert (report.b0, report.b1, report.eps, report.h0_deaths, report.std_l2) == (1.0, 0.0, 1.0, (), 0.0)
    assert h0_death_scales(point) == ()


@pytest.mark.parametrize("kind", ["random", "collapsed", "tight"])
def test_wide_batch_in_float32_products_matches_float64(kind):
    """n > 512 and n^2 d above the float64 budget: the products are float32 without forcing."""
    n, d = 600, 6000
    assert not _geometry.wants_float64(n, d)
    x = cloud(kind, n, d, seed=len(kind))
    dist = exact_distances(x)
    eps = safe_scale(dist)
    ours = collapse_index(x, eps=eps, strict_eps=False)
    assert (int(ours.b0), int(ours.b1)) == betti_from_distances(dist, eps)
    np.testing.assert_allclose(np.asarray(ours.h0_deaths), exact_tree(dist), rtol=1e-6)
    aniso, erank = reference_spectra(x)
    assert ours.anisotropy_term == pytest.approx(aniso, abs=1e-4)
    assert ours.effective_rank == pytest.approx(erank, rel=3e-2 if kind == "tight" else 1e-6)
    assert ours.std_l2 == pytest.approx(S.l2_normalized_std(x), rel=1e-12)


class _Float64Watch(TorchDispatchMode):
    """Records every float64 tensor an operation returns with at least ``limit`` elements."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.seen: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.numel() >= self.limit:
                self.seen.append((str(func), tuple(t.shape)))
        return out


def test_no_float64_copy_of_a_wide_batch():
    """Only n x n matrices and column or row chunks are float64, never a copy of the (n, d) batch: every float64
    tensor any operation returns is checked (a dispatch mode sees them all, on any device)."""
    n, d = 256, 4096
    x = cloud("random", n, d, seed=1)
    limit = n * d // 2  # chunks are n x 512 and pair blocks ~2**18 elements; n x n is 65,536
    with _Float64Watch(limit) as watch:
        report = collapse_index(x)
        h0_death_scales(x)
        collapse_index(x, eps=report.eps, betti=(int(report.b0), int(report.b1)))
        tracker = EngineTracker("stream")
        tracker.betti(unit_rows(x, "l2"), report.eps)
        tracker.betti(unit_rows(cloud("random", n, d, seed=2), "l2"), report.eps)
    assert watch.seen == []
    with _Float64Watch(limit) as watch:  # the watch does see a float64 copy
        topology_rows(x)
    assert watch.seen


@pytest.mark.parametrize("noise", [0.3, 1e-4])
def test_engine_neighbour_mask_on_wide_rows_is_exact(noise):
    """Chunked float32 products summed in float64 (several chunks), and with tight clusters the float64 Gram matrix of
    the undecided rows: every decision equals the float64 one from the differences."""
    g = torch.Generator().manual_seed(3)
    n, d = 300, 3000
    centres = torch.randn(6, d, generator=g)
    x = (centres[torch.randint(0, 6, (n,), generator=g)] + noise * torch.randn(n, d, generator=g)).float()
    exact = torch.cdist(x.double(), x.double(), compute_mode="donot_use_mm_for_euclid_dist")
    values = torch.unique(exact[exact > 0])
    eps = float(values[values.numel() // 20])  # a pair exactly at eps, and a crowd of within-cluster pairs near it
    prepared = centre_rows(x)
    mask = neighbour_mask(prepared[:100], prepared, eps)
    assert torch.equal(mask, exact[:100] <= eps)


def test_tracker_betti_on_wide_rows_matches_gudhi():
    n, d = 200, 3000
    eps = None
    tracker = EngineTracker("stream")
    for seed in range(2):
        x = cloud("clusters", n, d, seed=seed)
        z = unit_rows(x, "l2")
        dist = torch.cdist(z.double(), z.double(), compute_mode="donot_use_mm_for_euclid_dist")
        eps = eps or safe_scale(dist, 0.05)
        assert tracker.betti(z, eps) == betti_from_distances(dist, eps)


def test_unit_rows_are_the_float64_rows_rounded():
    x = cloud("random", 50, 700, seed=4)
    for normalize in ("l2", "none"):
        assert torch.equal(unit_rows(x, normalize), topology_rows(x, normalize).float())
    assert math.isclose(float(unit_rows(x, "l2")[0].double().norm()), 1.0, rel_tol=1e-6)
