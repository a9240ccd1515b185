"""Flower's deployment engine across two hosts on one machine: Linux network namespaces joined by a veth pair.

A *server host* (namespace ``<prefix>-srv``, address ``10.77.0.1``) runs the TLS SuperLink, its ServerApp and the
``flwr`` CLI; a *client host* (``<prefix>-cli``, ``10.77.0.2``) runs the SuperNodes. The only route between them is
the veth pair, so every SuperNode reaches the SuperLink over a real (virtual) network interface at the server's
address, and TLS verifies the certificate issued for that address (``deploy/make_certs.sh DIR 10.77.0.1``; the
client host gets only ``ca.crt``). :class:`NetnsFederation` starts everything with the same ``deploy/`` scripts a
two-machine set-up uses (``docs/deployment.md``), SuperNode authentication included, can kill and restart one
SuperNode mid-run, and stops every process (and deletes both namespaces) when it closes, also after a failure.

Needs root, ``ip`` (iproute2) with ``netns`` support, ``openssl`` and ``ssh-keygen``; :func:`unavailable` says
which is missing (``tests/test_deploy_netns.py`` then skips with that reason). Linux only.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clients.secrets import node_secret
from fl_sim.deployment import DEPLOY, ROOT, ProcessTracker, _proc_table, federation_env, write_connection

#: Addresses of the two hosts on the veth pair (a /24 that exists only inside the two namespaces).
SERVER_ADDRESS = "10.77.0.1"
CLIENT_ADDRESS = "10.77.0.2"
#: The SuperLink's port on the server host (every port is free in a fresh namespace).
SUPERLINK_PORT = 9092
#: The first SuperNode's Runtime API port on the client host (node ``i`` uses ``+ i``).
RUNTIME_PORT = 9094


def unavailable() -> str | None:
    """Why two network namespaces cannot be made here (``None`` when they can): not Linux, not root, no ``ip``,
    no ``openssl``/``ssh-keygen``, or ``ip netns add`` refused (e.g. in an unprivileged container)."""
    if not os.path.isdir("/proc") or os.uname().sysname != "Linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    for tool in ("ip", "openssl", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    probe = f"flsim-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"ip netns add is not permitted here: {made.stderr.strip() or made.returncode}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@dataclass(frozen=True)
class Host:
    """One network namespace with one address on the veth pair."""

    netns: str
    address: str

    def wrap(self, cmd: Sequence[str]) -> list[str]:
        """``cmd`` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.netns, *cmd]

    def reachable(self, address: str, port: int) -> bool:
        """Whether a TCP connection from this host to ``address:port`` succeeds now (bash's ``/dev/tcp``)."""
        probe = f"exec 3<>/dev/tcp/{address}/{port}"
        return subprocess.run(self.wrap(["timeout", "2", "bash", "-c", probe]), capture_output=True).returncode == 0


class HostPair:
    """Two namespaces ``<prefix>-srv`` and ``<prefix>-cli`` joined by a veth pair, loopback up in both.

    Args:
        prefix: namespace name prefix (unique per use; veth names are derived from it, at most 15 characters).

    Raises:
        RuntimeError: an ``ip`` command failed (whatever was made is deleted first).
    """

    def __init__(self, prefix: str):
        self.server = Host(f"{prefix}-srv", SERVER_ADDRESS)
        self.client = Host(f"{prefix}-cli", CLIENT_ADDRESS)
        tag = f"{abs(hash(prefix)) % 10**8:08d}"
        self.veth = (f"fs{tag}s", f"fs{tag}c")
        try:
            self._ip("netns", "add", self.server.netns)
            self._ip("netns", "add", self.client.netns)
            self._ip("link", "add", self.veth[0], "type", "veth", "peer", "name", self.veth[1])
            for host, dev in ((self.server, self.veth[0]), (self.client, self.veth[1])):
                self._ip("link", "set", dev, "netns", host.netns)
                self._ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", dev)
                self._ip("-n", host.netns, "link", "set", dev, "up")
                self._ip("-n", host.netns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _ip(*args: str) -> None:
        done = subprocess.run(["ip", *args], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")

    def close(self) -> None:
        """Delete both namespaces (the veth pair goes with them)."""
        for host in (self.server, self.client):
            subprocess.run(["ip", "netns", "del", host.netns], capture_output=True)


def process_tree(root: int) -> dict[int, int]:
    """``{pid: start time}`` of ``root`` and every process below it (by parent, or in the session of one)."""
    table = _proc_table()
    if root not in table:
        return {}
    tree = {root: table[root][2]}
    while True:
        sessions = {table[p][1] for p in tree if p in table}
        new = {p: row[2] for p, row in table.items() if p not in tree and (row[0] in tree or row[1] in sessions)}
        if not new:
            return tree
        tree.update(new)


class NetnsFederation:
    """A TLS SuperLink on a server host and ``num_nodes`` SuperNodes on a client host, SuperNode authentication on.

    Args:
        workdir: certificates (``certs/`` on the server, ``client-certs/ca.crt`` on the client), node keys, each
            process's ``FLWR_HOME``, the logs (``superlink.log``, ``supernode-I.log``), the run config.
        num_nodes: SuperNodes; node ``I`` gets ``partition-id=I num-partitions=num_nodes``.
        node_auth: SuperNode authentication (registered public keys only).
        app_dir: the Flower app (this repository).
        start_timeout_s: seconds to wait for the SuperLink and each SuperNode to listen.

    Use as a context manager: :meth:`start` on entry, :meth:`close` on exit.

    Raises:
        RuntimeError, TimeoutError: a process failed to start (everything started is stopped first).
    """

    def __init__(self, workdir: Path, num_nodes: int = 2, node_auth: bool = True, app_dir: Path = ROOT,
                 start_timeout_s: float = 90.0):
        self.workdir, self.num_nodes, self.node_auth = Path(workdir), num_nodes, node_auth
        self.app_dir, self.start_timeout_s = Path(app_dir), start_timeout_s
        self.procs = ProcessTracker()
        self.hosts: HostPair | None = None
        self.superlink: subprocess.Popen | None = None
        self.nodes: list[subprocess.Popen | None] = []
        self.cli_home = self.workdir / "flwr-cli"
        self.address = f"{SERVER_ADDRESS}:{SUPERLINK_PORT}"
        self.env = federation_env()

    def __enter__(self) -> NetnsFederation:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _run(self, cmd: Sequence[str], env: Mapping[str, str] | None = None, timeout: float = 120):
        done = subprocess.run(list(cmd), cwd=self.workdir, env={**self.env, **(env or {})}, capture_output=True,
                              text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stdout[-800:]}{done.stderr[-800:]}")
        return done

    def flwr(self, *args: str) -> list[str]:
        """A ``flwr`` CLI command on the server host, with this federation's connection (``netns``)."""
        return self.hosts.server.wrap(["env", f"FLWR_HOME={self.cli_home}", "flwr", *args])

    def _wait(self, host: Host, address: str, port: int, proc: subprocess.Popen, what: str) -> None:
        end = time.monotonic() + self.start_timeout_s
        while time.monotonic() < end:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with code {proc.returncode} before listening:\n{self.logs()}")
            if host.reachable(address, port):
                return
            time.sleep(0.3)
        raise TimeoutError(f"{what}: nothing listens on {address}:{port} after {self.start_timeout_s:g} s")

    def start(self) -> None:
        """Make the hosts, the server certificate for the server's address, the node keys; start the SuperLink,
        register the keys, start the SuperNodes."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.hosts = HostPair(f"flsim-{os.getpid()}-{time.monotonic_ns() % 10**6}")
        certs, client_certs = self.workdir / "certs", self.workdir / "client-certs"
        self._run(["bash", str(DEPLOY / "make_certs.sh"), str(certs), SERVER_ADDRESS])
        client_certs.mkdir(exist_ok=True)
        shutil.copy(certs / "ca.crt", client_certs / "ca.crt")  # the client host gets the CA certificate only
        self.superlink = self.procs.start(
            self.hosts.server.wrap(["bash", str(DEPLOY / "superlink.sh"), SERVER_ADDRESS, str(SUPERLINK_PORT)]),
            self.workdir / "superlink.log",
            {**self.env, "CERTS": str(certs), "FLWR_HOME": str(self.workdir / "home-superlink"),
             "NODE_AUTH": "1" if self.node_auth else "0"}, self.workdir)
        # reachable from the client host: across the veth pair
        self._wait(self.hosts.client, SERVER_ADDRESS, SUPERLINK_PORT, self.superlink, "the SuperLink")
        write_connection(self.cli_home, "netns", self.address, certs / "ca.crt")
        for i in range(self.num_nodes):
            if self.node_auth:
                key = self.workdir / "keys" / f"node{i}"
                self._run(["bash", str(DEPLOY / "make_node_key.sh"), str(key)])
                self._run(self.flwr("supernode", "register", f"{key}.pub", "netns"))
            self.nodes.append(None)
        for i in range(self.num_nodes):
            self.start_node(i)

    def node_env(self, i: int) -> dict[str, str]:
        """The environment of SuperNode ``i`` (its CA certificate, secret seed, state folder and key), as
        :class:`fl_sim.deployment.LocalFederation` gives its nodes (``secret-seed = node_secret(0, i)``), so that a
        restarted node reloads its client state."""
        env = {**self.env, "CERTS": str(self.workdir / "client-certs"),
               "FLWR_HOME": str(self.workdir / f"home-supernode-{i}"),
               "SECRET_SEED": str(node_secret(0, i)), "STATE_DIR": str((self.workdir / "client-state").resolve())}
        if self.node_auth:
            env["NODE_KEY"] = str(self.workdir / "keys" / f"node{i}")
        return env

    def _activations(self, i: int) -> int:
        log = self.workdir / f"supernode-{i}.log"
        return log.read_text(errors="replace").count("SuperNode ID:") if log.exists() else 0

    def start_node(self, i: int, retry_s: float = 0.0) -> int:
        """(Re)start SuperNode ``i`` on the client host and wait until the SuperLink has activated it.

        A SuperNode that crashed is refused (``flower-supernode`` exits with code 305, "Failed to activate
        SuperNode") until the SuperLink counts it offline — 2 × its 30 s heartbeat interval after its last
        heartbeat (Flower 1.42); ``retry_s > 0`` starts it again every 2 s for that long.

        Returns:
            The number of starts it took.

        Raises:
            RuntimeError: the node exited (and ``retry_s`` is spent); TimeoutError: not activated in time.
        """
        port = RUNTIME_PORT + i
        cmd = ["bash", str(DEPLOY / "supernode.sh"), self.address, str(i), str(self.num_nodes), str(port)]
        end = time.monotonic() + max(retry_s, self.start_timeout_s)
        attempts = 0
        while True:
            attempts += 1
            before = self._activations(i)
            proc = self.procs.start(self.hosts.client.wrap(cmd), self.workdir / f"supernode-{i}.log",
                                    self.node_env(i), self.workdir)
            while proc.poll() is None and self._activations(i) == before and time.monotonic() < end:
                time.sleep(0.2)
            if proc.poll() is None and self._activations(i) > before:
                self.nodes[i] = proc
                return attempts
            if proc.poll() is None:
                raise TimeoutError(f"SuperNode {i} not activated after {self.start_timeout_s:g} s:\n{self.logs()}")
            if time.monotonic() + 2 > end or retry_s <= 0:
                raise RuntimeError(f"SuperNode {i} exited with code {proc.returncode}:\n{self.logs()}")
            time.sleep(2)

    def kill_node(self, i: int) -> int:
        """SIGKILL SuperNode ``i`` and every process below it (its SuperExec, a running ClientApp), as a crash of
        that node would; return how many processes were killed."""
        proc = self.nodes[i]
        if proc is None:
            return 0
        tree = process_tree(proc.pid)
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        end = time.monotonic() + 10
        while time.monotonic() < end:
            table = _proc_table()
            if not [p for p, t in tree.items() if p in table and table[p][2] == t]:
                break
            time.sleep(0.1)
        self.nodes[i] = None
        return len(tree)

    def unregistered_node_exit_code(self, timeout_s: float = 60.0) -> int | None:
        """Start a SuperNode with a fresh key that was never registered and return Flower's exit code from its log
        (305, "Failed to activate SuperNode", when authentication is on; the process itself exits with status 1);
        ``None`` if it is still running after ``timeout_s`` (it is then killed) or logged no exit code."""
        key = self.workdir / "keys" / "unregistered"
        self._run(["bash", str(DEPLOY / "make_node_key.sh"), str(key)])
        port = RUNTIME_PORT + self.num_nodes
        env = {**self.node_env(0), "NODE_KEY": str(key), "FLWR_HOME": str(self.workdir / "home-unregistered")}
        proc = self.procs.start(self.hosts.client.wrap(["bash", str(DEPLOY / "supernode.sh"), self.address, "0",
                                                         str(self.num_nodes), str(port)]),
                                self.workdir / "supernode-unregistered.log", env, self.workdir)
        try:
            status = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            for pid in process_tree(proc.pid):
                os.kill(pid, signal.SIGKILL)
            proc.wait()
            return None
        log = (self.workdir / "supernode-unregistered.log").read_text(errors="replace")
        found = re.search(r"Exit Code: (\d+)", log)
        return int(found.group(1)) if found and status != 0 else None

    def tls_handshake(self, server_hostname: str) -> bool:
        """Whether a TLS handshake from the client host to the SuperLink succeeds when the certificate is checked
        against ``client-certs/ca.crt`` and ``server_hostname`` (Python's ``ssl``, as any client would)."""
        code = ("import socket, ssl, sys; ctx = ssl.create_default_context(cafile=sys.argv[1]); "
                "s = socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=10); "
                "ctx.wrap_socket(s, server_hostname=sys.argv[4]).close()")
        cmd = [sys.executable, "-c", code, str(self.workdir / "client-certs" / "ca.crt"), SERVER_ADDRESS,
               str(SUPERLINK_PORT), server_hostname]
        return subprocess.run(self.hosts.client.wrap(cmd), capture_output=True, timeout=120).returncode == 0

    def run(self, run_config: Mapping[str, Any]) -> subprocess.Popen:
        """Submit the app (``flwr run APP netns --run-config FILE --stream`` on the server host) and return at once;
        the returned process ends with the run (its stdout/stderr go to ``flwr-run.log``)."""
        import tomli_w

        path = self.workdir / "run-config.toml"
        path.write_text(tomli_w.dumps(dict(run_config)))
        return self.procs.start(self.flwr("run", str(self.app_dir), "netns", "--run-config", str(path), "--stream"),
                                self.workdir / "flwr-run.log", self.env, self.app_dir)

    def logs(self, tail: int = 3000) -> str:
        """The last ``tail`` characters of every log (for error messages)."""
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-tail:]}"
                         for p in sorted(self.workdir.glob("*.log")))

    def close(self) -> None:
        """Stop every process started here and everything they started (by pid), then delete the namespaces."""
        try:
            self.procs.stop()
        finally:
            if self.hosts is not None:
                self.hosts.close()
