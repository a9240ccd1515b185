"""Side by side: the simulation with fl-sim's event-driven message path and with Flower 1.42's polling threads.

``poll`` restores Flower's two engine threads for the run (``fl_sim.simulation.MessagePath`` not installed, the
ServerApp polling every 0.05 s); ``event`` is what ``fl-sim run`` does. The runs are interleaved in one process so
that machine load affects both alike.

    PYTHONPATH=$PWD python benchmarks/message_path_ab.py ROUNDS CLIENTS poll event [poll event ...]

Prints one line per run and one JSON object at the end: per label, each run's median round time (rounds 2..), its
start-up (wall time less the sum of the round times) and its final accuracy (equal: the path changes no result).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from fl_sim import simulation as sim  # noqa: E402
from fl_sim.config import resolve  # noqa: E402
from fl_sim.results import read_metrics  # noqa: E402

_INSTALLED, _GRID = sim.MessagePath.installed, sim.MessagePath.grid


def use_event_path(on: bool) -> None:
    """Install fl-sim's message path (``on``) or leave Flower's polling threads and Grid in place."""
    if on:
        sim.MessagePath.installed, sim.MessagePath.grid = _INSTALLED, _GRID
    else:
        sim.MessagePath.installed = lambda self: contextlib.nullcontext(self)
        sim.MessagePath.grid = lambda self, grid: grid


def main() -> None:
    rounds, clients, labels = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:] or ["poll", "event"]
    cfg = resolve({"num-server-rounds": rounds, "num-supernodes": clients, "attack-every": 0, "device": "cpu"})
    res: dict[str, list[dict]] = {}
    for label in labels:
        use_event_path(label == "event")
        with tempfile.TemporaryDirectory() as out:
            t = time.perf_counter()
            run_dir = Path(sim.run(dict(cfg, **{"out-dir": out, "run-name": "ab"}), client_secret=0))
            wall = time.perf_counter() - t
            rows = read_metrics(run_dir)
            acc = json.loads((run_dir / "summary.json").read_text())["final_accuracy"]
        res.setdefault(label, []).append({
            "median_round_ms": round(1e3 * float(np.median([r["round_time_s"] for r in rows[1:]])), 1),
            "startup_s": round(wall - sum(r["round_time_s"] for r in rows), 2), "final_accuracy": acc})
        print(label, res[label][-1], "load", os.getloadavg(), flush=True)
    use_event_path(True)
    print(json.dumps({"bench": "message_path_ab", "rounds": rounds, "clients": clients, "runs": res}))


if __name__ == "__main__":
    main()
