"""fl-sim's attacks side by side with breaching (Geiping et al., ``JonasGeiping/breaching``), on the same photo and
the same model weights.

* **iDLG to 40 dB** on DLG's LeNet (``lenet``: sigmoid, U(−0.5, 0.5) init, 3×32×32 → 768 → 10), B = 1:
  fl-sim's ``idlg`` (the smallest step budget that reaches 40 dB, timed as a whole call, as in
  ``bench_attacks.py``) against breaching's ``deepleakage`` configuration with iDLG labels
  (``attack_type=optimization``, ``label_strategy=iDLG``: the label from the last layer's weight gradient, then the
  image alone by L-BFGS on the Euclidean gradient distance — breaching's defaults otherwise: lr 1, randn init,
  no box). breaching's time to 40 dB is read after every L-BFGS step of one run (from the start of
  ``reconstruct``, its setup included; the PSNR check and a snapshot of the candidate are outside the timer); the
  run is ended there by the KeyboardInterrupt that breaching's own loop catches (torch's ``LBFGS.step`` is
  wrapped for this, breaching's code is not touched).
* **Inverting Gradients, 2,000 iterations** on fl-sim's ReLU ConvNet (``convnet``), B = 1: iterations per second
  of fl-sim's ``ig`` against breaching's ``invertinggradients`` configuration with ``max_iterations=2000``
  (cosine distance, signed Adam, lr 0.1, step decay, TV, box; its TV scale 0.2 against fl-sim's 1e-2 does not
  change the cost of an iteration). Each side first runs :data:`WARMUP` untimed iterations (kernel set-up).

Same weights on both sides: fl-sim's ``lenet`` weights are copied into breaching's own ``LeNetZhu`` (the same
architecture: ``features.k`` → ``body.k``, ``fc`` → ``fc.0``); breaching has no model equal to fl-sim's
``convnet``, so the harness builds an equivalent ``nn.Sequential`` in breaching's process and copies the weights
(breaching's attacks accept any ``nn.Module``). The gradient each side computes from the shared weights and photo
is compared (printed). The photo is scikit-image's ``chelsea`` at 32×32, normalised with CIFAR-10's statistics;
both sides run one torch thread.

breaching is run unmodified from its own virtual environment (it needs ``hydra-core``, which fl-sim does not):

    python benchmarks/bench_breaching.py [--breaching-src /work/breaching-src] [--breaching-venv /work/breaching-venv]
                                         [--seed 0] [--ig-iterations 2000]

(also ``BREACHING_SRC`` / ``BREACHING_VENV``). Where either is missing it says so and exits 0. None of breaching's
code is part of fl-sim. fl-sim runs once per gradient engine (``--engines auto,autograd``: :mod:`attacker.chain`,
the default, and autograd's double backward, fl-sim before it), then breaching, all in one run. The last line is
one JSON object with the two ratios per engine (fl-sim's time / breaching's time to 40 dB; fl-sim's iterations per
second / breaching's); the unsuffixed ratios are the first engine's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_attacks import MEAN, STD, TARGET_DB, fl_sim_idlg, photo, victim  # noqa: E402

from attacker import ATTACKS, Budget, dlg, ig  # noqa: E402
from fl_sim.task.datasets import to_tensor  # noqa: E402

#: Untimed Inverting Gradients iterations before the timed run, on each side: the first call of a process spends
#: ~1.5 s setting up oneDNN's convolution kernels for the ConvNet's shapes, which is not an iteration's cost.
WARMUP = 5

#: What runs in breaching's virtual environment: breaching's own code, imported from its source folder.
BREACHING_SIDE = textwrap.dedent('''
    import json, sys, time
    import torch
    torch.set_num_threads(1)
    src, case_path, out_path = sys.argv[1], sys.argv[2], sys.argv[3]
    sys.path.insert(0, src)
    import breaching
    from breaching.cases.models.model_preparation import LeNetZhu

    case = torch.load(case_path)
    x, y, mean, std = case["x"], case["y"], case["mean"], case["std"]
    dm, ds = torch.tensor(mean)[None, :, None, None], torch.tensor(std)[None, :, None, None]
    setup = dict(device=torch.device("cpu"), dtype=torch.float)
    loss_fn = torch.nn.CrossEntropyLoss()

    class Meta:  # the data description breaching's attacks read
        modality, size, classes, shape, normalize = "vision", (50_000,), 10, tuple(x.shape[1:]), True
    Meta.mean, Meta.std = tuple(mean), tuple(std)

    def psnr(a, b):
        mse = ((a - b) ** 2).mean().item()
        return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()

    def payloads(model):
        grads = [g.detach() for g in torch.autograd.grad(loss_fn(model(x), y), list(model.parameters()))]
        server = [dict(parameters=[p for p in model.parameters()], buffers=[b for b in model.buffers()],
                       metadata=Meta)]
        shared = [dict(gradients=grads, buffers=None,
                       metadata=dict(num_data_points=1, labels=None, local_hyperparams=None))]
        return server, shared, grads

    truth = x * ds + dm
    result = {"commit": case.get("commit")}

    # (a) deepleakage with iDLG labels on DLG's LeNet, fl-sim's weights
    lenet = LeNetZhu(num_classes=10, num_channels=x.shape[1])
    lenet.load_state_dict({("body." + k[len("features."):]) if k.startswith("features.") else "fc.0." + k[3:]: v
                           for k, v in case["lenet"].items()})
    server, shared, grads = payloads(lenet)
    result["lenet_grad_max_abs_diff"] = max((a - b).abs().max().item() for a, b in zip(grads, case["lenet_grads"]))
    cfg = breaching.get_attack_config("deepleakage")
    cfg.attack_type, cfg.label_strategy = "optimization", "iDLG"
    cfg.optim.max_iterations, cfg.optim.callback = case["dlg_steps"], 10**9
    attacker = breaching.attacks.prepare_attack(lenet, loss_fn, cfg, setup)
    trace, clock = [], {}
    step = torch.optim.LBFGS.step

    def timed_step(self, closure):  # wraps torch's optimizer, not breaching: a timestamp and a snapshot per step
        out = step(self, closure)
        clock["busy"] += time.perf_counter() - clock["since"]
        clock["cpu"] += time.process_time() - clock["cpu_since"]
        trace.append((clock["busy"], self.param_groups[0]["params"][0].detach().clone(), clock["cpu"]))
        reached = psnr(trace[-1][1] * ds + dm, truth) >= case["target_db"]
        clock["since"], clock["cpu_since"] = time.perf_counter(), time.process_time()
        if reached:  # breaching's loop ends a trial on KeyboardInterrupt and keeps its best candidate
            raise KeyboardInterrupt
        return out

    torch.optim.LBFGS.step = timed_step
    torch.manual_seed(case["seed"])
    clock.update(busy=0.0, since=time.perf_counter(), cpu=0.0, cpu_since=time.process_time())
    rec, _ = attacker.reconstruct(server, shared, {}, dryrun=False)
    torch.optim.LBFGS.step = step
    hit = next(((i + 1, t, cpu) for i, (t, c, cpu) in enumerate(trace) if psnr(c * ds + dm, truth) >= case["target_db"]),
               None)
    result["dlg"] = {"steps_to_target": hit and hit[0], "seconds_to_target": hit and hit[1],
                     "cpu_seconds_to_target": hit and hit[2],
                     "label": rec["labels"].tolist(), "steps_run": len(trace),
                     "final_psnr": psnr(trace[-1][1] * ds + dm, truth) if trace else None}

    # (b) Inverting Gradients on an nn.Sequential equal to fl-sim's convnet, fl-sim's weights
    class ConvNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            c = x.shape[1]
            self.features = torch.nn.Sequential(
                torch.nn.Conv2d(c, 32, 3, padding=1), torch.nn.ReLU(),
                torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2))
            self.fc = torch.nn.Linear(case["convnet"]["fc.weight"].shape[1], 10)

        def forward(self, inp):
            return self.fc(self.features(inp).flatten(1))

    convnet = ConvNet()
    convnet.load_state_dict(case["convnet"])
    server, shared, grads = payloads(convnet)
    result["convnet_grad_max_abs_diff"] = max((a - b).abs().max().item()
                                              for a, b in zip(grads, case["convnet_grads"]))
    cfg = breaching.get_attack_config("invertinggradients")
    cfg.label_strategy = "iDLG"
    cfg.optim.max_iterations, cfg.optim.callback = case["warmup"], 10**9  # untimed: first-call kernel set-up
    breaching.attacks.prepare_attack(convnet, loss_fn, cfg, setup).reconstruct(server, shared, {}, dryrun=False)
    cfg.optim.max_iterations = case["ig_iterations"]
    attacker = breaching.attacks.prepare_attack(convnet, loss_fn, cfg, setup)
    torch.manual_seed(case["seed"])
    t0, c0 = time.perf_counter(), time.process_time()
    rec, _ = attacker.reconstruct(server, shared, {}, dryrun=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    result["ig"] = {"iterations": case["ig_iterations"], "seconds": wall, "it_per_s": case["ig_iterations"] / wall,
                    "it_per_cpu_s": case["ig_iterations"] / cpu,
                    "psnr": psnr(rec["data"] * ds + dm, truth)}
    json.dump(result, open(out_path, "w"))
''')


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--breaching-src", type=Path, default=Path(os.environ.get("BREACHING_SRC", "/work/breaching-src")))
    p.add_argument("--breaching-venv", type=Path,
                   default=Path(os.environ.get("BREACHING_VENV", "/work/breaching-venv")))
    p.add_argument("--seed", type=int, default=0, help="model initialisation and dummy seed")
    p.add_argument("--ig-iterations", type=int, default=2000)
    p.add_argument("--dlg-steps", type=int, default=300, help="L-BFGS steps breaching runs at most")
    p.add_argument("--engines", default="auto,autograd",
                   help="fl-sim gradient engines to time, comma-separated (attacker.dlg.ENGINES)")
    args = p.parse_args(argv)
    python = args.breaching_venv / "bin" / "python"
    if not (args.breaching_src / "breaching" / "__init__.py").is_file() or not python.is_file():
        print(f"breaching not found (source {args.breaching_src}, venv {args.breaching_venv}): nothing to compare. "
              "See this file's docstring and docs/performance.md for how to set it up.")
        print(json.dumps({"bench": "breaching", "skipped": "breaching not found"}))
        return 0
    torch.set_num_threads(1)
    x = to_tensor(photo(), MEAN, STD)
    y = torch.tensor([3])
    lenet, lenet_grads, dlg_payload = victim("lenet", x, y, args.seed)
    convnet, convnet_grads, ig_payload = victim("convnet", x, y, args.seed)

    # fl-sim (each engine), then breaching, on the same case
    runs = {}
    saved = (dlg.ENGINE, ig.ENGINE)
    try:
        for engine in [e.strip() for e in args.engines.split(",") if e.strip()]:
            if engine not in dlg.ENGINES:
                raise SystemExit(f"--engines: {engine!r} is not one of {dlg.ENGINES}")
            dlg.ENGINE = ig.ENGINE = engine
            ours = fl_sim_idlg(dlg_payload, x, args.seed)
            ATTACKS["ig"].run(ig_payload, Budget(iterations=WARMUP, seed=args.seed))  # untimed, as breaching's
            t0, c0 = time.perf_counter(), time.process_time()
            res = ATTACKS["ig"].run(ig_payload, Budget(iterations=args.ig_iterations, seed=args.seed))
            ig_wall, ig_cpu = time.perf_counter() - t0, time.process_time() - c0
            runs[engine] = (ours, {"iterations": res.iterations, "seconds": ig_wall,
                                   "it_per_s": res.iterations / ig_wall, "it_per_cpu_s": res.iterations / ig_cpu})
    finally:
        dlg.ENGINE, ig.ENGINE = saved

    commit = (args.breaching_src / ".commit").read_text().strip() if (args.breaching_src / ".commit").exists() else None
    with tempfile.TemporaryDirectory(prefix="bench-breaching-") as tmp:
        case = Path(tmp) / "case.pt"
        torch.save({"x": x.contiguous(), "y": y, "mean": list(MEAN), "std": list(STD), "seed": args.seed, "commit": commit,
                    "lenet": lenet.state_dict(), "lenet_grads": lenet_grads, "convnet": convnet.state_dict(),
                    "convnet_grads": convnet_grads, "target_db": TARGET_DB, "dlg_steps": args.dlg_steps,
                    "ig_iterations": args.ig_iterations, "warmup": WARMUP}, case)
        script, out = Path(tmp) / "breaching_side.py", Path(tmp) / "out.json"
        script.write_text(BREACHING_SIDE)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        env.pop("PYTHONPATH", None)
        done = subprocess.run([str(python), str(script), str(args.breaching_src), str(case), str(out)],
                              capture_output=True, text=True, env=env, cwd=tmp)
        if done.returncode != 0:
            print(done.stdout[-3000:] + done.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"breaching's side failed with code {done.returncode}")
        theirs = json.loads(out.read_text())

    dlg_b = theirs["dlg"]
    print(f"breaching {theirs.get('commit') or '(commit unknown)'}; same weights: gradient max |diff| "
          f"LeNet {theirs['lenet_grad_max_abs_diff']:.2e}, ConvNet {theirs['convnet_grad_max_abs_diff']:.2e}")
    fmt = lambda v: "never" if v is None else f"{v:.2f} s"  # noqa: E731
    summary: dict = {"bench": "breaching", "seed": args.seed, "breaching_idlg_s": dlg_b["seconds_to_target"],
                     "breaching_idlg_cpu_s": dlg_b.get("cpu_seconds_to_target"),
                     "breaching_ig_it_per_s": round(theirs["ig"]["it_per_s"], 2)}
    for k, (engine, (ours, ours_ig)) in enumerate(runs.items()):
        print(f"(a) iDLG to {TARGET_DB:.0f} dB on DLG's LeNet: fl-sim [{engine}] {fmt(ours['wall'])} "
              f"({ours['steps']} steps, {ours['closures']} closures); breaching deepleakage + iDLG labels "
              f"{fmt(dlg_b['seconds_to_target'])} ({dlg_b['steps_to_target']} L-BFGS steps; label {dlg_b['label']}, "
              f"final {dlg_b['final_psnr']:.1f} dB after {dlg_b['steps_run']} steps)")
        print(f"(b) Inverting Gradients, {args.ig_iterations} iterations on the ReLU ConvNet: fl-sim [{engine}] "
              f"{ours_ig['it_per_s']:.1f} it/s ({ours_ig['seconds']:.1f} s); breaching {theirs['ig']['it_per_s']:.1f} "
              f"it/s ({theirs['ig']['seconds']:.1f} s, {theirs['ig']['psnr']:.1f} dB)")
        dlg_ratio = (ours["wall"] / dlg_b["seconds_to_target"]) if ours["wall"] and dlg_b["seconds_to_target"] \
            else None
        ig_ratio = ours_ig["it_per_s"] / theirs["ig"]["it_per_s"]
        cpu_b = dlg_b.get("cpu_seconds_to_target")
        dlg_cpu_ratio = (ours["cpu"] / cpu_b) if ours["cpu"] and cpu_b else None
        ig_cpu_ratio = ours_ig["it_per_cpu_s"] / theirs["ig"]["it_per_cpu_s"]
        print(f"    CPU seconds (steadier on a shared machine): iDLG ratio "
              f"{'n/a' if dlg_cpu_ratio is None else f'{dlg_cpu_ratio:.3f}'} ({fmt(ours['cpu'])} vs {fmt(cpu_b)}); "
              f"IG ratio {ig_cpu_ratio:.3f} ({ours_ig['it_per_cpu_s']:.1f} vs {theirs['ig']['it_per_cpu_s']:.1f} "
              f"it per CPU s)")
        suffix = "" if k == 0 else f"_{engine}"
        summary.update({f"idlg_time_to_40db_ratio{suffix}": None if dlg_ratio is None else round(dlg_ratio, 4),
                        f"ig_it_per_s_ratio{suffix}": round(ig_ratio, 4), f"fl_sim_idlg_s{suffix}": ours["wall"],
                        f"fl_sim_ig_it_per_s{suffix}": round(ours_ig["it_per_s"], 2),
                        f"idlg_cpu_ratio{suffix}": None if dlg_cpu_ratio is None else round(dlg_cpu_ratio, 4),
                        f"ig_cpu_ratio{suffix}": round(ig_cpu_ratio, 4)})
        if k == 0:
            summary["engine"] = engine
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
