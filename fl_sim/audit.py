"""The one-shot privacy audit behind ``fl-sim attack``: one client, one update, one attack — no federation.

:func:`run_audit` runs round 1 of a one-client federation without Flower's runtime: the client is partition 0 of
``fl-sim run`` holding exactly the given images, trained by the one client pipeline
(:func:`clients.pipeline.client_update`, the same seeds as a run's client 0 in round 1 under the client secret
:data:`AUDIT_CLIENT_SECRET`), and its reply goes
through the one server side (:class:`strategies.strategy.CuriousFedAvg`): validation, the attack on the raw update
(cut to the attack's threat model), the evaluator's score, then aggregation and the defense's server step. So the
audit and a run hand the attacker the same payload for the same model, images, defense and seeds (a test compares
them bit for bit). The images come from a dataset (``--dataset --index``) or from any PNG/JPEG files
(:func:`load_images`), resized to the model's input with scikit-image.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, Message, Metadata, RecordDict
from skimage import color, io, transform

from attacker import AttackPayload
from clients import secrets as client_secrets
from clients.pipeline import client_update
from fl_sim.config import ConfigError, check_attack_images, check_attack_with_model, check_devices, check_model, specs
from fl_sim.results import atomic_write_text, finite, save_pair_figure
from fl_sim.task import contract
from fl_sim.task.contract import TrainConfig
from fl_sim.task.datasets import DATASETS, Dataset
from fl_sim.task.models import build_model
from strategies.evaluator import chance_reference
from strategies.strategy import CuriousFedAvg


def fedsgd_payload(model_name: str, x: torch.Tensor, y: torch.Tensor, mean: tuple[float, ...],
                   std: tuple[float, ...], num_classes: int = 10, lr: float = 0.1,
                   seed: int = 0) -> tuple[Any, torch.nn.Module, list[torch.Tensor]]:
    """The payload a curious server holds after one plain FedSGD step of a fresh model on ``(x, y)``.

    A lightweight reference construction (no defense, no Flower) for tests and benchmarks; :func:`run_audit` is the
    full client path.

    Args:
        model_name: registry name; the model is built after ``torch.manual_seed(seed)``.
        x: normalised ``float32 (B, C, H, W)`` images.
        y: ``int64 (B,)`` labels.
        mean, std: the dataset's public normalisation.
        num_classes: model outputs.
        lr: the client learning rate (the update is ``-lr · ∇``).
        seed: seed of the model's initialisation.

    Returns:
        ``(payload, model, grads)``: the :class:`~attacker.payload.AttackPayload`, the model at the global state,
        and the true gradients (detached, in ``model.parameters()`` order).
    """
    torch.manual_seed(seed)
    shape = tuple(x.shape[1:])
    model = build_model(model_name, shape, num_classes)
    grads = [g.detach() for g in torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))]
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    update = {n: -lr * g for (n, _), g in zip(model.named_parameters(), grads)}
    payload = AttackPayload(model_name, shape, num_classes, mean, std, state, update, len(x),
                            TrainConfig("fedsgd", lr, len(x)))
    return payload, model, grads


def load_images(paths: Sequence[str | Path], input_shape: tuple[int, int, int]) -> np.ndarray:
    """Read image files and resize them to ``input_shape`` ``(C, H, W)``.

    RGBA loses its alpha channel; colour becomes grey (``rgb2gray``) for one-channel inputs and grey is repeated for
    three-channel ones. Resizing uses ``skimage.transform.resize`` with anti-aliasing.

    Returns:
        ``uint8 (N, H, W, C)``, the dataset layout of :class:`fl_sim.task.datasets.Dataset`.

    Raises:
        ConfigError: a file that is missing or not an image.
    """
    c, h, w = input_shape
    out = []
    for path in paths:
        try:
            img = io.imread(str(path))
        except Exception as exc:  # skimage raises OSError, ValueError, ... for bad files
            raise ConfigError(f"--image={str(path)!r} cannot be read as an image: {exc}") from exc
        img = np.asarray(img)
        if img.ndim == 3 and img.shape[-1] == 4:
            img = img[..., :3]
        if img.ndim not in (2, 3):
            raise ConfigError(f"--image={str(path)!r} has shape {img.shape}; expected an H×W or H×W×3 image")
        img = img.astype(np.float64) / (255.0 if img.dtype == np.uint8 or img.max() > 1 else 1.0)
        if c == 1:
            img = color.rgb2gray(img) if img.ndim == 3 else img
            img = img[..., None]
        elif img.ndim == 2:
            img = np.repeat(img[..., None], c, axis=-1)
        img = transform.resize(img, (h, w, c), anti_aliasing=True)
        out.append((np.clip(img, 0, 1) * 255).round().astype(np.uint8))
    return np.stack(out)


def audit_dataset(name: str, images: np.ndarray, labels: np.ndarray) -> Dataset:
    """An in-memory :class:`Dataset` holding only ``images`` (``uint8 (N, H, W, C)``) as its training split, with
    the public shape, classes and normalisation of the dataset ``name``."""
    spec = DATASETS[name]
    empty = np.zeros((0, *images.shape[1:]), np.uint8)
    return Dataset(name, images, np.asarray(labels, np.int64), empty, np.zeros(0, np.int64), spec.num_classes,
                   spec.mean, spec.std, source="fl-sim attack")


class AuditRecorder:
    """The audit's recorder: the strategy's round record is kept in memory, the figure goes to ``out_dir``."""

    def __init__(self, out_dir: Path | None):
        self.out_dir = out_dir
        self.rounds: list[dict[str, Any]] = []

    def log_round(self, record: dict[str, Any]) -> None:
        self.rounds.append(dict(record))

    def save_attack_figure(self, server_round: int, truth: np.ndarray, reconstruction: np.ndarray, title: str,
                           labels: list[int] | None = None, true_labels: list[int] | None = None) -> str:
        if self.out_dir is None:
            return ""
        save_pair_figure(self.out_dir / "reconstruction.png", truth, reconstruction, title, labels, true_labels)
        return "reconstruction.png"


#: The node id of the audit's one client (any id: there is no Grid).
AUDIT_NODE = 1
#: The run-level client secret of the audit's client: fixed, so an audit is reproducible (the audited client is the
#: user's own; the attacker never gets a seed). Its draws equal client 0's in ``fl-sim run --client-secret 0``.
AUDIT_CLIENT_SECRET = 0


def channel_mean_image(name: str) -> np.ndarray:
    """The chance-level image when no training split is at hand: the dataset ``name``'s public per-channel
    normalisation mean, as a constant ``float32 (C, H, W)`` image in [0, 1]."""
    spec = DATASETS[name]
    return np.broadcast_to(np.asarray(spec.mean, np.float32)[:, None, None], spec.input_shape).copy()


#: ``chance_reference`` in ``attack.json``: which image the chance levels were computed with.
CHANCE_MEAN_IMAGE, CHANCE_CHANNEL_MEAN = "training-split mean image", "per-channel normalisation mean"


def audit_round(cfg: Mapping[str, Any], data: Dataset, out_dir: Path | None = None,
                reference: Dataset | None = None) -> tuple[CuriousFedAvg, Message, ArrayRecord | None]:
    """Round 1 of a one-client federation on ``data`` (see the module docstring), attacked.

    Args:
        cfg: a resolved run config.
        data: the client's data (its training split is the client's partition).
        out_dir: where the reconstruction figure goes (none when ``None``).
        reference: the dataset whose training split's mean image is the chance level (e.g. the full dataset the
            audited samples come from); ``None`` = :func:`channel_mean_image` (``data``'s own mean would be the mean
            of the audited images, which carries information about them).

    Returns:
        ``(strategy, reply, aggregate)``: the strategy after the round (its ``last_record`` holds the attack), the
        client's reply as the server received it, and the aggregated (and server-stepped) global model.

    The client trains on the ``device`` key's device; the server side evaluates and attacks where ``device`` and
    ``attack-device`` say (on the CPU, the payload is the same bit for bit as a run's).

    Raises:
        ConfigError: a model that does not take these inputs, layer patterns that match nothing, an attack that
            cannot run on this model, one that would not reconstruct as many images as the update holds, or CUDA
            asked for where there is none.
    """
    run = specs(cfg)
    task = run.server.task
    device, _ = check_devices(cfg)  # the client trains there; the strategy evaluates and attacks where cfg says
    torch.manual_seed(task.seed)
    model = check_model(cfg, data.input_shape, data.num_classes)
    check_attack_with_model(cfg, model)
    check_attack_images({**cfg, "attack-every": 1, "victim": "0", "attack-target": "update"}, {0: len(data.y_train)})
    # the audit's update is already the client's own one (no federation, no Grid for a query.probe message)
    server = replace(run.server, server=replace(run.server.server, attack_every=1, victim="0", attack_target="update"))
    strategy = CuriousFedAvg(server, data, AuditRecorder(out_dir))
    strategy.chance_image = channel_mean_image(data.name) if reference is None else chance_reference(reference)
    arrays = ArrayRecord({k: v.detach().clone() for k, v in model.state_dict().items()})
    record = strategy.new_record(1)
    train_config = task.train_config(record["lr"], 1)
    strategy.begin_round(1, arrays, train_config, {AUDIT_NODE: 0})
    secret = client_secrets.node_secret(AUDIT_CLIENT_SECRET, 0)
    update = client_update(run.client, arrays.to_torch_state_dict(), data, np.arange(len(data.y_train)),
                           train_config, RecordDict(), client_secrets.once_seed(secret, task.seed),
                           client_secrets.round_seed(secret, task.seed, 1), device)
    content = contract.train_reply(update.state, update.metrics, 0, update.sample_indices)
    md = Metadata(run_id=0, message_id=uuid.uuid4().hex, src_node_id=AUDIT_NODE, dst_node_id=0,
                  reply_to_message_id=uuid.uuid4().hex, group_id="1", created_at=time.time(), ttl=3600,
                  message_type="train")
    reply = Message(content=content, metadata=md)
    aggregate, _ = strategy.aggregate_train(1, [reply])
    return strategy, reply, aggregate


def run_audit(cfg: Mapping[str, Any], data: Dataset, out_dir: Path | None = None,
              reference: Dataset | None = None) -> dict[str, Any]:
    """Attack the update one client would send after training on the images of ``data``'s training split.

    Args:
        cfg: a resolved run config (``model``, ``defense``, ``attack``, ``mode``, ``lr``, ``batch-size``,
            ``local-steps``, ``local-epochs``, ``seed``, the ``attack-*`` and ``defense-*`` keys).
        data: the client's data (:func:`audit_dataset`, or a real dataset restricted to the chosen indices).
        out_dir: where to write ``attack.json`` and ``reconstruction.png`` (nothing is written when ``None``).
        reference: the dataset whose training-split mean image gives the chance levels (see :func:`audit_round`).

    Returns:
        The ``attack.json`` content: ``psnr`` (dB), ``ssim``, ``mse``, their chance levels ``psnr_chance``,
        ``ssim_chance``, ``mse_chance`` and ``chance_reference`` (the image they were computed with:
        :data:`CHANCE_MEAN_IMAGE` or :data:`CHANCE_CHANNEL_MEAN`), ``label_accuracy``, ``time_s``, ``iterations``,
        ``objective``, the recovered and true labels, the settings and the attack's extras.

    Raises:
        ConfigError: as :func:`audit_round`, or an attack that fails on this update (a declared
            :class:`attacker.AttackError`).
    """
    check_devices(cfg)  # before anything is written
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    strategy, reply, _ = audit_round(cfg, data, out_dir, reference)
    attack = strategy.last_record["attacks"][0]
    if "error" in attack:
        raise ConfigError(f"attack={cfg['attack']!r} cannot run on model={cfg['model']!r} with this update: "
                          f"{attack['error']}")
    metrics = contract.reply_metrics(reply)
    known = {"round", "client", "attack", "time_s", "iterations", "objective", "psnr", "ssim", "mse",
             "psnr_chance", "ssim_chance", "mse_chance", "label_accuracy", "labels", "true_labels", "image",
             "num_images"}
    record: dict[str, Any] = {
        "psnr": attack["psnr"], "ssim": attack["ssim"], "mse": attack["mse"],
        "psnr_chance": attack["psnr_chance"], "ssim_chance": attack["ssim_chance"],
        "mse_chance": attack["mse_chance"],
        "chance_reference": CHANCE_CHANNEL_MEAN if reference is None else CHANCE_MEAN_IMAGE,
        "label_accuracy": attack.get("label_accuracy"), "time_s": attack["time_s"],
        "iterations": attack["iterations"], "objective": attack["objective"], "labels": attack["labels"],
        "true_labels": attack["true_labels"], "attack": str(cfg["attack"]), "model": str(cfg["model"]),
        "defense": str(cfg["defense"]), "dataset": data.name, "input_shape": list(data.input_shape),
        "num_images": attack["num_images"], "train_loss": metrics[contract.TRAIN_LOSS],
        "defense_time_s": metrics[contract.DEFENSE_TIME],
        "extras": {k: v for k, v in attack.items() if k not in known},
        "settings": {k: cfg[k] for k in cfg if k.startswith(("attack", "defense")) or k in (
            "mode", "lr", "batch-size", "local-steps", "local-epochs", "seed", "device")},
    }
    if out_dir is not None:
        atomic_write_text(out_dir / "attack.json", json.dumps(finite(record), indent=2))
    return record
