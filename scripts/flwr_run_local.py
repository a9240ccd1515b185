"""Run fl-sim through Flower's own CLI, ``flwr run . local``, and stop the local SuperLink it starts.

Usage (from the repository root, with the venv's ``bin`` on PATH; ``make flwr-run ARGS="..."`` does this)::

    python scripts/flwr_run_local.py [KEY=VALUE ...]

The KEY=VALUE pairs are fl-sim run-config keys (checked as ``fl-sim run`` checks them); ``num-supernodes`` and
``client-num-cpus``/``client-num-gpus`` are also passed to the federation config. ``flwr run`` starts a SuperLink
daemon that outlives it (Flower 1.41 and 1.42); this script stops the ones it started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fl_sim.config import ConfigError, check_feasible, parse_overrides, resolve  # noqa: E402


def superlink_pids() -> set[int]:
    out = subprocess.run(["pgrep", "-f", "flower-superlink"], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


def toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return "'" + v.replace("'", "") + "'"
    return repr(v)


def main(argv: list[str]) -> int:
    try:
        overrides = parse_overrides(argv)
        cfg = resolve(overrides)
        check_feasible(cfg)  # e.g. GPUs requested without CUDA: one line here, not Flower's empty actor pool
    except ConfigError as exc:
        print(f"fl-sim: error: {exc}", file=sys.stderr)
        return 2
    if "out-dir" not in overrides:  # flwr runs the ServerApp elsewhere; keep results under the repository
        overrides["out-dir"] = str((ROOT / str(cfg["out-dir"])).resolve())
    run_config = " ".join(f"{k}={toml_value(v)}" for k, v in overrides.items())
    cpus = float(cfg["client-num-cpus"])
    federation = (f"num-supernodes={cfg['num-supernodes']} "
                  f"client-resources-num-cpus={int(cpus) if cpus.is_integer() else cpus} "
                  f"client-resources-num-gpus={cfg['client-num-gpus']}")
    cmd = ["flwr", "run", ".", "local", "--federation-config", federation, "--stream"]
    if run_config:
        cmd[4:4] = ["--run-config", run_config]
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the fl-sim CLI: OpenMP threads sleep when idle
    before = superlink_pids()
    print("+", " ".join(cmd), flush=True)
    try:
        return subprocess.call(cmd, cwd=ROOT)
    finally:
        for pid in superlink_pids() - before:
            os.kill(pid, signal.SIGTERM)
        deadline = time.time() + 10
        while superlink_pids() - before and time.time() < deadline:
            time.sleep(0.2)
        for pid in superlink_pids() - before:
            os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
