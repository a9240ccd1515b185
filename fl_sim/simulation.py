"""Run the fl-sim ServerApp and ClientApp in-process on Flower's Simulation Engine (Ray backend, or in-process).

``fl-sim run`` is the in-process twin of ``flwr run . local``: the same apps, the same run-config keys, the same
``context.run_config`` on server and clients. Flower's public ``run_simulation`` passes no run config (its
``context.run_config`` is empty), so this module calls the engine the way ``flwr run``'s simulation process does
(``flwr.simulation.run_simulation._run_simulation`` with an app directory whose ``pyproject.toml`` carries the
resolved config), which is why flwr is pinned (1.42.0; the suite passed unchanged when it moved from 1.41.0). A test runs a 2-client simulation end to end.

Client secrets: the harness, not the ServerApp, picks the run-level client secret (``client_secret``, else
``FL_SIM_CLIENT_SECRET``, else OS entropy), keeps it in ``RUN_DIR/clients/secret`` (a resumed run reuses it) and
hands it to the clients through the environment their Ray workers inherit (:data:`clients.secrets.SECRET_ENV`),
never through the run config: Flower 1.42's simulation engine builds each virtual node's ``node_config`` itself
(``partition-id`` and ``num-partitions`` only, ``flwr.server.superlink.fleet.vce.vce_api``), so it has no room for
it. Each ClientApp derives its node's secret from it and its partition id (:func:`clients.secrets.node_secret`).
The clients checkpoint their ``Context.state`` under ``RUN_DIR/clients`` (:data:`clients.state.STATE_DIR_ENV`);
a resume first removes the client states written after the server's checkpoint (:func:`clients.state.prune_after`).

Speed (docs/performance.md): the harness starts Ray itself (:func:`init_ray`: no runtime environment, the
clients' import path in ``PYTHONPATH``, so Ray's pre-started workers become the ClientApp actors) and replaces the two
polling loops of Flower 1.42's simulation engine for the duration of a run (:class:`MessagePath`): a pushed message
reaches the actors at once instead of at the engine's next 0.1 s scan over every node, and the ServerApp wakes when
a reply is stored instead of at its next poll. What the clients compute, and so every result, is unchanged.

``sim-backend=inprocess`` swaps Ray's backend for :class:`InProcessBackend` (the ClientApp calls in this process,
one after another): no Ray start-up, and cheaper messages on a machine with few cores; Ray's stays the default
(clients in parallel, process isolation, GPU shares).

Ctrl-C: the ServerApp stops after the current round (everything written so far is kept, ``summary.json`` says
``interrupted``); Ray is shut down before :func:`run` returns, so no process is left behind.
"""

from __future__ import annotations

import os

# before Flower and Ray are imported: no telemetry, no Ray warning about accelerator variables, deduplicated logs
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")

import logging  # noqa: E402
import pickle  # noqa: E402
import queue  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
from collections.abc import Callable, Iterable, Iterator, Mapping  # noqa: E402
from contextlib import contextmanager, nullcontext  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import ray  # noqa: E402
import torch  # noqa: E402
from flwr.app import Context, Message, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.server.superlink.fleet.vce import vce_api  # noqa: E402
from flwr.server.superlink.fleet.vce.backend import Backend  # noqa: E402
from flwr.simulation.ray_transport.ray_actor import ClientAppException  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.simulation.run_simulation import _run_simulation  # noqa: E402
from flwr.supercore.date import now  # noqa: E402
from flwr.supercore.telemetry import EventType  # noqa: E402

from clients import secrets as client_secrets  # noqa: E402
from clients import state as client_state  # noqa: E402
from clients.client_app import app as default_client_app  # noqa: E402
from fl_sim.config import ConfigError, pyproject_block  # noqa: E402
from fl_sim.results import default_run_name, run_dir_for  # noqa: E402
from fl_sim.server_app import StoppableGrid, prepare_run_dir, run_server  # noqa: E402
from strategies.checkpoint import load_checkpoint  # noqa: E402

#: Set to ask a running in-process simulation to stop (the ServerApp stops waiting and ends the run).
STOP = threading.Event()

#: The minimal Flower app metadata the engine validates; the config block is appended per run.
APP_PYPROJECT = """[project]
name = "fl-sim-inprocess"
version = "0.0.0"

[tool.flwr.app]
publisher = "fl-sim"

[tool.flwr.app.components]
serverapp = "fl_sim.server_app:app"
clientapp = "clients.client_app:app"

"""


def backend_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Flower's Ray backend config: per-client resources from the run config, Ray sized to the cores this process
    may run on (its CPU affinity)."""
    gpus = torch.cuda.device_count()
    # the cores this process may use (taskset, cgroups, `fl-sim sweep --jobs`), not all of the machine's
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return {
        "client_resources": {"num_cpus": float(cfg["client-num-cpus"]), "num_gpus": float(cfg["client-num-gpus"])},
        "init_args": {"num_cpus": cpus, "num_gpus": gpus, "include_dashboard": False,
                      "logging_level": "error", "log_to_driver": True},
    }


def init_ray(init_args: Mapping[str, Any]) -> None:
    """Start Ray for the simulation the way fl-sim needs it, before Flower's engine would.

    Flower 1.42's Ray backend starts Ray with a runtime environment that only sets ``PYTHONPATH``
    (``RayBackend.init_ray``), and skips that when Ray is already running. A runtime environment of its own keeps the
    job from using the workers Ray pre-starts (``num_cpus`` of them, with the job's environment): two more Python
    processes start for the actors on a 2-core machine, and each worker start waits for the runtime-environment
    agent. Here ``PYTHONPATH`` is put in this process's environment instead (the same value: the driver's
    ``sys.path``, then the old ``PYTHONPATH``), which Ray's processes inherit, and Ray starts with ``init_args``
    alone, so the pre-started workers become the ClientApp actors. The caller restores ``PYTHONPATH`` afterwards.
    """
    path = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        path = f"{path}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = path
    ray.init(**dict(init_args))


def _copy(obj: Any) -> Any:
    """A copy of ``obj`` by a pickle round trip: what Ray's serialisation hands an actor and returns from it."""
    return pickle.loads(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


class InProcessBackend(Backend):
    """A Flower simulation backend that runs each ClientApp call in the driver's process, one after another
    (``sim-backend=inprocess``).

    Flower 1.42's simulation engine (``flwr.server.superlink.fleet.vce``) runs a ClientApp through a backend's
    ``process_message(message, context) -> (reply, context)``; its only backend is Ray's (``RayBackend``: a pool of
    ``ClientAppActor`` processes, ``client-num-cpus`` cores each). This one does what a ``ClientAppActor`` does
    (``ClientAppActor.run``: load the app, call it, wrap its exceptions in ``ClientAppException``, which the engine
    turns into an error reply) in the engine's single worker thread, on copies of the message and the context made
    the way Ray's serialisation makes them (a pickle round trip in and out), so a client never shares an object with
    the server or with another client. What a client computes is unchanged: the same ClientApp, the same message
    contents, the same secrets (read from this process's environment, which Ray's workers would have inherited),
    and ``client-num-cpus`` torch threads during the call (the ClientApp sets them; the driver's own are restored
    after each call, so the ServerApp's evaluation and attacks keep theirs).

    What it changes (docs/performance.md): no Ray start-up (2–3 s and two actor processes importing torch and the
    ClientApp), no Ray object store and no contention between actor processes; but the clients run sequentially on
    this process's cores (Ray runs ``cores / client-num-cpus`` at once), a client that hangs delays every client
    queued after it, ``client-num-gpus`` is not a reservation here (every client uses this process's current CUDA
    device), and the clients share the driver's process (its module caches and environment) instead of actors'.
    """

    def __init__(self, backend_config: Mapping[str, Any] | None = None) -> None:
        super().__init__(dict(backend_config or {}))
        self.app_fn: Callable[[], ClientApp] | None = None

    def build(self, app_fn: Callable[[], ClientApp]) -> None:
        """Keep the function that loads the ClientApp (nothing else to start)."""
        self.app_fn = app_fn

    @property
    def num_workers(self) -> int:
        """One: the engine runs one worker thread, so the ClientApp calls never overlap."""
        return 1

    def is_worker_idle(self) -> bool:
        return True

    def terminate(self) -> None:
        """Nothing to stop."""

    def process_message(self, message: Message, context: Context) -> tuple[Message, Context]:
        """Run the ClientApp on a copy of ``message`` and ``context``; return copies of its reply and the context.

        Raises:
            ValueError: :meth:`build` was not called.
            ClientAppException: the ClientApp raised (the engine replies with Flower's error message, as for Ray).
        """
        if self.app_fn is None:
            raise ValueError("Unspecified function to load a ClientApp; call build() first")
        message, context = _copy(message), _copy(context)
        threads = torch.get_num_threads()
        try:
            app = self.app_fn()
            try:
                reply = app(message=message, context=context)
            except Exception as exc:
                raise ClientAppException(str(exc)) from exc
        finally:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
        return _copy(reply), _copy(context)


@contextmanager
def in_process_backend(backend_config: Mapping[str, Any]) -> Iterator[None]:
    """While the block runs, Flower's simulation engine uses :class:`InProcessBackend` instead of Ray's.

    Flower 1.42's ``vce_api.start_vce`` always builds a ``RayBackend`` and hands its factory to ``vce_api.run_api``;
    the wrapper installed here replaces that factory (a private part of flwr 1.42.0, pinned).
    """
    saved = vce_api.run_api

    def run_api(app_fn: Any, backend_fn: Any, *args: Any, **kwargs: Any) -> None:
        saved(app_fn, lambda: InProcessBackend(backend_config), *args, **kwargs)

    vce_api.run_api = run_api
    try:
        yield
    finally:
        vce_api.run_api = saved


class MessagePath:
    """The in-process simulation's message path without polling: Flower 1.42's engine threads, event-driven.

    Flower's simulation engine (``flwr.server.superlink.fleet.vce.vce_api``) moves messages with two threads that
    poll: ``add_messages_to_queue`` asks the link state for every node's next message every 0.1 s (so a round's
    messages wait 50 ms on average before a client starts, and with ``N`` nodes and ``M`` messages in the store
    every scan costs ``N × M`` checks: 10⁸ for the 10,000 whoami queries of a 10,000-client start), and
    ``put_message_into_state`` stores the replies, which the ServerApp then pulls every ``poll_s`` (another 25 ms on
    average). While :meth:`installed` is active, both threads are replaced: pushes through :meth:`grid`'s Grid put
    the message ids on a queue and the replacement hands exactly those messages to the engine's workers at once
    (expired ones are dropped and each is marked delivered, as ``InMemoryLinkState.get_message_ins`` does), and
    every stored reply wakes the ServerApp (:meth:`wait_for_replies`, used by
    :class:`fl_sim.server_app.StoppableGrid`). Messages pushed any other way would not be delivered: in
    :func:`run` every push goes through the Grid :meth:`grid` returns. Flower's engine gives no ordering among
    messages to the same node, and neither does this; the ServerApp never has two outstanding for one node.

    Uses private parts of flwr 1.42.0 (pinned): the two thread functions it replaces, and the in-memory link state's
    ``lock``, ``message_ins_store`` and ``_check_stored_messages``.
    """

    def __init__(self) -> None:
        self.pushed: queue.SimpleQueue[list[str]] = queue.SimpleQueue()
        self.replies = threading.Condition()
        self.stored = 0  # replies stored so far (under ``replies``)

    # -- the engine's side ---------------------------------------------------------------------------------------
    def deliver(self, state: Any, out: queue.Queue[Message], nodes_mapping: Any, f_stop: threading.Event) -> None:
        """Replacement of ``vce_api.add_messages_to_queue``: hand every pushed message to the engine's workers."""
        while not f_stop.is_set():
            try:
                ids = self.pushed.get(timeout=0.1)
            except queue.Empty:
                continue
            with state.lock:
                state._check_stored_messages(set(ids))  # drops expired messages, as get_message_ins does
                found = [m for i in ids if (m := state.message_ins_store.get(i)) is not None
                         and m.metadata.delivered_at == ""]
                stamp = now().isoformat()
                for msg in found:
                    msg.metadata.delivered_at = stamp
            for msg in found:
                out.put(msg)

    def store(self, state: Any, replies: queue.Queue[Message], f_stop: threading.Event) -> None:
        """Replacement of ``vce_api.put_message_into_state``: store each reply, then wake the ServerApp."""
        while not f_stop.is_set():
            try:
                reply = replies.get(timeout=1.0)
            except queue.Empty:
                continue
            try:
                state.store_message_res(reply)
            finally:
                with self.replies:
                    self.stored += 1
                    self.replies.notify_all()

    @contextmanager
    def installed(self) -> Iterator[MessagePath]:
        """Replace the engine's two polling threads while the block runs (restored afterwards)."""
        saved = vce_api.add_messages_to_queue, vce_api.put_message_into_state
        vce_api.add_messages_to_queue, vce_api.put_message_into_state = self.deliver, self.store
        try:
            yield self
        finally:
            vce_api.add_messages_to_queue, vce_api.put_message_into_state = saved

    # -- the ServerApp's side ------------------------------------------------------------------------------------
    def grid(self, grid: Grid, num_nodes: int | None = None) -> Grid:
        """``grid`` (the engine's ``InMemoryGrid``) with pushes announced and a :meth:`wait_for_replies`; with
        ``num_nodes``, its node ids are kept once that many are registered (see :class:`_SimGrid`)."""
        return _SimGrid(grid, self, num_nodes)

    def wait_for_replies(self, seen: int, timeout: float) -> int:
        """Block until more than ``seen`` replies have been stored, or ``timeout`` seconds; return the count."""
        with self.replies:
            self.replies.wait_for(lambda: self.stored > seen, timeout)
            return self.stored


class _SimGrid(StoppableGrid):
    """The engine's Grid, announcing pushed message ids to a :class:`MessagePath` and waiting on its replies.

    With ``num_nodes``, :meth:`get_node_ids` keeps the node ids once ``num_nodes`` are registered: Flower 1.42's
    simulation engine registers its nodes with an infinite heartbeat interval (``vce_api``,
    ``HEARTBEAT_INTERVAL_INF``), so none ever goes offline or is added, while asking the link state costs a pass
    over every node's record (~10 ms a round for 10,000 nodes).
    """

    def __init__(self, grid: Grid, path: MessagePath, num_nodes: int | None = None):
        super().__init__(grid, stop=lambda: False)
        self.path = path
        self.seen = 0
        self.num_nodes = num_nodes
        self._node_ids: frozenset[int] | None = None

    def get_node_ids(self) -> Iterable[int]:
        if self._node_ids is not None:
            return self._node_ids
        ids = frozenset(self.grid.get_node_ids())
        if self.num_nodes is not None and len(ids) >= self.num_nodes:
            self._node_ids = ids
        return ids

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = list(self.grid.push_messages(messages))
        if ids:
            self.path.pushed.put(ids)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        with self.path.replies:
            self.seen = self.path.stored  # a reply stored after this is in a later pull
        return self.grid.pull_messages(message_ids)

    def wait_for_replies(self, timeout: float) -> None:
        """Sleep until a reply newer than the last pull has been stored, at most ``timeout`` seconds."""
        self.path.wait_for_replies(self.seen, timeout)


def quiet_flower(verbose: bool) -> None:
    """Keep Flower's per-round INFO logs (``verbose``) or show only its warnings and errors."""
    logging.getLogger("flwr").setLevel(logging.DEBUG if verbose else logging.WARNING)


def client_secret_for(run_dir: Path, client_secret: int | None, resume: bool) -> int:
    """The run-level client secret of the run in ``run_dir``, kept in ``run_dir/clients/secret``.

    A new run takes ``client_secret``, else ``FL_SIM_CLIENT_SECRET``, else OS entropy, and writes it there; a
    resumed run reads it back (``client_secret``, if given, must be the same).

    Raises:
        ConfigError: a bad ``client_secret`` or ``FL_SIM_CLIENT_SECRET``, a resumed run without a kept secret, or a
            ``client_secret`` other than the kept one.
    """
    try:
        given = client_secret if client_secret is None else client_secrets.parse_secret(client_secret,
                                                                                      "--client-secret")
        if resume:
            try:
                kept = client_secrets.load_run_secret(run_dir)
            except FileNotFoundError:
                raise ConfigError(f"--resume {run_dir}: no {client_secrets.RUN_SECRET_FILE} (the run was started "
                                  "without a client secret); start it again instead") from None
            if given is not None and given != kept:
                raise ConfigError(f"--client-secret={given} is not allowed with --resume {run_dir}: the run keeps "
                                  f"its own client secret in {client_secrets.RUN_SECRET_FILE}")
            return kept
        secret = given if given is not None else client_secrets.env_secret()
        secret = secret if secret is not None else client_secrets.new_secret()
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    client_secrets.save_run_secret(run_dir, secret)
    return secret


def run(cfg: Mapping[str, Any], on_round: Callable[[dict[str, Any]], None] | None = None,
        verbose: bool = False, resume: bool = False, client_app: Any = None,
        client_secret: int | None = None) -> Path:
    """Simulate the federation described by the resolved config ``cfg``; return the run directory.

    Args:
        cfg: a resolved config (:func:`fl_sim.config.resolve`), already checked by
            :func:`fl_sim.config.check_feasible`. An empty ``run-name`` is replaced by the default name first (the
            harness and the ServerApp must name the same directory).
        on_round: optional callback after each round (the round's record), e.g. a progress bar.
        verbose: keep Flower's INFO logging.
        resume: continue the run in ``cfg``'s run directory from its last checkpoint, server and clients.
        client_app: a ClientApp to simulate instead of ``clients.client_app.app`` (Python API only; the tests
            use it to inject faulty clients).
        client_secret: the run-level client secret (an integer in ``[0, 2^63)``); ``None``: ``FL_SIM_CLIENT_SECRET``
            or OS entropy (:func:`client_secret_for`). A resumed run reuses its own.

    Raises:
        ConfigError: a bad client secret, a resumed run without one (:func:`client_secret_for`), or a new run whose
            directory already holds results.
        RuntimeError: the simulation engine failed (the run directory keeps what was written).
    """
    if client_app is None:
        client_app = default_client_app
    if not cfg["run-name"]:
        cfg = {**cfg, "run-name": default_run_name(cfg)}
    run_dir = run_dir_for(cfg) if resume else prepare_run_dir(cfg)  # never write into another run's results
    secret = client_secret_for(run_dir, client_secret, resume)
    clients_dir = run_dir / client_secrets.RUN_SECRET_FILE.parent
    if resume:  # client states written after the server's checkpoint belong to rounds that will run again
        client_state.prune_after(clients_dir, int(load_checkpoint(run_dir)["round"]))
    quiet_flower(verbose)
    STOP.clear()
    out: dict[str, Path] = {}
    server_app = ServerApp()

    path = MessagePath()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        out["run_dir"] = run_server(path.grid(grid, int(cfg["num-supernodes"])), cfg, on_round=on_round,
                                    stop=STOP.is_set, resume=resume)

    with tempfile.TemporaryDirectory(prefix="fl-sim-app-") as app_dir:
        Path(app_dir, "pyproject.toml").write_text(APP_PYPROJECT + pyproject_block(cfg))
        context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=dict(cfg))
        # the clients' environment (Ray's workers inherit this process's when Ray starts), never the run config
        saved_env = {k: os.environ.get(k) for k in (client_secrets.SECRET_ENV, client_state.STATE_DIR_ENV,
                                                    "PYTHONPATH")}
        os.environ[client_secrets.SECRET_ENV] = str(secret)
        os.environ[client_state.STATE_DIR_ENV] = str(clients_dir)
        backend = backend_config(cfg)
        backend_name = str(cfg.get("sim-backend", "ray"))
        uses_ray = backend_name == "ray"
        if uses_ray:
            _shutdown_ray()  # a Ray left running would keep workers started without this environment
        try:
            if uses_ray:
                init_ray(backend["init_args"])  # Flower's backend then uses this Ray as it is
            with path.installed(), (nullcontext() if uses_ray else in_process_backend(backend)):
                _run_simulation(
                    num_supernodes=int(cfg["num-supernodes"]),
                    exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                    client_app=client_app,
                    server_app=server_app,
                    backend_name=backend_name,
                    backend_config=backend,
                    server_app_context=context,
                    app_dir=app_dir,
                    is_app=True,
                    verbose_logging=verbose,
                )
        except BaseException:
            STOP.set()  # the ServerApp thread stops waiting for replies that will not come
            raise
        finally:
            if uses_ray:
                _shutdown_ray()
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    if "run_dir" not in out:
        raise RuntimeError("the simulation ended before the ServerApp finished; see the log above")
    return out["run_dir"]


def _shutdown_ray() -> None:
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # pragma: no cover - best effort on the way out
        pass
