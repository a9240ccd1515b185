"""``python -m fl_sim.supernode [flower-supernode arguments]``: Flower 1.42's SuperNode with shorter idle polls and
the warm SuperExec of :mod:`fl_sim.superexec`.

This runs Flower's own ``flower-supernode`` (``flwr.supernode.cli.flower_supernode``: the same connection, TLS,
node authentication, heartbeats, node state and Runtime API) with two of its fixed intervals made settable and
its SuperExec replaced. Flower 1.42 hard-codes them in ``flwr/supernode/start_client_internal.py``:

* ``time.sleep(3)`` between pulls from the SuperLink when no message was waiting: a message sent right after an
  empty pull waits up to 3 s. Here: ``FL_SIM_NODE_POLL_S`` seconds (default :data:`DEFAULT_IDLE_POLL_S`). Each
  idle node then sends one ``PullMessages`` request per interval instead of one per 3 s.
* ``time.sleep(0.5)`` steps while waiting for the ClientApp's reply before pushing it. Here:
  ``FL_SIM_NODE_REPLY_POLL_S`` (default :data:`DEFAULT_REPLY_POLL_S`).
* ``pull_objects`` with Flower's first retry delay of 1 s (``PULL_INITIAL_BACKOFF``, doubling to 10 s) when the
  SuperLink does not hold a message's objects yet: here :data:`OBJECT_PULL_BACKOFF_S` (same doubling and cap).
  The ClientApp (:mod:`fl_sim.superexec`) and fl-sim's ServerApp (``fl_sim.server_app.main``) get the same.
* In ``--isolation subprocess`` (the default) the SuperNode ``Popen``\\ s ``flower-superexec`` with the Runtime
  API's address, TLS options and its pid; here the same arguments go to ``python -m fl_sim.superexec``.

``FL_SIM_NODE_POLL_S=3 FL_SIM_NODE_REPLY_POLL_S=0.5`` gives Flower's intervals back; ``deploy/supernode.sh`` with
``FLOWER_SUPERNODE=1`` runs Flower's ``flower-supernode`` unchanged. The values are checked before the SuperNode
starts (one line, exit code 2). Uses private parts of flwr 1.42.0 (pinned): the module attributes ``time``,
``subprocess`` and ``pull_objects`` of ``flwr.supernode.start_client_internal``.
"""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable

#: First retry delay (seconds; doubling up to Flower's 10 s cap) when objects of a message are not there yet.
#: Flower 1.42 stores a message before its objects (the SuperLink before the SuperNode has pushed a reply's
#: arrays, the SuperNode before it has pulled a train message's), so whoever pulls at once often misses them once,
#: and Flower's 1 s first delay is then most of a round. Each retry is one local or LAN request.
OBJECT_PULL_BACKOFF_S = 0.02

DEFAULT_IDLE_POLL_S = 0.1
DEFAULT_REPLY_POLL_S = 0.02
IDLE_POLL_ENV = "FL_SIM_NODE_POLL_S"
REPLY_POLL_ENV = "FL_SIM_NODE_REPLY_POLL_S"
#: Allowed range of both intervals, seconds.
POLL_RANGE_S = (0.01, 60.0)


def poll_interval(env: str, default: float) -> float:
    """The interval in environment variable ``env`` (seconds), ``default`` when unset.

    Raises:
        ValueError: the value is not a finite number in :data:`POLL_RANGE_S`; the message names the variable, the
            value and the allowed range.
    """
    raw = os.environ.get(env)
    if raw is None or raw == "":
        return default
    lo, hi = POLL_RANGE_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and lo <= value <= hi):
        raise ValueError(f"{env}={raw!r} is not allowed; it must be a number of seconds in [{lo}, {hi}]")
    return value


class NodeSleeps:
    """Stands in for the ``time`` module inside ``flwr.supernode.start_client_internal``.

    ``sleep(3)`` (the idle pull interval, any request of 1 s or more) sleeps ``idle_s``; shorter requests (the
    0.5 s reply-wait steps) sleep ``min(seconds, reply_s)``. Every other attribute is the real ``time`` module's.
    """

    def __init__(self, idle_s: float, reply_s: float):
        self.idle_s, self.reply_s = idle_s, reply_s

    def sleep(self, seconds: float) -> None:
        time.sleep(self.idle_s if seconds >= 1 else min(seconds, self.reply_s))

    def __getattr__(self, name: str):
        return getattr(time, name)


class WarmSuperExecLauncher:
    """Stands in for the ``subprocess`` module inside ``flwr.supernode.start_client_internal``: ``Popen`` of a
    command starting with ``flower-superexec`` starts ``python -m fl_sim.superexec`` with the same arguments (this
    interpreter); any other command, and every other attribute, is the real ``subprocess``'s."""

    @staticmethod
    def command(cmd: list[str]) -> list[str]:
        """``cmd`` with a leading ``flower-superexec`` replaced by ``[sys.executable, "-m", "fl_sim.superexec"]``."""
        if cmd and os.path.basename(cmd[0]) == "flower-superexec":
            return [sys.executable, "-m", "fl_sim.superexec", *cmd[1:]]
        return list(cmd)

    def Popen(self, cmd, *args, **kwargs):  # noqa: N802 - the name Flower calls
        return subprocess.Popen(self.command(list(cmd)), *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(subprocess, name)


def shorter_backoff(pull: Callable, backoff_s: float = OBJECT_PULL_BACKOFF_S) -> Callable:
    """Flower's ``pull_objects`` or ``pull_and_inflate_object_from_tree`` (``pull``) with ``initial_backoff`` set
    to ``backoff_s`` seconds; a function already wrapped is returned as it is."""
    if getattr(pull, "fl_sim_backoff_s", None) is not None:
        return pull
    wrapped = functools.partial(pull, initial_backoff=backoff_s)
    wrapped.fl_sim_backoff_s = backoff_s
    return wrapped


def main() -> None:
    """Check the two intervals, patch Flower's SuperNode loop and run ``flower-supernode`` with ``sys.argv``."""
    try:
        idle = poll_interval(IDLE_POLL_ENV, DEFAULT_IDLE_POLL_S)
        reply = poll_interval(REPLY_POLL_ENV, DEFAULT_REPLY_POLL_S)
    except ValueError as e:
        print(f"fl_sim.supernode: {e}", file=sys.stderr)
        sys.exit(2)
    import flwr.supernode.start_client_internal as sci
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sci.time = NodeSleeps(idle, reply)
    sci.subprocess = WarmSuperExecLauncher()
    sci.pull_objects = shorter_backoff(sci.pull_objects)
    sys.argv[0] = "flower-supernode"  # Flower picks its telemetry event and log names from argv[0]
    flower_supernode()


if __name__ == "__main__":
    main()
