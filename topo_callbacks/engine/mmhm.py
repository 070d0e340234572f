"""MMHM: the Vietoris-Rips complex of a point set at one fixed scale, kept exact under sparse edits.

Points live in slots of a device tensor and carry stable integer ids. The eps-graph is a boolean adjacency
matrix on the same device. An edit of k points recomputes k rows of distances (O(k n d); pairs near eps are
recomputed exactly in float64), and marks a *dirty region*: the modules (connected components of the eps-graph)
the edited points belonged to, plus the modules of their new neighbours. The region is closed: an edge leaves it
only at an edited point, and those edges' other ends are in it. `betti` relabels the region only and re-reduces
only its modules; every other module keeps its cached b1. A module's b1 over Z/p comes from the lexicographic
Morse matching of its flag complex (`engine.reduction`), after strong collapses (dominated vertices) when it is
nearly a clique.

A move dirties nothing at all when every edge it changed has a non-empty connected link at its turn
(`engine.links`): such flips keep every component and its b1, so the cost is that of the k distance rows.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from topo_callbacks._validation import all_finite, check_eps, check_prime
from topo_callbacks.engine.graph import (
    WORD,
    centre_rows,
    neighbour_mask,
    neighbour_rows,
    pack_bits,
    popcount,
    words_for,
)
from topo_callbacks.engine.links import flips_keep_betti, packed_pairs
from topo_callbacks.engine.reduction import flag_betti

__all__ = ["MMHMEngine"]

_BLOCK = 4 * WORD  # rows per distance block in `reset`: small blocks skip most of the lower triangle

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class MMHMEngine:
    """Exact Betti numbers (b0, b1) of the Vietoris-Rips complex at scale ``eps``, maintained under edits.

    Exactness: after any sequence of edits, `betti` equals what gudhi or ripser compute from scratch on the
    current points at the same ``eps``, for the points as stored (in ``dtype``): distances are decided in float64
    from the stored values, so with ``dtype=torch.float64`` the contract is the float64 one, and in lower
    precision the only differences from the float64 input come from pairs whose distance rounds across ``eps``
    when the points are stored.

    Args:
        eps: the scale (edge iff ``||x_i - x_j|| <= eps``), > 0.
        coeff: a prime p: homology with coefficients in Z/p.
        device: where points and the eps-graph live; None: the device of the first ``reset`` input.
        dtype: storage dtype of the points.
        capacity: initial number of slots (grows by doubling).

    Example:
        >>> import math, torch
        >>> t = torch.arange(12) * (2 * math.pi / 12)
        >>> engine = MMHMEngine(0.6, dtype=torch.float64)
        >>> ids = engine.reset(torch.stack([t.cos(), t.sin()], dim=1))
        >>> engine.betti()
        (1, 1)
        >>> engine.move(ids[:1], torch.tensor([[0.0, 0.0]], dtype=torch.float64))  # pull one point to the centre
        >>> engine.betti()  # that point is now alone, and the gap it left opens the loop
        (2, 0)
        >>> engine.stats()["modules_rebuilt"]  # the two modules the edit touched: the arc and the lone point
        2
    """

    def __init__(
        self,
        eps: float,
        *,
        coeff: int = 2,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        capacity: int | None = None,
    ) -> None:
        self.eps = check_eps(eps)
        self.coeff = check_prime(coeff)
        if dtype not in _DTYPES:
            raise ValueError(f"`dtype` must be one of {[str(t) for t in _DTYPES]}; got {dtype!r}.")
        if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1):
            raise ValueError(f"`capacity` must be an int >= 1 or None; got {capacity!r}.")
        self.dtype = dtype
        self.device = None if device is None else torch.device(device)
        self.capacity = capacity
        self._d: int | None = None
        self._allocate(capacity or 0, 0)
        self._next_id = 0
        self._last_rebuilt = 0
        self._graph_rebuilds = 0
        self._kept_moves = 0
        self._times: dict[str, float] = {"distances": 0.0, "links": 0.0, "components": 0.0, "reduction": 0.0}

    # ------------------------------------------------------------------ storage
    def _allocate(self, cap: int, d: int) -> None:
        device = self.device or torch.device("cpu")
        self._x = torch.zeros(cap, d, dtype=self.dtype, device=device)
        self._alive = torch.zeros(cap, dtype=torch.bool, device=device)
        self._bits = torch.zeros(cap, words_for(cap), dtype=torch.int64, device=device)  # the eps-graph
        self._labels = torch.full((cap,), -1, dtype=torch.long, device=device)
        self._dirty = torch.zeros(cap, dtype=torch.bool, device=device)
        self._slot_of: dict[int, int] = {}
        self._id_of: list[int] = [-1] * cap
        self._free: list[int] = list(range(cap - 1, -1, -1))
        self._b1: dict[int, int] = {}
        # the edges found by `_rebuild_graph` (slots u < v, row-major) until the next `betti` or edit uses or voids them
        self._fresh_edges: tuple[Tensor, Tensor] | None = None
        # the float32 centre of the last `_rebuild_graph`, reused by sparse edits: any common centre keeps the
        # distances, and one near the cloud keeps the Gram error band narrow, without a pass over all points
        self._centre: Tensor | None = None

    def _grow(self, needed: int) -> None:
        cap = self._x.shape[0]
        if len(self._free) >= needed:
            return
        new_cap = max(2 * cap, cap + needed - len(self._free), 8)
        device = self._x.device
        x = torch.zeros(new_cap, self._x.shape[1], dtype=self.dtype, device=device)
        x[:cap] = self._x
        bits = torch.zeros(new_cap, words_for(new_cap), dtype=torch.int64, device=device)
        bits[:cap, : self._bits.shape[1]] = self._bits
        alive = torch.zeros(new_cap, dtype=torch.bool, device=device)
        alive[:cap] = self._alive
        dirty = torch.zeros(new_cap, dtype=torch.bool, device=device)
        dirty[:cap] = self._dirty
        labels = torch.full((new_cap,), -1, dtype=torch.long, device=device)
        labels[:cap] = self._labels
        self._x, self._bits, self._alive, self._dirty, self._labels = x, bits, alive, dirty, labels
        self._id_of += [-1] * (new_cap - cap)
        self._free = list(range(new_cap - 1, cap - 1, -1)) + self._free

    # ------------------------------------------------------------------ checks
    def _check_points(self, x: Tensor, name: str) -> Tensor:
        if not isinstance(x, Tensor) or x.ndim != 2:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"`{name}` must be a 2-D tensor (k, d); got {shape}.")
        if self._d is not None and x.shape[0] and x.shape[1] != self._d:
            raise ValueError(f"`{name}` must have d = {self._d} columns like the engine's points; got {x.shape[1]}.")
        if not all_finite(x):
            raise ValueError(f"`{name}` holds NaN or Inf; only finite points are accepted.")
        return x.detach()  # stored in the engine's own buffers: autograd has nothing to track there

    def _check_ids(self, ids: Tensor | list[int]) -> list[int]:
        out = [int(i) for i in (ids.tolist() if isinstance(ids, Tensor) else ids)]
        if len(set(out)) != len(out):
            raise ValueError("`ids` must not repeat an id within one edit.")
        unknown = [i for i in out if i not in self._slot_of]
        if unknown:
            raise KeyError(f"unknown or removed point id(s) {unknown[:10]}.")
        return out

    # ------------------------------------------------------------------- edits
    def reset(self, x: Tensor) -> Tensor:
        """Replace all points by ``x`` ``(n, d)``; returns their new ids (int64, on the CPU)."""
        x = self._check_points(x, "x")
        if self.device is None:
            self.device = x.device
        n, d = x.shape
        start = time.perf_counter()
        self._d = d
        self._allocate(max(n, self.capacity or 0), d)
        xs = x.detach().to(device=self._x.device, dtype=self.dtype)
        self._x[:n] = xs
        self._alive[:n] = True
        self._rebuild_graph(n)
        self._dirty_all(n)
        ids = list(range(self._next_id, self._next_id + n))
        self._next_id += n
        for slot, pid in enumerate(ids):
            self._slot_of[pid] = slot
            self._id_of[slot] = pid
        self._free = list(range(self._x.shape[0] - 1, n - 1, -1))
        self._times = {"distances": time.perf_counter() - start, "links": 0.0, "components": 0.0, "reduction": 0.0}
        return torch.tensor(ids, dtype=torch.long)

    def _rebuild_graph(self, n: int) -> None:
        """Recompute the eps-graph of slots ``0..n-1``, which must be all the points.

        Upper blocks of the symmetric distance matrix only; each block's rows are packed, their edges set the
        symmetric bits below the block, and are kept for the next `betti`, which would otherwise unpack them.
        """
        xs = self._x[:n]
        self._bits[:n] = 0
        prepared = None
        if self.dtype != torch.float64 and n:
            self._centre = xs.float().mean(dim=0, keepdim=True)
            prepared = centre_rows(xs, self._centre)
        us: list[Tensor] = []
        vs: list[Tensor] = []
        for i0 in range(0, n, _BLOCK):
            i1 = min(n, i0 + _BLOCK)
            if prepared is None:
                mask = neighbour_rows(xs[i0:i1], xs[i0:], self.eps)
            else:
                mask = neighbour_mask(prepared[i0:i1], prepared[i0:], self.eps)
            w0 = i0 // WORD  # _BLOCK is a multiple of WORD, so blocks start on word boundaries
            rows = pack_bits(mask)  # both halves of the block's own square, and its upper half beyond
            self._bits[i0:i1, w0 : w0 + rows.shape[1]] = rows
            i, j = torch.nonzero(mask.triu_(1), as_tuple=True)
            i, j = i + i0, j + i0
            below = j >= i1  # the lower half: bit i of row j, from the edges (far fewer than the block's bits)
            self._flip_columns(i[below], j[below])
            us.append(i)
            vs.append(j)
        self._fresh_edges = (torch.cat(us), torch.cat(vs)) if us else None
        self._clear_self_bits(torch.arange(n, device=self._x.device))
        self._graph_rebuilds += 1

    def _dirty_all(self, n: int) -> None:
        self._dirty[:n] = True
        self._b1.clear()

    def insert(self, x_new: Tensor) -> Tensor:
        """Add points ``(k, d)``; returns their ids."""
        x_new = self._check_points(x_new, "x_new")
        if self._d is None:
            return self.reset(x_new)
        k = x_new.shape[0]
        self._grow(k)
        slots = [self._free.pop() for _ in range(k)]
        ids = list(range(self._next_id, self._next_id + k))
        self._next_id += k
        for slot, pid in zip(slots, ids, strict=True):
            self._slot_of[pid] = slot
            self._id_of[slot] = pid
        self._place(slots, x_new)
        return torch.tensor(ids, dtype=torch.long)

    def move(self, ids: Tensor | list[int], x_new: Tensor) -> None:
        """Points ``ids`` moved to ``x_new`` ``(len(ids), d)``."""
        pids = self._check_ids(ids)
        x_new = self._check_points(x_new, "x_new")
        if x_new.shape[0] != len(pids):
            raise ValueError(f"`x_new` must have one row per id: {len(pids)} ids, {x_new.shape[0]} rows.")
        self._place([self._slot_of[p] for p in pids], x_new, moved=True)

    def remove(self, ids: Tensor | list[int]) -> None:
        """Points ``ids`` are gone (their ids are not reused)."""
        pids = self._check_ids(ids)
        slots = [self._slot_of.pop(p) for p in pids]
        s = torch.tensor(slots, dtype=torch.long, device=self._x.device)
        self._fresh_edges = None
        if self._slot_of:
            self._dirty_modules(self._labels[s])
            self._flip_columns(*packed_pairs(self._bits[s], s))
            self._bits[s] = 0
        else:  # every point is gone (a stream sample replaced): no edge and no module is left
            self._bits.zero_()
            self._b1.clear()
        self._alive[s] = False
        self._dirty[s] = False
        self._labels[s] = -1
        for slot in slots:
            self._id_of[slot] = -1
        self._free.extend(slots)

    def _clear_self_bits(self, s: Tensor) -> None:
        self._bits[s, s // WORD] &= ~(torch.ones_like(s) << (s % WORD))

    def _flip_columns(self, r: Tensor, c: Tensor) -> None:
        """Flip bit ``r[i]`` of row ``c[i]``: the symmetric half of the row edits that changed pairs ``(r, c)``.

        Only the changed pairs are touched; rows that are themselves edited are overwritten afterwards.
        """
        if r.numel() == 0:
            return
        flat = self._bits.view(-1)
        words, where = torch.unique(c * self._bits.shape[1] + r // WORD, return_inverse=True)
        # distinct bits within a word (each pair is listed once per row): sums are ORs
        flips = torch.zeros(words.numel(), dtype=torch.int64, device=r.device)
        flat[words] ^= flips.index_add_(0, where, torch.ones_like(r) << (r % WORD))

    def _dirty_modules(self, labels: Tensor) -> None:
        """Add every member of the modules ``labels`` to the dirty region and drop their cached b1."""
        labels = torch.unique(labels[labels >= 0])
        if labels.numel():
            self._dirty |= torch.isin(self._labels, labels)
            for label in labels.tolist():
                self._b1.pop(int(label), None)

    def _place(self, slots: list[int], x_new: Tensor, *, moved: bool = False) -> None:
        """Store points in ``slots`` and recompute their adjacency rows; the modules of the points (when they
        ``moved``: before the move) and of their new neighbours join the region.

        An edit of at least half the points (a probe that moved as a whole, a stream sample replaced) rebuilds the
        whole eps-graph instead, when the points fill slots ``0..n-1``: the upper blocks cost no more than ``k``
        full rows, and the next `betti` then skips unpacking the region. A move whose changed edges all pass the
        link condition (`engine.links`) dirties nothing: every module keeps its b1.
        """
        if not slots:  # nothing changed: no counter moves, and edges kept for `betti` stay valid
            return
        start = time.perf_counter()
        self._times["links"] = 0.0
        self._fresh_edges = None
        s = torch.tensor(slots, dtype=torch.long, device=self._x.device)
        self._x[s] = x_new.detach().to(device=self._x.device, dtype=self.dtype)
        self._alive[s] = True
        n = int(self._alive.sum())
        if 2 * len(slots) >= n and bool(self._alive[:n].all()):
            before = self._bits[:n].clone() if moved else None
            self._rebuild_graph(n)
            if before is not None and self._flips_keep_betti(before, *packed_pairs(before ^ self._bits[:n]), None, n):
                self._fresh_edges = None  # no module to recompute: nothing would read them
            else:
                self._dirty_all(n)
        else:
            rows = neighbour_rows(self._x[s], self._x, self.eps, self._centre) & self._alive[None, :]
            rows[torch.arange(len(slots), device=s.device), s] = False
            packed = pack_bits(rows)
            r, c = packed_pairs(self._bits[s] ^ packed, s)
            kept = moved and self._flips_keep_betti(self._bits, r, c, s, n)
            if moved and not kept:
                self._dirty_modules(self._labels[s])
            self._flip_columns(r, c)
            self._bits[s] = packed
            if not kept:
                neighbours = rows.any(dim=0)
                self._dirty_modules(self._labels[neighbours])
                self._dirty[s] = True
                self._dirty |= neighbours
        self._times["distances"] = time.perf_counter() - start - self._times["links"]

    def _flips_keep_betti(self, before: Tensor, r: Tensor, c: Tensor, slots: Tensor | None, n: int) -> bool:
        """Whether the edges a move changed keep every module (`engine.links.flips_keep_betti`).

        ``r, c``: the changed pairs, listed from the rows of ``slots`` (every row when None); ``before``: the
        adjacency before the move. Each flip costs a few Python-level bit operations, so past ``64 + n // 4``
        flips the modules are recomputed instead, which is then cheaper.
        """
        start = time.perf_counter()
        listed = torch.ones(before.shape[0], dtype=torch.bool, device=r.device)
        if slots is not None:
            listed.zero_()
            listed[slots] = True
        keep = (r < c) | ~listed[c]  # a pair listed from both ends counts once
        u, v = r[keep], c[keep]
        kept = u.numel() <= 64 + n // 4 and flips_keep_betti(before, u, v)
        self._kept_moves += kept
        self._times["links"] = time.perf_counter() - start
        return kept

    # ---------------------------------------------------------------- queries
    def betti(self) -> tuple[int, int]:
        """``(b0, b1)`` of the current points; only the modules dirtied since the last call are recomputed."""
        self._last_rebuilt = 0
        self._times["components"] = self._times["reduction"] = 0.0
        if bool((self._dirty & self._alive).any()):
            self._rebuild_region()
        alive_labels = self._labels[self._alive]
        b0 = int(torch.unique(alive_labels).numel()) if alive_labels.numel() else 0
        return b0, int(sum(self._b1.values()))

    def _region_edges(self, region: Tensor) -> tuple[Tensor, Tensor]:
        """Edges ``u < v`` (local indices into ``region``, sorted row-major) of the region's induced graph."""
        cap = self._x.shape[0]
        local = torch.full((cap,), -1, dtype=torch.long, device=region.device)
        local[region] = torch.arange(region.numel(), device=region.device)
        us: list[Tensor] = []
        vs: list[Tensor] = []
        step = max(1, (1 << 24) // max(cap, 1))  # rows read at a time: at most ~16 MB of unpacked booleans
        for r0 in range(0, region.numel(), step):
            i, j = packed_pairs(self._bits[region[r0 : r0 + step]])
            i += r0
            keep = local[j] > i  # inside the region (local >= 0) and the upper triangle, as local indices
            us.append(i[keep])
            vs.append(local[j[keep]])
        return torch.cat(us), torch.cat(vs)

    def _rebuild_region(self) -> None:
        start = time.perf_counter()
        region = torch.nonzero(self._dirty & self._alive).flatten()
        self._dirty.zero_()  # every edit that dirtied these modules already dropped their cached b1
        if self._fresh_edges is not None:  # right after `_rebuild_graph`: the region is every slot 0..n-1
            u, v = self._fresh_edges
            self._fresh_edges = None
        else:
            u, v = self._region_edges(region)
        self._times["components"] = time.perf_counter() - start
        start = time.perf_counter()
        roots, b1 = flag_betti(region.numel(), u, v, self.coeff)
        self._labels[region] = region[roots]
        for slot, value in zip(region[torch.unique(roots)].tolist(), b1.tolist(), strict=True):
            self._b1[int(slot)] = int(value)
        self._last_rebuilt = b1.numel()
        self._times["reduction"] = time.perf_counter() - start

    def ids(self) -> Tensor:
        """The ids of the current points, in slot order."""
        return torch.tensor([i for i in self._id_of if i >= 0], dtype=torch.long)

    def points(self, ids: Tensor | list[int] | None = None) -> Tensor:
        """The stored points of ``ids`` (all current points, in `ids` order, when None)."""
        pids = self.ids().tolist() if ids is None else self._check_ids(ids)
        slots = torch.tensor([self._slot_of[p] for p in pids], dtype=torch.long, device=self._x.device)
        return self._x[slots]

    def stats(self) -> dict[str, Any]:
        """Points, edges, modules, modules rebuilt by the last `betti`, whole eps-graph recomputations so far
        (`reset` and edits of at least half the points), moves so far that kept every module (each changed edge
        passed the link condition), time per stage (s) of the last edit/query."""
        alive = self._alive
        labels = self._labels[alive]
        return {
            "points": int(alive.sum()),
            "edges": popcount(self._bits) // 2,
            "modules": int(torch.unique(labels).numel()) if labels.numel() else 0,
            "modules_rebuilt": self._last_rebuilt,
            "graph_rebuilds": self._graph_rebuilds,
            "kept_moves": self._kept_moves,
            "dirty_points": int((self._dirty & alive).sum()),
            "time_s": dict(self._times),
            "state_bytes": sum(
                t.numel() * t.element_size()
                for t in (self._x, self._alive, self._bits, self._labels, self._dirty, *(self._fresh_edges or ()))
                + ((self._centre,) if self._centre is not None else ())
            ),
        }
