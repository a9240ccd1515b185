"""Every defense on both simulation backends (``sim-backend=ray`` and ``inprocess``) with one client secret.

For each registered defense, a 3-client, 3-round federation with an attack at rounds 1 and 3 runs once on Ray and
once in-process (``fl_sim.simulation.run``, client secret 11), and the script compares what the two wrote: the final
model (``final_model.pt``, tensor for tensor, exactly), the final accuracy, every client's per-round record (train
loss, num-examples, the defense's own metrics; times left out) and the attack scores (PSNR, SSIM, label accuracy).
It prints one line per defense with the two wall times, and, last, one JSON object::

    {"bench": "backends_ab", "defenses": 10, "all_same": true, "wall_s": {"ray": ..., "inprocess": ...}}

Usage::

    PYTHONPATH=$PWD python benchmarks/backends_ab.py [DEFENSE ...]      # default: every registered defense
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clients.defenses import DEFENSES  # noqa: E402
from fl_sim import simulation as sim  # noqa: E402
from fl_sim.config import check_feasible, resolve  # noqa: E402
from fl_sim.results import read_metrics  # noqa: E402

#: Defenses that need their own model (FedKL's lock layers).
MODEL = {"fedkl": "lenet-kl"}
BACKENDS = ("ray", "inprocess")


def outcome(defense: str, backend: str, out_dir: str) -> tuple[dict, float]:
    """Run one federation; return what it wrote (the model, accuracy, client records, attack scores) and its wall
    seconds."""
    cfg = resolve({"defense": defense, "model": MODEL.get(defense, "lenet-tanh"), "num-supernodes": 3,
                   "num-server-rounds": 3, "attack-every": 2, "attack-iterations": 5, "device": "cpu",
                   "sim-backend": backend, "out-dir": out_dir, "run-name": "run"})
    check_feasible(cfg)
    start = time.perf_counter()
    run_dir = sim.run(cfg, client_secret=11)
    wall = time.perf_counter() - start
    summary = json.loads((run_dir / "summary.json").read_text())
    clients = [sorted(json.dumps({k: v for k, v in c.items() if not k.endswith("time_s")}, sort_keys=True)
                      for c in row["clients"]) for row in read_metrics(run_dir)]
    return {"model": torch.load(run_dir / "final_model.pt", weights_only=True),
            "accuracy": summary["final_accuracy"], "status": summary["status"], "clients": clients,
            "attacks": [(a.get("psnr"), a.get("ssim"), a.get("label_accuracy")) for a in summary["attacks"]]}, wall


def same(a: dict, b: dict) -> dict[str, bool]:
    """Which of the two runs' outcomes are identical."""
    return {"model": a["model"].keys() == b["model"].keys()
            and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]),
            "accuracy": a["accuracy"] == b["accuracy"], "clients": a["clients"] == b["clients"],
            "attacks": a["attacks"] == b["attacks"] and len(a["attacks"]) > 0,
            "completed": a["status"] == b["status"] == "completed"}


def main() -> None:
    defenses = sys.argv[1:] or list(DEFENSES)
    walls = dict.fromkeys(BACKENDS, 0.0)
    all_same = True
    for defense in defenses:
        runs = {}
        for backend in BACKENDS:
            with tempfile.TemporaryDirectory() as tmp:
                runs[backend], seconds = outcome(defense, backend, tmp)
            walls[backend] += seconds
            runs[backend]["wall"] = seconds
        checks = same(runs["ray"], runs["inprocess"])
        all_same = all_same and all(checks.values())
        print(f"{defense:12s} identical: {', '.join(k for k, v in checks.items() if v) or '-'}"
              f"{'' if all(checks.values()) else '; DIFFERENT: ' + ', '.join(k for k, v in checks.items() if not v)}"
              f"  (wall {runs['ray']['wall']:.1f} s on Ray, {runs['inprocess']['wall']:.1f} s in-process)",
              flush=True)
    print(json.dumps({"bench": "backends_ab", "defenses": len(defenses), "all_same": all_same,
                      "wall_s": {k: round(v, 1) for k, v in walls.items()}}))


if __name__ == "__main__":
    main()
