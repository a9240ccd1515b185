"""The Flower ServerApp: FedAvg with an honest-but-curious attacker, central evaluation, and the run directory.

``flwr run .`` loads :data:`app`; ``fl-sim run`` runs the same :func:`run_server` in-process on Flower's
simulation engine. Both read every setting from the run config (``context.run_config``), resolved against the
whole key table (:mod:`fl_sim.config`), and drive the one server side, :class:`strategies.strategy.CuriousFedAvg`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Mapping
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from flwr.superlink.grid import InMemoryGrid

from fl_sim.config import ConfigError, check_devices, check_feasible, resolve, specs
from fl_sim.report import write_run_report
from fl_sim.results import RunRecorder, provenance, read_metrics, run_dir_for, summarize, write_summary
from fl_sim.supernode import shorter_backoff
from fl_sim.task.datasets import load_dataset
from fl_sim.task.models import build_model
from strategies.checkpoint import RoundOffset, checkpointing, load_checkpoint, restore, save_checkpoint, truncate_metrics
from strategies.strategy import CuriousFedAvg

app = ServerApp()


class StoppableGrid(Grid):
    """A Grid whose ``send_and_receive`` polls every ``poll_s`` seconds and stops early when ``stop()`` is true.

    Flower's in-memory Grid waits the full timeout for replies that will never come once the simulation engine
    has stopped; this wrapper lets Ctrl-C and engine failures end the ServerApp within ``poll_s`` seconds (raising
    ``KeyboardInterrupt``). Flower's deployment Grid sleeps 3 s between pulls, which adds up to 3 s to every
    round; :func:`reply_poll_s` picks a shorter interval. A wrapped Grid that offers ``wait_for_replies(timeout)``
    (the in-process simulation's, :class:`fl_sim.simulation.MessagePath`) is waited on instead of sleeping, so a
    reply is pulled as soon as it is stored. Every other call is delegated to the wrapped Grid.
    """

    def __init__(self, grid: Grid, stop: Callable[[], bool], poll_s: float = 0.05):
        self.grid, self.stop, self.poll_s = grid, stop, poll_s

    def set_run(self, run: Any) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        return self.grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        pending = set(self.push_messages(messages))
        end = time.monotonic() + (timeout if timeout is not None else float("inf"))
        replies: list[Message] = []
        while pending and time.monotonic() < end:
            if self.stop():
                raise KeyboardInterrupt("stop requested")
            got = list(self.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if pending:
                wait = getattr(self.grid, "wait_for_replies", None)
                if wait is not None:
                    wait(self.poll_s)
                else:
                    time.sleep(self.poll_s)
        return replies


def reply_poll_s(grid: Grid) -> float:
    """Seconds between reply pulls: 0.05 in simulation (an in-memory lookup), 0.25 against a SuperLink.

    Flower's deployment Grid sleeps 3 s between pulls. Measured with 2 SuperNodes on the 2-core development
    machine, pulling every 0.1–0.25 s instead cut a round from 9.9 s to 6.6–7.7 s (``benchmarks/bench_deploy.py``,
    docs/deployment.md); polling much faster only burns CPU on the SuperLink. A :class:`StoppableGrid` is looked
    through (the simulation's Grid wraps the in-memory one).
    """
    while isinstance(grid, StoppableGrid):
        grid = grid.grid
    return 0.05 if isinstance(grid, InMemoryGrid) else 0.25


def wait_for_nodes(grid: Grid, n: int, timeout_s: float, poll_s: float = 0.2) -> None:
    """Block until ``n`` nodes are connected.

    Raises:
        TimeoutError: fewer than ``n`` nodes after ``timeout_s`` seconds (Flower itself would wait forever).
    """
    start = time.monotonic()
    while True:
        have = len(list(grid.get_node_ids()))
        if have >= n:
            return
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(
                f"only {have} of num-supernodes={n} clients connected within node-timeout={timeout_s:g} s"
            )
        time.sleep(poll_s)


def seed_everything(seed: int) -> None:
    """Seed Python's ``random`` (FedAvg's node sampling), NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare_run_dir(cfg: Mapping[str, Any]) -> Path:
    """The run directory for ``cfg``; refuses one that already holds results (nothing is ever overwritten).

    Raises:
        ConfigError: the directory already has ``metrics.jsonl`` or ``summary.json``.
    """
    run_dir = run_dir_for(cfg)
    if (run_dir / "metrics.jsonl").exists() or (run_dir / "summary.json").exists():
        raise ConfigError(f"run directory {run_dir} already holds results; choose another --out or run-name")
    return run_dir


def run_server(grid: Grid, cfg: Mapping[str, Any], on_round: Callable[[dict[str, Any]], None] | None = None,
               stop: Callable[[], bool] | None = None, resume: bool = False) -> Path:
    """Run the whole federation from the server side and write the run directory.

    Args:
        grid: Flower's Grid.
        cfg: the resolved run config.
        on_round: optional callback after each round (given the round's record).
        stop: optional callable; when it returns True the run ends after the current round (status
            ``interrupted``), keeping everything written so far.
        resume: continue the run in ``cfg``'s run directory from its last checkpoint
            (:mod:`strategies.checkpoint`) instead of starting a new one.

    Returns:
        The run directory.

    Raises:
        ConfigError: a new run's directory already holds results.
        ResumeError: ``resume`` and the run directory has no usable checkpoint.
    """
    grid = StoppableGrid(grid, stop or (lambda: False), poll_s=reply_poll_s(grid))
    spec = specs(cfg).server
    seed_everything(spec.task.seed)
    data = load_dataset(spec.task.dataset, spec.task.data_dir)
    if resume:
        run_dir = run_dir_for(cfg)
        ckpt = load_checkpoint(run_dir)
        truncate_metrics(run_dir, ckpt["round"])
        done, elapsed = int(ckpt["round"]), float(ckpt["elapsed_s"])
    else:
        run_dir = prepare_run_dir(cfg)
        ckpt, done, elapsed = None, 0, 0.0
    check_devices(cfg)  # CUDA asked for where there is none: a ConfigError before anything starts
    recorder = RunRecorder(run_dir, cfg, resume_after=done)
    log(INFO, "fl-sim: writing results to %s%s", run_dir, f" (resuming after round {done})" if resume else "")
    start, status = time.time() - elapsed, "failed"
    latest: dict[str, ArrayRecord] = {}  # the global model after the last completed round (final_model.pt)

    def save_round(rnd: int, arrays: ArrayRecord) -> None:
        latest["arrays"] = arrays
        save_checkpoint(run_dir, rnd, arrays, strategy, time.time() - start)

    try:
        wait_for_nodes(grid, spec.task.num_supernodes, spec.server.node_timeout)
        model = build_model(spec.task.model, data.input_shape, data.num_classes)
        strategy = CuriousFedAvg(spec, data, recorder, on_round=on_round, stop=stop)
        initial = restore(ckpt, strategy) if ckpt is not None else ArrayRecord(model.state_dict())
        if done:
            latest["arrays"] = initial
        evaluate_fn = checkpointing(strategy.evaluate_round, done, save_round)
        runner = RoundOffset(strategy, done) if done else strategy
        runner.start(grid=grid, initial_arrays=initial, num_rounds=spec.server.num_server_rounds - done,
                     timeout=spec.server.round_timeout, evaluate_fn=evaluate_fn)
        status = "completed"
    except KeyboardInterrupt:
        status = "interrupted"
    finally:
        if "arrays" in latest:
            recorder.save_final_model(latest["arrays"].to_torch_state_dict())
        recorder.close()
        summary = summarize(read_metrics(run_dir), cfg, time.time() - start, status)
        summary["provenance"] = provenance(cfg)
        write_summary(run_dir, summary)
        write_run_report(run_dir)
    return run_dir


def check_simulation_gpus(cfg: Mapping[str, Any]) -> None:
    """In Flower's simulation runtime the clients share this machine: refuse GPUs it does not have.

    Without this, ``flwr run`` with ``client-num-gpus > 0`` on a machine without CUDA ends in Flower's
    "ActorPool is empty" crash (or every client failing), not in a one-line reason.

    Raises:
        ConfigError: ``client-num-gpus > 0`` and CUDA is not available.
    """
    if float(cfg["client-num-gpus"]) > 0 and not torch.cuda.is_available():
        raise ConfigError(
            f"client-num-gpus={cfg['client-num-gpus']} is not allowed on this machine: CUDA is not available; "
            "use client-num-gpus=0 (and --federation-config 'client-resources-num-gpus=0')"
        )


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run``: resolve and check the run config (the data-dependent checks too, before the
    first round), then run the federation."""
    cfg = resolve(context.run_config)
    check_feasible(cfg, machine=False)
    if isinstance(grid, InMemoryGrid):  # simulation runtime: clients run on this machine
        check_simulation_gpus(cfg)
    else:  # deployment: replies are pulled from the SuperLink
        from flwr.superlink.grid import http_grid

        # A reply is listed before the SuperNode has pushed its arrays; Flower's first retry delay is 1 s.
        http_grid.pull_objects = shorter_backoff(http_grid.pull_objects)
    run_server(grid, cfg)  # checks the device keys on the server's machine before any round
