"""HF ``transformers`` Trainer adapter: the collapse monitor as a ``TrainerCallback``.

Importing this module imports ``transformers``; ``import topo_callbacks`` does not.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import os
import warnings
import weakref
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from topo_callbacks.core.capture import resolve_layer
from topo_callbacks.core.detector import loss_scale
from topo_callbacks.core.diagram_file import write_diagram
from topo_callbacks.core.gather import sum_across_ranks
from topo_callbacks.core.monitor import CollapseMonitorCore, CollapseWarning
from topo_callbacks.core.neurons import NeuronTopologyMonitorCore
from topo_callbacks.core.rollback import RollbackPolicy, snapshot_name

__all__ = ["CollapseMonitorCallback", "NeuronTopologyCallback"]

# Per training setup, keyed by id of its TrainingArguments (the object the Trainer passes to every event): the
# Trainer bound with `trainer=` and the callbacks the user built (bound, or passed in `Trainer(callbacks=[...])`).
# A callback that `restore_callback_states_from_checkpoint` rebuilt from JSON finds through it its trainer and the
# user's own object, to which it then forwards every event: the object the user holds stays the live one.
_SETUPS: dict[int, dict[str, Any]] = {}
# Per training run, keyed by id of its TrainerState: the live monitors, to refuse two that log under one key.
_RUNS: dict[int, tuple[weakref.ref[Any], list[weakref.ref[Any]]]] = {}
# transformers' own logger tree: its verbosity (`TrainingArguments(log_level=...)`) applies to the summary too
_LOG = logging.getLogger("transformers.topo_callbacks")

_F = TypeVar("_F", bound=Callable[..., Any])


def _setup_of(args: Any, create: bool = False) -> dict[str, Any] | None:
    for key in [k for k, entry in _SETUPS.items() if entry["args"]() is None]:
        del _SETUPS[key]
    entry = _SETUPS.get(id(args))
    if entry is not None and entry["args"]() is args:
        return entry
    if not create:
        return None
    entry = {"args": weakref.ref(args), "trainer": None, "callbacks": []}
    _SETUPS[id(args)] = entry
    return entry


def _default(cls: type, name: str) -> Any:
    """The default of ``cls.__init__``'s argument ``name`` (one source of truth for saved-args lookups)."""
    return inspect.signature(cls).parameters[name].default


def _record_clip_norm(accelerator: Any, callback: Any) -> Callable[[], None]:
    """Make ``accelerator.clip_grad_norm_`` (the Trainer's clipping call) also hand its pre-clip norm to
    ``callback._pre_clip``; returns the function that puts the original back."""
    original = accelerator.clip_grad_norm_

    @functools.wraps(original)
    def clip_grad_norm_(*args: Any, **kwargs: Any) -> Any:
        norm = original(*args, **kwargs)
        # kept as it comes (a tensor on the device): the monitor reads GPU values in batches
        callback._pre_clip = norm.detach() if isinstance(norm, torch.Tensor) else norm
        return norm

    accelerator.clip_grad_norm_ = clip_grad_norm_

    def unwrap() -> None:
        if accelerator.__dict__.get("clip_grad_norm_") is clip_grad_norm_:
            del accelerator.clip_grad_norm_

    return unwrap


def _forwarded(event: _F) -> _F:
    """Run ``event`` on the user's own callback when this one is the Trainer's rebuilt copy of it."""

    @functools.wraps(event)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self._delegate is not None:
            return getattr(self._delegate, event.__name__)(*args, **kwargs)
        return event(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _import_path(name: str, value: Any) -> str | None:
    """``value`` as ``"module:qualname"`` (JSON-able, re-importable), or None for None/str choices."""
    if value is None or isinstance(value, str):
        return value
    path = f"{getattr(value, '__module__', '')}:{getattr(value, '__qualname__', '')}"
    try:
        found = _load_path(path)
    except (ImportError, AttributeError, ValueError):
        found = None
    if found is not value:
        raise ValueError(
            f"`{name}` must be a string or a module-level function (it is stored by import path so that"
            f" `restore_callback_states_from_checkpoint` can rebuild the callback); got {value!r}."
        )
    return path


def _load_path(path: str) -> Callable[..., Any]:
    module, _, qualname = path.partition(":")
    if not module or not qualname:
        raise ValueError(f"not an import path of the form 'package.module:function': {path!r}")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj  # type: ignore[no-any-return]


class _TrainerAdapter:
    """What both callbacks share: JSON state for ``ExportableState``, binding to a Trainer, restoring from a
    checkpoint, keeping the user's object live when the Trainer rebuilds callbacks from JSON, and logging through
    the Trainer without touching its own logs. Needs ``_args``, ``state_dict``, ``load_state_dict``, ``history``
    and ``logger`` from the class it is mixed into."""

    _args: dict[str, Any]
    _trainer: weakref.ref[Any] | None = None
    _warned_unbound = False
    # set when the Trainer rebuilt this object from a checkpoint's JSON (it assigns `monitor_state`)
    _rebuilt = False
    # the user's own callback, which this rebuilt copy forwards every event to
    _delegate: Any = None

    # ------------------------------------------------------------- identity and state
    @property
    def identity(self) -> str:
        """What tells two callbacks of this class apart in one run (and in a checkpoint): their log key."""
        raise NotImplementedError

    @classmethod
    def _identity_of(cls, saved_args: dict[str, Any]) -> str:
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        if self._delegate is not None:
            return self._delegate.state()  # type: ignore[no-any-return]
        return {"args": dict(self._args), "attributes": {"monitor_state": self.monitor_state}}

    @property
    def monitor_state(self) -> dict[str, Any]:
        """The core's plain-data state; assigning it restores it (the Trainer sets attributes on restore)."""
        return self.state_dict()  # type: ignore[attr-defined,no-any-return]

    @monitor_state.setter
    def monitor_state(self, state: dict[str, Any]) -> None:
        self._rebuilt = True
        self.load_state_dict(state)  # type: ignore[attr-defined]

    def _saved_state(self, state: Any) -> dict[str, Any] | None:
        """This callback's state in the checkpoint being resumed: the last entry of its class with its identity.

        The Trainer appends every save's states to a list that starts with the states at the start of training,
        so for two callbacks of one class the first entries are stale; matching by identity also survives a
        change in the callbacks' order.
        """
        saved = (getattr(state, "stateful_callbacks", None) or {}).get(type(self).__name__)
        entries = saved if isinstance(saved, list) else [saved] if isinstance(saved, dict) else []
        for entry in reversed(entries):
            if self._identity_of(entry.get("args", {})) == self.identity:
                found = entry.get("attributes", {}).get("monitor_state")
                return found if isinstance(found, dict) else None
        return None

    def _forget_saved_entries(self, state: Any) -> None:
        """Empty this class's list in ``state.stateful_callbacks`` so that the next checkpoint holds only the
        current states (the Trainer appends to the list at each save instead of replacing it)."""
        saved = getattr(state, "stateful_callbacks", None)
        if isinstance(saved, dict) and isinstance(saved.get(type(self).__name__), list):
            saved[type(self).__name__] = []

    # -------------------------------------------------------------------- binding
    def bind(self, trainer: Any) -> Any:
        """Log through ``trainer.log`` (also after the Trainer rebuilt this callback from a checkpoint)."""
        self._trainer = weakref.ref(trainer)
        setup = _setup_of(trainer.args, create=True)
        assert setup is not None
        setup["trainer"] = self._trainer
        self._register(setup)
        return self

    def _register(self, setup: dict[str, Any]) -> None:
        if not any(ref() is self for ref in setup["callbacks"]):
            setup["callbacks"].append(weakref.ref(self))

    def _begin(self, args: Any, state: Any) -> bool:
        """At the start of training: find the trainer, hand over to the user's object if this is the Trainer's
        rebuilt copy (returns False then), refuse a second monitor with the same key, restore from a checkpoint."""
        setup = _setup_of(args)
        if self._trainer is None and setup is not None and setup["trainer"] is not None:
            self._trainer = setup["trainer"]
        if self._rebuilt and setup is not None:
            for ref in reversed(setup["callbacks"]):
                other = ref()
                if (
                    other is not None
                    and other is not self
                    and type(other) is type(self)
                    and not other._rebuilt
                    and other.identity == self.identity
                ):
                    self._delegate = other
                    return False
        for stale in [k for k, (ref, _) in _RUNS.items() if ref() is None]:
            del _RUNS[stale]
        run = _RUNS.get(id(state))
        if run is None or run[0]() is not state:
            run = (weakref.ref(state), [])
            _RUNS[id(state)] = run
        for ref in run[1]:
            other = ref()
            if (
                other is not None
                and other is not self
                and type(other) is type(self)
                and other.identity == self.identity
            ):
                raise ValueError(
                    f"two {type(self).__name__}s log under {self.identity!r}; give each its own key ({self._key_hint})."
                )
        run[1].append(weakref.ref(self))
        if state.global_step > 0 and getattr(args, "restore_callback_states_from_checkpoint", False):
            saved = self._saved_state(state)
            if saved is not None:
                self.load_state_dict(saved)  # type: ignore[attr-defined]
            elif state.is_world_process_zero:
                warnings.warn(
                    f"{type(self).__name__} {self.identity!r}: the checkpoint holds no state for this key; it"
                    " starts afresh (calibration again).",
                    CollapseWarning,
                    stacklevel=3,
                )
        return True

    _key_hint = "the `monitor` argument"

    # -------------------------------------------------------------------- logging
    def _log(self, state: Any, control: Any, values: dict[str, float], step: int) -> None:
        if not getattr(self, "logger", True):
            return
        trainer = self._trainer() if self._trainer is not None else None
        if trainer is not None:
            # `trainer.log` runs the callback handler's `on_log`, which clears `control.should_log`: the Trainer
            # would then skip its own logs (loss, grad_norm, learning_rate) at this step. Put the flag back.
            should_log = control.should_log
            trainer.log(dict(values))
            control.should_log = trainer.control.should_log = should_log
            return
        state.log_history.append({**values, "step": step})
        if not self._warned_unbound:
            self._warned_unbound = True
            if state.is_world_process_zero:
                warnings.warn(
                    f"{type(self).__name__} has no trainer: its values go to `state.log_history` only, not to the"
                    " `report_to` integrations. Pass `trainer=` (trainer.add_callback(Callback(trainer=trainer,"
                    " ...))) or call `callback.bind(trainer)`.",
                    CollapseWarning,
                    stacklevel=3,
                )

    def _log_dir(self, args: Any) -> str:
        """Where TensorBoard writes this run's events (the report looks there), else the output dir."""
        trainer = self._trainer() if self._trainer is not None else None
        for callback in getattr(getattr(trainer, "callback_handler", None), "callbacks", []):
            writer = getattr(callback, "tb_writer", None)
            log_dir = getattr(writer, "log_dir", None) or getattr(callback, "logging_dir", None)
            if log_dir:
                return str(log_dir)
        return str(args.output_dir)


class CollapseMonitorCallback(CollapseMonitorCore, _TrainerAdapter, TrainerCallback, ExportableState):
    """HF Trainer callback: log a collapse index of one layer's embeddings, warn, and optionally stop.

    Every ``every_n_train_steps`` optimizer steps it gathers up to ``max_samples`` pooled embeddings of ``layer``
    from all processes, computes the collapse index (CI) and its terms, logs them through the Trainer's own
    logging (``trainer.log``: ``state.log_history`` and every ``report_to`` integration) and evaluates the alarm
    rule. With ``stop_on_alarm=True`` the decision is reduced over processes (the Trainer does not sync
    ``should_training_stop`` itself), so every process stops at the same step.

    Args:
        layer: dotted path of the watched submodule, resolved on the unwrapped model (a string, so that the
            callback's arguments stay JSON-serialisable).
        trainer: the Trainer, so the values go through ``trainer.log``. Without it (e.g. the callback was passed
            in ``Trainer(callbacks=[...])``) they are appended to ``state.log_history`` only, and a warning says
            that the ``report_to`` integrations do not see them. Not part of the saved state.
        pool, select, loss_fn: as in the core; a callable must be a module-level function (stored by its import
            path ``"package.module:function"``, which is also accepted).
        on_alarm: as in the core: ``"warn"``, ``"stop"``, ``"rollback"``, or a policy as a dict of `RollbackPolicy`'s
            fields (``{"lr_factor": 0.25, "max_rollbacks": 2}``; a `RollbackPolicy` is accepted and stored as that
            dict, so the arguments stay JSON). A rollback restores the model, the optimizer, the LR scheduler and the
            accelerator's loss scaler in place at ``on_step_end``, on every process at the same step, and lowers the
            learning rate; ``state.global_step`` is not rewound and the batches in between are not replayed.
        **kwargs: every other argument of :class:`topo_callbacks.core.CollapseMonitorCore`
            (``every_n_train_steps``, ``max_samples``, ``monitor``, ``stopping_threshold``, ``stop_on_alarm``, ...).

    The state (calibrated scale, baseline, patience counters, history) is saved in ``trainer_state.json`` with each
    checkpoint and restored with ``TrainingArguments(restore_callback_states_from_checkpoint=True)``.

    Example::

        trainer = Trainer(model=model, args=args, train_dataset=train_dataset)
        trainer.add_callback(CollapseMonitorCallback(trainer=trainer, layer="bert.encoder.layer.6", stop_on_alarm=True))
        trainer.train()
    """

    def __init__(
        self,
        layer: str,
        *,
        trainer: Any = None,
        pool: str | Callable[..., Any] = "mean",
        select: str | Callable[..., Any] | None = None,
        loss_fn: str | Callable[..., Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(layer, str) or not layer:
            raise ValueError(
                f"`layer` must be a dotted module path (a non-empty str, so the callback state is JSON); got {layer!r}."
            )
        if kwargs.get("source", "stream") != "stream" or "probe" in kwargs:
            raise ValueError(
                "`source='probe'`/`probe` are not available in the HF callback: its arguments are saved as JSON in"
                " trainer_state.json and the Trainer rebuilds the callback from them, which a probe batch cannot"
                " survive. Use the default source='stream'."
            )
        if isinstance(kwargs.get("on_alarm"), RollbackPolicy):  # stored as plain data: the arguments are JSON
            kwargs["on_alarm"] = kwargs["on_alarm"].as_dict()
        elif isinstance(kwargs.get("on_alarm"), Mapping):
            kwargs["on_alarm"] = dict(kwargs["on_alarm"])
        pool_path = _import_path("pool", pool)
        select_path = _import_path("select", select)
        loss_fn_path = _import_path("loss_fn", loss_fn)
        super().__init__(
            layer,
            pool=_load_path(pool) if isinstance(pool, str) and ":" in pool else pool,
            select=_load_path(select) if isinstance(select, str) else select,
            loss_fn=_load_path(loss_fn) if isinstance(loss_fn, str) else loss_fn,
            **kwargs,
        )
        self._args: dict[str, Any] = {
            "layer": layer, "pool": pool_path, "select": select_path, "loss_fn": loss_fn_path, **kwargs,
        }  # fmt: skip
        if trainer is not None:
            self.bind(trainer)

    @property
    def identity(self) -> str:
        return self.monitor

    @classmethod
    def _identity_of(cls, saved_args: dict[str, Any]) -> str:
        return str(saved_args.get("monitor", _default(CollapseMonitorCore, "monitor")))

    # ------------------------------------------------------------------ events
    @_forwarded
    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._register(_setup_of(args, create=True))  # type: ignore[arg-type]
        model = kwargs.get("model")
        if model is not None:  # a wrong layer fails when the Trainer is built, on every process
            resolve_layer(model, self.layer)

    @_forwarded
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self._begin(args, state):
            self._delegate.on_train_begin(args, state, control, **kwargs)
            return
        self.attach(kwargs["model"])
        self.optimizer = kwargs.get("optimizer")
        if self.rollback_policy is not None:  # on_alarm="rollback": the objects a rollback restores in place
            bound = self._trainer() if self._trainer is not None else None
            framework = None
            if self.rollback_policy.storage == "framework":
                if bound is None:
                    raise ValueError(
                        f"{type(self).__name__}(on_alarm=RollbackPolicy(storage='framework')) saves its snapshots"
                        " through the Trainer's accelerator and needs the Trainer: pass `trainer=`"
                        " (trainer.add_callback(Callback(trainer=trainer, ...))) or call `callback.bind(trainer)`."
                    )
                from topo_callbacks.accelerate import accelerate_storage  # the Trainer runs on Accelerate

                scheduler = kwargs.get("lr_scheduler")
                dirpath = self.rollback_policy.dirpath or os.path.join(args.output_dir, "rollback_snapshots")
                schedulers = [scheduler] if scheduler is not None else []
                framework = accelerate_storage(
                    bound.accelerator,
                    self,
                    schedulers,
                    dirpath,
                    model=kwargs["model"],
                    name=snapshot_name(self.monitor),
                )
            self.track(
                models=kwargs["model"],
                optimizers=kwargs.get("optimizer"),
                schedulers=kwargs.get("lr_scheduler"),
                scaler=getattr(getattr(bound, "accelerator", None), "scaler", None),
                framework=framework,
            )
        self.prepare_step(state.global_step + 1)
        self.last_observed_step = max(self.last_observed_step, state.global_step)
        if "loss" in self.step_channels:
            # the Trainer hands callbacks no per-step loss: read it from the model's output (``outputs.loss``, there
            # when the batch has labels) in training mode
            self._loss_handle = kwargs["model"].register_forward_hook(self._tap_loss)
        self._clipping = bool(args.max_grad_norm and args.max_grad_norm > 0)
        self._pre_clip: float | None = None
        trainer = self._trainer() if self._trainer is not None else None
        if "grad_norm" in self.step_channels and self._clipping:
            if trainer is not None:
                # with clipping on (the Trainer's default), gradients are clipped before any callback sees them;
                # the norm the detector needs is the one clipping computes, so it is read from that call
                self._unwrap_clip: Callable[[], None] | None = _record_clip_norm(trainer.accelerator, self)
            else:
                self._warn(
                    f"{self.monitor}: the detector reads no gradient norm (gradients are clipped before callbacks see"
                    " them, and the callback is not bound to the Trainer); pass `trainer=` or call `bind(trainer)`."
                )

    def _tap_loss(self, module: Any, inputs: Any, output: Any) -> None:
        if module.training:
            loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
            if isinstance(loss, torch.Tensor) and loss.numel() == 1:
                self.add_loss(loss)

    @_forwarded
    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model = kwargs.get("model")
        if "grad_norm" not in self.step_channels:
            return
        self._lr: float | None = self.schedule_lr(kwargs.get("optimizer"))  # the rate of this step's schedule
        if getattr(self, "_clipping", False):  # the pre-clip norm, recorded from the clipping call (or none)
            self._grad_norm: Any = self._pre_clip
            self._pre_clip = None
            if model is not None and self._grad_norm is not None:  # for the layers an alarm names
                self.record_layer_norms(model, state.global_step + 1, total=self._grad_norm)
        elif model is not None:  # gradients unscaled and all-reduced here
            self._grad_norm = self.step_grad_norm(model, state.global_step + 1)

    @_forwarded
    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.prepare_step(state.global_step + 1)

    @_forwarded
    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self._forget_saved_entries(state)
        step = state.global_step
        if self.step_channels:
            # an fp16 loss scaler skipped the update whose gradients overflowed (the Trainer then leaves its
            # scheduler alone too): not a failure, counted
            trainer = self._trainer() if self._trainer is not None else None
            accelerator = getattr(trainer, "accelerator", None)
            scaler = getattr(accelerator, "scaler", None)
            fired = self.observe_step(
                step,
                grad_norm=getattr(self, "_grad_norm", None),
                lr=getattr(self, "_lr", None),
                skipped=scaler is not None and bool(getattr(accelerator, "optimizer_step_was_skipped", False)),
                loss_scale=loss_scale(scaler, as_tensor=True),
            )
            self._grad_norm = self._lr = None
            if fired is not None:  # with a rollback, `collapse/rollbacks` too
                self._log(state, control, {f"{self.prefix}alarm": 1.0, **fired.logged}, step)
                if fired.should_stop:  # the same decision on every process: the values were averaged over them
                    control.should_training_stop = True
                    self.record_stop(step, fired)
        if not self.is_check_step(step):
            self.after_step(step)  # on_alarm="rollback": a snapshot when one is due, on every process alike
            return control if self.stopped_step is not None else None
        result = self.run_check(step)
        if result.report is not None:
            self._log(state, control, result.logged, step)
            if state.is_world_process_zero and self.logger:
                write_diagram(self._log_dir(args), self.latest_diagram(step, result.report))
        # every process reaches this line at every check: the schedule depends on the global step only
        (stop,) = sum_across_ranks([int(result.should_stop)], self._device)
        if stop:
            control.should_training_stop = True
            self.record_stop(step, result)
        self.after_step(step)
        return control

    @_forwarded
    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._forget_saved_entries(state)

    @_forwarded
    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.detach()
        handle = getattr(self, "_loss_handle", None)
        if handle is not None:
            handle.remove()
            self._loss_handle = None
        unwrap = getattr(self, "_unwrap_clip", None)
        if unwrap is not None:
            unwrap()
            self._unwrap_clip = None
        message = self.end_of_training(state.global_step)
        if state.is_world_process_zero:
            _LOG.info(message)


class NeuronTopologyCallback(NeuronTopologyMonitorCore, _TrainerAdapter, TrainerCallback, ExportableState):
    """HF Trainer callback: the neuron-topology monitor (merging neurons, bi-Lipschitz distortion, sharpness).

    Every ``every_n_train_steps`` optimizer steps it measures the neuron cloud of each watched layer and logs the
    values (``neurons/{layer}/b0``, ...) through ``trainer.log`` (pass ``trainer=``; see
    `CollapseMonitorCallback`). ``layers`` are dotted paths; ``loss_fn`` (for ``sharpness=True``) is a module-level
    function ``loss_fn(model) -> loss`` or its import path ``"package.module:function"``, so that the arguments
    stay JSON. All other arguments: :class:`topo_callbacks.core.NeuronTopologyMonitorCore`.

    Example::

        trainer.add_callback(NeuronTopologyCallback(trainer=trainer, layers=["bert.encoder.layer.0.output.dense"]))
    """

    def __init__(
        self,
        layers: str | list[str],
        *,
        trainer: Any = None,
        loss_fn: str | Callable[..., Any] | None = None,
        **kwargs: Any,
    ) -> None:
        loss_path = _import_path("loss_fn", loss_fn)
        super().__init__(layers, loss_fn=_load_path(loss_path) if loss_path else None, **kwargs)
        self._args: dict[str, Any] = {"layers": layers, "loss_fn": loss_path, **kwargs}
        if trainer is not None:
            self.bind(trainer)

    _key_hint = "the `prefix` argument"

    @property
    def identity(self) -> str:
        return self.prefix

    @classmethod
    def _identity_of(cls, saved_args: dict[str, Any]) -> str:
        return str(saved_args.get("prefix", _default(NeuronTopologyMonitorCore, "prefix")))

    @_forwarded
    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._register(_setup_of(args, create=True))  # type: ignore[arg-type]

    @_forwarded
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self._begin(args, state):
            self._delegate.on_train_begin(args, state, control, **kwargs)
            return
        self.attach(kwargs["model"])

    @_forwarded
    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._forget_saved_entries(state)
        step = state.global_step
        if self.is_check_step(step):
            optimizer = kwargs.get("optimizer")
            self._log(state, control, self.run_check(step, getattr(optimizer, "optimizer", optimizer)), step)

    @_forwarded
    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._forget_saved_entries(state)
