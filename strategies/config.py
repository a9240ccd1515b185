"""The server side's run-config keys (rounds, sampling, timeouts, the attack schedule) and its view of a config.

:class:`ServerSpec` is what the strategy needs: the server keys (:class:`ServerConfig`), the task, the attack plan
(:class:`AttackPlan`: the attack, its options and budget) and the public side of the clients' defense
(:class:`~attacker.payload.DefenseInfo`) with its server step, if any. The defense's parameter object is built by
the caller (the roof) and handed in: the server never imports client code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from attacker import (ATTACK_KEY, ATTACKS, Attack, AttackOptions, Budget, DefenseInfo, attack_device_from,
                      budget_from)
from fl_sim.task.config import TaskConfig
from fl_sim.task.keys import ConfigError, Key, build, read
from strategies.steps import SERVER_STEPS, ServerStep

#: The ``victim`` value that attacks the round's aggregate instead of one client's update.
AGGREGATE = "aggregate"
#: The values of ``attack-target``: what an attack round attacks (``both`` = ``update`` then ``probe``).
TARGETS = ("update", "probe", "both")

#: The server side's own keys.
SERVER_KEYS: dict[str, Key] = {
    "num-server-rounds": Key(300, "number of FL rounds", low=1),
    "fraction-train": Key(1.0, "fraction of connected clients sampled for training each round", low=0, low_open=True,
                          high=1),
    "fraction-evaluate": Key(0.0, "fraction of clients sampled for federated evaluation each round (0 = off)", low=0,
                             high=1),
    "round-timeout": Key(300.0, "seconds the server waits for the replies of one round", low=0, low_open=True),
    "node-timeout": Key(120.0, "seconds the server waits for num-supernodes clients to connect", low=0,
                        low_open=True),
    "min-replies": Key(1, "fewest usable train replies that update the global model; a round with fewer keeps the "
                          "previous model and is logged as skipped", low=1),
    "eval-every": Key(1, "central test-set evaluation every N rounds (the last round is always evaluated)", low=1),
    "lr-schedule": Key("cosine", "learning rate over rounds, sent by the server each round",
                       choices=("constant", "cosine")),
    "attack-every": Key(25, "attack the victim's update every N rounds, from round 1 (0 = never)", low=0),
    "victim": Key("0", "partition id of the attacked client, 'random', or 'aggregate' (the round's FedAvg aggregate: "
                       "all a server sees under secure aggregation, scored against the union of the round's batches)",
                  also_int=True),
    "attack-target": Key("update", "what an attack round attacks: update = the victim's intercepted update; probe = "
                                   "an audit of the worst case: the victim's defended FedSGD gradient of one of its "
                                   "training images (B = 1) at the global model, asked for with a query.probe "
                                   "message and never used for training; both = the two, recorded side by side",
                         choices=TARGETS),
}


@dataclass(frozen=True)
class ServerConfig:
    """The server keys' values (:data:`SERVER_KEYS`)."""

    num_server_rounds: int
    fraction_train: float
    fraction_evaluate: float
    round_timeout: float
    node_timeout: float
    min_replies: int
    eval_every: int
    lr_schedule: str
    attack_every: int
    victim: str
    attack_target: str = "update"

    @property
    def targets(self) -> tuple[str, ...]:
        """The targets an attack round attacks, in order: ``("update",)``, ``("probe",)`` or both."""
        return ("update", "probe") if self.attack_target == "both" else (self.attack_target,)

    def lr_at(self, lr: float, server_round: int) -> float:
        """The client learning rate the server sends in ``server_round`` (1-based).

        ``constant``: ``lr``. ``cosine``: ``lr · ½(1 + cos(π (r − 1) / R))`` with R = ``num-server-rounds``.
        """
        if self.lr_schedule == "cosine":
            return lr * 0.5 * (1.0 + math.cos(math.pi * (server_round - 1) / self.num_server_rounds))
        return lr

    def attacks_in(self, server_round: int) -> bool:
        """Whether the victim's update of ``server_round`` is attacked (every ``attack-every`` rounds from 1)."""
        return self.attack_every > 0 and (server_round - 1) % self.attack_every == 0


@dataclass(frozen=True)
class AttackPlan:
    """The attack the server runs: its registry name and entry, its options, the budget keys' values, and the
    ``attack-device`` key (``""`` = where the rest of the run computes, the ``device`` key)."""

    name: str
    attack: Attack
    options: AttackOptions
    budget: Budget
    device: str = ""

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> AttackPlan:
        """Read the ``attack`` and ``attack-*`` keys.

        Raises:
            ConfigError: a bad value.
        """
        name = str(read(ATTACK_KEY, cfg)["attack"])
        return cls(name, ATTACKS[name], AttackOptions.from_config(cfg), budget_from(cfg, 0), attack_device_from(cfg))

    def budget_for(self, seed: int, server_round: int, device: str | torch.device = "cpu") -> Budget:
        """This plan's budget with the seed of ``server_round``'s attack (public: from the run's seed), computing on
        ``device`` (resolved by the caller on its machine)."""
        b = self.budget
        return Budget(b.iterations, b.restarts, b.time_limit_s, seed=int(seed) * 100_003 + server_round,
                      device=device)


@dataclass(frozen=True)
class ServerSpec:
    """The server's view of a run config (see the module docstring)."""

    server: ServerConfig
    task: TaskConfig
    attack: AttackPlan
    defense: DefenseInfo
    step: ServerStep | None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], defense: DefenseInfo) -> ServerSpec:
        """Read the server, task and attack keys; ``defense`` is the clients' defense as the run config states it.

        Raises:
            ConfigError: a bad value or a combination :func:`check` refuses.
        """
        spec = cls(build(ServerConfig, SERVER_KEYS, cfg), TaskConfig.from_config(cfg), AttackPlan.from_config(cfg),
                   defense, SERVER_STEPS.get(defense.name))
        check(spec.server, spec.task)
        return spec


def sampled_per_round(server: ServerConfig, task: TaskConfig) -> int:
    """Clients sampled for training each round: ``max(1, ⌊num-supernodes · fraction-train⌋)``."""
    return max(1, int(task.num_supernodes * server.fraction_train))


def check(server: ServerConfig, task: TaskConfig) -> None:
    """Checks of the server keys against the federation's size and the task.

    Raises:
        ConfigError: ``min-replies`` above the clients sampled per round, a victim that is neither ``random``,
            ``aggregate`` nor a partition id in ``[0, num-supernodes)``, ``attack-target`` probe/both with
            ``audit=false`` (the probe's image is taken from the victim's audit record), or with
            ``victim=aggregate`` (a probe asks one client).
    """
    n = task.num_supernodes
    sampled = sampled_per_round(server, task)
    if server.min_replies > sampled:
        raise ConfigError(
            f"min-replies={server.min_replies} is not allowed; only {sampled} clients are sampled per round "
            f"(num-supernodes={n}, fraction-train={server.fraction_train}), so min-replies must be <= {sampled}")
    victim = server.victim
    if victim not in ("random", AGGREGATE) and not (victim.isdigit() and int(victim) < n):
        raise ConfigError(f"victim={victim!r} is not allowed; victim must be 'random', '{AGGREGATE}' or a partition "
                          f"id in 0..{n - 1} (num-supernodes={n})")
    if "probe" in server.targets and not task.audit:
        raise ConfigError(f"attack-target={server.attack_target!r} is not allowed with audit=false: the probe's image "
                          "is one the victim names in its audit record; set audit=true or attack-target='update'")
    if "probe" in server.targets and victim == AGGREGATE:
        raise ConfigError(f"attack-target={server.attack_target!r} is not allowed with victim='{AGGREGATE}': a probe "
                          "asks one client for its gradient; set attack-target='update' or name a victim")
