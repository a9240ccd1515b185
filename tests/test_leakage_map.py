"""benchmarks/leakage_map.py: the chance level, the headline figures, and a one-cell map written end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import leakage_map as lm  # noqa: E402


def test_the_chance_level_is_the_mean_images_psnr_against_each_image():
    rng = np.random.default_rng(0)
    truth = rng.random((3, 1, 8, 8))
    mean = rng.random((1, 8, 8))
    psnr, ssim = lm.chance_level(truth, mean)
    expected = np.mean([10 * np.log10(1 / np.mean((mean - t) ** 2)) for t in truth])
    assert psnr == pytest.approx(expected, rel=1e-9)
    assert lm.chance_level(np.stack([mean] * 2), mean)[1] == pytest.approx(1.0)
    assert -1 <= ssim < 0.5


def _cell(model, state, b, k, psnr, chance=10.0, best="idlg"):
    return {"model": model, "state": state, "batch": b, "steps": k, "images": b * k, "budget_s": 5.0,
            "attacks": {best: {"psnr": psnr}}, "best": best, "psnr": psnr, "ssim": 0.5, "label_accuracy": 1.0,
            "psnr_chance": chance, "ssim_chance": 0.1, "wall_s": 1.0}


def test_headline_and_paragraph_report_the_cells_figures():
    cells = [_cell("a", "round1", 1, 1, 40.0), _cell("a", "trained", 1, 1, 20.0),
             _cell("a", "round1", 4, 4, 11.0), _cell("a", "trained", 4, 4, 12.0, best="grnn")]
    head = lm.headline(cells, 60.0)
    assert head["cells"] == 4 and head["max_psnr"] == 40.0 and head["cells_above_30db"] == 1
    assert head["cells_within_3db_of_chance"] == 2 and head["mean_psnr_b1"] == 30.0
    assert head["mean_psnr_round1"] == 25.5 and head["mean_psnr_k4"] == 11.5
    text = lm.paragraph(cells, head)
    assert "30.0 dB at B = 1" in text and "a (round1, B = 1, K = 1): 40.0 dB by idlg" in text
    assert lm.table(cells).count("\n") == 5


def test_a_one_cell_map_runs_every_applicable_attack_and_writes_the_page(tmp_path):
    out, png = tmp_path / "leakage.md", tmp_path / "leakage.png"
    head = lm.main(["--models", "lenet-tanh,no-such-model", "--batch-sizes", "1", "--steps", "1",
                    "--states", "round1", "--budget", "8", "--out", str(out), "--png", str(png)])
    assert head["cells"] == 1 and head["scored"] == 1 and png.is_file()
    page = out.read_text()
    assert "'no-such-model' is not registered" in page and "| lenet-tanh | round1 | 1 | 1 | 1 |" in page
    assert json.loads(page.split("```json\n")[1].split("\n```")[0]) == head
    # iDLG recovers a round-1 B = 1 image of the default model far above the mean image
    assert head["max_psnr"] > 30 and head["cells_within_3db_of_chance"] == 0
    # the chance level is the whole training split's mean image against the client's image (about 11 dB on
    # Fashion-MNIST), not the client's own images' mean, which at B = 1 is the image itself (100 dB)
    row = next(line for line in page.splitlines() if line.startswith("| lenet-tanh | round1 | 1 | 1 | 1 |"))
    chance = float(row.split("|")[10])
    assert 5.0 < chance < 20.0, row
