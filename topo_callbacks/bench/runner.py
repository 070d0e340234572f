"""Run the families over seeds (shared-prefix forks, cached, in parallel), replay every detector, write the outputs.

Each (family, seed) is one unit of work: its prefix is trained once and snapshotted (``OUT/prefix``), its arms are
forked from the snapshot and saved as JSON (``OUT/runs``). A unit whose arms are on disk is not retrained, and a
unit whose prefix is on disk retrains only its arms, so an interrupted benchmark resumes where it stopped.
``jobs`` units run in parallel processes (one torch thread each). The protocol is in
`topo_callbacks.bench.protocol`; seeds ``0..n/2-1`` calibrate, the others are scored.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from topo_callbacks.bench.families import FAMILIES, Family
from topo_callbacks.bench.record import RunRecord, train_arm, train_prefix

__all__ = ["load_records", "run_benchmark", "run_unit"]


def _tag(quick: bool) -> str:
    return "__quick" if quick else ""


def run_path(out: Path, family: str, arm: str, seed: int, quick: bool) -> Path:
    return out / "runs" / f"{family}__{arm}__{seed}{_tag(quick)}.json"


def prefix_path(out: Path, family: str, seed: int, quick: bool) -> Path:
    return out / "prefix" / f"{family}__{seed}{_tag(quick)}.pt"


def run_unit(out: str | Path, family: str, seed: int, quick: bool, threads: int = 1) -> list[RunRecord]:
    """Both arms of one seed of one family: loaded from ``out`` when cached, else trained (prefix reused if cached).

    Training uses ``threads`` torch threads (1 by default: these models are small, parallelism comes from running
    units side by side, and the same thread count everywhere keeps results the same with any ``jobs``).
    """
    import torch

    torch.set_num_threads(threads)
    out = Path(out)
    fam = FAMILIES[family]
    paths = [run_path(out, family, arm, seed, quick) for arm in fam.arms]
    if all(p.exists() for p in paths):
        return [RunRecord.from_dict(json.loads(p.read_text())) for p in paths]
    ppath = prefix_path(out, family, seed, quick)
    if ppath.exists():
        snapshot = torch.load(ppath, weights_only=False)
    else:
        snapshot = train_prefix(fam, seed, quick)
        ppath.parent.mkdir(parents=True, exist_ok=True)
        torch.save(snapshot, ppath)
    records = []
    for arm, path in zip(fam.arms, paths, strict=True):
        if path.exists():
            rec = RunRecord.from_dict(json.loads(path.read_text()))
        else:
            rec = train_arm(fam, seed, quick, arm, snapshot)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(rec.as_dict()))
            tmp.replace(path)  # a unit interrupted mid-write is retrained, never read half-written
        records.append(rec)
    return records


def load_records(out: str | Path, quick: bool = False) -> list[RunRecord]:
    """Every cached run under ``out/runs`` of the given setting."""
    paths = sorted(Path(out, "runs").glob("*.json"))
    return [RunRecord.from_dict(json.loads(p.read_text())) for p in paths if p.stem.endswith("__quick") == quick]


def run_benchmark(
    out: str | Path = "bench_out",
    *,
    families: Sequence[str] | None = None,
    seeds: int = 10,
    quick: bool = False,
    jobs: int = 1,
    recovery: str = "alarmed",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run ``families`` (default: all) for seeds ``0..seeds-1``, analyse, and write ``results.json``, ``results.md``,
    ``summary.json`` and the plots into ``out``. Returns the results.

    ``recovery``: the rollback arm (`topo_callbacks.bench.recovery`), trained on the test seeds after the analysis
    (its live detector is the held-out fit, which needs every calibration run) and cached in ``out/recovery``:
    ``"alarmed"`` trains every failure arm and the clean runs the detector alarms on (a clean run without an alarm
    would be its plain arm again, bit for bit), ``"all"`` every test run, ``"off"`` none.

    Example:
        >>> import tempfile
        >>> out = tempfile.mkdtemp()
        >>> res = run_benchmark(out, families=["classifier_lr", "batch_size"], seeds=2, quick=True, log=lambda s: None)
        >>> res["calibration_seeds"], res["test_seeds"], sorted(res["verification"])
        ([0], [1], ['batch_size', 'classifier_lr'])
    """
    names = list(families) if families else list(FAMILIES)
    unknown = sorted(set(names) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown famil{'y' if len(unknown) == 1 else 'ies'} {unknown}; accepted: {sorted(FAMILIES)}.")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 2:
        raise ValueError(f"`seeds` must be an int >= 2 (calibration and test seeds are disjoint); got {seeds!r}.")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"`jobs` must be an int >= 1; got {jobs!r}.")
    if recovery not in ("alarmed", "all", "off"):
        raise ValueError(f"`recovery` must be 'alarmed', 'all' or 'off'; got {recovery!r}.")
    out = Path(out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    units = [(name, seed) for seed in range(seeds) for name in names]
    records: list[RunRecord] = []

    def done(name: str, seed: int, recs: list[RunRecord]) -> None:
        records.extend(recs)
        arms = ", ".join(f"{r.arm} {r.wall_s:.0f} s" for r in recs)
        progress = f"{len(records)}/{2 * len(units)} runs, {time.perf_counter() - start:.0f} s"
        log(f"{name:<24} seed {seed}: {arms}  [{progress}]")

    if jobs == 1:
        for name, seed in units:
            done(name, seed, run_unit(out, name, seed, quick))
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            futures = {pool.submit(run_unit, str(out), name, seed, quick, 1): (name, seed) for name, seed in units}
            for future in as_completed(futures):
                done(*futures[future], future.result())
    records.sort(key=lambda r: (r.family, r.seed, r.arm))
    calibration = list(range(math.ceil(seeds / 2)))
    from topo_callbacks.bench.protocol import analyse

    results = analyse(records, calibration)
    test_seeds = [s for s in range(seeds) if s not in calibration]
    if recovery != "off":
        from topo_callbacks.bench.recovery import plan_recovery, run_recovery, score_recovery

        plan = plan_recovery(records, results["detector_calibrations"], test_seeds, mode=recovery)
        live = run_recovery(out, records, plan, quick=quick, jobs=jobs, log=log)
        results["recovery"] = score_recovery(records, live, plan, mode=recovery)
    results.update(
        {
            "families": {n: _describe(FAMILIES[n], quick) for n in names},
            "calibration_seeds": calibration,
            "test_seeds": test_seeds,
            "quick": quick,
            "jobs": jobs,
            "wall_s": time.perf_counter() - start,
        }
    )
    from topo_callbacks.bench.report import plot_curves, plot_timelines, summary, write_markdown

    (out / "results.json").write_text(json.dumps(results, indent=1, default=_jsonable))
    (out / "summary.json").write_text(json.dumps(summary(results), indent=1, default=_jsonable))
    (out / "results.md").write_text(write_markdown(results))
    plot_timelines(records, results, out)
    plot_curves(results, out)
    return results


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _describe(fam: Family, quick: bool) -> dict[str, Any]:
    steps, t0 = fam.schedule(quick)
    return {
        "kind": fam.kind,
        "title": fam.title,
        "switch": fam.switch,
        "mechanism": fam.mechanism,
        "source": fam.source,
        "metric": fam.metric,
        "steps": steps,
        "t0": t0,
        "eval_every": fam.eval_every,
        "check_every": fam.check_every,
    }
