"""The Flower ClientApp: local training with a defense, and federated evaluation.

Each SuperNode's ``node_config`` gives its ``partition-id`` and ``num-partitions``; the run config (identical on
server and clients) gives the dataset, model and defense. A train message is answered by the one client pipeline
(:func:`clients.pipeline.client_update`) with the reply the message contract describes
(:func:`fl_sim.task.contract.train_reply`): the defended model, the metrics, the partition id and, when
``audit=true``, the audit-only record of the samples used. A ``query.whoami`` message is answered with the node's
partition id and partition count (the server samples clients by partition id). A ``query.probe`` message (the
``attack-target=probe`` audit) is answered by the same pipeline on one named image (:func:`probe`), on a copy of the
client's state.

Every private draw (batches, defense noise and choices, FedKL's key) is seeded from the node's secret seed
(:mod:`clients.secrets`), never from the run config alone. Before a train or evaluate call an empty
``Context.state`` is restored from the client's state directory, and after it a non-empty one is written there with
the round (:mod:`clients.state`), so ``fl-sim run --resume`` resumes the clients too.

Per message, the global arrays are converted with :mod:`fl_sim.task.arrays` (the same tensors and bytes as
Flower's ``ArrayRecord`` conversions, without re-parsing every array's header) and the model is reloaded rather
than rebuilt when this process has one (:func:`clients.pipeline.keep_model`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients import secrets, state
from clients.config import ClientSpec
from clients.pipeline import client_update, keep_model, prepare_model
from fl_sim.task import contract
from fl_sim.task.arrays import to_array_record, to_state_dict
from fl_sim.task.contract import TrainConfig
from fl_sim.task.datasets import load_dataset, on_device
from fl_sim.task.keys import ConfigError
from fl_sim.task.models import evaluate
from fl_sim.task.partition import eval_share, partitions

app = ClientApp()


@functools.lru_cache(maxsize=4)
def _spec(items: tuple) -> ClientSpec:
    return ClientSpec.from_config(dict(items))


def _setup(context: Context) -> tuple[ClientSpec, int, int, torch.device]:
    spec = _spec(tuple(context.run_config.items()))  # the same order in every message of a run
    pid = int(context.node_config[contract.PARTITION_ID])
    nparts = int(context.node_config[contract.NUM_PARTITIONS])
    torch.set_num_threads(max(1, int(spec.client.num_cpus)))
    return spec, pid, nparts, client_device(spec)


def client_device(spec: ClientSpec) -> torch.device:
    """Where this client trains and evaluates.

    With ``client-num-gpus > 0`` (a GPU share Ray reserves for each virtual client) it is the GPU Ray assigned to
    this actor — the current CUDA device, since Ray's ``CUDA_VISIBLE_DEVICES`` leaves the actor that one GPU — and
    ``device`` must not be ``cpu``. Otherwise it is the ``device`` key resolved on this client's machine
    (``auto``: CUDA when present, else CPU).

    Raises:
        RuntimeError: CUDA asked for (by either key) but not available to this client — the server logs the error
            reply instead of the client silently training on the CPU.
    """
    if spec.client.num_gpus > 0:
        if spec.task.device == "cpu":
            raise RuntimeError(f"client-num-gpus={spec.client.num_gpus} asks for a GPU share but device='cpu'")
        if not torch.cuda.is_available():
            raise RuntimeError(f"client-num-gpus={spec.client.num_gpus} but CUDA is not available to this client "
                               "(no GPU, or the simulation gave its actors none: client-resources-num-gpus)")
        return torch.device("cuda", torch.cuda.current_device())
    try:
        return spec.task.torch_device()
    except ConfigError as exc:  # a SuperNode without the GPU the run config names
        raise RuntimeError(f"this client cannot compute where the run config says: {exc}") from exc


def drops_out(rate: float, seed: int, server_round: int, partition_id: int) -> bool:
    """Whether this client drops out of ``server_round`` under ``client-dropout=rate``.

    A uniform draw from a generator seeded by ``(seed, round, partition id)``, so the same clients drop in every
    run with the same seed, whatever order the replies arrive in. This is a simulated fault, not a client secret:
    it stays on the run config's public seed (the server may know who drops out; it sees the error replies anyway).
    """
    if rate <= 0:
        return False
    return bool(np.random.default_rng([seed % 2**63, server_round, partition_id, 0xD809]).random() < rate)


def _round_of(msg: Message) -> int:
    """The server round an evaluate message belongs to (Flower's FedAvg sends ``server-round``; 0 if absent)."""
    config = msg.content.config_records.get(contract.CONFIG)
    return int(config.get("server-round", 0)) if config is not None else 0


def probe_update(spec: ClientSpec, msg_content: RecordDict, state: RecordDict, pid: int, nparts: int,
                 device: torch.device, secret: int):
    """The client's defended one-image FedSGD step of a ``query.probe`` request (:func:`probe`), and the state
    copy it ran on.

    The one client pipeline (:func:`clients.pipeline.client_update`) runs with the probe's train config (FedSGD,
    B = 1, the round's lr), the client's defense, parameters and secrets, on a deep copy of ``state`` (the
    client's ``Context.state``, which the probe never changes: DP release counters, GradDefense's sensitivities
    and FedKL's lock layers stay as the last training round left them), with the batch fixed to the named image:
    the defense's batch hook, if any (DP-SGD's Poisson sampling), is replaced by that one-image batch, while its
    plan (σ, the divisor B) stays the client's. Everything else the defense does (step noise, pruning, masks,
    ``on_model``/``on_reply`` hooks) runs as in training, seeded from the node's secret ``secret`` on the probe's
    own stream (:func:`clients.secrets.probe_seed`).

    Returns:
        ``(ClientUpdate, state copy)``.

    Raises:
        ValueError: a malformed request, or an index that is not in this client's partition.
    """
    task = spec.task
    train_config, index = contract.read_probe_request(msg_content)
    data = load_dataset(task.dataset, task.data_dir)
    part = partitions(data.name, task.data_dir, nparts, task.partition, task.dirichlet_alpha, task.seed,
                      task.partition_size)[pid]
    if index not in {int(i) for i in part}:
        raise ValueError(f"probe of sample {index}: not in partition {pid} (a client probes its own images only)")
    one = np.asarray([index], dtype=np.int64)
    defense = dataclasses.replace(spec.defense, batches=lambda partition, tc, rng, params, st: [one])
    probe_spec = dataclasses.replace(spec, defense=defense)
    scratch = copy.deepcopy(state)
    update = client_update(probe_spec, msg_content[contract.ARRAYS].to_torch_state_dict(), data, part, train_config,
                           scratch, secrets.once_seed(secret, task.seed),
                           secrets.probe_seed(secret, task.seed, train_config.server_round), device)
    return update, scratch


@app.query("probe")
def probe(msg: Message, context: Context) -> Message:
    """Answer the server's ``query.probe`` (``attack-target=probe``): the defended gradient step of one of this
    client's images at the global model the message carries, as a train reply with its audit record.

    An audit of the worst case a client sending one image's gradient would face (the GradDefense talk's protocol);
    the reply never feeds training and the client's ``Context.state`` is left unchanged (:func:`probe_update`; an
    empty state, e.g. after a restart, is first restored from the client's state directory as of this round).
    """
    spec, pid, nparts, device = _setup(context)
    train_config, _ = contract.read_probe_request(msg.content)
    state.restore(context, state.state_dir(context, pid), train_config.server_round)
    secret = secrets.node_secret_for(context, pid)
    update, _ = probe_update(spec, msg.content, context.state, pid, nparts, device, secret)
    content = contract.train_reply(update.state, update.metrics, pid, update.sample_indices)
    return Message(content=content, reply_to=msg)


@app.query("whoami")
def whoami(msg: Message, context: Context) -> Message:
    """Tell the server this node's partition id and partition count (the server samples clients by them)."""
    meta = ConfigRecord({contract.PARTITION_ID: int(context.node_config[contract.PARTITION_ID]),
                         contract.NUM_PARTITIONS: int(context.node_config[contract.NUM_PARTITIONS])})
    return Message(content=RecordDict({contract.META: meta}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this client's partition and reply with the (defended) local model.

    Under ``client-dropout`` a client that drops out of this round replies with an error instead (nothing trained).
    """
    spec, pid, nparts, device = _setup(context)
    task = spec.task
    train_config = TrainConfig.from_record(msg.content[contract.CONFIG])
    rnd = train_config.server_round
    if drops_out(spec.client.dropout, task.seed, rnd, pid):
        return Message(Error(code=contract.DROPOUT_ERROR_CODE,
                             reason=f"client-dropout={spec.client.dropout}: partition {pid} dropped out of round {rnd}"),
                       reply_to=msg)
    state_dir = state.state_dir(context, pid)
    state.restore(context, state_dir, rnd - 1)  # a resumed client continues from its last round before this one
    secret = secrets.node_secret_for(context, pid)
    data = load_dataset(task.dataset, task.data_dir)
    part = partitions(data.name, task.data_dir, nparts, task.partition, task.dirichlet_alpha, task.seed,
                      task.partition_size)[pid]
    update = client_update(spec, to_state_dict(msg.content[contract.ARRAYS]), data, part, train_config,
                           context.state, secrets.once_seed(secret, task.seed),
                           secrets.round_seed(secret, task.seed, rnd), device)
    state.checkpoint(context, state_dir, rnd)
    content = contract.train_reply(to_array_record(update.state), update.metrics, pid,
                                   update.sample_indices if task.audit else None)
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_fn(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this client's share of the test split (IID, by partition id)."""
    spec, pid, nparts, device = _setup(context)
    task = spec.task
    rnd = _round_of(msg)
    state_dir = state.state_dir(context, pid)
    state.restore(context, state_dir, rnd)
    secret = secrets.node_secret_for(context, pid)
    data = load_dataset(task.dataset, task.data_dir)
    idx = eval_share(len(data.y_test), nparts, pid, task.seed)
    model, _ = prepare_model(spec, to_state_dict(msg.content[contract.ARRAYS]), context.state,
                             secrets.once_seed(secret, task.seed), device)
    state.checkpoint(context, state_dir, rnd)
    x_test, y_test = on_device(data, "test", device)  # once per process
    rows = torch.as_tensor(idx, device=device)
    loss, acc = evaluate(model, x_test[rows], y_test[rows], data.mean, data.std, device)
    keep_model(spec, model, device)
    metrics = MetricRecord({contract.NUM_EXAMPLES: len(idx), "eval-loss": loss, "eval-acc": acc})
    return Message(content=RecordDict({contract.METRICS: metrics}), reply_to=msg)
