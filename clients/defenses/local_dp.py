"""``local-dp``: update-level local DP exactly as Flower ships it — ``flwr.clientapp.mod.LocalDpMod`` applied to the
client's reply, once per round, on the whole model update.

Source: Flower 1.42, ``flwr/clientapp/mod/localdp_mod.py`` (the library's class is called here, not a copy). What
it does to a reply, once per train message (Flower's code, ``flwr/supercore/differential_privacy.py``):

1. ``Δ = θ_local − θ_global`` over every array of the record; FlatClip ``Δ · min(1, C / ‖Δ‖₂)`` (McMahan et al.,
   "Learning Differentially Private Recurrent Language Models", ICLR 2018, arXiv 1710.06963); ``θ' = θ_global + Δ``.
2. i.i.d. ``N(0, σ²)`` on every entry of ``θ'`` (noising θ' equals noising Δ, as θ_global is public) with the
   **classical** ``σ = Δ_s · √(2 ln(1.25/δ)) / ε`` (Dwork & Roth 2014, Thm. A.1), ``Δ_s`` the mod's
   ``sensitivity``.
3. No accounting: the mod claims (ε, δ) per round and nothing about composition. The classical formula holds only
   for ε < 1; at the default ε = 10 (δ = 1e-5) its σ = 0.4845 is below the 0.4999 that (ε, δ) needs, so the claim
   is false (dp.md §1: the true δ is 2.3e-5).

Here: the mod is built as ``LocalDpMod(C, Δ_s, ε, δ)`` from ``defense-dp-clip``, ``defense-dp-sensitivity``
(0 = C), ``defense-dp-epsilon`` and ``defense-dp-delta`` (with ``defense-dp-noise`` = σ given directly, ε is set to
the value for which the mod's own formula gives that σ). The defense's hook hands it a train message with the
global arrays, and the local arrays as the "reply", and sends what it returns. Training itself is plain (the step
gradients are not changed).

Unit protected and neighbouring relation: **one client's round** — its whole update of that round (all the local
examples and steps behind it), local DP. With ``Δ_s = C`` (default) the neighbours are "the client sends its
clipped update" and "it sends the zero update"; for any-update-against-any-other (replace) set
``defense-dp-sensitivity`` to ``2C``. Composition: over the rounds the client took part in.

Every reply reports ``dp-epsilon-claimed`` (the per-round ε the mod claims: its ``epsilon``), ``dp-sigma`` (the
noise std divided by ``Δ_s``), ``dp-delta``, ``dp-releases`` (rounds released so far) and, separately,
``dp-epsilon``: the ε at ``defense-dp-delta`` that the accountant gives for those releases (``pld``: exact
composition of Gaussian mechanisms, ``get_epsilon_gaussian(σ/(Δ_s√R))``; ``rdp``: dp-accounting's Rényi
accountant). Reference: ``LocalDpMod(1, 1, 1, 1e-5)`` → σ = 4.844805, which alone is (0.7510, 1e-5)-DP; over 10
rounds ε = 2.688 (dp.md §4.1).

Deviations: the noise comes from numpy's global generator, as in Flower; it is seeded here from the client's
secret round seed for the duration of the call (and the global state restored) so that runs are reproducible.
Integer arrays (BatchNorm's ``num_batches_tracked``) are kept out of the mod: its in-place float scaling fails on
them; everything else, BatchNorm running statistics included, goes through it as in Flower (noised
``running_var`` can turn negative). An all-zero update cannot be clipped by the mod (it divides by the norm): an
error. Not covered by the guarantee: the reply's un-noised ``train-loss`` and timings.

What the server must know: nothing (plain FedAvg). Known breaks: with the classical σ at large ε the noise is
small against a trained model's update only when ``C`` is large; with a small ``C`` the update is mostly noise
(accuracy collapses; see the README).
"""

from __future__ import annotations

import math
import time
import uuid

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, Metadata, RecordDict
from flwr.clientapp.mod import LocalDpMod

from clients.defenses.base import Defense, ReplyContext, StepContext
from clients.defenses.dp import STEP_KEYS, Params, count_release, epsilon_spent, releases, sensitivity
from fl_sim.task.contract import ARRAYS

STATE_KEY = "local-dp"


def claimed_epsilon(p: Params) -> float:
    """The ε given to ``LocalDpMod``: ``defense-dp-epsilon``, or, with ``defense-dp-noise`` = σ, the ε for which the
    mod's formula ``Δ_s √(2 ln(1.25/δ)) / ε`` equals σ."""
    if p.noise > 0:
        return sensitivity(p) * math.sqrt(2.0 * math.log(1.25 / p.delta)) / p.noise
    return p.epsilon


def mod_for(p: Params) -> LocalDpMod:
    """Flower's ``LocalDpMod(clipping_norm=C, sensitivity=Δ_s, epsilon, delta)`` for these parameters."""
    return LocalDpMod(p.clip, sensitivity(p), claimed_epsilon(p), p.delta)


def noise_std(p: Params) -> float:
    """The std the mod adds to every entry (its own formula, as ``LocalDpMod.__call__`` computes it)."""
    mod = mod_for(p)
    return float(mod.sensitivity * np.sqrt(2 * np.log(1.25 / mod.delta)) / mod.epsilon)


def _message(content: RecordDict, reply_to: str = "") -> Message:
    md = Metadata(run_id=0, message_id=uuid.uuid4().hex, src_node_id=0, dst_node_id=0, reply_to_message_id=reply_to,
                  group_id="", created_at=time.time(), ttl=3600.0, message_type="train")
    return Message(content=content, metadata=md)


def _numpy_seed(seed: int) -> int:
    return int(np.random.SeedSequence([int(seed), 0x10CA1D9]).generate_state(1)[0])


def on_reply(state_dict: dict[str, torch.Tensor], state: RecordDict, p: Params,
             reply: ReplyContext) -> dict[str, torch.Tensor]:
    """Run Flower's ``LocalDpMod`` on the round's update and return the state dict it lets out.

    Args:
        state_dict: the local model after training (CPU tensors).
        state: this client's ``Context.state`` (the release counter).
        p: the parameters.
        reply: the global arrays sent and the round's secret seed.

    Returns:
        The state dict to send: the floating-point arrays clipped and noised by the mod, integer arrays as trained.

    Raises:
        ValueError: the local and global arrays differ in their keys.
        RuntimeError: the mod returned an error (or could not clip an all-zero update).
    """
    if set(state_dict) != set(reply.global_state):
        raise ValueError("local-dp: the local model's arrays differ from the global arrays sent")
    keys = [k for k in reply.global_state if torch.is_floating_point(state_dict[k])]
    sent = _message(RecordDict({ARRAYS: ArrayRecord({k: reply.global_state[k].detach().cpu().contiguous()
                                                     for k in keys})}))
    local = _message(RecordDict({ARRAYS: ArrayRecord({k: state_dict[k].detach().cpu().contiguous() for k in keys})}),
                     reply_to=sent.metadata.message_id)
    ctx = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
    saved = np.random.get_state()
    np.random.seed(_numpy_seed(reply.seed))
    try:
        out = mod_for(p)(sent, ctx, lambda msg, c: local)
    except ZeroDivisionError as exc:
        raise RuntimeError("local-dp: Flower's LocalDpMod cannot clip an all-zero update (it divides by its "
                           "norm)") from exc
    finally:
        np.random.set_state(saved)
    if out.has_error():
        raise RuntimeError(f"local-dp: Flower's LocalDpMod returned an error: {out.error.reason}")
    noised = out.content[ARRAYS].to_torch_state_dict()
    count_release(state, STATE_KEY)
    return {k: (noised[k] if k in noised else v) for k, v in state_dict.items()}


def apply(grads: list[torch.Tensor], ctx: StepContext) -> list[torch.Tensor]:
    """Step gradients are not changed (the mod works on the round's update, in :func:`on_reply`)."""
    return grads


def report(state: RecordDict, p: Params) -> dict[str, float]:
    """``dp-releases``, ``dp-epsilon`` (the accountant's ε for them; -1 = unbounded), ``dp-epsilon-claimed`` (the
    mod's per-round ε), ``dp-sigma`` (noise std / Δ_s) and ``dp-delta``."""
    n = releases(state, STATE_KEY)
    z = noise_std(p) / sensitivity(p)
    eps = epsilon_spent("gaussian", z, n, p.delta, p.accountant)
    return {"dp-releases": n, "dp-epsilon": eps if math.isfinite(eps) else -1.0,
            "dp-epsilon-claimed": claimed_epsilon(p), "dp-sigma": z, "dp-delta": float(p.delta)}


METRICS = ("dp-releases", "dp-epsilon", "dp-epsilon-claimed", "dp-sigma", "dp-delta")
DEFENSE = Defense("Flower's LocalDpMod on each round's update (clip + classical-σ Gaussian, once per round); the "
                  "accountant reports the true ε", apply, STEP_KEYS, Params, "defense-dp-", metrics=METRICS,
                  on_reply=on_reply, report=report)
