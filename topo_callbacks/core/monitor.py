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
from topo_callbacks.core.capture import POOLS, EmbeddingCapture, LayerSpec, resolve_layer
from topo_callbacks.core.detector import (
    _ALWAYS,
    ABSOLUTE_HOLD,
    CHANNELS,
    ZERO_GRAD_STEPS,
    CusumDetector,
    DetectorFiring,
    default_calibration,
    gradient_curvature,
)
from topo_callbacks.core.gather import (
    broadcast_from_rank0,
    gather_samples,
    sum_across_ranks,
    sum_floats_across_ranks,
    world_size,
)
from topo_callbacks.core.probe import embed_probe, probe_rows
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
            changed. In both cases, once eps is fixed, b0/b1 come from one `MMHMEngine` kept across checks
            (`EngineTracker`; float32 rows).
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
        stop_on_alarm: stop training when the alarm fires; False only warns and logs.
        strict: raise on a monitoring failure instead of warning and skipping the check.
        verbose: also report every check (not only alarms) through ``warnings``/the adapter's logger.
        prog_bar: show the CI in the progress bar (Lightning; as ``LightningModule.log(prog_bar=...)``).
        logger: send the check's values to the framework's loggers (Lightning loggers, ``trainer.log``,
            ``accelerator.log``); False keeps them in ``history`` (and, in Lightning, ``callback_metrics``) only.

    Example (a plain PyTorch loop; the framework adapters make these calls for you):
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
        >>> monitor = CollapseMonitorCore("1", every_n_train_steps=5, max_samples=64)
        >>> _ = monitor.attach(model)
        >>> for step in range(1, 11):
        ...     monitor.prepare_step(step)
        ...     _ = model(torch.randn(32, 8))  # forward (+ backward and optimizer step)
        ...     if monitor.is_check_step(step):
        ...         result = monitor.run_check(step)
        >>> [h["step"] for h in monitor.history], 0.0 <= monitor.history[-1]["ci"] <= 1.0
        ([5, 10], True)
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
        stop_on_alarm: bool = False,
        strict: bool = False,
        verbose: bool = False,
        prog_bar: bool = True,
        logger: bool = True,
    ) -> None:
        if not (isinstance(layer, str) and layer) and not callable(layer):
            raise ValueError(
                f"`layer` must be a dotted module path (str) or a callable(model) -> Module; got {layer!r}."
            )
        _check_int("every_n_train_steps", every_n_train_steps, 1)
        _check_int("max_samples", max_samples, 8)
        _check_int("calibration_checks", calibration_checks, 1)
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
        self.stop_on_alarm = bool(stop_on_alarm)
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
        # the previous probe check's rows and H0 deaths (source="probe"): the consecutive-check channels compare them
        self._previous_probe: tuple[Tensor, tuple[float, ...]] | None = None

    # ------------------------------------------------------------------ wiring
    def attach(self, model: nn.Module) -> nn.Module:
        """Resolve ``layer`` on ``model`` and register the forward hook; raises ValueError for a bad layer."""
        self.module = resolve_layer(model, self.layer)
        self.model = model
        param = next(model.parameters(), None)
        self._device = param.device if param is not None else torch.device("cpu")
        self.capture.max_samples = math.ceil(self.max_samples / world_size())
        self.capture.attach(self.module)
        return self.module

    def detach(self) -> None:
        """Remove the hook; the monitor's results and state stay."""
        self.capture.detach()
        self.capture.armed = False

    # ---------------------------------------------------------------- schedule
    def is_check_step(self, step: int) -> bool:
        """Whether the optimizer step just completed (global count ``step``) is due for a check."""
        return step > 0 and step % self.every_n_train_steps == 0 and step != self.last_checked_step

    def prepare_step(self, next_step: int) -> None:
        """Arm the hook when optimizer step number ``next_step`` falls in the capture window before a check."""
        until_check = (-next_step) % self.every_n_train_steps
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
        calibrated = [c for c in self.detector.channels if CHANNELS[c].reads == "step" and c not in _ALWAYS]
        return (*_ALWAYS, *calibrated)

    def observe_step(
        self,
        step: int,
        *,
        loss: float | None = None,
        grad_norm: float | None = None,
        lr: float | None = None,
        skipped: bool = False,
        loss_scale: float | None = None,
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
        (one small all-reduce per step), so every rank takes the same decision without another collective.

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
        wanted = self.step_channels
        if loss is None and self._loss_count:
            loss = float(self._loss_sum) / self._loss_count
        self._loss_sum, self._loss_count = 0.0, 0
        if not wanted or step <= self.last_observed_step:
            return None
        self.last_observed_step = step
        given = {"loss": loss, "grad_norm": grad_norm}
        start = time.perf_counter()
        # (sum, count) per channel, the same length on every rank even where a value is missing; then the skip flag
        # (a scaler decides alike on every rank: its inf check is reduced over them) and the loss scale
        flat: list[float] = []
        for name in wanted:
            value = given.get(name)
            flat += [0.0, 0.0] if value is None else [float(value), 1.0]
        flat += [float(bool(skipped)), 0.0 if loss_scale is None else float(loss_scale), float(loss_scale is not None)]
        totals = sum_floats_across_ranks(flat, self._device)
        detector = self.detector
        assert detector is not None
        values = {n: totals[2 * i] / totals[2 * i + 1] for i, n in enumerate(wanted) if totals[2 * i + 1] > 0}
        skipped = totals[-3] > 0
        scale = totals[-2] / totals[-1] if totals[-1] > 0 else None
        if values:
            self._fed_steps += 1
        fired = detector.observe_step(step, values, lr=lr, skipped=skipped, loss_scale=scale)
        self._tell_detector_news(step)
        self.time_spent_s += time.perf_counter() - start
        return None if fired is None else self._detector_alarm(step, fired, None)

    def _tell_detector_news(self, step: int) -> None:
        """Warn once about each note the detector has about how it is fed, and about each episode that ended."""
        assert self.detector is not None
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
        if loss is None or "loss" not in self.step_channels:
            return
        value = loss.detach().float().mean() if isinstance(loss, Tensor) else float(loss)
        self._loss_sum = self._loss_sum + value
        self._loss_count += 1

    def _detector_alarm(self, step: int, fired: DetectorFiring, report: CollapseReport | None) -> CheckResult:
        message = fired.message(self.prefix.rstrip("/") or "collapse")
        self._warn(f"Collapse alarm at step {step}: {message}")
        if self.first_alarm_step is None:
            self.first_alarm_step = step
            self._first_alarm = {"step": step, "reason": StoppingReason.DETECTOR.name, "channel": fired.channel,
                                 "value": fired.value, "baseline": fired.baseline, "score": fired.score,
                                 "kind": fired.kind, "detail": fired.detail}  # fmt: skip
        return CheckResult(step, report, StoppingReason.DETECTOR, message, True, self.stop_on_alarm)

    # ------------------------------------------------------------------- check
    def run_check(self, step: int) -> CheckResult:
        """Gather, compute the CI, update calibration and alarm, record history. Call on every rank."""
        start = time.perf_counter()
        try:
            result = self._run_check(step)
        finally:
            self.time_spent_s += time.perf_counter() - start
        if result.report is None:
            self.skipped_checks += 1
        return result

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
        if self._armed_steps and self.capture.seen:
            per_step = self.capture.seen / self._armed_steps
            self._capture_steps = min(max(math.ceil(self.capture.max_samples / per_step), 1), self.every_n_train_steps)
        self._armed_steps = 0
        self.capture.reset()
        on_rank0 = self.compute_on == "rank0" and world_size() > 1
        if self.source == "probe":
            x = local if local is not None else torch.zeros(0, 0, device=self._device)
        else:
            x = gather_samples(local, self.max_samples, self._device, dst=0 if on_rank0 else None)
        if degenerate and self.strict:  # after the gather: every rank raises at the same point
            detail = " ".join(selection) or "(reported on another rank)"
            raise ValueError(f"{self.monitor}: the watched tensor looks wrong (strict=True). {detail}")
        if failed:
            where = f"{error!r}" if error is not None else f"on {failed} other rank(s)"
            return self._skip(step, f"capturing the layer output failed: {where}", error)
        calibrating = self.eps is None
        report: CollapseReport | None = None
        why, err = None, None
        if not on_rank0 or _rank() == 0:
            report, why, err = self._compute(x, seen, nonfinite)
        if on_rank0:  # every rank logs and decides on rank 0's report
            report, why = broadcast_from_rank0((report, why), self._device)
        if report is None:
            return self._skip(step, why or "no report", err)
        report = dataclasses.replace(report, nonfinite_fraction=nonfinite / max(seen, 1))
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
        if self.detector is not None:
            fired = self._feed_check(step, report, consecutive, calibrating)
        if fired is not None and not alarm:
            result = self._detector_alarm(step, fired, report)
            reason, message, alarm = result.reason, result.message, True
        elif alarm and not self._in_alarm:
            self._warn(f"Collapse alarm at step {step}: {message}")
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
        hold = max(ABSOLUTE_HOLD, 2 * self.every_n_train_steps)
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
            betti = None if self.eps is None else self.tracker.betti(unit_rows(x, self.normalize), self.eps)
            report = collapse_index(
                x,
                eps=self.eps,
                eps_quantile=self.eps_quantile,
                weights=self.weights,
                normalize=self.normalize,
                betti=betti,
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
        self._warn(
            f"{self.monitor}: stopping training at step {step} (stop_on_alarm=True). {self.stopping_reason_message}"
        )

    def end_of_training(self, step: int) -> str:
        """Close a run at global step ``step``: warn if no check ran, and return `summary_message`.

        Adapters call it at the end of training on every rank and log the summary on rank 0.
        """
        self.last_step = max(int(step), self.last_step)
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
            "last_check_step": self.history[-1]["step"] if self.history else None,
            "first_alarm_step": self.first_alarm_step,
            "first_alarm_reason": None if first is None else first["reason"],
            "first_alarm_value": None if first is None else first["value"],
            "first_alarm_channel": None if first is None else first.get("channel"),
            "baseline": self.rule.baseline,
            "stopped_step": self.stopped_step,
            "eps": self.eps,
            "time_s": self.time_spent_s,
            "skipped_steps": self.skipped_steps,
            # every alarm episode of the detector: start, end (None while open), channel, kind, peak level, message
            "episodes": [] if self.detector is None else [dict(e) for e in self.detector.episodes],
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
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
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
        self.last_observed_step = int(state.get("last_observed_step", 0))
        first_alarm = state.get("first_alarm")
        self._first_alarm = None if first_alarm is None else dict(first_alarm)
        self._fed_steps = int(state.get("fed_steps", 0))
        self._told = set(state.get("told", []))
        self._episodes_ended_told = int(state.get("episodes_ended_told", 0))


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}; got {value!r}.")
