"""`topo-callbacks demo`: SimSiam on scikit-learn's bundled digits, stop-gradient removed at a known step.

A small SimSiam model (backbone, projector, predictor) trains on augmented 8x8 digits on the CPU. In the
collapse run the stop-gradient on the target branch is removed at step ``t0`` (SimSiam's paper shows this
makes the representation collapse); ``--healthy`` keeps it. A `CollapseMonitor` at its defaults watches the
projector, and a kNN probe on held-out digits measures the backbone's downstream accuracy. The run writes
``summary.json`` (t0, first alarm, accuracy-drop step, lead) and ``timeline.png``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from topo_callbacks.bench.tasks import augment as _augment
from topo_callbacks.bench.tasks import digits as _load_digits
from topo_callbacks.bench.tasks import knn_accuracy as _knn_accuracy

__all__ = ["drop_step", "run_demo"]

DROP_POINTS = 5.0  # accuracy points below the best that count as a drop
DROP_EVALS = 3  # consecutive evaluations the drop must last


def drop_step(knn_acc: list[tuple[int, float]], points: float = DROP_POINTS, evals: int = DROP_EVALS) -> int | None:
    """First evaluation step at which accuracy is ``points`` below its best so far and stays so for ``evals``.

    Example:
        >>> drop_step([(0, 90.0), (10, 91.0), (20, 80.0), (30, 70.0), (40, 60.0)])
        20
        >>> drop_step([(0, 90.0), (10, 80.0), (20, 90.0), (30, 80.0)]) is None
        True
    """
    from topo_callbacks.bench.detectors import drop_step as _drop

    return _drop(knn_acc, mode="max", points=points, evals_needed=evals)


def _build_module(t0: int | None, lr: float) -> Any:
    import lightning.pytorch as pl

    class SimSiam(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = nn.Sequential(nn.Linear(64, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 128))
            # No normalisation after the last projector layer: nothing then stops the output collapsing to a point.
            self.projector = nn.Sequential(nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 128))
            self.predictor = nn.Sequential(nn.Linear(128, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 128))
            self.gen = torch.Generator().manual_seed(0)

        def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
            (x,) = batch
            z1 = self.projector(self.backbone(_augment(x, self.gen)))
            z2 = self.projector(self.backbone(_augment(x, self.gen)))
            p1, p2 = self.predictor(z1), self.predictor(z2)
            stop_gradient = t0 is None or self.global_step < t0
            t1, t2 = (z1.detach(), z2.detach()) if stop_gradient else (z1, z2)
            cos = nn.functional.cosine_similarity
            loss = -(cos(p1, t2).mean() + cos(p2, t1).mean()) / 2
            self.log("loss", loss, prog_bar=True)
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)

    return SimSiam()


def run_demo(
    out: str | Path = "demo_out",
    *,
    healthy: bool = False,
    seed: int = 0,
    steps: int = 2000,
    t0: int | None = None,
    eval_every: int = 25,
    batch_size: int = 128,
    lr: float = 0.05,
    quiet: bool = False,
) -> dict[str, Any]:
    """Train the demo and return (and write) its summary; see the module docstring."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from topo_callbacks.lightning import CollapseMonitor

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = (3 * steps) // 10 if t0 is None else t0
    pl.seed_everything(seed, verbose=False)
    x_train, y_train, x_test, y_test = _load_digits(seed)
    model = _build_module(None if healthy else t0, lr)
    monitor = CollapseMonitor(layer="projector")
    knn: list[tuple[int, float]] = []
    rows: list[str] = []

    class Probe(pl.Callback):
        def _evaluate(self, trainer: Any, module: Any) -> None:
            step = trainer.global_step
            was_training = module.training
            module.eval()
            with torch.no_grad():
                acc = _knn_accuracy(module.backbone(x_train), y_train, module.backbone(x_test), y_test)
            module.train(was_training)
            knn.append((step, acc))
            ci = next((h["ci"] for h in reversed(monitor.history) if h["step"] == step), None)
            alarm = monitor.first_alarm_step is not None and monitor.first_alarm_step <= step
            line = f"{step:>6} {acc:>8.1f} {'' if ci is None else f'{ci:.3f}':>7} {'ALARM' if alarm else '':>6}"
            rows.append(line)
            if not quiet:
                print(line, flush=True)

        def on_train_start(self, trainer: Any, module: Any) -> None:
            if not quiet:
                arm = "healthy" if healthy else "collapse"
                print(f"{'step':>6} {'knn_acc':>8} {'ci':>7} {'alarm':>6}   (t0={t0}, {arm} run)")
            self._evaluate(trainer, module)

        def on_train_batch_end(self, trainer: Any, module: Any, *args: Any) -> None:
            if trainer.global_step % eval_every == 0:
                self._evaluate(trainer, module)

    loader = DataLoader(
        TensorDataset(x_train),
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        callbacks=[monitor, Probe()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    import warnings

    from topo_callbacks.core import CollapseWarning

    with warnings.catch_warnings():
        warnings.simplefilter("always" if not quiet else "ignore", CollapseWarning)
        trainer.fit(model, loader)
    drop = drop_step(knn)
    alarm = monitor.first_alarm_step
    summary = {
        "healthy": healthy,
        "seed": seed,
        "steps": steps,
        "t0_step": None if healthy else t0,
        "alarm_step": alarm,
        "alarm_channel": monitor.summary()["first_alarm_channel"],
        "drop_step": drop,
        "lead_steps": None if alarm is None or drop is None else drop - alarm,
        "ci": [[h["step"], h["ci"]] for h in monitor.history],
        "knn_acc": [[s, a] for s, a in knn],
        "eps": monitor.eps,
        "wall_s": time.perf_counter() - start,
        "history": monitor.history,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    _plot(summary, out / "timeline.png")
    if not quiet:
        lead = summary["lead_steps"]
        print(
            f"t0={summary['t0_step']} alarm={alarm} drop={drop} lead={lead} steps"
            f" ({summary['wall_s']:.0f} s) -> {out / 'summary.json'}, {out / 'timeline.png'}"
        )
    return summary


def _plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    steps, acc = zip(*summary["knn_acc"], strict=False) if summary["knn_acc"] else ((), ())
    ax.plot(steps, acc, color="tab:blue", label="kNN accuracy (%)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("kNN accuracy (%)", color="tab:blue")
    ax2 = ax.twinx()
    if summary["ci"]:
        s, c = zip(*summary["ci"], strict=False)
        ax2.plot(s, c, color="tab:red", marker="o", ms=3, label="collapse index")
    ax2.set_ylabel("collapse index", color="tab:red")
    ax2.set_ylim(-0.02, 1.02)
    for key, style, label in (
        ("t0_step", ":", "t0 (stop-gradient removed)"),
        ("alarm_step", "--", "first alarm"),
        ("drop_step", "-.", "accuracy drop"),
    ):
        if summary.get(key) is not None:
            ax.axvline(summary[key], color="k", linestyle=style, label=label)
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title("healthy run" if summary["healthy"] else "SimSiam without stop-gradient after t0")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
