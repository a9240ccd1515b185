"""Checkpoint/resume: ``kill -9`` a run after round k, ``fl-sim run --resume``, same final metrics as without the kill."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord

from fl_sim.deployment import ProcessTracker
from strategies.checkpoint import RoundOffset, load_checkpoint, truncate_metrics

FL_SIM = str(Path(sys.executable).with_name("fl-sim"))
#: 3 clients, 2 sampled per round, 20% dropout, an attack on a random client every 2 rounds: every seeded path.
ARGS = ["num-supernodes=3", "num-server-rounds=5", "fraction-train=0.67", "client-dropout=0.2", "attack-every=2",
        "victim=random", "attack-iterations=20", "attack-time-limit=0", "round-timeout=120",
        "client-num-cpus=2"]  # one Ray actor per run: the two runs side by side start faster


def comparable(summary: dict) -> dict:
    """The summary fields a resume must reproduce exactly (timings excluded)."""
    keep = ("final_accuracy", "final_loss", "best_accuracy", "rounds", "status")
    attacks = [{k: a.get(k) for k in ("round", "client", "psnr", "ssim", "mse", "label_accuracy")}
               for a in summary["attacks"]]
    return {**{k: summary[k] for k in keep}, "attacks": attacks}


def per_round(run_dir: Path) -> list[tuple]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["round"], r["accuracy"], r["loss"], [c["partition_id"] for c in r["clients"]],
             sorted(f["partition_id"] for f in r["failures"])) for r in rows]


def test_kill_9_then_resume_matches_the_uninterrupted_run(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    env = dict(os.environ)
    procs, victim = ProcessTracker(), ProcessTracker()  # every process of both runs, Ray's included
    try:
        # the uninterrupted reference runs alongside the run that is killed and resumed
        reference = procs.start([FL_SIM, "run", *ARGS, "--out", str(full)], tmp_path / "full.log", env, tmp_path)
        proc = victim.start([FL_SIM, "run", *ARGS, "--out", str(killed)], tmp_path / "killed.log", env, tmp_path)
        deadline = time.monotonic() + 300
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
        assert 2 <= k < 5 and not (killed / "summary.json").is_file()

        resumed = subprocess.run([FL_SIM, "run", "--resume", str(killed)], capture_output=True, text=True,
                                 timeout=600)
        assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
        assert reference.wait(timeout=600) == 0, (tmp_path / "full.log").read_text()[-3000:]
    finally:
        victim.stop()
        procs.stop()

    a = json.loads((full / "summary.json").read_text())
    b = json.loads((killed / "summary.json").read_text())
    assert comparable(a) == comparable(b)
    assert per_round(full) == per_round(killed)
    assert a["status"] == "completed" and a["rounds"] == 5 and a["attacks"]


def test_resume_refuses_a_completed_run_and_overrides(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.toml").write_text('seed = 0\n')
    (run / "summary.json").write_text('{"status": "completed"}')
    p = subprocess.run([FL_SIM, "run", "--resume", str(run)], capture_output=True, text=True)
    assert p.returncode == 2 and "already completed" in p.stderr
    p = subprocess.run([FL_SIM, "run", "--resume", str(run), "seed=1"], capture_output=True, text=True)
    assert p.returncode == 2 and "takes no KEY=VALUE" in p.stderr
    (run / "summary.json").unlink()
    p = subprocess.run([FL_SIM, "run", "--resume", str(run)], capture_output=True, text=True)
    assert p.returncode == 2 and "no checkpoint.pkl" in p.stderr


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
