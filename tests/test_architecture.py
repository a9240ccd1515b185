"""The architecture's promises: the import layers hold, every registry entry works through the real pipelines,
a new defense is one module, the attacker gets only what its threat model grants, and the one-shot audit hands the
attacker exactly what a run's server would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tomllib
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, Metadata, RecordDict

from attacker import ATTACKS, Attack, AttackResult, ThreatModel
from clients import client_app
from clients.defenses import DEFENSES
from clients.secrets import node_secret
from fl_sim.audit import AUDIT_CLIENT_SECRET, audit_dataset, audit_round, run_audit
from fl_sim.config import key_table, resolve, specs
from fl_sim.task import contract
from fl_sim.task.datasets import DATASETS
from fl_sim.task.models import MODELS, build_model, classifier_layer
from fl_sim.task.partition import partitions
from fl_sim.task.registry import Registry, RegistryError
from strategies.strategy import CuriousFedAvg

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def test_import_contracts_hold():
    """import-linter's layers contract (task < clients | attacker < strategies < roof) and the two forbidden ones."""
    lint = Path(sys.executable).with_name("lint-imports")
    res = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "3 kept, 0 broken" in res.stdout


def test_every_roof_module_sits_in_a_layer():
    """A module of fl_sim/ that no layer names would escape the contract: every one must be listed."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    named = {m.strip() for layer in cfg["layers"] for m in layer.split("|")}
    modules = {f"fl_sim.{p.stem}" if p.parent.name == "fl_sim" else f"fl_sim.{p.parent.name}"
               for p in (ROOT / "fl_sim").glob("*") if (p.suffix == ".py" and p.stem != "__init__") or
               (p.is_dir() and (p / "__init__.py").exists())}
    assert modules - named == set()
    assert (ROOT / "fl_sim" / "__init__.py").read_text().count("import") == 0


def test_no_project_import_inside_a_function_outside_the_cli():
    pattern = r"^\s+(from|import) (fl_sim|clients|strategies|attacker)\b"
    res = subprocess.run(["grep", "-rnE", pattern, "fl_sim", "clients", "strategies", "attacker",
                          "--include=*.py"], cwd=ROOT, capture_output=True, text=True)
    hits = [ln for ln in res.stdout.splitlines() if not ln.startswith("fl_sim/cli/")]
    assert hits == []


def test_registry_refuses_duplicates_and_suggests_names():
    reg: Registry[int] = Registry("widget")
    reg.register("alpha", 1)
    with pytest.raises(RegistryError, match="already registered"):
        reg.register("alpha", 2)
    with pytest.raises(KeyError, match=r"unknown widget 'alpah' \(did you mean 'alpha'\?\); allowed: alpha"):
        reg["alpah"]
    assert list(reg) == ["alpha"] and reg.unregister("alpha") == 1 and len(reg) == 0


def test_every_plugin_key_is_in_the_table_and_owned_once():
    table = key_table()
    for name, d in DEFENSES.items():
        assert set(d.keys) <= set(table), name
        assert all(k.startswith(d.prefix) for k in d.keys), name
    for name, a in ATTACKS.items():
        assert set(a.keys) <= set(table), name


@pytest.mark.parametrize("dataset", list(DATASETS))
@pytest.mark.parametrize("model", [m for m in MODELS if m not in ("resnet20-kl",)])
def test_every_model_builds_for_every_dataset_and_has_a_classifier(model, dataset):
    spec = DATASETS[dataset]
    net = build_model(model, spec.input_shape, spec.num_classes)
    out = net.eval()(torch.zeros(2, *spec.input_shape))
    assert out.shape == (2, spec.num_classes)
    assert classifier_layer(net).out_features == spec.num_classes


def test_the_resnet_builds_for_one_dataset_of_each_shape():
    for dataset in ("fashion-mnist", "cifar10"):
        spec = DATASETS[dataset]
        net = build_model("resnet20-kl", spec.input_shape, spec.num_classes)
        assert net.eval()(torch.zeros(2, *spec.input_shape)).shape == (2, spec.num_classes)


def _model_for(defense: str) -> str:
    return DEFENSES[defense].models[0] if DEFENSES[defense].models else "lenet-tanh"


def _client_context(cfg, pid: int, nparts: int) -> Context:
    # the node secret a run under the audit's client secret gives partition pid (the audit replays client 0)
    secret = node_secret(AUDIT_CLIENT_SECRET, pid)
    return Context(run_id=1, node_id=100 + pid, node_config={contract.PARTITION_ID: pid,
                                                            contract.NUM_PARTITIONS: nparts, "secret-seed": secret},
                   state=RecordDict(), run_config=dict(cfg))


def _train_message(arrays: ArrayRecord, train_config: contract.TrainConfig) -> Message:
    md = Metadata(run_id=1, message_id=uuid.uuid4().hex, src_node_id=0, dst_node_id=101, reply_to_message_id="",
                  group_id="1", created_at=time.time(), ttl=3600, message_type="train")
    return Message(RecordDict({contract.ARRAYS: arrays, contract.CONFIG: train_config.to_record()}), metadata=md)


def _run_round_one(cfg, pid: int = 0):
    """Round 1 as a run's server and a run's ClientApp do it (the ClientApp's train handler called directly, the
    strategy fed its reply): returns the strategy, the reply and the global arrays."""
    run = specs(cfg)
    task = run.server.task
    data = client_app.load_dataset(task.dataset, task.data_dir)
    torch.manual_seed(task.seed)
    arrays = ArrayRecord(build_model(task.model, data.input_shape, data.num_classes).state_dict())
    strategy = CuriousFedAvg(run.server, data, recorder=_NullRecorder())
    record = strategy.new_record(1)
    train_config = task.train_config(record["lr"], 1)
    strategy.begin_round(1, arrays, train_config, {101: pid})
    msg = client_app.app(_train_message(arrays, train_config), _client_context(cfg, pid, task.num_supernodes))
    reply = Message(msg.content, metadata=Metadata(run_id=1, message_id=uuid.uuid4().hex, src_node_id=101,
                                                   dst_node_id=0, reply_to_message_id=uuid.uuid4().hex,
                                                   group_id="1", created_at=time.time(), ttl=3600,
                                                   message_type="train"))
    return strategy, reply, arrays


class _NullRecorder:
    def log_round(self, record):
        pass

    def save_attack_figure(self, *args, **kwargs):
        return ""


@pytest.mark.parametrize("defense", list(DEFENSES))
def test_every_defense_goes_through_the_client_pipeline_in_a_run_and_in_the_audit(defense, tmp_path):
    cfg = resolve({"defense": defense, "model": _model_for(defense), "attack-iterations": 1, "attack-every": 1})
    strategy, reply, _ = _run_round_one(cfg)
    assert not reply.has_error(), reply.error
    arrays, _ = strategy.aggregate_train(1, [reply])
    assert arrays is not None and strategy.last_record["failures"] == []
    attack = strategy.last_record["attacks"][0]
    # dp-sgd's Poisson batch may be empty (q = B/n): then there is no image to score
    assert "psnr" in attack or (defense == "dp-sgd" and attack["num_images"] == 0), attack
    record = run_audit(cfg, audit_dataset("fashion-mnist", client_app.load_dataset("fashion-mnist").x_train[:1],
                                          np.array([3])), tmp_path)
    assert (tmp_path / "attack.json").is_file() and record["defense"] == defense and record["iterations"] <= 1


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_every_attack_runs_one_iteration_inside_the_server(attack, tmp_path):
    cfg = resolve({"attack": attack, "attack-iterations": 1, **ATTACKS[attack].example})
    ds = client_app.load_dataset("fashion-mnist")
    record = run_audit(cfg, audit_dataset("fashion-mnist", ds.x_train[:4], ds.y_train[:4]), tmp_path)
    assert np.isfinite(record["psnr"]) and (tmp_path / "reconstruction.png").is_file()


def test_an_attack_that_declares_nothing_receives_only_the_global_model_and_the_update():
    seen = []

    def spy(payload, budget, options=None):
        seen.append(payload)
        return AttackResult(torch.zeros(1, *payload.input_shape), torch.zeros(1, dtype=torch.long), 0, 0.0, 0.0)

    ATTACKS.register("spy", Attack(spy, ThreatModel(), "records its payload"))
    try:
        cfg = resolve({"attack": "spy", "attack-every": 1, "model": "lenet-kl", "defense": "fedkl"})
        strategy, reply, arrays = _run_round_one(cfg)
        strategy.aggregate_train(1, [reply])
    finally:
        ATTACKS.unregister("spy")
    (p,) = seen
    assert (p.num_examples, p.train_config, p.buffers, p.defense) == (None, None, None, None)
    sent = arrays.to_torch_state_dict()
    params = [n for n, _ in build_model("lenet-kl", (1, 28, 28), 10).named_parameters()]
    assert set(p.update) == set(params) and set(p.global_state) == set(sent)
    assert all(torch.equal(p.global_state[k], sent[k]) for k in sent)
    returned = reply.content[contract.ARRAYS].to_torch_state_dict()
    assert all(torch.equal(p.update[k], returned[k].float() - sent[k].float()) for k in params)
    with pytest.raises(Exception, match="ThreatModel does not grant"):
        p.gradients(build_model("lenet-kl", (1, 28, 28), 10))


@pytest.mark.parametrize("defense,model", [("graddefense", "lenet-tanh"), ("fedkl", "lenet-kl")])
def test_audit_and_run_hand_the_attacker_the_same_payload_bit_for_bit(defense, model):
    cfg = resolve({"defense": defense, "model": model, "attack-iterations": 1, "attack-every": 1,
                   "num-supernodes": 10})
    run_strategy, run_reply, _ = _run_round_one(cfg, pid=0)
    ds = client_app.load_dataset("fashion-mnist")
    part = partitions("fashion-mnist", "", 10, "iid", 0.5, 0)[0]
    audit_strategy, audit_reply, _ = audit_round(cfg, audit_dataset("fashion-mnist", ds.x_train[part],
                                                                     ds.y_train[part]))
    a, b = run_strategy.attack_payload(run_reply), audit_strategy.attack_payload(audit_reply)
    assert set(a.update) == set(b.update) and set(a.global_state) == set(b.global_state)
    assert all(torch.equal(a.update[k], b.update[k]) for k in a.update)
    assert all(torch.equal(a.global_state[k], b.global_state[k]) for k in a.global_state)
    assert (a.num_examples, a.train_config) == (b.num_examples, b.train_config)
    assert (a.model_name, a.input_shape, a.mean, a.std) == (b.model_name, b.input_shape, b.mean, b.std)
    # and the image behind both is the same one
    run_idx = contract.reply_audit(run_reply)[contract.SAMPLE_INDICES]
    audit_idx = contract.reply_audit(audit_reply)[contract.SAMPLE_INDICES]
    assert np.array_equal(ds.x_train[run_idx], ds.x_train[part][audit_idx])


def test_a_defense_in_its_own_module_runs_end_to_end_through_fl_sim_run(tmp_path):
    """The toy defense lives in tests/toy_defense.py; no project file names it (`plugins=toy_defense`)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "fl_sim.cli", "run", "plugins=toy_defense", "defense=toy",
                          "defense-toy-scale=0.5", "num-supernodes=2", "num-server-rounds=2", "attack-every=2",
                          "attack-iterations=2", "--out", str(out)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == 2
    rounds = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(c["toy_steps"] == 1 for r in rounds for c in r["clients"]) and len(rounds[0]["clients"]) == 2
    assert tomllib.loads((out / "config.toml").read_text())["defense-toy-scale"] == 0.5
    res = subprocess.run([sys.executable, "-m", "fl_sim.cli", "run", "plugins=toy_defense", "defense=toy",
                          "defense-toy-scale=-1"], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "defense-toy-scale=-1" in res.stderr


def test_the_fedkl_audit_that_used_to_crash_writes_attack_json(tmp_path):
    from typer.testing import CliRunner

    from fl_sim.cli import cli

    res = CliRunner().invoke(cli, ["attack", "--attack", "idlg", "--model", "lenet-kl", "--dataset", "fashion-mnist",
                                   "--index", "0", "--defense", "fedkl", "attack-iterations=2", "--out",
                                   str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "attack.json").read_text())["defense"] == "fedkl"
