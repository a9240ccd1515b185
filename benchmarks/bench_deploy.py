"""Round time on Flower's deployment engine (TLS SuperLink + SuperNodes on 127.0.0.1) under Flower's knobs.

Flower 1.42 starts a fresh ``flwr-clientapp`` process for every message (Python, flwr and torch imports each
time); what a round costs beyond that is polling: the SuperNode asks the SuperLink for work every 3 s when idle
(fixed in Flower), its SuperExec asks the SuperNode for tasks every ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` seconds
(default 1.0), and the ServerApp's Grid pulls replies every 3 s (fl-sim's ServerApp pulls every 0.25 s).
This runs the same federation once per SuperExec poll interval and prints the mean round time (client phase plus
aggregation, from ``metrics.jsonl``; round 1 excluded) and the wall time of ``flwr run``.

    python benchmarks/bench_deploy.py [--nodes 2] [--rounds 6] [--poll 1.0 0.1] [--app DIR] [--netns]

``--app`` runs another checkout of the app (e.g. one whose ServerApp uses Flower's own 3 s Grid polling).
``--netns`` runs the SuperLink and the SuperNodes on two hosts instead of 127.0.0.1: a server and a client network
namespace joined by a veth pair, SuperNode authentication on (``fl_sim/netns.py``; needs root). The last line is one
JSON object with the headline figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fl_sim.deployment import LocalFederation  # noqa: E402
from fl_sim.netns import NetnsFederation, unavailable  # noqa: E402


def bench(nodes: int, rounds: int, poll: float, app: Path, workdir: Path, netns: bool = False) -> dict:
    cfg = {"num-supernodes": nodes, "num-server-rounds": rounds, "attack-every": 0, "out-dir": str(workdir / "runs"),
           "run-name": f"poll-{poll}"}
    out = workdir / "runs"
    if netns:
        fed = NetnsFederation(workdir / f"netns-{poll}", nodes, node_auth=True, app_dir=app)
        fed.env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(poll)
        with fed:
            t = time.monotonic()
            proc = fed.run(cfg)
            proc.wait(timeout=1800)
            wall = time.monotonic() - t
            logs = fed.logs()
        ok, detail = proc.returncode == 0, logs
    else:
        fed = LocalFederation(workdir / f"fed-{poll}", nodes, tls=True, app_dir=app)
        fed.env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(poll)
        with fed:
            t = time.monotonic()
            proc = fed.run(cfg, timeout_s=1800)
            wall = time.monotonic() - t
        ok, detail = proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + fed.logs()
    if not ok:
        raise RuntimeError(detail)
    records = [json.loads(x) for x in (out / f"poll-{poll}" / "metrics.jsonl").read_text().splitlines()]
    times = [r["round_time_s"] for r in records[1:]]
    return {"nodes": nodes, "hosts": "netns" if netns else "loopback", "rounds": len(records),
            "superexec_poll_s": poll, "flwr_run_wall_s": wall,
            "round1_s": records[0]["round_time_s"], "mean_round_s": statistics.mean(times),
            "min_round_s": min(times), "max_round_s": max(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--poll", type=float, nargs="+", default=[1.0, 0.1])
    parser.add_argument("--app", type=Path, default=ROOT)
    parser.add_argument("--netns", action="store_true", help="two hosts: server and client network namespaces")
    a = parser.parse_args()
    if a.netns and unavailable():
        sys.exit(f"--netns: {unavailable()}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp:
        for poll in a.poll:
            rows.append(bench(a.nodes, a.rounds, poll, a.app.resolve(), Path(tmp), a.netns))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'SuperExec poll s':>16} {'round 1 s':>9} {'mean round s (2..)':>18} {'min':>6} {'max':>6} "
          f"{'flwr run wall s':>15}")
    for r in rows:
        print(f"{r['superexec_poll_s']:>16} {r['round1_s']:>9.2f} {r['mean_round_s']:>18.2f} {r['min_round_s']:>6.2f} "
              f"{r['max_round_s']:>6.2f} {r['flwr_run_wall_s']:>15.1f}")
    if len(rows) > 1:
        print(f"ratio mean round time {rows[0]['superexec_poll_s']} s / {rows[-1]['superexec_poll_s']} s poll: "
              f"{rows[0]['mean_round_s'] / rows[-1]['mean_round_s']:.2f}x")
    print(json.dumps({"bench": "deploy", "hosts": rows[0]["hosts"], "nodes": a.nodes,
                      "mean_round_s": {str(r["superexec_poll_s"]): round(r["mean_round_s"], 3) for r in rows},
                      "best_mean_round_s": round(min(r["mean_round_s"] for r in rows), 3)}))


if __name__ == "__main__":
    main()
