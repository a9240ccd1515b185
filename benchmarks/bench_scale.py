"""Simulation at scale: wall time and peak memory of ``fl-sim run`` with 100 and 1,000 clients.

Each federation samples ``--per-round`` clients per round (``fraction-train = per_round / clients``) for
``--rounds`` FedSGD rounds on the embedded Fashion-MNIST subset (10,000 training images, so 1,000 clients hold 10
each), without attacks. Memory is sampled every 0.2 s over the whole process tree of the run — the driver (ServerApp
and simulation engine) and every Ray process (GCS, raylet, agents, the ClientApp actors) — as the sum of RSS (what
the issue asks for; it counts shared library pages once per process) and the sum of PSS (shared pages split between
the processes that map them: closer to the memory actually used). The driver's RSS after the first and the last
round shows whether anything grows with the number of rounds. Goal (issue 13): 10,000 clients with 10 sampled per
round in <= 4 GB peak RSS summed over the processes, and a round time within 10 % of 100 clients'.

    python benchmarks/bench_scale.py [--clients 100 1000] [--rounds 30] [--per-round 10]
    python benchmarks/bench_scale.py --full        # issue 13's figure: --clients 100 10000
    python benchmarks/bench_scale.py --full --backend inprocess      # the same with sim-backend=inprocess

The last line is one JSON object with the headline figures (the largest federation against the smallest).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fl_sim.deployment import ProcessTracker  # noqa: E402


def _kb(path: str, field: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def memory(pids) -> tuple[float, float]:
    """(sum of RSS, sum of PSS) in GB over ``pids``."""
    rss = sum(_kb(f"/proc/{p}/status", "VmRSS") for p in pids)
    pss = sum(_kb(f"/proc/{p}/smaps_rollup", "Pss") for p in pids)
    return rss / 2**20, pss / 2**20


def rounds_done(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def bench(clients: int, rounds: int, per_round: int, workdir: Path, backend: str = "ray") -> dict:
    run_dir = workdir / f"scale-{clients}"
    args = [str(Path(sys.executable).with_name("fl-sim")), "run", f"num-supernodes={clients}",
            f"num-server-rounds={rounds}", f"fraction-train={per_round / clients}", "attack-every=0",
            "eval-every=10", f"sim-backend={backend}", "--out", str(run_dir)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    tracker = ProcessTracker()
    t0 = time.monotonic()
    proc = tracker.start(args, workdir / f"scale-{clients}.log", env, ROOT)
    peak_rss = peak_pss = 0.0
    first_round_s = driver_first = driver_last = None
    try:
        while proc.poll() is None:
            alive = tracker.refresh()
            rss, pss = memory(alive)
            peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
            done = rounds_done(run_dir)
            driver = _kb(f"/proc/{proc.pid}/status", "VmRSS") / 2**20
            if done >= 1 and first_round_s is None:
                first_round_s, driver_first = time.monotonic() - t0, driver
            if done >= rounds - 1 and driver > 0:  # 0: the driver is exiting (no VmRSS)
                driver_last = driver
            time.sleep(0.2)
    finally:
        tracker.stop()
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"fl-sim run failed: {(workdir / f'scale-{clients}.log').read_text()[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"clients": clients, "rounds": summary["rounds"], "wall_s": wall, "first_round_s": first_round_s,
            "mean_round_s": summary["mean_round_time_s"], "peak_rss_gb": peak_rss, "peak_pss_gb": peak_pss,
            "driver_rss_first_gb": driver_first, "driver_rss_last_gb": driver_last,
            "final_accuracy": summary["final_accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--full", action="store_true", help="issue 13's figure: 100 and 10,000 clients")
    parser.add_argument("--backend", choices=("ray", "inprocess"), default="ray", help="sim-backend of the runs")
    a = parser.parse_args()
    if a.full:
        a.clients = [100, 10000]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        for n in a.clients:
            rows.append(bench(n, a.rounds, a.per_round, Path(tmp), a.backend))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'clients':>8} {'rounds':>6} {'wall s':>8} {'to round 1 s':>12} {'round s':>8} {'peak RSS GB':>11} "
          f"{'peak PSS GB':>11} {'driver RSS GB 1st→last':>22}")
    for r in rows:
        print(f"{r['clients']:>8} {r['rounds']:>6} {r['wall_s']:>8.1f} {r['first_round_s']:>12.1f} "
              f"{r['mean_round_s']:>8.3f} {r['peak_rss_gb']:>11.2f} {r['peak_pss_gb']:>11.2f} "
              f"{r['driver_rss_first_gb']:>10.2f} → {r['driver_rss_last_gb']:.2f}")
    if len(rows) > 1:
        print(f"ratios {rows[-1]['clients']}/{rows[0]['clients']} clients: wall "
              f"{rows[-1]['wall_s'] / rows[0]['wall_s']:.2f}x, peak RSS "
              f"{rows[-1]['peak_rss_gb'] / rows[0]['peak_rss_gb']:.2f}x; goal peak RSS < 4 GB: "
              f"{'met' if max(r['peak_rss_gb'] for r in rows) < 4 else 'NOT met'}")
    small, large = rows[0], rows[-1]
    print(json.dumps({"bench": "scale", "backend": a.backend, "clients": [r["clients"] for r in rows], "rounds": a.rounds,
                      "per_round": a.per_round, "peak_rss_gb": round(max(r["peak_rss_gb"] for r in rows), 3),
                      "peak_pss_gb": round(max(r["peak_pss_gb"] for r in rows), 3),
                      "round_s": [round(r["mean_round_s"], 4) for r in rows],
                      "round_ratio_largest_smallest": round(large["mean_round_s"] / small["mean_round_s"], 3),
                      "to_round_1_s": [r["first_round_s"] and round(r["first_round_s"], 2) for r in rows]}))


if __name__ == "__main__":
    main()
