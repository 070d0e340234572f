"""Train a family's arms from one shared prefix, recording every channel a detector may use.

A seed's run is trained once up to ``t0`` with the monitor attached; model, optimizer, generators, batch streams,
the global RNG, the monitor's state and the series recorded so far are snapshotted; every arm then continues from
that same snapshot. The arms differ only after ``t0``, which is also what makes "lead" well defined.

Recorded, per optimizer step: the loss (the mean over the step's micro-batches), the global gradient norm (before
the step, unscaled and before any clipping), the scheduled learning rate, per parameter group the update norm
||delta theta|| and the weight norm ||theta|| (after the step), the watched layer's activation RMS, for the attention
layers of the transformer families the max attention logit and the minimum per-head attention entropy, and for a
task with a loss scaler the scale each step used and the steps the scaler skipped. Per check: the monitor's full
history row, and the consecutive-check channels of a fixed probe embedded beside it (the monitor itself watches the
training stream). Per evaluation: the task metric and the validation loss. Costs: the mean training step, the
per-step channels and the checks, in seconds.

The monitor is fed, per optimizer step, the values the record holds (loss, gradient norm, learning rate, and whether
a loss scaler skipped the step). A task whose switched arm restarts its monitor (`Task.fresh_monitor`: a fine-tuning
run from a checkpoint of the weights) gets a new monitor at ``t0``; ``RunRecord.monitor_restart`` says so.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from typing import Any

import torch
from torch import Tensor

from topo_callbacks.bench.families import Attention, Family
from topo_callbacks.bench.tasks import Task

__all__ = ["RunRecord", "train_arms"]


@dataclasses.dataclass
class RunRecord:
    """What one arm of one seed recorded, as plain data (JSON-ready)."""

    family: str
    arm: str
    seed: int
    steps: int
    t0: int
    loss: list[float]
    grad_norm: list[float]
    lr: list[float]
    #: per step, per parameter group
    update_norm: list[list[float]]
    weight_norm: list[list[float]]
    act_rms: list[float]
    attn_max_logit: list[float]
    attn_min_entropy: list[float]
    #: (step, task metric, validation loss)
    evals: list[tuple[int, float, float]]
    checks: list[dict[str, Any]]
    monitor_alarm_step: int | None
    #: per check, measured beside the monitor: the objective's curvature along its gradient on a fixed batch over the
    #: optimizer's stability level (``curvature_ratio``), and the consecutive-check channels of a fixed probe (up to
    #: 256 held-out inputs, embedded in eval mode at the watched layer; from the second check on)
    side_checks: list[dict[str, float]] = dataclasses.field(default_factory=list)
    #: optimizer steps (1-based) whose update a loss scaler skipped (its scale fell at that step's update: the
    #: gradients were not finite, and the weights did not move)
    skipped_steps: list[int] = dataclasses.field(default_factory=list)
    #: per step, the loss scale the step's backward used (empty without a scaler)
    loss_scale: list[float] = dataclasses.field(default_factory=list)
    #: optimizer steps (1-based) at which some parameter tensor's gradient was exactly 0 while others' were not (the
    #: dead-layer rule's input); None in records written before it was recorded
    layer_lost_steps: list[int] | None = dataclasses.field(default_factory=list)
    #: the step after which the live monitor was a fresh one (a fine-tuning run started from a checkpoint of the
    #: weights: the switched arm's monitor starts at ``t0`` without the run's past); None: one monitor throughout
    monitor_restart: int | None = None
    step_s: float = 0.0
    channels_s: float = 0.0
    monitor_s: float = 0.0
    wall_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        data = dict(data)
        data["evals"] = [tuple(e) for e in data["evals"]]
        data.setdefault("layer_lost_steps", None)  # a record from before the dead-layer rule: not known
        return cls(**data)

    @property
    def key(self) -> str:
        return f"{self.family}/{self.arm}/{self.seed}"


class _Recorder:
    """The per-step channels of one run, with their cost."""

    def __init__(self, task: Task, family: Family, arm: str, seed: int, steps: int, t0: int) -> None:
        self.rec = RunRecord(family.name, arm, seed, steps, t0, [], [], [], [], [], [], [], [], [], [], None, [])
        self.task = task
        self._rms: list[float] = []
        self._attention = [m for m in task.model.modules() if isinstance(m, Attention)]
        self.probe = task.probe_inputs()
        self.previous_probe: tuple[Tensor, tuple[float, ...]] | None = None
        #: the wall clock (``time.perf_counter``) at the end of each optimizer step: the time a rollback discarded
        self.clock: dict[int, float] = {}

    def side_check(self, step: int) -> None:
        """Beside the monitor's check: the curvature of the objective along its gradient on a fixed batch (over the
        optimizer's stability level), and how a fixed probe's examples moved since the previous check."""
        from topo_callbacks.core import resolve_layer
        from topo_callbacks.core.detector import gradient_curvature
        from topo_callbacks.core.probe import embed_probe
        from topo_callbacks.functional import (
            contracted_pairs,
            h0_death_scales,
            h0_diagram_distance,
            neighbourhood_preservation,
        )

        task, model = self.task, self.task.model
        entry: dict[str, float] = {"step": step}
        curvature = gradient_curvature(model, lambda m: task.fixed_batch_loss(), task.optimizer)
        entry["curvature_ratio"] = curvature["curvature_ratio"]
        rows = embed_probe(model, resolve_layer(model, task.layer), self.probe, task.pool).float()
        previous, self.previous_probe = self.previous_probe, None
        if bool(torch.isfinite(rows).all()):
            deaths = h0_death_scales(rows)
            self.previous_probe = (rows, deaths)
            if previous is not None:
                entry["knn_preservation"] = neighbourhood_preservation(previous[0], rows, 10)
                entry["contracted_pairs"] = contracted_pairs(previous[0], rows, 10)
                entry["h0_distance"] = h0_diagram_distance(previous[1], deaths)
        self.rec.side_checks.append(entry)

    def hook(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        if module.training and isinstance(output, Tensor):
            self._rms.append(float(output.detach().float().pow(2).mean().sqrt()))

    def before_step(self) -> list[list[Tensor]]:
        return [[p.detach().clone() for p in g["params"]] for g in self.task.optimizer.param_groups]

    def after_step(
        self, loss: float, grad_norm: float, prev: list[list[Tensor]], loss_scale: float | None = None
    ) -> None:
        rec = self.rec
        rec.loss.append(loss)
        rec.grad_norm.append(grad_norm)
        if loss_scale is not None:
            rec.loss_scale.append(loss_scale)
        groups = self.task.optimizer.param_groups
        rec.lr.append(float(groups[0]["lr"]))
        upd, wn = [], []
        for group, before in zip(groups, prev, strict=True):
            params = group["params"]
            upd.append(
                math.sqrt(sum(float((p.detach() - b).pow(2).sum()) for p, b in zip(params, before, strict=True)))
            )
            wn.append(math.sqrt(sum(float(p.detach().pow(2).sum()) for p in params)))
        rec.update_norm.append(upd)
        rec.weight_norm.append(wn)
        rec.act_rms.append(sum(self._rms) / len(self._rms) if self._rms else math.nan)
        self._rms = []
        if self._attention:
            rec.attn_max_logit.append(max(m.max_logit for m in self._attention))
            rec.attn_min_entropy.append(min(m.min_entropy for m in self._attention))
        else:
            rec.attn_max_logit.append(math.nan)
            rec.attn_min_entropy.append(math.nan)


def _monitor(task: Task, family: Family, on_alarm: Any = "warn", calibration: Any = None) -> Any:
    from topo_callbacks.core import CollapseMonitorCore

    # the monitor's current defaults (the CUSUM detector at a 5% false-alarm rate): its live alarm is recorded;
    # every term and channel is recorded too, so any other rule, weighting or calibration is replayed exactly
    # every check recorded (no overhead budget): the replays space them out where a question needs it
    monitor = CollapseMonitorCore(
        task.layer,
        every_n_train_steps=family.check_every,
        max_samples=512,
        pool=task.pool,
        max_overhead=None,
        on_alarm=on_alarm,
    )
    if calibration is not None:
        # the rollback arm acts on its alarms live, so its detector must be the held-out fit (the shipped one saw this
        # family's calibration seeds); users pick a shipped rate, so the monitor has no argument for this
        monitor._calibration = calibration
        monitor._reset_state()
    return monitor


def _train(task: Task, family: Family, monitor: Any, recorder: _Recorder, first: int, last: int) -> None:
    """Optimizer steps ``first..last`` (1-based, inclusive), with evaluations and checks on their schedules."""
    from topo_callbacks.core import resolve_layer

    model, opt, rec, scaler = task.model, task.optimizer, recorder.rec, task.scaler
    base = [g.setdefault("initial_lr", g["lr"]) for g in opt.param_groups]
    # on_alarm="rollback" (the rollback arm): the monitor snapshots and restores these objects; a no-op otherwise
    if monitor.rollback_controller is None:
        monitor.track(models=model, optimizers=opt, scaler=scaler)
    handle = resolve_layer(model, task.layer).register_forward_hook(recorder.hook)
    try:
        model.train()
        for step in range(first, last + 1):
            task.switched = recorder.rec.arm != "healthy" and step - 1 >= task.t0
            if task.switched and step - 1 == task.t0:
                task.on_fork()
                if task.optimizer is not opt or task.scaler is not scaler:
                    # a new optimizer or loss scaler (a fine-tuning run, a new scaler): what a rollback restores now
                    monitor.track(models=model, optimizers=task.optimizer, scaler=task.scaler)
                opt, scaler = task.optimizer, task.scaler
                base = [g.setdefault("initial_lr", g["lr"]) for g in opt.param_groups]
            factor = task.lr_factor(step - 1)
            for group, lr in zip(opt.param_groups, base, strict=True):
                group["lr"] = lr * factor
            monitor.prepare_step(step)
            tick = time.perf_counter()
            micro = task.micro_batches(step - 1)
            opt.zero_grad(set_to_none=True)
            losses = []
            for _ in range(micro):
                loss = task.step_loss(step - 1)
                losses.append(float(loss.detach()))
                if micro > 1:
                    loss = loss / micro
                (loss if scaler is None else scaler.scale(loss)).backward()
            scale = None if scaler is None else float(scaler.get_scale())
            if scaler is not None:
                scaler.unscale_(opt)  # the norm a user's hook reads: unscaled (not finite when the step is skipped)
            rec.step_s += time.perf_counter() - tick
            tick = time.perf_counter()
            grads = [p.grad.detach().pow(2).sum() for p in model.parameters() if p.grad is not None]
            grad_norm = float(torch.stack(grads).sum().sqrt()) if grads else 0.0
            # per-tensor norms for the monitor's dead-layer rule and layer diagnosis, as `step_grad_norm` keeps them
            monitor.record_layer_norms(model.parameters(), step)
            lost = bool(grads) and any(float(g) == 0.0 for g in grads)
            if lost and rec.layer_lost_steps is not None:
                rec.layer_lost_steps.append(step)
            prev = recorder.before_step()
            rec.channels_s += time.perf_counter() - tick
            tick = time.perf_counter()
            if task.clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), task.clip_norm)
            skipped = False
            if scaler is None or scale is None:
                opt.step()
            else:
                scaler.step(opt)
                scaler.update()
                skipped = float(scaler.get_scale()) < scale  # the scaler backs off exactly when it skipped
            task.after_step(step - 1)
            rec.step_s += time.perf_counter() - tick
            tick = time.perf_counter()
            mean_loss = losses[0] if micro == 1 else math.fsum(losses) / micro
            recorder.after_step(mean_loss, grad_norm, prev, scale)
            if skipped:
                rec.skipped_steps.append(step)
            rec.channels_s += time.perf_counter() - tick
            # the live detector reads the same per-step values the record holds (its replay is then exact)
            tick = time.perf_counter()
            fired = monitor.observe_step(
                step,
                loss=rec.loss[-1],
                grad_norm=grad_norm,
                lr=rec.lr[-1],
                skipped=skipped,
                loss_scale=None if scaler is None else float(scaler.get_scale()),  # after the update: the next step's
            )
            rec.monitor_s += time.perf_counter() - tick
            checked = None
            if monitor.is_check_step(step):
                tick = time.perf_counter()
                checked = monitor.run_check(step)
                rec.monitor_s += time.perf_counter() - tick
                recorder.side_check(step)
            # on_alarm="rollback": a snapshot when one is due (after the check: its alarm blocks a snapshot); else a
            # no-op. A rollback itself happened inside `observe_step` or `run_check`, at this step boundary
            tick = time.perf_counter()
            monitor.after_step(step)
            rec.monitor_s += time.perf_counter() - tick
            stop = next((r for r in (fired, checked) if r is not None and r.should_stop), None)
            if step % family.eval_every == 0 or stop is not None:
                _evaluate(task, rec, step)  # a stopped run keeps the model it stopped with: its final metric
            recorder.clock[step] = time.perf_counter()
            if stop is not None:  # only a rollback that gave up stops a benchmark run (the other arms only warn)
                monitor.record_stop(step, stop)
                break
    finally:
        handle.remove()


def _evaluate(task: Task, rec: RunRecord, step: int) -> None:
    was = task.model.training
    task.model.eval()
    with torch.no_grad():
        metric, val_loss = task.evaluate()
    task.model.train(was)
    rec.evals.append((step, float(metric), float(val_loss)))


def train_prefix(family: Family, seed: int, quick: bool) -> dict[str, Any]:
    """Train seed ``seed`` of ``family`` up to ``t0``; returns the snapshot every arm starts from."""
    steps, t0 = family.schedule(quick)
    task = family.build(seed, t0)
    monitor = _monitor(task, family)
    recorder = _Recorder(task, family, "prefix", seed, steps, t0)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monitor.attach(task.model)
        _evaluate(task, recorder.rec, 0)
        _train(task, family, monitor, recorder, 1, t0)
        monitor.detach()
    recorder.rec.wall_s = time.perf_counter() - start
    return {
        "task": task.state(),
        "monitor": monitor.state_dict(),
        "record": recorder.rec.as_dict(),
        "initial_lr": [g["initial_lr"] for g in task.optimizer.param_groups],
        "previous_probe": recorder.previous_probe,
    }


def train_arm(family: Family, seed: int, quick: bool, arm: str, snapshot: dict[str, Any]) -> RunRecord:
    """Continue ``snapshot`` (from `train_prefix`) to the end of the run as ``arm``."""
    steps, t0 = family.schedule(quick)
    task = family.build(seed, t0)
    task.load(snapshot["task"])
    for group, lr in zip(task.optimizer.param_groups, snapshot["initial_lr"], strict=True):
        group["initial_lr"] = lr
    monitor = _monitor(task, family)
    monitor.load_state_dict(snapshot["monitor"])
    prefix = RunRecord.from_dict(snapshot["record"])
    prefix_checks = [dict(c) for c in monitor.history]
    prefix_alarm = monitor.first_alarm_step
    restart = arm != "healthy" and task.fresh_monitor
    if restart:  # a new run from a checkpoint of the weights: its monitor knows nothing of the run so far
        monitor = _monitor(task, family)
    recorder = _Recorder(task, family, arm, seed, steps, t0)
    recorder.rec = dataclasses.replace(
        prefix,
        arm=arm,
        loss=list(prefix.loss),
        grad_norm=list(prefix.grad_norm),
        lr=list(prefix.lr),
        update_norm=[list(u) for u in prefix.update_norm],
        weight_norm=[list(w) for w in prefix.weight_norm],
        act_rms=list(prefix.act_rms),
        attn_max_logit=list(prefix.attn_max_logit),
        attn_min_entropy=list(prefix.attn_min_entropy),
        evals=list(prefix.evals),
        checks=prefix_checks,
        side_checks=[dict(c) for c in prefix.side_checks],
        skipped_steps=list(prefix.skipped_steps),
        loss_scale=list(prefix.loss_scale),
        layer_lost_steps=None if prefix.layer_lost_steps is None else list(prefix.layer_lost_steps),
        monitor_restart=t0 if restart else None,
    )
    recorder.previous_probe = snapshot.get("previous_probe")
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monitor.attach(task.model)
        _train(task, family, monitor, recorder, t0 + 1, steps)
        monitor.detach()
    rec = recorder.rec
    rec.checks = (
        [*prefix_checks, *(dict(c) for c in monitor.history)] if restart else [dict(c) for c in monitor.history]
    )
    rec.monitor_alarm_step = prefix_alarm if restart and prefix_alarm is not None else monitor.first_alarm_step
    rec.wall_s = prefix.wall_s + time.perf_counter() - start
    return rec


def train_arms(family: Family, seed: int, quick: bool = False) -> list[RunRecord]:
    """Both arms of one seed of ``family``, forked from one shared prefix.

    Example:
        >>> from topo_callbacks.bench.families import FAMILIES
        >>> healthy, failure = train_arms(FAMILIES["classifier_lr"], seed=0, quick=True)
        >>> healthy.loss[:100] == failure.loss[:100], healthy.loss[-1] != failure.loss[-1]
        (True, True)
    """
    snapshot = train_prefix(family, seed, quick)
    return [train_arm(family, seed, quick, arm, snapshot) for arm in family.arms]
