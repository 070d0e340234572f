"""b1 over Z/p of a flag complex, module by module, from its lexicographic Morse matching.

The matching (`engine.graph.lexicographic_matching`) pairs most edges with a triangle; in a Vietoris-Rips graph of
a few thousand points, only a few thousand edges and about a thousand triangles stay critical. The rank of the
triangle boundaries is then the number of matched pairs plus the rank of the critical triangles' boundaries
*reduced* to critical edges:

- order edges by their lower end; a matched triangle ``{a, b, c}`` (``a`` the apex) has its top edge ``{b, c}``
  as its strictly largest edge, and distinct matched triangles have distinct top edges, so they are
  independent, and every vector is congruent, modulo their span, to exactly one vector on critical edges;
- that vector is found by *flowing*: a matched edge ``[b, c]`` is replaced by ``[a, c] - [a, b]``, whose lower
  ends are smaller, until only critical edges are left (a gradient path, a few tensor passes for all rows).

Both steps hold over any field, since a matched pair has a coefficient of +-1. The reduced critical rows are few
and short; their rank is found exactly on the CPU (Python ints as bit vectors over Z/2, dicts over Z/p). b1 of a
module is ``#edges - #vertices + 1 - rank``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from topo_callbacks.engine.graph import LexicographicMatching, lexicographic_matching
from topo_callbacks.engine.primitives import components_from_tree, undominated


def flag_betti(n: int, u: Tensor, v: Tensor, coeff: int = 2) -> tuple[Tensor, Tensor]:
    """Components and b1 over Z/``coeff`` (a prime) of the clique complex of a graph, module by module.

    Args:
        n: number of vertices.
        u, v: the edges, each once.
        coeff: a prime p.

    Returns:
        ``(roots, b1)``: per vertex the smallest vertex of its component, and per component (in the order of
        ``torch.unique(roots)``) its b1.

    Example:
        >>> import torch
        >>> u, v = torch.tensor([0, 0, 1, 2]), torch.tensor([1, 3, 2, 3])  # a square: one loop
        >>> roots, b1 = flag_betti(5, u, v)  # vertex 4 is alone
        >>> roots.tolist(), b1.tolist()
        ([0, 0, 0, 0, 4], [1, 0])
    """
    device = u.device
    roots = components_from_tree(n, u, v)
    module_ids, module = torch.unique(roots, return_inverse=True)
    n_modules = module_ids.numel()
    vertices = torch.bincount(module, minlength=n_modules)
    edges = torch.bincount(module[u], minlength=n_modules)
    # a tree or a simplex (a collapsed cloud is one big clique) has b1 = 0: no triangles to look at
    simple = (edges == vertices - 1) | (edges == vertices * (vertices - 1) // 2)
    keep = _strong_collapse(n, u, v, ~simple[module])
    b1 = torch.zeros(n_modules, dtype=torch.long, device=device)
    if not bool(keep.any()):
        return roots, b1
    kept = torch.nonzero(keep).flatten()
    local = torch.full((n,), -1, dtype=torch.long, device=device)
    local[kept] = torch.arange(kept.numel(), device=device)
    inside = keep[u] & keep[v]
    lu, lv = local[u[inside]], local[v[inside]]
    sub_module = module[kept]
    # strong collapses keep each module's homotopy type, so it stays connected
    cycles = torch.bincount(sub_module[lu], minlength=n_modules) - torch.bincount(sub_module, minlength=n_modules) + 1
    rank = boundary_rank(lexicographic_matching(kept.numel(), lu, lv), sub_module, n_modules, coeff)
    return roots, torch.where(simple, b1, cycles - rank)


def boundary_rank(matching: LexicographicMatching, vertex_module: Tensor, n_modules: int, coeff: int = 2) -> Tensor:
    """Rank over Z/``coeff`` of all triangle boundaries of the matched graph, per module: ``(n_modules,)`` int64.

    ``vertex_module`` gives each vertex's module in the graph's input labels.

    Example:
        >>> import torch
        >>> u, v = torch.tensor([0, 0, 0, 1, 1, 2]), torch.tensor([1, 2, 3, 2, 3, 3])  # a tetrahedron
        >>> boundary_rank(lexicographic_matching(4, u, v), torch.zeros(4, dtype=torch.long), 1).tolist()
        [3]
    """
    module_of = torch.empty_like(vertex_module)
    module_of[matching.relabel] = vertex_module  # by new label
    edge_module = module_of[matching.lo]
    matched = matching.down >= 0
    rank = torch.bincount(edge_module[matched], minlength=n_modules)
    if matching.extra_top.numel() == 0:
        return rank
    row, col, value = _flow_to_critical(matching, coeff)
    row_module = edge_module[matching.extra_top].tolist()
    if coeff == 2:
        extra = _sparse_rank_gf2(row, col, row_module, n_modules)
    else:
        extra = _sparse_rank_mod_p(row, col, value, row_module, n_modules, coeff)
    return rank + torch.tensor(extra, dtype=torch.long, device=rank.device)


def _flow_to_critical(matching: LexicographicMatching, coeff: int) -> tuple[Tensor, Tensor, Tensor]:
    """The critical triangles' boundaries reduced modulo the matched ones: ``(row, edge, value)`` entries with
    ``value`` in 1..p-1, each ``(row, edge)`` once, on critical edges only.

    With edges oriented from the lower to the higher new label, ``d[a, b, c] = [b, c] - [a, c] + [a, b]`` for
    ``a < b < c``; a matched edge ``[b, c]`` with coefficient x (apex ``a``) becomes ``x [a, c] - x [a, b]``.
    """
    top, apex = matching.extra_top, matching.extra_apex
    m = matching.keys.numel()
    row = torch.arange(top.numel(), device=top.device).repeat(3)
    edge = torch.cat([top, matching.edge_index(apex, matching.lo[top]), matching.edge_index(apex, matching.hi[top])])
    value = torch.ones_like(row)
    value[2 * top.numel() :] = coeff - 1  # -[a, c]
    critical = matching.down < 0
    done: list[Tensor] = []
    while True:
        key, where = torch.unique(row * m + edge, return_inverse=True)
        value = torch.zeros_like(key).index_add_(0, where, value) % coeff  # equal entries add up (or cancel)
        key, value = key[value != 0], value[value != 0]
        row, edge = key // m, key % m
        if edge.numel() == 0:
            break
        final = critical[edge]
        done.append(torch.stack([key[final], value[final]]))
        row, edge, value = row[~final], edge[~final], value[~final]
        a = matching.down[edge]
        row = row.repeat(2)
        edge = torch.cat([matching.edge_index(a, matching.lo[edge]), matching.edge_index(a, matching.hi[edge])])
        value = torch.cat([(coeff - value) % coeff, value])  # -x [a, b] + x [a, c]
    if not done:
        empty = torch.zeros(0, dtype=torch.long, device=top.device)
        return empty, empty, empty
    key, value = torch.cat(done, dim=1)
    key, where = torch.unique(key, return_inverse=True)
    value = torch.zeros_like(key).index_add_(0, where, value) % coeff
    key, value = key[value != 0], value[value != 0]
    return key // m, key % m, value


def _sparse_rank_gf2(row: Tensor, col: Tensor, row_module: list[int], n_modules: int) -> list[int]:
    """Exact Z/2 rank, per module, of sparse rows given as ``(row, col)`` entries: Gaussian elimination with
    Python ints as bit vectors, one pivot per leading bit."""
    rank = [0] * n_modules
    _, local = torch.unique(col, return_inverse=True)  # compact columns: short bit vectors
    vectors = [0] * len(row_module)
    for r, c in zip(row.tolist(), local.tolist(), strict=True):
        vectors[r] |= 1 << c
    pivots: dict[tuple[int, int], int] = {}
    for module, vector in zip(row_module, vectors, strict=True):
        while vector:
            lead = vector.bit_length() - 1
            pivot = pivots.get((module, lead))
            if pivot is None:
                pivots[(module, lead)] = vector
                rank[module] += 1
                break
            vector ^= pivot
    return rank


def _sparse_rank_mod_p(
    row: Tensor, col: Tensor, value: Tensor, row_module: list[int], n_modules: int, p: int
) -> list[int]:
    """Exact Z/p rank, per module, of sparse rows given as ``(row, col, value)`` entries: Gaussian elimination
    on dicts, pivots normalised to a leading 1."""
    rank = [0] * n_modules
    vectors: list[dict[int, int]] = [{} for _ in row_module]
    for r, c, x in zip(row.tolist(), col.tolist(), value.tolist(), strict=True):
        vectors[r][c] = x
    pivots: dict[tuple[int, int], dict[int, int]] = {}
    for module, vector in zip(row_module, vectors, strict=True):
        while vector:
            lead = max(vector)
            pivot = pivots.get((module, lead))
            if pivot is None:
                scale = pow(vector[lead], p - 2, p)  # the inverse, p prime
                pivots[(module, lead)] = {c: x * scale % p for c, x in vector.items()}
                rank[module] += 1
                break
            factor = vector[lead]
            for c, x in pivot.items():
                updated = (vector.get(c, 0) - factor * x) % p
                if updated:
                    vector[c] = updated
                else:
                    vector.pop(c, None)
    return rank


#: Dominated vertices are removed first when the mean degree exceeds this share of the vertices (near-cliques,
#: e.g. collapsed embeddings at a large scale: most vertices are dominated). Below it, the k x k matmuls of the
#: domination test cost more than the matching pass they shorten (measured: equal at 0.3, 2.5x faster at 0.6 and
#: 5x at 0.9 for n = 1024; 2-6x slower at 0.05).
DENSE_SHARE = 0.3
#: Largest number of vertices given to the dense domination test (a k x k matmul per round).
DENSE_LIMIT = 4096


def _strong_collapse(n: int, u: Tensor, v: Tensor, keep: Tensor) -> Tensor:
    """Drop dominated vertices (N[v] inside N[w]) from ``keep`` when the kept graph is dense: homotopy-preserving,
    and on a collapsed cloud it leaves few vertices (hence few edges to match)."""
    count = int(keep.sum())
    inside = keep[u] & keep[v]
    dense = 2 * int(inside.sum()) > DENSE_SHARE * count * count
    if count == 0 or count > DENSE_LIMIT or not dense:
        return keep
    kept = torch.nonzero(keep).flatten()
    local = torch.full((n,), -1, dtype=torch.long, device=u.device)
    local[kept] = torch.arange(count, device=u.device)
    closed = torch.eye(count, dtype=torch.bool, device=u.device)
    closed[local[u[inside]], local[v[inside]]] = True
    closed[local[v[inside]], local[u[inside]]] = True
    out = torch.zeros_like(keep)
    out[kept] = undominated(closed, torch.ones(count, dtype=torch.bool, device=u.device))
    return out
