"""Round time on Flower's deployment engine (TLS SuperLink + SuperNodes on 127.0.0.1): fl-sim's SuperNode
launcher against Flower's own ``flower-supernode``, side by side in one run.

Modes (``deploy/supernode.sh``):

* ``warm`` (the default of ``deploy/supernode.sh`` and ``fl-sim deploy``): ``python -m fl_sim.supernode`` — Flower's
  SuperNode with its idle pull every 0.1 s (Flower: 3 s), its reply wait in 0.02 s steps (Flower: 0.5 s), object
  pulls retried after 0.02 s (Flower: 1 s), and a SuperExec that forks each ClientApp from a process that has
  already imported torch and flwr, polling for tasks every 0.05 s (``fl_sim/supernode.py``, ``fl_sim/superexec.py``).
* ``flower``: ``FLOWER_SUPERNODE=1``, Flower 1.42's ``flower-supernode`` unchanged — a fresh ``flwr-clientapp``
  process per message (Python, flwr and torch imports each time), the SuperExec's task poll every
  ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` = 1 s, the 3 s idle pull.

Both use fl-sim's ServerApp (replies pulled every 0.25 s; Flower's Grid: 3 s). The mean round time is the client
phase plus aggregation, from ``metrics.jsonl``, round 1 excluded; the figures are the same federation's, so the
ratio is measured in one run. Prints one JSON line per mode and, last, one JSON object of the headline figures.

    python benchmarks/bench_deploy.py [--nodes 2] [--rounds 6] [--modes warm flower] [--app DIR] [--netns]

``--app`` runs another checkout of the app. ``--netns`` runs the SuperLink and the SuperNodes on two hosts instead
of 127.0.0.1: a server and a client network namespace joined by a veth pair, SuperNode authentication on
(``fl_sim/netns.py``; needs root).
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


#: Environment of each mode's SuperNodes (on top of the federation's).
MODES = {"warm": {}, "flower": {"FLOWER_SUPERNODE": "1", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "1.0"}}


def bench(nodes: int, rounds: int, mode: str, app: Path, workdir: Path, netns: bool = False) -> dict:
    cfg = {"num-supernodes": nodes, "num-server-rounds": rounds, "attack-every": 0, "out-dir": str(workdir / "runs"),
           "run-name": mode}
    out = workdir / "runs"
    if netns:
        fed = NetnsFederation(workdir / f"netns-{mode}", nodes, node_auth=True, app_dir=app)
        fed.env.update(MODES[mode])
        with fed:
            t = time.monotonic()
            proc = fed.run(cfg)
            proc.wait(timeout=1800)
            wall = time.monotonic() - t
            logs = fed.logs()
        ok, detail = proc.returncode == 0, logs
    else:
        fed = LocalFederation(workdir / f"fed-{mode}", nodes, tls=True, app_dir=app)
        fed.env.update(MODES[mode])
        with fed:
            t = time.monotonic()
            proc = fed.run(cfg, timeout_s=1800)
            wall = time.monotonic() - t
        ok, detail = proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + fed.logs()
    if not ok:
        raise RuntimeError(detail)
    records = [json.loads(x) for x in (out / mode / "metrics.jsonl").read_text().splitlines()]
    times = [r["round_time_s"] for r in records[1:]]
    return {"nodes": nodes, "hosts": "netns" if netns else "loopback", "rounds": len(records),
            "mode": mode, "flwr_run_wall_s": wall,
            "round1_s": records[0]["round_time_s"], "mean_round_s": statistics.mean(times),
            "min_round_s": min(times), "max_round_s": max(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=["warm", "flower"])
    parser.add_argument("--app", type=Path, default=ROOT)
    parser.add_argument("--netns", action="store_true", help="two hosts: server and client network namespaces")
    a = parser.parse_args()
    if a.netns and unavailable():
        sys.exit(f"--netns: {unavailable()}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp:
        for mode in a.modes:
            rows.append(bench(a.nodes, a.rounds, mode, a.app.resolve(), Path(tmp), a.netns))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'mode':>8} {'round 1 s':>9} {'mean round s (2..)':>18} {'min':>6} {'max':>6} {'flwr run wall s':>15}")
    for r in rows:
        print(f"{r['mode']:>8} {r['round1_s']:>9.2f} {r['mean_round_s']:>18.2f} {r['min_round_s']:>6.2f} "
              f"{r['max_round_s']:>6.2f} {r['flwr_run_wall_s']:>15.1f}")
    by = {r["mode"]: r for r in rows}
    head = {"bench": "deploy", "hosts": rows[0]["hosts"], "nodes": a.nodes,
            "mean_round_s": {m: round(r["mean_round_s"], 3) for m, r in by.items()},
            "flwr_run_wall_s": {m: round(r["flwr_run_wall_s"], 1) for m, r in by.items()}}
    if "warm" in by and "flower" in by:
        head["warm_over_flower"] = round(by["warm"]["mean_round_s"] / by["flower"]["mean_round_s"], 3)
        print(f"mean round time, fl-sim's SuperNode / Flower's: {head['warm_over_flower']:.3f}x")
    print(json.dumps(head))


if __name__ == "__main__":
    main()
