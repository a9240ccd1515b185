"""The honest-but-curious FedAvg: aggregation is FedAvg's, the attacker gets only server-visible data."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from conftest import make_message
from fl_sim.config import resolve, specs
from fl_sim.results import RunRecorder
from fl_sim.task.models import build_model
from strategies.strategy import CuriousFedAvg


def lr_at(cfg, server_round):
    """The learning rate the server sends in ``server_round`` under ``cfg``'s schedule."""
    return specs(cfg).server.server.lr_at(cfg["lr"], server_round)


def replace_attack_run(strat, run):
    """Give ``strat``'s attack plan the attack function ``run`` (same threat model and options)."""
    plan = strat.spec.attack
    strat.spec = dataclasses.replace(strat.spec, attack=dataclasses.replace(
        plan, attack=dataclasses.replace(plan.attack, run=run)))


class FakeGrid:
    """Nodes 1..n; node i holds partition i - 1 (answers the server's ``query.whoami``)."""

    def __init__(self, n):
        self.ids = list(range(1, n + 1))

    def get_node_ids(self):
        return self.ids

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for m in messages:
            assert m.metadata.message_type == "query.whoami"
            meta = ConfigRecord({"partition-id": m.metadata.dst_node_id - 1, "num-partitions": len(self.ids)})
            out.append(make_message(RecordDict({"meta": meta}), src_node_id=m.metadata.dst_node_id,
                                    message_type="query.whoami"))
        return out


def reply(state, n, pid, indices=None):
    content = RecordDict({
        "arrays": ArrayRecord({k: v.clone() for k, v in state.items()}),
        "metrics": MetricRecord({"num-examples": n, "train-loss": 1.0, "train-time-s": 0.1, "defense-time-s": 0.0}),
        "meta": ConfigRecord({"partition-id": pid}),
    })
    if indices is not None:
        content["audit"] = ConfigRecord({"partition-id": pid, "sample-indices": indices})
    return make_message(content, src_node_id=pid + 1)


def assert_same_payload(a, b):
    """Every field of two attack payloads equal, tensors bit for bit."""
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, dict):
            assert set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x), f.name
        else:
            assert x == y, f.name


def strategy_for(tmp_path, fmnist, **overrides):
    cfg = resolve({"num-supernodes": 3, "out-dir": str(tmp_path), "run-name": "r", **overrides})
    rec = RunRecorder(tmp_path / "r", cfg)
    return CuriousFedAvg(specs(cfg).server, fmnist, rec), cfg


def test_aggregate_is_the_example_weighted_mean(tmp_path, fmnist):
    strat, cfg = strategy_for(tmp_path, fmnist, **{"attack-every": 0})
    model = build_model(cfg["model"], fmnist.input_shape, fmnist.num_classes)
    glob = ArrayRecord(model.state_dict())
    strat.configure_train(1, glob, ConfigRecord({"mode": "fedsgd", "lr": 0.1, "batch-size": 1}), FakeGrid(3))
    g = torch.Generator().manual_seed(0)
    states = [{k: torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()} for _ in range(3)]
    weights = [1, 3, 6]
    arrays, _ = strat.aggregate_train(1, [reply(s, w, i) for i, (s, w) in enumerate(zip(states, weights))])
    out = arrays.to_torch_state_dict()
    for k in out:
        expected = sum(w * s[k] for s, w in zip(states, weights)) / sum(weights)
        torch.testing.assert_close(out[k], expected, rtol=1e-5, atol=1e-6)


def test_attacker_gets_server_view_and_evaluator_gets_truth(tmp_path, fmnist):
    strat, cfg = strategy_for(tmp_path, fmnist, **{"attack-every": 1, "victim": "1", "attack-iterations": 50,
                                                 "lr": 0.1, "lr-schedule": "constant"})
    torch.manual_seed(0)
    model = build_model(cfg["model"], fmnist.input_shape, fmnist.num_classes)
    glob_state = {k: v.clone() for k, v in model.state_dict().items()}
    sent = ConfigRecord({"mode": "fedsgd", "lr": 0.1, "batch-size": 1, "local-steps": 0, "local-epochs": 1})
    strat.configure_train(1, ArrayRecord(glob_state), sent, FakeGrid(3))
    # client 1 takes one SGD step on sample 42
    from fl_sim.task.datasets import to_tensor

    x = to_tensor(fmnist.x_train[[42]], fmnist.mean, fmnist.std)
    loss = torch.nn.functional.cross_entropy(model(x), torch.as_tensor(fmnist.y_train[[42]]))
    grads = torch.autograd.grad(loss, list(model.parameters()))
    stepped = {k: v.clone() for k, v in glob_state.items()}
    for (n, _), gr in zip(model.named_parameters(), grads):
        stepped[n] = glob_state[n] - 0.1 * gr
    seen = {}
    real_run = strat.spec.attack.attack.run

    def spy(payload, budget, options=None):
        seen["payload"] = payload
        return real_run(payload, budget, options)

    replace_attack_run(strat, spy)
    replies = [reply(glob_state, 1, 0, [1]), reply(stepped, 1, 1, [42]), reply(glob_state, 1, 2, [2])]
    strat.aggregate_train(1, replies)
    p = seen["payload"]
    assert p.num_examples == 1 and p.train_config.lr == 0.1
    # the payload's values do not depend on the audit record: another sample index, or no audit record at all,
    # gives a bit-identical payload (the evaluator alone reads the indices)
    for other in (reply(stepped, 1, 1, [7]), reply(stepped, 1, 1)):
        assert_same_payload(strat.payload(other), strat.payload(replies[1]))
    torch.testing.assert_close(p.update["fc.bias"], stepped["fc.bias"] - glob_state["fc.bias"])
    record = strat.last_record["attacks"][0]
    assert record["client"] == "1"
    assert record["psnr"] > 30 and record["label_accuracy"] == 1.0
    assert (tmp_path / "r" / record["image"]).is_file()


def test_victim_not_sampled_means_no_attack(tmp_path, fmnist):
    strat, cfg = strategy_for(tmp_path, fmnist, **{"attack-every": 1, "victim": "2"})
    model = build_model(cfg["model"], fmnist.input_shape, fmnist.num_classes)
    state = model.state_dict()
    strat.configure_train(1, ArrayRecord(state), ConfigRecord({"mode": "fedsgd", "lr": 0.1, "batch-size": 1}),
                          FakeGrid(3))
    strat.aggregate_train(1, [reply(state, 1, 0, [0]), reply(state, 1, 1, [1])])
    assert strat.last_record["attacks"] == []


def test_cosine_schedule():
    cfg = resolve({"lr": 0.2, "num-server-rounds": 10})
    assert lr_at(cfg, 1) == 0.2 and np.isclose(lr_at(cfg, 6), 0.1) and lr_at(cfg, 10) < 0.01
    assert lr_at(resolve({"lr-schedule": "constant"}), 50) == resolve()["lr"]


def test_aggregate_keeps_integer_buffers_integer(tmp_path, fmnist):
    """BatchNorm's int64 num_batches_tracked stays int64 after FedAvg, so round 2's replies still pass the checks."""
    strat, cfg = strategy_for(tmp_path, fmnist, **{"attack-every": 0, "model": "lenet-kl"})
    model = build_model("lenet-kl", fmnist.input_shape, fmnist.num_classes)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ints = [k for k, v in state.items() if not v.is_floating_point()]
    assert ints, "lenet-kl should have an integer BatchNorm buffer"
    arrays = ArrayRecord(state)
    for rnd in (1, 2):
        strat.configure_train(rnd, arrays, ConfigRecord({"mode": "fedsgd", "lr": 0.1, "batch-size": 1}), FakeGrid(3))
        sent = arrays.to_torch_state_dict()
        replies = []
        for pid in range(3):
            s = {k: (v + pid if k in ints else v * (1 + pid)) for k, v in sent.items()}
            replies.append(reply(s, 1, pid))
        arrays, _ = strat.aggregate_train(rnd, replies)
        assert arrays is not None and strat.last_record["failures"] == [], strat.last_record["failures"]
        out = arrays.to_torch_state_dict()
        for k in ints:
            assert out[k].dtype == torch.int64 and int(out[k]) == int(sent[k]) + 1


def test_defense_metrics_are_copied_into_the_client_records_and_undeclared_ones_drop_the_reply(tmp_path, fmnist):
    """The metrics the defense declares land in the client's record (``-`` → ``_``); a reply with a metric the
    defense does not declare (or without one it does) is dropped with its reason, not averaged by FedAvg."""
    strat, cfg = strategy_for(tmp_path, fmnist, **{"attack-every": 0, "defense": "dp-gaussian"})
    state = build_model(cfg["model"], fmnist.input_shape, fmnist.num_classes).state_dict()
    strat.configure_train(1, ArrayRecord(state), ConfigRecord(), FakeGrid(3))
    replies = [reply(state, 1, pid) for pid in range(3)]
    for pid, msg in enumerate(replies):
        msg.content["metrics"]["dp-epsilon"] = 2.5 + pid
        msg.content["metrics"]["dp-releases"] = 1
    replies[2].content["metrics"]["toy-score"] = 7
    strat.aggregate_train(1, replies)
    clients = {c["partition_id"]: c for c in strat.last_record["clients"]}
    assert sorted(clients) == ["0", "1"]
    standard = {"partition_id", "num_examples", "train_loss", "train_time_s", "defense_time_s"}
    for pid in range(2):
        c = clients[str(pid)]
        assert set(c) == standard | {"dp_epsilon", "dp_releases"}, c
        assert c["dp_epsilon"] == 2.5 + pid and c["num_examples"] == 1 and c["train_loss"] == 1.0
    (failure,) = strat.last_record["failures"]
    assert failure["partition_id"] == 2 and "toy-score" in failure["reason"] and "not declared" in failure["reason"]


def test_fedavg_arrays_gives_flowers_aggregate_bit_for_bit():
    """``strategies.rounds.fedavg_arrays`` decodes the replies faster but computes Flower 1.42's
    ``aggregate_arrayrecords``: the same dtype, shape and bytes for every array (floats, an integer buffer, a
    scalar), with integer and float weights."""
    from flwr.app import Array
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from strategies.rounds import fedavg_arrays

    rng = np.random.default_rng(3)
    for weights in ([1, 7, 3, 250], [0.5, 2.25, 1e-3, 9.0]):
        records = [RecordDict({
            "arrays": ArrayRecord({"w": Array(rng.standard_normal((6, 5)).astype(np.float32)),
                                   "b": Array(rng.standard_normal(5).astype(np.float32)),
                                   "n": Array(np.asarray(rng.integers(0, 1000), dtype=np.int64)),
                                   "d": Array(rng.standard_normal(3))}),
            "metrics": MetricRecord({"num-examples": w, "train-loss": float(i)}),
        }) for i, w in enumerate(weights)]
        ours, flowers = fedavg_arrays(records, "num-examples"), aggregate_arrayrecords(records, "num-examples")
        assert list(ours.keys()) == list(flowers.keys())
        for k in flowers.keys():
            a, b = ours[k].numpy(), flowers[k].numpy()
            assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), k
