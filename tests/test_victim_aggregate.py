"""``victim=aggregate``: the attacker gets the round's FedAvg aggregate (all a server sees under secure aggregation)
and the evaluator scores against the union of the round's batches."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from conftest import make_message
from fl_sim.config import resolve, specs
from fl_sim.results import RunRecorder
from fl_sim.task.datasets import to_tensor
from fl_sim.task.keys import ConfigError
from fl_sim.task.models import build_model
from strategies.evaluator import truth_from_audit, union_audit
from strategies.strategy import CuriousFedAvg


class Grid:
    """Nodes 1..n; node i holds partition i - 1."""

    def __init__(self, n):
        self.ids = list(range(1, n + 1))

    def get_node_ids(self):
        return self.ids

    def send_and_receive(self, messages, *, timeout=None):
        return [make_message(RecordDict({"meta": ConfigRecord({"partition-id": m.metadata.dst_node_id - 1,
                                                                "num-partitions": len(self.ids)})}),
                             src_node_id=m.metadata.dst_node_id, message_type="query.whoami") for m in messages]


def _reply(state, n, pid, indices):
    return make_message(RecordDict({
        "arrays": ArrayRecord({k: v.clone() for k, v in state.items()}),
        "metrics": MetricRecord({"num-examples": n, "train-loss": 1.0, "train-time-s": 0.1, "defense-time-s": 0.0}),
        "meta": ConfigRecord({"partition-id": pid}),
        "audit": ConfigRecord({"partition-id": pid, "sample-indices": indices}),
    }), src_node_id=pid + 1)


def _strategy(tmp_path, fmnist, **overrides):
    cfg = resolve({"num-supernodes": 3, "out-dir": str(tmp_path), "run-name": "r", "victim": "aggregate",
                   "attack-every": 1, "lr-schedule": "constant", "lr": 0.1, **overrides})
    strat = CuriousFedAvg(specs(cfg).server, fmnist, RunRecorder(tmp_path / "r", cfg))
    torch.manual_seed(0)
    model = build_model(cfg["model"], fmnist.input_shape, fmnist.num_classes)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    strat.configure_train(1, ArrayRecord(state), ConfigRecord(), Grid(3))
    return strat, model, state


def _spy(strat, seen):
    plan = strat.spec.attack
    real = plan.attack.run

    def run(payload, budget, options=None):
        seen.append(payload)
        return real(payload, budget, options)

    strat.spec = dataclasses.replace(strat.spec, attack=dataclasses.replace(
        plan, attack=dataclasses.replace(plan.attack, run=run)))


def _sgd_step(model, state, fmnist, idx, lr=0.1):
    """The state after one plain SGD step of ``model`` (at ``state``) on the samples ``idx``."""
    model.load_state_dict(state)
    x = to_tensor(fmnist.x_train[idx], fmnist.mean, fmnist.std)
    loss = F.cross_entropy(model(x), torch.as_tensor(fmnist.y_train[idx]))
    grads = torch.autograd.grad(loss, list(model.parameters()))
    out = {k: v.clone() for k, v in state.items()}
    for (n, _), g in zip(model.named_parameters(), grads):
        out[n] = state[n] - lr * g
    return out


def test_the_victim_key_takes_aggregate_and_names_it_when_refusing():
    assert resolve({"victim": "aggregate"})["victim"] == "aggregate"
    with pytest.raises(ConfigError, match=r"victim='aggregat' is not allowed.*'aggregate'"):
        resolve({"victim": "aggregat"})


def test_union_audit_keeps_every_clients_samples_in_order(fmnist):
    union = union_audit([{"sample-indices": [5, 9]}, {"sample-indices": [1]}, {"sample-indices": [7, 5]}])
    assert union == {"sample-indices": [5, 9, 1, 7, 5]}
    images, labels = truth_from_audit(fmnist, union)
    assert len(images) == 4 and list(labels) == list(fmnist.y_train[[5, 9, 1, 7]])


def test_the_aggregate_payload_is_the_weighted_mean_update_with_the_union_batch(tmp_path, fmnist):
    """fedavg, 1 local step of B = 2, partitions of 2, 4 and 6 examples: the update is Σ n_i Δ_i / Σ n_i, the
    num-examples 12, the batch the union of the three steps' batches (6 images), the truth those 6 samples."""
    strat, model, state = _strategy(tmp_path, fmnist, **{"mode": "fedavg", "local-steps": 1, "batch-size": 2,
                                                         "attack": "ig", "attack-iterations": 2})
    seen = []
    _spy(strat, seen)
    g = torch.Generator().manual_seed(1)
    deltas = [{n: 1e-3 * torch.randn(p.shape, generator=g) for n, p in model.named_parameters()} for _ in range(3)]
    sizes, batches = [2, 4, 6], [[10, 11], [20, 21], [30, 31]]
    replies = [_reply({k: v + d.get(k, 0) for k, v in state.items()}, n, pid, idx)
               for pid, (d, n, idx) in enumerate(zip(deltas, sizes, batches))]
    strat.aggregate_train(1, replies)
    (p,) = seen
    assert p.num_examples == 12 and p.train_config.batch_size == 6 and p.local_steps == 1
    assert p.train_config.lr == 0.1 and p.train_config.mode == "fedavg"
    for n in p.update:
        expected = sum(s * d[n] for s, d in zip(sizes, deltas)) / 12
        torch.testing.assert_close(p.update[n], expected, rtol=1e-4, atol=1e-7)
    record = strat.last_record["attacks"][0]
    assert record["client"] == "aggregate" and record["num_images"] == 6
    assert sorted(record["true_labels"]) == sorted(fmnist.y_train[sum(batches, [])].tolist())


def test_a_fedsgd_aggregate_is_one_gradient_on_the_union_and_ig_recovers_it(tmp_path, fmnist):
    """Three FedSGD clients of one image each: the aggregate's gradient is the mean-loss gradient of the three
    images together (exactly, up to float32), and IG on it recovers the three images, scored against all three."""
    strat, model, state = _strategy(tmp_path, fmnist, **{"attack": "ig", "attack-iterations": 300})
    seen = []
    _spy(strat, seen)
    samples = [[3], [10], [17]]
    replies = [_reply(_sgd_step(model, state, fmnist, idx), 1, pid, idx) for pid, idx in enumerate(samples)]
    strat.aggregate_train(1, replies)
    (p,) = seen
    assert p.num_examples == 3 and p.batch_size == 3 and p.local_steps == 1
    model.load_state_dict(state)
    idx = sum(samples, [])
    loss = F.cross_entropy(model(to_tensor(fmnist.x_train[idx], fmnist.mean, fmnist.std)),
                           torch.as_tensor(fmnist.y_train[idx]))
    union_grad = torch.autograd.grad(loss, list(model.parameters()))
    for got, want in zip(p.gradients(build_model("lenet-tanh", fmnist.input_shape, fmnist.num_classes)),
                         union_grad):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=2e-5)
    record = strat.last_record["attacks"][0]
    assert record["num_images"] == 3 and record["client"] == "aggregate"
    assert record["psnr"] > 20 and record["label_accuracy"] == 1.0


def test_fl_sim_run_attacks_the_aggregate(tmp_path):
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "fl_sim.cli", "run", "victim=aggregate", "attack=ig",
                          "num-supernodes=3", "num-server-rounds=1", "attack-every=1", "attack-iterations=20", "node-timeout=600",
                          "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    (attack,) = json.loads((out / "summary.json").read_text())["attacks"]
    assert attack["client"] == "aggregate" and attack["attack"] == "ig" and "psnr" in attack
    rounds = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rounds[0]["attacks"][0]["num_images"] == 3
