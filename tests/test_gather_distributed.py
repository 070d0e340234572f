"""The gatherer and the core monitor across two real gloo processes (uneven ranks, an empty rank, a probe)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.procs import clean_env, free_port

WORKER = textwrap.dedent(
    """
    import json, os, sys, warnings
    import torch
    import torch.distributed as dist
    from torch import nn
    from topo_callbacks.core import CollapseMonitorCore, gather_samples

    dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=2)
    rank = dist.get_rank()
    out = {}
    # uneven: rank 0 has 3 rows, rank 1 has 7; budget 100 keeps all
    x = torch.full((3 if rank == 0 else 7, 4), float(rank))
    out["uneven"] = gather_samples(x, max_samples=100).tolist()
    # empty rank: rank 1 captured nothing at all
    out["empty"] = gather_samples(torch.ones(5, 4) if rank == 0 else None, max_samples=100).tolist()
    # budget split before gathering: 2 ranks x ceil(6 / 2) rows
    out["budget"] = list(gather_samples(torch.randn(50, 4), max_samples=6).shape)

    # to one rank only: rank 0 gets everything, rank 1 nothing
    out["to_rank0"] = list(gather_samples(x, max_samples=100, dst=0).shape)

    def monitored_run(compute_on):
        # the monitor: ranks see different data, yet log the same CI and take the same decision
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
        mon = CollapseMonitorCore("0", every_n_train_steps=2, max_samples=64, divergence_threshold=0.99,
                                  stop_on_alarm=True, compute_on=compute_on, max_overhead=None)
        mon.attach(model)
        g = torch.Generator().manual_seed(100 + rank)
        cis = []
        for step in range(1, 7):
            mon.prepare_step(step)
            rows = 8 if rank == 0 else (0 if step == 3 or step == 4 else 12)  # rank 1 empty around check 4
            if rows:
                model(torch.randn(rows, 8, generator=g))
            if mon.is_check_step(step):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    result = mon.run_check(step)
                cis.append(None if result.report is None else [result.report.ci, result.report.n, mon.eps])
        return cis

    def probe_run(compute_on):
        # a probe on every rank, a model that trains between checks: rows move, and one engine follows them
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        probe = torch.randn(24, 8, generator=torch.Generator().manual_seed(7))
        mon = CollapseMonitorCore("0", every_n_train_steps=2, max_samples=64, calibration_checks=1,
                                  source="probe", probe=probe, compute_on=compute_on, max_overhead=None)
        mon.attach(model)
        g = torch.Generator().manual_seed(100 + rank)  # each rank trains on its own data
        cis = []
        for step in range(1, 9):
            mon.prepare_step(step)
            optimizer.zero_grad()
            model(torch.randn(16, 8, generator=g)).pow(2).mean().backward()
            optimizer.step()
            if mon.is_check_step(step):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    result = mon.run_check(step)
                cis.append(None if result.report is None else [result.report.ci, result.report.n, mon.eps])
        return cis, {"resets": mon.tracker.resets, "last_edit": mon.tracker.last_edit}

    out["cis"] = monitored_run("all")
    out["cis_rank0"] = monitored_run("rank0")
    out["probe_all"] = probe_run("all")
    out["probe_rank0"] = probe_run("rank0")
    print("RESULT" + json.dumps(out), flush=True)
    from tests.procs import finish_distributed

    finish_distributed()
    """
)


def test_gather_and_monitor_agree_across_two_gloo_ranks(tmp_path: Path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = free_port()
    procs = []
    for rank in range(2):
        env = clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
        procs.append(subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True))
    results = []
    for proc in procs:
        try:
            stdout, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("a rank hung")
        assert proc.returncode == 0
        (line,) = [ln for ln in stdout.splitlines() if ln.startswith("RESULT")]
        results.append(json.loads(line[len("RESULT") :]))
    r0, r1 = results
    assert r0["uneven"] == r1["uneven"]
    assert [row[0] for row in r0["uneven"]] == [0.0] * 3 + [1.0] * 7
    assert r0["empty"] == r1["empty"] == [[1.0] * 4] * 5
    assert r0["budget"] == r1["budget"] == [6, 4]
    assert r0["cis"] == r1["cis"]  # same CI, same sample size, on both ranks, at every check
    assert [c[1] for c in r0["cis"]] == [40.0, 16.0, 40.0]  # check 4: rank 1 contributed nothing
    assert r0["to_rank0"] == [10, 4]
    assert r1["to_rank0"] == [0, 4]
    # computed on rank 0 and broadcast: the same values, scale included, on both ranks and as computed everywhere
    assert r0["cis_rank0"] == r1["cis_rank0"] == r0["cis"]
    # probe source: each rank trains on its own data, so ranks embed the probe with different weights; rank 0's
    # embedding decides. "all": every rank computes on its own embedding; "rank0": rank 0 computes, and its
    # engine, the only one fed, follows the probe by moves
    (cis_all0, tracker_all0), (cis_all1, _) = r0["probe_all"], r1["probe_all"]
    (cis_r0, tracker_r0), (cis_r1, tracker_r1) = r0["probe_rank0"], r1["probe_rank0"]
    assert [c[1] for c in cis_all0] == [24.0] * 4
    assert cis_r0 == cis_r1 == cis_all0  # rank 1 logs rank 0's values
    assert cis_all1 != cis_all0  # (the ranks' models differ, so this is not vacuous)
    assert tracker_r0 == {"resets": 1, "last_edit": "move 24"}
    assert tracker_r1 == {"resets": 0, "last_edit": "none"}
    assert tracker_all0 == tracker_r0
