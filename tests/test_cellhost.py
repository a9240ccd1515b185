"""The sweep's cell host (fl_sim.cellhost): a cell forked from it computes what a fresh ``python -m fl_sim.cli run``
computes, exits with the command's status, and the host forks with no thread but its own."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from fl_sim import cellhost
from fl_sim.sweep import load_sweep, plan
from fl_sim.sweep import runner

ROOT = Path(__file__).resolve().parents[1]

TINY = """
[base]
num-supernodes = 2
num-server-rounds = 2
attack-every = 2
attack-iterations = 5
eval-every = 1
sim-backend = "inprocess"
[axes]
seed = [3]
[axes.attack]
DLG = { attack = "dlg" }
"""


def test_host_imports_a_cell_with_one_thread_and_the_cells_thread_settings():
    code = ("import os, sys, fl_sim.cellhost.preload, torch; "
            "print(len(os.listdir('/proc/self/task')), torch.get_num_threads(), "
            "all(m in sys.modules for m in ('fl_sim.simulation', 'clients.client_app', 'attacker')))")
    env = {k: v for k, v in os.environ.items() if k not in cellhost.HOST_ENV}
    env["OMP_NUM_THREADS"] = "2"  # the host's own settings win over what it inherits
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["1", "1", "True"]  # fork() copies no idle OpenMP/BLAS pool


def test_cell_env_carries_the_host_settings_and_the_secret():
    env = runner.cell_env({"PATH": "/bin", "OMP_NUM_THREADS": "8"}, 5, "seed=0")
    assert cellhost.forkable(env) and env["PATH"] == "/bin" and env["OMP_NUM_THREADS"] == "1"
    assert env["FL_SIM_CLIENT_SECRET"] == str(runner.cell_secret(5, "seed=0"))
    assert not cellhost.forkable(dict(env, OMP_NUM_THREADS="2"))
    assert not cellhost.forkable({k: v for k, v in env.items() if k != "OPENBLAS_NUM_THREADS"})


def _wait(proc, timeout_s=300.0):
    deadline = time.time() + timeout_s
    while proc.poll() is None:
        assert time.time() < deadline, "the cell did not exit"
        time.sleep(0.05)
    return proc.poll()


def _gone(pid: int) -> bool:
    try:
        return "State:\tZ" in Path(f"/proc/{pid}/status").read_text()  # a zombie: exited, not yet reaped
    except OSError:
        return True


def test_start_forks_only_the_cli_command_with_the_host_settings(tmp_path):
    lock = os.open(tmp_path / ".lock", os.O_RDWR | os.O_CREAT)
    env = runner.cell_env(dict(os.environ), 1, "x")
    try:
        with open(tmp_path / "a.log", "w") as log:
            other = runner._start([sys.executable, "-c", "print('hi')"], log, env, runner.usable_cpus()[:1], lock,
                                  fork=True)
            assert isinstance(other, subprocess.Popen) and _wait(other) == 0
        with open(tmp_path / "b.log", "w") as log:
            cli = [sys.executable, "-m", "fl_sim.cli", "keys"]
            fresh = runner._start(cli, log, dict(env, OMP_NUM_THREADS="2"), runner.usable_cpus()[:1], lock, fork=True)
            assert isinstance(fresh, subprocess.Popen) and _wait(fresh) == 0
        with open(tmp_path / "c.log", "w") as log:
            cmd = [sys.executable, "-m", "fl_sim.cli", "run", "num-server-rounds=zero", "--out", str(tmp_path / "r")]
            forked = runner._start(cmd, log, env, runner.usable_cpus()[:1], lock, fork=True)
            assert isinstance(forked, runner._ForkedCell)
            assert _wait(forked) == 2  # bad input: the command's one line and exit code 2, from the forked cell
        lines = (tmp_path / "c.log").read_text().strip().splitlines()
        assert lines[-1].startswith("fl-sim: error:") and "num-server-rounds" in lines[-1], lines
        assert not (tmp_path / "r").exists()
    finally:
        os.close(lock)
        runner._stop_host()


def test_forked_cell_computes_what_a_fresh_process_computes(tmp_path, monkeypatch):
    """The same one-cell sweep forked from the host and in a fresh interpreter: the same table, accuracies,
    attack scores and reconstruction, bit for bit."""
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    spec = load_sweep(path)
    monkeypatch.setenv("FL_SIM_CLIENT_SECRET", "11")
    forks = []
    real = runner._host_context
    monkeypatch.setattr(runner, "_host_context", lambda: forks.append(1) or real())
    results = {}
    for fork in (True, False):
        out = tmp_path / ("fork" if fork else "fresh")
        res = runner.run_sweep(spec, out, jobs=1, poll_s=0.05, fork=fork)
        assert res.failed == [] and len(res.ran) == 1
        cell = out / "cells" / plan(spec)[0].id
        summary = json.loads((cell / "summary.json").read_text())
        metrics = [json.loads(x) for x in (cell / "metrics.jsonl").read_text().splitlines()]
        attacks = [{k: v for k, v in a.items() if "time" not in k} for a in summary["attacks"]]
        with np.load(cell / "reconstructions.npz") as recs:
            images = {k: recs[k].tobytes() for k in recs.files}
        results[fork] = dict(
            table=[r for r in csv.reader((out / "table.csv").open()) if not r[1].startswith("ART")],
            rounds=[(m.get("accuracy"), [c["train_loss"] for c in m["clients"]]) for m in metrics],
            attacks=attacks, images=images)
        assert "mean attack PSNR" in (cell / "cell.log").read_text()  # the cell's output reached its log
    assert forks == [1]  # the first sweep forked its cell, the second did not
    assert results[True]["attacks"] and results[True]["images"] and results[True] == results[False]


def test_a_forked_cell_stops_after_its_round_when_the_host_dies(tmp_path):
    """The host exits with the sweep; its cells then get SIGINT (PR_SET_PDEATHSIG) and stop after the current round,
    and the runner keeps seeing them as running until they have exited."""
    from multiprocessing import forkserver

    lock = os.open(tmp_path / ".lock", os.O_RDWR | os.O_CREAT)
    env = runner.cell_env(dict(os.environ), 1, "x")
    run_dir = tmp_path / "r"
    cmd = [sys.executable, "-m", "fl_sim.cli", "run", "num-supernodes=2", "num-server-rounds=5000",
           "eval-every=1000", "attack-every=0", "sim-backend=inprocess", "--out", str(run_dir)]
    try:
        with open(tmp_path / "cell.log", "w") as log:
            cell = runner._start(cmd, log, env, runner.usable_cpus()[:1], lock, fork=True)
        deadline = time.time() + 300
        while not (run_dir / "metrics.jsonl").exists():  # the simulation is under way
            assert cell.poll() is None and time.time() < deadline, (tmp_path / "cell.log").read_text()[-2000:]
            time.sleep(0.1)
        os.kill(forkserver._forkserver._forkserver_pid, 9)
        code = _wait(cell)  # multiprocessing knows at once that the host is gone; the runner waits for the cell
        assert _gone(cell.pid)  # poll() reports a status only once the cell itself has exited
    finally:
        os.close(lock)
        runner._stop_host()
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    assert summary.get("status") != "completed"
    assert 0 < len((run_dir / "metrics.jsonl").read_text().splitlines()) < 5000  # it stopped after a round
    assert code == 255  # what multiprocessing reports for a cell whose host is gone
