"""A defense written the way a user outside this repository would: one module, registered by ``plugins=toy_defense``.

It scales every step's gradient by ``defense-toy-scale`` and reports how many steps it scaled; none of fl-sim's
files knows about it.
"""

from __future__ import annotations

from dataclasses import dataclass

from clients.defenses import DEFENSES, Defense
from fl_sim.task.keys import Key

KEYS = {"defense-toy-scale": Key(1.0, "toy: factor every step's gradient is multiplied by", low=0)}


@dataclass(frozen=True)
class Params:
    scale: float


def apply(grads, ctx):
    ctx.info["toy-steps"] = ctx.info.get("toy-steps", 0) + 1
    return [g * ctx.params.scale for g in grads]


if "toy" not in DEFENSES:
    DEFENSES.register("toy", Defense("toy: scale the gradient", apply, KEYS, Params, "defense-toy-",
                                     metrics=("toy-steps",)))
