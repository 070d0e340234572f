"""The engine's building blocks: bit packing, the lexicographic Morse matching (by brute force), the spanning
triangles, the Z/2 rank of all triangle boundaries against a plain elimination, and the link condition for edge
flips (gudhi)."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from topo_callbacks.engine.graph import (
    _pack_bits_by_tensors,
    _unpack_bits_by_tensors,
    lexicographic_matching,
    lowest_bits,
    pack_bits,
    packed_adjacency,
    popcount,
    unpack_bits,
)
from topo_callbacks.engine.links import flips_keep_betti, packed_pairs
from topo_callbacks.engine.primitives import components_from_tree
from topo_callbacks.engine.reduction import boundary_rank, flag_betti


@settings(max_examples=60, deadline=None)
@given(r=st.integers(0, 9), m=st.integers(0, 200), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip(r, m, seed):
    mask = torch.from_numpy(np.random.default_rng(seed).random((r, m)) < 0.3)
    words = pack_bits(mask)
    assert words.shape == (r, (m + 63) // 64)
    assert torch.equal(unpack_bits(words, m), mask)
    if r and m:  # the tensor passes that other devices use give the same words and bits as numpy on the CPU
        assert torch.equal(_pack_bits_by_tensors(mask), words)
        assert torch.equal(_unpack_bits_by_tensors(words, m), mask)
        assert torch.equal(pack_bits(mask.T), pack_bits(mask.T.contiguous()))  # any strides
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


def spanning_triangles(n: int, u: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The matched and the critical triangles of `lexicographic_matching`, as three input edge indices each."""
    matching = lexicographic_matching(n, u, v)
    matched = torch.nonzero(matching.down >= 0).flatten()
    top = torch.cat([matched, matching.extra_top])
    apex = torch.cat([matching.down[matched], matching.extra_apex])
    side_b = matching.edge_index(apex, matching.lo[top])
    side_c = matching.edge_index(apex, matching.hi[top])
    return matching.edge_of[top], matching.edge_of[side_b], matching.edge_of[side_c]


def random_graph(n: int, density: float, seed: int) -> tuple[list[tuple[int, int]], Tensor, Tensor]:
    rng = np.random.default_rng(seed)
    edges = [(a, b) for a, b in itertools.combinations(range(n), 2) if rng.random() < density]
    u = torch.tensor([e[0] for e in edges], dtype=torch.long)
    v = torch.tensor([e[1] for e in edges], dtype=torch.long)
    return edges, u, v


def all_triangles(n: int, edges: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    index = {e: k for k, e in enumerate(edges)}
    return [
        (index[(a, b)], index[(a, c)], index[(b, c)])
        for a, b, c in itertools.combinations(range(n), 3)
        if (a, b) in index and (a, c) in index and (b, c) in index
    ]


@settings(max_examples=80, deadline=None)
@given(n=st.integers(0, 24), density=st.floats(0.05, 1.0), seed=st.integers(0, 2**31 - 1))
def test_lexicographic_matching_by_brute_force(n, density, seed):
    """Each edge is matched with its lowest apex below its lower end (new labels); the critical triangles are
    exactly the non-lowest apexes with no neighbour among the edge's apexes below them."""
    check_matching(n, density, seed)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(65, 260), density=st.floats(0.01, 0.15), seed=st.integers(0, 2**31 - 1))
def test_lexicographic_matching_by_brute_force_across_words(n, density, seed):
    """Rows of several 64-bit words: edges are matched in windows of different widths and offsets."""
    check_matching(n, density, seed)


def check_matching(n: int, density: float, seed: int) -> None:
    edges, u, v = random_graph(n, density, seed)
    matching = lexicographic_matching(n, u, v)
    neighbours: dict[int, set[int]] = {k: set() for k in range(n)}
    for a, b in edges:
        neighbours[int(matching.relabel[a])].add(int(matching.relabel[b]))
        neighbours[int(matching.relabel[b])].add(int(matching.relabel[a]))
    want_down, want_critical = [], set()
    for lo, hi in zip(matching.lo.tolist(), matching.hi.tolist(), strict=True):
        apexes = sorted(a for a in neighbours[lo] & neighbours[hi] if a < lo)
        want_down.append(apexes[0] if apexes else -1)
        want_critical |= {(lo, hi, a) for a in apexes[1:] if not any(d < a and d in neighbours[a] for d in apexes)}
    assert matching.down.tolist() == want_down
    tops = matching.extra_top.tolist()
    got_critical = [
        (int(matching.lo[t]), int(matching.hi[t]), a) for t, a in zip(tops, matching.extra_apex.tolist(), strict=True)
    ]
    assert len(got_critical) == len(set(got_critical))
    assert set(got_critical) == want_critical


def plain_rank_mod_p(matrix: np.ndarray, p: int) -> int:
    matrix = matrix.astype(np.int64) % p
    rank = 0
    for col in range(matrix.shape[1]):
        pivot = next((k for k in range(rank, len(matrix)) if matrix[k, col]), None)
        if pivot is None:
            continue
        matrix[[rank, pivot]] = matrix[[pivot, rank]]
        matrix[rank] = matrix[rank] * pow(int(matrix[rank, col]), p - 2, p) % p
        others = np.flatnonzero(matrix[:, col])
        others = others[others != rank]
        matrix[others] = (matrix[others] - np.outer(matrix[others, col], matrix[rank])) % p
        rank += 1
    return rank


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(0, 24),
    density=st.floats(0.05, 1.0),
    coeff=st.sampled_from([2, 3, 5]),
    seed=st.integers(0, 2**31 - 1),
)
def test_boundary_rank_matches_plain_elimination_of_all_triangles(n, density, coeff, seed):
    """Matched pairs plus the flowed critical rows give the rank of every (signed) triangle boundary over Z/p,
    per component."""
    edges, u, v = random_graph(n, density, seed)
    roots = components_from_tree(n, u, v)
    modules, module = torch.unique(roots, return_inverse=True)
    got = boundary_rank(lexicographic_matching(n, u, v), module, modules.numel(), coeff).tolist()
    every = np.array(all_triangles(n, edges), dtype=np.int64).reshape(-1, 3)
    boundary = np.zeros((len(every), len(edges)), dtype=np.int64)
    for k, (ab, ac, bc) in enumerate(every):  # d[a, b, c] = [b, c] - [a, c] + [a, b]
        boundary[k, bc] += 1
        boundary[k, ac] -= 1
        boundary[k, ab] += 1
    edge_module = module[u].numpy() if edges else np.zeros(0, dtype=np.int64)
    want = [plain_rank_mod_p(boundary[edge_module[every[:, 0]] == m], coeff) for m in range(modules.numel())]
    assert got == want


def test_flag_betti_of_a_clique_a_tree_and_an_octahedron():
    # K5 on 0-4, a path 5-6-7, and the octahedron on 8-13 (a 2-sphere: b1 = 0 although no vertex is dominated)
    edges = [(a, b) for a in range(5) for b in range(a + 1, 5)] + [(5, 6), (6, 7)]
    octa = list(range(8, 14))
    edges += [(a, b) for a in octa for b in octa if a < b and b - a != 3]
    u, v = torch.tensor(edges).T
    roots, b1 = flag_betti(14, u, v)
    assert torch.unique(roots).tolist() == [0, 5, 8]
    assert b1.tolist() == [0, 0, 0]
    # a bare 4-cycle: one loop
    square = [(0, 1), (1, 2), (2, 3), (0, 3)]
    u, v = torch.tensor(square).T
    assert flag_betti(4, u, v)[1].tolist() == [1]


@settings(max_examples=80, deadline=None)
@given(n=st.integers(0, 24), density=st.floats(0.05, 1.0), seed=st.integers(0, 2**31 - 1))
def test_matched_and_critical_triangles_span_all_triangle_boundaries(n, density, seed):
    """They are triangles, each found once, and their boundaries have the rank of all triangles'."""
    edges, u, v = random_graph(n, density, seed)
    every = all_triangles(n, edges)
    got = torch.stack(spanning_triangles(n, u, v), dim=1).tolist()
    assert len({tuple(sorted(t)) for t in got}) == len(got)
    assert {tuple(sorted(t)) for t in got} <= {tuple(sorted(t)) for t in every}
    assert plain_gf2_rank(np.array(got).reshape(-1, 3), len(edges)) == plain_gf2_rank(
        np.array(every).reshape(-1, 3), len(edges)
    )


def test_the_spanning_triangles_of_a_clique_are_the_cone_on_its_first_vertex():
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


@settings(max_examples=60, deadline=None)
@given(r=st.integers(0, 9), m=st.integers(0, 200), seed=st.integers(0, 2**31 - 1))
def test_packed_pairs_lists_the_set_bits_row_major(r, m, seed):
    mask = torch.from_numpy(np.random.default_rng(seed).random((r, m)) < 0.05)
    names = torch.arange(r) * 10
    row, col = packed_pairs(pack_bits(mask), names)
    i, j = torch.nonzero(mask, as_tuple=True)
    assert row.tolist() == (i * 10).tolist()
    assert col.tolist() == j.tolist()


def gudhi_flag_betti(n: int, edges: set[tuple[int, int]], coeff: int) -> tuple[int, int]:
    import gudhi

    tree = gudhi.SimplexTree()
    for a in range(n):
        tree.insert([a])
    for a, b in edges:
        tree.insert([a, b])
    tree.expansion(2)
    tree.compute_persistence(homology_coeff_field=coeff, persistence_dim_max=True)
    betti = [*tree.betti_numbers(), 0, 0]
    return betti[0], betti[1]


def partition(n: int, edges: set[tuple[int, int]]) -> list[int]:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    a, b = zip(*edges, strict=True) if edges else ((), ())
    _, labels = connected_components(coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n)), directed=False)
    first: dict[int, int] = {}
    return [first.setdefault(int(label), vertex) for vertex, label in enumerate(labels)]


def test_flips_that_pass_the_link_condition_keep_components_and_b1_gudhi():
    """Random graphs and random edge flips: whenever `flips_keep_betti` says so, gudhi finds the same b0 and b1
    (Z/2 and Z/3) and the same components before and after. Both answers must occur, and some refused flip sets
    must really change b1 (the check is not vacuous, nor a refusal of everything)."""
    rng = np.random.default_rng(11)
    kept = refused = refused_and_changed = 0
    for _ in range(400):
        n = int(rng.integers(3, 15))
        density = rng.uniform(0.2, 0.9)
        edges = {(a, b) for a, b in itertools.combinations(range(n), 2) if rng.random() < density}
        pairs = list(itertools.combinations(range(n), 2))
        flips = [pairs[i] for i in rng.choice(len(pairs), size=min(len(pairs), int(rng.integers(1, 5))), replace=False)]
        u = torch.tensor([a for a, _ in flips])
        v = torch.tensor([b for _, b in flips])
        listed = sorted(edges)
        bits = packed_adjacency(n, torch.tensor([a for a, _ in listed], dtype=torch.long),
                                torch.tensor([b for _, b in listed], dtype=torch.long))  # fmt: skip
        after = edges ^ set(flips)
        same = all(gudhi_flag_betti(n, edges, p) == gudhi_flag_betti(n, after, p) for p in (2, 3))
        keeps = flips_keep_betti(bits, u, v)
        assert flips_keep_betti(bits, u, v, copy_rows=True) == keeps  # the CUDA way: needed rows copied
        if keeps:
            kept += 1
            assert same, (n, sorted(edges), flips)
            assert partition(n, edges) == partition(n, after)
        else:
            refused += 1
            refused_and_changed += not same
    assert kept >= 40
    assert refused >= 40
    assert refused_and_changed >= 20


def _imported_modules(path: Path, package: str) -> set[str]:
    """Every module an ``import`` or ``from ... import`` names anywhere in ``path`` (inside functions too), with
    relative imports resolved against ``package``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(part for part in (base, node.module) if part)
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    return found


ROOT = Path(__file__).resolve().parents[1] / "topo_callbacks"


@pytest.mark.parametrize("path", sorted((ROOT / "engine").glob("*.py")), ids=lambda p: p.name)
def test_the_engine_does_not_import_the_functional_package(path):
    """`functional` is built on `engine`, never the other way round: no import cycle, even a lazy one."""
    imported = _imported_modules(path, "topo_callbacks.engine")
    assert not {m for m in imported if m == "topo_callbacks.functional" or m.startswith("topo_callbacks.functional.")}
    assert "topo_callbacks" not in imported  # `from topo_callbacks import functional` would sneak it back in


def test_the_shared_validation_module_imports_no_package_module():
    imported = _imported_modules(ROOT / "_validation.py", "topo_callbacks")
    assert not {m for m in imported if m.split(".")[0] == "topo_callbacks"}
