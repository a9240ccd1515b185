"""The client side's run-config keys (resources, simulated dropout) and the client's view of a run config.

:class:`ClientSpec` is everything a ClientApp, the one-shot audit or a benchmark needs to train one client as the
run config says: the task, the client's resources, the defense and its parameter object.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from clients.defenses import DEFENSE_KEY, DEFENSES, Defense
from fl_sim.task.config import TaskConfig, load_plugins
from fl_sim.task.keys import Key, build, read

#: The client side's own keys.
CLIENT_KEYS: dict[str, Key] = {
    "client-num-cpus": Key(1.0, "CPU cores per simulated client (also caps its torch threads)", low=0,
                           low_open=True),
    "client-num-gpus": Key(0.0, "GPU fraction per simulated client (0 = CPU)", low=0),
    "client-dropout": Key(0.0, "probability that a sampled client drops out of a training round (it replies with "
                               "an error instead of training; seeded by seed, round and partition id)", low=0, high=1),
}


@dataclass(frozen=True)
class ClientConfig:
    """The client keys' values: ``num_cpus``, ``num_gpus`` (a GPU fraction), ``dropout`` (a probability)."""

    num_cpus: float
    num_gpus: float
    dropout: float


@dataclass(frozen=True)
class ClientSpec:
    """A client's view of a run config.

    Attributes:
        task: the task keys.
        client: the client keys.
        defense_name: the ``defense`` key.
        defense: its registry entry.
        params: its parameter object (:meth:`Defense.configure`).
    """

    task: TaskConfig
    client: ClientConfig
    defense_name: str
    defense: Defense
    params: Any

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> ClientSpec:
        """Read a run config: load its plug-ins, then check the task, client and defense keys.

        Raises:
            ConfigError: a bad value, an unknown defense or a defense that cannot run with this task.
        """
        task = TaskConfig.from_config(cfg)
        load_plugins(task.plugins)
        name = str(read(DEFENSE_KEY, cfg)["defense"])
        defense = DEFENSES[name]
        params = defense.configure(cfg)
        defense.validate(name, params, task)
        return cls(task, build(ClientConfig, CLIENT_KEYS, cfg, "client-"), name, defense, params)
