"""The one-shot privacy audit behind ``fl-sim attack``: one client, one update, one attack — no federation.

:func:`run_audit` computes the update a client would send for given images — the same local training
(:func:`clients.training.local_train`) and client defense (``DEFENSES``) as inside ``fl-sim run``, plus the
defense's server-side step when it has one (``SERVER_STEPS``, applied to the one-client aggregate, as if the
server attacked what it aggregates) — builds the :class:`~attacker.payload.AttackPayload` a curious server would
hold, runs the attack and scores it with the evaluator. The images come from a dataset (``--dataset --index``) or
from any PNG/JPEG files (:func:`load_images`), resized to the model's input with scikit-image.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fl_sim.config import ConfigError, check_attack_options
from fl_sim.data import DATASET_SHAPES, DATASET_STATS, Dataset


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
    import torch.nn.functional as F

    from attacker.payload import AttackPayload
    from fl_sim.models import build_model

    torch.manual_seed(seed)
    shape = tuple(x.shape[1:])
    model = build_model(model_name, shape, num_classes)
    grads = [g.detach() for g in torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))]
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    update = {n: -lr * g for (n, _), g in zip(model.named_parameters(), grads)}
    payload = AttackPayload(model_name, shape, num_classes, mean, std, state, update, len(x),
                            {"mode": "fedsgd", "lr": lr, "batch-size": len(x)})
    return payload, model, grads


def load_images(paths: Sequence[str | Path], input_shape: tuple[int, int, int]) -> np.ndarray:
    """Read image files and resize them to ``input_shape`` ``(C, H, W)``.

    RGBA loses its alpha channel; colour becomes grey (``rgb2gray``) for one-channel inputs and grey is repeated for
    three-channel ones. Resizing uses ``skimage.transform.resize`` with anti-aliasing.

    Returns:
        ``uint8 (N, H, W, C)``, the dataset layout of :class:`fl_sim.data.Dataset`.

    Raises:
        ConfigError: a file that is missing or not an image.
    """
    from skimage import color, io, transform

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
    (_, classes) = DATASET_SHAPES[name]
    mean, std = DATASET_STATS[name]
    empty = np.zeros((0, *images.shape[1:]), np.uint8)
    return Dataset(name, images, np.asarray(labels, np.int64), empty, np.zeros(0, np.int64), classes, mean, std,
                   source="fl-sim attack")


def _server_message(state: dict[str, torch.Tensor], num_examples: int) -> Any:
    from flwr.app import ArrayRecord, Message, Metadata, MetricRecord, RecordDict

    md = Metadata(run_id=0, message_id=uuid.uuid4().hex, src_node_id=1, dst_node_id=0,
                  reply_to_message_id=uuid.uuid4().hex, group_id="1", created_at=time.time(), ttl=3600,
                  message_type="train")
    content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord({"num-examples": num_examples})})
    return Message(content=content, metadata=md)


def run_audit(cfg: Mapping[str, Any], data: Dataset, out_dir: Path | None = None,
              server_step: bool = True) -> dict[str, Any]:
    """Attack the update one client would send after training on every image of ``data``'s training split.

    Args:
        cfg: a resolved run config (``model``, ``defense``, ``attack``, ``mode``, ``lr``, ``batch-size``,
            ``local-steps``, ``local-epochs``, ``seed``, the ``attack-*`` and ``defense-*`` keys).
        data: the client's data (:func:`audit_dataset`, or a real dataset restricted to the chosen indices).
        out_dir: where to write ``attack.json`` and ``reconstruction.png`` (nothing is written when ``None``).
        server_step: apply the defense's server-side step, when it has one.

    Returns:
        The ``attack.json`` content: ``psnr`` (dB), ``ssim``, ``mse``, ``label_accuracy``, ``time_s``,
        ``iterations``, ``objective``, the recovered and true labels, the settings and the attack's extras.

    Raises:
        ConfigError: a model that does not take these inputs, layer patterns that match nothing, or an attack that
            cannot run on this model or update (e.g. ``rgap`` on a ReLU network).
    """
    from attacker import ATTACKS, AttackOptions, AttackPayload, Budget
    from clients.defenses import DEFENSES
    from clients.training import local_train
    from fl_sim.evaluator import score_reconstruction
    from fl_sim.models import build_model
    from fl_sim.results import save_pair_figure
    from strategies.compensation import SERVER_STEPS

    torch.manual_seed(int(cfg["seed"]))
    try:
        model = build_model(str(cfg["model"]), data.input_shape, data.num_classes)
        with torch.no_grad():
            model(torch.zeros(1, *data.input_shape))
    except Exception as exc:
        raise ConfigError(f"model={cfg['model']!r} does not accept inputs {data.input_shape}: {exc}") from exc
    check_attack_options(cfg, model)
    device = torch.device("cpu")
    sent = {k: v.detach().clone() for k, v in model.state_dict().items()}
    train_cfg = {"mode": str(cfg["mode"]), "lr": float(cfg["lr"]), "batch-size": int(cfg["batch-size"]),
                 "local-steps": int(cfg["local-steps"]), "local-epochs": int(cfg["local-epochs"]), "server-round": 1}
    defense = DEFENSES[str(cfg["defense"])]
    from flwr.app import RecordDict

    state = RecordDict()
    if defense.on_model is not None:
        defense.on_model(model, state, cfg)
    part = np.arange(len(data.y_train))
    res = local_train(model, data, part, train_cfg, cfg, defense, state, int(cfg["seed"]), device)
    returned = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if defense.on_reply is not None:
        returned = defense.on_reply(returned, state, cfg)
    step = SERVER_STEPS.get(str(cfg["defense"])) if server_step else None
    if step is not None:
        from flwr.app import ArrayRecord

        reply = _server_message(returned, res.num_examples)
        returned = step(ArrayRecord(returned), [reply], {"state": sent, "config": train_cfg}, cfg).to_torch_state_dict()
    update = {k: returned[k].float() - sent[k].float() for k in sent if k in returned}
    payload = AttackPayload(str(cfg["model"]), data.input_shape, data.num_classes, data.mean, data.std, sent, update,
                            res.num_examples, dict(train_cfg), round=1, client="audit")
    budget = Budget(iterations=int(cfg["attack-iterations"]), restarts=int(cfg["attack-restarts"]),
                    time_limit_s=float(cfg["attack-time-limit"]), seed=int(cfg["seed"]))
    try:
        result = ATTACKS[str(cfg["attack"])].run(payload, budget, AttackOptions.from_config(cfg))
    except (ValueError, TimeoutError) as exc:
        raise ConfigError(f"attack={cfg['attack']!r} cannot run on model={cfg['model']!r} with this update: "
                          f"{exc}") from exc
    scores = score_reconstruction(data, result, {"sample-indices": res.sample_indices})
    truth, rec = scores.pop("truth"), scores.pop("reconstruction")
    record: dict[str, Any] = {
        "psnr": scores["psnr"], "ssim": scores["ssim"], "mse": scores["mse"],
        "label_accuracy": scores.get("label_accuracy"), "time_s": result.time_s, "iterations": result.iterations,
        "objective": result.objective, "labels": scores["labels"], "true_labels": scores["true_labels"],
        "attack": str(cfg["attack"]), "model": str(cfg["model"]), "defense": str(cfg["defense"]),
        "dataset": data.name, "input_shape": list(data.input_shape), "num_images": int(len(truth)),
        "server_step": step is not None, "train_loss": res.loss, "defense_time_s": res.defense_time_s,
        "extras": dict(result.extras),
        "settings": {k: cfg[k] for k in cfg if k.startswith(("attack", "defense")) or k in (
            "mode", "lr", "batch-size", "local-steps", "local-epochs", "seed")},
    }
    if out_dir is not None:
        from fl_sim.results import _finite, atomic_write_text

        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "attack.json", json.dumps(_finite(record), indent=2))
        title = (f"{record['attack']} on {record['model']} ({record['defense']}): PSNR {record['psnr']:.1f} dB, "
                 f"SSIM {record['ssim']:.3f}")
        save_pair_figure(out_dir / "reconstruction.png", truth, rec, title, scores["labels"], scores["true_labels"])
    return record
