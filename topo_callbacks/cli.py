"""Command line: ``topo-callbacks demo | report | bench``."""

from __future__ import annotations

import argparse
import sys


def verdict(summary: dict) -> str:
    """Whether a demo run came out as the demo claims: collapse: t0 <= alarm < drop; healthy: neither.

    Example:
        >>> verdict({"healthy": False, "t0_step": 600, "alarm_step": 700, "drop_step": 1600})
        'as expected (alarm 900 steps before the accuracy drop)'
        >>> verdict({"healthy": True, "t0_step": None, "alarm_step": 300, "drop_step": None})
        'NOT as expected: a healthy run raised an alarm at step 300'
    """
    alarm, drop = summary["alarm_step"], summary["drop_step"]
    if summary["healthy"]:
        if alarm is not None:
            return f"NOT as expected: a healthy run raised an alarm at step {alarm}"
        if drop is not None:
            return f"NOT as expected: the healthy run's accuracy dropped at step {drop}"
        return "as expected (no alarm, no accuracy drop)"
    if alarm is None:
        return "NOT as expected: no alarm in the collapse run"
    if drop is None:
        return "NOT as expected: the accuracy did not drop within the run (try more --steps)"
    if not summary["t0_step"] <= alarm < drop:
        return f"NOT as expected: alarm at {alarm}, accuracy drop at {drop}, t0 {summary['t0_step']}"
    return f"as expected (alarm {drop - alarm} steps before the accuracy drop)"


def _demo(args: argparse.Namespace) -> int:
    from topo_callbacks.demo import run_demo

    summary = run_demo(args.out, healthy=args.healthy, seed=args.seed, steps=args.steps, t0=args.t0)
    print("demo outcome:", verdict(summary))
    return 0


def _report(args: argparse.Namespace) -> int:
    from topo_callbacks.report import write_report

    try:
        summary = write_report(args.logdir, args.out, monitor=args.monitor)
    except (FileNotFoundError, KeyError, RuntimeError) as err:
        print(f"topo-callbacks report: {err}", file=sys.stderr)
        return 2
    first = summary["first_alarm_step"]
    print(
        f"{summary['checks']} checks of {summary['monitor']}, last at step {summary['last_step']};"
        f" {'first alarm at step ' + str(first) if first is not None else 'no alarm'}"
        f" -> {summary.get('html', summary['png'])}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="topo-callbacks", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="SimSiam on bundled digits; stop-gradient removed at t0 (CPU, ~15 s)")
    demo.add_argument("--out", default="demo_out", help="output folder for summary.json and timeline.png")
    demo.add_argument("--healthy", action="store_true", help="keep the stop-gradient (no collapse expected)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--steps", type=int, default=2000, help="optimizer steps (default 2000)")
    demo.add_argument("--t0", type=int, default=None, help="step at which the stop-gradient goes (default 30%%)")
    demo.set_defaults(func=_demo)
    report = sub.add_parser("report", help="a run's logs (CSVLogger or TensorBoard) -> PNG/HTML report")
    report.add_argument("logdir", help="a folder holding metrics.csv or events.out.tfevents.* files")
    report.add_argument("--out", default=None, help="report.html or report.png (default LOGDIR/collapse_report.html)")
    report.add_argument("--monitor", default="collapse/ci", help="the logged CI key (default collapse/ci)")
    report.set_defaults(func=_report)
    bench = sub.add_parser("bench", help="collapse scenarios x seeds: lead times and false positives per detector")
    bench.add_argument("--scenarios", nargs="+", default=None, help="scenario names (default: all)")
    bench.add_argument("--seeds", type=int, default=10, help="seeds 0..N-1; the first half calibrates (default 10)")
    bench.add_argument("--out", default="bench_out", help="output folder (runs are cached in OUT/runs)")
    bench.add_argument("--quick", action="store_true", help="short runs: a smoke test of the pipeline, not results")
    bench.set_defaults(func=_bench)
    args = parser.parse_args(argv)
    return int(args.func(args))


def _bench(args: argparse.Namespace) -> int:
    from topo_callbacks.bench.runner import run_benchmark
    from topo_callbacks.bench.scenarios import SCENARIOS

    if args.scenarios and sorted(set(args.scenarios) - set(SCENARIOS)):
        print(f"topo-callbacks bench: unknown scenario(s); accepted: {' '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    try:
        results = run_benchmark(args.out, scenarios=args.scenarios, seeds=args.seeds, quick=args.quick)
    except ValueError as err:
        print(f"topo-callbacks bench: {err}", file=sys.stderr)
        return 2
    print(f"\n{'detector':<48} {'detected':>9} {'lead':>6} {'FP':>7}   (test seeds {results['test_seeds']})")
    for name, d in results["detectors"].items():
        if name.startswith("ablation"):
            continue
        o = d["overall"]
        lead = "-" if o["median_lead_vs_drop"] is None else f"{o['median_lead_vs_drop']:+.0f}"
        det, fp = f"{o['detected']}/{o['collapsed_runs']}", f"{o['false_positives']}/{o['runs']}"
        print(f"{name:<48} {det:>9} {lead:>6} {fp:>7}")
    print(f"-> {args.out}/results.md, results.json, timeline_*.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
