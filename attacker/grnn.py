"""GRNN: a generator trained from noise to emit images and labels whose gradient matches the update.

Ren, Deng & Xie, "GRNN: Generative Regression Neural Network — A Data Leakage Attack for Federated Learning",
ACM Trans. Intell. Syst. Technol. 13(4), 2022 (arXiv 2105.00529); official code ``Rand2AI/GRNN`` (``GRNN.py``,
``Generator/model.py``, ``WassersteinDistance/wd.py``); the FedKL authors' attack. Unlike DLG, the dummy data are
not free variables: a generator ``G`` with a fixed noise input ``z ~ N(0, I)`` of shape ``(N, 128)`` emits

* an image branch: ``z → ConvTranspose(128 → 2·d·2^k, 4×4) + GLU`` (4×4), then ``k`` up-blocks
  [nearest ×2, conv 3×3 without bias to twice the output channels, BatchNorm, GLU] halving the channels from
  ``d·2^k`` to ``d``, and a last up-block to the image channels, then a sigmoid (``d = 32``, ``k = log2(S) − 3``
  for a generated side ``S``): images in the ``[0, 1]`` pixel box;
* a label branch: ``z → Linear(128, C) → softmax``: a soft label ``ŷ (N, C)``.

The loss, minimised over the generator's weights (the global model is fixed, in train mode as the client ran it),
is ``‖g' − g‖² + ‖g' − g‖ + λ·TV²(x̂)`` with ``g'`` the gradient of the soft-label cross-entropy
``−mean_n Σ_c ŷ_nc log softmax(F(x̂))_nc`` at the global model (``create_graph``). The paper calls the middle term a
Wasserstein distance; as coded in ``wd.py`` it reduces to the plain L2 norm of the difference, which is what is
used here. ``TV²`` is the squared TV of the official code: ``2·(Σ(Δ_h x)²/(C(H−1)W) + Σ(Δ_w x)²/(CH(W−1)))/N`` on
the ``[0, 1]`` images, λ = 1e-3 (the paper's LeNet value; ``attack-tv`` overrides). Optimiser as the paper:
``RMSprop(lr=1e-4, momentum=0.99)``, 1,000 iterations; the result is the last generator output, the label
``argmax ŷ``. Restarts draw a new generator and noise and keep the lowest final gradient distance.

Deviations from the public code, and why:

* Images of any size: the generator works at the next power of two ``S >= max(H, W)`` (``S >= 8``) and the output
  is resized bilinearly to ``H×W`` (the paper resizes every dataset to 32×32 instead; fl-sim attacks the model the
  federation trains, at its input size). Channels follow the dataset (the paper makes MNIST 3-channel).
* The images go into the model normalised with the dataset's public mean and std, as the clients feed them (the
  paper feeds the raw ``[0, 1]`` images; fleak notes GRNN is "sensitive to data normalization").
* The observed update enters as the average gradient :func:`~attacker.payload.update_to_gradient` gives (the
  paper attacks one-step gradients; fleak's FL port feeds the raw weight difference, unscaled). On a multi-step
  (``fedavg``) update the generator emits every distinct image the client used, ``min(num-examples, K·B)``, and
  matches their mean gradient at the global model — first order in the learning rate, as fleak's port.
* The generator keeps PyTorch's default initialisation: the official ``weight_init`` walks only the direct
  children (Sequentials), so it never reaches a layer and the default init is what runs there too.
* The shared adaptive options apply (ignored or weighted layers, mask inference, clipping replication) through
  :mod:`attacker.matching`.

Threat model: the train config and ``num-examples`` (to convert the update and size the batch); labels are learned.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from attacker import matching
from attacker.options import AttackOptions
from attacker.payload import AttackPayload, AttackResult, Budget

#: Default generator iterations (the paper's ``Iteration = 1000``).
DEFAULT_ITERATIONS = 1000
#: RMSprop learning rate and momentum of the paper.
LR = 1e-4
MOMENTUM = 0.99
#: TV² weight λ of the paper for LeNet (1e-6 for its ResNet-18).
DEFAULT_TV = 1e-3
#: Noise dimension and base channel count ``d`` of the paper's generator.
NOISE_DIM = 128
BASE = 32
#: Progress callback every this many iterations.
PROGRESS_EVERY = 50


class UpBlock(nn.Sequential):
    """Nearest ×2 upsampling, 3×3 convolution without bias to ``2·out`` channels, BatchNorm, GLU (→ ``out``).

    Shapes: ``(N, in, S, S) → (N, out, 2S, 2S)``.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(nn.Upsample(scale_factor=2, mode="nearest"),
                         nn.Conv2d(in_channels, 2 * out_channels, 3, 1, 1, bias=False),
                         nn.BatchNorm2d(2 * out_channels), nn.GLU(dim=1))


class Generator(nn.Module):
    """GRNN's generator (see the module docstring): noise ``(N, noise_dim)`` → images ``(N, C, H, W)`` in [0, 1] and
    soft labels ``(N, num_classes)`` (rows sum to 1).

    Args:
        image_shape: ``(C, H, W)`` of the output.
        num_classes: label classes.
        noise_dim: size of the noise input (128 in the paper).
        base: channel base ``d`` (32 in the paper).
    """

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int, noise_dim: int = NOISE_DIM,
                 base: int = BASE):
        super().__init__()
        c, h, w = image_shape
        self.out_hw = (h, w)
        self.side = max(8, 1 << math.ceil(math.log2(max(h, w))))
        k = int(math.log2(self.side)) - 3
        top = base * 2 ** k
        self.stem = nn.Sequential(nn.ConvTranspose2d(noise_dim, 2 * top, 4, 1, 0), nn.GLU(dim=1))
        self.blocks = nn.Sequential(*[UpBlock(top // 2 ** i, top // 2 ** (i + 1)) for i in range(k)],
                                    UpBlock(base, c))
        self.label = nn.Linear(noise_dim, num_classes)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.sigmoid(self.blocks(self.stem(z[:, :, None, None])))
        if x.shape[-2:] != self.out_hw:
            x = F.interpolate(x, size=self.out_hw, mode="bilinear", align_corners=False)
        return x, torch.softmax(self.label(z), dim=-1)


def tv_squared(x: torch.Tensor) -> torch.Tensor:
    """The official code's squared TV of ``x (N, C, H, W)``: ``2·(Σ(Δ_h x)²/(C(H−1)W) + Σ(Δ_w x)²/(CH(W−1)))/N``."""
    n, c, h, w = x.shape
    dh = (x[:, :, 1:, :] - x[:, :, :-1, :]).pow(2).sum() / (c * max(1, h - 1) * w)
    dw = (x[:, :, :, 1:] - x[:, :, :, :-1]).pow(2).sum() / (c * h * max(1, w - 1))
    return 2 * (dh + dw) / n


def num_images(payload: AttackPayload) -> int:
    """The distinct images behind the update: ``batch-size`` for fedsgd, ``min(num-examples, K·B)`` for fedavg."""
    b = payload.batch_size
    if payload.train_config.mode == "fedsgd":
        return b
    return max(1, min(int(payload.num_examples), payload.local_steps * b))


def grnn(payload: AttackPayload, budget: Budget, options: AttackOptions | None = None) -> AttackResult:
    """GRNN on the server-visible update (see the module docstring).

    Args:
        payload: the update; needs the train config and ``num-examples`` (``SERVER_CONFIG``).
        budget: generator iterations per restart (default :data:`DEFAULT_ITERATIONS`), restarts, time limit, seed.
        options: ``tv`` (λ, default :data:`DEFAULT_TV`) and the adaptive matching knobs.

    Returns:
        Images ``float32 (N, C, H, W)`` in normalised space, labels ``int64 (N,)`` (argmax of the soft labels),
        the iterations run and the final ``‖g' − g‖²`` of the kept restart; ``extras["label_entropy"]`` is the
        mean entropy (nats) of its soft labels.
    """
    start = time.perf_counter()
    options = options or AttackOptions()
    model = payload.build_model(budget.device)
    device = next(model.parameters()).device
    target = matching.prepare(payload, model, options)
    params = target.needed_params
    tv = DEFAULT_TV if options.tv is None else options.tv
    n = num_images(payload)
    mean = torch.tensor(payload.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(payload.std, device=device).view(1, -1, 1, 1)
    iterations = budget.iterations or DEFAULT_ITERATIONS
    best: tuple[float, torch.Tensor, torch.Tensor] | None = None
    total = 0

    def distance(x01: torch.Tensor, soft: torch.Tensor, create_graph: bool) -> torch.Tensor:
        logp = F.log_softmax(model((x01 - mean) / std), dim=-1)
        loss = -(soft * logp).sum(-1).mean()
        grads = torch.autograd.grad(loss, params, create_graph=create_graph)
        return target.l2(grads)

    for restart in range(max(1, budget.restarts)):
        seed = int(budget.seed) * 7919 + restart
        with torch.random.fork_rng(devices=[]):  # the generator's init must not move the caller's RNG
            torch.manual_seed(seed)
            gen = Generator(payload.input_shape, payload.num_classes).to(device).train()
        z = torch.randn(n, NOISE_DIM, generator=torch.Generator().manual_seed(seed)).to(device)
        opt = torch.optim.RMSprop(gen.parameters(), lr=LR, momentum=MOMENTUM)
        for it in range(iterations):
            opt.zero_grad(set_to_none=True)
            x01, soft = gen(z)
            d2 = distance(x01, soft, True)
            loss = d2 + torch.sqrt(d2 + 1e-20) + tv * tv_squared(x01)
            loss.backward()
            opt.step()
            total += 1
            if budget.progress is not None and it % PROGRESS_EVERY == 0:
                budget.progress(it, float(loss.detach()))
            if budget.time_limit_s and time.perf_counter() - start > budget.time_limit_s:
                break
        with torch.no_grad():
            x01, soft = gen(z)
        with torch.enable_grad():
            final = float(distance(x01, soft, False).detach())
        if not math.isfinite(final):
            final = math.inf
        if best is None or final < best[0]:
            best = (final, x01.detach(), soft.detach())
        if budget.time_limit_s and time.perf_counter() - start > budget.time_limit_s:
            break
    obj, x01, soft = best
    entropy = float(-(soft * soft.clamp_min(1e-12).log()).sum(-1).mean())
    return AttackResult(((x01 - mean) / std).cpu(), soft.argmax(-1).cpu(), total, time.perf_counter() - start, obj,
                        {"label_entropy": entropy})
