"""The one client pipeline: global arrays in, the defended reply out.

:func:`prepare_model` builds the model the server named, loads the global arrays and lets the defense put its
secrets in place (``on_model``); :func:`client_update` then trains it with the defense on every local step
(:func:`clients.training.local_train`), lets the defense touch what leaves (``on_reply``) and collects the metrics
the reply carries. The ClientApp, the one-shot audit and the benchmarks all call these functions; none of them
holds a second copy of the train config or of the local-steps rule (:class:`fl_sim.task.contract.TrainConfig`).

``send-buffers=false`` keeps the BatchNorm buffers on the client, as FedBN does (Li et al., ICLR 2021; only the
buffers here, the BatchNorm affine parameters still travel): the reply carries the global buffers unchanged, the
client's own buffers after training stay in its ``Context.state`` (:data:`LOCAL_BUFFERS`) and replace the global
ones when the next round's (or an evaluation's) model is prepared.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict
from torch import nn

from clients.config import ClientSpec
from clients.training import local_train
from fl_sim.task.contract import DEFENSE_TIME, NUM_EXAMPLES, TRAIN_LOSS, TRAIN_TIME, TrainConfig
from fl_sim.task.datasets import DATASETS, Dataset
from fl_sim.task.models import batchnorm_buffers, build_model

#: ``Context.state`` record of the client's own BatchNorm buffers under ``send-buffers=false``.
LOCAL_BUFFERS = "local-batchnorm-buffers"


@dataclass
class ClientUpdate:
    """What a client sends after one round.

    Attributes:
        state: the outgoing state dict (the local model as the defense lets it out), CPU tensors.
        metrics: the reply's MetricRecord content: the standard metrics and the defense's declared diagnostics.
        sample_indices: indices into the training split of the samples used, in order (for the audit record).
        steps: local SGD steps taken.
    """

    state: dict[str, torch.Tensor]
    metrics: dict[str, float | int]
    sample_indices: list[int]
    steps: int


def prepare_model(spec: ClientSpec, global_state: Mapping[str, torch.Tensor], state: RecordDict, seed: int,
                  device: torch.device) -> tuple[nn.Module, float]:
    """The model the server named with the global arrays loaded and the defense's ``on_model`` applied.

    Args:
        spec: the client's view of the run config.
        global_state: the state dict the server sent.
        state: this client's ``Context.state``.
        seed: the client's once-per-run secret seed (for secrets the defense draws once).
        device: where the model goes.

    Returns:
        ``(model, seconds spent in the defense's hook)``.
    """
    ds = DATASETS[spec.task.dataset]
    model = build_model(spec.task.model, ds.input_shape, ds.num_classes)
    model.load_state_dict(dict(global_state))
    if not spec.task.send_buffers and LOCAL_BUFFERS in state:
        model.load_state_dict(state[LOCAL_BUFFERS].to_torch_state_dict(), strict=False)
    model.to(device)
    t = time.perf_counter()
    if spec.defense.on_model is not None:
        spec.defense.on_model(model, state, spec.params, seed)
    return model, time.perf_counter() - t


def client_update(spec: ClientSpec, global_state: Mapping[str, torch.Tensor], data: Dataset, partition: np.ndarray,
                  train_config: TrainConfig, state: RecordDict, once_seed: int, round_seed: int,
                  device: torch.device) -> ClientUpdate:
    """One round of one client: prepare the model, train with the defense, build what the reply carries.

    Args:
        spec: the client's view of the run config.
        global_state: the state dict the server sent.
        data: the client's dataset (``uint8`` arrays).
        partition: ``int64`` indices of the client's samples in ``data.x_train``.
        train_config: what the server sent this round.
        state: this client's ``Context.state`` (the defense's secrets persist there).
        once_seed: the client's once-per-run secret seed.
        round_seed: the client's secret seed for this round (batch sampling, defense noise).
        device: where to compute.

    Returns:
        A :class:`ClientUpdate`.

    Raises:
        ValueError: the defense reported a metric it did not declare, or the batch exceeds the partition.
    """
    model, hooks_s = prepare_model(spec, global_state, state, once_seed, device)
    res = local_train(model, data, partition, train_config, spec.defense, spec.params, state, round_seed, device)
    out = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if not spec.task.send_buffers:
        kept = batchnorm_buffers(model)
        state[LOCAL_BUFFERS] = ArrayRecord({k: out[k].clone() for k in kept})
        out = {**out, **{k: global_state[k].detach().cpu().clone() for k in kept}}
    t = time.perf_counter()
    if spec.defense.on_reply is not None:
        out = spec.defense.on_reply(out, state, spec.params)
    extra = spec.defense.report(state, spec.params) if spec.defense.report is not None else {}
    hooks_s += time.perf_counter() - t
    diagnostics = {**res.defense_info, **extra}
    undeclared = sorted(set(diagnostics) - set(spec.defense.metrics))
    if undeclared:
        raise ValueError(f"defense={spec.defense_name!r} reported metrics it does not declare: {undeclared}")
    metrics = {NUM_EXAMPLES: res.num_examples, TRAIN_LOSS: res.loss, TRAIN_TIME: res.train_time_s + hooks_s,
               DEFENSE_TIME: res.defense_time_s + hooks_s, **diagnostics}
    return ClientUpdate(out, metrics, res.sample_indices, res.steps)
