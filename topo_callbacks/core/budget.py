"""How far apart the checks must be for the monitor to keep within a share of the training time.

The monitor's cost has two parts: a check (seconds, every ``I`` steps) and its per-step work (reading the loss and
the gradient norm, the detector's update). Over ``I`` steps of training time ``t`` each, its share is

    (check + I x per_step) / (I x (t + per_step) + check)

and it stays at most ``budget`` when ``I >= check x (1 - budget) / (budget x t - (1 - budget) x per_step)``.
"""

from __future__ import annotations

import math

__all__ = ["LONGEST_SPACING", "MAX_SPACING", "MIN_SAMPLES", "check_spacing"]

#: While the scale is being calibrated, a check that would have to be spaced more than this many times
#: ``every_n_train_steps`` apart to keep within the budget makes the sample smaller instead (once the scale is held
#: the sample stays: the detector's references depend on its size).
MAX_SPACING = 10
#: The widest spacing, in multiples of ``every_n_train_steps``.
LONGEST_SPACING = 100
#: The smallest sample the budget lowers ``max_samples`` to.
MIN_SAMPLES = 128


def check_spacing(check_s: float, per_step_s: float, step_s: float, budget: float) -> float:
    """The fewest optimizer steps between checks that keeps the monitor within ``budget`` (a share of the wall
    time), given a check's cost ``check_s``, the monitor's per-step cost ``per_step_s`` and a training step's own time
    ``step_s`` (seconds); ``inf`` when the per-step cost alone is over the budget.

    Example:
        >>> check_spacing(check_s=0.2, per_step_s=0.0, step_s=0.01, budget=0.02)  # 0.2 s per 980 x 0.01 s: 2%
        980.0
        >>> check_spacing(check_s=0.2, per_step_s=0.001, step_s=0.01, budget=0.02)  # 10% per step: never enough
        inf
    """
    room = budget * step_s - (1.0 - budget) * per_step_s
    return math.inf if room <= 0 else check_s * (1.0 - budget) / room
