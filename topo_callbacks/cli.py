"""Command line: ``topo-callbacks demo | report | bench``."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable

from topo_callbacks import __version__


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
    from topo_callbacks.report import ReportWarning, write_report

    code = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ReportWarning)
        try:
            summary = write_report(
                args.logdir,
                args.out,
                monitor=args.monitor,
                run=args.run,
                calibration_checks=args.calibration_checks,
                baseline_checks=args.baseline_checks,
                # not given: the monitor's default, drawn only for a run without the detector (alarm="rise")
                max_rise=getattr(args, "max_rise", "default"),
            )
        except (OSError, ValueError, RuntimeError) as err:  # ReportError (UnreadableLogError too) is a ValueError
            print(f"topo-callbacks report: {err}", file=sys.stderr)
            code = 2
    # which run was drawn and which were not is said even when the report then failed
    for w in caught:
        if issubclass(w.category, ReportWarning):
            print(f"topo-callbacks report: {w.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if code:
        return code
    first = summary["first_alarm_step"]
    print(
        f"{summary['checks']} checks of {summary['monitor']}, last at step {summary['last_step']};"
        f" {'first alarm at step ' + str(first) if first is not None else 'no alarm'}"
        f" -> {summary.get('html', summary['figure'])}"
    )
    print(f"  {summary['rule']}")
    print(f"  {summary['events']}")
    return 0


def _max_rise(text: str) -> float | None:
    """``--max-rise``: a positive number, or ``none``/``off`` for a monitor whose rise rule was off."""
    if text.lower() in ("none", "off"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0 or 'none'; got {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a number > 0 or 'none'; got {text!r}")
    return value


def _count(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}; got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}; got {text!r}")
        return value

    return parse


REPORT_HELP = """\
Draw one run's collapse index, its logged terms, the calibration window, the CUSUM detector's statistic over its
threshold (alarms at 1) and its channels, the alarm episodes, the optimizer steps a loss scaler skipped, and the
latest H0 barcode (for a run with alarm='rise': the baseline and the rise rule's threshold instead of the detector).
A resumed run is labelled with the step it resumed at. When LOGDIR holds several runs (subfolders with the
monitor's values, or several event files with them in one folder), the most recently written run is reported, the
others are listed, and --run picks one; runs are never merged. A log file that cannot be read is named (exit 2).
The monitor key is found with or without HF Trainer's train/ prefix.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="topo-callbacks", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="SimSiam on bundled digits; stop-gradient removed at t0 (CPU, ~15 s)")
    demo.add_argument("--out", default="demo_out", help="output folder for summary.json and timeline.png")
    demo.add_argument("--healthy", action="store_true", help="keep the stop-gradient (no collapse expected)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--steps", type=int, default=2000, help="optimizer steps (default 2000)")
    demo.add_argument("--t0", type=int, default=None, help="step at which the stop-gradient goes (default 30%%)")
    demo.set_defaults(func=_demo)
    from topo_callbacks.report import OUT_SUFFIXES, rule_defaults

    rule = rule_defaults()  # the monitor's own defaults (CollapseMonitorCore's signature), not copies
    report = sub.add_parser(
        "report",
        help="a run's logs (CSVLogger or TensorBoard) -> HTML/PNG/PDF/SVG report",
        description=REPORT_HELP,
    )
    report.add_argument("logdir", help="a folder holding metrics.csv or events.out.tfevents.* files (at any depth)")
    report.add_argument(
        "--out",
        default=None,
        help=f"the report file; accepted extensions: {', '.join(OUT_SUFFIXES)} (.html embeds a PNG written beside it;"
        " default LOGDIR/collapse_report.html)",
    )
    report.add_argument(
        "--monitor",
        default="collapse/ci",
        help="the logged CI key (default collapse/ci; a train/collapse/ci tag is found too)",
    )
    report.add_argument(
        "--run",
        default=None,
        help="the run to report when LOGDIR holds several: its path relative to LOGDIR, as listed (default: the"
        " most recently written run, i.e. the newest log file)",
    )
    report.add_argument(
        "--calibration-checks",
        type=_count(0),
        default=rule["calibration_checks"],
        help=f"the monitor's calibration_checks: the first checks, which calibrate the scale (default"
        f" {rule['calibration_checks']}; 0 for a monitor given a fixed eps)",
    )
    report.add_argument(
        "--baseline-checks",
        type=_count(1),
        default=rule["baseline_checks"],
        help=f"the monitor's baseline_checks: the checks after calibration whose median is the baseline (default"
        f" {rule['baseline_checks']})",
    )
    report.add_argument(
        "--max-rise",
        type=_max_rise,
        default=argparse.SUPPRESS,  # told apart from a given value: the rise threshold is drawn when given
        help=f"alarm when the CI is more than this above the baseline (default {rule['max_rise']}, the monitor's"
        " max_rise; 'none' if the rise rule was off). The rise rule's threshold is drawn for a run that logged no"
        " detector (alarm='rise'), or when this is given",
    )
    report.set_defaults(func=_report)
    bench = sub.add_parser(
        "bench",
        help="failure families and controls x seeds: detection, lead and false alarms per detector",
        description="Train every family (shared-prefix forks; runs cached in OUT, so an interrupted run resumes) and"
        " score every detector leave-one-family-out. See topo_callbacks/bench/protocol.py.",
    )
    bench.add_argument(
        "--families", "--scenarios", nargs="+", default=None, dest="families", help="family names (default: all)"
    )
    bench.add_argument("--seeds", type=int, default=10, help="seeds 0..N-1; the first half calibrates (default 10)")
    bench.add_argument("--out", default="bench_out", help="output folder (runs are cached in OUT/runs)")
    bench.add_argument("--quick", action="store_true", help="short runs: a smoke test of the pipeline, not results")
    bench.add_argument("--jobs", type=int, default=1, help="independent runs trained in parallel processes")
    bench.add_argument(
        "--recovery",
        choices=("alarmed", "all", "off"),
        default="alarmed",
        help="the rollback arm (on_alarm='rollback', test seeds, cached in OUT/recovery): every failure arm and the"
        " clean runs the detector alarms on (alarmed, the default), every test run (all), or none (off)",
    )
    bench.set_defaults(func=_bench)
    args = parser.parse_args(argv)
    return int(args.func(args))


def _bench(args: argparse.Namespace) -> int:
    from topo_callbacks.bench.families import FAMILIES
    from topo_callbacks.bench.report import DEFAULT
    from topo_callbacks.bench.runner import run_benchmark

    if args.families and sorted(set(args.families) - set(FAMILIES)):
        print(f"topo-callbacks bench: unknown family; accepted: {' '.join(FAMILIES)}", file=sys.stderr)
        return 2
    try:
        results = run_benchmark(
            args.out,
            families=args.families,
            seeds=args.seeds,
            quick=args.quick,
            jobs=args.jobs,
            recovery=args.recovery,
        )
    except ValueError as err:
        print(f"topo-callbacks bench: {err}", file=sys.stderr)
        return 2
    print(f"\n{'detector':<64} {'detected':>9} {'lead':>6} {'FA':>7}   (test seeds {results['test_seeds']})")
    for label, d in results["detectors"].items():
        p = d["pooled"]
        lead = "-" if p["median_lead"] is None else f"{p['median_lead']:+.0f}"
        det, fa = f"{p['detected']}/{p['failure_runs']}", f"{p['false_alarms']}/{p['clean_runs']}"
        print(f"{label:<64} {det:>9} {lead:>6} {fa:>7}{'  <- default' if label == DEFAULT else ''}")
    recovery = results.get("recovery")
    if recovery:
        t = recovery["targets"]
        opt, conf, clean = (t["optimizer_rescued_of_detected"], t["configuration_stopped_with_diagnosis"],
                            t["clean_alarmed"])  # fmt: skip
        print(
            f"on_alarm='rollback' ({recovery['live_runs']} runs trained): rescued {opt['k']}/{opt['n']} detected"
            f" optimizer-instability failures, stopped with the diagnosis {conf['k']}/{conf['n']} alarmed"
            f" configuration failures, {clean['n']} clean runs alarmed"
            + ("" if clean["worst_points"] is None else f" (worst loss {clean['worst_points']:.1f} points)")
        )
    print(f"-> {args.out}/results.md, results.json, summary.json, curves.png, timeline_*.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
