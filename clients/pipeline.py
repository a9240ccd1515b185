"""The one client pipeline: global arrays in, the defended reply out.

:func:`prepare_model` builds the model the server named, loads the global arrays and lets the defense put its
secrets in place (``on_model``); :func:`client_update` then trains it with the defense on every local step
(:func:`clients.training.local_train`), lets the defense touch what leaves (``on_reply``, which also sees the global
arrays sent) and collects the metrics the reply carries. The ClientApp, the one-shot audit and the benchmarks all call these functions; none of them
holds a second copy of the train config or of the local-steps rule (:class:`fl_sim.task.contract.TrainConfig`).

Per-message cost: building a model (LeNet: ~1–1.5 ms, a dummy forward included) is paid once per process and
model, not per message. :func:`client_update` hands its model back (:func:`keep_model`) and the next
:func:`prepare_model` for the same model, device and a defense without ``on_model`` reloads it when
:func:`reusable` finds it as built (the same parameter and buffer objects, shapes and ``requires_grad`` flags, no
hooks left on any module; gradients are dropped and train mode is set), copying the global arrays straight into
its tensors (:func:`load_global`, what ``load_state_dict`` does without its module recursion). The global arrays
overwrite every parameter and buffer, so the client computes exactly what a freshly built model computes; a
defense with ``on_model`` (FedKL) gets a freshly built model every time.

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
from clients.defenses import ReplyContext
from clients.training import local_train, train_mode
from fl_sim.task.contract import DEFENSE_TIME, NUM_EXAMPLES, TRAIN_LOSS, TRAIN_TIME, TrainConfig
from fl_sim.task.datasets import DATASETS, Dataset
from fl_sim.task.models import MODELS, batchnorm_buffers, build_model

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


#: Per process: models handed back by :func:`keep_model`, by (builder, name, input shape, classes, device), each with
#: the signature it was built with (:func:`model_signature`).
_KEPT: dict[tuple, tuple[nn.Module, tuple]] = {}
_SIGNATURES: dict[int, tuple] = {}  # id(model) -> its signature when built
_TARGETS: dict[int, dict[str, torch.Tensor]] = {}  # id(model) -> its tensors by state-dict key, for load_global


def _model_key(spec: ClientSpec, device: torch.device) -> tuple:
    ds = DATASETS[spec.task.dataset]
    return (MODELS[spec.task.model], spec.task.model, tuple(ds.input_shape), int(ds.num_classes), str(device))


def model_signature(model: nn.Module) -> tuple:
    """What :func:`reusable` compares: every parameter's and buffer's name, identity, shape, dtype, device and
    ``requires_grad``, and the module tree's names and types.

    The identity (``id``) of each tensor object is part of it, so a parameter replaced by another of the same
    shape (``module.weight = nn.Parameter(...)``) makes the model not reusable; the build-time tensors are kept
    alive by :data:`_TARGETS` while the signature is, so their ids cannot be taken by new objects.
    """
    modules = list(model.named_modules())  # one walk of the tree; each module's own tensors, as registered
    return (tuple((n, type(m)) for n, m in modules),
            tuple((n, k, id(p), tuple(p.shape), p.dtype, p.device, p.requires_grad)
                  for n, m in modules for k, p in m._parameters.items() if p is not None),
            tuple((n, k, id(b), tuple(b.shape), b.dtype, b.device)
                  for n, m in modules for k, b in m._buffers.items() if b is not None))


#: ``_load_from_state_dict`` implementations that, for a state dict with exactly the model's keys and shapes, do
#: nothing but ``tensor.copy_(value)`` under ``no_grad`` (``_NormBase``'s only adds a missing
#: ``num_batches_tracked`` of an old checkpoint version, which a global model of the same build never lacks).
_PLAIN_LOADERS = (nn.Module._load_from_state_dict, nn.modules.batchnorm._NormBase._load_from_state_dict)


def _state_dict_hooks(m: nn.Module) -> bool:
    """Whether module ``m`` itself has a state-dict or load hook."""
    return bool(m._state_dict_hooks or m._state_dict_pre_hooks or m._load_state_dict_pre_hooks
                or m._load_state_dict_post_hooks)


def _plain_targets(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """``model.state_dict(keep_vars=True)`` (the parameter and buffer objects themselves) when loading a state dict
    into ``model`` is a plain ``copy_`` of each entry — no state-dict or load hooks on any module, no module
    whose ``_load_from_state_dict`` does more (:data:`_PLAIN_LOADERS`) and none with an extra state
    (``get_extra_state``) — else ``None``."""
    for m in model.modules():
        if (_state_dict_hooks(m) or type(m)._load_from_state_dict not in _PLAIN_LOADERS
                or type(m).get_extra_state is not nn.Module.get_extra_state):
            return None
    return dict(model.state_dict(keep_vars=True))


def load_global(model: nn.Module, global_state: Mapping[str, torch.Tensor]) -> None:
    """``model.load_state_dict(global_state)`` (strict), as a plain copy into the model's tensors when this process
    built ``model`` and loading it is such a copy (:func:`_plain_targets`).

    The same values land in the same tensors as through ``load_state_dict`` (it runs ``param.copy_(input_param)``
    under ``no_grad`` for every entry; ~0.06 ms of Python module recursion per LeNet message saved). Keys or shapes
    that differ from the model's go through ``load_state_dict``, which raises its own error.

    Raises:
        RuntimeError: ``load_state_dict``'s, for missing or unexpected keys or a shape mismatch.
    """
    targets = _TARGETS.get(id(model))
    if (targets is None or targets.keys() != global_state.keys()
            or any(t.shape != global_state[k].shape for k, t in targets.items())):
        model.load_state_dict(dict(global_state))
        return
    with torch.no_grad():
        for k, t in targets.items():
            t.copy_(global_state[k])


def reusable(model: nn.Module, signature: tuple) -> bool:
    """Whether ``model`` is still as built: ``signature`` unchanged and no forward/backward hook on any module or
    parameter, nor a state-dict or load hook on any module."""
    for m in model.modules():
        if (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                or _state_dict_hooks(m)):
            return False
        # tensor hooks (``Tensor.register_hook``) on the module's own parameters
        if any(p is not None and p._backward_hooks for p in m._parameters.values()):
            return False
    return model_signature(model) == signature


def keep_model(spec: ClientSpec, model: nn.Module, device: torch.device) -> None:
    """Hand ``model`` back for the next :func:`prepare_model` of this process (nothing for ``on_model`` defenses)."""
    sig = _SIGNATURES.get(id(model))
    if spec.defense.on_model is None and sig is not None:
        _KEPT[_model_key(spec, device)] = (model, sig)


def _model_for(spec: ClientSpec, device: torch.device) -> nn.Module:
    """A kept model of this process if :func:`reusable`, else a newly built one (its signature recorded)."""
    key = _model_key(spec, device)
    kept = _KEPT.pop(key, None)
    if spec.defense.on_model is None and kept is not None and reusable(*kept):
        model = kept[0]
        model.zero_grad(set_to_none=True)
        train_mode(model)
        return model
    ds = DATASETS[spec.task.dataset]
    model = build_model(spec.task.model, ds.input_shape, ds.num_classes).to(device)
    _SIGNATURES.clear()  # only the newest model of this process is ever handed back
    _TARGETS.clear()
    _SIGNATURES[id(model)] = model_signature(model)
    if (targets := _plain_targets(model)) is not None:
        _TARGETS[id(model)] = targets
    return model


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
        ``(model, seconds spent in the defense's hook)``. The model is newly built or, when this process kept one
        that is still as built (module docstring), that one reloaded.
    """
    model = _model_for(spec, device)
    load_global(model, global_state)
    if not spec.task.send_buffers and LOCAL_BUFFERS in state:
        model.load_state_dict(state[LOCAL_BUFFERS].to_torch_state_dict(), strict=False)
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
    # copies, never views of the model's own tensors: the model may be reloaded for the next message (keep_model)
    out = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    if not spec.task.send_buffers:
        kept = batchnorm_buffers(model)
        state[LOCAL_BUFFERS] = ArrayRecord({k: out[k].clone() for k in kept})
        out = {**out, **{k: global_state[k].detach().cpu().clone() for k in kept}}
    t = time.perf_counter()
    if spec.defense.on_reply is not None:
        sent = {k: v.detach().cpu() for k, v in global_state.items()}
        out = spec.defense.on_reply(out, state, spec.params, ReplyContext(sent, round_seed, train_config.server_round))
    extra = spec.defense.report(state, spec.params) if spec.defense.report is not None else {}
    hooks_s += time.perf_counter() - t
    diagnostics = {**res.defense_info, **extra}
    undeclared = sorted(set(diagnostics) - set(spec.defense.metrics))
    if undeclared:
        raise ValueError(f"defense={spec.defense_name!r} reported metrics it does not declare: {undeclared}")
    metrics = {NUM_EXAMPLES: res.num_examples, TRAIN_LOSS: res.loss, TRAIN_TIME: res.train_time_s + hooks_s,
               DEFENSE_TIME: res.defense_time_s + hooks_s, **diagnostics}
    keep_model(spec, model, device)
    return ClientUpdate(out, metrics, res.sample_indices, res.steps)
