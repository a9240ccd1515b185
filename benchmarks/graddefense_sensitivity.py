"""GradDefense's layer sensitivity, as published (``public``) or as a Jacobian norm (``jacobian``), against DLG/iDLG
and Inverting Gradients: how often does one client's update leak >= 18 dB, and is the classifier layer clean then?

For each victim image (``--images``; image ``i`` uses ``seed=i``, so the model initialisation and the sampled image
change together) and each ``defense-gd-sensitivity`` value, round 1 of a 3-client FedSGD federation runs through the
real ClientApp (the defense on the local step, its sensitivities from the client's root set, its secrets in
``Context.state``) and the curious strategy attacks client 0's raw update, then compensates the aggregate; the
evaluator scores the reconstruction. The harness (not the server) also asks the same client for its undefended
update (``defense=none``, same seed, same sampled image) and compares the classifier weight of both replies: "fc
clean" means GradDefense perturbed none of its entries in that upload. ``--pretrain-steps N`` first trains the
global model centrally (SGD, batch 10, lr 0.15) for N steps on the training split, as a stand-in for the trained
models the seed-001 sweep attacks at rounds 51..251.

    PYTHONPATH=$PWD python benchmarks/graddefense_sensitivity.py [--attack ig] [--model lenet-tanh] [--images 8]
        [--settings public,jacobian] [--pretrain-steps 0] [KEY=VALUE ...]

Prints one line per attack (PSNR, SSIM, the fraction of the classifier weight perturbed, the victim's loss, the norms
of its gradient and of the noise GradDefense added) and, per setting, how many attacks reached the threshold
(``--threshold``, 18 dB), split by whether the classifier weight went out clean.

    PYTHONPATH=$PWD python benchmarks/graddefense_sensitivity.py --from-sweep sweeps-out/seed001-fmnist

lists instead every attack on the graddefense cells of a finished sweep with the victim's train loss that round.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def _message(content, message_type: str = "train", dst_node_id: int = 1):
    from flwr.app import Message, Metadata

    md = Metadata(run_id=1, message_id=uuid.uuid4().hex, src_node_id=0, dst_node_id=dst_node_id,
                  reply_to_message_id="", group_id="1", created_at=time.time(), ttl=3600, message_type=message_type)
    return Message(content=content, metadata=md)


def pretrained(model_name: str, data, seed: int, steps: int) -> torch.nn.Module:
    """The global model: built after ``torch.manual_seed(seed)``, then ``steps`` central SGD steps (batch 10)."""
    from fl_sim.task.datasets import to_tensor
    from fl_sim.task.models import build_model

    torch.manual_seed(seed)
    net = build_model(model_name, data.input_shape, data.num_classes)
    rng = np.random.default_rng(seed)
    opt = torch.optim.SGD(net.parameters(), lr=0.15)
    for _ in range(steps):
        idx = rng.choice(len(data.y_train), 10, replace=False)
        loss = F.cross_entropy(net(to_tensor(data.x_train[idx], data.mean, data.std)),
                               torch.as_tensor(data.y_train[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


def attack_once(setting: str, image: int, attack: str, model: str, overrides: dict, steps: int,
                out: Path) -> dict:
    """One attack on client 0's round-1 reply under GradDefense with ``defense-gd-sensitivity=setting``.

    Returns:
        The attack record, plus ``fc_perturbed`` (fraction of the classifier weight's entries GradDefense changed).
    """
    from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from clients.client_app import app
    from fl_sim.config import resolve, specs
    from fl_sim.results import RunRecorder
    from fl_sim.task.datasets import load_dataset
    from fl_sim.task.models import classifier_layer
    from strategies.strategy import CuriousFedAvg

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    n = 3
    base = {"model": model, "attack": attack, "num-supernodes": n, "seed": image, "attack-every": 1, "victim": "0",
            "out-dir": str(out), "lr-schedule": "constant", "mode": "fedsgd", "batch-size": 1, **overrides}
    cfg = resolve({**base, "defense": "graddefense", "defense-gd-sensitivity": setting,
                   "run-name": f"{setting}-{image}"})
    data = load_dataset(str(cfg["dataset"]), str(cfg["data-dir"]))
    net = pretrained(model, data, image, steps)
    strat = CuriousFedAvg(specs(cfg).server, data, RunRecorder(out / f"{setting}-{image}", cfg))

    def contexts(run_cfg):
        return [Context(run_id=1, node_id=pid + 1, node_config={"partition-id": pid, "num-partitions": n},
                        state=RecordDict(), run_config=dict(run_cfg)) for pid in range(n)]

    ctxs = contexts(cfg)

    class Grid:
        """Node i + 1 is client i; the server's ``query.whoami`` goes through the real ClientApp."""

        def get_node_ids(self):
            return list(range(1, n + 1))

        def send_and_receive(self, messages, *, timeout=None):
            return [app(_message(m.content, m.metadata.message_type, m.metadata.dst_node_id),
                        ctxs[m.metadata.dst_node_id - 1]) for m in messages]

    msgs = list(strat.configure_train(1, ArrayRecord(net.state_dict()), ConfigRecord(), Grid()))
    replies, victim_content = [], None
    for msg in msgs:
        node = msg.metadata.dst_node_id
        content = RecordDict({"arrays": msg.content["arrays"], "config": ConfigRecord(dict(msg.content["config"]))})
        replies.append(app(_message(content, "train", node), ctxs[node - 1]))
        if node == 1:
            victim_content = content
    strat.aggregate_train(1, replies)
    record = dict(strat.last_record["attacks"][0])
    # ground truth for the analysis only: the same client's undefended update
    clean_cfg = resolve({**base, "defense": "none", "run-name": f"clean-{image}"})
    clean = app(_message(victim_content, "train", 1), contexts(clean_cfg)[0])
    weight = classifier_layer(net).weight
    fc = next(name for name, q in net.named_parameters() if q is weight)
    sent = next(r for r in replies if int(r.content["meta"]["partition-id"]) == 0)
    a = sent.content["arrays"].to_torch_state_dict()
    b = clean.content["arrays"].to_torch_state_dict()
    record["fc_perturbed"] = float((a[fc] != b[fc]).float().mean())
    glob = net.state_dict()
    lr = float(cfg["lr"])
    names = [name for name, _ in net.named_parameters()]
    # one FedSGD step: update = -lr * gradient, so these are gradient norms
    record["grad_norm"] = float(torch.sqrt(sum(((b[k] - glob[k]) / lr).pow(2).sum() for k in names)))
    record["noise_norm"] = float(torch.sqrt(sum(((a[k] - b[k]) / lr).pow(2).sum() for k in names)))
    record["train_loss"] = float(clean.content["metrics"]["train-loss"])
    return record


def from_sweep(sweep_dir: Path, threshold: float) -> None:
    """Every attack on a GradDefense cell of a finished sweep, with the attacked client's train loss that round.

    Under FedSGD with one image per client the reply's ``train-loss`` is the victim image's loss (public: the client
    reports it), so this shows whether the leaks of a sweep coincide with high-loss images.
    """
    import json
    import tomllib

    rows = []
    for cell in sorted((sweep_dir / "cells").iterdir()):
        cfg_path, metrics = cell / "config.toml", cell / "metrics.jsonl"
        if not (cfg_path.is_file() and metrics.is_file()):
            continue
        cfg = tomllib.loads(cfg_path.read_text())
        if cfg.get("defense") != "graddefense":
            continue
        for line in metrics.read_text().splitlines():
            r = json.loads(line)
            loss = {str(c["partition_id"]): c.get("train_loss") for c in r.get("clients", [])}
            for a in r.get("attacks", []):
                if "psnr" in a:
                    rows.append((cell.name, r["round"], a["psnr"], a.get("ssim"), loss.get(str(a["client"]))))
    for name, rnd, psnr, ssim, loss in rows:
        print(f"{name}  round {rnd:4d}  PSNR {psnr:6.2f} dB  SSIM {ssim:.3f}  victim train loss {loss:.3f}")
    leaks = [r for r in rows if r[2] >= threshold]
    quiet = [r for r in rows if r[2] < threshold]
    if rows:
        print(f">= {threshold:g} dB: {len(leaks)} of {len(rows)} attacks; median victim loss "
              f"{np.median([r[4] for r in leaks]) if leaks else float('nan'):.3f} for those, "
              f"{np.median([r[4] for r in quiet]) if quiet else float('nan'):.3f} for the others")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--attack", default="ig")
    p.add_argument("--model", default="lenet-tanh")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--first", type=int, default=0, help="first image (seed)")
    p.add_argument("--settings", default="public,jacobian")
    p.add_argument("--pretrain-steps", type=int, default=0)
    p.add_argument("--threshold", type=float, default=18.0)
    p.add_argument("--from-sweep", type=Path, default=None,
                   help="instead: list the attacks of a finished sweep's graddefense cells with the victim's loss")
    p.add_argument("overrides", nargs="*", help="run-config KEY=VALUE")
    args = p.parse_args(argv)
    if args.from_sweep is not None:
        from_sweep(args.from_sweep, args.threshold)
        return
    torch.set_num_threads(1)
    from fl_sim.config import parse_overrides

    logging.getLogger("flwr").setLevel(logging.WARNING)
    overrides = parse_overrides(args.overrides)
    print(f"attack={args.attack} model={args.model} images={args.first}..{args.first + args.images - 1} "
          f"pretrain-steps={args.pretrain_steps} {overrides}", flush=True)
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.first, args.first + args.images):
            for setting in args.settings.split(","):
                t = time.perf_counter()
                r = attack_once(setting, i, args.attack, args.model, overrides, args.pretrain_steps, Path(tmp))
                results.setdefault(setting, []).append(r)
                print(f"image {i:3d} {setting:9s} PSNR {r['psnr']:6.2f} dB  SSIM {r['ssim']:.3f}  fc perturbed "
                      f"{r['fc_perturbed']:.3f}  {r['iterations']} it  loss {r['train_loss']:.3f}  |g| "
                      f"{r['grad_norm']:.3f}  |noise| {r['noise_norm']:.3f}  ({time.perf_counter() - t:.1f} s)",
                      flush=True)
    th = args.threshold
    for setting, recs in results.items():
        ps = np.array([r["psnr"] for r in recs])
        clean = np.array([r["fc_perturbed"] == 0.0 for r in recs])
        print(f"{setting:9s} >= {th:g} dB: {int((ps >= th).sum())} of {len(ps)}; mean {ps.mean():.2f} dB "
              f"(min {ps.min():.2f}, max {ps.max():.2f}); fc clean in {int(clean.sum())} of {len(ps)}: "
              f">= {th:g} dB in {int((ps[clean] >= th).sum())} of those, {int((ps[~clean] >= th).sum())} of "
              f"{int((~clean).sum())} with fc perturbed", flush=True)


if __name__ == "__main__":
    sys.exit(main())
