"""Dimitrov et al. (TMLR'22) on whole multi-epoch FedAvg updates: the step plan matches the client's schedule, the
epoch-order-invariant prior is order-invariant, the passes' copies are matched and averaged, and a real client's
2-epoch update is recovered image by image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attacker.dimitrov import average_passes, distinct_arrangements, invariant_prior, pass_labels, plan
from attacker.payload import AttackPayload
from clients.training import batch_schedule
from fl_sim.audit import audit_dataset, run_audit
from fl_sim.config import resolve
from fl_sim.task.contract import TrainConfig


def _payload(train_config: TrainConfig, n: int) -> AttackPayload:
    return AttackPayload("lenet-tanh", (1, 28, 28), 10, (0.5,), (0.5,), {}, {}, n, train_config)


@pytest.mark.parametrize("n,b,epochs,steps", [(10, 4, 2, 0), (8, 2, 1, 3), (8, 2, 1, 6), (8, 2, 1, 8), (12, 3, 3, 0)])
def test_the_plan_has_the_clients_steps_and_batch_sizes(n, b, epochs, steps):
    tc = TrainConfig("fedavg", 0.1, b, steps, epochs)
    pl = plan(_payload(tc, n))
    client = batch_schedule(np.arange(n), tc, np.random.default_rng(0))
    assert len(pl.steps) == len(client) == tc.steps(n)
    assert [z - a for _, a, z in pl.steps] == [len(c) for c in client]
    assert pl.num_images == len(set(np.concatenate(client).tolist()))
    # a pass's variables are the images the client's pass used: pass p of the plan ↔ the client's p-th reshuffle
    for p, size in enumerate(pl.passes):
        used = [c for (q, _, _), c in zip(pl.steps, client) if q == p]
        assert len(np.concatenate(used)) == size and len(set(np.concatenate(used).tolist())) == size


def test_the_plan_refuses_passes_over_a_partition_the_batch_does_not_divide_and_fedsgd_is_one_step():
    with pytest.raises(ValueError, match="local-epochs"):
        plan(_payload(TrainConfig("fedavg", 0.1, 2, 6), 9))
    pl = plan(_payload(TrainConfig("fedsgd", 0.1, 4), 4))
    assert pl.passes == (4,) and pl.steps == ((0, 0, 4),)


def test_pass_labels_give_every_full_pass_the_restored_multiset():
    pl = plan(_payload(TrainConfig("fedavg", 0.1, 2, 6), 8))  # passes of 8 and 4 images
    labels = [3, 1, 1, 7, 0, 9, 3, 3]
    out = pass_labels(labels, pl, seed=0)
    assert len(out) == 12 and sorted(out[:8].tolist()) == sorted(labels)
    assert set(out[8:].tolist()) <= set(labels)
    assert not torch.equal(out[:8], torch.tensor(sorted(labels)))  # a random arrangement, not the sorted one


def test_distinct_arrangements_differ_in_which_labels_share_a_batch():
    pl = plan(_payload(TrainConfig("fedavg", 0.1, 2, 0, 2), 4))  # 2 passes of 2 batches of 2
    out = distinct_arrangements([0, 1, 2, 3], pl, 10, seed=0)
    keys = {tuple(tuple(sorted(a[i:i + 2].tolist())) for i in range(0, 8, 2)) for a in out}
    assert len(out) == 10 and len(keys) == 10  # 6 ordered pairings per pass, 36 in all: 10 distinct ones
    one_batch = plan(_payload(TrainConfig("fedavg", 0.1, 4, 0, 3), 4))  # each pass is one batch of all 4
    assert len(distinct_arrangements([0, 1, 2, 3], one_batch, 50, seed=0)) == 1


def test_the_invariant_prior_ignores_the_order_within_a_pass_and_sees_a_different_set():
    pl = plan(_payload(TrainConfig("fedavg", 0.1, 2, 0, 3), 6))  # 3 passes of 6
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(6, 4, 5, 5, generator=g)
    same = torch.cat([imgs, imgs[torch.randperm(6, generator=g)], imgs.flip(0)])
    assert float(invariant_prior(same, pl)) < 1e-12
    other = same.clone()
    other[6] += 1.0  # one image of pass 1 differs
    assert float(invariant_prior(other, pl)) > 1e-3


def test_average_passes_matches_copies_by_label_and_averages_them():
    pl = plan(_payload(TrainConfig("fedavg", 0.1, 2, 0, 3), 4))
    g = torch.Generator().manual_seed(0)
    truth = torch.randn(4, 1, 6, 6, generator=g)
    labels0 = torch.tensor([0, 1, 2, 3])
    perm1, perm2 = torch.tensor([2, 0, 3, 1]), torch.tensor([3, 2, 1, 0])
    noise = [0.3 * torch.randn(4, 1, 6, 6, generator=g) for _ in range(3)]
    x = torch.cat([truth + noise[0], truth[perm1] + noise[1], truth[perm2] + noise[2]])
    labels = torch.cat([labels0, labels0[perm1], labels0[perm2]])
    images, copy_mse = average_passes(x, labels, pl)
    expected = (truth * 3 + noise[0] + noise[1][torch.argsort(perm1)] + noise[2][torch.argsort(perm2)]) / 3
    torch.testing.assert_close(images, expected)
    assert float((images - truth).pow(2).mean()) < float(noise[0].pow(2).mean())  # averaging removed noise
    assert 0 < copy_mse < 1.0


def test_dimitrov_recovers_a_real_two_epoch_update_one_to_one(fmnist):
    """The client pipeline trains 2 epochs over 4 images in batches of 2, reshuffled each epoch (4 local steps);
    the attack reconstructs the 4 images and is scored one-to-one against them. At lr 0.01 (the paper's regime is
    0.004) 200 iterations gave 21.9 dB, labels exact, copies' MSE 0.04; at fl-sim's default 0.15 the trajectory
    depends strongly on which images share a batch and the same budget gives ~14 dB."""
    idx = np.arange(100, 104)
    cfg = resolve({"attack": "dimitrov", "mode": "fedavg", "local-epochs": 2, "batch-size": 2,
                   "attack-iterations": 200, "attack-time-limit": 0, "lr": 0.01})
    record = run_audit(cfg, audit_dataset("fashion-mnist", fmnist.x_train[idx], fmnist.y_train[idx]))
    assert record["num_images"] == 4 and record["extras"]["passes"] == 2 and record["extras"]["local_steps"] == 4
    assert record["label_accuracy"] == 1.0 and record["psnr"] > 19
    # the copies of an image found in the two epochs agree far better than two unrelated images would
    assert record["extras"]["copy_mse"] < 0.15


def test_the_prior_is_active_only_with_two_full_passes():
    one = plan(_payload(TrainConfig("fedavg", 0.1, 2, 3), 8))  # one pass of 6 of the 8 images
    assert one.passes == (6,) and float(invariant_prior(torch.randn(6, 2, 3, 3), one)) == 0.0
    partial = plan(_payload(TrainConfig("fedavg", 0.1, 2, 6), 8))  # a full pass of 8, then 4 of them
    assert partial.passes == (8, 4) and partial.full_passes == [0]
    assert float(invariant_prior(torch.randn(12, 2, 3, 3), partial)) == 0.0
    assert plan(_payload(TrainConfig("fedavg", 0.1, 2, 0, 2), 4)).full_passes == [0, 1]
