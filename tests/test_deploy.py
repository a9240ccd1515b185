"""Flower's deployment engine on 127.0.0.1: a TLS SuperLink, 2 SuperNodes, ``flwr run`` with an attack."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from fl_sim.deployment import LocalFederation, ProcessTracker, _proc_table, have_node_auth_tools


def test_tls_deployment_two_supernodes_two_rounds_with_an_attack(tmp_path):
    out = tmp_path / "runs"
    fed = LocalFederation(tmp_path / "fed", num_nodes=2, tls=True, node_auth=have_node_auth_tools())
    try:
        fed.start()
        proc = fed.run({"num-supernodes": 2, "num-server-rounds": 2, "attack-every": 1, "attack-iterations": 20,
                        "attack-time-limit": 0.0, "round-timeout": 120.0, "node-timeout": 120.0,
                        "out-dir": str(out), "run-name": "deployed"}, timeout_s=420)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + fed.logs()
        fed.procs.refresh()
        tracked = dict(fed.procs.known)
        # deploy/supernode.sh's default: fl_sim.supernode, whose SuperExec forks every ClientApp task
        logs = [(fed.workdir / f"supernode-{i}.log").read_text() for i in range(2)]
        assert all(log.count("fl_sim.superexec: task") >= 3 for log in logs)  # query.whoami + 2 train messages
        assert len(tracked) >= 2 * (1 + 2)  # SuperLink and SuperNodes, and the SuperExec each of them started
    finally:
        fed.close()
    # every process it started, and every process those started, is gone
    table = _proc_table()
    assert not [p for p, t in tracked.items() if p in table and table[p][2] == t]

    run = out / "deployed"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == 2
    assert 0.0 <= summary["final_accuracy"] <= 1.0
    assert [a["round"] for a in summary["attacks"]] == [1, 2]
    assert summary["attacks"][0]["client"] == "0" and summary["attacks"][0]["psnr"] > 30
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(c["partition_id"] for c in r["clients"]) for r in records] == [["0", "1"], ["0", "1"]]
    assert all(r["failures"] == [] for r in records)

    # the same federation on the simulation engine (same client secret, 0) gives the same numbers bit for bit
    sim = subprocess.run([str(Path(sys.executable).parent / "fl-sim"), "run", "num-supernodes=2",
                          "num-server-rounds=2", "attack-every=1", "attack-iterations=20", "attack-time-limit=0.0",
                          "--client-secret", "0", "--out", str(tmp_path / "sim")],
                         capture_output=True, text=True, timeout=600)
    assert sim.returncode == 0, sim.stdout[-2000:] + sim.stderr[-2000:]
    sim_records = [json.loads(x) for x in (tmp_path / "sim" / "metrics.jsonl").read_text().splitlines()]

    def numbers(rs):
        return [(r["accuracy"], r["loss"], [c["train_loss"] for c in r["clients"]], [a["psnr"] for a in r["attacks"]])
                for r in rs]

    assert numbers(records) == numbers(sim_records)


def test_process_tracker_stops_detached_descendants_by_pid(tmp_path):
    """A child in its own session (like Flower's SuperExec) that ignores SIGTERM is still found and killed."""
    tracker = ProcessTracker()
    script = "setsid bash -c 'trap \"\" TERM; sleep 300' & sleep 300"
    tracker.start(["bash", "-c", script], tmp_path / "log", dict(os.environ), tmp_path)
    deadline = time.monotonic() + 20
    while len(tracker.refresh()) < 3 and time.monotonic() < deadline:  # sleep, setsid bash, its sleep
        time.sleep(0.05)
    tracked = dict(tracker.refresh())
    assert len(tracked) >= 3
    tracker.stop(grace_s=1.0)
    table = _proc_table()
    assert not [p for p, t in tracked.items() if p in table and table[p][2] == t]
