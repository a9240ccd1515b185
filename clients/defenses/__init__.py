"""Client-side gradient defenses: registry name → :class:`Defense`. A new defense is one module plus one line."""

from __future__ import annotations

from clients.defenses import dp, fedkl, graddefense, none, prune, quantize, soteria
from clients.defenses.base import Defense, StepContext, per_sample_gradients

#: Defense registry.
DEFENSES: dict[str, Defense] = {
    "none": Defense(none.apply, "no defense"),
    "prune": Defense(prune.apply, "gradient compression: per-tensor magnitude pruning (DLG, NeurIPS'19)"),
    "dp-gaussian": Defense(dp.apply_gaussian, "clip + Gaussian noise, (ε, δ) as Flower's LocalDpMod; RDP accountant",
                           report=dp.report_gaussian),
    "dp-laplace": Defense(dp.apply_laplace, "L1 clip + Laplace noise (b = Δ/ε); RDP accountant",
                          report=dp.report_laplace),
    "soteria": Defense(soteria.apply, "Soteria/PLD: prune the FC input representation (Sun et al., CVPR'21)"),
    "graddefense": Defense(graddefense.apply, "GradDefense: noise on M of S sensitivity-balanced slices "
                                              "(Wang et al., INFOCOM'22); server compensation"),
    "fedkl": Defense(fedkl.apply, "FedKL: private key-lock layers sent as zeros (Ren et al., arXiv'23)",
                     on_model=fedkl.on_model, on_reply=fedkl.on_reply, model_hint="lenet-kl or resnet20-kl",
                     models=("lenet-kl", "resnet20-kl")),
    "quantize": Defense(quantize.apply, "cast gradients to float16/bfloat16/int8 and back (DLG, NeurIPS'19)"),
}

__all__ = ["DEFENSES", "Defense", "StepContext", "per_sample_gradients"]
