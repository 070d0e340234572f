"""Issue 24: the overhead budget (``max_overhead``) and batched per-step reads (``read_every_n_steps``).

Speed itself is shown by ``benchmarks/overhead.py``, not here: these tests check the decisions (checks spaced, the
sample lowered only while calibrating, the same schedule on every rank, values read once per batch of steps) on real
training loops.
"""

from __future__ import annotations

import itertools
import json
import math
import textwrap
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from torch import nn

from tests.procs import run_script
from topo_callbacks.core import CollapseMonitorCore
from topo_callbacks.core.budget import MAX_STRIDE, MIN_SAMPLES, STRIDE_FROM, check_spacing
from topo_callbacks.core.detector import STEP_WINDOW
from topo_callbacks.core.monitor import CheckResult
from topo_callbacks.core.step_reads import HOST_READ_EVERY, StepReads


def _mlp(width: int = 32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, width), nn.Tanh(), nn.Linear(width, 4))


class Trained(NamedTuple):
    """What `_train` saw: the per-step alarms ``(step, result)``, the checks' results, the steps whose gradient norm
    was computed."""

    fired: list[tuple[int, CheckResult]]
    checks: list[CheckResult]
    normed: list[int]


def _train(
    monitor: CollapseMonitorCore,
    model: nn.Module,
    steps: int,
    *,
    start: int = 1,
    jump_at: int | None = None,
    sleep_s: float = 0.0,
    pause_at: int | None = None,
    pause_s: float = 0.02,
) -> Trained:
    """A plain loop that feeds the monitor as the adapters do: the loss through `add_loss`, the gradient norm through
    `step_grad_norm` (only at the steps the monitor reads), the learning rate; ``jump_at``: the loss x1e6 from that
    step on; ``sleep_s``: a slower model's step; ``pause_at``: the process pauses for ``pause_s`` inside the monitor's
    gradient-norm read at that step (a garbage collection, a preemption by another process)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(start)
    out = Trained([], [], [])
    for step in range(start, start + steps):
        monitor.prepare_step(step)
        x = torch.randn(64, 16, generator=gen)
        loss = (model(x) - x[:, :4]).pow(2).mean()
        if jump_at is not None and step >= jump_at:
            loss = loss * 1e6
        opt.zero_grad()
        loss.backward()
        if sleep_s:
            time.sleep(sleep_s)
        params = _paused(model.parameters(), pause_s) if step == pause_at else model.parameters()
        grad = monitor.step_grad_norm(params, step)
        if grad is not None:
            out.normed.append(step)
        opt.step()
        monitor.add_loss(loss)
        result = monitor.observe_step(step, grad_norm=grad, lr=0.05)
        if result is not None:
            out.fired.append((step, result))
        if monitor.is_check_step(step):
            out.checks.append(monitor.run_check(step))
    return out


def _paused(parameters: Iterator[nn.Parameter], seconds: float) -> Iterator[nn.Parameter]:
    time.sleep(seconds)
    yield from parameters


def test_check_spacing_solves_the_budget() -> None:
    spacing = check_spacing(check_s=0.1, per_step_s=0.0001, step_s=0.005, budget=0.02)
    share = (0.1 + spacing * 0.0001) / (spacing * (0.005 + 0.0001) + 0.1)
    assert share == pytest.approx(0.02)
    assert check_spacing(0.1, 0.0, 0.005, 0.02) < spacing  # a costlier step needs wider spacing
    assert math.isinf(check_spacing(0.1, 0.0002, 0.005, 0.02))  # per-step work alone is 4%: spacing cannot help


@pytest.mark.slow
def test_a_unit_check_that_fails_on_one_rank_is_skipped_on_every_rank(tmp_path: Path) -> None:
    """A capture error on rank 1 before each unit check (steps 100 to 150), then taking its rows raising there (160 to
    250): rank 1 still takes part in the unit check's all-reduce (no rank waits for it), every rank learns that one
    rank failed and skips feeding the rule at the same steps, and the run ends on both ranks with the same detector
    state and checks."""
    script = DDP_SCRIPT.replace(
        "    monitor.observe_step(step,",
        "    if rank == 1 and 100 <= step <= 150 and step % 10 == 0:\n"
        "        monitor.capture.error = RuntimeError('injected')\n"
        "    if rank == 1 and 160 <= step <= 250 and step % 10 == 0 and not monitor.is_check_step(step):\n"
        "        monitor.capture.take = lambda: 1 / 0  # raises where the rows are taken\n"
        "    elif rank == 1:\n"
        "        monitor.capture.__dict__.pop('take', None)\n"
        "    monitor.observe_step(step,",
    )
    assert script != DDP_SCRIPT
    run_script(script, tmp_path, launcher="torchrun", timeout=300)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["unit_checks"] == r1["unit_checks"]
    assert r0["check_every"] > 10  # spaced out: the unit checks ran, those from 100 to 250 were not fed
    assert 0 < r0["unit_checks"] <= 13  # of the 29 multiples of 10 after the first check, 16 failed on rank 1
    assert r0["detector"] == r1["detector"]
    assert r0["steps"] == r1["steps"]


def test_budget_off_checks_at_every_interval_and_on_spaces_them_out() -> None:
    off = CollapseMonitorCore("1", every_n_train_steps=10, max_samples=256, max_overhead=None)
    off.attach(model := _mlp())
    _train(off, model, 200)
    assert [h["step"] for h in off.history] == list(range(10, 201, 10))

    # steps of well under a millisecond, a check of milliseconds: 2% needs checks far apart
    on = CollapseMonitorCore("1", every_n_train_steps=10, max_samples=256)
    on.attach(model := _mlp())
    _train(on, model, 400)
    steps = [h["step"] for h in on.history]
    assert steps[0] == 10
    assert len(steps) < 20
    assert all(s % 10 == 0 for s in steps)
    assert all(b - a >= 10 for a, b in itertools.pairwise(steps))
    assert on.check_every > 10
    info = on.summary()
    assert info["check_every"] == on.check_every
    assert 0.0 < info["overhead"] <= 1.0
    # the capture window follows the spaced schedule: the rows of each check come from the steps just before it
    assert on.next_check_step(steps[-1] + 1) == steps[-1] + on.check_every


def test_budget_lowers_the_sample_only_while_calibrating() -> None:
    # a 256-wide layer, 1024 rows per check and steps of a fraction of a millisecond: even 10x the spacing cannot
    # keep a check within 2%. The first check is a trial of MIN_SAMPLES rows that measures what a check costs here;
    # it lowers the sample before the scale is calibrated, and the scale is calibrated on the new size
    monitor = CollapseMonitorCore("1", every_n_train_steps=5, max_samples=1024)
    monitor.attach(model := _mlp(width=256))
    _train(monitor, model, 40)
    assert len(monitor.history) == 1
    # at least MAX_SPACING x every_n_train_steps, further when even the smaller sample's check needs it
    assert monitor.check_every >= 50
    lowered = monitor.max_samples
    assert MIN_SAMPLES <= lowered < 1024
    assert monitor.capture.max_samples == lowered
    assert monitor.history[0]["n"] == MIN_SAMPLES  # the trial check
    assert monitor.eps_candidates == []  # the trial's scale is not one of the calibration's
    _train(monitor, model, 3000, start=41)
    assert monitor.eps is not None  # the scale is held ...
    assert monitor.max_samples == lowered  # ... and the sample stayed, whatever the later checks cost
    assert all(h["n"] <= lowered for h in monitor.history[1:])  # the checks after the one that lowered it
    state = json.loads(json.dumps(monitor.state_dict()))  # plain data
    fresh = CollapseMonitorCore("1", every_n_train_steps=5, max_samples=1024)
    fresh.load_state_dict(state)
    assert (fresh.max_samples, fresh.check_every) == (lowered, monitor.check_every)


def test_budget_reads_the_per_step_channels_less_often_only_when_it_must() -> None:
    # steps of a fraction of a millisecond: the gradient norm and the detector's update alone are several percent
    # of a step, so even checks 100x apart cannot keep a budget of 0.5%: the per-step channels are read every k-th
    # step (at the default 2% this model's per-step work, since 2026-12-04 cheaper, sat near the limit on this VM)
    fast = CollapseMonitorCore("1", every_n_train_steps=10, max_samples=128, max_overhead=0.005)
    fast.attach(model := _mlp())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trained = _train(fast, model, 400)
    normed = trained.normed
    k = fast.observe_every
    assert 1 < k <= MAX_STRIDE
    assert fast.summary()["observe_every"] == k
    assert trained.fired == []
    # the first STEP_WINDOW steps are read whatever k (a run broken from its start is scored from its start), then
    # every k-th step; checks read their own step too
    assert [s for s in normed if s <= STEP_WINDOW] == list(range(1, STEP_WINDOW + 1))
    after = [s for s in normed if s > STEP_WINDOW]
    assert all(s % k == 0 or fast.is_check_step(s) or s in [h["step"] for h in fast.history] for s in after)
    assert len(after) < (400 - STEP_WINDOW) / k + len(fast.history) + 1
    assert len(fast.detector.states["loss"].reference) <= len(normed)
    # an extreme loss still alarms, at the first step read after it, naming that step
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fired = _train(fast, model, 3 * k, start=401, jump_at=401 + k // 2).fired
    assert fired
    assert 401 + k // 2 <= fired[0][0] < 401 + k // 2 + k
    state = json.loads(json.dumps(fast.state_dict()))
    fresh = CollapseMonitorCore("1", every_n_train_steps=10, max_samples=128)
    fresh.load_state_dict(state)
    assert fresh.observe_every == k

    # a step of 20 ms and a budget of 10%: the per-step work fits (it takes a few tenths of a millisecond after a
    # sleep: cold caches), every step is read
    slow = CollapseMonitorCore("1", every_n_train_steps=5, max_samples=128, max_overhead=0.1)
    slow.attach(model := _mlp())
    normed = _train(slow, model, 30, sleep_s=0.02).normed
    assert slow.observe_every == 1
    assert normed == list(range(1, 31))


def test_the_loss_of_a_step_not_read_joins_the_next_read() -> None:
    """With the per-step channels read every 4th step, the steps between are not lost: the read step feeds the mean
    loss of the 4 (a loss that rises between reads is seen at the next one)."""
    monitor = CollapseMonitorCore("0", every_n_train_steps=1000, max_overhead=None)
    for step in range(1, STEP_WINDOW + 1):
        monitor.observe_step(step, loss=1.0, grad_norm=1.0)
    monitor.observe_every = 4
    assert [monitor.observes(s) for s in range(201, 209)] == [False, False, False, True] * 2
    for step, loss in zip(range(201, 209), [2.0, 3.0, 4.0, 5.0, 1.0, 1.0, 1.0, 9.0], strict=True):
        monitor.observe_step(step, loss=loss, grad_norm=1.0, skipped=step == 202)  # an fp16 skip on a step not read
    assert monitor.skipped_steps == 1
    assert list(monitor.detector.states["loss"].reference)[-2:] == [3.5, 3.0]
    # the references keep about STEP_WINDOW optimizer steps: 50 reads at 1 step in 4
    assert len(monitor.detector.states["loss"].reference) == STEP_WINDOW // 4
    assert monitor.detector.states["grad_norm"].reference.maxlen == STEP_WINDOW // 4


def test_the_trial_check_comes_once_per_run_and_the_next_check_has_its_full_sample() -> None:
    monitor = CollapseMonitorCore("1", every_n_train_steps=20, max_samples=512, max_overhead=0.5)
    monitor.attach(model := _mlp())
    _train(monitor, model, 80, sleep_s=0.01)  # 64 rows per 10 ms step, half the time: it stays
    sizes = [h["n"] for h in monitor.history]
    assert monitor.history[0]["trial"] is True
    assert sizes[0] == MIN_SAMPLES
    assert sizes[1:] == [512] * (len(sizes) - 1)  # the check after the trial captures a full window
    assert len(sizes) >= 3
    assert all("trial" not in h for h in monitor.history[1:])
    # a resumed run (state loaded after attach, as Lightning and Accelerate do) runs no trial again
    resumed = CollapseMonitorCore("1", every_n_train_steps=20, max_samples=512, max_overhead=0.5)
    resumed.attach(model)
    resumed.load_state_dict(json.loads(json.dumps(monitor.state_dict())))
    assert resumed.capture.max_samples == 512
    _train(resumed, model, 40, start=81, sleep_s=0.01)
    assert len(resumed.history) > len(monitor.history)
    assert all(h["n"] == 512 for h in resumed.history[len(monitor.history) :])


def test_a_check_at_the_first_step_read_decides_nothing_yet() -> None:
    # every_n_train_steps=1: the first check comes before any step was timed; the schedule waits for one
    monitor = CollapseMonitorCore("1", every_n_train_steps=1, max_samples=256, max_overhead=0.5)
    monitor.attach(model := _mlp())
    _train(monitor, model, 1)
    assert (monitor.max_samples, monitor.observe_every, monitor.check_every) == (256, 1, 1)


def test_overhead_is_logged_at_each_check() -> None:
    monitor = CollapseMonitorCore("1", every_n_train_steps=10, max_samples=128)
    monitor.attach(model := _mlp())
    logged = [result.logged for result in _train(monitor, model, 40).checks]
    assert logged
    assert all(0.0 <= entry["collapse/overhead"] <= 1.0 for entry in logged)
    off = CollapseMonitorCore("1", every_n_train_steps=10, max_samples=128, max_overhead=None)
    off.attach(model)
    _train(off, model, 10)
    assert "collapse/overhead" not in off.history[0]


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1, "2%", True])
def test_max_overhead_is_validated(bad: object) -> None:
    with pytest.raises(ValueError, match="`max_overhead`"):
        CollapseMonitorCore("1", max_overhead=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`read_every_n_steps`"):
        CollapseMonitorCore("1", read_every_n_steps=0)


def test_per_step_values_are_read_once_per_batch() -> None:
    monitor = CollapseMonitorCore("1", every_n_train_steps=50, max_samples=128, read_every_n_steps=8,
                                  max_overhead=None)  # fmt: skip
    monitor.attach(model := _mlp())
    _train(monitor, model, 40)
    reads = monitor._step_reads
    assert reads is not None
    # 40 steps: batches of 8 -> 5 reads; the detector has seen every step
    assert reads.reads == 5
    assert len(reads) == 0
    assert len(monitor.detector.states["loss"].reference) == 40
    _train_more = CollapseMonitorCore("1", every_n_train_steps=12, max_samples=128, read_every_n_steps=8,
                                      max_overhead=None)  # fmt: skip
    _train_more.attach(model)
    _train(_train_more, model, 12)
    # a check step reads what is queued (12 = one batch of 8, then 4 more at the check)
    assert _train_more._step_reads.reads == 2
    assert len(_train_more.detector.states["loss"].reference) == 12


def test_batched_reads_alarm_at_the_step_that_broke_one_batch_later() -> None:
    """A loss 1e6 times its reference alarms at once when read every step; read in batches of 8, the alarm names
    the step of the jump and comes with the batch that holds it (at most 8 steps later)."""
    results = {}
    for every in (1, 8):
        monitor = CollapseMonitorCore("1", every_n_train_steps=1000, read_every_n_steps=every, max_overhead=None)
        monitor.attach(model := _mlp())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fired = _train(monitor, model, 300, jump_at=283).fired
        assert fired, every
        returned_at, result = fired[0]
        results[every] = (returned_at, result.step)
    assert results[1] == (283, 283)
    assert results[8][1] == 283
    assert 283 <= results[8][0] <= 283 + 8


def test_step_reads_keeps_order_and_averages_nothing_on_one_process() -> None:
    reads = StepReads(read_every=3)
    out = []
    for step in range(1, 8):
        reads.add(step, [torch.tensor(float(step)), None, step % 2 == 0])
        out += reads.ready(torch.device("cpu"))
    out += reads.ready(torch.device("cpu"), force=True)
    assert [s for s, _ in out] == list(range(1, 8))
    assert out[1][1] == [2.0, None, 1.0]
    assert out[2][1] == [3.0, None, 0.0]
    assert reads.reads == 3


DDP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time, warnings
    import torch, torch.distributed as dist
    from torch import nn
    from topo_callbacks.core import CollapseMonitorCore
    from tests.procs import finish_distributed

    warnings.simplefilter("ignore")
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 4))
    monitor = CollapseMonitorCore("1", every_n_train_steps=10, max_samples=256, read_every_n_steps=4)
    monitor.attach(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(rank)
    for step in range(1, 301):
        monitor.prepare_step(step)
        x = torch.randn(32, 16, generator=gen)
        loss = (model(x) - x[:, :4]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 1:
            time.sleep(0.002)  # rank 1's steps are slower: its own timings differ from rank 0's
        monitor.observe_step(step, loss=loss.detach(), grad_norm=monitor.step_grad_norm(model.parameters(), step))
        if monitor.is_check_step(step):
            monitor.run_check(step)
    out = {"steps": [h["step"] for h in monitor.history], "check_every": monitor.check_every,
           "observe_every": monitor.observe_every,
           "max_samples": monitor.max_samples, "reads": monitor._step_reads.reads,
           "unit_checks": monitor.unit_checks,
           "detector": monitor.detector.state_dict()}
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as fh:
        json.dump(out, fh)
    del monitor, model, opt
    finish_distributed()  # a barrier, then the group destroyed: a bare destroy intermittently aborted a rank
    """
)


@pytest.mark.slow
def test_every_rank_takes_the_same_schedule_and_reads(tmp_path: Path) -> None:
    run_script(DDP_SCRIPT, tmp_path, launcher="torchrun", timeout=300)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["steps"] == r1["steps"]
    assert len(r0["steps"]) >= 1
    schedule = ("check_every", "observe_every", "max_samples", "reads", "unit_checks")
    assert [r0[k] for k in schedule] == [r1[k] for k in schedule]
    # the checks spaced out, the unit checks between them gathered every rank's rows at the same steps: the dormant-unit
    # rule's reference (in the detector's state) is the same on both
    assert r0["check_every"] > 10
    assert r0["unit_checks"] > 0
    assert r0["detector"] == r1["detector"]  # the per-step values were averaged over the ranks, batch by batch


def test_a_costly_per_step_path_is_scored_in_batches_on_the_cpu_and_every_step_still_counts() -> None:
    """Steps of 20 ms under the default 2% budget: the per-step work (as the monitor times it right after a sleeping
    step, 0.4-0.8 ms on this VM) is over a quarter of the budget and under 4x it (with 5 ms steps, 4x was ~0.6 ms:
    the test failed one run in four), so the budget scores the CPU's per-step values in batches of
    `HOST_READ_EVERY` instead of reading fewer steps. Every step still reaches the detector (the last batch at the
    end of training), and an extreme loss is scored at the step it happens, not with its batch."""
    monitor = CollapseMonitorCore("1", every_n_train_steps=10, max_samples=128)
    monitor.attach(model := _mlp())
    _train(monitor, model, 61, sleep_s=0.02)
    assert monitor.observe_every == 1
    assert monitor._step_reads is not None
    assert monitor._step_reads.read_every == HOST_READ_EVERY
    fed = len(monitor.detector.states["loss"].reference) + len(monitor._step_reads)
    assert fed == 61
    monitor.end_of_training(61)
    assert len(monitor._step_reads) == 0
    assert len(monitor.detector.states["loss"].reference) == 61
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fired = _train(monitor, model, 10, start=62, jump_at=66, sleep_s=0.02).fired
    assert fired
    assert (fired[0][0], fired[0][1].step) == (66, 66)


def test_a_batch_of_host_values_alarms_on_the_same_step_at_most_a_batch_later() -> None:
    """A moderate rise (no value doubles its reference: nothing urgent) read in batches of 8 on the CPU alarms on the
    same step as when read every step, returned with its batch; a loss 1e6x its reference is returned at once."""
    import random

    rng = random.Random(0)
    losses = [1.0 + 0.05 * rng.random() for _ in range(300)] + [1.6 + 0.05 * rng.random() for _ in range(60)]
    seen = {}
    for every in (1, 8):
        monitor = CollapseMonitorCore("0", every_n_train_steps=10_000, read_every_n_steps=every, max_overhead=None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fired = [(s, monitor.observe_step(s, loss=v, grad_norm=1.0)) for s, v in enumerate(losses, start=1)]
        first = next((s, r) for s, r in fired if r is not None)
        seen[every] = (first[0], first[1].step)
    assert seen[1][0] == seen[1][1] > 300
    assert seen[8][1] == seen[1][1]
    assert seen[1][0] <= seen[8][0] <= seen[1][0] + 7
    monitor = CollapseMonitorCore("0", every_n_train_steps=10_000, read_every_n_steps=8, max_overhead=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for s, v in enumerate(losses[:300], start=1):
            assert monitor.observe_step(s, loss=v, grad_norm=1.0) is None
        assert monitor.observe_step(301, loss=1e6, grad_norm=1.0) is not None


def test_the_gradient_norm_is_read_at_one_read_in_grad_every() -> None:
    """With ``grad_every = 4`` (what the budget sets where the gradient norm is most of the per-step work) the loss is
    read at every step and the gradient norm at every 4th (and at each check, and at every one of the first
    `STEP_WINDOW` steps); a norm given at another step (a framework's clipping norm) is not read; the gradient
    norm's reference keeps about `STEP_WINDOW` optimizer steps."""
    monitor = CollapseMonitorCore("0", every_n_train_steps=1000, max_overhead=None)
    for step in range(1, STEP_WINDOW + 1):
        assert monitor.reads_grad_norm(step)
        monitor.observe_step(step, loss=1.0, grad_norm=1.0)
    monitor.grad_every = 4
    assert [monitor.reads_grad_norm(s) for s in range(201, 209)] == [False, False, False, True] * 2
    assert monitor.reads_grad_norm(1000)  # a check step
    p = nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])
    given = [monitor.step_grad_norm([p], s) for s in range(201, 209)]
    assert given == [None, None, None, 5.0] * 2
    for step in range(201, 209):
        monitor.observe_step(step, loss=1.0, grad_norm=1.0 + (step - 200) / 100)
    states = monitor.detector.states
    assert [round(math.exp(v), 6) for v in list(states["grad_norm"].reference)[-3:]] == [1.0, 1.04, 1.08]
    assert (states["loss"].reference.maxlen, states["grad_norm"].reference.maxlen) == (STEP_WINDOW, STEP_WINDOW // 4)
    assert list(states["loss"].reference)[-8:] == [1.0] * 8
    assert monitor._fed_steps == STEP_WINDOW + 8
    assert monitor.summary()["grad_every"] == 4
    fresh = CollapseMonitorCore("0", every_n_train_steps=1000, max_overhead=None)
    fresh.load_state_dict(json.loads(json.dumps(monitor.state_dict())))
    assert fresh.grad_every == 4


def test_the_budget_reads_the_gradient_norm_less_often_where_it_costs_most() -> None:
    """A model whose gradient norm is costly next to the rest of the per-step work (a 4M-value parameter, 20 ms
    steps, a 2% budget): the budget computes the norm at one read in 2 or 4 and still reads the loss at every step;
    a model whose norm is cheap keeps it at every read."""
    torch.manual_seed(0)

    class Wide(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(16, 4)
            self.table = nn.Parameter(torch.zeros(4_000_000))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(x) + self.table[:4]  # every value of the table gets a gradient (zeros but 4)

    monitor = CollapseMonitorCore("head", every_n_train_steps=10, max_samples=128)
    monitor.attach(model := Wide())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (its gradient norm falls as the toy regression converges)
        trained = _train(monitor, model, 260, sleep_s=0.02)
    assert monitor.grad_every in (2, 4)
    assert monitor.observe_every == 1
    late = [s for s in trained.normed if s > STEP_WINDOW]
    assert 0 < len(late) < 60 / monitor.grad_every + len(monitor.history) + 1
    assert monitor._fed_steps + len(monitor._reads()) == 260  # the loss of every step reaches the detector

    cheap = CollapseMonitorCore("1", every_n_train_steps=10, max_samples=128, max_overhead=0.1)
    cheap.attach(model := _mlp())
    _train(cheap, model, 60, sleep_s=0.02)
    assert cheap.grad_every == 1


def test_one_slow_read_does_not_make_the_budget_stride_the_gradient_norm() -> None:
    """The process pauses for 20 ms inside one gradient-norm read (a garbage collection, another process on the
    core): the interval that holds it measures the norm at ~2 ms a read, over the 0.8 ms the budget allows it. That is
    not what the norm costs, and reading it less often would not save the pause: the stride is raised only when two
    intervals in a row need it (the cause of a test that failed at random on a busy machine)."""
    cheap = CollapseMonitorCore("1", every_n_train_steps=10, max_samples=128, max_overhead=0.1)
    cheap.attach(model := _mlp())
    _train(cheap, model, 50, sleep_s=0.02)
    last = cheap.next_check_step(51)  # (the budget spaces the checks by measured time: 60 or later)
    _train(cheap, model, last - 50, start=51, sleep_s=0.02, pause_at=last - 3)
    assert cheap.last_checked_step == last  # the interval of the pause is the last one the budget decided on
    assert cheap.grad_every == 1


def test_one_slow_read_does_not_make_the_budget_read_fewer_steps() -> None:
    """The same for the per-step reads: a pause of 80 ms inside one read makes its interval measure ~8 ms a read,
    over the 3.2 ms (`STRIDE_FROM` x the planned 8% of a 20 ms step) from which the budget reads every k-th step
    only; the reads of the intervals before cost under a millisecond, and every step is still read."""
    monitor = CollapseMonitorCore("1", every_n_train_steps=10, max_samples=128, max_overhead=0.1)
    monitor.attach(model := _mlp())
    _train(monitor, model, 50, sleep_s=0.02)
    last = monitor.next_check_step(51)
    _train(monitor, model, last - 50, start=51, sleep_s=0.02, pause_at=last - 3, pause_s=0.08)
    assert monitor.last_checked_step == last
    assert monitor.observe_every == 1


def test_a_model_given_for_its_parameters_is_listed_again_when_they_change() -> None:
    """`step_grad_norm` of a module equals that of its parameters; the list is kept between reads (walking the module
    costs as much as a small model's norms) and listed again when its first parameter is another tensor (a conversion
    that replaced the tensors behind the module's back) or after a parameter is registered (a head added,
    ``load_state_dict(assign=True)``)."""
    model = _mlp()
    monitor = CollapseMonitorCore("1", every_n_train_steps=5, max_samples=64, max_overhead=None)
    monitor.attach(model)
    model(torch.randn(8, 16)).sum().backward()
    expected = monitor.step_grad_norm(model.parameters(), 1)
    assert monitor.step_grad_norm(model, 2) == pytest.approx(expected)
    kept = monitor._parameter_list
    assert monitor.step_grad_norm(model, 3) == pytest.approx(expected)
    assert monitor._parameter_list is kept  # nothing changed: not listed again

    first = model[0]
    swapped = nn.Parameter(first.weight.detach().clone())
    swapped.grad = torch.full_like(first.weight, 2.0)
    first._parameters["weight"] = swapped  # no registration hook runs
    replaced = monitor.step_grad_norm(model, 4)
    assert replaced != pytest.approx(expected)
    assert replaced == pytest.approx(monitor.step_grad_norm(list(model.parameters()), 5))

    extra = nn.Parameter(torch.ones(1))
    extra.grad = torch.tensor([100.0])
    model[2].register_parameter("extra", extra)  # not the first parameter: seen through the registration hook
    assert monitor.step_grad_norm(model, 6) == pytest.approx(math.hypot(replaced, 100.0))

    del model[0]  # the first layer removed: no hook runs, its parameters still have gradients
    remaining = monitor.step_grad_norm(model, 7)
    assert remaining == pytest.approx(monitor.step_grad_norm(list(model.parameters()), 8))
    assert remaining < math.hypot(replaced, 100.0)  # without the removed layer's gradients


def test_a_spaced_out_check_is_brought_forward_when_the_detector_needs_one() -> None:
    """Under the budget the checks of a fast model are hundreds of steps apart; the embeddings of a layer that is
    constant from the start need `COLLAPSED_CHECKS` checks in a row to alarm, so each collapsed check brings the next
    one forward (`CusumDetector.wants_check`): the alarm comes within a few check intervals of the first check, not
    after the spaced ones. Without the budget nothing is brought forward."""
    from topo_callbacks.core.detector import COLLAPSED_CHECKS

    every = 10

    def run(max_overhead: float | None) -> tuple[CollapseMonitorCore, Trained]:
        model = _mlp()
        frozen = model[0]
        with torch.no_grad():
            frozen.weight.zero_()  # the watched Tanh's output is the same row for every input
            frozen.bias.fill_(0.5)
        frozen.requires_grad_(False)
        monitor = CollapseMonitorCore("1", every_n_train_steps=every, max_samples=128, max_overhead=max_overhead)
        monitor.attach(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return monitor, _train(monitor, model, 400)

    monitor, trained = run(0.02)
    first_check = trained.checks[0].step
    assert monitor.check_every >= 5 * every  # the budget spaced the checks out
    alarms = [r for r in trained.checks if r.alarm]
    assert alarms
    assert alarms[0].reason.name == "DETECTOR"
    assert "collapsed" in alarms[0].message
    # each collapsed check brought the next one interval on (no trial check at 128 rows: the first one counts)
    assert alarms[0].step == first_check + every * (COLLAPSED_CHECKS - 1)
    assert monitor.summary()["pulled_checks"] >= COLLAPSED_CHECKS - 1

    plain, _ = run(None)
    assert plain.summary()["pulled_checks"] == 0


class _FixedSchedule(CollapseMonitorCore):
    """The budget's decisions fixed (they follow measured times otherwise): the per-step values read 1 step in 7 and
    scored in batches, the gradient norm at 1 read in 2, checks 4 intervals apart with unit checks between."""

    def _schedule_next(self, step: int, check_s: float) -> None:
        self._budget_mark = (time.perf_counter(), self.time_spent_s, step)
        self._trial_samples = None
        if not self._host_batch:
            self._host_batch = True
            self._reads().read_every = HOST_READ_EVERY
            self._urgent_above = self.detector.urgent_above()  # type: ignore[union-attr]
        self.observe_every, self.grad_every = 7, 2
        self.check_every = 4 * self.every_n_train_steps
        self._next_check = step + self.check_every


def _without_times(value: object) -> str:
    """``value`` as JSON without what measures time (NaN equal to NaN)."""

    def strip(item: object) -> object:
        if isinstance(item, dict):
            return {k: strip(v) for k, v in item.items() if k not in ("overhead", "time_s", "seconds")}
        if isinstance(item, list):
            return [strip(v) for v in item]
        return item

    return json.dumps(strip(value), sort_keys=True, default=repr)


@pytest.mark.parametrize("jump_at", [None, 520])
def test_steps_in_a_quiet_stretch_end_at_once_and_change_nothing(
    monkeypatch: pytest.MonkeyPatch, jump_at: int | None
) -> None:
    """Between reads, checks and capture windows, `prepare_step`, `step_grad_norm` and `observe_step` take a short
    path (`_quiet_until`): the same run with that path turned off computes the same gradient norms at the same steps,
    runs the same checks and unit checks, alarms at the same step and ends in the same state."""

    def run() -> tuple[Trained, dict[str, object], dict[str, object]]:
        monitor = _FixedSchedule("1", every_n_train_steps=20, max_samples=128)
        monitor.attach(model := _mlp())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trained = _train(monitor, model, 640, jump_at=jump_at)
        return trained, monitor.state_dict(), monitor.summary()

    quick, quick_state, quick_summary = run()
    quiet_steps = [s for s in range(1, 641) if s not in quick.normed]
    stretches: list[int] = []
    original = _FixedSchedule._quiet_until

    def counted(self: CollapseMonitorCore, step: int) -> int:
        end = original(self, step)
        stretches.append(end - step)
        return end

    monkeypatch.setattr(_FixedSchedule, "_quiet_until", counted)
    run()
    assert sum(stretches) > 300  # most steps after the first STEP_WINDOW are in a quiet stretch
    monkeypatch.setattr(_FixedSchedule, "_quiet_until", lambda self, step: step)  # every step the long way
    full, full_state, full_summary = run()
    assert quick.normed == full.normed
    assert len(quiet_steps) > 300
    assert all(c.report is not None for c in quick.checks if jump_at is None or c.step < jump_at)
    assert [s for s, _ in quick.fired] == [s for s, _ in full.fired]
    assert [c.step for c in quick.checks] == [c.step for c in full.checks]
    assert len(quick.checks) >= 6
    assert quick_summary["unit_checks"] == full_summary["unit_checks"] > 0
    assert _without_times(quick_state) == _without_times(full_state)
    assert _without_times(quick_summary) == _without_times(full_summary)
    if jump_at is not None:
        assert quick.fired
        assert quick.fired[0][0] >= jump_at


def test_the_stride_plans_what_unread_steps_and_every_step_still_cost() -> None:
    """`step_stride` with the cost of a step not read (``unread_s``) and of every step (``fixed_s``, the loss read and
    the unit checks): the stride it returns keeps the planned per-step cost within what the budget allows a step, and
    one less would not; when every step's own cost leaves nothing, the most."""
    from topo_callbacks.core.budget import step_stride

    budget, longest, check_s = 0.016, 5000, 0.007
    cases = 0
    for step_s, read_s, unread_s, fixed_s in itertools.product(
        (0.0004, 0.001, 0.005), (30e-6, 60e-6, 200e-6), (0.0, 1e-6, 3e-6), (0.0, 2e-6, 5e-6)
    ):
        k = step_stride(check_s, read_s, step_s, budget, longest, unread_s, fixed_s)
        allowed = (budget * step_s - check_s * (1.0 - budget) / longest) / (1.0 - budget)

        def planned(stride: int) -> float:
            return fixed_s + (read_s + unread_s * (stride - 1)) / stride  # noqa: B023

        if k == 1:
            assert read_s + fixed_s <= STRIDE_FROM * budget * step_s  # every step kept while it is cheap enough
        elif k < MAX_STRIDE:
            cases += 1
            assert planned(k) <= allowed * (1 + 1e-9)
            assert planned(k - 1) > allowed
        else:
            assert planned(MAX_STRIDE - 1) > allowed
        assert k >= step_stride(check_s, read_s, step_s, budget, longest)  # never fewer than with no such costs
    assert cases > 5


def test_the_hooks_copies_count_as_the_monitors_own_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The armed hook's work (select, pool, copy) is the monitor's: the window a check or a unit check takes adds its
    seconds to ``time_spent_s`` (a check's, which `_schedule_next` plans with) or to the unit checks' share, so that the
    budget plans for it. A `select` made slow (0.12 s per armed forward, more than a check of this model) shows it."""
    sleep_s = 0.12
    armed: list[int] = []

    def slow_select(out: torch.Tensor) -> torch.Tensor:
        armed.append(1)
        time.sleep(sleep_s)
        return out

    windows: dict[str, list[tuple[int, float]]] = {"check": [], "unit": []}  # (armed forwards, seconds counted)
    taken = [0]
    run_check, units_check = _FixedSchedule.run_check, _FixedSchedule._units_check

    def check(self: CollapseMonitorCore, step: int) -> CheckResult:
        n, before = len(armed) - taken[0], self.time_spent_s
        result = run_check(self, step)
        taken[0] = len(armed)
        windows["check"].append((n, self.time_spent_s - before))
        return result

    def unit(self: CollapseMonitorCore, step: int) -> CheckResult | None:
        n, before = len(armed) - taken[0], self._unit_spent_s
        result = units_check(self, step)
        taken[0] = len(armed)
        windows["unit"].append((n, self._unit_spent_s - before))
        return result

    monkeypatch.setattr(_FixedSchedule, "run_check", check)
    monkeypatch.setattr(_FixedSchedule, "_units_check", unit)
    monitor = _FixedSchedule("1", every_n_train_steps=20, max_samples=64, select=slow_select)
    monitor.attach(model := _mlp())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _train(monitor, model, 240)
    assert len(windows["check"]) >= 3
    assert len(windows["unit"]) >= 3
    for kind, held in windows.items():
        assert all(n >= 1 for n, _ in held), kind  # every window held an armed forward
        assert all(counted >= sleep_s * n for n, counted in held), (kind, held)


def _decaying_run(
    rate: Callable[[int], float], steps: int, broken_from: int | None, load_at: int | None = None
) -> tuple[CollapseMonitorCore, list[int], list[int]]:
    """`_train`'s regression read 1 step in 7 (`_FixedSchedule`), at the rate ``rate(step)`` (a schedule the monitor
    is told of), its targets noise from step ``broken_from`` on (a data bug; None: never); before step ``load_at`` the
    monitor loads its own state (as a resume or a rollback's restore does). Returns the monitor, the steps whose
    gradient norm it computed, the steps at which `observe_step` returned an alarm."""
    monitor = _FixedSchedule("1", every_n_train_steps=20, max_samples=128)
    model = _mlp()
    monitor.attach(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(0)
    normed, fired = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(1, steps + 1):
            lr = rate(step)
            for group in opt.param_groups:
                group["lr"] = lr
            if step == load_at:
                monitor.load_state_dict(monitor.state_dict())
            monitor.prepare_step(step)
            x = torch.randn(64, 16, generator=gen)
            broken = broken_from is not None and step >= broken_from
            target = 30 * torch.randn(64, 4, generator=gen) if broken else x[:, :4]
            loss = (model(x) - target).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            grad = monitor.step_grad_norm(model.parameters(), step)
            if grad is not None:
                normed.append(step)
            opt.step()
            monitor.add_loss(loss)
            if monitor.observe_step(step, grad_norm=grad, lr=lr) is not None:
                fired.append(step)
            if monitor.is_check_step(step):
                monitor.run_check(step)
    assert monitor.observe_every == 7
    return monitor, normed, fired


def _alarmed_soon_after(monitor: CollapseMonitorCore, fired: list[int], broken_from: int) -> None:
    assert fired, "the late data bug did not alarm"
    assert monitor.detector is not None
    start = monitor.detector.episodes[0]["start"]
    assert broken_from <= start <= broken_from + 7, monitor.detector.episodes
    assert start <= fired[0] < start + HOST_READ_EVERY  # returned with the batch it was scored in


def test_the_steps_after_a_decay_are_read_in_full_so_a_late_failure_still_alarms() -> None:
    """Read 1 step in 7 (the budget of a sub-millisecond step), a linear decay to 0 restarts the detector's references
    at every fall by `LR_EVENT`, ever closer together (at about 300, 500, 640, 730, 790, ... of 900 steps). The steps
    after each restart are read in full, each with its gradient norm (`_refill_after_restart`), so the references hold
    `STEP_MIN_REFERENCE` values again within that many steps: targets broken at step 750 (a data bug late in the run)
    alarm within a few steps (returned with the batch of reads it is scored in). Read at the stride alone, the
    references never refilled between restarts after step ~600 and that run never alarmed."""
    from topo_callbacks.core.detector import STEP_MIN_REFERENCE

    steps, broken_from = 900, 750
    monitor, normed, fired = _decaying_run(lambda step: 0.05 * (1 - (step - 1) / steps), steps, broken_from)
    restarts = [step for step, why in monitor.summary()["reference_restarts"] if why == "lr"]
    assert len(restarts) >= 6, restarts
    for restart in [r for r in restarts if r + 7 + STEP_MIN_REFERENCE <= steps]:
        # known at the first read after it (a batch is scored then), then every step read
        after = [s for s in normed if s > restart]
        assert after[:STEP_MIN_REFERENCE] == list(range(after[0], after[0] + STEP_MIN_REFERENCE)), (restart, after)
        assert after[0] - restart <= 7
    _alarmed_soon_after(monitor, fired, broken_from)


def test_the_tail_of_a_decay_to_zero_is_scored() -> None:
    """A cosine to 0 over 1000 steps: its falls by `LR_EVENT` come every few steps through its last ~5%, and each
    restarted the references, so that stretch was never scored; once the references were learned under
    `LR_EVENT_FLOOR` (1%) of the peak rate a fall restarts nothing (the updates are too small to move the levels they
    hold): targets broken at step 980 (the rate at 0.1% of its peak) alarm within a few steps."""
    from topo_callbacks.core.detector import LR_EVENT_FLOOR

    steps, broken_from = 1000, 980
    rate = lambda step: 0.05 * 0.5 * (1 + math.cos(math.pi * (step - 1) / steps))  # noqa: E731
    monitor, _, fired = _decaying_run(rate, steps, broken_from)
    restarts = [step for step, why in monitor.summary()["reference_restarts"] if why == "lr"]
    assert restarts, "the decay restarted no reference"
    assert all(rate(step) >= LR_EVENT_FLOOR * 0.05 for step in restarts[:-1]), restarts  # the last crosses it
    assert restarts[-1] < broken_from - 20, restarts
    _alarmed_soon_after(monitor, fired, broken_from)


def test_the_tail_of_a_short_decay_is_scored() -> None:
    """A cosine to 0 over 300 steps (a short fine-tune): from about step 190 its falls by `LR_EVENT` came faster than a
    reference refills (every 7-11 steps at the end), each restarted the references, and nothing was scored there
    until `LR_EVENT_FLOOR`. A fall now waits until `LR_EVENT_GAP` steps after the last restart: the references
    restart every 40 steps or more, refill and score in between, and targets broken at step 260 (15 steps after a
    restart, the rate at 6% of its peak) alarm within a few steps."""
    from topo_callbacks.core.detector import LR_EVENT_GAP

    steps, broken_from = 300, 260
    rate = lambda step: 0.05 * 0.5 * (1 + math.cos(math.pi * (step - 1) / steps))  # noqa: E731
    monitor, _, fired = _decaying_run(rate, steps, broken_from)
    restarts = [step for step, why in monitor.summary()["reference_restarts"] if why == "lr"]
    assert len(restarts) >= 4, restarts
    assert all(b - a >= LR_EVENT_GAP for a, b in itertools.pairwise(restarts)), restarts
    assert fired, "the data bug in the decay's tail did not alarm"
    assert monitor.detector is not None
    assert broken_from <= monitor.detector.episodes[0]["start"] <= broken_from + 7, monitor.detector.episodes


def test_a_rate_event_among_queued_reads_is_scored_at_once() -> None:
    """CPU reads scored in batches, 1 step in 7: a rise of the rate (read at step 308) and then a fall from it by more
    than `LR_EVENT` (0.1 -> 0.06, read at 315) sit in one batch. The detector's own state is the last batch's (0.05),
    under which 0.06 is no event; carried over the queued rates, it is one: the batch is scored at 315 and the steps
    after it read in full (`observes`: what an adapter asks before it computes the gradient norm), not from when its
    batch filled, 7 reads later."""
    from topo_callbacks.core.detector import STEP_MIN_REFERENCE

    monitor = CollapseMonitorCore("0", max_overhead=None)
    read = []
    for step in range(1, 360):
        if step == 201:  # what the budget does on a sub-millisecond step
            monitor._host_batch = True
            monitor._reads().read_every = HOST_READ_EVERY
            monitor._urgent_above = monitor.detector.urgent_above()  # type: ignore[union-attr]
            monitor.observe_every = 7
        lr = 0.05 if step < 308 else (0.1 if step < 315 else 0.06)
        if monitor.observes(step):
            read.append(step)
        monitor.observe_step(step, loss=1.0 + 0.01 * (step % 5), grad_norm=2.0 + 0.01 * (step % 3), lr=lr)
    assert monitor.summary()["reference_restarts"] == [[315, "lr"]]
    assert [s for s in read if 300 < s <= 315] == [301, 308, 315]
    assert [s for s in read if 315 < s <= 315 + STEP_MIN_REFERENCE] == list(range(316, 316 + STEP_MIN_REFERENCE))
    assert [s for s in read if s > 335] == [336, 343, 350, 357]  # strided again


def test_a_rate_event_among_rows_batched_by_read_every_n_steps_is_scored_at_once() -> None:
    """The same rates as above, in one process with ``read_every_n_steps=8`` on the CPU (the batched path a device's
    values take, not the budget's host batches): the event at 315 is judged on the rates queued since the last batch
    was scored, so the batch is scored there and the steps after it read in full."""
    from topo_callbacks.core.detector import STEP_MIN_REFERENCE

    monitor = CollapseMonitorCore("0", max_overhead=None, read_every_n_steps=8)
    read = []
    for step in range(1, 360):
        if step == 201:
            monitor.observe_every = 7
        lr = 0.05 if step < 308 else (0.1 if step < 315 else 0.06)
        if monitor.observes(step):
            read.append(step)
        monitor.observe_step(step, loss=1.0 + 0.01 * (step % 5), grad_norm=2.0 + 0.01 * (step % 3), lr=lr)
    assert not monitor._host_batch
    assert monitor.summary()["reference_restarts"] == [[315, "lr"]]
    assert [s for s in read if 315 < s <= 315 + STEP_MIN_REFERENCE] == list(range(316, 316 + STEP_MIN_REFERENCE))


def test_a_loaded_state_does_not_take_its_restarts_for_new_ones() -> None:
    """A monitor read 1 step in 7 whose references restarted at a decay (step ~300) loads its own state at step 500
    (as a resume or a rollback's restore does): the restart it holds is not a new one, so no steps are read in full
    after the load (they were after a restart: 20 in a row)."""
    from topo_callbacks.core.detector import STEP_MIN_REFERENCE

    monitor, normed, _ = _decaying_run(lambda step: 0.05 if step < 300 else 0.01, 600, None, load_at=500)
    restarts = [step for step, why in monitor.summary()["reference_restarts"] if why == "lr"]
    assert len(restarts) == 1, restarts
    assert 300 <= restarts[0] <= 307
    after_restart = [s for s in normed if restarts[0] < s <= restarts[0] + 7 + STEP_MIN_REFERENCE]
    assert len(after_restart) >= STEP_MIN_REFERENCE  # the refill after the decay
    after_load = [s for s in normed if 500 <= s < 500 + STEP_MIN_REFERENCE]
    assert len(after_load) <= 3, after_load  # strided: the gradient norm at 1 read in 2 of 1 step in 7


@pytest.mark.slow
def test_every_rank_reads_the_same_steps_after_a_restart(tmp_path: Path) -> None:
    """Two processes read 1 step in 7 (the gradient norm at 1 read in 2; their values all-reduced in batches of 4
    reads) under a linear decay to 0: every restart of the references is found at the same batch on both ranks, both
    read the same 20 steps in full after it, compute the gradient norm at the same steps and end with the same
    detector state (rank 1's steps are slower: its own timings differ)."""
    fixed = textwrap.dedent(
        """
        class Fixed(CollapseMonitorCore):
            def _schedule_next(self, step, check_s):  # the budget's decisions fixed, alike on every rank
                self._budget_mark = (time.perf_counter(), self.time_spent_s, step)
                self._trial_samples = None
                self.observe_every, self.grad_every = 7, 2
                self.check_every = 4 * self.every_n_train_steps
                self._next_check = step + self.check_every
        """
    )
    imports = "from tests.procs import finish_distributed\n"
    loop = (
        "normed = []\n"
        "for step in range(1, 401):\n"
        "    lr = 0.05 * (1 - (step - 1) / 400)\n"
        "    for group in opt.param_groups:\n"
        "        group['lr'] = lr"
    )
    observe = (
        "monitor.observe_step(step, loss=loss.detach(), grad_norm=monitor.step_grad_norm(model.parameters(), step))"
    )
    observed = (
        "grad = monitor.step_grad_norm(model.parameters(), step)\n"
        "    normed += [step] if grad is not None else []\n"
        "    monitor.observe_step(step, loss=loss.detach(), grad_norm=grad, lr=lr)"
    )
    written = '"unit_checks": monitor.unit_checks,'
    also = ' "normed": normed, "restarts": monitor.summary()["reference_restarts"],'
    script = (
        DDP_SCRIPT.replace(imports, imports + fixed)
        .replace("monitor = CollapseMonitorCore(", "monitor = Fixed(")
        .replace("for step in range(1, 301):", loop)
        .replace(observe, observed)
        .replace(written, written + also)
    )
    assert script.count("Fixed(") == 2
    assert "normed += " in script
    assert '"restarts"' in script
    run_script(script, tmp_path, launcher="torchrun", timeout=300)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["observe_every"] == r1["observe_every"] == 7
    assert r0["restarts"] == r1["restarts"]
    restarts = [step for step, why in r0["restarts"] if why == "lr"]
    assert len(restarts) >= 4, restarts
    assert r0["normed"] == r1["normed"]
    normed = set(r0["normed"])
    for restart in [
        r for r in restarts if 200 < r <= 340
    ]:  # after the first STEP_WINDOW, room for a batch and 20 steps
        # found at the batch it is read in (4 reads of 1 step in 7), then 20 steps in a row read in full
        runs = [s for s in range(restart, restart + 5 * 7 + 1) if all(s + i in normed for i in range(20))]
        assert runs, (restart, str(sorted(s for s in normed if restart <= s <= restart + 60)))
    assert r0["detector"] == r1["detector"]
