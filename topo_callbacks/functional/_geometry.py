"""The ``n x n`` picture of a batch that a collapse check reads, built without a float64 copy of wide rows.

A check needs, of its ``n`` rows of width ``d``: the pairwise distances of the (L2-normalised) rows, for the minimum
spanning tree, the scale and the Betti numbers; for ``d > n`` the two spectra of the rows (centred and not), which
live in an ``n x n`` Gram matrix; and a few column statistics. All of them come from one pass over chunks of
`GRAM_CHUNK` columns: each chunk is normalised and centred in float64 (``n x GRAM_CHUNK`` at a time, in buffers
reused across chunks), its column statistics are taken, and it is added to one Gram matrix of the centred rows, in
float64 products when that is cheap (`wants_float64`) and otherwise in float32 products of a chunk summed in
float64 (as `topo_callbacks.engine.graph.chunked_gram` does). Only ``n x n`` matrices are ever float64.

Exactness: every squared distance read from the Gram matrix comes with a rigorous bound on its error
(`bound_factor`), and wherever a decision or a value depends on the exact float64 distance (which rows are
duplicates, which pairs are within eps, which pair is the scale quantile, the length of each tree edge) the pairs
whose bound leaves it open are recomputed from the float64 differences of the rows as `topology_rows` gives them.
Pairs small against the norms from the centre (tight clusters, low-rank clouds), whose Gram value is not precise to
~1e-5, get a Gram matrix of their own cluster, centred on it, or the whole matrix is summed from float64 products.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import Tensor

from topo_callbacks.engine.graph import GRAM_CHUNK
from topo_callbacks.engine.primitives import components_from_tree

__all__ = [
    "FLOAT64_FMAS",
    "PRECISE_SHARE",
    "BatchGeometry",
    "PairDistances",
    "bound_factor",
    "row_norms",
    "topology_rows_float32",
    "wants_float64",
]

#: Gram matrices of up to this many multiply-adds (``n^2 d``) are summed from float64 products.
FLOAT64_FMAS = 1 << 31
#: ``n <= FLOAT64_MAX_DIM`` with ``d > n`` also takes float64 products: the spectra come from the ``n x n`` Gram
#: matrix then, and `topo_callbacks.functional.spectral` computes spectra of up to this size in float64.
FLOAT64_MAX_DIM = 512
#: A pair's squared distance from the Gram matrix is taken as precise when its error bound is at most this share of
#: it (the errors measured with float32 products summed in float64 are ~1e-3 of the bound or less: ~1e-5 relative at
#: worst; for spread rows the bound is ~1e-4 of the distance, the error ~1e-8).
PRECISE_SHARE = 0.01
#: Rows per upper block of a Gram matrix (the lower blocks are mirrored: a symmetric result, ~60% of the work).
_ROW_BLOCK = 256
#: float64 elements of rows per exact recomputation step (~2 MB, which the allocator reuses; larger temporaries are
#: fresh pages every time, ~3x slower on wide rows).
_EXACT_ELEMENTS = 1 << 18
#: Pairs still imprecise after the cluster Gram matrices are recomputed exactly up to this many per row; beyond
#: that they keep their (float64) bound.
_EXACT_PAIRS_PER_ROW = 16
_U32 = 2.0**-24
_U64 = 2.0**-53
_TINY = torch.finfo(torch.float64).tiny
_HASH_SEED = 0x5EED


def row_norms(x: Tensor) -> Tensor:
    """float64 L2 norms of the rows of ``x``, a block of rows at a time (the values of
    ``x.to(torch.float64).norm(dim=1)``, without the float64 copy).

    Example:
        >>> row_norms(torch.tensor([[3.0, 4.0], [0.0, 0.0]])).tolist()
        [5.0, 0.0]
    """
    n, d = x.shape
    out = torch.empty(n, dtype=torch.float64, device=x.device)
    step = max(1, _EXACT_ELEMENTS // max(d, 1))
    for r0 in range(0, n, step):
        out[r0 : r0 + step] = torch.linalg.vector_norm(x[r0 : r0 + step], dim=1, dtype=torch.float64)
    return out


def topology_rows_float32(x: Tensor, normalize: str) -> Tensor:
    """``topology_rows(x, normalize).to(torch.float32)``, normalised in float64 a block of rows at a time.

    Example:
        >>> topology_rows_float32(torch.tensor([[3.0, 4.0]]), "l2").tolist()
        [[0.6000000238418579, 0.800000011920929]]
    """
    n, d = x.shape
    if normalize != "l2":
        return x.to(torch.float32, copy=True)  # float64 rows rounded once: the same values
    out = torch.empty(n, d, dtype=torch.float32, device=x.device)
    step = max(1, _EXACT_ELEMENTS // max(d, 1))
    buffer = torch.empty(min(step, n) * d, dtype=torch.float64, device=x.device)
    for r0 in range(0, n, step):
        block = x[r0 : r0 + step]
        norms = torch.linalg.vector_norm(block, dim=1, keepdim=True, dtype=torch.float64).clamp_min_(_TINY)
        out[r0 : r0 + step] = torch.div(block, norms, out=buffer[: block.numel()].view(block.shape))
    return out


def wants_float64(n: int, d: int) -> bool:
    """Whether the Gram matrix of ``n`` rows of width ``d`` is summed from float64 products: when it is cheap
    (``n^2 d <= FLOAT64_FMAS``) or when the spectra come from it and are small (``d > n``, ``n <= 512``).

    Example:
        >>> wants_float64(1024, 768), wants_float64(512, 20000), wants_float64(1024, 20000)
        (True, True, False)
    """
    return n * n * d <= FLOAT64_FMAS or (d > n and n <= FLOAT64_MAX_DIM)


def bound_factor(d: int, precise: bool) -> float:
    """``kappa``: ``|d2 - exact| <= kappa (s_i + s_j)^2`` for ``d2 = G_ii + G_jj - 2 G_ij`` of a Gram matrix of
    centred rows of width ``d`` (``s`` their norms, inflated by 1% for the diagonal's own error).

    As `topo_callbacks.engine.graph._gram_tolerance`: rounding the centred rows to the product dtype moves a
    distance of at most ``s_i + s_j`` by ``(2 u + u^2) (s_i + s_j)^2``; the products cost ``gamma`` of a chunk in
    float32 (of ``d`` in float64), for any summation order (Cauchy-Schwarz over the chunks); the float64 sums across
    chunks and the final ``G_ii + G_jj - 2 G_ij`` a few float64 units. Everything doubled.

    Example:
        >>> f"{bound_factor(20000, precise=False):.1e}", f"{bound_factor(768, precise=True):.1e}"  # ~chunk u32, ~d u64
        ('6.2e-05', '1.7e-13')
    """
    chunks = d // GRAM_CHUNK + 8
    if precise:
        gamma = (d + 4) * _U64 / (1.0 - (d + 4) * _U64)
        return 2.0 * (gamma + (chunks + 4) * _U64)
    c = min(d, GRAM_CHUNK) + 4
    gamma = c * _U32 / (1.0 - c * _U32)
    return 2.0 * (gamma + 2.0 * _U32 + _U32 * _U32 + chunks * _U64)


class _GramSum:
    """Sums ``rows @ rows.T`` of column chunks into the upper blocks of a float64 ``(n, n)`` matrix."""

    def __init__(self, n: int, precise: bool, device: torch.device) -> None:
        self.gram = torch.zeros(n, n, dtype=torch.float64, device=device)
        self.precise = precise
        block = min(n, _ROW_BLOCK)
        self._product = None if precise else torch.empty(block * n, dtype=torch.float32, device=device)
        # the products in float64 before the sum: adding float32 to float64 would allocate that copy each time
        self._product64 = None if precise else torch.empty(block * n, dtype=torch.float64, device=device)
        self._rows32 = None if precise else torch.empty(n * GRAM_CHUNK, dtype=torch.float32, device=device)

    def add(self, rows: Tensor) -> None:
        """Add the chunk ``rows`` ``(n, c)`` (float64, centred): float64 products, or float32 ones summed in float64."""
        n, c = rows.shape
        if not self.precise:
            assert self._rows32 is not None
            rows = self._rows32[: n * c].view(n, c).copy_(rows)
        for i0 in range(0, n, _ROW_BLOCK):
            i1 = min(n, i0 + _ROW_BLOCK)
            target = self.gram[i0:i1, i0:]
            if self.precise:
                target.addmm_(rows[i0:i1], rows[i0:].T)
            else:
                assert self._product is not None
                assert self._product64 is not None
                size = (i1 - i0) * (n - i0)
                out = self._product[:size].view(i1 - i0, n - i0)
                torch.mm(rows[i0:i1], rows[i0:].T, out=out)
                target += self._product64[:size].view(i1 - i0, n - i0).copy_(out)

    def result(self) -> Tensor:
        """The symmetric matrix (upper blocks mirrored in place, the diagonal blocks from their upper triangles)."""
        g, n = self.gram, self.gram.shape[0]
        for i0 in range(0, n, _ROW_BLOCK):
            i1 = min(n, i0 + _ROW_BLOCK)
            block = g[i0:i1, i0:i1]
            block.copy_(torch.triu(block) + torch.triu(block, diagonal=1).T)
            g[i1:, i0:i1] = g[i0:i1, i1:].T
        return g


@dataclasses.dataclass
class BatchGeometry:
    """One batch as a check reads it (build with `BatchGeometry.of`).

    Attributes:
        x: the rows as given, ``(n, d)``.
        normalize: ``"l2"`` or ``"none"``: how the topology rows are scaled (`topology_rows`).
        scale: float64 ``(n,)``, the divisor of each topology row (its L2 norm, clamped; or 1).
        norms: float64 ``(n,)`` L2 norms of the rows.
        gram: float64 ``(n, n)`` symmetric Gram matrix of the centred topology rows.
        precise: whether ``gram`` was summed from float64 products.
        kappa: its error-bound factor (`bound_factor`).
        cross: float64 ``(n,)``, each centred topology row dotted with the centre (the mean topology row).
        centre_sq: the squared norm of that centre.
        std_l2: mean over columns of the std of the L2-normalised rows (`l2_normalized_std`).
        mean_cosine: mean cosine over pairs of distinct rows (`mean_cosine`).
    """

    x: Tensor
    normalize: str
    scale: Tensor
    norms: Tensor
    gram: Tensor
    precise: bool
    kappa: float
    cross: Tensor
    centre_sq: float
    std_l2: float
    mean_cosine: float

    @classmethod
    def of(cls, x: Tensor, normalize: str, *, precise: bool | None = None) -> BatchGeometry:
        """The geometry of ``x`` (checked and floating, ``n >= 1``); ``precise=None``: `wants_float64`.

        Example:
            >>> geo = BatchGeometry.of(torch.tensor([[3.0, 4.0], [0.0, 2.0]]), "l2")
            >>> round(geo.mean_cosine, 6), geo.gram.shape
            (0.8, torch.Size([2, 2]))
        """
        n, d = x.shape
        device = x.device
        norms = row_norms(x)
        l2_scale = norms.clamp_min(_TINY)[:, None]
        precise = wants_float64(n, d) if precise is None else precise
        gram = _GramSum(n, precise, device)
        cross = torch.zeros(n, dtype=torch.float64, device=device)
        unit_buffer = torch.empty(n * min(d, GRAM_CHUNK), dtype=torch.float64, device=device)
        raw_buffer = torch.empty_like(unit_buffer) if normalize != "l2" else None
        square_buffer = torch.empty_like(unit_buffer)
        ones = torch.ones(n, dtype=torch.float64, device=device)  # column sums as products: ~4x faster than sum(0)
        stds: list[Tensor] = []
        centred_sq = torch.zeros((), dtype=torch.float64, device=device)
        centre_sq = unit_centre_sq = 0.0
        for c0 in range(0, d, GRAM_CHUNK):
            part = x[:, c0 : c0 + GRAM_CHUNK]
            c = part.shape[1]
            # the L2-normalised rows, as the channels see them (copied, then divided: a mixed-dtype division would
            # allocate a float64 copy of the chunk each time, which the allocator does not reuse)
            unit = unit_buffer[: n * c].view(n, c).copy_(part).div_(l2_scale)
            # centred on the first row, then on the mean of the differences: a constant column is exactly 0 (its
            # std too, as torch's std and `l2_normalized_std` give it)
            first = unit[0].clone()
            shift = ones @ unit.sub_(first) / n
            rows = unit.sub_(shift)
            unit_centre = first.add_(shift)
            squares = ones @ torch.mul(rows, rows, out=square_buffer[: n * c].view(n, c))
            centred_sq += squares.sum()
            stds.append(squares.div_(max(n - 1, 1)).sqrt_())  # the std of each column (Bessel)
            unit_centre_sq += float(unit_centre.dot(unit_centre))
            centre = unit_centre
            if raw_buffer is not None:  # normalize="none": the topology reads the raw rows
                rows = raw_buffer[: n * c].view(n, c).copy_(part)
                centre = ones @ rows / n
                rows.sub_(centre)
            cross += rows @ centre
            centre_sq += float(centre.dot(centre))
            gram.add(rows)
        # mean cosine = (|sum u_i|^2 - sum |u_i|^2) / (n (n - 1)), with sum u_i = n centre and
        # sum |u_i|^2 = (centred squares) + n |centre|^2
        pairs = n * (n - 1)
        return cls(
            x=x,
            normalize=normalize,
            scale=l2_scale[:, 0] if normalize == "l2" else torch.ones_like(norms),
            norms=norms,
            gram=gram.result(),
            precise=precise,
            kappa=bound_factor(d, precise),
            cross=cross,
            centre_sq=centre_sq,
            std_l2=float(torch.cat(stds).mean()) if stds else 0.0,
            mean_cosine=(pairs * unit_centre_sq - float(centred_sq)) / pairs if n > 1 else 0.0,
        )

    def rows(self, index: Tensor, c0: int = 0, c1: int | None = None) -> Tensor:
        """float64 topology rows ``index`` (columns ``c0:c1``): the values `topology_rows` gives."""
        return self.x[index, c0:c1].to(torch.float64) / self.scale[index, None]

    def exact_squared(self, i: Tensor, j: Tensor) -> Tensor:
        """float64 ``sum((z_i - z_j)^2)`` of the topology rows, pair by pair from their differences (in two
        buffers of ~2 MB reused across steps)."""
        d = self.x.shape[1]
        out = torch.empty(i.numel(), dtype=torch.float64, device=self.x.device)
        step = min(max(1, _EXACT_ELEMENTS // max(d, 1)), max(i.numel(), 1))
        a = torch.empty(step * d, dtype=torch.float64, device=self.x.device)
        b = torch.empty_like(a)
        for s in range(0, i.numel(), step):
            ii, jj = i[s : s + step], j[s : s + step]
            k = ii.numel()
            za = a[: k * d].view(k, d).copy_(self.x[ii]).div_(self.scale[ii, None])
            zb = b[: k * d].view(k, d).copy_(self.x[jj]).div_(self.scale[jj, None])
            za.sub_(zb)
            out[s : s + k] = za.mul_(za).sum(dim=1)
        return out

    def local_gram(self, rows: Tensor) -> tuple[Tensor, float]:
        """The Gram matrix of the topology rows ``rows`` centred on their own mean, and its `bound_factor`."""
        k, d = rows.numel(), self.x.shape[1]
        precise = wants_float64(k, d)
        gram = _GramSum(k, precise, self.x.device)
        for c0 in range(0, d, GRAM_CHUNK):
            z = self.rows(rows, c0, c0 + GRAM_CHUNK)
            gram.add(z.sub_(z.mean(dim=0)))
        return gram.result(), bound_factor(d, precise)

    def raw_gram(self) -> Tensor:
        """float64 ``(n, n)`` Gram matrix ``x x^T`` of the rows as given, from the centred one:
        ``z_i . z_j = G_ij + c_i + c_j + |centre|^2``, times the norms when the topology rows are normalised."""
        g = self.gram + self.cross[:, None]
        g += self.cross[None, :] + self.centre_sq
        if self.normalize == "l2":
            g *= self.norms[:, None]
            g *= self.norms[None, :]
        return g

    def distances(self) -> PairDistances:
        """The squared distances of the distinct topology rows (`PairDistances`), duplicates dropped."""
        d2, bound = _distances_from_gram(self.gram, self.kappa)
        n = d2.shape[0]
        upper = torch.ones(n, n, dtype=torch.bool, device=d2.device).triu_(1)
        keep = torch.arange(n, device=d2.device)
        widest = float(bound.max()) if n else 0.0
        i, j = _pairs(upper & (d2 <= widest))
        close = d2[i, j] <= bound[i, j]
        if bool(close.any()):
            suspects = _members(n, i[close], j[close])
            duplicate = self._duplicates(suspects)
            if bool(duplicate.any()):
                kept = torch.ones(n, dtype=torch.bool, device=d2.device)
                kept[suspects[duplicate]] = False
                keep = keep[kept]
                d2, bound = d2[kept][:, kept], bound[kept][:, kept]
                upper = upper[kept][:, kept]
        return PairDistances(self, keep, d2, bound, upper)

    def _duplicates(self, rows: Tensor) -> Tensor:
        """Bool per row of ``rows``: equal (as float64 values) to an earlier row of ``rows``, as `torch.unique`
        would merge them. Rows are grouped by two exact hashes of their bits (wrapping integer sums: the same for
        equal rows in any order), then each compared with the first row of its group, value by value."""
        k, d = rows.numel(), self.x.shape[1]
        g = torch.Generator(device="cpu").manual_seed(_HASH_SEED)
        mult = (torch.randint(-(2**62), 2**62, (2, d), generator=g, dtype=torch.int64) | 1).to(self.x.device)
        hashes = torch.zeros(k, 2, dtype=torch.int64, device=self.x.device)
        step = max(1, _EXACT_ELEMENTS // max(k, 1))
        for c0 in range(0, d, step):
            bits = (self.rows(rows, c0, c0 + step) + 0.0).view(torch.int64)  # + 0.0: -0.0 hashes as 0.0
            for h in range(2):
                hashes[:, h] += (bits * mult[h, c0 : c0 + step]).sum(dim=1)
        _, group = torch.unique(hashes, dim=0, return_inverse=True)
        order = torch.arange(k, device=rows.device)
        first = torch.full((k,), k, dtype=torch.long, device=rows.device)
        first.scatter_reduce_(0, group, order, reduce="amin")
        rep = first[group]
        equal = rep != order
        for c0 in range(0, d, step):
            if not bool(equal.any()):
                break
            equal &= (self.rows(rows, c0, c0 + step) == self.rows(rows[rep], c0, c0 + step)).all(dim=1)
        return equal


@dataclasses.dataclass
class PairDistances:
    """Squared distances of the distinct rows ``keep`` of a `BatchGeometry`, with rigorous error bounds.

    ``d2`` and ``bound`` are float64 ``(m, m)``; a pair recomputed from its differences has bound 0 (and keeps its
    exact value). ``upper``: the pairs ``i < j``.
    """

    geo: BatchGeometry
    keep: Tensor
    d2: Tensor
    bound: Tensor
    upper: Tensor

    @property
    def widest(self) -> float:
        return float(self.bound.max()) if self.bound.numel() else 0.0

    def make_exact(self, i: Tensor, j: Tensor) -> Tensor:
        """Recompute the pairs ``(i, j)`` (indices into ``keep``) exactly, in place; returns their values."""
        todo = self.bound[i, j] > 0
        if bool(todo.any()):
            ii, jj = i[todo], j[todo]
            exact = self.geo.exact_squared(self.keep[ii], self.keep[jj])
            self.d2[ii, jj] = self.d2[jj, ii] = exact
            self.bound[ii, jj] = self.bound[jj, ii] = 0.0
        return self.d2[i, j]

    def refine(self) -> bool:
        """Make the squared distances that are small against their bound precise (`PRECISE_SHARE`), in place.

        Such pairs (tight clusters, low-rank clouds: distances small against the norms from the centre) are grouped
        into the connected components of the graph they form; each component gets a Gram matrix of its own rows,
        centred on them, which resolves its distances, and so on for clusters within clusters. Returns False when
        one component holds most of the batch and the products were float32: the caller then sums the whole Gram
        matrix from float64 products. With float64 products the pairs left are recomputed from their differences
        (up to `_EXACT_PAIRS_PER_ROW` per row; beyond, they keep their float64 bound).
        """
        m = self.keep.numel()
        for _ in range(4):
            i, j = self._loose()
            if i.numel() == 0:
                return True
            labels = components_from_tree(m, i, j)
            members = _members(m, i, j)
            roots, sizes = torch.unique(labels[members], return_counts=True)
            if 2 * int(sizes.max()) > m:  # most of the batch: centring on it is about what the Gram matrix did
                if not self.geo.precise:
                    return False
                break
            for root in roots.tolist():
                local = members[labels[members] == root]
                gram, kappa = self.geo.local_gram(self.keep[local])
                d2, bound = _distances_from_gram(gram, kappa)
                exact = self.bound[local[:, None], local[None, :]] == 0
                self.d2[local[:, None], local[None, :]] = torch.where(exact, self.d2[local][:, local], d2)
                self.bound[local[:, None], local[None, :]] = torch.where(exact, 0.0, bound)
        i, j = self._loose()
        if i.numel() <= _EXACT_PAIRS_PER_ROW * m:
            self.make_exact(i, j)
        return True

    def _loose(self) -> tuple[Tensor, Tensor]:
        """The pairs ``i < j`` whose bound exceeds `PRECISE_SHARE` of their squared distance."""
        i, j = _pairs(self.upper & (self.d2 < self.widest / PRECISE_SHARE))
        loose = self.bound[i, j] > PRECISE_SHARE * self.d2[i, j]
        return i[loose], j[loose]

    def tree(self) -> Tensor:
        """The minimum spanning tree's edge lengths, ascending: the tree of the Gram distances (after `refine`
        precise to ~1e-5 relative or better), its edges then recomputed exactly (``m`` pairs)."""
        if self.keep.numel() < 2:
            return torch.zeros(0, dtype=torch.float64, device=self.d2.device)
        u, v = _spanning_tree(self.d2)
        return torch.sort(self.make_exact(u, v).clamp_min(0.0).sqrt()).values

    def quantile(self, k: int) -> float:
        """The ``k``-th smallest (0-based) exact squared distance over the pairs ``i < j``.

        It lies within the widest bound ``W`` of the ``k``-th smallest Gram value ``a``, so every pair below
        ``a - 2W`` is below it and every pair above ``a + 2W`` above it. Among the pairs between, those whose own
        bound separates them from the ``k``-th of the lower (upper) bounds are counted (dropped), and only the
        others are recomputed (and kept exact).
        """
        values = self.d2[self.upper]
        a = float(values.kthvalue(k + 1).values)
        w = self.widest
        below = int((values < a - 2.0 * w).sum())
        del values
        i, j = _pairs(self.upper & (self.d2 >= a - 2.0 * w) & (self.d2 <= a + 2.0 * w))
        rank = k - below
        value, err = self.d2[i, j], self.bound[i, j]
        low = float((value - err).kthvalue(rank + 1).values)
        high = float((value + err).kthvalue(rank + 1).values)
        certain = value + err < low
        near = ~certain & (value - err <= high)
        exact = self.make_exact(i[near], j[near])
        return float(exact.kthvalue(rank - int(certain.sum()) + 1).values)

    def maximum(self) -> float:
        """The largest exact squared distance (only the pairs that may reach it are recomputed)."""
        a, w = float(self.d2.max()), self.widest
        i, j = _pairs(self.upper & (self.d2 >= a - 2.0 * w))
        value, err = self.d2[i, j], self.bound[i, j]
        near = value + err >= float((value - err).max())
        return float(self.make_exact(i[near], j[near]).max())

    def within(self, eps: float) -> tuple[Tensor, Tensor]:
        """The pairs ``i < j`` whose exact distance is at most ``eps`` (``sqrt`` of the exact float64 squared
        distance ``<= eps``, as a distance matrix compares), recomputing those whose bound reaches ``eps**2``."""
        eps2 = eps * eps
        slack = 8.0 * _U64 * eps2  # rounding of eps**2 and of sqrt: those pairs are recomputed too
        w = self.widest + slack
        i, j = _pairs(self.upper & (self.d2 >= eps2 - w) & (self.d2 <= eps2 + w))
        near = (self.d2[i, j] - eps2).abs() <= self.bound[i, j] + slack
        self.make_exact(i[near], j[near])
        i, j = _pairs(self.upper & (self.d2 <= eps2 + w))
        edge = self.d2[i, j].clamp_min(0.0).sqrt() <= eps
        return i[edge], j[edge]


def _members(n: int, i: Tensor, j: Tensor) -> Tensor:
    """The vertices (ascending) that the pairs ``(i, j)`` touch, by flags rather than a sort of all the pairs."""
    flag = torch.zeros(n, dtype=torch.bool, device=i.device)
    flag[i] = True
    flag[j] = True
    return torch.nonzero(flag).flatten()


def _pairs(mask: Tensor) -> tuple[Tensor, Tensor]:
    i, j = torch.nonzero(mask, as_tuple=True)
    return i, j


def _distances_from_gram(gram: Tensor, kappa: float) -> tuple[Tensor, Tensor]:
    """``G_ii + G_jj - 2 G_ij`` and ``kappa (s_i + s_j)^2`` (``s`` = 1.01 sqrt of the diagonal), zero diagonals."""
    diag = gram.diagonal()
    d2 = torch.mul(gram, -2.0)
    d2 += diag[:, None]
    d2 += diag[None, :]
    d2.fill_diagonal_(0.0)
    s = diag.clamp_min(0.0).sqrt() * 1.01
    bound = s[:, None] + s[None, :]
    bound.square_().mul_(kappa).fill_diagonal_(0.0)
    return d2, bound


def _spanning_tree(d2: Tensor) -> tuple[Tensor, Tensor]:
    """The edges ``(u, v)`` of a minimum spanning tree of the complete graph with squared lengths ``d2``.

    On the CPU Prim's algorithm over numpy rows (O(n^2) with no ``n x n`` temporary); elsewhere Borůvka on the
    device (`topology._minimum_spanning_tree`). Every minimum spanning tree has the same sorted edge lengths.
    """
    if d2.device.type != "cpu":
        from topo_callbacks.functional.topology import _minimum_spanning_tree

        _, tree_u, tree_v = _minimum_spanning_tree(d2.clamp_min(0.0).sqrt())
        return tree_u, tree_v
    dist = d2.numpy()
    m = dist.shape[0]
    best = dist[0].copy()
    parent = np.zeros(m, dtype=np.int64)
    done = np.zeros(m, dtype=bool)
    done[0] = True
    best[0] = np.inf
    u = np.empty(m - 1, dtype=np.int64)
    v = np.empty(m - 1, dtype=np.int64)
    for k in range(m - 1):
        j = int(np.argmin(best))
        u[k], v[k] = parent[j], j
        done[j] = True
        best[j] = np.inf
        closer = dist[j] < best
        closer &= ~done
        best[closer] = dist[j][closer]
        parent[closer] = j
    return torch.from_numpy(u), torch.from_numpy(v)
