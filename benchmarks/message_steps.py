"""Where an in-process simulated round goes, step by step: wall and thread time of each ClientApp and server step.

Runs the default federation with ``sim-backend=inprocess`` (10 clients, FedSGD B = 1, no attacks) and wraps a fixed
list of functions with timers (``time.perf_counter`` and ``time.thread_time``) for the rounds after the first 10 and
before the last 5; prints, per step, milliseconds per round, calls per round, and wall and thread milliseconds per
call. The wrappers add a few microseconds per call; compare steps within one run, not across machines.

    PYTHONPATH=$PWD python benchmarks/message_steps.py [ROUNDS] [--no-eval]   # default 60 rounds

``--no-eval`` sets ``eval-every`` beyond the last round (only the final round is evaluated), which takes the central
evaluation's effect on the caches out of the rounds. The last line is one JSON object: the median round and, per
step, milliseconds per call.
"""

from __future__ import annotations

import collections
import functools
import importlib
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

#: ``module:attribute`` of each timed step, looked up where the caller finds it (names imported into a module are
#: patched there).
STEPS = (
    "fl_sim.simulation:InProcessBackend.process_message",
    "fl_sim.simulation:_copy",
    "clients.client_app:_setup",
    "clients.client_app:state.restore",
    "clients.client_app:secrets.node_secret_for",
    "clients.client_app:to_state_dict",
    "clients.client_app:client_update",
    "clients.pipeline:prepare_model",
    "clients.pipeline:local_train",
    "clients.client_app:to_array_record",
    "clients.client_app:contract.train_reply",
    "strategies.strategy:CuriousFedAvg.configure_train",
    "strategies.strategy:CuriousFedAvg.aggregate_train",
    "strategies.strategy:CuriousFedAvg.usable_replies",
    "strategies.strategy:CuriousFedAvg._fedavg",
    "strategies.strategy:cast_like",
)

WALL: dict[str, float] = collections.defaultdict(float)
CPU: dict[str, float] = collections.defaultdict(float)
CALLS: collections.Counter[str] = collections.Counter()
ON = [False]


def _wrap(step: str) -> None:
    """Replace ``step``'s function by a timed one (counted only while :data:`ON`)."""
    module, attr = step.split(":")
    owner = importlib.import_module(module)
    *path, name = attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def timed(*args, **kwargs):
        t, c = time.perf_counter(), time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            if ON[0]:
                WALL[step] += time.perf_counter() - t
                CPU[step] += time.thread_time() - c
                CALLS[step] += 1

    setattr(owner, name, timed)


def main() -> None:
    argv = [a for a in sys.argv[1:] if not a.startswith("--")]
    rounds = int(argv[0]) if argv and argv[0].isdigit() else (60 if not argv else -1)
    if rounds < 20:
        print(f"ROUNDS={argv[0] if argv else rounds}: an integer of at least 20 allowed (rounds 11 to ROUNDS-5 are timed)", file=sys.stderr)
        sys.exit(2)
    extra = {"eval-every": rounds + 1} if "--no-eval" in sys.argv[1:] else {}
    for step in STEPS:
        _wrap(step)
    cfg = resolve({"num-server-rounds": rounds, "num-supernodes": 10, "attack-every": 0, "device": "cpu",
                   "sim-backend": "inprocess", **extra})

    def on_round(row: dict) -> None:
        if row["round"] == 10:
            ON[0] = True
        if row["round"] == rounds - 5:
            ON[0] = False

    with tempfile.TemporaryDirectory() as out:
        run_dir = sim.run(dict(cfg, **{"out-dir": out, "run-name": "steps"}), client_secret=0, on_round=on_round)
        times = [r["round_time_s"] for r in read_metrics(Path(run_dir))[10 : rounds - 5]]
    n = len(times)
    median = float(np.median(times)) * 1e3
    print(f"in-process, 10 clients, rounds 11-{rounds - 5} ({n}); median round {median:.2f} ms"
          f"{' (no central evaluation)' if extra else ''}")
    print(f"{'step':62s} {'ms/round':>9s} {'calls':>6s} {'ms/call':>8s} {'cpu/call':>9s}")
    per_call = {}
    for step in STEPS:
        calls = max(CALLS[step], 1)
        per_call[step] = round(WALL[step] / calls * 1e3, 4)
        print(f"{step:62s} {WALL[step] / n * 1e3:9.3f} {CALLS[step] / n:6.1f} {WALL[step] / calls * 1e3:8.3f} "
              f"{CPU[step] / calls * 1e3:9.3f}")
    print(json.dumps({"bench": "message_steps", "rounds": rounds, "no_eval": bool(extra),
                      "median_round_ms": round(median, 2), "ms_per_call": per_call}))


if __name__ == "__main__":
    main()
