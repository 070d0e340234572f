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

from topo_callbacks.engine.graph import propagate_min_labels


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
    nodes = torch.arange(n_modules + n_cols, device=device)
    module_of_node = torch.cat([torch.arange(n_modules, device=device), col_module])
    while rows.shape[0]:
        filled = (rows >= 0).sum(dim=1)
        short = filled <= 2
        if bool(short.any()):
            pairs = rows[short] + n_modules
            a = torch.where(pairs[:, 1] >= n_modules, pairs[:, 1], module_of_node[pairs[:, 2]])  # ground if single
            b = pairs[:, 2]
            labels = propagate_min_labels(nodes, a, b)
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
