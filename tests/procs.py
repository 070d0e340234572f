"""Plumbing for multi-process tests: a free port and a clean environment for each subprocess."""

from __future__ import annotations

import os
import socket
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_KEEP = ("PATH", "HOME", "LANG", "SYSTEMROOT", "TMPDIR")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """The few variables a process needs, the repository on PYTHONPATH, one thread, plus ``extra``.

    Nothing else is inherited: Lightning's ddp leaves MASTER_PORT and friends behind in the parent.
    """
    env = {k: os.environ[k] for k in _KEEP if k in os.environ}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.update(extra)
    return env
