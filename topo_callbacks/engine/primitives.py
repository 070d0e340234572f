"""Tensor primitives the engine is built on, shared with `topo_callbacks.functional` (which imports them from here).

They live in the engine, the lower layer: `functional` is built on `engine`, and the engine imports nothing from
`functional`, so there is no import cycle between the two packages.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["components_from_tree", "squared_distances", "undominated"]


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


def undominated(adj: Tensor, keep: Tensor) -> Tensor:
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
