"""A test-only ClientApp whose clients misbehave by partition id, and a script that simulates it.

It lives under ``tests/`` on purpose: no run config, node config or deployment can select it; only
``fl_sim.simulation.run(cfg, client_app=app)`` (Python API) does. Partition ids:

* 1 replies with a NaN in its model, 2 with a wrongly shaped array, 3 raises, 4 answers only after
  ``SILENT_S`` seconds (longer than the round timeout the test uses), every other partition is the real client.

Usage: ``python tests/fault_apps.py OUT_DIR`` runs 6 clients for 2 rounds into ``OUT_DIR`` (``tests/test_faults.py``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from clients import client_app as real

SILENT_S = 6.0
ROUND_TIMEOUT_S = 3.0

app = ClientApp()


def _edit_arrays(reply: Message, edit) -> Message:
    rec = reply.content["arrays"]
    arrays = {k: rec[k].numpy().copy() for k in rec.keys()}
    edit(arrays)
    reply.content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    return reply


def _nan(msg: Message, context: Context) -> Message:
    def poison(arrays):
        first = next(iter(arrays))
        arrays[first].flat[0] = np.nan

    return _edit_arrays(real.train(msg, context), poison)


def _wrong_shape(msg: Message, context: Context) -> Message:
    def cut(arrays):
        last = list(arrays)[-1]
        arrays[last] = arrays[last][:-1]

    return _edit_arrays(real.train(msg, context), cut)


def _raises(msg: Message, context: Context) -> Message:
    raise RuntimeError("injected fault: this client crashed")


def _silent(msg: Message, context: Context) -> Message:
    time.sleep(SILENT_S)
    return real.train(msg, context)


FAULTS = {1: _nan, 2: _wrong_shape, 3: _raises, 4: _silent}


@app.query("whoami")
def whoami(msg: Message, context: Context) -> Message:
    return real.whoami(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return FAULTS.get(int(context.node_config["partition-id"]), real.train)(msg, context)


def main(out: Path) -> None:
    from fl_sim import simulation
    from fl_sim.config import resolve

    cfg = resolve({"num-supernodes": 6, "num-server-rounds": 2, "attack-every": 1, "victim": "random",
                   "attack-iterations": 10, "attack-time-limit": 0.0, "round-timeout": ROUND_TIMEOUT_S,
                   "out-dir": str(out.parent), "run-name": out.name})
    simulation.run(cfg, client_app=app)


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
