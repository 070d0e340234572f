"""Per-step values read to the host in batches, so that watching a GPU run never stalls it at every step.

Reading a CUDA tensor as a Python float (``float(t)``, ``.item()``) waits until the device has finished all the work
queued before it: done at every optimizer step, it stops the host from queueing the next step ahead and costs most
on fast steps. `StepReads` keeps each step's values where they are (CUDA tensors stay on the device, Python numbers
on the host) and moves a batch of steps in one go: one pinned, non-blocking device-to-host copy every
``read_every`` steps (under DDP, one all-reduce per batch instead of one per step). On one process each copy is
picked up as soon as it has landed (`CudaEvent.query`, which does not wait), oldest first; several may be in flight
while the host runs ahead of the device, and the host waits for the oldest only when `MAX_IN_FLIGHT` are. Under DDP
a batch is picked up when the next one is due (a step every rank agrees on), so a per-step alarm comes up to two
batches late there.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from topo_callbacks.core.gather import world_size

__all__ = ["DEVICE_READ_EVERY", "HOST_READ_EVERY", "MAX_IN_FLIGHT", "StepReads"]

#: Optimizer steps per read when the values are CUDA tensors and ``read_every_n_steps`` is not given: an alarm of a
#: per-step rule comes at most this many steps (plus the one the copy takes to land) after the step that caused it.
#: Chosen on the benchmark's calibration seeds (`topo_callbacks.bench.protocol.batched_reads`): read in batches of 2
#: (known a step later; two batches under DDP), the default detects the 41 of 47 failure runs it detects at the step;
#: in batches of 4 or 8, 33 (the abrupt families break their metric 3-4 steps after the alarm).
DEVICE_READ_EVERY = 2

#: Batches whose copies may be in flight at once on one process before the host waits for the oldest: a host that
#: runs this many batches ahead of the device is slowed to it (a stall only a device far behind the host can feel).
MAX_IN_FLIGHT = 8

#: Optimizer steps per batch when ``max_overhead`` finds the per-step work costly on the CPU (a quarter of its budget
#: or more, `topo_callbacks.core.budget.HOST_BATCH_FROM`): each step is still scored, a CUSUM alarm comes up to this
#: many steps minus one later, a non-finite, zero or doubled value at once (`CusumDetector.urgent`).
HOST_READ_EVERY = 8

Item = float | int | bool | Tensor | None


class StepReads:
    """A queue of per-step rows of values (each a Python number, a 0-d tensor, or None for "not given").

    `add` queues a step; `ready` returns the steps whose values have reached the host, averaged over the ranks that
    gave one (None where no rank did). Host-only rows on a single process are returned at once, as given.

    A batch costs the host a fixed handful of tensor calls whatever its size: on one process the device values are
    stacked and copied to the host in one go (the host numbers never become a tensor); under DDP the host numbers
    travel to the device as one table, the device values are added to it as one block, and the table is all-reduced
    once. ``keep_cpu_tensors`` keeps CPU tensors unread too, as a GPU's are (for tests and benchmarks of that path
    on the CPU; the copies are then plain, not pinned, and nothing waits on an event).

    Example:
        >>> import torch
        >>> reads = StepReads(read_every=3)
        >>> for step in (1, 2, 3, 4):
        ...     _ = reads.add(step, [torch.tensor(float(step)), None, 0.5])
        ...     print(step, reads.ready(torch.device("cpu")))
        1 []
        2 []
        3 [(1, [1.0, None, 0.5]), (2, [2.0, None, 0.5]), (3, [3.0, None, 0.5])]
        4 []
        >>> reads.ready(torch.device("cpu"), force=True), reads.reads
        ([(4, [4.0, None, 0.5])], 2)
    """

    def __init__(self, read_every: int = 1, *, keep_cpu_tensors: bool = False) -> None:
        self.read_every = int(read_every)
        self.keep_cpu_tensors = bool(keep_cpu_tensors)
        #: batches moved to the host so far (device-to-host copies when the values live on a GPU)
        self.reads = 0
        self._rows: list[tuple[int, list[Item]]] = []
        self._in_flight: deque[_InFlight] = deque()

    def __len__(self) -> int:
        return len(self._rows) + sum(len(flight.steps) for flight in self._in_flight)

    def add(self, step: int, items: Sequence[Item]) -> list[Item]:
        """Queue optimizer step ``step``'s values; returns the row as queued. A tensor off the GPU is read now (that
        costs nothing)."""
        row: list[Item] = []
        for item in items:
            if isinstance(item, Tensor):
                if item.requires_grad:  # a graph is not kept alive by the queue (a detach costs a call: only then)
                    item = item.detach()
                if item.device.type != "cuda" and not self.keep_cpu_tensors:
                    item = float(item.reshape(()))
            row.append(item)
        self._rows.append((int(step), row))
        return row

    def add_host(self, step: int, row: list[Any]) -> int:
        """Queue a row of host numbers (no tensor: a single process on the CPU), as it is; returns the rows queued."""
        self._rows.append((step, row))
        return len(self._rows)

    def take_host(self) -> list[tuple[int, list[float | None]]]:
        """Every row queued by `add_host`, oldest first (one read)."""
        rows, self._rows = self._rows, []
        self.reads += 1
        return rows  # type: ignore[return-value]  # `add_host` queues host numbers only

    def ready(self, device: torch.device, *, force: bool = False) -> list[tuple[int, list[float | None]]]:
        """The queued steps whose values are on the host now, oldest first; every rank must call it at the same steps
        (under DDP it all-reduces when a batch is due). ``force``: read everything queued now (at a check, at the end
        of training: where the monitor reads the device anyway)."""
        out = self._landed(force)
        if self._rows and (force or len(self._rows) >= self.read_every):
            if self._in_flight and (world_size() > 1 or len(self._in_flight) >= MAX_IN_FLIGHT):
                # under DDP the last batch is picked up now, at a step every rank agrees on; on one process the oldest
                # only when too many are in flight (the device is that far behind the host)
                out += self._landed(True, oldest_only=world_size() == 1)
            rows, self._rows = self._rows, []
            self.reads += 1
            if (
                world_size() == 1
                and not self._in_flight  # else behind the batches in flight: steps reach the detector in order
                and not any(isinstance(i, Tensor) for _, row in rows for i in row)
            ):
                out += [(step, [None if i is None else float(i) for i in row]) for step, row in rows]
            else:
                self._send(rows, device)
                out += self._landed(force)
        return out

    def _send(self, rows: list[tuple[int, list[Item]]], device: torch.device) -> None:
        """Start moving ``rows`` to the host: (sum, count) per value; under DDP one all-reduce over ranks."""
        width = len(rows[0][1])
        lines: list[list[float]] = []  # per row: value, count, value, count, ... (a device value's own is 0 here)
        cells: list[tuple[int, int]] = []
        values: list[Tensor] = []
        for r, (_, row) in enumerate(rows):
            line = [0.0] * (2 * width)
            for c, item in enumerate(row):
                if item is None:
                    continue
                line[2 * c + 1] = 1.0
                if isinstance(item, Tensor):
                    cells.append((r, c))
                    values.append(item)
                else:
                    line[2 * c] = float(item)
            lines.append(line)
        steps = [s for s, _ in rows]
        if world_size() > 1:
            self._in_flight.append(self._all_reduce(steps, lines, cells, values, width, device))
            return
        if not values:  # host numbers only, queued behind batches still in flight
            self._in_flight.append(_InFlight(steps, lines, [], torch.empty(0), None))
            return
        # one process: only the device values move, in one stack and one copy
        block = _stack(values)
        cuda = block.device.type == "cuda"
        landing = torch.empty(block.shape, dtype=block.dtype, pin_memory=cuda)
        landing.copy_(block, non_blocking=cuda)
        self._in_flight.append(_InFlight(steps, lines, cells, landing, _landing_event(block.device)))

    def _all_reduce(
        self,
        steps: list[int],
        lines: list[list[float]],
        cells: list[tuple[int, int]],
        values: list[Tensor],
        width: int,
        device: torch.device,
    ) -> _InFlight:
        """Every rank's table (the same shape everywhere: a value a rank lacks counts 0 there) summed over the ranks.
        The host numbers go to the device as one table and the device values are added to it as one block, so that
        the batch costs one all-reduce and a fixed number of calls whatever its size."""
        table = torch.tensor(lines, dtype=torch.float64)
        target = values[0].device if values else device
        cuda = target.type == "cuda"
        if cuda:
            table = table.pin_memory().to(target, non_blocking=True)
        if values:
            block = _stack(values).to(table.device, torch.float64)
            flat = torch.tensor([2 * (r * width + c) for r, c in cells], dtype=torch.long)
            if cuda:
                flat = flat.pin_memory().to(target, non_blocking=True)
            table.view(-1).index_add_(0, flat, block)
        torch.distributed.all_reduce(table)
        if not cuda:
            return _InFlight(steps, None, None, table, None)
        landing = torch.empty(table.shape, dtype=table.dtype, pin_memory=True)
        landing.copy_(table, non_blocking=True)
        return _InFlight(steps, None, None, landing, _landing_event(table.device))

    def _landed(self, force: bool, oldest_only: bool = False) -> list[tuple[int, list[float | None]]]:
        """The batches in flight whose copies have landed, oldest first (all of them waited for when ``force``; with
        ``oldest_only``, the oldest waited for and the others only if landed)."""
        out: list[tuple[int, list[float | None]]] = []
        while self._in_flight:
            flight = self._in_flight[0]
            if flight.event is not None:
                if force:
                    flight.event.synchronize()
                elif world_size() > 1 or not flight.event.query():
                    # under DDP a rank-local query could pick the batch up at different steps on different ranks (and
                    # an alarm in it would fire at different steps): it is picked up when the next batch is due
                    break
            self._in_flight.popleft()
            out += _rows_of(flight)
            if oldest_only:
                force = False
        return out


def _rows_of(flight: _InFlight) -> list[tuple[int, list[float | None]]]:
    """A landed batch's rows: each value the sum over ranks over the count of ranks that gave one (None: none did)."""
    if flight.lines is None:  # the all-reduced table
        lines = flight.landing.tolist()
    else:
        lines = flight.lines
        for (r, c), value in zip(flight.cells or (), flight.landing.tolist(), strict=True):
            lines[r][2 * c] = value
    return [
        (step, [row[2 * c] / row[2 * c + 1] if row[2 * c + 1] > 0 else None for c in range(len(row) // 2)])
        for step, row in zip(flight.steps, lines, strict=True)
    ]


class _InFlight(NamedTuple):
    """A batch on its way to the host: its steps; on one process its host lines, the (row, column) of each device
    value and those values' landing buffer; under DDP (``lines`` None) the landing buffer holds the whole table."""

    steps: list[int]
    lines: list[list[float]] | None
    cells: list[tuple[int, int]] | None
    landing: Tensor
    event: Any


def _stack(values: list[Tensor]) -> Tensor:
    """0-d (or one-element) tensors as a 1-d tensor on the first one's device (a model split over devices gives its
    loss on the last), exactly: float32 when every value is a float of at most 32 bits or a flag (what the monitor
    queues), else float64."""
    exact = all(v.dtype == torch.bool or (v.is_floating_point() and v.dtype.itemsize <= 4) for v in values)
    dtype = torch.float32 if exact else torch.float64
    device = values[0].device
    return torch.stack([(v if v.dim() == 0 else v.reshape(())).to(device, dtype) for v in values])


def _landing_event(device: torch.device) -> Any:
    """An event recorded after a copy from ``device`` was queued, to ask whether it has landed; None where copies
    are synchronous (the CPU)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))  # the copy's stream: the tensors' device, not the current one
    return event
