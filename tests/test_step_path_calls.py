"""The per-step path's host work on an accelerator, exercised on the CPU (issue 24).

On a GPU whose step the host bounds (a ResNet-18 at batch 128 on an H200: 5.5 ms of GPU time in a 16 ms step), every
tensor call the monitor makes per step is host time the run pays in full. The CPU cannot time a CUDA launch, but the
calls are the same code on either device: these tests count them (`TorchDispatchMode`) on CPU tensors kept unread as
a GPU's are (``StepReads(keep_cpu_tensors=True)``, `_device_grad_norms`), and check that the values are the ones the
host path gives. Before this, a batch of 8 steps cost 475 calls in `StepReads` and the norms of 62 gradients 68.
"""

from __future__ import annotations

import json
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from tests.procs import run_script
from topo_callbacks.core.detector import _device_grad_norms, grad_norms
from topo_callbacks.core.step_reads import StepReads

CPU = torch.device("cpu")


class _Calls(TorchDispatchMode):
    """Counts the ATen calls made inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.count += 1
        return func(*args, **(kwargs or {}))


def _row(step: int) -> list[Any]:
    """What the monitor queues per step on a GPU: the loss and the gradient norm (device tensors), the learning rate
    (a number), the skipped flag, no loss scale, the dead-layer flag (a device tensor), the steps a read stands for."""
    grad = None if step % 4 == 0 else torch.tensor(0.5 + step, dtype=torch.float32)  # read at 3 steps in 4
    return [torch.tensor(1.0 + 0.25 * step), grad, 0.01, step % 5 == 0, None, torch.tensor(float(step % 7 == 0)), 1, 1]


def _as_host(row: list[Any]) -> list[Any]:
    return [float(v) if isinstance(v, torch.Tensor) else v for v in row]


@pytest.mark.parametrize("every", [1, 8, 32])
def test_a_batch_of_device_values_costs_a_fixed_few_calls_and_gives_the_host_values(every: int) -> None:
    device_reads, host_reads = StepReads(every, keep_cpu_tensors=True), StepReads(every)
    got, want = [], []
    rows = {step: _row(step) for step in range(1, 4 * every + 1)}
    with _Calls() as calls:
        for step, row in rows.items():
            device_reads.add(step, row)
            got += device_reads.ready(CPU)
    for step in range(1, 4 * every + 1):
        host_reads.add(step, _as_host(_row(step)))
        want += host_reads.ready(CPU)
    assert got == want
    assert [s for s, _ in got] == list(range(1, 4 * every + 1))
    assert device_reads.reads == 4
    # the rows themselves were made outside the counter: what is left is the batch's stack, buffer and copy
    assert calls.count <= 4 * 3, calls.count


def test_device_values_of_other_dtypes_land_exactly() -> None:
    reads = StepReads(3, keep_cpu_tensors=True)
    rows = [
        [torch.tensor(0.1, dtype=torch.float64), torch.tensor(True)],
        [torch.tensor(2.5, dtype=torch.bfloat16), torch.tensor([7.0])],
        [torch.tensor(1 / 3, dtype=torch.float64), None],
    ]
    out: list[Any] = []
    for step, row in enumerate(rows, start=1):
        reads.add(step, row)
        out += reads.ready(CPU)
    assert out == [(1, [0.1, 1.0]), (2, [2.5, 7.0]), (3, [1 / 3, None])]


def test_values_exact_in_float64_only_are_not_rounded_to_float32() -> None:
    reads = StepReads(2, keep_cpu_tensors=True)
    reads.add(1, [torch.tensor(2**24 + 1), torch.tensor(0.1, dtype=torch.float32)])
    reads.add(2, [torch.tensor(3), torch.tensor(True)])
    assert reads.ready(CPU) == [(1, [float(2**24 + 1), float(torch.tensor(0.1))]), (2, [3.0, 1.0])]


def test_a_queued_loss_with_a_graph_is_detached_and_read_later() -> None:
    w = torch.ones(2, requires_grad=True)
    loss = (w * 3).sum()
    reads = StepReads(2, keep_cpu_tensors=True)
    queued = reads.add(1, [loss])
    assert isinstance(queued[0], torch.Tensor)
    assert not queued[0].requires_grad
    assert reads.ready(CPU) == []
    reads.add(2, [loss.detach() * 2])
    assert reads.ready(CPU) == [(1, [6.0]), (2, [12.0])]


def _grads(count: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(count)
    shapes = [(64, 3, 3, 3), (64,), (128, 64, 3, 3), (128,), (10, 512), (10,)]
    return [torch.randn(shapes[i % len(shapes)], generator=gen) for i in range(count)]


def test_device_grad_norms_take_the_same_calls_for_6_or_62_tensors_and_match_the_cpu_norms() -> None:
    counts = {}
    for n in (6, 62):
        grads = _grads(n)
        with _Calls() as calls:
            total, per_tensor = _device_grad_norms(grads)
        counts[n] = calls.count
        params = [nn.Parameter(torch.zeros_like(g)) for g in grads]
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        cpu = grad_norms(params)
        assert cpu is not None
        assert per_tensor.dtype == torch.float32
        torch.testing.assert_close(per_tensor, torch.tensor(cpu[1]), rtol=1e-6, atol=0.0)
        assert float(total) == pytest.approx(cpu[0], rel=1e-6)
    assert counts[6] == counts[62] <= 4, counts


def test_device_grad_norms_detach_gradients_that_carry_a_graph() -> None:
    w = torch.tensor([3.0, 4.0], requires_grad=True)
    grads = [w * 1.0, torch.tensor([12.0])]
    total, per_tensor = _device_grad_norms(grads)
    assert not total.requires_grad
    assert not per_tensor.requires_grad
    assert per_tensor.tolist() == [5.0, 12.0]
    assert float(total) == 13.0


DDP_READS = textwrap.dedent(
    """
    import json, os, sys
    import torch, torch.distributed as dist
    from topo_callbacks.core.step_reads import StepReads

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    reads = StepReads(4, keep_cpu_tensors=True)
    out = []
    for step in range(1, 10):
        # rank 0 gives a device loss, rank 1 a host number; the gradient norm only rank 1 has at odd steps
        loss = torch.tensor(float(step)) if rank == 0 else float(step + 2)
        grad = torch.tensor(10.0 * step) if (rank == 1 and step % 2) else None
        reads.add(step, [loss, grad, 0.5])
        out += reads.ready(torch.device("cpu"), force=step == 9)
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as fh:
        json.dump({"out": out, "reads": reads.reads}, fh)
    dist.destroy_process_group()
    """
)


def test_ddp_ranks_average_device_and_host_values_in_one_table(tmp_path: Path) -> None:
    run_script(DDP_READS, tmp_path, launcher="torchrun", timeout=180)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    want = [[s, [s + 1.0, 10.0 * s if s % 2 else None, 0.5]] for s in range(1, 10)]
    assert ranks[0]["out"] == want
    assert ranks[0]["reads"] == 3


def _net(blocks: int) -> nn.Module:
    """An MLP of ``blocks`` hidden Linear+LayerNorm blocks: 4 + 4 x blocks parameter tensors."""
    layers: list[nn.Module] = [nn.Linear(16, 32)]
    for _ in range(blocks):
        layers += [nn.ReLU(), nn.Linear(32, 32), nn.LayerNorm(32)]
    return nn.Sequential(*layers, nn.Linear(32, 4))


def _monitored(model: nn.Module, device_path: bool, steps: int, count_from: int) -> tuple[Any, float]:
    """Train ``model`` for ``steps`` steps fed as the adapters feed the monitor (no check due); returns the monitor
    and the ATen calls per step inside its calls from step ``count_from`` on (the gradient norm read at each)."""
    from topo_callbacks.core import CollapseMonitorCore

    monitor = CollapseMonitorCore("1", every_n_train_steps=10**6, max_overhead=None)
    monitor._device_path = device_path
    monitor.attach(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    calls = 0
    for step in range(1, steps + 1):
        x = torch.randn(32, 16, generator=gen)
        counting = step >= count_from
        monitor.prepare_step(step)
        loss = (model(x) - x[:, :4]).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with _Calls() as counter:
            monitor.add_loss(loss)
            grad_norm = monitor.step_grad_norm(model, step)
        calls += counter.count if counting else 0
        opt.step()
        with _Calls() as counter:
            monitor.observe_step(step, grad_norm=grad_norm, lr=0.01)
        calls += counter.count if counting else 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no check ran in so short a run: said, not what this measures
        monitor.end_of_training(steps)
    return monitor, calls / (steps - count_from + 1)


def test_the_monitors_device_path_makes_a_fixed_few_calls_per_step_and_scores_what_the_host_path_does() -> None:
    """The monitor's whole per-step path as on a GPU (`_device_path`: loss and gradient norm kept as tensors, read
    in batches of `DEVICE_READ_EVERY`) makes the same few ATen calls per step on a model of 8 or 64 parameter
    tensors (the per-tensor norms in one call; about 130 on 62 tensors before), and its detector ends with the
    references of the host path on the same run, but for float32 rounding of the global norm."""
    per_step = {}
    for blocks in (1, 15):
        torch.manual_seed(3)
        model = _net(blocks)
        n_tensors = len(list(model.parameters()))
        device, per_step[n_tensors] = _monitored(model, True, 64, count_from=9)
        torch.manual_seed(3)
        host, _ = _monitored(_net(blocks), False, 64, count_from=64)
        assert device._step_reads.reads <= 64 // 2 + 1  # batches, not one read per step
        assert list(device.detector.states["loss"].reference) == list(host.detector.states["loss"].reference)
        np_dev = torch.tensor(list(device.detector.states["grad_norm"].reference), dtype=torch.float64)
        np_host = torch.tensor(list(host.detector.states["grad_norm"].reference), dtype=torch.float64)
        torch.testing.assert_close(np_dev, np_host, rtol=0, atol=1e-6)  # log scale: float32 sums, 1e-6 relative
    assert set(per_step) == {8, 64}
    assert per_step[8] == per_step[64], per_step
    assert per_step[64] <= 10, per_step  # 8 + a batch's 3 calls every DEVICE_READ_EVERY (2) steps


def test_a_loss_changed_in_place_after_add_loss_is_fed_as_it_was_given() -> None:
    """On a device the loss is read steps later, with its batch; a framework may scale it in place meanwhile (the HF
    Trainer's ``loss *= num_processes`` under DDP): what the detector gets is the value `add_loss` was given."""
    from topo_callbacks.core import CollapseMonitorCore

    monitor = CollapseMonitorCore("0", every_n_train_steps=10**6, max_overhead=None)
    monitor._device_path = True
    for step in range(1, 9):
        loss = torch.tensor(1.0 + step / 8)
        monitor.add_loss(loss)
        loss *= 4.0
        monitor.observe_step(step, grad_norm=torch.tensor(2.0), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monitor.end_of_training(8)
    assert monitor.detector is not None
    fed = list(monitor.detector.states["loss"].reference)
    assert len(fed) == 8
    assert fed == [1.0 + s / 8 for s in range(1, 9)]  # exact in float32: not the values scaled 4x after


@pytest.mark.parametrize(
    ("every", "jump_at", "known_at"),
    [(8, 283, 290), (8, 298, 298), (8, 301, 308), (8, 345, 348), (8, 349, 350), (2, 283, 284), (2, 298, 298)],
)
def test_the_benchmarks_batched_read_delay_is_when_the_live_monitor_reports(
    every: int, jump_at: int, known_at: int
) -> None:
    """`known_after_batched_reads`, which the benchmark uses to score the detection cost of reading in batches,
    gives the step at which the live monitor on the accelerator's path returns the alarm (on the CPU the batch's copy
    lands at once: lag 0; on a GPU the next step), while the alarm names the step that caused it. Checks every 50
    steps read everything queued and start the next batch (after the check at 250: batches 251-258, ..., 291-298;
    after the one at 300: 301-308, ..., 341-348, and 349 is read by the check at 350)."""
    from tests.test_overhead_budget import _mlp, _train
    from topo_callbacks.bench.protocol import known_after_batched_reads
    from topo_callbacks.core import CollapseMonitorCore

    monitor = CollapseMonitorCore(
        "1", every_n_train_steps=50, max_samples=64, max_overhead=None, read_every_n_steps=every
    )
    monitor._device_path = True
    monitor.attach(model := _mlp())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trained = _train(monitor, model, 360, jump_at=jump_at)
    assert trained.fired
    returned_at, result = trained.fired[0]
    checks = [c.step for c in trained.checks if c is not None]
    assert result.step == jump_at
    assert returned_at == known_at
    assert known_after_batched_reads(jump_at, every, 0, checks) == known_at


class _FakeEvent:
    """A CUDA event stand-in: lands when the test says, counts the waits."""

    waits = 0

    def __init__(self) -> None:
        self.landed = False

    def query(self) -> bool:
        return self.landed

    def synchronize(self) -> None:
        _FakeEvent.waits += 1
        self.landed = True


def test_copies_in_flight_are_picked_up_in_order_once_landed_and_waited_for_only_when_too_many(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On one process a batch's copy is picked up as soon as it has landed, oldest first, without waiting: several
    may be in flight while the device lags behind the host; the host waits for the oldest only when `MAX_IN_FLIGHT`
    are in flight, and for all of them when forced (a check, the end of training)."""
    from topo_callbacks.core import step_reads

    events: list[_FakeEvent] = []

    def event(device: torch.device) -> _FakeEvent:
        events.append(_FakeEvent())
        return events[-1]

    monkeypatch.setattr(step_reads, "_landing_event", event)
    _FakeEvent.waits = 0
    reads = StepReads(2, keep_cpu_tensors=True)
    out: list[Any] = []
    for step in range(1, 7):  # three batches sent, none landed
        reads.add(step, [torch.tensor(float(step))])
        out += reads.ready(CPU)
    assert (out, len(events), len(reads), _FakeEvent.waits) == ([], 3, 6, 0)
    events[1].landed = True  # the second landed before the first: nothing is taken out of order
    reads.add(7, [torch.tensor(7.0)])
    assert reads.ready(CPU) == []
    events[0].landed = True
    assert [s for s, _ in reads.ready(CPU)] == [1, 2, 3, 4]
    for step in range(8, 8 + 2 * step_reads.MAX_IN_FLIGHT):  # the device stops: MAX_IN_FLIGHT batches pile up
        reads.add(step, [torch.tensor(float(step))])
        out += reads.ready(CPU)
    assert _FakeEvent.waits == 1  # the next batch due past MAX_IN_FLIGHT waited for the oldest, once
    assert [s for s, _ in out] == [5, 6]
    got = reads.ready(CPU, force=True)
    assert [s for s, _ in got] == list(range(7, 8 + 2 * step_reads.MAX_IN_FLIGHT))
    assert [v for _, (v,) in got] == [float(s) for s in range(7, 8 + 2 * step_reads.MAX_IN_FLIGHT)]
    assert len(reads) == 0


def test_a_batch_of_host_numbers_waits_behind_device_batches_in_flight(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows without a tensor (a loss given as a number, no gradient norm at that step) are not returned ahead of
    older rows whose copy has not landed: the detector takes the steps in order."""
    from topo_callbacks.core import step_reads

    events: list[_FakeEvent] = []

    def event(device: torch.device) -> _FakeEvent:
        events.append(_FakeEvent())
        return events[-1]

    monkeypatch.setattr(step_reads, "_landing_event", event)
    reads = StepReads(2, keep_cpu_tensors=True)
    out: list[Any] = []
    for step, value in ((1, torch.tensor(1.0)), (2, torch.tensor(2.0)), (3, 3.0), (4, 4.0)):
        reads.add(step, [value])
        out += reads.ready(CPU)
    assert out == []
    events[0].landed = True
    reads.add(5, [5.0])
    assert reads.ready(CPU) == [(1, [1.0]), (2, [2.0]), (3, [3.0]), (4, [4.0])]


class _NextStepEvent(_FakeEvent):
    """An event that has landed by the second time it is asked: the copy lands while the next step runs."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = 0

    def query(self) -> bool:
        self.asked += 1
        return self.landed or self.asked > 1


@pytest.mark.parametrize(("jump_at", "known_at"), [(283, 285), (298, 299), (301, 303), (349, 350)])
def test_the_benchmarks_one_step_landing_is_when_the_live_monitor_reports(
    monkeypatch: pytest.MonkeyPatch, jump_at: int, known_at: int
) -> None:
    """With copies that land while the next step runs (a device keeping up with the host), the live monitor reading
    in batches of 2 returns the alarm one step after the batch's last, or at a check, as `known_after_batched_reads`
    says with ``lag=1`` (the benchmark's "one process" row)."""
    from tests.test_overhead_budget import _mlp, _train
    from topo_callbacks.bench.protocol import known_after_batched_reads
    from topo_callbacks.core import CollapseMonitorCore, step_reads

    monkeypatch.setattr(step_reads, "_landing_event", lambda device: _NextStepEvent())
    monitor = CollapseMonitorCore("1", every_n_train_steps=50, max_samples=64, max_overhead=None, read_every_n_steps=2)
    monitor._device_path = True
    monitor.attach(model := _mlp())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trained = _train(monitor, model, 360, jump_at=jump_at)
    returned_at, result = trained.fired[0]
    checks = [c.step for c in trained.checks if c is not None]
    assert result.step == jump_at
    assert returned_at == known_at
    assert known_after_batched_reads(jump_at, 2, 1, checks) == known_at
