"""Load a script of ``benchmarks/`` as a module, so that tests run its models and training loops."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark(filename: str, name: str) -> ModuleType:
    """``benchmarks/<filename>`` imported as module ``name`` (registered in `sys.modules`: dataclasses look their
    module up)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / filename)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
