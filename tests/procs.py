"""Plumbing for multi-process tests: a free port and a clean environment for each subprocess."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the CUDA variables too: on a GPU machine the driver's libraries may be found only through LD_LIBRARY_PATH
_KEEP = ("PATH", "HOME", "LANG", "SYSTEMROOT", "TMPDIR", "LD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES", "CUDA_HOME")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """The few variables a process needs, the repository on PYTHONPATH, one thread, plus ``extra``.

    Nothing else is inherited: Lightning's ddp leaves MASTER_PORT and friends behind in the parent. The parent's own
    PYTHONPATH follows the repository: packages installed with ``pip install --target`` (scripts/gpu_check.sh, on a
    machine without network) are found only through it.
    """
    env = {k: os.environ[k] for k in _KEEP if k in os.environ}
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env.update(PYTHONPATH=path, OMP_NUM_THREADS="1")
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


def run_script(
    source: str,
    tmp_path: Path,
    *args: str,
    launcher: str = "python",
    timeout: int = 240,
    folders: Sequence[str] = (),
) -> Path:
    """Write ``source`` to ``tmp_path/script.py`` and run it with ``tmp_path`` and ``args`` as arguments, either
    plainly (``launcher="python"``) or under ``torchrun`` with 2 processes; returns ``tmp_path``. ``folders``: made
    under ``tmp_path`` first (one per configuration a launch runs in turn, for its ranks' outputs)."""
    for folder in folders:
        (tmp_path / folder).mkdir()
    script = tmp_path / "script.py"
    script.write_text(source)
    cmd = [sys.executable, str(script)] if launcher == "python" else torchrun(script)
    run_checked([*cmd, str(tmp_path), *args], tmp_path, timeout)
    return tmp_path


def torchrun_nodes(script: Path | str, *args: str, nnodes: int = 2, nproc: int = 1) -> list[list[str]]:
    """One ``torchrun`` command per "node", all on this machine, meeting at a c10d rendezvous on a free port.

    The first node hosts the rendezvous store (``is_host=1``, the others ``is_host=0``): left to guess from the
    hostname, every node on localhost claims it and all but one fall back after a failed bind. Ranks are handed
    out in the order the nodes join, so which node holds rank 0 is not fixed. ``--local_addr`` keeps the workers'
    master address at 127.0.0.1 (else the host's name, which may not resolve); ``join_timeout`` bounds the wait for
    a node that never comes; ``--max_restarts 0``: a failed worker fails its node instead of restarting it.
    """
    endpoint, run_id = f"127.0.0.1:{free_port()}", f"test-{uuid.uuid4().hex[:12]}"
    return [
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc_per_node", str(nproc),
         "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", run_id,
         "--rdzv_conf", f"is_host={int(node == 0)},join_timeout=60", "--local_addr", "127.0.0.1",
         "--max_restarts", "0", "--monitor_interval", "0.2", str(script), *args]
        for node in range(nnodes)
    ]  # fmt: skip


def run_together(cmds: list[list[str]], cwd: Path, timeout: int = 240) -> list[str]:
    """Start every command at once (e.g. one per node) with a clean environment; fail the test unless all exit 0.

    Returns each command's stdout. When one fails, or the time is up, every process group is killed: a node left
    waiting for a peer that died would otherwise sit in the rendezvous or in a gloo collective (30 min default).
    Output goes to files in ``cwd`` (``cmd{i}.out``/``.err``), not pipes, so that no process blocks on a full pipe.
    """
    env = clean_env()
    procs, files = [], []
    try:
        for i, cmd in enumerate(cmds):
            out, err = open(cwd / f"cmd{i}.out", "w"), open(cwd / f"cmd{i}.err", "w")  # noqa: SIM115
            files += [out, err]
            # own session: the kill below reaches the launcher's workers too
            procs.append(subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=err, start_new_session=True))
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            failed = [i for i, p in enumerate(procs) if p.returncode not in (None, 0)]
            assert not failed, _tail(cwd, failed[0], f"command {failed[0]} exited {procs[failed[0]].returncode}")
            assert time.monotonic() < deadline, _tail(cwd, 0, f"timed out after {timeout} s")
            time.sleep(0.2)
        failed = [i for i, p in enumerate(procs) if p.returncode != 0]
        assert not failed, _tail(cwd, failed[0], f"command {failed[0]} exited {procs[failed[0]].returncode}")
    finally:
        for p in procs:
            _kill_tree(p)
        for fh in files:
            fh.close()
    return [(cwd / f"cmd{i}.out").read_text() for i in range(len(cmds))]


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """Kill ``proc``, its process group and every process below it, unless it has exited.

    torchrun starts each worker in a session of its own, so killing the launcher's group alone leaves them running.
    psutil (accelerate's dependency) finds them; without it, the launcher's group is all that is reached.
    """
    if proc.poll() is not None:
        return
    try:
        import psutil
    except ImportError:
        psutil = None
    below = []
    if psutil is not None:
        with contextlib.suppress(psutil.Error):
            below = psutil.Process(proc.pid).children(recursive=True)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for child in below:
        with contextlib.suppress(psutil.Error):
            child.kill()
    proc.wait()


def _tail(cwd: Path, i: int, why: str) -> str:
    return f"{why}; its stderr ends:\n" + (cwd / f"cmd{i}.err").read_text()[-3000:]


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
