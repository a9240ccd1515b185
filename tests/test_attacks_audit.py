"""``fl-sim attack``: the one-shot audit writes attack.json and reconstruction.png, runs the defense (the attack
sees the raw update) and then its server-side step, and fails with exit code 2 and one line on bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from typer.testing import CliRunner

from clients.defenses import DEFENSES, Defense
from fl_sim.cli import cli
from strategies.steps import SERVER_STEPS

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


@pytest.fixture
def zero_fc_defense():
    """A temporary defense that withholds the classifier layer's weight gradient, and a server step that counts its
    calls (``calls`` holds the number of replies of each call) and wipes the aggregate: an attack that saw the
    stepped model instead of the raw update could not reconstruct anything."""
    calls = []

    def zero_fc(grads, ctx):
        return [torch.zeros_like(g) if n == "fc.weight" else g for n, g in zip(ctx.names, grads)]

    def server_step(arrays, replies, sent, params):
        calls.append(len(replies))
        return ArrayRecord({k: torch.zeros_like(v) for k, v in arrays.to_torch_state_dict().items()})

    DEFENSES.register("zero-fc", Defense("test: zero the fc weight gradient", zero_fc))
    try:
        SERVER_STEPS.register("zero-fc", server_step)
        try:
            yield calls
        finally:
            SERVER_STEPS.unregister("zero-fc")
    finally:
        DEFENSES.unregister("zero-fc")


def test_defense_and_its_server_step_are_applied(tmp_path, zero_fc_defense):
    calls = zero_fc_defense
    args = ["--attack", "idlg", "--model", "lenet", "--dataset", "fashion-mnist", "--index", 11, "--defense",
            "zero-fc", "attack-iterations=40"]
    res = invoke(*args, "--out", tmp_path / "d")
    assert res.exit_code == 0, res.output
    plain = json.loads((tmp_path / "d" / "attack.json").read_text())
    assert calls == [1]  # the server step ran once, on the one reply (after the attack)
    assert plain["defense"] == "zero-fc"
    res = invoke(*args, "--out", tmp_path / "e", "attack-ignore-layers=fc.weight")
    assert res.exit_code == 0, res.output
    muted = json.loads((tmp_path / "e" / "attack.json").read_text())
    assert calls == [1, 1]
    # the attack saw the raw (defended) update: muting the zeroed layer restores the leak
    assert plain["psnr"] < 20 < 30 < muted["psnr"]


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
