"""The learning-rate critical point: a sweep on a digits MLP, watching whether hidden neurons merge.

For each learning rate (and each weight decay: 0 and 0.01 by default), full-batch gradient descent trains a
64-64-10 tanh MLP on scikit-learn's digits, and a `NeuronTopologyMonitorCore` watches the hidden layer (each
neuron: its incoming weights, bias and outgoing weights) every few steps: the closest pair and the merged
fraction relative to the median neuron norm, b0 of the neuron cloud at that scale, the bi-Lipschitz constants
between checks, and the sharpness (lambda_max of the training-loss Hessian) with the stability ratio
lr * lambda_max / 2 (gradient descent's edge of stability). Writes ``results.json`` and ``lr_critical_point.png``
and prints a table per weight decay.

    python recipes/lr_critical_point.py                 # the full sweep (a few minutes on a laptop CPU)
    python recipes/lr_critical_point.py --quick         # 4 learning rates, fewer steps (the test suite's setting)
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch
from _digits import digits_dataset
from torch import nn

from topo_callbacks.core import NeuronTopologyMonitorCore

FULL_LRS = [0.01, 0.03, 0.1, 0.3, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0]
QUICK_LRS = [0.03, 0.3, 3.0, 30.0]


def make_model(seed: int, activation: str = "tanh") -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.Tanh() if activation == "tanh" else nn.ReLU(), nn.Linear(64, 10))


def run(
    lr: float, steps: int, every: int, seed: int, rel_eps: float, weight_decay: float = 0.0, activation: str = "tanh"
) -> dict[str, Any]:
    x, y = digits_dataset(seed).tensors
    cut = int(0.8 * len(x))
    (x_train, y_train), (x_test, y_test) = (x[:cut], y[:cut]), (x[cut:], y[cut:])
    model = make_model(seed, activation)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=weight_decay)

    def train_loss(m: nn.Module) -> torch.Tensor:
        return nn.functional.cross_entropy(m(x_train), y_train)

    monitor = NeuronTopologyMonitorCore(
        "0", outgoing={"0": "2"}, every_n_train_steps=every, rel_eps=rel_eps, sharpness=True, loss_fn=train_loss,
        sharpness_iters=10,
    )  # fmt: skip
    monitor.attach(model)
    monitor.run_check(0, optimizer)  # the initial cloud: the first step's distortion is measured too
    diverged_at = None
    for step in range(1, steps + 1):
        loss = train_loss(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            diverged_at = step
            break
        if monitor.is_check_step(step):
            monitor.run_check(step, optimizer)
    with torch.no_grad():
        finite = diverged_at is None
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean()) if finite else float("nan")
        final_loss = float(train_loss(model)) if finite else float("nan")
    h = monitor.history
    key = "neurons/0/"
    b0 = [c[key + "b0"] for c in h]
    lip = [c[key + "lip_min"] for c in h if key + "lip_min" in c]
    return {
        "lr": lr,
        "rel_eps": rel_eps,
        "diverged_at": diverged_at,
        "test_accuracy": accuracy,
        "train_loss": final_loss,
        "neurons": 64,
        "b0_first": b0[0] if b0 else None,
        "b0_last": b0[-1] if b0 else None,
        "merged_fraction_last": h[-1][key + "merged_fraction"] if h else None,
        "merged_fraction_max": max((c[key + "merged_fraction"] for c in h), default=None),
        "nn_q0_first": h[0][key + "nn_q0"],
        "nn_q0_min": min(c[key + "nn_q0"] for c in h),
        "lip_min": min(lip, default=None),
        "breaking_checks": sum(int(c.get(key + "breaking", 0)) for c in h),
        "checks": len(h),
        "stability_ratio_max": max((c["neurons/stability_ratio"] for c in h), default=None),
        "lr_sharpness_last": h[-1]["neurons/lr_sharpness"] if h else None,
        "history": h,
    }


def plot(sweeps: dict[float, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, rows = plt.subplots(len(sweeps), 4, figsize=(17, 3.8 * len(sweeps)), squeeze=False)
    for axes, (weight_decay, results) in zip(rows, sweeps.items(), strict=True):
        _plot_row(axes, results, f"weight decay {weight_decay:g}: ")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_row(axes: Any, results: list[dict[str, Any]], title: str) -> None:
    lrs = [r["lr"] for r in results]
    merged = [r["merged_fraction_max"] for r in results]
    lost = [1 - r["b0_last"] / r["b0_first"] if r["b0_first"] else None for r in results]
    axes[0].plot(lrs, [r["nn_q0_min"] for r in results], "o-", label="closest pair / median norm (min)")
    axes[0].plot(lrs, merged, "s--", label="max merged fraction")
    axes[0].plot(lrs, lost, "^:", label="1 - b0(last)/b0(first)")
    axes[0].axhline(results[0]["rel_eps"], color="grey", ls=":", label="rel_eps")
    axes[0].set_yscale("log")
    axes[0].set_title(title + "neuron merging")
    axes[1].plot(lrs, [r["lip_min"] for r in results], "o-")
    axes[1].axhline(0.5, color="grey", ls=":", label="contraction threshold")
    axes[1].set_title("min bi-Lipschitz ratio between checks")
    axes[2].plot(lrs, [r["stability_ratio_max"] for r in results], "o-")
    axes[2].axhline(1.0, color="red", ls=":", label="lr * lambda_max = 2")
    axes[2].set_yscale("log")
    axes[2].set_title("max stability ratio lr*lambda_max/2")
    axes[3].plot(lrs, [r["test_accuracy"] for r in results], "o-")
    axes[3].set_title("test accuracy")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| lr | closest pair / median norm: init -> min | max merged fraction | b0 first -> last | min lip |"
        " breaking checks | max lr*lambda/2 | test acc |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def fmt(v: Any, spec: str = ".3f") -> str:
        return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

    for r in results:
        note = f" (diverged at {r['diverged_at']})" if r["diverged_at"] else ""
        lines.append(
            f"| {r['lr']:g} | {fmt(r['nn_q0_first'])} -> {fmt(r['nn_q0_min'])} | {fmt(r['merged_fraction_max'])} |"
            f" {fmt(r['b0_first'], '.0f')} -> "
            f"{fmt(r['b0_last'], '.0f')} | {fmt(r['lip_min'])} | {r['breaking_checks']}/{r['checks']} | "
            f"{fmt(r['stability_ratio_max'], '.2f')} | {fmt(r['test_accuracy'])}{note} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 learning rates, 100 steps")
    parser.add_argument("--steps", type=int, default=None, help="steps per learning rate (default 400; quick 100)")
    parser.add_argument("--every", type=int, default=5, help="check every this many steps")
    parser.add_argument("--rel-eps", type=float, default=0.05, help="merging scale relative to the median norm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weight-decay", type=float, nargs="+", default=[0.0, 0.01], help="one sweep per value")
    parser.add_argument("--activation", choices=["tanh", "relu"], default="tanh")
    parser.add_argument("--out", default="lr_sweep_out")
    args = parser.parse_args()
    steps = args.steps or (100 if args.quick else 400)
    lrs = QUICK_LRS if args.quick else FULL_LRS
    sweeps: dict[float, list[dict[str, Any]]] = {}
    for weight_decay in args.weight_decay:
        sweeps[weight_decay] = []
        for lr in lrs:
            r = run(lr, steps, args.every, args.seed, args.rel_eps, weight_decay, args.activation)
            sweeps[weight_decay].append(r)
            print(f"weight decay {weight_decay:g}, lr {lr:g}: closest pair {r['nn_q0_min']:.3f},"
                  f" min lip {r['lip_min']}, max lr*lambda/2 {r['stability_ratio_max']}, acc {r['test_accuracy']}",
                  flush=True)  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"args": vars(args), "steps": steps, "sweeps": {str(k): v for k, v in sweeps.items()}}
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    plot(sweeps, out / "lr_critical_point.png")
    for weight_decay, results in sweeps.items():
        print(f"\nGradient descent, {args.activation}, weight decay {weight_decay:g}, {steps} steps:\n")
        print(table(results))
    print(f"-> {out / 'results.json'}, {out / 'lr_critical_point.png'}")


if __name__ == "__main__":
    main()
