"""Hypothesis profiles: random exploration by default; ``HYPOTHESIS_PROFILE=ci`` (set by .ci/run) derandomizes,
so a landing run is reproducible and a failure found while developing is kept as an ``@example``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

settings.register_profile("ci", derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


#: The families of the quick benchmark the suite trains once (`quick_bench_dir`).
QUICK_BENCH_FAMILIES = ("classifier_lr", "dead_units", "batch_size")


@pytest.fixture(scope="session")
def quick_bench_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``topo-callbacks bench --quick --seeds 2`` on `QUICK_BENCH_FAMILIES`, trained once per session: the bench
    tests read its outputs, the benchmark notebook starts from its cached runs (and re-analyses them)."""
    from topo_callbacks.cli import main

    out = tmp_path_factory.mktemp("bench")
    args = ["bench", "--quick", "--seeds", "2", "--jobs", "2", "--out", str(out), "--families", *QUICK_BENCH_FAMILIES]
    assert main(args) == 0
    return out
