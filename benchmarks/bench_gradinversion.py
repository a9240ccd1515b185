"""GradInversion against Inverting Gradients on a batch of four natural photos, through ``fl-sim attack``.

The photos are scikit-image's astronaut, chelsea, coffee and rocket (labels 2, 3, 8, 0; distinct, as Yin et al.'s
label rule assumes), resized to 3×32×32 with CIFAR-10's normalisation; the model is the untrained ``resnet20``
(built from the run seed), the client takes one FedSGD step on the four images (``batch-size=4``, BatchNorm in
train mode), and its reply carries the BatchNorm buffers (``send-buffers=true``) unless ``--no-buffers``. Every
attack gets the same iteration budget (``attack-iterations`` per restart, ``attack-restarts`` restarts;
GradInversion's restarts are its group members) and no time limit. Each row is one ``fl-sim attack`` call; the
table is printed as it runs.

Usage::

    python benchmarks/bench_gradinversion.py [--iterations N] [--restarts R] [--seeds S] [--first-seed S0]
                                              [--no-buffers] [--attacks gradinversion,ig] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from skimage import data, io

PHOTOS = {"astronaut": 2, "chelsea": 3, "coffee": 8, "rocket": 0}


def run(attack: str, images: list[Path], labels: list[int], iterations: int, restarts: int, seed: int,
        buffers: bool, extra: list[str], out: Path) -> dict:
    exe = Path(sys.executable).with_name("fl-sim")
    cmd = [str(exe), "attack", "--attack", attack, "--model", "resnet20", "--out", str(out)]
    for img, lab in zip(images, labels):
        cmd += ["--image", str(img), "--label", str(lab)]
    cmd += [f"attack-iterations={iterations}", f"attack-restarts={restarts}", "attack-time-limit=0", f"seed={seed}",
            f"send-buffers={'true' if buffers else 'false'}", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return json.loads((out / "attack.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=2000)
    ap.add_argument("--restarts", type=int, default=1)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--no-buffers", action="store_true")
    ap.add_argument("--attacks", default="gradinversion,ig")
    ap.add_argument("extra", nargs="*", help="more KEY=VALUE overrides for every call")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = []
        for name in PHOTOS:
            path = tmp / f"{name}.png"
            io.imsave(path, getattr(data, name)(), check_contrast=False)
            images.append(path)
        print(f"resnet20 (untrained), 4 photos at 3×32×32, one FedSGD step, buffers "
              f"{'withheld' if args.no_buffers else 'sent'}; {args.iterations} iterations × {args.restarts} "
              f"restart(s) per attack, {args.seeds} seed(s)")
        print("| attack | seed | PSNR (dB) | SSIM | label acc. | time (s) | extras |")
        print("|---|---|---|---|---|---|---|")
        means: dict[str, list[float]] = {}
        for attack in args.attacks.split(","):
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                rec = run(attack, images, list(PHOTOS.values()), args.iterations, args.restarts, seed,
                          not args.no_buffers, args.extra, tmp / f"{attack}-{seed}")
                means.setdefault(attack, []).append(rec["psnr"])
                print(f"| {attack} | {seed} | {rec['psnr']:.2f} | {rec['ssim']:.3f} | {rec['label_accuracy']:.2f} | "
                      f"{rec['time_s']:.0f} | {rec['extras']} |", flush=True)
        for attack, vals in means.items():
            print(f"mean PSNR {attack}: {np.mean(vals):.2f} dB")
        # the headline figures, one JSON line: mean PSNR per attack and GradInversion's lead over IG
        head = {f"mean_psnr_{a}": round(float(np.mean(v)), 3) for a, v in means.items()}
        if {"gradinversion", "ig"} <= set(means):
            head["gradinversion_minus_ig_db"] = round(float(np.mean(means["gradinversion"]) - np.mean(means["ig"])), 3)
        print(json.dumps({"bench": "gradinversion", "iterations": args.iterations, "seeds": args.seeds, **head}))


if __name__ == "__main__":
    main()
