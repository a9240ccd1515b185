"""The honest-but-curious FedAvg strategy.

:class:`CuriousFedAvg` aggregates exactly like :class:`flwr.serverapp.strategy.FedAvg` — the example-weighted mean
of the client arrays — but every ``attack-every`` rounds it first hands one client's update to the attacker, as a
curious server would. What the attacker gets is an :class:`~attacker.payload.AttackPayload`: the arrays the server
sent, the arrays the client returned, the client's ``num-examples`` and the train config the server itself sent.
The reply's ``audit`` record (the true sample indices) goes to the evaluator only.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from attacker import ATTACKS, AttackOptions, AttackPayload, Budget
from fl_sim.data import Dataset
from fl_sim.evaluator import score_reconstruction
from fl_sim.fedkl_models import private_state_keys
from fl_sim.models import build_model, evaluate
from fl_sim.results import RunRecorder
from strategies.compensation import SERVER_STEPS
from strategies.faults import check_reply, discover_partitions, expected_arrays, sample_partitions


#: Reply metrics that defenses add (public diagnostics such as the DP budget), copied into each client's record.
DEFENSE_METRIC_PREFIXES = ("dp-", "soteria-", "graddefense-")


def lr_at(cfg: Mapping[str, Any], server_round: int) -> float:
    """The client learning rate the server sends in ``server_round`` (1-based).

    ``constant``: ``lr``. ``cosine``: ``lr · ½(1 + cos(π (r − 1) / R))`` with R = ``num-server-rounds``.
    """
    lr = float(cfg["lr"])
    if cfg["lr-schedule"] == "cosine":
        total = int(cfg["num-server-rounds"])
        return lr * 0.5 * (1.0 + math.cos(math.pi * (server_round - 1) / total))
    return lr


def train_config(cfg: Mapping[str, Any]) -> ConfigRecord:
    """The train config the server sends every round (``lr`` is replaced per round by :func:`lr_at`)."""
    return ConfigRecord({
        "mode": str(cfg["mode"]),
        "lr": float(cfg["lr"]),
        "batch-size": int(cfg["batch-size"]),
        "local-steps": int(cfg["local-steps"]),
        "local-epochs": int(cfg["local-epochs"]),
    })


def cast_like(arrays: ArrayRecord, reference: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Give the aggregate the dtypes of the global model the server sent.

    Flower's FedAvg averages every array in floating point, so an integer buffer (BatchNorm's
    ``num_batches_tracked``, ``int64``) would come back as ``float64`` and every later reply — which carries the
    client's ``int64`` buffer — would fail the dtype check. Integer arrays are rounded, floating ones cast.
    """
    state = arrays.to_torch_state_dict()
    out = {}
    for k, v in state.items():
        ref = reference.get(k)
        if ref is None or v.dtype == ref.dtype:
            out[k] = v
        else:
            out[k] = (v if ref.is_floating_point() else v.round()).to(ref.dtype)
    return ArrayRecord(out)


def reply_metrics(msg: Message) -> dict[str, Any]:
    """The single MetricRecord of a train reply, as a dict."""
    return dict(next(iter(msg.content.metric_records.values())))


def reply_partition(msg: Message) -> str:
    """The client's identity as the server knows it: the ``meta`` partition id, else the node id."""
    meta = msg.content.get("meta") if "meta" in msg.content else None
    return str(meta["partition-id"]) if meta is not None and "partition-id" in meta else str(msg.metadata.src_node_id)


class CuriousFedAvg(FedAvg):
    """FedAvg that inverts the victim's update before aggregating (see the module docstring).

    Args:
        cfg: the resolved run config.
        data: the run's dataset (the server holds the test split for central evaluation; the evaluator reads the
            training split to rebuild a victim's true batch).
        recorder: the run directory writer.
        on_round: optional callback ``(round_record)`` after each round (progress bars).
        stop: optional callable returning True when the run must stop (raises ``KeyboardInterrupt`` between rounds).
    """

    def __init__(self, cfg: Mapping[str, Any], data: Dataset, recorder: RunRecorder,
                 on_round: Callable[[dict[str, Any]], None] | None = None,
                 stop: Callable[[], bool] | None = None):
        super().__init__(
            fraction_train=float(cfg["fraction-train"]),
            fraction_evaluate=float(cfg["fraction-evaluate"]),
            min_train_nodes=1,
            min_evaluate_nodes=1 if float(cfg["fraction-evaluate"]) > 0 else 0,
            min_available_nodes=1,  # run_server waits for all n at the start; never wait for a lost node
        )
        self.cfg = dict(cfg)
        self.data = data
        self.recorder = recorder
        self.on_round = on_round
        self.stop = stop or (lambda: False)
        self.attack = ATTACKS[str(cfg["attack"])]
        self.server_step = SERVER_STEPS.get(str(cfg["defense"]))
        self.rng = random.Random(int(cfg["seed"]))
        self.eval_model = build_model(str(cfg["model"]), data.input_shape, data.num_classes)
        self._sent: dict[str, Any] = {}
        self.partition_of: dict[int, int] = {}  # Flower node id -> partition id (learnt by query.whoami)
        self.excluded: set[int] = set()  # nodes that did not answer query.whoami or were replaced (never sampled)
        self._record: dict[str, Any] = {}
        self._t0 = 0.0
        self.num_rounds = int(cfg["num-server-rounds"])

    # -- rounds ------------------------------------------------------------------------------------------------
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
        self._record = {"round": server_round, "lr": lr_at(self.cfg, server_round), "sampled": 0, "clients": [],
                        "failures": [], "attacks": []}
        connected = sorted(grid.get_node_ids())
        online = set(connected)
        new = [n for n in connected if n not in self.partition_of and n not in self.excluded]
        found, failures = discover_partitions(grid, new, int(self.cfg["num-supernodes"]),
                                              float(self.cfg["node-timeout"]),
                                              {n: p for n, p in self.partition_of.items() if n in online},
                                              strict=not self.partition_of)
        taken = set(found.values())
        self.partition_of = {n: p for n, p in self.partition_of.items() if p not in taken} | found
        self.excluded.update(f["node"] for f in failures)  # silent or replaced: never asked again
        self._record["failures"].extend(failures)
        self._t0 = time.perf_counter()  # the round's clock starts after the one-off node discovery
        node_of = {p: n for n, p in self.partition_of.items() if n in online}
        chosen = sample_partitions(node_of, int(self.cfg["num-supernodes"]), float(self.cfg["fraction-train"]),
                                   int(self.cfg["seed"]), server_round) if node_of else []
        sent_cfg = ConfigRecord(dict(config))
        sent_cfg["lr"] = self._record["lr"]
        sent_cfg["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: sent_cfg})
        messages = list(self._construct_messages(record, [node_of[p] for p in chosen], MessageType.TRAIN))
        self._sent = {
            "round": server_round,
            "state": {k: v.clone() for k, v in arrays.to_torch_state_dict().items()},
            "expected": expected_arrays(arrays),
            "config": dict(sent_cfg),
            "nodes": {node_of[p]: p for p in chosen},
            "messages": messages,  # the Grid gives them their message ids when it sends them
        }
        self._record["sampled"] = len(messages)
        return messages

    def usable_replies(self, server_round: int, replies: list[Message]) -> list[Message]:
        """Replies fit for the attacker and for aggregation, sorted by partition id (a fixed summation order).

        Every other reply (:func:`strategies.faults.check_reply`), and every sampled client that did not reply
        within ``round-timeout``, is logged in the round's ``failures`` with its reason. When fewer than
        ``min-replies`` replies are usable, none is returned: the round keeps the previous global model and its
        record says why in ``skipped``.
        """
        sent = self._sent.get("nodes", {})
        max_examples = len(self.data.y_train)
        ok, replied = [], set()
        # a reply's sender is its reply_to message's destination (Flower's own error replies, e.g. "Node
        # Unavailable", come from the SuperLink)
        dst = {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent.get("messages", [])
               if m.metadata.message_id}
        first = len(self._record["failures"])
        for msg in replies:
            node = dst.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
            replied.add(node)
            reason = check_reply(msg, self._sent["expected"], max_examples, self.arrayrecord_key,
                                 self.weighted_by_key)
            if reason is None and node in sent and reply_partition(msg) != str(sent[node]):
                reason = f"reply claims partition {reply_partition(msg)}, but the node holds partition {sent[node]}"
            if reason is None:
                ok.append(msg)
            else:
                self._record["failures"].append({"node": node, "partition_id": sent.get(node), "reason": reason})
        timeout = float(self.cfg["round-timeout"])
        for node, pid in sent.items():
            if node not in replied:
                self._record["failures"].append(
                    {"node": node, "partition_id": pid, "reason": f"no reply within round-timeout={timeout:g} s"})
        for f in self._record["failures"][first:]:
            log(WARNING, "round %s: reply of client %s dropped: %s", server_round,
                f["partition_id"] if f["partition_id"] is not None else f["node"], f["reason"])
        ok.sort(key=lambda m: (sent.get(dst.get(m.metadata.reply_to_message_id, m.metadata.src_node_id), math.inf),
                               m.metadata.src_node_id))
        need = int(self.cfg["min-replies"])
        if len(ok) < need:
            self._record["skipped"] = f"{len(ok)} usable replies < min-replies={need}; global model unchanged"
            log(WARNING, "round %s skipped: %s", server_round, self._record["skipped"])
            return []
        return ok

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Attack the victim's update if this is an attack round, then aggregate with FedAvg."""
        replies = list(replies)
        ok = self.usable_replies(server_round, replies)
        for msg in ok:
            m = reply_metrics(msg)
            self._record["clients"].append({
                "partition_id": reply_partition(msg),
                "num_examples": m.get("num-examples"),
                "train_loss": m.get("train-loss"),
                "train_time_s": m.get("train-time-s"),
                "defense_time_s": m.get("defense-time-s"),
                **{k.replace("-", "_"): v for k, v in m.items() if k.startswith(DEFENSE_METRIC_PREFIXES)},
            })
        attack_s = 0.0
        every = int(self.cfg["attack-every"])
        if every > 0 and (server_round - 1) % every == 0 and ok:
            victim = self.pick_victim(ok)
            if victim is not None:
                t = time.perf_counter()
                self._record["attacks"].append(self.run_attack(server_round, victim))
                attack_s = time.perf_counter() - t
        arrays, metrics = super().aggregate_train(server_round, ok)
        if arrays is not None:
            arrays = cast_like(arrays, self._sent["state"])
        if arrays is not None and self.server_step is not None:
            arrays = self.server_step(arrays, ok, self._sent, self.cfg)
        self._record["round_time_s"] = time.perf_counter() - self._t0 - attack_s
        self._record["attack_time_s"] = attack_s
        return arrays, metrics

    # -- the attacker ------------------------------------------------------------------------------------------
    def pick_victim(self, replies: list[Message]) -> Message | None:
        """The reply of the ``victim`` partition (None if it was not sampled), or a random reply."""
        if str(self.cfg["victim"]) == "random":
            return self.rng.choice(replies)
        return next((m for m in replies if reply_partition(m) == str(self.cfg["victim"])), None)

    def payload(self, server_round: int, msg: Message) -> AttackPayload:
        """Everything a curious server holds about this reply (no audit record, nothing client-private)."""
        sent = self._sent["state"]
        returned = msg.content[self.arrayrecord_key].to_torch_state_dict()
        update = {k: returned[k].float() - sent[k].float() for k in sent if k in returned}
        return AttackPayload(
            model_name=str(self.cfg["model"]),
            input_shape=self.data.input_shape,
            num_classes=self.data.num_classes,
            mean=self.data.mean,
            std=self.data.std,
            global_state={k: v.clone() for k, v in sent.items()},
            update=update,
            num_examples=int(reply_metrics(msg)["num-examples"]),
            train_config=dict(self._sent["config"]),
            round=server_round,
            client=reply_partition(msg),
            ignored_keys=private_state_keys(self.eval_model),
        )

    def run_attack(self, server_round: int, msg: Message) -> dict[str, Any]:
        """Run the configured attack on ``msg``'s update, score it with the evaluator, save the figure."""
        payload = self.payload(server_round, msg)
        budget = Budget(iterations=int(self.cfg["attack-iterations"]), restarts=int(self.cfg["attack-restarts"]),
                        time_limit_s=float(self.cfg["attack-time-limit"]),
                        seed=int(self.cfg["seed"]) * 100_003 + server_round)
        t0 = time.perf_counter()
        try:
            result = self.attack.run(payload, budget, AttackOptions.from_config(self.cfg))
        except (ValueError, TimeoutError, RuntimeError) as exc:  # an attack that cannot run on this update
            log(INFO, "attack round %s client %s failed: %s", server_round, payload.client, exc)
            return {"round": server_round, "client": payload.client, "attack": str(self.cfg["attack"]),
                    "time_s": time.perf_counter() - t0, "error": f"{type(exc).__name__}: {exc}"}
        record: dict[str, Any] = {"round": server_round, "client": payload.client, "attack": str(self.cfg["attack"]),
                                  "time_s": result.time_s, "iterations": result.iterations,
                                  "objective": result.objective, **result.extras}
        audit = msg.content["audit"] if "audit" in msg.content else None
        if audit is not None:
            scores = score_reconstruction(self.data, result, audit)
            truth, rec = scores.pop("truth"), scores.pop("reconstruction")
            labels, true_labels = scores.pop("labels"), scores.pop("true_labels")
            record.update(scores)
            title = (f"round {server_round}, client {payload.client}, {record['attack']}: "
                     f"PSNR {scores['psnr']:.1f} dB, SSIM {scores['ssim']:.3f}")
            record["image"] = self.recorder.save_attack_figure(server_round, truth, rec, title, labels, true_labels)
        log(INFO, "attack round %s client %s: %s", server_round, payload.client,
            {k: record.get(k) for k in ("psnr", "ssim", "label_accuracy", "time_s")})
        return record

    # -- central evaluation, end of round ------------------------------------------------------------------------
    def evaluate_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Central evaluation on the test split (every ``eval-every`` rounds and the last), then log the round."""
        every = int(self.cfg["eval-every"])
        if server_round == 0:
            return None
        record = self._record
        metrics = None
        if server_round % every == 0 or server_round == self.num_rounds:
            self.eval_model.load_state_dict(arrays.to_torch_state_dict())
            loss, acc = evaluate(self.eval_model, self.data.x_test, self.data.y_test, self.data.mean,
                                 self.data.std, torch.device("cpu"))
            record["accuracy"], record["loss"] = acc, loss
            metrics = MetricRecord({"accuracy": acc, "loss": loss})
        else:
            record["accuracy"], record["loss"] = None, None
        self.recorder.log_round(record)
        if self.on_round is not None:
            self.on_round(record)
        return metrics
