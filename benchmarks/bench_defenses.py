"""Round-time overhead of each defense against ``none``, measured in one run.

Default (in-process, no Ray): a round is what the federation computes — every client's real ClientApp ``train``
call on a Flower Message/Context (local training + the defense + its hooks) followed by the strategy's FedAvg
aggregation and any server step (GradDefense compensation); no attack. The defenses are interleaved round by round
so that machine load affects them alike; the ratio is mean round time / mean round time of ``none``.
``--simulation`` instead runs ``fl-sim run`` (Flower's simulation engine, Ray) per defense and compares the
``mean_round_time_s`` of the summaries — the same measure as the seed's "ART", including transport; those runs are
sequential, so their ratios mean something only on an otherwise idle machine.

    PYTHONPATH=$PWD python benchmarks/bench_defenses.py [--rounds 30] [--clients 10] [--simulation]

Target: <= 5 % overhead, except for defenses that inherently need more (printed with the reason). The in-process
round of a B = 1 LeNet is only ~1-3 ms of compute per client, so an elementwise pass over the gradient already shows
as 10-30 % there; "added ms" is the absolute cost per round (10 clients), to be set against a real round
(2026-12-02, idle 2-core machine: ~40 ms in this benchmark, 37-48 ms in ``benchmarks/bench_main.py``'s in-process
simulation, 64-73 ms from the ``fl-sim run`` CLI; the rest is Flower/Ray messaging, docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch

DEFENSES = ["none", "prune", "dp-gaussian", "dp-laplace", "soteria", "graddefense", "fedkl", "quantize"]
MODEL = {"fedkl": "lenet-kl"}
INHERENT = {
    "soteria": "needs ||dr_i/dx|| for every FC input feature (an exact windowed forward-mode Jacobian, ~40 M "
               "multiply-adds per image, on top of the training step's ~1 M)",
    "graddefense": "recomputes layer sensitivities (a double backward on a 50-image root set) every "
                   "defense-gd-sensitivity-every rounds, and the server eigen-filters the aggregate",
    "fedkl": "a different model (BatchNorm + two 1024x12 lock layers): compare with none on lenet-kl",
}


def _message(content, message_type="train", dst_node_id=1):
    from flwr.app import Message, Metadata

    md = Metadata(run_id=1, message_id=uuid.uuid4().hex, src_node_id=0, dst_node_id=dst_node_id,
                  reply_to_message_id="", group_id="1", created_at=time.time(), ttl=3600, message_type=message_type)
    return Message(content=content, metadata=md)


class Federation:
    """Clients (with persistent Context.state) and the curious strategy for one defense, driven round by round."""

    def __init__(self, defense: str, clients: int, out: Path, model: str | None = None):
        from flwr.app import ArrayRecord, Context, RecordDict

        from fl_sim.config import resolve, specs
        from fl_sim.results import RunRecorder
        from fl_sim.task.datasets import load_dataset
        from fl_sim.task.models import build_model
        from strategies.strategy import CuriousFedAvg

        name = model or MODEL.get(defense, "lenet-tanh")
        self.cfg = resolve({"defense": defense, "model": name, "num-supernodes": clients, "attack-every": 0,
                            "out-dir": str(out), "run-name": f"{defense}-{name}"})
        data = load_dataset("fashion-mnist")
        torch.manual_seed(0)
        self.arrays = ArrayRecord(build_model(name, data.input_shape, data.num_classes).state_dict())
        self.strategy = CuriousFedAvg(specs(self.cfg).server, data, RunRecorder(out / f"{defense}-{name}", self.cfg))
        self.contexts = [Context(run_id=1, node_id=i + 1, node_config={"partition-id": i, "num-partitions": clients},
                                 state=RecordDict(), run_config=dict(self.cfg)) for i in range(clients)]
        self.round = 0

    def step(self) -> float:
        """One round; returns its wall-clock seconds."""
        from flwr.app import ConfigRecord, RecordDict

        from clients.client_app import app

        contexts = self.contexts

        class Grid:
            """Node i + 1 is client i; queries (the server's ``query.whoami``) go through the real ClientApp."""

            def get_node_ids(self):
                return list(range(1, len(contexts) + 1))

            def send_and_receive(self, messages, *, timeout=None):
                return [app(_message(m.content, m.metadata.message_type, m.metadata.dst_node_id),
                            contexts[m.metadata.dst_node_id - 1]) for m in messages]

        self.round += 1
        t = time.perf_counter()
        # the strategy sends the train config of its own spec (the config argument is not read)
        msgs = list(self.strategy.configure_train(self.round, self.arrays, ConfigRecord(), Grid()))
        replies = []
        for msg in msgs:
            node = msg.metadata.dst_node_id
            content = RecordDict({"arrays": msg.content["arrays"], "config": ConfigRecord(dict(msg.content["config"]))})
            replies.append(app(_message(content, "train", node), self.contexts[node - 1]))
        arrays, _ = self.strategy.aggregate_train(self.round, replies)
        self.arrays = arrays
        return time.perf_counter() - t


def in_process(rounds: int, clients: int, warmup: int = 2) -> dict[str, float]:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    logging.getLogger("flwr").setLevel(logging.ERROR)
    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        feds = {d: Federation(d, clients, Path(tmp)) for d in DEFENSES}
        feds["none@lenet-kl"] = Federation("none", clients, Path(tmp), model="lenet-kl")
        for r in range(rounds + warmup):
            for name, fed in feds.items():
                dt = fed.step()
                if r >= warmup:
                    times.setdefault(name, []).append(dt)
    return {k: float(np.mean(v)) for k, v in times.items()}


def simulation(rounds: int, clients: int) -> dict[str, float]:
    exe = Path(sys.executable).with_name("fl-sim")
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for d in DEFENSES + ["none@lenet-kl"]:
            defense, _, model = d.partition("@")
            run = Path(tmp) / d
            args = [str(exe), "run", f"defense={defense}", f"model={model or MODEL.get(defense, 'lenet-tanh')}",
                    f"num-server-rounds={rounds}", f"num-supernodes={clients}", "attack-every=0", "--out", str(run)]
            subprocess.run(args, check=True, capture_output=True, text=True)
            out[d] = json.loads((run / "summary.json").read_text())["mean_round_time_s"]
    return out


def real_round_s(rounds: int, clients: int) -> float:
    """Median round time (after round 1) of a real ``fl-sim run`` with ``defense=none`` (Flower + Ray), seconds."""
    from fl_sim.results import read_metrics

    exe = Path(sys.executable).with_name("fl-sim")
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "none"
        subprocess.run([str(exe), "run", f"num-server-rounds={rounds}", f"num-supernodes={clients}", "attack-every=0",
                        "--out", str(run)], check=True, capture_output=True, text=True)
        return float(np.median([r["round_time_s"] for r in read_metrics(run)[1:]]))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--simulation", action="store_true", help="full fl-sim runs (Ray) instead of in-process rounds")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    means = simulation(args.rounds, args.clients) if args.simulation else in_process(args.rounds, args.clients)
    kind = "fl-sim run (Ray), mean_round_time_s" if args.simulation else "in-process rounds (ClientApp + strategy)"
    real = means["none"] if args.simulation else real_round_s(args.rounds, args.clients)
    print(f"{kind}; {args.clients} clients, {args.rounds} rounds, FedSGD B=1, Fashion-MNIST")
    print(f"a real fl-sim round with defense=none takes {real * 1000:.0f} ms (median after round 1); 'ART +' is the "
          "added time over that round, the seed's ART overhead")
    print(f"{'defense':<16}{'round ms':>10}{'added ms':>10}{'ratio':>8}{'ART +':>9}  note")
    for d, t in means.items():
        base = means["none@lenet-kl"] if d == "fedkl" else means["none"]
        art = (t - base) / real
        note = "baseline of fedkl" if d.startswith("none@") else (
            "" if art <= 0.05 else INHERENT.get(d, "ABOVE TARGET"))
        print(f"{d:<16}{t * 1000:>10.1f}{(t - base) * 1000:>10.1f}{t / base:>8.3f}{art * 100:>8.1f}%  {note}")
    # the headline figures, one JSON line (ratio: round time / none's; art_pct: the seed's ART overhead)
    base_of = {d: means["none@lenet-kl"] if d == "fedkl" else means["none"] for d in means if not d.startswith("none")}
    print(json.dumps({"bench": "defenses", "mode": "simulation" if args.simulation else "in-process",
                      "rounds": args.rounds, "clients": args.clients, "real_round_ms": round(real * 1000, 1),
                      "ratio": {d: round(means[d] / b, 4) for d, b in base_of.items()},
                      "art_pct": {d: round((means[d] - b) / real * 100, 2) for d, b in base_of.items()}}))


if __name__ == "__main__":
    sys.exit(main())
