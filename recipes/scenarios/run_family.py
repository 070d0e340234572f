"""Run one benchmark family: its healthy arm and its switched twin, forked from one shared prefix, side by side.

    python recipes/scenarios/run_family.py simsiam          # healthy arm + stop-gradient removed at t0
    python recipes/scenarios/run_family.py byte_lm --seed 3
    python recipes/scenarios/run_family.py --list

Each arm is a plain PyTorch loop with `topo_callbacks.core.CollapseMonitorCore` attached at its defaults (the core
the Lightning, Accelerate and HF adapters drive). The families live in `topo_callbacks.bench.families` so that
`topo-callbacks bench` can run them from an installed package; `topo-callbacks bench` runs them all over several
seeds and scores the detectors.
"""

from __future__ import annotations

import argparse

from topo_callbacks.bench.families import FAMILIES
from topo_callbacks.bench.protocol import ground_truth
from topo_callbacks.bench.record import train_arms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("family", nargs="?", choices=sorted(FAMILIES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few hundred steps only")
    parser.add_argument("--list", action="store_true", help="list the families and exit")
    args = parser.parse_args()
    if args.list or args.family is None:
        for fam in FAMILIES.values():
            print(f"{fam.name:<24} {fam.kind:<8} {fam.title}: {fam.switch} (t0={fam.t0} of {fam.steps} steps)")
        return
    fam = FAMILIES[args.family]
    runs = train_arms(fam, args.seed, quick=args.quick)
    print(f"{fam.name}: {fam.title}; {fam.switch} at step {runs[0].t0}; metric {fam.metric}")
    print(f"{'step':>6} " + " ".join(f"{r.arm + ' ' + fam.metric:>22} {'CI':>5}" for r in runs))
    ci = [{c["step"]: c["ci"] for c in r.checks} for r in runs]
    for i, (step, _, _) in enumerate(runs[0].evals):
        cells = []
        for r, c in zip(runs, ci, strict=True):
            value = c.get(step)
            cells.append(f"{r.evals[i][1]:>22.2f} {'' if value is None else f'{value:.2f}':>5}")
        print(f"{step:>6} " + " ".join(cells))
    for r in runs:
        print(f"{r.arm}: monitor alarm {r.monitor_alarm_step}, metric drop {ground_truth(r)} ({r.wall_s:.0f} s)")


if __name__ == "__main__":
    main()
