"""The alarm rule: EarlyStopping's rules on the CI plus a rise over the run's own baseline."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from topo_callbacks._validation import as_real

__all__ = ["AlarmRule", "StoppingReason"]


class StoppingReason(Enum):
    """Why an alarm fired (and the run stopped, with ``stop_on_alarm=True``); stored in checkpoints by value."""

    NOT_STOPPED = 0
    STOPPING_THRESHOLD = 1
    DIVERGENCE_THRESHOLD = 2
    PATIENCE_EXHAUSTED = 3
    NON_FINITE_METRIC = 4
    BASELINE_RISE = 5
    DETECTOR = 6
    #: ``on_alarm="rollback"`` gave up: the failure came back after the allowed rollbacks (or nothing healthy was left
    #: to go back to), so it is probably in the configuration
    ROLLBACK_GAVE_UP = 7


@dataclass
class AlarmRule:
    """Decide, check by check, whether the monitored value is alarming.

    Rules, in order (the first that holds fires), with Lightning ``EarlyStopping``'s meanings:

    1. ``check_finite``: the value is NaN or infinite;
    2. ``stopping_threshold``: the value reached this *good* level (EarlyStopping's "good enough, stop");
    3. ``divergence_threshold``: the value is worse than this level;
    4. ``max_rise``: the value is worse than the run's own baseline (the median of the ``baseline_checks``
       checks after eps calibration, so one outlying check early in training does not set it) by more than
       ``max_rise``, for ``rise_patience`` consecutive checks;
    5. ``patience``: no improvement by more than ``min_delta`` for ``patience`` checks (None: off).

    "Worse" is "higher" for ``mode="min"`` (the CI: lower is healthier) and "lower" for ``mode="max"``.

    Example:
        >>> rule = AlarmRule(baseline_checks=2, rise_patience=1)
        >>> [rule.evaluate(v)[0].name for v in (0.10, 0.14, 0.20, 0.50)]
        ['NOT_STOPPED', 'NOT_STOPPED', 'NOT_STOPPED', 'BASELINE_RISE']
    """

    mode: str = "min"
    min_delta: float = 0.0
    patience: int | None = None
    stopping_threshold: float | None = None
    divergence_threshold: float | None = None
    check_finite: bool = True
    # the same defaults as CollapseMonitorCore's (tests/test_docs.py checks it)
    max_rise: float | None = 0.2
    baseline_checks: int = 3
    rise_patience: int = 2
    monitor: str = "collapse/ci"
    # state
    wait_count: int = 0
    best_score: float = field(default=math.nan)
    baseline_values: list[float] = field(default_factory=list)
    rise_count: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("min", "max"):
            raise ValueError(f"`mode` must be 'min' or 'max'; got {self.mode!r}.")
        # a threshold given as a string ("0.9", read from a config and never converted) is a mistake, not a number
        self.min_delta = as_real(self.min_delta, "min_delta", "a number >= 0")
        for name in ("stopping_threshold", "divergence_threshold", "max_rise"):
            value = getattr(self, name)
            if value is not None:
                value = as_real(value, name, "a number or None")
                if math.isnan(value):
                    raise ValueError(f"`{name}` must be a number or None; got nan.")
                setattr(self, name, value)
        if self.min_delta < 0:
            raise ValueError(f"`min_delta` must be >= 0; got {self.min_delta!r}.")
        for name in ("patience", "baseline_checks", "rise_patience"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(
                    f"`{name}` must be an int >= 1{' or None' if name == 'patience' else ''}; got {value!r}."
                )
        if self.max_rise is not None and not (self.max_rise > 0):
            raise ValueError(f"`max_rise` must be > 0 or None; got {self.max_rise!r}.")

    @property
    def baseline(self) -> float | None:
        """Median of the baseline checks, once all of them are in."""
        if len(self.baseline_values) < self.baseline_checks:
            return None
        return statistics.median(self.baseline_values)

    def _worse(self, a: float, b: float) -> bool:
        return a > b if self.mode == "min" else a < b

    def evaluate(self, value: float, *, baseline_ready: bool = True) -> tuple[StoppingReason, str]:
        """Feed one check's value; returns the reason an alarm fires now (``NOT_STOPPED`` if none) and a message.

        ``baseline_ready=False`` (while the scale is still being calibrated) keeps the value out of the baseline.
        """
        key = self.monitor
        if self.check_finite and not math.isfinite(value):
            return StoppingReason.NON_FINITE_METRIC, f"{key} = {value} is not finite."
        if self.stopping_threshold is not None and self._worse(self.stopping_threshold, value):
            op = "<" if self.mode == "min" else ">"
            return StoppingReason.STOPPING_THRESHOLD, (
                f"Stopping threshold reached: {key} = {value:.4f} {op} {self.stopping_threshold}."
            )
        if self.divergence_threshold is not None and self._worse(value, self.divergence_threshold):
            op = ">" if self.mode == "min" else "<"
            return StoppingReason.DIVERGENCE_THRESHOLD, (
                f"Divergence threshold exceeded: {key} = {value:.4f} {op} {self.divergence_threshold}."
            )
        reason, message = StoppingReason.NOT_STOPPED, ""
        if baseline_ready and math.isfinite(value):
            base = self.baseline
            if base is None:
                self.baseline_values.append(float(value))
            elif self.max_rise is not None:
                rise = value - base if self.mode == "min" else base - value
                self.rise_count = self.rise_count + 1 if rise > self.max_rise else 0
                if self.rise_count >= self.rise_patience:
                    reason = StoppingReason.BASELINE_RISE
                    message = (
                        f"{key} = {value:.4f} is {rise:.4f} worse than the run's baseline {base:.4f}"
                        f" (max_rise={self.max_rise}) for {self.rise_count} consecutive checks."
                    )
        if math.isfinite(value):
            improved = math.isnan(self.best_score) or self._worse(
                self.best_score, value + (self.min_delta if self.mode == "min" else -self.min_delta)
            )
            if improved:
                self.best_score, self.wait_count = float(value), 0
            else:
                self.wait_count += 1
                if (
                    reason is StoppingReason.NOT_STOPPED
                    and self.patience is not None
                    and self.wait_count >= self.patience
                ):
                    reason = StoppingReason.PATIENCE_EXHAUSTED
                    message = (
                        f"{key} did not improve by more than {self.min_delta} in the last {self.wait_count} checks."
                        f" Best score: {self.best_score:.4f}."
                    )
        return reason, message

    def state_dict(self) -> dict[str, Any]:
        return {
            "wait_count": self.wait_count,
            "best_score": self.best_score,
            "baseline_values": list(self.baseline_values),
            "rise_count": self.rise_count,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.wait_count = int(state.get("wait_count", 0))
        self.best_score = float(state.get("best_score", math.nan))
        self.baseline_values = [float(v) for v in state.get("baseline_values", [])]
        self.rise_count = int(state.get("rise_count", 0))
