"""The Flower ClientApp: local training with a defense, and federated evaluation.

Each SuperNode's ``node_config`` gives its ``partition-id`` and ``num-partitions``; the run config (identical on
server and clients) gives the dataset, model, defense and seeds. A train reply carries exactly one ArrayRecord (the
local model after training; defenses such as FedKL replace their secret tensors before it is built) and one
MetricRecord (``num-examples``, ``train-loss``, ``train-time-s``, ``defense-time-s`` — the defense's hooks included —
and whatever public diagnostics the defense reports, e.g. ``dp-epsilon``), plus two ConfigRecords:
``meta`` (the partition id, i.e. the client's identity as the server knows it) and, when ``audit=true``, ``audit``
(indices of the samples used) which the server hands only to the evaluator, never to the attacker. A
``query.whoami`` message is answered with the node's ``partition-id`` and ``num-partitions`` (the server samples
clients by partition id).
"""

from __future__ import annotations

import functools
import time

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.defenses import DEFENSES
from clients.training import local_train
from fl_sim.config import resolve
from fl_sim.data import iid_partition, load_dataset, partitions
from fl_sim.models import build_model, evaluate

app = ClientApp()


@functools.lru_cache(maxsize=4)
def _config(items: tuple) -> dict:
    return resolve(dict(items))


def _setup(context: Context) -> tuple[dict, int, int, torch.device]:
    cfg = _config(tuple(sorted(context.run_config.items())))
    pid = int(context.node_config["partition-id"])
    nparts = int(context.node_config["num-partitions"])
    torch.set_num_threads(max(1, int(float(cfg["client-num-cpus"]))))
    use_cuda = float(cfg["client-num-gpus"]) > 0
    if use_cuda and not torch.cuda.is_available():  # an error reply the server logs, not a silent CPU run
        raise RuntimeError(f"client-num-gpus={cfg['client-num-gpus']} but CUDA is not available to this client "
                           "(no GPU, or the simulation gave its actors none: client-resources-num-gpus)")
    return cfg, pid, nparts, torch.device("cuda" if use_cuda else "cpu")


def client_seed(seed: int, server_round: int, partition_id: int) -> int:
    """A 32-bit seed specific to one client and round, derived from the run's seed."""
    return int(np.random.SeedSequence([seed, server_round, partition_id]).generate_state(1)[0])


#: Error code of a simulated dropout reply (outside Flower's own ``ErrorCode`` values).
DROPOUT_ERROR_CODE = 100


def drops_out(rate: float, seed: int, server_round: int, partition_id: int) -> bool:
    """Whether this client drops out of ``server_round`` under ``client-dropout=rate``.

    A uniform draw from a generator seeded by ``(seed, round, partition id)``, so the same clients drop in every
    run with the same seed, whatever order the replies arrive in.
    """
    if rate <= 0:
        return False
    return bool(np.random.default_rng([seed % 2**63, server_round, partition_id, 0xD809]).random() < rate)


@app.query("whoami")
def whoami(msg: Message, context: Context) -> Message:
    """Tell the server this node's partition id and partition count (the server samples clients by them)."""
    meta = ConfigRecord({"partition-id": int(context.node_config["partition-id"]),
                         "num-partitions": int(context.node_config["num-partitions"])})
    return Message(content=RecordDict({"meta": meta}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this client's partition and reply with the (defended) local model.

    Under ``client-dropout`` a client that drops out of this round replies with an error instead (nothing trained).
    """
    cfg, pid, nparts, device = _setup(context)
    rnd = int(msg.content["config"].get("server-round", 0))
    if drops_out(float(cfg["client-dropout"]), int(cfg["seed"]), rnd, pid):
        return Message(Error(code=DROPOUT_ERROR_CODE, reason=f"client-dropout={cfg['client-dropout']}: "
                                                             f"partition {pid} dropped out of round {rnd}"),
                       reply_to=msg)
    data = load_dataset(str(cfg["dataset"]), str(cfg["data-dir"]))
    part = partitions(data.name, str(cfg["data-dir"]), nparts, str(cfg["partition"]), float(cfg["dirichlet-alpha"]),
                      int(cfg["seed"]))[pid]
    model = build_model(str(cfg["model"]), data.input_shape, data.num_classes)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    model.to(device)
    defense = DEFENSES[str(cfg["defense"])]
    t_hooks = time.perf_counter()
    if defense.on_model is not None:
        defense.on_model(model, context.state, cfg, client_seed(int(cfg["seed"]), 0, pid))
    hooks_s = time.perf_counter() - t_hooks
    train_cfg = dict(msg.content["config"])
    res = local_train(model, data, part, train_cfg, cfg, defense, context.state, client_seed(int(cfg["seed"]), rnd, pid),
                      device)
    t_hooks = time.perf_counter()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if defense.on_reply is not None:
        state = defense.on_reply(state, context.state, cfg)
    extra = defense.report(context.state, cfg) if defense.report is not None else {}
    hooks_s += time.perf_counter() - t_hooks if defense.on_reply is not None or defense.report is not None else 0.0
    metrics = {"num-examples": res.num_examples, "train-loss": res.loss, "train-time-s": res.train_time_s + hooks_s,
               "defense-time-s": res.defense_time_s + hooks_s, **res.defense_info, **extra}
    content = RecordDict({
        "arrays": ArrayRecord(state),
        "metrics": MetricRecord(metrics),
        "meta": ConfigRecord({"partition-id": pid}),
    })
    if cfg["audit"]:
        content["audit"] = ConfigRecord({"partition-id": pid, "sample-indices": res.sample_indices})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_fn(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this client's share of the test split (IID, by partition id)."""
    cfg, pid, nparts, device = _setup(context)
    data = load_dataset(str(cfg["dataset"]), str(cfg["data-dir"]))
    idx = iid_partition(len(data.y_test), nparts, int(cfg["seed"]))[pid]
    model = build_model(str(cfg["model"]), data.input_shape, data.num_classes)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    model.to(device)
    defense = DEFENSES[str(cfg["defense"])]
    if defense.on_model is not None:
        defense.on_model(model, context.state, cfg, client_seed(int(cfg["seed"]), 0, pid))
    loss, acc = evaluate(model, data.x_test[idx], data.y_test[idx], data.mean, data.std, device)
    metrics = MetricRecord({"num-examples": len(idx), "eval-loss": loss, "eval-acc": acc})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
