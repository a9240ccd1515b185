"""Privacy of each defense: the server's attack on one real client reply per defense (no Ray, a few minutes).

For every defense the real ClientApp ``train`` function is called on a Flower Message/Context (as in a run: the
defense applies to the local step, secrets stay in ``Context.state``), the curious strategy receives the reply
together with clean replies of the other clients, attacks the victim's update (the configured attack, through the
same ``AttackPayload`` a run builds), applies any server step (GradDefense compensation) and the evaluator scores
the reconstruction. Mean PSNR/SSIM over ``--images`` victims (different samples), each with its chance level (the
evaluator's ``psnr_chance`` / ``ssim_chance``: the training split's mean image scored the same way); the last line
is one JSON object of the means.

    PYTHONPATH=$PWD python benchmarks/leakage_defenses.py [--attack idlg] [--model lenet-tanh] [--images 3]
        [--defenses none,prune,...] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch

DEFAULT_DEFENSES = "none,prune,dp-gaussian,dp-laplace,soteria,graddefense,quantize"


def _message(content, message_type: str = "train", dst_node_id: int = 1):
    from flwr.app import Message, Metadata

    md = Metadata(run_id=1, message_id=uuid.uuid4().hex, src_node_id=0, dst_node_id=dst_node_id,
                  reply_to_message_id="", group_id="1", created_at=time.time(), ttl=3600, message_type=message_type)
    return Message(content=content, metadata=md)


def attack_once(defense: str, image: int, attack: str, model: str, overrides: dict, out: Path) -> dict:
    """One attack on client 0's reply under ``defense`` (seeded by ``image``); returns the attack record."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from clients.client_app import app
    from clients.secrets import node_secret
    from fl_sim.config import resolve, specs
    from fl_sim.results import RunRecorder
    from fl_sim.task.datasets import load_dataset
    from fl_sim.task.models import build_model
    from strategies.strategy import CuriousFedAvg

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    n = 3
    cfg = resolve({"defense": defense, "model": model, "attack": attack, "num-supernodes": n, "seed": image,
                   "attack-every": 1, "victim": "0", "out-dir": str(out), "run-name": f"{defense}-{image}",
                   "lr-schedule": "constant", **overrides})
    data = load_dataset(str(cfg["dataset"]), str(cfg["data-dir"]))
    torch.manual_seed(image)
    net = build_model(model, data.input_shape, data.num_classes)
    strat = CuriousFedAvg(specs(cfg).server, data, RunRecorder(out / f"{defense}-{image}", cfg))
    # fixed node secrets (client secret 0, as `fl-sim run --client-secret 0`): the table is reproducible
    contexts = [Context(run_id=1, node_id=pid + 1, node_config={"partition-id": pid, "num-partitions": n,
                                                                "secret-seed": node_secret(0, pid)},
                        state=RecordDict(), run_config=dict(cfg)) for pid in range(n)]

    class Grid:
        """Node i + 1 is client i; the server's ``query.whoami`` goes through the real ClientApp."""

        def get_node_ids(self):
            return list(range(1, n + 1))

        def send_and_receive(self, messages, *, timeout=None):
            return [app(_message(m.content, m.metadata.message_type, m.metadata.dst_node_id),
                        contexts[m.metadata.dst_node_id - 1]) for m in messages]

    glob = ArrayRecord(net.state_dict())
    # the strategy sends the train config of its own spec (the config argument is not read)
    msgs = list(strat.configure_train(1, glob, ConfigRecord(), Grid()))
    replies = []
    for msg in msgs:
        node = msg.metadata.dst_node_id
        content = RecordDict({"arrays": msg.content["arrays"], "config": ConfigRecord(dict(msg.content["config"]))})
        replies.append(app(_message(content, "train", node), contexts[node - 1]))
    strat.aggregate_train(1, replies)
    return strat.last_record["attacks"][0]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--attack", default="idlg")
    p.add_argument("--model", default="lenet-tanh")
    p.add_argument("--images", type=int, default=3)
    p.add_argument("--defenses", default=DEFAULT_DEFENSES)
    p.add_argument("overrides", nargs="*", help="run-config KEY=VALUE")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from fl_sim.config import parse_overrides

    logging.getLogger("flwr").setLevel(logging.WARNING)  # after the import: importing flwr resets its level
    overrides = parse_overrides(args.overrides)
    print(f"attack={args.attack} model={args.model} images={args.images} {overrides}")
    print(f"{'defense':<14}{'PSNR dB':>9}{'chance':>8}{'SSIM':>8}{'chance':>8}{'label acc':>11}{'min':>7}{'max':>7}")
    means: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for defense in args.defenses.split(","):
            recs = [attack_once(defense, i, args.attack, args.model, overrides, Path(tmp)) for i in range(args.images)]
            ps = [r["psnr"] for r in recs]
            m = {k: round(float(np.mean([r[k] for r in recs])), 4)
                 for k in ("psnr", "psnr_chance", "ssim", "ssim_chance", "label_accuracy")}
            means[defense] = m
            print(f"{defense:<14}{m['psnr']:>9.2f}{m['psnr_chance']:>8.2f}{m['ssim']:>8.3f}{m['ssim_chance']:>8.3f}"
                  f"{m['label_accuracy']:>11.2f}{min(ps):>7.2f}{max(ps):>7.2f}", flush=True)
    print(json.dumps({"bench": "leakage_defenses", "attack": args.attack, "model": args.model,
                      "images": args.images, "overrides": overrides, "means": means}))


if __name__ == "__main__":
    sys.exit(main())
