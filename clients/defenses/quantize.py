"""Quantization: every local step's gradient is cast to a low-precision format and back.

Paper: the precision experiment of DLG (Zhu, Liu & Han, NeurIPS'19, Sec. 5): half precision (fp16, bfloat16) does
not protect; int8 does but costs accuracy [recalled, paper body not re-read]. ``int8`` here is symmetric per-tensor
absmax quantization: ``q = round(g / s)``, ``s = max|g| / 127``, sent as ``q · s``.

Parameters (run-config keys):
    ``defense-quantize-format`` ("int8"): one of ``float16``, ``bfloat16``, ``int8``.

What the server must know: nothing (plain FedAvg on the de-quantized values).

Known breaks: fp16/bf16 keep enough precision for DLG/iDLG; int8 reconstructions degrade but the gradient's
sign pattern and the label still leak (iDLG's rule reads signs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clients.defenses.base import Defense, StepContext
from fl_sim.task.keys import Key

FORMATS = ("float16", "bfloat16", "int8")

KEYS = {"defense-quantize-format": Key("int8", "quantize: format the gradient is cast through", choices=FORMATS)}


@dataclass(frozen=True)
class Params:
    """``quantize``'s parameters: ``format``, one of :data:`FORMATS`."""

    format: str


def quantize(grads: list[torch.Tensor], fmt: str) -> list[torch.Tensor]:
    """Round each tensor through ``fmt`` and back to its dtype.

    Raises:
        ValueError: unknown format.
    """
    if fmt in ("float16", "bfloat16"):
        dt = getattr(torch, fmt)
        return [g.to(dt).to(g.dtype) for g in grads]
    if fmt == "int8":
        out = []
        for g in grads:
            scale = g.abs().max() / 127.0
            out.append(g if float(scale) == 0.0 else torch.round(g / scale).clamp(-127, 127) * scale)
        return out
    raise ValueError(f"unknown quantization format {fmt!r}; allowed: {', '.join(FORMATS)}")


def apply(grads: list[torch.Tensor], ctx: StepContext) -> list[torch.Tensor]:
    """Quantize each step's gradient to ``defense-quantize-format``."""
    return quantize(grads, ctx.params.format)


DEFENSE = Defense("cast gradients to float16/bfloat16/int8 and back (DLG, NeurIPS'19)", apply, KEYS, Params,
                  "defense-quantize-")
