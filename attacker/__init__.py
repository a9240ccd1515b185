"""Gradient-inversion attacks run by the honest-but-curious server.

Each attack is a function ``(AttackPayload, Budget) -> AttackResult`` registered in :data:`ATTACKS` with the
capabilities it needs (:class:`ThreatModel`). Attacks see only :class:`AttackPayload` — what a curious server holds —
and nothing from ``clients/``; scoring against the truth happens outside this package (``fl_sim.evaluator``).
A new attack is one module plus one line below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from attacker import dlg
from attacker.payload import AttackPayload, AttackResult, Budget, ThreatModel, update_to_gradient


@dataclass(frozen=True)
class Attack:
    """A registered attack.

    Attributes:
        run: ``(payload, budget) -> AttackResult``.
        threat: what it needs beyond the payload.
        summary: one line for ``fl-sim attacks`` and reports.
    """

    run: Callable[[AttackPayload, Budget], AttackResult]
    threat: ThreatModel
    summary: str


#: Attack registry: name → :class:`Attack`.
ATTACKS: dict[str, Attack] = {
    "dlg": Attack(dlg.dlg, ThreatModel(), "DLG (Zhu et al. 2019): joint image + soft-label L2 matching, L-BFGS"),
    "idlg": Attack(dlg.idlg, ThreatModel(), "iDLG (Zhao et al. 2020): analytic label, then L2 matching, L-BFGS"),
}

__all__ = ["ATTACKS", "Attack", "AttackPayload", "AttackResult", "Budget", "ThreatModel", "update_to_gradient"]
