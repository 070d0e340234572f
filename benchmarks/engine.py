"""The MMHM engine against ripser.py, giotto-ph and torch.cdist, in one process on the same points.

For each cloud (n points in d dimensions, Gaussian or collapsed near a 2-dim subspace) and each scale eps (the
1st and 5th percentiles of the pairwise distances) it times, as medians over ``--reps`` runs:

- ``engine``: ``MMHMEngine(eps).reset(x)`` then ``betti()`` (float32 points, Z/2), from scratch;
- ``ripser``: ``ripser(x, maxdim=1, thresh=eps)``; ``giotto``: ``ripser_parallel(x, maxdim=1, thresh=eps,
  n_threads=-1)`` (skipped when giotto-ph is not installed); ``cdist``: ``torch.cdist(x, x)`` in float32 (the
  engine's storage), the floor;
- ``move 1%`` / ``move 5%``: ``move`` of that many random points (a small displacement) then ``betti()``, on an
  engine that was reset on the cloud;

checks that every tool reports the same (b0, b1) (infinite bars at ``thresh=eps``), and that the engine after
each last move reports what a reset on its moved points does; prints the ratios. Memory:
the engine's state after ``reset`` (``stats()["state_bytes"]``) and the process's peak resident growth during the
reset (Linux only; on a GPU, the peak of CUDA memory allocated during the reset instead).

``--device cuda`` keeps the points, the engine and ``cdist`` on the GPU (the peers stay on the CPU, as they run);
eps is then found on the GPU too, and every timing waits for the device.

Run ``python benchmarks/engine.py`` for the full table (about 15 minutes on a 2-core CPU), ``--quick`` for a
smoke-sized one (CI).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from topo_callbacks.engine import MMHMEngine


def make_cloud(kind: str, n: int, d: int, seed: int) -> np.ndarray:
    """Gaussian N(0, I_d), or points near a random 2-dim subspace (noise 0.05 against a signal of norm ~1.4)."""
    rng = np.random.default_rng(seed)
    if kind == "gauss":
        return rng.standard_normal((n, d)).astype(np.float32)
    basis = np.linalg.qr(rng.standard_normal((d, 2)))[0]
    noise = rng.standard_normal((n, d)) * 0.05 / np.sqrt(d)
    return (rng.standard_normal((n, 2)) @ basis.T + noise).astype(np.float32)


def percentile_distance(x: torch.Tensor, pct: float) -> float:
    """The ``pct``-th percentile of all pairwise distances, placed between two distinct distances."""
    dist = torch.cdist(x.double(), x.double())
    i, j = torch.triu_indices(x.shape[0], x.shape[0], 1, device=x.device)
    values = dist[i, j]
    k = max(1, round(pct / 100.0 * values.numel()))
    # midway between two order statistics: no pair sits at eps, where tools may round either way
    below, above = float(torch.kthvalue(values, k).values), float(torch.kthvalue(values, k + 1).values)
    return (below + above) / 2.0


CPU = torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a timing covers it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], Any], reps: int, device: torch.device = CPU) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(reps):
        synchronize(device)
        start = time.perf_counter()
        out = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def infinite_bars(dgms: list[np.ndarray]) -> tuple[int, int]:
    return int(np.isinf(dgms[0][:, 1]).sum()), int(np.isinf(dgms[1][:, 1]).sum())


def peak_rss_growth(fn: Callable[[], Any], device: torch.device = CPU) -> float | None:
    """MB of resident memory the call added at its peak (Linux: VmHWM after resetting it), else None; on a GPU, MB
    of CUDA memory the call allocated at its peak (the engine's state lives there, not in host memory)."""
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    status = Path("/proc/self/status")
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = _vm(status, "VmRSS")
        fn()
        return (_vm(status, "VmHWM") - before) / 1024.0
    except OSError:
        fn()
        return None


def _vm(status: Path, key: str) -> int:
    for line in status.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise OSError(key)


def run_config(
    kind: str, n: int, d: int, pct: float, reps: int, peers: bool, seed: int = 0, device: str = "cpu"
) -> dict[str, Any]:
    dev = torch.device(device)
    x_np = make_cloud(kind, n, d, seed)
    x = torch.from_numpy(x_np).to(dev)
    eps = percentile_distance(x, pct)
    row: dict[str, Any] = {"kind": kind, "n": n, "d": d, "pct": pct, "eps": eps, "device": dev.type}

    def engine_from_scratch() -> tuple[MMHMEngine, tuple[int, int]]:
        engine = MMHMEngine(eps, device=dev)
        engine.reset(x)
        return engine, engine.betti()

    engine_from_scratch()  # warm-up: lazy imports and allocator (and, on a GPU, the kernels' first launch)
    row["engine_s"], (engine, betti) = median_time(engine_from_scratch, reps, dev)
    row["b0"], row["b1"] = betti
    row["state_mb"] = engine.stats()["state_bytes"] / 2**20
    row["peak_mb"] = peak_rss_growth(engine_from_scratch, dev)
    x32 = x.float()  # the engine stores float32: the floor is a float32 distance matrix
    row["cdist_s"], _ = median_time(lambda: torch.cdist(x32, x32), reps, dev)
    if peers:
        from ripser import ripser

        row["ripser_s"], dgms = median_time(lambda: ripser(x_np, maxdim=1, thresh=eps), reps)
        row["ripser_agrees"] = infinite_bars(dgms["dgms"]) == betti
        try:
            from gph import ripser_parallel
        except ImportError:
            row["giotto_s"] = None
        else:
            row["giotto_s"], out = median_time(lambda: ripser_parallel(x_np, maxdim=1, thresh=eps, n_threads=-1), reps)
            row["giotto_agrees"] = infinite_bars(out["dgms"]) == betti
    rng = np.random.default_rng(seed + 1)
    scale = 0.05 * eps
    for share in (0.01, 0.05):
        k = max(1, round(share * n))
        times = []
        for _ in range(reps):
            engine, _ = engine_from_scratch()
            ids = engine.ids()
            chosen = torch.from_numpy(rng.choice(n, size=k, replace=False))
            moved = x[chosen.to(dev)] + scale / np.sqrt(d) * torch.randn(k, d).to(dev)
            synchronize(dev)
            start = time.perf_counter()
            engine.move(ids[chosen.to(ids.device)], moved)
            after = engine.betti()
            times.append(time.perf_counter() - start)
        row[f"move{int(share * 100)}_s"] = statistics.median(times)
        # the edited engine against one reset on its points (a reset agrees with the peers above)
        fresh = MMHMEngine(eps, device=dev)
        fresh.reset(engine.points())
        row[f"move{int(share * 100)}_agrees"] = fresh.betti() == after
    return row


def _fmt_s(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{a / b:.2f}"


AGREEMENT = ("ripser_agrees", "giotto_agrees", "move1_agrees", "move5_agrees")


def markdown(rows: list[dict[str, Any]]) -> str:
    head = (
        "| data | n | d | eps | b0, b1 | engine reset+betti | ripser | giotto-ph | cdist | faster peer / engine "
        "| engine / cdist | move 1% | move 5% | reset / move 5% | state | peak |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        peers = [t for t in (r.get("ripser_s"), r.get("giotto_s")) if t is not None]
        best = min(peers) if peers else None
        agree = all(r.get(k, True) for k in AGREEMENT)
        peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f} MB"
        lines.append(
            f"| {r['kind']} | {r['n']} | {r['d']} | p{r['pct']:02.0f} | {r['b0']}, {r['b1']}{'' if agree else ' (!)'} "
            f"| {_fmt_s(r['engine_s'])} | {_fmt_s(r.get('ripser_s'))} | {_fmt_s(r.get('giotto_s'))} "
            f"| {_fmt_s(r['cdist_s'])} | {_ratio(best, r['engine_s'])} | {_ratio(r['engine_s'], r['cdist_s'])} "
            f"| {_fmt_s(r['move1_s'])} | {_fmt_s(r['move5_s'])} | {_ratio(r['engine_s'], r['move5_s'])} "
            f"| {r['state_mb']:.1f} MB | {peak} |"
        )
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, one repetition (CI)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument("--dims", type=int, nargs="+", default=None)
    parser.add_argument("--kinds", nargs="+", default=["gauss", "collapsed"])
    parser.add_argument("--pcts", type=float, nargs="+", default=[1.0, 5.0])
    parser.add_argument("--reps", type=int, default=None, help="repetitions per timing (median)")
    parser.add_argument("--no-peers", action="store_true", help="skip ripser and giotto-ph")
    parser.add_argument("--peers-up-to", type=int, default=8192, help="largest n at which the peers run")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--device", default="cpu", help="where the points, the engine and cdist live (cpu, cuda)")
    args = parser.parse_args(argv)
    sizes = args.sizes or ([256, 512] if args.quick else [1024, 2048, 4096, 8192])
    dims = args.dims or ([64] if args.quick else [64, 768])
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    print(
        f"# engine benchmark: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
        f", device {args.device} ({where})"
    )
    rows = []
    for d in dims:
        for n in sizes:
            for kind in args.kinds:
                for pct in args.pcts:
                    reps = args.reps or (1 if args.quick else (3 if n <= 2048 else 1))
                    peers = not args.no_peers and n <= args.peers_up_to
                    row = run_config(kind, n, d, pct, reps, peers, device=args.device)
                    rows.append(row)
                    print(markdown([row]).splitlines()[-1], flush=True)
    print()
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    bad = [r for r in rows if not all(r.get(k, True) for k in AGREEMENT)]
    if bad:
        print(f"DISAGREEMENT with a peer, or of a moved engine with a reset, in {len(bad)} row(s), marked (!)")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
