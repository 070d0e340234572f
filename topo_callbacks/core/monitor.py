"""The framework-agnostic collapse monitor: schedule, capture, gather, CI, scale calibration, alarm, state.

Adapters (Lightning, Accelerate, HF) translate their events into three calls: `attach` once, `prepare_step`
before each optimizer step's forward passes, and `run_check` after an optimizer step for which `is_check_step`
holds; they log `CheckResult.logged` and reduce `CheckResult.should_stop` over ranks.
"""

from __future__ import annotations

import dataclasses
import math
import re
import statistics
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from topo_callbacks.core.alarm import AlarmRule, StoppingReason
from topo_callbacks.core.budget import (
    CHECK_SHARE_FLOOR,
    HOST_BATCH_FROM,
    LONGEST_SPACING,
    MAX_GRAD_STRIDE,
    MAX_SPACING,
    MAX_STRIDE,
    MIN_SAMPLES,
    PLANNED_SHARE,
    check_spacing,
    grad_stride,
    step_stride,
)
from topo_callbacks.core.capture import POOLS, EmbeddingCapture, LayerSpec, resolve_layer
from topo_callbacks.core.detector import (
    _ALWAYS,
    ABSOLUTE_HOLD,
    CHANNELS,
    DEAD_ROWS_CHANGE,
    STEP_MIN_REFERENCE,
    STEP_WINDOW,
    ZERO_GRAD_STEPS,
    CusumDetector,
    DetectorFiring,
    LrState,
    default_calibration,
    grad_norms,
    gradient_curvature,
    learning_rate,
    lr_event,
)
from topo_callbacks.core.gather import (
    broadcast_from_rank0,
    dead_units_across_ranks,
    gather_samples,
    sum_across_ranks,
    sum_floats_across_ranks,
    world_size,
)
from topo_callbacks.core.layer_norms import LayerGradNorms
from topo_callbacks.core.probe import embed_probe, probe_rows
from topo_callbacks.core.rollback import (
    RECOLLAPSE_CHECKS,
    RECOLLAPSE_RATIO,
    RECOLLAPSE_WINDOW,
    RISE_KEPT,
    FrameworkStorage,
    RollbackController,
    RollbackDecision,
    RollbackPolicy,
    RollbackReason,
    TrainingState,
    resolve_on_alarm,
)
from topo_callbacks.core.step_reads import DEVICE_READ_EVERY, HOST_READ_EVERY, StepReads
from topo_callbacks.core.tracker import SOURCES, EngineTracker, Source, unit_rows
from topo_callbacks.functional._validation import check_eps, drop_nonfinite
from topo_callbacks.functional.collapse import CollapseReport, collapse_index, resolve_weights
from topo_callbacks.functional.consecutive import contracted_pairs, h0_diagram_distance, neighbourhood_preservation

__all__ = ["CheckResult", "CollapseMonitorCore", "CollapseWarning"]


class CollapseWarning(UserWarning):
    """Raised (as a warning) when the alarm rule fires, or when a check had to be skipped."""


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """What one check produced. ``report`` is None when the check was skipped (``skipped`` says why)."""

    step: int
    report: CollapseReport | None
    reason: StoppingReason = StoppingReason.NOT_STOPPED
    message: str = ""
    alarm: bool = False
    should_stop: bool = False
    skipped: str | None = None
    logged: dict[str, float] = dataclasses.field(default_factory=dict)
    #: with ``on_alarm="rollback"``: the rollback this alarm caused (the entry of `CollapseMonitorCore.rollbacks`)
    rollback: dict[str, Any] | None = None


@dataclasses.dataclass
class _RecollapseWatch:
    """After a rollback (`CollapseMonitorCore._collapsed_again`): the effective rank of the restored snapshot's last
    check and that check's rows, the checks in a row since under `RECOLLAPSE_RATIO` of it, and the checks left."""

    rank: float
    rows: int
    below: int = 0
    left: int = RECOLLAPSE_WINDOW


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class CollapseMonitorCore:
    """Watch one layer's embeddings every ``every_n_train_steps`` optimizer steps and raise a collapse alarm.

    Args:
        layer: dotted path of the submodule to watch (``"encoder"``, ``"backbone.layer4"``), resolved on the
            unwrapped model, or a callable ``model -> nn.Module``.
        every_n_train_steps: check after every this many optimizer steps (decided from the global step, so the
            same on every rank and once per step under gradient accumulation).
        max_samples: global budget of embedding rows per check, split over ranks before gathering.
        source: where a check's points come from. ``"stream"`` (default): the training batches' rows captured
            just before the check. ``"probe"``: the fixed ``probe`` batch, embedded at each check by every rank
            (eval mode, no gradients, see `embed_probe`); row ``i`` is the same example every time, so the series
            is comparable from check to check and the Betti numbers are updated by moves of the rows that
            changed: once eps is fixed, a probe's b0/b1 come from one `MMHMEngine` kept across checks
            (`EngineTracker`; float32 rows). A stream's sample is replaced whole at every check, so its b0/b1 come
            from the check's own exact distances (`collapse_index`).
        probe: the probe inputs for ``source="probe"``: a tensor (``model(probe)``), a tuple/list
            (``model(*probe)``) or a mapping (``model(**probe)``), at most ``max_samples`` rows.
        compute_on: ``"all"``: every rank receives the global sample (one all-gather) and computes the CI (no
            further communication; the result is the same everywhere); ``"rank0"``: only rank 0 receives it (one
            gather) and computes, then broadcasts the report, so the other ranks hold no global sample and spend
            no compute (they wait for rank 0 instead).
        pool: how outputs of more than 2 dims become rows: ``"mean"``, ``"first"``, ``"last"``, ``"flatten"`` or a
            callable. See `pool_output`.
        select: callable picking the tensor out of a non-tensor layer output (default: `select_tensor`'s rule).
        eps: a fixed Vietoris-Rips scale; None calibrates it: the median of the 8-neighbour scale of the first
            ``calibration_checks`` checks, then held fixed, so that collapse shows as the eps-graph filling in.
        eps_quantile: quantile of pairwise distances for the calibration (None: the 8-neighbour rule).
        calibration_checks: number of checks whose scales are pooled into the calibrated eps.
        weights: CI weights: ``"benchmark"`` (default: betti, entropy, anisotropy and rank terms, equally; chosen by
            the collapse-scenario benchmark), ``"paper"`` (the published 0.4/0.3/0.3) or a mapping (`collapse_index`).
        normalize: row scaling for the topological terms, ``"l2"`` or ``"none"``.
        monitor: the key the CI is logged under; the terms are logged beside it with the same prefix
            (``collapse/ci`` -> ``collapse/betti_term``, ...). Give each monitor of a run its own key.
        alarm: ``"detector"`` (default): the CUSUM detector (`topo_callbacks.core.detector`) over the per-step
            channels the adapter feeds (`observe_step`: the training loss, the global gradient norm, the learning
            rate, the steps a loss scaler skipped) and the check's channels, calibrated by the benchmark to
            ``false_alarm_rate``, with absolute rules that need no reference (non-finite or extreme values, abrupt
            breaks, collapsed embeddings, no gradient, a falling loss scale); it can fire at any optimizer step,
            re-arms after each alarm episode and tells each one. ``"rise"``: the rule that was the default before
            it, a rise of the CI over the run's baseline (``max_rise``, ``baseline_checks``, ``rise_patience``).
            The EarlyStopping-style rules below apply in both.
        false_alarm_rate: the detector's target number of false alarms per 10,000 optimizer steps of healthy
            training, one of the rates the benchmark calibrated (0.01, 0.02, 0.05, 0.1, 0.2); the default 0.05 is one
            per 200,000 healthy steps on the benchmark's calibration runs (measured on its test runs: see
            docs/benchmark.md).
        loss_fn: optional ``loss_fn(model) -> loss`` on a fixed batch: each check then logs ``grad_curvature``
            (the loss's curvature along its gradient, one Hessian-vector product) and, when the adapter knows the
            optimizer, ``curvature_ratio`` (lr x that over the optimizer's stability level; loss spikes come past
            1). See `topo_callbacks.core.detector.gradient_curvature`.
        mode, min_delta, patience, stopping_threshold, divergence_threshold, check_finite: as in Lightning's
            ``EarlyStopping``, applied to the CI at each check (``mode="min"``: a lower CI is healthier).
        max_rise: with ``alarm="rise"``: alarm when the CI is more than this above the run's baseline (the median
            of the ``baseline_checks`` checks after calibration) for ``rise_patience`` consecutive checks; None: off.
        baseline_checks: checks whose median is the baseline (``alarm="rise"``).
        rise_patience: consecutive checks the rise must last (``alarm="rise"``).
        on_alarm: what an alarm does. ``"warn"`` (default): warn and log. ``"stop"``: stop the run (the decision
            reduced over ranks; ``stop_on_alarm=True`` says the same). ``"rollback"`` or a `RollbackPolicy` (or, where
            the arguments must be plain, a dict of its fields): go back to the newest snapshot of the training state
            taken while the detector was quiet and older than the weights the alarm's first abnormal value came from
            (the onset; a value read at step t comes from the weights after step t-1; a failure back after a rollback
            retries the snapshot it came back from unless its change began before the resume), lower the learning
            rate by the policy's ``lr_factor`` (on top of the schedule, for the rest of the run) and continue on fresh
            data, the detector resuming from the snapshot's state; after ``max_rollbacks`` rollbacks, or when the
            failure comes back with no older snapshot left, the next alarm stops the run
            (`StoppingReason.ROLLBACK_GAVE_UP`). It needs the live training objects: the adapters hand them over
            (`track`); a plain loop calls `track` and `after_step`. An alarm of ``stopping_threshold`` (a good level
            reached) or ``patience`` (no improvement) only warns.
        stop_on_alarm: stop training when the alarm fires; False only warns and logs (the older spelling of
            ``on_alarm="stop"``; refused together with a rollback).
        strict: raise on a monitoring failure instead of warning and skipping the check.
        verbose: also report every check (not only alarms) through ``warnings``/the adapter's logger.
        prog_bar: show the CI in the progress bar (Lightning; as ``LightningModule.log(prog_bar=...)``).
        logger: send the check's values to the framework's loggers (Lightning loggers, ``trainer.log``,
            ``accelerator.log``); False keeps them in ``history`` (and, in Lightning, ``callback_metrics``) only.
        max_overhead: the share of the training wall time the monitor may take (default 0.02: 2%); None: checks every
            ``every_n_train_steps`` whatever they cost. The monitor times the steps and its own work, and after each
            check spaces the next one (a multiple of ``every_n_train_steps``, never closer, at most `LONGEST_SPACING`
            times further) so that the check's cost stays within the budget (planned for `PLANNED_SHARE` of it). With
            ``source="stream"``, no fixed ``eps`` and more than `MIN_SAMPLES` rows, the first check of a run (not of a
            resumed one) is a trial on `MIN_SAMPLES` rows that measures a check's cost before the sample is chosen (its
            scale and channels are not fed to the calibration or the detector); while the scale is still being
            calibrated (the first ``calibration_checks`` checks) a check too expensive for `MAX_SPACING` times the
            spacing lowers ``max_samples`` instead (down to `MIN_SAMPLES`; ``source="stream"``), once the scale is held
            the sample stays. Timings are averaged over ranks, so every rank checks at the same steps. The realised
            share is logged (``collapse/overhead``) and in `summary`. The per-step work (the gradient norm, reading the
            loss, the detector's update: tens to hundreds of microseconds on a CPU) is done at every step. On the CPU,
            once it costs more than a quarter of the budget, the detector scores it in batches of `HOST_READ_EVERY`
            (8) steps (every step scored, a CUSUM alarm up to 7 steps later, a non-finite, zero or doubled value at
            once). Once it costs more than half the budget, the gradient norm is computed at one read in 2 or 4 only
            (`grad_every`, `reads_grad_norm`; the loss is still read at every step), each read of it adding to its
            CUSUMs what the reads it stands for would (replayed on the benchmark's calibration seeds: at one read in 4
            the same detections, one clean run more alarmed of 160). If it alone still costs more than `STRIDE_FROM`
            (2) times the budget (steps of a millisecond or less; 4 times until 2026-12-05), the per-step channels are
            read at every `observe_every`-th step only (`observes`; at most `MAX_STRIDE`), and a
            per-step alarm comes up to that many steps later. Every one of a process's first `STEP_WINDOW` (200) steps
            is read whatever the stride (a run broken from its start is scored from its start), the loss of a step not
            read is averaged into the next read's, and the per-step references keep about 200 optimizer steps of
            reads. The loss of k steps in one read adds to its CUSUMs what k reads would
            (`CusumDetector.set_step_window`); the gradient norm, computed at the read step only, counts as one read
            (as the reads since the last where it is computed at one read in `grad_every`, fewer once its reference
            spans more than `LAG_SPAN` x 200 steps and lags a trend), and the check channels
            count per check: reading or checking less often makes their false alarms rarer
            per step and their alarms later, not more frequent. Between checks spaced out, a unit check at every
            ``every_n_train_steps`` feeds the dormant-unit rule the share of dead units of the rows captured
            (`summary`'s ``unit_checks``): that rule compares a check with the three before and would otherwise wait
            for thousands of steps.
        read_every_n_steps: per-step values that are CUDA tensors (the loss, the gradient norm) are read to the host in
            batches of this many steps, one non-blocking copy per batch (and, under DDP, one all-reduce per batch): no
            host synchronisation at the other steps. None (default): `DEVICE_READ_EVERY` (2) on a GPU; on the CPU every
            step, or `HOST_READ_EVERY` (8) when ``max_overhead`` finds the per-step work costly. An alarm of a
            per-step rule then comes up to this many steps (plus the copy's landing: on one process a copy is picked
            up as soon as it has landed, never waited for while fewer than `MAX_IN_FLIGHT` are in flight; under DDP up
            to twice this many: a batch is picked up when the next one is due, at the same step on every rank) after
            the step that caused it, times `observe_every` when ``max_overhead`` reads only every k-th step; a check
            step reads everything first, and on one process a CPU value that is non-finite, zero or over twice its
            reference's largest is scored at once. On the benchmark, batches of 2 detect as many failures before
            their metric drops as reading at the step; batches of 8 lose the abrupt ones (`DEVICE_READ_EVERY`).

    Example (a plain PyTorch loop; the framework adapters make these calls for you):
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
        >>> monitor = CollapseMonitorCore("1", every_n_train_steps=5, max_samples=64, max_overhead=None)
        >>> _ = monitor.attach(model)
        >>> for step in range(1, 11):
        ...     monitor.prepare_step(step)
        ...     _ = model(torch.randn(32, 8))  # forward (+ backward and optimizer step)
        ...     if monitor.is_check_step(step):
        ...         result = monitor.run_check(step)
        >>> [h["step"] for h in monitor.history], 0.0 <= monitor.history[-1]["ci"] <= 1.0
        ([5, 10], True)
        >>> monitor.detach()

    With the default ``max_overhead=0.02`` the same loop checks less often: its steps take microseconds and a check
    milliseconds, so the checks are spaced out (``check_every``) to keep the monitor under 2% of the time.
        >>> monitor = CollapseMonitorCore("1", every_n_train_steps=5, max_samples=64)
        >>> _ = monitor.attach(model)
        >>> for step in range(1, 41):
        ...     monitor.prepare_step(step)
        ...     _ = model(torch.randn(32, 8))
        ...     if monitor.is_check_step(step):
        ...         result = monitor.run_check(step)
        >>> [h["step"] for h in monitor.history], monitor.check_every > 30  # spaced from the first check on
        ([5], True)
        >>> monitor.detach()
    """

    def __init__(
        self,
        layer: LayerSpec,
        *,
        every_n_train_steps: int = 50,
        max_samples: int = 1024,
        source: Source = "stream",
        probe: Any = None,
        compute_on: Literal["all", "rank0"] = "all",
        pool: str | Callable[[Tensor], Tensor] = "mean",
        select: Callable[[Any], Tensor] | None = None,
        eps: float | None = None,
        eps_quantile: float | None = None,
        calibration_checks: int = 3,
        weights: str | Mapping[str, float] = "benchmark",
        normalize: Literal["l2", "none"] = "l2",
        monitor: str = "collapse/ci",
        alarm: Literal["detector", "rise"] = "detector",
        false_alarm_rate: float = 0.05,
        loss_fn: Callable[[nn.Module], Tensor] | None = None,
        mode: str = "min",
        min_delta: float = 0.0,
        patience: int | None = None,
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
        max_rise: float | None = 0.2,
        baseline_checks: int = 3,
        rise_patience: int = 2,
        check_finite: bool = True,
        on_alarm: str | RollbackPolicy | Mapping[str, Any] = "warn",
        stop_on_alarm: bool = False,
        strict: bool = False,
        verbose: bool = False,
        prog_bar: bool = True,
        logger: bool = True,
        max_overhead: float | None = 0.02,
        read_every_n_steps: int | None = None,
    ) -> None:
        if not (isinstance(layer, str) and layer) and not callable(layer):
            raise ValueError(
                f"`layer` must be a dotted module path (str) or a callable(model) -> Module; got {layer!r}."
            )
        _check_int("every_n_train_steps", every_n_train_steps, 1)
        _check_int("max_samples", max_samples, 8)
        _check_int("calibration_checks", calibration_checks, 1)
        if max_overhead is not None and (
            isinstance(max_overhead, bool) or not isinstance(max_overhead, (int, float)) or not 0 < max_overhead < 1
        ):
            raise ValueError(
                "`max_overhead` must be a share of the training time in (0, 1) (0.02 = 2%) or None;"
                f" got {max_overhead!r}."
            )
        if read_every_n_steps is not None:
            _check_int("read_every_n_steps", read_every_n_steps, 1)
        if source not in SOURCES:
            raise ValueError(f"`source` must be one of {SOURCES}; got {source!r}.")
        if source == "probe":
            rows = probe_rows(probe)
            if rows is None:
                raise ValueError(
                    "`probe` must be a batch of model inputs (a tensor, a tuple/list or a mapping holding a tensor)"
                    f" when source='probe'; got {type(probe).__name__}."
                )
            if rows > max_samples:
                raise ValueError(f"`probe` has {rows} rows, more than `max_samples={max_samples}`.")
        elif probe is not None:
            raise ValueError("`probe` is only used with source='probe'; pass source='probe' or drop `probe`.")
        if not callable(pool) and pool not in POOLS:
            raise ValueError(f"`pool` must be one of {POOLS} or a callable; got {pool!r}.")
        if select is not None and not callable(select):
            raise ValueError(f"`select` must be a callable(output) -> Tensor or None; got {select!r}.")
        if eps_quantile is not None and not 0.0 < eps_quantile < 1.0:
            raise ValueError(f"`eps_quantile` must be in (0, 1) or None; got {eps_quantile!r}.")
        if compute_on not in ("all", "rank0"):
            raise ValueError(f"`compute_on` must be 'all' or 'rank0'; got {compute_on!r}.")
        if normalize not in ("l2", "none"):
            raise ValueError(f"`normalize` must be 'l2' or 'none'; got {normalize!r}.")
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"`monitor` must be a non-empty string key; got {monitor!r}.")
        self.layer = layer
        self.every_n_train_steps = every_n_train_steps
        self.max_samples = max_samples
        self.max_overhead = None if max_overhead is None else float(max_overhead)
        self.read_every_n_steps = read_every_n_steps
        self.source = source
        self.probe = probe
        self.tracker = EngineTracker(source)
        self.compute_on = compute_on
        self.pool = pool
        self.select = select
        self.fixed_eps = None if eps is None else check_eps(eps)
        self.eps_quantile = eps_quantile
        self.calibration_checks = calibration_checks
        self.weights = resolve_weights(weights)
        # recorded with each check, so that a logged CI can be recomputed offline (`collapse_index(weights=...)`)
        self.weights_spec: str | dict[str, float] = weights if isinstance(weights, str) else dict(self.weights)
        self.normalize = normalize
        self.monitor = monitor
        self.prefix = monitor.rsplit("/", 1)[0] + "/" if "/" in monitor else ""
        if alarm not in ("detector", "rise"):
            raise ValueError(f"`alarm` must be 'detector' or 'rise'; got {alarm!r}.")
        self.alarm = alarm
        if isinstance(false_alarm_rate, bool) or not isinstance(false_alarm_rate, (int, float)):
            raise ValueError(f"`false_alarm_rate` must be a number; got {false_alarm_rate!r}.")
        self.false_alarm_rate = float(false_alarm_rate)
        self._calibration = default_calibration(self.false_alarm_rate) if alarm == "detector" else None
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"`loss_fn` must be a callable(model) -> loss tensor or None; got {loss_fn!r}.")
        self.loss_fn = loss_fn
        #: the training optimizer, set by the adapters (for ``curvature_ratio``)
        self.optimizer: Any = None
        self.rule = AlarmRule(
            mode=mode,
            min_delta=min_delta,
            patience=patience,
            stopping_threshold=stopping_threshold,
            divergence_threshold=divergence_threshold,
            check_finite=check_finite,
            max_rise=max_rise,
            baseline_checks=baseline_checks,
            rise_patience=rise_patience,
            monitor=monitor,
        )
        if alarm != "rise":  # validated above all the same: a bad value fails whichever alarm is chosen
            self.rule.max_rise = None
        # "warn" | "stop" | "rollback", and the policy of a rollback (validated: a ValueError names `on_alarm`)
        self.on_alarm, self.rollback_policy = resolve_on_alarm(on_alarm, stop_on_alarm)
        self.stop_on_alarm = self.on_alarm == "stop"
        #: the snapshot ring and recovery policy (``on_alarm="rollback"``), built by `track`
        self.rollback_controller: RollbackController | None = None
        self._rollback_state: dict[str, Any] | None = None  # a loaded state waiting for `track`
        self.strict = bool(strict)
        self.verbose = bool(verbose)
        for name, flag in (("prog_bar", prog_bar), ("logger", logger)):
            if not isinstance(flag, bool):
                raise ValueError(f"`{name}` must be True or False; got {flag!r}.")
        self.prog_bar = prog_bar
        self.logger = logger
        self.capture = EmbeddingCapture(max_samples, pool=pool, select=select)
        self.module: nn.Module | None = None
        self.model: nn.Module | None = None
        self._device: torch.device = torch.device("cpu")
        #: take the accelerator's per-step path on the CPU too (values kept as tensors, read in batches): for tests and
        #: benchmarks that count that path's tensor calls where there is no GPU (`tests/test_step_path_calls.py`)
        self._device_path = False
        self._reset_state()

    def _reset_state(self) -> None:
        self.history: list[dict[str, Any]] = []
        self.eps_candidates: list[float] = []
        self.eps: float | None = self.fixed_eps
        self.last_checked_step = -1
        self.stopped_step: int | None = None
        self.stopping_reason = StoppingReason.NOT_STOPPED
        self.stopping_reason_message: str | None = None
        self.first_alarm_step: int | None = None
        self._in_alarm = False
        self._armed_steps = 0
        self._last_prepared = -1
        self._capture_steps = self.every_n_train_steps  # until the rows per step are known
        self.skipped_checks = 0
        #: checks brought forward because the detector asked for one (`CusumDetector.wants_check`)
        self.pulled_checks = 0
        self.time_spent_s = 0.0
        self.last_step = 0
        self.detector = None if self._calibration is None else CusumDetector(self._calibration)
        self.last_observed_step = 0
        self._first_alarm: dict[str, Any] | None = None
        self._fed_steps = 0
        self._told: set[str] = set()
        self._episodes_ended_told = 0
        self._loss_sum: Tensor | float = 0.0
        self._loss_count = 0
        self._step_reads: StepReads | None = None
        self.check_every = self.every_n_train_steps
        #: unit checks run between the checks ``max_overhead`` spaced out (`_units_check`), and the width of the watched
        #: rows the last check found (what a unit check reduces over)
        self.unit_checks = 0
        self._unit_width = 0
        self._unit_rows = 0
        self._next_check = self.every_n_train_steps
        #: the last optimizer step of the stretch in which nothing is read, checked or captured (`_quiet_until`): the
        #: per-step calls end at once there; reset wherever what it is made of changes outside `observe_step`
        self._quiet_through = 0
        #: what every step costs whatever the stride (`add_loss`, unit checks) and a step in a quiet stretch costs, for
        #: the stride (`step_stride`'s ``fixed_s`` and ``unread_s``), and their values at the last schedule
        self._loss_spent_s = self._unit_spent_s = self._quiet_spent_s = 0.0
        self._quiet_steps = 0
        self._unread_mark = (0.0, 0.0, 0.0, 0)
        self.observe_every = 1
        #: of the steps read, the gradient norm is computed at every this many only (1 unless ``max_overhead`` finds it
        #: most of the per-step work; at most `MAX_GRAD_STRIDE`): `reads_grad_norm`
        self.grad_every = 1
        # the strides the last interval's costs asked for (`_schedule_next`); the first interval decides alone
        self._grad_need, self._stride_need = MAX_GRAD_STRIDE, MAX_STRIDE
        self._reads_since_grad = 0
        self._grad_spent_s = 0.0
        self._grad_count = 0
        self._grad_mark = (0.0, 0)
        self._parameter_list: tuple[nn.Module, tuple[int, int], list[Any], _Path | None] | None = None
        #: whether the CPU's per-step values are scored in batches of `HOST_READ_EVERY` steps (set by the budget)
        self._host_batch = False
        #: `CusumDetector.urgent_above` after the last batch scored (``_host_batch``)
        self._urgent_above = (math.inf, math.inf)
        self._no_values: list[None] = []
        #: every step is read up to this one (the first `STEP_WINDOW` of this process, set at its first step), whatever
        #: ``observe_every``: a run broken from its start is scored from its start, on references of single steps
        self._read_all_until: int | None = None
        #: the detector's last reference restart the monitor has refilled after (`_refill_after_restart`)
        self._restart_seen: list[Any] | None = None
        #: the detector's `lr_state` carried over the rates of the rows queued since the last batch scored
        self._lr_queued: LrState = (None, None, 0.0, None)
        #: the losses of the steps not read since the last read: their mean with the read step's is what is fed
        self._unread_loss: Tensor | float = 0.0
        self._unread_count = 0
        #: ``max_overhead``: the first check of a run takes this many rows to learn what a check costs here, before
        #: the sample is chosen (on a model with millisecond steps a first check of ``max_samples`` rows alone could
        #: take a few percent of a short run)
        self._trial_samples: int | None = None
        self._remarked = False
        self._wall_start: float | None = None
        self._budget_mark: tuple[float, float, int] | None = None
        self._step_channels: tuple[str, ...] | None = None
        self._news: tuple[int, int, bool] | None = None
        # the previous probe check's rows and H0 deaths (source="probe"): the consecutive-check channels compare them
        self._previous_probe: tuple[Tensor, tuple[float, ...]] | None = None
        # on_alarm="rollback": the alarm episode that started since the last action (step, onset, channel), the last
        # step `after_step` saw, why a rollback stopped the run, and the failures already told
        self._new_alarm: tuple[int, int | None, str] | None = None
        self._boundary_step = 0
        self.rollback_stop: str | None = None
        #: after a rollback, what `_collapsed_again` compares the checks with
        self._recollapse: _RecollapseWatch | None = None
        self._rollback_told: set[str] = set()
        #: the detector's channels whose statistic stood at 0 when it resumed from the last rollback's snapshot
        self._resumed_quiet: frozenset[str] = frozenset()
        #: the per-tensor gradient norms of the last steps read, for the layers an alarm names (`LayerGradNorms`)
        self.layer_norms = LayerGradNorms()
        self._last_layers: list[list[Any]] | None = None
        #: (step, whether some tensor's gradient norm is exactly 0: a bool, or a device tensor not read yet)
        self._layer_lost: tuple[int, Any] | None = None

    # ------------------------------------------------------------------ wiring
    def attach(self, model: nn.Module) -> nn.Module:
        """Resolve ``layer`` on ``model`` and register the forward hook; raises ValueError for a bad layer."""
        self.module = resolve_layer(model, self.layer)
        self.model = model
        param = next(model.parameters(), None)
        self._device = param.device if param is not None else torch.device("cpu")
        fresh = self.last_checked_step < 0 and not self.history and self.fixed_eps is None
        if self.max_overhead is not None and self.source == "stream" and fresh and self.max_samples > MIN_SAMPLES:
            self._trial_samples = MIN_SAMPLES
        self._size_capture()
        self._quiet_through = 0
        self.capture.attach(self.module)
        return self.module

    def detach(self) -> None:
        """Remove the hook; the monitor's results and state stay."""
        self.capture.detach()
        self.capture.armed = False

    # ---------------------------------------------------------------- schedule
    @property
    def check_every(self) -> int:
        """Optimizer steps between checks: ``every_n_train_steps`` times the spacing ``max_overhead`` needs."""
        return self._check_every

    @check_every.setter
    def check_every(self, value: int) -> None:
        self._check_every, self._quiet_through = value, 0

    @property
    def observe_every(self) -> int:
        """The per-step channels are read at every this many optimizer steps (1 unless ``max_overhead`` needs more)."""
        return self._observe_every

    @observe_every.setter
    def observe_every(self, value: int) -> None:
        self._observe_every, self._quiet_through = value, 0

    def is_check_step(self, step: int) -> bool:
        """Whether the optimizer step just completed (global count ``step``) is due for a check."""
        return (
            step > 0
            and step % self.every_n_train_steps == 0
            and step >= self._next_check
            and step != self.last_checked_step
        )

    def next_check_step(self, step: int) -> int:
        """The first step at or after ``step`` due for a check: a multiple of ``every_n_train_steps``, spaced further
        apart when ``max_overhead`` needs it (`check_every`)."""
        target = max(self._next_check, step)
        return -(-target // self.every_n_train_steps) * self.every_n_train_steps

    def prepare_step(self, next_step: int) -> None:
        """Arm the hook when optimizer step number ``next_step`` falls in the capture window before a check."""
        if self.last_observed_step < next_step <= self._quiet_through:  # no window starts in a quiet stretch
            self._last_prepared = next_step
            self.capture.armed = False
            return
        if self._wall_start is None:
            self._start_clock(next_step - 1)
        until_check = self.next_check_step(next_step) - next_step
        if self._units_between_checks():  # and before each unit check between them
            every = self.every_n_train_steps
            until_check = min(until_check, -(-next_step // every) * every - next_step)
        armed = self.source == "stream" and next_step > 0 and until_check < self._capture_steps
        if armed and not (self.capture.armed and self._last_prepared == next_step):
            self._armed_steps += 1
        self._last_prepared = next_step
        self.capture.armed = armed

    # ---------------------------------------------------------------- per step
    @property
    def step_channels(self) -> tuple[str, ...]:
        """The per-step channels the detector reads (empty with ``alarm="rise"``): adapters compute only these. The
        loss and the gradient norm are always read (the absolute rules need them), the loss first."""
        if self.detector is None:
            return ()
        if self._step_channels is None:  # fixed by the calibration: read at every step, computed once
            calibrated = [
                c for c in self.detector.channels
                if CHANNELS[c].reads == "step" and c not in _ALWAYS and CHANNELS[c].of is None
            ]  # fmt: skip
            self._step_channels = (*_ALWAYS, *calibrated)
            self._no_values = [None] * len(calibrated)
        return self._step_channels

    def observe_step(
        self,
        step: int,
        *,
        loss: Tensor | float | None = None,
        grad_norm: Tensor | float | None = None,
        lr: Tensor | float | None = None,
        skipped: Tensor | bool = False,
        loss_scale: Tensor | float | None = None,
    ) -> CheckResult | None:
        """Feed optimizer step ``step``'s per-step channels to the detector; returns an alarm result when an alarm
        episode starts now.

        ``loss``: the mean training loss over the step's micro-batches (or what `add_loss` collected); ``grad_norm``:
        the global gradient norm before the step (unscaled); ``lr``: the learning rate the step used (a change the
        schedule made, a decay or a warm restart, is then not scored as a failure); ``skipped``: a loss scaler
        (fp16 ``GradScaler``) skipped this step's update because its gradients overflowed. A skipped step is not a
        failure: it feeds nothing to the detector and is counted (`skipped_steps`, logged as
        ``collapse/skipped_steps``), except that a non-finite loss still alarms, and so does a loss scale that keeps
        falling (``loss_scale`` under `MIN_LOSS_SCALE`, or `MAX_CONSECUTIVE_SKIPS` skipped steps in a row).

        Call on every rank at every optimizer step: under DDP the values are averaged over the ranks that have one
        (one small all-reduce per step, per batch of steps on a GPU), so every rank takes the same decision without
        another collective. Each value may be a number or a 0-d tensor: a CUDA tensor is not read at this step but
        with the next batch (``read_every_n_steps``), so the host never waits for the device here.

        Example (what the adapters do after each optimizer step):
            >>> monitor = CollapseMonitorCore("0")
            >>> monitor.step_channels
            ('loss', 'grad_norm')
            >>> fired = [monitor.observe_step(s, loss=1.0 + 0.01 * (s % 5), grad_norm=2.0) for s in range(1, 301)]
            >>> fired.count(None), len(monitor.detector.states["loss"].reference)
            (300, 200)
            >>> monitor.observe_step(301, loss=1.0, grad_norm=float("inf"), skipped=True) is None  # fp16 overflow
            True
            >>> alarm = [monitor.observe_step(s, loss=500.0, grad_norm=2.0) for s in range(302, 341)]
            >>> first = next(r for r in alarm if r is not None)  # 480x the largest loss of its window: at once
            >>> first.reason.name, first.step, monitor.skipped_steps
            ('DETECTOR', 302, 1)
        """
        start = time.perf_counter()
        if loss is None and self._loss_count:
            # a tensor stays one (read with the batch, below); one micro-batch's is fed as it is (no call on a device)
            loss = self._loss_sum if self._loss_count == 1 else self._loss_sum / self._loss_count
        self._loss_sum, self._loss_count = 0.0, 0
        if self.last_observed_step < step <= self._quiet_through:
            # most steps under ``max_overhead`` on a small model: what the branch for a step not read below does,
            # without working out again that nothing is due (a few microseconds, a share of such a step)
            self.last_observed_step = step
            self._hold_unread(loss, skipped)
            spent = time.perf_counter() - start
            self.time_spent_s += spent
            self._quiet_spent_s += spent
            self._quiet_steps += 1
            return None
        fired = self._observe_step(step, start, loss, grad_norm, lr, skipped, loss_scale)
        self._quiet_through = self._quiet_until(self.last_observed_step)
        return fired

    def restart_references(self) -> None:
        """Tell the detector that the run changes on purpose from the next optimizer step on, in a way it cannot see
        (a learning rate it does: `observe_step`'s ``lr``): an objective switched or re-weighted (label smoothing on, a
        contrastive temperature changed, an auxiliary loss added), a harder data stage (stronger augmentation, a
        curriculum step), layers unfrozen. Every channel's reference and accumulator restart, as at a schedule's
        decay: the per-step channels score again after 20 reads, the check channels after 4 checks, so the new level
        is learned instead of alarmed on (the extreme-value rule, which compares with the reference too, after 20
        reads); the rules that need no reference go on (a non-finite loss or gradient, a collapsed representation, a
        dead layer, a zero gradient). Values queued but not yet scored (a batch of reads) are scored against the new
        references. Call it on every rank at the same step, between two optimizer steps.

        What it costs: a failure that begins within the next ~20 steps is seen only by those rules. Without
        the call, a deliberate change such as these alarms as a failure would (on the benchmark, a contrastive
        temperature cut 10x alarms in most seeds: see docs/benchmark.md).

        Example:
            >>> monitor = CollapseMonitorCore("0", max_overhead=None)
            >>> _ = [monitor.observe_step(s, loss=1.0 + 0.01 * (s % 5), grad_norm=2.0) for s in range(1, 301)]
            >>> monitor.restart_references()  # e.g. label smoothing switched on for the steps from 301
            >>> len(monitor.detector.states["loss"].reference), monitor.summary()["reference_restarts"]
            (0, [[301, 'told']])
        """
        if self.detector is None:
            return
        self.detector.restart_references(self.last_observed_step + 1)
        if self._host_batch:
            self._urgent_above = self.detector.urgent_above()  # bounds from the references: renewed with them
        self._quiet_through = 0
        self._refill_after_restart(self.last_observed_step)

    def _refill_after_restart(self, step: int) -> None:
        """The detector's references restarted (a schedule's decay or warm restart, `restart_references`): the
        `STEP_MIN_REFERENCE` optimizer steps after ``step`` are read, each with its gradient norm, whatever the
        budget's strides, so that the per-step channels score again `STEP_MIN_REFERENCE` steps after a restart and not
        that many strided reads later. Without this a cosine or linear decay to 0 (whose falls by `LR_EVENT` come
        ever closer) left a run read one step in 6-66 unscored for its last third: a data bug at 80% of such a run
        took its accuracy from 97% to 51-58% without an alarm (`benchmarks/outside_runs.py`'s ``late_shuffle``)."""
        self._mark_restarts_seen()
        if self._read_all_until is not None:  # with every step read already, costs nothing: strides may rise meanwhile
            self._read_all_until = max(self._read_all_until, step + STEP_MIN_REFERENCE)
            self._quiet_through = 0

    def _mark_restarts_seen(self) -> None:
        """The detector's restarts so far are not new ones (`_feed_steps` refills after a new one): after a refill
        and after its state is loaded or restored."""
        restarts = None if self.detector is None else self.detector.reference_restarts
        self._restart_seen = restarts[-1] if restarts else None

    def _quiet_until(self, step: int) -> int:
        """The last optimizer step of the stretch after ``step`` in which nothing is due (`observes` is false, no
        check, no unit check, the hook not armed), or ``step`` when there is none: `prepare_step`, `step_grad_norm`
        and `observe_step` end at once there. Made of the schedule as it stands after ``step``; what changes it outside
        `observe_step` (a check, a restored state, an attached model, a stride set by hand) resets it."""
        if (
            self.observe_every == 1
            or self.detector is None
            or self._wall_start is None
            or self._read_all_until is None
            or step < self._read_all_until
        ):
            return step
        after = step + 1
        read = -(-after // self.observe_every) * self.observe_every
        due = self.next_check_step(after)
        if self._units_between_checks():
            due = min(due, -(-after // self.every_n_train_steps) * self.every_n_train_steps)
        # the hook is armed `_capture_steps` steps before a check or unit check (`prepare_step`)
        return max(step, min(read - 1, due - max(self._capture_steps, 1)))

    def _hold_unread(self, loss: Tensor | float | None, skipped: Tensor | bool) -> None:
        """A step not read: its loss joins the next read's (a number on the CPU, a tensor added on the device: no
        read here either way), a skipped update is counted (a flag on the device is not read here)."""
        if loss is not None:
            self._unread_loss = loss if not self._unread_count else self._unread_loss + loss
            self._unread_count += 1
        if skipped is True and self.detector is not None:
            self.detector.skipped_steps += 1

    def _observe_step(
        self,
        step: int,
        start: float,
        loss: Tensor | float | None,
        grad_norm: Tensor | float | None,
        lr: Tensor | float | None,
        skipped: Tensor | bool,
        loss_scale: Tensor | float | None,
    ) -> CheckResult | None:
        """`observe_step` at a step that is not in a quiet stretch; ``start``: when the call began (timed whole)."""
        wanted = self.step_channels
        if not wanted or step <= self.last_observed_step:
            return None
        self.last_observed_step = step
        if self._wall_start is None:
            self._start_clock(step - 1)
        if self._read_all_until is None:
            self._read_all_until = step - 1 + STEP_WINDOW
        # a unit check (`_units_check`) at this step comes after every step up to it reached the detector, as the
        # benchmark's replay scores it: a batch queued is scored now
        units = step % self.every_n_train_steps == 0 and self._units_between_checks() and not self.is_check_step(step)
        if not self.observes(step):
            self._hold_unread(loss, skipped)  # ``max_overhead`` reads every `observe_every`-th step only
            if not units:
                self.time_spent_s += time.perf_counter() - start
                return None
            pending = self._step_reads
            fired = None
            if pending is not None and len(pending) and self._host_batch:
                fired = self._flush_host_batch(step)
            elif pending is not None and len(pending):
                fired = self._feed_steps(pending.ready(self._device, force=True))
                self._tell_detector_news(step)
            self.time_spent_s += time.perf_counter() - start
            fired = fired or self._units_check(step)
            if self._new_alarm is not None:
                fired = self._act_on_alarm(step, fired)
            return fired
        read_steps = 1  # the steps this read's loss stands for (`CusumDetector.update`'s ``steps``)
        if self._unread_count and loss is not None:
            read_steps = self._unread_count + 1
            loss = (self._unread_loss + loss) / read_steps
        self._unread_loss, self._unread_count = 0.0, 0
        # a gradient norm read at one read in `grad_every` stands for the reads since the last (`CusumDetector.update`);
        # one given at another step (a framework's own clipping norm) is not read, as the benchmark's replay reads it
        if self.grad_every > 1 and grad_norm is not None and not self.reads_grad_norm(step):
            grad_norm = None
        self._reads_since_grad += 1
        grad_steps = 1
        if grad_norm is not None:
            if self.grad_every > 1 and step > self._read_all_until:
                grad_steps = min(self._reads_since_grad, self.grad_every)
            self._reads_since_grad = 0
        lost = self._layer_lost[1] if self._layer_lost is not None and self._layer_lost[0] == step else None
        # the loss and the gradient norm lead `step_channels` (`_ALWAYS`); nothing else is given per step
        row = [loss, grad_norm, *self._no_values, lr, skipped, loss_scale, lost, read_steps, grad_steps]
        reads = self._reads()
        if self._host_batch:
            # the CPU's values scored in batches (`HOST_READ_EVERY`): a step outside a check and with nothing urgent
            # (`CusumDetector.urgent_above`) is only queued; most steps end here, so this path is kept short
            # CPU numbers or tensors only (``_host_batch``); a value not given stands in as -1, inside every bound
            fed = -1.0 if loss is None else float(loss)
            norm = -1.0 if grad_norm is None else float(grad_norm)
            if isinstance(skipped, Tensor):
                skipped = bool(skipped)
            row[0], row[1] = None if loss is None else fed, None if grad_norm is None else norm
            row[len(wanted) + 1] = skipped
            if isinstance(loss_scale, Tensor):
                row[len(wanted) + 2] = float(loss_scale)
            queued = reads.add_host(step, row)
            lr_due = self._queued_lr_event(step, lr, queued == 1)
            above_loss, above_grad = self._urgent_above
            urgent = (
                not (-math.inf < fed < above_loss and -math.inf < norm < above_grad)
                or fed == 0.0
                or norm == 0.0
                or skipped is True
                or lr_due
            )
            fired = None
            if urgent or queued >= reads.read_every or units or self.is_check_step(step):
                fired = self._flush_host_batch(step)
        elif reads.read_every == 1 and not len(reads) and world_size() == 1 and not (self._device_path or _on_gpu(row)):
            fired = self._feed_steps([(step, [None if v is None else float(v) for v in row])])  # nothing to batch
            self._tell_detector_news(step)
        else:
            stored = reads.add(step, row)
            lr_due = self._queued_lr_event(step, lr, len(reads) == 1)
            # a check step reads the device anyway: the detector then sees every step up to the check. Host values
            # in a batch (``read_every_n_steps`` on the CPU) are scored at once when the rules that act fast need
            # them (under DDP a rank cannot decide that alone: its peers wait for the batch)
            urgent = world_size() == 1 and (lr_due or self._urgent(wanted, stored))
            force = units or self.is_check_step(step) or urgent
            fired = self._feed_steps(reads.ready(self._device, force=force))
            self._tell_detector_news(step)
        now = time.perf_counter()
        self.time_spent_s += now - start
        if not self._remarked and self._fed_steps:
            # the budget measures from after the first step read: it paid one-time costs (lazy initialisation)
            self._remarked = True
            self._budget_mark = (now, self.time_spent_s, step)
        if units:
            fired = fired or self._units_check(step)  # timed on its own
        if self._new_alarm is not None:
            fired = self._act_on_alarm(step, fired)
        return fired

    def _end_capture_window(self) -> None:
        """After a check or unit check took the rows: the next window's length on this rank (the armed steps that
        collect ``max_samples`` rows at the rate just seen, at most an interval), and the capture emptied."""
        if self._armed_steps and self.capture.seen:
            per_step = self.capture.seen / self._armed_steps
            self._capture_steps = min(max(math.ceil(self.capture.max_samples / per_step), 1), self.every_n_train_steps)
        self._armed_steps = 0
        self.capture.reset()

    def _flush_host_batch(self, step: int) -> CheckResult | None:
        """The CPU's queued per-step values (``_host_batch``) scored now, and the urgency bounds renewed."""
        fired = self._feed_steps(self._reads().take_host())
        self._urgent_above = self.detector.urgent_above()  # type: ignore[union-attr]  # set with _host_batch
        self._tell_detector_news(step)
        return fired

    def _units_between_checks(self) -> bool:
        """Whether unit checks run at the multiples of ``every_n_train_steps`` between checks (`_units_check`): the
        overhead budget spaced the checks further apart, its trial check is done, and the detector is on."""
        return (
            self.check_every > self.every_n_train_steps
            and self.detector is not None
            and self.source == "stream"
            and self._trial_samples is None
            and self._unit_width > 0
        )

    def _units_check(self, step: int) -> CheckResult | None:
        """A unit check, at a multiple of ``every_n_train_steps`` between the checks ``max_overhead`` spaced out: the
        share of dead units (`dead_unit_fraction`) of the sample a check would gather from the rows captured since the
        last check or unit check (`dead_units_across_ranks`: one all-reduce of the layer's width under DDP, every rank
        at the same step whatever happened on it), fed to the dormant-unit rule (`CusumDetector.observe_units`). That
        rule compares a check with the three before, so with the checks spaced out it would wait thousands of steps
        (on the digits MLP outside the benchmark it never ran); its evidence costs a reduction over the rows (~0.2 ms
        on the CPU; on a GPU the result is read at once: one wait for the device per interval) and the hook's copies
        of the window (timed by the hook, counted here, as a check counts its own); a check's own cost is the topology
        and the spectra. A sample much smaller
        than the last check's (a window cut short by a resume or a rollback) is not fed: the rule would start its
        reference again. Nothing is logged and no history is kept: an alarm is warned and recorded as any alarm of
        the detector."""
        capture, local, error = self.capture, None, self.capture.error
        # the window's copies (timed by the hook) are the unit check's: on the digits MLP they were 1.3% of the wall
        # time while the budget did not see them
        start = time.perf_counter() - capture.spent_s
        try:
            local = capture.take()
        except Exception as err:  # the error stays for the next check to report; this rank says it failed
            error = error or err
        self._end_capture_window()
        width = self._unit_width
        dead, rows, failures = dead_units_across_ranks(
            local, width, self._sample_size, self._device, failed=error is not None
        )
        fired = None
        # every rank has the same three numbers: they all take the same decision
        if failures:
            self._spent_on_units(time.perf_counter() - start)
            if self.strict:
                raise RuntimeError(
                    f"{self.monitor}: the unit check at step {step} failed on {failures} rank(s): {error!r}"
                )
            if "units" not in self._told:
                self._told.add("units")
                self._warn(
                    f"{self.monitor}: a unit check between checks failed at step {step} on {failures} rank(s) (said"
                    f" once; the checks report the capture's errors): {error!r}"
                )
            return None
        if self.detector is not None and rows >= max(2.0, (1.0 - DEAD_ROWS_CHANGE) * self._unit_rows):
            hold = max(ABSOLUTE_HOLD, 2 * self.every_n_train_steps)
            fired = self.detector.observe_units(step, dead, d=width, n=rows, hold=hold)
            self.unit_checks += 1
        self._spent_on_units(time.perf_counter() - start)
        return None if fired is None else self._detector_alarm(step, fired, None)

    def _spent_on_units(self, seconds: float) -> None:
        self.time_spent_s += seconds
        self._unit_spent_s += seconds

    @property
    def _sample_size(self) -> int:
        """The rows the next check takes (over all ranks): ``max_samples``, or fewer for a first, trial check."""
        return self._trial_samples if self._trial_samples is not None else self.max_samples

    def _size_capture(self) -> None:
        """This rank's share of the next check's rows, for the capture to keep."""
        self.capture.max_samples = math.ceil(self._sample_size / world_size())

    def _start_clock(self, step: int) -> None:
        """The first step of this process: the budget measures the steps and the monitor's work from here."""
        self._wall_start = time.perf_counter()
        self._budget_mark = (self._wall_start, self.time_spent_s, step)

    def observes(self, step: int) -> bool:
        """Whether optimizer step ``step``'s per-step channels are read (every `observe_every`-th step, every check
        step, and every one of this process's first `STEP_WINDOW` steps): an adapter computes the gradient norm only
        then. The loss of a step not read is fed averaged with the next read step's."""
        return (
            self.observe_every == 1
            or step % self.observe_every == 0
            or self._read_all_until is None
            or step <= self._read_all_until
            or self.is_check_step(step)
        )

    def reads_grad_norm(self, step: int) -> bool:
        """Whether the detector reads the gradient norm at optimizer step ``step``: at the steps it reads
        (`observes`), and of those at every `grad_every`-th only once the first `STEP_WINDOW` steps are read (and at
        every check step): an adapter computes it only then."""
        if not self.observes(step):
            return False
        every = self.grad_every
        return (
            every == 1
            or self._read_all_until is None
            or step <= self._read_all_until
            or step % (every * self.observe_every) == 0
            or self.is_check_step(step)
        )

    def step_grad_norm(self, parameters: Any, step: int) -> Tensor | float | None:
        """`global_grad_norm` of ``parameters`` (a tensor on an accelerator, not read) for optimizer step ``step``
        when the detector reads it at that step (`reads_grad_norm`), else None; timed as the monitor's own work.
        ``parameters``: an iterable of parameters, or the model (an ``nn.Module``: its parameters are listed once
        per check, not at every read).

        Example:
            >>> import torch
            >>> p = torch.nn.Parameter(torch.zeros(2))
            >>> p.grad = torch.tensor([3.0, 4.0])
            >>> CollapseMonitorCore("0").step_grad_norm([p], step=1)
            5.0
        """
        if self.last_observed_step < step <= self._quiet_through:
            return None
        if "grad_norm" not in self.step_channels or not self.reads_grad_norm(step):
            return None
        start = time.perf_counter()
        norms = grad_norms(self._parameters_of(parameters), as_tensor=self._on_device, device_path=self._device_path)
        if norms is None:
            self._spent_on_grad(time.perf_counter() - start)
            return None
        total, per_tensor, params = norms
        self.layer_norms.record(step, params, per_tensor)  # kept for the layers an alarm names (nothing read)
        self._layer_lost = (step, _any_zero(per_tensor))
        self._spent_on_grad(time.perf_counter() - start)
        return total

    def _parameters_of(self, parameters: Any) -> Any:
        """A module's parameters, kept between reads (walking a module's tree right after the backward pass costs as
        much as the norms of a small model's gradients) and listed again after a check, after a parameter or a module
        was registered anywhere in the process (a head added, ``load_state_dict(assign=True)``), or when its first
        parameter is another tensor (a conversion that replaced them); anything else as it is."""
        if not isinstance(parameters, nn.Module):
            return parameters
        _watch_registrations()
        key = (self.last_checked_step, _REGISTRATIONS[0])
        cached = self._parameter_list
        if cached is None or cached[0] is not parameters or cached[1] != key or not _first_in_place(*cached[2:]):
            params = list(parameters.parameters())
            cached = self._parameter_list = (parameters, key, params, _path_to_first(parameters, params))
        return cached[2]

    def _spent_on_grad(self, seconds: float) -> None:
        self.time_spent_s += seconds
        self._grad_spent_s += seconds
        self._grad_count += 1

    def record_layer_norms(self, parameters: Any, step: int, total: Tensor | float | None = None) -> None:
        """Keep the per-tensor gradient norms of ``parameters`` at optimizer step ``step`` for the layer diagnosis,
        where the global norm the detector reads came from elsewhere (the HF Trainer's clipping call: `step_grad_norm`
        records them itself). ``total``: the global norm before clipping; the gradients seen here may be clipped
        already, and clipping scales every gradient alike, so the norms are rescaled to that total. Nothing is read
        from a device; only at the steps the detector reads; timed as the monitor's own work.

        Example:
            >>> import torch
            >>> p = torch.nn.Parameter(torch.zeros(2))
            >>> p.grad = torch.tensor([0.6, 0.8])  # clipped to norm 1 from a norm of 10
            >>> monitor = CollapseMonitorCore("0")
            >>> monitor.record_layer_norms([p], step=1, total=10.0)
            >>> monitor.layer_norms._rows[0][2]
            [10.0]
        """
        if "grad_norm" not in self.step_channels or not self.reads_grad_norm(step):
            return
        start = time.perf_counter()
        norms = grad_norms(self._parameters_of(parameters), as_tensor=self._on_device, device_path=self._device_path)
        if norms is not None:
            seen, per_tensor, params = norms
            if total is not None:
                if isinstance(per_tensor, Tensor):
                    per_tensor = per_tensor * (total / seen.clamp_min(1e-30))
                else:
                    scale = float(total) / max(float(seen), 1e-30)
                    per_tensor = [v * scale for v in per_tensor]
            self.layer_norms.record(step, params, per_tensor)
            self._layer_lost = (step, _any_zero(per_tensor))
        self._spent_on_grad(time.perf_counter() - start)

    @property
    def _on_device(self) -> bool:
        """Whether the per-step values stay tensors, read in batches (an accelerator, or `_device_path`)."""
        return self._device.type != "cpu" or self._device_path

    def _reads(self) -> StepReads:
        if self._step_reads is None:
            every = self.read_every_n_steps
            if every is None:
                every = DEVICE_READ_EVERY if self._device.type == "cuda" or self._device_path else 1
            self._step_reads = StepReads(every, keep_cpu_tensors=self._device_path)
        return self._step_reads

    def _feed_steps(self, rows: list[tuple[int, list[float | None]]]) -> CheckResult | None:
        """Steps read from the device (averaged over ranks) to the detector; the first alarm among them, if any."""
        detector = self.detector
        assert detector is not None
        wanted = self.step_channels
        first: CheckResult | None = None
        read_all_until = self._read_all_until if self._read_all_until is not None else math.inf
        strides = (self.observe_every, self.grad_every)
        wanted_at = None  # the first row after which the detector asked for a check (`_bring_check_forward`)
        for step, row in rows:
            # the per-step references keep about STEP_WINDOW optimizer steps whatever the stride (a wider window lags
            # behind a trend, a warm-up, and false-alarmed on the benchmark's replay); set as each row is scored, so
            # that the rows queued before the first STEP_WINDOW steps ended are scored as the replay scores them
            if step <= read_all_until:
                detector.set_step_window(1)
            else:
                detector.set_step_window(*strides)
            values = {name: v for name, v in zip(wanted, row, strict=False) if v is not None}
            lr, skipped, scale, lost, read_steps, grad_steps = row[len(wanted) :]
            if values:
                self._fed_steps += 1
            fired = detector.observe_step(step, values, lr=lr, skipped=bool(skipped), loss_scale=scale,
                                          layer_lost=None if lost is None else lost > 0,
                                          read_steps=1 if read_steps is None else round(read_steps),
                                          grad_steps=1 if grad_steps is None else round(grad_steps))  # fmt: skip
            if fired is not None:
                result = self._detector_alarm(step, fired, None)
                first = first or result
            if wanted_at is None and self._wants_check():
                wanted_at = step
        if wanted_at is not None:
            self._bring_check_forward(wanted_at, rows[-1][0])
        restarts = detector.reference_restarts
        if restarts and restarts[-1] is not self._restart_seen and rows:
            # from the step being read now: a batch read from a device or across ranks arrives steps after its rows
            self._refill_after_restart(max(rows[-1][0], self.last_observed_step))
        return first

    def _wants_check(self) -> bool:
        """Whether the detector asks for a check's evidence (`CusumDetector.wants_check`) while the overhead budget
        spaces the checks out (without it every check already comes)."""
        return self.max_overhead is not None and self.detector is not None and self.detector.wants_check()

    def _bring_check_forward(self, step: int, now: int) -> None:
        """The detector needed a check's evidence after optimizer step ``step`` (`_wants_check`): the next check comes
        at the first multiple of ``every_n_train_steps`` a whole interval after ``step`` (a full capture window; after
        ``now``, the step whose values are being read, where rows are read in batches: the window is then short by at
        most the batch) when that is sooner than planned; the spaced schedule then counts on from it. Every rank
        decides alike: the detector is fed the same values on each, and a check's report is the same everywhere
        (``compute_on``)."""
        every = self.every_n_train_steps
        target = -(-max(step + every, now + 1) // every) * every
        if target < self.next_check_step(now + 1):
            self._next_check = target
            self.pulled_checks += 1

    def _urgent(self, wanted: tuple[str, ...], row: list[Any]) -> bool:
        """Whether a batched row of host values holds one the detector must score now (`CusumDetector.urgent`), or
        a step the loss scaler skipped."""
        assert self.detector is not None
        values = {n: v for n, v in zip(wanted, row, strict=False) if isinstance(v, float)}
        return row[len(wanted) + 1] is True or self.detector.urgent(values)

    def _queued_lr_event(self, step: int, lr: Tensor | float | None, first: bool) -> bool:
        """Whether the rate of a row just queued (not yet scored) makes a schedule's event that must be scored now:
        read strided, the steps after an event are read in full once it is scored (`_refill_after_restart`). The
        detector's rate state is the last scored row's; carried over the rows queued since (``first``: the queue
        was empty), it is what the detector will hold when it reaches this row. A rate on a device is not read
        here (it would wait for the device): its event is found when the batch is scored."""
        if self.detector is None or lr is None:
            return False
        if first:
            self._lr_queued = self.detector.lr_state()
        if isinstance(lr, Tensor) and not lr.is_cpu:
            return False
        event, self._lr_queued = lr_event(float(lr), self._lr_queued, step)
        return event and (self.observe_every > 1 or self.grad_every > 1)

    def _tell_detector_news(self, step: int) -> None:
        """Warn once about each note the detector has about how it is fed, and about each episode that ended."""
        assert self.detector is not None
        news = (len(self.detector.notes), len(self.detector.episodes), self.detector.in_alarm)
        if news == self._news:  # nothing new (the common case, at every step)
            return
        self._news = news
        for key, note in self.detector.notes.items():
            if key not in self._told:
                self._told.add(key)
                self._warn(f"{self.monitor}: {note}")
        ended = [e for e in self.detector.episodes if e["end"] is not None]
        for episode in ended[self._episodes_ended_told :]:
            self._warn(
                f"{self.monitor}: the alarm episode that started at step {episode['start']} on"
                f" `{episode['channel']}` ({episode['kind']}) ended at step {episode['end']}; peak level"
                f" {episode['peak']:.2f} (1 = threshold)."
            )
        self._episodes_ended_told = len(ended)

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps whose update a loss scaler skipped (counted, not scored; 0 with ``alarm="rise"``)."""
        return 0 if self.detector is None else self.detector.skipped_steps

    def add_loss(self, loss: Tensor | float | None) -> None:
        """One micro-batch's training loss; `observe_step` feeds their mean when it is given no ``loss``. Kept as a
        tensor until then, so a GPU loss costs one copy to the host per optimizer step."""
        if loss is None or self.detector is None:
            return
        start = time.perf_counter()
        value: Tensor | float
        if not isinstance(loss, Tensor):
            value = float(loss)
        elif loss.is_cpu and loss.numel() == 1 and not self._device_path:  # a number costs less than tensor ops
            value = loss.item()
        else:
            # a copy, not the tensor itself: frameworks change the loss in place after the forward (the HF Trainer's
            # ``loss *= num_processes`` under DDP with ``average_tokens_across_devices``), and it is read steps later
            value = loss.detach().float().mean()
        self._loss_sum = value if not self._loss_count else self._loss_sum + value
        self._loss_count += 1
        spent = time.perf_counter() - start
        self.time_spent_s += spent
        self._loss_spent_s += spent

    def _detector_alarm(self, step: int, fired: DetectorFiring, report: CollapseReport | None) -> CheckResult:
        message = fired.message(self.prefix.rstrip("/") or "collapse")
        layers = self._diagnose_layers(fired)
        if layers:
            moved = ", ".join(f"{name} (x{factor:.3g})" for name, factor in layers)
            message += f" Gradient norm moved most, from before step {fired.onset} to the alarm, in: {moved}."
        self._warn(f"Collapse alarm at step {step}: {message}")
        self._new_alarm = self._new_alarm or (step, fired.onset, fired.channel)
        if self.first_alarm_step is None:
            self.first_alarm_step = step
            self._first_alarm = {"step": step, "reason": StoppingReason.DETECTOR.name, "channel": fired.channel,
                                 "value": fired.value, "baseline": fired.baseline, "score": fired.score,
                                 "kind": fired.kind, "detail": fired.detail, "onset": fired.onset,
                                 "layers": layers}  # fmt: skip
        return CheckResult(step, report, StoppingReason.DETECTOR, message, True, self.stop_on_alarm)

    def _diagnose_layers(self, fired: DetectorFiring) -> list[list[Any]] | None:
        """The layers whose gradient norm moved most between the steps before the alarm's onset and the steps from
        it to the alarm (`LayerGradNorms.diagnose`), kept on the episode and for a rollback's record; None when too
        few steps were read on either side. Never raises: a diagnosis is not worth a broken run."""
        onset = fired.step if fired.onset is None else int(fired.onset)
        try:
            layers = self.layer_norms.diagnose(onset, fired.step, model=self.model)
        except Exception as err:
            if self.strict:
                raise
            self._warn(f"{self.monitor}: the layer diagnosis of the alarm at step {fired.step} failed: {err!r}")
            layers = None
        plain = None if layers is None else [[name, float(factor)] for name, factor in layers]
        if self.detector is not None and self.detector.episodes:
            self.detector.episodes[-1]["layers"] = plain
        self._last_layers = plain
        return plain

    # ------------------------------------------------------------------- check
    def run_check(self, step: int) -> CheckResult:
        """Gather, compute the CI, update calibration and alarm, record history. Call on every rank."""
        start = time.perf_counter() - self.capture.spent_s  # the capture window's copies are the check's
        self._quiet_through = 0  # the check moves the schedule: the next step works it out again
        try:
            result = self._run_check(step)
        finally:
            self.time_spent_s += time.perf_counter() - start
        if result.report is None:
            self.skipped_checks += 1
        self._schedule_next(step, time.perf_counter() - start)
        if self._wants_check():
            self._bring_check_forward(step, step)
        if result.report is not None and self.max_overhead is not None:
            result.logged[f"{self.prefix}overhead"] = self.overhead
        if result.report is not None and self.rollback_policy is not None:
            result.logged[f"{self.prefix}rollbacks"] = float(len(self.rollbacks))
        if self._recollapse is not None and result.report is not None and self._new_alarm is None:
            result = self._collapsed_again(step, result)
        if self._new_alarm is not None:
            result = self._act_on_alarm(step, result)  # type: ignore[assignment]  # a result in, a result out
        return result

    @property
    def overhead(self) -> float:
        """The monitor's share of the wall time since the first step so far (its checks and per-step work, as it
        times them on this rank, the hook's copies of the watched rows included; the adapters' gradient norm and the
        hook's call on steps it does not copy are not: `benchmarks/overhead.py` measures everything)."""
        if self._wall_start is None:
            return 0.0
        wall = time.perf_counter() - self._wall_start
        return min(self.time_spent_s / wall, 1.0) if wall > 0 else 0.0

    def _schedule_next(self, step: int, check_s: float) -> None:
        """Space the checks so that the monitor keeps within ``max_overhead``, from the step and check times measured
        since the last check (averaged over ranks: every rank takes the same schedule)."""
        now = time.perf_counter()
        mark, self._budget_mark = self._budget_mark, (now, self.time_spent_s, step)
        if self.max_overhead is None:
            self._next_check = step + self.every_n_train_steps
            return
        if mark is None:  # loaded from a state without a step seen yet: measure from here
            self._next_check = step + self.check_every
            return
        # the first check of a process pays one-time costs too (lazy imports, allocations): it overestimates, and a
        # check that would need a smaller sample is better lowered before the scale is calibrated on it
        wall, spent, steps = now - mark[0], self.time_spent_s - mark[1], step - mark[2]
        if steps < 1:  # no step timed since the mark (a check at the first step read): decide at the next check,
            self._next_check = step + self.check_every  # a trial still pending
            return
        grad_mark, self._grad_mark = self._grad_mark, (self._grad_spent_s, self._grad_count)
        grads, grad_spent = self._grad_count - grad_mark[1], self._grad_spent_s - grad_mark[0]
        grad_s = grad_spent / grads if grads > 0 else 0.0
        # a step not read still costs its loss's read and, in a quiet stretch, a short call: measured apart, so that
        # the stride is not planned as if those steps cost nothing (the digits MLP read 1 step in 7 at twice the
        # planned share)
        mark_loss, mark_units, mark_quiet, mark_quiet_steps = self._unread_mark
        self._unread_mark = (self._loss_spent_s, self._unit_spent_s, self._quiet_spent_s, self._quiet_steps)
        quiet_steps, quiet_spent = self._quiet_steps - mark_quiet_steps, self._quiet_spent_s - mark_quiet
        fixed_s = (self._loss_spent_s - mark_loss + self._unit_spent_s - mark_units) / max(steps, 1)
        unread_s = quiet_spent / quiet_steps if quiet_steps > 0 else 0.0
        # what depends on the stride: the steps read (and the other steps outside a quiet stretch)
        varying = max(spent - check_s - quiet_spent, 0.0) / max(steps, 1) - fixed_s
        own = [check_s, varying, max(wall - spent, 0.0) / max(steps, 1), grad_s, grad_spent / max(steps, 1), fixed_s,
               unread_s]  # fmt: skip
        world = world_size()
        check_s, per_step, train_step, grad_s, grad_per_step, fixed_s, unread_s = (
            v / world for v in sum_floats_across_ranks(own, self._device)
        )
        every = self.every_n_train_steps
        trial, self._trial_samples = self._trial_samples, None
        if trial is not None:  # a trial check: predict a check of max_samples rows (measured: ~ linear from 128 rows,
            # where fixed costs still weigh; steeper only for thousands of rows)
            check_s *= self.max_samples / trial
            self.eps, self.eps_candidates = self.fixed_eps, []  # calibrated on checks of the chosen size only
            self._size_capture()
            self._capture_steps = self.every_n_train_steps  # the window was sized for the trial's rows
        # per read of the per-step channels (the steps between were not read), then read as often as the budget
        # allows with the checks at their widest spacing
        budget = PLANNED_SHARE * self.max_overhead
        if (
            not self._host_batch
            and per_step > HOST_BATCH_FROM * budget * train_step
            and self.read_every_n_steps is None
            and not self._on_device
            and world == 1
        ):
            # score the per-step values in batches first (each step still scored, an alarm up to HOST_READ_EVERY - 1
            # steps later, an urgent value at once): right after a training step each call into the monitor costs
            # several times its warm time, a batch pays that once. The stride is decided on the batched cost
            self._host_batch = True
            self._reads().read_every = HOST_READ_EVERY
            if self.detector is not None:
                self._urgent_above = self.detector.urgent_above()
        per_read = per_step * self.observe_every
        if grad_s > 0.0:
            # the gradient norm first, at one read in 2 or 4 (`grad_stride`): detection barely changes, the cost of
            # the step it is computed at is most of the per-step work on a small model
            other = max(per_step - grad_per_step, 0.0) * self.observe_every  # (the norm was computed more often early)
            # after the first interval, raised only when two intervals in a row need it: one pause of the process
            # inside a read (a garbage collection, a preemption) made a 10-step interval of an MLP's 20 ms steps
            # measure ~1 ms a read, and striding saves nothing of a pause (lowered at once: reading more costs
            # detection nothing)
            asked = grad_stride(other, grad_s, train_step, budget)
            self.grad_every, self._grad_need = min(asked, self._grad_need), asked
            per_read = other + grad_s / self.grad_every
        per_read = max(per_read, 0.0)
        stride_asked = 1  # what the last `plan_reads` asked for

        def plan_reads(check_s: float) -> float:
            """The stride for checks of ``check_s`` seconds (`observe_every`), and what it leaves the checks of the
            budget: what the per-step work leaves, and at least CHECK_SHARE_FLOOR of it (the per-step work is kept at
            every step up to STRIDE_FROM x the budget: it carries the detector; the checks are not dropped, and a
            check the detector asks for comes sooner: `_bring_check_forward`)."""
            nonlocal stride_asked
            longest = LONGEST_SPACING * every
            stride_asked = step_stride(check_s, per_read, train_step, budget, longest, unread_s, fixed_s)
            stride = self.observe_every = min(stride_asked, self._stride_need)  # as the gradient norm's stride, above
            per_step = fixed_s + (per_read + unread_s * (stride - 1)) / stride
            return max(budget - per_step / max(train_step, 1e-12), CHECK_SHARE_FLOOR * budget)

        check_budget = plan_reads(check_s)
        need = check_spacing(check_s, 0.0, train_step, check_budget)
        if (
            need > MAX_SPACING * every
            and self.eps is None  # still calibrating: nothing learned yet depends on the sample size
            and self.source == "stream"
            and self.max_samples > MIN_SAMPLES
        ):
            shrink = (need / (MAX_SPACING * every)) ** (2.0 / 3.0)  # a check's cost grows ~ n^1.5 here
            lowered = max(MIN_SAMPLES, int(self.max_samples / shrink))
            check_s *= lowered / self.max_samples  # at least linear: never predicted cheaper than it will be
            self.max_samples = lowered
            self._size_capture()
            self.eps_candidates = []  # the scale is calibrated again on samples of the new size
            self.tracker = EngineTracker(self.source)
            # the stride was chosen for a check of the larger sample: the cheaper one leaves the per-step reads more
            # (on the digits MLP 1 step in 100 became 1 in ~6 at the same planned share)
            check_budget = plan_reads(check_s)
            need = max(MAX_SPACING * every, check_spacing(check_s, 0.0, train_step, check_budget))
        self._stride_need = stride_asked
        spacing = math.ceil(min(need, LONGEST_SPACING * every) / every)
        self.check_every = max(1, spacing) * every
        self._next_check = step + self.check_every

    def _run_check(self, step: int) -> CheckResult:
        self.last_checked_step = step
        self.capture.armed = False
        if self.source == "probe":
            local, error, own_seen, own_nonfinite = self._embed_probe()
            if _rank() != 0:  # every rank embedded the same probe: count it once
                own_seen = own_nonfinite = 0
        else:
            local = self.capture.take()
            error, self.capture.error = self.capture.error, None
            own_seen, own_nonfinite = self.capture.seen, self.capture.nonfinite
        # the watched tensor looks degenerate (d < 2) or secondary: each distinct warning once, on rank 0
        selection = self.capture.pop_warnings()
        if not self.strict:
            for note in selection:
                self._warn(f"{self.monitor}: {note}")
        # the error flag rides along so that every rank skips a check that failed on any rank, and logs alike
        seen, nonfinite, failed, degenerate = sum_across_ranks(
            [own_seen, own_nonfinite, int(error is not None), len(selection)], self._device
        )
        self._end_capture_window()
        on_rank0 = self.compute_on == "rank0" and world_size() > 1
        if self.source == "probe":
            x = local if local is not None else torch.zeros(0, 0, device=self._device)
        else:
            x = gather_samples(local, self._sample_size, self._device, dst=0 if on_rank0 else None)
        if degenerate and self.strict:  # after the gather: every rank raises at the same point
            detail = " ".join(selection) or "(reported on another rank)"
            raise ValueError(f"{self.monitor}: the watched tensor looks wrong (strict=True). {detail}")
        if failed:
            where = f"{error!r}" if error is not None else f"on {failed} other rank(s)"
            return self._skip(step, f"capturing the layer output failed: {where}", error)
        if self.source == "stream" and x.ndim == 2:
            self._unit_width = int(x.shape[1])  # every rank's (rank 0's rows or none: the width all the same)
        calibrating = self.eps is None
        trial = self._trial_samples is not None
        report: CollapseReport | None = None
        why, err = None, None
        if not on_rank0 or _rank() == 0:
            report, why, err = self._compute(x, seen, nonfinite)
        if on_rank0:  # every rank logs and decides on rank 0's report
            report, why = broadcast_from_rank0((report, why), self._device)
        if report is None:
            return self._skip(step, why or "no report", err)
        report = dataclasses.replace(report, nonfinite_fraction=nonfinite / max(seen, 1))
        self._unit_rows = int(report.n)  # what the unit checks' samples are compared with (the same on every rank)
        if calibrating:
            self.eps_candidates.append(report.eps)
            if len(self.eps_candidates) >= self.calibration_checks:
                self.eps = float(statistics.median(self.eps_candidates))
        reason, message = self.rule.evaluate(report.ci, baseline_ready=not calibrating)
        alarm = reason is not StoppingReason.NOT_STOPPED
        consecutive = self._consecutive_channels(x, report) if self.source == "probe" else {}
        if self.loss_fn is not None:
            consecutive.update(self._curvature(step))
        fired = None
        if self.detector is not None and not trial:  # a trial's smaller sample is not the channels' reference
            fired = self._feed_check(step, report, consecutive, calibrating)
        if fired is not None and not alarm:
            result = self._detector_alarm(step, fired, report)
            reason, message, alarm = result.reason, result.message, True
        elif alarm and not self._in_alarm:
            self._warn(f"Collapse alarm at step {step}: {message}")
            self._new_alarm = self._new_alarm or (step, None, self.monitor)
            if self.first_alarm_step is None:
                self.first_alarm_step = step
                self._first_alarm = {"step": step, "reason": reason.name, "value": report.ci}
        elif self.verbose:
            self._warn(f"step {step}: {self.monitor} = {report.ci:.4f}")
        self._in_alarm = alarm
        logged = report.as_dict(self.prefix)
        logged.update({f"{self.prefix}{k}": v for k, v in consecutive.items()})
        logged[self.monitor] = report.ci
        if self.detector is not None:
            # the detector's statistic over its threshold (it alarms at 1) and each channel's share, at the check;
            # the alarm flag stays up while the statistic is over the threshold (a firing between checks included)
            logged.update(self.detector.as_dict(self.prefix))
            logged[f"{self.prefix}skipped_steps"] = float(self.skipped_steps)
            logged[f"{self.prefix}episodes"] = float(len(self.detector.episodes))
            if not alarm and self.detector.in_alarm:
                reason, alarm = StoppingReason.DETECTOR, True
                message = "an alarm episode of the detector is still open"
        should_stop = alarm and self.stop_on_alarm
        logged[f"{self.prefix}alarm"] = float(alarm)
        self.history.append(
            {
                "step": step,
                "alarm": alarm,
                "reason": reason.name,
                "calibrating": calibrating,
                **({"trial": True} if trial else {}),
                "weights": self.weights_spec,
                **report.as_dict(),
                **consecutive,
                **(
                    {}
                    if self.detector is None
                    else {"detector": logged[f"{self.prefix}detector"], "skipped_steps": self.skipped_steps}
                ),
            }
        )
        return CheckResult(step, report, reason, message, alarm, should_stop, None, logged)

    def _feed_check(
        self, step: int, report: CollapseReport, consecutive: Mapping[str, float], calibrating: bool
    ) -> DetectorFiring | None:
        """A check's channels to the detector: the absolute collapse rule from the first check; the channels that do
        not depend on the Vietoris-Rips scale from the first check too, the Betti numbers once the scale is held."""
        detector = self.detector
        assert detector is not None
        values = {**report.as_dict(), **consecutive, "b1_fraction": report.b1 / max(report.n, 1)}
        hold = max(ABSOLUTE_HOLD, 2 * self.check_every)
        fired = detector.observe_check(step, values, calibrating=calibrating, hold=hold)
        if not self._fed_steps and self.last_observed_step >= ZERO_GRAD_STEPS and "fed" not in self._told:
            self._told.add("fed")
            self._warn(
                f"{self.monitor}: the detector has received no loss and no gradient norm in {self.last_observed_step}"
                " optimizer steps, so its per-step channels are empty: pass `loss=` (and call the monitor before"
                " `optimizer.zero_grad()`, or pass `grad_norm=`)."
            )
        self._tell_detector_news(step)
        return fired

    def _consecutive_channels(self, x: Tensor, report: CollapseReport) -> dict[str, float]:
        """``source="probe"``: how the probe's examples moved since the previous check (empty at the first check,
        or when rows were dropped as non-finite, so that row i is no longer the same example)."""
        previous, self._previous_probe = self._previous_probe, None
        if x.ndim != 2 or x.shape[0] < 3 or report.nonfinite_fraction > 0:
            return {}
        rows = x.detach().to(torch.float32)
        self._previous_probe = (rows, report.h0_deaths)
        if previous is None or previous[0].shape != rows.shape:
            return {}
        k = min(10, rows.shape[0] - 1)
        return {
            "knn_preservation": neighbourhood_preservation(previous[0], rows, k),
            "contracted_pairs": contracted_pairs(previous[0], rows, k),
            "h0_distance": h0_diagram_distance(previous[1], report.h0_deaths),
        }

    def _curvature(self, step: int) -> dict[str, float]:
        if self.model is None:
            return {}
        try:
            return gradient_curvature(self.model, self.loss_fn, self.optimizer)
        except Exception as err:  # never break training: a warning (an error with strict=True), the channel skipped
            if self.strict:
                raise
            self._warn(f"{self.monitor}: `loss_fn` failed at step {step}, no curvature this check: {err!r}")
            return {}

    def latest_diagram(self, step: int, report: CollapseReport) -> dict[str, Any]:
        """The check's H0 persistence diagram as plain data, for `topo-callbacks report` (births are all 0)."""
        return {"monitor": self.monitor, "step": step, "eps": report.eps, "h0_deaths": list(report.h0_deaths)}

    def _compute(
        self, x: Tensor, seen: int, nonfinite: int
    ) -> tuple[CollapseReport | None, str | None, Exception | None]:
        if x.ndim != 2 or x.shape[0] < 2:
            return None, f"fewer than 2 finite embeddings captured ({seen} seen, {nonfinite} non-finite)", None
        try:
            # a probe's rows move a little between checks, so the engine re-reduces only what changed; a stream's
            # sample is replaced whole, so its Betti numbers come from the check's own distances (one Gram matrix)
            betti = None
            if self.eps is not None and self.source == "probe":
                betti = self.tracker.betti(unit_rows(x, self.normalize), self.eps)
            report = collapse_index(
                x,
                eps=self.eps,
                eps_quantile=self.eps_quantile,
                weights=self.weights,
                normalize=self.normalize,
                betti=betti,
                strict_eps=False,  # a held scale may lie outside one batch's distances (then b0 = n or 1)
            )
        except Exception as err:
            self.tracker = EngineTracker(self.source)  # start the next check from scratch
            return None, f"computing the collapse index failed: {err!r}", err
        return report, None, None

    def _embed_probe(self) -> tuple[Tensor | None, Exception | None, int, int]:
        """The probe's rows on this rank (non-finite ones dropped), the error if the forward failed, the counts."""
        if self.model is None or self.module is None:
            return None, RuntimeError("the monitor is not attached to a model"), 0, 0
        try:
            rows = embed_probe(self.model, self.module, self.probe, self.pool, self.select)
        except Exception as err:  # never break training: the check is skipped on every rank
            return None, err, 0, 0
        seen = rows.shape[0]
        rows, dropped = drop_nonfinite(rows)
        return rows, None, seen, dropped

    def record_stop(self, step: int, result: CheckResult | None) -> None:
        """Remember that the run stopped at ``step`` (after the adapter reduced the decision over ranks)."""
        if self.stopped_step is not None:
            return
        self.stopped_step = step
        if result is not None and result.alarm:
            self.stopping_reason, self.stopping_reason_message = result.reason, result.message
        else:  # another rank (or another monitor) asked to stop
            self.stopping_reason_message = "Stopped because another rank raised a collapse alarm."
        # EarlyStopping says why it stopped a run; so does this monitor (once, on rank 0)
        why = "on_alarm='rollback' gave up" if self.on_alarm == "rollback" else "stop_on_alarm=True"
        self._warn(f"{self.monitor}: stopping training at step {step} ({why}). {self.stopping_reason_message}")

    def end_of_training(self, step: int) -> str:
        """Close a run at global step ``step``: warn if no check ran, and return `summary_message`.

        Adapters call it at the end of training on every rank and log the summary on rank 0. The rollback snapshots
        (``on_alarm="rollback"``) are freed; the record and the learning-rate factor stay.
        """
        self.last_step = max(int(step), self.last_step)
        if self._step_reads is not None and len(self._step_reads) and world_size() == 1 and self.detector is not None:
            # the last batch of per-step values is scored too (under DDP a rank may end without its peers: no
            # collective here)
            self._feed_steps(self._step_reads.ready(self._device, force=True))
        if self.rollback_controller is not None:
            self.rollback_controller.release()
        if not self.history and not self.skipped_checks:
            why = (
                f"the run ended at step {step}, before the first check at step {self.every_n_train_steps}"
                if step < self.every_n_train_steps
                else f"{step} steps were counted"
            )
            self._warn(
                f"{self.monitor}: no collapse check ran ({why}; `every_n_train_steps={self.every_n_train_steps}`)."
                " Lower `every_n_train_steps` to watch shorter runs."
            )
        return self.summary_message()

    def summary(self) -> dict[str, Any]:
        """What the monitor saw, as plain data: checks run and skipped, the first alarm, the stop, time spent.

        Example:
            >>> CollapseMonitorCore("0").summary()["checks"]
            0
        """
        first = self._first_alarm
        return {
            "monitor": self.monitor,
            "checks": len(self.history),
            "skipped_checks": self.skipped_checks,
            # checks the detector brought forward under the overhead budget (`CusumDetector.wants_check`)
            "pulled_checks": self.pulled_checks,
            "last_check_step": self.history[-1]["step"] if self.history else None,
            "first_alarm_step": self.first_alarm_step,
            "first_alarm_reason": None if first is None else first["reason"],
            "first_alarm_value": None if first is None else first["value"],
            "first_alarm_channel": None if first is None else first.get("channel"),
            "first_alarm_onset": None if first is None else first.get("onset"),
            # the layers whose gradient norm moved most from before the onset to the alarm, with the factor
            "first_alarm_layers": None if first is None else first.get("layers"),
            "baseline": self.rule.baseline,
            "stopped_step": self.stopped_step,
            "eps": self.eps,
            "time_s": self.time_spent_s,
            "skipped_steps": self.skipped_steps,
            "overhead": self.overhead,
            "check_every": self.check_every,
            # dormant-unit rule checks between the checks the budget spaced out (`_units_check`)
            "unit_checks": self.unit_checks,
            "observe_every": self.observe_every,
            "grad_every": self.grad_every,
            "max_samples": self.max_samples,
            # every alarm episode of the detector: start, end (None while open), channel, kind, peak level, message
            "episodes": [] if self.detector is None else [dict(e) for e in self.detector.episodes],
            # steps at which the detector's references restarted: a schedule's event ("lr") or `restart_references`
            # ("told"); each starts ~20 reads in which only the rules that need no reference score
            "reference_restarts": [] if self.detector is None else [list(r) for r in self.detector.reference_restarts],
            "on_alarm": self.on_alarm,
            # on_alarm="rollback": one entry per rollback (alarm step, restored step, onset, channel, factors)
            "rollbacks": self.rollbacks,
            "lr_factor": self.lr_factor,
            "rollback_stop": self.rollback_stop,
            # the step whose snapshot was restored when the policy gave up (`RollbackPolicy.restore_on_stop`)
            "restored_on_stop": None if self.rollback_controller is None else self.rollback_controller.restored_on_stop,
            "snapshots": self._snapshot_stats(),
        }

    def summary_message(self) -> str:
        """One line for the end of training, e.g. ``collapse/ci: 10 checks (steps 50-500), no alarm; 1.2 s``."""
        info = self.summary()
        if not info["checks"]:
            checks = "no check ran"
        else:
            checks = f"{info['checks']} checks (steps {self.history[0]['step']}-{info['last_check_step']})"
        if info["skipped_checks"]:
            checks += f", {info['skipped_checks']} skipped"
        if info["first_alarm_step"] is None:
            alarm = "no alarm"
        else:
            base = info["baseline"]
            first = self._first_alarm or {}
            if info["first_alarm_channel"] is not None and first.get("kind", "cusum") != "cusum":
                alarm = (
                    f"first alarm at step {info['first_alarm_step']}: detector on `{first['channel']}`"
                    f" ({first['kind']}): {first['detail']}"
                )
            elif info["first_alarm_channel"] is not None:
                alarm = (
                    f"first alarm at step {info['first_alarm_step']}: detector on `{first['channel']}` ="
                    f" {first['value']:.4g} (baseline {first['baseline']:.4g}, score {first['score']:+.2f})"
                )
            else:
                value = info["first_alarm_value"]
                alarm = (
                    f"first alarm at step {info['first_alarm_step']}: {self.monitor} = {value:.4f}"
                    f" ({info['first_alarm_reason']}{'' if base is None else f', baseline {base:.4f}'})"
                )
        episodes = info["episodes"]
        if len(episodes) > 1:
            alarm += f"; {len(episodes)} alarm episodes (starts: {', '.join(str(e['start']) for e in episodes)})"
        if info["skipped_steps"]:
            alarm += f"; {info['skipped_steps']} optimizer steps skipped by the loss scaler (not scored)"
        if info["rollbacks"]:
            n = len(info["rollbacks"])
            alarm += (
                f"; {n} rollback{'s' if n != 1 else ''} (to steps"
                f" {', '.join(str(e['restored_step']) for e in info['rollbacks'])}; learning rate"
                f" {info['lr_factor']:g}x the schedule)"
            )
        stop = "" if info["stopped_step"] is None else f"; stopped the run at step {info['stopped_step']}"
        return f"{self.monitor}: {checks}, {alarm}{stop}; {info['time_s']:.2f} s spent in checks."

    def _skip(self, step: int, why: str, error: Exception | None = None) -> CheckResult:
        if self.strict:
            raise RuntimeError(f"collapse check at step {step} failed: {why}") from error
        # each kind of failure is said once (its counts change from check to check); later ones are counted in
        # `skipped_checks` and in the end-of-training summary
        kind = re.split(r"[:(]", why, maxsplit=1)[0].strip()
        if f"skip:{kind}" not in self._told:
            self._told.add(f"skip:{kind}")
            self._warn(
                f"Collapse check skipped at step {step}: {why} (said once; later checks skipped for this reason are"
                " counted in `skipped_checks` and the end-of-training summary)"
            )
        return CheckResult(step, None, skipped=why)

    def _warn(self, message: str) -> None:
        if _rank() == 0:
            warnings.warn(message, CollapseWarning, stacklevel=3)

    # ------------------------------------------------------------ acting on an alarm (on_alarm="rollback")
    def track(
        self,
        models: Any = (),
        optimizers: Any = (),
        schedulers: Any = (),
        scaler: Any = None,
        *,
        framework: FrameworkStorage | None = None,
    ) -> RollbackController | None:
        """Hand the monitor the live training objects that ``on_alarm="rollback"`` snapshots and restores.

        ``models``/``optimizers``/``schedulers``: one object or a sequence (framework wrappers of a torch optimizer are
        unwrapped); ``scaler``: a loss scaler (``torch.amp.GradScaler``) or None; ``framework``: the save/load hooks for
        ``RollbackPolicy(storage="framework")``. The adapters call it when training starts (Lightning in
        ``on_train_start``, Accelerate at construction or the first `step`, the HF callback in ``on_train_begin``); a
        plain loop calls it once before training. Calling it again (a new ``fit``) replaces the objects and keeps the
        rollback record and the learning-rate factor. Returns the `RollbackController` (None without a rollback).

        Example (a plain loop: `after_step` after every optimizer step takes the snapshots):
            >>> import torch
            >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
            >>> opt = torch.optim.SGD(model.parameters(), lr=0.05)
            >>> monitor = CollapseMonitorCore("1", on_alarm={"snapshot_every": 10}, max_overhead=None)
            >>> _ = monitor.attach(model)
            >>> controller = monitor.track(models=model, optimizers=opt)
            >>> for step in range(1, 31):
            ...     loss = model(torch.randn(16, 4)).pow(2).mean()
            ...     loss.backward(); opt.step(); opt.zero_grad()
            ...     _ = monitor.observe_step(step, loss=loss.detach(), grad_norm=1.0)
            ...     monitor.after_step(step)
            >>> [s.step for s in controller.snapshots]
            [1, 11, 21]
        """
        policy = self.rollback_policy
        if policy is None:
            return None
        state = TrainingState(models, optimizers, schedulers, scaler, extra=self._rollback_extra)
        previous = self.rollback_controller
        saved = previous.state_dict() if previous is not None else self._rollback_state
        if previous is not None:
            previous.remove_hooks()
            previous.release()
        controller = RollbackController(state, policy, framework=framework)
        if saved:
            controller.load_state_dict(saved)
        self.rollback_controller, self._rollback_state = controller, None
        self._boundary_step = 0
        return controller

    def after_step(self, step: int) -> None:
        """At the step boundary after optimizer step ``step`` (after `observe_step` and any check), on every rank:
        take a rollback snapshot when one is due and the alarm is quiet (``on_alarm="rollback"``; else nothing).

        The decision reads only the step and the detector's state, which are the same on every rank, so every rank
        snapshots at the same steps. Called more than once for one step (micro-batches), it acts once.
        """
        controller = self.rollback_controller
        step = int(step)
        if self.rollback_policy is None or step < 1 or step <= self._boundary_step:
            return
        self._boundary_step = step
        if controller is None:
            self._rollback_failed(step, "no training objects were handed over: call `track(models=..., ...)` first")
            return
        quiet = not self._in_alarm and not (self.detector is not None and self.detector.in_alarm)
        try:
            controller.maybe_snapshot(step, quiet=quiet)
        except Exception as err:  # never break training: a warning (an error with strict=True)
            if self.strict:
                raise
            self._rollback_failed(step, f"taking a snapshot failed: {err!r}")

    def schedule_lr(self, optimizer: Any) -> float | None:
        """The learning rate the adapters feed the detector: the schedule's own rate of ``optimizer``'s first group,
        also when read inside ``optimizer.step()`` (Lightning's ``on_before_optimizer_step``), where a rollback's
        factor is on it. The detector is fed the schedule, not the factor: the lower rate of a rollback does not
        restart its references (it resumes from the snapshot's state, and a failure that survives the lower rate is
        seen again at once), whereas a decay of the schedule does."""
        if self.rollback_controller is not None:
            return self.rollback_controller.schedule_lr(optimizer)
        return learning_rate(optimizer)

    @property
    def rollbacks(self) -> list[dict[str, Any]]:
        """The rollbacks done (``on_alarm="rollback"``), oldest first: ``step`` (of the alarm), ``restored_step``,
        ``onset``, ``channel``, ``lr_factor`` and ``total_factor``."""
        if self.rollback_controller is not None:
            return [dict(e) for e in self.rollback_controller.rollbacks]
        return [dict(e) for e in (self._rollback_state or {}).get("rollbacks", [])]

    @property
    def lr_factor(self) -> float:
        """The factor the rollbacks put on the learning rate (1.0 before any): every update uses it times the
        schedule's rate. ``group["lr"]`` read outside a step shows the schedule's own rate."""
        if self.rollback_controller is not None:
            return float(self.rollback_controller.total_factor)
        return float((self._rollback_state or {}).get("total_factor", 1.0))

    def _snapshot_stats(self) -> dict[str, Any] | None:
        if self.rollback_controller is None:
            return None
        stats = self.rollback_controller.stats()
        return {k: stats[k] for k in ("snapshots", "taken", "bytes_held", "mean_ms", "max_ms", "last_restore_ms")}

    def _rollback_extra(self) -> dict[str, Any]:
        """The monitor's own state captured with each snapshot: the detector's and the alarm rule's."""
        return {
            "detector": None if self.detector is None else self.detector.state_dict(),
            "rule": self.rule.state_dict(),
        }

    def _rollback_failed(self, step: int, why: str) -> None:
        kind = why.split(":", 1)[0]
        if kind not in self._rollback_told:
            self._rollback_told.add(kind)
            self._warn(f"{self.monitor}: on_alarm='rollback' at step {step}: {why} (said once).")

    def _act_on_alarm(self, step: int, result: CheckResult | None) -> CheckResult | None:
        """An alarm episode started (its result is ``result``): with ``on_alarm="rollback"``, roll back now (a step
        boundary, every rank alike), or stop the run when the policy gives up. Other actions: ``result`` as it is."""
        alarm, self._new_alarm = self._new_alarm, None
        controller = self.rollback_controller
        if alarm is None or result is None or self.rollback_policy is None or self.stopped_step is not None:
            return result
        if result.reason in (StoppingReason.STOPPING_THRESHOLD, StoppingReason.PATIENCE_EXHAUSTED):
            return result  # a good level reached, or no improvement: not a failure to recover from
        if controller is None:
            self._rollback_failed(step, "no training objects were handed over: call `track(models=..., ...)` first")
            return result
        alarm_step, onset, channel = alarm
        onset = alarm_step if onset is None else int(onset)
        # The values read at step t (loss, gradient norm, a check's rows) come from the weights after step t-1: the
        # first state the change may hold is the one after step onset-1, so the snapshot must be older than that.
        # A failure back after a rollback retries the snapshot it came back from (with the rate lowered again) unless
        # the change point lies before it: the detector resumed from it quiet, and a failure back from the first step
        # after the resume, where that snapshot's first run went on healthy, comes with the configuration (the rate,
        # the data, the objective), not with the snapshot. Going one snapshot further back at every return (until
        # 2026-12-03) only threw training away, and the give-up then restored an older model.
        suspect = onset - 1
        if controller.rollbacks and channel in self._resumed_quiet:
            # that channel's statistic stood at 0 when the detector resumed: its change began after the resume (a
            # check channel's change point is its last quiet check, which may predate the snapshot)
            restored = int(controller.rollbacks[-1]["restored_step"])
            if onset <= restored + 1:
                suspect = restored + 1 + controller.policy.min_lookback
        held = [snap.step for snap in controller.snapshots]
        try:
            # the rates of the steps before onset-1 made the states read healthy
            healthy = self.detector.highest_rate_before(onset - 1) if self.detector is not None else None
            decision = controller.rollback(suspect, alarm_step, channel, detector_onset=onset - 1, healthy_rate=healthy)
            if decision.action == "rollback":
                controller.rollbacks[-1]["onset"] = onset  # the record names the detector's onset
                self._resume_after_rollback(step, decision)
        except Exception as err:  # never break training: a warning (an error with strict=True)
            if self.strict:
                raise
            self._rollback_failed(step, f"the rollback failed, training goes on: {err!r}")
            return result
        if decision.action == "stop":
            self.rollback_stop = decision.reason.value
            message = decision.message
            if decision.reason is RollbackReason.NO_SNAPSHOT:
                message = (
                    f"The alarm on {channel!r} at step {alarm_step} (its change began at step {onset}) has nothing"
                    f" healthy to go back to: no snapshot older than step {suspect} is held"
                    f" ({f'snapshots of steps {held}' if held else 'none taken yet'}). Stopping."
                )
            return dataclasses.replace(
                result, reason=StoppingReason.ROLLBACK_GAVE_UP, message=message, should_stop=True
            )
        layers = self._last_layers if channel != self.monitor else None
        entry = {**(decision.entry or {}), "onset": onset}
        if layers:
            entry["layers"] = layers
            if controller.rollbacks:
                controller.rollbacks[-1]["layers"] = layers
        n, most = len(controller.rollbacks), controller.policy.max_rollbacks
        self._warn(
            f"{self.monitor}: rolled back to the snapshot of step {entry['restored_step']} (alarm on `{channel}` at"
            f" step {alarm_step}, its change began at step {onset}); the learning rate is now"
            f" {controller.total_factor:g}x the schedule (rollback {n} of {most}"
            + (
                f"; if the retry's first step would still train at over {RISE_KEPT:g}x {controller.rate_cap:g}, the"
                " highest rate the run trained at before the failure, the factor brings it down to that)"
                if controller.rate_cap is not None
                else ")"
            )
            + ". The batches since step"
            f" {entry['restored_step']} are not replayed: the data stream moves on."
            + (
                ""
                if not layers
                else " Gradient norm moved most in: " + ", ".join(f"{n} (x{f:.3g})" for n, f in layers) + "."
            )
        )
        logged = {**result.logged, f"{self.prefix}rollbacks": float(n)}
        return dataclasses.replace(result, logged=logged, rollback=entry)

    def _collapsed_again(self, step: int, result: CheckResult) -> CheckResult:
        """After a rollback, the embeddings collapsing again at the lowered learning rate (the effective rank under
        `RECOLLAPSE_RATIO` of the restored snapshot's for `RECOLLAPSE_CHECKS` checks in a row): a slow second
        collapse that the per-step channels' references learn as they go. The policy stops with the configuration
        diagnosis (`RollbackReason.COLLAPSED_AGAIN`); with ``restore_on_stop`` the snapshot rolled back to is
        restored if the ring still holds it (no newer one is healthy: else the run stops on the weights it has).
        Every rank decides alike: a check's report is the same everywhere."""
        controller, watch, report = self.rollback_controller, self._recollapse, result.report
        if controller is None or watch is None or report is None or self.stopped_step is not None:
            return result
        if self.rollback_stop is not None or watch.left <= 0:  # the policy gave up; past `RECOLLAPSE_WINDOW` checks
            self._recollapse = None
            return result
        watch.left -= 1
        rank = float(report.effective_rank)
        if int(report.n) != watch.rows:  # a check of another size: its rank is not comparable
            watch.below = 0
            return result
        watch.below = watch.below + 1 if math.isfinite(rank) and rank < RECOLLAPSE_RATIO * watch.rank else 0
        if watch.below < RECOLLAPSE_CHECKS:
            return result
        self._recollapse = None
        restored = int(controller.rollbacks[-1]["restored_step"]) if controller.rollbacks else step
        onset = restored + 1 + controller.policy.min_lookback  # the snapshot rolled back to, as `choose` counts
        try:
            decision = controller.give_up(onset, step, str(self.layer), RollbackReason.COLLAPSED_AGAIN)
        except Exception as err:  # never break training: a warning (an error with strict=True)
            if self.strict:
                raise
            self._rollback_failed(step, f"the give-up's restore failed, training goes on: {err!r}")
            return result
        self.rollback_stop = decision.reason.value
        message = (
            f"{decision.message} (effective rank {rank:.3g}, under {RECOLLAPSE_RATIO:g}x the {watch.rank:.3g} of the"
            f" snapshot of step {restored}, {RECOLLAPSE_CHECKS} checks in a row)"
        )
        # the check now counts as an alarm, in the state, the log and the history alike (`record_stop` warns)
        self._in_alarm = True
        logged = {**result.logged, f"{self.prefix}alarm": 1.0}
        if self.history and self.history[-1].get("step") == step:
            self.history[-1].update(alarm=True, reason=StoppingReason.ROLLBACK_GAVE_UP.name)
        return dataclasses.replace(
            result,
            reason=StoppingReason.ROLLBACK_GAVE_UP,
            message=message,
            alarm=True,
            should_stop=True,
            logged=logged,
        )

    def _resume_after_rollback(self, step: int, decision: RollbackDecision) -> None:
        """The training state was restored: the detector and the alarm rule resume from the snapshot's state, the
        alarm episode is closed (and kept in the record), and nothing of the abandoned steps is read."""
        extra = decision.extra or {}
        restored = (decision.entry or {}).get("restored_step")
        detector = self.detector
        if detector is not None and extra.get("detector"):
            episodes = [dict(e) for e in detector.episodes]
            first, skipped, notes = detector.fired, detector.skipped_steps, detector.notes
            detector.load_state_dict(extra["detector"])
            if episodes and episodes[-1]["end"] is None:
                episodes[-1]["end"] = step
                episodes[-1]["rolled_back_to"] = restored
            detector.episodes, detector.fired, detector.skipped_steps, detector.notes = episodes, first, skipped, notes
            self._resumed_quiet = detector.quiet_channels()
            self._mark_restarts_seen()
            self._episodes_ended_told = sum(e["end"] is not None for e in episodes)  # the rollback's warning told it
        if extra.get("rule") is not None:
            self.rule.load_state_dict(extra["rule"])
        self._in_alarm = False
        self._previous_probe = None  # the next probe check is compared with nothing from the abandoned steps
        self._unread_loss, self._unread_count = 0.0, 0  # nor the next read's loss with theirs
        self._reads_since_grad = 0
        # the rows captured and the per-step values not yet read belong to the abandoned steps: dropped, and no check
        # at this step (it would score the state just left)
        self.capture.reset()
        self._armed_steps = 0
        self.layer_norms.clear()
        if self._step_reads is not None:
            reads = StepReads(self._step_reads.read_every, keep_cpu_tensors=self._step_reads.keep_cpu_tensors)
            reads.reads = self._step_reads.reads
            self._step_reads = reads
        if self._host_batch and self.detector is not None:
            self._urgent_above = self.detector.urgent_above()
        self.last_checked_step = max(self.last_checked_step, step)
        # the embeddings are watched against the snapshot's: a second collapse after it is no longer learned as normal
        self._recollapse = self._snapshot_rank(restored)

    def _snapshot_rank(self, restored: int | None) -> _RecollapseWatch | None:
        """The watch `_collapsed_again` starts from after a rollback to step ``restored``: the effective rank and rows
        of the last full check at or before it on the timeline kept (not a trial check, not one of the stretches an
        earlier rollback discarded), no check seen under the ratio yet, `RECOLLAPSE_WINDOW` checks to go."""
        if restored is None:
            return None
        discarded = [
            (int(e["restored_step"]), int(e["step"])) for e in self.rollbacks[:-1] if e.get("restored_step") is not None
        ]
        kept = [
            h
            for h in self.history
            if h.get("step", math.inf) <= restored
            and not h.get("trial")
            and not any(lo < h["step"] <= hi for lo, hi in discarded)
        ]
        if not kept:
            return None
        rank, rows = kept[-1].get("effective_rank"), kept[-1].get("n")
        if rank is None or rows is None or not math.isfinite(float(rank)) or float(rank) <= 0.0:
            return None
        return _RecollapseWatch(float(rank), int(rows))

    # ------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Plain Python types only (checkpoints load with ``weights_only=True``)."""
        return {
            "eps": self.eps,
            "eps_candidates": list(self.eps_candidates),
            "last_checked_step": self.last_checked_step,
            "rule": self.rule.state_dict(),
            "history": [dict(h) for h in self.history],
            "stopped_step": self.stopped_step,
            "stopping_reason": self.stopping_reason.value,
            "stopping_reason_message": self.stopping_reason_message,
            "first_alarm_step": self.first_alarm_step,
            "in_alarm": self._in_alarm,
            "capture_steps": self._capture_steps,
            "world_size": world_size(),
            "detector": None if self.detector is None else self.detector.state_dict(),
            "last_observed_step": self.last_observed_step,
            "first_alarm": None if self._first_alarm is None else dict(self._first_alarm),
            "fed_steps": self._fed_steps,
            "told": sorted(self._told),
            "episodes_ended_told": self._episodes_ended_told,
            "check_every": self.check_every,
            "unit_width": self._unit_width,
            "unit_rows": self._unit_rows,
            "unit_checks": self.unit_checks,
            "observe_every": self.observe_every,
            "grad_every": self.grad_every,
            "next_check": self._next_check,
            "max_samples": self.max_samples,
            # on_alarm="rollback": the record and the learning-rate factor (plain data; the snapshots are a cache)
            "rollback": (
                self.rollback_controller.state_dict() if self.rollback_controller is not None else self._rollback_state
            ),
            "rollback_stop": self.rollback_stop,
            # after a rollback: the restored snapshot's effective rank and the checks under its share since
            "recollapse": None if self._recollapse is None else dataclasses.asdict(self._recollapse),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._quiet_through = 0
        eps = state.get("eps", self.fixed_eps)
        self.eps = None if eps is None else float(eps)
        self.eps_candidates = [float(v) for v in state.get("eps_candidates", [])]
        self.last_checked_step = int(state.get("last_checked_step", -1))
        self.rule.load_state_dict(state.get("rule", {}))
        self.history = [dict(h) for h in state.get("history", [])]
        stopped = state.get("stopped_step")
        self.stopped_step = None if stopped is None else int(stopped)
        self.stopping_reason = StoppingReason(state.get("stopping_reason", 0))
        self.stopping_reason_message = state.get("stopping_reason_message")
        first = state.get("first_alarm_step")
        self.first_alarm_step = None if first is None else int(first)
        self._in_alarm = bool(state.get("in_alarm", False))
        # the capture window was sized for the saved per-rank budget; on another world size it is re-learned
        same_world = int(state.get("world_size", world_size())) == world_size()
        saved_window = int(state.get("capture_steps", self.every_n_train_steps))
        self._capture_steps = saved_window if same_world else self.every_n_train_steps
        if self.detector is not None and state.get("detector"):
            self.detector.load_state_dict(state["detector"])
            self._mark_restarts_seen()  # restarts loaded are not new ones
            if self._host_batch:
                self._urgent_above = self.detector.urgent_above()
        self.last_observed_step = int(state.get("last_observed_step", 0))
        first_alarm = state.get("first_alarm")
        self._first_alarm = None if first_alarm is None else dict(first_alarm)
        self._fed_steps = int(state.get("fed_steps", 0))
        self._told = set(state.get("told", []))
        self._episodes_ended_told = int(state.get("episodes_ended_told", 0))
        self.check_every = int(state.get("check_every", self.every_n_train_steps))
        # a resumed run's unit checks go on before its next check
        self._unit_width, self._unit_rows = int(state.get("unit_width", 0)), int(state.get("unit_rows", 0))
        self.unit_checks = int(state.get("unit_checks", 0))
        self.observe_every = int(state.get("observe_every", 1))
        self.grad_every = int(state.get("grad_every", 1))
        # a resumed run's strides stand as asked for once already
        self._grad_need, self._stride_need = self.grad_every, self.observe_every
        if self.history or self.last_checked_step >= 0 or self.eps is not None:
            self._trial_samples = None  # a resumed run has measured its checks already: no trial again
        self._next_check = int(state.get("next_check", self.last_checked_step + self.check_every))
        if self.source == "stream" and same_world:  # a sample ``max_overhead`` lowered while calibrating stays so
            self.max_samples = min(int(state.get("max_samples", self.max_samples)), self.max_samples)
        self._size_capture()
        saved = state.get("rollback")
        if isinstance(saved, Mapping):
            if self.rollback_controller is not None:
                self.rollback_controller.load_state_dict(saved)  # the factor applies from the next step on
            else:
                self._rollback_state = dict(saved)  # applied by `track`
        stop = state.get("rollback_stop")
        self.rollback_stop = None if stop is None else str(stop)
        watch = state.get("recollapse")
        self._recollapse = None if not isinstance(watch, dict) else _RecollapseWatch(**watch)


#: parameters and modules registered in this process since `_watch_registrations` first ran (a one-item list: the
#: hooks bump it in place)
_REGISTRATIONS = [0]
_WATCHING = [False]


def _count_registration(*_: Any) -> None:
    _REGISTRATIONS[0] += 1


def _watch_registrations() -> None:
    """Install, once per process, the global hooks that count parameter and module registrations (a module's cached
    parameter list is stale after one)."""
    if _WATCHING[0]:
        return
    from torch.nn.modules.module import (
        register_module_module_registration_hook,
        register_module_parameter_registration_hook,
    )

    register_module_parameter_registration_hook(_count_registration)
    register_module_module_registration_hook(_count_registration)
    _WATCHING[0] = True


#: The links from a module down to its first parameter: ``(dict, key, value)`` for each submodule on the way (in its
#: parent's ``_modules``) and the parameter itself (in its owner's ``_parameters``).
_Path = list[tuple[Mapping[str, Any], str, Any]]


def _path_to_first(module: nn.Module, params: list[Any]) -> _Path | None:
    """`_first_in_place`'s links for ``module``'s first parameter; None when it has none or cannot be found by name
    (a module whose ``parameters`` is overridden)."""
    if not params:
        return None
    name = next((n for n, p in module.named_parameters() if p is params[0]), None)
    if name is None:
        return None
    *parts, leaf = name.split(".")
    path: _Path = []
    owner = module
    for part in parts:
        child = owner._modules.get(part)
        if child is None:
            return None
        path.append((owner._modules, part, child))
        owner = child
    path.append((owner._parameters, leaf, params[0]))
    return path


def _first_in_place(params: list[Any], path: _Path | None) -> bool:
    """Whether the module a parameter list was taken from still holds its first parameter where it was: every
    submodule on the way in its parent, the parameter in its owner (a few dict lookups: walking the module tree,
    ``next(module.parameters())``, costs 15 us on an 8-module Sequential right after a backward pass, half the norms
    it guards). Catches a first layer removed, inserted or replaced, or its tensor replaced, without a hook."""
    if path is None:
        return not params
    return all(holder.get(key) is value for holder, key, value in path)


def _any_zero(per_tensor: Any) -> Any:
    """Whether some per-tensor gradient norm is exactly 0: a bool for numbers, a 0-d tensor on the device for a
    device tensor (not read here)."""
    if isinstance(per_tensor, Tensor):
        return (per_tensor == 0).any().float()
    return 0.0 in per_tensor


def _on_gpu(values: list[Any]) -> bool:
    return any(isinstance(v, Tensor) and v.device.type != "cpu" for v in values)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}; got {value!r}.")
