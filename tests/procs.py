"""Plumbing for multi-process tests: a free port and a clean environment for each subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
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


def torchrun(script: Path | str, nproc: int = 2) -> list[str]:
    """The command that runs ``script`` under ``torchrun`` with ``nproc`` local processes on a free port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port()), str(script)]  # fmt: skip


def run_checked(cmd: list[str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in ``cwd`` with a clean environment and a fresh ``MASTER_PORT``; fail the test unless rc is 0.

    ``MASTER_ADDR``/``MASTER_PORT`` are for launchers that read them (Lightning's ddp); torchrun brings its own.
    """
    env = clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def run_script(source: str, tmp_path: Path, *args: str, launcher: str = "python", timeout: int = 240) -> Path:
    """Write ``source`` to ``tmp_path/script.py`` and run it with ``tmp_path`` and ``args`` as arguments, either
    plainly (``launcher="python"``) or under ``torchrun`` with 2 processes; returns ``tmp_path``."""
    script = tmp_path / "script.py"
    script.write_text(source)
    cmd = [sys.executable, str(script)] if launcher == "python" else torchrun(script)
    run_checked([*cmd, str(tmp_path), *args], tmp_path, timeout)
    return tmp_path


def finish_distributed() -> None:
    """For worker scripts, after they dropped their trainer/model: wait, collect, destroy the process group.

    Freed after the group is gone (at interpreter exit), distributed models intermittently hung a process or
    aborted it ("terminate called without an active exception").
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    _destroy_group()


def destroy_group_at_exit() -> None:
    """For worker scripts that a launcher re-imports in the processes it spawns (Lightning's ``ddp_spawn``): those
    processes hand their results back and exit with the process group alive, which intermittently aborted one of
    them at interpreter shutdown ("terminate called without an active exception"). Destroy the group first."""
    import atexit

    atexit.register(_destroy_group)


def _destroy_group() -> None:
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
