"""Run one collapse scenario: its healthy arm and its twin (or its control arm), and print them side by side.

    python recipes/scenarios/run_scenario.py simsiam             # healthy arm + stop-gradient removed at t0
    python recipes/scenarios/run_scenario.py byte_lm --seed 3
    python recipes/scenarios/run_scenario.py --list

Each arm is a plain PyTorch loop with `topo_callbacks.core.CollapseMonitorCore` attached at its defaults (the core
the Lightning, Accelerate and HF adapters drive). The scenarios themselves live in `topo_callbacks.bench.scenarios`
so that `topo-callbacks bench` can run them from an installed package; `topo-callbacks bench` runs them all over
several seeds and scores the detectors.
"""

from __future__ import annotations

import argparse

from topo_callbacks.bench.runner import ground_truth
from topo_callbacks.bench.scenarios import SCENARIOS, run_scenario


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", nargs="?", choices=sorted(SCENARIOS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few hundred steps only")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    args = parser.parse_args()
    if args.list or args.scenario is None:
        for sc in SCENARIOS.values():
            print(f"{sc.name:<24} {sc.kind:<8} {sc.title}: {sc.switch} (t0={sc.t0} of {sc.steps} steps)")
        return
    sc = SCENARIOS[args.scenario]
    runs = [run_scenario(sc.name, arm, args.seed, quick=args.quick) for arm in sc.arms]
    print(f"{sc.name}: {sc.title}; {sc.switch} at step {runs[0].t0}; metric {sc.metric}")
    print(f"{'step':>6} " + " ".join(f"{arm + ' ' + sc.metric:>22} {'CI':>5}" for arm in sc.arms))
    ci = [{c["step"]: c["ci"] for c in r.checks} for r in runs]
    for i, (step, _, _) in enumerate(runs[0].evals):
        cells = []
        for r, c in zip(runs, ci, strict=True):
            value = c.get(step)
            cells.append(f"{r.evals[i][1]:>22.2f} {'' if value is None else f'{value:.2f}':>5}")
        print(f"{step:>6} " + " ".join(cells))
    for r in runs:
        truth = ground_truth(r)
        print(
            f"{r.arm}: monitor alarm {r.monitor_alarm_step}, metric drop {truth['t_c']},"
            f" loss spike {truth['loss_spike']}, val-loss patience {truth['val_loss_patience']} ({r.wall_s:.0f} s)"
        )


if __name__ == "__main__":
    main()
