"""The attack suite on real Flower round updates: a small simulation in FedAvg mode (K = 2 local steps) attacked by
the unrolled Inverting Gradients, with the scores listed in summary.json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_ig_fedavg_on_a_real_fedavg_round(tmp_path):
    out = tmp_path / "run"
    exe = Path(sys.executable).with_name("fl-sim")
    proc = subprocess.run(
        [str(exe), "run", "num-supernodes=2", "num-server-rounds=1", "mode=fedavg", "local-steps=2",
         "attack=ig-fedavg", "attack-iterations=300", "round-timeout=120", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    (attack,) = summary["attacks"]
    assert attack["attack"] == "ig-fedavg" and attack["local_steps"] == 2
    # two images from two local SGD steps of the untrained model, both recovered with their labels
    assert attack["psnr"] > 25 and attack["label_accuracy"] == 1.0
    assert summary["attack_means"]["psnr"] == attack["psnr"]
