"""FedKL: each client keeps a private key and private lock layers; the server sees zeros in their place.

Paper: Ren, Deng, Xie, Ma & Ma, "Gradient Leakage Defense with Key-Lock Module for Federated Learning",
arXiv:2305.04095 (``Rand2AI/FedKL``). Models: ``lenet-kl`` and ``resnet20-kl`` (:mod:`fl_sim.task.models.keylock`).

Per client (``methods/FedKL.py``, ``utils/Client.py``):

1. At its first round the client draws its key (``key_dim`` values in [0, 1)) and fresh lock-layer parameters
   from its own seed — not the global model's public initial lock layers — and stores them in its
   ``Context.state`` (an ArrayRecord that never enters a message).
2. Every round (train and evaluate) the global arrays are loaded and then the client's key and lock layers
   overwrite the global ones (:func:`on_model`).
3. Local training is ordinary: the lock layers are trained too, the key is constant; gradients are not changed.
4. Before the reply is built the trained lock layers go back into ``Context.state`` and the key and lock tensors
   in the outgoing state dict are replaced by zeros (:func:`on_reply`). FedAvg over those zeros leaves zeros in
   the global model; clients overwrite them, and the strategy tells the attacker to ignore them
   (``attack-skip-private``, from :func:`fl_sim.task.models.private_state_keys`).

Parameters: none beyond the model choice (``model=lenet-kl`` or ``resnet20-kl``; key length 1024 as in the paper).

What the server must know: the key-lock architecture (to hold the tensors) — nothing else. The global model
without a key-lock is deliberately weak (the paper's claim), so the server's central test accuracy of a FedKL run is
that of a keyless model; the clients' own accuracy is measured by federated evaluation (``fraction-evaluate > 0``),
where each client evaluates with its key-lock.

Known breaks [analysis, not shown in public code]: the lock only sets ``2·C_out`` numbers (γ, β of the first block),
so an attacker can optimise γ and β directly together with the dummy input instead of the 1024-d key; every layer
after the lock block leaks as usual (the representation leakage Soteria targets is untouched).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from flwr.app import ArrayRecord, RecordDict
from torch import nn

from clients.defenses.base import Defense, ReplyContext, StepContext
from fl_sim.task.models import KeyLock, private_state_keys

STATE_KEY = "fedkl"


def _draw_secrets(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A fresh key (U[0, 1)) and lock layers (PyTorch's ``nn.Linear`` default U(±1/√fan_in)) for every block."""
    gen = torch.Generator().manual_seed(int(seed))
    out: dict[str, torch.Tensor] = {}
    for name, m in model.named_modules():
        if not isinstance(m, KeyLock):
            continue
        out[f"{name}.key"] = torch.rand(m.key.shape, generator=gen)
        for lin in ("scale_fc", "shift_fc"):
            layer: nn.Linear = getattr(m, lin)
            bound = 1.0 / math.sqrt(layer.in_features)
            out[f"{name}.{lin}.weight"] = (torch.rand(layer.weight.shape, generator=gen) * 2 - 1) * bound
            out[f"{name}.{lin}.bias"] = (torch.rand(layer.bias.shape, generator=gen) * 2 - 1) * bound
    return out


def on_model(model: nn.Module, state: RecordDict, params: Any, seed: int) -> None:
    """Overwrite the global key/lock tensors with this client's own (drawn from ``seed`` on first use).

    Raises:
        ValueError: the model has no key-lock block.
    """
    keys = private_state_keys(model)
    if not keys:
        raise ValueError(f"defense=fedkl needs a key-lock model (lenet-kl, resnet20-kl), not {type(model).__name__}")
    if STATE_KEY not in state:
        state[STATE_KEY] = ArrayRecord(_draw_secrets(model, seed))
    secrets = state[STATE_KEY].to_torch_state_dict()
    model.load_state_dict(secrets, strict=False)


def on_reply(state_dict: dict[str, torch.Tensor], state: RecordDict, params: Any,
             reply: ReplyContext | None = None) -> dict[str, torch.Tensor]:
    """Keep the trained lock layers (and the key) in ``state``; send zeros in their place (``reply`` is not used).

    Raises:
        KeyError: :func:`on_model` was not run first (no secrets in ``state``).
    """
    private = list(state[STATE_KEY].keys())
    state[STATE_KEY] = ArrayRecord({k: state_dict[k].detach().cpu().clone() for k in private})
    out = dict(state_dict)
    for k in private:
        out[k] = torch.zeros_like(state_dict[k])
    return out


def apply(grads: list[torch.Tensor], ctx: StepContext) -> list[torch.Tensor]:
    """Gradients are not changed (the lock is in the architecture)."""
    return grads


DEFENSE = Defense("FedKL: private key-lock layers sent as zeros (Ren et al., arXiv'23)", apply,
                  models=("lenet-kl", "resnet20-kl"), on_model=on_model, on_reply=on_reply)
