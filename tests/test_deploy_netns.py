"""Deployment across two hosts: a server and a client network namespace joined by a veth pair (``fl_sim/netns.py``).

TLS with the certificate issued for the server's address, SuperNode authentication on, and SuperNode 1 killed
(SIGKILL, as a crash) after round 1 and restarted: the run completes and the node rejoins. Skips, with the reason,
where namespaces cannot be made (not root, no ``ip``, an unprivileged container). Expected to take about 1.5 minutes
on an idle 2-core machine, most of it the up to 60 s for which Flower's heartbeat rule refuses the crashed node.

A deployed round takes under a second (``fl_sim.supernode``), so the rounds after the crash would all be over
before node 1 is back; Inverting Gradients on node 0's update every round, stopped by its 2 s time limit (it has no
other stopping rule), keeps the run going meanwhile.
"""

from __future__ import annotations

import json
import statistics
import time

import pytest

from fl_sim.deployment import _proc_table
from fl_sim.netns import CLIENT_ADDRESS, SERVER_ADDRESS, NetnsFederation, unavailable

REASON = unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"no network namespaces: {REASON}")

ROUNDS = 8


def _records(path):
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_two_hosts_tls_auth_and_a_supernode_killed_and_restarted(tmp_path):
    out = tmp_path / "runs"
    metrics = out / "netns" / "metrics.jsonl"
    fed = NetnsFederation(tmp_path / "fed", num_nodes=2, node_auth=True)
    events: dict[str, float] = {}
    try:
        fed.start()
        # the certificate is issued for the server's address (and checked against it), and is no good for another
        assert fed.tls_handshake(SERVER_ADDRESS)
        assert not fed.tls_handshake(CLIENT_ADDRESS)
        # authentication is on: a node whose key was never registered is refused
        assert fed.unregistered_node_exit_code() == 305
        run = fed.run({"num-supernodes": 2, "num-server-rounds": ROUNDS, "attack-every": 1, "attack": "ig",
                       "attack-iterations": 100000, "attack-time-limit": 2.0, "round-timeout": 150.0,
                       "node-timeout": 150.0, "out-dir": str(out), "run-name": "netns"})
        deadline = time.monotonic() + 900
        while run.poll() is None and time.monotonic() < deadline:
            if "killed" not in events and len(_records(metrics)) >= 1:
                assert fed.kill_node(1) >= 2  # the SuperNode and its SuperExec at least
                events["killed"] = time.time()
                # refused until the SuperLink counts the crashed node offline (2 × 30 s heartbeats), then back
                events["attempts"] = fed.start_node(1, retry_s=150)
                events["rejoined"] = time.time()
            time.sleep(0.5)
        assert run.poll() is not None, "the run did not end within 15 minutes\n" + fed.logs()
        fed.procs.refresh()
        tracked = dict(fed.procs.known)
        log = fed.logs()
        superlink_log = (fed.workdir / "superlink.log").read_text(errors="replace")
    finally:
        fed.close()
    table = _proc_table()
    assert not [p for p, t in tracked.items() if p in table and table[p][2] == t]  # every process stopped

    assert "killed" in events and "rejoined" in events, log
    assert f'{CLIENT_ADDRESS}:' in superlink_log  # the SuperLink saw the SuperNodes come from the client host
    summary = json.loads((out / "netns" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == ROUNDS, log
    records = _records(metrics)
    assert [r["round"] for r in records] == list(range(1, ROUNDS + 1))
    clients = [sorted(c["partition_id"] for c in r["clients"]) for r in records]
    assert clients[0] == ["0", "1"]
    # node 0 answered every round. The crash cost node 1 a round, or a round waited for the restarted node to pick
    # its queued message up (the SuperLink keeps a crashed node's messages; which one happens depends on whether the
    # kill came before or after the next round's message was sent — both were seen on fresh-clone CI runs)
    assert all("0" in c for c in clients)
    outage = events["rejoined"] - events["killed"]
    lost = clients[1:-1].count(["0"]) >= 1
    waited = any(r["round_time_s"] >= 0.5 * outage for r in records[1:])
    assert lost or waited, (clients, [r["round_time_s"] for r in records], outage)
    # node 1 rejoined: rounds after the restart have its reply again, the last one included
    assert clients[-1] == ["0", "1"]
    # round time across the veth pair, rounds with both nodes after round 1 (which also asks every node for its
    # partition id); printed for the record (pytest -s)
    both = [r["round_time_s"] for r, c in zip(records[1:], clients[1:]) if c == ["0", "1"]]
    print(json.dumps({"netns_round_s": statistics.mean(both), "rounds_with_both": len(both),
                      "restart_attempts": events["attempts"],
                      "rejoin_after_kill_s": round(events["rejoined"] - events["killed"], 1)}))
