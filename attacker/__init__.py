"""Gradient-inversion attacks run by the honest-but-curious server.

Each attack is a function ``(AttackPayload, Budget, AttackOptions | None) -> AttackResult`` registered in
:data:`ATTACKS` with the capabilities it needs (:class:`ThreatModel`). ``Budget`` says how much work (iterations,
restarts, time limit, progress callback); ``AttackOptions`` says what is optimised (the adaptive knobs: ignored or
weighted layers, mask inference, clipping replication; image prior weights; the label method). Attacks see only
:class:`AttackPayload` — what a curious server holds — and nothing from ``clients/``; scoring against the truth
happens outside this package (``fl_sim.evaluator``).
A new attack is one module plus one line below.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from attacker import dlg, ig, rgap
from attacker.options import AttackOptions
from attacker.payload import AttackPayload, AttackResult, Budget, ThreatModel, update_to_gradient


@dataclass(frozen=True)
class Attack:
    """A registered attack.

    Attributes:
        run: ``(payload, budget, options=None) -> AttackResult``.
        threat: what it needs beyond the payload.
        summary: one line for ``fl-sim attacks`` and reports.
        check: optional ``(model, cfg) -> None`` raising ``ValueError`` when the attack cannot run with this model
            and run config (called before a run starts, so the error is a one-line ConfigError, not a crash).
    """

    run: Callable[[AttackPayload, Budget, AttackOptions | None], AttackResult]
    threat: ThreatModel
    summary: str
    check: Callable[[Any, Mapping[str, Any]], None] | None = None


#: Attack registry: name → :class:`Attack`.
ATTACKS: dict[str, Attack] = {
    "dlg": Attack(dlg.dlg, ThreatModel(), "DLG (Zhu et al. 2019): joint image + soft-label L2 matching, L-BFGS"),
    "idlg": Attack(dlg.idlg, ThreatModel(), "iDLG (Zhao et al. 2020): analytic label, then L2 matching, L-BFGS"),
    "ig": Attack(ig.ig, ThreatModel(), "Inverting Gradients (Geiping et al. 2020): cosine + TV, signed Adam, box"),
    "rgap": Attack(rgap.rgap, ThreatModel(), "R-GAP (Zhu & Blaschko 2021): closed-form recursive inversion, "
                                             "conv/FC nets without pooling", rgap.check),
    "ig-fedavg": Attack(ig.ig_fedavg, ThreatModel(local_hyperparams=True),
                        "Inverting Gradients on multi-step updates: unrolls the K local SGD steps the server set",
                        ig.check_fedavg),
}

__all__ = ["ATTACKS", "Attack", "AttackOptions", "AttackPayload", "AttackResult", "Budget", "ThreatModel", "update_to_gradient"]
