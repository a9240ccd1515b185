"""Per-round checkpoints of the server, and resuming a run from one.

After every round the server writes ``RUN_DIR/checkpoint.pkl`` atomically (temporary file, fsync, rename): the
round number, the global model, the strategy state that later rounds depend on (:data:`STRATEGY_STATE`), the
Python/NumPy/torch RNG states and the wall time so far. ``metrics.jsonl`` is appended (and fsynced) just before, so
after a crash it holds at most one round more than the checkpoint; :func:`truncate_metrics` drops that round on
resume. ``fl-sim run --resume RUN_DIR`` then replays nothing: it restores the checkpoint and runs the remaining
rounds under their original round numbers (:class:`RoundOffset`), which, with the seeded sampling and dropout
(derived from ``(seed, round, partition id)``), the clients' private randomness (derived from each node's secret seed
and the round, :mod:`clients.secrets`; the simulation harness keeps the run's client secret in
``RUN_DIR/clients/secret``) and replies aggregated in partition order, ends with the same metrics as an
uninterrupted run.

Client-side ``Context.state`` (a defense's secrets and counters: FedKL's lock layers, GradDefense's
sensitivities, the DP release counter) is restored too, but not from this file — the server never holds it. Every
client writes its own state with the round after each round it takes part in (:mod:`clients.state`: in simulation
under ``RUN_DIR/clients/partition-P/``, in deployment under the node's ``state-dir``), and a resumed client whose
state is empty loads its newest state of a round ``<=`` the last round before the one it is asked to run; the
simulation harness also deletes client states of rounds after this checkpoint before it resumes
(:func:`fl_sim.simulation.run`). Resuming a deployed run on the deployment engine is not wired up (docs/deployment.md).
"""

from __future__ import annotations

import json
import os
import pickle
import random
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

CHECKPOINT = "checkpoint.pkl"
FORMAT = 1

#: Attributes of :class:`strategies.strategy.CuriousFedAvg` that later rounds depend on (pickled as they are).
#: A strategy attribute that carries state from round to round must be listed here to survive a resume.
STRATEGY_STATE: tuple[str, ...] = ("rng",)


class ResumeError(RuntimeError):
    """A run directory cannot be resumed (no checkpoint, another format, already complete)."""


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, server_round: int, arrays: ArrayRecord, strategy: Any, elapsed_s: float) -> None:
    """Write ``run_dir/checkpoint.pkl`` for the state after ``server_round`` (atomically).

    Args:
        run_dir: the run directory.
        server_round: the last completed round (1-based).
        arrays: the global model after that round.
        strategy: the strategy; its :data:`STRATEGY_STATE` attributes are saved.
        elapsed_s: wall-clock seconds of the run so far.
    """
    state = {
        "format": FORMAT,
        "round": int(server_round),
        "arrays": {k: a.numpy() for k, a in arrays.items()},
        "strategy": {name: getattr(strategy, name) for name in STRATEGY_STATE if hasattr(strategy, name)},
        "python_random": random.getstate(),
        "numpy_random": np.random.get_state(),
        "torch_random": torch.get_rng_state().numpy(),
        "cuda_random": [s.numpy() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_initialized() else [],
        "elapsed_s": float(elapsed_s),
    }
    _atomic_write_bytes(Path(run_dir) / CHECKPOINT, pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))


def load_checkpoint(run_dir: Path) -> dict[str, Any]:
    """Read ``run_dir/checkpoint.pkl``.

    Raises:
        ResumeError: no checkpoint (the run never finished a round) or an unknown format.
    """
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise ResumeError(f"{run_dir} has no {CHECKPOINT}: the run finished no round, start it again instead")
    with open(path, "rb") as f:
        state = pickle.load(f)  # our own file, written by save_checkpoint
    if state.get("format") != FORMAT:
        raise ResumeError(f"{path} has checkpoint format {state.get('format')!r}, this fl-sim reads {FORMAT}")
    return state


def restore(state: dict[str, Any], strategy: Any) -> ArrayRecord:
    """Restore the strategy attributes and the global RNG states; return the checkpoint's global model."""
    for name, value in state["strategy"].items():
        setattr(strategy, name, value)
    random.setstate(state["python_random"])
    np.random.set_state(state["numpy_random"])
    torch.set_rng_state(torch.from_numpy(state["torch_random"]))
    if state["cuda_random"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.from_numpy(s) for s in state["cuda_random"]])
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in state["arrays"].items()})


def truncate_metrics(run_dir: Path, last_round: int) -> None:
    """Keep only the ``metrics.jsonl`` lines of rounds ``<= last_round`` (and no torn line), atomically."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["round"] <= last_round:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    _atomic_write_bytes(path, "".join(x + "\n" for x in keep).encode())


class RoundOffset(Strategy):
    """Run ``strategy`` for rounds ``offset + 1 ...`` under Flower's ``Strategy.start`` (which counts from 1).

    Every call is forwarded with the round number shifted by ``offset``, so the resumed rounds keep their original
    numbers (learning-rate schedule, client seeds, sampling and attack rounds depend on them).
    """

    def __init__(self, strategy: Strategy, offset: int):
        self.strategy, self.offset = strategy, offset

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_train(server_round + self.offset, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round + self.offset, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round + self.offset, replies)

    def summary(self) -> None:
        self.strategy.summary()


def checkpointing(evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None], offset: int,
                  save: Callable[[int, ArrayRecord], None]) -> Callable[[int, ArrayRecord], MetricRecord | None]:
    """Wrap the strategy's ``evaluate_fn``: shift the round by ``offset``, then checkpoint after every round.

    Flower calls ``evaluate_fn(0, initial_arrays)`` before the first round; that call is skipped on a resume (the
    round was evaluated before the checkpoint).
    """

    def wrapped(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0 and offset > 0:
            return None
        metrics = evaluate_fn(server_round + offset, arrays)
        if server_round > 0:
            save(server_round + offset, arrays)
        return metrics

    return wrapped
