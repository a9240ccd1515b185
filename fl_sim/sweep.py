"""Sweeps: one ``fl-sim run`` per cell of a grid of run keys, resumable, in parallel, with a seed-001 table.

A sweep file is TOML with three tables::

    [sweep]                                # optional; the table layout (these are the defaults)
    description = "what this sweep is for"
    columns = ["dataset", "defense"]       # axes (or run keys) that make the table's columns
    average = ["seed"]                     # axes averaged over: mean ± std (default: ["seed"] if seed is an axis)
    baseline = { defense = "none" }        # the cells ART divides by (axis = label)

    [base]                                 # run keys shared by every cell (see ``fl-sim keys``)
    num-server-rounds = 3

    [axes]                                 # the grid: every combination of one value per axis is a cell
    seed = [0, 1]                          # a list: values of the run key of the same name
    [axes.defense]                         # a table: named variants, each a bundle of run keys
    none = { defense = "none" }
    PLD-muted = { defense = "soteria", attack-ignore-layers = "fc" }

A cell's config is the defaults, updated with ``[base]``, then with each axis's value or bundle (two axes setting
the same key is an error). Every cell is checked (:func:`fl_sim.config.resolve` and
:func:`~fl_sim.config.check_feasible`) before anything runs; a problem is a :class:`~fl_sim.config.ConfigError` of
one line, so ``fl-sim sweep`` exits with code 2 and nothing has started.

Sweep directory (``--out``, default ``sweeps-out/<file stem>``)::

    OUT/
      sweep.toml, sweep.json   the sweep file as given, and its resolved axes and table settings
      cells/<axis=label__...>/ one run directory per cell (the files of ``fl-sim run``), plus ``cell.json``
                               (the cell's axis labels and the keys it sets) and ``cell.log`` (its output)
      attic/<cell>@<time>/     unfinished cells moved aside before they are redone (nothing is deleted)
      table.md, table.csv      seed 001's layout, rebuilt by ``fl-sim report OUT`` (:mod:`fl_sim.report`)
      accuracy-*.png, privacy-utility.png, montage-*.png

Resuming: a cell is *done* when its ``summary.json`` says ``completed`` with every round recorded; running the same
command again skips done cells, moves every other existing cell directory to ``attic/`` and runs it again. A done
cell whose config differs from what the sweep file now asks (other than the runtime keys in
:data:`RUNTIME_KEYS`) stops the sweep with an error rather than mixing two experiments in one table.

Parallelism: ``--jobs N`` runs N cells at once as ``fl-sim run`` subprocesses. The cores this process may use are
split into N disjoint groups; each cell is pinned to its group (CPU affinity, inherited by its Ray workers, and Ray
is sized to it by :func:`fl_sim.simulation.backend_config`) and its ``client-num-cpus`` is capped to the group's
size, so cells never compete for a core. When the sweep dies, its cells get SIGINT (``PR_SET_PDEATHSIG`` on
Linux) and stop after their round as after a Ctrl-C; they hold the sweep's lock until they have exited.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import fcntl
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fl_sim.config import KEYS, ConfigError, Value, check_feasible, coerce, resolve

#: Keys a cell's resolved config may differ in from a finished cell's ``config.toml`` without making it another
#: experiment: where it is written, and how it is run.
RUNTIME_KEYS = frozenset({"out-dir", "run-name", "client-num-cpus", "client-num-gpus", "round-timeout",
                          "node-timeout"})
#: Keys the sweep sets itself; a sweep file must not.
SWEEP_KEYS = frozenset({"out-dir", "run-name"})
_TOP = ("sweep", "base", "axes")
_SWEEP_SETTINGS = ("description", "columns", "average", "baseline")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]")


@dataclass(frozen=True)
class Axis:
    """One axis of a sweep.

    Attributes:
        name: the axis name (a run key for a list axis; any name for a variant table).
        labels: the value labels in file order (``str(value)`` for a list axis, the variant names otherwise).
        bundles: per label, the run keys that value sets (``{name: value}`` for a list axis).
    """

    name: str
    labels: tuple[str, ...]
    bundles: tuple[dict[str, Value], ...]


@dataclass
class SweepSpec:
    """A parsed and checked sweep file (see the module docstring).

    Attributes:
        path: the file.
        base: run keys shared by every cell (checked values).
        axes: the axes in file order.
        columns, average: table layout (axis names or run keys).
        baseline: ``(axis, label)`` of the cells ART divides by, or ``None``.
        description: free text.
    """

    path: Path
    base: dict[str, Value]
    axes: list[Axis]
    columns: list[str]
    average: list[str]
    baseline: tuple[str, str] | None
    description: str = ""

    def settings(self) -> dict[str, Any]:
        """What ``sweep.json`` holds: enough for :func:`fl_sim.report.write_sweep_report` without the file."""
        return {
            "source": str(self.path),
            "description": self.description,
            "axes": [{"name": a.name, "labels": list(a.labels)} for a in self.axes],
            "columns": self.columns,
            "average": self.average,
            "baseline": dict([self.baseline]) if self.baseline else {},
        }


@dataclass
class Cell:
    """One cell: a full run config and its place in the grid.

    Attributes:
        id: the directory name, ``axis=label`` parts joined by ``__`` (unsafe characters become ``-``).
        labels, index: per axis, the label and its position on the axis.
        overrides: the run keys the sweep sets (``[base]`` plus the axis bundles).
        config: the resolved config (every key), without the runtime keys the sweep adds per run.
    """

    id: str
    labels: dict[str, str]
    index: dict[str, int]
    overrides: dict[str, Value]
    config: dict[str, Value] = field(repr=False)

    def record(self) -> dict[str, Any]:
        """The content of ``cell.json``."""
        return {"id": self.id, "axes": list(self.labels), "labels": self.labels, "index": self.index,
                "overrides": self.overrides}


# --- the sweep file ----------------------------------------------------------------------------------------------
def _label(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _check_keys(where: str, keys: Mapping[str, Any]) -> dict[str, Value]:
    out: dict[str, Value] = {}
    for name, value in keys.items():
        if name in SWEEP_KEYS:
            raise ConfigError(f"{where}: {name} is set by the sweep (one run directory per cell under --out); "
                              f"remove it")
        try:
            out[name] = coerce(name, value)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return out


def _parse_axis(src: str, name: str, spec: Any) -> Axis:
    where = f"{src}: axes.{name}"
    if isinstance(spec, list):
        if not spec:
            raise ConfigError(f"{where} is an empty list; an axis needs at least one value")
        if name not in KEYS:
            raise ConfigError(f"{where}: a list axis must be named after a run key, and {name!r} is not one; "
                              f"use a table of named variants ([axes.{name}] LABEL = {{KEY = VALUE, ...}}) or "
                              f"see 'fl-sim keys'")
        bundles = tuple(_check_keys(where, {name: v}) for v in spec)
        labels = tuple(_label(b[name]) for b in bundles)
    elif isinstance(spec, dict):
        if not spec:
            raise ConfigError(f"{where} is an empty table; an axis needs at least one variant")
        labels, out = [], []
        for label, bundle in spec.items():
            if not isinstance(bundle, dict):
                raise ConfigError(f"{where}.{label} = {bundle!r} is not allowed; a variant must be a table of run "
                                  f"keys, e.g. {label} = {{defense = \"none\"}}")
            out.append(_check_keys(f"{where}.{label}", bundle))
            labels.append(str(label))
        bundles = tuple(out)
        labels = tuple(labels)
    else:
        raise ConfigError(f"{where} = {spec!r} is not allowed; an axis must be a list of values or a table of "
                          f"named variants")
    if len(set(labels)) != len(labels):
        dup = next(x for x in labels if labels.count(x) > 1)
        raise ConfigError(f"{where} has the value {dup!r} twice; every value of an axis must be different")
    return Axis(name, labels, bundles)


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and check a sweep file (its axes, keys and values; not yet the cells' cross-key checks).

    Raises:
        ConfigError: one line naming the file, the table and key, the value and what is allowed: a missing or
            unreadable file, invalid TOML, an unknown table or setting, an unknown run key or a bad value, an empty
            axis, a repeated value, or two axes that set the same key.
    """
    path = Path(path)
    src = str(path)
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"sweep file {src} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"sweep file {src} cannot be read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{src}: invalid TOML: {exc}") from None
    unknown = [k for k in doc if k not in _TOP]
    if unknown:
        raise ConfigError(f"{src}: unknown table or key {unknown[0]!r}; a sweep file has the tables "
                          f"{', '.join(_TOP)}")
    settings = doc.get("sweep", {})
    base_raw = doc.get("base", {})
    axes_raw = doc.get("axes")
    for name, value in (("sweep", settings), ("base", base_raw)):
        if not isinstance(value, dict):
            raise ConfigError(f"{src}: {name} must be a table ([{name}])")
    if not isinstance(axes_raw, dict) or not axes_raw:
        raise ConfigError(f"{src}: [axes] is missing or empty; a sweep needs at least one axis, e.g. "
                          f"[axes] seed = [0, 1]")
    bad = [k for k in settings if k not in _SWEEP_SETTINGS]
    if bad:
        raise ConfigError(f"{src}: unknown setting sweep.{bad[0]}; [sweep] allows {', '.join(_SWEEP_SETTINGS)}")
    base = _check_keys(f"{src}: base", base_raw)
    axes = [_parse_axis(src, name, spec) for name, spec in axes_raw.items()]
    setters: dict[str, str] = {}
    for axis in axes:
        for key in sorted({k for b in axis.bundles for k in b}):
            if key in setters:
                raise ConfigError(f"{src}: axes.{setters[key]} and axes.{axis.name} both set {key}; a key may "
                                  f"vary along one axis only")
            setters[key] = axis.name
    names = [a.name for a in axes]

    def names_list(key: str, default: list[str]) -> list[str]:
        value = settings.get(key, default)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{src}: sweep.{key} = {value!r} is not allowed; it must be a list of axis names")
        for v in value:
            if v not in names and v not in KEYS:
                raise ConfigError(f"{src}: sweep.{key} names {v!r}, which is neither an axis "
                                  f"({', '.join(names)}) nor a run key")
        return value

    columns = names_list("columns", ["dataset", "defense"])
    average = names_list("average", ["seed"] if "seed" in names else [])
    both = set(columns) & set(average)
    if both:
        raise ConfigError(f"{src}: {sorted(both)[0]!r} is both in sweep.columns and sweep.average")
    baseline_raw = settings.get("baseline")
    baseline: tuple[str, str] | None
    if baseline_raw is None:
        defense = next((a for a in axes if a.name == "defense"), None)
        baseline = ("defense", "none") if defense is not None and "none" in defense.labels else None
    else:
        if not (isinstance(baseline_raw, dict) and len(baseline_raw) == 1):
            raise ConfigError(f"{src}: sweep.baseline = {baseline_raw!r} is not allowed; it must name one axis "
                              f"and one of its labels, e.g. baseline = {{defense = \"none\"}}")
        (axis_name, label), = baseline_raw.items()
        axis = next((a for a in axes if a.name == axis_name), None)
        if axis is None or _label(label) not in axis.labels:
            allowed = ", ".join(axis.labels) if axis else "an axis name"
            raise ConfigError(f"{src}: sweep.baseline {axis_name} = {label!r} is not allowed; it must be one of "
                              f"{allowed}")
        baseline = (axis_name, _label(label))
    description = settings.get("description", "")
    if not isinstance(description, str):
        raise ConfigError(f"{src}: sweep.description must be a string")
    return SweepSpec(path, base, axes, columns, average, baseline, description)


def cell_id(labels: Mapping[str, str]) -> str:
    """The directory name of a cell: ``axis=label`` parts joined by ``__``; characters outside
    ``[A-Za-z0-9._+=-]`` become ``-``."""
    return "__".join(_UNSAFE.sub("-", f"{axis}={label}") for axis, label in labels.items())


def plan(spec: SweepSpec) -> list[Cell]:
    """Every cell of the grid, in file order (the last axis varies fastest), with its resolved config.

    Raises:
        ConfigError: a cell whose keys fail the cross-key checks (prefixed with the cell), or two cells with the
            same directory name.
    """
    cells: list[Cell] = []
    seen: dict[str, Cell] = {}
    for choice in itertools.product(*(range(len(a.labels)) for a in spec.axes)):
        labels = {a.name: a.labels[i] for a, i in zip(spec.axes, choice)}
        overrides = dict(spec.base)
        for a, i in zip(spec.axes, choice):
            overrides.update(a.bundles[i])
        cid = cell_id(labels)
        try:
            config = resolve(overrides)
        except ConfigError as exc:
            raise ConfigError(f"{spec.path}: cell {cid}: {exc}") from None
        if cid in seen:
            raise ConfigError(f"{spec.path}: cells {labels} and {seen[cid].labels} get the same directory name "
                              f"{cid!r}; rename a label")
        cell = Cell(cid, labels, {a.name: i for a, i in zip(spec.axes, choice)}, overrides, config)
        seen[cid] = cell
        cells.append(cell)
    return cells


def check_cells_feasible(spec: SweepSpec, cells: list[Cell]) -> None:
    """:func:`fl_sim.config.check_feasible` on every distinct cell config (loads each dataset once).

    Raises:
        ConfigError: prefixed with the first cell that fails.
    """
    done: set[tuple] = set()
    for cell in cells:
        key = tuple(sorted((k, v) for k, v in cell.config.items() if k not in RUNTIME_KEYS and
                           not k.startswith("attack")))
        if key in done:
            continue
        try:
            check_feasible(cell.config)
        except ConfigError as exc:
            raise ConfigError(f"{spec.path}: cell {cell.id}: {exc}") from None
        done.add(key)


# --- the state of a sweep directory ------------------------------------------------------------------------------
def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file's content, or ``None`` when it is missing or unreadable (a torn write)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_done(run_dir: Path) -> bool:
    """True when ``run_dir/summary.json`` says ``completed`` and records every round of its ``config.toml``."""
    summary = read_json(run_dir / "summary.json")
    if not summary or summary.get("status") != "completed":
        return False
    try:
        cfg = tomllib.loads((run_dir / "config.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return False
    return summary.get("rounds") == cfg.get("num-server-rounds")


def config_mismatch(run_dir: Path, cell: Cell) -> str | None:
    """The first key on which a finished cell's ``config.toml`` differs from ``cell.config`` (runtime keys aside),
    as ``"key=old (now new)"``, or ``None``. A key the stored config lacks (added to fl-sim later) matches when the
    cell leaves it at its default."""
    stored = tomllib.loads((run_dir / "config.toml").read_text())
    for key, value in cell.config.items():
        if key in RUNTIME_KEYS:
            continue
        old = stored.get(key, KEYS[key].default)
        if old != value:
            return f"{key}={old!r} (the sweep now asks {key}={value!r})"
    return None


def cell_states(out: Path, cells: list[Cell]) -> dict[str, str]:
    """Per cell id: ``"done"``, ``"partial"`` (a directory that is not done: it will be moved aside and redone) or
    ``"missing"``.

    Raises:
        ConfigError: a done cell ran with another config than the sweep now asks.
    """
    states = {}
    for cell in cells:
        d = out / "cells" / cell.id
        if is_done(d):
            diff = config_mismatch(d, cell)
            if diff:
                raise ConfigError(f"{d} holds a finished run with {diff}; use another --out, or move that "
                                  f"directory away to redo it")
            states[cell.id] = "done"
        else:
            states[cell.id] = "partial" if d.exists() else "missing"
    return states


def move_aside(out: Path, cell_dir: Path) -> Path:
    """Move an unfinished cell directory to ``out/attic/<name>@<YYYYmmdd-HHMMSS>[-k]``; return the new path."""
    attic = out / "attic"
    attic.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = attic / f"{cell_dir.name}@{stamp}"
    k = 1
    while dest.exists():
        dest = attic / f"{cell_dir.name}@{stamp}-{k}"
        k += 1
    shutil.move(str(cell_dir), str(dest))
    return dest


@contextmanager
def sweep_lock(out: Path) -> Iterator[int]:
    """Hold ``out/.lock`` (an exclusive ``flock``) while a sweep writes ``out``; yields the lock's file descriptor.

    The cell subprocesses inherit the descriptor, so the lock stays held until the last of them has exited, even
    when the sweep itself was killed: a second sweep never writes into a cell that is still running.

    Raises:
        ConfigError: another ``fl-sim sweep``, or a cell of one, holds it.
    """
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another fl-sim sweep (or a cell it started) is running in {out}; wait for it or "
                              f"use another --out") from None
        yield fd
    finally:
        os.close(fd)


# --- running cells -------------------------------------------------------------------------------------------------
def usable_cpus() -> list[int]:
    """The CPU ids this process may run on (its affinity), or ``range(os.cpu_count())``."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def split_cpus(cpus: list[int], jobs: int) -> list[list[int]]:
    """Split ``cpus`` into ``min(jobs, len(cpus))`` disjoint, contiguous groups of (nearly) equal size.

    Raises:
        ValueError: ``jobs < 1`` or no CPUs.
    """
    if jobs < 1 or not cpus:
        raise ValueError(f"cannot split {len(cpus)} CPUs into {jobs} groups")
    n = min(jobs, len(cpus))
    size, extra = divmod(len(cpus), n)
    groups, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        groups.append(cpus[start:end])
        start = end
    return groups


def cli_value(value: Value) -> str:
    """``value`` as the text of ``fl-sim run KEY=VALUE`` (parsed back by :func:`fl_sim.config.parse_value`)."""
    return _label(value) if isinstance(value, bool) else repr(value) if isinstance(value, float) else str(value)


def cell_command(cell: Cell, cell_dir: Path, cpus: int) -> list[str]:
    """The ``fl-sim run`` command of one cell, with ``client-num-cpus`` capped to the ``cpus`` it is given."""
    overrides = dict(cell.overrides)
    overrides["client-num-cpus"] = min(float(cell.config["client-num-cpus"]), float(cpus))
    args = [f"{k}={cli_value(v)}" for k, v in overrides.items()]
    return [sys.executable, "-m", "fl_sim.cli", "run", *args, "--out", str(cell_dir)]


_LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1


def _child_setup(cpus: list[int], parent: int) -> Callable[[], None]:
    """Pin the cell to ``cpus`` and have it receive SIGINT when the sweep dies: ``fl-sim run`` then stops after
    the current round and shuts Ray down (a SIGTERM/SIGKILL would leave Ray's agent processes behind)."""
    def setup() -> None:  # runs in the child between fork and exec: no imports, no allocation-heavy work
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, cpus)
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a sweep started with `&` by a script ignores SIGINT
        if _LIBC is not None:
            _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGINT)
        if os.getppid() != parent:  # the sweep died before prctl took effect
            os._exit(1)
    return setup


def _project_root() -> Path:
    import fl_sim

    return Path(fl_sim.__file__).resolve().parent.parent


@dataclass
class _Job:
    cell: Cell
    dir: Path
    proc: subprocess.Popen
    slot: int
    log: Any
    rounds: int


@dataclass
class SweepResult:
    """What :func:`run_sweep` did.

    Attributes:
        cells: number of cells in the sweep.
        skipped: ids of cells already done.
        moved: ``(id, attic path)`` of unfinished cells moved aside.
        ran: ids of cells that completed in this call.
        failed: ``(id, reason)`` of cells that did not complete.
        retried: ``(id, reason)`` of failed attempts that were run again.
        interrupted: the sweep was stopped (Ctrl-C) before every cell ran.
        wall_time_s: seconds spent.
        report: ``table.md`` (``None`` on a dry run).
    """

    cells: int
    skipped: list[str] = field(default_factory=list)
    moved: list[tuple[str, Path]] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    retried: list[tuple[str, str]] = field(default_factory=list)
    interrupted: bool = False
    wall_time_s: float = 0.0
    report: Path | None = None


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


_EXCEPTION_LINE = re.compile(r"^[\w.]*(?:Error|Exception):")


def _failure(path: Path) -> str:
    """The most telling line of a failed cell's log: the first exception line of a traceback (the root cause),
    else the last line mentioning an error, else the last line."""
    try:
        lines = [x.strip() for x in path.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return "no log"
    causes = [x for x in lines if _EXCEPTION_LINE.match(x)]
    if causes:
        return causes[0][:300]
    errors = [x for x in lines if "error" in x.lower()]
    return (errors or lines or ["no output"])[-1][:300]


def default_out(path: Path) -> Path:
    """``sweeps-out/<file stem>`` in the current directory."""
    return Path("sweeps-out") / Path(path).stem


def run_sweep(spec: SweepSpec, out: Path, jobs: int = 1, dry_run: bool = False, console: Any = None,
              poll_s: float = 0.5, retries: int = 1) -> SweepResult:
    """Run every cell of ``spec`` that is not done in ``out``, ``jobs`` at a time, then write the sweep report.

    Args:
        spec: a parsed sweep (:func:`load_sweep`).
        out: the sweep directory.
        jobs: cells run at once (capped to the usable cores; each gets its own cores).
        dry_run: plan and print, but write and run nothing.
        console: a ``rich.console.Console`` for the plan and the progress bar (default: stderr).
        poll_s: seconds between checks of the running cells.
        retries: times a failed cell is run again in this call (after the others; its directory is moved aside).

    Returns:
        A :class:`SweepResult`.

    Raises:
        ConfigError: a bad cell, a finished cell with another config, or a sweep already running in ``out``
            (all before any cell starts).
    """
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    console = console or Console(stderr=True, soft_wrap=True)
    start = time.time()
    out = Path(out).expanduser().resolve()
    cells = plan(spec)
    result = SweepResult(cells=len(cells))
    groups = split_cpus(usable_cpus(), jobs)
    if dry_run:
        states = cell_states(out, cells) if out.is_dir() else {c.id: "missing" for c in cells}
        for c in cells:
            console.print(f"{states[c.id]:>8}  {c.id}")
        console.print(f"{len(cells)} cells; would run {sum(s != 'done' for s in states.values())} with "
                      f"{len(groups)} job(s) of {len(groups[0])} core(s) in {out}")
        return result
    with sweep_lock(out) as lock_fd:
        states = cell_states(out, cells)
        pending = [c for c in cells if states[c.id] != "done"]
        check_cells_feasible(spec, pending)
        from fl_sim.results import atomic_write_text

        if spec.path.is_file():
            atomic_write_text(out / "sweep.toml", spec.path.read_text())
        atomic_write_text(out / "sweep.json", json.dumps(spec.settings(), indent=2))
        result.skipped = [c.id for c in cells if states[c.id] == "done"]
        for c in pending:
            if states[c.id] == "partial":
                result.moved.append((c.id, move_aside(out, out / "cells" / c.id)))
        groups = split_cpus(usable_cpus(), max(1, min(jobs, len(pending))))  # fewer cells than jobs: more cores
        console.print(f"fl-sim sweep {spec.path}: {len(cells)} cells, {len(result.skipped)} done, "
                      f"{len(result.moved)} unfinished moved to attic/, {len(pending)} to run with "
                      f"{len(groups)} job(s) × {len(groups[0])} core(s) → {out}")
        if pending:
            _run_pending(pending, out, groups, result, lock_fd, poll_s, retries=retries, progress=
                         Progress(TextColumn("[bold]cells"), BarColumn(), TaskProgressColumn(),
                                  TextColumn("{task.fields[done]}/{task.total:.0f} {task.description}"),
                                  TimeElapsedColumn(), console=console))
        from fl_sim.report import write_sweep_report

        result.report = write_sweep_report(out)
    result.wall_time_s = time.time() - start
    return result


def _run_pending(pending: list[Cell], out: Path, groups: list[list[int]], result: SweepResult, lock_fd: int,
                 poll_s: float, progress: Any, retries: int) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_project_root()), env.get("PYTHONPATH", "")) if p)
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    queue = collections.deque(pending)
    free = list(range(len(groups)))
    running: dict[int, _Job] = {}
    tries = {c.id: 0 for c in pending}
    base_done = len(result.skipped)
    total = base_done + len(pending)
    task = progress.add_task("", total=total, completed=base_done, done=base_done)
    stopping = False

    def start_cell(cell: Cell, slot: int) -> None:
        d = out / "cells" / cell.id
        d.mkdir(parents=True, exist_ok=True)
        (d / "cell.json").write_text(json.dumps(cell.record(), indent=2))
        log = open(d / "cell.log", "w")
        cpus = groups[slot]
        # one intra-op thread on the server side of every cell, whatever its cores: float reductions (and so the
        # attack scores) then do not depend on --jobs; LeNet-sized work gains little from more threads
        job_env = dict(env, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        proc = subprocess.Popen(cell_command(cell, d, len(cpus)), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=job_env, start_new_session=True,
                                pass_fds=(lock_fd,), preexec_fn=_child_setup(cpus, os.getpid()))
        running[slot] = _Job(cell, d, proc, slot, log, int(cell.config["num-server-rounds"]))

    def reap() -> None:
        for slot, job in list(running.items()):
            rc = job.proc.poll()
            if rc is None:
                continue
            job.log.close()
            del running[slot]
            free.append(slot)
            if rc == 0 and is_done(job.dir):
                result.ran.append(job.cell.id)
                continue
            if stopping:
                result.failed.append((job.cell.id, "interrupted"))
                continue
            reason = f"exit {rc}: {_failure(job.dir / 'cell.log')}"
            if tries[job.cell.id] < retries:  # e.g. Ray failing to start on a loaded machine: try again, last
                tries[job.cell.id] += 1
                moved = move_aside(out, job.dir)
                result.retried.append((job.cell.id, reason))
                progress.console.print(f"[yellow]cell {job.cell.id} failed ({reason}); kept in {moved}, will "
                                       f"retry[/yellow]")
                queue.append(job.cell)
            else:
                result.failed.append((job.cell.id, reason))
                progress.console.print(f"[red]cell {job.cell.id} failed ({reason}); see "
                                       f"{job.dir / 'cell.log'}[/red]")

    def show() -> None:
        partial = sum(min(1.0, _count_lines(j.dir / "metrics.jsonl") / j.rounds) for j in running.values())
        done = base_done + len(result.ran)
        names = ", ".join(f"{j.cell.id} r{_count_lines(j.dir / 'metrics.jsonl')}/{j.rounds}"
                          for j in running.values())
        progress.update(task, completed=done + len(result.failed) + partial, done=done,
                        description=f"running: {names}" if names else "")

    with progress:
        try:
            while queue or running:
                while queue and free:
                    start_cell(queue.popleft(), free.pop(0))
                show()
                time.sleep(poll_s)
                reap()
            show()
        except KeyboardInterrupt:
            stopping = True
            result.interrupted = True
            progress.console.print("[yellow]Ctrl-C: stopping the running cells after their current round "
                                   "(press again to kill them); finished cells are kept[/yellow]")
            for job in running.values():
                job.proc.send_signal(signal.SIGINT)
            try:
                while running:
                    time.sleep(poll_s)
                    reap()
            except KeyboardInterrupt:
                for job in running.values():
                    _kill_group(job.proc)
                for job in list(running.values()):
                    job.proc.wait()
                reap()


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a cell's process group: the cell and every Ray process it started (they share its group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
