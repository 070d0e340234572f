"""AccelerateCollapseMonitor in a plain Accelerate loop: one process in-test, two processes under torchrun."""

from __future__ import annotations

import json
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")

from accelerate import Accelerator

from tests.lightning_helpers import Collapser, loader
from tests.procs import run_script
from topo_callbacks.accelerate import AccelerateCollapseMonitor
from topo_callbacks.core import StoppingReason


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), Collapser(False))
    return torch.nn.Sequential(encoder, torch.nn.Linear(16, 1))


def train(accelerator, model, monitor, steps, collapse_at=None, uneven=False):
    """``uneven``: process 1 trains on 8 of its 32 rows, and on none in steps 6-10 (the window of the check at 10)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model, optimizer, data = accelerator.prepare(model, optimizer, loader(n=4096, batch_size=32))
    for i, (x, y) in enumerate(data):
        if i == steps:
            break
        if uneven and accelerator.process_index == 1:
            keep = 0 if 6 <= i + 1 <= 10 else 8
            x, y = x[:keep], y[:keep]
        accelerator.unwrap_model(model)[0][2].enabled = collapse_at is not None and i >= collapse_at
        loss = ((model(x) - y) ** 2).sum() / max(len(x), 1)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        if monitor.step():
            return i + 1
    return steps


def test_single_process_loop_checks_logs_and_stops(tmp_path):
    accelerator = Accelerator(cpu=True)
    model = make_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with AccelerateCollapseMonitor(
            accelerator,
            model,
            layer="0",
            every_n_train_steps=5,
            max_samples=64,
            divergence_threshold=0.9,
            stop_on_alarm=True,
            max_overhead=None,
        ) as mon:
            stopped = train(accelerator, model, mon, steps=60, collapse_at=30)
    assert [h["step"] for h in mon.history][:6] == [5, 10, 15, 20, 25, 30]
    assert stopped == mon.stopped_step == 35  # collapse from step 31: the check at 35 sees it
    assert mon.stopping_reason is StoppingReason.DIVERGENCE_THRESHOLD
    assert not model[0]._forward_hooks  # closed by the with block


def test_single_process_probe_source_stops_on_collapse():
    accelerator = Accelerator(cpu=True)
    model = make_model()
    probe = torch.randn(48, 16, generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with AccelerateCollapseMonitor(
            accelerator,
            model,
            layer="0",
            every_n_train_steps=5,
            max_samples=64,
            source="probe",
            probe=probe,
            calibration_checks=1,
            divergence_threshold=0.9,
            stop_on_alarm=True,
            max_overhead=None,
        ) as mon:
            stopped = train(accelerator, model, mon, steps=60, collapse_at=30)
    assert stopped == mon.stopped_step == 35
    assert [h["n"] for h in mon.history] == [48] * 7
    assert mon.tracker.resets == 1
    assert mon.tracker.last_edit == "move 48"


def test_register_for_checkpointing_roundtrip(tmp_path):
    accelerator = Accelerator(cpu=True, project_dir=str(tmp_path))
    model = make_model()
    mon = AccelerateCollapseMonitor(
        accelerator, model, layer="0", every_n_train_steps=5, max_samples=64, max_overhead=None
    )
    accelerator.register_for_checkpointing(mon)
    train(accelerator, model, mon, steps=20)
    accelerator.save_state(str(tmp_path / "ckpt"))
    saved = mon.state_dict()
    fresh_acc = Accelerator(cpu=True, project_dir=str(tmp_path))
    fresh = AccelerateCollapseMonitor(
        fresh_acc, make_model(), layer="0", every_n_train_steps=5, max_samples=64, max_overhead=None
    )
    fresh_acc.register_for_checkpointing(fresh)
    fresh_acc.load_state(str(tmp_path / "ckpt"))
    assert fresh.global_step == 20
    assert fresh.state_dict() == saved
    mon.close()
    fresh.close()


WORKER = textwrap.dedent(
    """
    import json, sys, warnings
    import torch
    from accelerate import Accelerator
    from tests.test_accelerate import make_model, train
    from topo_callbacks.accelerate import AccelerateCollapseMonitor

    warnings.simplefilter("ignore")
    accelerator = Accelerator(cpu=True)
    # each source in turn in one launch (a launch is seconds of imports per process)
    for source in sys.argv[2].split(","):
        model = make_model()
        probe = torch.randn(48, 16, generator=torch.Generator().manual_seed(3)) if source == "probe" else None
        mon = AccelerateCollapseMonitor(accelerator, model, layer="module.0", every_n_train_steps=5, max_samples=64,
                                        divergence_threshold=0.9, stop_on_alarm=True, source=source, probe=probe,
                                        calibration_checks=1 if probe is not None else 3, max_overhead=None)
        stopped = train(accelerator, model, mon, steps=60, collapse_at=30, uneven=True)
        out = {"rank": accelerator.process_index, "world": accelerator.num_processes, "stopped": stopped,
               "stopped_step": mon.stopped_step, "ci": [[h["step"], h["ci"], h["n"]] for h in mon.history],
               "resets": mon.tracker.resets, "last_edit": mon.tracker.last_edit}
        with open(f"{sys.argv[1]}/{source}/rank{accelerator.process_index}.json", "w") as fh:
            json.dump(out, fh)
    # exiting with the gloo group alive can abort at interpreter shutdown ("terminate called without an active
    # exception"): tear it down first, after freeing the DDP-wrapped model (freed later, it intermittently hung)
    del model
    accelerator.free_memory()
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroys the process group in accelerate >= 1.x
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    """
)


@pytest.fixture(scope="module")
def torchrun_sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("accelerate_torchrun")
    return run_script(WORKER, out, "stream,probe", launcher="torchrun", timeout=400, folders=("stream", "probe"))


@pytest.mark.slow
def test_torchrun_two_processes_uneven_and_empty_rank_same_ci_and_same_stop(torchrun_sources: Path):
    r0, r1 = (json.loads((torchrun_sources / "stream" / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2  # really distributed, not two independent processes
    assert r0["ci"] == r1["ci"]
    n_by_step = {s: n for s, _, n in r0["ci"]}
    assert n_by_step[5] == 64  # the global budget, split over the two ranks (32 each)
    assert n_by_step[10] == 32  # process 1 contributed nothing to this check
    assert r0["stopped"] == r1["stopped"] == r0["stopped_step"] == r1["stopped_step"] == 35


@pytest.mark.slow
def test_torchrun_two_processes_probe_source_same_ci_and_same_stop(torchrun_sources: Path):
    """source="probe" under torchrun: both ranks embed the probe through the DDP-wrapped model; it counts once."""
    r0, r1 = (json.loads((torchrun_sources / "probe" / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["ci"] == r1["ci"]
    assert {n for _, _, n in r0["ci"]} == {48}  # the probe's rows, at every check, also when rank 1 had no batch
    assert r0["stopped"] == r1["stopped"] == r0["stopped_step"] == r1["stopped_step"] == 35
    assert all(ci <= 0.9 for step, ci, _ in r0["ci"] if step <= 30)
    # one engine since calibration (the check at 5): a reset at 10, then every check moves the probe's rows
    assert r0["resets"] == r1["resets"] == 1
    assert r0["last_edit"] == r1["last_edit"] == "move 48"


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    """Under `accelerator.accumulate`, the user calls `optimizer.step()` (and the monitor) every micro-batch; only the
    calls where the optimizer really stepped (`sync_gradients`) count, so steps and checks follow optimizer steps."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=4)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model, optimizer, data = accelerator.prepare(model, optimizer, loader(n=4096, batch_size=8))
    mon = AccelerateCollapseMonitor(
        accelerator, model, layer="0", every_n_train_steps=5, max_samples=64, max_overhead=None
    )
    weight = accelerator.unwrap_model(model)[1].weight
    stepped = 0
    for i, (x, y) in enumerate(data):
        if i == 120:
            break
        with accelerator.accumulate(model):
            loss = ((model(x) - y) ** 2).mean()
            accelerator.backward(loss)
            before = weight.detach().clone()
            optimizer.step()
            stepped += int(not torch.equal(before, weight))  # the optimizer really updated the weights
            optimizer.zero_grad()
            mon.step()
    mon.close()
    assert stepped == mon.global_step == 30
    assert [h["step"] for h in mon.history] == [5, 10, 15, 20, 25, 30]
    # a check sees the rows of every micro-batch in its capture window: 64 rows = 8 micro-batches of 8
    assert {h["n"] for h in mon.history} == {64}


def test_tensorboard_tracker_gets_the_checks_and_the_diagram_and_close_summarises(tmp_path, caplog):
    import logging

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accelerator = Accelerator(cpu=True, log_with="tensorboard", project_dir=str(tmp_path))
    accelerator.init_trackers("run")
    model = make_model()
    mon = AccelerateCollapseMonitor(
        accelerator, model, layer="0", every_n_train_steps=5, max_samples=64, max_overhead=None
    )
    train(accelerator, model, mon, steps=10)
    with caplog.at_level(logging.INFO, logger="topo_callbacks.accelerate"):
        mon.close()
        mon.close()  # idempotent: one summary
    accelerator.end_training()
    (events,) = list(tmp_path.rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events.parent))
    acc.Reload()
    assert [e.step for e in acc.Scalars("collapse/ci")] == [5, 10]
    diagram = json.loads((events.parent / "collapse_diagram_collapse_ci.json").read_text())
    assert diagram["step"] == 10
    assert [r.message for r in caplog.records if "checks" in r.message] == [mon.summary_message()]
    assert mon.summary_message().startswith("collapse/ci: 2 checks (steps 5-10), no alarm;")


def test_logger_false_keeps_the_checks_out_of_the_trackers(tmp_path):
    accelerator = Accelerator(cpu=True, log_with="tensorboard", project_dir=str(tmp_path))
    accelerator.init_trackers("run")
    model = make_model()
    with AccelerateCollapseMonitor(
        accelerator, model, layer="0", every_n_train_steps=5, max_samples=64, logger=False, max_overhead=None
    ) as mon:
        train(accelerator, model, mon, steps=10)
    accelerator.end_training()
    assert len(mon.history) == 2
    assert not list(tmp_path.rglob("collapse_diagram_*.json"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = list(tmp_path.rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events.parent))
    acc.Reload()
    assert "collapse/ci" not in acc.Tags()["scalars"]


def test_the_detector_gets_each_optimizer_steps_mean_loss_and_gradient_norm():
    """Under gradient accumulation: the loss channel is the mean over the step's micro-batches, the gradient norm
    that of the accumulated gradients, each read once per optimizer step (checked against a direct computation)."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=4)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model, optimizer, data = accelerator.prepare(model, optimizer, loader(n=8192, batch_size=8))
    mon = AccelerateCollapseMonitor(
        accelerator, model, layer="0", every_n_train_steps=50, max_samples=64, max_overhead=None
    )
    losses, micro, norms = [], [], []
    for i, (x, y) in enumerate(data):
        if i == 4 * 230:
            break
        with accelerator.accumulate(model):
            loss = ((model(x) - y) ** 2).mean()
            accelerator.backward(loss)
            micro.append(loss.item())
            if accelerator.sync_gradients:
                norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))))
                losses.append(sum(micro) / len(micro))
                micro = []
            optimizer.step()
            mon.step(loss=loss)
            optimizer.zero_grad()
    mon.close()
    assert mon.global_step == mon.last_observed_step == 230
    states = mon.detector.states
    assert list(states["loss"].reference) == pytest.approx(losses[-200:], rel=1e-6)
    assert [float(torch.tensor(v).exp()) for v in states["grad_norm"].reference] == pytest.approx(
        norms[-200:], rel=1e-5
    )
