"""The honest-but-curious FedAvg strategy: the one server side of every way fl-sim runs.

:class:`CuriousFedAvg` aggregates exactly like :class:`flwr.serverapp.strategy.FedAvg` — the example-weighted mean
of the client arrays — and handles each round's replies in one order, for ``fl-sim run``, ``flwr run``, deployment
and the one-shot audit alike (:meth:`CuriousFedAvg.aggregate_train`):

1. **receive and validate** — malformed, late or error replies are dropped and logged (:mod:`strategies.faults`);
2. **attack** — every ``attack-every`` rounds the victim's update goes to the attacker as an
   :class:`~attacker.payload.AttackPayload` cut to the attack's declared threat model
   (:meth:`~attacker.payload.AttackPayload.cut`), and the reconstruction is scored by the evaluator
   (:mod:`strategies.evaluator`), which alone reads the reply's audit record; with ``attack-target=probe`` (or
   ``both``) the server also asks the victim for the defended one-image gradient of one of its images
   (:meth:`CuriousFedAvg.run_probe`, a ``query.probe`` message) and attacks that — an audit of the worst case, never
   aggregated;
3. **aggregate** — FedAvg, then the defense's server step (:mod:`strategies.steps`) on the aggregate.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from logging import INFO, WARNING
from typing import Any, Protocol

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from attacker import AttackPayload
from attacker.payload import AttackError, images_in_update, split_update
from fl_sim.task.contract import (ARRAYS, AUDIT, CONFIG, META, METRICS, NUM_EXAMPLES, PARTITION_ID, PROBE,
                                  STANDARD_METRICS, TRAIN_LOSS, TRAIN_TIME, DEFENSE_TIME, SAMPLE_INDICES,
                                  TrainConfig, probe_request, probe_train_config, reply_audit, reply_metrics,
                                  reply_partition)
from fl_sim.task.config import resolve_device
from fl_sim.task.datasets import Dataset, on_device
from fl_sim.task.models import build_model, evaluate
from strategies.config import AGGREGATE, ServerSpec
from strategies.evaluator import chance_reference, probe_index, score_reconstruction, union_audit
from strategies.faults import check_reply, discover_partitions, sample_partitions
from strategies.metrics import chance_note
from strategies.rounds import SentRound, cast_like, fedavg_arrays, sent_round


#: The aggregate's META entry holding the union's batch size (see :meth:`CuriousFedAvg.aggregate_reply`).
AGGREGATE_BATCH = "aggregate-batch-size"


class Recorder(Protocol):
    """Where the strategy writes what it observes (the roof's run-directory writer implements it).

    ``log_round`` and ``save_attack_figure`` are required. The strategy calls the others only on recorders that
    have them (:data:`OPTIONAL_RECORDER_METHODS`), so a minimal recorder (the audit's, a test's) need not.
    """

    def log_round(self, record: dict[str, Any]) -> None:
        """Keep one round's record."""

    def save_attack_figure(self, server_round: int, truth: np.ndarray, reconstruction: np.ndarray, title: str,
                           labels: list[int] | None = None, true_labels: list[int] | None = None,
                           suffix: str = "") -> str:
        """Save truth above reconstruction; return where (relative to the run directory). ``suffix`` tells a probe's
        figure from the update's of the same round (``"-probe"``; the strategy passes it only for the probe)."""

    def save_intercepted(self, server_round: int, client: str, payload: AttackPayload, target: str = "update") -> str:
        """Keep the server's full view of the attacked update (before the cut to the attack's threat model, never
        the audit record); return where (relative to the run directory)."""

    def save_attack_arrays(self, server_round: int, attack: str, arrays: dict[str, np.ndarray],
                           target: str = "update") -> None:
        """Keep an attack's raw results (the evaluator's ``arrays``: reconstruction and truth in [0, 1], labels,
        the matching used for scoring)."""

    def log_attack_progress(self, server_round: int, attack: str, trace: list[tuple[int, float]],
                            target: str = "update") -> None:
        """Keep an attack's objective against iteration, as its ``Budget.progress`` reported it."""


#: Recorder methods the strategy calls only when the recorder has them.
OPTIONAL_RECORDER_METHODS = ("save_intercepted", "save_attack_arrays", "log_attack_progress")


class CuriousFedAvg(FedAvg):
    """FedAvg that hands the victim's update to the attacker before aggregating (see the module docstring).

    Args:
        spec: the server's view of the run config (server keys, task, attack plan, the defense's public side).
        data: the run's dataset (the server holds the test split for central evaluation; the evaluator reads the
            training split to rebuild a victim's true batch).
        recorder: where rounds and attack figures go.
        on_round: optional callback ``(round_record)`` after each round (progress bars).
        stop: optional callable returning True when the run must stop (raises ``KeyboardInterrupt`` between rounds).
    """

    def __init__(self, spec: ServerSpec, data: Dataset, recorder: Recorder,
                 on_round: Callable[[dict[str, Any]], None] | None = None,
                 stop: Callable[[], bool] | None = None):
        server = spec.server
        flwr_log = logging.getLogger("flwr")
        level = flwr_log.level
        flwr_log.setLevel(logging.ERROR)  # FedAvg warns on every start that fraction_evaluate=0 skips evaluation
        try:
            super().__init__(
                fraction_train=server.fraction_train,
                fraction_evaluate=server.fraction_evaluate,
                min_train_nodes=1,
                min_evaluate_nodes=1 if server.fraction_evaluate > 0 else 0,
                min_available_nodes=1,  # run_server waits for all n at the start; never wait for a lost node
            )
        finally:
            flwr_log.setLevel(level)
        self.spec = spec
        self.data = data
        self.recorder = recorder
        self.on_round = on_round
        self.stop = stop or (lambda: False)
        self.rng = random.Random(spec.task.seed)
        #: Where central evaluation runs (the ``device`` key) and where the attacks run (``attack-device``, else
        #: ``device``), resolved on the server's machine (ConfigError when CUDA is asked for and absent).
        self.device = spec.task.torch_device()
        self.attack_device = (resolve_device(spec.attack.device, "attack-device") if spec.attack.device
                              else self.device)
        self.eval_model = build_model(spec.task.model, data.input_shape, data.num_classes).to(self.device)
        self.parameter_names = [n for n, _ in self.eval_model.named_parameters()]
        self._sent: SentRound | None = None
        #: the chance-level reconstruction (``(C, H, W)`` in [0, 1]); None = the training split's mean image, computed
        #: at the first scored attack (the one-shot audit sets it: its training split is the audited images alone)
        self.chance_image: np.ndarray | None = None
        self._grid: Grid | None = None  # the Grid of the current round (the probe is a message); None in the audit
        self.partition_of: dict[int, int] = {}  # Flower node id -> partition id (learnt by query.whoami)
        self.excluded: set[int] = set()  # nodes that did not answer query.whoami or were replaced (never sampled)
        self._online: frozenset[int] | None = None  # the connected nodes when partition_of was last brought up to date
        self._node_of: dict[int, int] = {}  # partition id -> node id among them
        self._record: dict[str, Any] = {}
        self._t0 = 0.0
        self.num_rounds = server.num_server_rounds

    @property
    def last_record(self) -> dict[str, Any]:
        """The record of the current (or last) round, as ``metrics.jsonl`` gets it."""
        return self._record

    # -- rounds ------------------------------------------------------------------------------------------------
    def new_record(self, server_round: int) -> dict[str, Any]:
        """Start the record of ``server_round`` (what ``metrics.jsonl`` gets for it) and its clock."""
        self._record = {"round": server_round, "lr": self.spec.server.lr_at(self.spec.task.lr, server_round),
                        "sampled": 0, "clients": [], "failures": [], "attacks": []}
        self._t0 = time.perf_counter()
        return self._record

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Send the global arrays with this round's train config to the sampled clients, remembering both.

        Clients are sampled by partition id (:func:`strategies.faults.sample_partitions`: ``fraction-train`` of
        ``num-supernodes``, seeded by ``(seed, round)``), among the connected nodes whose partition id is known;
        nodes seen for the first time are asked for it (:func:`strategies.faults.discover_partitions`, waiting
        up to ``node-timeout``; a node that does not answer is never sampled). Unlike FedAvg's sampling, this never
        waits for nodes that have gone away.
        """
        if self.stop():
            raise KeyboardInterrupt("stop requested")
        record = self.new_record(server_round)
        self._grid = grid
        task, server = self.spec.task, self.spec.server
        online = frozenset(grid.get_node_ids())
        if online != self._online:  # nodes came or went (or the first round): ask the new ones, remap
            connected = sorted(online)
            new = [n for n in connected if n not in self.partition_of and n not in self.excluded]
            found, failures = discover_partitions(grid, new, task.num_supernodes, server.node_timeout,
                                                  {n: p for n, p in self.partition_of.items() if n in online},
                                                  strict=not self.partition_of)
            taken = set(found.values())
            self.partition_of = {n: p for n, p in self.partition_of.items() if p not in taken} | found
            self.excluded.update(f["node"] for f in failures)  # silent or replaced: never asked again
            record["failures"].extend(failures)
            self._online = online
            self._node_of = {p: n for n, p in self.partition_of.items() if n in online}
        # else every connected node is already in partition_of or excluded (a node asked last time either answered
        # or is excluded, and so is a replaced one), so nothing would be asked and the mapping is the same
        self._t0 = time.perf_counter()  # the round's clock starts after the one-off node discovery
        node_of = self._node_of
        chosen = sample_partitions(node_of, task.num_supernodes, server.fraction_train, task.seed,
                                   server_round) if node_of else []
        train_config = task.train_config(record["lr"], server_round)
        nodes = {node_of[p]: p for p in chosen}
        content = RecordDict({ARRAYS: arrays, CONFIG: train_config.to_record()})
        messages = list(self._construct_messages(content, list(nodes), MessageType.TRAIN))
        self.begin_round(server_round, arrays, train_config, nodes, messages)
        return messages

    def begin_round(self, server_round: int, arrays: ArrayRecord, train_config: TrainConfig,
                    nodes: dict[int, int], messages: list[Message] | None = None) -> SentRound:
        """Remember what ``server_round`` sends: ``arrays`` and ``train_config`` to ``nodes`` (node id → partition
        id), in ``messages``.

        The audit calls this directly (no Grid, no messages, no sampling); :meth:`configure_train` after sampling.
        """
        if self._record.get("round") != server_round:
            self.new_record(server_round)
        self._sent = sent_round(server_round, arrays, train_config, nodes, messages)
        self._record["sampled"] = len(nodes)
        return self._sent

    def usable_replies(self, server_round: int, replies: list[Message]) -> list[Message]:
        """Replies fit for the attacker and for aggregation, sorted by partition id (a fixed summation order).

        Every other reply (:func:`strategies.faults.check_reply`), and every sampled client that did not reply
        within ``round-timeout``, is logged in the round's ``failures`` with its reason. When fewer than
        ``min-replies`` replies are usable, none is returned: the round keeps the previous global model and its
        record says why in ``skipped``.
        """
        sent = self._sent.nodes
        max_examples = len(self.data.y_train)
        ok, replied = [], set()
        # a reply's sender is its reply_to message's destination (Flower's own error replies, e.g. "Node
        # Unavailable", come from the SuperLink)
        dst = {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent.messages if m.metadata.message_id}
        first = len(self._record["failures"])
        for msg in replies:
            node = dst.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
            replied.add(node)
            reason = check_reply(msg, self._sent.expected, max_examples, self.arrayrecord_key, self.weighted_by_key,
                                 (*STANDARD_METRICS, *self.spec.defense.metrics))
            if reason is None and node in sent and reply_partition(msg) != str(sent[node]):
                reason = f"reply claims partition {reply_partition(msg)}, but the node holds partition {sent[node]}"
            if reason is None:
                ok.append(msg)
            else:
                self._record["failures"].append({"node": node, "partition_id": sent.get(node), "reason": reason})
        timeout = self.spec.server.round_timeout
        for node, pid in sent.items():
            if node not in replied:
                self._record["failures"].append(
                    {"node": node, "partition_id": pid, "reason": f"no reply within round-timeout={timeout:g} s"})
        for f in self._record["failures"][first:]:
            log(WARNING, "round %s: reply of client %s dropped: %s", server_round,
                f["partition_id"] if f["partition_id"] is not None else f["node"], f["reason"])
        ok.sort(key=lambda m: (sent.get(dst.get(m.metadata.reply_to_message_id, m.metadata.src_node_id), math.inf),
                               m.metadata.src_node_id))
        need = self.spec.server.min_replies
        if len(ok) < need:
            self._record["skipped"] = f"{len(ok)} usable replies < min-replies={need}; global model unchanged"
            log(WARNING, "round %s skipped: %s", server_round, self._record["skipped"])
            return []
        return ok

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate the replies, attack the victim if this is an attack round (its update, the probe or both:
        ``attack-target``), then aggregate (FedAvg and the defense's server step).

        The attacks' time, the probe's round trip included, is recorded as ``attack_time_s`` and left out of
        ``round_time_s``."""
        ok = self.usable_replies(server_round, list(replies))
        for msg in ok:
            m = reply_metrics(msg)
            self._record["clients"].append({
                "partition_id": reply_partition(msg),
                "num_examples": m.get(NUM_EXAMPLES),
                "train_loss": m.get(TRAIN_LOSS),
                "train_time_s": m.get(TRAIN_TIME),
                "defense_time_s": m.get(DEFENSE_TIME),
                **{k.replace("-", "_"): v for k, v in m.items() if k not in STANDARD_METRICS},
            })
        attack_s = 0.0
        if self.spec.server.attacks_in(server_round) and ok:
            victim = self.pick_victim(ok)
            if victim is not None:
                t = time.perf_counter()
                for target in self.spec.server.targets:
                    run = self.run_attack if target == "update" else self.run_probe
                    self._record["attacks"].append(run(server_round, victim))
                attack_s = time.perf_counter() - t
        arrays, metrics = self._fedavg(ok)
        if arrays is not None:
            arrays = cast_like(arrays, self._sent.state)
        if arrays is not None and self.spec.step is not None:
            arrays = self.spec.step(arrays, ok, self._sent, self.spec.defense.params)
        self._record["round_time_s"] = time.perf_counter() - self._t0 - attack_s
        self._record["attack_time_s"] = attack_s
        return arrays, metrics

    def _fedavg(self, replies: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower 1.42's ``FedAvg.aggregate_train``: its reply checks (``_check_and_log_replies``, a private
        method of the pinned flwr), then the arrays' weighted mean by :func:`strategies.rounds.fedavg_arrays` (the
        same bytes as Flower's ``aggregate_arrayrecords``, decoded faster) and its metrics aggregation."""
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        contents = [msg.content for msg in valid]
        return (fedavg_arrays(contents, self.weighted_by_key),
                self.train_metrics_aggr_fn(contents, self.weighted_by_key))

    # -- the attacker ------------------------------------------------------------------------------------------
    def pick_victim(self, replies: list[Message]) -> Message | None:
        """The reply of the ``victim`` partition (None if it was not sampled), a random reply, or for
        ``victim=aggregate`` the round's aggregate as one reply (:meth:`aggregate_reply`)."""
        victim = self.spec.server.victim
        if victim == "random":
            return self.rng.choice(replies)
        if victim == AGGREGATE:
            return self.aggregate_reply(replies)
        return next((m for m in replies if reply_partition(m) == victim), None)

    def aggregate_reply(self, replies: list[Message]) -> Message:
        """The round's FedAvg aggregate as the reply of one virtual client: all a server sees under secure
        aggregation (Bonawitz et al., CCS'17).

        Its arrays are the example-weighted mean of the replies' arrays — exactly what FedAvg computes in
        :meth:`aggregate_train` — so its update is ``Σ_i (n_i / N) Δ_i``; its ``num-examples`` is ``N = Σ_i n_i``;
        its partition id is ``"aggregate"``. Its train config (:meth:`payload`) is the round's, with the batch size
        of the union of the clients' batches at each local step, ``Σ_i min(B, n_i)``: a FedSGD aggregate is exactly
        one gradient step on that union, and a multi-step aggregate is one to first order in the learning rate (each
        client's trajectory differs from the union's only at second order). Its audit record, which only the
        evaluator reads, names the union of the replies' samples (:func:`strategies.evaluator.union_audit`);
        there is none unless every reply has one.
        """
        arrays = cast_like(fedavg_arrays([m.content for m in replies], self.weighted_by_key), self._sent.state)
        sizes = [int(reply_metrics(m)[NUM_EXAMPLES]) for m in replies]
        batch = sum(min(int(self._sent.train_config.batch_size), n) for n in sizes)
        content = RecordDict({
            ARRAYS: arrays,
            METRICS: MetricRecord({NUM_EXAMPLES: sum(sizes)}),
            META: ConfigRecord({PARTITION_ID: AGGREGATE, "clients": len(replies), AGGREGATE_BATCH: batch}),
        })
        audits = [reply_audit(m) for m in replies]
        if all(a is not None for a in audits):
            content[AUDIT] = ConfigRecord(union_audit(audits))
        first = replies[0].metadata
        md = Metadata(run_id=first.run_id, message_id="", src_node_id=0, dst_node_id=0, reply_to_message_id="",
                      group_id=first.group_id, created_at=time.time(), ttl=first.ttl, message_type=first.message_type)
        return Message(content=content, metadata=md)

    def payload(self, msg: Message, train_config: TrainConfig | None = None) -> AttackPayload:
        """Everything a curious server holds about this reply (no audit record, nothing client-private), before it
        is cut to an attack's threat model; ``train_config`` is what the server sent for it (default: the round's
        train config; a probe's is :func:`fl_sim.task.contract.probe_train_config`)."""
        sent = self._sent.state
        update, buffers = split_update(sent, msg.content[self.arrayrecord_key].to_torch_state_dict(),
                                       self.parameter_names)
        return AttackPayload(
            model_name=self.spec.task.model,
            input_shape=self.data.input_shape,
            num_classes=self.data.num_classes,
            mean=self.data.mean,
            std=self.data.std,
            global_state={k: v.clone() for k, v in sent.items()},
            update=update,
            num_examples=int(reply_metrics(msg)[NUM_EXAMPLES]),
            train_config=self._train_config_of(msg) if train_config is None else train_config,
            buffers=buffers,
            defense=self.spec.defense,
        )

    def _train_config_of(self, msg: Message) -> TrainConfig:
        """The train config behind ``msg``: the round's, with the union's batch size for the aggregate."""
        meta = msg.content[META] if META in msg.content else None
        if reply_partition(msg) == AGGREGATE and meta is not None and AGGREGATE_BATCH in meta:
            return replace(self._sent.train_config, batch_size=int(meta[AGGREGATE_BATCH]))
        return self._sent.train_config

    def attack_payload(self, msg: Message, train_config: TrainConfig | None = None) -> AttackPayload:
        """The payload the configured attack receives: :meth:`payload` cut to its threat model."""
        plan = self.spec.attack
        return self.payload(msg, train_config).cut(plan.attack.threat_for(plan.options))

    def run_attack(self, server_round: int, msg: Message, target: str = "update",
                   train_config: TrainConfig | None = None) -> dict[str, Any]:
        """Run the configured attack on ``msg``'s update, score it with the evaluator, save the figure.

        Args:
            server_round: the round.
            msg: a usable reply: the victim's train reply (``target="update"``), the round's aggregate
                (:meth:`aggregate_reply`) or the victim's probe reply (``"probe"``).
            target: recorded as the record's ``target``; a probe's figure is ``attacks/round_NNNN-probe.png``.
            train_config: what the server sent for ``msg`` (default: the round's train config; the aggregate's has
                the union's batch size).

        Returns:
            The attack record: ``round``, ``client``, ``attack``, ``target``, ``time_s``, ``num_images`` (the images
            the update holds, which the attack reconstructs), ``iterations``, ``objective`` and the attack's extras;
            when the reply has an audit record also ``psnr``, ``ssim``, ``mse``, ``label_accuracy``, their chance
            levels ``psnr_chance``, ``ssim_chance``, ``mse_chance``, ``labels``, ``true_labels`` and ``image``. An
            attack that raises one of the failures it may declare (:class:`attacker.payload.AttackError`: not
            applicable, budget exhausted) gives a record with ``error`` (``"Type: message"``) and ``error_type``
            instead of scores, and the run goes on (the summary counts it); any other exception propagates and stops
            the run. When the defense draws the batches itself (:attr:`attacker.payload.DefenseInfo.own_batches`,
            e.g. dp-sgd's Poisson batches) and the update holds another number of images than the attack
            reconstructed (an empty batch included), the record has ``num_images`` (the true count) and
            ``unscored`` (why) instead of scores: Hungarian matching is defined only between sets of equal size, and
            neither padding nor a best-of subset would be an honest score. With ``attack-target=both`` an update
            that holds another number of images than the attack reconstructs (e.g. a one-epoch FedAvg update
            against iDLG) is not attacked: its record has ``unscored`` (why), and the probe is attacked as usual.

        Raises:
            ValueError: the attack would reconstruct another number of images than the update holds (refused before
                a run starts by :func:`fl_sim.config.check_attack_images`; here for runs started without it), or
                the evaluator's refusal of a reconstruction of the wrong size.
        """
        plan = self.spec.attack
        client = reply_partition(msg)
        num_examples = int(reply_metrics(msg)[NUM_EXAMPLES])
        if train_config is None:
            train_config = self._train_config_of(msg)  # the aggregate's batch is the union of the clients' batches
        holds = images_in_update(train_config, num_examples)
        task = replace(self.spec.task, batch_size=train_config.batch_size)
        if target == "probe":  # the probe is one FedSGD step on one image, whatever the run's protocol
            task = replace(task, mode="fedsgd", batch_size=1)
        wants = plan.attack.images(task, num_examples)
        base = {"round": server_round, "client": client, "attack": plan.name, "target": target}
        if wants != holds:
            why = (f"attack={plan.name!r} reconstructs {wants} image(s) but the update of client {client} holds "
                   f"{holds} (mode={train_config.mode!r}); an attack must reconstruct as many images as the update "
                   "holds")
            if target == "update" and "probe" in self.spec.server.targets:
                log(INFO, "attack round %s client %s (update) not run: %s", server_round, client, why)
                return {**base, "time_s": 0.0, "num_images": holds, "unscored": f"not attacked: {why}"}
            raise ValueError(why)
        self._recorder_call("save_intercepted", server_round, client, self.payload(msg, train_config), target)
        payload = self.attack_payload(msg, train_config)
        budget = plan.budget_for(self.spec.task.seed, server_round, self.attack_device)
        trace: list[tuple[int, float]] = []
        budget.progress = lambda it, value: trace.append((int(it), float(value)))
        t0 = time.perf_counter()
        try:
            result = plan.attack.run(payload, budget, plan.options)
        except AttackError as exc:  # a failure the attack declares: counted, the run goes on
            log(WARNING, "attack round %s client %s (%s) failed: %s: %s", server_round, client, target,
                type(exc).__name__, exc)
            self._recorder_call("log_attack_progress", server_round, plan.name, trace, target)
            return {**base, "num_images": holds, "time_s": time.perf_counter() - t0,
                    "error": f"{type(exc).__name__}: {exc}", "error_type": type(exc).__name__}
        self._recorder_call("log_attack_progress", server_round, plan.name, trace, target)
        record: dict[str, Any] = {**base,
                                  "time_s": result.time_s, "iterations": result.iterations,
                                  "objective": result.objective, **result.extras, "num_images": holds}
        audit = reply_audit(msg)
        used = len(set(int(i) for i in audit[SAMPLE_INDICES])) if audit is not None else holds
        if used != holds and self.spec.defense.own_batches:
            # the defense drew the batch itself (e.g. a Poisson batch of dp-sgd): its size is the client's secret and
            # differs from what the attack reconstructed; scores are only defined between sets of equal size
            record["num_images"], audit = used, None
            record["unscored"] = (f"the update holds {used} images (drawn by defense={self.spec.defense.name!r}) "
                                  f"and the attack reconstructed {holds}")
        if audit is not None:
            if self.chance_image is None:
                self.chance_image = chance_reference(self.data)
            scores = score_reconstruction(self.data, result, audit, self.chance_image)
            truth, rec = scores.pop("truth"), scores.pop("reconstruction")
            labels, true_labels = scores.pop("labels"), scores.pop("true_labels")
            self._recorder_call("save_attack_arrays", server_round, plan.name, scores.pop("arrays"), target)
            record.update(scores)
            record["labels"], record["true_labels"], record["num_images"] = labels, true_labels, len(truth)
            note = chance_note(scores)
            below = f" ({note})" if note else ""
            title = (f"round {server_round}, client {client}, {plan.name}"
                     f"{' on the probe (one image, B = 1)' if target == 'probe' else ''}: "
                     f"PSNR {scores['psnr']:.1f} dB, SSIM {scores['ssim']:.3f} (chance "
                     f"{scores['psnr_chance']:.1f} dB, {scores['ssim_chance']:.3f}){below}")
            suffix = {} if target == "update" else {"suffix": f"-{target}"}  # recorders without it: update only
            record["image"] = self.recorder.save_attack_figure(server_round, truth, rec, title, labels, true_labels,
                                                               **suffix)
        log(INFO, "attack round %s client %s (%s): %s", server_round, client, target,
            {k: record.get(k) for k in ("psnr", "psnr_chance", "ssim", "ssim_chance", "label_accuracy", "time_s")})
        return record

    def run_probe(self, server_round: int, victim: Message) -> dict[str, Any]:
        """The ``probe`` target: ask the victim for its defended gradient of one image, attack and score that.

        The evaluator picks the image (:func:`strategies.evaluator.probe_index`: the first one the victim's reply
        names in its audit record); the strategy sends the victim's node a ``query.probe`` message
        (:func:`fl_sim.task.contract.probe_request`: the round's global arrays, FedSGD with B = 1 at this round's
        lr, the image's index) through the round's Grid and waits up to ``round-timeout``. The reply is validated
        like a train reply (:func:`strategies.faults.check_reply`) and attacked with the probe's train config
        (:meth:`run_attack`). It is an audit of the worst case a client sending one image's gradient would face
        (the GradDefense talk's protocol): it is never aggregated, and the client answers it on a copy of its
        state.

        Returns:
            The attack record (``target="probe"``, plus ``probe_time_s``: the round trip), or a record with
            ``error`` when there is no image to probe, no Grid (the one-shot audit), or no usable reply.
        """
        plan = self.spec.attack
        client = reply_partition(victim)
        base = {"round": server_round, "client": client, "attack": plan.name, "target": "probe", "time_s": 0.0}
        index = probe_index(reply_audit(victim))
        node = next((n for n, p in self._sent.nodes.items() if str(p) == client), None)
        if index is None or self._grid is None or node is None:
            why = ("the victim's reply names no image in its audit record" if index is None else
                   "no Grid to send the query.probe message (the one-shot audit has none)" if self._grid is None
                   else f"client {client} has no node this round")
            log(WARNING, "probe round %s client %s not run: %s", server_round, client, why)
            return {**base, "error": f"probe not run: {why}"}
        tc = probe_train_config(self._sent.train_config.lr, server_round)
        content = probe_request(ArrayRecord({k: v.clone() for k, v in self._sent.state.items()}), tc, index)
        t0 = time.perf_counter()
        replies = list(self._grid.send_and_receive([Message(content, dst_node_id=node, message_type=PROBE)],
                                                   timeout=self.spec.server.round_timeout))
        probe_s = time.perf_counter() - t0
        reply = replies[0] if replies else None
        if reply is None:
            reason = f"no reply within round-timeout={self.spec.server.round_timeout:g} s"
        else:
            reason = check_reply(reply, self._sent.expected, len(self.data.y_train), self.arrayrecord_key,
                                 self.weighted_by_key, (*STANDARD_METRICS, *self.spec.defense.metrics))
            if reason is None and reply_partition(reply) != client:
                reason = f"reply claims partition {reply_partition(reply)}, but the probe went to client {client}"
        if reason is not None:
            log(WARNING, "probe round %s client %s failed: %s", server_round, client, reason)
            return {**base, "probe_time_s": probe_s, "error": f"probe failed: {reason}"}
        record = self.run_attack(server_round, reply, target="probe", train_config=tc)
        record["probe_time_s"] = probe_s
        return record

    # -- central evaluation, end of round ------------------------------------------------------------------------
    def evaluate_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Central evaluation on the test split (every ``eval-every`` rounds and the last), then log the round."""
        if server_round == 0:
            return None
        record = self._record
        metrics = None
        if server_round % self.spec.server.eval_every == 0 or server_round == self.num_rounds:
            self.eval_model.load_state_dict(arrays.to_torch_state_dict())
            x_test, y_test = on_device(self.data, "test", self.device)  # copied to the device once per process
            loss, acc = evaluate(self.eval_model, x_test, y_test, self.data.mean, self.data.std, self.device)
            record["accuracy"], record["loss"] = acc, loss
            metrics = MetricRecord({"accuracy": acc, "loss": loss})
        else:
            record["accuracy"], record["loss"] = None, None
        self.recorder.log_round(record)
        if self.on_round is not None:
            self.on_round(record)
        return metrics

    # -- the recorder's optional methods -------------------------------------------------------------------------
    def _recorder_call(self, name: str, *args: Any) -> Any:
        """Call the recorder's optional method ``name`` (:data:`OPTIONAL_RECORDER_METHODS`) if it has one."""
        method = getattr(self.recorder, name, None)
        return method(*args) if method is not None else None
