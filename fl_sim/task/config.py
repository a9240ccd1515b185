"""The task's run-config keys: federation size, data, model and the local-training protocol.

These keys are shared by every side (the ClientApp reads them to train, the server to send the train config and
to evaluate, the attacker's payload to know the architecture), so they live at the bottom layer.
:class:`TaskConfig` is their parameter object.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

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
    "partition-size": Key(0, "samples each client keeps of its partition (a random subset; 0 = all of it)", low=0),
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
    "device": Key("auto", "where client training, central evaluation and the attacks compute: auto (CUDA when "
                          "present, else CPU), cpu, cuda or cuda:N (attacks: attack-device; clients with "
                          "client-num-gpus > 0 use the GPU Ray gives them)"),
}

#: The values a device key accepts: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


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
    partition_size: int
    model: str
    mode: str
    batch_size: int
    lr: float
    local_epochs: int
    local_steps: int
    send_buffers: bool
    audit: bool
    device: str = "auto"

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> TaskConfig:
        """Read the task keys of a run config (missing keys take their defaults).

        Raises:
            ConfigError: a value its key does not allow (``device`` not one of auto, cpu, cuda, cuda:N).
        """
        task = build(cls, TASK_KEYS, cfg)
        check_device_name("device", task.device)
        return task

    def torch_device(self) -> torch.device:
        """The ``device`` key resolved on this process's machine (:func:`resolve_device`).

        Raises:
            ConfigError: CUDA asked for where there is none (or not that many GPUs).
        """
        return resolve_device(self.device, "device")

    def train_config(self, lr: float | None = None, server_round: int = 0) -> TrainConfig:
        """The train config the server sends (``lr`` replaced by this round's scheduled value when given)."""
        return TrainConfig(self.mode, float(self.lr if lr is None else lr), self.batch_size, self.local_steps,
                           self.local_epochs, server_round)


def check_device_name(key: str, value: str, allow_empty: bool = False) -> str:
    """Check the syntax of a device key's value (``auto``, ``cpu``, ``cuda``, ``cuda:N``; ``""`` when allowed).

    Nothing about the machine is checked here (a config may be written on one machine and run on another);
    :func:`resolve_device` does that where the device is used.

    Raises:
        ConfigError: any other value, in one line naming ``key``.
    """
    if (allow_empty and value == "") or DEVICE_PATTERN.fullmatch(str(value)):
        return str(value)
    extra = ", or empty (= the device key)" if allow_empty else ""
    raise ConfigError(f"{key}={value!r} is not allowed; {key} must be auto, cpu, cuda or cuda:N{extra}")


def resolve_device(value: str, key: str = "device") -> torch.device:
    """The ``torch.device`` a device key names, on the machine of the calling process.

    ``auto`` is ``cuda:I`` (``I`` = ``torch.cuda.current_device()``, 0 unless set) when CUDA is available, else
    ``cpu``; ``cuda`` is the current CUDA device; ``cuda:N`` is GPU ``N`` as this process numbers them (inside a Ray
    actor given a GPU share, ``CUDA_VISIBLE_DEVICES`` leaves it one GPU, numbered 0).

    Raises:
        ConfigError: a bad value, CUDA asked for where ``torch.cuda.is_available()`` is false, or an index beyond
            ``torch.cuda.device_count()``; the message is one line naming ``key``.
    """
    value = check_device_name(key, value)
    if value == "cpu" or (value == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"{key}={value!r} is not allowed on this machine: CUDA is not available; "
                          f"{key} must be auto or cpu here")
    if value in ("auto", "cuda"):
        return torch.device("cuda", torch.cuda.current_device())
    index, count = int(value.split(":")[1]), torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"{key}={value!r} is not allowed on this machine: it has {count} CUDA device(s), "
                          f"so {key} must be cuda:0..cuda:{count - 1}, cuda, auto or cpu")
    return torch.device("cuda", index)


def device_label(device: torch.device) -> str:
    """``"cpu"`` or ``"cuda:0 (NVIDIA H200)"``: a device with the GPU's name, for provenance and logs."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(device)


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
