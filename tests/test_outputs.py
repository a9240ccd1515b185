"""What a run directory holds for the tools researchers already use: TensorBoard event files, reconstructions.npz,
final_model.pt, provenance in summary.json, and ``fl-sim export`` (breaching's server_payload / shared_data).

One real ``fl-sim run num-server-rounds=5 attack-every=2`` (2 clients, Ray) is shared by the end-to-end tests; the
recorder and exporter units run without Flower."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fl_sim.task.datasets import load_dataset, to_tensor
from fl_sim.task.models import build_model, evaluate
from strategies.metrics import psnr, ssim

FL_SIM = str(Path(sys.executable).with_name("fl-sim"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs") / "run"
    proc = subprocess.run([FL_SIM, "run", "num-server-rounds=5", "attack-every=2", "num-supernodes=2",
                           "attack-iterations=40", "round-timeout=120", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


# -- TensorBoard ------------------------------------------------------------------------------------------------------
def test_event_files_hold_the_round_scalars_of_metrics_jsonl(run_dir, events):
    assert list(run_dir.glob("events.out.tfevents.*"))
    tags = set(events.Tags()["scalars"])
    assert {"test/accuracy", "test/loss", "time/round_s", "train/loss", "lr", "attack/psnr", "attack/ssim",
            "attack/label_accuracy", "attack/time_s"} <= tags
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for tag, field in (("test/accuracy", "accuracy"), ("test/loss", "loss"), ("time/round_s", "round_time_s")):
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [1, 2, 3, 4, 5]
        np.testing.assert_allclose([v for _, v in got], [r[field] for r in lines], rtol=1e-6)


def test_event_files_hold_each_attack_score_at_its_round(events, summary):
    attacks = summary["attacks"]
    assert [a["round"] for a in attacks] == [1, 3, 5]
    for tag, field in (("attack/psnr", "psnr"), ("attack/ssim", "ssim"), ("attack/label_accuracy", "label_accuracy")):
        got = events.Scalars(tag)
        assert [e.step for e in got] == [1, 3, 5]
        np.testing.assert_allclose([e.value for e in got], [a[field] for a in attacks], rtol=1e-6)
    for a in attacks:  # a chance level is written whenever the record carries one (psnr_chance, ...)
        for key in (k for k in a if k.endswith("_chance")):
            assert f"attack/{key}" in events.Tags()["scalars"]


def test_event_files_hold_truth_above_reconstruction_for_each_attacked_round(run_dir, events):
    from skimage import io as skio

    images = events.Images("attack/truth_above_reconstruction")
    assert [e.step for e in images] == [1, 3, 5]
    with np.load(run_dir / "reconstructions.npz") as z:
        for e in images:
            img = skio.imread(io.BytesIO(e.encoded_image_string)).astype(np.float64) / 255.0
            img = img[..., 0] if img.ndim == 3 else img
            m = z[f"round_{e.step:04d}_match"]
            truth = z[f"round_{e.step:04d}_truth"][m[0, 1], 0]
            rec = np.clip(z[f"round_{e.step:04d}_reconstruction"][m[0, 0], 0], 0, 1)
            h, w = truth.shape
            assert (e.height, e.width) == (2 * h + 2, w)
            np.testing.assert_allclose(img[:h, :w], truth, atol=1 / 255 + 1e-9)  # top row: the truth
            np.testing.assert_allclose(img[h + 2:, :w], rec, atol=1 / 255 + 1e-9)  # below: its reconstruction


def test_event_files_hold_each_attacks_objective_against_iteration(events):
    for rnd in (1, 3, 5):
        trace = events.Scalars(f"attack/objective/round_{rnd:04d}")
        steps = [e.step for e in trace]
        assert len(steps) >= 1 and steps == sorted(set(steps))
        assert all(np.isfinite(e.value) and e.value >= 0 for e in trace)


# -- raw results ------------------------------------------------------------------------------------------------------
def test_reconstructions_npz_holds_the_scored_arrays(run_dir, summary):
    data = load_dataset("fashion-mnist")
    with np.load(run_dir / "reconstructions.npz") as z:
        assert z["rounds"].tolist() == [1, 3, 5]
        for a in summary["attacks"]:
            p = f"round_{a['round']:04d}_"
            rec, truth = z[p + "reconstruction"], z[p + "truth"]
            assert rec.dtype == truth.dtype == np.float32 and rec.ndim == truth.ndim == 4
            assert rec.shape[1:] == truth.shape[1:] == (1, 28, 28)
            assert 0 <= rec.min() and rec.max() <= 1 and 0 <= truth.min() and truth.max() <= 1
            idx = z[p + "sample_indices"]
            # the truth is the client's sample, the true labels its labels, the recovered labels the record's
            np.testing.assert_array_equal(truth, data.x_train[idx].transpose(0, 3, 1, 2) / np.float32(255))
            np.testing.assert_array_equal(z[p + "true_labels"], data.y_train[idx])
            m = z[p + "match"]
            assert m.dtype == np.int64 and m.shape == (min(len(rec), len(truth)), 2)
            assert z[p + "labels"][m[:, 0]].tolist() == a["labels"]
            assert z[p + "true_labels"][m[:, 1]].tolist() == a["true_labels"]
            # the matching is the one scored: the record's PSNR/SSIM come back from the pairs it names
            pairs = [(rec[i], truth[j]) for i, j in m]
            assert np.mean([psnr(r, t) for r, t in pairs]) == pytest.approx(a["psnr"], rel=1e-9)
            assert np.mean([ssim(r, t) for r, t in pairs]) == pytest.approx(a["ssim"], rel=1e-9)


def test_final_model_loads_into_the_model_of_that_name_and_scores_the_final_accuracy(run_dir, summary):
    state = torch.load(run_dir / "final_model.pt", weights_only=True)
    model = build_model("lenet-tanh", (1, 28, 28), 10)
    model.load_state_dict(state, strict=True)
    data = load_dataset("fashion-mnist")
    _, acc = evaluate(model, data.x_test, data.y_test, data.mean, data.std, torch.device("cpu"))
    assert acc == pytest.approx(summary["final_accuracy"], abs=1e-12)


def test_summary_holds_the_provenance(summary):
    from importlib import metadata

    p = summary["provenance"]
    assert p["python"] == ".".join(map(str, sys.version_info[:3]))
    assert p["torch"] == torch.__version__ and p["numpy"] == np.__version__
    assert p["flwr"] == metadata.version("flwr") and p["fl_sim_version"] == metadata.version("fl-sim")
    assert p["device"] == ("cpu" if not torch.cuda.is_available() else p["device"])  # device=auto: CPU here
    assert p["device"] == p["attack_device"] and p["torch_threads"] >= 1 and p["cpu_affinity"] >= 1
    assert p["command"].startswith("fl-sim run num-server-rounds=5 attack-every=2")
    assert p["git_commit"] is None or len(p["git_commit"]) == 40


# -- fl-sim export ---------------------------------------------------------------------------------------------------
def test_export_writes_breachings_pair_with_the_gradients_of_update_to_gradient(run_dir, summary, tmp_path):
    from attacker.payload import update_to_gradient
    from fl_sim.results import intercepted_path, load_payload

    from typer.testing import CliRunner

    from fl_sim.cli import cli

    out = tmp_path / "r3.pt"
    res = CliRunner().invoke(cli, ["export", str(run_dir), "--round", "3", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert res.output.strip().splitlines()[-1] == str(out.resolve())
    pair = torch.load(out, weights_only=True)
    assert set(pair) == {"server_payload", "shared_data", "fl_sim"}
    (server,), (shared,) = pair["server_payload"], pair["shared_data"]
    assert set(server) == {"parameters", "buffers", "metadata"} and set(shared) == {"gradients", "buffers", "metadata"}
    meta = server["metadata"]
    assert meta["shape"] == [1, 28, 28] and meta["classes"] == 10 and meta["modality"] == "vision"
    assert meta["name"] == "fashion-mnist" and len(meta["mean"]) == len(meta["std"]) == 1
    assert shared["metadata"] == {"num_data_points": 1, "labels": None, "local_hyperparams": None}

    model = build_model("lenet-tanh", (1, 28, 28), 10)
    names = [n for n, _ in model.named_parameters()]
    payload, raw = load_payload(intercepted_path(run_dir, 3))
    assert pair["fl_sim"]["parameter_names"] == names and raw["client"] == "0"
    assert [tuple(p.shape) for p in server["parameters"]] == [tuple(p.shape) for p in model.parameters()]
    for n, p in zip(names, server["parameters"]):
        assert torch.equal(p, payload.global_state[n])
    expected = update_to_gradient([payload.update[n] for n in names], payload.train_config.lr,
                                  payload.train_config.steps(payload.num_examples))
    assert len(shared["gradients"]) == len(expected)
    for g, e in zip(shared["gradients"], expected):
        assert torch.equal(g, e)

    # independently: under FedSGD (B = 1) they are the gradient of the client's true sample at the sent parameters
    with np.load(run_dir / "reconstructions.npz") as z:
        idx = z["round_0003_sample_indices"]
    data = load_dataset("fashion-mnist")
    model.load_state_dict(dict(zip(names, server["parameters"])))
    loss = torch.nn.functional.cross_entropy(model(to_tensor(data.x_train[idx], data.mean, data.std)),
                                             torch.as_tensor(data.y_train[idx]))
    for g, t in zip(shared["gradients"], torch.autograd.grad(loss, list(model.parameters()))):
        torch.testing.assert_close(g, t, rtol=2e-3, atol=1e-6)


def test_export_of_a_round_that_was_not_attacked_exits_2_naming_the_saved_rounds(run_dir):
    from typer.testing import CliRunner

    from fl_sim.cli import cli

    res = CliRunner().invoke(cli, ["export", str(run_dir), "--round", "2"])
    assert res.exit_code == 2
    assert "--round=2 is not allowed" in res.output and "rounds 1, 3, 5" in res.output


# -- units without Flower -------------------------------------------------------------------------------------------
def _payload(mode="fedavg", steps=3, lr=0.05):
    from attacker import AttackPayload
    from fl_sim.task.contract import TrainConfig

    torch.manual_seed(0)
    model = build_model("cnn", (1, 28, 28), 10)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    update = {n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
    return AttackPayload("cnn", (1, 28, 28), 10, (0.5,), (0.25,), state, update, 12,
                         TrainConfig(mode, lr, 4, local_steps=steps))


def test_breaching_pair_of_a_multi_step_update_is_its_mean_gradient():
    from fl_sim.cli.export import breaching_pair

    payload = _payload()
    pair = breaching_pair(payload, 7, "2")
    info = pair["fl_sim"]
    assert info["local_steps"] == 3 and info["mode"] == "fedavg" and info["round"] == 7
    names = info["parameter_names"]
    for g, n in zip(pair["shared_data"][0]["gradients"], names):
        torch.testing.assert_close(g, -payload.update[n] / (0.05 * 3), rtol=1e-6, atol=0)  # −Δ / (lr·K)
    for u, n in zip(info["update"], names):
        assert torch.equal(u, payload.update[n])
    assert pair["shared_data"][0]["metadata"]["num_data_points"] == 12
    assert pair["server_payload"][0]["buffers"] is None and pair["shared_data"][0]["buffers"] is None


def test_a_saved_intercepted_update_loads_back_as_the_same_payload(tmp_path):
    from fl_sim.results import load_payload, save_payload

    payload = _payload("fedsgd", 0, 0.1)
    save_payload(tmp_path / "u.pt", payload, 4, "1")
    back, raw = load_payload(tmp_path / "u.pt")
    assert raw["round"] == 4 and raw["client"] == "1" and back.train_config == payload.train_config
    assert back.model_name == "cnn" and back.num_examples == 12 and back.input_shape == (1, 28, 28)
    for k in payload.update:
        assert torch.equal(back.update[k], payload.update[k])
    for k in payload.global_state:
        assert torch.equal(back.global_state[k], payload.global_state[k])
    torch.save({"format": "other"}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not an fl-sim intercepted-update file"):
        load_payload(tmp_path / "x.pt")


def test_round_scalars_include_spent_epsilon_and_chance_levels():
    from fl_sim.results import round_scalars

    rec = {"round": 3, "accuracy": None, "loss": None, "lr": 0.1, "round_time_s": 0.2,
           "clients": [{"train_loss": 1.0, "dp_epsilon": 2.5}, {"train_loss": 3.0, "dp_epsilon": 4.0}],
           "attacks": [{"psnr": 12.0, "ssim": 0.4, "psnr_chance": 9.5, "ssim_chance": 0.1, "error": None}]}
    out = round_scalars(rec)
    assert out["privacy/epsilon"] == 4.0 and out["train/loss"] == 2.0
    assert out["attack/psnr_chance"] == 9.5 and out["attack/ssim_chance"] == 0.1 and out["attack/psnr"] == 12.0
    assert "test/accuracy" not in out and "attack/label_accuracy" not in out


def test_a_resumed_recorder_drops_what_came_after_the_checkpoint(tmp_path):
    """Resuming after round 2: TensorBoard forgets the old process's round 3, reconstructions.npz keeps rounds <= 2."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fl_sim.results import RunRecorder

    arrays = {"reconstruction": np.zeros((1, 1, 2, 2), np.float32), "match": np.zeros((1, 2), np.int64)}
    rec = RunRecorder(tmp_path, {"model": "x"})
    for rnd in (1, 2, 3):
        rec.log_round({"round": rnd, "accuracy": 0.1 * rnd})
        rec.save_attack_arrays(rnd, "idlg", arrays)
    rec.close()
    rec = RunRecorder(tmp_path, {"model": "x"}, resume_after=2)
    rec.log_round({"round": 3, "accuracy": 0.9})
    rec.save_attack_arrays(4, "idlg", arrays)
    rec.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("test/accuracy")] == [(1, 0.1), (2, 0.2), (3, 0.9)]
    with np.load(tmp_path / "reconstructions.npz") as z:
        assert z["rounds"].tolist() == [1, 2, 4] and "round_0003_match" not in z.files
