"""Two "nodes" on this machine: ``torchrun --nnodes 2 --nproc_per_node 1`` twice, meeting at a c10d rendezvous, gloo.

Each node is its own launcher (as on a real cluster), so the process group spans two torchrun agents and the ranks
learn their node from the rendezvous, not from one parent. Ranks are uneven: global rank 1 trains on fewer rows,
and on none for a whole capture window. Every rank must log the same CI series (values and gathered sample sizes)
and stop at the same step. The worker is tests/multinode_worker.py (not named after a package: a script named
``lightning.py`` would shadow Lightning); each launch has a clean environment, free ports and a timeout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.procs import ROOT, run_together, torchrun_nodes

WORKER = ROOT / "tests" / "multinode_worker.py"


def launch(framework: str, tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both nodes' torchrun at once; the two ranks' results, by global rank."""
    run_together(torchrun_nodes(WORKER, str(tmp_path), framework, nnodes=2), tmp_path, timeout=150)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    # really two nodes of one process each, in one gloo group: not two independent single-process runs
    assert r0["world"] == r1["world"] == 2
    assert {r0["node"], r1["node"]} == {0, 1}
    assert r0["local_rank"] == r1["local_rank"] == 0
    assert r0["local_world"] == r1["local_world"] == 1
    assert r0["backend"] == r1["backend"] == "gloo"
    return r0, r1


@pytest.mark.slow
def test_lightning_ddp_on_two_nodes_same_ci_and_same_stop(tmp_path: Path):
    r0, r1 = launch("lightning", tmp_path)
    assert r0["num_nodes"] == r1["num_nodes"] == 2
    assert r0["ci"] == r1["ci"]  # identical CI series (values and gathered sample sizes) on both nodes
    sizes = {step: n for step, _, n in r0["ci"]}
    assert sizes[4] == 48 + 32  # rank 0's budget share (48 of 96) + rank 1's 4 steps x 8 rows
    assert sizes[8] == 48  # rank 1 had no rows for this check and still took part in the gather
    stop = r0["stopped_step"]
    assert stop == r1["stopped_step"] == r0["global_step"] == r1["global_step"]  # the same step on both nodes
    assert stop in (16, 20)  # the encoder collapses from step 15 on; the check at 16 or 20 sees it
    assert r0["reason"] == r1["reason"] == "DIVERGENCE_THRESHOLD"
    assert [c[0] for c in r0["ci"]] == list(range(4, stop + 1, 4))
    assert all(ci <= 0.9 for step, ci, _ in r0["ci"] if step <= 12)  # no stop before the collapse


@pytest.mark.slow
def test_accelerate_on_two_nodes_same_ci_and_same_stop(tmp_path: Path):
    r0, r1 = launch("accelerate", tmp_path)
    assert r0["ci"] == r1["ci"]
    sizes = {step: n for step, _, n in r0["ci"]}
    assert sizes[5] == 64  # the global budget, split over the two ranks (32 each)
    assert sizes[10] == 32  # rank 1 contributed nothing to this check
    # the collapse starts after step 30: the check at 35 sees it, on both nodes
    assert r0["global_step"] == r1["global_step"] == r0["stopped_step"] == r1["stopped_step"] == 35
    assert r0["reason"] == r1["reason"] == "DIVERGENCE_THRESHOLD"
    assert all(ci <= 0.9 for step, ci, _ in r0["ci"] if step <= 30)
