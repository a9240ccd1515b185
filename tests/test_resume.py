"""Checkpoint/resume: ``kill -9`` a run after round k, ``fl-sim run --resume``, same final metrics as without the kill.

The clients are resumed too: for every defense that keeps state across rounds in ``Context.state`` (the DP release
counter, FedKL's trained lock layers, GradDefense's sensitivities) the resumed run ends with the same metrics, attack
scores and per-client DP counters as the uninterrupted one, which it would not if a resumed client started from an
empty state (``tests/test_client_secrets.py`` checks that in-process) or from another client secret."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord

from clients.defenses import DEFENSES
from clients.secrets import load_run_secret
from clients.state import saved_rounds
from fl_sim.deployment import ProcessTracker
from strategies.checkpoint import RoundOffset, load_checkpoint, truncate_metrics

FL_SIM = str(Path(sys.executable).with_name("fl-sim"))
#: 3 clients, 2 sampled per round, 20% dropout, an attack on a random client every 2 rounds: every seeded path.
ROUNDS = 4
ARGS = ["num-supernodes=3", f"num-server-rounds={ROUNDS}", "fraction-train=0.67", "client-dropout=0.2",
        "attack-every=2",
        "victim=random", "attack-iterations=20", "attack-time-limit=0", "round-timeout=120",
        "client-num-cpus=2"]  # one Ray actor per run: the two runs side by side start faster


#: Per defense (and its model): the stateful defenses whose client state a resume must restore. dp-sgd is added
#: by another branch (wp-dp); its case runs once it is registered.
#: (``defense=none`` keeps no client state; the dp-gaussian case runs the same seeded paths.)
DEFENSE_CASES = [("dp-gaussian", "lenet-tanh"), ("fedkl", "lenet-kl"), ("graddefense", "lenet-tanh"),
                 ("dp-sgd", "lenet-tanh")]
#: What is not reproducible run to run: wall-clock times, the random Flower node ids of the failures, and the
#: provenance (how the process was started: a resumed run's command line says --resume).
VOLATILE = ("time_s", "wall_time_s", "node", "provenance")


def strip(x):
    """``x`` without timing fields and Flower node ids (at any depth)."""
    if isinstance(x, dict):
        return {k: strip(v) for k, v in x.items() if not (k in VOLATILE or k.endswith("_time_s"))}
    if isinstance(x, list):
        return [strip(v) for v in x]
    return x


def comparable(summary: dict) -> dict:
    """The summary fields a resume must reproduce exactly: everything but timings (metrics, attacks, and whatever
    per-client privacy accounting the summary carries)."""
    return strip(summary)


def per_round(run_dir: Path) -> list[dict]:
    """Every round's record without timings: accuracy, loss, the clients (partition, loss and the defense's metrics,
    e.g. ``dp_releases`` and ``dp_epsilon``), failures by partition, attacks."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r["failures"] = sorted(f["partition_id"] for f in r["failures"])
    return strip(rows)


def run_killed_and_reference(tmp_path: Path, args: list[str]) -> tuple[Path, Path, int]:
    """Start an uninterrupted reference run and a run that is ``kill -9``-ed after round k >= 2 and resumed;
    return (reference dir, resumed dir, k)."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    env = dict(os.environ)
    env.pop("FL_SIM_CLIENT_SECRET", None)  # each run draws its own client secret from OS entropy
    procs, victim = ProcessTracker(), ProcessTracker()  # every process of both runs, Ray's included
    try:
        # the uninterrupted reference runs alongside the run that is killed and resumed; it gets the killed run's
        # client secret once that run has written it (the runs must make the same client draws to compare)
        proc = victim.start([FL_SIM, "run", *args, "--out", str(killed)], tmp_path / "killed.log", env, tmp_path)
        deadline = time.monotonic() + 300
        while not (killed / "clients" / "secret").is_file():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.log").read_text()
            time.sleep(0.02)
        secret = str(load_run_secret(killed))
        reference = procs.start([FL_SIM, "run", *args, "--client-secret", secret, "--out", str(full)],
                                tmp_path / "full.log", env, tmp_path)
        while time.monotonic() < deadline and proc.poll() is None:
            victim.refresh()
            ck = killed / "checkpoint.pkl"
            if ck.is_file() and pickle.loads(ck.read_bytes())["round"] >= 2:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it was killed: " + (tmp_path / "killed.log").read_text()
        os.kill(proc.pid, signal.SIGKILL)  # kill -9 after round k >= 2
        victim.stop()  # then its Ray processes, by pid
        k = load_checkpoint(killed)["round"]
        assert 2 <= k < ROUNDS and not (killed / "summary.json").is_file()

        resumed = subprocess.run([FL_SIM, "run", "--resume", str(killed)], capture_output=True, text=True,
                                 timeout=600, env=env)
        assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
        assert reference.wait(timeout=600) == 0, (tmp_path / "full.log").read_text()[-3000:]
    finally:
        victim.stop()
        procs.stop()
    return full, killed, k


@pytest.mark.parametrize("defense,model", DEFENSE_CASES, ids=[d for d, _ in DEFENSE_CASES])
def test_kill_9_then_resume_matches_the_uninterrupted_run(defense, model, tmp_path):
    if defense not in DEFENSES:
        pytest.skip(f"defense={defense} is not registered on this branch (it comes with wp-dp)")
    args = [*ARGS, f"defense={defense}", f"model={model}"]
    full, killed, k = run_killed_and_reference(tmp_path, args)
    a = json.loads((full / "summary.json").read_text())
    b = json.loads((killed / "summary.json").read_text())
    assert comparable(a) == comparable(b)
    assert per_round(full) == per_round(killed)
    assert a["status"] == "completed" and a["rounds"] == ROUNDS and a["attacks"]
    # the clients kept their state under the run directory, per partition, with the round
    parts = sorted(p.name for p in (killed / "clients").glob("partition-*"))
    assert parts and all(saved_rounds(killed / "clients" / p) for p in parts)
    if defense.startswith("dp-"):  # the release counter carried on across the kill (it restarts at 0 otherwise)
        rows = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
        seen: dict[str, int] = {}
        for r in rows:
            for c in r["clients"]:
                seen[c["partition_id"]] = seen.get(c["partition_id"], 0) + 1
                if defense == "dp-gaussian" or "dp_releases" in c:  # one release per FedSGD round
                    assert c["dp_releases"] == seen[c["partition_id"]], (r["round"], c)
    # the server's files never hold the client secret
    secret = str(load_run_secret(killed))
    for name in ("config.toml", "metrics.jsonl", "summary.json", "report.md"):
        assert secret not in (killed / name).read_text(), name


def test_resume_refuses_a_completed_run_and_overrides(tmp_path):
    from typer.testing import CliRunner

    from fl_sim.cli import cli

    def resume(*extra):
        return CliRunner().invoke(cli, ["run", "--resume", str(run), *extra])

    run = tmp_path / "r"
    run.mkdir()
    (run / "config.toml").write_text('seed = 0\n')
    (run / "summary.json").write_text('{"status": "completed"}')
    p = resume()
    assert p.exit_code == 2 and "already completed" in p.stderr
    p = resume("seed=1")
    assert p.exit_code == 2 and "takes no KEY=VALUE" in p.stderr
    (run / "summary.json").unlink()
    p = resume()
    assert p.exit_code == 2 and "no checkpoint.pkl" in p.stderr


def test_truncate_metrics_drops_rounds_after_the_checkpoint_and_torn_lines(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"round": 1}\n{"round": 2}\n{"round": 3}\n{"rou')
    truncate_metrics(tmp_path, 2)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"round": 1}\n{"round": 2}\n'


def test_round_offset_forwards_original_round_numbers():
    calls = []

    class Spy:
        def configure_train(self, r, a, c, g):
            calls.append(("ct", r))
            return []

        def aggregate_train(self, r, replies):
            calls.append(("at", r))
            return None, None

        def configure_evaluate(self, r, a, c, g):
            calls.append(("ce", r))
            return []

        def aggregate_evaluate(self, r, replies):
            calls.append(("ae", r))

        def summary(self):
            pass

    class Grid:
        def send_and_receive(self, messages, *, timeout=None):
            return []

    RoundOffset(Spy(), 7).start(grid=Grid(), initial_arrays=ArrayRecord(), num_rounds=2,
                                train_config=ConfigRecord())
    assert calls == [("ct", 8), ("at", 8), ("ce", 8), ("ae", 8), ("ct", 9), ("at", 9), ("ce", 9), ("ae", 9)]


def test_checkpoint_restores_model_rng_states_and_strategy_state(tmp_path):
    import random

    import torch

    from strategies.checkpoint import restore, save_checkpoint

    class S:
        rng = random.Random(5)

    arrays = ArrayRecord({"w": torch.arange(6.0).reshape(2, 3)})
    random.seed(1)
    save_checkpoint(tmp_path, 3, arrays, S(), 12.5)
    expected = random.random(), torch.rand(1).item()
    state = load_checkpoint(tmp_path)
    assert state["round"] == 3 and state["elapsed_s"] == 12.5
    s = S()
    s.rng = None
    got = restore(state, s)
    assert (random.random(), torch.rand(1).item()) == expected
    assert s.rng.random() == random.Random(5).random()
    torch.testing.assert_close(got.to_torch_state_dict()["w"], torch.arange(6.0).reshape(2, 3))
