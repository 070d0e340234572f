"""Point-cloud generators shared by the tests: random, clustered, circles, tori, collapsed, duplicated."""

from __future__ import annotations

import math

import numpy as np


def circle(n: int, rng: np.random.Generator, noise: float = 0.02, dim: int = 2) -> np.ndarray:
    t = (np.arange(n) + rng.uniform(-0.3, 0.3, n)) * 2 * math.pi / n  # no gap wide enough to break the loop
    pts = np.zeros((n, dim))
    pts[:, 0], pts[:, 1] = np.cos(t), np.sin(t)
    return pts + noise * rng.standard_normal((n, dim))


def torus(n: int, rng: np.random.Generator, noise: float = 0.0) -> np.ndarray:
    """Flat torus S^1 x S^1 in R^4 on a jittered grid: b1 = 2 at a scale just above the grid spacing."""
    side = max(int(math.sqrt(n)), 4)
    a, b = np.meshgrid(np.arange(side), np.arange(side))
    u = (a.ravel() + 0.1 * rng.uniform(-1, 1, side * side)) * 2 * math.pi / side
    v = (b.ravel() + 0.1 * rng.uniform(-1, 1, side * side)) * 2 * math.pi / side
    pts = np.stack([np.cos(u), np.sin(u), np.cos(v), np.sin(v)], axis=1)
    return pts + noise * rng.standard_normal(pts.shape)


def cloud(kind: str, n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "gauss":
        return rng.standard_normal((n, d))
    if kind == "clusters":
        centers = 4.0 * rng.standard_normal((max(2, n // 10), d))
        return centers[rng.integers(0, len(centers), n)] + 0.3 * rng.standard_normal((n, d))
    if kind == "circle":
        return circle(n, rng, dim=max(d, 2))
    if kind == "collapsed":  # near a 2-dim subspace
        return rng.standard_normal((n, 2)) @ rng.standard_normal((2, d)) + 1e-3 * rng.standard_normal((n, d))
    if kind == "duplicates":
        base = rng.standard_normal((max(1, n // 3), d))
        return base[rng.integers(0, len(base), n)]
    if kind == "point":
        return np.repeat(rng.standard_normal((1, d)), n, axis=0)
    raise ValueError(kind)


KINDS = ("gauss", "clusters", "circle", "collapsed", "duplicates", "point")


def float32_cloud_at_percentile(
    kind: str, n: int, d: int, pct: float, rng: np.random.Generator
) -> tuple[np.ndarray, float]:
    """A float32 `cloud` and eps at the ``pct``-th percentile of its pairwise distances (as the benchmark picks it)."""
    from scipy.spatial.distance import pdist

    pts = cloud(kind, n, d, rng).astype(np.float32)
    return pts, float(np.percentile(pdist(pts.astype(np.float64)), pct))


def gudhi_betti(points: np.ndarray, eps: float, coeff: int = 2) -> tuple[int, int]:
    import gudhi

    st = gudhi.RipsComplex(points=points, max_edge_length=eps).create_simplex_tree(max_dimension=2)
    st.compute_persistence(homology_coeff_field=coeff, persistence_dim_max=True)
    betti = [*st.betti_numbers(), 0, 0]
    return betti[0], betti[1]


def ripser_betti(dist: np.ndarray, eps: float, coeff: int = 2) -> tuple[int, int]:
    from ripser import ripser

    dgms = ripser(dist, distance_matrix=True, maxdim=1, thresh=eps, coeff=coeff)["dgms"]
    return int(np.isinf(dgms[0][:, 1]).sum()), int(np.isinf(dgms[1][:, 1]).sum())


def safe_scale(dist: np.ndarray, quantile: float, margin: float = 1e-6) -> float | None:
    """A scale near the quantile that no pairwise distance is within ``margin`` (relative) of, or None.

    The exactness contract allows differences only for pairs whose distance rounds across eps; the oracles
    (gudhi in double, ripser in float32) are compared away from such ties.
    """
    values = np.unique(dist[np.triu_indices_from(dist, 1)])
    values = values[values > 0]
    if values.size < 2:
        return 1.0
    k = min(max(int(quantile * values.size), 0), values.size - 2)
    lo, hi = values[k], values[k + 1]
    eps = 0.5 * (lo + hi)
    return eps if (hi - lo) > 2 * margin * eps else None
