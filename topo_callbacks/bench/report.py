"""The benchmark's outputs: a markdown report, a small machine-readable summary, timelines and detection curves."""

from __future__ import annotations

import datetime
import math
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from topo_callbacks.bench.families import DROPPED, FAMILIES
from topo_callbacks.bench.record import RunRecord

__all__ = [
    "BASELINES",
    "DEFAULT",
    "RISE",
    "best_baseline",
    "cell",
    "plot_curves",
    "plot_timelines",
    "readme_tables",
    "recovery_markdown",
    "recovery_targets",
    "summary",
    "write_markdown",
]

#: The monitor's current default alarm, as users run it.
DEFAULT = "CUSUM detector (the monitor's default) [stock]"
#: The rule that was the default before the detector (``alarm="rise"``).
RISE = "CI, benchmark weights, rise (alarm='rise') [stock]"


def _lead(value: float | None) -> str:
    return "-" if value is None else f"{value:+.0f}"


def cell(s: Mapping[str, Any], clean: bool = True) -> str:
    """``detected/failure runs, lead L, FA f/n`` in one table cell.

    Example:
        >>> cell({"detected": 3, "failure_runs": 4, "median_lead": 50, "false_alarms": 1, "clean_runs": 8})
        '3/4, lead +50, FA 1/8'
    """
    parts = []
    if s.get("failure_runs"):
        parts.append(f"{s['detected']}/{s['failure_runs']}, lead {_lead(s['median_lead'])}")
    if clean and s.get("clean_runs"):
        parts.append(f"FA {s['false_alarms']}/{s['clean_runs']}")
    return ", ".join(parts) or "-"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _ci(ci: Sequence[float] | None, pct: bool = True) -> str:
    if ci is None:
        return "-"
    return f"[{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]%" if pct else f"[{ci[0]:+.0f}, {ci[1]:+.0f}]"


def summary(results: Mapping[str, Any]) -> dict[str, Any]:
    """The small machine-readable summary (``docs/bench/summary.json``)."""
    fams = results["families"]
    test = [r for r in results["runs"] if r["split"] == "test"]
    dets = {}
    for label, d in results["detectors"].items():
        p = d["pooled"]
        dets[label] = {
            "detected": p["detected"],
            "failure_runs": p["failure_runs"],
            "false_alarms": p["false_alarms"],
            "clean_runs": p["clean_runs"],
            "fa_upper95": p["fa_upper95"],
            "early": p["early"],
            "median_lead": p["median_lead"],
            "cost_ms_per_step": d["cost_ms_per_step"],
            "per_family": {
                f: {"detected": s["detected"], "failure_runs": s["failure_runs"], "median_lead": s["median_lead"],
                    "false_alarms": s["false_alarms"], "clean_runs": s["clean_runs"]}
                for f, s in d["per_family"].items()
            },
        }  # fmt: skip
    # the rollback arm (on_alarm="rollback", test seeds): targets and per family; the per-run rows are in results.json
    recovery = results.get("recovery")
    extra = {"recovery": {k: v for k, v in recovery.items() if k != "runs"}} if recovery else {}
    return {
        "protocol": "leave-one-family-out",
        "alpha": results["alpha"],
        "quick": results["quick"],
        "families": [f for f, v in fams.items() if v["kind"] == "failure"],
        "controls": [f for f, v in fams.items() if v["kind"] == "control"],
        "runs": {
            "failure_test": sum(r["failure"] and r["scored"] for r in test),
            "clean_test": sum(not r["failure"] and r["scored"] for r in test),
            "failure_test_not_scored": sum(r["failure"] and not r["scored"] for r in test),
            "clean_test_not_scored": sum(not r["failure"] and not r["scored"] for r in test),
        },
        "default": DEFAULT,
        "default_calibration": results.get("detector_calibrations", {}).get("all"),
        # the default detector re-armed after each episode, on the healthy steps of the test seeds
        "healthy_steps": {k: v for k, v in results.get("healthy_steps", {}).items() if k != "where"},
        # clean test runs scored with the fit that held out their own family: false alarms on kinds of runs unseen
        "heldout_false_alarms": results.get("heldout_false_alarms"),
        # the same default with the checks spaced k times further apart (an overhead budget), k -> outcomes
        "check_spacing": results.get("check_spacing", {}),
        # on a GPU the per-step values reach the host in batches of k steps: failure runs still detected in time
        "batched_reads": {
            k: {f: v[f] for f in ("detected", "failures", "median_delay", "max_delay")}
            for k, v in results.get("batched_reads", {}).items()
        },
        "detectors": dets,
        **extra,
    }


def write_markdown(results: Mapping[str, Any]) -> str:
    """``results.md``: setting, verification, the pooled table, per-family tables, what was dropped."""
    fams = results["families"]
    failures = [f for f, v in fams.items() if v["kind"] == "failure"]
    controls = [f for f, v in fams.items() if v["kind"] == "control"]
    s = summary(results)
    lines = [
        "# Collapse-scenario benchmark",
        "",
        f"{datetime.date.today().isoformat()}, {platform.machine()}, torch {torch.__version__}, "
        f"{len(results['calibration_seeds'])} calibration seeds {results['calibration_seeds']}, test seeds "
        f"{results['test_seeds']}, {results['wall_s'] / 60:.1f} min (`--jobs {results['jobs']}`).",
        "",
    ]
    if results["quick"]:
        lines += ["**QUICK setting: a smoke test of the pipeline, not results.**", ""]
    lines += [
        f"Test runs: {s['runs']['failure_test']} failure runs whose metric dropped after t0 and "
        f"{s['runs']['clean_test']} clean runs (healthy twins and both arms of the controls) whose metric did not "
        f"drop; not scored: {s['runs']['failure_test_not_scored']} failure arms without a drop after t0 and "
        f"{s['runs']['clean_test_not_scored']} clean arms whose metric dropped anyway. Protocol: "
        f"leave-one-family-out; calibrated thresholds give at most {100 * results['alpha']:.0f}% false alarms on the "
        "calibration negatives (`topo_callbacks/bench/protocol.py`).",
        "",
        "## Families",
        "",
        "| family | kind | switch at t0 | mechanism | source | metric | steps, t0 | verified (seeds) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ver = results["verification"]
    for f, v in fams.items():
        vv = ver.get(f, {})
        if v["kind"] == "failure":
            check = (f"{'yes' if vv.get('verified') else 'NO'}: failure arm dropped {vv.get('failure_dropped')}/"
                     f"{vv.get('seeds')}, healthy twin {vv.get('healthy_dropped')}")  # fmt: skip
        else:
            check = f"{'yes' if vv.get('verified') else 'NO'}: {vv.get('dropped')}/{vv.get('runs')} runs dropped"
        lines.append(
            f"| {f} | {v['kind']} | {v['switch']} | {v['mechanism']} | {v['source']} | {v['metric']} | "
            f"{v['steps']}, {v['t0']} | {check} |"
        )
    lines += ["", "Dropped before the benchmark (failed verification):", ""]
    lines += [f"- `{name}`: {why}" for name, why in DROPPED.items()]
    lines += [
        "",
        "## All detectors, pooled over the held-out families (test seeds)",
        "",
        "*Detected*: alarm in [t0, metric drop). *FA*: clean runs with any alarm (95% upper bound). *Early*: failure"
        " runs with an alarm before t0. *Lead*: median steps from alarm to drop (95% bootstrap interval). *Cost*:"
        " ms per training step (and % of the step).",
        "",
        "| detector | setting | detected | 95% CI | lead | lead CI | FA | FA upper | early | cost ms/step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, d in results["detectors"].items():
        p = d["pooled"]
        name = f"**{d['detector']}**" if label == DEFAULT else d["detector"]
        cost = f"{d['cost_ms_per_step']:.3f}" + (
            f" ({d['cost_pct_of_step']:.1f}%)" if d["cost_pct_of_step"] is not None else ""
        )
        lines.append(
            f"| {name} | {d['setting']} | {p['detected']}/{p['failure_runs']} | {_ci(p['detection_ci95'])} | "
            f"{_lead(p['median_lead'])} | {_ci(p['median_lead_ci95'], pct=False)} | {p['false_alarms']}/"
            f"{p['clean_runs']} | {_pct(p['fa_upper95'])} | {p['early']} | {cost} |"
        )
    ho = results.get("heldout_false_alarms")
    if ho:
        lines += [
            "",
            "## False alarms on kinds of runs the fit did not see (default detector, test seeds)",
            "",
            "The FA column above scores clean runs with the fit on every family's calibration seeds (what the monitor"
            " ships), which has seen other seeds of the same family. Here each clean test run is scored with the fit"
            " that held out its own family (a control's arms with that control held out, a failure family's healthy"
            f" twins with that family held out): **{ho['false_alarms']}/{ho['clean_runs']} clean runs alarmed"
            f" (95% upper bound {_pct(ho['fa_upper95'])})**.",
        ]
        if ho["alarms"]:
            lines += ["", "Where: " + "; ".join(ho["alarms"])]
    hs = results.get("healthy_steps")
    if hs:
        lines += [
            "",
            "## False alarms per 100,000 healthy optimizer steps (default detector, test seeds)",
            "",
            "The default detector fit on every family's calibration seeds, live as the monitor runs it (re-armed after"
            " each alarm episode), over every healthy step of the test seeds: clean runs whole, failure runs up to"
            f" their fork. {hs['alarms']} alarm episodes in {hs['steps']:,} healthy steps: {hs['per_100k']:.2f} per"
            f" 100,000 steps (one-sided 95% upper bound {hs['upper_95_per_100k']:.2f}).",
            "",
            "| family | alarm episodes | healthy steps |",
            "|---|---|---|",
        ]
        lines += [f"| {f} | {v['alarms']} | {v['steps']:,} |" for f, v in hs["per_family"].items()]
        if hs["where"]:
            lines += ["", "Where: " + "; ".join(hs["where"])]
    spacing = results.get("check_spacing")
    if spacing:
        lines += [
            "",
            "## Checks spaced out by the overhead budget (default detector, test seeds)",
            "",
            "`max_overhead` spaces the checks further apart on models whose steps are cheap next to a check, and on"
            " steps of a millisecond or less it reads the per-step channels at every s-th step only. The shipped"
            " calibration (fit on every family's calibration seeds: not held out, so 1x can read higher than the"
            " leave-one-family-out score above) replayed with every k-th recorded check only, and every s-th step's"
            " per-step channels (the loss of the steps between averaged into the read, each read adding to its CUSUM"
            " what s reads would), and the gradient norm at every g-th read only (each adding what g reads would);"
            " a check the detector asks for (`CusumDetector.wants_check`) is taken one interval later, as the monitor"
            " brings it forward; a recorded check the spacing skips feeds its share of dead units to the dormant-unit"
            " rule alone, as the monitor's unit check between spaced checks does: failure runs detected before their"
            " metric dropped, clean runs with an alarm, alarm episodes per 100,000 healthy steps.",
            "",
            "| checks spaced | per-step channels read | gradient norm read | detected | clean runs alarmed |"
            " per 100k healthy steps |",
            "|---|---|---|---|---|---|",
        ]
        for key, v in spacing.items():
            k, s, g = (*key.split("/"), "1", "1")[:3]
            lines.append(
                f"| {k}x | {'every step' if s == '1' else f'1 step in {s}'}"
                f" | {'at every read' if g == '1' else f'1 read in {g}'} | {v['detected']}/{v['failures']}"
                f" | {v['false_alarms']}/{v['clean']} | {v['per_100k']:.2f} |"
            )
    batched = results.get("batched_reads")
    if batched:
        lines += [
            "",
            "## Per-step values read in batches on a GPU (default detector, test seeds)",
            "",
            "On a GPU the loss and the gradient norm stay on the device and reach the host in batches of k steps"
            " (`read_every_n_steps`; default 2): the detector sees the same values, and the monitor knows an alarm"
            " when its batch lands (on one process the step after the batch's last; under DDP when the next batch is"
            " due; a check reads everything at once). Failure runs whose first alarm is known before their metric"
            " dropped, and the steps between the alarm's step and that:",
            "",
            "| per-step values read | detected | median delay | longest delay | lost to the delay |",
            "|---|---|---|---|---|",
        ]
        for key, v in batched.items():
            lost = ", ".join(v["lost"]) or "-"
            lines.append(
                f"| {key} | {v['detected']}/{v['failures']} | {v['median_delay']} | {v['max_delay']} | {lost} |"
            )
    lines += ["", "## Per failure family (held out)", ""]
    labels = list(results["detectors"])
    lines += ["| detector | " + " | ".join(failures) + " |", "|---|" + "---|" * len(failures)]
    for label in labels:
        d = results["detectors"][label]
        lines.append(f"| {label} | " + " | ".join(cell(d["per_family"].get(f, {})) for f in failures) + " |")
    if controls:
        lines += ["", "## Controls (false alarms, test seeds)", ""]
        lines += ["| detector | " + " | ".join(controls) + " |", "|---|" + "---|" * len(controls)]
        for label in labels:
            d = results["detectors"][label]
            lines.append(f"| {label} | " + " | ".join(cell(d["per_family"].get(f, {})) for f in controls) + " |")
    if results.get("learned_weights"):
        lines += ["", "## CI weights learned per held-out family", ""]
        for fold, w in results["learned_weights"].items():
            lines.append(f"- held out `{fold}`: {' + '.join(w)}")
    if results.get("recovery"):
        lines += ["", *recovery_markdown(results["recovery"])]
    lines += [
        "",
        "Detection-versus-false-alarm curves: `curves.png`; one timeline per family: `timeline_<family>.png`.",
    ]
    return "\n".join(lines) + "\n"


def _rate(r: Mapping[str, Any]) -> str:
    """``k/n [lo, hi]%`` of a rate entry of the recovery section (``-`` for no runs)."""
    return "-" if not r["n"] else f"{r['k']}/{r['n']} {_ci(r['ci95'])}"


def _met(flag: bool | None) -> str:
    return "no runs" if flag is None else "met" if flag else "NOT met"


def _gap(value: float | None, metric: str) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return "diverged"
    return f"{value:+.1f}%" if metric == "val_ppl" else f"{value:+.1f} pt"


def recovery_targets(section: Mapping[str, Any]) -> list[str]:
    """The recovery targets as a markdown table (``results.md`` and the README)."""
    t = section["targets"]
    clean = t["clean_alarmed"]
    worst = ", ".join(
        w for w in (
            None if clean["worst_points"] is None else f"{clean['worst_points']:+.1f} points",
            None if clean["worst_ppl_pct"] is None else f"{clean['worst_ppl_pct']:+.1f}% perplexity",
        ) if w
    ) or "-"  # fmt: skip
    opt, conf = t["optimizer_rescued_of_detected"], t["configuration_stopped_with_diagnosis"]
    return [
        "| target | measured (95% CI) | |",
        "|---|---|---|",
        f"| optimizer-instability families: detected failure runs rescued >= {100 * opt['target']:.0f}% | "
        f"{_rate(opt)} | {_met(opt['met'])} |",
        f"| (the same families, every run that alarmed) | {_rate(t['optimizer_rescued_of_alarmed'])} | |",
        f"| families a rollback cannot fix: alarmed runs stopped with the configuration diagnosis | {_rate(conf)} | "
        f"{_met(conf['met'])} |",
        f"| clean runs that alarmed: at most 1 point (2.5% perplexity) lost | {clean['n']} runs, worst {worst} | "
        f"{_met(clean['met'])} |",
    ]


def recovery_markdown(section: Mapping[str, Any]) -> list[str]:
    """The ``results.md`` section of the rollback arm (`topo_callbacks.bench.recovery`)."""
    pol = section["policy"]
    live = "every failure arm and the clean runs the detector alarms on" if section["mode"] == "alarmed" else (
        "every test run")  # fmt: skip
    lines = [
        '## Recovery: `on_alarm="rollback"` (test seeds)',
        "",
        "Each test run trained again from step 1 with the monitor acting on its alarms: the default `RollbackPolicy`"
        f" (lr_factor {pol['lr_factor']:g}, max_rollbacks {pol['max_rollbacks']}, snapshot_every"
        f" {pol['snapshot_every']}, keep {pol['keep']}) and the detector fit with the run's own family held out, on"
        " calibration seeds only (a control gets its own held-out fit too, which alarms on more clean runs than the"
        " fit on every family the false-alarm figures above use). The switch at t0 stays flipped after a"
        " rollback (the step counter and the data do not rewind). Trained live: "
        f"{live} ({section['live_runs']} of {section['planned_runs']} runs); a clean run without an alarm is its"
        " plain arm again, bit for bit, and is counted as such. *Rescued*: ran to the end within 2 points (5%"
        " perplexity) of the healthy twin. *Stopped*: the policy gave up (`max_rollbacks`; `came_back`: the"
        " failure came back after a rollback with no older snapshot left; `collapsed_again`: after a rollback the"
        " watched layer's effective rank fell under 0.4 of the restored snapshot's for two checks; all three the"
        " configuration diagnosis; `no_snapshot`: nothing older than the onset was held before any rollback)."
        " *Steps lost*: trained, then"
        " discarded by a rollback. Failure arms whose metric did not drop after t0, and clean arms whose metric"
        " dropped anyway, are listed and not counted.",
        "",
        *recovery_targets(section),
        "",
        "| family | class | failure runs | alarmed | detected | rescued (of detected) | rescued (of alarmed) |"
        " stopped: diagnosis | stopped: no snapshot | not rescued | rollbacks | steps lost (median, total) |"
        " wall lost | clean runs alarmed | clean: worst loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    metric = {r["family"]: r["metric"] for r in section["runs"]}
    for fam, f in section["per_family"].items():
        med = "-" if f["median_steps_lost"] is None else f"{f['median_steps_lost']:.0f}"
        lines.append(
            f"| {fam} | {f['class']} | {f['failure_runs']} | {f['alarmed']} | {f['detected']} | "
            f"{f['rescued_of_detected']}/{f['detected']} | {f['rescued']}/{f['alarmed']} | {f['stopped_diagnosis']} | "
            f"{f['stopped_other']} | {f['not_rescued']} | {f['rollbacks']} | {med}, {f['steps_lost']} | "
            f"{f['seconds_lost']:.1f} s | {f['clean_alarmed']}/{f['clean_runs']} | "
            f"{_gap(f['clean_worst_cost'], metric[fam])} |"
        )
    lines += [
        "",
        "Every run that alarmed, and every failure run (*gap*: final metric against the healthy twin for a failure"
        " run, against the same run without a rollback for a clean one; positive is worse):",
        "",
        "| run | scored | t0 | drop | alarm | rollbacks (alarm -> restored) | stopped | final | reference | gap |"
        " without rollback | outcome | steps lost | wall lost |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in section["runs"]:
        if not r["failure"] and r["alarm"] is None:
            continue
        back = ", ".join(f"{a} -> {b}" for a, b in r["rollbacks"]) or "-"
        stop = "-" if r["stopped_step"] is None else f"{r['stopped_step']} ({r['stop_reason']})"
        lines.append(
            f"| {r['run']} | {'yes' if r['scored'] else 'no'} | {r['t0']} | {r['t_c'] if r['t_c'] is not None else '-'}"
            f" | {r['alarm'] if r['alarm'] is not None else '-'} | {back} | {stop} | {_num(r['final'])} | "
            f"{_num(r['reference'])} | {_gap(r['gap'], r['metric'])} | {_num(r['plain_final'])} | {r['outcome']} | "
            f"{r['steps_lost']} | {r['seconds_lost']:.1f} s |"
        )
    bad = section["inconsistent"]
    lines += [
        "",
        "Consistency: every live run matched its plain arm step for step up to its first alarm, which came where the"
        " replay of the plain arm predicted."
        if not bad
        else f"Consistency: NOT met for {', '.join(bad)} (the live run left its plain arm before its first alarm, or"
        " the alarm came elsewhere than the replay predicted).",
    ]
    return lines


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def plot_curves(results: Mapping[str, Any], out: Path) -> Path:
    """Each detector's detection rate against its false-alarm rate over the test runs (a threshold sweep)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 6))
    seen = set()
    for d in results["detectors"].values():
        if d["detector"] in seen:  # one curve per detector (the setting only moves the point on it)
            continue
        seen.add(d["detector"])
        # in threshold order: a lower threshold alarms earlier, which can turn a detection into an alarm before t0,
        # so the curve need not rise monotonically
        curve = sorted(d["curve"], key=lambda c: -c[0])
        ax.plot([c[1] for c in curve], [c[2] for c in curve], label=d["detector"], linewidth=1.0)
        p = d["pooled"]
        if p["detection_rate"] is not None and p["fa_rate"] is not None:
            ax.plot([p["fa_rate"]], [p["detection_rate"]], "o", color=ax.lines[-1].get_color(), markersize=4)
    ax.axvline(results["alpha"], color="k", linestyle=":", linewidth=1)
    ax.set_xlabel("false-alarm rate on clean test runs")
    ax.set_ylabel("detection rate (alarm in [t0, drop)) on held-out failure runs")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=6, loc="lower right")
    ax.set_title("Threshold sweep on the test runs (dots: the stock or calibrated settings)", fontsize=9)
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_timelines(records: Sequence[RunRecord], results: Mapping[str, Any], out: Path) -> list[Path]:
    """One PNG per family (first test seed): task metric, loss, gradient norm, the default CI, and the alarms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seed = results["test_seeds"][0]
    truth = {r["run"]: r["t_c"] for r in results["runs"]}
    default = results["detectors"].get(DEFAULT, {}).get("alarms", {})
    paths = []
    for name in results["families"]:
        runs = [r for r in records if r.family == name and r.seed == seed]
        if not runs:
            continue
        fam = FAMILIES[name]
        fig, axes = plt.subplots(4, 1, figsize=(8, 9), sharex=True)
        for rec in runs:
            style = ":" if rec.arm == "healthy" else "-"
            axes[0].plot([s for s, _, _ in rec.evals], [m for _, m, _ in rec.evals], style, label=f"{rec.arm}")
            axes[1].plot(range(1, len(rec.loss) + 1), rec.loss, style, linewidth=0.6, label=f"{rec.arm}: loss")
            axes[2].plot(range(1, len(rec.grad_norm) + 1), rec.grad_norm, style, linewidth=0.6, label=rec.arm)
            axes[3].plot([c["step"] for c in rec.checks], [c["ci"] for c in rec.checks], style, label=rec.arm)
        main = next((r for r in runs if r.arm != "healthy"), runs[0])
        marks = [("t0", main.t0, ":"), ("metric drop", truth.get(main.key), "-.")]
        marks.append(("default alarm", default.get(main.key), "--"))
        for label, step, ls in marks:
            if step is not None:
                for ax in axes:
                    ax.axvline(step, color="k", linestyle=ls, linewidth=1, label=label if ax is axes[0] else None)
        if fam.metric == "val_ppl":
            axes[0].set_yscale("log")
        axes[2].set_yscale("log")
        for ax, ylabel in zip(axes, (fam.metric, "loss", "grad norm", "CI (default)"), strict=True):
            ax.set_ylabel(ylabel)
            ax.legend(fontsize=6, loc="best")
        axes[3].set_xlabel("optimizer step")
        axes[0].set_title(f"{name}: {fam.switch} (seed {seed})", fontsize=9)
        fig.tight_layout()
        path = out / f"timeline_{name}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths


#: The cheap baselines users already have (loss, gradient norm, validation loss), as opposed to embedding channels.
BASELINES = (
    "loss spike (Lightning SpikeDetection)",
    "loss spike (median + k MAD over 200 steps)",
    "gradient-norm z-score (ZClip EMA)",
    "gradient-norm spike (median + k MAD over 200 steps)",
    "EarlyStopping(patience=3) on the validation loss",
)


def best_baseline(results: Mapping[str, Any], family: str, setting: str = "calibrated") -> str | None:
    """The cheap baseline (at ``setting``) that detects most held-out runs of ``family`` (ties: the longer lead)."""
    best: tuple[int, float, str] | None = None
    for label, d in results["detectors"].items():
        if d["detector"] not in BASELINES or d["setting"] != setting:
            continue
        s = d["per_family"].get(family)
        if not s or not s.get("failure_runs"):
            continue
        key = (s["detected"], s["median_lead"] if s["median_lead"] is not None else -math.inf, label)
        if best is None or key[:2] > best[:2]:
            best = key
    return None if best is None else best[2]


def readme_tables(results: Mapping[str, Any], detectors: Sequence[str]) -> str:
    """The README's two tables: pooled figures of ``detectors``, then per family the default beside the best
    calibrated cheap baseline."""
    lines = [
        "| detector | setting | detected (95% CI) | median lead (95% CI) | false alarms (95% upper) | early |",
        "|---|---|---|---|---|---|",
    ]
    for label in detectors:
        d = results["detectors"].get(label)
        if d is None:
            continue
        p = d["pooled"]
        lines.append(
            f"| {d['detector']} | {d['setting']} | {p['detected']}/{p['failure_runs']} {_ci(p['detection_ci95'])} | "
            f"{_lead(p['median_lead'])} {_ci(p['median_lead_ci95'], pct=False)} | {p['false_alarms']}/"
            f"{p['clean_runs']} (<= {_pct(p['fa_upper95'])}) | {p['early']} |"
        )
    failures = [f for f, v in results["families"].items() if v["kind"] == "failure"]
    lines += ["", "| family | the default (CUSUM) | `alarm=\"rise\"` (stock) | best cheap baseline (calibrated) |",
              "|---|---|---|---|"]  # fmt: skip
    for fam in failures:
        cells = []
        for label in (DEFAULT, RISE):
            d = results["detectors"].get(label)
            cells.append(cell(d["per_family"].get(fam, {})) if d else "-")
        base = best_baseline(results, fam)
        if base is None:
            cells.append("-")
        else:
            b = results["detectors"][base]
            cells.append(f"{b['detector']}: {cell(b['per_family'][fam])}")
        lines.append(f"| {fam} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
