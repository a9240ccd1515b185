"""Label recovery for batches (B > 1): each method against the true label multisets of random batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attacker.labels import LABEL_METHODS, recover_labels
from fl_sim.task.datasets import to_tensor
from fl_sim.task.models import build_model
from strategies.metrics import label_accuracy


def mean_accuracy(ds, model_name, batch, method, draws=10):
    rng = np.random.default_rng(1)
    accs = []
    for t in range(draws):
        torch.manual_seed(t)
        model = build_model(model_name, ds.input_shape, ds.num_classes)
        idx = rng.choice(len(ds.y_train), batch, replace=False)
        y = ds.y_train[idx]
        grads = torch.autograd.grad(F.cross_entropy(model(to_tensor(ds.x_train[idx], ds.mean, ds.std)),
                                                    torch.as_tensor(y)), list(model.parameters()))
        labels = recover_labels(model, list(grads), batch, method, ds.input_shape)
        assert labels.shape == (batch,) and labels.dtype == torch.long
        accs.append(label_accuracy(labels.numpy(), y))
    return float(np.mean(accs))


def test_default_method_recovers_batch_labels_with_repeats(fmnist):
    # batches of 8 from 10 classes almost always repeat a label; sigmoid LeNet, where one-unit counting errs
    auto = mean_accuracy(fmnist, "lenet", 8, "auto")
    bias = mean_accuracy(fmnist, "lenet", 8, "bias")
    assert auto >= 0.9 and auto >= bias


@pytest.mark.parametrize("method", sorted(LABEL_METHODS))
def test_every_method_beats_chance(fmnist, method):
    # a random guess of 8 labels out of 10 classes matches ~half of a random batch's multiset
    assert mean_accuracy(fmnist, "lenet-tanh", 8, method, draws=5) >= 0.65


def test_unknown_method_is_an_error(fmnist):
    model = build_model("lenet", fmnist.input_shape, 10)
    with pytest.raises(KeyError, match="unknown label method"):
        recover_labels(model, [torch.zeros_like(p) for p in model.parameters()], 2, "nope", fmnist.input_shape)
