"""The task's run-config keys: federation size, data, model and the local-training protocol.

These keys are shared by every side (the ClientApp reads them to train, the server to send the train config and
to evaluate, the attacker's payload to know the architecture), so they live at the bottom layer.
:class:`TaskConfig` is their parameter object.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fl_sim.task.contract import MODES, TrainConfig
from fl_sim.task.datasets import DATASETS
from fl_sim.task.keys import ConfigError, Key, build
from fl_sim.task.models import MODELS
from fl_sim.task.partition import PARTITIONERS

#: The task's keys, in the order ``fl-sim keys`` prints them.
TASK_KEYS: dict[str, Key] = {
    "num-supernodes": Key(10, "number of clients (simulated SuperNodes, or SuperNodes expected in deployment)", low=1),
    "seed": Key(0, "seed for model init, partitions, client sampling and attacks"),
    "plugins": Key("", "comma-separated Python modules imported on every process before the config is checked; "
                       "each may register models, datasets, defenses, server steps or attacks"),
    "dataset": Key("fashion-mnist", "dataset", choices=lambda: list(DATASETS)),
    "data-dir": Key("", "folder with the full dataset files (empty: the embedded Fashion-MNIST subset, "
                        "~/.cache/fl-sim/data for the others)"),
    "partition": Key("iid", "how the training split is divided among clients", choices=lambda: list(PARTITIONERS)),
    "dirichlet-alpha": Key(0.5, "concentration of the Dirichlet label skew (partition=dirichlet)", low=0,
                           low_open=True),
    "model": Key("lenet-tanh", "model architecture", choices=lambda: list(MODELS)),
    "mode": Key("fedsgd", "local training: fedsgd = one gradient on one batch, fedavg = several SGD steps",
                choices=MODES),
    "batch-size": Key(1, "local batch size B", low=1),
    "lr": Key(0.15, "client SGD learning rate (round 1 value under lr-schedule)", low=0, low_open=True),
    "local-epochs": Key(1, "fedavg: local epochs E (when local-steps = 0)", low=1),
    "local-steps": Key(0, "fedavg: local SGD steps K (0 = use local-epochs)", low=0),
    "send-buffers": Key(True, "clients send their BatchNorm buffers (running mean/var, batch count) with the update, "
                              "as plain FedAvg does (they reveal the local batches' statistics); false keeps them "
                              "on the client, as FedBN does"),
    "audit": Key(True, "clients report the indices of the samples they trained on in an audit-only record "
                       "that only the evaluator reads (needed to score attacks)"),
}


@dataclass(frozen=True)
class TaskConfig:
    """The task keys' values (:data:`TASK_KEYS`), checked."""

    num_supernodes: int
    seed: int
    plugins: str
    dataset: str
    data_dir: str
    partition: str
    dirichlet_alpha: float
    model: str
    mode: str
    batch_size: int
    lr: float
    local_epochs: int
    local_steps: int
    send_buffers: bool
    audit: bool

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> TaskConfig:
        """Read the task keys of a run config (missing keys take their defaults).

        Raises:
            ConfigError: a value its key does not allow.
        """
        return build(cls, TASK_KEYS, cfg)

    def train_config(self, lr: float | None = None, server_round: int = 0) -> TrainConfig:
        """The train config the server sends (``lr`` replaced by this round's scheduled value when given)."""
        return TrainConfig(self.mode, float(self.lr if lr is None else lr), self.batch_size, self.local_steps,
                           self.local_epochs, server_round)


def load_plugins(spec: str) -> list[str]:
    """Import every module named in ``spec`` (comma-separated; the ``plugins`` key) and return their names.

    Plug-in modules register themselves (``DEFENSES.register(...)`` and the like) when imported; every process
    (ServerApp, each ClientApp, the CLI) imports them before reading the rest of the config.

    Raises:
        ConfigError: a module that cannot be imported.
    """
    names = [n.strip() for n in str(spec).split(",") if n.strip()]
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"plugins={spec!r} is not allowed: module {name!r} cannot be imported ({exc})") from exc
    return names
