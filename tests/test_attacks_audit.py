"""``fl-sim attack``: the one-shot audit writes attack.json and reconstruction.png, runs the real defenses through
the real client pipeline and server side (the attack sees the raw update, the defense's server step comes after
it) — Soteria, GradDefense and FedKL each lower iDLG's PSNR, and muting the FC layer undoes Soteria only — and
fails with exit code 2 and one line on bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fl_sim.audit import audit_dataset, audit_round
from fl_sim.cli import cli
from fl_sim.config import resolve
from fl_sim.task import contract
from fl_sim.task.datasets import load_dataset

runner = CliRunner()


def invoke(*args):
    return runner.invoke(cli, ["attack", *map(str, args)])


def test_dataset_sample_audit_writes_results(tmp_path):
    out = tmp_path / "a"
    res = invoke("--attack", "idlg", "--model", "lenet-tanh", "--dataset", "fashion-mnist", "--index", 11,
                 "--out", out, "attack-iterations=40")
    assert res.exit_code == 0, res.output
    rec = json.loads((out / "attack.json").read_text())
    for key in ("psnr", "ssim", "mse", "label_accuracy", "time_s", "iterations"):
        assert key in rec
    assert rec["psnr"] > 30 and rec["label_accuracy"] == 1.0 and rec["iterations"] <= 40
    assert (out / "reconstruction.png").stat().st_size > 1000


def test_image_file_audit_resizes_to_the_model_input(tmp_path):
    from skimage import data, io

    path = tmp_path / "cat.png"
    io.imsave(path, data.chelsea())  # 300×451 RGB, resized to 1×28×28 for fashion-mnist, 3×32×32 for cifar10
    res = invoke("--attack", "rgap", "--model", "lenet-tanh", "--image", path, "--label", 4, "--out",
                 tmp_path / "b")
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "b" / "attack.json").read_text())
    assert rec["input_shape"] == [3, 32, 32] and rec["psnr"] >= 40 and rec["true_labels"] == [4]
    res = invoke("--attack", "rgap", "--model", "lenet-tanh", "--image", path, "--dataset", "fashion-mnist",
                 "--out", tmp_path / "c")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "c" / "attack.json").read_text())["input_shape"] == [1, 28, 28]


def audit_psnr(model, defense, index=11, **keys):
    """iDLG's PSNR on the update one client sends for training image ``index`` under ``defense`` (the real client
    pipeline and server side: :func:`fl_sim.audit.audit_round`), with the strategy, reply and aggregate."""
    cfg = resolve({"attack": "idlg", "model": model, "defense": defense, "attack-iterations": 30, "batch-size": 1,
                   **keys})
    ds = load_dataset("fashion-mnist")
    strategy, reply, aggregate = audit_round(cfg, audit_dataset("fashion-mnist", ds.x_train[index:index + 1],
                                                                ds.y_train[index:index + 1]))
    return strategy.last_record["attacks"][0], strategy, reply, aggregate


# Thresholds below come from measured values (iDLG, 30-60 L-BFGS steps, model lenet, Fashion-MNIST images 11, 3 and
# 17; one client, round 1): none 82.7-84.8 dB; soteria 4.8-5.4 dB, soteria with attack-ignore-layers=fc 85.5-90.3 dB;
# graddefense 9.6-11.2 dB, graddefense muted 8.3-11.3 dB. Asserted: leaks > 40 dB, stopped < 20 dB (soteria < 15).

@pytest.fixture(scope="module")
def lenet_clean():
    return audit_psnr("lenet", "none")[0]


def test_soteria_lowers_idlg_and_the_muted_attack_restores_it(lenet_clean):
    plain = audit_psnr("lenet", "soteria")[0]
    muted = audit_psnr("lenet", "soteria", **{"attack-ignore-layers": "fc"})[0]
    assert lenet_clean["psnr"] > 40 and muted["psnr"] > 40 and muted["label_accuracy"] == 1.0
    assert plain["psnr"] < 15


def test_graddefense_lowers_idlg_the_muted_attack_does_not_help_and_compensation_comes_after_the_attack(
        lenet_clean):
    plain, strategy, reply, aggregate = audit_psnr("lenet", "graddefense")
    muted = audit_psnr("lenet", "graddefense", **{"attack-ignore-layers": "fc"})[0]
    assert lenet_clean["psnr"] > 40
    assert plain["psnr"] < 20 and muted["psnr"] < 20  # the noisy slices move at random: muting fc buys nothing
    # the attack saw the raw defended update; the server's compensation ran on the aggregate afterwards
    payload = strategy.attack_payload(reply)
    sent = payload.global_state
    returned = reply.content[contract.ARRAYS].to_torch_state_dict()
    assert all(torch.equal(payload.update[k], returned[k] - sent[k]) for k in payload.update)
    stepped = aggregate.to_torch_state_dict()
    assert any(not torch.equal(stepped[k], returned[k]) for k in payload.update)  # one reply: FedAvg = the reply


def test_fedkl_lowers_the_leak_against_an_attacker_that_matches_the_lock_layers():
    """``defense=none`` vs ``fedkl`` on the same ``lenet-kl``, the attacker matching every layer, lock layers
    included (``attack-skip-private=false``). Measured (images 11, 3, 17): iDLG explains the undefended gradient
    (relative objective ~2e-9) yet scores only 13.6-24.3 dB, because BatchNorm(affine=False) after the first
    convolution leaves the image's brightness and contrast undetermined; under FedKL it does not explain the
    gradient (relative objective ~0.9) and scores 0.7-1.2 dB less (12.8-23.1 dB). Inverting Gradients (300 steps,
    image 11) shows the gap in PSNR: 20.0 dB without defense, 12.2 dB with FedKL. Asserted with margin: iDLG's
    objective < 1e-6 vs > 1e-2 and PSNR lower; IG at least 3 dB lower."""
    keys = {"attack-skip-private": False, "attack-time-limit": 30.0}
    clean = audit_psnr("lenet-kl", "none", **keys)[0]
    locked = audit_psnr("lenet-kl", "fedkl", **{**keys, "attack-iterations": 15})[0]
    assert clean["relative_objective"] < 1e-6 and locked["relative_objective"] > 1e-2
    assert locked["psnr"] < clean["psnr"]
    ig = {**keys, "attack": "ig", "attack-iterations": 300}
    assert audit_psnr("lenet-kl", "fedkl", **ig)[0]["psnr"] < audit_psnr("lenet-kl", "none", **ig)[0]["psnr"] - 3


@pytest.mark.parametrize("args,needle", [
    (["--attack", "nope", "--model", "lenet", "--dataset", "fashion-mnist", "--index", 0], "attack='nope'"),
    (["--model", "lenet", "--dataset", "fashion-mnist", "--index", 10**6], "--index=1000000 is not allowed"),
    (["--model", "lenet", "--dataset", "fashion-mnist"], "give either --image"),
    (["--model", "lenet", "--image", "/nonexistent.png"], "cannot be read"),
    (["--attack", "rgap", "--model", "cnn", "--dataset", "fashion-mnist", "--index", 0], "ReLU"),
    (["--model", "lenet", "--dataset", "fashion-mnist", "--index", 0, "attack-ignore-layers=zz"], "zz"),
    (["--model", "lenet", "--dataset", "fashion-mnist", "--index", 0, "lr=-1"], "lr=-1"),
])
def test_bad_input_is_one_line_and_exit_2(args, needle):
    res = invoke(*args)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("fl-sim: error:") and needle in lines[0], res.output


def test_load_images_handles_grey_and_rgba(tmp_path):
    from skimage import io

    from fl_sim.audit import load_images

    grey = (np.arange(40 * 50) % 256).astype(np.uint8).reshape(40, 50)
    rgba = np.dstack([grey, grey, grey, np.full_like(grey, 255)])
    io.imsave(tmp_path / "g.png", grey)
    io.imsave(tmp_path / "r.png", rgba)
    imgs = load_images([tmp_path / "g.png", tmp_path / "r.png"], (3, 32, 32))
    assert imgs.shape == (2, 32, 32, 3) and imgs.dtype == np.uint8
    assert load_images([tmp_path / "r.png"], (1, 28, 28)).shape == (1, 28, 28, 1)
