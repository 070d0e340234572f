"""Gather captured rows from every rank: budget split before the gather, uneven and empty ranks, one padded gather."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from topo_callbacks.functional.spectral import silent_units

__all__ = [
    "broadcast_from_rank0",
    "dead_units_across_ranks",
    "gather_samples",
    "subsample_rows",
    "sum_across_ranks",
    "world_size",
]


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def subsample_rows(x: Tensor, budget: int) -> Tensor:
    """At most ``budget`` evenly spaced rows of ``x`` (first and last kept), in order.

    Example:
        >>> import torch
        >>> subsample_rows(torch.arange(5.0)[:, None], 3).flatten().tolist()
        [0.0, 2.0, 4.0]
    """
    if x.shape[0] <= budget:
        return x
    keep = torch.linspace(0, x.shape[0] - 1, budget, device=x.device).round().long()
    return x[keep]


def gather_samples(
    x: Tensor | None, max_samples: int, device: torch.device | str = "cpu", dst: int | None = None
) -> Tensor:
    """All ranks' rows concatenated in rank order, at most ``max_samples`` in total, identical on every rank.

    With ``dst`` set, only that rank receives the rows (``dist.gather``: the global sample is held by one rank);
    the others get a ``(0, d)`` tensor.

    Each rank first keeps ``ceil(max_samples / world)`` evenly spaced rows, so memory is bounded by the budget,
    not by the world size. Then the shapes are gathered, rows padded to the largest rank and gathered once, and
    the padding trimmed. A rank with nothing (``x`` None or ``(0, d)``) still takes part. Every rank must call
    this at the same point (it is a collective when a process group is initialised).

    Example:
        >>> import torch
        >>> gather_samples(torch.arange(10.0).reshape(5, 2), max_samples=3)
        tensor([[0., 1.],
                [4., 5.],
                [8., 9.]])
    """
    world = world_size()
    budget = math.ceil(max_samples / world)
    if x is not None:
        x = subsample_rows(x, budget)
        device = x.device
    if world == 1:
        return x if x is not None else torch.zeros(0, 0, device=device)
    local = torch.tensor(
        [0 if x is None else x.shape[0], 0 if x is None else x.shape[1]], dtype=torch.long, device=device
    )
    shapes = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(shapes, local)
    rows = [int(s[0]) for s in shapes]
    d = max(int(s[1]) for s in shapes)
    if d == 0 or max(rows) == 0:
        return torch.zeros(0, d, dtype=torch.float32, device=device)
    if x is None or x.shape[1] == 0:
        x = torch.zeros(0, d, dtype=torch.float32, device=device)
    padded = torch.zeros(max(rows), d, dtype=torch.float32, device=device)
    padded[: x.shape[0]] = x.to(torch.float32)
    if dst is None:
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
    else:
        receiving = dist.get_rank() == dst
        parts = [torch.empty_like(padded) for _ in range(world)] if receiving else []
        dist.gather(padded, parts if receiving else None, dst=dst)
        if not receiving:
            return torch.zeros(0, d, dtype=torch.float32, device=device)
    return torch.cat([part[:r] for part, r in zip(parts, rows, strict=False)])


def dead_units_across_ranks(
    x: Tensor | None, width: int, max_samples: int, device: torch.device | str = "cpu", failed: bool = False
) -> tuple[float, int, int]:
    """The share of the ``width`` units (columns) that are exactly 0 on every row of the sample `gather_samples` takes
    from all ranks' ``x`` (each rank's evenly spaced rows, ``max_samples`` in all), that sample's rows, and the ranks
    that could not say (``failed``, or their reduction raised), without gathering the rows: one all-reduce of
    ``width + 2`` numbers when a process group exists (on ``device``). Every rank takes part whatever happened on it,
    so a failure on one rank never leaves the others waiting. The share is
    `topo_callbacks.functional.spectral.dead_unit_fraction` of the gathered sample, to the bit. ``x`` of another
    width than ``width``, or None, adds no rows.

    Example:
        >>> import torch
        >>> dead_units_across_ranks(torch.tensor([[0.0, 1.0, 0.0], [0.0, 2.0, -3.0]]), width=3, max_samples=8)
        (0.3333333432674408, 2, 0)
    """
    world = world_size()
    silent, rows = None, 0
    if not failed and x is not None and x.ndim == 2 and x.shape[1] == width and x.shape[0] > 0:
        try:
            x = subsample_rows(x, math.ceil(max_samples / world))
            silent, rows = silent_units(x), int(x.shape[0])
        except Exception:  # this rank still takes part in the all-reduce (its peers are already waiting in it)
            failed = True
    if world == 1:  # nothing to reduce: the mask itself (a unit check runs every interval on small models)
        # no rows of this width read as a count of none: no unit fired
        return (1.0 if silent is None else float(silent.float().mean())), rows, int(failed)
    counts = None
    if not failed and silent is not None:
        try:
            fired = (~silent).to(device=device, dtype=torch.float32)
            counts = torch.cat([fired, torch.tensor([float(rows), 0.0], device=device)])
        except Exception:  # as above: still in the all-reduce, as a rank that failed
            failed = True
    if counts is None:  # no rows of this width on this rank, or it failed
        counts = torch.zeros(width + 2, dtype=torch.float32, device=device)
        counts[width + 1] = float(failed)
    dist.all_reduce(counts)
    silent = counts[:width] == 0
    return float(silent.float().mean()), int(counts[width]), int(counts[width + 1])


def sum_across_ranks(values: list[int], device: torch.device | str = "cpu") -> list[int]:
    """Element-wise sum of small integer counters over ranks (a collective when a process group exists).

    Example:
        >>> sum_across_ranks([3, 1])  # a single process: unchanged
        [3, 1]
    """
    return [int(v) for v in _all_reduce_sum(values, torch.long, device)]


def sum_floats_across_ranks(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """Element-wise sum of small float values over ranks (one all-reduce when a process group exists).

    Example:
        >>> sum_floats_across_ranks([0.5, 1.0])  # a single process: unchanged
        [0.5, 1.0]
    """
    dtype = torch.float64 if str(device) == "cpu" else torch.float32
    return [float(v) for v in _all_reduce_sum(values, dtype, device)]


def _all_reduce_sum(values: list[Any], dtype: torch.dtype, device: torch.device | str) -> list[Any]:
    """One all-reduce (sum) of a small list of numbers; the list itself when there is no process group."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=dtype, device=device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_from_rank0(obj: Any, device: torch.device | str = "cpu") -> Any:
    """Rank 0's ``obj`` (any picklable value) on every rank (a collective when a process group exists).

    Example:
        >>> broadcast_from_rank0({"ci": 0.25})  # a single process: unchanged
        {'ci': 0.25}
    """
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=torch.device(device) if str(device) != "cpu" else None)
    return box[0]
