"""The eps-graph as tensors: exact neighbour rows, bit-packed adjacency, spanning forest, spanning triangles.

Everything here is a tensor operation on the points' device; no Python loop runs per vertex or per edge.
"""

from __future__ import annotations

import torch
from torch import Tensor

from topo_callbacks.functional.topology import squared_distances

WORD = 64  # bits per adjacency word (int64)

# rows of the exact refinement done per block: bounds its float64 temporaries to ~32 MB
_EXACT_BLOCK_ELEMENTS = 1 << 22


def words_for(n: int) -> int:
    """Number of int64 words that hold ``n`` bits."""
    return (n + WORD - 1) // WORD


def pack_bits(mask: Tensor) -> Tensor:
    """``(r, m)`` bool -> ``(r, words_for(m))`` int64, bit ``j % 64`` of word ``j // 64`` is ``mask[:, j]``.

    Built byte by byte and viewed as int64 (little-endian, as on x86, ARM and CUDA devices).

    Example:
        >>> import torch
        >>> pack_bits(torch.tensor([[True, False, True]])).tolist()
        [[5]]
    """
    r, m = mask.shape
    w = words_for(m)
    if r == 0 or w == 0:
        return torch.zeros(r, w, dtype=torch.int64, device=mask.device)
    padded = torch.zeros(r, w * WORD, dtype=torch.uint8, device=mask.device)
    padded[:, :m] = mask
    bytes_ = padded.view(r, w * 8, 8)
    out = torch.zeros(r, w * 8, dtype=torch.uint8, device=mask.device)
    for k in range(8):
        out |= bytes_[:, :, k] << k
    return out.view(torch.int64)


def unpack_bits(words: Tensor, m: int) -> Tensor:
    """Inverse of `pack_bits`: ``(r, w)`` int64 -> ``(r, m)`` bool, by a 256-entry byte table."""
    if words.numel() == 0:
        return torch.zeros(words.shape[0], m, dtype=torch.bool, device=words.device)
    table = ((torch.arange(256, device=words.device)[:, None] >> torch.arange(8, device=words.device)) & 1).bool()
    bytes_ = words.contiguous().view(torch.uint8).long()
    return table[bytes_].view(words.shape[0], -1)[:, :m]


def popcount(words: Tensor) -> int:
    """Number of set bits in an int64 tensor."""
    table = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64, device=words.device)
    return int(table[words.contiguous().view(torch.uint8).long()].sum())


def neighbour_rows(a: Tensor, b: Tensor, eps: float) -> Tensor:
    """``(k, m)`` bool: ``||a_i - b_j|| <= eps``, decided exactly in float64 from the given values.

    Points stored in float32 or less go through a float32 Gram matrix (the fast path); every pair whose float32
    value lies within a rigorous error bound of ``eps**2`` is recomputed from the float64 differences, so the
    answer is the float64 one. float64 points use the float64 path of `squared_distances`.

    Example:
        >>> import torch
        >>> neighbour_rows(torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, 4.0], [1.0, 0.0]]), 5.0).tolist()
        [[True, True]]
    """
    if a.dtype == torch.float64 or b.dtype == torch.float64:
        return squared_distances(a, b, exact_near=eps) <= eps * eps
    k, m = a.shape[0], b.shape[0]
    if k == 0 or m == 0:
        return torch.zeros(k, m, dtype=torch.bool, device=a.device)
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    center = b64.mean(dim=0, keepdim=True)
    a32, b32 = (a64 - center).float(), (b64 - center).float()  # smaller norms: a tighter Gram error
    sa, sb = (a32 * a32).sum(dim=1), (b32 * b32).sum(dim=1)
    d2 = torch.addmm(sa[:, None] + sb[None, :], a32, b32.T, alpha=-2.0)
    largest = float(torch.maximum(sa.max(), sb.max()))
    unit = torch.finfo(torch.float32).eps
    # GEMM and norms: (d + 2) u per term, four terms of size <= largest; the rounding of the centred points to
    # float32 moves a squared distance by at most 8 u largest; doubled for safety
    tol = 2.0 * (4.0 * (a.shape[1] + 2) * unit * largest + 8.0 * unit * largest)
    eps2 = eps * eps
    mask = d2 <= eps2
    i, j = torch.nonzero((d2 - eps2).abs_() <= tol, as_tuple=True)
    chunk = max(1, _EXACT_BLOCK_ELEMENTS // max(a.shape[1], 1))
    for start in range(0, i.numel(), chunk):
        ii, jj = i[start : start + chunk], j[start : start + chunk]
        mask[ii, jj] = ((a64[ii] - b64[jj]) ** 2).sum(dim=1) <= eps2
    return mask


def spanning_forest(n: int, u: Tensor, v: Tensor, labels: Tensor) -> Tensor:
    """A breadth-first spanning forest of the graph (edges ``u, v``; components ``labels`` from
    `components_from_tree`), as a bool mask over the edges.

    Each component grows from its highest-degree vertex, and each newly reached vertex hangs from its
    highest-degree neighbour in the frontier: hubs as parents put many triangles on two tree edges, which is
    what lets `gf2_boundary_rank` eliminate without a dense core. One tensor pass per level.
    """
    m = u.numel()
    device = u.device
    tree = torch.zeros(m, dtype=torch.bool, device=device)
    if m == 0:
        return tree
    degree = torch.bincount(u, minlength=n) + torch.bincount(v, minlength=n)
    score = degree * n + (n - 1 - torch.arange(n, device=device))  # distinct: degree, then lower index
    best_in_component = torch.full((n,), -1, dtype=torch.long, device=device)
    best_in_component.scatter_reduce_(0, labels, score, reduce="amax")
    reached = score == best_in_component[labels]
    src, dst = torch.cat([u, v]), torch.cat([v, u])
    eid = torch.arange(m, device=device).repeat(2)
    key = score[src] * (m + 1) + eid  # the parent's score decides; the edge id only decodes (score is unique)
    while True:
        frontier_edge = reached[src] & ~reached[dst]
        if not bool(frontier_edge.any()):
            return tree
        best = torch.full((n,), -1, dtype=torch.long, device=device)
        best.scatter_reduce_(0, dst[frontier_edge], key[frontier_edge], reduce="amax")
        newly = best >= 0
        tree[best[newly] % (m + 1)] = True
        reached |= newly


def lowest_bits(words: Tensor) -> Tensor:
    """Index of the lowest set bit of each row of a packed ``(r, w)`` tensor whose rows are not all zero.

    Example:
        >>> import torch
        >>> lowest_bits(torch.tensor([[0, 12], [6, 1]])).tolist()  # 12 = 0b1100 in the second word
        [66, 1]
    """
    word = (words != 0).to(torch.uint8).argmax(dim=1)  # the first nonzero word
    value = words.gather(1, word[:, None]).squeeze(1)
    _, exponent = torch.frexp((value & -value).to(torch.float64).abs())  # a power of two, exact in float64
    return word * WORD + exponent.long() - 1


def packed_adjacency(n: int, u: Tensor, v: Tensor, closed: bool = False) -> Tensor:
    """``(n, words_for(n))`` packed adjacency of the graph with edges ``u, v`` (each edge once);
    ``closed`` also sets each vertex's own bit."""
    w = words_for(n)
    src, dst = torch.cat([u, v]), torch.cat([v, u])
    if closed:
        diagonal = torch.arange(n, device=u.device)
        src, dst = torch.cat([src, diagonal]), torch.cat([dst, diagonal])
    out = torch.zeros(n * w, dtype=torch.int64, device=u.device)
    # distinct bits of one word add without carries, so the sum is their OR
    out.index_add_(0, src * w + dst // WORD, torch.ones_like(dst) << (dst % WORD))
    return out.view(n, w)


def spanning_triangles(n: int, u: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Triangles whose boundaries span the boundaries of all triangles of the graph (edges ``u < v``, sorted
    row-major), as three edge indices each; usually a small fraction of all triangles.

    Vertices are ordered by decreasing degree. The lexicographic Morse matching pairs a triangle ``{a < b < c}``
    with the tetrahedron ``{d, a, b, c}`` when some common neighbour ``d < a`` exists, and then, since the
    tetrahedron's boundary is a cycle, the triangle's boundary is the sum of the boundaries of its three other
    faces, whose smallest vertex ``d`` is smaller. By induction on the smallest vertex, the triangles with no
    such ``d`` span every boundary (over any coefficients). For the top edge ``{b, c}`` these are the apexes
    ``a`` in ``S = N(b) & N(c) & [0, b)`` with no neighbour in ``S`` below them; a greedy pass over ``S``
    (take the lowest apex, drop it and its neighbours) returns them, and possibly a few more, with bit-packed
    tensor operations over all edges at once.

    Example:
        >>> import torch
        >>> u, v = torch.tensor([0, 0, 0, 1, 1, 2]), torch.tensor([1, 2, 3, 2, 3, 3])  # a tetrahedron's edges
        >>> a, b, c = spanning_triangles(4, u, v)
        >>> a.numel()  # of its four triangles, three span the boundaries
        3
    """
    device = u.device
    m = u.numel()
    empty = torch.zeros(0, dtype=torch.long, device=device)
    if m < 3:
        return empty, empty, empty
    degree = torch.bincount(u, minlength=n) + torch.bincount(v, minlength=n)
    order = torch.argsort(degree, descending=True, stable=True)
    relabel = torch.empty_like(order)
    relabel[order] = torch.arange(n, device=device)
    ru, rv = relabel[u], relabel[v]
    lo, hi = torch.minimum(ru, rv), torch.maximum(ru, rv)
    keys, edge_of = torch.sort(lo * n + hi)  # edge_of: sorted position -> input edge index
    lo, hi = keys // n, keys % n
    closed = packed_adjacency(n, lo, hi, closed=True)
    w = closed.shape[1]
    word_index = torch.arange(w, device=device)
    apexes: list[Tensor] = []
    tops: list[Tensor] = []
    chunk = max(1, (1 << 22) // w)  # ~32 MB of candidate rows at a time
    for start in range(0, m, chunk):
        top = torch.arange(start, min(start + chunk, m), device=device)
        b = lo[top]
        below = torch.where(word_index[None, :] < (b // WORD)[:, None], -1, 0)
        below |= torch.where(
            word_index[None, :] == (b // WORD)[:, None], ((torch.ones_like(b) << (b % WORD)) - 1)[:, None], 0
        )
        candidates = closed[b] & closed[hi[top]] & below
        while True:
            live = (candidates != 0).any(dim=1)
            candidates, top = candidates[live], top[live]
            if top.numel() == 0:
                break
            apex = lowest_bits(candidates)
            apexes.append(apex)
            tops.append(top)
            candidates &= ~closed[apex]
    if not apexes:
        return empty, empty, empty
    apex, top = torch.cat(apexes), torch.cat(tops)
    side_b = torch.searchsorted(keys, apex * n + lo[top])
    side_c = torch.searchsorted(keys, apex * n + hi[top])
    return edge_of[top], edge_of[side_b], edge_of[side_c]
