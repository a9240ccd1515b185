"""The message contract shared by the ClientApp, the server strategy and the attacker.

What travels in a round (Flower's Message API):

* **server → client, ``train``**: an ArrayRecord :data:`ARRAYS` (the global model's state dict) and a ConfigRecord
  :data:`CONFIG` holding a :class:`TrainConfig` (mode, lr, batch size, local steps/epochs, server round).
* **client → server, train reply**: exactly one ArrayRecord :data:`ARRAYS` (the local model after training, as the
  defense lets it out), one MetricRecord :data:`METRICS` (:data:`STANDARD_METRICS` plus the defense's declared
  public diagnostics), a ConfigRecord :data:`META` (the partition id: the client's identity as the server knows it)
  and, when ``audit=true``, a ConfigRecord :data:`AUDIT` (the indices of the samples used) that the server hands
  only to the evaluator, never to the attacker.
* ``query.whoami`` (:data:`WHOAMI`): answered with the node's partition id and partition count.
* ``query.probe`` (:data:`PROBE`, the ``attack-target=probe`` audit): the server sends the global arrays
  :data:`ARRAYS`, a :class:`TrainConfig` :data:`CONFIG` (:func:`probe_train_config`: FedSGD, B = 1, this round's
  lr) and a ConfigRecord :data:`PROBE_RECORD` naming one :data:`SAMPLE_INDEX` of the client's partition (one of the
  images it reported in its audit record this round); the client answers exactly like a train reply (with the
  audit record) holding its *defended* one-image gradient step, computed on a copy of its state: the probe never
  feeds training and leaves the client's state as it was.

:meth:`TrainConfig.steps` is the one rule for how many local SGD steps an update holds; the client's batch
schedule, the attacker's gradient conversion and GradDefense's noise variance all use it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
META = "meta"
AUDIT = "audit"

PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
SAMPLE_INDICES = "sample-indices"

#: Message type of the identity query.
WHOAMI = "query.whoami"

#: Message type of the probe (the ``attack-target=probe`` audit) and the name of its request record.
PROBE = "query.probe"
PROBE_RECORD = "probe"
SAMPLE_INDEX = "sample-index"

#: Metrics every train reply carries: the FedAvg weight, the mean training loss, and the client's train and
#: defense wall times in seconds (the defense's hooks included in both).
NUM_EXAMPLES, TRAIN_LOSS, TRAIN_TIME, DEFENSE_TIME = "num-examples", "train-loss", "train-time-s", "defense-time-s"
STANDARD_METRICS = (NUM_EXAMPLES, TRAIN_LOSS, TRAIN_TIME, DEFENSE_TIME)

#: Error code of a simulated dropout reply (outside Flower's own ``ErrorCode`` values).
DROPOUT_ERROR_CODE = 100

MODES = ("fedsgd", "fedavg")


@dataclass(frozen=True)
class TrainConfig:
    """The train config the server sends every round.

    Attributes:
        mode: ``"fedsgd"`` (one gradient on one batch) or ``"fedavg"`` (several plain SGD steps).
        lr: the client learning rate of this round (> 0).
        batch_size: local batch size B.
        local_steps: fedavg: local SGD steps K (0 = ``local_epochs`` passes over the partition).
        local_epochs: fedavg: local epochs E when ``local_steps`` is 0.
        server_round: the server round (1-based; 0 outside a federation).
    """

    mode: str
    lr: float
    batch_size: int
    local_steps: int = 0
    local_epochs: int = 1
    server_round: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}; allowed: {', '.join(MODES)}")

    def to_record(self) -> ConfigRecord:
        """As the ConfigRecord the server sends."""
        return ConfigRecord({"mode": self.mode, "lr": float(self.lr), "batch-size": int(self.batch_size),
                             "local-steps": int(self.local_steps), "local-epochs": int(self.local_epochs),
                             "server-round": int(self.server_round)})

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> TrainConfig:
        """Read what the server sent (a ConfigRecord or a dict with the same keys)."""
        return cls(mode=str(rec["mode"]), lr=float(rec["lr"]), batch_size=int(rec["batch-size"]),
                   local_steps=int(rec.get("local-steps", 0)), local_epochs=int(rec.get("local-epochs", 1)),
                   server_round=int(rec.get("server-round", 0)))

    def steps(self, num_examples: int) -> int:
        """Local SGD steps behind an update of a client that holds (fedavg) or used (fedsgd) ``num_examples``.

        ``fedsgd``: 1. ``fedavg``: ``local_steps`` when positive, else ``local_epochs × ⌈num_examples / B⌉``.
        """
        if self.mode == "fedsgd":
            return 1
        if self.local_steps > 0:
            return self.local_steps
        return self.local_epochs * math.ceil(int(num_examples) / max(1, self.batch_size))

    def num_examples(self, partition_size: int) -> int:
        """The FedAvg weight a client reports: ``B`` for fedsgd, its partition size for fedavg."""
        return self.batch_size if self.mode == "fedsgd" else int(partition_size)


def probe_train_config(lr: float, server_round: int) -> TrainConfig:
    """The train config of a probe: one FedSGD step on a batch of one image (B = 1) at ``lr`` (this round's)."""
    return TrainConfig("fedsgd", float(lr), 1, 0, 1, int(server_round))


def probe_request(arrays: ArrayRecord, train_config: TrainConfig, sample_index: int) -> RecordDict:
    """The content of a ``query.probe`` message: the global ``arrays``, the probe's train config and the index (into
    the training split) of the image to probe.

    Raises:
        ValueError: a train config that is not FedSGD with B = 1.
    """
    if train_config.mode != "fedsgd" or train_config.batch_size != 1:
        raise ValueError(f"a probe is one FedSGD step on one image, not mode={train_config.mode!r} "
                         f"batch-size={train_config.batch_size}")
    return RecordDict({ARRAYS: arrays, CONFIG: train_config.to_record(),
                       PROBE_RECORD: ConfigRecord({SAMPLE_INDEX: int(sample_index)})})


def read_probe_request(content: RecordDict) -> tuple[TrainConfig, int]:
    """``(train config, sample index)`` of a ``query.probe`` message's content (:func:`probe_request`).

    Raises:
        ValueError: a record is missing, or the train config is not FedSGD with B = 1.
    """
    for name in (ARRAYS, CONFIG, PROBE_RECORD):
        if name not in content:
            raise ValueError(f"a probe request needs the records {ARRAYS!r}, {CONFIG!r}, {PROBE_RECORD!r}; "
                             f"{name!r} is missing")
    tc = TrainConfig.from_record(content[CONFIG])
    if tc.mode != "fedsgd" or tc.batch_size != 1:
        raise ValueError(f"a probe is one FedSGD step on one image, not mode={tc.mode!r} batch-size={tc.batch_size}")
    return tc, int(content[PROBE_RECORD][SAMPLE_INDEX])


def train_reply(state: Mapping[str, Any] | ArrayRecord, metrics: Mapping[str, float | int], partition_id: int,
                sample_indices: list[int] | None) -> RecordDict:
    """The content of a train reply (see the module docstring); ``sample_indices=None`` sends no audit record.

    ``state`` is the outgoing model: an ``ArrayRecord``, used as it is, or what ``ArrayRecord(...)`` takes (a state
    dict of tensors, or key → ``Array``)."""
    content = RecordDict({
        ARRAYS: state if isinstance(state, ArrayRecord) else ArrayRecord(dict(state)),
        METRICS: MetricRecord(dict(metrics)),
        META: ConfigRecord({PARTITION_ID: int(partition_id)}),
    })
    if sample_indices is not None:
        content[AUDIT] = ConfigRecord({PARTITION_ID: int(partition_id), SAMPLE_INDICES: list(sample_indices)})
    return content


def reply_metrics(msg: Message) -> dict[str, Any]:
    """The single MetricRecord of a train reply, as a dict."""
    return dict(next(iter(msg.content.metric_records.values())))


def reply_partition(msg: Message) -> str:
    """The client's identity as the server knows it: the :data:`META` partition id, else the node id."""
    meta = msg.content.get(META) if META in msg.content else None
    if meta is not None and PARTITION_ID in meta:
        return str(meta[PARTITION_ID])
    return str(msg.metadata.src_node_id)


def reply_audit(msg: Message) -> Mapping[str, Any] | None:
    """The reply's audit record (for the evaluator only), or ``None``."""
    return msg.content[AUDIT] if AUDIT in msg.content else None
