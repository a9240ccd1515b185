"""Gradient matching shared by the optimisation attacks: the observed target and the distances to it.

:func:`prepare` turns an :class:`~attacker.payload.AttackPayload` and :class:`~attacker.options.AttackOptions` into
a :class:`Target` once per attack, so that nothing per iteration is recomputed: the observed average gradient of
the parameters that take part (weighted, flattened into one vector), the inferred pruning mask, the clipping bound
converted to gradient units. The distances then cost one concatenation and a few vector operations per
evaluation, whatever the number of layers:

* :meth:`Target.l2` — ``Σ_l w_l ‖m_l ⊙ clip(g')_l − g_l‖²`` (DLG, iDLG; Zhu et al. 2019).
* :meth:`Target.cosine` — ``1 − ⟨a, t⟩ / (‖a‖ ‖t‖)`` over all layers concatenated, with ``a`` and ``t`` the
  trial and observed gradients scaled by ``√w_l`` (so the per-layer weights multiply both the product and the
  norms, as in Inverting Gradients; Geiping et al. 2020, ``inversefed/reconstruction_algorithms.py``).

With ``skip_private`` (the default), the layers the server knows carry nothing (FedKL's key-lock layers, sent as
zeros) are left out; with ``denoise="mp"`` the observed gradient is Marchenko–Pastur-filtered first
(:mod:`attacker.denoise`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from attacker.denoise import denoise_gradients
from attacker.options import AttackOptions
from attacker.payload import AttackPayload
from fl_sim.task.models import private_state_keys


@dataclass
class Target:
    """The observed update prepared for matching (see the module docstring).

    Attributes:
        params: every trainable parameter of the attacker's model copy, in ``model.parameters()`` order.
        names: their names.
        grads: the observed average gradient per parameter (``update_to_gradient``), full list.
        needed: indices of the parameters whose trial gradient must be computed (those with weight > 0, or all of
            them when clipping is replicated, since the clipping norm runs over all parameters).
        active: positions *within* ``needed`` of the parameters that enter the distance.
        flat: ``float32 (D,)`` the active observed gradients, each scaled by ``√w_l``, concatenated.
        scale: ``float32 (D,)`` per-entry factor applied to the trial gradient: ``√w_l`` times the inferred mask.
        clip: clipping bound in gradient units (0 = off).
        norm_sq: ``‖flat‖²`` (a float, > 0 unless the update is all zeros).
    """

    params: list[torch.Tensor]
    names: list[str]
    grads: list[torch.Tensor]
    needed: list[int]
    active: list[int]
    flat: torch.Tensor
    scale: torch.Tensor | None
    clip: float
    norm_sq: float

    @property
    def needed_params(self) -> list[torch.Tensor]:
        """The parameters to differentiate with respect to (``needed`` order)."""
        return [self.params[i] for i in self.needed]

    def trial_vector(self, grads: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Trial gradients (aligned with ``needed``) → the clipped, masked, weighted flat vector ``(D,)``.

        Batched trial gradients with a leading dimension ``R`` (e.g. under :func:`torch.func.vmap`) are not
        supported here; vmap this function instead.
        """
        if self.clip > 0:
            norm = torch.sqrt(sum((g * g).sum() for g in grads))
            factor = torch.clamp(self.clip / (norm + 1e-12), max=1.0)
            grads = [g * factor for g in grads]
        vec = torch.cat([grads[i].reshape(-1) for i in self.active])
        return vec * self.scale if self.scale is not None else vec

    def l2(self, grads: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Weighted squared L2 distance to the observed gradient (a scalar tensor)."""
        return (self.trial_vector(grads) - self.flat).pow(2).sum()

    def cosine(self, grads: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
        """``1 − cos`` between the weighted trial and observed gradients, all layers concatenated (in [0, 2])."""
        a = self.trial_vector(grads)
        return 1.0 - (a * self.flat).sum() / (a.norm() * math.sqrt(self.norm_sq) + 1e-20)

    def value_and_weights(self, grads: list[torch.Tensor], kind: str) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """The distance ``kind`` (``"l2"`` or ``"cosine"``) of detached trial gradients and its gradient ``w``.

        ``w = ∂L/∂g`` is what :mod:`attacker.chain` pulls back through the network (``J_gᵀ w``). Without clipping
        it is written out (``l2``: ``2 s ⊙ (s ⊙ a − t)``; ``cosine``: ``s ⊙ (−t/D + c·n_t·a/(n_a·D²))`` with
        ``D = n_a n_t + 1e-20``, ``c = ⟨a, t⟩``, ``s`` the per-entry scale), the same expressions autograd derives
        from :meth:`l2` and :meth:`cosine`; with clipping autograd differentiates the clip factor too.

        Args:
            grads: one tensor per needed parameter (``needed`` order), shaped like the parameter.
            kind: ``"l2"`` or ``"cosine"``.

        Returns:
            ``(value, w)``: a 0-dim tensor and one tensor per needed parameter (``None`` where ``w`` is zero).
        """
        if self.clip > 0:
            leaves = [g.detach().requires_grad_(True) for g in grads]
            with torch.enable_grad():
                value = self.l2(leaves) if kind == "l2" else self.cosine(leaves)
                w = torch.autograd.grad(value, leaves, allow_unused=True)
            return value.detach(), list(w)
        a = self.trial_vector(grads)
        if kind == "l2":
            r = a - self.flat
            value = (r * r).sum()
            wv = 2 * r
        else:
            na, nt = a.norm(), math.sqrt(self.norm_sq)
            den = na * nt + 1e-20
            c = (a * self.flat).sum()
            value = 1.0 - c / den
            wv = self.flat * (-1 / den) + a * (c * nt / (na * den * den))
        if self.scale is not None:
            wv = wv * self.scale
        w: list[torch.Tensor | None] = [None] * len(grads)
        for j, part in zip(self.active, wv.split([grads[j].numel() for j in self.active])):
            w[j] = part.view(grads[j].shape)
        return value, w


def prepare(payload: AttackPayload, model: nn.Module, options: AttackOptions | None = None) -> Target:
    """Build the :class:`Target` for ``model`` (the attacker's copy of the global model) from ``payload``.

    Args:
        payload: the server-visible update.
        model: ``payload.build_model()`` (its parameters are the ones differentiated).
        options: the adaptive knobs (ignored/weighted layers, mask inference, clipping replication).

    Raises:
        ValueError: a layer pattern that matches no parameter, or every layer left out.
    """
    options = options or AttackOptions()
    names = payload.parameter_names(model)
    params = list(model.parameters())
    grads = [g.detach() for g in payload.gradients(model)]
    if options.denoise == "mp":
        grads = denoise_gradients(payload, grads)
    weights = options.weights_for(model)
    ignored = set(private_state_keys(model)) if options.skip_private else set()
    w = [0.0 if n in ignored else weights[n] for n in names]
    if not any(x > 0 for x in w):
        raise ValueError("every layer is left out of the matching loss; nothing to match")
    clip = 0.0
    if options.clip_bound > 0:
        lr = float(payload.train_config.lr)
        clip = options.clip_bound if options.clip_scope == "gradient" else options.clip_bound / (
            lr * payload.local_steps)
    needed = list(range(len(params))) if clip > 0 else [i for i, x in enumerate(w) if x > 0]
    active = [j for j, i in enumerate(needed) if w[i] > 0]
    device = params[0].device
    flat_parts, scale_parts = [], []
    use_scale = options.infer_mask or any(w[i] != 1.0 for i in needed if w[i] > 0)
    for j in active:
        i = needed[j]
        root = math.sqrt(w[i])
        flat_parts.append(grads[i].reshape(-1) * root)
        if use_scale:
            s = torch.full_like(flat_parts[-1], root)
            if options.infer_mask:
                s = s * (payload.update[names[i]].to(device).reshape(-1) != 0).to(s.dtype)
            scale_parts.append(s)
    flat = torch.cat(flat_parts)
    scale = torch.cat(scale_parts) if use_scale else None
    return Target(params, names, grads, needed, active, flat, scale, clip, float((flat * flat).sum()))
