"""The run config: the global key table assembled from the plug-ins' declarations, resolution and checks.

The same keys are Flower's run config (``[tool.flwr.app.config]`` in ``pyproject.toml``, ``flwr run
--run-config``, ``context.run_config``) and ``fl-sim run KEY=VALUE`` arguments. Nobody writes the table by hand:
:func:`key_table` merges what each layer declares — the task (:data:`fl_sim.task.config.TASK_KEYS`), the server
(:data:`strategies.config.SERVER_KEYS`), the clients (:data:`clients.config.CLIENT_KEYS`), every registered
defense and attack — and the roof's keys (:data:`RUN_KEYS`: the run directory, the simulation backend).
``fl-sim keys --toml`` prints the ``pyproject.toml`` block from it and a test checks the two agree.

A resolved config is a plain ``dict[str, bool | int | float | str]`` holding every key. Errors are
:class:`ConfigError` with a one-line message naming the key, the value and what is allowed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import tomli_w
import torch

from attacker import DefenseInfo, attack_keys, images_in_update
from clients.config import CLIENT_KEYS, ClientSpec
from clients.defenses import DEFENSES, defense_keys
from fl_sim.task.config import TASK_KEYS, load_plugins, resolve_device
from fl_sim.task.datasets import DATASETS, DataError, load_dataset
from fl_sim.task.keys import ConfigError, Key, Value, merge, unknown_key
from fl_sim.task.models import build_model
from fl_sim.task.partition import partitions
from strategies.config import SERVER_KEYS, ServerSpec

#: The roof's own keys: where a run writes its directory, and how ``fl-sim run`` simulates it.
RUN_KEYS: dict[str, Key] = {
    "out-dir": Key("runs", "folder that receives the run directory"),
    "run-name": Key("", "run directory name (empty = timestamp and settings)"),
    "sim-backend": Key("ray", "fl-sim run's simulation backend: ray (Flower's: one Ray actor per client-num-cpus "
                              "cores, clients in parallel) or inprocess (the clients one after another in the "
                              "driver's process: no Ray start-up; flwr run always uses Ray)",
                       choices=("inprocess", "ray")),
}


def key_table() -> dict[str, Key]:
    """Every run-config key, in the order ``fl-sim keys`` prints them: server, task, clients, run directory,
    defenses, attacks (plug-ins loaded so far included).

    Raises:
        ValueError: two declarations of one key differ.
    """
    return merge(SERVER_KEYS, TASK_KEYS, CLIENT_KEYS, RUN_KEYS, defense_keys(), attack_keys())


def defaults() -> dict[str, Value]:
    """Every key with its default value."""
    return {k: key.default for k, key in key_table().items()}


def coerce(name: str, value: Any) -> Value:
    """Check one value (already typed, as Flower's TOML parser gives it) and return it with the key's type.

    Raises:
        ConfigError: unknown key, wrong type, out of range or not among the choices.
    """
    table = key_table()
    if name not in table:
        raise unknown_key(name, table)
    return table[name].coerce(name, value)


def parse_value(name: str, text: str) -> Value:
    """Parse the text of ``KEY=VALUE`` for key ``name``.

    Raises:
        ConfigError: as :func:`coerce`.
    """
    table = key_table()
    if name not in table:
        raise unknown_key(name, table)
    return table[name].parse(name, text)


def parse_overrides(items: Iterable[str]) -> dict[str, Value]:
    """Parse ``["KEY=VALUE", ...]`` into a dict of checked values (``plugins`` is loaded first).

    Raises:
        ConfigError: an item without ``=``, an unknown key or a bad value.
    """
    pairs = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{item!r} is not KEY=VALUE; run 'fl-sim keys' for the list of keys")
        name, text = item.split("=", 1)
        pairs.append((name.strip(), text))
    for name, text in pairs:
        if name == "plugins":
            load_plugins(str(TASK_KEYS["plugins"].parse(name, text)))
    return {name: parse_value(name, text) for name, text in pairs}


@dataclass(frozen=True)
class RunSpecs:
    """The two sides' views of one resolved config."""

    client: ClientSpec
    server: ServerSpec


def specs(cfg: Mapping[str, Any]) -> RunSpecs:
    """Build (and so check) the client's and the server's views of ``cfg``; the server gets the defense's public
    parameters from the client side's declaration.

    Raises:
        ConfigError: the first problem found.
    """
    client = ClientSpec.from_config(cfg)
    for defense in DEFENSES.values():  # the keys of the defenses not chosen are checked too
        defense.configure(cfg)
    info = DefenseInfo(client.defense_name, client.params, tuple(client.defense.metrics),  # batches: its own sampling
                       own_batches=getattr(client.defense, "batches", None) is not None)
    return RunSpecs(client, ServerSpec.from_config(cfg, info))


def resolve(overrides: Mapping[str, Any] | None = None) -> dict[str, Value]:
    """Defaults updated with ``overrides``, every value checked, then every component's cross-key checks.

    Raises:
        ConfigError: the first problem found.
    """
    overrides = dict(overrides or {})
    if "plugins" in overrides:
        load_plugins(str(TASK_KEYS["plugins"].coerce("plugins", overrides["plugins"])))
    cfg = defaults()
    for name, value in overrides.items():
        cfg[name] = coerce(name, value)
    specs(cfg)
    return cfg


def check_attack_with_model(cfg: Mapping[str, Any], model: torch.nn.Module) -> None:
    """Check the attack's options and applicability against the model (its layer patterns must name parameters).

    Raises:
        ConfigError: a pattern that matches nothing, every layer left out, or an attack that cannot run here.
    """
    run = specs(cfg).server
    plan, task = run.attack, run.task
    for key, opts in (("attack-ignore-layers", replace(plan.options, layer_weights=())),
                      ("attack-layer-weights", replace(plan.options, ignore_layers=()))):
        try:
            opts.weights_for(model)
        except ValueError as exc:
            raise ConfigError(f"{key}={cfg.get(key)!r} is not allowed for model={task.model!r}: {exc}") from exc
    if plan.attack.check is not None:
        try:
            plan.attack.check(model, task)
        except ValueError as exc:
            raise ConfigError(f"attack={plan.name!r} is not allowed with model={task.model!r}: {exc}") from exc
    if not any(w > 0 for w in plan.options.weights_for(model).values()):
        raise ConfigError(f"attack-ignore-layers={cfg.get('attack-ignore-layers')!r} is not allowed: it leaves every "
                          f"layer of model={task.model!r} out of the matching loss")


def check_attack_images(cfg: Mapping[str, Any], partition_sizes: Mapping[int, int]) -> None:
    """Check that the attack reconstructs as many images as each attacked client's update holds.

    The server knows every client's ``num-examples`` before the run (B under ``fedsgd``, the partition size under
    ``fedavg``), so the images an update holds (:func:`attacker.payload.images_in_update`) and the images the attack
    reconstructs (:attr:`attacker.Attack.images`) are both known here. Scoring B′ reconstructions against a larger
    true set would let each pick its nearest of many images and flatter the attack, so such a run is refused.

    Args:
        cfg: a resolved config.
        partition_sizes: partition id → number of samples, for the partitions the victim may be (all of them for
            ``victim=random``; the caller may pass more).

    With ``attack-target=probe`` only the probe (one image, B = 1) is checked; with ``both`` the update is not
    refused (an update that holds another number of images is recorded unscored, with the reason, and not attacked).

    Raises:
        ConfigError: one line naming the attack, the mode and the image counts, for the first partition whose
            update holds another number of images than the attack reconstructs (or an undetermined number), or an
            attack that does not reconstruct one image from the probe.
    """
    run = specs(cfg).server
    plan, task, victim = run.attack, run.task, run.server.victim
    if run.server.attack_every == 0:
        return
    targets = run.server.targets
    if "probe" in targets:  # one FedSGD step on one image (B = 1), whatever the run's protocol
        probe_task = replace(task, mode="fedsgd", batch_size=1)
        if plan.attack.images(probe_task, 1) != 1:
            raise ConfigError(f"attack={plan.name!r} is not allowed with attack-target={run.server.attack_target!r}: "
                              f"the probe's update holds 1 image and {plan.name} reconstructs "
                              f"{plan.attack.images(probe_task, 1)}; use attack-target='update'")
    if "update" not in targets or "probe" in targets:
        # probe only: the update is not attacked; both: an update that holds another number of images than the
        # attack reconstructs is recorded unscored, with the reason (CuriousFedAvg.run_attack), and the probe attacked
        return
    tc = task.train_config()
    steps = f"local-steps={task.local_steps}" if task.local_steps else f"local-epochs={task.local_epochs}"
    setting = f"mode={task.mode!r}" + ("" if task.mode == "fedsgd" else f" ({steps}, batch-size={task.batch_size})")
    for pid, size in sorted(partition_sizes.items()):
        if victim != "random" and str(pid) != victim:
            continue
        n = tc.num_examples(size)
        try:
            holds = images_in_update(tc, n)
        except ValueError as exc:
            raise ConfigError(f"attack={plan.name!r} is not allowed with {setting}: partition {pid}: {exc}; choose "
                              "local-steps so that local-steps × batch-size <= the partition size") from exc
        wants = plan.attack.images(task, n)
        if wants != holds:
            raise ConfigError(
                f"attack={plan.name!r} is not allowed with {setting}: the update of partition {pid} holds {holds} "
                f"images and {plan.name} reconstructs {wants}; an attack must reconstruct as many images as the "
                "update holds (use mode=fedsgd, or an attack that unrolls the local steps, such as ig-fedavg)")


def check_model(cfg: Mapping[str, Any], input_shape: tuple[int, int, int], num_classes: int) -> torch.nn.Module:
    """Build the configured model for ``input_shape`` and run one zero input through it in eval mode (so that
    BatchNorm's running statistics stay as built), leaving it in train mode.

    Raises:
        ConfigError: the model cannot take these inputs.
    """
    try:
        model = build_model(str(cfg["model"]), input_shape, num_classes)
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape))
        model.train()
    except Exception as exc:  # a model that cannot take this input shape
        raise ConfigError(f"model={cfg['model']!r} does not accept {cfg['dataset']} inputs {input_shape}: "
                          f"{exc}") from exc
    return model


def check_feasible(cfg: Mapping[str, Any], machine: bool = True) -> None:
    """Checks that need the data, the model or the machine (run once before a simulation starts).

    Resolves the device keys (:func:`check_devices`), loads the dataset (cached), builds the partitions and the
    model, and (``machine``) looks for CUDA when GPUs are asked for — the ServerApp of a deployment leaves that to
    the SuperNodes' machines.

    Raises:
        ConfigError: CUDA asked for (``device``, ``attack-device``, ``client-num-gpus``) on a machine without it, a
            batch larger than some partition, an attack that would not reconstruct as many images as the attacked
            update holds (:func:`check_attack_images`), a model that does not fit the dataset, or data that cannot
            be loaded.
    """
    task = specs(cfg).server.task
    check_devices(cfg)
    try:
        ds = load_dataset(task.dataset, task.data_dir)
    except DataError as exc:
        raise ConfigError(f"dataset={task.dataset!r}: {exc}") from exc
    try:
        parts = partitions(ds.name, task.data_dir, task.num_supernodes, task.partition, task.dirichlet_alpha,
                           task.seed, task.partition_size)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    smallest = min(len(p) for p in parts)
    if task.batch_size > smallest:
        raise ConfigError(
            f"batch-size={task.batch_size} is not allowed; the smallest partition holds {smallest} samples "
            f"({task.num_supernodes} clients, partition={task.partition!r}), so batch-size must be <= {smallest}")
    check_attack_images(cfg, {i: len(p) for i, p in enumerate(parts)})
    check_attack_with_model(cfg, check_model(cfg, ds.input_shape, ds.num_classes))
    if machine and float(cfg["client-num-gpus"]) > 0 and not torch.cuda.is_available():
        raise ConfigError(f"client-num-gpus={cfg['client-num-gpus']} is not allowed on this machine: CUDA is not "
                          "available; use client-num-gpus=0")


def check_devices(cfg: Mapping[str, Any]) -> tuple[torch.device, torch.device]:
    """Resolve the ``device`` and ``attack-device`` keys on this machine (where the server, the audit or a
    simulation's clients run), and check them against ``client-num-gpus``.

    Returns:
        ``(device, attack device)``.

    Raises:
        ConfigError: CUDA asked for where there is none (or a GPU index this machine lacks), or a GPU share per
            client (``client-num-gpus > 0``) with ``device=cpu``.
    """
    run = specs(cfg).server
    device = run.task.torch_device()
    attack = resolve_device(run.attack.device, "attack-device") if run.attack.device else device
    gpus = float(cfg.get("client-num-gpus", 0.0))
    if gpus > 0 and run.task.device == "cpu":
        raise ConfigError(f"client-num-gpus={gpus:g} is not allowed with device='cpu': a GPU share per client needs "
                          "device=auto, cuda or cuda:N (or client-num-gpus=0)")
    return device, attack


def dataset_shape(name: str) -> tuple[tuple[int, int, int], int]:
    """``((C, H, W), num_classes)`` of a registered dataset, without loading it."""
    spec = DATASETS[name]
    return spec.input_shape, spec.num_classes


def pyproject_block(values: Mapping[str, Value] | None = None) -> str:
    """The ``[tool.flwr.app.config]`` TOML block with every key (defaults unless ``values`` are given)."""
    cfg = dict(values or defaults())
    return "[tool.flwr.app.config]\n" + tomli_w.dumps(cfg)
