"""Per-round checkpoints of a client's ``Context.state``, written and read on the client side.

A defense's secrets and counters live in the client's Flower ``Context.state`` (FedKL's trained lock layers,
GradDefense's sensitivities, the DP release counter, a node secret drawn from OS entropy). Flower keeps that state
inside the simulation engine or the SuperNode, so a killed run loses it. Here every ClientApp call that leaves a
non-empty state writes it, with the server round, to its **state directory**:

* simulation (``fl-sim run``): ``RUN_DIR/clients/partition-P/``; the harness names ``RUN_DIR/clients`` in the
  environment variable :data:`STATE_DIR_ENV` its Ray workers inherit;
* deployment: the node config's ``state-dir`` (``deploy/supernode.sh`` with ``STATE_DIR=...``), on the node:
  ``STATE_DIR/run-<Flower run id>/partition-P/``. The run id is the SuperLink's for the whole run, so a restarted
  SuperNode finds its state, and a new run (a new id) never picks up an old run's. (Resuming the server of a
  deployed run is not wired up; it would have to name the killed run's id.)

Files are ``round-NNNNNN.state`` (Flower's protobuf serialisation of the ``RecordDict``), written atomically
(temporary file, fsync, rename). After writing round ``r`` only round ``r`` and the latest file before it are kept:
the server checkpoints round ``r - 1`` before any client can write round ``r``, so that older file is the newest a
resume can need.

Restoring (:func:`restore`): a ClientApp whose ``Context.state`` is empty (a fresh simulation engine after
``--resume``, a restarted SuperNode) loads the newest file of a round ``<= upto`` — for a train message of round
``r`` that is ``r - 1``, for an evaluate message ``r`` — so that after a resume from round ``k`` every client continues
from its state after the last round ``<= k`` it took part in, even if it wrote round ``k + 1`` before the kill. The
harness also removes files of rounds after ``k`` before a resumed simulation starts (:func:`prune_after`).
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

from flwr.app import Context, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

#: Environment variable naming the simulation's client-state root (``RUN_DIR/clients``).
STATE_DIR_ENV = "FL_SIM_CLIENT_STATE_DIR"
#: Node-config key naming a deployed node's client-state root.
STATE_DIR_KEY = "state-dir"
_FILE = re.compile(r"^round-(\d{6,})\.state$")
#: State directories this process found without a state file and has not written to since (:func:`restore`).
_NOTHING_SAVED: set[Path] = set()


def partition_dir(root: Path, partition_id: int) -> Path:
    """``root/partition-P``: one partition's state files."""
    return Path(root) / f"partition-{int(partition_id)}"


def state_dir(context: Context, partition_id: int) -> Path | None:
    """This client's state directory, or ``None`` when neither the node config nor the environment names one.

    Node config ``state-dir`` wins (``STATE_DIR/run-<run id>/partition-P``); else :data:`STATE_DIR_ENV`
    (``ROOT/partition-P``).
    """
    node_root = str(context.node_config[STATE_DIR_KEY]) if STATE_DIR_KEY in context.node_config else ""
    return _state_dir(node_root, int(context.run_id), os.environ.get(STATE_DIR_ENV, ""), int(partition_id))


@functools.lru_cache(maxsize=4096)
def _state_dir(node_root: str, run_id: int, env_root: str, partition_id: int) -> Path | None:
    # cached (Path objects are immutable): the same directory for every message of a node
    if node_root:
        return partition_dir(Path(node_root).expanduser() / f"run-{run_id}", partition_id)
    return partition_dir(Path(env_root), partition_id) if env_root else None


def saved_rounds(directory: Path) -> list[int]:
    """The rounds with a state file in ``directory``, ascending (none if it does not exist)."""
    if not Path(directory).is_dir():
        return []
    return sorted(int(m.group(1)) for p in Path(directory).iterdir() if (m := _FILE.match(p.name)))


def _path(directory: Path, server_round: int) -> Path:
    return Path(directory) / f"round-{int(server_round):06d}.state"


def save(directory: Path, server_round: int, state: RecordDict) -> Path:
    """Write ``state`` as the client's state after ``server_round``; keep only that file and the latest before it.

    Args:
        directory: this client's state directory (created if missing).
        server_round: the round the state belongs to (>= 0).
        state: the client's ``Context.state``.

    Returns:
        The file written.
    """
    directory = Path(directory)
    _NOTHING_SAVED.discard(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = _path(directory, server_round)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(recorddict_to_proto(state).SerializeToString())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    older = [r for r in saved_rounds(directory) if r < server_round]
    for r in older[:-1]:
        _path(directory, r).unlink(missing_ok=True)
    return path


def load(directory: Path, upto: int) -> tuple[int, RecordDict] | None:
    """The newest saved state of a round ``<= upto``: ``(round, state)``, or ``None`` if there is none."""
    rounds = [r for r in saved_rounds(directory) if r <= upto]
    if not rounds:
        return None
    proto = ProtoRecordDict()
    proto.ParseFromString(_path(directory, rounds[-1]).read_bytes())
    return rounds[-1], recorddict_from_proto(proto)


def restore(context: Context, directory: Path | None, upto: int) -> int | None:
    """Fill an empty ``context.state`` from the newest saved state of a round ``<= upto``.

    A directory found without any state file is remembered in this process until :func:`save` writes to it, and
    not listed again (a ``stat`` per message, ~0.1 ms here, for clients whose state stays empty, e.g. without a
    defense). Only :func:`save` puts files there; a file another process saves for the same partition comes with
    a non-empty ``Context.state`` (the engine or SuperNode hands the state a ClientApp leaves to the next one of
    that node), so this function returns before the remembered directory is consulted. A resumed run or a
    restarted SuperNode starts new processes, which list the directory again.

    Returns:
        The round restored, or ``None`` (no directory, a non-empty state, or nothing saved).
    """
    if directory is None or len(context.state) > 0:
        return None
    directory = Path(directory)
    if directory in _NOTHING_SAVED:
        return None
    if not saved_rounds(directory):
        _NOTHING_SAVED.add(directory)
        return None
    found = load(directory, upto)
    if found is None:
        return None
    rnd, state = found
    for name, record in state.items():
        context.state[name] = record
    return rnd


def checkpoint(context: Context, directory: Path | None, server_round: int) -> Path | None:
    """:func:`save` a non-empty ``context.state`` for ``server_round`` (nothing to do without a directory)."""
    if directory is None or len(context.state) == 0:
        return None
    return save(directory, server_round, context.state)


def prune_after(root: Path, last_round: int) -> list[Path]:
    """Delete every partition's state files of rounds ``> last_round`` under ``root`` (a resume from that round).

    Returns:
        The files removed.
    """
    removed = []
    root = Path(root)
    if not root.is_dir():
        return removed
    for part in sorted(root.glob("partition-*")):
        for r in saved_rounds(part):
            if r > last_round:
                _path(part, r).unlink(missing_ok=True)
                removed.append(_path(part, r))
    return removed
