"""Label recovery for batches (B > 1): each method against the true label multisets of random batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attacker.labels import (LABEL_METHODS, class_count_accuracy, classifier_gradients, ilrg_counts,
                             label_count_accuracy, label_set_accuracy, recover_labels, round_counts)
from fl_sim.task.datasets import to_tensor
from fl_sim.task.models import build_model, classifier_layer
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


def _fedsgd_grads(ds, model_name, batch, seed, num_classes=10, random_labels=False):
    torch.manual_seed(seed)
    model = build_model(model_name, ds.input_shape, num_classes)
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(ds.y_train), batch, replace=False)
    y = rng.integers(0, num_classes, batch) if random_labels else ds.y_train[idx]
    grads = torch.autograd.grad(F.cross_entropy(model(to_tensor(ds.x_train[idx], ds.mean, ds.std)),
                                                torch.as_tensor(y)), list(model.parameters()))
    return model, list(grads), y


def test_ilrg_counts_a_batch_of_64_on_the_untrained_default_model(fmnist):
    # the bar: >= 95 % label-count accuracy at B = 64 on lenet-tanh, mean of 3 seeds (measured: 1.000, and
    # 1.000 class-count accuracy; benchmarks/bench_labels.py); iLRG's rule without the fallback reaches 0.958 / 0.600
    count, per_class, present = [], [], []
    for seed in range(3):
        model, grads, y = _fedsgd_grads(fmnist, "lenet-tanh", 64, seed)
        labels = recover_labels(model, grads, 64, "ilrg", fmnist.input_shape)
        assert labels.shape == (64,)
        count.append(label_count_accuracy(labels, y))
        per_class.append(class_count_accuracy(labels, y, 10))
        present.append(label_set_accuracy(labels, y, 10))
    assert np.mean(count) >= 0.95 and np.mean(per_class) >= 0.9 and np.mean(present) == 1.0


def test_ilrg_as_published_is_exact_with_many_classes(fmnist):
    # Ma et al. (ICLR'23) report 1.000 label-set and class-count accuracy for LeNet-5 on CIFAR-100 at K = 24
    # (BUAA-CST/iLRG logs/Experiment1); here: 100 classes, 24 random labels, the paper's rule (no fallback)
    for seed in range(2):
        model, grads, y = _fedsgd_grads(fmnist, "lenet-tanh", 24, seed, num_classes=100, random_labels=True)
        w, b = classifier_gradients(model, grads)
        counts = ilrg_counts(w, b, classifier_layer(model), 24)
        assert int(counts.sum()) == 24 and torch.equal(counts, torch.bincount(torch.as_tensor(y), minlength=100))


def test_ilrg_beats_the_dummy_mean_where_softmax_outputs_vary(fmnist):
    # sigmoid LeNet with U(-0.5, 0.5) weights: per-sample softmax outputs differ, so one mean softmax (llg) errs
    # where iLRG's per-class estimates do not (6 seeds here: 0.987 against 0.958)
    ilrg = np.mean([label_count_accuracy(recover_labels(m, g, 64, "ilrg", fmnist.input_shape), y)
                    for m, g, y in (_fedsgd_grads(fmnist, "lenet", 64, s) for s in range(3))])
    llg = np.mean([label_count_accuracy(recover_labels(m, g, 64, "llg", fmnist.input_shape), y)
                   for m, g, y in (_fedsgd_grads(fmnist, "lenet", 64, s) for s in range(3))])
    assert ilrg > llg and ilrg >= 0.97


def test_the_three_label_accuracies_on_a_hand_made_case():
    true, rec = [0, 1, 1, 3], [0, 0, 1, 2]  # counts true (1, 2, 0, 1), recovered (2, 1, 1, 0), 5 classes
    assert label_count_accuracy(rec, true) == 0.5  # min counts 1 + 1 + 0 + 0 of 4
    assert class_count_accuracy(rec, true, 5) == 0.2  # only class 4 (absent in both) is exact
    assert label_set_accuracy(rec, true, 5) == 0.6  # classes 0, 1, 4 right; 2 and 3 wrong
    assert label_count_accuracy(rec, true) == label_accuracy(np.array(rec), np.array(true))


def test_round_counts_gives_non_negative_integers_that_sum_to_the_batch():
    for raw in ([2.6, 2.6, 2.6, -1.0], [0.2, 0.2, 0.2, 0.2], [-3.0, -1.0, 9.0, 0.4], [100.0, 1.0, 1.0, 1.0]):
        counts = round_counts(torch.tensor(raw), 6)
        assert int(counts.sum()) == 6 and int(counts.min()) >= 0, (raw, counts)
    # 3 + 3 + 1 = 7 after rounding: the count rounded up the most (2.6 → 3) gives one back
    assert round_counts(torch.tensor([2.6, 2.9, 0.8]), 6).tolist() == [2, 3, 1]
