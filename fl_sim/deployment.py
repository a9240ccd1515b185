"""A whole Flower deployment on this machine: a TLS SuperLink, N SuperNodes on 127.0.0.1, and ``flwr run``.

This is Flower's deployment engine, started with the same scripts a real multi-machine set-up uses
(``deploy/make_certs.sh``, ``deploy/superlink.sh``, ``deploy/supernode.sh``, ``deploy/make_node_key.sh``; see
``docs/deployment.md``), bound to loopback only. :class:`LocalFederation` starts every process in its own session,
records every process below it (Flower's SuperExec detaches into a session of its own and spawns the ServerApp
and ClientApp processes), and stops all of them by pid when it closes, also after a failure. ``fl-sim deploy`` and
``tests/test_deploy.py`` use it. Linux only (it reads ``/proc``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clients.secrets import SECRET_ENV, node_secret
from clients.state import STATE_DIR_ENV

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"

#: Environment of every Flower process started here: no telemetry, no update check, no `uv sync` of the app's
#: dependencies into a fresh environment per run, and sleeping (not spinning) OpenMP threads. (SuperExec keeps Flower's 1 s task poll: 0.1 s measured slower
#: on 2 cores, see docs/deployment.md.)
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "OMP_WAIT_POLICY": "PASSIVE",  # idle OpenMP threads sleep: no spinning on busy cores (ServerApp attacks)
}


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now (the OS picks them)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_for_port(port: int, timeout_s: float, alive: subprocess.Popen | None = None) -> None:
    """Block until something listens on 127.0.0.1:``port``.

    Raises:
        TimeoutError: nothing listens after ``timeout_s`` seconds.
        RuntimeError: ``alive`` exited first.
    """
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if alive is not None and alive.poll() is not None:
            raise RuntimeError(f"process {alive.pid} exited with code {alive.returncode} before listening")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s:g} s")


def _proc_table() -> dict[int, tuple[int, int, int]]:
    """``{pid: (ppid, session id, start time in clock ticks)}`` of every process, from ``/proc``."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        rest = stat.rsplit(")", 1)[1].split()
        table[int(name)] = (int(rest[1]), int(rest[3]), int(rest[19]))
    return table


@dataclass
class ProcessTracker:
    """Processes started here and everything they start, stopped by pid.

    Each process is started in a new session; a process belongs to the tracker when its parent does or when it is
    in the session of a tracked process (Flower's SuperExec starts its own session, and its ServerApp/ClientApp
    children outlive it briefly). A pid is identified with its start time, so a reused pid is never signalled.
    """

    started: list[subprocess.Popen] = field(default_factory=list)
    known: dict[int, int] = field(default_factory=dict)  # pid -> start time

    def start(self, cmd: Sequence[str], log: Path, env: Mapping[str, str], cwd: Path) -> subprocess.Popen:
        """Start ``cmd`` in a new session, stdout and stderr to ``log``."""
        with open(log, "ab") as out:
            proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, env=dict(env), cwd=cwd,
                                    start_new_session=True)
        self.started.append(proc)
        self.refresh()
        return proc

    def refresh(self) -> dict[int, int]:
        """Add newly spawned descendants; return the tracked processes that are still alive."""
        table = _proc_table()
        for p in self.started:
            if p.pid in table:
                self.known.setdefault(p.pid, table[p.pid][2])
        while True:
            alive = {p: t for p, t in self.known.items() if p in table and table[p][2] == t}
            sessions = {table[p][1] for p in alive}
            new = {p: row[2] for p, row in table.items() if p not in self.known and p != os.getpid()
                   and (row[0] in alive or row[1] in sessions)}
            if not new:
                return alive
            self.known.update(new)

    def signal_all(self, sig: int) -> int:
        """Send ``sig`` to every live tracked process; return how many there were."""
        alive = self.refresh()
        for pid in alive:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return len(alive)

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the processes started here (last started first), then SIGKILL whatever is left after ``grace_s``."""
        self.refresh()
        for p in reversed(self.started):
            if p.poll() is None:
                p.terminate()
        end = time.monotonic() + grace_s
        while time.monotonic() < end and self.refresh():
            for p in self.started:
                p.poll()
            time.sleep(0.2)
        while self.signal_all(signal.SIGKILL):
            time.sleep(0.2)
        for p in self.started:
            p.wait()


def write_connection(flwr_home: Path, name: str, address: str, root_certificates: Path | None) -> None:
    """Write ``flwr_home/config.toml`` with one SuperLink connection for the ``flwr`` CLI."""
    import tomli_w

    conn: dict[str, Any] = {"address": address}
    if root_certificates is None:
        conn["insecure"] = True
    else:
        conn["root-certificates"] = str(root_certificates)
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": name, name: conn}}))


def federation_env() -> dict[str, str]:
    """The environment of a federation's Flower processes: this shell's, without a run-level client secret or
    client-state folder (each node gets its own through its node config), with :data:`FLOWER_ENV`, and this
    interpreter's ``bin`` first on ``PATH`` (``flower-superlink``, ``flower-supernode``, ``flwr``)."""
    return {**{k: v for k, v in os.environ.items() if k not in (SECRET_ENV, STATE_DIR_ENV)}, **FLOWER_ENV,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


class LocalFederation:
    """A SuperLink and ``num_nodes`` SuperNodes on 127.0.0.1 (Flower's deployment engine), stopped on close.

    Args:
        workdir: receives certificates, keys, each process's ``FLWR_HOME``, and the logs ``superlink.log``,
            ``supernode-I.log``.
        num_nodes: SuperNodes; node I gets ``partition-id=I num-partitions=num_nodes``.
        tls: TLS with a fresh CA and server certificate (``deploy/make_certs.sh``); else insecure.
        node_auth: SuperNode authentication: the SuperLink accepts only nodes whose public keys were registered
            (``deploy/make_node_key.sh``, ``flwr supernode register``); needs ``ssh-keygen``.
        app_dir: the Flower app (this repository).
        start_timeout_s: seconds to wait for the SuperLink to listen and the nodes to register.
        client_secret: node I gets ``secret-seed = clients.secrets.node_secret(client_secret, I)``
            (``SECRET_SEED`` of ``deploy/supernode.sh``): a fixed default (0), so that tests and ``fl-sim deploy``
            are reproducible and equal ``fl-sim run --client-secret 0``; ``None``: no secret-seed, each node draws
            its own from OS entropy (as a real deployment that sets none).
        state_dir: every node checkpoints its ``Context.state`` there (``STATE_DIR``, node config ``state-dir``);
            default ``workdir/client-state``.

    Use as a context manager; :meth:`run` submits the app with ``flwr run``.

    Raises:
        RuntimeError, TimeoutError: a process failed to start (everything started is stopped first).
    """

    def __init__(self, workdir: Path, num_nodes: int, tls: bool = True, node_auth: bool = False,
                 app_dir: Path = ROOT, start_timeout_s: float = 60.0, client_secret: int | None = 0,
                 state_dir: Path | None = None):
        self.workdir, self.num_nodes, self.tls, self.node_auth = Path(workdir), num_nodes, tls, node_auth
        self.app_dir, self.start_timeout_s = Path(app_dir), start_timeout_s
        self.client_secret = client_secret
        self.state_dir = Path(state_dir) if state_dir is not None else self.workdir / "client-state"
        self.procs = ProcessTracker()
        self.superlink: subprocess.Popen | None = None
        self.nodes: list[subprocess.Popen] = []
        self.port = 0
        self.cli_home = self.workdir / "flwr-cli"
        self.env = federation_env()

    def __enter__(self) -> LocalFederation:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _script(self, name: str, *args: str, env: Mapping[str, str] | None = None) -> None:
        subprocess.run(["bash", str(DEPLOY / name), *args], cwd=self.workdir, env={**self.env, **(env or {})},
                       check=True, capture_output=True, text=True)

    def _flwr(self, *args: str, timeout: float | None = 120) -> subprocess.CompletedProcess:
        return subprocess.run(["flwr", *args], cwd=self.app_dir, env={**self.env, "FLWR_HOME": str(self.cli_home)},
                              capture_output=True, text=True, timeout=timeout)

    def start(self) -> None:
        """Make the certificates (and node keys), start the SuperLink, register the keys, start the SuperNodes."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        certs = self.workdir / "certs"
        tls_env = {"CERTS": str(certs)} if self.tls else {"INSECURE": "1"}
        if self.tls:
            self._script("make_certs.sh", str(certs))
        self.port, *node_ports = free_ports(1 + self.num_nodes)
        self.superlink = self.procs.start(
            ["bash", str(DEPLOY / "superlink.sh"), "127.0.0.1", str(self.port)], self.workdir / "superlink.log",
            {**self.env, **tls_env, "FLWR_HOME": str(self.workdir / "home-superlink"),
             "NODE_AUTH": "1" if self.node_auth else "0"}, self.workdir)
        wait_for_port(self.port, self.start_timeout_s, self.superlink)
        write_connection(self.cli_home, "local-deploy", f"127.0.0.1:{self.port}", certs / "ca.crt" if self.tls else None)
        for i, node_port in enumerate(node_ports):
            env = {**self.env, **tls_env, "FLWR_HOME": str(self.workdir / f"home-supernode-{i}")}
            if self.client_secret is not None:
                env["SECRET_SEED"] = str(node_secret(self.client_secret, i))
            env["STATE_DIR"] = str(self.state_dir.resolve())
            if self.node_auth:
                key = self.workdir / "keys" / f"node{i}"
                self._script("make_node_key.sh", str(key))
                reg = self._flwr("supernode", "register", str(key) + ".pub", "local-deploy")
                if reg.returncode != 0:
                    raise RuntimeError(f"flwr supernode register failed: {reg.stdout[-1000:]}{reg.stderr[-1000:]}")
                env["NODE_KEY"] = str(key)
            self.nodes.append(self.procs.start(
                ["bash", str(DEPLOY / "supernode.sh"), f"127.0.0.1:{self.port}", str(i), str(self.num_nodes),
                 str(node_port)], self.workdir / f"supernode-{i}.log", env, self.workdir))
        for node, node_port in zip(self.nodes, node_ports):
            wait_for_port(node_port, self.start_timeout_s, node)

    def run(self, run_config: Mapping[str, Any], timeout_s: float | None = 600) -> subprocess.CompletedProcess:
        """``flwr run APP local-deploy --run-config FILE --stream``: submit the app and wait for the run to end.

        Args:
            run_config: run-config overrides (fl-sim keys; ``num-supernodes`` should equal ``num_nodes``).
            timeout_s: seconds before ``flwr run`` is killed (``subprocess.TimeoutExpired``); None: no limit.

        Returns:
            The finished ``flwr run`` process (``returncode``, ``stdout``, ``stderr``).
        """
        import tomli_w

        path = self.workdir / "run-config.toml"
        path.write_text(tomli_w.dumps(dict(run_config)))
        return self._flwr("run", str(self.app_dir), "local-deploy", "--run-config", str(path), "--stream",
                          timeout=timeout_s)

    def logs(self, tail: int = 3000) -> str:
        """The last ``tail`` characters of every log (for error messages)."""
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-tail:]}"
                         for p in sorted(self.workdir.glob("*.log")))

    def close(self) -> None:
        """Stop every process started here and everything they started (by pid)."""
        self.procs.stop()


def have_node_auth_tools() -> bool:
    """Whether ``ssh-keygen`` (for SuperNode keys) is installed."""
    return shutil.which("ssh-keygen") is not None
