"""The benchmark's outputs: a markdown table and one timeline plot per scenario."""

from __future__ import annotations

import datetime
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from topo_callbacks.bench.detectors import channel_series
from topo_callbacks.bench.scenarios import SCENARIOS, RunRecord
from topo_callbacks.functional.collapse import PAPER_WEIGHTS, TERMS

__all__ = ["MAIN_DETECTORS", "fmt_score", "plot_timelines", "write_markdown"]

#: Detectors shown in the per-scenario tables (ablations and the full weight search are in their own tables).
MAIN_DETECTORS = (
    "CI, paper weights, rule before the benchmark (rise 0.15)",
    "CI, paper weights",
    "CI, chosen weights",
    "Betti term alone",
    "persistence-entropy term alone",
    "anisotropy term alone",
    "effective rank (RankMe) alone",
    "std of L2-normalised embeddings alone",
    "gradient-norm spike",
    "loss spike (6 MAD, standard)",
    "val-loss patience 3 (standard)",
)


def _lead(value: float | None) -> str:
    return "-" if value is None else f"{value:+.0f}"


def fmt_score(s: Mapping[str, Any]) -> str:
    """``detected/collapsed, lead L, FP f/n`` in one cell.

    Example:
        >>> fmt_score({"detected": 3, "collapsed_runs": 4, "median_lead_vs_drop": 50, "false_positives": 1, "runs": 8})
        '3/4, lead +50, FP 1/8'
    """
    det = f"{s['detected']}/{s['collapsed_runs']}" if s["collapsed_runs"] else "n/a"
    return f"{det}, lead {_lead(s['median_lead_vs_drop'])}, FP {s['false_positives']}/{s['runs']}"


def _name(results: Mapping[str, Any], short: str) -> str | None:
    if short in results["detectors"]:
        return short
    return next((n for n in results["detectors"] if n.startswith(short)), None)


def _threshold(d: Mapping[str, Any]) -> str:
    return f"{d['threshold']:g}" + ("" if d["calibrated"] else " (fixed)")


def write_markdown(results: Mapping[str, Any]) -> str:
    """The benchmark's tables as markdown (overall, per scenario, ablation, weight search, ground truth)."""
    dets = results["detectors"]
    setting = "QUICK setting (a smoke test of the pipeline, not results)" if results["quick"] else "full setting"
    lines = [
        "# Collapse-scenario benchmark",
        "",
        f"{datetime.date.today().isoformat()}; {platform.machine()} {platform.system()}, torch {torch.__version__},"
        f" {torch.get_num_threads()} threads; {setting}.",
        f"Calibration seeds {results['calibration_seeds']}, test seeds {results['test_seeds']}; every number below is"
        f" on the test seeds. Wall time {results['wall_s']:.0f} s.",
        "",
        "Detection: alarm at or after t0 and at or before the metric drop t_c, over the collapse runs whose metric"
        " dropped. Lead: t_c - alarm in optimizer steps (median over detections). Lead vs standard: the earliest of"
        " loss spike, val-loss patience and metric drop, minus the alarm (median over collapse runs with both)."
        " FP: runs with a false alarm (any alarm in a healthy twin or control, an alarm before t0 in a collapse run).",
        "",
        "## Scenarios",
        "",
        "| scenario | kind | switch at t0 | t0 / steps | metric |",
        "|---|---|---|---|---|",
    ]
    for name, sc in results["scenarios"].items():
        lines.append(f"| {name} | {sc['kind']} | {sc['switch']} | {sc['t0']} / {sc['steps']} | {sc['metric']} |")
    lines += [
        "",
        "## All scenarios together",
        "",
        "| detector | threshold | detected | late | median lead vs drop | median lead vs standard | FP (rate) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, d in dets.items():
        if name.startswith("ablation"):
            continue
        o = d["overall"]
        rate = "-" if o["false_positive_rate"] is None else f"{o['false_positive_rate']:.2f}"
        lines.append(
            f"| {name} | {_threshold(d)} | {o['detected']}/{o['collapsed_runs']} | {o['late']} |"
            f" {_lead(o['median_lead_vs_drop'])} | {_lead(o['median_lead_vs_standard'])} |"
            f" {o['false_positives']}/{o['runs']} ({rate}) |"
        )
    scen = list(results["scenarios"])
    lines += ["", "## Per scenario (detected/collapsed, median lead vs drop, false positives/runs)", ""]
    lines += ["| detector | " + " | ".join(scen) + " |", "|---|" + "---|" * len(scen)]
    for short in MAIN_DETECTORS:
        name = _name(results, short)
        if name is None:
            continue
        cells = [fmt_score(dets[name]["per_scenario"][s]) if s in dets[name]["per_scenario"] else "-" for s in scen]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Ablation: each term removed (threshold re-calibrated)", ""]
    lines += ["| CI | threshold | detected | median lead vs drop | FP |", "|---|---|---|---|---|"]
    chosen = _name(results, "CI, chosen weights")
    for name in ["CI, paper weights", chosen] + [n for n in dets if n.startswith("ablation")]:
        if name is None:
            continue
        o = dets[name]["overall"]
        lines.append(
            f"| {name} | {_threshold(dets[name])} | {o['detected']}/{o['collapsed_runs']} |"
            f" {_lead(o['median_lead_vs_drop'])} | {o['false_positives']}/{o['runs']} |"
        )
    lines += ["", "## Weight search on the calibration seeds (equal weights over a subset of terms; top 8)", ""]
    lines += ["| terms | threshold | detected | FP | objective |", "|---|---|---|---|---|"]
    for t in results["weight_search"][:8]:
        lines.append(
            f"| {'+'.join(t['weights'])} | {t['threshold']:g} | {t['detected']}/{t['collapsed_runs']} |"
            f" {t['false_positives']}/{t['runs']} | {t['objective']:.2f} |"
        )
    lines += ["", "## Ground truth per run (all seeds)", ""]
    lines += ["| scenario | arm | seed | split | t0 | metric drop t_c | loss spike | val-loss patience |"]
    lines += ["|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        lines.append(
            f"| {r['scenario']} | {r['arm']} | {r['seed']} | {r['split']} | {r['t0']} | {r['t_c']} |"
            f" {r['loss_spike']} | {r['val_loss_patience']} |"
        )
    return "\n".join(lines) + "\n"


def plot_timelines(records: Sequence[RunRecord], results: Mapping[str, Any], out: Path) -> list[Path]:
    """One PNG per scenario (first test seed): task metric, CI with both weightings, the terms, and the alarms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = dict(results["chosen_weights"])
    chosen_name = _name(results, "CI, chosen weights")
    seed = results["test_seeds"][0]
    paths = []
    for name in results["scenarios"]:
        runs = [r for r in records if r.scenario == name and r.seed == seed]
        if not runs:
            continue
        sc = SCENARIOS[name]
        fig, axes = plt.subplots(3, 1, figsize=(8, 7.5), sharex=True)
        for rec in runs:
            style = "-" if rec.arm != "healthy" else ":"
            steps = [s for s, _, _ in rec.evals]
            axes[0].plot(steps, [m for _, m, _ in rec.evals], style, label=f"{rec.arm}: {sc.metric}")
            cs = [c["step"] for c in rec.checks]
            axes[1].plot(cs, channel_series(rec.checks, PAPER_WEIGHTS), style, label=f"{rec.arm}: CI, paper")
            axes[1].plot(cs, channel_series(rec.checks, chosen), style, label=f"{rec.arm}: CI, chosen")
        main = next((r for r in runs if r.arm != "healthy"), runs[0])
        cs = [c["step"] for c in main.checks]
        for term in TERMS:
            axes[2].plot(cs, [c[f"{term}_term"] for c in main.checks], label=f"{term} ({main.arm})")
        key = f"{name}/{main.arm}/{seed}"
        truth = next(r for r in results["runs"] if r["scenario"] == name and r["arm"] == main.arm and r["seed"] == seed)
        marks = [("t0", main.t0, ":"), ("metric drop", truth["t_c"], "-.")]
        marks.append(("standard warning", truth["standard"], "--"))
        if chosen_name is not None:
            marks.append(("CI alarm (chosen)", results["detectors"][chosen_name]["alarms"].get(key), "-"))
        for label, step, ls in marks:
            if step is not None:
                for ax in axes:
                    ax.axvline(step, color="k", linestyle=ls, linewidth=1, label=label if ax is axes[0] else None)
        if sc.metric == "val_ppl":
            axes[0].set_yscale("log")
        axes[0].set_ylabel(sc.metric)
        axes[1].set_ylabel("CI")
        axes[2].set_ylabel("terms")
        axes[2].set_xlabel("optimizer step")
        for ax in axes:
            ax.legend(fontsize=6, loc="best")
        axes[0].set_title(f"{name}: {sc.switch} (seed {seed})")
        fig.tight_layout()
        path = out / f"timeline_{name}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths
