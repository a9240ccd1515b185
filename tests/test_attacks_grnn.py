"""GRNN (Ren et al. 2022): the generator, its squared TV, and the recovery of a known image on DLG's LeNet."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attacker import ATTACKS, Budget
from attacker.grnn import Generator, num_images, tv_squared
from fl_sim.audit import fedsgd_payload
from fl_sim.task.contract import TrainConfig
from fl_sim.task.datasets import denormalize, to_tensor
from strategies.metrics import score


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 16, 16), (3, 20, 12)])
def test_the_generator_emits_box_images_of_the_input_shape_and_soft_labels(shape):
    gen = Generator(shape, 7)
    x, y = gen(torch.randn(3, 128))
    assert x.shape == (3, *shape) and y.shape == (3, 7)
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    torch.testing.assert_close(y.sum(-1), torch.ones(3))
    assert gen.side == max(8, 1 << int(np.ceil(np.log2(max(shape[1:])))))


def test_tv_squared_is_the_official_normalisation():
    x = torch.rand(2, 3, 5, 4, generator=torch.Generator().manual_seed(0))
    a = x.numpy().astype(np.float64)
    dh = ((a[:, :, 1:, :] - a[:, :, :-1, :]) ** 2).sum() / (3 * 4 * 4)
    dw = ((a[:, :, :, 1:] - a[:, :, :, :-1]) ** 2).sum() / (3 * 5 * 3)
    assert float(tv_squared(x)) == pytest.approx(2 * (dh + dw) / 2, rel=1e-6)
    assert float(tv_squared(torch.full((1, 1, 4, 4), 0.3))) == 0.0


def test_num_images_is_the_batch_for_fedsgd_and_the_images_used_for_fedavg(fmnist):
    x = to_tensor(fmnist.x_train[:2], fmnist.mean, fmnist.std)
    payload, _, _ = fedsgd_payload("lenet", x, torch.as_tensor(fmnist.y_train[:2]), fmnist.mean, fmnist.std)
    assert num_images(payload) == 2
    from dataclasses import replace
    assert num_images(replace(payload, num_examples=50, train_config=TrainConfig("fedavg", 0.1, 4, 3))) == 12
    assert num_images(replace(payload, num_examples=10, train_config=TrainConfig("fedavg", 0.1, 4, 3))) == 10


def test_grnn_recovers_a_known_image_on_lenet_and_its_label(fmnist):
    """A 16×16 crop of a Fashion-MNIST image on DLG's sigmoid LeNet (B = 1): 400 generator steps give > 20 dB
    (measured 22.9 dB, SSIM 0.85) and the right label, well above a constant image's score (16.8 dB, SSIM ~0)."""
    img = fmnist.x_train[[0]][:, 6:22, 6:22]
    x, y = to_tensor(img, fmnist.mean, fmnist.std), torch.as_tensor(fmnist.y_train[[0]])
    payload, _, _ = fedsgd_payload("lenet", x, y, fmnist.mean, fmnist.std)
    result = ATTACKS["grnn"].run(payload, Budget(iterations=400, seed=0))
    truth = denormalize(x, fmnist.mean, fmnist.std).numpy()
    s = score(denormalize(result.images, fmnist.mean, fmnist.std).numpy(), truth, result.labels.numpy(), y.numpy())
    chance = score(np.full_like(truth, truth.mean()), truth)
    assert s["psnr"] > 20 and s["psnr"] > chance["psnr"] + 4 and s["label_accuracy"] == 1.0
    assert s["ssim"] > 0.7 and chance["ssim"] < 0.1
    assert result.iterations == 400 and 0 <= result.extras["label_entropy"] < 0.7
