"""A cell host: ``python -m fl_sim.cli run ...`` without paying its ~4 s of imports once per cell.

``fl-sim sweep`` runs each cell as the command ``python -m fl_sim.cli run KEY=VALUE ... --out CELL``
(:func:`fl_sim.sweep.runner.cell_command`). A fresh interpreter spends ~4 s (idle machine; ~7-9 s with the other
cores busy) importing torch, Flower, Ray's client, scipy, scikit-image, tensorboard and fl-sim before the run's
first step, and more at its first attack and figure. The host is Python's ``multiprocessing`` fork server with
:mod:`fl_sim.cellhost.preload` as its preload: the server imports what that command imports once
(:data:`PRELOAD`), then forks one child per cell, and the child runs the same command through
:func:`runpy.run_module` (what ``python -m`` does) in its own session, pinned to its cores, with its own environment
and its output in its ``cell.log`` (:func:`run_cell`). Only a cell whose command is exactly that command is run
this way; any other command is a subprocess as before. Measured on the seed-001 sweep: 11.4 s less per cell on
its core, the same table (docs/performance.md, "The sweep's cell host").

What a forked cell shares with the host, and why it computes what the subprocess computes:
  * Thread settings are read when torch, OpenMP and OpenBLAS load, i.e. in the host: the preload sets
    :data:`HOST_ENV` before it imports anything (one intra-op thread, passive OpenMP waits, one OpenBLAS thread),
    and the runner forks a cell only when the cell's environment agrees with it (:func:`forkable`). No OpenMP or BLAS thread pool has
    run when the host forks (the host only imports), so the child starts with no thread but its own.
  * Random state: every generator fl-sim uses is seeded from the run's config and its client secret, and
    Python's ``random`` is reseeded in each child by CPython; tests/test_cellhost.py and the seed-001 sweep run
    both ways give the same accuracies, losses, attack scores and reconstructions bit for bit.
  * ``os.environ`` is replaced by the cell's (so its client secret and ``PYTHONPATH`` reach Ray's workers), and
    the child's working directory and ``sys.path`` are the sweep's, as a subprocess's would be.

Deviation: fl-sim's own import-time state (registries, caches filled at import) is built once in the host and
copied into each cell by the fork; nothing fl-sim caches at import depends on a run's config.

Layering: this module names the CLI by string (``runpy``, :data:`PRELOAD`), as the subprocess command names
``-m fl_sim.cli``; it does not import the layer above the sweep.
"""

from __future__ import annotations

import atexit
import importlib
import os
import signal
import sys
import threading

#: Environment the host sets before it imports anything: what every sweep cell's environment holds
#: (:func:`fl_sim.sweep.runner.cell_env`) and what torch, OpenMP and OpenBLAS read once, when they load.
HOST_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
            "OMP_WAIT_POLICY": "PASSIVE"}

#: Modules imported by ``python -m fl_sim.cli run`` of a seed-001 cell (read off ``sys.modules`` at the end of
#: in-process runs with DLG, iDLG and IG against soteria, graddefense and dp-laplace), the heavy ones first.
PRELOAD = ("torch", "numpy", "scipy.stats", "scipy.optimize", "skimage.metrics", "flwr",
           "flwr.serverapp", "flwr.clientapp", "flwr.simulation", "ray", "torch.utils.tensorboard",
           "dp_accounting", "dp_accounting.pld", "dp_accounting.rdp", "matplotlib.pyplot",
           "fl_sim.cli", "fl_sim.simulation", "fl_sim.server_app", "fl_sim.results", "fl_sim.report",
           "clients.client_app", "clients.defenses", "attacker", "strategies.strategy")


def forkable(env: dict[str, str]) -> bool:
    """Whether a cell with environment ``env`` computes in a forked child what it computes in a fresh process:
    ``env`` sets every thread variable of :data:`HOST_ENV` to the host's value."""
    return all(env.get(k) == v for k, v in HOST_ENV.items())


def preload() -> None:
    """Set :data:`HOST_ENV` and import :data:`PRELOAD` (a module that fails to import is left to the cell, which
    then imports it itself and reports the error as a subprocess would)."""
    os.environ.update(HOST_ENV)
    try:
        import matplotlib

        matplotlib.use("Agg")  # what fl-sim's figure code selects before pyplot; no display, no GUI event loop
    except ImportError:
        pass
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the cell will import it again and fail with the real error
            pass
    sys.stdout.flush()
    sys.stderr.flush()


_PR_SET_PDEATHSIG = 1
_LIBC = None


def parent_death_signal(sig: int) -> None:
    """Have the kernel send ``sig`` to this process when its parent exits (Linux ``PR_SET_PDEATHSIG``; a no-op
    elsewhere). Safe between fork and exec once libc is loaded (the first call in the parent loads it)."""
    global _LIBC
    if not sys.platform.startswith("linux"):
        return
    if _LIBC is None:
        import ctypes
        import ctypes.util

        _LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    _LIBC.prctl(_PR_SET_PDEATHSIG, sig)


def run_cell(argv: list[str], env: dict[str, str], cpus: list[int], sweep_pid: int, log_path: str,
             lock_fd: object) -> None:
    """Body of a forked cell: ``python -m fl_sim.cli`` with arguments ``argv``; never returns (``os._exit``).

    Args:
        argv: the command's arguments after ``-m fl_sim.cli`` (``["run", "KEY=VALUE", ..., "--out", DIR]``).
        env: the cell's whole environment.
        cpus: the CPU ids the cell is pinned to.
        sweep_pid: the sweep's pid; the cell stops (exit 1) if the sweep is already gone.
        log_path: the cell's ``cell.log`` (created by the sweep): stdout and stderr are appended to it.
        lock_fd: the sweep lock, a ``multiprocessing.reduction.DupFd``: held open until the cell exits, so a second
            sweep cannot start in the directory while this cell runs.

    The exit status is the command's: 0, its ``SystemExit`` code (2 for bad input), 1 after an uncaught exception
    (its traceback in the log), 130 after an uncaught ``KeyboardInterrupt``.
    """
    lock_fd.detach()  # the inherited descriptor stays open (unused) until os._exit
    os.setsid()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)
    host = os.getppid()
    # the host exits when the sweep dies (its pipe to the sweep closes): the cell then gets SIGINT and stops after its
    # round, as a subprocess cell does when the sweep dies
    parent_death_signal(signal.SIGINT)
    try:
        os.kill(sweep_pid, 0)
        alive = os.getppid() == host
    except ProcessLookupError:
        alive = False
    if not alive:
        os._exit(1)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ.clear()
    os.environ.update(env)
    code = 0
    try:
        import runpy

        sys.argv = ["-m", *argv]  # runpy sets sys.argv[0] to the module's path, as `python -m` does
        runpy.run_module("fl_sim.cli", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)
    except KeyboardInterrupt:
        import traceback

        traceback.print_exc()
        code = 130
    except BaseException:  # noqa: BLE001 - as the interpreter does with an uncaught exception
        import traceback

        traceback.print_exc()
        code = 1
    # the interpreter's own way out: wait for non-daemon threads, then the atexit handlers, then flush
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None:
        shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)

