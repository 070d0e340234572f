"""Bad inputs to the functional API, the engine and the `CollapseIndex` metric raise a clear ValueError."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.procs import clean_env, free_port
from topo_callbacks.engine import MMHMEngine
from topo_callbacks.functional import (
    anisotropy,
    betti_numbers,
    collapse_index,
    effective_rank,
    l2_normalized_std,
    merging_statistics,
    persistence_diagrams,
)
from topo_callbacks.functional.collapse import topology_rows
from topo_callbacks.functional.neurons import bilipschitz_constants
from topo_callbacks.functional.spectral import anisotropy_ratio
from topo_callbacks.functional.topology import pairwise_distances
from topo_callbacks.metrics import CollapseIndex


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def distance_range(x: torch.Tensor) -> tuple[float, float]:
    """Smallest and largest nonzero pairwise distance of the L2-normalised rows, as `collapse_index` sees them."""
    dist = pairwise_distances(topology_rows(x))
    off = dist[torch.triu(torch.ones_like(dist, dtype=torch.bool), diagonal=1)]
    off = off[off > 0]
    return float(off.min()), float(off.max())


# ---------------------------------------------------------------- tensors that require grad


@pytest.mark.parametrize("maxdim", [0, 1])
def test_persistence_diagrams_of_a_tensor_that_requires_grad_equal_the_detached_call(maxdim):
    x = torch.randn(30, 3, generator=gen(0), requires_grad=True)
    got = persistence_diagrams(x, maxdim=maxdim)
    want = persistence_diagrams(x.detach(), maxdim=maxdim)
    assert len(got) == len(want) == maxdim + 1
    for a, b in zip(got, want, strict=True):
        assert not a.requires_grad  # the functional API is not differentiable (documented)
        assert torch.equal(a, b)


def test_other_functions_accept_a_tensor_that_requires_grad():
    x = torch.randn(40, 4, generator=gen(1), requires_grad=True)
    assert betti_numbers(x, 1.0) == betti_numbers(x.detach(), 1.0)
    assert collapse_index(x).ci == collapse_index(x.detach()).ci
    assert effective_rank(x) == effective_rank(x.detach())


# ---------------------------------------------------------------- the CollapseIndex metric


@pytest.mark.parametrize("bad", [[[1.0, 2.0], [3.0, 4.0]], np.zeros((4, 3)), None, 3.0])
def test_metric_update_with_a_non_tensor_names_the_argument(bad):
    metric = CollapseIndex()
    with pytest.raises(ValueError, match=r"`embeddings` must be a torch\.Tensor of shape \(N, d\)"):
        metric.update(bad)


def test_metric_compute_before_update_says_update_was_never_called():
    metric = CollapseIndex()
    with pytest.warns(UserWarning, match="before the ``update``"), pytest.raises(ValueError, match="never called"):
        metric.compute()


def test_metric_compute_on_fewer_than_two_rows_counts_them():
    metric = CollapseIndex()
    metric.update(torch.tensor([[1.0, 2.0], [float("nan"), 0.0]]))
    with pytest.raises(ValueError, match=r"at least 2 finite embeddings.*got 1 \(2 seen, 1 non-finite dropped\)"):
        metric.compute()


def test_metric_update_rejects_one_feature_and_a_changed_width():
    metric = CollapseIndex()
    with pytest.raises(ValueError, match=r"`embeddings` must be .*at least 2 features.*got shape \(10, 1\)"):
        metric.update(torch.randn(10, 1))
    metric.update(torch.randn(10, 4))
    with pytest.raises(ValueError, match=r"`embeddings` has d = 5 features.*d = 4"):
        metric.update(torch.randn(10, 5))
    assert len(metric.embeddings) == 1  # the bad batches were not stored


def test_metric_fixed_eps_is_held_across_a_collapse():
    healthy = torch.randn(128, 16, generator=gen(2))
    eps = collapse_index(healthy).eps
    collapsed = healthy[:1] + 1e-4 * torch.randn(128, 16, generator=gen(3))
    metric = CollapseIndex(eps=eps)
    metric.update(collapsed)
    value = float(metric.compute())  # every distance is below eps: that is the collapse, not a bad eps
    assert value == pytest.approx(collapse_index(collapsed, eps=eps, strict_eps=False).ci)
    with pytest.raises(ValueError, match=r"`eps`.*at most 2 apart"):
        CollapseIndex(eps=2.5)  # L2-normalised rows: no batch can make this scale informative
    assert CollapseIndex(eps=2.5, normalize="none").eps == 2.5


DDP_WORKER = textwrap.dedent(
    """
    import json, warnings
    import torch
    import torch.distributed as dist
    from topo_callbacks.metrics import CollapseIndex

    warnings.simplefilter("ignore")
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out = {}
    metric = CollapseIndex()
    try:
        metric.compute()  # no rank has called update: every rank must raise, none may hang
    except ValueError as err:
        out["before_update"] = str(err)
    # the metric still works: its state was restored to this rank's own (an empty list), not left synced
    metric.update(torch.randn(30 + 20 * rank, 6, generator=torch.Generator().manual_seed(rank)))
    out["ci"] = float(metric.compute())
    out["n"] = metric.report.n
    print("RESULT" + json.dumps(out), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    """
)


def test_metric_compute_before_update_raises_alike_on_every_ddp_rank_and_the_metric_keeps_working(tmp_path: Path):
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    port = free_port()
    procs = []
    for rank in range(2):
        env = clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
        cmd = [sys.executable, str(script)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("a rank hung")
        assert proc.returncode == 0, stderr[-3000:]
        (line,) = [ln for ln in stdout.splitlines() if ln.startswith("RESULT")]
        results.append(json.loads(line[len("RESULT") :]))
    r0, r1 = results
    assert "never called" in r0["before_update"]
    assert r0["before_update"] == r1["before_update"]
    both = torch.cat([torch.randn(30 + 20 * r, 6, generator=gen(r)) for r in range(2)])
    assert r0["n"] == r1["n"] == 80
    assert r0["ci"] == r1["ci"] == pytest.approx(collapse_index(both).ci, abs=1e-6)


# ---------------------------------------------------------------- eps outside the distances


@pytest.mark.parametrize("side", ["above", "below"])
def test_collapse_index_rejects_an_eps_outside_the_batch_distances(side):
    x = torch.randn(64, 8, generator=gen(4))
    low, high = distance_range(x)
    eps = 1.5 * high if side == "above" else 0.5 * low
    with pytest.raises(ValueError, match=r"`eps`=.* outside .*\[.*\].*strict_eps=False") as info:
        collapse_index(x, eps=eps)
    assert f"{low:.4g}" in str(info.value)
    assert f"{high:.4g}" in str(info.value)
    # the same call on a scale held fixed across batches is the old result: the Betti term saturates
    held = collapse_index(x, eps=eps, strict_eps=False)
    assert held.betti_term == 1.0
    assert held.b0 == (1.0 if side == "above" else 64.0)
    assert collapse_index(x, eps=0.5 * (low + high)).eps == 0.5 * (low + high)  # inside: fine


def test_collapse_index_with_betti_given_is_a_held_scale_and_is_not_range_checked():
    """The monitors keep an `MMHMEngine` at their calibrated eps and pass its Betti numbers: on a collapsed batch
    that eps exceeds every distance, and the report must come out as it always did."""
    healthy = torch.randn(128, 16, generator=gen(5))
    eps = collapse_index(healthy).eps
    collapsed = healthy[:1] + 1e-4 * torch.randn(128, 16, generator=gen(6))
    assert distance_range(collapsed)[1] < eps
    plain = collapse_index(collapsed, eps=eps, strict_eps=False)
    given = collapse_index(collapsed, eps=eps, betti=(int(plain.b0), int(plain.b1)))
    assert (given.ci, given.b0, given.b1) == (plain.ci, 1.0, 0.0)
    assert collapse_index(healthy[:1].repeat(10, 1), eps=eps).ci == 1.0  # all rows equal: no distances to check


# ---------------------------------------------------------------- numbers given as strings


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda x: collapse_index(x, eps="0.5"), r"`eps` must be a finite number > 0; got '0\.5' \(str\)"),
        (lambda x: collapse_index(x, eps=True), r"`eps` must be a finite number > 0; got True \(bool\)"),
        (lambda x: collapse_index(x, eps_quantile="0.5"), r"`eps_quantile` must be .*got '0\.5' \(str\)"),
        (lambda x: collapse_index(x, weights={"betti": "1"}), r"`weights\['betti'\]` must be .*got '1' \(str\)"),
        (lambda x: betti_numbers(x, "1.0"), r"`eps` must be a finite number"),
        (lambda x: persistence_diagrams(x, thresh="1.0"), r"`thresh` must be"),
        (lambda x: persistence_diagrams(x, thresh=True), r"`thresh` must be"),
        (lambda x: persistence_diagrams(x, maxdim=True), r"`maxdim` must be 0 or 1"),
        (lambda x: effective_rank(x, eps="1e-7"), r"`eps` must be"),
        (lambda x: merging_statistics(x, rel_eps="0.05"), r"`rel_eps` must be a finite number > 0"),
        (lambda x: bilipschitz_constants(x, x, contraction="0.5"), r"`contraction` must be"),
        (lambda x: MMHMEngine("0.5"), r"`eps` must be a finite number > 0"),
        (lambda x: CollapseIndex(eps="0.5"), r"`eps` must be a finite number > 0"),
    ],
)
def test_numbers_given_as_strings_are_rejected(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.randn(20, 3, generator=gen(7)))


def test_numbers_of_other_real_types_are_accepted():
    x = torch.randn(20, 3, generator=gen(8))
    want = collapse_index(x, eps=0.5).ci
    assert collapse_index(x, eps=np.float32(0.5)).ci == want
    assert collapse_index(x, eps=torch.tensor(0.5)).ci == want
    assert collapse_index(x, eps=1).eps == 1.0


# ---------------------------------------------------------------- d < 2


@pytest.mark.parametrize(
    "fn",
    [collapse_index, anisotropy, anisotropy_ratio, effective_rank, l2_normalized_std],
    ids=lambda f: f.__name__,
)
def test_embedding_channels_need_two_features(fn):
    with pytest.raises(ValueError, match=r"`x` must have at least 2 features .*got shape \(20, 1\)"):
        fn(torch.randn(20, 1, generator=gen(9)))


def test_topology_is_defined_for_points_on_a_line():
    x = torch.tensor([[0.0], [1.0], [3.0]])
    assert betti_numbers(x, 1.5) == (2, 0)
    assert persistence_diagrams(x, maxdim=0)[0][:, 1].tolist() == [1.0, 2.0, math.inf]
