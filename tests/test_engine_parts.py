"""The engine's building blocks: bit packing, the spanning triangles, and the Z/2 rank of triangle rows against a
plain elimination."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from topo_callbacks.engine.graph import lowest_bits, pack_bits, popcount, spanning_triangles, unpack_bits
from topo_callbacks.engine.reduction import flag_betti_gf2, gf2_boundary_rank


@settings(max_examples=60, deadline=None)
@given(r=st.integers(0, 9), m=st.integers(0, 200), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip(r, m, seed):
    mask = torch.from_numpy(np.random.default_rng(seed).random((r, m)) < 0.3)
    words = pack_bits(mask)
    assert words.shape == (r, (m + 63) // 64)
    assert torch.equal(unpack_bits(words, m), mask)
    assert popcount(words) == int(mask.sum())
    if r and m:
        i, j = torch.nonzero(torch.ones(r, m, dtype=torch.bool), as_tuple=True)
        assert torch.equal(((words[i, j // 64] >> (j % 64)) & 1).bool(), mask[i, j])  # bit j % 64 of word j // 64


@settings(max_examples=60, deadline=None)
@given(r=st.integers(1, 9), m=st.integers(1, 200), seed=st.integers(0, 2**31 - 1))
def test_lowest_bits(r, m, seed):
    mask = torch.from_numpy(np.random.default_rng(seed).random((r, m)) < 0.05)
    mask[:, -1] = True  # every row nonzero
    assert lowest_bits(pack_bits(mask)).tolist() == mask.to(torch.uint8).argmax(dim=1).tolist()


def plain_gf2_rank(rows: np.ndarray, n_cols: int) -> int:
    matrix = np.zeros((len(rows), n_cols), dtype=np.uint8)
    for k, row in enumerate(rows):
        for col in row:
            if col >= 0:
                matrix[k, col] ^= 1
    rank = 0
    for col in range(n_cols):
        pivot = next((k for k in range(rank, len(matrix)) if matrix[k, col]), None)
        if pivot is None:
            continue
        matrix[[rank, pivot]] = matrix[[pivot, rank]]
        others = matrix[:, col].astype(bool)
        others[rank] = False
        matrix[others] ^= matrix[rank]
        rank += 1
    return rank


@settings(max_examples=150, deadline=None)
@given(
    n_cols=st.integers(1, 40),
    n_rows=st.integers(0, 80),
    modules=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_gf2_rank_matches_plain_elimination(n_cols, n_rows, modules, seed):
    """Random rows of 1-3 entries (repeats allowed: they cancel) within a module, per module."""
    rng = np.random.default_rng(seed)
    col_module = rng.integers(0, modules, n_cols)
    rows = np.full((n_rows, 3), -1)
    for k in range(n_rows):
        members = np.flatnonzero(col_module == rng.integers(0, modules))
        if len(members):
            size = rng.integers(1, 4)
            rows[k, :size] = rng.choice(members, size=size)
    got = gf2_boundary_rank(torch.from_numpy(rows), n_cols, torch.from_numpy(col_module), modules).tolist()
    want = [
        plain_gf2_rank(rows[np.isin(rows, np.flatnonzero(col_module == m)).any(axis=1)], n_cols) for m in range(modules)
    ]
    assert got == want


def test_flag_betti_of_a_clique_a_tree_and_an_octahedron():
    # K5 on 0-4, a path 5-6-7, and the octahedron on 8-13 (a 2-sphere: b1 = 0 although no vertex is dominated)
    edges = [(a, b) for a in range(5) for b in range(a + 1, 5)] + [(5, 6), (6, 7)]
    octa = list(range(8, 14))
    edges += [(a, b) for a in octa for b in octa if a < b and b - a != 3]
    u, v = torch.tensor(edges).T
    roots, b1 = flag_betti_gf2(14, u, v)
    assert torch.unique(roots).tolist() == [0, 5, 8]
    assert b1.tolist() == [0, 0, 0]
    # a bare 4-cycle: one loop
    square = [(0, 1), (1, 2), (2, 3), (0, 3)]
    u, v = torch.tensor(square).T
    assert flag_betti_gf2(4, u, v)[1].tolist() == [1]


@settings(max_examples=80, deadline=None)
@given(n=st.integers(0, 24), density=st.floats(0.05, 1.0), seed=st.integers(0, 2**31 - 1))
def test_spanning_triangles_span_all_triangle_boundaries(n, density, seed):
    """The returned triples are triangles, each found once, and their boundaries have the rank of all triangles'."""
    rng = np.random.default_rng(seed)
    edges = [(a, b) for a, b in itertools.combinations(range(n), 2) if rng.random() < density]
    index = {e: k for k, e in enumerate(edges)}
    every = [
        (index[(a, b)], index[(a, c)], index[(b, c)])
        for a, b, c in itertools.combinations(range(n), 3)
        if (a, b) in index and (a, c) in index and (b, c) in index
    ]
    u = torch.tensor([e[0] for e in edges], dtype=torch.long)
    v = torch.tensor([e[1] for e in edges], dtype=torch.long)
    got = torch.stack(spanning_triangles(n, u, v), dim=1).tolist()
    assert len({tuple(sorted(t)) for t in got}) == len(got)
    assert {tuple(sorted(t)) for t in got} <= {tuple(sorted(t)) for t in every}
    assert plain_gf2_rank(np.array(got).reshape(-1, 3), len(edges)) == plain_gf2_rank(
        np.array(every).reshape(-1, 3), len(edges)
    )


def test_spanning_triangles_of_a_clique_are_the_cone_on_its_first_vertex():
    """K_n has C(n, 3) triangles; the C(n - 1, 2) through one vertex span their boundaries."""
    u, v = torch.triu_indices(30, 30, offset=1)
    a, b, c = spanning_triangles(30, u, v)
    assert a.numel() == 29 * 28 // 2
    apex = torch.stack([u[a], v[a], u[b], v[b], u[c], v[c]], dim=1)
    assert bool((apex == 0).any(dim=1).all())


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(2, 40),
    d=st.integers(1, 96),
    offset=st.sampled_from([0.0, 1e2, 1e4, 1e6]),
    planar=st.booleans(),
    nudge=st.sampled_from([0.0, -1e-7, 1e-7, -1e-4, 1e-4]),
    seed=st.integers(0, 2**31 - 1),
)
def test_float32_neighbour_rows_decide_like_float64_differences(n, d, offset, planar, nudge, seed):
    """Far from the origin, on a plane (the collapsed case) and with eps equal to one of the distances: every
    pair of float32 points is decided as the float64 differences decide it, ties included."""
    from topo_callbacks.engine.graph import neighbour_rows

    rng = np.random.default_rng(seed)
    if planar:  # a 2-dim cloud embedded in d dims: small distances against large norms
        basis = np.linalg.qr(rng.standard_normal((d, min(d, 2))))[0].T
        pts = rng.standard_normal((n, basis.shape[0])) @ basis
    else:
        pts = rng.standard_normal((n, d))
    x = torch.from_numpy((pts + offset * rng.standard_normal(d)).astype(np.float32))
    i, j = torch.nonzero(torch.ones(n, n, dtype=torch.bool), as_tuple=True)
    diff = x.double()[i] - x.double()[j]
    d2 = (diff * diff).sum(dim=1)
    off_diagonal = d2[i != j]
    if not bool((off_diagonal > 0).any()):
        return
    eps = float(off_diagonal[int(rng.integers(off_diagonal.numel()))].sqrt()) * (1.0 + nudge)
    if eps <= 0:
        return
    expected = (d2 <= eps * eps).view(n, n)
    got = neighbour_rows(x, x, eps)
    assert torch.equal(got, expected), int((got != expected).sum())
