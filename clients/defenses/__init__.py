"""Client-side gradient defenses: registry name → :class:`Defense`.

A new defense is one module (its keys, parameter object, checks, metrics and hooks; see
:mod:`clients.defenses.base`) plus one ``DEFENSES.register`` line below — or, outside this repository, a module
named in the ``plugins`` key that registers itself.
"""

from __future__ import annotations

from clients.defenses import dp, dp_sgd, fedkl, graddefense, local_dp, none, prune, quantize, soteria
from clients.defenses.base import Defense, ReplyContext, StepContext, per_sample_gradients
from fl_sim.task.keys import Key, merge
from fl_sim.task.registry import Registry

#: Defense registry.
DEFENSES: Registry[Defense] = Registry("defense")
DEFENSES.register("none", none.DEFENSE)
DEFENSES.register("prune", prune.DEFENSE)
DEFENSES.register("dp-gaussian", dp.GAUSSIAN)
DEFENSES.register("dp-laplace", dp.LAPLACE)
DEFENSES.register("dp-sgd", dp_sgd.DEFENSE)
DEFENSES.register("local-dp", local_dp.DEFENSE)
DEFENSES.register("soteria", soteria.DEFENSE)
DEFENSES.register("graddefense", graddefense.DEFENSE)
DEFENSES.register("fedkl", fedkl.DEFENSE)
DEFENSES.register("quantize", quantize.DEFENSE)

#: The key that chooses the defense.
DEFENSE_KEY = {"defense": Key("none", "client-side gradient defense", choices=lambda: list(DEFENSES))}


def defense_keys() -> dict[str, Key]:
    """``defense`` and every registered defense's keys, in registration order.

    Raises:
        ValueError: two defenses declare one key differently.
    """
    return merge(DEFENSE_KEY, *(d.keys for d in DEFENSES.values()))


__all__ = ["DEFENSES", "DEFENSE_KEY", "Defense", "ReplyContext", "StepContext", "defense_keys",
           "per_sample_gradients"]
