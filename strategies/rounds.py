"""What the server sent in a round, as the strategy, its server steps and the attacker's payload see it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, RecordDict

from fl_sim.task.arrays import array_to_numpy, numpy_to_array, to_array_record, to_state_dict
from fl_sim.task.contract import TrainConfig


@dataclass
class SentRound:
    """The server's own record of one round's train messages.

    Attributes:
        round: the server round (1-based).
        state: the global state dict it sent (cloned tensors).
        expected: ``{key: (shape, dtype)}`` of the arrays sent; replies must match it exactly.
        train_config: the train config it sent.
        nodes: ``{node id: partition id}`` of the sampled clients.
        messages: the messages sent (the Grid gives them their message ids when it sends them).
    """

    round: int
    state: dict[str, torch.Tensor]
    expected: dict[str, tuple[tuple[int, ...], str]]
    train_config: TrainConfig
    nodes: dict[int, int] = field(default_factory=dict)
    messages: list[Message] = field(default_factory=list)


def expected_arrays(arrays: ArrayRecord) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{key: (shape, dtype)}`` of the global arrays the server sends; replies must match it exactly."""
    return {k: (tuple(a.shape), str(a.dtype)) for k, a in arrays.items()}


def sent_round(server_round: int, arrays: ArrayRecord, train_config: TrainConfig,
               nodes: Mapping[int, int] | None = None, messages: list[Message] | None = None) -> SentRound:
    """A :class:`SentRound` for ``arrays`` sent with ``train_config`` to ``nodes``."""
    return SentRound(server_round, dict(to_state_dict(arrays)),  # fresh tensors, as to_torch_state_dict's
                     expected_arrays(arrays), train_config, dict(nodes or {}), list(messages or []))


def fedavg_arrays(records: list[RecordDict], weighting_metric_name: str) -> ArrayRecord:
    """The example-weighted mean of the replies' arrays: Flower 1.42's ``aggregate_arrayrecords``, bit for bit.

    The same arithmetic in the same order — weight factors ``w_i / Σ w`` from each reply's (only) MetricRecord,
    ``a_1 · f_1`` then ``+= a_i · f_i`` in NumPy, per array key — but each reply array is decoded by
    :func:`fl_sim.task.arrays.array_to_numpy` (its ``.npy`` header parsed once per distinct header) instead of
    ``Array.numpy``'s ``np.load``, which parses every header with ``ast.literal_eval`` (about half of the
    server's aggregation time with LeNet and 10 clients, docs/performance.md). ``tests/test_strategy.py`` compares
    the bytes of every array with Flower's function.

    Args:
        records: the replies' contents, already checked for consistency (one ArrayRecord, one MetricRecord with
            ``weighting_metric_name``, the same array keys).
        weighting_metric_name: the metric holding each reply's weight (``num-examples``).

    Returns:
        An ArrayRecord of NumPy arrays (float64 for integer inputs, as Flower's).
    """
    weights = [next(iter(record.metric_records.values()))[weighting_metric_name] for record in records]
    total = sum(weights)
    factors = [w / total for w in weights]
    out: dict[str, np.ndarray] = {}
    for record, factor in zip(records, factors, strict=True):
        for item in record.array_records.values():
            for key, value in item.items():
                if key not in out:
                    out[key] = array_to_numpy(value, copy=False) * factor
                else:
                    out[key] += array_to_numpy(value, copy=False) * factor
    record = ArrayRecord()  # Array(v)'s np.save bytes, without np.save per array (fl_sim.task.arrays)
    for k, v in out.items():
        record[k] = numpy_to_array(np.asarray(v))
    return record


def cast_like(arrays: ArrayRecord, reference: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Give the aggregate the dtypes of the global model the server sent.

    Flower's FedAvg averages every array in floating point, so an integer buffer (BatchNorm's
    ``num_batches_tracked``, ``int64``) would come back as ``float64`` and every later reply — which carries the
    client's ``int64`` buffer — would fail the dtype check. Integer arrays are rounded, floating ones cast.
    """
    state = to_state_dict(arrays)  # to_torch_state_dict's tensors and ArrayRecord(out)'s bytes, converted faster
    out: dict[str, Any] = {}
    for k, v in state.items():
        ref = reference.get(k)
        if ref is None or v.dtype == ref.dtype:
            out[k] = v
        else:
            out[k] = (v if ref.is_floating_point() else v.round()).to(ref.dtype)
    return to_array_record(out)
