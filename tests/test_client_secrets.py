"""Client secrets the server cannot derive (issue 11 §1), and client-state checkpoints (issue 11 §4).

The *seed-aware server* holds everything a ServerApp holds — the run config (its public ``seed`` included), the global
model, a copy of the dataset and the partitions (it computes them exactly as the clients do) — and may run the
client's own code. It replays a client with every seed it can derive from that (the derivation fl-sim used before
client secrets, and the current derivation under guessed secrets) and tries to reproduce the client's sample
indices, its DP noise and its FedKL key. It fails; given the client's secret, the same replay reproduces each of
them exactly, so these tests fail if a secret ever becomes derivable from what the server holds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from clients import secrets, state
from clients.client_app import app
from clients.config import ClientSpec
from clients.pipeline import client_update, prepare_model
from conftest import make_message
from fl_sim.config import resolve
from fl_sim.task import contract
from fl_sim.task.models import build_model
from fl_sim.task.partition import partitions

#: The harness's run-level client secret in these tests (the server is never given it).
CLIENT_SECRET = 0x5EC12E7


@pytest.fixture(autouse=True)
def no_client_environment(monkeypatch):
    """No run-level secret or client-state folder from the shell that runs the tests."""
    monkeypatch.delenv(secrets.SECRET_ENV, raising=False)
    monkeypatch.delenv(state.STATE_DIR_ENV, raising=False)


def client_context(cfg, pid: int, nparts: int, st: RecordDict | None = None, **node) -> Context:
    return Context(run_id=1, node_id=pid + 1, node_config={"partition-id": pid, "num-partitions": nparts, **node},
                   state=RecordDict() if st is None else st, run_config=dict(cfg))


def train(cfg, ctx: Context, global_state: dict, rnd: int, lr: float = 0.1):
    """The real ClientApp's train handler on a Flower Message, as the simulation engine calls it."""
    tc = contract.TrainConfig(str(cfg["mode"]), lr, int(cfg["batch-size"]), int(cfg["local-steps"]),
                              int(cfg["local-epochs"]), rnd)
    content = RecordDict({"arrays": ArrayRecord({k: v.clone() for k, v in global_state.items()}),
                          "config": tc.to_record()})
    reply = app(make_message(content, src_node_id=0), ctx)
    assert not reply.has_error(), reply.error
    return reply, tc


def old_client_seed(seed: int, server_round: int, partition_id: int) -> int:
    """The derivation fl-sim used before client secrets: from the run config's seed alone."""
    return int(np.random.SeedSequence([seed, server_round, partition_id]).generate_state(1)[0])


class SeedAwareServer:
    """Everything a ServerApp holds, and every client seed it can derive from it."""

    def __init__(self, cfg, data, global_state):
        self.cfg, self.data, self.global_state = cfg, data, global_state
        self.seed = int(cfg["seed"])
        n = int(cfg["num-supernodes"])
        self.parts = partitions(data.name, str(cfg["data-dir"]), n, str(cfg["partition"]),
                                float(cfg["dirichlet-alpha"]), self.seed)
        self.spec = ClientSpec.from_config(cfg)

    def candidates(self, pid: int, rnd: int) -> list[tuple[int, int]]:
        """(once seed, round seed) pairs: the old public derivation, and the current one under every secret the
        server might guess — the public seed, the partition id, the node id, small integers — used as a node's
        secret or as the run-level secret."""
        out = [(old_client_seed(self.seed, 0, pid), old_client_seed(self.seed, rnd, pid))]
        guesses = {self.seed, pid, pid + 1, rnd, *range(64)}
        for g in sorted(guesses):
            for node in (g, secrets.node_secret(g, pid)):
                out.append((secrets.once_seed(node, self.seed), secrets.round_seed(node, self.seed, rnd)))
        return out

    def replay(self, pid: int, tc: contract.TrainConfig, once: int, rnd_seed: int):
        """Run the client's own pipeline on the client's partition with the given seeds."""
        return client_update(self.spec, self.global_state, self.data, self.parts[pid], tc, RecordDict(), once,
                             rnd_seed, torch.device("cpu"))

    def fedkl_key(self, once: int) -> dict[str, torch.Tensor]:
        st = RecordDict()
        prepare_model(self.spec, self.global_state, st, once, torch.device("cpu"))
        return st["fedkl"].to_torch_state_dict()


def true_seeds(cfg, pid: int, rnd: int) -> tuple[int, int]:
    node = secrets.node_secret(CLIENT_SECRET, pid)
    return secrets.once_seed(node, int(cfg["seed"])), secrets.round_seed(node, int(cfg["seed"]), rnd)


def flat(sd: dict) -> torch.Tensor:
    return torch.cat([v.float().flatten() for k, v in sorted(sd.items())])


def test_the_run_config_holds_no_client_secret():
    cfg = resolve({"defense": "dp-gaussian"})
    assert not any("secret" in k for k in cfg)
    for pid in range(3):
        node = secrets.node_secret(CLIENT_SECRET, pid)
        assert node not in cfg.values() and CLIENT_SECRET not in cfg.values()


def test_seed_aware_server_cannot_reproduce_sample_indices(fmnist):
    cfg = resolve({"num-supernodes": 3, "batch-size": 4, "audit": True, "seed": 7})
    torch.manual_seed(7)
    glob = build_model(str(cfg["model"]), fmnist.input_shape, fmnist.num_classes).state_dict()
    server = SeedAwareServer(cfg, fmnist, glob)
    for pid in (0, 2):
        ctx = client_context(cfg, pid, 3, **{"secret-seed": secrets.node_secret(CLIENT_SECRET, pid)})
        for rnd in (1, 2):
            reply, tc = train(cfg, ctx, glob, rnd)
            truth = list(contract.reply_audit(reply)[contract.SAMPLE_INDICES])
            assert len(truth) == 4
            guesses = [server.replay(pid, tc, *c).sample_indices for c in server.candidates(pid, rnd)]
            assert truth not in guesses
            assert server.replay(pid, tc, *true_seeds(cfg, pid, rnd)).sample_indices == truth  # with the secret


def test_seed_aware_server_cannot_reproduce_dp_noise(fmnist):
    # 1,000 partitions of 10 images and batch-size 10: the client's batch is its whole partition, which the server
    # knows; the only unknown left in the update is the noise
    cfg = resolve({"defense": "dp-gaussian", "num-supernodes": 1000, "batch-size": 10, "seed": 3})
    torch.manual_seed(3)
    glob = build_model(str(cfg["model"]), fmnist.input_shape, fmnist.num_classes).state_dict()
    server = SeedAwareServer(cfg, fmnist, glob)
    pid = 5
    assert len(server.parts[pid]) == 10
    ctx = client_context(cfg, pid, 1000, **{"secret-seed": secrets.node_secret(CLIENT_SECRET, pid)})
    reply, tc = train(cfg, ctx, glob, 1)
    sent = flat(reply.content["arrays"].to_torch_state_dict())
    exact = flat(server.replay(pid, tc, *true_seeds(cfg, pid, 1)).state)
    assert torch.allclose(exact, sent, atol=1e-6)  # with the secret the noise (and so the update) is reproduced
    noise_scale = (sent - flat(glob)).norm()  # the update is dominated by the noise
    for cand in server.candidates(pid, 1):
        guess = flat(server.replay(pid, tc, *cand).state)
        assert (guess - sent).norm() > 0.5 * noise_scale  # the server's noise estimate misses by the noise itself


def test_seed_aware_server_cannot_reproduce_the_fedkl_key(fmnist):
    cfg = resolve({"defense": "fedkl", "model": "lenet-kl", "num-supernodes": 3, "seed": 11})
    torch.manual_seed(11)
    glob = build_model("lenet-kl", fmnist.input_shape, fmnist.num_classes).state_dict()
    server = SeedAwareServer(cfg, fmnist, glob)
    pid = 1
    ctx = client_context(cfg, pid, 3, **{"secret-seed": secrets.node_secret(CLIENT_SECRET, pid)})
    train(cfg, ctx, glob, 1)
    true_key = {k: v for k, v in ctx.state["fedkl"].to_torch_state_dict().items() if k.endswith(".key")}
    assert true_key
    for cand in server.candidates(pid, 1):
        guess = server.fedkl_key(cand[0])
        assert not any(torch.allclose(guess[k], v) for k, v in true_key.items())
    with_secret = server.fedkl_key(true_seeds(cfg, pid, 1)[0])
    assert all(torch.equal(with_secret[k], v) for k, v in true_key.items())


# --- where a node's secret comes from ------------------------------------------------------------------------------
def test_node_secret_precedence(monkeypatch):
    monkeypatch.delenv(secrets.SECRET_ENV, raising=False)
    ctx = client_context({}, 2, 3)
    drawn = secrets.node_secret_for(ctx, 2)  # OS entropy, kept in the node's own state
    assert 0 <= drawn < 2**63 and int(ctx.state[secrets.STATE_KEY]["seed"]) == drawn
    assert secrets.node_secret_for(ctx, 2) == drawn
    assert secrets.node_secret_for(client_context({}, 2, 3), 2) != drawn  # another node, another draw
    monkeypatch.setenv(secrets.SECRET_ENV, "42")  # a run-level secret in the environment: derived per partition
    assert secrets.node_secret_for(ctx, 2) == secrets.node_secret(42, 2) != secrets.node_secret(42, 1)
    assert secrets.node_secret_for(client_context({}, 2, 3, **{"secret-seed": 9}), 2) == 9  # node config wins
    assert secrets.node_secret_for(client_context({}, 2, 3, **{"secret-seed": "9"}), 2) == 9
    monkeypatch.setenv(secrets.SECRET_ENV, "x1")
    with pytest.raises(ValueError, match="FL_SIM_CLIENT_SECRET='x1' is not allowed"):
        secrets.node_secret_for(ctx, 2)
    for bad in (-1, 2**63, "1.5", True, ""):
        with pytest.raises(ValueError, match="must be an integer in"):
            secrets.parse_secret(bad, "s")


def test_private_seeds_depend_on_secret_seed_and_round():
    a, b = secrets.node_secret(1, 0), secrets.node_secret(2, 0)
    assert len({a, b, secrets.node_secret(1, 1)}) == 3
    rounds = {secrets.round_seed(a, 0, r) for r in range(1, 200)}
    assert len(rounds) == 199 and secrets.once_seed(a, 0) not in rounds
    assert secrets.round_seed(a, 0, 5) != secrets.round_seed(b, 0, 5) != secrets.round_seed(a, 1, 5)
    assert secrets.child_secret(7, "cell-a") != secrets.child_secret(7, "cell-b") != secrets.child_secret(8, "cell-a")
    assert secrets.round_seed(a, -3, 1) == secrets.round_seed(a, -3, 1)  # negative public seeds are fine


def test_run_secret_file_is_private_and_round_trips(tmp_path):
    path = secrets.save_run_secret(tmp_path, 123)
    assert path == tmp_path / "clients" / "secret" and oct(path.stat().st_mode & 0o777) == "0o600"
    assert secrets.load_run_secret(tmp_path) == 123


@pytest.mark.parametrize("args,env,message", [
    (["--client-secret", "abc"], {}, "--client-secret='abc' is not allowed; it must be an integer in [0, 2^63)"),
    ([], {secrets.SECRET_ENV: "-5"}, "FL_SIM_CLIENT_SECRET='-5' is not allowed; it must be an integer in [0, 2^63)"),
    (["--resume", "RUN", "--client-secret", "3"], {}, "--resume takes no --client-secret"),
])
def test_cli_refuses_a_bad_client_secret_in_one_line_before_ray(args, env, message, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from fl_sim.cli import cli

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    args = [str(tmp_path / "old") if a == "RUN" else a for a in args]
    out = ["--out", str(tmp_path / "run")] if "--resume" not in args else []
    result = CliRunner().invoke(cli, ["run", *args, *out])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("fl-sim: error: ") and message in lines[0]
    assert not (tmp_path / "run").exists()


def test_resume_refuses_a_run_without_a_client_secret(tmp_path):
    from typer.testing import CliRunner

    from fl_sim.cli import cli
    from strategies.checkpoint import save_checkpoint

    run = tmp_path / "r"
    run.mkdir()
    (run / "config.toml").write_text("seed = 0\n")

    class S:
        rng = None

    save_checkpoint(run, 1, ArrayRecord(), S(), 1.0)
    result = CliRunner().invoke(cli, ["run", "--resume", str(run)])
    assert result.exit_code == 2 and "no clients/secret" in result.stderr


# --- client-state checkpoints --------------------------------------------------------------------------------------
def test_state_files_keep_the_latest_before_each_round_and_load_by_round(tmp_path):
    d = tmp_path / "partition-0"
    for r in (2, 5, 7):
        state.save(d, r, RecordDict({"c": ConfigRecord({"round": r})}))
    assert state.saved_rounds(d) == [5, 7]  # writing 7 keeps 7 and the latest before it
    assert state.load(d, 6)[0] == 5 and int(state.load(d, 7)[1]["c"]["round"]) == 7 and state.load(d, 4) is None
    state.save(d, 9, RecordDict({"c": ConfigRecord({"round": 9})}))
    assert state.saved_rounds(d) == [7, 9]
    assert state.prune_after(tmp_path, 8) == [d / "round-000009.state"] and state.saved_rounds(d) == [7]
    ctx = client_context({}, 0, 1)
    assert state.restore(ctx, d, 8) == 7 and int(ctx.state["c"]["round"]) == 7
    ctx.state["c"] = ConfigRecord({"round": 100})
    assert state.restore(ctx, d, 8) is None and int(ctx.state["c"]["round"]) == 100  # a live state is kept
    assert state.checkpoint(client_context({}, 0, 1), d, 10) is None  # an empty state is not written


def test_a_directory_found_empty_is_not_listed_again_until_this_process_saves_there(tmp_path, monkeypatch):
    d = tmp_path / "partition-0"
    assert state.restore(client_context({}, 0, 1), d, 5) is None
    assert d in state._NOTHING_SAVED
    listed = []
    monkeypatch.setattr(state, "saved_rounds", lambda directory: listed.append(directory) or [])
    assert state.restore(client_context({}, 0, 1), d, 5) is None and not listed  # remembered, not listed
    monkeypatch.undo()
    state.save(d, 3, RecordDict({"c": ConfigRecord({"round": 3})}))  # forgets it
    ctx = client_context({}, 0, 1)
    assert state.restore(ctx, d, 5) == 3 and int(ctx.state["c"]["round"]) == 3


def test_state_dir_from_node_config_or_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(state.STATE_DIR_ENV, raising=False)
    assert state.state_dir(client_context({}, 3, 4), 3) is None
    monkeypatch.setenv(state.STATE_DIR_ENV, str(tmp_path / "run" / "clients"))
    assert state.state_dir(client_context({}, 3, 4), 3) == tmp_path / "run" / "clients" / "partition-3"
    ctx = client_context({"run-name": "r1"}, 3, 4, **{"state-dir": str(tmp_path / "node")})  # node config wins
    assert state.state_dir(ctx, 3) == tmp_path / "node" / "run-1" / "partition-3"  # keyed by Flower's run id


@pytest.mark.parametrize("defense,model", [("dp-gaussian", "lenet-tanh"), ("fedkl", "lenet-kl"),
                                           ("graddefense", "lenet-tanh")])
def test_a_client_restored_from_its_state_dir_continues_exactly(defense, model, fmnist, tmp_path, monkeypatch):
    """Rounds 1-3 with one Context, against rounds 1-2, then a fresh (empty) Context that restores from the state
    directory — what a resumed simulation's engine hands the ClientApp. Without the restore the DP counter would
    restart, FedKL's trained lock would be redrawn, GradDefense would recompute its sensitivities."""
    monkeypatch.setenv(state.STATE_DIR_ENV, str(tmp_path / "clients"))
    cfg = resolve({"defense": defense, "model": model, "num-supernodes": 3, "batch-size": 2,
                   "defense-gd-sensitivity-every": 0})
    torch.manual_seed(0)
    glob0 = build_model(model, fmnist.input_shape, fmnist.num_classes).state_dict()
    node = {"secret-seed": secrets.node_secret(CLIENT_SECRET, 1)}

    def rounds(ctxs):
        glob, out = glob0, []
        for rnd, ctx in zip((1, 2, 3), ctxs):
            reply, _ = train(cfg, ctx, glob, rnd)
            glob = reply.content["arrays"].to_torch_state_dict()
            out.append((glob, {k: v for k, v in reply.content["metrics"].items() if "time" not in k}))
        return out

    live = client_context(cfg, 1, 3, **node)
    monkeypatch.setenv(state.STATE_DIR_ENV, str(tmp_path / "reference"))
    reference = rounds([live, live, live])
    monkeypatch.setenv(state.STATE_DIR_ENV, str(tmp_path / "clients"))
    first = client_context(cfg, 1, 3, **node)
    resumed = rounds([first, first, client_context(cfg, 1, 3, **node)])  # round 3: a fresh, empty Context
    assert state.saved_rounds(tmp_path / "clients" / "partition-1") == [2, 3]
    for (a, ma), (b, mb) in zip(reference, resumed):
        assert torch.equal(flat(a), flat(b)) and ma == mb
    if defense == "dp-gaussian":
        assert resumed[-1][1]["dp-releases"] == 3
    # without its state the same fresh Context gives another round 3 (so the check above can fail)
    monkeypatch.delenv(state.STATE_DIR_ENV)
    lost, _ = train(cfg, client_context(cfg, 1, 3, **node), reference[1][0], 3)
    lost_metrics = {k: v for k, v in lost.content["metrics"].items() if "time" not in k}
    assert not torch.equal(flat(lost.content["arrays"].to_torch_state_dict()), flat(reference[2][0])) \
        or lost_metrics != reference[2][1]


# --- sweeps: one secret per cell, derived from a secret kept in the sweep directory --------------------------------
def test_sweep_cells_get_their_own_secret_from_the_sweep_secret(monkeypatch, tmp_path):
    """Cells (replaced by a script that records its environment, no Ray) get ``FL_SIM_CLIENT_SECRET`` derived from
    ``SWEEP_DIR/client-secret`` and their id; a second sweep over the same directory reuses it."""
    import json
    import sys

    import tomli_w

    import fl_sim.sweep.runner as runner
    from fl_sim.sweep import load_sweep, plan, run_sweep

    def command(cell, cell_dir, cpus):
        cfg = tmp_path / f"{cell.id}.toml"
        cfg.write_text(tomli_w.dumps(cell.config))
        code = f"""
import json, os, pathlib, shutil
d = pathlib.Path({str(cell_dir)!r})
(d / "env-secret").write_text(os.environ["FL_SIM_CLIENT_SECRET"])
shutil.copy({str(cfg)!r}, d / "config.toml")
(d / "metrics.jsonl").write_text(json.dumps({{"round": 1, "round_time_s": 1.0, "accuracy": 0.5}}) + "\\n")
(d / "summary.json").write_text(json.dumps({{"status": "completed", "rounds": 1, "final_accuracy": 0.5,
                                             "attack_means": {{}}, "attacks": []}}))
"""
        return [sys.executable, "-c", code]

    monkeypatch.setattr(runner, "cell_command", command)
    monkeypatch.delenv(secrets.SECRET_ENV, raising=False)
    path = tmp_path / "sweep.toml"
    path.write_text("[base]\nnum-server-rounds = 1\n[axes]\nseed = [0, 1]\n")
    spec = load_sweep(path)
    out = tmp_path / "out"
    run_sweep(spec, out, jobs=1, poll_s=0.02)
    sweep_secret = secrets.read_secret(out / "client-secret")
    assert oct((out / "client-secret").stat().st_mode & 0o777) == "0o600"
    got = {c.id: int((out / "cells" / c.id / "env-secret").read_text()) for c in plan(spec)}
    assert got == {cid: runner.cell_secret(sweep_secret, cid) for cid in got} and len(set(got.values())) == 2
    for c in plan(spec):  # not in what the cell records about itself
        assert str(got[c.id]) not in json.dumps(c.record())
    first = plan(spec)[0].id
    (out / "cells" / first / "summary.json").unlink()  # an unfinished cell is run again: with the same secret
    run_sweep(spec, out, jobs=1, poll_s=0.02)
    assert int((out / "cells" / first / "env-secret").read_text()) == got[first]
    monkeypatch.setenv(secrets.SECRET_ENV, "77")  # a new sweep directory takes FL_SIM_CLIENT_SECRET
    assert runner.sweep_secret(tmp_path / "other") == 77 and runner.sweep_secret(out) == sweep_secret
