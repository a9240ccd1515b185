"""The Flower ClientApp: local training with a defense, and federated evaluation.

Each SuperNode's ``node_config`` gives its ``partition-id`` and ``num-partitions``; the run config (identical on
server and clients) gives the dataset, model and defense. A train message is answered by the one client pipeline
(:func:`clients.pipeline.client_update`) with the reply the message contract describes
(:func:`fl_sim.task.contract.train_reply`): the defended model, the metrics, the partition id and, when
``audit=true``, the audit-only record of the samples used. A ``query.whoami`` message is answered with the node's
partition id and partition count (the server samples clients by partition id). A ``query.probe`` message (the
``attack-target=probe`` audit) is answered by the same pipeline on one named image (:func:`probe`), on a copy of the
client's state.
"""

from __future__ import annotations

import copy
import dataclasses
import functools

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.config import ClientSpec
from clients.pipeline import client_update, prepare_model
from fl_sim.task import contract
from fl_sim.task.contract import TrainConfig
from fl_sim.task.datasets import load_dataset
from fl_sim.task.models import evaluate
from fl_sim.task.partition import eval_share, partitions

app = ClientApp()


@functools.lru_cache(maxsize=4)
def _spec(items: tuple) -> ClientSpec:
    return ClientSpec.from_config(dict(items))


def _setup(context: Context) -> tuple[ClientSpec, int, int, torch.device]:
    spec = _spec(tuple(sorted(context.run_config.items())))
    pid = int(context.node_config[contract.PARTITION_ID])
    nparts = int(context.node_config[contract.NUM_PARTITIONS])
    torch.set_num_threads(max(1, int(spec.client.num_cpus)))
    use_cuda = spec.client.num_gpus > 0
    if use_cuda and not torch.cuda.is_available():  # an error reply the server logs, not a silent CPU run
        raise RuntimeError(f"client-num-gpus={spec.client.num_gpus} but CUDA is not available to this client "
                           "(no GPU, or the simulation gave its actors none: client-resources-num-gpus)")
    return spec, pid, nparts, torch.device("cuda" if use_cuda else "cpu")


def client_seed(seed: int, server_round: int, partition_id: int) -> int:
    """A 32-bit seed specific to one client and round, derived from the run's seed."""
    return int(np.random.SeedSequence([seed, server_round, partition_id]).generate_state(1)[0])


def drops_out(rate: float, seed: int, server_round: int, partition_id: int) -> bool:
    """Whether this client drops out of ``server_round`` under ``client-dropout=rate``.

    A uniform draw from a generator seeded by ``(seed, round, partition id)``, so the same clients drop in every
    run with the same seed, whatever order the replies arrive in.
    """
    if rate <= 0:
        return False
    return bool(np.random.default_rng([seed % 2**63, server_round, partition_id, 0xD809]).random() < rate)


def probe_seed(seed: int, server_round: int, partition_id: int) -> int:
    """The secret seed of a probe's defense randomness: another stream than the round's training seed
    (:func:`client_seed`), so the probe never repeats the noise or slice draws of the update the client sent."""
    return int(np.random.SeedSequence([seed, server_round, partition_id, 0x9B0BE]).generate_state(1)[0])


def probe_update(spec: ClientSpec, msg_content: RecordDict, state: RecordDict, pid: int, nparts: int,
                 device: torch.device):
    """The client's defended one-image FedSGD step of a ``query.probe`` request (:func:`probe`), and the state
    copy it ran on.

    The one client pipeline (:func:`clients.pipeline.client_update`) runs with the probe's train config (FedSGD,
    B = 1, the round's lr), the client's defense, parameters and secrets, on a deep copy of ``state`` (the
    client's ``Context.state``, which the probe never changes: DP release counters, GradDefense's sensitivities
    and FedKL's lock layers stay as the last training round left them), with the batch fixed to the named image:
    the defense's batch hook, if any (DP-SGD's Poisson sampling), is replaced by that one-image batch, while its
    plan (σ, the divisor B) stays the client's. Everything else the defense does (step noise, pruning, masks,
    ``on_model``/``on_reply`` hooks) runs as in training, with the probe's own secret seed (:func:`probe_seed`).

    Returns:
        ``(ClientUpdate, state copy)``.

    Raises:
        ValueError: a malformed request, or an index that is not in this client's partition.
    """
    task = spec.task
    train_config, index = contract.read_probe_request(msg_content)
    data = load_dataset(task.dataset, task.data_dir)
    part = partitions(data.name, task.data_dir, nparts, task.partition, task.dirichlet_alpha, task.seed)[pid]
    if index not in {int(i) for i in part}:
        raise ValueError(f"probe of sample {index}: not in partition {pid} (a client probes its own images only)")
    one = np.asarray([index], dtype=np.int64)
    defense = dataclasses.replace(spec.defense, batches=lambda partition, tc, rng, params, st: [one])
    probe_spec = dataclasses.replace(spec, defense=defense)
    scratch = copy.deepcopy(state)
    update = client_update(probe_spec, msg_content[contract.ARRAYS].to_torch_state_dict(), data, part, train_config,
                           scratch, client_seed(task.seed, 0, pid),
                           probe_seed(task.seed, train_config.server_round, pid), device)
    return update, scratch


@app.query("probe")
def probe(msg: Message, context: Context) -> Message:
    """Answer the server's ``query.probe`` (``attack-target=probe``): the defended gradient step of one of this
    client's images at the global model the message carries, as a train reply with its audit record.

    An audit of the worst case a client sending one image's gradient would face (the GradDefense talk's protocol);
    the reply never feeds training and the client's ``Context.state`` is left unchanged (:func:`probe_update`).
    """
    spec, pid, nparts, device = _setup(context)
    update, _ = probe_update(spec, msg.content, context.state, pid, nparts, device)
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
    data = load_dataset(task.dataset, task.data_dir)
    part = partitions(data.name, task.data_dir, nparts, task.partition, task.dirichlet_alpha, task.seed)[pid]
    update = client_update(spec, msg.content[contract.ARRAYS].to_torch_state_dict(), data, part, train_config,
                           context.state, client_seed(task.seed, 0, pid), client_seed(task.seed, rnd, pid), device)
    content = contract.train_reply(update.state, update.metrics, pid, update.sample_indices if task.audit else None)
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_fn(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this client's share of the test split (IID, by partition id)."""
    spec, pid, nparts, device = _setup(context)
    task = spec.task
    data = load_dataset(task.dataset, task.data_dir)
    idx = eval_share(len(data.y_test), nparts, pid, task.seed)
    model, _ = prepare_model(spec, msg.content[contract.ARRAYS].to_torch_state_dict(), context.state,
                             client_seed(task.seed, 0, pid), device)
    loss, acc = evaluate(model, data.x_test[idx], data.y_test[idx], data.mean, data.std, device)
    metrics = MetricRecord({contract.NUM_EXAMPLES: len(idx), "eval-loss": loss, "eval-acc": acc})
    return Message(content=RecordDict({contract.METRICS: metrics}), reply_to=msg)
