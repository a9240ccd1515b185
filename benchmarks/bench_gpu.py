"""Many clients on one GPU (issue 14): simulation throughput, attack time on GPU against CPU, and peak GPU memory.

1. **Simulation**: ``fl-sim run`` with 10 and 100 clients (``client-num-gpus`` 0.1 and 0.05, so Ray packs 10 and 20
   virtual clients onto one GPU; every client trains every round, FedSGD B = 1 on the embedded Fashion-MNIST, no
   attacks), with ``device=cuda``, and the same federation with ``device=cpu client-num-gpus=0``. Rounds per second
   and clients per second come from ``metrics.jsonl`` (median round time over rounds 2.., so that Ray's start-up and
   each actor's first CUDA call are left out); the peak GPU memory is the largest device-wide use
   (``torch.cuda.mem_get_info``, sampled every 0.1 s) above what was in use before the run.
2. **Attacks**: the one-shot audit (``fl_sim.audit.run_audit``: the client pipeline, then the server's attack) with
   ``attack-device=cuda`` and ``attack-device=cpu``: iDLG on ``lenet`` (one Fashion-MNIST image), Inverting Gradients on
   ``convnet`` (one 3×32×32 image, ``--ig-iterations``), and IG on ``resnet18`` when that model is registered. Each is
   run twice per device and the second run is timed (the first pays for CUDA's kernel loading); the peak GPU memory
   is ``torch.cuda.max_memory_allocated`` of this process.

The last line printed is one JSON object with every number. Without CUDA the script says so and exits 0.

    python benchmarks/bench_gpu.py [--rounds 10] [--ig-iterations 500] [--no-cpu]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# before torch loads OpenMP (as the fl-sim CLI does): idle threads sleep instead of spinning on a busy machine
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: The two federations of the issue: (clients, GPU fraction per client).
FEDERATIONS = ((10, 0.1), (100, 0.05))


class GpuMemory:
    """Largest device-wide GPU memory in use (MiB) above the level at start, sampled every ``every_s`` seconds."""

    def __init__(self, every_s: float = 0.1):
        self.every_s, self.peak, self._stop = every_s, 0.0, threading.Event()
        self.base = self._used()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _used() -> float:
        free, total = torch.cuda.mem_get_info()
        return (total - free) / 2**20

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._used() - self.base)
            time.sleep(self.every_s)

    def __enter__(self) -> GpuMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def simulate(clients: int, gpus: float, device: str, rounds: int, workdir: Path) -> dict:
    """One ``fl-sim run`` (a subprocess); throughput from its ``metrics.jsonl``."""
    run_dir = workdir / f"sim-{clients}-{device}"
    args = [str(Path(sys.executable).with_name("fl-sim")), "run", f"num-supernodes={clients}",
            f"num-server-rounds={rounds}", "attack-every=0", f"eval-every={rounds}", f"device={device}",
            f"client-num-gpus={gpus if device == 'cuda' else 0.0}", "round-timeout=600", "--out", str(run_dir)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.perf_counter()
    with GpuMemory() as mem:
        proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"clients": clients, "device": device, "error": proc.stderr.strip().splitlines()[-1:]}
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = [r["round_time_s"] for r in lines[1:]] or [lines[0]["round_time_s"]]
    per_round = float(np.median(times))
    trained = float(np.mean([len(r["clients"]) for r in lines]))
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"clients": clients, "client_num_gpus": gpus if device == "cuda" else 0.0, "device": device,
            "rounds": len(lines), "rounds_per_s": 1.0 / per_round, "clients_per_s": trained / per_round,
            "median_round_s": per_round, "wall_s": wall, "final_accuracy": summary["final_accuracy"],
            "peak_gpu_mib": mem.peak, "run_device": summary["provenance"]["device"]}


def _images(dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """One image for the audit: Fashion-MNIST sample 0, or skimage's ``chelsea`` at 32×32 for CIFAR shapes."""
    from fl_sim.task.datasets import load_dataset

    if dataset == "fashion-mnist":
        data = load_dataset("fashion-mnist")
        return data.x_train[:1], data.y_train[:1]
    try:
        from skimage import data as skdata
        from skimage import transform

        img = transform.resize(skdata.chelsea(), (32, 32, 3), anti_aliasing=True)
        img = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)[None]
    except Exception:  # an image file the installed scikit-image does not ship: a seeded random one
        img = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    return img, np.array([3], np.int64)


def attack_time(attack: str, model: str, dataset: str, device: str, iterations: int) -> dict:
    """Seconds of one attack (the second of two identical runs) with ``attack-device=device``."""
    from fl_sim.audit import audit_dataset, run_audit
    from fl_sim.config import resolve

    images, labels = _images(dataset)
    cfg = resolve({"attack": attack, "model": model, "dataset": dataset, "device": device,
                   "attack-device": device, "attack-iterations": iterations, "attack-time-limit": 0.0,
                   "batch-size": 1})
    data = audit_dataset(dataset, images, labels)
    runs = []
    for _ in range(2):
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        runs.append(run_audit(cfg, data))
    last = runs[-1]
    out = {"attack": attack, "model": model, "device": device, "time_s": last["time_s"], "first_time_s":
           runs[0]["time_s"], "iterations": last["iterations"], "psnr": last["psnr"], "ssim": last["ssim"]}
    if device == "cuda":
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--ig-iterations", type=int, default=500)
    parser.add_argument("--idlg-iterations", type=int, default=0, help="0 = iDLG's default (200 L-BFGS steps)")
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU runs of the simulation")
    a = parser.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    logging.getLogger("flwr").setLevel(logging.WARNING)
    if not torch.cuda.is_available():
        print("bench_gpu: CUDA is not available on this machine; nothing was measured")
        print(json.dumps({"bench": "gpu", "cuda": False}))
        return 0
    from fl_sim.task.models import MODELS

    gpu = torch.cuda.get_device_name(0)
    print(f"bench_gpu: {gpu}, torch {torch.__version__} (CUDA {torch.version.cuda}), {os.cpu_count()} CPU cores")
    result: dict = {"bench": "gpu", "cuda": True, "gpu": gpu, "torch": torch.__version__,
                    "cpu_cores": os.cpu_count(), "rounds": a.rounds, "simulation": [], "attacks": []}
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        for clients, gpus in FEDERATIONS:
            for device in ("cuda",) if a.no_cpu else ("cuda", "cpu"):
                r = simulate(clients, gpus, device, a.rounds, Path(tmp))
                result["simulation"].append(r)
                if "error" in r:
                    print(f"  {clients:>3} clients on {device}: failed: {r['error']}")
                    continue
                print(f"  {clients:>3} clients on {device:<4} (client-num-gpus {r['client_num_gpus']:g}): "
                      f"{r['rounds_per_s']:.2f} rounds/s, {r['clients_per_s']:.1f} clients/s, "
                      f"peak GPU {r['peak_gpu_mib']:.0f} MiB, wall {r['wall_s']:.1f} s")
    plans = [("idlg", "lenet", "fashion-mnist", a.idlg_iterations), ("ig", "convnet", "cifar10", a.ig_iterations)]
    if "resnet18" in MODELS:
        plans.append(("ig", "resnet18", "cifar10", a.ig_iterations))
    else:
        result["attacks"].append({"attack": "ig", "model": "resnet18", "skipped": "no resnet18 model registered"})
        print("  ig on resnet18: skipped (no resnet18 model registered)")
    for attack, model, dataset, iterations in plans:
        times = {}
        for device in ("cuda", "cpu"):
            r = attack_time(attack, model, dataset, device, iterations)
            result["attacks"].append(r)
            times[device] = r["time_s"]
        speedup = times["cpu"] / times["cuda"] if times["cuda"] else None
        print(f"  {attack} on {model}: GPU {times['cuda']:.2f} s, CPU {times['cpu']:.2f} s "
              f"({'%.1fx' % speedup if speedup else '-'}), peak GPU "
              f"{result['attacks'][-2].get('peak_gpu_mib', 0):.0f} MiB")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
