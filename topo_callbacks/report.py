"""`topo-callbacks report LOGDIR`: one run's logged CI, terms, calibration, alarms and latest persistence diagram.

Reads Lightning ``CSVLogger`` files (``metrics.csv``) or TensorBoard event files (``events.out.tfevents.*``, with
the ``tensorboard`` package installed), and the ``collapse_diagram_<monitor>.json`` file the monitors write beside
them. Writes an HTML page (with a PNG beside it, embedded), a PNG, a PDF or an SVG.

The monitor's key is found with or without HF Trainer's ``train/`` prefix: ``collapse/ci`` is read from a
``train/collapse/ci`` tag when no ``collapse/ci`` tag exists (`resolve_monitor`).

One run per report. LOGDIR may hold several runs: Lightning's ``version_*`` folders, HF Trainer's
``runs/<date>_<host>`` folders, an Accelerate project folder that every run appends an event file to. Their points
are never merged (three runs would draw a zigzag, and an alarm of one would show on another). A run is a folder whose
files log the monitor; when one folder holds several such files, each file is a run of its own (a resumed run that
wrote a second event file into its logging folder is one of them). Folders whose files do not log the monitor (the
``<time>/`` folder torch's ``add_hparams`` writes) are not runs. The report draws the most recently written run (the
newest modification time of its files) and names the others in a `ReportWarning`; ``run=`` (``--run``) picks one
by its path relative to LOGDIR (`find_runs`). A log file that cannot be read (damaged, truncated, not readable)
raises `UnreadableLogError`, naming it.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import html
import inspect
import io
import json
import math
import statistics
import struct
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from topo_callbacks.core.diagram_file import diagram_path
from topo_callbacks.core.monitor import CollapseMonitorCore
from topo_callbacks.functional.collapse import TERMS

__all__ = [
    "OUT_SUFFIXES",
    "ReportError",
    "ReportWarning",
    "Run",
    "UnreadableLogError",
    "find_runs",
    "load_scalars",
    "logged_terms",
    "resolve_monitor",
    "rule_defaults",
    "write_report",
]

Series = dict[str, list[tuple[int, float]]]
#: The report formats `write_report` writes, by the extension of ``out``.
OUT_SUFFIXES: tuple[str, ...] = (".html", ".png", ".pdf", ".svg")
#: HF Trainer's TensorBoard callback logs every training key under this prefix (``train/collapse/ci``).
HF_PREFIX = "train/"
#: The `CollapseMonitorCore` arguments that say which checks calibrate and set the baseline, and how far above the
#: baseline the alarm fires; the report's defaults are read from the monitor's signature (`rule_defaults`).
RULE_PARAMS = ("calibration_checks", "baseline_checks", "max_rise")


class ReportError(ValueError):
    """The logs cannot be reported as asked: no values of the monitor, an ambiguous key, an unknown run, a bad out."""


class ReportWarning(UserWarning):
    """Something the reader of a report must know: LOGDIR held several runs and one of them was drawn."""


class UnreadableLogError(ReportError):
    """A log file under LOGDIR cannot be read: damaged, truncated, not text, or not readable. ``path`` is the file,
    ``why`` the reason; the message names both."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(
            f"cannot read {path}: {why}. Move it out of LOGDIR, or point LOGDIR at a folder without it (another"
            " run's folder); a file still being written can be read once the run has flushed it."
        )
        self.path = path
        self.why = why


@dataclasses.dataclass(frozen=True)
class Run:
    """One run under LOGDIR: its files, their scalars merged, and when its newest file was written.

    ``name`` is the run's folder relative to LOGDIR (``"."`` for LOGDIR itself) or, when its folder holds several
    runs (``shares_folder``), its file's path relative to LOGDIR. ``monitor`` is the run's key of the monitor (None
    when several tags match it: `resolve_monitor` then raises for this run).
    """

    name: str
    folder: Path
    files: tuple[Path, ...]
    series: Series
    mtime: float
    monitor: str | None
    shares_folder: bool = False


def rule_defaults() -> dict[str, Any]:
    """The monitor's calibration and rise-rule defaults, read from `CollapseMonitorCore`'s signature.

    Read at each call, so the report follows the monitor when its defaults change (one source of truth).

    Example:
        >>> rule_defaults()
        {'calibration_checks': 3, 'baseline_checks': 3, 'max_rise': 0.2}
    """
    params = inspect.signature(CollapseMonitorCore.__init__).parameters
    return {name: params[name].default for name in RULE_PARAMS}


def _read_csv(path: Path) -> Series:
    """A ``CSVLogger`` file's series; `UnreadableLogError` for a damaged or truncated one.

    ``CSVLogger`` writes every row with all the header's cells (empty ones for keys not logged at that step) and
    ends each with a newline, so a row with another number of cells, a cell that is not a number, or a last line
    without its newline means the file was cut short or damaged.
    """
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise UnreadableLogError(path, f"not a CSV text file (byte {err.start} is not UTF-8)") from err
    if not text:
        return {}
    if not text.endswith(("\n", "\r")):
        lines = text.count("\n") + 1
        raise UnreadableLogError(path, f"truncated: its last line (line {lines}) does not end with a newline")
    out: Series = {}
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
        for row in reader:
            line = reader.line_num
            if not row:
                continue
            if len(row) != len(header):
                raise UnreadableLogError(
                    path, f"damaged or truncated: line {line} has {len(row)} cells, the header {len(header)}"
                )
            cells = dict(zip(header, row, strict=True))
            if not cells.get("step"):
                continue
            try:
                step = int(float(cells["step"]))
            except ValueError:
                raise UnreadableLogError(path, f"damaged: line {line} has step {cells['step']!r}") from None
            for key, value in cells.items():
                if key == "step" or value == "":
                    continue
                try:
                    out.setdefault(key, []).append((step, float(value)))
                except ValueError:
                    raise UnreadableLogError(
                        path, f"damaged: line {line}, column {key}: {value!r} is not a number"
                    ) from None
    except csv.Error as err:
        raise UnreadableLogError(path, f"damaged: line {reader.line_num}: {err}") from err
    return out


def _crc_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc_table()


def _crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum of TFRecord framing (here for the 8-byte record headers only).

    Example:
        >>> hex(_crc32c(b"123456789"))  # the standard check value
        '0xe3069283'
    """
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = _crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _event_file_problem(path: Path) -> str | None:
    """Why the TensorBoard event file at ``path`` cannot be read whole, or None.

    Event files are TFRecords: an 8-byte length, its masked CRC-32C, the record, the record's CRC. TensorBoard's
    reader stops silently at the first damaged or cut-short record, so the framing is walked here first: each
    header's checksum must hold and the last record must end at the end of the file. (The payload's checksums are
    left to TensorBoard's reader.)
    """
    size = path.stat().st_size
    offset = 0
    with open(path, "rb") as fh:
        while offset < size:
            header = fh.read(12)
            if len(header) < 12:
                return f"truncated: the file ends {size - offset} byte(s) into a record header (at byte {offset})"
            (crc,) = struct.unpack("<I", header[8:])
            if _masked_crc(header[:8]) != crc:
                what = "not a TensorBoard event file" if offset == 0 else "damaged"
                return f"{what}: the record header at byte {offset} fails its checksum"
            (length,) = struct.unpack("<Q", header[:8])
            end = offset + 12 + length + 4
            if end > size:
                return f"truncated: the record at byte {offset} needs {end - offset} bytes, {size - offset} are left"
            fh.seek(end)
            offset = end
    return None


def _read_tensorboard(path: Path) -> Series:
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError as err:
        raise RuntimeError(
            f"{path} is a TensorBoard event file; reading it needs the `tensorboard` package (pip install tensorboard)."
        ) from err
    problem = _event_file_problem(path)
    if problem:
        raise UnreadableLogError(path, problem)
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(int(e.step), float(e.value)) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _read(path: Path) -> Series:
    try:
        return _read_csv(path) if path.name == "metrics.csv" else _read_tensorboard(path)
    except OSError as err:  # not readable (permissions), a folder of that name, gone since it was listed
        raise UnreadableLogError(path, err.strerror or str(err)) from err


def _log_files(root: Path) -> list[Path]:
    files = sorted(root.rglob("metrics.csv")) + sorted(root.rglob("events.out.tfevents.*"))
    if not files:
        raise FileNotFoundError(f"no metrics.csv or events.out.tfevents.* under {root}")
    return files


def _merge(parts: Iterable[Series]) -> Series:
    series: Series = {}
    for part in parts:
        for key, values in part.items():
            series.setdefault(key, []).extend(values)
    return {k: sorted(v) for k, v in series.items()}


def load_scalars(logdir: str | Path) -> tuple[Series, list[Path]]:
    """Every scalar series under ``logdir`` (CSV and TensorBoard files, all merged), and the files read.

    This merges the points of every run under ``logdir``; `find_runs` keeps runs apart (`write_report` uses it).

    Raises:
        FileNotFoundError: when ``logdir`` holds neither kind of file.

    Example:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> _ = (Path(tmp.name) / "metrics.csv").write_text("step,collapse/ci\\n10,0.25\\n20,0.5\\n")
        >>> series, files = load_scalars(tmp.name)
        >>> series["collapse/ci"], [f.name for f in files]
        ([(10, 0.25), (20, 0.5)], ['metrics.csv'])
        >>> tmp.cleanup()
    """
    files = _log_files(Path(logdir))
    return _merge(_read(path) for path in files), files


def _candidates(tags: Iterable[str], monitor: str) -> list[str]:
    tags = set(tags)
    if monitor in tags:
        return [monitor]
    found = sorted(t for t in tags if t.endswith("/" + monitor))
    bare = monitor[len(HF_PREFIX) :] if monitor.startswith(HF_PREFIX) else None
    if not found and bare and bare in tags:  # `--monitor train/collapse/ci` on a Lightning run
        found = [bare]
    return found


def resolve_monitor(tags: Iterable[str], monitor: str) -> str | None:
    """The logged key of ``monitor`` among ``tags``; None when no tag matches.

    ``monitor`` itself when logged; otherwise the one tag that ends with ``/`` + ``monitor`` (HF Trainer logs
    ``collapse/ci`` as ``train/collapse/ci``); otherwise ``monitor`` without a leading ``train/``.

    Raises:
        ReportError: when several tags end with ``monitor`` (``train/collapse/ci`` and ``eval/collapse/ci``): the
            message names them; pass the full tag.

    Example:
        >>> resolve_monitor(["train/loss", "train/collapse/ci"], "collapse/ci")
        'train/collapse/ci'
        >>> resolve_monitor(["collapse/ci"], "train/collapse/ci")
        'collapse/ci'
        >>> resolve_monitor(["train/loss"], "collapse/ci") is None
        True
    """
    found = _candidates(tags, monitor)
    if len(found) > 1:
        raise ReportError(
            f"several logged tags match the monitor `{monitor}`: {', '.join(found)}; choose one with --monitor"
            " (`monitor=`)."
        )
    return found[0] if found else None


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _listing(items: Sequence[str], limit: int) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" ... ({len(items) - limit} more)" if len(items) > limit else "")


def find_runs(logdir: str | Path, monitor: str = "collapse/ci") -> list[Run]:
    """The runs under ``logdir`` that logged ``monitor`` (with or without ``train/``), oldest to newest.

    A run is a folder whose files log the monitor, with the other log files of that folder; when a folder holds
    several files that log it (an Accelerate project folder that every run appends an event file to, a resumed run),
    each of those files is a run of its own, named by its path. Newest: the latest modification time of a run's
    files; ties are broken by name, so the order is deterministic.

    Raises:
        FileNotFoundError: when ``logdir`` holds no ``metrics.csv`` or event file.
        ReportError: when no file logged the monitor: the message names the files read and the tags found.

    Example (two Lightning ``CSVLogger`` versions):
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> for version in (0, 1):
        ...     folder = Path(tmp.name) / f"version_{version}"
        ...     folder.mkdir()
        ...     _ = (folder / "metrics.csv").write_text("step,collapse/ci\\n10,0.2\\n20,0.3\\n")
        >>> [(run.name, run.monitor, len(run.series[run.monitor])) for run in find_runs(tmp.name)]
        [('version_0', 'collapse/ci', 2), ('version_1', 'collapse/ci', 2)]
        >>> tmp.cleanup()
    """
    root = Path(logdir)
    files = _log_files(root)
    parsed = {path: _read(path) for path in files}
    logging = [path for path in files if _candidates(parsed[path], monitor)]
    if not logging:
        tags = sorted({tag for part in parsed.values() for tag in part})
        raise ReportError(
            f"no {monitor} values found in {len(files)} file(s) under {root}:"
            f" {_listing([_relative(p, root) for p in files], 10)}. The monitor may never have run a check"
            " (is every_n_train_steps longer than the run?), or it logged under another key (pass --monitor)."
            f" Tags found: {_listing(tags, 40) if tags else 'none'}."
        )
    by_folder: dict[Path, list[Path]] = {}
    for path in logging:
        by_folder.setdefault(path.parent, []).append(path)
    runs = []
    for folder, own in by_folder.items():
        # files of the folder that do not log the monitor (hparams, the trainer's own scalars) belong to its run;
        # with several runs in one folder nothing tells whose they are, so each run keeps only its own file
        groups = [[p for p in files if p.parent == folder]] if len(own) == 1 else [[p] for p in own]
        for group in groups:
            series = _merge(parsed[p] for p in group)
            try:
                key = resolve_monitor(series, monitor)
            except ReportError:
                key = None
            runs.append(
                Run(
                    name=_relative(folder if len(own) == 1 else group[0], root) or ".",
                    folder=folder,
                    files=tuple(group),
                    series=series,
                    mtime=max(p.stat().st_mtime for p in group),
                    monitor=key,
                    shares_folder=len(own) > 1,
                )
            )
    return sorted(runs, key=lambda r: (r.mtime, r.name))


def _choose_run(runs: list[Run], run: str | None, root: Path, monitor: str) -> Run:
    if run is None:
        return runs[-1]
    # a run by its name (its path from LOGDIR), a folder or a file from LOGDIR or from the working directory
    targets = {(root / run).resolve(), Path(run).resolve()}
    matches = [r for r in runs if targets & {r.folder.resolve(), *(f.resolve() for f in r.files)}]
    if len(matches) == 1:
        return matches[0]
    if matches:
        names = ", ".join(r.name for r in matches)
        raise ReportError(f"{run} holds several runs that logged {monitor}: {names}; pass one of them with --run.")
    names = ", ".join(r.name for r in runs)
    raise ReportError(f"no run {run!r} under {root} logged {monitor}; the runs that did: {names}.")


def _diagram_names(keys: Iterable[str]) -> list[str]:
    """The diagram file names for these keys and for each without ``train/``: the adapters name the file after
    the monitor's own key, while HF Trainer's logs carry ``train/`` before it."""
    names = []
    for key in keys:
        for k in (key[len(HF_PREFIX) :] if key.startswith(HF_PREFIX) else key, key):
            names.append(Path(diagram_path("", k)).name)
    return list(dict.fromkeys(names))


def _find_diagram(root: Path, run: Run, runs: list[Run], keys: Iterable[str]) -> tuple[Path | None, str]:
    """The run's diagram file and, when there is none, why: looked for beside the run's files, then under LOGDIR."""
    names = _diagram_names(keys)
    newest_here = max((r for r in runs if r.folder == run.folder), key=lambda r: (r.mtime, r.name))
    if run.shares_folder and run is not newest_here:
        # every run of a shared folder overwrites the same file: what is there is the newest run's diagram
        return None, "the diagram in its folder is a later run's"
    beside = [run.folder / name for name in names if (run.folder / name).is_file()]
    # where the report looked before: anywhere under LOGDIR, but not in another run's folder (that run's diagram)
    taken = {r.folder for r in runs}
    elsewhere = [p for name in names for p in root.rglob(name) if p.parent not in taken]
    found = beside or sorted(elsewhere, key=lambda p: (p.stat().st_mtime, str(p)), reverse=True)
    return (found[0], "") if found else (None, f"no {names[0]} beside the run")


def _load_diagram(path: Path | None) -> tuple[dict[str, Any] | None, str]:
    if path is None:
        return None, ""
    try:
        return json.loads(path.read_text()), ""
    except (OSError, ValueError) as err:  # caught mid-write by a running job, or not a diagram file
        return None, f"unreadable {path.name}: {err}"


def _rule_marks(
    values: Sequence[tuple[int, float]], calibration_checks: int, baseline_checks: int, max_rise: float | None
) -> dict[str, Any]:
    """The checks that calibrated the scale and set the baseline, the baseline, and the rise rule's alarm threshold.

    As `CollapseMonitorCore` and `AlarmRule` decide them: the first ``calibration_checks`` checks calibrate eps (no
    baseline yet); the next ``baseline_checks`` checks with a finite CI set the baseline (their median); from then on
    the rule alarms when the CI is more than ``max_rise`` above it (for ``rise_patience`` consecutive checks).

    Example:
        >>> ci = [0.9, 0.8, 0.7, 0.30, 0.34, 0.32, 0.4, 0.6, 0.7]
        >>> marks = _rule_marks(list(zip(range(5, 50, 5), ci)), 3, 3, 0.2)
        >>> marks["calibration_steps"], marks["baseline_steps"], round(marks["threshold"], 2)
        ([5, 10, 15], [20, 25, 30], 0.52)
    """
    after = [(s, v) for s, v in values[calibration_checks:] if math.isfinite(v)][:baseline_checks]
    baseline = statistics.median(v for _, v in after) if len(after) == baseline_checks else None
    return {
        "calibration_steps": [s for s, _ in values[:calibration_checks]],
        "baseline_steps": [s for s, _ in after],
        "baseline": baseline,
        "threshold": None if baseline is None or max_rise is None else baseline + max_rise,
    }


def _rule_text(s: dict[str, Any]) -> str:
    calibration = s["calibration_steps"]
    if len(calibration) > 1:
        parts = [f"the first {len(calibration)} checks (steps {calibration[0]}-{calibration[-1]}) calibrate the scale"]
    else:
        parts = [f"the first check (step {calibration[0]}) calibrates the scale" if calibration else "no calibration"]
    if s["baseline"] is None:
        parts.append(
            f"no baseline: {len(s['baseline_steps'])} of its {s['baseline_checks']} checks came after calibration,"
            " so the rise rule never armed"
        )
    else:
        steps = ", ".join(map(str, s["baseline_steps"]))
        parts.append(f"baseline {s['baseline']:.3g} (median of the checks at steps {steps})")
        parts.append(
            f"alarm threshold {s['threshold']:.3g} (baseline + max_rise {s['max_rise']:g})"
            if s["threshold"] is not None
            else "no alarm threshold (max_rise off)"
        )
    return "; ".join(parts)


def logged_terms(series: Iterable[str], prefix: str) -> list[str]:
    """The CI terms logged under ``prefix``: keys ``prefix + <name>_term``, the known terms first, in `TERMS` order.

    Whatever the logs hold: a monitor that logs other terms gets them drawn too; another monitor's terms
    (``collapse/enc/betti_term`` beside ``collapse/ci``) are not under ``collapse/`` alone.

    Example:
        >>> logged_terms(["collapse/ci", "collapse/b0", "collapse/new_term", "collapse/rank_term"], "collapse/")
        ['collapse/rank_term', 'collapse/new_term']
    """
    order = {f"{t}_term": i for i, t in enumerate(TERMS)}
    names = [k[len(prefix) :] for k in series if k.startswith(prefix)]
    terms = [n for n in names if n.endswith("_term") and "/" not in n]
    return [prefix + n for n in sorted(terms, key=lambda n: (order.get(n, len(order)), n))]


def _check_rule_args(calibration_checks: Any, baseline_checks: Any, max_rise: Any) -> None:
    for name, value, low in (("calibration_checks", calibration_checks, 0), ("baseline_checks", baseline_checks, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ReportError(f"`{name}` must be an int >= {low}; got {value!r}.")
    if max_rise is not None and not (isinstance(max_rise, int | float) and math.isfinite(max_rise) and max_rise > 0):
        raise ReportError(f"`max_rise` must be a number > 0 or None (off); got {max_rise!r}.")


def _edge(steps: Sequence[int], i: int) -> float:
    """The x between check ``i - 1`` and check ``i`` (extrapolated half a gap before the first and after the last)."""
    gap = (steps[-1] - steps[0]) / (len(steps) - 1) if len(steps) > 1 else 1.0
    if i <= 0:
        return steps[0] - gap / 2
    if i >= len(steps):
        return steps[-1] + gap / 2
    return (steps[i - 1] + steps[i]) / 2


def write_report(
    logdir: str | Path,
    out: str | Path | None = None,
    monitor: str = "collapse/ci",
    *,
    run: str | None = None,
    calibration_checks: int | None = None,
    baseline_checks: int | None = None,
    max_rise: float | Literal["default"] | None = "default",
) -> dict[str, Any]:
    """Plot one run's ``monitor`` and its terms over steps, with the calibration window, the baseline, the alarm
    threshold and the alarms marked, and the latest H0 diagram.

    Args:
        logdir: a folder holding ``metrics.csv`` or TensorBoard event files, at any depth.
        out: ``.html`` (default ``LOGDIR/collapse_report.html``; the PNG is written beside it and embedded),
            ``.png``, ``.pdf`` or ``.svg`` (`OUT_SUFFIXES`).
        monitor: the CI's key; ``collapse/ci`` also finds HF Trainer's ``train/collapse/ci`` (`resolve_monitor`).
        run: which run to draw when ``logdir`` holds several: its path relative to ``logdir`` (`find_runs`). None:
            the most recently written one, and a `ReportWarning` names the others.
        calibration_checks, baseline_checks, max_rise: the monitor's arguments of that name (None, or "default" for
            ``max_rise``: the monitor's defaults, `rule_defaults`; ``max_rise=None``: the rise rule was off). The logs
            do not record them: pass the run's values to mark its calibration window and threshold correctly;
            ``calibration_checks=0`` for a monitor given a fixed ``eps``.

    Returns:
        A summary: the run and the other runs, the resolved monitor key, checks, last value, alarm steps, terms
        drawn, calibration and baseline steps, baseline and threshold, the diagram's step, the files written.

    Raises:
        FileNotFoundError: no log files under ``logdir``.
        UnreadableLogError: a log file under ``logdir`` is damaged, truncated or not readable (a `ReportError`).
        ReportError: an ``out`` extension not in `OUT_SUFFIXES`, no values of ``monitor``, several tags matching it,
            an unknown ``run``, or invalid rule arguments.

    Example (a run logged with ``CSVLogger``):
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> rows = "".join(f"{5 * i},{v}\\n" for i, v in enumerate([0.9, 0.8, 0.7, 0.3, 0.3, 0.3, 0.6, 0.7], 1))
        >>> _ = (Path(tmp.name) / "metrics.csv").write_text("step,collapse/ci\\n" + rows)
        >>> summary = write_report(tmp.name, Path(tmp.name) / "report.pdf")
        >>> summary["checks"], summary["baseline"], round(summary["threshold"], 2)
        (8, 0.3, 0.5)
        >>> (Path(tmp.name) / "report.pdf").read_bytes()[:4]
        b'%PDF'
        >>> tmp.cleanup()
    """
    root = Path(logdir)
    out = Path(out) if out is not None else root / "collapse_report.html"
    kind = out.suffix.lower()
    if kind not in OUT_SUFFIXES:  # refuse before reading anything: no HTML written into a `.pdf` any more
        given = f"extension {out.suffix!r}" if out.suffix else "no extension"
        raise ReportError(f"cannot write a report to {out}: {given}; accepted: {', '.join(OUT_SUFFIXES)}.")
    defaults = rule_defaults()
    calibration_checks = defaults["calibration_checks"] if calibration_checks is None else calibration_checks
    baseline_checks = defaults["baseline_checks"] if baseline_checks is None else baseline_checks
    rise: float | None = defaults["max_rise"] if isinstance(max_rise, str) else max_rise
    _check_rule_args(calibration_checks, baseline_checks, rise)

    runs = find_runs(root, monitor)
    chosen = _choose_run(runs, run, root, monitor)
    others = [r.name for r in runs if r is not chosen]
    if run is None and others:
        warnings.warn(
            f"{root} holds {len(runs)} runs that logged {monitor}; reporting run {chosen.name} (the most recently"
            f" written); the others: {', '.join(others)}. Choose one with --run (`run=`).",
            ReportWarning,
            stacklevel=2,
        )
    key = resolve_monitor(chosen.series, monitor)  # raises when several tags match
    assert key is not None  # find_runs keeps only runs that logged it
    series = chosen.series
    prefix = key.rsplit("/", 1)[0] + "/" if "/" in key else ""
    alarms = [s for s, v in series.get(f"{prefix}alarm", []) if v > 0.5]
    terms = logged_terms(series, prefix)
    marks = _rule_marks(series[key], calibration_checks, baseline_checks, rise)
    diagram_file, why_none = _find_diagram(root, chosen, runs, (key, monitor))
    diagram, unreadable = _load_diagram(diagram_file)
    figure = out if kind != ".html" else out.with_suffix(".png")
    _plot(figure, series, key, terms, alarms, marks, rise, diagram, unreadable or why_none)

    last_step, last_value = series[key][-1]
    summary: dict[str, Any] = {
        "monitor": key,
        "run": chosen.name,
        "runs": [r.name for r in runs],
        "checks": len(series[key]),
        "last_step": last_step,
        "last_value": last_value,
        "alarm_steps": alarms,
        "first_alarm_step": alarms[0] if alarms else None,
        "terms": terms,
        "calibration_checks": calibration_checks,
        "baseline_checks": baseline_checks,
        "max_rise": rise,
        **marks,
        "diagram_step": diagram["step"] if diagram else None,
        "diagram": str(diagram_file) if diagram else None,
        "files": [str(f) for f in chosen.files],
        "figure": str(figure),
        "png": str(figure) if figure.suffix.lower() == ".png" else None,
    }
    summary["rule"] = _rule_text(summary)
    if kind == ".html":
        out.write_text(_html(summary, series, prefix, figure))
        summary["html"] = str(out)
    return summary


def _plot(
    path: Path,
    series: Series,
    key: str,
    terms: list[str],
    alarms: list[int],
    marks: dict[str, Any],
    max_rise: float | None,
    diagram: dict[str, Any] | None,
    why_no_diagram: str,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 5.4), gridspec_kw={"width_ratios": [3, 3, 2]})
    steps, values = zip(*series[key], strict=True)
    n_cal, n_base = len(marks["calibration_steps"]), len(marks["baseline_steps"])
    # the baseline checks are the first finite ones after calibration: their span ends at the last of them
    finite_after = [i for i in range(n_cal, len(values)) if math.isfinite(values[i])]
    base_end = finite_after[n_base - 1] + 1 if n_base else n_cal
    ax = axes[0]
    if n_cal:
        ax.axvspan(_edge(steps, 0), _edge(steps, n_cal), color="0.88", label=f"calibration ({n_cal} checks)")
    if n_base:
        ax.axvspan(_edge(steps, n_cal), _edge(steps, base_end), color="tab:blue", alpha=0.12, label="baseline checks")
    ax.plot(steps, values, "o-", color="black", label=key)
    top = 1.02
    if marks["baseline"] is not None:
        ax.hlines(marks["baseline"], _edge(steps, n_cal), _edge(steps, len(steps)), colors="tab:blue", linestyles=":")
        ax.plot([], [], ":", color="tab:blue", label=f"baseline {marks['baseline']:.3g}")
    if marks["threshold"] is not None:
        threshold = marks["threshold"]
        ax.hlines(threshold, _edge(steps, base_end), _edge(steps, len(steps)), colors="red", linestyles="--")
        ax.plot([], [], "--", color="red", label=f"alarm threshold {threshold:.3g} (baseline + max_rise {max_rise:g})")
        top = max(top, threshold + 0.05)
    for i, step in enumerate(alarms):
        ax.axvline(step, color="red", alpha=0.4, label="alarm" if i == 0 else None)
    ax.set_ylim(-0.02, top)
    ax.set_title("collapse index" if marks["baseline"] is not None else "collapse index (no baseline: rule not armed)")
    for term in terms:
        t_steps, t_values = zip(*series[term], strict=True)
        axes[1].plot(t_steps, t_values, ".-", label=term.rsplit("/", 1)[-1])
    axes[1].set_ylim(-0.02, 1.02)
    axes[1].set_title("logged terms (1 = collapsed)" if terms else "no terms logged under the monitor's prefix")
    for a in axes[:2]:
        a.set_xlabel("step")
        if a.get_legend_handles_labels()[0]:  # below the axes: inside, the marks' labels would hide the checks
            a.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    if diagram and diagram["h0_deaths"]:
        deaths = sorted(diagram["h0_deaths"], reverse=True)
        axes[2].hlines(range(len(deaths)), 0, deaths, color="tab:blue", linewidth=1)
        axes[2].axvline(diagram["eps"], color="grey", ls=":", label=f"eps = {diagram['eps']:.3g}")
        axes[2].set_title(f"H0 barcode at step {diagram['step']} (+1 infinite bar)")
        axes[2].set_xlabel("scale (L2-normalised embeddings)")
        axes[2].legend(fontsize=8)
    else:
        why = why_no_diagram if not diagram else "all rows one point: only the infinite bar"
        axes[2].text(0.5, 0.5, why, ha="center", va="center", wrap=True)
        axes[2].set_title(f"H0 barcode at step {diagram['step']}" if diagram else "H0 barcode")
        axes[2].set_axis_off()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)  # the format follows the extension: PNG, PDF or SVG
    plt.close(fig)


def _html(summary: dict[str, Any], series: Series, prefix: str, png: Path) -> str:
    image = base64.b64encode(png.read_bytes()).decode()
    last = {k[len(prefix) :]: v[-1][1] for k, v in series.items() if k.startswith(prefix) and v}
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v:.4g}</td></tr>" for k, v in sorted(last.items()) if math.isfinite(v)
    )
    first = summary["first_alarm_step"]
    verdict = f"first alarm at step {first}" if first is not None else "no alarm"
    files = "".join(f"<li>{html.escape(f)}</li>" for f in summary["files"])
    others = [r for r in summary["runs"] if r != summary["run"]]
    runs = (
        f"<p>Run {html.escape(summary['run'])}; other runs under the folder (choose with --run): "
        f"{html.escape(', '.join(others))}.</p>"
        if others
        else ""
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>topo-callbacks report</title></head><body>"
        f"<h1>Collapse report: {html.escape(summary['monitor'])}</h1>{runs}"
        f"<p>{summary['checks']} checks, last at step {summary['last_step']} "
        f"(value {summary['last_value']:.4f}); {verdict}.</p>"
        f"<p>{html.escape(summary['rule'])}.</p>"
        f"<img src='data:image/png;base64,{image}' style='max-width:100%'>"
        f"<h2>Last logged values</h2><table>{rows}</table><h2>Files read</h2><ul>{files}</ul></body></html>"
    )
