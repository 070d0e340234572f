"""One rank of a two-node run, started by ``torchrun`` for tests/test_multinode.py (not a test module itself).

``python tests/multinode_worker.py OUT lightning|accelerate`` trains with that adapter on gloo, the ranks uneven
(global rank 1 trains on fewer rows, and on none for a whole capture window), the watched layer collapsing part
way, and writes ``OUT/rank{global rank}.json``: where it ran (node, local rank, world) and what the monitor saw.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch


def where() -> dict[str, Any]:
    """Where torchrun placed this process: its node (``GROUP_RANK``) and its place on that node."""
    return {
        "node": int(os.environ["GROUP_RANK"]),
        "local_rank": int(os.environ["LOCAL_RANK"]),
        "local_world": int(os.environ["LOCAL_WORLD_SIZE"]),
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
    }


def run_lightning(out: Path) -> None:
    import lightning.pytorch as pl

    from tests.lightning_helpers import TinyModel, loader
    from tests.procs import finish_distributed
    from topo_callbacks.lightning import CollapseMonitor

    class Uneven(TinyModel):
        # global rank 1 trains on 8 of its 32 rows, and on none in steps 5-8 (its whole capture window for the check
        # at 8); the encoder collapses (every row one constant vector) from step 15 on
        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            x, y = batch
            if self.global_rank == 1:
                keep = 0 if 5 <= self.global_step + 1 <= 8 else 8
                x, y = x[:keep], y[:keep]
            self.encoder[3].enabled = self.global_step >= 14
            return ((self(x) - y) ** 2).sum() / max(len(x), 1)

    class Dump(pl.Callback):
        def __init__(self, monitor: CollapseMonitor) -> None:
            self.monitor = monitor

        def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            mon = self.monitor
            result = {**where(), "rank": trainer.global_rank, "world": trainer.world_size,
                      "num_nodes": trainer.num_nodes, "global_step": trainer.global_step,
                      "stopped_step": mon.stopped_step, "reason": mon.stopping_reason.name,
                      "ci": [[h["step"], h["ci"], h["n"]] for h in mon.history]}  # fmt: skip
            (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))

    # a fixed initialisation: the tiny model's healthy CI wanders with it
    pl.seed_everything(0, verbose=False)
    mon = CollapseMonitor(layer="encoder", every_n_train_steps=4, max_samples=96, divergence_threshold=0.9,
                          stop_on_alarm=True, max_overhead=None)  # fmt: skip
    # torchrun's environment (TORCHELASTIC_RUN_ID, RANK, GROUP_RANK, ...) tells Lightning that the processes exist
    # already: it launches nothing and checks that num_nodes x devices is torchrun's world size
    trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=1, num_nodes=2, max_steps=40,
                         callbacks=[mon, Dump(mon)], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    model = Uneven()
    trainer.fit(model, loader(n=2048, batch_size=32))
    del trainer, model, mon
    finish_distributed()


def run_accelerate(out: Path) -> None:
    from accelerate import Accelerator

    from tests.test_accelerate import make_model, train
    from topo_callbacks.accelerate import AccelerateCollapseMonitor

    # cpu=True: on a machine without CUDA, Accelerator() under torchrun gives independent processes
    accelerator = Accelerator(cpu=True)
    model = make_model()
    mon = AccelerateCollapseMonitor(accelerator, model, layer="module.0", every_n_train_steps=5, max_samples=64,
                                    divergence_threshold=0.9, stop_on_alarm=True, max_overhead=None)  # fmt: skip
    # uneven: process 1 trains on 8 of its 32 rows, and on none in steps 6-10; the encoder collapses from step 31
    stopped = train(accelerator, model, mon, steps=60, collapse_at=30, uneven=True)
    result = {**where(), "rank": accelerator.process_index, "world": accelerator.num_processes,
              "global_step": stopped, "stopped_step": mon.stopped_step, "reason": mon.stopping_reason.name,
              "ci": [[h["step"], h["ci"], h["n"]] for h in mon.history]}  # fmt: skip
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps(result))
    # exiting with the gloo group alive can abort at interpreter shutdown; free the DDP-wrapped model first
    del model
    accelerator.free_memory()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    target, framework = Path(sys.argv[1]), sys.argv[2]
    {"lightning": run_lightning, "accelerate": run_accelerate}[framework](target)
