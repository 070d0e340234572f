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
by its path relative to LOGDIR (`find_runs`).

What the monitor's default alarm, the CUSUM detector, logged is drawn in a panel of its own: ``collapse/detector``
(its fused statistic over its threshold: it alarms at `DETECTOR_THRESHOLD`, 1.0) and each channel's share
``collapse/detector_<channel>`` (`logged_detector`). The rise rule's threshold (baseline + ``max_rise``) is drawn
only for a run without a detector (it used ``alarm="rise"``) or when ``max_rise`` is passed. The alarm flag
``collapse/alarm`` is read as episodes (`alarm_episodes`), shaded from their start to the first check where the flag
is 0 again; ``collapse/episodes`` (the monitor's count) and ``collapse/skipped_steps`` (optimizer steps a loss scaler
skipped: not failures) are drawn as counts. A run resumed from a checkpoint is told by its first check
(`resumed_at`): its first checks are not marked as calibration or baseline. A log file that cannot be read (damaged,
truncated, not readable) raises `UnreadableLogError`, naming it.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import html
import inspect
import io
import itertools
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
    "DETECTOR_THRESHOLD",
    "OUT_SUFFIXES",
    "ReportError",
    "ReportWarning",
    "Run",
    "UnreadableLogError",
    "alarm_episodes",
    "find_runs",
    "load_scalars",
    "logged_detector",
    "logged_terms",
    "resolve_monitor",
    "resumed_at",
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
#: ``collapse/detector`` is the detector's statistic over its threshold: the detector alarms when it reaches 1.
DETECTOR_THRESHOLD = 1.0
#: A run whose first check comes later than this many times the median spacing of its checks was resumed
#: (`resumed_at`): a fresh run checks first at ``every_n_train_steps``, one spacing in.
RESUMED_FACTOR = 2.0


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
    if s["resumed_at"] is not None:
        before = "calibrated the scale" + (" and set the baseline" if s["rise_rule"] else "")
        parts = [f"resumed at step {s['resumed_at']}: the checks that {before} ran before these logs"]
    elif len(calibration) > 1:
        parts = [f"the first {len(calibration)} checks (steps {calibration[0]}-{calibration[-1]}) calibrate the scale"]
    else:
        parts = [f"the first check (step {calibration[0]}) calibrates the scale" if calibration else "no calibration"]
    if s["detector"] is not None:
        peak = s["detector_peak"]
        high = f", highest {peak[1]:.3g} at step {peak[0]}" if peak else ""
        parts.append(
            f"the CUSUM detector (the default alarm): {s['detector']}, its statistic over its threshold, alarms at"
            f" {s['detector_threshold']:g}{high}"
        )
    if not s["rise_rule"]:
        return "; ".join(parts)
    if s["resumed_at"] is not None:
        parts.append("the rise rule's baseline was set before the resume and is not logged: no threshold drawn")
    elif s["baseline"] is None:
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


def _episode_span(episode: dict[str, int | None]) -> str:
    start, end = episode["start"], episode["end"]
    return f"{start}-{end}" if end is not None else f"{start}-open"


def _events_text(s: dict[str, Any]) -> str:
    """The alarm episodes, the monitor's count of them, and the skipped optimizer steps, in one line."""
    episodes = s["episodes"]
    if episodes:
        spans = ", ".join(_episode_span(e) for e in episodes)
        parts = [f"{len(episodes)} alarm episode{'s' if len(episodes) > 1 else ''} (steps {spans})"]
    else:
        parts = ["no alarm episode" if s["alarm_key"] else "no alarm flag logged"]
    if s["episodes_logged"] is not None and s["episodes_logged"] != len(episodes):
        parts.append(f"the monitor counted {s['episodes_logged']} ({s['episodes_key']}, since the run's start)")
    skipped = s["skipped_steps"]
    if skipped is not None:
        many = f"{skipped} optimizer step{'' if skipped == 1 else 's'}" if skipped else "no optimizer step"
        parts.append(
            f"{many} skipped by the loss scaler ({s['skipped_steps_key']}: overflowing fp16 gradients, not failures)"
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


def logged_detector(series: Iterable[str], prefix: str) -> tuple[str | None, list[str]]:
    """The detector's keys logged under ``prefix``: its fused statistic ``prefix + "detector"`` (None when not
    logged: the run used the rise rule) and each channel's share, keys ``prefix + "detector_<channel>"``, sorted.

    Both are over the detector's threshold: the detector alarms when the statistic reaches `DETECTOR_THRESHOLD`.

    Example:
        >>> keys = ["collapse/ci", "collapse/detector", "collapse/detector_loss", "collapse/detector_grad_norm",
        ...         "collapse/enc/detector_loss"]
        >>> logged_detector(keys, "collapse/")
        ('collapse/detector', ['collapse/detector_grad_norm', 'collapse/detector_loss'])
        >>> logged_detector(["train/collapse/ci"], "train/collapse/")
        (None, [])
    """
    keys = set(series)
    fused = prefix + "detector"
    head = fused + "_"
    channels = sorted(k for k in keys if k.startswith(head) and len(k) > len(head) and "/" not in k[len(head) :])
    return (fused if fused in keys else None), channels


def alarm_episodes(alarm: Iterable[tuple[int, float]]) -> list[dict[str, int | None]]:
    """The alarm episodes in a logged alarm flag: runs of consecutive 1s, ``{"start": step, "end": step}``.

    ``alarm`` is ``(step, value)`` pairs of ``collapse/alarm``: 0 or 1 at each check, and 1 at a step between
    checks where the detector fired. An episode starts at its first 1 and ends at the first 0 after it (``end`` is
    that step); ``end`` is None for an episode still open at the last logged value. Several values at one step
    count as 1 when any is.

    Example:
        >>> flag = [(10, 0), (20, 0), (27, 1), (30, 1), (40, 0), (50, 1), (50, 0), (60, 1)]
        >>> alarm_episodes(flag)
        [{'start': 27, 'end': 40}, {'start': 50, 'end': None}]
    """
    on: dict[int, bool] = {}
    for step, value in alarm:
        on[step] = on.get(step, False) or value > 0.5
    episodes: list[dict[str, int | None]] = []
    for step in sorted(on):
        if on[step] and (not episodes or episodes[-1]["end"] is not None):
            episodes.append({"start": step, "end": None})
        elif not on[step] and episodes and episodes[-1]["end"] is None:
            episodes[-1]["end"] = step
    return episodes


def resumed_at(steps: Sequence[int], factor: float = RESUMED_FACTOR) -> int | None:
    """The step a run was resumed at, told by its checks' steps: the first check, when it comes more than
    ``factor`` times the median spacing between checks into the run; None for a fresh run.

    A fresh run checks first at ``every_n_train_steps``, one spacing in (two, when its first check was skipped);
    a run resumed from a checkpoint logs its first check where it resumed. The median spacing is robust to a few
    skipped checks. Fewer than two checks: None (no spacing to compare with).

    Example:
        >>> resumed_at([50, 100, 150, 200])  # fresh: every_n_train_steps=50
        >>> resumed_at([1250, 1300, 1350, 1400])
        1250
        >>> resumed_at([100, 150, 250, 300])  # the check at step 50 was skipped: still fresh
    """
    unique = sorted(set(steps))
    gaps = [b - a for a, b in itertools.pairwise(unique)]
    if not gaps:
        return None
    return unique[0] if unique[0] > factor * statistics.median(gaps) else None


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
    """Plot one run's ``monitor`` and its terms over steps, with the calibration window, the CUSUM detector's
    statistic over its threshold and its channels, the alarm episodes, the skipped optimizer steps, and the latest H0
    diagram; for a run without the detector (``alarm="rise"``), the rise rule's baseline and threshold.

    Args:
        logdir: a folder holding ``metrics.csv`` or TensorBoard event files, at any depth.
        out: ``.html`` (default ``LOGDIR/collapse_report.html``; the PNG is written beside it and embedded),
            ``.png``, ``.pdf`` or ``.svg`` (`OUT_SUFFIXES`).
        monitor: the CI's key; ``collapse/ci`` also finds HF Trainer's ``train/collapse/ci`` (`resolve_monitor`).
            The other keys are read under its prefix (``collapse/enc/ci``: ``collapse/enc/detector``, ...).
        run: which run to draw when ``logdir`` holds several: its path relative to ``logdir`` (`find_runs`). None:
            the most recently written one, and a `ReportWarning` names the others.
        calibration_checks, baseline_checks, max_rise: the monitor's arguments of that name (None, or "default" for
            ``max_rise``: the monitor's defaults, `rule_defaults`; ``max_rise=None``: the rise rule was off). The logs
            do not record them: pass the run's values to mark its calibration window and threshold correctly;
            ``calibration_checks=0`` for a monitor given a fixed ``eps``. The rise rule's baseline and threshold are
            drawn for a run that logged no detector, or when ``max_rise`` is given (not "default"). A resumed run
            (`resumed_at`) has no calibration or baseline checks in its logs: none are marked.

    Returns:
        A summary: the run and the other runs, the resolved monitor key, checks, last value, alarm steps and
        ``episodes`` (`alarm_episodes`), ``episodes_logged`` and ``skipped_steps`` (the last logged counts, None when
        not logged), ``detector``, ``detector_channels``, ``detector_threshold`` and ``detector_peak``, ``alarm_rule``
        (``"detector"`` or ``"rise"``), ``resumed_at``, the terms drawn, calibration and baseline steps, baseline and
        threshold, ``rule`` and ``events`` (the text the report prints), ``panels`` (what each panel of the figure
        shows: title, horizontal lines, shaded spans, legend labels), the diagram's step, the files written.

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

    The detector's statistic, the alarm flag (1 at step 37, between checks, where the detector fired) and the
    count of skipped optimizer steps:
        >>> rows = ["10,0.3,0,0.2,0", "20,0.3,0,0.4,1", "30,0.3,0,0.6,1", "37,,1,,", "40,0.3,1,1.2,1", "50,0.3,0,0.8,2"]
        >>> header = "step,collapse/ci,collapse/alarm,collapse/detector,collapse/skipped_steps\\n"
        >>> _ = (Path(tmp.name) / "metrics.csv").write_text(header + "\\n".join(rows) + "\\n")
        >>> summary = write_report(tmp.name, Path(tmp.name) / "report.png")
        >>> summary["episodes"], summary["skipped_steps"], summary["panels"]["detector"]["hlines"]
        ([{'start': 37, 'end': 50}], 2, [1.0])
        >>> summary["threshold"] is None  # no rise-rule threshold: the run's alarm was the detector
        True
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
    alarm_key, episodes_key, skipped_key = (k if k in series else None for k in _event_keys(prefix))
    alarm_values = series.get(alarm_key, []) if alarm_key else []
    alarms = sorted({s for s, v in alarm_values if v > 0.5})
    episodes = alarm_episodes(alarm_values)
    detector, channels = logged_detector(series, prefix)
    # the rise rule's baseline and threshold: for a run without the detector (alarm="rise"), or when asked for
    rise_rule = detector is None or max_rise != "default"
    resumed = resumed_at([s for s, _ in series[key]])
    terms = logged_terms(series, prefix)
    marks = _rule_marks(series[key], 0 if resumed is not None else calibration_checks, baseline_checks, rise)
    if resumed is not None or not rise_rule:
        marks.update(baseline_steps=[], baseline=None, threshold=None)
    finite = [(s, v) for s, v in series.get(detector, []) if math.isfinite(v)] if detector else []
    diagram_file, why_none = _find_diagram(root, chosen, runs, (key, monitor))
    diagram, unreadable = _load_diagram(diagram_file)
    figure = out if kind != ".html" else out.with_suffix(".png")

    last_step, last_value = series[key][-1]
    summary: dict[str, Any] = {
        "monitor": key,
        "run": chosen.name,
        "runs": [r.name for r in runs],
        "checks": len(series[key]),
        "last_step": last_step,
        "last_value": last_value,
        "alarm_key": alarm_key,
        "alarm_steps": alarms,
        "first_alarm_step": alarms[0] if alarms else None,
        "episodes": episodes,
        "episodes_key": episodes_key,
        "episodes_logged": _last_count(series, episodes_key),
        "skipped_steps_key": skipped_key,
        "skipped_steps": _last_count(series, skipped_key),
        "detector": detector,
        "detector_channels": channels,
        "detector_threshold": DETECTOR_THRESHOLD if detector else None,
        "detector_peak": max(finite, key=lambda p: (p[1], -p[0])) if finite else None,
        "alarm_rule": "detector" if detector else "rise",
        "rise_rule": rise_rule,
        "resumed_at": resumed,
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
    summary["events"] = _events_text(summary)
    summary["panels"] = _plot(figure, series, summary, diagram, unreadable or why_none)
    if kind == ".html":
        out.write_text(_html(summary, series, prefix, figure))
        summary["html"] = str(out)
    return summary


def _event_keys(prefix: str) -> tuple[str, str, str]:
    """The alarm flag, the monitor's count of alarm episodes, and its count of optimizer steps a loss scaler
    skipped, as logged under ``prefix``."""
    return f"{prefix}alarm", f"{prefix}episodes", f"{prefix}skipped_steps"


def _last_count(series: Series, key: str | None) -> int | None:
    """The last logged value of a cumulative count (None when not logged)."""
    values = [v for _, v in series.get(key, [])] if key else []
    return int(values[-1]) if values and math.isfinite(values[-1]) else None


def _shade_episodes(ax: Any, episodes: list[dict[str, int | None]], last_step: float) -> None:
    """Each alarm episode shaded from its start to the first check with the flag off (the last step when open),
    and its start marked."""
    for i, episode in enumerate(episodes):
        start = episode["start"]
        assert start is not None
        end = last_step if episode["end"] is None else episode["end"]
        ax.axvspan(start, max(end, start), color="red", alpha=0.12, label="alarm episode" if i == 0 else None)
        ax.axvline(start, color="red", alpha=0.7, label="alarm episode start" if i == 0 else None)


def _panel_info(ax: Any) -> dict[str, Any]:
    """What a panel shows, read back from its artists: title, horizontal lines' heights, shaded x spans, labels."""
    from matplotlib.collections import LineCollection
    from matplotlib.patches import Rectangle

    hlines = sorted(
        {
            float(seg[0][1])
            for c in ax.collections
            if isinstance(c, LineCollection)
            for seg in c.get_segments()
            if len(seg) == 2 and seg[0][1] == seg[1][1]
        }
    )
    spans = [(float(p.get_x()), float(p.get_x() + p.get_width())) for p in ax.patches if isinstance(p, Rectangle)]
    return {"title": ax.get_title(), "hlines": hlines, "spans": spans, "labels": ax.get_legend_handles_labels()[1]}


def _plot(
    path: Path,
    series: Series,
    s: dict[str, Any],
    diagram: dict[str, Any] | None,
    why_no_diagram: str,
) -> dict[str, dict[str, Any]]:
    """Draw the report's figure; returns what each panel shows (`_panel_info`), by panel name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, terms, episodes = s["monitor"], s["terms"], s["episodes"]
    counts = [k for k in (s["skipped_steps_key"], s["episodes_key"]) if k]
    rows = 2 if s["detector"] or counts else 1
    fig = plt.figure(figsize=(16, 5.6 * rows))
    grid = fig.add_gridspec(rows, 3, width_ratios=[3, 3, 2])
    ax = fig.add_subplot(grid[0, 0])
    ax_terms = fig.add_subplot(grid[0, 1])
    ax_diagram = fig.add_subplot(grid[0, 2])
    panels = {"ci": ax, "terms": ax_terms}
    steps, values = zip(*series[key], strict=True)
    all_steps = [st for k in (key, s["alarm_key"], s["detector"]) if k for st, _ in series.get(k, [])]
    last_step = max(all_steps)
    n_cal, n_base = len(s["calibration_steps"]), len(s["baseline_steps"])
    # the baseline checks are the first finite ones after calibration: their span ends at the last of them
    finite_after = [i for i in range(n_cal, len(values)) if math.isfinite(values[i])]
    base_end = finite_after[n_base - 1] + 1 if n_base else n_cal
    if n_cal:
        ax.axvspan(_edge(steps, 0), _edge(steps, n_cal), color="0.88", label=f"calibration ({n_cal} checks)")
    if n_base:
        ax.axvspan(_edge(steps, n_cal), _edge(steps, base_end), color="tab:blue", alpha=0.12, label="baseline checks")
    ax.plot(steps, values, "o-", color="black", label=key)
    top = 1.02
    if s["baseline"] is not None:
        ax.hlines(s["baseline"], _edge(steps, n_cal), _edge(steps, len(steps)), colors="tab:blue", linestyles=":")
        ax.plot([], [], ":", color="tab:blue", label=f"baseline {s['baseline']:.3g}")
    if s["threshold"] is not None:
        threshold = s["threshold"]
        ax.hlines(threshold, _edge(steps, base_end), _edge(steps, len(steps)), colors="red", linestyles="--")
        label = f"rise-rule threshold {threshold:.3g} (baseline + max_rise {s['max_rise']:g})"
        ax.plot([], [], "--", color="red", label=label)
        top = max(top, threshold + 0.05)
    _shade_episodes(ax, episodes, last_step)
    ax.set_ylim(-0.02, top)
    if s["resumed_at"] is not None:
        ax.set_title(f"collapse index (resumed at step {s['resumed_at']})")
    elif s["rise_rule"] and s["baseline"] is None:
        ax.set_title("collapse index (no baseline: rise rule not armed)")
    else:
        ax.set_title("collapse index")
    for term in terms:
        t_steps, t_values = zip(*series[term], strict=True)
        ax_terms.plot(t_steps, t_values, ".-", label=term.rsplit("/", 1)[-1])
    ax_terms.set_ylim(-0.02, 1.02)
    ax_terms.set_title("logged terms (1 = collapsed)" if terms else "no terms logged under the monitor's prefix")
    if rows == 2:
        panels["detector"] = _plot_detector(fig.add_subplot(grid[1, :2]), series, s, last_step)
        panels["counts"] = _plot_counts(fig.add_subplot(grid[1, 2]), series, counts)
    for name, a in panels.items():
        a.set_xlabel("step")
        if name != "counts" and a.get_legend_handles_labels()[0]:
            # below the axes: inside, the marks' labels would hide the checks
            a.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
    if diagram and diagram["h0_deaths"]:
        deaths = sorted(diagram["h0_deaths"], reverse=True)
        ax_diagram.hlines(range(len(deaths)), 0, deaths, color="tab:blue", linewidth=1)
        ax_diagram.axvline(diagram["eps"], color="grey", ls=":", label=f"eps = {diagram['eps']:.3g}")
        ax_diagram.set_title(f"H0 barcode at step {diagram['step']} (+1 infinite bar)")
        ax_diagram.set_xlabel("scale (L2-normalised embeddings)")
        ax_diagram.legend(fontsize=8)
    else:
        why = why_no_diagram if not diagram else "all rows one point: only the infinite bar"
        ax_diagram.text(0.5, 0.5, why, ha="center", va="center", wrap=True)
        ax_diagram.set_title(f"H0 barcode at step {diagram['step']}" if diagram else "H0 barcode")
        ax_diagram.set_axis_off()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)  # the format follows the extension: PNG, PDF or SVG
    info = {name: _panel_info(a) for name, a in panels.items()}
    plt.close(fig)
    return info


def _plot_detector(ax: Any, series: Series, s: dict[str, Any], last_step: float) -> Any:
    """The detector's statistic over its threshold, each channel's share, the threshold (1) and the episodes."""
    detector = s["detector"]
    if detector is None:
        ax.text(0.5, 0.5, "no detector logged: the run used the rise rule", ha="center", va="center")
        ax.set_title("CUSUM detector")
        _shade_episodes(ax, s["episodes"], last_step)
        return ax
    d_steps, d_values = zip(*series[detector], strict=True)
    ax.plot(d_steps, d_values, "o-", color="black", label=f"{detector} (fused)")
    for channel in s["detector_channels"]:
        c_steps, c_values = zip(*series[channel], strict=True)
        ax.plot(c_steps, c_values, ".-", linewidth=1, alpha=0.8, label=channel.rsplit("/", 1)[-1])
    threshold = s["detector_threshold"]
    ax.hlines(threshold, min(d_steps), max(max(d_steps), last_step), colors="red", linestyles="--")
    ax.plot([], [], "--", color="red", label=f"threshold {threshold:g} (the detector alarms)")
    _shade_episodes(ax, s["episodes"], last_step)
    shown = [v for k in (detector, *s["detector_channels"]) for _, v in series[k] if math.isfinite(v)]
    ax.set_ylim(min(0.0, *shown) - 0.02, max(threshold * 1.1, *shown) * 1.05)
    ax.set_title("CUSUM detector: statistic / threshold (alarms at 1)")
    return ax


def _plot_counts(ax: Any, series: Series, counts: list[str]) -> Any:
    """The cumulative counts the monitor logs: optimizer steps a loss scaler skipped, alarm episodes."""
    for k in counts:
        c_steps, c_values = zip(*series[k], strict=True)
        name = k.rsplit("/", 1)[-1]
        what = " (loss scaler; not failures)" if name == "skipped_steps" else ""
        ax.step(c_steps, c_values, where="post", label=f"{name}{what}: {c_values[-1]:g}")
    if counts:
        from matplotlib.ticker import MaxNLocator

        ax.set_ylim(bottom=0)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
        ax.set_title("cumulative counts")
    else:
        ax.text(0.5, 0.5, "no skipped steps or episode count logged", ha="center", va="center")
        ax.set_title("cumulative counts")
    return ax


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
    resumed = f" (resumed at step {summary['resumed_at']})" if summary["resumed_at"] is not None else ""
    episodes = "".join(
        f"<tr><td>{i}</td><td>{e['start']}</td><td>{e['end'] if e['end'] is not None else 'open'}</td></tr>"
        for i, e in enumerate(summary["episodes"], 1)
    )
    episode_table = (
        "<table><tr><th>episode</th><th>start step</th><th>end step</th></tr>" + episodes + "</table>"
        if episodes
        else ""
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>topo-callbacks report</title></head><body>"
        f"<h1>Collapse report: {html.escape(summary['monitor'])}{resumed}</h1>{runs}"
        f"<p>{summary['checks']} checks, last at step {summary['last_step']} "
        f"(value {summary['last_value']:.4f}); {verdict}.</p>"
        f"<p>{html.escape(summary['rule'])}.</p>"
        f"<img src='data:image/png;base64,{image}' style='max-width:100%'>"
        f"<h2>Alarm episodes</h2><p>{html.escape(summary['events'])}.</p>{episode_table}"
        f"<h2>Last logged values</h2><table>{rows}</table><h2>Files read</h2><ul>{files}</ul></body></html>"
    )
