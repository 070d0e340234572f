"""The cost of one collapse check on wide rows: time and peak extra memory at widths 768, 4096 and 20000.

For ``--rows`` rows (default 1024) of each width (standard Gaussian, float32) it measures, each in a fresh process
on ``--threads`` threads (default 1):

- ``calibration``: ``collapse_index(x, eps=None, weights="benchmark")``, the check while the scale is calibrated (the
  quantile scale, the minimum spanning tree, the Betti numbers, the spectra and the channels);
- ``steady``: a check at a held scale as the monitors make it with ``source="stream"``
  (`CollapseMonitorCore._compute`): ``collapse_index(x, eps=eps, strict_eps=False)``, whose one Gram matrix gives
  the distances, the Betti numbers and the spectra;
- ``tracker``: what a ``source="stream"`` check cost before (and what ``source="probe"`` costs when every row moved):
  the float32 unit rows (`unit_rows`) and the Betti numbers from an `EngineTracker` (the previous check's sample
  replaced; measured on the check after a first one, so that the engine's storage exists), on top of ``index``:
  ``collapse_index(x, eps=eps, betti=...)`` with the Betti numbers given.

Times are medians (and the best) over ``--reps`` runs of the process's CPU time (``time.process_time``; the wall
time beside it: on a loaded machine the two differ, and the best run is the closest to an idle machine's). Memory
is the growth of the process's peak resident set during the first run of a stage over the resident set just
before it (Linux: the high-water mark is reset through ``/proc/self/clear_refs``), so it counts every allocation
of torch, numpy and Python alike; the batch itself and the engine's state from the previous check are not counted.
To compare with an earlier version, run this script with that version first on ``PYTHONPATH`` (from a directory
outside the checkout).

Run ``python benchmarks/wide_check.py`` (~1-2 minutes on a 2-core CPU) or ``--quick`` (widths 768 and 4096, one
run each).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

WIDTHS = (768, 4096, 20000)
STAGES = ("calibration", "steady", "tracker", "index")


def _status(key: str) -> float | None:
    """``key`` of /proc/self/status in MB (None off Linux)."""
    path = Path("/proc/self/status")
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024.0
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what `platform` knows."""
    info = Path("/proc/cpuinfo")
    if info.exists():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def measure(stage: str, rows: int, width: int, reps: int, threads: int) -> dict[str, Any]:
    """One stage at one width, in this process (a fresh one: see `main`)."""
    from topo_callbacks.core.tracker import EngineTracker, unit_rows
    from topo_callbacks.functional import collapse_index

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(width)
    batches = [torch.randn(rows, width, generator=g) for _ in range(2)]
    collapse_index(torch.randn(64, 32, generator=g))  # imports and lazy initialisation, outside the measurement
    eps = collapse_index(batches[0], weights="benchmark").eps if stage != "calibration" else None
    tracker = EngineTracker("stream")
    if stage == "tracker":
        tracker.betti(unit_rows(batches[0], "l2"), eps)  # the previous check: the engine and its storage exist
    betti = tracker.betti(unit_rows(batches[1], "l2"), eps) if stage == "index" else None

    def run(x: torch.Tensor) -> None:
        if stage == "calibration":
            collapse_index(x, weights="benchmark")
        elif stage == "steady":
            collapse_index(x, eps=eps, weights="benchmark", strict_eps=False)
        elif stage == "tracker":
            tracker.betti(unit_rows(x, "l2"), eps)
        else:
            collapse_index(x, eps=eps, weights="benchmark", betti=betti)

    cpu: list[float] = []
    wall: list[float] = []
    peak = None
    for rep in range(reps):
        x = batches[(rep + 1) % 2]
        if rep == 0:
            before = _status("VmRSS")
            peak_ok = _reset_peak()
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        run(x)
        cpu.append(time.process_time() - start_cpu)
        wall.append(time.perf_counter() - start_wall)
        if rep == 0:
            high = _status("VmHWM")
            peak = high - before if peak_ok and high is not None and before is not None else None
    return {
        "stage": stage,
        "rows": rows,
        "width": width,
        "cpu_s": statistics.median(cpu),
        "cpu_min_s": min(cpu),
        "wall_s": statistics.median(wall),
        "peak_mb": peak,
        "reps": reps,
    }


def _child(stage: str, rows: int, width: int, reps: int, threads: int) -> dict[str, Any]:
    """`measure` in a fresh Python process (no memory kept by an earlier stage, one BLAS warm-up each)."""
    cmd = [sys.executable, __file__, "--child", stage, "--rows", str(rows), "--widths", str(width)]
    cmd += ["--reps", str(reps), "--threads", str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "| width | stage | CPU time (median) | CPU time (best) | wall time (median) | peak extra memory |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        peak = "n/a" if r["peak_mb"] is None else f"{r['peak_mb']:.0f} MB"
        lines.append(
            f"| {r['width']} | {r['stage']} | {r['cpu_s']:.3f} s | {r['cpu_min_s']:.3f} s | {r['wall_s']:.3f} s"
            f" | {peak} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--widths", type=str, default=",".join(str(w) for w in WIDTHS))
    parser.add_argument("--reps", type=int, default=3, help="runs per stage (the median is reported)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--stages", type=str, default=",".join(STAGES))
    parser.add_argument("--quick", action="store_true", help="widths 768 and 4096, one run each")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--child", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    widths = [int(w) for w in args.widths.split(",")]
    if args.child is not None:
        print(json.dumps(measure(args.child, args.rows, widths[0], args.reps, args.threads)))
        return 0
    if args.quick:
        widths, args.reps = [768, 4096], 1
    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
    import topo_callbacks

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"machine: {cpu_name()}, {os.cpu_count()} CPUs, load average {load:.2f}; torch {torch.__version__},"
        f" {args.threads} thread(s); Python {platform.python_version()}; {args.rows} rows, float32 Gaussian;"
        f" package {Path(topo_callbacks.__file__).parent}"
    )
    results = []
    for width in widths:
        for stage in stages:
            result = _child(stage, args.rows, width, args.reps, args.threads)
            results.append(result)
            peak = "n/a" if result["peak_mb"] is None else f"{result['peak_mb']:.0f} MB"
            print(
                f"width {width:6d}  {stage:12s} cpu {result['cpu_s']:7.3f} s (best {result['cpu_min_s']:.3f})"
                f"  wall {result['wall_s']:7.3f} s  peak extra {peak}",
                flush=True,
            )
    print()
    print(markdown(results))
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": cpu_name(), "torch": torch.__version__, "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
