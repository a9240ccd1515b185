"""Client secrets the server cannot derive: each node's secret seed and every private seed drawn from it.

Every random draw a client makes in private — the batch it samples, DP noise, GradDefense's slice choice and noise,
FedKL's key and lock layers — is seeded by :func:`round_seed` or :func:`once_seed`, and both derive from the
node's **secret seed**, which never enters the run config, a message or a file the server writes. The run config's
public ``seed`` is mixed in as well (so ``seed=0,1,2`` still give three different runs when the secret is fixed),
but without the secret it determines nothing: the derivation is NumPy's ``SeedSequence`` (a hash of all its
entropy words), so a server that knows the seed, the round, the partition, the model and the data still faces
2^63 equally likely secrets.

Where a node's secret seed comes from (:func:`node_secret_for`), first match wins:

1. the node config's ``secret-seed`` (deployment: ``flower-supernode --node-config "... secret-seed=N"``,
   ``deploy/supernode.sh`` with ``SECRET_SEED=N``);
2. the environment's :data:`SECRET_ENV` (``FL_SIM_CLIENT_SECRET``), a *run-level* client secret from which each
   node derives its own by partition id (:func:`node_secret`). ``fl-sim run`` (the simulation harness) sets it in
   the environment its Ray workers inherit, from ``--client-secret N``, the same variable in the user's
   environment, or OS entropy, and keeps it in ``RUN_DIR/clients/secret`` (:func:`save_run_secret`) so that
   ``--resume`` reuses it;
3. a secret this node drew earlier from OS entropy and kept in its ``Context.state`` (record
   :data:`STATE_KEY`, which never leaves the client);
4. a fresh draw from OS entropy (``secrets.randbits(63)``), kept there.

Secrets are integers in ``[0, 2^63)``. The simulated dropout draw (``clients.client_app.drops_out``) is a
simulated fault, not a secret, and stays on the public seed.
"""

from __future__ import annotations

import functools
import hashlib
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context

#: The environment variable holding a run-level client secret (an integer in ``[0, 2^63)``).
SECRET_ENV = "FL_SIM_CLIENT_SECRET"
#: The node-config key holding this node's own secret seed.
NODE_SECRET_KEY = "secret-seed"
#: The ``Context.state`` record where a node keeps a secret it drew from OS entropy.
STATE_KEY = "fl-sim-node-secret"
#: Where the simulation harness keeps the run-level client secret, relative to the run directory.
RUN_SECRET_FILE = Path("clients") / "secret"
#: Exclusive upper bound of a secret.
SECRET_LIMIT = 2**63

# domain tags: the node's derivation, the once-per-run seed and the per-round seeds never share a SeedSequence input
_NODE, _ONCE, _ROUND, _CHILD, _PROBE = 0x6E6F6465, 0x6F6E6365, 0x726F756E, 0x6368696C, 0x70726F62


def _word(x: int) -> int:
    """A SeedSequence entropy word for any Python int (negative seeds included)."""
    return int(x) % 2**64


@functools.lru_cache(maxsize=1024)
def _draw(*words: int) -> int:
    # cached: a pure function of its words, called for the same node and once-per-run seeds with every message
    return int(np.random.SeedSequence([_word(w) for w in words]).generate_state(1, dtype=np.uint64)[0] >> 1)


def parse_secret(value: Any, source: str) -> int:
    """``value`` as a secret (an integer in ``[0, 2^63)``).

    Args:
        value: an int or a string of digits.
        source: what to name in the error (e.g. ``"--client-secret"``, ``"FL_SIM_CLIENT_SECRET"``).

    Raises:
        ValueError: one line naming ``source``, the value and what is allowed.
    """
    n = -1
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, str) and value.strip().isdigit():
        n = int(value.strip())
    if not 0 <= n < SECRET_LIMIT:
        raise ValueError(f"{source}={value!r} is not allowed; it must be an integer in [0, 2^63)")
    return n


def new_secret() -> int:
    """A fresh secret from OS entropy (``secrets.randbits(63)``)."""
    return secrets.randbits(63)


def env_secret(environ: Mapping[str, str] | None = None) -> int | None:
    """The run-level client secret in :data:`SECRET_ENV`, or ``None`` when it is unset or empty.

    Raises:
        ValueError: the variable holds something other than an integer in ``[0, 2^63)``.
    """
    value = (os.environ if environ is None else environ).get(SECRET_ENV, "")
    return parse_secret(value, SECRET_ENV) if value.strip() else None


def node_secret(run_secret: int, partition_id: int) -> int:
    """The secret seed of the node that trains ``partition_id`` under the run-level client secret ``run_secret``.

    ``SeedSequence([tag, run_secret, partition_id])``, 63 bits. ``fl-sim run --client-secret S`` and a deployment
    whose node ``i`` has ``secret-seed=node_secret(S, i)`` make the same draws (``fl-sim deploy`` does that).
    """
    return _draw(_NODE, run_secret, partition_id)


def child_secret(secret: int, label: str) -> int:
    """A secret derived from ``secret`` for the thing named ``label`` (e.g. a sweep cell's id), 63 bits.

    ``SeedSequence([tag, secret, *sha256(label)])``: different labels give unrelated secrets.
    """
    digest = hashlib.sha256(label.encode()).digest()
    return _draw(_CHILD, secret, *(int.from_bytes(digest[i : i + 8], "little") for i in range(0, 32, 8)))


def once_seed(secret: int, seed: int) -> int:
    """A 32-bit seed for what a node draws once per run (FedKL's key and lock layers), from its secret ``secret``
    and the run config's public ``seed``."""
    return _draw(_ONCE, secret, seed) & 0xFFFFFFFF


def round_seed(secret: int, seed: int, server_round: int) -> int:
    """A 32-bit seed for a node's private draws in ``server_round`` (its batches, its defense's noise and choices),
    from its secret ``secret`` and the run config's public ``seed``."""
    return _draw(_ROUND, secret, seed, server_round) & 0xFFFFFFFF


def probe_seed(secret: int, seed: int, server_round: int) -> int:
    """A 32-bit seed for the private draws of a ``query.probe`` answer in ``server_round`` (its defense's noise and
    choices): another stream than :func:`round_seed`'s, so a probe never repeats the noise or slice draws of the
    update the client sent in that round."""
    return _draw(_PROBE, secret, seed, server_round) & 0xFFFFFFFF


def node_secret_for(context: Context, partition_id: int) -> int:
    """This node's secret seed (see the module docstring for where it comes from).

    Args:
        context: the node's Flower ``Context`` (``node_config``, ``state``); a secret drawn from OS entropy is
            stored in ``context.state[STATE_KEY]``.
        partition_id: the node's partition id (for a secret derived from a run-level one).

    Raises:
        ValueError: ``secret-seed`` or ``FL_SIM_CLIENT_SECRET`` is not an integer in ``[0, 2^63)``.
    """
    if NODE_SECRET_KEY in context.node_config:
        return parse_secret(context.node_config[NODE_SECRET_KEY], f"node config {NODE_SECRET_KEY}")
    run_secret = env_secret()
    if run_secret is not None:
        return node_secret(run_secret, partition_id)
    if STATE_KEY in context.state:
        return int(context.state[STATE_KEY]["seed"])
    secret = new_secret()
    context.state[STATE_KEY] = ConfigRecord({"seed": secret})
    return secret


def write_secret(path: Path, secret: int) -> Path:
    """Write ``secret`` to ``path`` (mode 0600, atomically, fsynced); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{parse_secret(secret, 'client secret')}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_secret(path: Path) -> int:
    """The secret kept in ``path`` (:func:`write_secret`).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file does not hold an integer in ``[0, 2^63)``.
    """
    return parse_secret(Path(path).read_text().strip(), str(path))


def save_run_secret(run_dir: Path, secret: int) -> Path:
    """Write the run-level client secret to ``run_dir/clients/secret`` (mode 0600, atomically); return the path."""
    return write_secret(Path(run_dir) / RUN_SECRET_FILE, secret)


def load_run_secret(run_dir: Path) -> int:
    """The run-level client secret kept in ``run_dir/clients/secret``.

    Raises:
        FileNotFoundError: the run directory has none (a run started before client secrets existed).
        ValueError: the file does not hold an integer in ``[0, 2^63)``.
    """
    return read_secret(Path(run_dir) / RUN_SECRET_FILE)
