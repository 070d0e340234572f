"""Acting on an alarm: snapshots of the training state, the onset estimate, and the rollback policy.

``on_alarm="warn" | "stop" | "rollback" | RollbackPolicy(...)`` (`resolve_on_alarm`) decides what the monitor does when
the detector fires. With a rollback, this module keeps a few recent snapshots of the training state taken while the
detector was quiet (`RollbackController.maybe_snapshot`), and at an alarm goes back to the newest one taken before the
estimated onset (`cusum_onset`), lowers the learning rate by ``lr_factor`` for the rest of the run, and lets training
continue on fresh data. A failure that survives ``max_rollbacks`` such retries is in the configuration (objective,
architecture, data), not in a bad batch or an unlucky step, and the controller then says "stop".

The module is framework-agnostic: `TrainingState` holds references to the live objects (models, optimizers,
schedulers, loss scaler) and copies their ``state_dict`` s; the adapters wire their framework's objects in and apply
the restore at a step boundary on every rank at once. The controller's own state (`RollbackController.state_dict`)
is plain data, loadable with ``torch.load(weights_only=True)``; the snapshots are not part of it (they are a cache
of the last few hundred steps, not a checkpoint).

Design decisions (see the class docstrings for details):

- **Learning-rate factor.** The factor is applied inside every ``optimizer.step()`` by a step pre-hook (the
  parameter groups' ``lr`` is multiplied by the cumulative factor) and undone, to the exact previous value, by a
  step post-hook, both registered when the controller is created (no-ops while the factor is 1; step hooks
  registered later see the rate the step uses). The user's schedule is therefore never touched: a scheduler's
  ``step()`` (closed form such as ``LambdaLR``/``OneCycleLR``, or chainable such as ``StepLR``/``CosineAnnealingLR``),
  a manual warm-up that writes ``group["lr"]``, or no scheduler at all keep computing their own learning rate, and
  every update uses ``factor * schedule``. A plain ``group["lr"] *= factor`` is lost at the next closed-form
  scheduler step and compounds under a chainable one; scaling ``base_lrs`` works for some schedulers and not others
  (``OneCycleLR`` keeps ``max_lr``/``min_lr`` in the groups, ``CosineAnnealingLR`` has an unscaled ``eta_min``). The
  checkpoints the user saves hold the schedule's own learning rate; the factor lives in the controller's
  ``state_dict`` and is re-applied on resume. Read from outside a step, ``group["lr"]`` is the schedule's value:
  loggers that read it show the schedule, and whoever logs the effective rate multiplies by
  `RollbackController.total_factor`.
- **Snapshots in memory.** Tensors are deep-copied to host memory: CUDA tensors into pinned CPU buffers with
  ``non_blocking=True`` (the copy overlaps with the next steps; a CUDA event marks its end and a restore waits for
  it), CPU tensors by a plain copy. A snapshot leaving the ring (evicted as the oldest, or dropped after a rollback)
  gives its buffers to the next snapshot, matched by position in the state tree, shape and dtype, so once the ring
  is full a snapshot allocates nothing; the memory held never exceeds ``keep`` snapshots.
- **Restore.** ``load_state_dict`` on the live objects (parameters are copied in place, the optimizer keeps its
  parameter references and moves its state to the parameters' devices). The optimizer is given its own state
  tensors, refilled from the snapshot in place (fresh copies where they do not match), never the snapshot's buffers
  (an optimizer adopts a tensor already on the parameter's device, and would then update the snapshot in place).
- **The schedule rewinds with the weights.** The scheduler is restored with the optimizer (their states must agree:
  a chainable scheduler computes the next rate from ``group["lr"]``). The framework's step counter and the data
  loaders are not rewound (fresh data), so a schedule that ends at ``max_steps`` ends that many steps short of its
  last value. The random-number generators are captured but, by default, not restored at a rollback
  (``restore_rng=False``): the retry should see fresh randomness as well as fresh data.
- **Framework storage** (``storage="framework"``): the adapter passes a `FrameworkStorage` (``save(step) -> handle``,
  ``load(handle)``, optional ``delete(handle)``) built on Lightning's ``save_checkpoint``, Accelerate's
  ``save_state`` or an HF checkpoint; the controller keeps the handles only (plus the small RNG and ``extra`` states).
"""

from __future__ import annotations

import copy
import math
import numbers
import os
import random
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from typing import Any, Literal, Protocol

import torch
from torch import nn
from torch.optim import Optimizer

from topo_callbacks._validation import as_real

__all__ = [
    "FrameworkStorage",
    "RollbackController",
    "RollbackDecision",
    "RollbackPolicy",
    "RollbackReason",
    "Snapshot",
    "TrainingState",
    "cusum_onset",
    "random_state",
    "resolve_on_alarm",
    "set_random_state",
]

OnAlarm = Literal["warn", "stop", "rollback"]
_ON_ALARM = ("warn", "stop", "rollback")

#: After a rollback, a watched layer whose effective rank falls under this share of the restored snapshot's (its last
#: check before the snapshot) for `RECOLLAPSE_CHECKS` checks in a row collapsed again at the lowered learning rate: the
#: policy stops with the configuration diagnosis (`RollbackReason.COLLAPSED_AGAIN`). Chosen on the benchmark's
#: calibration seeds (the rollback arm trained live there with each family's held-out fit): after its first rollback,
#: SimSiam without its stop-gradient (a slow second collapse the per-step channels learn as normal) had two checks in
#: a row at or under 0.38-0.42 of it in every seed; every other run that rolled back stayed at 0.52 or more at any
#: check (0.78 or more two in a row). 0.47 lies between; 0.4 (until 2026-12-05) missed the seed at 0.42, which then
#: rolled back again to a snapshot already on its way down and ran to its end.
RECOLLAPSE_RATIO = 0.47
RECOLLAPSE_CHECKS = 2
#: The watch lasts this many checks after the rollback: later, a representation that keeps changing for ordinary
#: reasons (a classifier's penultimate layer narrowing late in training) is not taken for a second collapse. On the
#: calibration seeds SimSiam's second collapse was caught 13-16 checks after its rollback.
RECOLLAPSE_WINDOW = 20
#: `RollbackPolicy.undo_rate_rise`: a first rollback whose retry would still train at more than this many times the
#: highest learning rate read before the onset (the schedule's rate times ``lr_factor``) brings it back to that many
#: times it. Chosen on the benchmark's calibration seeds between 1 (the healthy rate itself) and 4: at 1 the byte-level
#: LM whose rate rose 30x ended 4-5% over its healthy twin's perplexity (3 of 4 outside the 5% of a rescue; 1-2% under
#: it at a quarter, 7.5x, as the lost steps are made up), at 4 it ends as at a quarter (4 of 4), and the rate raised
#: 1000x is rescued by one rollback instead of three or four; nothing else changed there.
RISE_KEPT = 4.0
_STORAGE = ("memory", "framework")
_Path = tuple[Any, ...]


class _Stateful(Protocol):
    """Anything with ``state_dict()``/``load_state_dict()``: an LR scheduler, a ``GradScaler``."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state_dict: Any) -> Any: ...


# ----------------------------------------------------------------------------------------------------------------------
# Policy
# ----------------------------------------------------------------------------------------------------------------------


def _as_int(value: object, name: str, minimum: int, accepted: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        raise ValueError(f"`{name}` must be {accepted}; got {value!r} ({type(value).__name__}).")
    return int(value)


@dataclass(frozen=True)
class RollbackPolicy:
    """How ``on_alarm="rollback"`` recovers: snapshots, the learning-rate cut, and when to give up.

    Args:
        lr_factor: the learning rate is multiplied by this, in (0, 1], at each rollback, on top of the user's schedule
            and for the rest of the run (cumulative: after two rollbacks at 0.25 the run trains at 1/16 of the
            schedule). 1.0 retries at the same rate (fresh data only). The default 0.25 was chosen on the benchmark's
            calibration seeds among 0.5, 0.25 and 0.1 as the smallest factor whose clean runs lose no more to their
            false alarms than at 0.5 (0.1 rescues a little more and costs a healthy run on its loss plateau 85
            points); see docs/benchmark.md.
        max_rollbacks: rollbacks allowed over the run (an int >= 1); the next alarm stops the run with a diagnosis:
            a failure that survived that many retries with a lower learning rate and fresh data is in the
            configuration (objective, architecture, data). The default 4 (3 before 2026-12-04) was chosen on the
            benchmark's calibration seeds against 3: one more optimizer failure rescued (14 against 13 of 18: a
            learning rate 1000x too high needs four quarterings), as many configuration failures stopped with the
            diagnosis (12 of 15) and no more lost by clean runs' false alarms; each such stop costs one more retry.
        snapshot_every: optimizer steps between snapshots (an int >= 1); a due snapshot waits until the detector is
            quiet, so no snapshot holds a state the detector was already alarming on.
        keep: snapshots kept (an int >= 1), the newest; memory is ``keep`` copies of the model, optimizer and scaler
            state. With ``keep * snapshot_every`` steps of history the run can go back at most that far.
        min_lookback: restore a snapshot taken strictly before ``onset - min_lookback`` (an int >= 0): a margin for
            an onset estimated late.
        storage: ``"memory"`` (host-memory copies, `TrainingState`) or ``"framework"`` (the framework's own
            checkpoints through a `FrameworkStorage` the adapter provides: Lightning's ``trainer.save_checkpoint``,
            Accelerate's ``accelerator.save_state``; with a sharded state dict, as FSDP2's, each rank saves and
            restores its own shard). For models whose copies do not fit in host memory.
        dirpath: where framework storage writes its snapshots (a path, or None: ``rollback_snapshots`` under the
            Lightning Trainer's ``default_root_dir``, the HF Trainer's ``output_dir``, or the Accelerator's
            ``project_dir``, else the working directory). Every rank must see the same directory, as for the
            framework's own checkpoints. The snapshots left are deleted when training ends normally. Only with
            ``storage="framework"``.
        undo_rate_rise: at the first rollback, when the retry's first step would still train at more than
            `RISE_KEPT` (4) times the highest rate the run trained at before the alarm's onset (the schedule's rate
            times ``lr_factor``: the rate jumped as the failure began, and the restore did not put it back, as with a
            schedule computed from the step count, which a rollback does not rewind), that rollback's factor brings it
            down to 4 times that healthy rate instead: at a quarter, a rate 50x too high from step 40 and rolled back
            to step 1 (12.5x) plateaued in 3 of 4 runs outside the benchmark. A rise the restore undid (a rate written
            into the optimizer once, a scheduler rewound with the optimizer) keeps ``lr_factor``. Later rollbacks use
            ``lr_factor``. False: ``lr_factor`` at every rollback.
        restore_on_stop: when the policy gives up (after ``max_rollbacks``, or when the failure came back with no
            older snapshot left), restore the newest snapshot taken before the alarm's onset (or, with none, the
            oldest held) before the run stops (as Keras' ``EarlyStopping(restore_best_weights=True)``), so that
            the run leaves the last healthy weights rather than the failed ones (the learning rate is not lowered
            again). False: stop on the weights the failure left.

    Raises:
        ValueError: naming the argument and what it accepts.

    Example:
        >>> policy = RollbackPolicy(lr_factor=0.25, keep=2)
        >>> policy.lr_factor, policy.keep, policy.max_rollbacks, policy.restore_on_stop
        (0.25, 2, 4, True)
        >>> RollbackPolicy(lr_factor=2.0)
        Traceback (most recent call last):
            ...
        ValueError: `lr_factor` must be a number in (0, 1]; got 2.0.
    """

    lr_factor: float = 0.25
    max_rollbacks: int = 4
    snapshot_every: int = 100
    keep: int = 3
    min_lookback: int = 0
    storage: Literal["memory", "framework"] = "memory"
    restore_on_stop: bool = True
    dirpath: str | None = None
    undo_rate_rise: bool = True

    def __post_init__(self) -> None:
        factor = as_real(self.lr_factor, "lr_factor", "a number in (0, 1]")
        if not (math.isfinite(factor) and 0.0 < factor <= 1.0):
            raise ValueError(f"`lr_factor` must be a number in (0, 1]; got {self.lr_factor!r}.")
        object.__setattr__(self, "lr_factor", factor)
        object.__setattr__(
            self,
            "max_rollbacks",
            _as_int(self.max_rollbacks, "max_rollbacks", 1, "an int >= 1 (on_alarm='stop' for 0)"),
        )
        object.__setattr__(self, "snapshot_every", _as_int(self.snapshot_every, "snapshot_every", 1, "an int >= 1"))
        object.__setattr__(self, "keep", _as_int(self.keep, "keep", 1, "an int >= 1"))
        object.__setattr__(self, "min_lookback", _as_int(self.min_lookback, "min_lookback", 0, "an int >= 0"))
        if not isinstance(self.storage, str) or self.storage not in _STORAGE:
            raise ValueError(f"`storage` must be 'memory' or 'framework'; got {self.storage!r}.")
        if not isinstance(self.restore_on_stop, bool):
            raise ValueError(f"`restore_on_stop` must be True or False; got {self.restore_on_stop!r}.")
        if not isinstance(self.undo_rate_rise, bool):
            raise ValueError(f"`undo_rate_rise` must be True or False; got {self.undo_rate_rise!r}.")
        if self.dirpath is not None:
            if not isinstance(self.dirpath, (str, os.PathLike)) or not os.fspath(self.dirpath):
                raise ValueError(f"`dirpath` must be a path (str or os.PathLike) or None; got {self.dirpath!r}.")
            if self.storage != "framework":
                raise ValueError(
                    f"`dirpath` must be None unless storage='framework' (where it writes its snapshots); got"
                    f" dirpath={self.dirpath!r} with storage={self.storage!r}."
                )
            object.__setattr__(self, "dirpath", str(os.fspath(self.dirpath)))  # plain data (a JSON state)

    def as_dict(self) -> dict[str, Any]:
        """The policy as plain data (for a JSON config or a constructor argument that must be plain).

        Example:
            >>> RollbackPolicy(**RollbackPolicy(keep=5).as_dict()) == RollbackPolicy(keep=5)
            True
        """
        return asdict(self)


def resolve_on_alarm(
    on_alarm: str | RollbackPolicy | Mapping[str, Any] | None = None, stop_on_alarm: bool = False
) -> tuple[OnAlarm, RollbackPolicy | None]:
    """Resolve the monitor's ``on_alarm`` and the older ``stop_on_alarm`` into one action and, for a rollback, a policy.

    - ``None`` (not given) or ``"warn"``: warn and log; ``"stop"`` when ``stop_on_alarm=True`` (the older spelling
      keeps its meaning).
    - ``"stop"``: stop the run (the decision reduced over ranks).
    - ``"rollback"``: roll back with the default `RollbackPolicy`; a `RollbackPolicy`, or a mapping of its fields (a
      plain config, as the HF Trainer's callback state needs), rolls back with that policy.

    ``stop_on_alarm=True`` with a rollback is refused: the two ask for different actions.

    Raises:
        ValueError: for anything else, naming ``on_alarm`` (or ``stop_on_alarm``) and what is accepted.

    Example:
        >>> resolve_on_alarm("warn", stop_on_alarm=True)
        ('stop', None)
        >>> resolve_on_alarm(RollbackPolicy(lr_factor=0.1))[1].lr_factor
        0.1
        >>> resolve_on_alarm("restart")
        Traceback (most recent call last):
            ...
        ValueError: `on_alarm` must be 'warn', 'stop', 'rollback' or a RollbackPolicy; got 'restart' (str).
    """
    if isinstance(stop_on_alarm, bool) or (
        isinstance(stop_on_alarm, numbers.Integral) and int(stop_on_alarm) in (0, 1)
    ):
        stop = bool(stop_on_alarm)
    else:
        raise ValueError(
            f"`stop_on_alarm` must be True or False; got {stop_on_alarm!r} ({type(stop_on_alarm).__name__})."
        )
    policy: RollbackPolicy | None
    if on_alarm is None or (isinstance(on_alarm, str) and on_alarm in ("warn", "stop")):
        action: OnAlarm = "stop" if stop or on_alarm == "stop" else "warn"
        return action, None
    if isinstance(on_alarm, RollbackPolicy):
        policy = on_alarm
    elif isinstance(on_alarm, str) and on_alarm == "rollback":
        policy = RollbackPolicy()
    elif isinstance(on_alarm, Mapping):
        unknown = sorted(set(on_alarm) - {f.name for f in fields(RollbackPolicy)})
        if unknown:
            raise ValueError(f"`on_alarm` as a mapping must hold RollbackPolicy fields; got unknown key(s) {unknown}.")
        policy = RollbackPolicy(**on_alarm)
    else:
        raise ValueError(
            "`on_alarm` must be 'warn', 'stop', 'rollback' or a RollbackPolicy;"
            f" got {on_alarm!r} ({type(on_alarm).__name__})."
        )
    if stop:
        raise ValueError(
            "`stop_on_alarm=True` conflicts with `on_alarm` asking for a rollback: pass on_alarm='stop' to stop,"
            " or leave stop_on_alarm=False to roll back."
        )
    return "rollback", policy


# ----------------------------------------------------------------------------------------------------------------------
# Onset
# ----------------------------------------------------------------------------------------------------------------------


def cusum_onset(history: Iterable[tuple[int, float]], alarm_step: int | None = None, *, tol: float = 0.0) -> int | None:
    """The change point of a CUSUM alarm: the last step, at or before the alarm, where the accumulator was at zero.

    A one-sided CUSUM ``S_t = max(0, S_{t-1} + z_t - k)`` stays at zero while the channel is in control and climbs
    from the change on; the classical change-point estimate is the last time it left zero (Page 1954; Basseville and
    Nikiforov, "Detection of Abrupt Changes", 1993, section 2.2). The state at that step is the last one the channel
    had no evidence against, so a rollback goes to a snapshot taken strictly before it.

    Args:
        history: ``(step, accumulator)`` pairs in step order for the channel that fired (the side that fired, or
            ``max(S+, S-)``; a negative-side accumulator stored as negative numbers works too, the absolute value is
            used). Non-finite values count as not at zero.
        alarm_step: only entries at or before this step are read (None: all).
        tol: a value with ``|value| <= tol`` counts as zero (the CUSUM clamps to exactly 0.0, so the default is 0).

    Returns:
        The step, or None when the accumulator was never at zero in ``history`` (the change is older than the
        history: the caller goes back as far as it can, or uses the alarm step, which `RollbackController.rollback`
        does with ``onset_step=None``).

    Example:
        >>> cusum_onset([(10, 0.0), (11, 0.4), (12, 0.0), (13, 0.7), (14, 1.9), (15, 4.2)], alarm_step=15)
        12
        >>> cusum_onset([(10, 0.3), (11, 0.8)]) is None
        True
    """
    onset: int | None = None
    for step, value in history:
        if alarm_step is not None and step > alarm_step:
            break
        v = float(value)
        if math.isfinite(v) and abs(v) <= tol:
            onset = int(step)
    return onset


# ----------------------------------------------------------------------------------------------------------------------
# Snapshots of the training state
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Snapshot:
    """One copy of the training state, taken after optimizer step ``step``.

    ``models``/``optimizers``/``schedulers`` hold host-memory copies of the live objects' ``state_dict`` s, in the
    order the `TrainingState` holds the objects (empty lists for framework storage, where ``handle`` is what the
    framework's ``save`` returned), ``scaler`` the loss scaler's, ``rng`` the random generators' states and ``extra``
    the plain-data dict the `TrainingState` was told to capture (the detector's state, the monitor's own). ``nbytes``
    is the host memory the snapshot holds, ``ms`` the wall time taken to make it (for CUDA tensors: to enqueue the
    copies), ``device_ms`` the copies' time on the device once they have finished (None before, and on the CPU).
    """

    step: int
    models: list[dict[str, Any]] = field(default_factory=list)
    optimizers: list[dict[str, Any]] = field(default_factory=list)
    schedulers: list[dict[str, Any]] = field(default_factory=list)
    scaler: dict[str, Any] | None = None
    rng: dict[str, Any] | None = None
    extra: dict[str, Any] | None = None
    handle: Any = None
    nbytes: int = 0
    ms: float = 0.0
    device_ms: float | None = None
    # copies still running on a device: one (start, end) pair of CUDA events per device
    _events: list[tuple[Any, Any]] = field(default_factory=list, repr=False)
    # buffers by their path in the state tree, for reuse by a later snapshot
    _buffers: dict[_Path, torch.Tensor] = field(default_factory=dict, repr=False)
    # True once a later snapshot took the buffers: this one can no longer be restored
    _released: bool = field(default=False, repr=False)

    def wait(self) -> None:
        """Block until the snapshot's device-to-host copies have finished (nothing to do on the CPU)."""
        for _, end in self._events:
            end.synchronize()
        self._update_device_ms()

    def _update_device_ms(self) -> None:
        if self.device_ms is None and self._events and all(end.query() for _, end in self._events):
            self.device_ms = max(start.elapsed_time(end) for start, end in self._events)


class _Copier:
    """Deep-copies a state tree (dicts, lists, tuples; tensors and plain leaves) into host memory.

    Tensors on a CUDA device go to pinned buffers with ``non_blocking=True``; CPU tensors to plain buffers. A buffer
    from ``pool`` at the same path with the same shape and dtype (and pinned for a CUDA source) is reused.
    """

    def __init__(self, pool: dict[_Path, torch.Tensor]) -> None:
        self.pool = pool
        self.buffers: dict[_Path, torch.Tensor] = {}
        self.nbytes = 0
        self.events: dict[torch.device, tuple[Any, Any]] = {}

    def copy(self, obj: Any, path: _Path) -> Any:
        if isinstance(obj, torch.Tensor):
            return self._tensor(obj, path)
        if isinstance(obj, dict):
            out = type(obj)() if isinstance(obj, OrderedDict) else {}
            for key, value in obj.items():
                out[key] = self.copy(value, (*path, key))
            metadata = getattr(obj, "_metadata", None)  # nn.Module.state_dict's version info, read by load_state_dict
            if metadata is not None:
                out._metadata = copy.deepcopy(metadata)  # type: ignore[attr-defined]
            return out
        if isinstance(obj, list):
            return [self.copy(value, (*path, i)) for i, value in enumerate(obj)]
        if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
            return tuple(self.copy(value, (*path, i)) for i, value in enumerate(obj))
        return copy.deepcopy(obj)

    def _tensor(self, t: torch.Tensor, path: _Path) -> torch.Tensor:
        t = t.detach()
        cuda = t.device.type == "cuda"
        buf = self.pool.pop(path, None)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype or (cuda and not buf.is_pinned()):
            if cuda:
                buf = torch.empty_like(t, device="cpu", pin_memory=True)
            elif t.device.type == "cpu":
                buf = torch.empty_like(t, memory_format=torch.preserve_format)
            else:  # another accelerator (mps, xpu, ...): a plain blocking copy
                buf = torch.empty_like(t, device="cpu")
        if cuda and t.device not in self.events:
            start = torch.cuda.Event(enable_timing=True)
            start.record(torch.cuda.current_stream(t.device))
            self.events[t.device] = (start, None)
        buf.copy_(t, non_blocking=cuda)
        self.buffers[path] = buf
        self.nbytes += buf.numel() * buf.element_size()
        return buf

    def finish(self) -> list[tuple[Any, Any]]:
        pairs = []
        for device, (start, _) in self.events.items():
            end = torch.cuda.Event(enable_timing=True)
            end.record(torch.cuda.current_stream(device))
            pairs.append((start, end))
        return pairs


def _fresh(obj: Any) -> Any:
    """A copy of a snapshot's state tree to hand to ``load_state_dict``: new tensors, new containers, new leaves."""
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        out = type(obj)() if isinstance(obj, OrderedDict) else {}
        for key, value in obj.items():
            out[key] = _fresh(value)
        return out
    if isinstance(obj, list):
        return [_fresh(v) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_fresh(v) for v in obj)
    return copy.deepcopy(obj)


def _optimizer_load_dict(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, Any]:
    """The dict to hand to ``optimizer.load_state_dict``: the snapshot's values copied into the optimizer's own state
    tensors where they match (same key, shape, dtype), fresh copies elsewhere.

    ``load_state_dict`` keeps a tensor that is already on the parameter's device and dtype, so the optimizer ends up
    with its own tensors holding the snapshot's values: no allocation (a fresh 45 MB clone costs page faults), and
    never the snapshot's buffers (which later steps would then update in place).
    """
    saved_state, current_state = saved.get("state"), current.get("state")
    if not isinstance(saved_state, Mapping) or not isinstance(current_state, Mapping):
        return _fresh(dict(saved))  # not torch's layout: copy everything
    state: dict[Any, Any] = {}
    for index, entry in saved_state.items():
        mine = current_state.get(index)
        if not isinstance(entry, Mapping) or not isinstance(mine, Mapping):
            state[index] = _fresh(entry)
            continue
        out = {}
        for key, value in entry.items():
            own = mine.get(key)
            if (
                isinstance(value, torch.Tensor)
                and isinstance(own, torch.Tensor)
                and own is not value
                and own.shape == value.shape
                and own.dtype == value.dtype
            ):
                with torch.no_grad():
                    own.copy_(value)
                out[key] = own
            else:
                out[key] = _fresh(value)
        state[index] = out
    result = {key: _fresh(value) for key, value in saved.items() if key != "state"}
    result["state"] = state
    return result


def _unwrap_optimizer(optimizer: Any) -> Optimizer:
    """The torch optimizer inside a framework wrapper (Lightning's ``LightningOptimizer``, Accelerate's
    ``AcceleratedOptimizer`` and HF's keep it as ``.optimizer``). ``AcceleratedOptimizer`` subclasses ``Optimizer``
    without its state (no step-hook registry), so a wrapped optimizer is looked for first."""
    inner = optimizer
    for _ in range(8):
        wrapped = getattr(inner, "optimizer", None)
        if isinstance(wrapped, Optimizer) and wrapped is not inner:
            inner = wrapped
            continue
        if isinstance(inner, Optimizer):
            return inner
        inner = wrapped
        if inner is None:
            break
    raise ValueError(f"`optimizers` must be torch optimizers (or wrappers of one); got {type(optimizer).__name__}.")


def _as_list(value: Any, name: str) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (nn.Module, Optimizer)) or hasattr(value, "state_dict"):
        return [value]
    if isinstance(value, Sequence) and not isinstance(value, str):
        return list(value)
    raise ValueError(
        f"`{name}` must be one object with a state_dict or a sequence of them; got {type(value).__name__}."
    )


def random_state() -> dict[str, Any]:
    """The states of the random generators a training step draws from: Python's, torch's CPU generator, NumPy's
    global one and, where CUDA is already in use, every GPU's (a snapshot's ``rng``; `set_random_state` restores
    them). Shared by the in-memory snapshots and the adapters whose framework checkpoint leaves them out.

    Example:
        >>> state = random_state()
        >>> first = torch.rand(2)
        >>> set_random_state(state)
        >>> torch.equal(torch.rand(2), first)
        True
    """
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency, but the module does not need it
        pass
    else:
        state["numpy"] = np.random.get_state()
    # only where CUDA is already in use: get_rng_state_all() would create a context on every GPU of a CPU-only run
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_random_state(state: Mapping[str, Any]) -> None:
    """Restore the generators `random_state` captured (those it holds; the GPUs' only where CUDA is available)."""
    if "python" in state:
        random.setstate(state["python"])
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class TrainingState:
    """The live training objects, with `snapshot` and `restore` of their state.

    Args:
        models: an ``nn.Module`` or a sequence of them (their ``state_dict``: parameters and persistent buffers).
        optimizers: a torch optimizer or a sequence of them (framework wrappers are unwrapped to the torch
            optimizer inside).
        schedulers: LR schedulers (anything with ``state_dict``/``load_state_dict``), one or a sequence.
        scaler: a loss scaler (``torch.amp.GradScaler``), or None.
        extra: a function returning a plain-data dict to capture with each snapshot (the detector's ``state_dict``,
            the monitor's own); `restore` returns a copy of it for the caller to load.
        rng: capture the random generators (Python ``random``, numpy's global one, torch's CPU one, and every CUDA
            device's where CUDA is in use).

    `restore` gives back bit for bit the state each object had at `snapshot`: models through
    ``load_state_dict`` (parameters copied in place, so the optimizer's references stay valid), optimizers through
    ``load_state_dict`` (their state lands on the parameters' devices), schedulers, the scaler and the random
    generators. Plain tensors only: sharded states (FSDP, ``DTensor``) go through framework storage.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> state = TrainingState(model, opt)
        >>> model(torch.ones(2, 3)).sum().backward(); opt.step()
        >>> snap = state.snapshot(step=1)
        >>> before = model.weight.clone()
        >>> model(torch.ones(2, 3)).sum().backward(); opt.step()
        >>> _ = state.restore(snap)
        >>> torch.equal(model.weight, before)
        True
    """

    def __init__(
        self,
        models: nn.Module | Sequence[nn.Module] = (),
        optimizers: Any = (),
        schedulers: Any = (),
        scaler: _Stateful | None = None,
        *,
        extra: Callable[[], Mapping[str, Any]] | None = None,
        rng: bool = True,
    ) -> None:
        self.models: list[nn.Module] = _as_list(models, "models")
        for m in self.models:
            if not isinstance(m, nn.Module):
                raise ValueError(f"`models` must be torch modules; got {type(m).__name__}.")
        self.optimizers: list[Optimizer] = [_unwrap_optimizer(o) for o in _as_list(optimizers, "optimizers")]
        self.schedulers: list[_Stateful] = _as_list(schedulers, "schedulers")
        for s in self.schedulers:
            if not (callable(getattr(s, "state_dict", None)) and callable(getattr(s, "load_state_dict", None))):
                raise ValueError(f"`schedulers` must have state_dict() and load_state_dict(); got {type(s).__name__}.")
        if scaler is not None and not callable(getattr(scaler, "state_dict", None)):
            raise ValueError(f"`scaler` must be a GradScaler (state_dict/load_state_dict) or None; got {scaler!r}.")
        self.scaler = scaler
        if extra is not None and not callable(extra):
            raise ValueError(f"`extra` must be a function returning a dict, or None; got {type(extra).__name__}.")
        self.extra = extra
        self.rng = bool(rng)

    def snapshot(self, step: int, *, reuse: Snapshot | None = None, tensors: bool = True) -> Snapshot:
        """Copy the current state into a new `Snapshot` (call it at a step boundary, between optimizer steps).

        Args:
            step: the optimizer step the state is after (the caller's counter).
            reuse: a snapshot that is no longer needed; its host buffers are reused where path, shape and dtype
                match, and it must not be restored afterwards.
            tensors: False captures only the random generators and ``extra`` (framework storage keeps the rest).
        """
        t0 = time.perf_counter()
        pool: dict[_Path, torch.Tensor] = {}
        if reuse is not None:
            reuse.wait()  # its copies must be over before the buffers are written again
            pool = dict(reuse._buffers)
            reuse._buffers.clear()
            reuse.models, reuse.optimizers, reuse.schedulers, reuse.scaler = [], [], [], None
            reuse._released = True
        copier = _Copier(pool)
        snap = Snapshot(step=int(step))
        if tensors:
            snap.models = [copier.copy(m.state_dict(), ("model", i)) for i, m in enumerate(self.models)]
            snap.optimizers = [copier.copy(o.state_dict(), ("optimizer", i)) for i, o in enumerate(self.optimizers)]
            snap.schedulers = [copier.copy(s.state_dict(), ("scheduler", i)) for i, s in enumerate(self.schedulers)]
            if self.scaler is not None:
                snap.scaler = copier.copy(self.scaler.state_dict(), ("scaler",))
        if self.rng:
            snap.rng = random_state()
        if self.extra is not None:
            snap.extra = copy.deepcopy(dict(self.extra()))
        snap._events = copier.finish()
        snap._buffers = copier.buffers
        snap.nbytes = copier.nbytes + _rng_nbytes(snap.rng)
        snap.ms = (time.perf_counter() - t0) * 1000.0
        return snap

    def restore(self, snapshot: Snapshot, *, rng: bool = True) -> dict[str, Any] | None:
        """Load ``snapshot`` into the live objects; returns a copy of its ``extra`` dict (None if none was captured).

        ``rng=False`` leaves the random generators as they are. For a framework-storage snapshot (no tensors), only
        the random generators and ``extra`` come from here; the framework's ``load`` restores the rest.
        """
        if snapshot._released:
            raise ValueError(
                f"`snapshot` of step {snapshot.step} was reused by a later snapshot; it cannot be restored."
            )
        snapshot.wait()
        if snapshot.models:
            for model, sd in zip(self.models, snapshot.models, strict=True):
                model.load_state_dict(sd)  # copies into the existing parameters and buffers
        if snapshot.optimizers:
            for opt, sd in zip(self.optimizers, snapshot.optimizers, strict=True):
                # into the optimizer's own tensors, never the snapshot's: the optimizer adopts what it is given
                opt.load_state_dict(_optimizer_load_dict(sd, opt.state_dict()))
        if snapshot.schedulers:
            for sched, sd in zip(self.schedulers, snapshot.schedulers, strict=True):
                sched.load_state_dict(_fresh(sd))
        if self.scaler is not None and snapshot.scaler:  # an empty dict: saved from a disabled scaler
            self.scaler.load_state_dict(_fresh(snapshot.scaler))
        if rng and snapshot.rng is not None:
            set_random_state(snapshot.rng)
        return None if snapshot.extra is None else copy.deepcopy(snapshot.extra)


def _rng_nbytes(state: Mapping[str, Any] | None) -> int:
    if not state:
        return 0
    n = 0
    if "torch" in state:
        n += state["torch"].numel()
    n += sum(t.numel() for t in state.get("cuda", ()))
    if "numpy" in state:
        n += int(state["numpy"][1].nbytes)
    if "python" in state:
        n += 8 * len(state["python"][1])
    return n


@dataclass(frozen=True)
class FrameworkStorage:
    """Snapshots kept by the framework (``RollbackPolicy(storage="framework")``): the adapter's hooks.

    Args:
        save: ``save(step) -> handle``: write the framework's checkpoint of the current state (Lightning
            ``trainer.save_checkpoint``, Accelerate ``accelerator.save_state``, an HF checkpoint) and return what
            ``load`` needs (a path). Called on every rank at the same step (it may be a collective).
        load: ``load(handle)``: restore that checkpoint into the live objects, on every rank.
        delete: ``delete(handle)``, optional: free a snapshot that left the ring (remove the directory).

    The controller stores the handles only (with the small RNG and ``extra`` states).

    Example:
        >>> saved = {}
        >>> storage = FrameworkStorage(save=lambda step: saved.setdefault(step, f"ckpt-{step}"), load=print)
        >>> storage.save(100)
        'ckpt-100'
    """

    save: Callable[[int], Any]
    load: Callable[[Any], Any]
    delete: Callable[[Any], Any] | None = None

    def __post_init__(self) -> None:
        for name in ("save", "load"):
            if not callable(getattr(self, name)):
                raise ValueError(f"`{name}` must be a function; got {getattr(self, name)!r}.")
        if self.delete is not None and not callable(self.delete):
            raise ValueError(f"`delete` must be a function or None; got {self.delete!r}.")


def snapshot_name(monitor_key: str) -> str:
    """The file-name stem of a monitor's framework snapshots: its log key made safe for a path, so that two monitors
    write theirs side by side.

    Example:
        >>> snapshot_name("collapse/encoder/ci")
        'rollback-collapse_encoder_ci'
    """
    return "rollback-" + "".join(c if c.isalnum() or c in "-_." else "_" for c in monitor_key)


# ----------------------------------------------------------------------------------------------------------------------
# The learning-rate factor
# ----------------------------------------------------------------------------------------------------------------------


class _LrScaler:
    """Step pre/post hooks on one torch optimizer: ``lr * factor`` inside ``step()``, the exact value outside."""

    def __init__(self, optimizer: Optimizer, factor: Callable[[Optimizer], float]) -> None:
        self.optimizer = optimizer
        self.factor = factor
        self._saved: list[tuple[Any, Any]] | None = None  # (schedule's lr, scaled lr) per group during a step
        self._handles = [optimizer.register_step_pre_hook(self._pre), optimizer.register_step_post_hook(self._post)]

    def _pre(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        if self._saved is not None:  # the last step raised before the post-hook: put the schedule's values back
            self._post(optimizer, args, kwargs)
        f = self.factor(optimizer)
        if f == 1.0:
            return
        saved = []
        for group in optimizer.param_groups:
            lr = group.get("lr")
            scaled = None if lr is None else lr * f
            saved.append((lr, scaled))
            if scaled is not None:
                group["lr"] = scaled
        self._saved = saved

    def _post(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        if self._saved is None:
            return
        for group, (lr, scaled) in zip(optimizer.param_groups, self._saved, strict=False):
            if scaled is not None and group.get("lr") is scaled:  # not rewritten meanwhile
                group["lr"] = lr
        self._saved = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


# ----------------------------------------------------------------------------------------------------------------------
# The controller
# ----------------------------------------------------------------------------------------------------------------------


class RollbackReason(Enum):
    """What `RollbackController.rollback` decided, and why (stored by value)."""

    ROLLED_BACK = "rolled_back"
    NO_SNAPSHOT = "no_snapshot"  # nothing taken before the onset, and no rollback yet: stop
    MAX_ROLLBACKS = "max_rollbacks"  # the failure survived max_rollbacks retries: stop, it is in the configuration
    #: the failure came back after a rollback and no snapshot older than its onset is left: stop, with the same
    #: diagnosis (a retry from further back is not possible)
    CAME_BACK = "came_back"
    #: after a rollback the watched layer's embeddings collapsed again (`RECOLLAPSE_RATIO`): stop, with the same
    #: diagnosis (the collapse survived a lower learning rate and fresh data)
    COLLAPSED_AGAIN = "collapsed_again"


@dataclass(frozen=True)
class RollbackDecision:
    """The answer to an alarm: ``action`` is ``"rollback"`` (done: the state was restored) or ``"stop"``.

    ``entry`` is the recorded rollback (None for a stop), ``extra`` a copy of the ``extra`` state captured with the
    restored snapshot, for the caller to load (the detector's and monitor's state at that step), ``message`` says
    what happened in words.
    """

    action: Literal["rollback", "stop"]
    reason: RollbackReason
    message: str
    entry: dict[str, Any] | None = None
    extra: dict[str, Any] | None = None


class RollbackController:
    """The snapshot ring and the recovery policy of ``on_alarm="rollback"``.

    Feed it every optimizer step with `maybe_snapshot` (the same ``step`` and ``quiet`` on every rank); at an alarm
    call `rollback`. It keeps the newest ``policy.keep`` snapshots, one every ``policy.snapshot_every`` steps taken
    while the detector is quiet; a rollback restores the newest taken strictly before ``onset - min_lookback``,
    drops the newer ones (they may hold the failure), multiplies the learning rate by ``policy.lr_factor`` for the
    rest of the run (on top of the user's schedule, see the module docstring), and records an entry. A slow drift
    (the onset more than ``policy.snapshot_every`` steps before the alarm) whose onset is older than every snapshot
    held goes back to the oldest one: a CUSUM's change point on a channel that drifts is a loose estimate, and the
    oldest state held is the least suspect. After ``policy.max_rollbacks`` rollbacks, or when the failure comes back
    after a rollback with no snapshot older than its onset left, the answer is ``"stop"`` with the configuration
    diagnosis; with no snapshot old enough and no rollback yet (an abrupt failure right after the first snapshot, or
    none taken yet), ``"stop"`` without it.

    Args:
        state: the live objects (`TrainingState`). With framework storage its optimizers still get the learning-rate
            factor, and its ``extra``/RNG capture still runs; the framework's checkpoint holds the rest.
        policy: the `RollbackPolicy` (default: ``RollbackPolicy()``).
        framework: the save/load hooks for ``policy.storage="framework"`` (required there, refused otherwise).
        restore_rng: restore the random generators with a snapshot (default False: the retry draws fresh
            randomness, as it sees fresh data).

    Steps are the caller's optimizer-step counter; it need not rewind at a rollback (the snapshot clock restarts at
    the first step after one). ``state_dict()`` is plain data: ``rollbacks`` (the entries), ``total_factor`` and
    ``num_rollbacks``; the snapshots are not in it.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> ctl = RollbackController(TrainingState(model, opt), RollbackPolicy(snapshot_every=10, keep=2))
        >>> for step in range(1, 36):
        ...     model(torch.randn(8, 4)).pow(2).mean().backward(); opt.step(); opt.zero_grad()
        ...     _ = ctl.maybe_snapshot(step, quiet=True)
        >>> [s.step for s in ctl.snapshots]
        [21, 31]
        >>> decision = ctl.rollback(onset_step=30, alarm_step=35, channel="loss")
        >>> decision.action, decision.entry["restored_step"], ctl.total_factor
        ('rollback', 21, 0.25)
        >>> ctl.state_dict()["num_rollbacks"]
        1
    """

    def __init__(
        self,
        state: TrainingState,
        policy: RollbackPolicy | None = None,
        *,
        framework: FrameworkStorage | None = None,
        restore_rng: bool = False,
    ) -> None:
        if not isinstance(state, TrainingState):
            raise ValueError(f"`state` must be a TrainingState; got {type(state).__name__}.")
        policy = RollbackPolicy() if policy is None else policy
        if not isinstance(policy, RollbackPolicy):
            raise ValueError(f"`policy` must be a RollbackPolicy or None; got {type(policy).__name__}.")
        if policy.storage == "framework" and framework is None:
            raise ValueError("`framework` must be a FrameworkStorage (save/load hooks) with storage='framework'.")
        if policy.storage == "memory" and framework is not None:
            raise ValueError("`framework` hooks were given but `policy.storage` is 'memory'; use storage='framework'.")
        if framework is not None and not isinstance(framework, FrameworkStorage):
            raise ValueError(f"`framework` must be a FrameworkStorage or None; got {type(framework).__name__}.")
        self.state = state
        self.policy = policy
        self.framework = framework
        self.restore_rng = bool(restore_rng)
        self.rollbacks: list[dict[str, Any]] = []
        self.total_factor = 1.0
        #: after a first rollback, the highest rate the run trained at before the onset, until the retry's first step
        #: compares the schedule's rate with it (`RollbackPolicy.undo_rate_rise`); None otherwise
        self.rate_cap: float | None = None
        #: the step of the snapshot restored when the policy gave up (`RollbackPolicy.restore_on_stop`), else None
        self.restored_on_stop: int | None = None
        self._ring: deque[Snapshot] = deque()
        self._spare: list[Snapshot] = []  # snapshots that left the ring, kept for their buffers
        self._last_step: int | None = None
        self._restart_clock = False
        self._scalers: list[_LrScaler] = []
        self._taken = 0
        self._ms_sum = 0.0
        self._ms_max = 0.0
        self._ms_last: float | None = None
        self._last_restore_ms: float | None = None
        # installed now (a no-op while the factor is 1), so that step hooks registered later see the rate used
        self._install_lr_hooks()

    # -- the ring ----------------------------------------------------------------------------------------------------

    @property
    def snapshots(self) -> tuple[Snapshot, ...]:
        """The snapshots held, oldest first."""
        return tuple(self._ring)

    @property
    def num_rollbacks(self) -> int:
        return len(self.rollbacks)

    def maybe_snapshot(self, step: int, quiet: bool) -> Snapshot | None:
        """Take a snapshot if one is due (``snapshot_every`` steps since the last) and ``quiet``; returns it or None.

        Call it after every optimizer step, on every rank with the same ``step`` and ``quiet`` (a framework save is
        a collective). A due snapshot waits for a quiet step. The first call takes one as soon as it is quiet; the
        first call after a rollback takes none and starts the clock (the restored state is the newest snapshot).
        """
        step = int(step)
        if self._restart_clock:
            self._restart_clock = False
            self._last_step = step
            return None
        if not quiet:
            return None
        if self._last_step is not None and step - self._last_step < self.policy.snapshot_every:
            return None
        return self.snapshot(step)

    def snapshot(self, step: int) -> Snapshot:
        """Take a snapshot now (whatever the clock says) and put it in the ring, evicting the oldest beyond ``keep``."""
        step = int(step)
        reuse: Snapshot | None = None
        if len(self._ring) >= self.policy.keep:
            reuse = self._ring.popleft()
            self._forget(reuse)
        elif self._spare:
            reuse = self._spare.pop()
        t0 = time.perf_counter()
        if self.framework is not None:
            handle = self.framework.save(step)
            snap = self.state.snapshot(step, reuse=reuse, tensors=False)
            snap.handle = handle
            snap.ms = (time.perf_counter() - t0) * 1000.0
        else:
            snap = self.state.snapshot(step, reuse=reuse)
        self._ring.append(snap)
        self._spare.clear()  # the ring is full again or the spare buffers were used: hold no more than `keep`
        self._last_step = step
        self._taken += 1
        self._ms_sum += snap.ms
        self._ms_max = max(self._ms_max, snap.ms)
        self._ms_last = snap.ms
        return snap

    def _forget(self, snap: Snapshot) -> None:
        """A snapshot leaves the ring: delete its framework checkpoint (its host buffers go to the next snapshot)."""
        if snap.handle is not None and self.framework is not None and self.framework.delete is not None:
            self.framework.delete(snap.handle)
            snap.handle = None

    def choose(self, onset_step: int) -> Snapshot | None:
        """The newest snapshot taken strictly before ``onset_step - policy.min_lookback``, or None (nothing healthy
        to go back to: the policy then says stop)."""
        limit = int(onset_step) - self.policy.min_lookback
        best: Snapshot | None = None
        for snap in self._ring:
            if snap.step < limit and (best is None or snap.step > best.step):
                best = snap
        return best

    def release(self) -> None:
        """Free every snapshot (host buffers, framework checkpoints); the factor and the rollback record stay."""
        for snap in self._ring:
            self._forget(snap)
        self._ring.clear()
        self._spare.clear()
        self._last_step = None

    # -- acting on an alarm ------------------------------------------------------------------------------------------

    def rollback(
        self,
        onset_step: int | None,
        alarm_step: int,
        channel: str,
        *,
        detector_onset: int | None = None,
        healthy_rate: float | None = None,
    ) -> RollbackDecision:
        """Act on an alarm at ``alarm_step`` whose change began at ``onset_step`` (`cusum_onset`; None: the alarm step,
        as for an absolute rule such as a non-finite loss), raised by ``channel``. ``healthy_rate``: the highest
        learning rate of the schedule (the first optimizer's first group) the run trained at before the onset
        (`topo_callbacks.core.detector.CusumDetector.highest_rate_before`); at a first rollback the retry's first
        step brings a rate still over `RISE_KEPT` times it down to that (`RollbackPolicy.undo_rate_rise`).

        Restores the chosen snapshot (call it at a step boundary, on every rank), drops the newer snapshots, lowers
        the learning rate and records ``{step, restored_step, onset, channel, lr_factor, total_factor}``; or, after
        ``max_rollbacks`` rollbacks or with no snapshot before the onset, changes nothing and answers ``"stop"``.
        """
        alarm_step = int(alarm_step)
        onset = alarm_step if onset_step is None else int(onset_step)
        n = self.num_rollbacks
        if n >= self.policy.max_rollbacks:
            return self._give_up(onset, alarm_step, channel, RollbackReason.MAX_ROLLBACKS)
        target = self.choose(onset)
        # ``detector_onset``: the detector's own change point, when the caller moved ``onset_step`` from it (the
        # monitor moves it past the snapshot it resumed from when the channel stood quiet there); the drift is judged
        # on the detector's estimate
        drift = alarm_step - (onset if detector_onset is None else int(detector_onset)) > self.policy.snapshot_every
        oldest = self._ring[0] if self._ring else None
        restored_last = self.rollbacks[-1]["restored_step"] if self.rollbacks else None
        fallback = drift and oldest is not None and oldest.step < alarm_step and oldest.step != restored_last
        if target is None and fallback:
            target = oldest  # the oldest held, unless it is the one that failed again (see the class docstring)
        if target is None and n > 0:
            return self._give_up(onset, alarm_step, channel, RollbackReason.CAME_BACK)
        if target is None:
            limit = onset - self.policy.min_lookback
            held = [s.step for s in self._ring]
            where = f"snapshots held at steps {held}" if held else "no snapshot taken yet"
            message = (
                f"The alarm on {channel!r} at step {alarm_step} (onset at step {onset}) has nothing healthy to go back"
                f" to: no snapshot taken before step {limit} ({where}). Stopping."
            )
            return RollbackDecision("stop", RollbackReason.NO_SNAPSHOT, message)
        t0 = time.perf_counter()
        extra = self._restore(target)
        # the newer snapshots may hold the failure: drop them (the newest dropped keeps its buffers for reuse)
        while self._ring and self._ring[-1] is not target:
            dropped = self._ring.pop()
            self._forget(dropped)
            if not self._spare:
                self._spare.append(dropped)
        self.total_factor *= self.policy.lr_factor
        healthy = None if healthy_rate is None else float(healthy_rate)
        if self.policy.undo_rate_rise and n == 0 and healthy is not None and math.isfinite(healthy) and healthy > 0:
            self.rate_cap = healthy  # decided at the retry's first step (`_factor_for`)
        self._install_lr_hooks()
        self._last_restore_ms = (time.perf_counter() - t0) * 1000.0
        self._restart_clock = True
        entry = {
            "step": alarm_step,
            "restored_step": target.step,
            "onset": onset,
            "channel": str(channel),
            "lr_factor": self.policy.lr_factor,
            "total_factor": self.total_factor,
        }
        self.rollbacks.append(entry)
        message = (
            f"Rolled back to the snapshot of step {target.step} (alarm on {channel!r} at step {alarm_step}, onset at"
            f" step {onset}); learning rate now {self.total_factor:g}x the schedule"
            f" (rollback {self.num_rollbacks} of {self.policy.max_rollbacks})."
        )
        return RollbackDecision("rollback", RollbackReason.ROLLED_BACK, message, dict(entry), extra)

    def give_up(self, onset: int, alarm_step: int, channel: str, reason: RollbackReason) -> RollbackDecision:
        """Stop with the configuration diagnosis for ``reason`` (the caller's own evidence, such as
        `RollbackReason.COLLAPSED_AGAIN`), restoring the newest snapshot older than ``onset`` with
        ``restore_on_stop`` when one is held; see `rollback` for the policy's own give-ups."""
        return self._give_up(int(onset), int(alarm_step), channel, reason)

    def _give_up(self, onset: int, alarm_step: int, channel: str, reason: RollbackReason) -> RollbackDecision:
        """Stop with the configuration diagnosis: the failure came back after ``num_rollbacks`` rollbacks, either
        ``max_rollbacks`` of them (`RollbackReason.MAX_ROLLBACKS`) or with no snapshot older than its onset left to
        retry from (`RollbackReason.CAME_BACK`: a caller that passes a snapshot over, because the failure's change
        point lies at or before it, can run out of older ones before ``max_rollbacks``). With ``restore_on_stop``
        the newest snapshot older than the onset is restored first or, when none is, the oldest held (the state the
        last retry started from: taken while the detector was quiet, and the least suspect left)."""
        n = self.num_rollbacks
        what = (
            f"The embeddings of {channel!r} collapsed again by step {alarm_step}"
            if reason is RollbackReason.COLLAPSED_AGAIN
            else f"The alarm on {channel!r} at step {alarm_step} came back"
        )
        message = (
            f"{what} after {n} rollback{'s' if n != 1 else ''},"
            f" each with a lower learning rate (now {self.total_factor:g}x the schedule) and fresh data"
            + ("" if reason is not RollbackReason.CAME_BACK else ", and no older snapshot is left to retry from")
            + ": the failure is probably in the configuration (objective, architecture, data), not in a bad batch or"
            " an unlucky step. Stopping"
        )
        target, which = None, "the last healthy snapshot"
        if self.policy.restore_on_stop:
            # CAME_BACK is only answered when no snapshot is older than the onset: go to the oldest held
            if reason is RollbackReason.CAME_BACK:
                target, which = (self._ring[0] if self._ring else None), "the oldest snapshot held"
            else:
                target = self.choose(onset)
        if target is None:
            return RollbackDecision("stop", reason, message + ".")
        extra = self._restore(target)
        self.restored_on_stop = target.step
        message += f", with the training state of step {target.step} restored ({which})."
        return RollbackDecision("stop", reason, message, None, extra)

    def _restore(self, target: Snapshot) -> dict[str, Any] | None:
        """Load ``target`` into the live training objects (through the framework's checkpoint first, if any); returns
        the ``extra`` state captured with it."""
        if self.framework is not None:
            self.framework.load(target.handle)
        return self.state.restore(target, rng=self.restore_rng)

    def _install_lr_hooks(self) -> None:
        if self._scalers:
            return
        ref = weakref.ref(self)  # the optimizer's hooks must not keep the controller (and its snapshots) alive

        def factor(optimizer: Any) -> float:
            controller = ref()
            if controller is None:
                return 1.0
            # every optimizer step: a rate still to compare (`_factor_for`) only once after a first rollback
            return controller.total_factor if controller.rate_cap is None else controller._factor_for(optimizer)

        self._scalers = [_LrScaler(opt, factor) for opt in self.state.optimizers]

    def _factor_for(self, optimizer: Any) -> float:
        """`total_factor`, for a step of ``optimizer`` about to run; at the retry's first step of the first optimizer
        after a first rollback, lowered so that a rate still over `RISE_KEPT` times `rate_cap` comes down to that
        (`RollbackPolicy.undo_rate_rise`; the rollback's entry records the factor taken and the rise, ``rate_rise``)."""
        cap = self.rate_cap
        if cap is not None and self.state.optimizers and optimizer is self.state.optimizers[0]:
            self.rate_cap = None
            groups = getattr(optimizer, "param_groups", None)
            lr = groups[0].get("lr") if groups else None
            rate = float(lr) if isinstance(lr, (int, float)) else math.nan
            if math.isfinite(rate) and rate * self.total_factor > cap * RISE_KEPT:
                before = self.total_factor / self.policy.lr_factor  # the factor before this rollback
                self.total_factor = cap * RISE_KEPT / rate
                if self.rollbacks:
                    self.rollbacks[-1]["lr_factor"] = self.total_factor / before
                    self.rollbacks[-1]["total_factor"] = self.total_factor
                    self.rollbacks[-1]["rate_rise"] = rate / cap
        return self.total_factor

    def schedule_lr(self, optimizer: Any) -> float | None:
        """The schedule's own learning rate of ``optimizer``'s first parameter group, also when read inside its
        ``step()`` (a closure, a hook called from there), where the group holds the rate times `total_factor`; None
        without parameter groups.

        Example:
            >>> model = torch.nn.Linear(2, 1)
            >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> ctl = RollbackController(TrainingState(model, opt))
            >>> ctl.total_factor = 0.5  # as after a rollback
            >>> seen = []
            >>> def inside_step(o, args, kwargs):  # a step pre-hook registered after the controller's
            ...     seen.append((o.param_groups[0]["lr"], ctl.schedule_lr(o)))
            >>> _ = opt.register_step_pre_hook(inside_step)
            >>> opt.step(); seen
            [(0.05, 0.1)]
        """
        try:
            inner = _unwrap_optimizer(optimizer)
        except ValueError:
            inner = optimizer
        for scaler in self._scalers:
            if scaler.optimizer is inner and scaler._saved:
                lr = scaler._saved[0][0]
                return None if lr is None else float(lr)
        groups = getattr(inner, "param_groups", None)
        return float(groups[0]["lr"]) if groups else None

    def remove_hooks(self) -> None:
        """Detach the learning-rate hooks from the optimizers (the schedule's rate applies again)."""
        for s in self._scalers:
            s.remove()
        self._scalers = []

    # -- cost and state ----------------------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """The cost of the snapshots: ``bytes_held`` (host memory of the snapshots held), ``bytes_spare`` (buffers of
        dropped snapshots kept for reuse), ``taken``, ``last_ms``/``mean_ms``/``max_ms`` (wall time per snapshot),
        ``last_restore_ms``, and ``per_snapshot``: ``{step, bytes, ms, device_ms}`` for each held, oldest first."""
        per = []
        for snap in self._ring:
            snap._update_device_ms()
            per.append({"step": snap.step, "bytes": snap.nbytes, "ms": snap.ms, "device_ms": snap.device_ms})
        return {
            "snapshots": len(self._ring),
            "bytes_held": sum(s.nbytes for s in self._ring),
            "bytes_spare": sum(s.nbytes for s in self._spare),
            "taken": self._taken,
            "last_ms": self._ms_last,
            "mean_ms": self._ms_sum / self._taken if self._taken else None,
            "max_ms": self._ms_max if self._taken else None,
            "last_restore_ms": self._last_restore_ms,
            "per_snapshot": per,
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain data (lists, dicts, str, int, float): loadable with ``torch.load(weights_only=True)`` and JSON."""
        return {
            "rollbacks": [dict(e) for e in self.rollbacks],
            "total_factor": float(self.total_factor),
            "num_rollbacks": self.num_rollbacks,
            "rate_cap": self.rate_cap,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Resume the record and the learning-rate factor (applied from the next optimizer step on)."""
        self.rollbacks = [
            {
                "step": int(e["step"]),
                "restored_step": int(e["restored_step"]),
                "onset": int(e["onset"]),
                "channel": str(e["channel"]),
                "lr_factor": float(e["lr_factor"]),
                "total_factor": float(e["total_factor"]),
                **({"rate_rise": float(e["rate_rise"])} if "rate_rise" in e else {}),
            }
            for e in state_dict.get("rollbacks", [])
        ]
        self.total_factor = float(state_dict.get("total_factor", 1.0))
        cap = state_dict.get("rate_cap")
        self.rate_cap = None if cap is None else float(cap)
        self._install_lr_hooks()
