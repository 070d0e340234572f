"""MMHMEngine against gudhi after random edit sequences (moves, inserts, removes, duplicates)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import cdist, pdist

from tests.clouds import KINDS, circle, cloud, float32_cloud_at_percentile, gudhi_betti, torus
from topo_callbacks.engine import MMHMEngine

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# the engine's tensors live on the points' device: CPU always, CUDA when this machine has it
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def far_from_ties(points: np.ndarray, eps: float, margin: float = 1e-7) -> bool:
    """True when no pairwise distance is within ``margin`` (relative) of eps: the contract's only exception."""
    if len(points) < 2:
        return True
    dist = cdist(points, points)
    return not bool((np.abs(dist - eps) <= margin * eps).any())


edits = st.lists(
    st.tuples(
        st.sampled_from(["move", "nudge", "nudge all", "insert", "remove", "duplicate"]),
        st.integers(1, 6),
        st.integers(0, 2**31 - 1),
    ),
    max_size=8,
)


@SETTINGS
@given(
    kind=st.sampled_from(KINDS),
    n=st.integers(0, 50),
    d=st.integers(1, 6),
    eps=st.floats(0.2, 2.5),
    coeff=st.sampled_from([2, 3]),
    seed=st.integers(0, 2**31 - 1),
    plan=edits,
    device=st.sampled_from(DEVICES),
)
def test_betti_after_edit_sequences_matches_gudhi(kind, n, d, eps, coeff, seed, plan, device):
    rng = np.random.default_rng(seed)
    engine = MMHMEngine(eps, coeff=coeff, dtype=torch.float64, capacity=4, device=device)
    start = cloud(kind, n, d, rng) if n else np.zeros((0, d))
    d = start.shape[1]  # the circle generator needs 2 columns
    ids = engine.reset(torch.from_numpy(start).to(device))
    current = {int(i): p for i, p in zip(ids, engine.points(ids).cpu().numpy(), strict=True)}
    for op, k, edit_seed in plan:
        r = np.random.default_rng(edit_seed)
        alive = list(current)
        if op == "insert" or not alive:
            new = r.standard_normal((k, d)) * r.choice([0.1, 1.0])
            for i, p in zip(engine.insert(torch.from_numpy(new).to(device)).tolist(), new, strict=True):
                current[i] = p
        elif op == "remove":
            gone = list(r.choice(alive, size=min(k, len(alive)), replace=False))
            engine.remove(gone)
            for i in gone:
                del current[i]
        else:
            size = len(alive) if op == "nudge all" else min(k, len(alive))
            chosen = list(r.choice(alive, size=size, replace=False))
            if op != "duplicate":  # nudges: a few edges flip, often with connected links (no module recomputed)
                scale = r.choice([0.05, 1]) if op == "move" else 0.03 * eps
                new = np.stack([current[i] for i in chosen]) + r.standard_normal((len(chosen), d)) * scale
            else:  # move onto other points: exact duplicates
                new = np.stack([current[int(r.choice(alive))] for _ in chosen])
            engine.move(chosen, torch.from_numpy(new).to(device))
            for i, p in zip(chosen, new, strict=True):
                current[i] = p
        if r.random() < 0.5:  # query between some edits, not all: dirty regions also accumulate
            pts = np.stack(list(current.values())) if current else np.zeros((0, d))
            if far_from_ties(pts, eps):
                assert engine.betti() == (gudhi_betti(pts, eps, coeff) if len(pts) else (0, 0))
    pts = np.stack(list(current.values())) if current else np.zeros((0, d))
    if far_from_ties(pts, eps):
        assert engine.betti() == (gudhi_betti(pts, eps, coeff) if len(pts) else (0, 0))


def test_known_loops_circle_and_torus():
    rng = np.random.default_rng(0)
    engine = MMHMEngine(0.4, dtype=torch.float64)
    engine.reset(torch.from_numpy(circle(80, rng, noise=0.01)))
    assert engine.betti() == (1, 1)
    engine = MMHMEngine(1.05, dtype=torch.float64)
    engine.reset(torch.from_numpy(torus(100, rng)))
    assert engine.betti() == (1, 2)


def test_only_touched_modules_are_rebuilt():
    rng = np.random.default_rng(1)
    centres = np.arange(10)[:, None] * np.array([[10.0, 0.0]])  # 10 well-separated clusters
    pts = np.concatenate([c + 0.3 * rng.standard_normal((20, 2)) for c in centres])
    engine = MMHMEngine(0.5, dtype=torch.float64)
    ids = engine.reset(torch.from_numpy(pts))
    engine.betti()
    modules = engine.stats()["modules"]
    assert engine.stats()["modules_rebuilt"] == modules
    # three points of cluster 0 leave it (their last edges have empty links: the link condition fails)
    engine.move(ids[:3], torch.from_numpy(pts[:3] + np.array([0.0, 3.0])))
    assert engine.betti() == gudhi_betti(engine.points().numpy(), 0.5)
    assert engine.stats()["kept_moves"] == 0
    # cluster 0's pieces and the three points' new module(s), not the other nine clusters
    assert 2 <= engine.stats()["modules_rebuilt"] <= 6 < modules
    engine.betti()
    assert engine.stats()["modules_rebuilt"] == 0  # nothing dirty: all cached


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bulk_edits_rebuild_the_graph_and_match_gudhi(dtype):
    """Half the points or more moved, or every point replaced (the monitors' usual checks), rebuild the whole
    eps-graph; with a hole in the slots they go the incremental way. Both agree with gudhi."""
    rng = np.random.default_rng(5)
    n, eps = 600, 0.2  # more than one 256-row block of the rebuild
    pts = cloud("circle", n, 2, rng)
    engine = MMHMEngine(eps, dtype=dtype)
    ids = engine.reset(torch.from_numpy(pts))
    engine.betti()

    def check() -> None:
        stored = engine.points().to(torch.float64).numpy()
        assert engine.betti() == gudhi_betti(stored, eps)
        assert engine.stats()["edges"] == int((pdist(stored) <= eps).sum())  # the kept bits, not only this betti

    def rebuilds() -> int:
        return engine.stats()["graph_rebuilds"]

    assert rebuilds() == 1  # the reset
    pts = cloud("gauss", n, 2, rng)  # every point moved, to a different graph
    engine.move(ids, torch.from_numpy(pts))
    assert rebuilds() == 2
    check()
    engine.move(ids[:3], torch.from_numpy(pts[:3] * 2.0))  # a few: row by row, on the rebuilt bits
    assert rebuilds() == 2
    check()
    pts = cloud("circle", n, 2, rng)
    engine.move(ids[: n // 2], torch.from_numpy(pts[: n // 2]))  # half of them
    assert rebuilds() == 3
    check()
    engine.move(ids[n // 2 : n // 2 + 3], torch.from_numpy(pts[n // 2 : n // 2 + 3]))
    check()
    engine.remove(ids)  # a stream sample replaced
    assert engine.stats()["edges"] == 0
    ids = engine.insert(torch.from_numpy(cloud("circle", n, 2, rng)))
    assert rebuilds() == 4
    check()
    engine.remove(engine.ids()[:1])  # slot 0 empty: the points no longer fill slots 0..n-1
    engine.move(engine.ids(), torch.from_numpy(cloud("gauss", n - 1, 2, rng)))
    assert rebuilds() == 4
    check()
    ids = engine.insert(torch.from_numpy(cloud("gauss", 3 * n, 2, rng)))  # fills the hole, then grows
    check()


def test_float32_storage_and_device_match_input():
    x = torch.randn(30, 3)
    engine = MMHMEngine(1.0)
    engine.reset(x)
    assert engine.points().dtype == torch.float32
    assert engine.points().device == x.device
    assert engine.betti() == gudhi_betti(x.double().numpy(), 1.0)


def test_bad_input_raises_and_leaves_state_unchanged():
    engine = MMHMEngine(1.0, dtype=torch.float64)
    ids = engine.reset(torch.randn(10, 3, dtype=torch.float64))
    before = (engine.betti(), engine.points().clone())
    with pytest.raises(ValueError, match="d = 3"):
        engine.move(ids[:2], torch.zeros(2, 4))
    with pytest.raises(ValueError, match="one row per id"):
        engine.move(ids[:2], torch.zeros(3, 3))
    with pytest.raises(ValueError, match="NaN or Inf"):
        engine.insert(torch.tensor([[0.0, float("nan"), 0.0]]))
    with pytest.raises(KeyError, match="unknown"):
        engine.move([999], torch.zeros(1, 3))
    engine.remove(ids[:1])
    with pytest.raises(KeyError, match="unknown or removed"):
        engine.remove(ids[:1])
    with pytest.raises(ValueError, match="repeat"):
        engine.remove([int(ids[1]), int(ids[1])])
    with pytest.raises(ValueError, match="eps"):
        MMHMEngine(0.0)
    with pytest.raises(ValueError, match="prime"):
        MMHMEngine(1.0, coeff=6)
    assert torch.equal(engine.points(), before[1][1:])


@pytest.mark.parametrize("inside", [True, False])
def test_exact_decisions_near_eps_far_from_the_origin(inside):
    # Points 1e6 away from the centroid: the Gram formula's error (~1e-4 in d^2) dwarfs a 1e-9 margin around eps.
    rng = np.random.default_rng(3)
    d, eps = 20, 1.0
    spread = 1e6 * np.concatenate([np.eye(d), -np.eye(d)])
    centre = spread[0] + 0.5
    direction = rng.standard_normal(d)
    direction /= np.linalg.norm(direction)
    near = centre + eps * (1 - 1e-9 if inside else 1 + 1e-9) * direction
    pts = np.concatenate([spread, [centre, near]])
    assert (np.linalg.norm(near - centre) <= eps) == inside
    engine = MMHMEngine(eps, dtype=torch.float64)
    ids = engine.reset(torch.from_numpy(pts))
    assert engine.betti() == (len(pts) - 1 if inside else len(pts), 0)
    across = centre + eps * (1 + 1e-9 if inside else 1 - 1e-9) * direction  # move to the other side of eps
    engine.move(ids[-1:], torch.from_numpy(across[None]))
    assert engine.betti() == (len(pts) if inside else len(pts) - 1, 0)


@SETTINGS
@given(
    kind=st.sampled_from(KINDS),
    n=st.integers(1, 60),
    d=st.integers(1, 8),
    eps=st.floats(0.2, 2.5),
    seed=st.integers(0, 2**31 - 1),
    share=st.floats(0.0, 0.5),
    device=st.sampled_from(DEVICES),
)
def test_float32_fast_path_matches_gudhi_after_a_move(kind, n, d, eps, seed, share, device):
    """float32 points go through the float32 Gram and its exact refinement; gudhi sees the same stored values."""
    rng = np.random.default_rng(seed)
    pts = cloud(kind, n, d, rng).astype(np.float32)
    engine = MMHMEngine(eps, device=device)
    ids = engine.reset(torch.from_numpy(pts).to(device))
    if far_from_ties(pts.astype(np.float64), eps):
        assert engine.betti() == gudhi_betti(pts.astype(np.float64), eps)
    k = int(share * len(pts))
    chosen = rng.choice(len(pts), size=k, replace=False)
    pts[chosen] += (0.3 * rng.standard_normal((k, pts.shape[1]))).astype(np.float32)
    engine.move(ids[torch.from_numpy(chosen)], torch.from_numpy(pts[chosen]).to(device))
    if far_from_ties(pts.astype(np.float64), eps):
        assert engine.betti() == gudhi_betti(pts.astype(np.float64), eps)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("kind", ["gauss", "collapsed"])
@pytest.mark.parametrize("pct", [1.0, 5.0])
def test_cuda_matches_cpu_on_benchmark_like_clouds(kind, pct):
    """Same float32 points on both devices: the same eps-graph and Betti numbers, after a reset and after moves."""
    rng = np.random.default_rng(11)
    n, d = 1500, 128
    pts, eps = float32_cloud_at_percentile(kind, n, d, pct, rng)
    engines = {device: MMHMEngine(eps, device=device) for device in ("cpu", "cuda")}
    ids = {device: engine.reset(torch.from_numpy(pts).to(device)) for device, engine in engines.items()}
    for share in (0.05, 1.0):
        # kept_moves: the link condition, read from host copies of the needed rows on CUDA, decides alike
        results = {
            device: (engine.betti(), engine.stats()["edges"], engine.stats()["kept_moves"])
            for device, engine in engines.items()
        }
        assert results["cpu"] == results["cuda"]
        chosen = rng.choice(n, size=int(share * n), replace=False)
        pts[chosen] += (0.05 * eps / np.sqrt(d) * rng.standard_normal((len(chosen), d))).astype(np.float32)
        for device, engine in engines.items():
            engine.move(ids[device][torch.from_numpy(chosen)], torch.from_numpy(pts[chosen]).to(device))
    assert engines["cpu"].betti() == engines["cuda"].betti()
    assert engines["cuda"].points().device.type == "cuda"


@pytest.mark.parametrize("kind", ["gauss", "collapsed"])
@pytest.mark.parametrize("pct", [1.0, 5.0])
def test_one_giant_module_matches_ripser_after_moves(kind, pct):
    """Benchmark-like clouds (a giant module with hundreds of loops) against ripser, then after two 5% moves."""
    from tests.clouds import ripser_betti

    rng = np.random.default_rng(7)
    n, d = 400, 32
    pts, eps = float32_cloud_at_percentile(kind, n, d, pct, rng)
    engine = MMHMEngine(eps)
    ids = engine.reset(torch.from_numpy(pts))
    kept = 0
    for step in range(3):
        dist = cdist(pts.astype(np.float64), pts.astype(np.float64))
        assert engine.betti() == ripser_betti(dist, eps)
        if step:  # a move either kept every module (the link condition) or had the giant one rebuilt
            assert (engine.stats()["kept_moves"] > kept) != (engine.stats()["modules_rebuilt"] >= 1)
        kept = engine.stats()["kept_moves"]
        chosen = rng.choice(n, size=n // 20, replace=False)
        pts[chosen] += (0.1 * eps / np.sqrt(d) * rng.standard_normal((len(chosen), d))).astype(np.float32)
        engine.move(ids[torch.from_numpy(chosen)], torch.from_numpy(pts[chosen]))


def test_state_is_bit_packed():
    engine = MMHMEngine(1.0)
    engine.reset(torch.randn(1000, 16))
    # the adjacency takes n^2 / 8 bytes, not n^2
    assert engine.stats()["state_bytes"] < 1000 * 16 * 4 + 1000 * 1000 // 8 + 1000 * 32


@pytest.mark.parametrize(("share", "step"), [(0.05, 0.02), (1.0, 0.002)])
def test_moves_whose_changed_edges_pass_the_link_condition_keep_every_module(share, step):
    """A small move of a near-planar cloud (thick links) flips edges whose links are connected: no module is
    recomputed (sparse rows, or the whole graph for a bulk move), and b0, b1 still match gudhi."""
    rng = np.random.default_rng(3)
    n, d = 300, 8
    pts = cloud("collapsed", n, d, rng)
    eps = float(np.quantile(pdist(pts), 0.05))
    engine = MMHMEngine(eps, dtype=torch.float64)
    ids = engine.reset(torch.from_numpy(pts))
    assert engine.betti() == gudhi_betti(pts, eps)
    flipped = kept = 0
    for _ in range(4):
        chosen = rng.choice(n, size=round(share * n), replace=False)
        moved = pts.copy()
        moved[chosen] += step * eps * rng.standard_normal((len(chosen), d))
        flipped += int(((pdist(pts) <= eps) != (pdist(moved) <= eps)).sum())
        pts = moved
        engine.move(ids[torch.from_numpy(chosen)], torch.from_numpy(pts[chosen]))
        assert engine.betti() == gudhi_betti(pts, eps)
        kept += engine.stats()["modules_rebuilt"] == 0
    assert flipped > 0  # edges did change: the link condition, not an unchanged graph, kept the modules
    assert engine.stats()["kept_moves"] == kept >= 2


def test_empty_edits_change_nothing():
    engine = MMHMEngine(1.0)
    engine.reset(torch.from_numpy(cloud("clusters", 40, 3, np.random.default_rng(2))).float())
    before = engine.betti(), engine.stats()["edges"]
    engine.move([], torch.zeros(0, 3))
    engine.insert(torch.zeros(0, 3))
    engine.remove([])
    assert (engine.betti(), engine.stats()["edges"]) == before
    assert engine.stats()["kept_moves"] == 0  # an empty move is not counted as one that kept its modules
    assert engine.stats()["modules_rebuilt"] == 0
