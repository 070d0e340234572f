"""The CUSUM detector: its statistics against plain reference implementations, the online detector against the
offline replay, the calibration's false-alarm rate on synthetic healthy series, state round trips, messages."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from topo_callbacks.bench.cusum import fit_calibration, fused_series, on_step_grid
from topo_callbacks.bench.protocol import clopper_pearson
from topo_callbacks.core.detector import (
    ABRUPT_STEPS,
    ALLOWANCE,
    CHANNELS,
    CLIP,
    DEAD_LAYER_STEPS,
    SPIKE_ALLOWANCE,
    CusumDetector,
    DetectorCalibration,
    default_calibration,
    global_grad_norm,
)
from topo_callbacks.functional.detector import (
    cusum,
    robust_zscore,
    rolling_robust_zscores,
    sorted_location_scale,
    standardized_cusum,
)


def reference_cusum(z: list[float], k: float) -> tuple[list[float], list[float]]:
    """Page's two-sided CUSUM, written out as in a textbook."""
    pos, neg, sp, sn = [], [], 0.0, 0.0
    for x in z:
        if math.isinf(x) or math.isnan(x):
            sp = sn = math.inf
        else:
            sp = max(0.0, sp + x - k)
            sn = max(0.0, sn + (-x) - k)
        pos.append(sp)
        neg.append(sn)
    return pos, neg


def reference_zscores(values: list[float], window: int, floor: float, clip: float, need: int) -> list[float]:
    """Each value against the median and 1.4826 MAD of the finite values before it, written out directly."""
    out, ref = [], []
    for v in values:
        if not math.isfinite(v):
            out.append(math.inf)
            continue
        if len(ref) >= need:
            med = float(np.median(ref))
            scale = max(1.4826 * float(np.median(np.abs(np.array(ref) - med))), floor)
            out.append(min(max((v - med) / scale, -clip), clip))
        else:
            out.append(0.0)
        ref = [*ref, v][-window:]
    return out


@pytest.mark.parametrize("seed", range(20))
def test_cusum_matches_the_textbook_recursion(seed: int) -> None:
    rng = np.random.default_rng(seed)
    z = rng.standard_t(3, size=200) + rng.choice([0.0, 1.5], size=200)
    if seed % 3 == 0:
        z[rng.integers(0, 200)] = math.inf
    k = float(rng.uniform(0.1, 2.0))
    pos, neg = cusum(z.tolist(), k)
    ref_pos, ref_neg = reference_cusum(z.tolist(), k)
    assert np.allclose(pos, ref_pos)
    assert np.allclose(neg, ref_neg)


@pytest.mark.parametrize("seed", range(20))
def test_rolling_zscores_match_a_direct_computation(seed: int) -> None:
    rng = np.random.default_rng(seed)
    values = rng.standard_t(3, size=300).tolist()
    for i in rng.integers(0, 300, size=int(rng.integers(0, 6))):
        values[i] = math.nan
    window = int(rng.integers(3, 80))
    need = int(rng.integers(1, window + 1))
    got = rolling_robust_zscores(values, window=window, floor=0.05, clip=6.0, min_reference=need)
    assert np.allclose(got, reference_zscores(values, window, 0.05, 6.0, need))
    # and the single-point function agrees with both
    assert robust_zscore(values[-1], [v for v in values[:-1] if math.isfinite(v)][-window:], floor=0.05, clip=6.0) == (
        pytest.approx(got[-1]) if math.isfinite(values[-1]) else math.inf
    )


def test_log_scale_and_floor() -> None:
    # a norm that doubles scores the same at any size; a flat reference does not make every move infinite
    small = standardized_cusum([1.0] * 20 + [2.0], window=20, k=0.0, floor=0.01, log=True, side="up")
    large = standardized_cusum([1000.0] * 20 + [2000.0], window=20, k=0.0, floor=0.01, log=True, side="up")
    assert small[-1] == pytest.approx(large[-1]) == pytest.approx(math.log(2) / 0.01)
    # a norm of 0 is -inf on the log scale: an immediate alarm, on either side
    assert standardized_cusum([1.0] * 20 + [0.0], window=20, k=1.0, floor=0.01, log=True, side="up")[-1] == math.inf


def test_a_slow_consistent_shift_is_caught_where_a_spike_rule_is_not() -> None:
    """What a CUSUM is for: a shift of one standard deviation, under any single-point threshold, accumulates."""
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0, 1, 400), rng.normal(1.0, 1, 200)])
    stat = standardized_cusum(values, window=200, k=0.5, floor=1e-3, clip=CLIP, side="up")
    z = rolling_robust_zscores(values, window=200, floor=1e-3)
    healthy_max = stat[:400].max()
    assert stat[400:].max() > 4 * healthy_max
    assert z[400:].max() < 5  # no single point looks alarming


def _feed(det: CusumDetector, name: str, values: list[float], start: int = 1) -> list[float]:
    out = []
    for step, v in enumerate(values, start=start):
        det.update(name, v, step)
        out.append(det.normalised(name))
    return out


@pytest.mark.parametrize("name", ["loss", "grad_norm", "b0_fraction", "effective_rank"])
def test_the_online_detector_computes_the_offline_statistic(name: str) -> None:
    spec = CHANNELS[name]
    rng = np.random.default_rng(1)
    n = 500 if spec.reads == "step" else 40
    values = np.exp(rng.normal(0, 0.2, n)) if spec.log else rng.normal(1.0, 0.05, n)
    values[int(0.8 * n) :] *= 1.5
    cal = DetectorCalibration(0.05, (name,), {name: 7.0}, math.inf)
    online = _feed(CusumDetector(cal), name, values.tolist())
    offline = standardized_cusum(
        values, window=spec.window, k=ALLOWANCE, floor=spec.floor, clip=CLIP, log=spec.log, side=spec.side,
        min_reference=spec.min_reference,
    ) / 7.0  # fmt: skip
    assert np.allclose(online, offline)
    # the replay's fused statistic (over the threshold) is the same numbers
    cal1 = DetectorCalibration(0.05, (name,), {name: 7.0}, 1.0)
    steps = np.arange(1, n + 1)
    _, fused = fused_series({name: on_step_grid(steps, offline * 7.0, n)}, cal1)
    assert np.allclose(fused, online)


def test_state_round_trip_continues_exactly() -> None:
    rng = np.random.default_rng(2)
    cal = default_calibration(0.05)
    losses = (2.0 + 0.1 * rng.standard_normal(600)).tolist()
    losses[450:] = [x + 1.0 for x in losses[450:]]
    whole = CusumDetector(cal)
    first = _feed(whole, "loss", losses)
    half = CusumDetector(cal)
    _feed(half, "loss", losses[:300])
    resumed = CusumDetector(cal)
    resumed.load_state_dict(half.state_dict())
    second = _feed(resumed, "loss", losses[300:], start=301)
    assert np.allclose(first[300:], second)
    assert whole.fired is not None
    assert resumed.fired is not None
    assert whole.fired == resumed.fired
    assert 450 < whole.fired.step < 480


def test_the_loss_spike_channel_is_a_second_cusum_of_the_loss_scores() -> None:
    """`loss_spike` is never fed itself: it accumulates the loss channel's scores (same reference, the scale at least 1%
    of the largest of the first 200 losses) with its own allowance and clip, for rises that triple the loss, written
    out here."""
    spike = CHANNELS["loss_spike"]
    rng = np.random.default_rng(4)
    losses = (1.0 + 0.02 * rng.standard_normal(300)).tolist()
    losses[250:253] = [1.6, 4.0, 3.5]  # 20-100 robust standard deviations; the first under 3x the median
    cal = DetectorCalibration(0.05, ("loss", "loss_spike"), {"loss": 1.0, "loss_spike": 1.0}, math.inf)
    det = CusumDetector(cal)
    expected, s = [], 0.0
    for step, v in enumerate(losses, 1):
        ref = losses[max(0, step - 1 - 200) : step - 1]
        if len(ref) >= CHANNELS["loss"].min_reference:
            med = float(np.median(ref))
            scale = max(1.4826 * float(np.median(np.abs(np.array(ref) - med))), CHANNELS["loss"].floor)
            scale = max(scale, spike.scale_share * max(losses[: min(step - 1, 200)]))  # of the first 200 losses
            z = min(max((v - med) / scale, -spike.clip), spike.clip)
            if z > 0 and v - med < spike.rtol * abs(med):
                z = 0.0  # not the relative rise of a spike
            s = max(0.0, s + z - spike.allowance)
        assert det.update("loss_spike", v, step) is None  # fed through the loss only
        det.update("loss", v, step)
        expected.append(s)
        assert math.isclose(det.states["loss_spike"].s_pos, s, rel_tol=1e-9, abs_tol=1e-9)
    assert max(expected[250:253]) > 100  # where the loss channel (at most 8 a step) reaches at most 21
    assert det.states["loss"].s_pos < 25


def test_a_loss_far_out_for_two_steps_alarms_on_the_spike_channel_only() -> None:
    """With the normalisers' proportions of the fit before 2026-12-04 (spike about twice the loss's, over what one step
    adds), a loss 200 robust SD up (4x) for two steps alarms on `loss_spike` at the second step; the loss channel would
    need 12 such steps."""
    cal = DetectorCalibration(0.05, ("loss", "loss_spike"), {"loss": 85.0, "loss_spike": 150.0}, 1.0)
    det = CusumDetector(cal)
    losses = [1.0 + 0.01 * (i % 5) for i in range(100)] + [4.0, 4.0, 4.0]
    fired = [f for f in (det.update("loss", v, s) for s, v in enumerate(losses, 1)) if f is not None]
    assert len(fired) == 1
    assert (fired[0].channel, fired[0].step, fired[0].onset) == ("loss_spike", 102, 101)
    assert "`loss_spike`" in fired[0].message()
    restored = CusumDetector(cal)
    restored.load_state_dict(det.state_dict())
    assert restored.states["loss_spike"].s_pos == det.states["loss_spike"].s_pos


@pytest.mark.parametrize(("factor", "spike"), [(2.5, False), (3.2, True)])
def test_a_loss_spike_must_at_least_triple_the_loss(factor: float, spike: bool) -> None:
    """A low-noise loss that steps up 2.5x (an objective changed: a contrastive temperature) is 34 robust SD up at every
    step but is no spike (Lightning's `SpikeDetection` default ``rtol=2`` as well); 3.2x (49 SD) is. Either way the loss
    channel sees the rise, at most 8 a step."""
    cal = DetectorCalibration(0.05, ("loss", "loss_spike"), {"loss": 85.0, "loss_spike": 150.0}, 1.0)
    det = CusumDetector(cal)
    losses = [1.0 + 0.03 * (i % 5 - 2) for i in range(100)] + [factor] * 5
    fired = [f for f in (det.update("loss", v, s) for s, v in enumerate(losses, 1)) if f is not None]
    assert det.states["loss"].s_pos > 30.0
    if spike:
        assert [(f.channel, f.step) for f in fired] == [("loss_spike", 104)]
    else:
        assert fired == []
        assert det.states["loss_spike"].s_pos == 0.0


def test_a_spike_at_a_converged_loss_is_measured_against_the_runs_own_losses() -> None:
    """At a converged loss (0.003, batches spread 0.0015) one batch of 0.12 (40x, 80 robust SD) is no spike: its scale
    is at least 1% of the largest loss the run has shown (2.3, its first); the same loss back at 2.0 is."""
    cal = DetectorCalibration(0.05, ("loss", "loss_spike"), {"loss": 85.0, "loss_spike": 30.0}, 1.0)
    rng = np.random.default_rng(0)
    start = np.linspace(2.3, 0.003, 300).tolist()
    converged = (0.003 + 0.0015 * np.abs(rng.standard_normal(300))).tolist()
    for jump, spike in ((0.12, False), (2.0, True)):
        det = CusumDetector(cal)
        fired = [det.update("loss", v, s) for s, v in enumerate([*start, *converged, jump], 1)]
        assert [f.channel for f in fired if f is not None] == (["loss_spike"] if spike else [])
        assert (det.states["loss_spike"].score > 60.0) is spike  # 2.0 is 87 floored SD up; 0.12 is 5
    assert det.states["loss"].score == CHANNELS["loss"].clip  # the loss channel's own score is not floored


@pytest.mark.parametrize("read_steps", [4, 16])
def test_a_strided_spike_read_adds_what_its_steps_would(read_steps: int) -> None:
    """Read as the mean of k steps, `loss_spike`'s floor stands for the k steps: a lasting rise at a converged loss adds
    what k single-step reads add (the floor is a step's, over sqrt(k) for a mean); its tripling rule asks the mean to
    triple (one outlier batch and a lasting rise look alike in a mean): one of the k steps at 4x does not count."""
    cal = DetectorCalibration(0.05, ("loss", "loss_spike"), {"loss": 1e4, "loss_spike": 1e4}, 1.0)
    start = np.linspace(2.3, 0.003, 200).tolist()
    converged = [0.003 + 1e-7 * (i % 3) for i in range(250)]  # the whole window

    def added(k: int, value: float, reads: int) -> float:
        det = CusumDetector(cal)
        for s, v in enumerate([*start, *converged], 1):
            det.update("loss", v, s, steps=k if s > 200 else 1)
        before = det.states["loss_spike"].s_pos
        for r in range(reads):
            det.update("loss", value, 451 + r, steps=k)
        return det.states["loss_spike"].s_pos - before

    one_step = added(1, 0.5, read_steps)  # the rise read at every step: 21.6 floored SD, 18.6 a step
    assert one_step == pytest.approx(read_steps * ((0.5 - 0.003) / 0.023 - 3.0), rel=1e-3)
    assert added(read_steps, 0.5, 1) == pytest.approx(one_step, rel=1e-3)
    # away from convergence (the floor under the spread): one of the k steps at 4x, the others at the median, far up
    # by its z, does not count; the k steps all at 3.2x do
    det = CusumDetector(cal)
    for s, v in enumerate([*start, *(1.0 + 0.01 * (i % 5 - 2) for i in range(250))], 1):
        det.update("loss", v, s, steps=read_steps if s > 200 else 1)
    for step, (mean, counts) in enumerate(((1.0 + 3.0 / read_steps, False), (3.2, True)), 451):
        before = det.states["loss_spike"].s_pos
        det.update("loss", mean, step, steps=read_steps)
        assert det.states["loss"].score == CLIP  # the loss channel sees it either way
        assert (det.states["loss_spike"].s_pos > before) is counts, mean


def test_a_negative_loss_is_not_gated_by_the_tripling_rule() -> None:
    """A loss with no zero to be relative to (a negative cosine at -0.9) rising to -0.2 is still a spike by its z."""
    cal = DetectorCalibration(0.05, ("loss", "loss_spike"), {"loss": 1e4, "loss_spike": 1e4}, 1.0)
    det = CusumDetector(cal)
    for s, v in enumerate([-0.9 + 0.01 * (i % 5 - 2) for i in range(100)], 1):
        det.update("loss", v, s)
    det.update("loss", -0.2, 101)
    # median -0.9, robust scale 1.4826 x 0.01: 47 SD, no floor (the run's first losses are negative)
    assert det.states["loss_spike"].s_pos == pytest.approx(0.7 / 0.014826 - SPIKE_ALLOWANCE, rel=1e-3)


def test_at_the_shipped_calibration_one_batch_far_up_alarms_on_loss_spike() -> None:
    """The shipped fit's spike normaliser (32) is under what one step adds at most (97): a single batch at 4x its
    median, 40 robust SD up, alarms on its own, as Lightning's `SpikeDetection` flags one; at 2.5x it does not."""
    cal = default_calibration(0.05)
    assert cal.threshold * cal.normalisers["loss_spike"] < CHANNELS["loss_spike"].clip - SPIKE_ALLOWANCE
    for factor, alarms in ((4.0, True), (2.5, False)):
        det = CusumDetector(cal)
        losses = [1.0 + 0.05 * (i % 5 - 2) for i in range(100)] + [factor]
        fired = [f for f in (det.update("loss", v, s) for s, v in enumerate(losses, 1)) if f is not None]
        assert [(f.channel, f.step) for f in fired] == ([("loss_spike", 101)] if alarms else [])


def test_an_extreme_loss_must_pass_every_loss_the_run_has_shown() -> None:
    """A classifier that has converged (loss ~0.001 after starting at ln 10): a hard batch at 0.2 is 100x the
    window's largest but under the run's first losses, and is not an extreme value; a loss of 500 is."""
    cal = DetectorCalibration(0.05, ("loss",), {"loss": 1e9}, 1.0)  # the CUSUM never fires: the rule alone
    det = CusumDetector(cal)
    losses = [2.3 * 0.97**i for i in range(100)] + [0.001 + 0.0001 * (i % 3) for i in range(300)]
    assert all(det.update("loss", v, s) is None for s, v in enumerate(losses, 1))
    assert det.update("loss", 0.2, 401) is None
    fired = det.update("loss", 500.0, 402)
    assert fired is not None
    assert fired.kind == "extreme"
    restored = CusumDetector(cal)
    restored.load_state_dict(det.state_dict())
    assert restored.states["loss"].peak == det.states["loss"].peak == 500.0


def test_the_firing_says_which_channel_with_its_value_baseline_and_score() -> None:
    cal = DetectorCalibration(0.05, ("loss",), {"loss": 5.0}, 1.0)
    det = CusumDetector(cal)
    losses = [1.0 + 0.01 * (i % 3) for i in range(200)] + [3.0] * 5
    fired = [f for f in (det.update("loss", v, s) for s, v in enumerate(losses, 1)) if f is not None]
    assert len(fired) == 1
    message = fired[0].message("collapse")
    assert "`loss`" in message
    assert "value 3" in message
    assert "baseline 1.01" in message
    assert "+8.00" in message
    assert fired[0].step == 201


def test_calibration_gives_the_promised_false_alarm_rate_on_healthy_series() -> None:
    """Fit on 300 synthetic healthy runs, score 300 others: the rate is within binomial error of the target."""
    rng = np.random.default_rng(3)
    alpha = 0.1

    def healthy(n: int) -> list[dict[str, np.ndarray]]:
        runs = []
        for _ in range(n):
            steps = 260
            trend = np.linspace(2.0, 1.0, steps)
            loss = trend + rng.standard_t(4, steps) * 0.05 * rng.uniform(0.5, 2)
            grad = np.exp(rng.normal(0, 0.1, steps) + np.linspace(0, rng.uniform(-0.3, 0.3), steps))
            grids = {}
            for name, values in (("loss", loss), ("grad_norm", grad)):
                spec = CHANNELS[name]
                stat = standardized_cusum(values, window=spec.window, k=ALLOWANCE, floor=spec.floor, clip=CLIP,
                                          log=spec.log, side=spec.side, min_reference=50)  # fmt: skip
                grids[name] = stat
            runs.append(grids)
        return runs

    cal_runs, test_runs = healthy(300), healthy(300)
    fitted = fit_calibration(cal_runs, [None] * 300, [None] * 300, alpha, candidates=["loss", "grad_norm"])
    fitted = DetectorCalibration(alpha, ("loss", "grad_norm"), {c: fitted.normalisers.get(c, 1.0) for c in
                                 ("loss", "grad_norm")}, 1.0)  # fmt: skip
    # the joint threshold over both channels, fit on the calibration runs only
    fused_max = [fused_series(g, fitted)[1].max() for g in cal_runs]
    threshold = float(np.sort(fused_max)[::-1][math.floor(alpha * 300)])
    fitted = DetectorCalibration(alpha, fitted.channels, fitted.normalisers, float(np.nextafter(threshold, np.inf)))
    alarms = sum(bool(fused_series(g, fitted)[1].max() >= 1.0) for g in test_runs)
    lo, hi = clopper_pearson(alarms, 300, level=0.99)
    assert lo <= alpha <= hi, (alarms, lo, hi)


def test_the_fit_adds_a_channel_for_a_detection_never_for_lead_alone() -> None:
    """A channel that only alarms earlier on failures the base channels already catch is left out (every channel is
    one more way for an unseen healthy run to alarm); one that catches a failure they miss is taken."""
    steps, t0, t_c = 100, 50, 90
    rng = np.random.default_rng(0)

    def run(loss_at: int | None, early_at: int | None, new_at: int | None) -> dict[str, np.ndarray]:
        grids = {c: rng.uniform(0.0, 1.0, steps) for c in ("loss", "grad_norm", "b0_fraction", "effective_rank")}
        for channel, at in (("loss", loss_at), ("b0_fraction", early_at), ("effective_rank", new_at)):
            if at is not None:
                grids[channel][at - 1 :] = 50.0
        return grids

    healthy = [run(None, None, None) for _ in range(40)]
    caught = [run(80, 55, None) for _ in range(3)]  # the loss catches these; b0_fraction would only be earlier
    missed = [run(None, None, 60)]  # only effective_rank catches this one
    runs = healthy + caught + missed
    fitted = fit_calibration(
        runs,
        [None] * len(healthy) + [t0 - 1] * (len(caught) + len(missed)),
        [None] * len(healthy) + [(t0, t_c)] * (len(caught) + len(missed)),
        0.05,
        candidates=["loss", "grad_norm", "b0_fraction", "effective_rank"],
    )
    assert "effective_rank" in fitted.channels
    assert "b0_fraction" not in fitted.channels


def test_shipped_calibrations_are_valid_and_ordered() -> None:
    from topo_callbacks.core._calibration import CALIBRATIONS

    rates = [c["false_alarm_rate"] for c in CALIBRATIONS]
    assert rates == sorted(rates)
    assert 0.05 in rates
    for data in CALIBRATIONS:
        cal = DetectorCalibration.from_dict(data)
        assert cal.channels
        assert all(CHANNELS[c].live and CHANNELS[c].source == "any" for c in cal.channels)  # usable by default
        assert all(v > 0 for v in cal.normalisers.values())
        assert cal.threshold > 0


def test_unknown_rate_is_refused_with_the_accepted_ones() -> None:
    with pytest.raises(ValueError, match=r"`false_alarm_rate` must be one of the calibrated rates \[0.01"):
        default_calibration(0.03)


def test_global_grad_norm_is_clip_grad_norms_value() -> None:
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 2))
    model(torch.randn(9, 5)).pow(2).sum().backward()
    expected = float(torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf))
    assert global_grad_norm(model.parameters()) == pytest.approx(expected, rel=1e-6)
    assert global_grad_norm(torch.nn.Linear(2, 2).parameters()) is None


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(st.floats(-1e6, 1e6, allow_nan=False), st.sampled_from([0.0, 1.0, -1.0, 2.5])),
        min_size=1,
        max_size=60,
    ),
    st.floats(0.0, 10.0),
)
def test_sorted_location_scale_is_numpys_median_and_mad(values: list[float], floor: float) -> None:
    """The detector's median and MAD from a sorted window (a binary search over two runs of deviations, run at every
    optimizer step) equal numpy's on the same values, ties and repeated values included."""
    med, scale = sorted_location_scale(sorted(values), floor)
    x = np.asarray(values)
    expected_med = float(np.median(x))
    expected_mad = float(np.median(np.abs(x - expected_med)))
    assert med == pytest.approx(expected_med, rel=1e-12, abs=1e-9)
    assert scale == pytest.approx(max(1.4826 * expected_mad, floor), rel=1e-12, abs=1e-9)


@pytest.mark.parametrize("read_steps", [4, 16, 100])
def test_a_loss_read_that_stands_for_k_steps_adds_what_k_reads_would(read_steps: int) -> None:
    """`CusumDetector.update`'s ``steps``: the mean loss of k optimizer steps (the overhead budget reading every k-th
    step) adds ``k (min(z / sqrt(k), clip) - allowance)`` to each loss CUSUM, per read at most half the threshold (or a
    one-step read's most, where more: an outlier batch and a lasting rise look alike in a mean); the gradient norm read
    with it counts once. With the score clipped before it was weighted, a read of 64 steps or more added nothing."""
    import math

    from topo_callbacks.core.detector import CAP, CHANNELS

    # a spike normaliser over what one read may add (`clip - allowance`): so one read alone cannot cross it
    cal = DetectorCalibration(0.05, ("loss", "grad_norm", "loss_spike"),
                              {"loss": 85.0, "grad_norm": 99.0, "loss_spike": 160.0}, 1.0)  # fmt: skip
    det = CusumDetector(cal)
    det.set_step_window(read_steps)
    for step in range(1, 41):  # a reference of means, spread enough that 5 SD tripling it is a spike (`SPIKE_RTOL`)
        det.observe_step(step * read_steps, {"loss": 1.0 + 0.2 * (step % 5 - 2), "grad_norm": 1.0 + 0.01 * (step % 3)},
                         read_steps=read_steps)  # fmt: skip
    med, scale = det.states["loss"].reference.location_scale(CHANNELS["loss"].floor)
    g_med, g_scale = det.states["grad_norm"].reference.location_scale(CHANNELS["grad_norm"].floor)
    for mean_score, step in ((5.0, 41), (50.0, 42)):  # per-step z of the k steps: a moderate rise, then a large one
        before = {n: det.states[n].s_pos for n in ("loss", "loss_spike", "grad_norm")}
        raw = mean_score * math.sqrt(read_steps)
        g_raw = 2.0
        values = {"loss": med + raw * scale, "grad_norm": math.exp(g_med + g_raw * g_scale)}
        fired = det.observe_step(step * read_steps, values, read_steps=read_steps)
        for name in ("loss", "loss_spike"):
            spec = CHANNELS[name]
            most = max(0.5 * cal.threshold * cal.normalisers[name], spec.clip - spec.allowance)
            added = min(read_steps * (min(mean_score, spec.clip) - spec.allowance), most)
            added = min(before[name] + added, CAP * cal.threshold * cal.normalisers[name]) - before[name]  # held at CAP
            assert det.states[name].s_pos - before[name] == pytest.approx(added, rel=1e-6), (name, mean_score)
            assert added > 0
        assert det.states["grad_norm"].s_pos - before["grad_norm"] == pytest.approx(g_raw - 1.0, rel=1e-6)
        if step == 41:
            assert fired is None  # one read, however large, adds at most half the threshold
    det.observe_step(43 * read_steps, values, read_steps=read_steps)
    assert det.in_alarm  # reads in a row that agree cross it


@pytest.mark.parametrize("grad_every", [2, 4])
def test_a_gradient_norm_read_at_one_read_in_g_adds_what_g_reads_would(grad_every: int) -> None:
    """A gradient norm read at one read in g (`CollapseMonitorCore.grad_every`) counts for the g reads it stands for
    (``grad_steps``): a lasting rise reaches the threshold at most g steps after it does read every step (counted as
    one read, 4x later at g = 4); one read adds at most half the threshold."""
    cal = DetectorCalibration(0.05, ("loss", "grad_norm"), {"loss": 100.0, "grad_norm": 30.0}, 1.0)

    def first_alarm(every: int, factor: float) -> tuple[int | None, float]:
        det = CusumDetector(cal)
        rng = np.random.default_rng(0)
        most = 0.0
        for step in range(1, 401):
            values = {"loss": 1.0}  # flat: a gradient norm rising while the loss falls would not be scored
            norm = math.exp(0.05 * rng.standard_normal()) * (factor if step > 250 else 1.0)
            if step <= 200 or step % every == 0:
                values["grad_norm"] = norm
            before = det.states["grad_norm"].s_pos
            fired = det.observe_step(step, values, grad_steps=every if step > 200 else 1)
            most = max(most, det.states["grad_norm"].s_pos - before)
            if fired is not None:
                return fired.step, most
        return None, most

    every_step, _ = first_alarm(1, 1.5)
    strided, most = first_alarm(grad_every, 1.5)
    assert every_step is not None
    assert strided is not None
    assert every_step <= strided <= every_step + grad_every
    assert most <= max(0.5 * 30.0, CHANNELS["grad_norm"].clip - ALLOWANCE) + 1e-9
    assert first_alarm(grad_every, 1.0)[0] is None  # no change: no alarm


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(1e-3, 1e3), min_size=0, max_size=40),
    st.lists(st.floats(1e-3, 1e3), min_size=0, max_size=40),
    st.sampled_from([0.0, math.nan, math.inf, -math.inf, -1.0, 1e-9, 0.5, 1.0, 2.0, 3.9, 4.0, 4.1, 1e6]),
    st.floats(0.1, 10.0),
)
def test_urgent_above_flags_at_least_what_urgent_flags(
    losses: list[float], norms: list[float], probe: float, scale: float
) -> None:
    """`CusumDetector.urgent_above` is the per-step form of `CusumDetector.urgent`: every value `urgent` would score
    at once is outside its bound (a value at the bound itself may be scored early: that changes when, never what)."""
    det = CusumDetector(default_calibration(0.05))
    for step, (loss, norm) in enumerate(itertools.zip_longest(losses, norms), 1):
        values = {k: v for k, v in (("loss", loss), ("grad_norm", norm)) if v is not None}
        det.observe_step(step, values)
    above_loss, above_grad = det.urgent_above()
    for value in (probe, probe * scale):
        if det.urgent({"loss": value}):
            assert not (-math.inf < value < above_loss) or value == 0.0
        if det.urgent({"grad_norm": value}):
            assert not (-math.inf < value < above_grad) or value == 0.0
        if not (-math.inf < value < above_loss) and math.isfinite(value) and value != 0.0:
            assert value >= above_loss  # only a value over the bound, never one under it, is flagged by the bound


def test_onsets_of_streak_rules_are_steps_when_reads_skip_steps() -> None:
    """Read at one step in 4 (the gradient norm under the overhead budget), the dead-layer and fast rules count reads
    in a row, and their onset (where a rollback goes back to) is the step after the last read before the streak, not
    the alarm step minus the count: a layer dead from step 301, read at 304, 308, ..., has its onset at 301."""
    det = CusumDetector(default_calibration(0.05))
    fired = None
    for step in range(4, 600, 4):
        lost = step > 300
        fired = det.observe_step(step, {"loss": 1.0, "grad_norm": 1.0}, layer_lost=lost, grad_steps=4) or fired
        if fired is not None:
            break
    assert fired is not None
    assert fired.kind == "dead_layer"
    assert fired.step == 300 + 4 * DEAD_LAYER_STEPS
    assert fired.onset == 301
    # the fast rule: the gradient norm 30x (far past `ABRUPT_UP`, under the extreme rule's 1000x) from the read at 404
    det = CusumDetector(DetectorCalibration(0.05, ("loss",), {"loss": 100.0}, 1.0))  # no CUSUM on the norm
    rng = np.random.default_rng(0)
    for step in range(4, 600, 4):
        norm = math.exp(0.05 * rng.standard_normal()) * (30.0 if step > 400 else 1.0)
        fired = det.observe_step(step, {"loss": 1.0, "grad_norm": norm}, grad_steps=4)
        abrupt = [e for e in det.episodes if e["kind"] == "abrupt"]
        if abrupt:
            assert abrupt[0]["start"] == 400 + 4 * ABRUPT_STEPS
            assert abrupt[0]["onset"] == 401
            break
    else:
        raise AssertionError("no abrupt episode")


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["hold", "decay", "jump", "restart", "warmup"]), st.integers(1, 60)),
        min_size=1,
        max_size=12,
    ),
    st.floats(1e-5, 1.0),
)
def test_lr_event_due_says_what_observe_lr_then_does(pieces: list[tuple[str, int]], peak: float) -> None:
    """Over schedules made of held rates, decays towards 0, rises, warm restarts and warm-ups: `lr_event_due` before
    each `observe_lr` says exactly whether it restarts the references, once they were learned under
    `LR_EVENT_FLOOR` of the highest rate read only a jump back up (a warm restart) restarts them (a decay's tail), and
    a fall restarts them no sooner than `LR_EVENT_GAP` steps after the last restart (a short decay's tail)."""
    from topo_callbacks.core.detector import LR_EVENT, LR_EVENT_FLOOR, LR_EVENT_GAP

    det = CusumDetector(default_calibration(0.05))
    lr, step, top, previous = peak, 0, 0.0, math.nan
    last: int | None = None
    for kind, length in pieces:
        start = lr
        for i in range(1, length + 1):
            if kind == "decay":
                lr = start * (1 - i / (length + 1)) ** 3
            elif kind == "jump":
                lr = start * 7.0
            elif kind == "restart":
                lr = max(top, peak)
            elif kind == "warmup":
                lr = start * (1 + i / length)
            step += 1
            due = det.lr_event_due(lr, step)
            learned_at = det.lr_state()[0]
            restarted = det.observe_lr(step, lr)
            assert restarted == due
            if restarted and learned_at is not None and learned_at < LR_EVENT_FLOOR * top:
                assert lr > previous * LR_EVENT  # down there only a jump back up (a warm restart) restarts them
            if restarted and not lr > previous * LR_EVENT and last is not None:
                assert step - last >= LR_EVENT_GAP  # a fall waits for the references to refill and score
            last = step if restarted else last
            top, previous = max(top, lr), lr
