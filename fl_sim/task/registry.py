"""A small registry type for fl-sim's plug-ins (models, datasets, partitioners, defenses, server steps, attacks).

In the spirit of torchvision's model registry: a :class:`Registry` maps names to entries, refuses a second entry
under a name it already holds, and answers a miss with a one-line error that lists the names and suggests the
closest one. A plug-in is one module plus one ``REGISTRY.register(...)`` line.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    """A name is unknown to a registry, or registered twice. ``str(err)`` is one line for the user."""

    def __str__(self) -> str:  # KeyError's str() would quote the message
        return str(self.args[0]) if self.args else ""


class Registry(Mapping[str, T], Generic[T]):
    """Names → entries of one kind of plug-in, in registration order.

    Args:
        kind: what the entries are, for error messages (``"model"``, ``"defense"``, ...).

    Iterating yields the names in registration order; ``registry[name]`` raises :class:`RegistryError` (a
    ``KeyError``) with a did-you-mean hint on a miss.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        """Add ``entry`` under ``name`` and return it.

        Raises:
            RegistryError: ``name`` is already registered (a plug-in must not silently replace another).
        """
        if name in self._entries:
            raise RegistryError(f"{self.kind} {name!r} is already registered; choose another name")
        self._entries[name] = entry
        return entry

    def decorator(self, name: str) -> Callable[[T], T]:
        """``@REGISTRY.decorator("name")`` registers the decorated object under ``name``."""
        return lambda entry: self.register(name, entry)

    def unregister(self, name: str) -> T:
        """Remove and return the entry ``name`` (tests that register a plug-in of their own clean up with it).

        Raises:
            RegistryError: unknown name.
        """
        entry = self[name]
        del self._entries[name]
        return entry

    def unknown(self, name: object) -> RegistryError:
        """The error for a miss: the names allowed and the closest one."""
        close = difflib.get_close_matches(str(name), list(self._entries), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return RegistryError(f"unknown {self.kind} {name!r}{hint}; allowed: {', '.join(sorted(self._entries))}")

    def __getitem__(self, name: str) -> T:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise self.unknown(name) from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._entries)})"
