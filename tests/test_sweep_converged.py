"""The converged seed-001 sweep and the frontier sweep: their files, the per-target table, the frontier's numbers,
and the smoke versions of both files end to end (Ray: 3 cells each, ``--jobs 2``).

The frontier's numbers are checked on fake cell directories whose attack records carry known PSNRs and chance
levels (``psnr_chance``, which the scoring work adds to every attack record), so each expected value is worked out
by hand from the records, not read back from the code under test.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import pytest
import tomli_w

from fl_sim.config import defaults
from fl_sim.sweep import load_sweep, plan
from fl_sim.sweep.report import write_sweep_report
from fl_sim.sweep.table import (
    _sweep_settings,
    frontier,
    frontier_series,
    load_sweep_cells,
    strength_order,
    sweep_rows,
    sweep_table,
)

ROOT = Path(__file__).resolve().parent.parent
EXE = Path(sys.executable).with_name("fl-sim")
CONVERGED = ROOT / "sweeps" / "seed001-fmnist-converged.toml"
FRONTIER = ROOT / "sweeps" / "frontier-fmnist.toml"


# --- the shipped files ----------------------------------------------------------------------------------------------
def test_converged_file_plans_seed001_with_both_targets():
    spec = load_sweep(CONVERGED)
    cells = plan(spec)
    assert len(cells) == 42 and [a.name for a in spec.axes] == ["dataset", "attack", "defense", "seed"]
    assert spec.axes[2].labels == ("none", "Ours", "GC", "DP-G", "DP-L", "PLD", "PLD-muted")
    for c in cells:
        cfg = c.config
        assert (cfg["mode"], cfg["local-epochs"], cfg["local-steps"], cfg["attack-target"]) == ("fedavg", 1, 0, "both")
        assert cfg["model"] == "lenet-tanh" and cfg["data-dir"] == "/usr/share/datasets/fashion-mnist"
        assert cfg["num-server-rounds"] == 10 and cfg["attack-every"] == 9  # attacks at rounds 1 and 10
    pld = [c for c in cells if c.config["defense"] == "soteria"]
    assert len(pld) == 12 and {c.config["defense-soteria-every"] for c in pld} == {0}
    assert {c.config["attack-ignore-layers"] for c in pld if c.labels["defense"] == "PLD-muted"} == {"fc"}


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_converged_file_with_the_talks_other_columns_parses_and_plans(tmp_path, dataset):
    """What an online user runs for the talk's MNIST / CIFAR-10 columns: the same file with the dataset axis set to
    them (planning only: their download needs the network, which this machine lacks)."""
    text = CONVERGED.read_text().replace(
        'fashion-mnist = { dataset = "fashion-mnist", data-dir = "/usr/share/datasets/fashion-mnist" }',
        f'{dataset} = {{ dataset = "{dataset}" }}')
    assert text != CONVERGED.read_text()
    path = tmp_path / f"converged-{dataset}.toml"
    path.write_text(text)
    cells = plan(load_sweep(path))
    assert len(cells) == 42 and {c.config["dataset"] for c in cells} == {dataset}
    assert {c.config["data-dir"] for c in cells} == {""}  # torchvision's download folder
    assert all(c.id.startswith(f"dataset={dataset}__") for c in cells)


def test_frontier_file_sweeps_every_defense_strength():
    spec = load_sweep(FRONTIER)
    cells = plan(spec)
    swept = {}
    for c in cells:
        cfg = c.config
        for key in ("defense-prune-rate", "defense-dp-noise", "defense-soteria-rate", "defense-gd-sigma",
                    "defense-gd-perturb-slices", "defense-quantize-format"):
            swept.setdefault((cfg["defense"], key), set()).add(cfg[key])
    assert len(swept[("prune", "defense-prune-rate")]) == 5
    assert len(swept[("dp-gaussian", "defense-dp-noise")]) == 6
    assert len(swept[("soteria", "defense-soteria-rate")]) == 4
    assert swept[("graddefense", "defense-gd-sigma")] == {0.01, 0.03, 0.1, 0.3}
    assert swept[("graddefense", "defense-gd-perturb-slices")] == {1, 3, 5, 8, 10}
    assert swept[("quantize", "defense-quantize-format")] == {"float16", "bfloat16", "int8"}
    assert {c.config["attack-target"] for c in cells} == {"both"} and {c.config["attack"] for c in cells} == {"dlg"}
    # the report finds one series per swept key (GradDefense twice: sigma at M = 5, M at sigma = 0.1)
    fake = [{"cfg": c.config, "labels": c.labels, "index": c.index, "axes": list(c.labels)} for c in cells]
    series = {(s["defense"], s["key"]): len(s["cells"]) for s in frontier_series(fake)}
    assert series == {("prune", "defense-prune-rate"): 5, ("dp-gaussian", "defense-dp-noise"): 6,
                      ("soteria", "defense-soteria-rate"): 4, ("graddefense", "defense-gd-sigma"): 4,
                      ("graddefense", "defense-gd-perturb-slices"): 5, ("quantize", "defense-quantize-format"): 3}


def test_strength_order():
    assert strength_order("defense-gd-perturb-slices", [5, 1, 3, 8, 10, 5]) == [1, 3, 5, 8, 10]
    assert strength_order("defense-dp-epsilon", [1.0, 10.0, 3.0]) == [10.0, 3.0, 1.0]  # less budget = stronger
    assert strength_order("defense-quantize-format", ["float16", "bfloat16", "int8"]) == ["float16", "bfloat16",
                                                                                         "int8"]


# --- the tables from fake cells -------------------------------------------------------------------------------------
def fake_cell(sweep: Path, labels: dict, overrides: dict, acc: float, attacks: list[dict], index: dict) -> None:
    d = sweep / "cells" / "__".join(f"{k}={v}" for k, v in labels.items())
    d.mkdir(parents=True)
    cfg = {**defaults(), **overrides, "num-server-rounds": 2}
    (d / "config.toml").write_text(tomli_w.dumps(cfg))
    (d / "cell.json").write_text(json.dumps({"labels": labels, "index": index, "axes": list(labels)}))
    (d / "metrics.jsonl").write_text("".join(json.dumps({"round": r, "round_time_s": 1.0, "accuracy": acc}) + "\n"
                                             for r in (1, 2)))
    (d / "summary.json").write_text(json.dumps({"status": "completed", "rounds": 2, "final_accuracy": acc,
                                                "attacks": attacks, "attack_means": {}}))


def att(target, psnr, chance=None, ssim=0.5, ssim_chance=0.6):
    a = {"round": 1, "client": "0", "attack": "dlg", "target": target, "psnr": psnr, "ssim": ssim}
    if chance is not None:
        a["psnr_chance"], a["ssim_chance"] = chance, ssim_chance
    return a


def frontier_sweep(tmp_path) -> Path:
    """none + prune at 50/80/95 % over seeds 0 and 1, with known PSNRs and chance levels (probe: chance 10 dB)."""
    sweep = tmp_path / "front"
    variants = [("none", {"defense": "none"}), ("p50", {"defense": "prune", "defense-prune-rate": 50.0}),
                ("p80", {"defense": "prune", "defense-prune-rate": 80.0}),
                ("p95", {"defense": "prune", "defense-prune-rate": 95.0})]
    # probe PSNR per variant and seed; update PSNR; accuracy
    probe = {"none": (40, 44), "p50": (20, 22), "p80": (9.0, 10.3), "p95": (6, 7)}
    update = {"none": (12, 12), "p50": (11, 11), "p80": (10.5, 10.5), "p95": (10.2, 10.4)}
    acc = {"none": (0.90, 0.88), "p50": (0.89, 0.87), "p80": (0.80, 0.78), "p95": (0.50, 0.52)}
    for i, (label, keys) in enumerate(variants):
        for seed in (0, 1):
            attacks = [att("update", update[label][seed], 10.0), att("probe", probe[label][seed], 10.0 + seed * 0.2)]
            fake_cell(sweep, {"defense": label, "seed": str(seed)}, {**keys, "seed": seed}, acc[label][seed], attacks,
                      {"defense": i, "seed": seed})
    return sweep


def test_frontier_finds_where_the_probe_falls_to_chance_and_what_it_costs(tmp_path):
    sweep = frontier_sweep(tmp_path)
    cells = load_sweep_cells(sweep)
    front = frontier(cells, _sweep_settings(sweep, cells))
    (panel,) = front["panels"]
    (series,) = panel["series"]
    assert (series["defense"], series["key"]) == ("prune", "defense-prune-rate")
    assert [p["value"] for p in series["points"]] == [50.0, 80.0, 95.0]
    # p80: probe mean (9.0 + 10.3) / 2 = 9.65 dB, chance mean (10.0 + 10.2) / 2 = 10.1 dB: at chance by the mean
    # (lenient); but seed 1's attack (10.3 dB against its own 10.2) is above, so every attack is at chance only at p95
    lenient = series["reached_mean"]["probe"]
    assert lenient["value"] == 80.0
    assert lenient["psnr"] == pytest.approx(9.65) and lenient["chance"] == pytest.approx(10.1)
    assert lenient["acc"] == pytest.approx(79.0) and lenient["cost"] == pytest.approx(89.0 - 79.0)
    assert [p["above"]["probe"] for p in series["points"]] == [2, 1, 0]
    hit = series["reached"]["probe"]
    assert hit["value"] == 95.0 and hit["psnr"] == pytest.approx(6.5) and hit["chance"] == pytest.approx(10.1)
    assert hit["ssim"] == pytest.approx(0.5) and hit["ssim_chance"] == pytest.approx(0.6)
    assert hit["acc"] == pytest.approx(51.0) and hit["cost"] == pytest.approx(89.0 - 51.0)
    # the update never falls to its chance level (10 dB): 10.3 dB at 95 %
    assert series["reached"]["update"] is None and series["reached_mean"]["update"] is None
    assert panel["none"]["acc"][0] == pytest.approx(89.0) and panel["none"]["psnr"]["probe"][0] == pytest.approx(42.0)

    write_sweep_report(sweep)
    md = (sweep / "frontier.md").read_text()
    assert ("| prune | `defense-prune-rate` | 50, 80, 95 | not reached (strongest: 2 of 2 attacks above) | – | – | – "
            "| – | not reached | 95 | 6.50 / 10.10 | 0.500 / 0.600 | 51.00 | 38.00 | 80 (cost 10.00) |") in md
    assert "| prune | `defense-prune-rate` | 80 | 79.00 ± 1.41 |" in md and "| 1 of 2 |" in md
    rows = list(csv.DictReader((sweep / "frontier.csv").open()))
    assert [r["value"] for r in rows] == ["50", "80", "95"]
    assert float(rows[1]["psnr probe"]) == pytest.approx(9.65) and float(rows[1]["chance probe"]) == pytest.approx(10.1)
    assert [r["above chance probe"] for r in rows] == ["2", "1", "0"]
    img = mpimg.imread(sweep / "frontier.png")
    assert img.shape[0] > 200 and img.shape[1] > 400
    assert "frontier.md" in (sweep / "table.md").read_text()


def test_a_frontier_target_that_was_never_attacked_says_so(tmp_path):
    """A converged update holds the whole partition, so every attack on it is recorded unscored: the frontier says
    "not attacked" with the image count instead of pretending that an old sweep lacked chance levels."""
    sweep = tmp_path / "front"
    unscored = {"round": 1, "client": "0", "attack": "dlg", "target": "update", "num_images": 30000,
                "unscored": "not attacked: attack='dlg' reconstructs 32 image(s) but the update holds 30000"}
    for i, (label, keys) in enumerate([("none", {"defense": "none"}),
                                       ("p50", {"defense": "prune", "defense-prune-rate": 50.0}),
                                       ("p95", {"defense": "prune", "defense-prune-rate": 95.0})]):
        fake_cell(sweep, {"defense": label}, keys, 0.9 - 0.1 * i, [unscored, att("probe", 30.0 - 10 * i, 10.0)],
                  {"defense": i})
    cells = load_sweep_cells(sweep)
    front = frontier(cells, _sweep_settings(sweep, cells))
    (series,) = front["panels"][0]["series"]
    assert [p["unscored"]["update"] for p in series["points"]] == [{"attacks": 1, "num_images": 30000}] * 2
    assert series["points"][0]["unscored"]["probe"] == {"attacks": 0, "num_images": None}
    assert series["reached"]["update"] is None and series["reached"]["probe"]["value"] == 95.0
    write_sweep_report(sweep)
    md = (sweep / "frontier.md").read_text()
    assert "**update**: not attacked (the update holds 30,000 images)" in md
    assert "update: at chance from" not in md and "probe: at chance from" in md  # no empty update columns
    assert "| prune | `defense-prune-rate` | 50, 95 | 95 |" in md
    assert "no chance level recorded" not in md


def test_table_rows_per_target_and_unchanged_without_targets(tmp_path):
    sweep = frontier_sweep(tmp_path)
    cells = load_sweep_cells(sweep)
    table = sweep_table(cells, _sweep_settings(sweep, cells))
    assert [r for r, _ in table["rows"]] == ["PSNR update", "PSNR update chance", "PSNR probe", "PSNR probe chance", "SSIM update",
        "SSIM update chance", "SSIM probe", "SSIM probe chance", "ACC", "ART"]
    (panel,) = table["panels"]
    col = [k for k in table["column_keys"]].index(("fashion-mnist", "p50"))
    assert panel["rows"]["PSNR probe"][col][0] == pytest.approx(21.0)
    assert panel["rows"]["PSNR update"][col][0] == pytest.approx(11.0)
    md = write_sweep_report(sweep).read_text()
    assert "| PSNR probe | 42.00 ± 2.83 | 21.00 ± 1.41 |" in md
    # every attack against its own chance level: p80's probe mean (9.65 dB) is below the mean chance (10.1 dB) and
    # marked, but only seed 0's attack (9.0 ≤ 10.0 dB) is at chance; seed 1's (10.3 > 10.2 dB) is not
    p80 = [k for k in table["column_keys"]].index(("fashion-mnist", "p80"))
    assert panel["at_chance"]["probe"][p80] == (1, 2) and panel["at_chance"]["probe"][col] == (0, 2)
    assert panel["at_chance"]["update"][p80] == (0, 2)  # 10.5 dB against 10.0
    assert "| at chance probe | 0 of 2 | 0 of 2 | 1 of 2 | 2 of 2 |" in md
    rows = {r[0]: r[1:] for r in csv.reader((sweep / "table.csv").open())}
    assert rows["attacks at chance probe"] == ["0", "0", "1", "2"] and rows["attacks scored probe"] == ["2"] * 4

    # records without a target (runs from before targets existed): seed 001's rows, from attack_means as before
    old = tmp_path / "old"
    fake_cell(old, {"defense": "none", "seed": "0"}, {"defense": "none"}, 0.8,
              [{"round": 1, "psnr": 30.0, "ssim": 0.9}], {"defense": 0, "seed": 0})
    summary = json.loads((old / "cells" / "defense=none__seed=0" / "summary.json").read_text())
    summary["attack_means"] = {"psnr": 30.0, "ssim": 0.9}
    (old / "cells" / "defense=none__seed=0" / "summary.json").write_text(json.dumps(summary))
    cells = load_sweep_cells(old)
    assert [r for r, _ in sweep_rows(cells)] == ["PSNR", "PSNR chance", "SSIM", "SSIM chance", "ACC", "ART"]
    assert sweep_table(cells, _sweep_settings(old, cells))["panels"][0]["rows"]["PSNR"][0][0] == 30.0


# --- the smoke versions, end to end -------------------------------------------------------------------------------
def run_smoke(tmp_path_factory, name):
    out = tmp_path_factory.mktemp(name) / name
    proc = subprocess.run([str(EXE), "sweep", str(ROOT / "sweeps" / f"{name}.toml"), "--jobs", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "3 cells ran, 0 were already done, 0 did not finish" in proc.stdout
    return out


def test_converged_smoke_sweep_end_to_end(tmp_path_factory):
    out = run_smoke(tmp_path_factory, "seed001-converged-smoke")
    cells = load_sweep_cells(out)
    assert [c["labels"]["defense"] for c in cells] == ["none", "Ours", "PLD-muted"]
    for c in cells:
        attacks = c["summary"]["attacks"]
        assert [a["target"] for a in attacks] == ["update", "probe"]
        assert all(a.get("psnr") is not None for a in attacks), attacks
        assert attacks[1]["num_images"] == 1 and (c["dir"] / attacks[1]["image"]).is_file()
        assert set(c["summary"]["attack_means_by_target"]) == {"update", "probe"}
        assert "| 1 | 0 | dlg | probe |" in (c["dir"] / "report.md").read_text()
    rows = list(csv.reader((out / "table.csv").open()))
    assert [r[1] for r in rows[1:11]] == ["PSNR update", "PSNR update chance", "PSNR probe", "PSNR probe chance", "SSIM update",
        "SSIM update chance", "SSIM probe", "SSIM probe chance", "ACC", "ART"]
    md = (out / "table.md").read_text()
    assert md.count("| PSNR probe |") == 1 and "| ART | ref |" in md
    assert not (out / "frontier.md").exists()  # one strength per defense: no frontier
    # the report rebuilds the same table from the run directories alone
    before = (out / "table.csv").read_text()
    (out / "table.csv").unlink()
    (out / "sweep.json").unlink()
    res = subprocess.run([str(EXE), "report", str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (out / "table.csv").read_text() == before


def test_frontier_smoke_sweep_end_to_end(tmp_path_factory):
    out = run_smoke(tmp_path_factory, "frontier-smoke")
    md = (out / "frontier.md").read_text()
    assert "| prune | `defense-prune-rate` | 50, 90 |" in md
    rows = list(csv.DictReader((out / "frontier.csv").open()))
    assert [r["value"] for r in rows] == ["50", "90"] and all(float(r["psnr probe"]) > 0 for r in rows)
    img = mpimg.imread(out / "frontier.png")
    assert img.ndim == 3 and img.shape[1] > 400
