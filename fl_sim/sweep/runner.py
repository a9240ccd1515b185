"""Running a sweep: cells as ``python -m fl_sim.cli run`` processes (forked from the cell host,
:mod:`fl_sim.cellhost`, or fresh interpreters), pinned to disjoint cores, resumable.

Client secrets: a sweep keeps one **sweep-level client secret** in ``SWEEP_DIR/client-secret`` (written on the
first run from ``FL_SIM_CLIENT_SECRET``, else OS entropy; mode 0600) and gives every cell its own run-level client
secret derived from it and the cell's id (:func:`cell_secret`), in the cell's environment (``FL_SIM_CLIENT_SECRET``,
not its command line or ``cell.json``). A cell that is run again (after a kill, a failure, or in a copy of the sweep
directory) therefore makes the same client draws; a new sweep directory gets new secrets unless
``FL_SIM_CLIENT_SECRET`` fixes them.
"""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clients import secrets as client_secrets
from fl_sim import cellhost
from fl_sim.config import ConfigError
from fl_sim.results import atomic_write_text
from fl_sim.sweep.plan import Cell, cell_states, check_cells_feasible, is_done, move_aside, plan, sweep_lock
from fl_sim.sweep.spec import SweepSpec, value_label
from fl_sim.sweep.report import write_sweep_report
from fl_sim.task.keys import Value

# --- running cells -------------------------------------------------------------------------------------------------
def usable_cpus() -> list[int]:
    """The CPU ids this process may run on (its affinity), or ``range(os.cpu_count())``."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def split_cpus(cpus: list[int], jobs: int) -> list[list[int]]:
    """Split ``cpus`` into ``min(jobs, len(cpus))`` disjoint, contiguous groups of (nearly) equal size.

    Raises:
        ValueError: ``jobs < 1`` or no CPUs.
    """
    if jobs < 1 or not cpus:
        raise ValueError(f"cannot split {len(cpus)} CPUs into {jobs} groups")
    n = min(jobs, len(cpus))
    size, extra = divmod(len(cpus), n)
    groups, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        groups.append(cpus[start:end])
        start = end
    return groups


def cli_value(value: Value) -> str:
    """``value`` as the text of ``fl-sim run KEY=VALUE`` (parsed back by :func:`fl_sim.config.parse_value`)."""
    return value_label(value) if isinstance(value, bool) else repr(value) if isinstance(value, float) else str(value)


def cell_command(cell: Cell, cell_dir: Path, cpus: int) -> list[str]:
    """The ``fl-sim run`` command of one cell, with ``client-num-cpus`` capped to the ``cpus`` it is given."""
    overrides = dict(cell.overrides)
    overrides["client-num-cpus"] = min(float(cell.config["client-num-cpus"]), float(cpus))
    args = [f"{k}={cli_value(v)}" for k, v in overrides.items()]
    return [sys.executable, "-m", "fl_sim.cli", "run", *args, "--out", str(cell_dir)]


#: The sweep-level client secret, relative to the sweep directory.
SWEEP_SECRET_FILE = "client-secret"


def sweep_secret(out: Path) -> int:
    """The sweep-level client secret kept in ``out/client-secret``; created on first use from
    ``FL_SIM_CLIENT_SECRET``, else OS entropy.

    Raises:
        ConfigError: ``FL_SIM_CLIENT_SECRET`` or the file holds something other than an integer in [0, 2^63).
    """
    path = Path(out) / SWEEP_SECRET_FILE
    try:
        if path.is_file():
            return client_secrets.read_secret(path)
        secret = client_secrets.env_secret()
        secret = client_secrets.new_secret() if secret is None else secret
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    client_secrets.write_secret(path, secret)
    return secret


def cell_secret(secret: int, cell_id: str) -> int:
    """The run-level client secret of cell ``cell_id`` under the sweep-level ``secret``."""
    return client_secrets.child_secret(secret, f"sweep-cell:{cell_id}")




def _child_setup(cpus: list[int], parent: int) -> Callable[[], None]:
    """Pin the cell to ``cpus`` and have it receive SIGINT when the sweep dies: ``fl-sim run`` then stops after
    the current round and shuts Ray down (a SIGTERM/SIGKILL would leave Ray's agent processes behind)."""
    cellhost.parent_death_signal(0)  # loads libc now, not between fork and exec (0: no signal for the sweep)

    def setup() -> None:  # runs in the child between fork and exec: no imports, no allocation-heavy work
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, cpus)
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a sweep started with `&` by a script ignores SIGINT
        cellhost.parent_death_signal(signal.SIGINT)
        if os.getppid() != parent:  # the sweep died before prctl took effect
            os._exit(1)
    return setup


def _project_root() -> Path:
    return Path(__file__).resolve().parents[2]


def cell_env(env: dict[str, str], secret: int, cell_id: str) -> dict[str, str]:
    """The whole environment of cell ``cell_id``: ``env`` with one intra-op thread (OpenMP, MKL, OpenBLAS) and
    passive OpenMP waits (:data:`fl_sim.cellhost.HOST_ENV`), and the cell's client secret.

    One thread on the server side of every cell, whatever its cores: float reductions (and so the attack scores)
    then do not depend on ``--jobs``, and LeNet-sized work gains little from more threads.
    """
    job_env = dict(env, **cellhost.HOST_ENV)
    job_env[client_secrets.SECRET_ENV] = str(cell_secret(secret, cell_id))
    return job_env


def _inherit(fd: Any) -> Any:
    return fd


class _LockFd:
    """The sweep lock's descriptor, sent to a forked cell with the fork server's ``SCM_RIGHTS`` (a
    ``multiprocessing.reduction.DupFd`` made while the cell is being started)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple:
        from multiprocessing import reduction

        return _inherit, (reduction.DupFd(self.fd),)


class _ForkedCell:
    """A cell forked from the cell host (:mod:`fl_sim.cellhost`), with the part of ``subprocess.Popen``'s
    interface the runner uses: ``pid``, ``poll()`` (``None`` while it runs, else its exit status, negative for a
    signal), ``send_signal(sig)``, ``wait()``."""

    def __init__(self, process: Any) -> None:
        self.process = process

    @property
    def pid(self) -> int:
        return self.process.pid

    def poll(self) -> int | None:
        code = self.process.exitcode
        if code is not None and self._alive():
            # the host reports a cell's status after reaping it; a status while the pid still runs means the host
            # itself went (multiprocessing then says 255): the cell is still writing its directory
            return None
        return code

    def _alive(self) -> bool:
        """The pid exists and is not a zombie (an orphan's new parent may be slow to reap it)."""
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
            return not Path("/proc/self").exists()  # no /proc here: the pid exists
        return stat.rsplit(")", 1)[1].split()[0] != "Z"

    def send_signal(self, sig: int) -> None:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def wait(self) -> int:
        self.process.join()
        while self._alive():
            time.sleep(0.05)
        return self.process.exitcode


def _host_context() -> Any:
    """The ``forkserver`` context whose server has imported what a cell imports (started on first use)."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["fl_sim.cellhost.preload"])
    return ctx


def _stop_host() -> None:
    """Stop the cell host (it would otherwise stay until this process exits, ~0.8 GB)."""
    from multiprocessing import forkserver

    stop = getattr(getattr(forkserver, "_forkserver", None), "_stop", None)
    if stop is not None:
        try:
            stop()
        except OSError:
            pass


#: The command prefix of every real cell (:func:`cell_command`); only such a cell is forked from the cell host.
_CLI_PREFIX = (sys.executable, "-m", "fl_sim.cli")


def _start(cmd: list[str], log: Any, env: dict[str, str], cpus: list[int], lock_fd: int,
           fork: bool) -> subprocess.Popen | _ForkedCell:
    """Start one cell: forked from the cell host when ``fork`` and the command is ``python -m fl_sim.cli ...``
    with the host's thread settings (:func:`fl_sim.cellhost.forkable`), else as a subprocess."""
    if fork and tuple(cmd[:3]) == _CLI_PREFIX and cellhost.forkable(env):
        process = _host_context().Process(
            target=cellhost.run_cell, name="fl-sim cell",
            args=(cmd[3:], env, cpus, os.getpid(), log.name, _LockFd(lock_fd)))
        try:
            process.start()
        except (OSError, EOFError) as exc:  # the host could not start or died: this cell runs as a subprocess
            print(f"fl-sim sweep: the cell host failed ({exc!r}); starting this cell in a new interpreter",
                  file=sys.stderr)
        else:
            # not joined by multiprocessing when the sweep exits: like a subprocess cell, it gets SIGINT instead
            # (its host exits with the sweep) and stops after its round
            getattr(sys.modules["multiprocessing.process"], "_children", set()).discard(process)
            return _ForkedCell(process)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                            start_new_session=True, pass_fds=(lock_fd,), preexec_fn=_child_setup(cpus, os.getpid()))


@dataclass
class _Job:
    cell: Cell
    dir: Path
    proc: subprocess.Popen | _ForkedCell
    slot: int
    log: Any
    rounds: int


@dataclass
class SweepResult:
    """What :func:`run_sweep` did.

    Attributes:
        cells: number of cells in the sweep.
        skipped: ids of cells already done.
        moved: ``(id, attic path)`` of unfinished cells moved aside.
        ran: ids of cells that completed in this call.
        failed: ``(id, reason)`` of cells that did not complete.
        retried: ``(id, reason)`` of failed attempts that were run again.
        interrupted: the sweep was stopped (Ctrl-C) before every cell ran.
        wall_time_s: seconds spent.
        report: ``table.md`` (``None`` on a dry run).
    """

    cells: int
    skipped: list[str] = field(default_factory=list)
    moved: list[tuple[str, Path]] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    retried: list[tuple[str, str]] = field(default_factory=list)
    interrupted: bool = False
    wall_time_s: float = 0.0
    report: Path | None = None


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


_EXCEPTION_LINE = re.compile(r"^[\w.]*(?:Error|Exception):")


def _failure(path: Path) -> str:
    """The most telling line of a failed cell's log: the first exception line of a traceback (the root cause),
    else the last line mentioning an error, else the last line."""
    try:
        lines = [x.strip() for x in path.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return "no log"
    causes = [x for x in lines if _EXCEPTION_LINE.match(x)]
    if causes:
        return causes[0][:300]
    errors = [x for x in lines if "error" in x.lower()]
    return (errors or lines or ["no output"])[-1][:300]


def default_out(path: Path) -> Path:
    """``sweeps-out/<file stem>`` in the current directory."""
    return Path("sweeps-out") / Path(path).stem


def run_sweep(spec: SweepSpec, out: Path, jobs: int = 1, dry_run: bool = False, console: Any = None,
              poll_s: float = 0.5, retries: int = 1, fork: bool = True) -> SweepResult:
    """Run every cell of ``spec`` that is not done in ``out``, ``jobs`` at a time, then write the sweep report.

    Args:
        spec: a parsed sweep (:func:`load_sweep`).
        out: the sweep directory.
        jobs: cells run at once (capped to the usable cores; each gets its own cores).
        dry_run: plan and print, but write and run nothing.
        console: a ``rich.console.Console`` for the plan and the progress bar (default: stderr).
        poll_s: seconds between checks of the running cells.
        retries: times a failed cell is run again in this call (after the others; its directory is moved aside).
        fork: fork each ``fl-sim run`` cell from the cell host (:mod:`fl_sim.cellhost`), which imports what a cell
            imports once, instead of starting a new interpreter per cell (same results; 11.4 s less per seed-001 cell here).

    Returns:
        A :class:`SweepResult`.

    Raises:
        ConfigError: a bad cell, a finished cell with another config, or a sweep already running in ``out``
            (all before any cell starts).
    """
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    console = console or Console(stderr=True, soft_wrap=True)
    start = time.time()
    out = Path(out).expanduser().resolve()
    cells = plan(spec)
    result = SweepResult(cells=len(cells))
    groups = split_cpus(usable_cpus(), jobs)
    if dry_run:
        states = cell_states(out, cells) if out.is_dir() else {c.id: "missing" for c in cells}
        for c in cells:
            console.print(f"{states[c.id]:>8}  {c.id}")
        console.print(f"{len(cells)} cells; would run {sum(s != 'done' for s in states.values())} with "
                      f"{len(groups)} job(s) of {len(groups[0])} core(s) in {out}")
        return result
    with sweep_lock(out) as lock_fd:
        states = cell_states(out, cells)
        pending = [c for c in cells if states[c.id] != "done"]
        check_cells_feasible(spec, pending)
        if spec.path.is_file():
            atomic_write_text(out / "sweep.toml", spec.path.read_text())
        atomic_write_text(out / "sweep.json", json.dumps(spec.settings(), indent=2))
        secret = sweep_secret(out)
        result.skipped = [c.id for c in cells if states[c.id] == "done"]
        for c in pending:
            if states[c.id] == "partial":
                result.moved.append((c.id, move_aside(out, out / "cells" / c.id)))
        groups = split_cpus(usable_cpus(), max(1, min(jobs, len(pending))))  # fewer cells than jobs: more cores
        console.print(f"fl-sim sweep {spec.path}: {len(cells)} cells, {len(result.skipped)} done, "
                      f"{len(result.moved)} unfinished moved to attic/, {len(pending)} to run with "
                      f"{len(groups)} job(s) × {len(groups[0])} core(s) → {out}")
        if pending:
            _run_pending(pending, out, groups, result, lock_fd, poll_s, retries=retries, secret=secret, fork=fork,
                         progress=
                         Progress(TextColumn("[bold]cells"), BarColumn(), TaskProgressColumn(),
                                  TextColumn("{task.fields[done]}/{task.total:.0f} {task.description}"),
                                  TimeElapsedColumn(), console=console))
        result.report = write_sweep_report(out)
    result.wall_time_s = time.time() - start
    return result


def _run_pending(pending: list[Cell], out: Path, groups: list[list[int]], result: SweepResult, lock_fd: int,
                 poll_s: float, progress: Any, retries: int, secret: int, fork: bool = True) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_project_root()), env.get("PYTHONPATH", "")) if p)
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    queue = collections.deque(pending)
    free = list(range(len(groups)))
    running: dict[int, _Job] = {}
    tries = {c.id: 0 for c in pending}
    base_done = len(result.skipped)
    total = base_done + len(pending)
    task = progress.add_task("", total=total, completed=base_done, done=base_done)
    stopping = False

    def start_cell(cell: Cell, slot: int) -> None:
        d = out / "cells" / cell.id
        d.mkdir(parents=True, exist_ok=True)
        (d / "cell.json").write_text(json.dumps(cell.record(), indent=2))
        log = open(d / "cell.log", "w")
        cpus = groups[slot]
        proc = _start(cell_command(cell, d, len(cpus)), log, cell_env(env, secret, cell.id), cpus, lock_fd, fork)
        running[slot] = _Job(cell, d, proc, slot, log, int(cell.config["num-server-rounds"]))

    def reap() -> None:
        for slot, job in list(running.items()):
            rc = job.proc.poll()
            if rc is None:
                continue
            job.log.close()
            del running[slot]
            free.append(slot)
            if rc == 0 and is_done(job.dir):
                result.ran.append(job.cell.id)
                continue
            if stopping:
                result.failed.append((job.cell.id, "interrupted"))
                continue
            reason = f"exit {rc}: {_failure(job.dir / 'cell.log')}"
            if tries[job.cell.id] < retries:  # e.g. Ray failing to start on a loaded machine: try again, last
                tries[job.cell.id] += 1
                moved = move_aside(out, job.dir)
                result.retried.append((job.cell.id, reason))
                progress.console.print(f"[yellow]cell {job.cell.id} failed ({reason}); kept in {moved}, will "
                                       f"retry[/yellow]")
                queue.append(job.cell)
            else:
                result.failed.append((job.cell.id, reason))
                progress.console.print(f"[red]cell {job.cell.id} failed ({reason}); see "
                                       f"{job.dir / 'cell.log'}[/red]")

    def show() -> None:
        partial = sum(min(1.0, _count_lines(j.dir / "metrics.jsonl") / j.rounds) for j in running.values())
        done = base_done + len(result.ran)
        names = ", ".join(f"{j.cell.id} r{_count_lines(j.dir / 'metrics.jsonl')}/{j.rounds}"
                          for j in running.values())
        progress.update(task, completed=done + len(result.failed) + partial, done=done,
                        description=f"running: {names}" if names else "")

    def wait_for_exit(timeout_s: float) -> None:
        """Sleep up to ``timeout_s``, waking within :data:`REAP_SLICE_S` of a cell's exit, so that the next cell
        starts on its core at once (``show`` reads the running cells' metrics, so it stays at ``poll_s``)."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if any(job.proc.poll() is not None for job in running.values()):
                return
            time.sleep(min(REAP_SLICE_S, max(0.0, end - time.monotonic())))

    with progress:
        try:
            while queue or running:
                while queue and free:
                    start_cell(queue.popleft(), free.pop(0))
                show()
                wait_for_exit(poll_s)
                reap()
            show()
        except KeyboardInterrupt:
            stopping = True
            result.interrupted = True
            progress.console.print("[yellow]Ctrl-C: stopping the running cells after their current round "
                                   "(press again to kill them); finished cells are kept[/yellow]")
            for job in running.values():
                job.proc.send_signal(signal.SIGINT)
            try:
                while running:
                    time.sleep(poll_s)
                    reap()
            except KeyboardInterrupt:
                for job in running.values():
                    _kill_group(job.proc)
                for job in list(running.values()):
                    job.proc.wait()
                reap()
    if fork and not running:
        _stop_host()


#: How often the sweep checks for a finished cell between two progress updates (seconds).
REAP_SLICE_S = 0.02


def _kill_group(proc: subprocess.Popen | _ForkedCell) -> None:
    """SIGKILL a cell's process group: the cell and every Ray process it started (they share its group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
