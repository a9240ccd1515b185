"""Run-config keys: the :class:`Key` type, value checking, and parameter objects built from a config.

Every plug-in declares the keys it owns (a ``dict[str, Key]``) and a frozen parameter dataclass; :func:`build`
turns a run config into that object, checking each value. The roof (``fl_sim.config``) assembles the global key
table that ``fl-sim keys``, ``fl-sim run`` and the ``[tool.flwr.app.config]`` block use from these declarations.

Values are typed as Flower's TOML parser gives them (``bool | int | float | str``). Every error is a
:class:`ConfigError` whose message is one line naming the key, the value and what is allowed.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any, TypeVar

Value = bool | int | float | str
P = TypeVar("P")


class ConfigError(ValueError):
    """A run-config key or value is not allowed. ``str(err)`` is one line for the user."""


@dataclass(frozen=True)
class Key:
    """One run-config key.

    Attributes:
        default: default value; its type is the key's type (``also_int`` keys also accept ints).
        help: one-line description (units included).
        choices: allowed values, or a callable returning them (registries are read lazily).
        low, high: inclusive numeric bounds; ``low_open`` makes the lower bound exclusive.
        also_int: a ``str`` key that also accepts an int (TOML ``victim=3``).
    """

    default: Value
    help: str
    choices: tuple[str, ...] | Callable[[], Iterable[str]] | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    also_int: bool = False

    def allowed(self) -> list[str] | None:
        """The allowed values of a choice key, sorted (``None`` for free keys)."""
        if self.choices is None:
            return None
        return sorted(self.choices() if callable(self.choices) else self.choices)

    def describe(self) -> str:
        """What the key accepts, e.g. ``"a number >= 0 and <= 100"`` or ``"one of a, b"``."""
        choices = self.allowed()
        if choices is not None:
            return "one of " + ", ".join(choices)
        kind = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}[
            type(self.default).__name__]
        if self.low is None and self.high is None:
            return kind
        lo = "" if self.low is None else (f"> {self.low:g}" if self.low_open else f">= {self.low:g}")
        hi = "" if self.high is None else f"<= {self.high:g}"
        return f"{kind} " + " and ".join(p for p in (lo, hi) if p)

    def bad(self, name: str, value: Any) -> ConfigError:
        """The one-line error for ``name=value``."""
        return ConfigError(f"{name}={value!r} is not allowed; {name} must be {self.describe()}")

    def coerce(self, name: str, value: Any) -> Value:
        """Check ``value`` for this key (named ``name``) and return it with the key's type.

        Raises:
            ConfigError: wrong type, out of range or not among the choices.
        """
        kind = type(self.default)
        if kind is bool:
            if not isinstance(value, bool):
                raise self.bad(name, value)
            out: Value = value
        elif kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise self.bad(name, value)
            out = value
        elif kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise self.bad(name, value)
            out = float(value)
        else:
            if self.also_int and isinstance(value, int) and not isinstance(value, bool):
                value = str(value)
            if not isinstance(value, str):
                raise self.bad(name, value)
            out = value
        if kind in (int, float):
            if self.low is not None and (out < self.low or (self.low_open and out == self.low)):
                raise self.bad(name, value)
            if self.high is not None and out > self.high:
                raise self.bad(name, value)
        allowed = self.allowed()
        if allowed is not None and out not in allowed:
            raise self.bad(name, value)
        return out

    def parse(self, name: str, text: str) -> Value:
        """Parse the text of ``KEY=VALUE`` (TOML-like: ``true``, ``3``, ``0.1``, ``"x"`` or ``x``) and check it.

        Raises:
            ConfigError: as :meth:`coerce`.
        """
        kind = type(self.default)
        raw = text.strip()
        unquoted = raw[1:-1] if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "\"'" else raw
        value: Any = unquoted
        if kind is bool:
            value = {"true": True, "false": False}.get(raw.lower(), raw)
        elif kind in (int, float):
            try:
                value = kind(raw)
            except ValueError:
                value = raw
        return self.coerce(name, value)


def unknown_key(name: str, known: Iterable[str]) -> ConfigError:
    """The one-line error for a key nobody declares, with the closest known key."""
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown key {name!r}{hint}; run 'fl-sim keys' for the list of keys")


def merge(*tables: Mapping[str, Key]) -> dict[str, Key]:
    """One key table from several, in order.

    A key may appear in several tables only as the same :class:`Key` object (two declarations of one module, such
    as ``dp-gaussian`` and ``dp-laplace`` sharing their keys).

    Raises:
        ValueError: two tables declare the same key differently (two plug-ins must not own one key).
    """
    out: dict[str, Key] = {}
    for table in tables:
        for name, key in table.items():
            if name in out and out[name] is not key:
                raise ValueError(f"run-config key {name!r} is declared twice")
            out[name] = key
    return out


def read(keys: Mapping[str, Key], cfg: Mapping[str, Any]) -> dict[str, Value]:
    """The values of ``keys`` in ``cfg`` (checked, typed), defaults for the keys ``cfg`` lacks.

    Keys of ``cfg`` that are not in ``keys`` are ignored (they belong to other components).

    Raises:
        ConfigError: a value that the key does not allow.
    """
    return {name: key.coerce(name, cfg[name]) if name in cfg else key.default for name, key in keys.items()}


def build(cls: type[P], keys: Mapping[str, Key], cfg: Mapping[str, Any], prefix: str = "") -> P:
    """A frozen parameter dataclass ``cls`` from the values of ``keys`` in ``cfg`` (see :func:`read`).

    Field ``f`` of ``cls`` takes key ``prefix + f.replace("_", "-")``; every field must have its key.

    Raises:
        ConfigError: a value that its key does not allow.
        ValueError: a field of ``cls`` without a key (a programming error in the plug-in).
    """
    values = read(keys, cfg)
    kw = {}
    for f in fields(cls):  # type: ignore[arg-type]
        name = prefix + f.name.replace("_", "-")
        if name not in values:
            raise ValueError(f"{cls.__name__}.{f.name} has no key {name!r}")
        kw[f.name] = values[name]
    return cls(**kw)
