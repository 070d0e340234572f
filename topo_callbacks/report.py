"""`topo-callbacks report LOGDIR`: a run's logged CI, terms and alarms, and its latest persistence diagram.

Reads Lightning ``CSVLogger`` files (``metrics.csv``) or TensorBoard event files (``events.out.tfevents.*``, with
the ``tensorboard`` package installed), and the ``collapse_diagram_*.json`` the Lightning callback writes beside
them. Writes a PNG and an HTML page that embeds it.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from pathlib import Path
from typing import Any

__all__ = ["load_scalars", "write_report"]

Series = dict[str, list[tuple[int, float]]]
TERMS = ("betti_term", "entropy_term", "anisotropy_term", "rank_term", "std_term")


def _read_csv(path: Path) -> Series:
    out: Series = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            step = row.get("step")
            if not step:
                continue
            for key, value in row.items():
                if key != "step" and value not in ("", None):
                    out.setdefault(key, []).append((int(float(step)), float(value)))
    return out


def _read_tensorboard(path: Path) -> Series:
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError as err:
        raise RuntimeError(
            f"{path} is a TensorBoard event file; reading it needs the `tensorboard` package (pip install tensorboard)."
        ) from err
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(int(e.step), float(e.value)) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def load_scalars(logdir: str | Path) -> tuple[Series, list[Path]]:
    """Every scalar series under ``logdir`` (CSV and TensorBoard files, merged), and the files read.

    Raises:
        FileNotFoundError: when ``logdir`` holds neither kind of file.
    """
    root = Path(logdir)
    files = sorted(root.rglob("metrics.csv")) + sorted(root.rglob("events.out.tfevents.*"))
    if not files:
        raise FileNotFoundError(f"no metrics.csv or events.out.tfevents.* under {root}")
    series: Series = {}
    for path in files:
        part = _read_csv(path) if path.name == "metrics.csv" else _read_tensorboard(path)
        for key, values in part.items():
            series.setdefault(key, []).extend(values)
    return {k: sorted(v) for k, v in series.items()}, files


def _latest_diagram(root: Path, monitor: str) -> dict[str, Any] | None:
    found = sorted(root.rglob(f"collapse_diagram_{monitor.replace('/', '_')}.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(found[-1].read_text()) if found else None


def write_report(logdir: str | Path, out: str | Path | None = None, monitor: str = "collapse/ci") -> dict[str, Any]:
    """Plot ``monitor`` and its terms over steps with the alarms marked, and the latest H0 diagram.

    Writes ``out`` (``.png`` or ``.html``; default ``LOGDIR/collapse_report.html``; an HTML report also writes
    the PNG beside it) and returns a summary: checks, first alarm, the files read.

    Example (a run logged with ``CSVLogger``)::

        write_report("lightning_logs/version_0", "report.html")
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = Path(logdir)
    series, files = load_scalars(root)
    if monitor not in series:
        keys = sorted(k for k in series if "/" in k)[:20] or sorted(series)[:20]
        raise KeyError(f"`{monitor}` is not in the logs under {root}; logged keys include {keys}")
    prefix = monitor.rsplit("/", 1)[0] + "/" if "/" in monitor else ""
    out = Path(out) if out is not None else root / "collapse_report.html"
    png = out if out.suffix == ".png" else out.with_suffix(".png")
    alarms = [s for s, v in series.get(f"{prefix}alarm", []) if v > 0.5]
    diagram = _latest_diagram(root, monitor)

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2), gridspec_kw={"width_ratios": [3, 3, 2]})
    steps, values = zip(*series[monitor], strict=True)
    axes[0].plot(steps, values, "o-", color="black", label=monitor)
    for i, step in enumerate(alarms):
        axes[0].axvline(step, color="red", alpha=0.4, label="alarm" if i == 0 else None)
    axes[0].set_ylim(-0.02, 1.02)
    axes[0].set_title("collapse index")
    for term in TERMS:
        if f"{prefix}{term}" in series:
            t_steps, t_values = zip(*series[f"{prefix}{term}"], strict=True)
            axes[1].plot(t_steps, t_values, ".-", label=term)
    axes[1].set_ylim(-0.02, 1.02)
    axes[1].set_title("terms (1 = collapsed)")
    for ax in axes[:2]:
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if diagram and diagram["h0_deaths"]:
        deaths = sorted(diagram["h0_deaths"], reverse=True)
        axes[2].hlines(range(len(deaths)), 0, deaths, color="tab:blue", linewidth=1)
        axes[2].axvline(diagram["eps"], color="grey", ls=":", label=f"eps = {diagram['eps']:.3g}")
        axes[2].set_title(f"H0 barcode at step {diagram['step']} (+1 infinite bar)")
        axes[2].set_xlabel("scale (L2-normalised embeddings)")
        axes[2].legend(fontsize=8)
    else:
        why = "no collapse_diagram_*.json found" if not diagram else "all rows one point: only the infinite bar"
        axes[2].text(0.5, 0.5, why, ha="center", va="center")
        axes[2].set_title(f"H0 barcode at step {diagram['step']}" if diagram else "H0 barcode")
        axes[2].set_axis_off()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)

    last_step, last_value = series[monitor][-1]
    summary: dict[str, Any] = {
        "monitor": monitor,
        "checks": len(series[monitor]),
        "last_step": last_step,
        "last_value": last_value,
        "alarm_steps": alarms,
        "first_alarm_step": alarms[0] if alarms else None,
        "diagram_step": diagram["step"] if diagram else None,
        "files": [str(f) for f in files],
        "png": str(png),
    }
    if out.suffix != ".png":
        out.write_text(_html(summary, series, prefix, png))
        summary["html"] = str(out)
    return summary


def _html(summary: dict[str, Any], series: Series, prefix: str, png: Path) -> str:
    image = base64.b64encode(png.read_bytes()).decode()
    last = {k[len(prefix) :]: v[-1][1] for k, v in series.items() if k.startswith(prefix) and v}
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v:.4g}</td></tr>" for k, v in sorted(last.items()) if math.isfinite(v)
    )
    first = summary["first_alarm_step"]
    verdict = f"first alarm at step {first}" if first is not None else "no alarm"
    files = "".join(f"<li>{html.escape(f)}</li>" for f in summary["files"])
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>topo-callbacks report</title></head><body>"
        f"<h1>Collapse report: {html.escape(summary['monitor'])}</h1>"
        f"<p>{summary['checks']} checks, last at step {summary['last_step']} "
        f"(value {summary['last_value']:.4f}); {verdict}.</p>"
        f"<img src='data:image/png;base64,{image}' style='max-width:100%'>"
        f"<h2>Last logged values</h2><table>{rows}</table><h2>Files read</h2><ul>{files}</ul></body></html>"
    )
