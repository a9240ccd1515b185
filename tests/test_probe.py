"""The ``probe`` attack target: the victim's defended one-image gradient, asked for with a ``query.probe`` message.

Most tests run the real ClientApp handlers (``clients.client_app.train``/``whoami``/``probe``) behind a small
in-process Grid (one persistent ``Context`` per node, as Flower keeps them), so the whole message loop — strategy,
contract, client pipeline, defense, evaluator — runs without Ray. They check that the probe is the defended
one-image FedSGD step of an image the victim used, that it is recorded next to the update's attack, and that it
never feeds training: the client's state (DP release counters, GradDefense's cached sensitivities, FedKL's lock
layers, DP-SGD's step count) and the next round's reply are what they would have been without it.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

import clients.client_app as ca
from clients import secrets
from fl_sim.config import ConfigError, resolve, specs
from fl_sim.report import write_run_report
from fl_sim.results import RunRecorder, read_metrics, summarize
from fl_sim.task import contract
from fl_sim.task.datasets import load_dataset, to_tensor
from fl_sim.task.models import build_model
from fl_sim.task.partition import partitions
from strategies.strategy import CuriousFedAvg

HANDLERS = {"train": ca.train, contract.WHOAMI: ca.whoami, contract.PROBE: ca.probe}


class LocalGrid:
    """Nodes 1..n running the real ClientApp handlers in this process; node i holds partition i - 1.

    ``drop_probes`` answers no ``query.probe`` (a client that does not reply in time).
    """

    def __init__(self, cfg, n, drop_probes=False):
        self.contexts = {i: Context(run_id=1, node_id=i, node_config={  # fixed node secrets: twin federations agree
            "partition-id": i - 1, "num-partitions": n, secrets.NODE_SECRET_KEY: secrets.node_secret(7, i - 1)},
            state=RecordDict(), run_config=dict(cfg)) for i in range(1, n + 1)}
        self.drop_probes = drop_probes
        self.sent: list[Message] = []

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for m in messages:
            self.sent.append(m)
            kind = m.metadata.message_type
            if kind == contract.PROBE and self.drop_probes:
                continue
            out.append(HANDLERS[kind](m, self.contexts[m.metadata.dst_node_id]))
        return out


BASE = {"num-supernodes": 3, "mode": "fedsgd", "batch-size": 2, "attack": "idlg",
        "attack-iterations": 1, "attack-every": 1, "victim": "0", "lr": 0.1, "lr-schedule": "constant"}


def federation(tmp_path, name, **overrides):
    cfg = resolve({**BASE, "out-dir": str(tmp_path), "run-name": name, **overrides})
    data = load_dataset(cfg["dataset"], cfg["data-dir"])
    strat = CuriousFedAvg(specs(cfg).server, data, RunRecorder(tmp_path / name, cfg))
    return cfg, data, strat


def run_rounds(cfg, data, strat, grid, rounds):
    """Drive ``rounds`` rounds as Flower's FedAvg.start does (configure, send, aggregate, evaluate)."""
    torch.manual_seed(cfg["seed"])
    arrays = ArrayRecord(build_model(cfg["model"], data.input_shape, data.num_classes).state_dict())
    for rnd in range(1, rounds + 1):
        messages = strat.configure_train(rnd, arrays, ConfigRecord(), grid)
        arrays, _ = strat.aggregate_train(rnd, grid.send_and_receive(messages))
        strat.evaluate_round(rnd, arrays)
    return arrays


# --- the contract and the key ---------------------------------------------------------------------------------------
def test_probe_request_round_trips_and_is_one_image_fedsgd():
    tc = contract.probe_train_config(0.07, 4)
    assert (tc.mode, tc.batch_size, tc.lr, tc.server_round, tc.steps(1)) == ("fedsgd", 1, 0.07, 4, 1)
    content = contract.probe_request(ArrayRecord({"w": torch.ones(2)}), tc, 123)
    assert contract.read_probe_request(content) == (tc, 123)
    with pytest.raises(ValueError, match="one FedSGD step on one image"):
        contract.probe_request(ArrayRecord({"w": torch.ones(2)}), dataclasses.replace(tc, batch_size=4), 1)
    del content[contract.PROBE_RECORD]
    with pytest.raises(ValueError, match="'probe' is missing"):
        contract.read_probe_request(content)


def test_attack_target_key():
    assert specs(resolve({"attack-target": "both"})).server.server.targets == ("update", "probe")
    assert specs(resolve({})).server.server.targets == ("update",)
    with pytest.raises(ConfigError, match="attack-target='all' is not allowed.*both, probe, update"):
        resolve({"attack-target": "all"})
    with pytest.raises(ConfigError, match="attack-target='probe' is not allowed with audit=false"):
        resolve({"attack-target": "probe", "audit": False})


# --- the client side ------------------------------------------------------------------------------------------------
def client(cfg, pid=0, n=3, secret=12345):
    """A client's Context with a fixed node secret (twin clients make the same private draws)."""
    return Context(run_id=1, node_id=pid + 1,
                   node_config={"partition-id": pid, "num-partitions": n, secrets.NODE_SECRET_KEY: secret},
                   state=RecordDict(), run_config=dict(cfg))


def train_message(cfg, data, arrays, rnd):
    tc = specs(cfg).server.task.train_config(cfg["lr"], rnd)
    return Message(RecordDict({contract.ARRAYS: arrays, contract.CONFIG: tc.to_record()}), dst_node_id=1,
                   message_type="train")


def probe_message(cfg, arrays, rnd, index):
    return Message(contract.probe_request(arrays, contract.probe_train_config(cfg["lr"], rnd), index),
                   dst_node_id=1, message_type=contract.PROBE)


def state_snapshot(state: RecordDict) -> dict:
    """Everything in a Context.state, as comparable Python values (arrays as numpy)."""
    out = {}
    for name, rec in state.items():
        if isinstance(rec, ArrayRecord):
            out[name] = {k: v.numpy().copy() for k, v in rec.items()}
        else:
            out[name] = {k: copy.deepcopy(v) for k, v in dict(rec).items()}
    return out


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        for k in a[name]:
            np.testing.assert_array_equal(np.asarray(a[name][k]), np.asarray(b[name][k]), err_msg=f"{name}.{k}")


def arrays_of(msg):
    return msg.content[contract.ARRAYS].to_torch_state_dict()


STATEFUL = {  # defense settings whose client state (or, for Soteria, its per-round mask cache) a probe could disturb
    "graddefense": {"defense": "graddefense", "defense-gd-sensitivity-every": 2},
    "dp-gaussian": {"defense": "dp-gaussian", "defense-dp-accountant": "rdp"},
    "dp-sgd": {"defense": "dp-sgd", "defense-dp-noise-multiplier": 1.0, "defense-dp-accountant": "rdp"},
    "fedkl": {"defense": "fedkl", "model": "lenet-kl"},
    "soteria-per-round": {"defense": "soteria", "defense-soteria-every": 0},
}
NO_STATE = {"soteria-per-round"}


@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_probe_leaves_the_client_state_and_training_as_they_were(fmnist, name):
    """Train round 1, probe, train rounds 2 and 3 on one client; the same without the probe on a twin client: the
    state after the probe equals the state before it, and the later replies (arrays and metrics: DP releases and ε,
    GradDefense's sensitivities recomputed on schedule at round 3) are bit-identical."""
    cfg = resolve({**BASE, **STATEFUL[name], "num-supernodes": 3})
    torch.manual_seed(0)
    arrays = ArrayRecord(build_model(cfg["model"], fmnist.input_shape, fmnist.num_classes).state_dict())
    probed, plain = client(cfg), client(cfg)
    first = ca.train(train_message(cfg, fmnist, arrays, 1), probed)
    ca.train(train_message(cfg, fmnist, arrays, 1), plain)
    before = state_snapshot(probed.state)
    assert bool(before) != (name in NO_STATE), f"{name}: unexpected client state {sorted(before)}"
    used = list(first.content[contract.AUDIT][contract.SAMPLE_INDICES])  # dp-sgd's Poisson batch may be empty
    index = int(used[0]) if used else int(partitions(fmnist.name, "", 3, "iid", 0.5, 0)[0][0])
    reply = ca.probe(probe_message(cfg, arrays, 1, index), probed)
    assert not reply.has_error(), reply.error
    assert_same_state(state_snapshot(probed.state), before)
    for rnd in (2, 3):
        a = ca.train(train_message(cfg, fmnist, arrays, rnd), probed)
        b = ca.train(train_message(cfg, fmnist, arrays, rnd), plain)
        for k, v in arrays_of(a).items():
            torch.testing.assert_close(v, arrays_of(b)[k], rtol=0, atol=0)
        assert dict(contract.reply_metrics(a)).keys() == dict(contract.reply_metrics(b)).keys()
        for k, v in contract.reply_metrics(a).items():
            if not k.endswith("time-s"):
                assert v == contract.reply_metrics(b)[k], k
    assert_same_state(state_snapshot(probed.state), state_snapshot(plain.state))


def test_probe_is_the_one_image_step_and_carries_its_audit_record(fmnist):
    cfg = resolve({**BASE})
    torch.manual_seed(0)
    model = build_model(cfg["model"], fmnist.input_shape, fmnist.num_classes)
    arrays = ArrayRecord(model.state_dict())
    part = partitions(fmnist.name, "", 3, "iid", 0.5, 0)[0]
    index = int(part[5])
    reply = ca.probe(probe_message(cfg, arrays, 2, index), client(cfg))
    assert contract.reply_partition(reply) == "0"
    assert list(reply.content[contract.AUDIT][contract.SAMPLE_INDICES]) == [index]
    assert contract.reply_metrics(reply)[contract.NUM_EXAMPLES] == 1
    x = to_tensor(fmnist.x_train[[index]], fmnist.mean, fmnist.std)
    grads = torch.autograd.grad(F.cross_entropy(model(x), torch.as_tensor(fmnist.y_train[[index]])),
                                list(model.parameters()))
    got = arrays_of(reply)
    for (n, p), g in zip(model.named_parameters(), grads):
        torch.testing.assert_close(got[n], p.detach() - cfg["lr"] * g, rtol=1e-5, atol=1e-7)


def test_probe_applies_the_defense(fmnist):
    cfg = resolve({**BASE, "defense": "prune", "defense-prune-rate": 90.0})
    torch.manual_seed(0)
    model = build_model(cfg["model"], fmnist.input_shape, fmnist.num_classes)
    glob = {k: v.clone() for k, v in model.state_dict().items()}
    index = int(partitions(fmnist.name, "", 3, "iid", 0.5, 0)[0][0])
    got = arrays_of(ca.probe(probe_message(cfg, ArrayRecord(model.state_dict()), 1, index), client(cfg)))
    for n, _ in model.named_parameters():
        delta = got[n] - glob[n]
        if delta.numel() >= 100:  # 90% of each tensor's entries zeroed by the defense
            assert (delta == 0).float().mean() >= 0.89, n


def test_probe_of_a_foreign_image_is_refused(fmnist):
    cfg = resolve({**BASE})
    arrays = ArrayRecord(build_model(cfg["model"], fmnist.input_shape, fmnist.num_classes).state_dict())
    other = int(partitions(fmnist.name, "", 3, "iid", 0.5, 0)[1][0])
    with pytest.raises(ValueError, match=f"probe of sample {other}: not in partition 0"):
        ca.probe(probe_message(cfg, arrays, 1, other), client(cfg))


# --- the server side ------------------------------------------------------------------------------------------------
def test_both_targets_are_recorded_side_by_side_and_the_probe_never_feeds_training(tmp_path):
    cfg, data, strat = federation(tmp_path, "both", **{"attack-target": "both"})
    seen = []
    real = strat.spec.attack.attack.run

    def spy(payload, budget, options=None):
        seen.append(payload)
        return real(payload, budget, options)

    strat.spec = dataclasses.replace(strat.spec, attack=dataclasses.replace(
        strat.spec.attack, attack=dataclasses.replace(strat.spec.attack.attack, run=spy)))
    grid = LocalGrid(cfg, 3)
    both = run_rounds(cfg, data, strat, grid, 2)
    _, _, plain_strat = federation(tmp_path, "update")
    plain = run_rounds(cfg, data, plain_strat, LocalGrid(cfg, 3), 2)
    for k, v in both.to_torch_state_dict().items():  # the probe changed nothing the federation computes
        torch.testing.assert_close(v, plain.to_torch_state_dict()[k], rtol=0, atol=0)

    records = read_metrics(tmp_path / "both")
    for rnd, rec in enumerate(records, start=1):
        update, probe = rec["attacks"]
        assert (update["target"], probe["target"]) == ("update", "probe")
        assert update["num_images"] == 2 and probe["num_images"] == 1  # the round's batch of 2, and one image
        assert probe["image"] == f"attacks/round_{rnd:04d}-probe.png" and (tmp_path / "both" / probe["image"]).is_file()
        assert update["image"] == f"attacks/round_{rnd:04d}.png"
        assert probe["probe_time_s"] > 0 and rec["round_time_s"] < rec["attack_time_s"] + rec["round_time_s"]
        victim_reply = next(c for c in rec["clients"] if c["partition_id"] == "0")
        assert victim_reply["num_examples"] == 2  # the probe's reply (num-examples 1) is not a client record
    probes = [m for m in grid.sent if m.metadata.message_type == contract.PROBE]
    assert len(probes) == 2 and {m.metadata.dst_node_id for m in probes} == {1}
    # the probe's image is the first one the victim used in that round, and its label is the scored truth
    for m, rec in zip(probes, records):
        _, index = contract.read_probe_request(m.content)
        assert rec["attacks"][1]["true_labels"] == [int(data.y_train[index])]
    # the attacker saw the probe's train config (B = 1) for the probe and the round's (B = 2) for the update
    assert [(p.train_config.mode, p.train_config.batch_size, p.num_examples) for p in seen[:2]] == [
        ("fedsgd", 2, 2), ("fedsgd", 1, 1)]
    assert not any("audit" in k or "indices" in k for p in seen for k in vars(p))
    summary = summarize(records, cfg, 1.0, "completed")
    assert set(summary["attack_means_by_target"]) == {"update", "probe"}
    assert all(a["target"] in ("update", "probe") for a in summary["attacks"])
    (tmp_path / "both" / "summary.json").write_text(json.dumps(summary))
    report = write_run_report(tmp_path / "both").read_text()
    assert "| round | client | attack | target |" in report and "| 1 | 0 | idlg | probe |" in report


def test_probe_target_alone_and_a_lost_probe_is_an_error_record(tmp_path):
    cfg, data, strat = federation(tmp_path, "probe", **{"attack-target": "probe"})
    run_rounds(cfg, data, strat, LocalGrid(cfg, 3), 1)
    (only,) = read_metrics(tmp_path / "probe")[0]["attacks"]
    assert only["target"] == "probe" and only["psnr"] is not None

    cfg, data, strat = federation(tmp_path, "lost", **{"attack-target": "both", "round-timeout": 1.0})
    run_rounds(cfg, data, strat, LocalGrid(cfg, 3, drop_probes=True), 1)
    update, probe = read_metrics(tmp_path / "lost")[0]["attacks"]
    assert "error" not in update
    assert probe["target"] == "probe" and probe["error"].startswith("probe failed: no reply within round-timeout=1 s")


def test_audit_attacks_the_update_whatever_the_target(tmp_path, fmnist):
    from fl_sim.audit import audit_dataset, run_audit

    cfg = resolve({"attack": "idlg", "attack-iterations": 3, "attack-target": "both"})
    data = audit_dataset("fashion-mnist", fmnist.x_train[:1], fmnist.y_train[:1])
    record = run_audit(cfg, data, tmp_path)
    assert record["num_images"] == 1 and record["psnr"] is not None
