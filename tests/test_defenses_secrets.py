"""No outgoing message carries a client secret: the real ClientApp ``train`` is called on a Flower Message/Context
and every record of its reply is inspected (FedKL key and lock layers, GradDefense's sensitivities and slice
choice, DP noise state, raw data)."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from clients.client_app import app
from clients.secrets import node_secret, once_seed, round_seed
from conftest import make_message
from fl_sim.config import resolve
from fl_sim.task.datasets import to_tensor
from fl_sim.task.models import build_model, private_state_keys

PUBLIC_METRICS = {"num-examples", "train-loss", "train-time-s", "defense-time-s", "dp-releases", "dp-epsilon",
                  "soteria-pruned"}


#: The run-level client secret of these tests' clients.
CLIENT_SECRET = 12345


def train_round(cfg, state: RecordDict, global_state: dict, rnd: int, pid: int = 0):
    ctx = Context(run_id=1, node_id=pid + 1, node_config={"partition-id": pid, "num-partitions": 3,
                                                          "secret-seed": node_secret(CLIENT_SECRET, pid)},
                  state=state, run_config=dict(cfg))
    content = RecordDict({
        "arrays": ArrayRecord({k: v.clone() for k, v in global_state.items()}),
        "config": ConfigRecord({"mode": "fedsgd", "lr": 0.1, "batch-size": 2, "local-steps": 0, "local-epochs": 1,
                                "server-round": rnd}),
    })
    reply = app(make_message(content, src_node_id=0), ctx)
    assert not reply.has_error(), reply.error
    return reply


def all_reply_tensors(reply) -> list[torch.Tensor]:
    out = []
    for rec in reply.content.array_records.values():
        out.extend(rec.to_torch_state_dict().values())
    return out


def all_reply_scalars(reply) -> list:
    vals = []
    for rec in list(reply.content.metric_records.values()) + list(reply.content.config_records.values()):
        for v in rec.values():
            vals.extend(v if isinstance(v, list) else [v])
    return vals


def state_secrets(state: RecordDict) -> tuple[list[torch.Tensor], list]:
    tensors, scalars = [], []
    for rec in state.array_records.values():
        tensors.extend(rec.to_torch_state_dict().values())
    for rec in state.config_records.values():
        for v in rec.values():
            scalars.extend(v if isinstance(v, list) else [v])
    return tensors, scalars


def assert_no_secret(reply, state: RecordDict, cfg, fmnist, pid=0):
    assert set(reply.content.keys()) == {"arrays", "metrics", "meta"}  # audit=false: nothing else leaves
    assert set(reply.content["metrics"].keys()) <= PUBLIC_METRICS
    assert dict(reply.content["meta"]) == {"partition-id": pid}
    sent = all_reply_tensors(reply)
    tensors, scalars = state_secrets(state)
    for secret in tensors:
        if secret.abs().sum() == 0:
            continue
        for t in sent:
            assert not (t.shape == secret.shape and torch.allclose(t.float(), secret.float())), "state tensor sent"
    public = all_reply_scalars(reply)
    for s in scalars:
        if isinstance(s, float) and s not in (0.0, 1.0):
            assert s not in public, f"state value {s} sent"
    # raw data: no sent tensor holds a training image of this client
    secret = node_secret(CLIENT_SECRET, pid)
    for value in (secret, once_seed(secret, int(cfg["seed"])), round_seed(secret, int(cfg["seed"]), 1)):
        assert value not in public
    imgs = to_tensor(fmnist.x_train[:2000], fmnist.mean, fmnist.std).flatten(1)
    for t in sent:
        if t.numel() == imgs.shape[1]:
            assert not torch.isclose(imgs, t.flatten()[None]).all(dim=1).any()


@pytest.mark.parametrize("defense,model,extra", [
    ("fedkl", "lenet-kl", {}), ("graddefense", "lenet-tanh", {"defense-gd-clip": True}),
    ("graddefense", "lenet-tanh", {"defense-gd-sensitivity": "jacobian"}), ("dp-gaussian", "lenet-tanh", {}),
    ("soteria", "lenet-tanh", {})])
def test_reply_holds_no_client_secret(defense, model, extra, fmnist):
    cfg = resolve({"defense": defense, "model": model, "audit": False, "num-supernodes": 3, **extra})
    torch.manual_seed(0)
    glob = build_model(model, fmnist.input_shape, fmnist.num_classes).state_dict()
    state = RecordDict()
    for rnd in (1, 2):
        reply = train_round(cfg, state, glob, rnd)
        assert_no_secret(reply, state, cfg, fmnist)
        glob = reply.content["arrays"].to_torch_state_dict()
    if defense in ("fedkl", "graddefense", "dp-gaussian"):
        assert len(list(state.keys())) == 1  # the secret exists, on the client only


def test_fedkl_sends_zeros_keeps_and_trains_its_own_lock(fmnist):
    cfg = resolve({"defense": "fedkl", "model": "lenet-kl", "audit": False, "num-supernodes": 3, "batch-size": 2})
    torch.manual_seed(0)
    model = build_model("lenet-kl", fmnist.input_shape, fmnist.num_classes)
    glob = model.state_dict()
    private = private_state_keys(model)
    states = [RecordDict(), RecordDict()]
    locks = []
    for pid, state in enumerate(states):
        reply = train_round(cfg, state, glob, 1, pid)
        sent = reply.content["arrays"].to_torch_state_dict()
        for k in private:
            assert torch.count_nonzero(sent[k]) == 0, k
            assert not torch.equal(state["fedkl"].to_torch_state_dict()[k], glob[k])  # not the public init
        # the other tensors are sent as trained
        assert not torch.equal(sent["fc.weight"], glob["fc.weight"])
        locks.append(state["fedkl"].to_torch_state_dict())
    assert not torch.equal(locks[0][private[0]], locks[1][private[0]])  # each client has its own key
    # round 2 from an aggregate whose lock tensors are zeros: the client restores and trains its own lock layers
    zero_glob = dict(glob, **{k: torch.zeros_like(glob[k]) for k in private})
    train_round(cfg, states[0], zero_glob, 2, 0)
    after = states[0]["fedkl"].to_torch_state_dict()
    torch.testing.assert_close(after[private[0]], locks[0][private[0]])  # key constant
    w = next(k for k in private if k.endswith("scale_fc.weight"))
    assert not torch.equal(after[w], locks[0][w]) and torch.count_nonzero(after[w]) > 0  # lock trained, not zeroed


def test_fedkl_needs_a_key_lock_model():
    from fl_sim.config import ConfigError

    with pytest.raises(ConfigError, match="model='lenet-tanh' is not allowed with defense='fedkl'"):
        resolve({"defense": "fedkl"})
    with pytest.raises(ConfigError, match="defense-gd-perturb-slices=11"):
        resolve({"defense": "graddefense", "defense-gd-perturb-slices": 11})


@pytest.mark.parametrize("skip", [True, False])
def test_attacker_leaves_the_lock_layers_out(tmp_path, fmnist, skip):
    """FedKL's lock layers arrive as zeros; the attack (``attack-skip-private``, default on) matches every other
    trainable parameter and none of them. The payload itself holds no list of client keys."""
    from attacker.matching import prepare
    from fl_sim.config import specs
    from fl_sim.results import RunRecorder
    from fl_sim.task.contract import TrainConfig
    from strategies.strategy import CuriousFedAvg
    from test_strategy import reply

    cfg = resolve({"defense": "fedkl", "model": "lenet-kl", "num-supernodes": 3, "out-dir": str(tmp_path),
                   "run-name": "r", "attack-skip-private": skip})
    strat = CuriousFedAvg(specs(cfg).server, fmnist, RunRecorder(tmp_path / "r", cfg))
    state = strat.eval_model.state_dict()
    private = private_state_keys(strat.eval_model)
    strat.begin_round(1, ArrayRecord(state), TrainConfig("fedsgd", 0.1, 1, server_round=1), {1: 0})
    g = torch.Generator().manual_seed(0)
    sent = {k: torch.zeros_like(v) if k in private else
            (v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone())
            for k, v in state.items()}
    payload = strat.attack_payload(reply(sent, 1, 0))
    assert not any("ignored" in k or "private" in k for k in vars(payload))
    options = strat.spec.attack.options
    assert options.skip_private is skip
    model = payload.build_model()
    target = prepare(payload, model, options)
    matched = {target.names[target.needed[j]] for j in target.active}
    names = set(target.names)
    lock_params = names & set(private)
    assert lock_params and len(lock_params) == len(private) - 1  # the key is a buffer, not matched anyway
    if skip:
        assert matched == names - lock_params
    else:
        assert matched == names
