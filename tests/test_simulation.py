"""End to end: the real console script runs a small Flower simulation (Ray backend) and writes a run directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import uuid
from pathlib import Path

import matplotlib.image as mpimg
import pytest


#: Marks the small run's processes: Ray's daemons inherit the environment of the driver that started them.
RUN_MARK = f"FL_SIM_TEST_RUN={uuid.uuid4().hex}"


def marked_ray_daemons() -> list[str]:
    """The Ray daemons (``raylet``, ``gcs_server``) alive now that the small run started (their environment holds
    :data:`RUN_MARK`); other jobs' simulations on the same machine are not counted."""
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()[1:]
    out = []
    for line in ps:
        pid, _, args = line.strip().partition(" ")
        if "raylet" not in args and "gcs_server" not in args:
            continue
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if RUN_MARK.encode() in env:
            out.append(line.strip())
    return out


def run_small(out: Path, *extra: str) -> subprocess.CompletedProcess:
    """``fl-sim run`` of the small federation (2 clients, 2 rounds, attacked every round) into ``out``, marked with
    :data:`RUN_MARK`; ``extra``: more arguments. Fails the test if the run fails."""
    exe = Path(sys.executable).with_name("fl-sim")
    proc = subprocess.run(
        [str(exe), "run", "num-supernodes=2", "num-server-rounds=2", "attack-every=1", "attack-iterations=60",
         "round-timeout=120", *extra, "--out", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, **dict([RUN_MARK.split("=", 1)])},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "run"
    return out, run_small(out)


def test_two_clients_two_rounds_write_summary(small_run):
    out, _ = small_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == 2
    assert 0.0 <= summary["final_accuracy"] <= 1.0 and summary["wall_time_s"] > 0
    assert len(summary["attacks"]) == 2
    for a in summary["attacks"]:
        assert {"round", "client", "attack", "psnr", "ssim", "mse", "label_accuracy", "time_s", "psnr_chance",
                "ssim_chance", "mse_chance", "num_images"} <= set(a)
        assert a["client"] == "0" and a["attack"] == "idlg"
    # round 1 attacks the untrained model's FedSGD update of one image: near-exact, far above chance
    assert summary["attacks"][0]["psnr"] > 30 > summary["attacks"][0]["psnr_chance"]
    assert summary["attack_means"]["succeeded"] == summary["attack_means"]["attacks"] == 2
    assert summary["attack_means"]["psnr_chance"] is not None and summary["attack_failures"] == {}


def test_run_directory_layout(small_run):
    out, _ = small_run
    cfg = tomllib.loads((out / "config.toml").read_text())
    assert cfg["num-supernodes"] == 2 and cfg["attack-iterations"] == 60
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2]
    assert len(lines[0]["clients"]) == 2 and all(c["train_time_s"] > 0 for c in lines[0]["clients"])
    for png in ["accuracy.png", "attacks/round_0001.png", "attacks/round_0002.png"]:
        assert mpimg.imread(out / png).ndim == 3
    report = (out / "report.md").read_text()
    assert "accuracy.png" in report and "attacks/round_0001.png" in report


def test_no_ray_process_left_behind(small_run):
    """The run stops the Ray it started: no raylet or gcs_server with the run's environment mark is left."""
    assert marked_ray_daemons() == []


def test_simulation_trains_exactly_like_a_plain_pytorch_loop(small_run):
    """Flower's FedAvg over Ray gives the same model as the same local training and averaging in one loop."""
    import importlib.util
    import tomllib

    out, _ = small_run
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("bench_main", root / "benchmarks" / "bench_main.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from clients.secrets import load_run_secret

    cfg = tomllib.loads((out / "config.toml").read_text())
    _, acc = bench.plain_loop(cfg, load_run_secret(out))  # the clients' draws need the run's client secret
    assert json.loads((out / "summary.json").read_text())["final_accuracy"] == pytest.approx(acc, abs=1e-9)


@pytest.fixture(scope="module")
def inprocess_run(small_run):
    """The small run again with ``sim-backend=inprocess`` and the Ray run's client secret."""
    from clients.secrets import load_run_secret

    ray_out, _ = small_run
    out = ray_out.parent / "inprocess"
    run_small(out, "sim-backend=inprocess", "--client-secret", str(load_run_secret(ray_out)))
    return out


def test_inprocess_backend_gives_the_ray_runs_results(small_run, inprocess_run):
    """The same run on the in-process backend: the same final model bit for bit, the same client metrics and the
    same attack scores as on Ray (only the times differ)."""
    import torch

    ray_out, _ = small_run
    a = torch.load(ray_out / "final_model.pt", weights_only=True)
    b = torch.load(inprocess_run / "final_model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (ray_out, inprocess_run))
    assert sb["status"] == "completed" and sb["final_accuracy"] == sa["final_accuracy"]
    scores = ("round", "client", "psnr", "ssim", "mse", "label_accuracy", "psnr_chance", "ssim_chance")
    assert [{k: x[k] for k in scores} for x in sb["attacks"]] == [{k: x[k] for k in scores} for x in sa["attacks"]]

    def clients(d):
        rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        return [sorted((c["partition_id"], c["num_examples"], c["train_loss"]) for c in r["clients"]) for r in rows]

    assert clients(inprocess_run) == clients(ray_out)
    assert tomllib.loads((inprocess_run / "config.toml").read_text())["sim-backend"] == "inprocess"
    assert marked_ray_daemons() == []


def test_inprocess_backend_never_starts_ray(tmp_path, monkeypatch):
    """``sim-backend=inprocess`` runs the federation without Ray: ``ray.init`` is never called."""
    import ray

    from fl_sim import simulation as sim
    from fl_sim.config import resolve

    def no_ray(*args, **kwargs):
        raise AssertionError("ray.init called by an in-process simulation")

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setattr(sim, "init_ray", no_ray)
    cfg = resolve({"num-supernodes": 2, "num-server-rounds": 1, "attack-every": 0, "sim-backend": "inprocess",
                   "device": "cpu", "out-dir": str(tmp_path), "run-name": "inproc"})
    run_dir = sim.run(cfg, client_secret=7)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert not ray.is_initialized()
