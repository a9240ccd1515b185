"""Client-side gradient defenses: registry name → :class:`Defense`. A new defense is one module plus one line."""

from __future__ import annotations

from clients.defenses import none
from clients.defenses.base import Defense, StepContext

#: Defense registry.
DEFENSES: dict[str, Defense] = {
    "none": Defense(none.apply, "no defense"),
}

__all__ = ["DEFENSES", "Defense", "StepContext"]
