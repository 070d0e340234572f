"""Write the detector's shipped calibrations (`topo_callbacks/core/_calibration.py`) from a benchmark run.

    python scripts/write_calibration.py bench_out/results.json

The calibrations are the benchmark's fits on the calibration seeds of every family, one per false-alarm rate
(`topo_callbacks.bench.protocol.SHIPPED_RATES`); test seeds play no part in them.
"""

from __future__ import annotations

import argparse
import json
import pprint
from pathlib import Path

TARGET = Path(__file__).resolve().parents[1] / "topo_callbacks" / "core" / "_calibration.py"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="results.json of a full `topo-callbacks bench` run")
    args = parser.parse_args()
    results = json.loads(Path(args.results).read_text())
    if results.get("quick"):
        parser.error("a --quick run is a smoke test, not a calibration")
    shipped = results["shipped_calibrations"]
    runs = [r for r in results["runs"] if r["split"] == "calibration"]
    seeds = sorted({r["seed"] for r in runs})
    body = pprint.pformat(shipped, width=110, sort_dicts=False)
    TARGET.write_text(
        '"""The CUSUM detector\'s shipped calibrations, written by scripts/write_calibration.py; do not edit.\n\n'
        f"Fit by `topo-callbacks bench --seeds {2 * len(seeds)}` on its calibration seeds {seeds} of every family\n"
        f"({len(runs)} runs); see docs/benchmark.md.\n"
        '"""\n\n'
        "from typing import Any\n\n"
        f"CALIBRATIONS: list[dict[str, Any]] = {body}\n"
    )
    print(f"wrote {TARGET} ({len(shipped)} rates)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
