"""HF ``transformers`` Trainer adapter: the collapse monitor as a ``TrainerCallback``.

Importing this module imports ``transformers``; ``import topo_callbacks`` does not.
"""

from __future__ import annotations

import importlib
import warnings
import weakref
from collections.abc import Callable
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from topo_callbacks.core.capture import resolve_layer
from topo_callbacks.core.gather import sum_across_ranks
from topo_callbacks.core.monitor import CollapseMonitorCore, CollapseWarning
from topo_callbacks.core.neurons import NeuronTopologyMonitorCore

__all__ = ["CollapseMonitorCallback", "NeuronTopologyCallback"]

# Trainers bound with `trainer=`, keyed by id of their TrainingArguments: a callback that
# `restore_callback_states_from_checkpoint` rebuilt from JSON finds its trainer again through the `args` the
# Trainer passes to every event (the rebuilt instance cannot receive it any other way).
_BOUND: dict[int, tuple[weakref.ref[Any], weakref.ref[Any]]] = {}


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
    """What both callbacks share: JSON state for ``ExportableState``, binding to a Trainer (kept across the
    Trainer's rebuild of the callback from JSON) and logging through it. Needs ``_args``, ``state_dict`` and
    ``load_state_dict`` from the class it is mixed into."""

    _args: dict[str, Any]
    _trainer: weakref.ref[Any] | None = None
    _warned_unbound = False

    def state(self) -> dict[str, Any]:
        return {"args": dict(self._args), "attributes": {"monitor_state": self.monitor_state}}

    @property
    def monitor_state(self) -> dict[str, Any]:
        """The core's plain-data state; assigning it restores it (the Trainer sets attributes on restore)."""
        return self.state_dict()  # type: ignore[attr-defined,no-any-return]

    @monitor_state.setter
    def monitor_state(self, state: dict[str, Any]) -> None:
        self.load_state_dict(state)  # type: ignore[attr-defined]

    def bind(self, trainer: Any) -> Any:
        """Log through ``trainer.log`` (also after the Trainer rebuilt this callback from a checkpoint)."""
        self._trainer = weakref.ref(trainer)
        for key in [k for k, (args, bound) in _BOUND.items() if args() is None or bound() is None]:
            del _BOUND[key]
        _BOUND[id(trainer.args)] = (weakref.ref(trainer.args), self._trainer)
        return self

    def _find_trainer(self, args: Any) -> None:
        if self._trainer is None:
            refs = _BOUND.get(id(args))
            if refs is not None and refs[0]() is args and refs[1]() is not None:
                self._trainer = refs[1]

    def _log(self, state: Any, values: dict[str, float], step: int) -> None:
        trainer = self._trainer() if self._trainer is not None else None
        if trainer is not None:
            trainer.log(dict(values))
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
        pool, select: as in the core; a callable must be a module-level function (stored by its import path
            ``"package.module:function"``, which is also accepted).
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
        pool_path = _import_path("pool", pool)
        select_path = _import_path("select", select)
        super().__init__(
            layer,
            pool=_load_path(pool) if isinstance(pool, str) and ":" in pool else pool,
            select=_load_path(select) if isinstance(select, str) else select,
            **kwargs,
        )
        self._args: dict[str, Any] = {"layer": layer, "pool": pool_path, "select": select_path, **kwargs}
        if trainer is not None:
            self.bind(trainer)

    # ------------------------------------------------------------------ events
    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model = kwargs.get("model")
        if model is not None:  # a wrong layer fails when the Trainer is built, on every process
            resolve_layer(model, self.layer)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.attach(kwargs["model"])
        self._find_trainer(args)
        self.prepare_step(state.global_step + 1)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.prepare_step(state.global_step + 1)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        step = state.global_step
        if not self.is_check_step(step):
            return None
        result = self.run_check(step)
        if result.report is not None:
            self._log(state, result.logged, step)
        # every process reaches this line at every check: the schedule depends on the global step only
        (stop,) = sum_across_ranks([int(result.should_stop)], self._device)
        if stop:
            control.should_training_stop = True
            self.record_stop(step, result)
        return control

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.detach()


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

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.attach(kwargs["model"])
        self._find_trainer(args)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        step = state.global_step
        if self.is_check_step(step):
            optimizer = kwargs.get("optimizer")
            self._log(state, self.run_check(step, getattr(optimizer, "optimizer", optimizer)), step)
