"""The engine, the collapse index, the monitors, the gatherer and the rollback on every device this machine has.

Each test takes ``device``: ``"cpu"`` always, so that the test's own logic runs on every machine (CI has no GPU),
and ``"cuda"`` where this machine has one (skipped elsewhere; scripts/gpu_check.sh runs this file on a GPU machine
and counts any skip there as a failure). The CUDA runs are compared with the CPU: the same points give the same
eps-graph and Betti numbers, a Lightning run on the GPU (fp32 and ``bf16-mixed``) keeps the monitor's tensors on
the GPU and stops where the CPU run does, and under DDP the gathered rows stay on the device (NCCL with one GPU;
gloo with two ranks on one GPU, since NCCL cannot put two ranks on one device); a snapshot of a model on the
device (pinned host buffers, non-blocking copies on CUDA) restores it bit for bit, and a rollback rescues a
learning-rate blow-up there.
"""

from __future__ import annotations

import copy
import json
import math
import textwrap
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from tests.clouds import cloud, float32_cloud_at_percentile
from tests.procs import run_script
from topo_callbacks.core import NeuronTopologyMonitorCore
from topo_callbacks.engine import MMHMEngine
from topo_callbacks.functional import collapse_index

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


# ------------------------------------------------------------------------------------------------------- engine
def engine_state(engine: MMHMEngine) -> tuple[tuple[int, int], int, int]:
    stats = engine.stats()
    return engine.betti(), stats["edges"], stats["kept_moves"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["gauss", "collapsed"])
@pytest.mark.parametrize("pct", [1.0, 5.0])
def test_engine_on_device_matches_cpu_after_resets_and_moves(device: str, kind: str, pct: float):
    """A benchmark-sized float32 cloud (n = 2048, d = 768, eps at the 1st/5th percentile of its distances) on
    ``device`` and on the CPU: the same Betti numbers, edges and link-condition decisions after the reset and
    after moves of 1%, 5% and 100% of the points; a reset on the moved points agrees with the edited engines."""
    rng = np.random.default_rng(11)
    # on the CPU alone, the test's logic on a smaller cloud: the benchmark's size costs ~5 s a case on 2 cores
    n, d = (2048, 768) if device == "cuda" else (768, 96)
    pts, eps = float32_cloud_at_percentile(kind, n, d, pct, rng)
    reference, engine = MMHMEngine(eps, device="cpu"), MMHMEngine(eps, device=device)
    ref_ids, ids = reference.reset(torch.from_numpy(pts)), engine.reset(torch.from_numpy(pts).to(device))
    assert engine_state(engine) == engine_state(reference)
    for share in (0.01, 0.05, 1.0):
        chosen = torch.from_numpy(rng.choice(n, size=round(share * n), replace=False))
        # the benchmark's small displacement (0.05 eps in norm): some edges flip, most modules keep
        pts[chosen] += (0.05 * eps / np.sqrt(d) * rng.standard_normal((len(chosen), d))).astype(np.float32)
        reference.move(ref_ids[chosen], torch.from_numpy(pts[chosen]))
        engine.move(ids[chosen.to(ids.device)], torch.from_numpy(pts[chosen]).to(device))
        assert engine_state(engine) == engine_state(reference), f"after a move of {share:.0%}"
    fresh = MMHMEngine(eps, device=device)
    fresh.reset(engine.points())
    assert fresh.betti() == engine.betti() == reference.betti()
    assert engine.points().device.type == device
    assert torch.equal(engine.points().cpu(), torch.from_numpy(pts))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["gauss", "collapsed"])
def test_collapse_index_on_device_matches_cpu(device: str, kind: str):
    x = torch.from_numpy(cloud(kind, 512, 64, np.random.default_rng(3)).astype(np.float32))
    on_cpu = collapse_index(x, weights="benchmark")
    on_device = collapse_index(x.to(device), eps=on_cpu.eps, weights="benchmark")
    assert (on_device.b0, on_device.b1) == (on_cpu.b0, on_cpu.b1)  # exact at the same scale
    for key, value in on_cpu.as_dict().items():
        if key != "time_s":
            # float32 reductions run in another order on a GPU: agreement to 1e-3, not to the last bit
            assert on_device.as_dict()[key] == pytest.approx(value, rel=1e-3, abs=1e-4), key


# ---------------------------------------------------------------------------------------------------- lightning
def lightning_accelerator(device: str) -> str:
    return "gpu" if device == "cuda" else "cpu"


def collapsing_model() -> Any:
    """A TinyModel whose encoder collapses (every row one constant vector) from optimizer step 15 on (the class is
    built here: Lightning is imported only by the tests that need it)."""
    from tests.lightning_helpers import TinyModel

    class CollapsingModel(TinyModel):
        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            self.encoder[3].enabled = self.global_step >= 14
            x, y = batch
            return nn.functional.mse_loss(self(x), y)

    return CollapsingModel()


def check_stopped_on_collapse(history: list[dict[str, Any]], stopped_step: int | None, global_step: int) -> None:
    """Checks every 4 steps, healthy before the collapse, stopped by the check that first sees it."""
    assert stopped_step == global_step
    assert stopped_step in (16, 20)  # the encoder collapses from step 15 on; the check at 16 or 20 sees it
    assert [h["step"] for h in history] == list(range(4, stopped_step + 1, 4))
    assert all(h["ci"] <= 0.9 for h in history if h["step"] <= 12)  # no stop before the collapse
    assert history[-1]["ci"] > 0.9


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("source", ["stream", "probe"])
def test_lightning_monitor_on_device_stops_on_collapse(tmp_path: Path, device: str, precision: str, source: str):
    """Under ``bf16-mixed`` the watched layer outputs bfloat16 (autocast); the monitor keeps float32 rows on the
    module's device, and the engine that follows a probe's rows lives there too (a stream's sample is replaced
    whole at each check, so it needs no engine: ``tracker.engine`` stays None)."""
    pytest.importorskip("lightning")
    import lightning.pytorch as pl

    from tests.lightning_helpers import loader, trainer
    from topo_callbacks.core import StoppingReason
    from topo_callbacks.lightning import CollapseMonitor

    pl.seed_everything(0, verbose=False)  # the tiny model's healthy CI wanders with its initialisation
    probe = torch.randn(40, 16, generator=torch.Generator().manual_seed(7)) if source == "probe" else None
    mon = CollapseMonitor(layer="encoder", every_n_train_steps=4, max_samples=64, divergence_threshold=0.9,
                          stop_on_alarm=True, source=source, probe=probe,
                          calibration_checks=1 if probe is not None else 3, max_overhead=None)  # fmt: skip
    t = trainer(tmp_path, accelerator=lightning_accelerator(device), precision=precision, max_steps=40,
                callbacks=[mon])  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the collapse warning, and Lightning's about tiny data loaders
        t.fit(collapsing_model(), loader(n=2048, batch_size=32))
    check_stopped_on_collapse(mon.history, mon.stopped_step, t.global_step)
    assert mon.stopping_reason is StoppingReason.DIVERGENCE_THRESHOLD
    assert float(t.callback_metrics["collapse/ci"]) == pytest.approx(mon.history[-1]["ci"])
    if source == "probe":
        points = mon.tracker.engine.points()
        assert (points.device.type, points.dtype) == (device, torch.float32)
        assert {h["n"] for h in mon.history} == {40}  # the probe's rows at every check
        assert mon.tracker.resets == 1  # one engine since calibration (check 4): a reset at 8, then moves
        assert mon.tracker.last_edit == "move 40"
    else:
        assert {h["n"] for h in mon.history} == {64}  # the budget, filled from the batches of its window
        assert mon.tracker.engine is None


# ------------------------------------------------------------------------------------------------------ neurons
@pytest.mark.parametrize("device", DEVICES)
def test_neuron_monitor_detects_two_neurons_merging_on_device(device: str):
    """Two neurons pulled onto each other: one point at the fixed scale, on the device (the engine in float64)."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 12).to(device)
    monitor = NeuronTopologyMonitorCore("0", every_n_train_steps=5, rel_eps=0.05)
    monitor.attach(nn.Sequential(layer))
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    rows = []
    for step in range(1, 41):
        pull = ((layer.weight[1] - layer.weight[0]) ** 2).sum() + (layer.bias[1] - layer.bias[0]) ** 2
        optimizer.zero_grad()
        pull.backward()
        optimizer.step()
        if monitor.is_check_step(step):
            rows.append(monitor.run_check(step))
    assert rows[0]["neurons/0/b0"] == 12
    assert rows[-1]["neurons/0/b0"] == 11  # the two neurons merged; no other pair did
    assert rows[-1]["neurons/0/merged_fraction"] == pytest.approx(2 / 12)
    engine, _ = monitor._engines["0"]
    assert (engine.points().device.type, engine.points().dtype) == (device, torch.float64)


@pytest.mark.parametrize("device", DEVICES)
def test_lightning_neuron_monitor_on_device_matches_a_cpu_check_of_the_same_weights(tmp_path: Path, device: str):
    pytest.importorskip("lightning")
    import lightning.pytorch as pl

    from tests.lightning_helpers import TinyModel, loader, trainer
    from topo_callbacks.lightning import NeuronTopologyMonitor

    pl.seed_everything(0, verbose=False)
    layers, outgoing = ["encoder.0", "encoder.2"], {"encoder.0": "encoder.2"}
    mon = NeuronTopologyMonitor(layers=layers, outgoing=outgoing, every_n_train_steps=5)
    model = TinyModel()
    t = trainer(tmp_path, accelerator=lightning_accelerator(device), max_steps=20, callbacks=[mon])
    t.fit(model, loader())
    assert [h["step"] for h in mon.history] == [5, 10, 15, 20]
    engine, _ = mon._engines["encoder.0"]
    assert engine.points().device.type == device
    # the weights after step 20 are those of the last check: measured again on the CPU, by a fresh monitor
    on_cpu = NeuronTopologyMonitorCore(layers, outgoing=outgoing, every_n_train_steps=5)
    on_cpu.attach(copy.deepcopy(model).cpu())
    expected = on_cpu.run_check(20)
    last = mon.history[-1]
    assert expected  # not vacuous: every layer's values
    for key, value in expected.items():
        if key.endswith(("/b0", "/b1", "merged_fraction")):
            assert last[key] == value, key
        else:
            assert last[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


# -------------------------------------------------------------------------------------------------- distributed
DDP_WORKER = textwrap.dedent(
    """
    import json, sys, warnings
    import torch
    import lightning.pytorch as pl
    from lightning.pytorch.plugins.environments import LightningEnvironment
    import topo_callbacks.core.monitor as monitor_module
    from tests.procs import finish_distributed
    from tests.lightning_helpers import loader
    from tests.test_devices import collapsing_model
    from topo_callbacks.lightning import CollapseMonitor

    # the device of every sample the monitor gathers (its own call, as the check makes it)
    gathered = []
    _gather = monitor_module.gather_samples
    def recording_gather(*args, **kwargs):
        rows = _gather(*args, **kwargs)
        gathered.append(rows.device.type)
        return rows
    monitor_module.gather_samples = recording_gather


    class Dump(pl.Callback):
        def __init__(self, monitor):
            self.monitor = monitor

        def on_train_end(self, trainer, pl_module):
            mon = self.monitor
            result = {"backend": torch.distributed.get_backend(), "world": trainer.world_size,
                      "module_device": pl_module.device.type, "gathered": gathered,
                      "engine": mon.tracker.engine is not None,
                      "global_step": trainer.global_step, "stopped_step": mon.stopped_step,
                      "reason": mon.stopping_reason.name, "history": mon.history}
            with open(f"{out}/result.json", "w") as fh:
                json.dump(result, fh)


    out, accelerator = sys.argv[1], sys.argv[2]
    warnings.simplefilter("ignore")
    pl.seed_everything(0, verbose=False)
    mon = CollapseMonitor(layer="encoder", every_n_train_steps=4, max_samples=64, divergence_threshold=0.9,
                          stop_on_alarm=True, max_overhead=None)
    # one device under ddp: a real process group (NCCL on a GPU, gloo on the CPU) of one rank, nothing launched
    # LightningEnvironment: Lightning's cluster detection imports mpi4py where it is installed, which initialises MPI
    # and fails where no MPI runtime runs (the GPU machine's image has mpi4py without one)
    trainer = pl.Trainer(strategy="ddp", accelerator=accelerator, devices=1, max_steps=40, callbacks=[mon, Dump(mon)],
                         plugins=[LightningEnvironment()],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    model = collapsing_model()
    trainer.fit(model, loader(n=2048, batch_size=32))
    del trainer, model, mon
    finish_distributed()
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_lightning_ddp_one_device_gathers_on_it_and_stops(tmp_path: Path, device: str):
    """``strategy="ddp"``, one device: on a GPU the process group is NCCL, and the monitor's gathered rows (on which
    a stream check computes: it keeps no engine) and the reduced stop decision all go through it on the GPU. A
    subprocess: Lightning's ddp leaves its process group and MASTER_PORT behind."""
    pytest.importorskip("lightning")
    run_script(DDP_WORKER, tmp_path, lightning_accelerator(device), timeout=180)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["backend"] == ("nccl" if device == "cuda" else "gloo")
    assert result["world"] == 1
    assert result["module_device"] == device
    assert not result["engine"]
    assert result["gathered"] == [device] * len(result["history"])  # one gather per check, on the device
    check_stopped_on_collapse(result["history"], result["stopped_step"], result["global_step"])
    assert result["reason"] == "DIVERGENCE_THRESHOLD"


GATHER_WORKER = textwrap.dedent(
    """
    import json, sys, warnings
    import torch
    import torch.distributed as dist
    from torch import nn
    import topo_callbacks.core.monitor as monitor_module
    from tests.procs import finish_distributed
    from topo_callbacks.core import CollapseMonitorCore, gather_samples
    from topo_callbacks.core.gather import broadcast_from_rank0, sum_across_ranks

    out, device = sys.argv[1], torch.device(sys.argv[2])
    # gloo: it moves CUDA tensors through host memory, so two ranks can share one GPU (NCCL refuses that)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    res = {}
    # uneven: rank 0 has 3 rows, rank 1 has 7; budget 100 keeps all
    x = torch.full((3 if rank == 0 else 7, 4), float(rank), device=device)
    rows = gather_samples(x, max_samples=100)
    res["uneven"] = [rows.device.type, rows[:, 0].tolist()]
    # an empty rank: rank 1 captured nothing and says where its (0, d) part lives
    rows = gather_samples(torch.ones(5, 4, device=device) if rank == 0 else None, max_samples=100, device=device)
    res["empty"] = [rows.device.type, list(rows.shape)]
    rows = gather_samples(x, max_samples=100, dst=0)
    res["to_rank0"] = [rows.device.type, list(rows.shape)]
    res["sum"] = sum_across_ranks([rank + 1, 10], device)
    res["broadcast"] = broadcast_from_rank0({"from": rank}, device)

    gathered = []
    _gather = monitor_module.gather_samples
    def recording_gather(*args, **kwargs):
        rows = _gather(*args, **kwargs)
        gathered.append(rows.device.type)
        return rows
    monitor_module.gather_samples = recording_gather

    def monitored_run(compute_on):
        # the core monitor on a model on the device: ranks see different data, rank 1 none around the check at 4
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh()).to(device)
        mon = CollapseMonitorCore("0", every_n_train_steps=2, max_samples=64, compute_on=compute_on, max_overhead=None)
        mon.attach(model)
        g = torch.Generator().manual_seed(100 + rank)
        cis = []
        for step in range(1, 7):
            mon.prepare_step(step)
            n = 8 if rank == 0 else (0 if step in (3, 4) else 12)
            if n:
                model(torch.randn(n, 8, generator=g).to(device))
            if mon.is_check_step(step):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    result = mon.run_check(step)
                cis.append(None if result.report is None else [result.report.ci, result.report.n])
        return cis

    res["cis"] = monitored_run("all")
    res["cis_rank0"] = monitored_run("rank0")
    res["gathered"] = gathered
    with open(f"{out}/rank{rank}.json", "w") as fh:
        json.dump(res, fh)
    finish_distributed()
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_gather_keeps_rows_on_device_across_two_ranks(tmp_path: Path, device: str):
    """Two ranks under torchrun with their rows on ``device``: uneven and empty ranks, to all and to rank 0, the
    counters and the broadcast; the core monitor's gathered sample stays on the device, and both ranks agree."""
    run_script(GATHER_WORKER, tmp_path, device, launcher="torchrun", timeout=180)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["uneven"] == r1["uneven"] == [device, [0.0] * 3 + [1.0] * 7]
    assert r0["empty"] == r1["empty"] == [device, [5, 4]]
    assert r0["to_rank0"] == [device, [10, 4]]
    assert r1["to_rank0"] == [device, [0, 4]]
    assert r0["sum"] == r1["sum"] == [3, 20]
    assert r0["broadcast"] == r1["broadcast"] == {"from": 0}
    assert r0["cis"] == r1["cis"]  # the same CI and sample size on both ranks, at every check
    assert [c[1] for c in r0["cis"]] == [40, 16, 40]  # check 4: rank 1 contributed nothing
    assert r0["cis_rank0"] == r1["cis_rank0"] == r0["cis"]  # computed on rank 0 and broadcast: the same values
    assert set(r0["gathered"]) == set(r1["gathered"]) == {device}
    assert len(r0["gathered"]) == 6  # one gather per check, 3 checks per run


READS_WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch, torch.distributed as dist
    from tests.procs import finish_distributed
    from topo_callbacks.core.step_reads import StepReads

    out, device = sys.argv[1], torch.device(sys.argv[2])
    dist.init_process_group("gloo")  # gloo moves CUDA tensors through host memory: two ranks can share one GPU
    rank = dist.get_rank()
    reads = StepReads(2, keep_cpu_tensors=True)
    got = []
    for step in range(1, 10):
        # rank 0 gives a device loss, rank 1 a host number; only rank 1 has a gradient norm, at odd steps
        loss = torch.tensor(float(step), device=device) if rank == 0 else float(step + 2)
        grad = torch.tensor(10.0 * step, device=device) if (rank == 1 and step % 2) else None
        reads.add(step, [loss, grad, 0.5])
        got.append([step, reads.ready(device, force=step == 9)])
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump(got, fh)
    finish_distributed()
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_two_ranks_read_device_values_in_batches_at_the_same_steps(tmp_path: Path, device: str):
    """Under DDP the per-step values of a batch (here 2 steps) are one table all-reduced once, the device values
    added to the host numbers on the device; each batch is picked up when the next is due, at the same step on
    both ranks, and averaged over the ranks that gave a value."""
    run_script(READS_WORKER, tmp_path, device, launcher="torchrun", timeout=180)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1
    seen = {step: at for at, rows in r0 for step, _ in rows}
    values = {step: row for _, rows in r0 for step, row in rows}
    assert values == {s: [s + 1.0, 10.0 * s if s % 2 else None, 0.5] for s in range(1, 10)}
    if device == "cuda":  # a batch sent at 2, 4, 6 is picked up when the next is due (4, 6, 8); the rest forced
        assert seen == {1: 4, 2: 4, 3: 6, 4: 6, 5: 8, 6: 8, 7: 9, 8: 9, 9: 9}


# ----------------------------------------------------------------------------------------------------- rollback
def _state_copy(obj: Any) -> Any:
    """A host-memory deep copy of a state tree, to compare a restore with."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _state_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_state_copy(v) for v in obj)
    return copy.deepcopy(obj)


def _assert_same_state(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype, where
        assert torch.equal(a.cpu(), b.cpu()), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same_state(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_state(x, y, f"{where}/{i}")
    else:
        assert a == b, where


@pytest.mark.parametrize("device", DEVICES)
def test_per_step_path_on_device_feeds_the_detector_the_values_it_was_given(device: str):
    """The per-step path as the adapters drive it (`add_loss` with the loss tensor, `step_grad_norm` of the model,
    `observe_step`) on ``device``: on CUDA the values stay there and are read in batches (a stack and one copy per
    batch of `DEVICE_READ_EVERY`, several in flight, `StepReads`), and the detector ends with exactly the
    references of a CPU monitor fed the same values as numbers. On the CPU the same test runs the host path against
    itself."""
    from topo_callbacks.core import CollapseMonitorCore
    from topo_callbacks.core.step_reads import DEVICE_READ_EVERY

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    on_device = CollapseMonitorCore("1", every_n_train_steps=10**6, max_overhead=None)
    on_device.attach(model)
    on_host = CollapseMonitorCore("1", every_n_train_steps=10**6, max_overhead=None)
    gen = torch.Generator().manual_seed(1)
    steps = 100
    for step in range(1, steps + 1):
        on_device.prepare_step(step)
        x = torch.randn(64, 16, generator=gen).to(device)
        loss = (model(x) - x[:, :4]).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        on_device.add_loss(loss)
        grad_norm = on_device.step_grad_norm(model, step)
        opt.step()
        on_device.observe_step(step, grad_norm=grad_norm, lr=0.05)
        assert grad_norm is not None
        on_host.observe_step(step, loss=float(loss), grad_norm=float(grad_norm), lr=0.05)
    on_device.end_of_training(steps)
    on_host.end_of_training(steps)
    assert on_device.detector is not None
    assert on_host.detector is not None
    for name in ("loss", "grad_norm"):
        got = list(on_device.detector.states[name].reference)
        assert len(got) == steps
        assert got == list(on_host.detector.states[name].reference), name
    reads = on_device._step_reads
    if device == "cuda":
        assert reads is not None
        assert reads.reads <= steps // DEVICE_READ_EVERY + 2  # batches, not a read per step
        assert isinstance(grad_norm, torch.Tensor)
        assert grad_norm.device.type == "cuda"


@pytest.mark.parametrize("device", DEVICES)
def test_step_reads_batch_values_of_two_devices_in_one_copy(device: str):
    """A batch whose values lie on two devices (a model split over devices: its loss on the last, its gradient norm
    met on the first) lands whole and exact: the values are stacked on the first one's device and copied once."""
    from topo_callbacks.core.step_reads import StepReads

    reads = StepReads(2, keep_cpu_tensors=True)
    reads.add(1, [torch.tensor(1.5, device=device), torch.tensor(2.0), 0.25])
    assert reads.ready(torch.device(device)) == []
    reads.add(2, [torch.tensor(3.0, device=device, dtype=torch.bfloat16), None, torch.tensor(True, device=device)])
    out = reads.ready(torch.device(device), force=True)
    assert out == [(1, [1.5, 2.0, 0.25]), (2, [3.0, None, 1.0])]


@pytest.mark.parametrize("device", DEVICES)
def test_snapshot_on_device_restores_model_optimizer_scheduler_scaler_and_rng_bit_for_bit(device: str):
    """A snapshot of a model training on ``device`` (AdamW moments, a step schedule, a real ``GradScaler``: on CUDA
    with fp16 autocast and a live scale, on the CPU disabled) is copied to host memory (pinned, non-blocking on
    CUDA: the copies overlap the next steps), the run goes on and changes every piece of state, and a restore gives
    back exactly what a direct copy taken at the snapshot holds, the device's random generator included; the
    restored tensors live on the device again, and training continues from them."""
    from topo_callbacks.core import TrainingState

    dev = torch.device(device)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.BatchNorm1d(64), nn.Linear(64, 4)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10, growth_interval=2, enabled=device == "cuda")
    gen = torch.Generator().manual_seed(1)

    def train(steps: int) -> None:
        for _ in range(steps):
            x = torch.randn(32, 16, generator=gen).to(dev)
            y = torch.randint(0, 4, (32,), generator=gen).to(dev)
            with torch.autocast(device, dtype=torch.float16, enabled=device == "cuda"):
                loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()

    def direct() -> dict[str, Any]:
        rng = {"cpu": torch.get_rng_state()}
        if device == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(dev)
        return _state_copy({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                            "scaler": scaler.state_dict(), "rng": rng})  # fmt: skip

    train(5)
    state = TrainingState(model, opt, sched, scaler)
    expected = direct()
    snap = state.snapshot(step=5)
    buffers = list(snap._buffers.values())
    assert buffers
    assert all(b.device.type == "cpu" for b in buffers)
    model_buffers = [b for path, b in snap._buffers.items() if path[0] == "model"]
    assert all(b.is_pinned() for b in model_buffers) == (device == "cuda")  # pinned host buffers for device tensors
    torch.rand(3, device=dev)  # move the device's generator on
    train(5)
    moved = direct()
    assert not torch.equal(moved["model"]["0.weight"], expected["model"]["0.weight"])
    assert moved["sched"] != expected["sched"]
    if device == "cuda":
        assert moved["scaler"]["scale"] != expected["scaler"]["scale"]  # growth every 2 steps changed it
        assert not torch.equal(moved["rng"]["cuda"], expected["rng"]["cuda"])
    state.restore(snap)
    _assert_same_state(direct(), expected)
    assert {p.device.type for p in model.parameters()} == {device}
    assert {v.device.type for s in opt.state.values() for v in s.values() if v.dim() > 0} == {device}
    if device == "cuda":
        assert snap.device_ms is not None  # the copies' time, read off CUDA events
        assert snap.device_ms >= 0.0
    train(2)  # the optimizer holds the restored moments on the device, and steps with them
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_lightning_rollback_on_device_rescues_a_learning_rate_blowup(tmp_path: Path, device: str):
    """tests/test_rollback.py's Lightning rescue with the model on ``device``: the learning rate x50 at one step; the
    monitor alarms within steps, restores (from pinned host memory, on CUDA) the newest snapshot before the onset,
    halves the rate, and the run ends as well as its healthy twin on the same device."""
    from tests.test_rollback import (
        GLITCH,
        POLICY,
        RESCUED,
        LrGlitch,
        assert_one_rollback_before_the_onset,
        held_out_mse,
        run_lightning,
    )

    accelerator = lightning_accelerator(device)
    healthy, _, _ = run_lightning(tmp_path, accelerator=accelerator)
    rescued, monitor, trainer = run_lightning(tmp_path, POLICY, glitch=LrGlitch(GLITCH), accelerator=accelerator)
    assert monitor is not None
    assert_one_rollback_before_the_onset(monitor)
    assert trainer.strategy.root_device.type == device
    assert monitor.summary()["snapshots"]["taken"] >= 2
    assert math.isfinite(held_out_mse(rescued))
    assert held_out_mse(rescued) <= RESCUED * held_out_mse(healthy)
