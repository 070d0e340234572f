"""Edge flips that provably leave b0 and b1 of a flag complex alone: the link condition of Mayer-Vietoris.

Adding an edge ``e = {u, v}`` to a flag complex ``K`` adds its star ``S`` (``e`` joined with its link ``L``, the
clique complex of the common neighbours of ``u`` and ``v``), and ``K`` meets ``S`` in the suspension of ``L``.
``S`` is a cone, so the reduced Mayer-Vietoris sequence reads, over any field,

    H1(susp L) -> H1(K) -> H1(K + e) -> H~0(susp L) -> H~0(K) -> H~0(K + e) -> 0,

and ``H1(susp L) = H~0(L)``. When ``L`` is non-empty and connected, both outer groups vanish: ``K`` and ``K + e``
have the same b1, and the same components (``u`` and ``v`` already share a neighbour). Removing ``e`` is the same
step read backwards. A sequence of flips, each with a non-empty connected link *in the graph of its moment*,
therefore keeps every component's b0 and b1, and the engine keeps its cached modules. An empty or disconnected
link can change b1 by an amount that only the whole module knows (whether a loop through ``u`` and ``v`` bounds),
so the caller recomputes those modules.
"""

from __future__ import annotations

import torch
from torch import Tensor

from topo_callbacks.engine.graph import WORD, unpack_bits

__all__ = ["flips_keep_betti", "packed_pairs"]


def packed_pairs(words: Tensor, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The set bits of a packed ``(r, w)`` matrix as ``(row, column)``, row-major; ``rows`` renames the rows.

    Reads only the nonzero words, so a sparse matrix (the edges an edit changed) costs what it holds.

    Example:
        >>> import torch
        >>> r, c = packed_pairs(torch.tensor([[0, 5], [2, 0]]))  # bits 64 and 66 of row 0, bit 1 of row 1
        >>> r.tolist(), c.tolist()
        ([0, 0, 1], [64, 66, 1])
    """
    r, w = torch.nonzero(words, as_tuple=True)
    bits = unpack_bits(words[r, w][:, None], WORD)
    k, b = torch.nonzero(bits, as_tuple=True)
    row = r[k] if rows is None else rows[r[k]]
    return row, w[k] * WORD + b


class _HostRows:
    """Adjacency rows as Python ints (bit ``j`` = neighbour ``j``), read from a host copy of the packed words on
    first use and then edited in place by the flips."""

    def __init__(self, bits: Tensor, needed: Tensor | None) -> None:
        if needed is None:  # a zero-copy view of CPU words: rows are converted only when a link reaches them
            self._host = bits.contiguous().numpy()
            self._index: dict[int, int] | None = None
        else:  # only the rows a flip can read cross to the host
            self._host = bits[needed].cpu().numpy()
            self._index = {int(v): i for i, v in enumerate(needed.tolist())}
        self._rows: dict[int, int] = {}

    def __getitem__(self, vertex: int) -> int:
        row = self._rows.get(vertex)
        if row is None:
            i = vertex if self._index is None else self._index[vertex]
            row = int.from_bytes(self._host[i].astype("<i8", copy=False).tobytes(), "little")
            self._rows[vertex] = row
        return row

    def flip(self, u: int, v: int) -> None:
        self._rows[u] = self[u] ^ (1 << v)
        self._rows[v] = self[v] ^ (1 << u)


def _connected(vertices: int, rows: _HostRows) -> bool:
    """Whether the graph induced on the non-empty bit set ``vertices`` is connected: a breadth-first search that
    stops as soon as everything is reached (in a thick link, after one or two rows)."""
    seen = frontier = vertices & -vertices
    while frontier:
        grown = seen
        while frontier:
            low = frontier & -frontier
            grown |= rows[low.bit_length() - 1] & vertices
            if grown == vertices:
                return True
            frontier ^= low
        frontier = grown & ~seen
        seen = grown
    return seen == vertices


def flips_keep_betti(bits: Tensor, u: Tensor, v: Tensor, *, copy_rows: bool | None = None) -> bool:
    """Whether toggling the edges ``{u[i], v[i]}`` of a flag complex keeps b0, b1 and the components.

    The removals are applied first, then the additions, each in the given order; the answer is True when every
    flip's link (common neighbours at that moment) is non-empty and connected (see the module docstring), which
    is sufficient, not necessary: False means "recompute", not "b1 changed".

    Args:
        bits: the packed adjacency (`engine.graph.pack_bits` rows, no self-loops) before any flip.
        u, v: the flipped vertex pairs, each once; a pair whose bit is set in ``bits`` is a removal.
        copy_rows: copy to the host only the rows a flip can read (the flips' ends and their neighbours) instead
            of reading the words in place; default: when ``bits`` are not on the CPU.

    Example:
        >>> import torch
        >>> from topo_callbacks.engine.graph import packed_adjacency
        >>> square = packed_adjacency(4, torch.tensor([0, 1, 2, 3]), torch.tensor([1, 2, 3, 0]))  # 0-1-2-3-0
        >>> diagonal = torch.tensor([0]), torch.tensor([2])
        >>> flips_keep_betti(square, *diagonal)  # its link {1, 3} is disconnected: the diagonal fills the loop
        False
        >>> filled = packed_adjacency(4, torch.tensor([0, 1, 2, 3, 1]), torch.tensor([1, 2, 3, 0, 3]))
        >>> flips_keep_betti(filled, *diagonal)  # now the link is the edge 1-3: the second diagonal changes nothing
        True
    """
    if u.numel() == 0:
        return True
    removed = ((bits[u, v // WORD] >> (v % WORD)) & 1).bool()
    order = torch.argsort((~removed).to(torch.uint8), stable=True)  # removals first, then additions
    u, v = u[order], v[order]
    needed = None
    if bits.device.type != "cpu" if copy_rows is None else copy_rows:
        # a link lies in the old neighbourhood of the flips' ends, or among the ends
        ends = torch.unique(torch.cat([u, v]))
        near = unpack_bits(bits[ends], bits.shape[0]).any(dim=0)  # columns past the rows are never set
        near[ends] = True
        needed = torch.nonzero(near).flatten()
    rows = _HostRows(bits, needed)
    for a, b in zip(u.tolist(), v.tolist(), strict=True):
        link = rows[a] & rows[b]
        if not link or not _connected(link, rows):
            return False
        rows.flip(a, b)
    return True
