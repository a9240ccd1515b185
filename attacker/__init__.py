"""Gradient-inversion attacks run by the honest-but-curious server.

Each attack is a function ``(AttackPayload, Budget, AttackOptions) -> AttackResult`` registered in :data:`ATTACKS`
as an :class:`Attack`: the capabilities it needs (:class:`ThreatModel`; the server cuts the payload to them), its
own keys if any, and a check run before a federation starts. ``Budget`` says how much work (iterations, restarts,
time limit, progress callback); ``AttackOptions`` says what is optimised (the adaptive knobs shared by every
attack). Attacks see only the :class:`AttackPayload` — what a curious server holds, cut to what they declare — and
import nothing from ``clients/``. An attack that cannot reconstruct an update raises an :class:`AttackError`
(:class:`NotApplicable` or :class:`BudgetExhausted`): the server records and counts it; any other exception is a
bug and stops the run. Each attack says how many images it reconstructs (:attr:`Attack.images`); scoring against
the truth happens in the server harness (``strategies.evaluator``). A new attack is one module plus one ``ATTACKS.register`` line below.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from attacker import dimitrov, dlg, gradinversion, grnn, ig, rgap
from attacker import options as attack_options
from attacker.options import AttackOptions
from attacker.payload import (SERVER_CONFIG, AttackError, AttackPayload, AttackResult, Budget, BudgetExhausted,
                              DefenseInfo, NotApplicable, ThreatModel, ThreatModelError, images_in_update,
                              update_to_gradient)
from fl_sim.task.config import TaskConfig, check_device_name
from fl_sim.task.keys import Key, merge, read
from fl_sim.task.registry import Registry


def batch_images(task: TaskConfig, num_examples: int) -> int:
    """Images reconstructed by an attack that inverts one batch: ``min(batch-size, num-examples)`` (what
    :attr:`AttackPayload.batch_size` gives it). The default of :attr:`Attack.images`."""
    return max(1, min(int(task.batch_size), int(num_examples)))


@dataclass(frozen=True)
class Attack:
    """A registered attack.

    Attributes:
        run: ``(payload, budget, options) -> AttackResult``.
        threat: what it needs beyond the global model and the update; the server gives it nothing else.
        summary: one line for ``fl-sim attacks`` and reports (paper and year).
        check: optional ``(model, task) -> None`` raising ``ValueError`` when the attack cannot run with this
            model and task (called before a run starts, so the error is a one-line ConfigError, not a crash).
        keys: run-config keys the attack owns besides the shared :data:`attacker.options.KEYS`.
        example: run keys of a small setting the attack applies to (the registry test runs every attack there,
            e.g. R-GAP on ``fcn3``).
        images: ``(task, num_examples) -> int``, how many images the attack reconstructs from an update of a
            client that reports ``num_examples`` under ``task``'s training protocol (default :func:`batch_images`).
            A run is refused before it starts unless this equals the images the update holds
            (:func:`attacker.payload.images_in_update`), so a reconstruction is always scored against a true set
            of its own size.
    """

    run: Callable[[AttackPayload, Budget, AttackOptions | None], AttackResult]
    threat: ThreatModel
    summary: str
    check: Callable[[nn.Module, TaskConfig], None] | None = None
    keys: Mapping[str, Key] = field(default_factory=dict)
    example: Mapping[str, Any] = field(default_factory=dict)
    images: Callable[[TaskConfig, int], int] = batch_images

    def threat_for(self, options: AttackOptions) -> ThreatModel:
        """The threat model of this attack with these options (denoising needs the defense's public parameters)."""
        return replace(self.threat, defense_params=True) if options.denoise != "none" else self.threat


#: Attack registry.
ATTACKS: Registry[Attack] = Registry("attack")
ATTACKS.register("dlg", Attack(dlg.dlg, SERVER_CONFIG,
                               "DLG (Zhu et al. 2019): joint image + soft-label L2 matching, L-BFGS"))
ATTACKS.register("idlg", Attack(dlg.idlg, SERVER_CONFIG,
                                "iDLG (Zhao et al. 2020): analytic label, then L2 matching, L-BFGS"))
ATTACKS.register("ig", Attack(ig.ig, SERVER_CONFIG,
                              "Inverting Gradients (Geiping et al. 2020): cosine + TV, signed Adam, box"))
ATTACKS.register("rgap", Attack(rgap.rgap, SERVER_CONFIG, "R-GAP (Zhu & Blaschko 2021): closed-form recursive "
                                                          "inversion, conv/FC nets without pooling", rgap.check,
                                example={"model": "fcn3"}))
ATTACKS.register("ig-fedavg", Attack(ig.ig_fedavg, SERVER_CONFIG, "Inverting Gradients on multi-step updates: "
                                                                  "unrolls the K local SGD steps the server set",
                                     ig.check_fedavg, example={"mode": "fedavg", "local-steps": 2},
                                     images=ig.unrolled_images))
ATTACKS.register("grnn", Attack(grnn.grnn, SERVER_CONFIG, "GRNN (Ren et al. 2022): a generator from noise emits "
                                                          "images and soft labels whose gradient matches",
                                example={"model": "lenet"}))
ATTACKS.register("dimitrov", Attack(dimitrov.dimitrov, SERVER_CONFIG, "Dimitrov et al. 2022 (TMLR): a whole "
                                    "multi-epoch FedAvg update, per-epoch images tied by an order-invariant prior",
                                    example={"mode": "fedavg", "local-epochs": 2, "batch-size": 2},
                                    images=dimitrov.update_images))
ATTACKS.register("gradinversion", Attack(gradinversion.gradinversion,
                                         ThreatModel(num_examples=True, local_hyperparams=True, bn_statistics=True),
                                         "GradInversion (Yin et al. 2021): L2 matching + BatchNorm-statistics, TV, "
                                         "l2 and group priors, Adam", example={"model": "resnet20", "batch-size": 2}))

#: The key that chooses the attack, and the keys of its :class:`Budget`.
ATTACK_KEY = {"attack": Key("idlg", "gradient-inversion attack the server runs", choices=lambda: list(ATTACKS))}
BUDGET_KEYS = {
    "attack-iterations": Key(0, "optimizer iterations per attack (0 = the attack's default)", low=0),
    "attack-restarts": Key(1, "random restarts per attack; the best objective is kept", low=1),
    "attack-time-limit": Key(120.0, "seconds per attack before it stops with its best result (0 = none)", low=0),
}
#: Where the attacks compute, when not where the rest of the run does (``device``).
ATTACK_DEVICE_KEY = {
    "attack-device": Key("", "where the attacks compute: empty = the device key; else auto, cpu, cuda or cuda:N "
                             "(R-GAP solves its float64 systems on the CPU whatever the device)"),
}


def attack_keys() -> dict[str, Key]:
    """``attack``, the budget keys, the shared option keys and every registered attack's own keys.

    Raises:
        ValueError: two attacks declare one key differently.
    """
    return merge(ATTACK_KEY, BUDGET_KEYS, ATTACK_DEVICE_KEY, attack_options.KEYS, *(a.keys for a in ATTACKS.values()))


def attack_device_from(cfg: Mapping[str, Any]) -> str:
    """The ``attack-device`` key of ``cfg`` (syntax checked; ``""`` = the ``device`` key), not yet resolved on a
    machine (:func:`fl_sim.task.config.resolve_device` does that where the attack runs).

    Raises:
        ConfigError: not empty, auto, cpu, cuda or cuda:N.
    """
    return check_device_name("attack-device", str(read(ATTACK_DEVICE_KEY, cfg)["attack-device"]), allow_empty=True)


def budget_from(cfg: Mapping[str, Any], seed: int) -> Budget:
    """The :class:`Budget` the ``attack-iterations/-restarts/-time-limit`` keys of ``cfg`` set, with ``seed``.

    Raises:
        ConfigError: a value its key does not allow.
    """
    v = read(BUDGET_KEYS, cfg)
    return Budget(iterations=int(v["attack-iterations"]), restarts=int(v["attack-restarts"]),
                  time_limit_s=float(v["attack-time-limit"]), seed=int(seed))


__all__ = ["ATTACKS", "ATTACK_DEVICE_KEY", "ATTACK_KEY", "Attack", "AttackError", "AttackOptions", "AttackPayload",
           "AttackResult", "BUDGET_KEYS", "Budget", "BudgetExhausted", "DefenseInfo", "NotApplicable", "ThreatModel",
           "ThreatModelError", "attack_device_from", "attack_keys", "batch_images", "budget_from", "images_in_update",
           "update_to_gradient"]
