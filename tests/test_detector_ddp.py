"""The default detector under Lightning ddp (two CPU processes, gloo): the ranks see different losses (different data,
uneven batches), yet every step's values are averaged over ranks, so both take the same decision at the same step.

A subprocess with a clean environment, a free port and a timeout, as every multi-process test here.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from tests.procs import run_script

SCRIPT = textwrap.dedent(
    """
    import json, sys, warnings
    import lightning.pytorch as pl
    from tests.procs import finish_distributed
    from tests.lightning_helpers import TinyModel, loader
    from topo_callbacks.lightning import CollapseMonitor


    class Breaks(TinyModel):
        # rank 1 trains on 8 of its 32 rows (its loss is noisier than rank 0's); from step BREAK on, the encoder
        # outputs one constant vector, so the head cannot fit and the loss jumps on both ranks
        def training_step(self, batch, batch_idx):
            x, y = batch
            if self.global_rank == 1:
                x, y = x[:8], y[:8]
            self.encoder[3].enabled = BREAK is not None and self.global_step + 1 >= BREAK
            return ((self(x) - y) ** 2).mean()


    class Dump(pl.Callback):
        def __init__(self, monitor, out):
            self.monitor, self.out = monitor, out

        def on_train_end(self, trainer, pl_module):
            mon = self.monitor
            result = {"rank": trainer.global_rank, "global_step": trainer.global_step,
                      "first_alarm_step": mon.first_alarm_step, "stopped_step": mon.stopped_step,
                      "reason": mon.stopping_reason.name, "channel": mon.summary()["first_alarm_channel"],
                      "detector": mon.detector.state_dict(), "history": mon.history}
            with open(f"{self.out}/rank{trainer.global_rank}.json", "w") as fh:
                json.dump(result, fh)


    if __name__ == "__main__":
        # both arms in one launch, one Trainer after the other: the children ddp starts run this same loop, and the
        # second Trainer reuses the process group (a launch costs ~8 s of imports per process)
        out = sys.argv[1]
        warnings.simplefilter("ignore")
        for arm in ("healthy", "failure"):
            BREAK = 260 if arm == "failure" else None
            pl.seed_everything(0, verbose=False)
            mon = CollapseMonitor(layer="encoder", every_n_train_steps=20, max_samples=128, stop_on_alarm=True,
                                  max_overhead=None)  # every step read: the test compares the ranks' feeds
            trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_steps=340,
                                 callbacks=[mon, Dump(mon, f"{out}/{arm}")], logger=False,
                                 enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
            trainer.fit(Breaks(), loader(n=4096, batch_size=32))
        finish_distributed()
    """
)


@pytest.fixture(scope="module")
def both_arms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_script(SCRIPT, tmp_path_factory.mktemp("detector_ddp"), timeout=400, folders=("healthy", "failure"))


@pytest.mark.slow
@pytest.mark.parametrize("arm", ["failure", "healthy"])
def test_ranks_feed_the_detector_alike_and_stop_at_the_same_step(both_arms: Path, arm: str) -> None:
    r0, r1 = (json.loads((both_arms / arm / f"rank{r}.json").read_text()) for r in (0, 1))
    # the detector's whole state (reference windows, accumulators) is the same on both ranks, bit for bit
    assert r0["detector"] == r1["detector"]

    def values(history: list[dict]) -> list[dict]:  # the check's wall time is each rank's own
        return [{k: v for k, v in h.items() if k != "time_s"} for h in history]

    assert values(r0["history"]) == values(r1["history"])
    for key in ("first_alarm_step", "stopped_step", "reason", "channel", "global_step"):
        assert r0[key] == r1[key], key
    if arm == "healthy":
        assert r0["first_alarm_step"] is None
        assert r0["global_step"] == 340
        assert len(r0["detector"]["channels"]["loss"]["reference"]) == 200
    else:
        # the loss jumps at 260: the per-step channels fire within steps, between two checks (260 and 280)
        assert 260 <= r0["first_alarm_step"] < 280, r0["first_alarm_step"]
        assert r0["stopped_step"] == r0["first_alarm_step"] == r0["global_step"]
        assert r0["reason"] == "DETECTOR"
        assert r0["channel"] in ("loss", "loss_spike", "grad_norm")
