"""Surviving faulty clients: node discovery, seeded client sampling, and reply validation.

The server never trusts a reply. :func:`check_reply` rejects, before aggregation and before the attacker sees it,
any train reply that is an error, lacks or adds arrays, has a wrong shape or dtype, holds NaN/Inf, or claims an
absurd ``num-examples``; the caller logs the reason in the round's ``failures``. A reply that does not arrive within
``round-timeout`` is logged the same way.

Client sampling is by *partition id*, not by Flower node id: node ids are random 64-bit integers that change with
every run, so FedAvg's ``random.sample`` over node ids gives a different set of clients for the same seed. The
server learns each node's partition id once, with a ``query.whoami`` message (:func:`discover_partitions`), and
draws the sampled partitions from a generator seeded by ``(seed, round)`` (:func:`sample_partitions`), which makes
sampling reproducible across runs and across a resume.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterable, Mapping
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from fl_sim.task.arrays import array_to_numpy
from fl_sim.task.contract import ARRAYS, META, NUM_EXAMPLES, NUM_PARTITIONS, PARTITION_ID, WHOAMI
from fl_sim.task.keys import ConfigError

#: Stream id mixed into the sampling seed (keeps it independent of the other seeded streams).
_SAMPLE_STREAM = 0x5A4D


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXC_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b[^:]*: *\S")


def short_reason(text: str, limit: int = 300) -> str:
    """One line for a client's error text: ANSI codes stripped, the first ``SomeError: message`` line if any.

    Flower's Ray backend wraps a ClientApp exception in several lines of Ray traceback; the metrics keep the
    line that names the original exception.
    """
    lines = [ln.strip() for ln in _ANSI.sub("", text).splitlines() if ln.strip()]
    line = next((ln for ln in lines if _EXC_LINE.match(ln)), lines[0] if lines else "")
    return line if len(line) <= limit else line[: limit - 1] + "…"


def check_reply(msg: Message, expected: Mapping[str, tuple[tuple[int, ...], str]], max_examples: int,
                arrays_key: str = ARRAYS, weight_key: str = NUM_EXAMPLES,
                metric_keys: Collection[str] | None = None) -> str | None:
    """Why a train reply must not be aggregated or attacked, or ``None`` if it is usable.

    Args:
        msg: the reply.
        expected: ``{key: (shape, dtype)}`` of the arrays sent (:func:`strategies.rounds.expected_arrays`).
        max_examples: the largest plausible ``num-examples`` (the training split's size).
        arrays_key: name of the reply's ArrayRecord.
        weight_key: the MetricRecord key FedAvg weights by.
        metric_keys: the exact keys the MetricRecord must hold (the standard metrics and the defense's declared
            ones; FedAvg refuses to average records with different keys), or ``None`` to skip this check.

    Returns:
        A one-line reason (error reply; missing or extra ArrayRecords, MetricRecords or array keys; wrong shape or
        dtype; undecodable or non-finite arrays; a ``num-examples`` that is not an integer in
        ``1..max_examples``), or ``None``.
    """
    if msg.has_error():
        return f"error reply (code {msg.error.code}): {short_reason(msg.error.reason)}"
    content: RecordDict = msg.content
    records = content.array_records
    if list(records) != [arrays_key]:
        return f"expected exactly one ArrayRecord {arrays_key!r}, got {sorted(records)}"
    metric_records = content.metric_records
    if len(metric_records) != 1:
        return f"expected exactly one MetricRecord, got {sorted(metric_records)}"
    rec = records[arrays_key]
    missing, extra = sorted(set(expected) - set(rec.keys())), sorted(set(rec.keys()) - set(expected))
    if missing:
        return f"missing arrays {missing}"
    if extra:
        return f"unexpected arrays {extra}"
    for key, (shape, dtype) in expected.items():
        arr = rec[key]
        if tuple(arr.shape) != shape:
            return f"array {key!r} has shape {tuple(arr.shape)}, expected {shape}"
        if str(arr.dtype) != dtype:
            return f"array {key!r} has dtype {arr.dtype}, expected {dtype}"
        try:
            values = array_to_numpy(arr, copy=False)  # arr.numpy()'s values, without np.load's header parse
        except Exception as exc:  # corrupt bytes, bad stype
            return f"array {key!r} cannot be decoded ({type(exc).__name__}: {exc})"
        if values.shape != shape:
            return f"array {key!r} decodes to shape {values.shape}, expected {shape}"
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            return f"array {key!r} holds {int((~np.isfinite(values)).sum())} non-finite values (NaN/Inf)"
    metrics = next(iter(metric_records.values()))
    if metric_keys is not None and set(metrics.keys()) != set(metric_keys):
        got, want = set(metrics.keys()), set(metric_keys)
        return (f"metrics {sorted(got - want)} not declared, {sorted(want - got)} missing" if got - want and want - got
                else f"metrics {sorted(got - want)} not declared" if got - want else f"metrics {sorted(want - got)} missing")
    n = metrics.get(weight_key)
    ok_number = isinstance(n, (int, float)) and not isinstance(n, bool) and math.isfinite(n) and n == int(n)
    if not ok_number or not 1 <= n <= max_examples:
        return f"{weight_key}={n!r} is absurd; it must be an integer in 1..{max_examples} (the training split's size)"
    return None


def sample_partitions(partitions: Iterable[int], num_clients: int, fraction: float, seed: int,
                      server_round: int) -> list[int]:
    """The partition ids sampled for training in ``server_round`` (sorted).

    ``max(1, int(num_clients · fraction))`` of the available ``partitions`` (all of them if fewer are available),
    drawn without replacement by a generator seeded with ``(seed, server_round)``: the same seed samples the same
    clients in every run, whatever their Flower node ids.
    """
    avail = sorted(set(partitions))
    k = max(1, int(num_clients * fraction))
    if k >= len(avail):
        return avail
    rng = np.random.default_rng([seed % 2**63, server_round, _SAMPLE_STREAM])
    return sorted(avail[i] for i in rng.choice(len(avail), size=k, replace=False))


def discover_partitions(grid: Grid, nodes: Iterable[int], num_partitions: int, timeout: float,
                        known: Mapping[int, int], strict: bool = True) -> tuple[dict[int, int], list[dict[str, Any]]]:
    """Ask ``nodes`` for their partition id (a ``query.whoami`` message each).

    Args:
        grid: Flower's Grid.
        nodes: node ids to ask.
        num_partitions: the run's ``num-supernodes``; every node must report this ``num-partitions``.
        timeout: seconds to wait for the answers.
        known: the mapping of the connected nodes learnt so far (node id → partition id), to detect duplicates.
        strict: a partition id that a connected node already has is an error (at the start of a run). Otherwise
            (later rounds: a SuperNode that restarted comes back with a new node id) the new node takes the
            partition over and a failure record says so.

    Returns:
        The new ``{node_id: partition_id}`` entries, and one failure record per node that did not answer (or, when
        not ``strict``, that was replaced).

    Raises:
        ConfigError: a node reports another ``num-partitions`` or a partition id outside ``0..num_partitions-1``,
            or, when ``strict``, a partition id that another node already has (misconfigured ``--node-config``).
    """
    nodes = list(nodes)
    if not nodes:
        return {}, []
    queries = [Message(RecordDict(), dst_node_id=n, message_type=WHOAMI) for n in nodes]
    replies = list(grid.send_and_receive(queries, timeout=timeout))
    found: dict[int, int] = {}
    failures: list[dict[str, Any]] = []
    taken = {p: n for n, p in known.items()}
    for msg in replies:
        node = msg.metadata.src_node_id
        if msg.has_error() or META not in msg.content:
            reason = short_reason(msg.error.reason) if msg.has_error() else "no 'meta' record"
            failures.append({"node": node, "partition_id": None, "reason": f"whoami failed: {reason}"})
            continue
        meta = msg.content[META]
        pid, nparts = int(meta[PARTITION_ID]), int(meta[NUM_PARTITIONS])
        if nparts != num_partitions or not 0 <= pid < num_partitions:
            raise ConfigError(
                f"SuperNode {node} has node-config partition-id={pid} num-partitions={nparts}, but "
                f"num-supernodes={num_partitions}; start SuperNode i with --node-config "
                f"'partition-id=i num-partitions={num_partitions}' (i in 0..{num_partitions - 1})"
            )
        if pid in taken and (strict or taken[pid] in found):
            raise ConfigError(
                f"SuperNodes {taken[pid]} and {node} both have node-config partition-id={pid}; "
                "every SuperNode needs its own partition-id"
            )
        if pid in taken:
            failures.append({"node": taken[pid], "partition_id": pid,
                             "reason": f"replaced by node {node} with the same partition-id (restarted?)"})
        taken[pid] = node
        found[node] = pid
    answered = {m.metadata.src_node_id for m in replies}
    for node in nodes:
        if node not in answered:
            failures.append({"node": node, "partition_id": None,
                             "reason": f"whoami: no reply within {timeout:g} s"})
    for f in failures:
        log(WARNING, "client %s left out: %s", f["node"], f["reason"])
    return found, failures
