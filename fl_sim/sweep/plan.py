"""The cells of a sweep and the state of a sweep directory (done, partial, missing), and its lock."""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import shutil
import time
import tomllib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fl_sim.config import check_feasible, key_table, resolve
from fl_sim.sweep.spec import _UNSAFE, RUNTIME_KEYS, SweepSpec
from fl_sim.task.keys import ConfigError, Value

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
        key = tuple(sorted((k, v) for k, v in cell.config.items() if k not in RUNTIME_KEYS))
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
        old = stored.get(key, key_table()[key].default)
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


