"""The eps-graph as tensors: exact neighbour rows, bit-packed adjacency, the lexicographic Morse matching.

Everything here is a tensor operation on the points' device; no Python loop runs per vertex or per edge.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from topo_callbacks.engine.primitives import squared_distances

WORD = 64  # bits per adjacency word (int64)

# rows of the exact refinement done per block: bounds its float64 temporaries to ~32 MB
_EXACT_BLOCK_ELEMENTS = 1 << 22
# pairs recomputed from their differences per block: ~2 MB of float64 rows, which the allocator reuses (larger
# temporaries are fresh pages from the system each time, ~3x slower on wide rows)
_EXACT_PAIR_ELEMENTS = 1 << 18


def words_for(n: int) -> int:
    """Number of int64 words that hold ``n`` bits."""
    return (n + WORD - 1) // WORD


def pack_bits(mask: Tensor) -> Tensor:
    """``(r, m)`` bool -> ``(r, words_for(m))`` int64, bit ``j % 64`` of word ``j // 64`` is ``mask[:, j]``.

    Built byte by byte and viewed as int64 (little-endian, as on x86, ARM and CUDA devices): by numpy's
    `packbits` on the CPU (~15x faster than tensor passes there), by tensor passes elsewhere.

    Example:
        >>> import torch
        >>> pack_bits(torch.tensor([[True, False, True]])).tolist()
        [[5]]
    """
    r, m = mask.shape
    w = words_for(m)
    if r == 0 or w == 0:
        return torch.zeros(r, w, dtype=torch.int64, device=mask.device)
    if mask.device.type != "cpu":
        return _pack_bits_by_tensors(mask)
    out = np.zeros((r, w * 8), dtype=np.uint8)
    packed = np.packbits(mask.numpy(), axis=1, bitorder="little")
    out[:, : packed.shape[1]] = packed
    return torch.from_numpy(out).view(torch.int64)


def _pack_bits_by_tensors(mask: Tensor) -> Tensor:
    r, m = mask.shape
    w = words_for(m)
    padded = torch.zeros(r, w * WORD, dtype=torch.uint8, device=mask.device)
    padded[:, :m] = mask
    bytes_ = padded.view(r, w * 8, 8)
    out = torch.zeros(r, w * 8, dtype=torch.uint8, device=mask.device)
    for k in range(8):
        out |= bytes_[:, :, k] << k
    return out.view(torch.int64)


def unpack_bits(words: Tensor, m: int) -> Tensor:
    """Inverse of `pack_bits`: ``(r, w)`` int64 -> ``(r, m)`` bool (``m <= 64 w``), by numpy's `unpackbits` on
    the CPU and a 256-entry byte table elsewhere."""
    if words.numel() == 0:
        return torch.zeros(words.shape[0], m, dtype=torch.bool, device=words.device)
    if words.device.type != "cpu":
        return _unpack_bits_by_tensors(words, m)
    bits = np.unpackbits(words.contiguous().view(torch.uint8).numpy(), axis=1, count=m, bitorder="little")
    return torch.from_numpy(bits).view(torch.bool)


def _unpack_bits_by_tensors(words: Tensor, m: int) -> Tensor:
    table = ((torch.arange(256, device=words.device)[:, None] >> torch.arange(8, device=words.device)) & 1).bool()
    bytes_ = words.contiguous().view(torch.uint8).long()
    return table[bytes_].view(words.shape[0], -1)[:, :m]


def popcount(words: Tensor) -> int:
    """Number of set bits in an int64 tensor."""
    table = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64, device=words.device)
    return int(table[words.contiguous().view(torch.uint8).long()].sum())


#: Columns per float32 product of a Gram matrix (`chunked_gram`): the partial products are summed in float64, so
#: the rounding error of a dot product grows with this length instead of with the row width ``d`` (by Cauchy-Schwarz
#: over the chunks), and the band of pairs that a wide Gram matrix cannot decide is about ``d / GRAM_CHUNK`` times
#: narrower. Within a few percent of one float32 product's speed on a CPU.
GRAM_CHUNK = 512

# Decided pairs of `neighbour_mask` recomputed exactly past this many per row and column of a block: a float64 Gram
# matrix of the undecided rows first (tight clusters, low-rank clouds: pairs small against the norms)
_FLOAT64_GRAM_AFTER = 8


def chunked_gram(a: Tensor, b: Tensor, chunk: int = GRAM_CHUNK) -> Tensor:
    """``a @ b.T`` in float64 for rows of one floating dtype: products over ``chunk`` columns at a time in that
    dtype, summed in float64. For float32 rows each entry is off by at most ``gamma_chunk |a_i| |b_j|`` (plus
    float64 roundings), for any summation order inside the products.

    Example:
        >>> import torch
        >>> chunked_gram(torch.ones(2, 3), torch.ones(1, 3), chunk=2)
        tensor([[3.],
                [3.]], dtype=torch.float64)
    """
    d = a.shape[1]
    if d <= chunk:
        return (a @ b.T).to(torch.float64)
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
    # both reused across chunks: adding the product to float64 directly would allocate a float64 copy each time
    product = torch.empty(a.shape[0], b.shape[0], dtype=a.dtype, device=a.device)
    product64 = torch.empty_like(out)
    for c0 in range(0, d, chunk):
        out += product64.copy_(torch.mm(a[:, c0 : c0 + chunk], b[:, c0 : c0 + chunk].T, out=product))
    return out


def chunked_squares(a: Tensor, chunk: int = GRAM_CHUNK) -> Tensor:
    """Squared norms of the rows of ``a`` in float64, summed like `chunked_gram` (the same error bound).

    Example:
        >>> import torch
        >>> chunked_squares(torch.tensor([[3.0, 4.0, 12.0]]), chunk=2)
        tensor([169.], dtype=torch.float64)
    """
    out = torch.zeros(a.shape[0], dtype=torch.float64, device=a.device)
    for c0 in range(0, max(a.shape[1], 1), chunk):
        part = a[:, c0 : c0 + chunk]
        out += (part * part).sum(dim=1)
    return out


@dataclass(frozen=True)
class CentredRows:
    """Rows prepared for `neighbour_mask`: float32 copies centred on a common point, their squared norms (float64),
    the rows as given (the exact refinement reads those) and the centre."""

    values: Tensor
    squares: Tensor
    source: Tensor
    centre: Tensor

    def __getitem__(self, index: slice) -> CentredRows:
        return CentredRows(self.values[index], self.squares[index], self.source[index], self.centre)


def centre_rows(x: Tensor, center: Tensor | None = None) -> CentredRows:
    """Prepare ``x`` ``(n, d)`` for `neighbour_mask`: ``x - center`` (default: the mean row) in float32.
    Any common centre keeps the distances, and small norms make the Gram error bound tight. Rows stored in float32
    or less are centred in float32 (one rounding per entry, which the bound allows for), without a float64 copy."""
    if x.dtype == torch.float64:
        centre = x.mean(dim=0, keepdim=True) if center is None else center.to(torch.float64)
        values = (x - centre).float()
    else:
        x32 = x.float()
        centre = x32.mean(dim=0, keepdim=True) if center is None else center.to(torch.float32)
        values = x32 - centre
    return CentredRows(values, chunked_squares(values), x, centre)


def _gram_tolerance(norm_sum: Tensor | float, d: int, eps: float) -> Tensor | float:
    """Rigorous bound on ``|d2 - ||a - b||^2|`` near ``eps`` for the Gram value ``d2`` (`chunked_gram`, float32
    products) of a pair whose centred float32 norms add up to ``norm_sum`` (S).

    - Rounding the centred rows to float32 perturbs each by at most ``u`` times its norm, so near ``eps`` the
      squared distance moves by at most ``2 eps u S + u^2 S^2``.
    - The norms and the dot product, float32 products of at most ``GRAM_CHUNK`` terms summed in float64, then
      ``sa + sb - 2 ab``: at most ``gamma_(c+2)`` (float32, ``c = min(d, GRAM_CHUNK)``) plus ``gamma_(d/c+4)``
      (float64) times ``sa + sb + 2 |a| |b| = S^2``, for any summation order (Cauchy-Schwarz over the chunks).
    - Comparing with ``eps^2`` rounded: ``4 u eps^2``.

    Everything is doubled, and the norms are inflated, for safety.
    """
    u = 2.0**-24 * 1.01
    c = min(d, GRAM_CHUNK)
    gamma = (c + 4) * u / (1.0 - (c + 4) * u) + (d // GRAM_CHUNK + 6) * 2.0**-52
    s = norm_sum * 1.01
    return 2.0 * ((gamma + u * u) * s * s + 2.0 * eps * u * s + 4.0 * u * eps * eps)


def neighbour_mask(a: CentredRows, b: CentredRows, eps: float) -> Tensor:
    """``(k, m)`` bool: ``||a_i - b_j|| <= eps`` for rows prepared by `centre_rows` on one centre, decided exactly
    in float64 from the rows as given.

    A Gram matrix of float32 products summed in float64 (`chunked_gram`) decides every pair outside a rigorous error
    band around ``eps**2`` (`_gram_tolerance`: first the bound for the largest norms, then each candidate's own,
    which is much narrower when norms differ or ``eps`` is small against them). When many pairs are left (pairs
    small against the norms: tight clusters, low-rank clouds), a float64 Gram matrix of their rows decides most of
    them; the pairs left are recomputed from the float64 differences.
    """
    k, m = a.values.shape[0], b.values.shape[0]
    if k == 0 or m == 0:
        return torch.zeros(k, m, dtype=torch.bool, device=a.values.device)
    d = a.values.shape[1]
    d2 = chunked_gram(a.values, b.values).mul_(-2.0).add_(a.squares[:, None]).add_(b.squares[None, :])
    norm_a, norm_b = a.squares.sqrt(), b.squares.sqrt()
    widest = float(_gram_tolerance(float(norm_a.max() + norm_b.max()), d, eps))
    eps2 = eps * eps
    mask = d2 <= eps2 - widest
    band = (d2 <= eps2 + widest) ^ mask
    i, j = torch.nonzero(band, as_tuple=True)
    del band
    if i.numel() == 0:
        return mask
    value = d2[i, j]
    del d2
    undecided = (value - eps2).abs() <= _gram_tolerance(norm_a[i] + norm_b[j], d, eps)
    mask[i, j] = value <= eps2
    i, j = i[undecided], j[undecided]
    if i.numel() > _FLOAT64_GRAM_AFTER * (k + m):
        i, j = _decide_by_float64_gram(a, b, i, j, eps, mask)
    chunk = max(1, _EXACT_PAIR_ELEMENTS // max(d, 1))
    for start in range(0, i.numel(), chunk):
        ii, jj = i[start : start + chunk], j[start : start + chunk]
        diff = a.source[ii].to(torch.float64) - b.source[jj].to(torch.float64)
        mask[ii, jj] = (diff * diff).sum(dim=1) <= eps2
    return mask


def _decide_by_float64_gram(
    a: CentredRows, b: CentredRows, i: Tensor, j: Tensor, eps: float, mask: Tensor
) -> tuple[Tensor, Tensor]:
    """Decide the pairs ``(i, j)`` from a float64 Gram matrix of their rows (as given, centred in float64 column
    chunks: no float64 copy of whole rows); returns the pairs still within its (float64) error band."""
    rows_a, ia = torch.unique(i, return_inverse=True)
    rows_b, jb = torch.unique(j, return_inverse=True)
    d = a.values.shape[1]
    centre = a.centre.to(torch.float64)
    gram = torch.zeros(rows_a.numel(), rows_b.numel(), dtype=torch.float64, device=i.device)
    sa = torch.zeros(rows_a.numel(), dtype=torch.float64, device=i.device)
    sb = torch.zeros(rows_b.numel(), dtype=torch.float64, device=i.device)
    step = max(1, _EXACT_BLOCK_ELEMENTS // max(rows_a.numel() + rows_b.numel(), 1))
    for c0 in range(0, d, step):
        ca = a.source[rows_a, c0 : c0 + step].to(torch.float64) - centre[:, c0 : c0 + step]
        cb = b.source[rows_b, c0 : c0 + step].to(torch.float64) - centre[:, c0 : c0 + step]
        gram.addmm_(ca, cb.T)
        sa += (ca * ca).sum(dim=1)
        sb += (cb * cb).sum(dim=1)
    value = sa[ia] + sb[jb] - 2.0 * gram[ia, jb]
    # `_gram_tolerance` in float64: centring rounds each row by u |row|, then sums of d terms and the comparison
    u = 2.0**-53 * 1.01
    gamma = (d + 4) * u / (1.0 - (d + 4) * u)
    s = (sa[ia].sqrt() + sb[jb].sqrt()) * 1.01
    tol = 2.0 * ((gamma + u * u) * s * s + 2.0 * eps * u * s + 4.0 * u * eps * eps)
    eps2 = eps * eps
    mask[i, j] = value <= eps2
    left = (value - eps2).abs() <= tol
    return i[left], j[left]


def neighbour_rows(a: Tensor, b: Tensor, eps: float, center: Tensor | None = None) -> Tensor:
    """``(k, m)`` bool: ``||a_i - b_j|| <= eps``, decided exactly in float64 from the given values.

    Points stored in float32 or less go through `neighbour_mask` (a float32 Gram matrix, pairs near ``eps``
    recomputed in float64), centred on ``center`` (default: the mean of ``b``; any point near the cloud keeps the
    error band narrow); float64 points use the float64 path of `squared_distances`.

    Example:
        >>> import torch
        >>> neighbour_rows(torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, 4.0], [1.0, 0.0]]), 5.0).tolist()
        [[True, True]]
    """
    if a.dtype == torch.float64 or b.dtype == torch.float64:
        return squared_distances(a, b, exact_near=eps) <= eps * eps
    if a.shape[0] == 0 or b.shape[0] == 0:
        return torch.zeros(a.shape[0], b.shape[0], dtype=torch.bool, device=a.device)
    if center is None:
        center = b.float().mean(dim=0, keepdim=True)
    return neighbour_mask(centre_rows(a, center), centre_rows(b, center), eps)


def lowest_bits(words: Tensor) -> Tensor:
    """Index of the lowest set bit of each row of a packed ``(r, w)`` tensor; -1 for a row of zeros.

    Example:
        >>> import torch
        >>> lowest_bits(torch.tensor([[0, 12], [6, 1], [0, 0]])).tolist()  # 12 = 0b1100 in the second word
        [66, 1, -1]
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


@dataclass(frozen=True)
class LexicographicMatching:
    """The lexicographic Morse matching of a flag complex's edges and triangles (see `lexicographic_matching`).

    Vertices are relabelled by decreasing degree; edges are sorted by ``key = lo * n + hi`` in the new labels.

    Attributes:
        n: number of vertices.
        keys, lo, hi: the sorted edges (``lo < hi``, new labels).
        edge_of: sorted position -> index of the edge in the input.
        relabel: input vertex -> new label.
        down: per sorted edge, the apex of the triangle it is matched with (its lowest apex below ``lo``), or -1
            for a critical edge.
        extra_top, extra_apex: the critical triangles, as their top edge (sorted position) and apex.
    """

    n: int
    keys: Tensor
    lo: Tensor
    hi: Tensor
    edge_of: Tensor
    relabel: Tensor
    down: Tensor
    extra_top: Tensor
    extra_apex: Tensor

    def edge_index(self, a: Tensor, b: Tensor) -> Tensor:
        """Sorted positions of the edges ``{a, b}`` (new labels, ``a < b``), which must exist."""
        return torch.searchsorted(self.keys, a * self.n + b)


def lexicographic_matching(n: int, u: Tensor, v: Tensor) -> LexicographicMatching:
    """The lexicographic Morse matching of the flag complex of a graph (edges ``u, v``), up to triangles.

    Vertices are ordered by decreasing degree (hubs first). A simplex ``s`` is matched with ``s + {w}`` for the
    smallest common neighbour ``w`` of ``s`` below ``min(s)``, when there is one; the matching is acyclic since
    every step of a gradient path lowers the smallest vertex. So:

    - an edge ``{b < c}`` is matched with the triangle of its lowest apex in ``S = N(b) & N(c) & [0, b)``, and is
      critical when ``S`` is empty;
    - a triangle ``{a, b, c}``, ``a`` in ``S``, is matched with a tetrahedron when some ``d`` in ``S`` below ``a``
      is adjacent to ``a``; otherwise, and when ``a`` is not the lowest apex, it is critical.

    Critical triangles are found per top edge by greedy bit-packed passes over ``S`` (take the lowest apex, drop
    it and its neighbours, keep the apex when no neighbour in ``S`` lies below it): a few tensor passes over all
    edges at once. Critical and matched triangles together span every triangle boundary (a triangle matched with
    a tetrahedron is, up to sign, the sum of that tetrahedron's other faces, whose smallest vertex is smaller).

    Example:
        >>> import torch
        >>> u, v = torch.tensor([0, 0, 0, 1, 1, 2]), torch.tensor([1, 2, 3, 2, 3, 3])  # a tetrahedron's edges
        >>> matching = lexicographic_matching(4, u, v)
        >>> int((matching.down >= 0).sum()), matching.extra_top.numel()  # 3 matched edges, no critical triangle
        (3, 0)
    """
    device = u.device
    m = u.numel()
    degree = torch.bincount(u, minlength=n) + torch.bincount(v, minlength=n)
    order = torch.argsort(degree, descending=True, stable=True)
    relabel = torch.empty_like(order)
    relabel[order] = torch.arange(n, device=device)
    ru, rv = relabel[u], relabel[v]
    lo, hi = torch.minimum(ru, rv), torch.maximum(ru, rv)
    keys, edge_of = torch.sort(lo * n + hi)
    lo, hi = (keys // n, keys % n) if m else (keys, keys)
    down = torch.full((m,), -1, dtype=torch.long, device=device)
    extra_top: list[Tensor] = []
    extra_apex: list[Tensor] = []
    closed = packed_adjacency(n, lo, hi, closed=True)
    w = closed.shape[1]
    if m:
        # An edge's apexes are neighbours of its lower end b, below b: they lie in the words from b's lowest
        # neighbour to b's own word. Edges go in buckets of equal window width (powers of two), each window
        # shifted left to fit in the row; with hubs first most windows are a few words, and on flat-degree
        # (near-planar) graphs they are ~3x narrower than the rows' prefixes up to b.
        first = torch.arange(n, device=device).scatter_reduce_(0, hi, lo, reduce="amin")  # lowest of N[y]
        start_word = first[lo] // WORD
        span = lo // WORD - start_word + 1
        width_of = torch.clamp(2 ** torch.ceil(torch.log2(span.to(torch.float64))).long(), max=w)
        start_word = torch.minimum(start_word, w - width_of)
        by_width, grouped = torch.sort(width_of, stable=True)
        bounds = torch.unique_consecutive(by_width, return_counts=True)
        group_start = 0
        for width, count in zip(bounds[0].tolist(), bounds[1].tolist(), strict=True):
            windows = closed.as_strided((n, w - width + 1, width), (w, 1, 1))  # windows[y, s] = words s..s+width
            step = max(1, (1 << 22) // width)  # ~32 MB of candidate words at a time
            for chunk_start in range(group_start, group_start + count, step):
                top = grouped[chunk_start : min(chunk_start + step, group_start + count)]
                _match_window(windows, lo, hi, top, start_word[top], down, extra_top, extra_apex)
            group_start += count
    empty = torch.zeros(0, dtype=torch.long, device=device)
    return LexicographicMatching(
        n,
        keys,
        lo,
        hi,
        edge_of,
        relabel,
        down,
        torch.cat(extra_top) if extra_top else empty,
        torch.cat(extra_apex) if extra_apex else empty,
    )


def _match_window(
    windows: Tensor,
    lo: Tensor,
    hi: Tensor,
    top: Tensor,
    start_word: Tensor,
    down: Tensor,
    extra_top: list[Tensor],
    extra_apex: list[Tensor],
) -> None:
    """The greedy passes of `lexicographic_matching` for the edges ``top``, on the words ``start_word`` onwards
    of their closed adjacency rows (``windows``): sets ``down`` and appends the critical triangles."""
    # closed neighbourhoods: `common` holds b, c and the apexes; below b, it holds exactly the apexes
    common = windows[lo[top], start_word] & windows[hi[top], start_word]
    candidates = common.clone()
    first = True
    while True:
        apex = lowest_bits(candidates)  # -1 for an emptied row
        live = apex >= 0
        apex += start_word * WORD
        live &= apex < lo[top]
        if not bool(live.all()):
            candidates, common, top, start_word, apex = (t[live] for t in (candidates, common, top, start_word, apex))
        if top.numel() == 0:
            return
        apex_rows = windows[apex, start_word]
        if first:
            down[top] = apex
            first = False
        else:  # critical iff no apex below it is its neighbour: then its lowest common bit is itself
            critical = lowest_bits(apex_rows & common) + start_word * WORD == apex
            extra_top.append(top[critical])
            extra_apex.append(apex[critical])
        candidates &= ~apex_rows
