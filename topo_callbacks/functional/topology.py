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

from topo_callbacks.functional._validation import check_eps, check_points, check_prime

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


def squared_distances(a: Tensor, b: Tensor, *, exact_near: float | None = None, same: bool = False) -> Tensor:
    """Squared Euclidean distances ``(k, m)`` between the rows of ``a`` and ``b``, in float64, exact where it matters.

    The fast Gram formula has an absolute error bound (a generous multiple of ``d * u`` times the largest squared
    norm, after centring on ``b``'s mean). Every pair whose computed value lies within that bound of 0 or of
    ``exact_near**2`` is recomputed from the differences, so comparisons with ``exact_near`` and zero distances
    (duplicates) are decided exactly. ``same=True`` (``a is b``) also makes the result bit-symmetric with a zero
    diagonal, which the MST's tie-breaking needs (BLAS does not return a bit-symmetric Gram matrix).

    Example:
        >>> import torch
        >>> squared_distances(torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, 4.0], [1.0, 0.0]]))
        tensor([[25.,  1.]], dtype=torch.float64)
    """
    a = a.to(torch.float64)
    b = a if same else b.to(torch.float64)
    center = b.mean(dim=0, keepdim=True) if b.shape[0] else 0.0  # smaller norms: a more accurate Gram formula
    a = a - center
    b = a if same else b - center
    sa, sb = (a * a).sum(dim=1), (b * b).sum(dim=1)
    d2 = torch.addmm(sa[:, None] + sb[None, :], a, b.T, alpha=-2.0)
    if same:
        d2 = torch.minimum(d2, d2.T)
    d2.clamp_min_(0.0)
    largest = max(float(sa.max()) if sa.numel() else 0.0, float(sb.max()) if sb.numel() else 0.0)
    tol = 4.0 * (a.shape[1] + 2) * torch.finfo(torch.float64).eps * 2.0 * largest
    suspect = d2 <= tol
    if exact_near is not None:
        suspect |= (d2 - exact_near * exact_near).abs_() <= tol
    if same:
        suspect.fill_diagonal_(False)
    i, j = torch.nonzero(suspect, as_tuple=True)
    if i.numel() <= 8 * max(d2.shape):  # few suspects (the usual case): recompute just those pairs
        chunk = max(1, (1 << 22) // max(a.shape[1], 1))
        for start in range(0, i.numel(), chunk):
            ii, jj = i[start : start + chunk], j[start : start + chunk]
            d2[ii, jj] = ((a[ii] - b[jj]) ** 2).sum(dim=1)
    else:  # many (near-duplicate clouds): whole rows by blocks, without the Gram formula
        rows = torch.unique(i)
        block = max(1, (1 << 22) // max(b.shape[0], 1))  # bounds each exact block to ~32 MB of float64
        for start in range(0, rows.numel(), block):
            r = rows[start : start + block]
            exact = torch.cdist(a[r], b, compute_mode="donot_use_mm_for_euclid_dist") ** 2
            d2[r] = torch.where(suspect[r], exact, d2[r])
    if same:
        d2.fill_diagonal_(0.0)
    return d2


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
    from topo_callbacks.engine.mmhm import MMHMEngine

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
    from topo_callbacks.engine.reduction import flag_betti

    i, j = torch.nonzero(torch.triu(dist <= eps, diagonal=1), as_tuple=True)
    roots, b1 = flag_betti(dist.shape[0], i, j, check_prime(coeff))
    return int(torch.unique(roots).numel()), int(b1.sum())


def _undominated(adj: Tensor, keep: Tensor) -> Tensor:
    """Shrink ``keep`` by strong collapses: drop every vertex ``v`` dominated by a neighbour ``u`` (N[v] ⊆ N[u]).

    Domination is ordered by (closed degree, then smaller index wins among twins), an acyclic relation, so every
    dropped vertex stays dominated by a vertex that is never dropped, and a whole round can be dropped at once.
    Closed-neighbourhood intersections are counted with one matmul per round, exact in float32 below 2**24.
    """
    keep = keep.clone()
    while True:
        ids = torch.nonzero(keep).flatten()
        sub = adj[ids][:, ids].to(torch.float32)
        degree = sub.sum(dim=1)
        overlap = sub @ sub.T  # overlap[v, u] = |N[v] ∩ N[u]|
        order = torch.arange(ids.numel(), device=adj.device)
        covered = (overlap == degree[:, None]) & (sub > 0)
        wins = (overlap < degree[None, :]) | (order[None, :] < order[:, None])
        dominated = (covered & wins).fill_diagonal_(False).any(dim=1)
        if not bool(dominated.any()):
            return keep
        keep[ids[dominated]] = False


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


def components_from_tree(n: int, u: Tensor, v: Tensor) -> Tensor:
    """Component labels (the smallest vertex of each) of the forest with edges ``(u[k], v[k])`` on ``n`` vertices.

    The minimum spanning tree's edges no longer than ``eps`` span exactly the components of the eps-graph, so
    this gives them in O(n) work per round instead of O(n^2). Roots hook onto smaller roots, then full pointer
    jumping; a few rounds.

    Example:
        >>> import torch
        >>> components_from_tree(5, torch.tensor([0, 3]), torch.tensor([1, 4]))
        tensor([0, 0, 2, 3, 3])
    """
    parent = torch.arange(n, device=u.device)
    while True:
        pu, pv = parent[u], parent[v]
        if torch.equal(pu, pv):
            return parent
        parent.scatter_reduce_(0, torch.maximum(pu, pv), torch.minimum(pu, pv), reduce="amin")
        while True:
            jumped = parent[parent]
            if torch.equal(jumped, parent):
                break
            parent = jumped


def persistence_diagrams(x: Tensor, *, maxdim: int = 1, thresh: float = math.inf) -> list[Tensor]:
    """Vietoris-Rips persistence diagrams of ``x`` for dimensions ``0..maxdim`` (``maxdim`` is 0 or 1).

    H0 is exact from a minimum spanning tree computed on ``x``'s device: one bar ``(0, w)`` per tree edge of
    length ``w > 0`` (zero-length bars from duplicate points are dropped, as ripser does), edges longer than
    ``thresh`` become infinite bars, and one infinite bar for the last component. H1 comes from ripser
    (coefficients Z/2) on the float64 distance matrix.

    Args:
        x: points, shape ``(n, d)``.
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
    if maxdim not in (0, 1):
        raise ValueError(f"`maxdim` must be 0 or 1; got {maxdim!r}.")
    if not (isinstance(thresh, (int, float)) and thresh > 0):
        raise ValueError(f"`thresh` must be a number > 0 (math.inf for the full filtration); got {thresh!r}.")
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
