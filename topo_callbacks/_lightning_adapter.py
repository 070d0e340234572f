"""The Lightning adapter, written once over the framework-agnostic core for both Lightning flavours.

`topo_callbacks.lightning` builds it on ``lightning.pytorch.Callback`` and `topo_callbacks.pytorch_lightning`
on ``pytorch_lightning.Callback``; the flavour is the user's explicit choice of module, never guessed from
what is importable (installing ``lightning`` installs ``pytorch_lightning`` too).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from topo_callbacks.core.detector import loss_scale, scale_fell
from topo_callbacks.core.diagram_file import diagram_path, write_diagram
from topo_callbacks.core.monitor import CheckResult, CollapseMonitorCore
from topo_callbacks.core.neurons import NeuronTopologyMonitorCore
from topo_callbacks.core.rollback import FrameworkStorage, snapshot_name

__all__ = ["build_callbacks", "diagram_path", "lightning_storage", "write_diagram"]


def build_callbacks(callback_base: type, module: str) -> tuple[type, type]:
    """``(CollapseMonitor, NeuronTopologyMonitor)`` on ``callback_base``, named as if defined in ``module``."""
    classes = build_collapse_monitor(callback_base), build_neuron_monitor(callback_base)
    for cls, name in zip(classes, ("CollapseMonitor", "NeuronTopologyMonitor"), strict=True):
        cls.__module__, cls.__qualname__, cls.__name__ = module, name, name
    return classes


def build_collapse_monitor(callback_base: type) -> type:
    """A ``CollapseMonitor`` class deriving from ``callback_base`` (a Lightning ``Callback`` class)."""

    # a child of the flavour's own logger (`lightning.pytorch` / `pytorch_lightning`), which prints INFO as
    # EarlyStopping's messages do
    log = logging.getLogger(f"{callback_base.__module__.split('.callbacks')[0]}.callbacks.topo_callbacks")

    class CollapseMonitor(CollapseMonitorCore, callback_base):  # type: ignore[valid-type,misc]
        __doc__ = _DOC

        @property
        def state_key(self) -> str:
            layer = self.layer if isinstance(self.layer, str) else getattr(self.layer, "__qualname__", "callable")
            return self._generate_state_key(layer=layer, monitor=self.monitor)

        def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
            if stage != "fit":
                return
            for other in trainer.callbacks:
                if other is not self and isinstance(other, CollapseMonitorCore) and other.monitor == self.monitor:
                    raise ValueError(
                        f"two collapse monitors log under `monitor={self.monitor!r}`; give each its own key"
                        " (e.g. monitor='collapse/encoder/ci')."
                    )
            self.attach(pl_module)

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self.optimizer = trainer.optimizers[0] if trainer.optimizers else None
            # `setup` runs before the strategy moves the model to its device: read on a CPU-placed model, the device
            # would send the per-step path down the host branch (a CUDA value read at every step)
            param = next(pl_module.parameters(), None)
            if param is not None:
                self._device = param.device
            policy = self.rollback_policy
            if policy is not None:  # on_alarm="rollback": the objects a rollback restores in place
                self.track(
                    models=pl_module,
                    optimizers=list(trainer.optimizers),
                    schedulers=[config.scheduler for config in trainer.lr_scheduler_configs],
                    scaler=getattr(trainer.precision_plugin, "scaler", None),
                    framework=(
                        lightning_storage(trainer, policy.dirpath, monitor=self, name=snapshot_name(self.monitor))
                        if policy.storage == "framework"
                        else None
                    ),
                )

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            self.prepare_step(trainer.global_step + 1)

        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            if not self.step_channels:
                return
            # gradients are unscaled (AMP) and synced (DDP) here; the rate is the one this step uses
            # tensors, not read here: the monitor reads GPU values in batches (no host sync per step)
            # (None at a step ``max_overhead`` leaves unread: `observes`)
            self._grad_norm: Any = self.step_grad_norm(pl_module, trainer.global_step + 1)
            self._lr: float | None = self.schedule_lr(optimizer)  # without a rollback's factor
            # an fp16 loss scaler (`MixedPrecision` plugin) skips the update whose gradients overflowed and then
            # lowers its scale: the scale before the step tells, after it, whether this one was skipped
            self._scale_before: Any = loss_scale(getattr(trainer.precision_plugin, "scaler", None), as_tensor=True)

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            step = trainer.global_step
            self.add_loss(outputs.get("loss") if isinstance(outputs, Mapping) else outputs)
            if step > self.last_observed_step and self.step_channels:  # an optimizer step ran
                before = getattr(self, "_scale_before", None)
                after = loss_scale(getattr(trainer.precision_plugin, "scaler", None), as_tensor=True)
                fired = self.observe_step(
                    step,
                    grad_norm=getattr(self, "_grad_norm", None),
                    lr=getattr(self, "_lr", None),
                    skipped=scale_fell(before, after),
                    loss_scale=after,
                )
                self._grad_norm = self._lr = self._scale_before = None
                if fired is not None:
                    if self.logger:  # with a rollback, `collapse/rollbacks` too
                        for logger in trainer.loggers:
                            logger.log_metrics({f"{self.prefix}alarm": 1.0, **fired.logged}, step=step)
                    if fired.should_stop:  # the same decision on every rank: the values were averaged over ranks
                        trainer.should_stop = True
                        self.record_stop(step, fired)
            if not self.is_check_step(step):
                self.after_step(step)
                return
            result = self.run_check(step)
            if result.report is not None:
                value = torch.tensor(result.report.ci, device=pl_module.device)
                # For the progress bar and `callback_metrics` (EarlyStopping, ModelCheckpoint) only: the loggers get
                # every value of the check once, below, at the check's step (through both paths, the CI was
                # written twice, and `log_every_n_steps` re-wrote the last one at later steps). Same value on
                # every rank (computed from the gathered sample), so no sync_dist.
                pl_module.log(
                    self.monitor,
                    value,
                    prog_bar=self.prog_bar,
                    logger=False,
                    on_step=True,
                    on_epoch=False,
                    batch_size=1,
                )
                if self.logger:
                    for logger in trainer.loggers:
                        logger.log_metrics(result.logged, step=step)
                if self.logger and trainer.is_global_zero and trainer.loggers:  # no logger, no files
                    # the logger's own folder: `trainer.log_dir` is a broadcast under DDP, not for rank 0 alone
                    logger = trainer.loggers[0]
                    log_dir = getattr(logger, "log_dir", None) or logger.save_dir
                    if log_dir:
                        write_diagram(log_dir, self.latest_diagram(step, result.report))
            self._reduce_stop(trainer, step, result)
            # on_alarm="rollback": a snapshot when one is due (every rank at the same steps); a rollback happened above
            # at this step boundary, and the trainer's step counter and the data move on
            self.after_step(step)

        def _reduce_stop(self, trainer: Any, step: int, result: CheckResult) -> None:
            should_stop = trainer.strategy.reduce_boolean_decision(result.should_stop, all=False)
            if should_stop:
                trainer.should_stop = True
                self.record_stop(step, result)

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            message = self.end_of_training(trainer.global_step)
            if trainer.is_global_zero:
                log.info(message)

        def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
            self.detach()

        def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
            self.detach()

    return CollapseMonitor


def lightning_storage(
    trainer: Any, dirpath: str | None = None, *, monitor: Any = None, name: str = "rollback"
) -> FrameworkStorage:
    """Rollback snapshots through the Trainer's own checkpoints (``RollbackPolicy(storage="framework")``).

    ``save`` is ``trainer.save_checkpoint`` on every rank (with a sharded state dict, as ``ModelParallelStrategy``'s
    default or ``FSDPStrategy(state_dict_type="sharded")``, each rank writes its own shard; otherwise rank 0 writes
    the whole state); it runs the callbacks' and the LightningModule's ``on_save_checkpoint`` as any checkpoint does.
    ``load`` restores what resuming from a checkpoint restores while fitting, in Lightning's order: the
    LightningModule's ``on_load_checkpoint``, the weights (``strict_loading``), the callbacks' ``on_load_checkpoint``
    (weight averaging swaps its weights back there), the precision plugin (loss scaler), the optimizers and the
    schedulers. Not restored: the loops' progress (the step counter and the data move on, as with memory
    snapshots) and the callbacks' ``load_state_dict`` (``monitor``'s record must survive the rollback). ``delete``
    waits for every rank, then removes the checkpoint on rank 0. Files are named ``{name}-step={step}.ckpt``.
    """
    folder = Path(dirpath) if dirpath is not None else Path(trainer.default_root_dir) / "rollback_snapshots"

    def save(step: int) -> str:
        path = str(folder / f"{name}-step={step}.ckpt")
        trainer.save_checkpoint(path, weights_only=False)  # the optimizers too (None logs at every save)
        return path

    def load(path: str) -> None:
        strategy, module = trainer.strategy, trainer.lightning_module
        # written by this run, with the callbacks' plain states: not a weights-only file (Lightning < 2.5 has no flag)
        takes_flag = "weights_only" in inspect.signature(strategy.load_checkpoint).parameters
        checkpoint = strategy.load_checkpoint(path, **({"weights_only": False} if takes_flag else {}))
        module.on_load_checkpoint(checkpoint)
        # a no-op where load_checkpoint loaded the shards
        strategy.load_model_state_dict(checkpoint, strict=getattr(module, "strict_loading", True))
        for callback in trainer.callbacks:
            if callback is not monitor:
                callback.on_load_checkpoint(trainer, module, checkpoint)
        plugin = trainer.precision_plugin
        if callable(getattr(plugin, "on_load_checkpoint", None)):
            plugin.on_load_checkpoint(checkpoint)
        if type(plugin).__qualname__ in checkpoint:
            plugin.load_state_dict(checkpoint[type(plugin).__qualname__])
        strategy.load_optimizer_state_dict(checkpoint)
        for config, state in zip(trainer.lr_scheduler_configs, checkpoint["lr_schedulers"], strict=True):
            config.scheduler.load_state_dict(state)

    def delete(path: str) -> None:
        trainer.strategy.barrier("topo_callbacks.rollback.delete")  # no rank still reads it
        trainer.strategy.remove_checkpoint(path)

    return FrameworkStorage(save=save, load=load, delete=delete)


def build_neuron_monitor(callback_base: type) -> type:
    """A ``NeuronTopologyMonitor`` class deriving from ``callback_base`` (a Lightning ``Callback`` class)."""

    class NeuronTopologyMonitor(NeuronTopologyMonitorCore, callback_base):  # type: ignore[valid-type,misc]
        __doc__ = _NEURON_DOC

        @property
        def state_key(self) -> str:
            return self._generate_state_key(layers=",".join(self.layers), prefix=self.prefix)

        def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
            if stage == "fit":
                self.attach(pl_module)

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            step = trainer.global_step
            if self.is_check_step(step):
                # the weights are the same on every rank (DDP), so are the values; loggers write on rank 0
                logged = self.run_check(step, trainer.optimizers[0] if trainer.optimizers else None)
                for logger in trainer.loggers:
                    logger.log_metrics(logged, step=step)

    return NeuronTopologyMonitor


_NEURON_DOC = """Lightning callback: the neuron-topology monitor (merging neurons, bi-Lipschitz distortion, sharpness).

Every ``every_n_train_steps`` optimizer steps it measures the neuron cloud of each watched layer and sends the
values to the loggers (``neurons/{layer}/b0``, ``.../merged_fraction``, ``.../lip_min``, ``.../breaking``, ...);
``history`` keeps them. All arguments and the measured quantities are those of
:class:`topo_callbacks.core.NeuronTopologyMonitorCore`.

Example::

    from topo_callbacks.lightning import NeuronTopologyMonitor

    trainer = Trainer(callbacks=[NeuronTopologyMonitor(layers=["encoder.0", "encoder.2"], every_n_train_steps=20)])
"""


_DOC = """Lightning callback: log a collapse index of one layer's embeddings, warn, and optionally stop.

Every ``every_n_train_steps`` optimizer steps it gathers up to ``max_samples`` pooled embeddings of ``layer``
from all ranks, computes the collapse index (CI), logs it under ``monitor`` with ``pl_module.log(logger=False)``
(progress bar unless ``prog_bar=False``, ``trainer.callback_metrics``, usable by ``EarlyStopping``/
``ModelCheckpoint``), sends the CI, every term and an ``alarm`` flag (0/1) to the loggers once, at the check's
global step (unless ``logger=False``), keeps the check's H0 persistence diagram in ``collapse_diagram_*.json`` in
the first logger's ``log_dir`` when there is a logger (for ``topo-callbacks report``), and evaluates the alarm rule. An
alarm warns once per episode (``CollapseWarning``); with ``on_alarm="stop"`` (or ``stop_on_alarm=True``) the run
stops on every rank at the same step (the decision is reduced over ranks) and a warning says so. With
``on_alarm="rollback"`` (or a ``RollbackPolicy``) the callback keeps snapshots of the LightningModule, the
optimizers, the LR schedulers and the precision plugin's loss scaler (handed over in ``on_train_start``), and at an
alarm restores the newest one taken before the onset, on every rank at the same step, lowers the learning rate, and
lets training go on: ``trainer.global_step`` is not rewound and the batches in between are not replayed
(``rollbacks`` lists them; ``collapse/rollbacks`` is logged). At the end of training a one-line summary (checks,
first alarm, stop, rollbacks, time spent) goes to Lightning's console logger.

All arguments are those of :class:`topo_callbacks.core.CollapseMonitorCore`.

Attributes:
    history: one dict per check: ``step``, ``ci``, ``alarm``, ``reason`` and every term and channel.
    stopped_step: the global step at which the monitor stopped the run, or None.
    stopping_reason: a :class:`~topo_callbacks.core.StoppingReason`.
    stopping_reason_message: the message of the rule that stopped the run.
    first_alarm_step: the first check at which an alarm fired, or None.
    eps: the calibrated (or given) Vietoris-Rips scale.

Example::

    from lightning.pytorch import Trainer
    from topo_callbacks.lightning import CollapseMonitor

    trainer = Trainer(callbacks=[CollapseMonitor(layer="encoder", every_n_train_steps=50)])

.. tip:: Several monitors (one per layer) can run together; give each its own ``monitor`` key.
"""
