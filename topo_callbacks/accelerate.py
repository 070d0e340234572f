"""Accelerate adapter: the collapse monitor for a plain ``accelerate`` training loop.

Importing this module imports ``accelerate``; ``import topo_callbacks`` does not.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from topo_callbacks.core.capture import LayerSpec
from topo_callbacks.core.detector import loss_scale, scale_fell
from topo_callbacks.core.diagram_file import write_diagram
from topo_callbacks.core.monitor import CollapseMonitorCore
from topo_callbacks.core.neurons import NeuronTopologyMonitorCore
from topo_callbacks.core.rollback import FrameworkStorage, random_state, set_random_state, snapshot_name

__all__ = ["AccelerateCollapseMonitor", "AccelerateNeuronTopologyMonitor", "accelerate_storage"]

_LOG = logging.getLogger(__name__)


class AccelerateCollapseMonitor(CollapseMonitorCore):
    """Collapse monitor for an Accelerate loop: call `step` after each optimizer step; stop when it returns True.

    ``layer`` is resolved on ``accelerator.unwrap_model(model)`` (so ``module.``/``_orig_mod.`` prefixes don't
    matter). Every ``every_n_train_steps`` steps `step` gathers embeddings from all processes, computes the CI,
    logs the CI and its terms with ``accelerator.log`` and evaluates the alarm rule; with ``stop_on_alarm=True``
    the decision goes through ``set_trigger``/``check_trigger``, so `step` returns True on every process at the
    same step. The monitor counts optimizer steps itself: under gradient accumulation (``accelerator.accumulate``)
    call `step` after every ``optimizer.step()`` as usual; a call while ``accelerator.sync_gradients`` is False (a
    micro-batch whose step the optimizer skipped) is not counted. Pass ``step=`` to use your own global step (e.g.
    after resuming). With a TensorBoard tracker, the latest H0 diagram is kept next to its events for
    ``topo-callbacks report``; ``close()`` logs a one-line summary (logger ``topo_callbacks.accelerate``).
    ``optimizer=`` (optional): the learning rate of each step is read from it (a decay or a warm restart of the
    schedule is then not scored as a failure), and ``curvature_ratio`` when a ``loss_fn`` is given; without it the
    accelerator's first prepared optimizer is read. Steps an fp16 loss scaler skipped (gradient overflow) are counted,
    not scored: Accelerate's own scaler (``mixed_precision="fp16"``, read through
    ``accelerator.optimizer_step_was_skipped``) or your own ``torch.amp.GradScaler`` passed as ``scaler=``.
    It is checkpointable: ``accelerator.register_for_checkpointing(monitor)``. ``close()`` (or a ``with``
    block) removes the hook. All other arguments are those of
    :class:`~topo_callbacks.core.CollapseMonitorCore`.

    ``on_alarm="rollback"`` (or a ``RollbackPolicy``): `step` takes the snapshots and, at an alarm, restores the model,
    the optimizer(s), the LR scheduler(s) and the loss scaler in place, on every process at the same step, and lowers
    the learning rate; your loop goes on with its next batch (nothing is replayed, your step counter is not rewound).
    Accelerate has no scheduler hook: pass ``scheduler=`` (one or a list), or the schedulers you gave
    ``accelerator.prepare`` are used (``accelerator._schedulers``); likewise ``optimizer=`` or the prepared optimizers,
    and ``scaler=`` or Accelerate's own. Call `step` at the same point of every iteration (after ``optimizer.step()``,
    before ``optimizer.zero_grad()``, on the same side of ``scheduler.step()``): snapshot and restore then agree.

    Example::

        accelerator = Accelerator()
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        with AccelerateCollapseMonitor(accelerator, model, layer="encoder", stop_on_alarm=True) as monitor:
            accelerator.register_for_checkpointing(monitor)
            for batch in loader:
                loss = model(batch).loss
                accelerator.backward(loss)
                optimizer.step()
                stop = monitor.step(loss=loss)  # before zero_grad: it reads the gradient norm
                optimizer.zero_grad()
                if stop:
                    break
    """

    def __init__(
        self,
        accelerator: Any,
        model: nn.Module,
        layer: LayerSpec,
        *,
        optimizer: Any = None,
        scaler: Any = None,
        scheduler: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(layer, **kwargs)
        if scaler is not None and not callable(getattr(scaler, "get_scale", None)):
            raise ValueError(f"`scaler` must be a torch.amp.GradScaler or None; got {scaler!r}.")
        if scheduler is not None and not all(
            callable(getattr(s, "load_state_dict", None))
            for s in (scheduler if isinstance(scheduler, list) else [scheduler])
        ):
            raise ValueError(f"`scheduler` must be an LR scheduler, a list of them, or None; got {scheduler!r}.")
        self.optimizer = optimizer
        self.scaler = scaler
        self.scheduler = scheduler
        self._last_scale: Any = loss_scale(scaler, as_tensor=True)
        self.accelerator = accelerator
        self.global_step = 0
        self.attach(accelerator.unwrap_model(model))
        self.prepare_step(1)
        self._track_objects()

    def _track_objects(self) -> None:
        """on_alarm="rollback": hand the core the model, optimizers, schedulers and scaler (when the optimizers are
        known: passed, or prepared already; else at the first `step`)."""
        if self.rollback_policy is None:
            return
        optimizers = (
            [self.optimizer] if self.optimizer is not None else list(getattr(self.accelerator, "_optimizers", []))
        )
        if not optimizers:
            return
        scheduler = self.scheduler
        schedulers = scheduler if isinstance(scheduler, list) else [scheduler] if scheduler is not None else None
        if schedulers is None:
            schedulers = list(getattr(self.accelerator, "_schedulers", []))
        scaler = self.scaler if self.scaler is not None else getattr(self.accelerator, "scaler", None)
        framework = None
        if self.rollback_policy.storage == "framework":
            framework = accelerate_storage(
                self.accelerator,
                self,
                schedulers,
                self.rollback_policy.dirpath,
                model=self.model,
                name=snapshot_name(self.monitor),
            )
        self.track(models=self.model, optimizers=optimizers, schedulers=schedulers, scaler=scaler, framework=framework)

    def step(
        self, step: int | None = None, *, loss: Any = None, grad_norm: Any = None, lr: float | None = None
    ) -> bool:
        """Count one optimizer step (or set it to ``step``); check when due. True: stop, on every process.

        ``loss``: this micro-batch's training loss (a tensor or a number), for the detector's loss channel.
        ``grad_norm``: the global gradient norm (e.g. what ``accelerator.clip_grad_norm_`` returned); without it
        the monitor computes it from the model's gradients when they are still there (call `step` before
        ``optimizer.zero_grad()``). ``lr``: the learning rate of the step (default: read from the optimizer).
        Without ``step``, a call during gradient accumulation's micro-batches
        (``accelerator.sync_gradients`` False: the optimizer skipped its step) only adds its loss and returns False.
        """
        self.add_loss(loss)
        if step is None and not getattr(self.accelerator, "sync_gradients", True):
            return False
        self.global_step = self.global_step + 1 if step is None else int(step)
        current = self.global_step
        stop = False
        if self.rollback_policy is not None and self.rollback_controller is None:
            self._track_objects()  # the optimizer was prepared after the monitor was built
        if self.step_channels:
            if grad_norm is None and "grad_norm" in self.step_channels and self.model is not None:
                grad_norm = self.step_grad_norm(self.model, current)
            fired = self.observe_step(
                current,
                grad_norm=grad_norm,  # a tensor is read with a batch of steps: no host sync per step on a GPU
                lr=self._learning_rate() if lr is None else lr,
                skipped=self._step_was_skipped(),
                loss_scale=self._last_scale,
            )
            if fired is not None:
                if self.logger:  # with a rollback, `collapse/rollbacks` too
                    self.accelerator.log({f"{self.prefix}alarm": 1.0, **fired.logged}, step=current)
                if fired.should_stop:  # the same decision on every process: the values were averaged over them
                    self.record_stop(current, fired)
                    stop = True
        if self.is_check_step(current):
            result = self.run_check(current)
            if result.report is not None and self.logger:
                self.accelerator.log(result.logged, step=current)
                if self.accelerator.is_main_process:
                    for tracker in getattr(self.accelerator, "trackers", []):
                        log_dir = getattr(tracker, "logging_dir", None)
                        if isinstance(log_dir, str) and log_dir:
                            write_diagram(log_dir, self.latest_diagram(current, result.report))
            if result.should_stop:
                self.accelerator.set_trigger()
            # a collective at every check on every process (the schedule is the same everywhere)
            if self.accelerator.check_trigger() and not stop:
                stop = True
                self.record_stop(current, result)
        self.after_step(current)  # on_alarm="rollback": a snapshot when one is due, on every process alike
        self.prepare_step(current + 1)
        return stop

    def _learning_rate(self) -> float | None:
        optimizers = [self.optimizer] if self.optimizer is not None else getattr(self.accelerator, "_optimizers", [])
        return self.schedule_lr(optimizers[0]) if optimizers else None

    def _step_was_skipped(self) -> Any:
        """Whether a loss scaler skipped the step just taken: the user's scaler lowered its scale since the last call
        (a tensor, read with a batch of steps), or Accelerate's own scaler says so."""
        if self.scaler is not None:
            before, self._last_scale = self._last_scale, loss_scale(self.scaler, as_tensor=True)
            return scale_fell(before, self._last_scale)
        if getattr(self.accelerator, "scaler", None) is not None:
            self._last_scale = loss_scale(self.accelerator.scaler)
            return bool(getattr(self.accelerator, "optimizer_step_was_skipped", False))
        return False

    def close(self) -> None:
        """Remove the forward hook (results and state stay) and log the run's summary (once)."""
        if self.capture.attached:
            message = self.end_of_training(self.global_step)
            if self.accelerator.is_main_process:
                _LOG.info(message)
        self.detach()

    def __enter__(self) -> AccelerateCollapseMonitor:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:  # leaving on an error (maybe on one rank only): no summary, no collective such as a snapshot's delete
            self.detach()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "global_step": self.global_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.global_step = int(state.get("global_step", self.global_step))
        self.prepare_step(self.global_step + 1)


def accelerate_storage(
    accelerator: Any,
    monitor: Any = None,
    schedulers: Any = (),
    dirpath: str | None = None,
    *,
    model: Any = None,
    name: str = "rollback",
) -> FrameworkStorage:
    """Rollback snapshots through ``accelerator.save_state`` / ``load_state`` (``RollbackPolicy(storage="framework")``).

    What the accelerator's checkpoint holds is restored: the prepared models and optimizers (with FSDP's
    ``SHARDED_STATE_DICT`` each rank its own shard; with a full state dict rank 0 gathers the whole state), the
    prepared schedulers, the loss scaler, the objects registered for checkpointing, and the ``schedulers`` given here
    that were not prepared. Left out, so that a rollback moves on as memory snapshots do: the monitor itself (its
    rollback record must survive the rollback; the detector's state comes back through the snapshot), the
    dataloaders' positions (the batches between the snapshot and the alarm are not replayed) and the random
    generators (``load_state`` rewinds them; they are put back: the controller decides, ``restore_rng``). Automatic
    checkpoint naming and the iteration counter are left as they were: these saves neither take the user's checkpoint
    numbers nor count against ``total_limit``. ``model``: the model the monitor watches; a save refuses to run
    when the accelerator did not prepare it (its weights would not be in the snapshot). Every rank calls
    ``save``/``load``/``delete`` at the same step; folders are named ``{name}-step={step}``.

    The adapter builds it for ``on_alarm=RollbackPolicy(storage="framework")``; by hand:
        >>> import tempfile, torch
        >>> from accelerate import Accelerator
        >>> accelerator = Accelerator(cpu=True)
        >>> layer = accelerator.prepare(torch.nn.Linear(2, 1))
        >>> storage = accelerate_storage(accelerator, dirpath=tempfile.mkdtemp())
        >>> path = storage.save(100)
        >>> with torch.no_grad():
        ...     _ = layer.weight.zero_()
        >>> storage.load(path)
        >>> bool(layer.weight.abs().sum() > 0), path.endswith("rollback-step=100")
        (True, True)
        >>> storage.delete(path)
    """
    root = Path(accelerator.project_dir or Path.cwd())
    folder = Path(dirpath) if dirpath is not None else root / "rollback_snapshots"
    schedulers = list(schedulers or ())

    @contextmanager
    def own_objects() -> Iterator[None]:
        prepared = getattr(accelerator, "_schedulers", [])  # AcceleratedScheduler wrappers, saved by save_state
        unprepared = [s for s in schedulers if not any(s is p or getattr(p, "scheduler", None) is s for p in prepared)]
        objects, loaders = accelerator._custom_objects, accelerator._dataloaders
        kept_objects, kept_loaders = list(objects), list(loaders)
        config = accelerator.project_configuration
        naming, iteration = config.automatic_checkpoint_naming, config.iteration
        objects[:] = [o for o in kept_objects if o is not monitor] + unprepared
        loaders[:] = []
        config.automatic_checkpoint_naming = False
        try:
            yield
        finally:
            objects[:], loaders[:] = kept_objects, kept_loaders
            config.automatic_checkpoint_naming, config.iteration = naming, iteration

    def save(step: int) -> str:
        if model is not None and not any(accelerator.unwrap_model(m) is model for m in accelerator._models):
            raise ValueError(
                "storage='framework' saves what the accelerator prepared, and the watched model is not among its"
                " prepared models (a Trainer that wraps the model itself?): the snapshot would hold no weights."
                " Use storage='memory'."
            )
        path = str(folder / f"{name}-step={step}")
        with own_objects():
            accelerator.save_state(path)
        return path

    def load(path: str) -> None:
        generators = random_state()
        with own_objects():
            accelerator.load_state(path)
        set_random_state(generators)

    def delete(path: str) -> None:
        accelerator.wait_for_everyone()  # every rank has written its shard
        if accelerator.is_main_process:
            shutil.rmtree(path, ignore_errors=True)

    return FrameworkStorage(save=save, load=load, delete=delete)


class AccelerateNeuronTopologyMonitor(NeuronTopologyMonitorCore):
    """The neuron-topology monitor for an Accelerate loop: call `step` after each optimizer step.

    Layers are resolved on ``accelerator.unwrap_model(model)``; at a check the values go to ``accelerator.log``
    and are returned. Checkpointable with ``accelerator.register_for_checkpointing``. All other arguments are those
    of :class:`~topo_callbacks.core.NeuronTopologyMonitorCore`.

    Example::

        monitor = AccelerateNeuronTopologyMonitor(accelerator, model, layers=["encoder.0"], every_n_train_steps=20)
        for batch in loader:
            ...
            optimizer.step()
            monitor.step(optimizer)
    """

    def __init__(self, accelerator: Any, model: nn.Module, layers: str | list[str], **kwargs: Any) -> None:
        super().__init__(layers, **kwargs)
        self.accelerator = accelerator
        self.global_step = 0
        self.attach(accelerator.unwrap_model(model))

    def step(self, optimizer: Any = None, step: int | None = None) -> dict[str, float] | None:
        """Count one optimizer step (or set it to ``step``); at a check, log and return the values.

        As `AccelerateCollapseMonitor.step`: a call while ``accelerator.sync_gradients`` is False counts nothing.
        """
        if step is None and not getattr(self.accelerator, "sync_gradients", True):
            return None
        self.global_step = self.global_step + 1 if step is None else int(step)
        if not self.is_check_step(self.global_step):
            return None
        # an AcceleratedOptimizer keeps the torch optimizer (its param_groups, its state) in `.optimizer`
        logged = self.run_check(self.global_step, getattr(optimizer, "optimizer", optimizer))
        self.accelerator.log(logged, step=self.global_step)
        return logged

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "global_step": self.global_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.global_step = int(state.get("global_step", self.global_step))
