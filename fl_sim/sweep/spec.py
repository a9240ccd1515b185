"""Sweep files: the TOML grid of run keys that ``fl-sim sweep`` runs (see :mod:`fl_sim.sweep`)."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl_sim.config import coerce, key_table
from fl_sim.task.keys import ConfigError, Value

#: Keys a cell's resolved config may differ in from a finished cell's ``config.toml`` without making it another
#: experiment: where it is written, and how it is run.
RUNTIME_KEYS = frozenset({"out-dir", "run-name", "client-num-cpus", "client-num-gpus", "round-timeout",
                          "node-timeout", "sim-backend"})
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


# --- the sweep file ----------------------------------------------------------------------------------------------
def value_label(value: Any) -> str:
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
        if name not in key_table():
            raise ConfigError(f"{where}: a list axis must be named after a run key, and {name!r} is not one; "
                              f"use a table of named variants ([axes.{name}] LABEL = {{KEY = VALUE, ...}}) or "
                              f"see 'fl-sim keys'")
        bundles = tuple(_check_keys(where, {name: v}) for v in spec)
        labels = tuple(value_label(b[name]) for b in bundles)
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
            if v not in names and v not in key_table():
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
        if axis is None or value_label(label) not in axis.labels:
            allowed = ", ".join(axis.labels) if axis else "an axis name"
            raise ConfigError(f"{src}: sweep.baseline {axis_name} = {label!r} is not allowed; it must be one of "
                              f"{allowed}")
        baseline = (axis_name, value_label(label))
    description = settings.get("description", "")
    if not isinstance(description, str):
        raise ConfigError(f"{src}: sweep.description must be a string")
    return SweepSpec(path, base, axes, columns, average, baseline, description)


