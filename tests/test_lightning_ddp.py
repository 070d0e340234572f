"""CollapseMonitor under Lightning ddp, ddp_spawn and FSDP2 with two real CPU processes (gloo), and resumed on one.

Each run is a subprocess with a clean environment, a free port and a timeout: Lightning's ``ddp`` re-runs the
launching command for rank 1 and leaves its process group behind, so it must not run inside pytest itself.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.procs import run_script

SCRIPT = textwrap.dedent(
    """
    import json, sys, warnings
    import torch
    import lightning.pytorch as pl
    from tests.procs import destroy_group_at_exit, finish_distributed
    from tests.lightning_helpers import TinyModel, loader, shard_every_linear
    from topo_callbacks.lightning import CollapseMonitor

    destroy_group_at_exit()  # module level: runs in the processes ddp_spawn starts, which never reach the end below


    class Uneven(TinyModel):
        # rank 1 trains on 8 of its 32 rows, and on none in steps 5-8 (its whole capture window for the check at 8);
        # the encoder collapses (every row one constant vector) from step 15 on
        def training_step(self, batch, batch_idx):
            x, y = batch
            if self.global_rank == 1:
                keep = 0 if 5 <= self.global_step + 1 <= 8 else 8
                x, y = x[:keep], y[:keep]
            self.encoder[3].enabled = self.global_step >= 14
            pred = self(x)
            return ((pred - y) ** 2).sum() / max(len(x), 1)


    class Sharded(Uneven):
        # FSDP2 through Lightning's ModelParallelStrategy (Lightning's FSDPStrategy, FSDP1, needs a GPU): each
        # Linear and then the root sharded over the data-parallel mesh; the watched `encoder` is not itself sharded
        def configure_model(self):
            shard_every_linear(self, self.device_mesh["data_parallel"])


    class Dump(pl.Callback):
        # written from inside each rank's run: ddp_spawn does not send callback state back to the parent
        def __init__(self, monitor, out):
            self.monitor, self.out = monitor, out

        def on_train_end(self, trainer, pl_module):
            mon = self.monitor
            result = {"rank": trainer.global_rank, "global_step": trainer.global_step,
                      "resets": mon.tracker.resets, "last_edit": mon.tracker.last_edit,
                      "stopped_step": mon.stopped_step, "reason": mon.stopping_reason.name,
                      "ci": [[h["step"], h["ci"], h["n"]] for h in mon.history]}
            with open(f"{self.out}/rank{trainer.global_rank}.json", "w") as fh:
                json.dump(result, fh)


    def fit(out, config, seed):
        # a fixed initialisation: the tiny model's healthy CI wanders with it (up to ~0.7 seen)
        pl.seed_everything(seed, verbose=False)
        strategy, _, source = config.partition("+")
        probe = torch.randn(40, 16, generator=torch.Generator().manual_seed(7)) if source == "probe" else None
        mon = CollapseMonitor(layer="encoder", every_n_train_steps=4, max_samples=96, divergence_threshold=0.9,
                              stop_on_alarm=True, source=source or "stream", probe=probe,
                              calibration_checks=1 if probe is not None else 3, max_overhead=None)
        model = Uneven()
        if strategy == "fsdp2":
            from lightning.pytorch.strategies import ModelParallelStrategy

            strategy, model = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), Sharded()
        trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=2, max_steps=40,
                             callbacks=[mon, Dump(mon, f"{out}/{config}")],
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False)
        trainer.fit(model, loader(n=2048, batch_size=32))


    if __name__ == "__main__":  # ddp_spawn re-imports this file in its workers
        # several configurations in one launch, one Trainer after the other (the processes ddp starts run this same
        # loop; the later Trainers reuse the process group): a launch costs ~8 s of imports per process
        out, configs = sys.argv[1], sys.argv[2].split(",")
        seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
        warnings.simplefilter("ignore")
        for config in configs:
            fit(out, config, seed)
        finish_distributed()
    """
)


LAUNCHES = {"ddp": "ddp,ddp+probe", "ddp_spawn": "ddp_spawn", "fsdp2": "fsdp2,fsdp2+probe"}


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Run the launch that holds a configuration (once per module) and return that configuration's folder."""
    done: dict[str, Path] = {}

    def results(config: str) -> Path:
        launch = next(configs for configs in LAUNCHES.values() if config in configs.split(","))
        if launch not in done:
            out = tmp_path_factory.mktemp("lightning_ddp")
            done[launch] = run_script(SCRIPT, out, launch, timeout=400, folders=launch.split(","))
        return done[launch] / config

    return results


def ranks(folder: Path) -> tuple[dict, dict]:
    r0, r1 = (json.loads((folder / f"rank{r}.json").read_text()) for r in (0, 1))
    return r0, r1


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn", "fsdp2"])
def test_ddp_ranks_log_the_same_ci_and_stop_together(launched: Callable[[str], Path], strategy: str):
    r0, r1 = ranks(launched(strategy))
    assert r0["ci"] == r1["ci"]  # identical CI series (values and gathered sample sizes) on both ranks
    sizes = {c[0]: c[2] for c in r0["ci"]}
    assert sizes[4] == 48 + 32  # uneven ranks: rank 0's budget share (48 of 96) + rank 1's 4 steps x 8 rows
    assert sizes[8] == 48  # rank 1 had no rows for this check and still took part in the gather
    stop = r0["stopped_step"]
    assert stop == r1["stopped_step"] == r0["global_step"] == r1["global_step"]  # the same step on both ranks
    assert stop in (16, 20)  # the encoder collapses from step 15 on; the check at 16 or 20 sees it
    assert r0["reason"] == r1["reason"] == "DIVERGENCE_THRESHOLD"
    assert [c[0] for c in r0["ci"]] == list(range(4, stop + 1, 4))
    assert all(ci <= 0.9 for step, ci, _ in r0["ci"] if step <= 12)  # no stop before the collapse
    assert r0["ci"][-1][1] > 0.9


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_probe_checks_agree_on_both_ranks_and_stop_together(launched: Callable[[str], Path], strategy: str):
    """source="probe": each rank embeds the same probe (under FSDP2 a forward that all-gathers the shards, so
    every rank must take part); the engine is fed moves; the collapse stops both ranks."""
    r0, r1 = ranks(launched(f"{strategy}+probe"))
    assert r0["ci"] == r1["ci"]
    assert {c[2] for c in r0["ci"]} == {40}  # the probe's 40 rows, counted once, at every check
    stop = r0["stopped_step"]
    assert stop == r1["stopped_step"] == r0["global_step"] == r1["global_step"] == 16  # first check after step 15
    assert r0["reason"] == r1["reason"] == "DIVERGENCE_THRESHOLD"
    assert r0["resets"] == r1["resets"] == 1  # one engine since calibration (check 4): a reset at 8, then moves
    assert r0["last_edit"] == r1["last_edit"] == "move 40"


RESUME_SCRIPT = textwrap.dedent(
    """
    import json, sys, warnings
    import torch
    import lightning.pytorch as pl
    from tests.procs import finish_distributed
    from lightning.pytorch.callbacks import ModelCheckpoint
    from tests.lightning_helpers import TinyModel, loader
    from topo_callbacks.lightning import CollapseMonitor

    out = sys.argv[1]
    pl.seed_everything(0, verbose=False)
    warnings.simplefilter("ignore")
    mon = CollapseMonitor(layer="encoder", every_n_train_steps=4, max_samples=64, max_overhead=None)
    ckpt = ModelCheckpoint(dirpath=f"{out}/ckpt", every_n_train_steps=12, save_top_k=-1)
    trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_steps=12, callbacks=[mon, ckpt],
                         logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(TinyModel(), loader(n=2048, batch_size=32))
    if trainer.global_rank == 0:
        with open(f"{out}/state.json", "w") as fh:
            json.dump(mon.state_dict(), fh)
    del trainer, mon
    finish_distributed()
    """
)


@pytest.mark.slow
def test_resume_on_another_world_size_continues_the_series(tmp_path: Path):
    """Two ddp processes save at step 12; one process resumes: scale, baseline and history go on, budget re-split."""
    from tests.lightning_helpers import TinyModel, loader, trainer
    from topo_callbacks.lightning import CollapseMonitor

    run_script(RESUME_SCRIPT, tmp_path)
    saved = json.loads((tmp_path / "state.json").read_text())
    assert saved["world_size"] == 2
    assert [h["n"] for h in saved["history"]] == [64, 64, 64]  # 32 rows per rank
    (path,) = (tmp_path / "ckpt").glob("*.ckpt")

    resumed = CollapseMonitor(layer="encoder", every_n_train_steps=4, max_samples=64, max_overhead=None)
    t = trainer(tmp_path, max_steps=24, callbacks=[resumed])
    t.fit(TinyModel(), loader(n=2048, batch_size=32), ckpt_path=str(path))
    assert resumed.eps == saved["eps"]  # calibrated on two processes, held on one
    assert resumed.history[:3] == saved["history"]
    assert [h["step"] for h in resumed.history] == [4, 8, 12, 16, 20, 24]
    # calibration ended at the third check (before the save); the baseline is the three checks after it
    assert saved["rule"]["baseline_values"] == []
    assert resumed.rule.state_dict()["baseline_values"] == [h["ci"] for h in resumed.history[3:]]
    # the whole budget now comes from the one process, from the first check after the resume on
    assert [h["n"] for h in resumed.history[3:]] == [64, 64, 64]


WRONG_LAYER_SCRIPT = textwrap.dedent(
    """
    import sys, warnings
    import torch
    import lightning.pytorch as pl
    from tests.procs import finish_distributed
    from tests.lightning_helpers import TinyModel, loader
    from topo_callbacks.lightning import CollapseMonitor

    out = sys.argv[1]
    warnings.simplefilter("ignore")
    trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_steps=5,
                         callbacks=[CollapseMonitor(layer="encodr.2", max_overhead=None)], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    try:
        trainer.fit(TinyModel(), loader())
    except ValueError as err:
        with open(f"{out}/rank{trainer.global_rank}.txt", "w") as fh:
            fh.write(f"{trainer.global_step} {err}")
    del trainer
    finish_distributed()
    """
)


@pytest.mark.slow
def test_wrong_layer_fails_before_training_on_every_rank(tmp_path: Path):
    run_script(WRONG_LAYER_SCRIPT, tmp_path, timeout=120)
    for rank in (0, 1):
        step, message = (tmp_path / f"rank{rank}.txt").read_text().split(" ", 1)
        assert step == "0"  # not one optimizer step was taken
        assert "Close matches: ['encoder.2'" in message
