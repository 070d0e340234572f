"""topo_callbacks.core.rollback: snapshots, exact restore, the learning-rate factor, the ring and the give-up rule.

Real torch objects throughout (modules, SGD/AdamW, the LR schedulers, ``GradScaler("cpu")``), no mocks.
"""

from __future__ import annotations

import copy
import gc
import io
import json
import math
import random
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from topo_callbacks.core.rollback import (
    RISE_KEPT,
    FrameworkStorage,
    RollbackController,
    RollbackPolicy,
    RollbackReason,
    TrainingState,
    cusum_onset,
    resolve_on_alarm,
)
from topo_callbacks.functional.detector import cusum

# ----------------------------------------------------------------------------------------------------------------------
# a small training setup: conv + batch norm (buffers) + dropout (RNG), data fixed by the step number
# ----------------------------------------------------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(torch.relu(self.bn(self.conv(x))))
        return self.head(h.flatten(1))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(8, 2, 5, 5, generator=g), torch.randint(0, 3, (8,), generator=g)


SCHEDULERS = ("none", "lambda", "step", "cosine", "onecycle")


def make_scheduler(kind: str, opt: torch.optim.Optimizer, total: int = 60) -> Any:
    sched = torch.optim.lr_scheduler
    if kind == "none":
        return None
    if kind == "lambda":
        return sched.LambdaLR(opt, lambda t: 1.0 / (1.0 + 0.1 * t))
    if kind == "step":
        return sched.StepLR(opt, step_size=3, gamma=0.7)
    if kind == "cosine":
        return sched.CosineAnnealingLR(opt, T_max=7, eta_min=0.003)  # eta_min > 0: not a pure scale of base_lr
    if kind == "onecycle":
        return sched.OneCycleLR(opt, max_lr=0.2, total_steps=total)
    raise AssertionError(kind)


class Run:
    """One model, optimizer, scheduler and scaler, seeded; ``step()`` trains on ``batch(data_step)``."""

    def __init__(self, opt: str = "sgd", sched: str = "step", scaler: bool = True, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = Net()
        params = self.model.parameters()
        if opt == "sgd":
            self.opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4)
        elif opt == "plain":
            self.opt = torch.optim.SGD(params, lr=0.1)
        else:
            self.opt = torch.optim.AdamW(params, lr=0.01, weight_decay=0.05)
        self.sched = make_scheduler(sched, self.opt)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2) if scaler else None
        self.data_step = 0

    def state(self, **kw: Any) -> TrainingState:
        schedulers = [] if self.sched is None else [self.sched]
        return TrainingState(self.model, self.opt, schedulers, self.scaler, **kw)

    def step(self, data_step: int | None = None) -> float:
        x, y = batch(self.data_step if data_step is None else data_step)
        self.data_step += 1
        loss = nn.functional.cross_entropy(self.model(x), y)
        self.opt.zero_grad()
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()
        if self.sched is not None:
            self.sched.step()
        return float(loss.detach())

    def copies(self) -> dict[str, Any]:
        """Deep copies of every state_dict and of the RNG states (the reference a restore must reproduce)."""
        return {
            "model": copy.deepcopy(self.model.state_dict()),
            "opt": copy.deepcopy(self.opt.state_dict()),
            "sched": None if self.sched is None else copy.deepcopy(self.sched.state_dict()),
            "scaler": None if self.scaler is None else copy.deepcopy(self.scaler.state_dict()),
            "rng": (random.getstate(), np.random.get_state(), torch.get_rng_state()),
        }


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Bit-identical trees: tensors equal in dtype, shape, device and every bit; containers and plain values equal."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device), where
        assert torch.equal(a.view(torch.uint8) if a.dtype == torch.bool else a, b), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b), where
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float), where
        assert math.isnan(b), where
    else:
        assert a == b, where


def assert_restored(run: Run, ref: dict[str, Any], rng: bool = True) -> None:
    assert_same(run.model.state_dict(), ref["model"], "model")
    assert_same(run.opt.state_dict(), ref["opt"], "optimizer")
    if run.sched is not None:
        assert_same(run.sched.state_dict(), ref["sched"], "scheduler")
    if run.scaler is not None:
        assert_same(run.scaler.state_dict(), ref["scaler"], "scaler")
    if rng:
        assert_same((random.getstate(), np.random.get_state(), torch.get_rng_state()), ref["rng"], "rng")
    # the optimizer still updates the model's own parameters, and its state is keyed by them, on their device
    params = list(run.model.parameters())
    assert all(p is q for p, q in zip(run.opt.param_groups[0]["params"], params, strict=True))
    assert all(any(p is q for q in params) for p in run.opt.state)
    for p, st in run.opt.state.items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor) and key != "step":
                assert value.device == p.device


def record_lr(opt: torch.optim.Optimizer) -> list[float]:
    """The learning rate each ``step()`` of ``opt`` actually uses (a step pre-hook, registered after any other)."""
    seen: list[float] = []
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(o.param_groups[0]["lr"]))
    return seen


# ----------------------------------------------------------------------------------------------------------------------
# exact restore
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_restore_is_bit_identical_to_a_deepcopy(opt: str) -> None:
    run = Run(opt=opt, sched="step")
    for _ in range(3):
        run.step()
    state = run.state(extra=lambda: {"detector": {"s_pos": 0.0, "episodes": [1, 2]}})
    snap = state.snapshot(step=3)
    ref = run.copies()
    for _ in range(4):  # moves weights, moments, the schedule, the scale and the generators
        run.step()
        random.random(), np.random.rand(), torch.rand(1)
    assert run.scaler is not None
    assert run.scaler.get_scale() != ref["scaler"]["scale"]
    extra = state.restore(snap)
    assert_restored(run, ref)
    assert extra == {"detector": {"s_pos": 0.0, "episodes": [1, 2]}}
    # the snapshot's buffers were not handed to the optimizer: train, restore again, same state
    for _ in range(3):
        run.step()
    state.restore(snap)
    assert_restored(run, ref)


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_restore_into_an_optimizer_without_state(opt: str) -> None:
    """Snapshot one run, restore into a fresh one (no optimizer state yet): the missing tensors are created."""
    source = Run(opt=opt, sched="onecycle")
    for _ in range(3):
        source.step()
    snap = source.state().snapshot(step=3)
    ref = source.copies()
    target = Run(opt=opt, sched="onecycle", seed=7)
    assert target.opt.state_dict()["state"] == {}
    target.state().restore(snap)
    assert_restored(target, ref)
    target.step()
    source.state().restore(snap)  # the target's training did not touch the snapshot
    assert_restored(source, ref, rng=False)


def test_restore_without_rng_leaves_the_generators() -> None:
    run = Run()
    state = run.state()
    snap = state.snapshot(step=0)
    torch.rand(3)
    after = torch.get_rng_state()
    state.restore(snap, rng=False)
    assert torch.equal(torch.get_rng_state(), after)


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_training_after_restore_equals_training_from_the_copy(opt: str) -> None:
    a = Run(opt=opt, sched="cosine")
    for _ in range(4):
        a.step()
    state = a.state()
    snap = state.snapshot(step=4)
    ref = a.copies()
    for _ in range(5):
        a.step()  # diverge
    state.restore(snap)
    a.data_step = 4
    losses_a = [a.step() for _ in range(6)]

    b = Run(opt=opt, sched="cosine", seed=123)  # other initial weights: everything comes from the copies
    b.model.load_state_dict(ref["model"])
    b.opt.load_state_dict(copy.deepcopy(ref["opt"]))
    b.sched.load_state_dict(copy.deepcopy(ref["sched"]))
    assert b.scaler is not None
    b.scaler.load_state_dict(ref["scaler"])
    random.setstate(ref["rng"][0])
    np.random.set_state(ref["rng"][1])
    torch.set_rng_state(ref["rng"][2])
    b.data_step = 4
    losses_b = [b.step() for _ in range(6)]

    assert losses_a == losses_b  # bit for bit
    assert_same(a.model.state_dict(), b.model.state_dict())
    assert_same(a.opt.state_dict(), b.opt.state_dict())


def test_snapshots_change_nothing() -> None:
    plain = Run(opt="adamw")  # seeds the generators: dropout draws the same masks in both runs
    for _ in range(1, 13):
        plain.step()
    watched = Run(opt="adamw")
    ctl = RollbackController(watched.state(), RollbackPolicy(snapshot_every=2, keep=2))
    for step in range(1, 13):
        watched.step()
        ctl.maybe_snapshot(step, quiet=step % 5 != 0)
    assert ctl.stats()["taken"] >= 5  # the ring filled and buffers were reused
    assert_same(plain.model.state_dict(), watched.model.state_dict())
    assert_same(plain.opt.state_dict(), watched.opt.state_dict())
    assert_same(plain.scaler.state_dict(), watched.scaler.state_dict())  # type: ignore[union-attr]


# ----------------------------------------------------------------------------------------------------------------------
# the learning-rate factor
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", SCHEDULERS)
def test_lr_factor_persists_on_top_of_the_schedule(kind: str) -> None:
    reference = Run(opt="plain", sched=kind, scaler=False)
    ref_lr = record_lr(reference.opt)
    for _ in range(40):
        reference.step()

    run = Run(opt="plain", sched=kind, scaler=False)
    ctl = RollbackController(run.state(), RollbackPolicy(lr_factor=0.5, snapshot_every=4))
    seen = record_lr(run.opt)
    pos = 0  # the schedule's position: it rewinds with the scheduler at a rollback, the step counter does not
    pos_at: dict[int, int] = {}  # schedule position at each snapshot (by the counter's step)
    starts: list[tuple[int, int]] = []  # (index in `seen`, schedule position) at each rollback
    for step in range(1, 31):
        run.step()
        pos += 1
        if ctl.maybe_snapshot(step, quiet=True) is not None:
            pos_at[step] = pos
        if step in (10, 22):
            decision = ctl.rollback(onset_step=step - 1, alarm_step=step, channel="loss")
            assert decision.action == "rollback"
            assert decision.entry is not None
            pos = pos_at[decision.entry["restored_step"]]
            starts.append((len(seen), pos))
            assert run.opt.param_groups[0]["lr"] == ref_lr[pos]  # outside a step: the schedule's own rate
    assert ctl.total_factor == 0.25
    (i1, p1), (i2, p2) = starts
    assert seen[:i1] == ref_lr[:i1]  # before the first rollback: the schedule itself
    # after each rollback: the schedule from the restored position on, times the cumulative factor
    assert seen[i1:i2] == [lr * 0.5 for lr in ref_lr[p1 : p1 + i2 - i1]]
    assert seen[i2:] == [lr * 0.25 for lr in ref_lr[p2 : p2 + len(seen) - i2]]
    assert len(seen) - i2 >= 8


def test_lr_factor_scales_the_actual_update() -> None:
    run = Run(opt="plain", sched="none", scaler=False)
    ctl = RollbackController(run.state(), RollbackPolicy(lr_factor=0.3))
    ctl.snapshot(0)
    run.step()
    ctl.rollback(onset_step=1, alarm_step=1, channel="loss")
    x, y = batch(99)
    run.opt.zero_grad()
    nn.functional.cross_entropy(run.model(x), y).backward()
    before = [p.detach().clone() for p in run.model.parameters()]
    grads = [p.grad.clone() for p in run.model.parameters()]  # type: ignore[union-attr]
    run.opt.step()
    for p, b, g in zip(run.model.parameters(), before, grads, strict=True):
        assert torch.equal(p.detach(), b.add(g, alpha=-(0.1 * 0.3)))
    assert run.opt.param_groups[0]["lr"] == 0.1
    ctl.remove_hooks()
    seen = record_lr(run.opt)
    run.step()
    assert seen == [0.1]


@pytest.mark.parametrize("restore_undoes_it", [False, True])
def test_a_first_rollback_undoes_a_rate_rise_the_restore_left(restore_undoes_it: bool) -> None:
    """The rate goes 0.1 -> 5.0 (50x) at step 6 and the alarm comes after it: with the rate written at every step (a
    schedule computed from the step count, which a rollback does not rewind), the retry's first step finds it still
    50x the highest rate before the onset, and the factor brings it down to `RISE_KEPT` (4) times 0.1 (0.08, not a
    quarter: 1.25 would be 12.5x); written once (the restore puts the old rate back), the policy's quarter applies.
    Either way the entry and the state dict say what was taken, and the second rollback multiplies by a quarter."""
    run = Run(opt="plain", sched="none", scaler=False)
    ctl = RollbackController(run.state(), RollbackPolicy(snapshot_every=4))
    seen = record_lr(run.opt)
    for step in range(1, 9):
        if step == 6 or (step > 6 and not restore_undoes_it):
            run.opt.param_groups[0]["lr"] = 5.0
        run.step()
        ctl.maybe_snapshot(step, quiet=step < 6)
    ctl.rollback(onset_step=6, alarm_step=8, channel="loss", healthy_rate=0.1)
    assert ctl.rate_cap == 0.1  # pending until the retry's first step
    assert ctl.state_dict()["rate_cap"] == 0.1
    if not restore_undoes_it:
        run.opt.param_groups[0]["lr"] = 5.0  # the loop sets its rate again
    run.step()
    assert ctl.rate_cap is None
    (entry,) = ctl.rollbacks
    if restore_undoes_it:
        assert seen[-1] == pytest.approx(0.1 * 0.25)
        assert (entry["lr_factor"], ctl.total_factor) == (0.25, 0.25)
        assert "rate_rise" not in entry
    else:
        assert seen[-1] == pytest.approx(RISE_KEPT * 0.1)
        assert entry["lr_factor"] == pytest.approx(RISE_KEPT / 50)
        assert ctl.total_factor == pytest.approx(RISE_KEPT / 50)
        assert entry["rate_rise"] == pytest.approx(50)
    fresh = RollbackController(Run(opt="plain", sched="none", scaler=False).state())
    fresh.load_state_dict(ctl.state_dict())
    assert fresh.state_dict() == ctl.state_dict()
    before = ctl.total_factor
    ctl.rollback(onset_step=9, alarm_step=9, channel="loss", healthy_rate=0.1)
    run.opt.param_groups[0]["lr"] = 5.0
    run.step()
    assert ctl.total_factor == pytest.approx(before * 0.25)  # later rollbacks: lr_factor only
    assert ctl.rollbacks[-1]["lr_factor"] == 0.25


def test_undo_rate_rise_can_be_turned_off() -> None:
    run = Run(opt="plain", sched="none", scaler=False)
    ctl = RollbackController(run.state(), RollbackPolicy(snapshot_every=4, undo_rate_rise=False))
    for step in range(1, 6):
        run.step()
        ctl.maybe_snapshot(step, quiet=True)
    ctl.rollback(onset_step=5, alarm_step=5, channel="loss", healthy_rate=0.01)
    assert ctl.rate_cap is None
    run.step()
    assert ctl.total_factor == 0.25
    with pytest.raises(ValueError, match="`undo_rate_rise` must be True or False"):
        RollbackPolicy(undo_rate_rise=1)  # type: ignore[arg-type]


def test_lr_factor_survives_a_step_that_raises() -> None:
    run = Run(opt="plain", sched="none", scaler=False)
    ctl = RollbackController(run.state(), RollbackPolicy(lr_factor=0.5))
    ctl.snapshot(0)
    ctl.rollback(onset_step=1, alarm_step=1, channel="loss")
    seen = record_lr(run.opt)

    def closure() -> torch.Tensor:
        raise RuntimeError("loss computation failed")

    with pytest.raises(RuntimeError, match="loss computation failed"):
        run.opt.step(closure)  # type: ignore[arg-type]
    run.step()
    assert seen == [0.05, 0.05]  # the next step is not scaled twice
    assert run.opt.param_groups[0]["lr"] == 0.1


def test_hooks_do_not_keep_the_controller_alive() -> None:
    run = Run(opt="plain", sched="none", scaler=False)
    ctl = RollbackController(run.state())
    ctl.snapshot(0)
    ref = weakref.ref(ctl)
    del ctl
    gc.collect()
    assert ref() is None
    run.step()  # the orphaned hooks apply a factor of 1


# ----------------------------------------------------------------------------------------------------------------------
# the ring: when snapshots are taken, which one is chosen, buffer reuse
# ----------------------------------------------------------------------------------------------------------------------


def test_ring_takes_snapshots_while_quiet_and_keeps_the_newest() -> None:
    run = Run(scaler=False)
    ctl = RollbackController(run.state(), RollbackPolicy(snapshot_every=10, keep=3, lr_factor=0.5))
    taken = []
    for step in range(1, 61):
        if ctl.maybe_snapshot(step, quiet=not 20 <= step <= 24) is not None:
            taken.append(step)
    assert taken == [1, 11, 25, 35, 45, 55]  # the one due at 21 waited for the detector to be quiet
    assert [s.step for s in ctl.snapshots] == [35, 45, 55]
    assert ctl.choose(46).step == 45  # type: ignore[union-attr]
    assert ctl.choose(45).step == 35  # type: ignore[union-attr]  # strictly before the onset
    assert ctl.choose(35) is None
    lookback = RollbackController(run.state(), RollbackPolicy(min_lookback=5))
    lookback._ring.extend(ctl.snapshots)
    assert lookback.choose(50).step == 35  # type: ignore[union-attr]  # before 50 - 5
    assert lookback.choose(51).step == 45  # type: ignore[union-attr]

    decision = ctl.rollback(onset_step=50, alarm_step=58, channel="cusum/loss")
    assert decision.entry == {
        "step": 58,
        "restored_step": 45,
        "onset": 50,
        "channel": "cusum/loss",
        "lr_factor": 0.5,
        "total_factor": 0.5,
    }
    assert [s.step for s in ctl.snapshots] == [35, 45]  # 55 may hold the failure: dropped
    assert ctl.maybe_snapshot(59, quiet=True) is None  # the clock restarts after a rollback
    assert ctl.maybe_snapshot(68, quiet=True) is None
    assert ctl.maybe_snapshot(69, quiet=True) is not None
    assert ctl.stats()["bytes_spare"] == 0  # the dropped snapshot's buffers went to this one


def test_full_ring_reuses_the_oldest_buffers() -> None:
    run = Run(opt="adamw")
    ctl = RollbackController(run.state(), RollbackPolicy(snapshot_every=1, keep=2))
    run.step()  # AdamW's moments exist from the first step on
    first = ctl.snapshot(1)
    ptrs = {t.data_ptr() for t in first._buffers.values()}
    run.step()
    ctl.snapshot(2)
    run.step()
    third = ctl.snapshot(3)  # evicts the first
    assert {t.data_ptr() for t in third._buffers.values()} == ptrs  # its buffers, no new allocation
    with pytest.raises(ValueError, match="`snapshot`"):
        run.state().restore(first)
    stats = ctl.stats()
    params = sum(p.numel() * 4 for p in run.model.parameters())
    assert stats["snapshots"] == 2
    assert stats["taken"] == 3
    # model (params + buffers) and AdamW's two moments: at least three times the parameters, per snapshot
    assert all(s["bytes"] >= 3 * params for s in stats["per_snapshot"])
    assert stats["bytes_held"] == sum(s["bytes"] for s in stats["per_snapshot"])
    assert stats["mean_ms"] > 0
    assert stats["last_ms"] > 0


# ----------------------------------------------------------------------------------------------------------------------
# giving up
# ----------------------------------------------------------------------------------------------------------------------


def test_gives_up_after_max_rollbacks() -> None:
    run = Run(scaler=False)
    ctl = RollbackController(run.state(), RollbackPolicy(max_rollbacks=2, snapshot_every=5, lr_factor=0.5))
    actions = []
    for step in range(1, 40):
        run.step()
        ctl.maybe_snapshot(step, quiet=True)
        if step in (12, 24, 36):
            actions.append(ctl.rollback(onset_step=step - 2, alarm_step=step, channel="grad_norm"))
    assert [d.action for d in actions] == ["rollback", "rollback", "stop"]
    stop = actions[-1]
    assert stop.reason is RollbackReason.MAX_ROLLBACKS
    assert stop.entry is None
    assert "after 2 rollbacks" in stop.message
    assert "configuration" in stop.message
    assert "lower learning rate" in stop.message
    assert "fresh data" in stop.message
    assert ctl.num_rollbacks == 2  # the stop lowered nothing
    assert ctl.total_factor == 0.25


@pytest.mark.parametrize("restore", [True, False])
def test_giving_up_restores_the_last_healthy_snapshot_unless_told_not_to(restore: bool) -> None:
    """`restore_on_stop`: the run stops on the newest snapshot older than the onset (the weights it then leaves are
    that snapshot's, bit for bit), not on the weights the failure left; False keeps those."""
    run = Run(scaler=False)
    policy = RollbackPolicy(max_rollbacks=1, snapshot_every=5, restore_on_stop=restore, lr_factor=0.5)
    ctl = RollbackController(run.state(), policy)
    kept: dict[int, dict[str, torch.Tensor]] = {}
    stop = None
    for step in range(1, 30):
        run.step()
        if ctl.maybe_snapshot(step, quiet=True) is not None:
            kept[step] = {k: v.clone() for k, v in run.model.state_dict().items()}
        if step == 12:
            assert ctl.rollback(onset_step=11, alarm_step=12, channel="loss").action == "rollback"
        if step == 27:
            stop = ctl.rollback(onset_step=26, alarm_step=27, channel="loss")
            break  # the run stops here
    assert stop is not None
    assert stop.action == "stop"
    assert stop.reason is RollbackReason.MAX_ROLLBACKS
    now = run.model.state_dict()
    healthy = max(s for s in kept if s < 26)
    if restore:
        assert ctl.restored_on_stop == healthy
        assert f"step {healthy} restored" in stop.message
        assert all(torch.equal(now[k], v) for k, v in kept[healthy].items())
    else:
        assert ctl.restored_on_stop is None
        assert stop.message.endswith("Stopping.")
        assert not all(torch.equal(now[k], v) for k, v in kept[healthy].items())
    assert ctl.total_factor == 0.5  # one rollback's cut: the stop lowers nothing


@pytest.mark.parametrize("restore", [True, False])
def test_a_failure_back_with_no_older_snapshot_left_gives_up_with_the_diagnosis(restore: bool) -> None:
    """Returns whose change point lies at or before the snapshot they came back from pass it over and can use up the
    ring before ``max_rollbacks``. The stop then carries the configuration diagnosis (`RollbackReason.CAME_BACK`)
    and, with ``restore_on_stop``, leaves the oldest snapshot held (the state the last retry started from), not the
    failed weights."""
    run = Run(scaler=False)
    policy = RollbackPolicy(snapshot_every=5, keep=2, restore_on_stop=restore, lr_factor=0.5)
    ctl = RollbackController(run.state(), policy)
    kept: dict[int, dict[str, torch.Tensor]] = {}
    for step in range(1, 13):  # snapshots at 1, 6, 11: the ring keeps 6 and 11
        run.step()
        if ctl.maybe_snapshot(step, quiet=True) is not None:
            kept[step] = {k: v.clone() for k, v in run.model.state_dict().items()}
    first = ctl.rollback(onset_step=11, alarm_step=12, channel="loss")
    assert first.entry is not None
    assert first.entry["restored_step"] == 6
    run.step()
    stop = ctl.rollback(onset_step=6, alarm_step=14, channel="loss")  # back at once: 6 is suspect, nothing older
    assert stop.action == "stop"
    assert stop.reason is RollbackReason.CAME_BACK
    assert "after 1 rollback," in stop.message
    assert "no older snapshot is left" in stop.message
    assert "configuration" in stop.message
    now = run.model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in kept[6].items()) is restore
    assert ctl.restored_on_stop == (6 if restore else None)
    assert ctl.total_factor == 0.5  # the stop lowers nothing


def test_stops_with_nothing_healthy_to_go_back_to() -> None:
    run = Run(scaler=False)
    ctl = RollbackController(run.state(), RollbackPolicy(snapshot_every=10))
    first = ctl.rollback(onset_step=None, alarm_step=3, channel="loss")
    assert first.action == "stop"
    assert first.reason is RollbackReason.NO_SNAPSHOT
    assert "no snapshot taken yet" in first.message
    ctl.maybe_snapshot(5, quiet=True)
    late = ctl.rollback(onset_step=5, alarm_step=8, channel="loss")  # taken at the onset: not before it
    assert late.reason is RollbackReason.NO_SNAPSHOT
    assert "[5]" in late.message
    assert ctl.rollbacks == []
    assert ctl.total_factor == 1.0


def test_a_slow_drift_older_than_every_snapshot_goes_back_to_the_oldest() -> None:
    """A CUSUM onset on a drifting channel is loose: when it lies more than a snapshot interval before the alarm and
    before every snapshot held, the oldest held is restored (not a stop); an abrupt alarm right after the only
    snapshot still stops."""
    run = Run(scaler=False)
    ctl = RollbackController(run.state(), RollbackPolicy(snapshot_every=10, keep=2, lr_factor=0.5))
    for step in (1, 11, 21):  # the ring keeps 11 and 21
        ctl.maybe_snapshot(step, quiet=True)
    assert [snap.step for snap in ctl.snapshots] == [11, 21]
    drift = ctl.rollback(onset_step=5, alarm_step=40, channel="b0_fraction")
    assert drift.action == "rollback"
    assert drift.entry is not None
    assert drift.entry["restored_step"] == 11
    assert ctl.total_factor == 0.5
    # the failure comes back: the snapshot just restored is suspect, an abrupt alarm does not go back to it again;
    # with nothing older held, the policy gives up with the configuration diagnosis
    again = ctl.rollback(onset_step=11, alarm_step=45, channel="loss", detector_onset=44)
    assert again.reason is RollbackReason.CAME_BACK
    # nor does a drift to the same snapshot
    assert ctl.rollback(onset_step=11, alarm_step=60, channel="b0_fraction").reason is RollbackReason.CAME_BACK
    assert ctl.num_rollbacks == 1
    abrupt = RollbackController(Run(scaler=False).state(), RollbackPolicy(snapshot_every=10))
    abrupt.maybe_snapshot(5, quiet=True)
    assert abrupt.rollback(onset_step=5, alarm_step=8, channel="loss").reason is RollbackReason.NO_SNAPSHOT


# ----------------------------------------------------------------------------------------------------------------------
# plain-data state
# ----------------------------------------------------------------------------------------------------------------------


def test_state_dict_roundtrips_through_weights_only_load(tmp_path: Path) -> None:
    run = Run(opt="plain", sched="lambda", scaler=False)
    ctl = RollbackController(run.state(), RollbackPolicy(lr_factor=0.5, snapshot_every=2))
    for step in range(1, 12):
        run.step()
        ctl.maybe_snapshot(step, quiet=True)
        if step in (5, 9):
            ctl.rollback(onset_step=step, alarm_step=step, channel="loss")
    buffer = io.BytesIO()
    torch.save({"rollback": ctl.state_dict()}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["rollback"]
    assert loaded == ctl.state_dict()
    assert loaded["num_rollbacks"] == 2
    assert loaded["total_factor"] == 0.25

    resumed = Run(opt="plain", sched="lambda", scaler=False)
    fresh = RollbackController(resumed.state())
    fresh.load_state_dict(loaded)
    assert fresh.state_dict() == ctl.state_dict()
    seen = record_lr(resumed.opt)
    resumed.step()
    assert seen == [0.1 * 0.25]  # the factor is back on the resumed run's optimizer


# ----------------------------------------------------------------------------------------------------------------------
# framework storage: handles only
# ----------------------------------------------------------------------------------------------------------------------


def test_framework_storage_keeps_handles_and_deletes_evicted(tmp_path: Path) -> None:
    run = Run(opt="sgd", sched="step")
    sched, scaler = run.sched, run.scaler
    assert sched is not None
    assert scaler is not None

    def save(step: int) -> str:
        path = tmp_path / f"ckpt-{step}.pt"
        torch.save({"model": run.model.state_dict(), "opt": run.opt.state_dict(), "sched": sched.state_dict(),
                    "scaler": scaler.state_dict()}, path)  # fmt: skip
        return str(path)

    def load(handle: str) -> None:
        ckpt = torch.load(handle, weights_only=True)
        run.model.load_state_dict(ckpt["model"])
        run.opt.load_state_dict(ckpt["opt"])
        sched.load_state_dict(ckpt["sched"])
        scaler.load_state_dict(ckpt["scaler"])

    def delete(handle: str) -> None:
        Path(handle).unlink()

    policy = RollbackPolicy(storage="framework", snapshot_every=3, keep=2)
    ctl = RollbackController(
        run.state(extra=lambda: {"step": run.data_step}), policy, framework=FrameworkStorage(save, load, delete)
    )
    refs = {}
    for step in range(1, 12):
        run.step()
        if ctl.maybe_snapshot(step, quiet=True) is not None:
            refs[step] = run.copies()
    assert [s.step for s in ctl.snapshots] == [7, 10]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-10.pt", "ckpt-7.pt"]  # 1 and 4 deleted
    assert all(s.models == [] and isinstance(s.handle, str) for s in ctl.snapshots)
    decision = ctl.rollback(onset_step=10, alarm_step=11, channel="loss")
    assert decision.entry["restored_step"] == 7  # type: ignore[index]
    assert decision.extra == {"step": 7}
    assert_restored(run, refs[7], rng=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-7.pt"]


# ----------------------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"lr_factor": 0.0}, "lr_factor"),
        ({"lr_factor": 1.5}, "lr_factor"),
        ({"lr_factor": float("nan")}, "lr_factor"),
        ({"lr_factor": "0.5"}, "lr_factor"),
        ({"max_rollbacks": 0}, "max_rollbacks"),
        ({"max_rollbacks": 2.0}, "max_rollbacks"),
        ({"max_rollbacks": True}, "max_rollbacks"),
        ({"snapshot_every": 0}, "snapshot_every"),
        ({"keep": 0}, "keep"),
        ({"min_lookback": -1}, "min_lookback"),
        ({"storage": "disk"}, "storage"),
        ({"storage": "framework", "dirpath": 3}, "dirpath"),
        ({"storage": "framework", "dirpath": ""}, "dirpath"),
        ({"dirpath": "/tmp/snapshots"}, "dirpath"),  # memory snapshots are written nowhere
    ],
)
def test_policy_validation_names_the_argument(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=f"`{name}` must be"):
        RollbackPolicy(**kwargs)


def test_policy_is_frozen_and_plain() -> None:
    policy = RollbackPolicy(lr_factor=1, keep=np.int64(2))  # type: ignore[arg-type]
    assert policy.lr_factor == 1.0
    assert type(policy.keep) is int
    with pytest.raises(AttributeError):
        policy.keep = 4  # type: ignore[misc]
    assert RollbackPolicy(**policy.as_dict()) == policy
    on_disk = RollbackPolicy(storage="framework", dirpath=Path("/tmp/snapshots"))  # type: ignore[arg-type]
    assert on_disk.dirpath == "/tmp/snapshots"  # a str: the policy stays plain data (JSON in the HF state)
    assert RollbackPolicy(**json.loads(json.dumps(on_disk.as_dict()))) == on_disk


@pytest.mark.parametrize(
    ("on_alarm", "stop_on_alarm", "expected"),
    [
        (None, False, ("warn", None)),
        (None, True, ("stop", None)),
        ("warn", False, ("warn", None)),
        ("warn", True, ("stop", None)),
        ("stop", False, ("stop", None)),
        ("stop", True, ("stop", None)),
        ("rollback", False, ("rollback", RollbackPolicy())),
        (RollbackPolicy(keep=1), False, ("rollback", RollbackPolicy(keep=1))),
        ({"lr_factor": 0.1}, False, ("rollback", RollbackPolicy(lr_factor=0.1))),
    ],
)
def test_resolve_on_alarm(on_alarm: Any, stop_on_alarm: bool, expected: tuple[str, Any]) -> None:
    assert resolve_on_alarm(on_alarm, stop_on_alarm) == expected


@pytest.mark.parametrize(
    ("on_alarm", "stop_on_alarm", "name"),
    [
        ("restart", False, "on_alarm"),
        ("Stop", False, "on_alarm"),
        (1, False, "on_alarm"),
        ({"lr": 0.1}, False, "on_alarm"),
        ("rollback", True, "stop_on_alarm=True` conflicts with `on_alarm"),
        (RollbackPolicy(), True, "stop_on_alarm=True` conflicts with `on_alarm"),
        ("warn", "yes", "stop_on_alarm"),
    ],
)
def test_resolve_on_alarm_errors_name_the_argument(on_alarm: Any, stop_on_alarm: Any, name: str) -> None:
    with pytest.raises(ValueError, match=f"`{name}"):
        resolve_on_alarm(on_alarm, stop_on_alarm)


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda run: RollbackController(run.state(), RollbackPolicy(storage="framework")), "framework"),
        (
            lambda run: RollbackController(run.state(), framework=FrameworkStorage(lambda s: s, lambda h: None)),
            "framework",
        ),
        (lambda run: RollbackController(run.state(), policy="rollback"), "policy"),  # type: ignore[arg-type]
        (lambda run: RollbackController(run.model), "state"),
        (lambda run: TrainingState(run.model, optimizers=[run.model]), "optimizers"),
        (lambda run: TrainingState(run.model, schedulers=[object()]), "schedulers"),
        (lambda run: FrameworkStorage(save="ckpt", load=print), "save"),  # type: ignore[arg-type]
    ],
)
def test_constructors_name_the_argument(make: Callable[[Run], Any], name: str) -> None:
    with pytest.raises(ValueError, match=f"`{name}`"):
        make(Run(scaler=False))


# ----------------------------------------------------------------------------------------------------------------------
# onset
# ----------------------------------------------------------------------------------------------------------------------


def test_cusum_onset_is_the_last_zero_before_the_alarm() -> None:
    z = [0.1, -0.3, 0.2] * 7 + [2.0] * 6  # the shift starts at index 21
    pos, _ = cusum(z, k=0.5)
    steps = range(100, 100 + len(z))
    alarm = next(s for s, v in zip(steps, pos, strict=True) if v >= 4.0)
    assert (
        cusum_onset(list(zip(steps, pos.tolist(), strict=True)), alarm_step=alarm) == 120
    )  # index 20: last in control
    assert cusum_onset([(1, 0.0), (2, 0.5), (3, 0.0), (4, 0.2)], alarm_step=2) == 1  # later entries are not read
    assert cusum_onset([(1, 0.0), (2, -0.5), (3, -1.5)]) == 1  # a negative-side accumulator
    assert cusum_onset([(1, 0.0), (2, math.inf), (3, math.nan)]) == 1
    assert cusum_onset([(1, 1e-9), (2, 0.4)], tol=1e-6) == 1
    assert cusum_onset([(1, 0.2), (2, 0.4)]) is None
    assert cusum_onset([]) is None


# ----------------------------------------------------------------------------------------------------------------------
# CUDA: pinned buffers, reuse, restore onto the device (runs where a GPU is present)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_snapshots_use_pinned_buffers_and_restore_onto_the_device() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.Linear(64, 8)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda")

    def step() -> None:
        x = torch.randn(32, 64, device="cuda")
        with torch.autocast("cuda", dtype=torch.float16):
            loss = model(x).float().pow(2).mean()
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    step()
    ctl = RollbackController(TrainingState(model, opt, scaler=scaler), RollbackPolicy(keep=1, snapshot_every=1))
    snap = ctl.snapshot(1)
    ref = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), copy.deepcopy(scaler.state_dict()))
    assert all(t.is_pinned() for t in snap._buffers.values() if t.numel() > 1)
    ptrs = {t.data_ptr() for t in snap._buffers.values()}
    step()
    second = ctl.snapshot(2)
    assert {t.data_ptr() for t in second._buffers.values()} == ptrs
    second.wait()
    assert second.device_ms is not None
    ref2 = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), copy.deepcopy(scaler.state_dict()))
    for _ in range(3):
        step()
    decision = ctl.rollback(onset_step=3, alarm_step=5, channel="loss")
    assert decision.action == "rollback"
    assert_same(model.state_dict(), ref2[0])
    assert_same(opt.state_dict(), ref2[1])
    assert_same(scaler.state_dict(), ref2[2])
    assert all(v.is_cuda for st in opt.state.values() for k, v in st.items() if k != "step")
    assert ref[0].keys() == ref2[0].keys()
