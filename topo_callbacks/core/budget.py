"""How far apart the checks must be for the monitor to keep within a share of the training time.

The monitor's cost has two parts: a check (seconds, every ``I`` steps) and its per-step work (reading the loss and
the gradient norm, the detector's update). Over ``I`` steps of training time ``t`` each, its share is

    (check + I x per_step) / (I x (t + per_step) + check)

and it stays at most ``budget`` when ``I >= check x (1 - budget) / (budget x t - (1 - budget) x per_step)``.

When the per-step work costs more than `GRAD_STRIDE_FROM` of the budget, the gradient norm (on a small model most of
that work: listing the parameters and one norm per tensor right after the backward pass) is computed at one read in
2 or 4 only (`grad_stride`), each read of it adding to its CUSUMs what the reads it stands for would; the loss is
still read at every step. When the per-step work alone costs more than `STRIDE_FROM` times the budget (steps of a
millisecond or less), it is done on every ``s``-th step only (`step_stride`): the per-step cost becomes about
``per_step / s`` (a step not read still keeps its loss, and unit checks come every interval: planned as well).
Replayed as the monitor reads (every step of its first 200, then every s-th, the loss of the steps between
averaged into the next read and adding to its CUSUMs what s reads would, the references kept over about 200 steps;
shipped calibration, test seeds), reading one step in 2, 4 and 8 detected 39, 33 and 31 of the 46 failure runs that
every step detects 41 of, and 29, 24 and 20 with the checks 10x apart as well. Striding from the budget itself
(``STRIDE_FROM = 1``) was measured on 2026-12-03: the digits CNN then read 1 step in 7 (own share 5.6% -> 2.5%), the
784-1024-1024 MLP 1 in 3 (3.4% -> 2.0%), a setting whose replay detects about 20-31 of 46: detection was kept first.
Since 2026-12-05 it is 2 (see `STRIDE_FROM`): those models now read every step within about the budget, and only
steps of about a millisecond or less are strided.
"""

from __future__ import annotations

import math

__all__ = [
    "CHECK_SHARE_FLOOR",
    "GRAD_STRIDE_FROM",
    "HOST_BATCH_FROM",
    "LONGEST_SPACING",
    "MAX_GRAD_STRIDE",
    "MAX_SPACING",
    "MAX_STRIDE",
    "MIN_SAMPLES",
    "PLANNED_SHARE",
    "STRIDE_FROM",
    "check_spacing",
    "grad_stride",
    "step_stride",
]

#: While the scale is being calibrated, a check that would have to be spaced more than this many times
#: ``every_n_train_steps`` apart to keep within the budget makes the sample smaller instead (once the scale is held
#: the sample stays: the detector's references depend on its size).
MAX_SPACING = 10
#: The widest spacing, in multiples of ``every_n_train_steps``.
LONGEST_SPACING = 100
#: The smallest sample the budget lowers ``max_samples`` to.
MIN_SAMPLES = 128
#: The most optimizer steps apart the per-step channels are read (`step_stride`).
MAX_STRIDE = 100
#: On the CPU the per-step values are scored in batches (`topo_callbacks.core.step_reads.HOST_READ_EVERY` steps) once
#: the per-step work costs more than this share of ``max_overhead``: every step is still scored, only later.
HOST_BATCH_FROM = 0.25
#: The gradient norm is computed at one read in 2 or 4 (`grad_stride`) once the per-step work costs more than this
#: share of ``max_overhead`` (what it leaves the checks is then under half the budget).
GRAD_STRIDE_FROM = 0.5
#: The most reads of the per-step channels per gradient norm: replayed on the benchmark's calibration seeds (shipped
#: calibration), reading it at 1 read in 2 changed nothing, at 1 in 4 the same 41 of 47 failure runs were detected
#: with 2 of 160 clean runs alarmed instead of 1, at 1 in 8 with 5.
MAX_GRAD_STRIDE = 4
#: The per-step channels are read at every step unless they alone cost more than this many times ``max_overhead``.
#: 4 until 2026-12-05 (detection kept first); 2 since: the per-step path got cheaper, a strided gradient-norm read no
#: longer counts a lagging reference's drift (`topo_callbacks.core.detector.LAG_SPAN`), and at 4 the digits MLP read
#: every step at 7% of its time or 1 step in 100, by the measured step time of the moment (now 1 in ~11). At 1 the
#: digits CNN read 1 step in 2 for the same own share (1.9%) as every step. Outside the benchmark, at 1 and at 2: the
#: same alarms as at 4 (4 healthy episodes in 155,856 steps, 19/23 failures before their drop).
STRIDE_FROM = 2.0
#: The checks get what the per-step work leaves of the budget, and at least this share of it (with the per-step work
#: over the budget the monitor then takes up to ``STRIDE_FROM + CHECK_SHARE_FLOOR`` times it). A quarter, not the half
#: of before 2026-12-04: checks the detector asks for are brought forward (`CusumDetector.wants_check`), and on the
#: benchmark's calibration seeds the checks 20x or 50x apart then detect what 10x apart does.
CHECK_SHARE_FLOOR = 0.25
#: The share of ``max_overhead`` the schedule is planned for: the rest pays a run's start (the trial check, the steps
#: read before the first decision) and what the monitor does not time (the hook's call at steps it copies nothing,
#: the adapters' calls), so that a short run stays under the budget too.
PLANNED_SHARE = 0.8


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


def grad_stride(other_s: float, grad_s: float, step_s: float, budget: float) -> int:
    """Reads of the per-step channels per computation of the gradient norm (1, 2 or `MAX_GRAD_STRIDE`): the fewest
    whose per-read cost, ``other_s + grad_s / g`` (``grad_s``: computing the gradient norm once; ``other_s``: the rest
    of a read), is at most `GRAD_STRIDE_FROM` times ``budget`` of a training step of ``step_s`` seconds, else the
    most. A gradient norm read at one read in ``g`` adds to its CUSUMs what ``g`` reads would
    (`topo_callbacks.core.detector.CusumDetector.update`).

    Example:
        >>> grad_stride(other_s=20e-6, grad_s=60e-6, step_s=0.01, budget=0.016)  # 0.8% of the step: every read
        1
        >>> grad_stride(other_s=20e-6, grad_s=60e-6, step_s=0.005, budget=0.016)  # 1.6%: 1 read in 4 (0.7%)
        4
    """
    limit = GRAD_STRIDE_FROM * budget * step_s
    g = 1
    while g < MAX_GRAD_STRIDE and other_s + grad_s / g > limit:
        g *= 2
    return g


def step_stride(
    check_s: float,
    per_step_s: float,
    step_s: float,
    budget: float,
    longest: float,
    unread_s: float = 0.0,
    fixed_s: float = 0.0,
) -> int:
    """Optimizer steps between two reads of the per-step channels (1: every step). 1 while one read and update
    (``per_step_s`` seconds) costs at most `STRIDE_FROM` times ``budget`` of a step; beyond, the fewest steps that keep
    the monitor within ``budget`` with its checks at most ``longest`` steps apart (the other arguments as
    `check_spacing`), at most `MAX_STRIDE`. The checks are spaced out first: the per-step channels carry the detector
    on the benchmark, the checks spaced 10x apart lost nothing there, reading one step in two lost more than half.
    ``unread_s``: what a step not read costs over a step's ``fixed_s`` (what every step costs whatever the stride:
    its loss is kept for the next read's mean, unit checks come every interval): ``k`` steps cost
    ``k fixed_s + per_step_s + (k - 1) unread_s``, so the stride is ``(per_step_s - unread_s) / (allowed - unread_s)``
    with ``allowed`` less ``fixed_s``, the most when an unread step alone is over what a step is allowed.

    Example:
        >>> step_stride(check_s=0.01, per_step_s=50e-6, step_s=0.01, budget=0.02, longest=5000)  # 0.5%: every step
        1
        >>> step_stride(check_s=0.01, per_step_s=50e-6, step_s=0.002, budget=0.02, longest=5000)  # 2.5%: still 1
        1
        >>> step_stride(check_s=0.01, per_step_s=50e-6, step_s=0.0005, budget=0.02, longest=5000)  # 10%: every 7th
        7
        >>> step_stride(0.01, 50e-6, 0.0005, 0.02, 5000, unread_s=4e-6)  # a step not read costs 4 us: every 11th
        11
        >>> step_stride(0.01, 50e-6, 0.0005, 0.02, 5000, unread_s=1e-6, fixed_s=8.5e-6)  # every step 1.7%: the most
        100
    """
    if per_step_s + fixed_s <= STRIDE_FROM * budget * step_s:
        return 1
    allowed = (budget * step_s - check_s * (1.0 - budget) / longest) / (1.0 - budget) - fixed_s
    unread_s = min(max(unread_s, 0.0), per_step_s)
    if allowed <= unread_s:
        return MAX_STRIDE
    return int(min(max(math.ceil((per_step_s - unread_s) / (allowed - unread_s)), 1), MAX_STRIDE))
