"""The overhead benchmark's realistic models and its split protocol, at toy sizes (benchmarks/overhead.py)."""

from __future__ import annotations

import math
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tests.scripts import load_benchmark


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_benchmark("overhead.py", "overhead_bench")


def test_resnet18_shapes(bench: ModuleType) -> None:
    with torch.device("meta"):  # shapes only, no memory
        model = bench.ResNet18()
    assert sum(p.numel() for p in model.parameters()) == 11_173_962  # ResNet-18, CIFAR stem, 10 classes
    workload = bench.resnet18_workload(torch.device("cpu"), batch=2, width=4)
    clouds = bench.capture_clouds(workload, ["middle", "last"], rows=5)
    assert clouds["middle"].shape == (5, 8)
    assert clouds["last"].shape == (5, 32)


def test_gpt2_shapes(bench: ModuleType) -> None:
    with torch.device("meta"):
        model = bench.GPT(layers=12, context=1024)
    assert sum(p.numel() for p in model.parameters()) == 124_439_808  # GPT-2 small (tied head)
    workload = bench.gpt2_workload(torch.device("cpu"), batch=2, layers=4, context=8, d=16, heads=2, vocab=50)
    assert workload.layers == {"middle": "h.1", "last": "h.3"}
    x, y = workload.batches(1, seed=0)[0]
    assert x.shape == (2, 9)
    assert y.shape == (2, 8)
    net = workload.make_model()
    assert net(x[:, :-1]).shape == (2, 8, 50)
    clouds = bench.capture_clouds(workload, ["middle", "last"], rows=3)
    assert clouds["middle"].shape == (3, 16)


@pytest.mark.parametrize("framework", ["plain", "lightning"])
def test_split_protocol_end_to_end(bench: ModuleType, framework: str, tmp_path: Path) -> None:
    if framework == "lightning":
        pytest.importorskip("lightning")
    workload = bench.gpt2_workload(torch.device("cpu"), batch=2, layers=2, context=8, d=16, heads=2, vocab=50)
    setting = bench.Setting(steps=1, repeats=1, checks=1)
    # Lightning: one configuration (each run is a Trainer.fit); the plain loop: both layers, two sample sizes
    layers, samples = (["last"], [16]) if framework == "lightning" else (["middle", "last"], [16, 32])
    lines: list[str] = []
    results = bench.measure(workload, [framework], layers, samples, setting, log=lines.append)
    assert [(r.layer, r.samples) for r in results] == [(layer, s) for layer in layers for s in samples]
    for r in results:
        assert r.framework == framework
        assert r.n_checked == r.samples  # each check saw the full sample
        assert len(r.check_times) == bench.STARTUP_CHECKS + 1
        assert r.step_off > 0
        assert r.step_on > 0
        assert r.check > 0
        assert r.ratio == pytest.approx((50 * r.step_on + r.check) / (50 * r.step_off))
        if framework == "plain":  # a check's memory is measured in the plain loop (Linux: /proc)
            assert math.isnan(r.check_peak) or r.check_peak >= 0
    table = bench.format_table(results)
    assert table.count("\n") == 1 + len(results)


def test_arguments(bench: ModuleType) -> None:
    args = bench.parse_args([])
    assert (args.model, args.samples, args.dim) == ("mlp", [1024], 256)
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cuda"])  # the MLP setting is CPU-only
    with pytest.raises(SystemExit):
        bench.parse_args(["--model", "gpt2", "--steps", "60"])  # a step-time run must end before a check
    args = bench.parse_args(["--model", "gpt2", "--quick", "--framework", "plain", "--layer", "last"])
    workload = bench.build_workload(args, torch.device("cpu"))
    assert workload.layers["last"] == "h.1"
    assert bench.default_setting(args, torch.device("cpu")).steps < bench.EVERY


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="the RSS high-water mark is read from /proc")
def test_timed_call_counts_a_calls_peak_memory_not_what_was_there(bench: ModuleType) -> None:
    keep = torch.ones(64 * 2**20 // 4)  # 64 MB resident before the call: not counted

    def allocate() -> None:
        torch.ones(128 * 2**20 // 4).sum()  # 128 MB, touched and freed inside the call

    seconds, extra = bench.timed_call(allocate, torch.device("cpu"))
    assert seconds > 0
    assert 100 <= extra < 180, extra
    _, idle = bench.timed_call(lambda: None, torch.device("cpu"))
    assert idle < 10, idle
    del keep
