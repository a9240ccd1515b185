"""``fl-sim run defense=dp-sgd`` end to end (a real Flower simulation, kept short): ``summary.json`` holds each
client's last σ, q, steps, δ and spent ε; that ε is what dp-accounting computes from those figures, and it never
exceeds the target."""

from __future__ import annotations

import json
import subprocess
import sys

import dp_accounting
from dp_accounting.pld import PLDAccountant

from clients.defenses import dp


def test_fl_sim_run_dp_sgd_writes_the_privacy_block(tmp_path):
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "fl_sim.cli", "run", "defense=dp-sgd", "num-supernodes=2",
                          "num-server-rounds=2", "mode=fedavg", "local-steps=2", "batch-size=50", "attack-every=0",
                          "defense-dp-epsilon=2", "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == 2
    block = summary["privacy"]
    assert block["defense"] == "dp-sgd" and block["accountant"] == "pld" and set(block["clients"]) == {"0", "1"}
    for c in block["clients"].values():
        assert (c["round"], c["steps"], c["delta"], c["q"]) == (2, 4, 1e-5, 50 / 5000)  # 2 of 10,000 images each
        event = dp_accounting.PoissonSampledDpEvent(c["q"], dp_accounting.GaussianDpEvent(c["sigma"]))
        acc = PLDAccountant(value_discretization_interval=dp.DISCRETIZATION).compose(event, c["steps"])
        assert abs(c["epsilon"] - acc.get_epsilon(c["delta"])) <= 1e-9 * c["epsilon"]
        assert 2.0 * 0.99 < c["epsilon"] <= 2.0  # σ calibrated for these 2 rounds × 2 steps
    rounds = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    spent = [[c["dp_epsilon"] for c in r["clients"]] for r in rounds]
    assert all(a < b for a, b in zip(spent[0], spent[1]))
