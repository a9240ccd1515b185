"""Scoring that cannot flatter the attack (issue 11, section 3).

* an attack reconstructs as many images as the update holds, or the run is refused before it starts; matching is
  only between sets of equal size;
* every score carries its chance level (the training split's mean image, matched the same way), checked against a
  hand-written numpy reference;
* SSIM is Wang et al. (2004) with a Gaussian window of σ = 1.5 and population covariances, checked against an
  independent re-implementation of torchmetrics' definition (scipy's 2-D convolution) and known identities;
* declared attack failures are counted; anything else propagates.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.signal import convolve2d
from skimage.metrics import structural_similarity

from attacker import ATTACKS, Attack, AttackResult, Budget, BudgetExhausted, NotApplicable, images_in_update
from attacker.payload import SERVER_CONFIG, AttackError
from clients.training import batch_schedule
from fl_sim.audit import audit_dataset, audit_round, run_audit
from fl_sim.config import check_attack_images, check_feasible, resolve
from fl_sim.report import write_run_report
from fl_sim.results import summarize
from fl_sim.sweep.report import write_sweep_report
from fl_sim.task.config import TaskConfig
from fl_sim.task.contract import SAMPLE_INDICES, TrainConfig
from fl_sim.task.datasets import to_tensor
from fl_sim.task.keys import ConfigError
from strategies.evaluator import chance_reference, score_reconstruction
from strategies.metrics import chance_scores, gaussian_ssim, match, score, ssim

EXE = Path(sys.executable).with_name("fl-sim")


# --- an independent SSIM: torchmetrics' definition, re-implemented with scipy ------------------------------------
def reference_ssim(a: np.ndarray, b: np.ndarray, size: int = 11, sigma: float = 1.5) -> float:
    """SSIM as torchmetrics' ``structural_similarity_index_measure`` computes it (``_ssim_update``): a 2-D Gaussian
    kernel built as the outer product of ``exp(-(d/σ)²/2)`` over ``d = (1−k)/2 … (k−1)/2``, normalised; local
    means, variances and covariance as ``E[·]`` over the window (population); ``C1 = (0.01·L)²``, ``C2 = (0.03·L)²``
    with ``L = 1``; the map over the positions where the kernel fits (torchmetrics pads by reflection and crops the
    same border), averaged over positions and channels. ``a``, ``b``: ``(C, H, W)`` in [0, 1]."""
    d = np.arange((1 - size) / 2, (1 + size) / 2, 1.0)
    g = np.exp(-((d / sigma) ** 2) / 2)
    g /= g.sum()
    kernel = np.outer(g, g)
    c1, c2 = 0.01**2, 0.03**2
    maps = []
    for x, y in zip(np.asarray(a, np.float64), np.asarray(b, np.float64)):
        def e(t):
            return convolve2d(t, kernel[::-1, ::-1], mode="valid")  # correlation with the kernel
        mx, my = e(x), e(y)
        sxx, syy, sxy = e(x * x) - mx**2, e(y * y) - my**2, e(x * y) - mx * my
        maps.append(((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2)))
    return float(np.mean(maps))


def _pair(rng, shape, noise=0.15):
    a = rng.random(shape)
    return a, np.clip(a + noise * rng.standard_normal(shape), 0, 1)


def test_ssim_is_wang_et_al_with_a_gaussian_window_as_torchmetrics_defines_it(fmnist):
    rng = np.random.default_rng(0)
    x = fmnist.x_train[:6].transpose(0, 3, 1, 2) / 255.0  # real 1×28×28 images
    for a, b in [(x[0], x[1]), (x[2], x[3]), (x[4], np.clip(x[4] + 0.2 * rng.standard_normal(x[4].shape), 0, 1))]:
        assert ssim(a, b) == pytest.approx(reference_ssim(a, b), abs=1e-9)
    a, b = _pair(rng, (3, 32, 32))  # CIFAR's shape: channels averaged
    assert ssim(a, b) == pytest.approx(reference_ssim(a, b), abs=1e-9)
    from skimage.data import lfw_subset

    faces = lfw_subset()[:2]  # 25×25: still the full 11×11 window
    assert ssim(faces[0][None], faces[1][None]) == pytest.approx(reference_ssim(faces[0][None], faces[1][None]),
                                                                 abs=1e-9)


def test_ssim_identities_and_it_is_not_scikit_images_default(fmnist):
    x = fmnist.x_train[:2].transpose(0, 3, 1, 2) / 255.0
    a, b = x[0], x[1]
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    assert ssim(a, b) == pytest.approx(ssim(b, a), abs=1e-12) and ssim(a, b) < 1
    assert ssim(a, 1.0 - a) < 0  # the negated image: anti-correlated structure
    # scikit-image's default (uniform 7×7 window, sample covariance) is a different number for the same pair
    default = structural_similarity(a, b, data_range=1.0, channel_axis=0)
    assert abs(default - ssim(a, b)) > 1e-3


@pytest.mark.parametrize("side", [1, 2, 3, 4, 7, 8, 10])
def test_ssim_of_images_smaller_than_the_window(side):
    """Below 11 pixels the window is the same σ = 1.5 Gaussian truncated to the largest odd size that fits."""
    rng = np.random.default_rng(side)
    a, b = _pair(rng, (2, side, side + 3))
    win = side if side % 2 else side - 1
    value = ssim(a, b)
    assert math.isfinite(value) and -1 <= value <= 1
    assert value == pytest.approx(reference_ssim(a, b, size=win), abs=1e-9)
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)


def test_the_truncated_window_path_is_the_full_definition_at_eleven_pixels():
    rng = np.random.default_rng(3)
    a, b = _pair(rng, (1, 28, 28))
    assert gaussian_ssim(a, b, 11) == pytest.approx(ssim(a, b), abs=1e-9)
    with pytest.raises(ValueError):
        gaussian_ssim(a, b, 10)


# --- equal sizes only -------------------------------------------------------------------------------------------
def test_an_unrelated_image_can_no_longer_be_scored_against_a_whole_partition(fmnist):
    """Main matched B' reconstructions against every image a FedAvg update used (~1,000): an unrelated real image
    then picked its nearest neighbour and scored 15.5 dB instead of ~8 dB against its own image. The nearest of
    1,000 really is far closer than a random one (the effect is real), and scoring refuses unequal sets."""
    x = fmnist.x_train[:1001].astype(np.float64).transpose(0, 3, 1, 2) / 255.0
    unrelated, partition = x[:1], x[1:]
    mse = ((partition - unrelated) ** 2).reshape(len(partition), -1).mean(-1)
    nearest, typical = 10 * np.log10(1 / mse.min()), float(np.mean(10 * np.log10(1 / mse)))
    assert nearest > typical + 5  # best-of-1000 flatters by more than 5 dB
    with pytest.raises(ValueError, match="equal size"):
        score(unrelated, partition)
    with pytest.raises(ValueError, match="equal size"):
        match(unrelated, partition)
    s = score(unrelated, partition[:1])
    assert s["psnr"] == pytest.approx(10 * np.log10(1 / mse[0]))


def test_the_evaluator_refuses_a_reconstruction_of_another_size(fmnist):
    images = to_tensor(fmnist.x_train[:2], fmnist.mean, fmnist.std)
    result = AttackResult(images[:1], torch.tensor([0]), 1, 0.0, 0.0)
    with pytest.raises(ValueError, match="update holds 2"):
        score_reconstruction(fmnist, result, {SAMPLE_INDICES: [0, 1]})


@pytest.mark.parametrize("tc,n", [
    (TrainConfig("fedsgd", 0.1, 4), 4),
    (TrainConfig("fedavg", 0.1, 3, local_steps=4), 20),   # K·B = 12 <= 20: one pass
    (TrainConfig("fedavg", 0.1, 5, local_steps=7), 20),   # K·B = 35 > 20 = 4·5: the first pass used all 20
    (TrainConfig("fedavg", 0.1, 3, local_epochs=2), 20),  # full passes
])
def test_images_in_update_is_what_the_client_really_uses(tc, n):
    partition = np.arange(100, 100 + n)
    counts = {len(np.unique(np.concatenate(batch_schedule(partition, tc, np.random.default_rng(s)))))
              for s in range(20)}
    assert counts == {images_in_update(tc, tc.num_examples(n))}


def test_an_undetermined_image_count_is_refused():
    tc = TrainConfig("fedavg", 0.1, 3, local_steps=4)  # K·B = 12 > 10, and 3 does not divide 10
    counts = {len(np.unique(np.concatenate(batch_schedule(np.arange(10), tc, np.random.default_rng(s)))))
              for s in range(40)}
    assert counts == {9, 10}  # the client's draw decides: the server cannot know
    with pytest.raises(ValueError, match="between 9 and 10"):
        images_in_update(tc, 10)
    cfg = resolve({"mode": "fedavg", "local-steps": 4, "batch-size": 3, "attack": "ig-fedavg"})
    with pytest.raises(ConfigError, match="between 9 and 10"):
        check_attack_images(cfg, {0: 10})


def test_the_run_check_compares_the_attack_with_the_update():
    task = TaskConfig.from_config(resolve({"mode": "fedavg", "local-steps": 3, "batch-size": 4}))
    assert ATTACKS["idlg"].images(task, 100) == 4 and ATTACKS["ig-fedavg"].images(task, 100) == 12
    fedavg = resolve({"mode": "fedavg", "local-epochs": 1, "attack": "idlg"})
    with pytest.raises(ConfigError) as err:
        check_attack_images(fedavg, {0: 1000, 1: 1000})
    msg = str(err.value)
    assert "\n" not in msg and "attack='idlg'" in msg and "mode='fedavg'" in msg and "holds 1000 images" in msg
    check_attack_images({**fedavg, "attack-every": 0}, {0: 1000})  # no attack, nothing to refuse
    check_attack_images(resolve({"mode": "fedavg", "local-steps": 2, "batch-size": 3, "attack": "ig-fedavg"}),
                        {0: 1000})
    with pytest.raises(ConfigError, match="holds 6 images and ig reconstructs 3"):
        check_attack_images(resolve({"mode": "fedavg", "local-steps": 2, "batch-size": 3, "attack": "ig"}), {0: 50})
    # a fixed victim: only its partition matters
    check_attack_images(resolve({"mode": "fedavg", "local-steps": 4, "batch-size": 3, "attack": "ig-fedavg",
                                 "victim": "1"}), {0: 10, 1: 12})


def test_check_feasible_refuses_fedavg_epochs_with_idlg():
    with pytest.raises(ConfigError, match="holds 1000 images and idlg reconstructs 1"):
        check_feasible(resolve({"mode": "fedavg", "local-epochs": 1, "attack": "idlg"}))


def _session_processes(sid: int) -> list[str]:
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if int((d / "stat").read_text().rsplit(")", 1)[1].split()[3]) == sid:
                out.append((d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except (OSError, IndexError, ValueError):
            continue
    return out


def test_fl_sim_run_fedavg_with_idlg_exits_2_with_one_line_before_ray_starts(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([str(EXE), "run", "mode=fedavg", "local-epochs=1", "attack=idlg", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    seen: set[str] = set()
    while proc.poll() is None:  # every process the command starts shares its session
        seen.update(_session_processes(proc.pid))
        time.sleep(0.1)
    stdout, stderr = proc.communicate()
    assert proc.returncode == 2, stdout + stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fl-sim: error: attack='idlg'"), stderr
    assert "mode='fedavg'" in lines[0] and "1000 images" in lines[0]
    assert not [c for c in seen if "ray" in c.lower()] and not out.exists()


# --- chance levels ----------------------------------------------------------------------------------------------
def test_chance_level_is_the_mean_image_scored_by_hand(fmnist):
    """A numpy reference, independent of the code under test: the per-pixel mean of the training split, and
    10·log10(1/MSE) per true image, averaged."""
    mean = fmnist.x_train.astype(np.float64).mean(axis=0).transpose(2, 0, 1) / 255.0
    truth = fmnist.x_train[[5, 42, 777]].astype(np.float64).transpose(0, 3, 1, 2) / 255.0
    mse = ((truth - mean) ** 2).reshape(3, -1).mean(-1)
    ref = chance_reference(fmnist)
    assert ref.shape == (1, 28, 28) and np.abs(ref - mean).max() < 1e-6
    got = chance_scores(ref, truth.astype(np.float32))
    assert got["mse_chance"] == pytest.approx(float(mse.mean()), rel=1e-5)
    assert got["psnr_chance"] == pytest.approx(float(np.mean(10 * np.log10(1 / mse))), abs=1e-4)
    assert got["ssim_chance"] == pytest.approx(np.mean([reference_ssim(mean, t) for t in truth]), abs=1e-5)
    assert 8 < got["psnr_chance"] < 16  # Fashion-MNIST's mean image: far from exact, far from nothing


def test_every_scored_attack_record_carries_its_chance_level(fmnist):
    """Through the evaluator: a perfect reconstruction is far above chance; the mean image itself, sent as the
    reconstruction, scores exactly its chance level."""
    idx = [3, 10]
    images = to_tensor(fmnist.x_train[idx], fmnist.mean, fmnist.std)
    perfect = score_reconstruction(fmnist, AttackResult(images.flip(0), torch.tensor([0, 0]), 1, 0.0, 0.0),
                                   {SAMPLE_INDICES: idx})
    assert perfect["psnr"] == 100.0 and perfect["ssim"] == pytest.approx(1.0)
    assert perfect["psnr_chance"] < 20 and perfect["ssim_chance"] < 0.9
    mean = torch.from_numpy(chance_reference(fmnist))[None].repeat(2, 1, 1, 1)
    blank = (mean - torch.tensor(fmnist.mean).view(1, -1, 1, 1)) / torch.tensor(fmnist.std).view(1, -1, 1, 1)
    s = score_reconstruction(fmnist, AttackResult(blank, torch.tensor([0, 0]), 1, 0.0, 0.0), {SAMPLE_INDICES: idx})
    assert s["psnr"] == pytest.approx(s["psnr_chance"], abs=1e-3)
    assert s["ssim"] == pytest.approx(s["ssim_chance"], abs=1e-4)


def test_the_audit_writes_chance_levels_and_does_not_use_the_audited_images_as_reference(fmnist, tmp_path):
    cfg = resolve({"attack": "idlg", "model": "lenet", "attack-iterations": 2})
    data = audit_dataset("fashion-mnist", fmnist.x_train[7:8], fmnist.y_train[7:8])
    rec = run_audit(cfg, data, tmp_path, reference=fmnist)
    saved = json.loads((tmp_path / "attack.json").read_text())
    truth = fmnist.x_train[7].astype(np.float64).transpose(2, 0, 1) / 255.0
    mean = fmnist.x_train.astype(np.float64).mean(axis=0).transpose(2, 0, 1) / 255.0
    assert saved["psnr_chance"] == pytest.approx(10 * np.log10(1 / np.mean((truth - mean) ** 2)), abs=1e-4)
    assert saved["chance_reference"] == "training-split mean image" and rec["ssim_chance"] < 1
    files = run_audit(cfg, data, None)  # image files: the channel means, never the audited image itself
    assert files["chance_reference"] == "per-channel normalisation mean" and files["psnr_chance"] < 20


# --- failures: declared ones counted, others propagate ------------------------------------------------------------
def test_rgap_declares_its_failures():
    from fl_sim.audit import fedsgd_payload

    x = torch.randn(1, 1, 28, 28)
    payload, _, _ = fedsgd_payload("fcn3", x, torch.tensor([1]), (0.5,), (0.5,))
    with pytest.raises(BudgetExhausted):
        ATTACKS["rgap"].run(payload, Budget(time_limit_s=1e-9))
    relu, _, _ = fedsgd_payload("cnn", x, torch.tensor([1]), (0.5,), (0.5,))
    with pytest.raises(NotApplicable):
        ATTACKS["rgap"].run(relu, Budget())
    assert issubclass(BudgetExhausted, AttackError) and issubclass(NotApplicable, (AttackError, ValueError))


def _with_attack(name, fn):
    ATTACKS.register(name, Attack(fn, SERVER_CONFIG, "test attack"))


def test_a_declared_failure_is_recorded_and_counted(fmnist, tmp_path, monkeypatch, capsys):
    def exhausted(payload, budget, options=None):
        raise BudgetExhausted("out of time before the first restart finished")

    _with_attack("exhausted", exhausted)
    try:
        cfg = resolve({"attack": "exhausted"})
        strategy, _, aggregate = audit_round(cfg, audit_dataset("fashion-mnist", fmnist.x_train[:1],
                                                                fmnist.y_train[:1]))
    finally:
        ATTACKS.unregister("exhausted")
    (attack,) = strategy.last_record["attacks"]
    assert attack["error_type"] == "BudgetExhausted" and "out of time" in attack["error"]
    assert "psnr" not in attack and aggregate is not None  # the round went on
    good = [{"round": r, "client": "0", "attack": "idlg", "psnr": p, "ssim": q, "mse": 0.01, "psnr_chance": 12.0,
             "ssim_chance": 0.4, "mse_chance": 0.06, "label_accuracy": 1.0, "time_s": 1.0}
            for r, p, q in ((1, 30.0, 0.9), (2, 10.0, 0.3))]
    records = [{"round": 1, "attacks": [good[0]]}, {"round": 2, "attacks": [good[1], attack]}]
    summary = summarize(records, cfg, 1.0, "completed")
    means = summary["attack_means"]
    assert (means["succeeded"], means["attacks"]) == (2, 3) and summary["attack_failures"] == {"BudgetExhausted": 1}
    assert means["psnr"] == pytest.approx(20.0) and means["ssim"] == pytest.approx(0.6)
    assert means["psnr_chance"] == pytest.approx(12.0)
    # the report says "n of m", lists the failure, and marks the score below chance
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text(json.dumps(summary))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    md = write_run_report(run_dir).read_text()
    assert "2 of 3 attacks that succeeded" in md and "1 × BudgetExhausted" in md
    assert "failed: BudgetExhausted" in md and "| 10.00 ▼ | 12.00 |" in md and "| 30.00 | 12.00 |" in md
    # and so does fl-sim run's table; a mean below chance is marked
    from fl_sim.cli.run import print_summary

    monkeypatch.setenv("COLUMNS", "200")
    print_summary(run_dir)
    text = capsys.readouterr().out
    assert "2 of 3 succeeded (1 × BudgetExhausted)" in text and "12.0 dB / 0.400" in text and "▼" not in text
    summary["attack_means"]["psnr"] = 11.0
    (run_dir / "summary.json").write_text(json.dumps(summary))
    print_summary(run_dir)
    assert "11.0 dB / 0.600 ▼ (PSNR at or below chance, SSIM above it)" in capsys.readouterr().out
    summary["attack_means"]["ssim"] = 0.1
    (run_dir / "summary.json").write_text(json.dumps(summary))
    print_summary(run_dir)
    assert "11.0 dB / 0.100 ▼ (PSNR and SSIM at or below chance: nothing recovered)" in capsys.readouterr().out


def test_an_undeclared_exception_stops_the_run(fmnist):
    def buggy(payload, budget, options=None):
        raise RuntimeError("a bug in the attack")

    _with_attack("buggy", buggy)
    try:
        with pytest.raises(RuntimeError, match="a bug in the attack"):
            audit_round(resolve({"attack": "buggy"}), audit_dataset("fashion-mnist", fmnist.x_train[:1],
                                                                   fmnist.y_train[:1]))
    finally:
        ATTACKS.unregister("buggy")


def test_an_attack_returning_the_wrong_number_of_images_stops_the_run(fmnist):
    def two(payload, budget, options=None):
        return AttackResult(torch.zeros(2, *payload.input_shape), torch.zeros(2, dtype=torch.long), 0, 0.0, 0.0)

    _with_attack("two", two)
    try:
        with pytest.raises(ValueError, match="returned 2 images, but the update holds 1"):
            audit_round(resolve({"attack": "two"}), audit_dataset("fashion-mnist", fmnist.x_train[:1],
                                                                 fmnist.y_train[:1]))
    finally:
        ATTACKS.unregister("two")


def test_a_batch_the_defense_drew_itself_is_recorded_unscored_when_its_size_differs(fmnist):
    """dp-sgd draws Poisson batches: the update's image count is the client's secret. Such an update is recorded
    with its true count and no scores (never a best-of or padded match); without the declaration it is a bug."""
    from dataclasses import replace

    from fl_sim.task.contract import AUDIT

    cfg = resolve({"attack": "idlg", "attack-iterations": 1})
    strategy, reply, _ = audit_round(cfg, audit_dataset("fashion-mnist", fmnist.x_train[:3], fmnist.y_train[:3]))
    assert "psnr" in strategy.last_record["attacks"][0]
    audit = reply.content[AUDIT]
    audit[SAMPLE_INDICES] = [0, 2]  # a batch of 2 where the attack reconstructs B = 1
    with pytest.raises(ValueError, match="update holds 2"):
        strategy.run_attack(1, reply)
    strategy.spec = replace(strategy.spec, defense=replace(strategy.spec.defense, own_batches=True))
    record = strategy.run_attack(1, reply)
    assert record["num_images"] == 2 and "psnr" not in record and "reconstructed 1" in record["unscored"]
    audit[SAMPLE_INDICES] = []  # an empty Poisson batch
    assert strategy.run_attack(1, reply)["num_images"] == 0
    means = summarize([{"round": 1, "attacks": [record]}], cfg, 1.0, "completed")["attack_means"]
    assert (means["succeeded"], means["scored"], means["psnr"]) == (1, 0, None)


# --- sweep tables ---------------------------------------------------------------------------------------------------
def _cell(out: Path, cid: str, defense: str, index: int, psnr: float, chance: float, failed: int = 0) -> None:
    d = out / "cells" / cid
    d.mkdir(parents=True)
    (d / "cell.json").write_text(json.dumps({"labels": {"defense": defense}, "index": {"defense": index},
                                             "axes": ["defense"]}))
    (d / "config.toml").write_text(f'dataset = "fashion-mnist"\ndefense = "{defense}"\nattack = "idlg"\n')
    (d / "metrics.jsonl").write_text(json.dumps({"round": 1, "round_time_s": 1.0, "accuracy": 0.5}) + "\n")
    attacks = [{"round": 1, "psnr": psnr, "ssim": 0.5, "psnr_chance": chance, "ssim_chance": 0.4}]
    attacks += [{"round": 2, "error": "BudgetExhausted: x", "error_type": "BudgetExhausted"}] * failed
    (d / "summary.json").write_text(json.dumps({
        "status": "completed", "final_accuracy": 0.5, "attacks": attacks,
        "attack_means": {"psnr": psnr, "ssim": 0.5, "psnr_chance": chance, "ssim_chance": 0.4,
                         "succeeded": 1, "attacks": 1 + failed}}))


def test_sweep_tables_show_the_chance_level_and_mark_what_is_below_it(tmp_path):
    out = tmp_path / "sweep"
    _cell(out, "defense=none", "none", 0, 40.0, 12.0)
    _cell(out, "defense=dp", "dp", 1, 5.0, 12.5, failed=1)
    md = write_sweep_report(out).read_text()
    assert "| PSNR | 40.00 | 5.00 ▼ |" in md and "| PSNR chance | 12.00 | 12.50 |" in md
    assert "| SSIM chance | 4.0e-01 | 4.0e-01 |" in md and "| attacks succeeded | 1 of 1 | 1 of 2 |" in md
    rows = {r[0]: r[1:] for r in csv.reader((out / "table.csv").open())}  # no panel axis: metric first
    assert rows["PSNR chance"] == ["12", "12.5"] and rows["attacks succeeded"] == ["1", "1"]
    assert rows["attacks"] == ["1", "2"]


def test_chance_note_says_nothing_recovered_only_when_psnr_and_ssim_are_both_at_chance():
    """A reconstruction below the mean image's PSNR can still show the image's structure (SSIM above its chance):
    the note must not call that "nothing recovered" (frontier sweep, GradDefense σ = 0.1, round 1: 6.8 dB against
    12.3 dB chance, SSIM 0.290 against 0.273, the dress's outline visible)."""
    from strategies.metrics import chance_note

    rec = {"psnr": 6.8, "psnr_chance": 12.3, "ssim": 0.290, "ssim_chance": 0.273}
    assert chance_note(rec) == "PSNR at or below chance, SSIM above it"
    assert chance_note({**rec, "ssim": 0.2}) == "PSNR and SSIM at or below chance: nothing recovered"
    assert chance_note({**rec, "psnr": 20.0, "ssim": 0.2}) == "SSIM at or below chance, PSNR above it"
    assert chance_note({**rec, "psnr": 20.0}) == ""
    assert chance_note({"psnr": 6.8, "psnr_chance": 12.3}) == "PSNR at or below chance"
    assert chance_note({"psnr": 6.8, "psnr_chance": None, "ssim": 0.1, "ssim_chance": None}) == ""
