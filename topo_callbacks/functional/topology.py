"""Vietoris-Rips topology of a point cloud: Betti numbers at a fixed scale, persistence diagrams, entropy.

Distances are computed on the input's device in float64. Pairs whose Gram-formula distance is too close to
``eps`` (or to zero) to be trusted are recomputed by direct differences, so the eps-graph is exact up to the
rounding of a float64 norm. H0 comes from a minimum spanning tree built with tensor operations on the
device (Borůvka). The fixed-scale Betti numbers come from the MMHM engine (`topo_callbacks.engine`); the H1
persistence diagram comes from ripser.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from topo_callbacks.engine.mmhm import MMHMEngine

# The engine's primitives (the engine never imports `functional`), re-exported for callers that import them here.
from topo_callbacks.engine.primitives import components_from_tree, squared_distances
from topo_callbacks.engine.reduction import flag_betti
from topo_callbacks.functional._validation import as_real, check_eps, check_points, check_prime

__all__ = [
    "betti_from_distances",
    "betti_numbers",
    "components_from_tree",
    "h0_diagram",
    "pairwise_distances",
    "persistence_diagrams",
    "persistence_entropy",
    "squared_distances",
]


def pairwise_distances(x: Tensor, *, exact_near: float | None = None) -> Tensor:
    """Euclidean distance matrix of the rows of ``x`` in float64, on ``x``'s device.

    The fast Gram formula loses relative accuracy for close pairs; pairs whose squared distance lies within
    its error bound of 0 or of ``exact_near**2`` are recomputed from the differences, so that comparisons
    ``d <= exact_near`` and zero distances (duplicate points) are exact.

    Args:
        x: points, shape ``(n, d)``.
        exact_near: a scale whose comparisons must be exact, or None.

    Returns:
        A symmetric ``(n, n)`` float64 tensor with a zero diagonal.

    Example:
        >>> import torch
        >>> pairwise_distances(torch.tensor([[0.0, 0.0], [3.0, 4.0]]))
        tensor([[0., 5.],
                [5., 0.]], dtype=torch.float64)
    """
    x = check_points(x)
    return squared_distances(x, x, exact_near=exact_near, same=True).sqrt_()


def _minimum_spanning_tree(dist: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A minimum spanning tree of the complete graph on ``dist`` (Borůvka, on device): sorted (weights, u, v).

    Every round each component picks its lightest outgoing edge under the total order (weight, edge id), which
    rules out cycles; components at least halve per round, so there are O(log n) rounds of O(n^2) work.
    """
    n = dist.shape[0]
    device = dist.device
    labels = torch.arange(n, device=device)
    idx = torch.arange(n, device=device)
    weights: list[Tensor] = []
    ends: list[Tensor] = []
    inf = torch.tensor(float("inf"), dtype=dist.dtype, device=device)
    big = torch.tensor(n * n, device=device)
    while True:
        roots = torch.unique(labels)
        if roots.numel() <= 1:
            break
        masked = torch.where(labels[:, None] == labels[None, :], inf, dist)
        row_min, row_arg = masked.min(dim=1)  # the first minimal column has the smallest edge id in its row
        comp_min = torch.full((n,), float("inf"), dtype=dist.dtype, device=device)
        comp_min.scatter_reduce_(0, labels, row_min, reduce="amin")
        edge_id = torch.minimum(idx, row_arg) * n + torch.maximum(idx, row_arg)
        edge_id = torch.where(row_min == comp_min[labels], edge_id, big)
        comp_edge = torch.full((n,), n * n, device=device)
        comp_edge.scatter_reduce_(0, labels, edge_id, reduce="amin")
        chosen = comp_edge[roots]
        unique_edges = torch.unique(chosen)
        u, v = unique_edges // n, unique_edges % n
        weights.append(dist[u, v])
        ends.append(unique_edges)
        # Hook every component onto the one its edge reaches; mutual choices form 2-cycles, broken by label.
        target = torch.where(labels[chosen // n] == roots, labels[chosen % n], labels[chosen // n])
        parent = idx.clone()
        parent[roots] = target
        two_cycle = (parent[parent[roots]] == roots) & (roots < target)
        parent[roots[two_cycle]] = roots[two_cycle]
        while True:
            jumped = parent[parent]
            if torch.equal(jumped, parent):
                break
            parent = jumped
        labels = parent[labels]
    if not weights:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return dist.new_zeros(0), empty, empty
    w, order = torch.sort(torch.cat(weights))
    e = torch.cat(ends)[order]
    return w, e // n, e % n


def betti_numbers(x: Tensor, eps: float, *, coeff: int = 2) -> tuple[int, int]:
    """Betti numbers ``(b0, b1)`` of the Vietoris-Rips complex of ``x`` at the fixed scale ``eps``.

    The complex has an edge between ``x[i]`` and ``x[j]`` iff ``||x[i] - x[j]|| <= eps`` and every clique of the
    edge graph as a simplex; homology has coefficients in Z/``coeff``. Exact: the same numbers as gudhi's
    ``RipsComplex(max_edge_length=eps)`` or ripser at ``thresh=eps`` (pairs whose float64 distance rounds across
    ``eps`` aside).

    Args:
        x: points, shape ``(n, d)``, any device.
        eps: the scale, > 0.
        coeff: a prime p for coefficients in Z/p.

    Returns:
        ``(b0, b1)`` as Python ints.

    Raises:
        ValueError: on a non-2-D, empty or non-finite ``x``, ``eps <= 0`` or a non-prime ``coeff``.

    Example:
        >>> import math, torch
        >>> t = torch.arange(12) * (2 * math.pi / 12)
        >>> circle = torch.stack([t.cos(), t.sin()], dim=1)
        >>> betti_numbers(circle, eps=0.6)
        (1, 1)
        >>> betti_numbers(circle, eps=0.1)
        (12, 0)
    """
    x = check_points(x)
    engine = MMHMEngine(check_eps(eps), coeff=check_prime(coeff), dtype=torch.float64, device=x.device)
    engine.reset(x)
    return engine.betti()


def betti_from_distances(dist: Tensor, eps: float, *, coeff: int = 2) -> tuple[int, int]:
    """``(b0, b1)`` of the clique complex of the graph ``dist <= eps``; ``dist`` from `pairwise_distances`.

    The MMHM engine's reduction (`topo_callbacks.engine.reduction.flag_betti`): components on the device, then per
    component the lexicographic Morse matching of its flag complex, after strong collapses when it is nearly a
    clique; a complete component is a simplex and is skipped.

    Example:
        >>> import torch
        >>> square = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
        >>> betti_from_distances(pairwise_distances(square), 1.0)  # 4 edges, no diagonal: one loop
        (1, 1)
    """
    i, j = torch.nonzero(torch.triu(dist <= eps, diagonal=1), as_tuple=True)
    roots, b1 = flag_betti(dist.shape[0], i, j, check_prime(coeff))
    return int(torch.unique(roots).numel()), int(b1.sum())


def h0_diagram(dist: Tensor, thresh: float = math.inf) -> Tensor:
    """Exact H0 diagram (float64) from the minimum spanning tree of ``dist``; see `persistence_diagrams`.

    Example:
        >>> import torch
        >>> h0_diagram(pairwise_distances(torch.tensor([[0.0], [2.0]])))
        tensor([[0., 2.],
                [0., inf]], dtype=torch.float64)
    """
    return _h0_from_tree(_minimum_spanning_tree(dist)[0], thresh)


def _h0_from_tree(mst: Tensor, thresh: float = math.inf) -> Tensor:
    mst = mst[mst > 0]
    deaths = torch.where(mst <= thresh, mst, torch.full_like(mst, math.inf))
    deaths = torch.cat([deaths, deaths.new_full((1,), math.inf)])
    return torch.stack([torch.zeros_like(deaths), deaths], dim=1)


def persistence_diagrams(x: Tensor, *, maxdim: int = 1, thresh: float = math.inf) -> list[Tensor]:
    """Vietoris-Rips persistence diagrams of ``x`` for dimensions ``0..maxdim`` (``maxdim`` is 0 or 1).

    H0 is exact from a minimum spanning tree computed on ``x``'s device: one bar ``(0, w)`` per tree edge of
    length ``w > 0`` (zero-length bars from duplicate points are dropped, as ripser does), edges longer than
    ``thresh`` become infinite bars, and one infinite bar for the last component. H1 comes from ripser
    (coefficients Z/2) on the float64 distance matrix.

    Not differentiable: a tensor that requires grad gives the diagrams of ``x.detach()``, and the diagrams never
    require grad (as for every function of `topo_callbacks.functional`).

    Args:
        x: points, shape ``(n, d)``, ``d >= 1``.
        maxdim: highest homology dimension, 0 or 1.
        thresh: largest edge length in the filtration; bars alive at ``thresh`` are infinite.

    Returns:
        A list of ``(k, 2)`` tensors (birth, death) in ``x``'s floating dtype on ``x``'s device, one per
        dimension.

    Example:
        >>> import torch
        >>> persistence_diagrams(torch.tensor([[0.0], [1.0], [3.0]]), maxdim=0)
        [tensor([[0., 1.],
                [0., 2.],
                [0., inf]])]
    """
    x = check_points(x)
    if isinstance(maxdim, bool) or maxdim not in (0, 1):
        raise ValueError(f"`maxdim` must be 0 or 1; got {maxdim!r}.")
    accepted = "a number > 0 (math.inf for the full filtration)"
    thresh = as_real(thresh, "thresh", accepted)
    if not thresh > 0:  # NaN fails too
        raise ValueError(f"`thresh` must be {accepted}; got {thresh!r}.")
    out_dtype = x.dtype
    dist = pairwise_distances(x, exact_near=None if math.isinf(thresh) else float(thresh))
    diagrams = [h0_diagram(dist, thresh).to(out_dtype)]
    if maxdim >= 1:
        from ripser import ripser

        h1 = ripser(dist.cpu().numpy(), distance_matrix=True, maxdim=1, thresh=thresh)["dgms"][1]
        diagrams.append(torch.as_tensor(h1, dtype=out_dtype, device=x.device).reshape(-1, 2))
    return diagrams


def persistence_entropy(diagrams: Tensor | Sequence[Tensor], *, normalize: bool = True) -> float:
    """Persistence entropy of the finite bars of one diagram or of several diagrams pooled together.

    With bar lengths ``l_i`` and ``p_i = l_i / sum(l)``, the entropy is ``-sum(p_i log p_i)``. Infinite bars and
    bars of zero length carry no finite lifetime and are left out. With ``normalize=True`` the entropy is divided
    by ``log(#bars)``, its largest possible value, so the result lies in [0, 1]; 1 means all bars have the same
    length. A diagram with no finite bar, or with one, has entropy 0 (no spread of lifetimes).

    Args:
        diagrams: a ``(k, 2)`` tensor of (birth, death) pairs or a sequence of them.
        normalize: divide by ``log(#bars)``.

    Returns:
        The entropy as a Python float.

    Example:
        >>> import torch
        >>> persistence_entropy(torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, float("inf")]]))
        1.0
        >>> persistence_entropy(torch.zeros(0, 2))
        0.0
    """
    parts = [diagrams] if isinstance(diagrams, Tensor) else list(diagrams)
    lengths = []
    for dgm in parts:
        if not isinstance(dgm, Tensor) or dgm.ndim != 2 or dgm.shape[1] != 2:
            shape = tuple(dgm.shape) if isinstance(dgm, Tensor) else type(dgm).__name__
            raise ValueError(f"a persistence diagram must be a (k, 2) tensor of (birth, death); got {shape}.")
        life = (dgm[:, 1] - dgm[:, 0]).to(torch.float64)
        lengths.append(life[torch.isfinite(life) & (life > 0)])
    life = torch.cat(lengths) if lengths else torch.zeros(0, dtype=torch.float64)
    if life.numel() <= 1:
        return 0.0
    p = life / life.sum()
    # xlogy: 0 log 0 = 0, for bars so short (subnormal) that their share underflows to 0
    entropy = float(-torch.special.xlogy(p, p).sum())
    if normalize:
        entropy = min(max(entropy / math.log(life.numel()), 0.0), 1.0)
    return entropy
