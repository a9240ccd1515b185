"""Faulty clients never break a run: malformed replies, errors, timeouts and dropouts are dropped and logged."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, MetricRecord, RecordDict

from clients.client_app import drops_out
from conftest import make_message
from fl_sim.config import ConfigError, resolve
from fl_sim.deployment import ProcessTracker
from fl_sim.task.models import build_model
from strategies.faults import check_reply, sample_partitions, short_reason
from strategies.rounds import expected_arrays
from test_strategy import FakeGrid, replace_attack_run, reply, strategy_for

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def glob():
    torch.manual_seed(0)
    return build_model("lenet-tanh", (1, 28, 28), 10).state_dict()


def content(arrays, metrics=None):
    rec = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
    return RecordDict({"arrays": rec, "metrics": MetricRecord({} if metrics is None else metrics)})


def numpy_state(state):
    return {k: v.numpy().copy() for k, v in state.items()}


def test_check_reply_accepts_a_well_formed_reply(glob):
    expected = expected_arrays(ArrayRecord(glob))
    assert check_reply(make_message(content(numpy_state(glob), {"num-examples": 4})), expected, 100) is None


@pytest.mark.parametrize("corrupt, needle", [
    (lambda a, m: a.__setitem__("fc.bias", np.full_like(a["fc.bias"], np.nan)), "non-finite"),
    (lambda a, m: a["fc.weight"].__setitem__((0, 0), np.inf), "non-finite"),
    (lambda a, m: a.__setitem__("fc.bias", a["fc.bias"][:-1]), "shape"),
    (lambda a, m: a.__setitem__("fc.bias", a["fc.bias"].astype(np.float64)), "dtype"),
    (lambda a, m: a.pop("fc.bias"), "missing arrays ['fc.bias']"),
    (lambda a, m: a.__setitem__("backdoor", np.zeros(3, np.float32)), "unexpected arrays ['backdoor']"),
    (lambda a, m: m.__setitem__("num-examples", 10**9), "absurd"),
    (lambda a, m: m.__setitem__("num-examples", 0), "absurd"),
    (lambda a, m: m.__setitem__("num-examples", 2.5), "absurd"),
    (lambda a, m: m.__setitem__("num-examples", float("nan")), "absurd"),
    (lambda a, m: m.pop("num-examples"), "absurd"),
])
def test_check_reply_rejects_malformed_replies(glob, corrupt, needle):
    expected = expected_arrays(ArrayRecord(glob))
    arrays, metrics = numpy_state(glob), {"num-examples": 4}
    corrupt(arrays, metrics)
    reason = check_reply(make_message(content(arrays, metrics)), expected, 100)
    assert reason is not None and needle in reason


def test_check_reply_rejects_errors_and_extra_records(glob):
    expected = expected_arrays(ArrayRecord(glob))
    err = make_message(RecordDict())
    err = type(err)(Error(code=2, reason="\x1b[36mray::Actor\x1b[39m\nValueError: boom\nmore"), reply_to=err)
    assert check_reply(err, expected, 100) == "error reply (code 2): ValueError: boom"
    two = content(numpy_state(glob), {"num-examples": 4})
    two["more"] = content(numpy_state(glob))["arrays"]
    assert "exactly one ArrayRecord" in check_reply(make_message(two), expected, 100)


def test_aggregation_excludes_bad_replies_and_logs_missing_ones(tmp_path, fmnist):
    strat, cfg = strategy_for(tmp_path, fmnist, **{"attack-every": 1, "victim": "1", "attack-iterations": 5,
                                                 "num-supernodes": 4})
    model = build_model(cfg["model"], fmnist.input_shape, fmnist.num_classes)
    state = model.state_dict()
    msgs = strat.configure_train(1, ArrayRecord(state), ConfigRecord({"mode": "fedsgd", "lr": 0.1}), FakeGrid(4))
    assert sorted(m.metadata.dst_node_id for m in msgs) == [1, 2, 3, 4]
    good = {k: v + 1.0 for k, v in state.items()}
    bad = {k: v.clone() for k, v in state.items()}
    bad["fc.bias"][0] = float("nan")
    seen = []
    replace_attack_run(strat, lambda p, b, o=None: seen.append(p))
    # partition 3 (node 4) never replies; partition 1 (the victim) sends NaN; replies arrive out of order
    arrays, _ = strat.aggregate_train(1, [reply(good, 2, 2), reply(bad, 1, 1), reply(good, 2, 0)])
    assert seen == []  # the victim's reply was rejected before the attacker saw it
    reasons = {f["partition_id"]: f["reason"] for f in strat.last_record["failures"]}
    assert "non-finite" in reasons[1] and "no reply within round-timeout" in reasons[3]
    assert [c["partition_id"] for c in strat.last_record["clients"]] == ["0", "2"]
    for k, v in arrays.to_torch_state_dict().items():
        assert torch.isfinite(v).all()
        torch.testing.assert_close(v, good[k])


def test_too_few_replies_skip_the_round(tmp_path, fmnist):
    strat, cfg = strategy_for(tmp_path, fmnist, **{"attack-every": 0, "min-replies": 2})
    state = build_model(cfg["model"], fmnist.input_shape, fmnist.num_classes).state_dict()
    strat.configure_train(1, ArrayRecord(state), ConfigRecord({"mode": "fedsgd", "lr": 0.1}), FakeGrid(3))
    arrays, _ = strat.aggregate_train(1, [reply(state, 1, 0)])
    assert arrays is None and "min-replies=2" in strat.last_record["skipped"]


def test_sampling_is_by_partition_and_seeded():
    a = sample_partitions(range(100), 100, 0.1, seed=3, server_round=7)
    assert len(a) == 10 and a == sorted(a)
    assert a == sample_partitions(reversed(range(100)), 100, 0.1, seed=3, server_round=7)
    assert a != sample_partitions(range(100), 100, 0.1, seed=3, server_round=8)
    assert sample_partitions([4, 2], 100, 0.1, seed=3, server_round=7) == [2, 4]  # fewer available than k


def test_sampled_nodes_do_not_depend_on_node_ids(tmp_path, fmnist):
    """Flower's node ids are random per run; the same seed must still sample the same partitions."""
    class ShiftedGrid(FakeGrid):  # node 1000 + i holds partition i
        def __init__(self, n):
            super().__init__(n)
            self.ids = [1001 + i for i in range(n)][::-1]

        def send_and_receive(self, messages, *, timeout=None):
            return [make_message(RecordDict({"meta": ConfigRecord({"partition-id": m.metadata.dst_node_id - 1001,
                                                                   "num-partitions": len(self.ids)})}),
                                 src_node_id=m.metadata.dst_node_id) for m in messages]

    picks = []
    for grid in (FakeGrid(10), ShiftedGrid(10)):
        strat, cfg = strategy_for(tmp_path / str(len(picks)), fmnist, **{"num-supernodes": 10, "fraction-train": 0.3})
        state = build_model(cfg["model"], fmnist.input_shape, fmnist.num_classes).state_dict()
        strat.configure_train(5, ArrayRecord(state), ConfigRecord({"mode": "fedsgd", "lr": 0.1}), grid)
        picks.append(sorted(strat._sent.nodes.values()))
    assert picks[0] == picks[1] and len(picks[0]) == 3


def test_duplicate_partition_ids_are_a_config_error(tmp_path, fmnist):
    class Twins(FakeGrid):
        def send_and_receive(self, messages, *, timeout=None):
            return [make_message(RecordDict({"meta": ConfigRecord({"partition-id": 0, "num-partitions": 3})}),
                                 src_node_id=m.metadata.dst_node_id) for m in messages]

    strat, cfg = strategy_for(tmp_path, fmnist)
    state = build_model(cfg["model"], fmnist.input_shape, fmnist.num_classes).state_dict()
    with pytest.raises(ConfigError, match="both have node-config partition-id=0"):
        strat.configure_train(1, ArrayRecord(state), ConfigRecord({"mode": "fedsgd"}), Twins(3))


def test_dropout_is_seeded_and_has_the_configured_rate():
    draws = [drops_out(0.3, 0, r, p) for r in range(1, 201) for p in range(10)]
    assert abs(np.mean(draws) - 0.3) < 0.03
    assert draws == [drops_out(0.3, 0, r, p) for r in range(1, 201) for p in range(10)]
    assert draws != [drops_out(0.3, 1, r, p) for r in range(1, 201) for p in range(10)]
    assert not any(drops_out(0.0, 0, r, 0) for r in range(100))


def test_min_replies_above_the_sample_size_is_a_config_error():
    with pytest.raises(ConfigError, match="min-replies=4"):
        resolve({"num-supernodes": 10, "fraction-train": 0.3, "min-replies": 4})


def test_short_reason_keeps_the_exception_line():
    assert short_reason("ray::X()\nRuntimeError: disk full\nThe above") == "RuntimeError: disk full"
    assert short_reason("plain text") == "plain text"


def test_faulty_clients_in_a_simulation(tmp_path):
    """6 simulated clients (Ray): NaN, wrong shape, raising and silent clients are dropped; the run completes."""
    out = tmp_path / "faults"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_WAIT_POLICY": "PASSIVE"}  # as the fl-sim CLI sets it
    procs = ProcessTracker()  # the run and its Ray processes, stopped by pid whatever happens
    try:
        proc = procs.start([sys.executable, str(ROOT / "tests" / "fault_apps.py"), str(out)], tmp_path / "log",
                           env, ROOT)
        assert proc.wait(timeout=400) == 0, (tmp_path / "log").read_text()[-5000:]
    finally:
        procs.stop()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == 2
    assert math.isfinite(summary["final_accuracy"]) and summary["final_accuracy"] > 0.1
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        assert [c["partition_id"] for c in r["clients"]] == ["0", "5"]
        reasons = {f["partition_id"]: f["reason"] for f in r["failures"]}
        assert "non-finite" in reasons[1]
        assert "shape" in reasons[2]
        assert "RuntimeError: injected fault" in reasons[3]
        assert "no reply within round-timeout" in reasons[4]
        assert all(a["client"] in ("0", "5") for a in r["attacks"]) and r["attacks"]


def test_a_restarted_supernode_takes_its_partition_over(tmp_path, fmnist):
    """Mid-run, a node with a new id and an already known partition id replaces the old node (logged)."""
    strat, cfg = strategy_for(tmp_path, fmnist, **{"attack-every": 0})
    state = build_model(cfg["model"], fmnist.input_shape, fmnist.num_classes).state_dict()
    grid = FakeGrid(3)
    strat.configure_train(1, ArrayRecord(state), ConfigRecord({"mode": "fedsgd"}), grid)

    class Restarted(FakeGrid):  # node 2 (partition 1) came back as node 7
        def __init__(self):
            super().__init__(3)
            self.ids = [1, 2, 3, 7]

        def send_and_receive(self, messages, *, timeout=None):
            return [make_message(RecordDict({"meta": ConfigRecord({"partition-id": 1, "num-partitions": 3})}),
                                 src_node_id=7) for m in messages]

    strat.configure_train(2, ArrayRecord(state), ConfigRecord({"mode": "fedsgd"}), Restarted())
    assert strat._sent.nodes == {1: 0, 7: 1, 3: 2}
    assert any("replaced by node 7" in f["reason"] for f in strat.last_record["failures"])


def test_flower_error_replies_are_attributed_to_the_destination_node(tmp_path, fmnist):
    """The SuperLink answers for a vanished node ("Node Unavailable"): logged once, under that node's partition."""
    strat, cfg = strategy_for(tmp_path, fmnist, **{"attack-every": 0})
    state = build_model(cfg["model"], fmnist.input_shape, fmnist.num_classes).state_dict()
    msgs = strat.configure_train(1, ArrayRecord(state), ConfigRecord({"mode": "fedsgd"}), FakeGrid(3))
    for i, m in enumerate(msgs):  # what the Grid does when it sends them
        m.metadata.__dict__["_message_id"] = f"m{i}"
    lost = next(m for m in msgs if m.metadata.dst_node_id == 3)
    err = make_message(RecordDict(), src_node_id=1, reply_to=lost.metadata.message_id)
    err = type(err)(Error(code=5, reason="Node Unavailable"), reply_to=err)
    err.metadata.__dict__["_reply_to_message_id"] = lost.metadata.message_id
    err.metadata.__dict__["_src_node_id"] = 1  # the SuperLink
    strat.aggregate_train(1, [reply(state, 1, 0), reply(state, 1, 1), err])
    assert [(f["partition_id"], f["reason"]) for f in strat.last_record["failures"]] == [
        (2, "error reply (code 5): Node Unavailable")]


def test_a_reply_claiming_another_partition_is_rejected(tmp_path, fmnist):
    """A client cannot pose as the victim (or anyone else) by rewriting its ``meta`` partition id."""
    strat, cfg = strategy_for(tmp_path, fmnist, **{"attack-every": 0})
    state = build_model(cfg["model"], fmnist.input_shape, fmnist.num_classes).state_dict()
    strat.configure_train(1, ArrayRecord(state), ConfigRecord({"mode": "fedsgd"}), FakeGrid(3))
    liar = reply(state, 1, 0)
    liar.metadata.__dict__["_src_node_id"] = 3  # node 3 holds partition 2 but claims partition 0
    strat.aggregate_train(1, [liar, reply(state, 1, 1)])
    assert [(f["partition_id"], f["reason"]) for f in strat.last_record["failures"]] == [
        (2, "reply claims partition 0, but the node holds partition 2"), (0, "no reply within round-timeout=300 s")]
