"""A warm SuperExec for Flower 1.42 SuperNodes: each ClientApp task runs in a process forked from one that has
already imported torch and Flower, instead of a fresh ``flwr-clientapp`` process per message.

``python -m fl_sim.superexec`` takes ``flower-superexec``'s arguments and runs Flower's own SuperExec loop
(``flwr.supercore.superexec.run_superexec``: task acquisition from the SuperNode's Runtime API, tokens, signal
handling) with one difference, its executor: Flower's ``SubprocessExecutor`` ``Popen``\\ s
``flwr-clientapp --token T`` for every task, and that process spends ~3 s (idle, 2 cores) importing Python, torch
and flwr before it pulls its message; :class:`ForkExecutor` instead ``fork``\\ s this process, whose interpreter
already holds :data:`PRELOAD` (imported once at start, before any torch operation, so no OpenMP or CUDA state is
inherited), and the child runs Flower's own ``run_clientapp`` (``flwr.supernode.runtime.run_clientapp``) with the
same token and options — the code ``flwr-clientapp`` runs. Every task still runs in a process of its own that exits
after one message, as in Flower; only the imports are shared (copy-on-write).

The app's code always comes from the FAB: before the child loads the ClientApp it drops every module loaded from
this checkout (``fl_sim``, ``clients``, …) from ``sys.modules``, so Flower's loader imports the FAB's copy, as a
fresh ``flwr-clientapp`` would. Only third-party modules (:data:`PRELOAD`) are inherited.

Used by :mod:`fl_sim.supernode` (``deploy/supernode.sh``). Uses private parts of flwr 1.42.0 (pinned):
``run_superexec.get_executor`` (replaced for this process), ``run_clientapp.pull_and_inflate_object_from_tree``
(first retry delay ``fl_sim.supernode.OBJECT_PULL_BACKOFF_S``), ``run_clientapp.install_from_fab``
(:func:`install_once`), the ``Executor`` protocol and ``ExecutionSpec``
(``flwr/supercore/superexec/executor/types.py``) and ``flwr.supercore.exit.exit_handler``. POSIX only
(``os.fork``).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
import signal
import sys
import threading
import traceback
from logging import INFO
from collections.abc import Callable
from pathlib import Path

from fl_sim.supernode import shorter_backoff

#: Third-party modules imported once by the SuperExec and inherited by every forked ClientApp (what
#: ``clients.client_app`` and Flower's ``run_clientapp`` import that costs time: torch ~2 s, flwr ~0.8 s idle).
PRELOAD = ("numpy", "torch", "flwr.clientapp", "flwr.supernode.runtime.run_clientapp")

#: File :func:`install_once` writes into an app directory that Flower installed: the FAB's full SHA-256.
INSTALLED_MARKER = ".fl-sim-fab-sha256"

#: ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` when it is not set: a task poll is one local HTTP request, and with no
#: process start to amortise, Flower's 1 s default would be most of a round.
DEFAULT_TASK_POLL_S = "0.05"

_CHECKOUT = Path(__file__).resolve().parents[1]


def checkout_modules(root: Path = _CHECKOUT) -> list[str]:
    """Names in ``sys.modules`` of modules loaded from files under ``root`` (this checkout by default), except
    those of the running environment (``sys.prefix``: a virtual environment inside the checkout) and those whose
    ``__file__`` is not an absolute path (``torch.ops`` says ``_ops.py``)."""
    env = Path(sys.prefix).resolve()
    names = []
    for name, mod in list(sys.modules.items()):
        f = getattr(mod, "__file__", None)
        if isinstance(f, str) and os.path.isabs(f):
            path = Path(f).resolve()
            if path.is_relative_to(root) and not path.is_relative_to(env):
                names.append(name)
    return names


def install_once(install: Callable[..., Path]) -> Callable[..., Path]:
    """Flower's ``install_from_fab`` (``install``), but a FAB already installed by it is not extracted again.

    Flower's ``flwr-clientapp`` calls ``install_from_fab(fab_bytes, skip_prompt=True)`` for every message: it
    extracts the whole FAB into a temporary folder and checks every file's hash (~0.2 s CPU for fl-sim's 134 files),
    then keeps the app folder it installed for the first message, which it finds by the FAB hash's first 8 hex
    digits (``apps/<publisher>.<name>.<version>.<hash[:8]>``). Here, after a successful install the wrapper writes
    the FAB's full SHA-256 into that folder (:data:`INSTALLED_MARKER`, written atomically), and a later call with the
    same bytes returns the folder whose marker holds the same full hash without extracting. Anything else (a path,
    ``skip_prompt=False``, an unknown hash) goes to ``install`` unchanged.
    """
    from flwr.common.constant import APP_DIR, FAB_HASH_TRUNCATION
    from flwr.supercore.utils import get_flwr_home

    @functools.wraps(install)
    def wrapper(fab_file, install_dir=None, skip_prompt=False):
        if not (isinstance(fab_file, bytes) and skip_prompt):
            return install(fab_file, install_dir, skip_prompt)
        digest = hashlib.sha256(fab_file).hexdigest()
        base = (Path(install_dir).expanduser() if install_dir else get_flwr_home()) / APP_DIR
        for marker in sorted(base.glob(f"*.{digest[:FAB_HASH_TRUNCATION]}/{INSTALLED_MARKER}")):
            if marker.read_text() == digest:
                return marker.parent
        path = Path(install(fab_file, install_dir, skip_prompt))
        tmp = path / f"{INSTALLED_MARKER}.{os.getpid()}"
        tmp.write_text(digest)
        os.replace(tmp, path / INSTALLED_MARKER)
        return path

    return wrapper


def _child(spec) -> int:
    """Body of a forked ClientApp process: Flower's ``run_clientapp`` for ``spec``; returns the exit code."""
    from flwr.supercore.exit import exit_handler
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    # The SuperExec's exit handlers (closing its Runtime API client and this executor) belong to the parent.
    exit_handler.registered_exit_handlers.clear()
    exit_handler._lock_handlers = threading.Lock()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    for name in checkout_modules():
        del sys.modules[name]
    if spec.suppress_output:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    try:
        run_clientapp(
            runtime_api_address=spec.runtime_api_address,
            token=spec.token,
            insecure=spec.insecure,
            certificates=validate_and_resolve_root_certificates(spec.root_certificates_path, spec.insecure),
            parent_pid=spec.parent_pid,
            runtime_dependency_install=spec.runtime_dependency_install,
        )
        return 0
    except SystemExit as e:  # run_clientapp ends with flwr_exit -> sys.exit(0 or 1)
        return e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - the child must never return into the parent's loop
        traceback.print_exc()
        return 1


class ForkExecutor:
    """Flower 1.42 SuperExec executor (``flwr.supercore.superexec.executor.types.Executor``) that forks.

    ``launch(spec)`` forks this process; the child runs ``run_clientapp`` with ``spec``'s token, Runtime API
    address, TLS settings and parent pid, then ``os._exit``\\ s with its exit code (0 on success, 1 on an error, as
    ``flwr-clientapp``). Finished children are reaped in :meth:`reconcile` (called every task poll) and
    :meth:`close`, which also SIGTERMs children still running when the SuperExec stops. Only ClientApp tasks are
    launched (``flwr-clientapp``); any other task type fails to launch with a message, as it would on a SuperNode.
    """

    def __init__(self) -> None:
        self.owner = os.getpid()
        self.children: set[int] = set()

    def get_eligible_capacity(self, supported_task_types, *, insecure=False, root_certificates_path=None):
        """Every supported task type can launch at once (no capacity gate, like the subprocess executor)."""
        del insecure, root_certificates_path
        return supported_task_types, set()

    def wait_for_capacity(self, task_type=None, *, fab_hash=None, insecure=False, root_certificates_path=None):
        """Return at once: forking has no capacity gate."""
        del task_type, fab_hash, insecure, root_certificates_path

    def launch(self, spec):
        """Fork one ClientApp process for ``spec`` (an ``ExecutionSpec``); returns ``LaunchResult.accepted()``,
        or ``LaunchResult.failed(reason)`` for a task type other than ``flwr-clientapp`` or a failed fork."""
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor.types import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP:
            return LaunchResult.failed(f"fl_sim.superexec runs only flwr-clientapp tasks, not {spec.task_type}")
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as e:
            return LaunchResult.failed(f"fork failed: {e}")
        if pid == 0:
            code = 1
            try:
                code = _child(spec)
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        self.children.add(pid)
        from flwr.supercore import log

        log(INFO, "fl_sim.superexec: task %s runs in forked process %d", spec.task_id, pid)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap finished ClientApp processes."""
        for pid in list(self.children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.children.discard(pid)

    def close(self) -> None:
        """SIGTERM ClientApp processes still running and reap them (only in the SuperExec itself)."""
        if os.getpid() != self.owner:
            return
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGTERM)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            self.children.discard(pid)


def main() -> None:
    """``python -m fl_sim.superexec [flower-superexec arguments]``: Flower's SuperExec with :class:`ForkExecutor`.

    Imports :data:`PRELOAD`, installs each FAB once (:func:`install_once`), makes the ClientApp's first
    object-pull retry ``fl_sim.supernode.OBJECT_PULL_BACKOFF_S`` seconds, sets
    ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` to :data:`DEFAULT_TASK_POLL_S` unless it is set, and runs
    ``flwr.supercore.cli.flower_superexec`` with its executor replaced (``--executor`` is refused: exit code 2).
    """
    if any(a == "--executor" or a.startswith("--executor=") for a in sys.argv[1:]):
        print("fl_sim.superexec: --executor is not allowed (this SuperExec always forks ClientApp tasks)",
              file=sys.stderr)
        sys.exit(2)
    os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", DEFAULT_TASK_POLL_S)
    for name in PRELOAD:
        importlib.import_module(name)
    import flwr.supernode.runtime.run_clientapp as rc
    from flwr.supercore.cli import flower_superexec

    rc.install_from_fab = install_once(rc.install_from_fab)
    # Flower's SuperNode creates the task before it has pulled the message's objects from the SuperLink, so a
    # ClientApp that starts at once finds them missing; Flower's first retry delay (1 s) would be half a round.
    rc.pull_and_inflate_object_from_tree = shorter_backoff(rc.pull_and_inflate_object_from_tree)
    from flwr.supercore.superexec import run_superexec

    executor = ForkExecutor()
    run_superexec.get_executor = lambda *a, **k: executor
    flower_superexec()


if __name__ == "__main__":
    main()
