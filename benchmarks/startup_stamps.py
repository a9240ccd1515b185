"""Where ``fl-sim run``'s start-up goes: a time stamp at each phase of one in-process simulation.

Stamps (seconds since this script started): the driver's imports, ``init_ray`` (Ray's GCS, raylet and pre-started
workers), the end of every round (round 1 also pays for Flower's node registration, the ClientApp actors' imports
and the ``query.whoami`` round), and the shutdown.

    PYTHONPATH=$PWD python benchmarks/startup_stamps.py [ROUNDS] [CLIENTS]      # defaults: 3 rounds, 10 clients

The last line is one JSON object with the phases' durations.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

T0 = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from fl_sim import simulation as sim  # noqa: E402
from fl_sim.config import resolve  # noqa: E402

STAMPS: dict[str, float] = {}


def stamp(what: str) -> None:
    STAMPS[what] = time.perf_counter() - T0
    print(f"{STAMPS[what]:7.2f} s  {what}", flush=True)


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    clients = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    stamp("imports")
    init_ray = sim.init_ray

    def timed_init(args):
        stamp("init_ray start")
        init_ray(args)
        stamp("init_ray done")

    sim.init_ray = timed_init
    cfg = resolve({"num-server-rounds": rounds, "num-supernodes": clients, "attack-every": 0, "device": "cpu"})
    with tempfile.TemporaryDirectory() as out:
        sim.run(dict(cfg, **{"out-dir": out, "run-name": "stamps"}), client_secret=0,
                on_round=lambda row: stamp(f"round {row.get('round')} done"))
    stamp("run returned")
    sim.init_ray = init_ray
    last = f"round {rounds} done"
    print(json.dumps({"bench": "startup_stamps", "rounds": rounds, "clients": clients,
                      "imports_s": round(STAMPS["imports"], 2),
                      "ray_init_s": round(STAMPS["init_ray done"] - STAMPS["init_ray start"], 2),
                      "ray_to_round_1_end_s": round(STAMPS["round 1 done"] - STAMPS["init_ray done"], 2),
                      "after_last_round_s": round(STAMPS["run returned"] - STAMPS.get(last, STAMPS["run returned"]), 2)}))


if __name__ == "__main__":
    main()
