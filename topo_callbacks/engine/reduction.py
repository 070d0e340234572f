"""Rank of the triangle boundaries over Z/2, module by module, by Morse-style eliminations and a small core.

After a spanning forest is contracted (its vertex-edge pairs are the first Morse matching), the cycle space
has one basis vector per non-tree edge, and a triangle's boundary is the sum of its non-tree edges (at most
three). b1 of a module is ``#non-tree edges - rank`` of these rows. The rank is found by eliminations that
never fill in, each a unit-coefficient pairing of a row with a column (algebraic Morse reductions):

- a row with one entry kills its column (the triangle's boundary is that cycle);
- rows with two entries identify their columns (over Z/2, ``e_a + e_b = 0``): the columns of a connected
  component of these rows collapse to one, adding ``size - 1`` to the rank;
- a column in a single row pairs with that row (a free face), adding one.

Rows never grow, so each round is a few tensor passes. What is left when no rule applies (usually nothing, or a
few hundred rows) is reduced exactly on the CPU with Python integers as bit vectors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from topo_callbacks.engine.graph import spanning_forest, spanning_triangles
from topo_callbacks.functional.topology import components_from_tree


def flag_betti_gf2(n: int, u: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Components and b1 over Z/2 of the clique complex of a graph, module by module.

    Args:
        n: number of vertices.
        u, v: the edges, ``u < v``, sorted row-major (as `torch.nonzero` of an upper triangle returns them).

    Returns:
        ``(roots, b1)``: per vertex the smallest vertex of its component, and per component (in the order of
        ``torch.unique(roots)``) its b1 = ``#non-tree edges - rank`` of the triangle rows.

    Example:
        >>> import torch
        >>> u, v = torch.tensor([0, 0, 1, 2]), torch.tensor([1, 3, 2, 3])  # a square: one loop
        >>> roots, b1 = flag_betti_gf2(5, u, v)  # vertex 4 is alone
        >>> roots.tolist(), b1.tolist()
        ([0, 0, 0, 0, 4], [1, 0])
    """
    device = u.device
    roots = components_from_tree(n, u, v)
    module_ids, module = torch.unique(roots, return_inverse=True)
    n_modules = module_ids.numel()
    vertices = torch.bincount(module, minlength=n_modules)
    edges = torch.bincount(module[u], minlength=n_modules)
    # a tree or a simplex (a collapsed cloud is one big clique) has b1 = 0: no triangles to enumerate
    simple = (edges == vertices - 1) | (edges == vertices * (vertices - 1) // 2)
    keep = _strong_collapse(n, u, v, ~simple[module])
    b1 = torch.zeros(n_modules, dtype=torch.long, device=device)
    if not bool(keep.any()):
        return roots, b1
    kept = torch.nonzero(keep).flatten()
    local = torch.full((n,), -1, dtype=torch.long, device=device)
    local[kept] = torch.arange(kept.numel(), device=device)
    inside = keep[u] & keep[v]
    lu, lv = local[u[inside]], local[v[inside]]  # a monotone relabelling: still sorted row-major
    k = kept.numel()
    sub_module = module[kept]
    tree = spanning_forest(k, lu, lv, components_from_tree(k, lu, lv))
    cycle_edges = ~tree
    n_cols = int(cycle_edges.sum())
    column = torch.full((lu.numel(),), -1, dtype=torch.long, device=device)
    column[cycle_edges] = torch.arange(n_cols, device=device)
    a, b, c = spanning_triangles(k, lu, lv)
    rows = column[torch.stack([a, b, c], dim=1)]
    rank = gf2_boundary_rank(rows, n_cols, sub_module[lu[cycle_edges]], n_modules)
    cycles = torch.bincount(sub_module[lu], minlength=n_modules) - torch.bincount(sub_module, minlength=n_modules) + 1
    return roots, torch.where(simple, b1, cycles - rank)


#: Dominated vertices are removed first when the mean degree exceeds this share of the vertices (near-cliques,
#: e.g. collapsed embeddings: each vertex has ~n^2 triangles, and most vertices are dominated). Below it, the
#: k x k matmuls of the domination test cost more than the triangles they would save (measured).
DENSE_SHARE = 0.125
#: Largest number of vertices given to the dense domination test (a k x k matmul per round).
DENSE_LIMIT = 4096


def _strong_collapse(n: int, u: Tensor, v: Tensor, keep: Tensor) -> Tensor:
    """Drop dominated vertices (N[v] inside N[w]) from ``keep`` when the kept graph is dense: homotopy-preserving,
    and on a collapsed cloud it leaves few vertices (hence few triangles)."""
    count = int(keep.sum())
    inside = keep[u] & keep[v]
    mean_degree = 2 * int(inside.sum()) / max(count, 1)
    # up to ~1000 vertices a round costs <= 2 GFLOP: worth it from a modest degree on
    dense = mean_degree > (16 if count <= 1024 else DENSE_SHARE * count)
    if count == 0 or count > DENSE_LIMIT or not dense:
        return keep
    from topo_callbacks.functional.topology import _undominated

    kept = torch.nonzero(keep).flatten()
    local = torch.full((n,), -1, dtype=torch.long, device=u.device)
    local[kept] = torch.arange(count, device=u.device)
    closed = torch.eye(count, dtype=torch.bool, device=u.device)
    closed[local[u[inside]], local[v[inside]]] = True
    closed[local[v[inside]], local[u[inside]]] = True
    out = torch.zeros_like(keep)
    out[kept] = _undominated(closed, torch.ones(count, dtype=torch.bool, device=u.device))
    return out


def _sort_and_cancel(rows: Tensor) -> Tensor:
    """Sort each 3-slot row (-1 = empty), cancel equal pairs (Z/2), and drop rows that became zero."""
    a, b, c = rows.unbind(dim=1)
    a, b = torch.minimum(a, b), torch.maximum(a, b)
    b, c = torch.minimum(b, c), torch.maximum(b, c)
    a, b = torch.minimum(a, b), torch.maximum(a, b)
    pair_bc = (b == c) & (c >= 0)
    pair_ab = (a == b) & (a >= 0) & ~pair_bc
    empty = torch.full_like(a, -1)
    last = torch.where(pair_bc, a, c)
    out = torch.stack([torch.where(pair_bc | pair_ab, empty, a), torch.where(pair_bc | pair_ab, empty, b), last], dim=1)
    # after cancelling a pair the survivor sits last; an `a` that survives pair_bc may be -1 (row is zero)
    return out[out[:, 2] >= 0]


def gf2_boundary_rank(rows: Tensor, n_cols: int, col_module: Tensor, n_modules: int) -> Tensor:
    """Rank over Z/2 of the rows (``(r, 3)`` column ids, -1 = empty), per module: ``(n_modules,)`` int64.

    Every row's columns must belong to one module (``col_module``), which holds since a triangle lies in one
    component.

    Example:
        >>> import torch
        >>> rows = torch.tensor([[0, 1, -1], [1, 2, -1], [0, 2, -1], [3, -1, -1]])
        >>> gf2_boundary_rank(rows, 4, torch.tensor([0, 0, 0, 1]), 2).tolist()  # e0+e1, e1+e2, e0+e2: rank 2
        [2, 1]
    """
    device = rows.device
    rank = torch.zeros(n_modules, dtype=torch.long, device=device)
    rows = _sort_and_cancel(rows)
    # one node per column, after one "ground" node per module: a one-entry row {c} is the two-entry row
    # {c, ground}, so a single propagation both kills and identifies columns; a component holding a ground node
    # (the smallest labels) is zero in the quotient, any other collapses to its smallest column
    module_of_node = torch.cat([torch.arange(n_modules, device=device), col_module])
    while rows.shape[0]:
        filled = (rows >= 0).sum(dim=1)
        short = filled <= 2
        if bool(short.any()):
            pairs = rows[short] + n_modules
            a = torch.where(pairs[:, 1] >= n_modules, pairs[:, 1], module_of_node[pairs[:, 2]])  # ground if single
            b = pairs[:, 2]
            labels = components_from_tree(n_modules + n_cols, a, b)
            touched = torch.unique(torch.cat([a, b]))
            touched = touched[touched >= n_modules]
            live = torch.unique(labels[touched])
            live = live[live >= n_modules]
            rank += torch.bincount(module_of_node[touched], minlength=n_modules)
            rank -= torch.bincount(module_of_node[live], minlength=n_modules)
            rows = rows[~short]
            mapped = labels[rows.clamp_min(0) + n_modules] - n_modules
            rows = _sort_and_cancel(torch.where((rows >= 0) & (mapped >= 0), mapped, -1))
            continue
        flat = rows[rows >= 0]
        count = torch.bincount(flat, minlength=n_cols)
        free = ((count[rows.clamp_min(0)] == 1) & (rows >= 0)).any(dim=1)
        if not bool(free.any()):
            break
        rank += torch.bincount(col_module[rows[free, 2]], minlength=n_modules)
        rows = rows[~free]
    if rows.shape[0]:
        rank += _dense_core_rank(rows, col_module, n_modules)
    return rank


def _dense_core_rank(rows: Tensor, col_module: Tensor, n_modules: int) -> Tensor:
    """Exact Z/2 rank, per module, of the rows no elimination rule applies to (small): Gaussian elimination with
    Python ints as bit vectors, one pivot per leading bit."""
    rank = [0] * n_modules
    module_of_row = col_module[rows[:, 2]].tolist()
    used, local = torch.unique(rows.clamp_min(0), return_inverse=True)  # short bit vectors: compact columns
    rows = torch.where(rows >= 0, local, -1)
    del used
    pivots: dict[tuple[int, int], int] = {}
    for module, row in zip(module_of_row, rows.tolist(), strict=True):
        vector = 0
        for col in row:
            if col >= 0:
                vector ^= 1 << col
        while vector:
            lead = vector.bit_length() - 1
            pivot = pivots.get((module, lead))
            if pivot is None:
                pivots[(module, lead)] = vector
                rank[module] += 1
                break
            vector ^= pivot
    return torch.tensor(rank, dtype=torch.long, device=rows.device)
