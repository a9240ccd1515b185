"""Run-config parsing and the CLI's bad-input contract: one line on stderr naming key, value and what is allowed;
exit code 2; nothing started."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fl_sim import config as C
from fl_sim.cli import cli

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_app_config_lists_every_key_with_its_default():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["tool"]["flwr"]["app"]["config"] == C.defaults()


def test_defaults_resolve():
    cfg = C.resolve()
    assert cfg["dataset"] == "fashion-mnist" and cfg["num-supernodes"] >= 10


def test_typed_values_from_flower_toml_are_accepted_and_coerced():
    cfg = C.resolve({"lr": 1, "victim": 3, "num-server-rounds": 5, "audit": False})
    assert cfg["lr"] == 1.0 and isinstance(cfg["lr"], float)
    assert cfg["victim"] == "3"


@pytest.mark.parametrize("text,expected", [("lr=0.5", 0.5), ('dataset="mnist"', "mnist"), ("dataset=mnist", "mnist"),
                                           ("audit=false", False), ("num-supernodes=4", 4)])
def test_parse_overrides(text, expected):
    name = text.split("=")[0]
    assert C.parse_overrides([text])[name] == expected


BAD = [
    (["num-supernodes=0"], "num-supernodes=0 is not allowed; num-supernodes must be an integer >= 1"),
    (["lr=fast"], "lr='fast' is not allowed; lr must be a number > 0"),
    (["num-server-rounds=2.5"], "num-server-rounds='2.5' is not allowed"),
    (["dataset=imagenet"], "dataset='imagenet' is not allowed; dataset must be one of cifar10, cifar100, "),
    (["model=resnet1000"], "model='resnet1000' is not allowed; model must be one of "),
    (["defense=magic"], "defense='magic' is not allowed; defense must be one of "),
    (["attack=telepathy"], "attack='telepathy' is not allowed; attack must be one of "),
    (["victim=10"], "victim='10' is not allowed; victim must be 'random', 'aggregate' or a partition id in 0..9"),
    (["batch-size=5000"], "batch-size=5000 is not allowed; the smallest partition holds 1000 samples"),
    (["colour=blue"], "unknown key 'colour'"),
    (["lr"], "'lr' is not KEY=VALUE"),
    (["client-num-gpus=1"], "client-num-gpus=1.0 is not allowed on this machine: CUDA is not available"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[a[0] for a, _ in BAD])
def test_bad_input_exits_2_with_one_line(args, message, tmp_path):
    import torch

    if "client-num-gpus=1" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = CliRunner().invoke(cli, ["run", *args, "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("fl-sim: error: ")
    assert message in lines[0]
    assert not (tmp_path / "run").exists()  # nothing started, nothing written


def test_existing_run_directory_is_never_overwritten(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text("{}")
    result = CliRunner().invoke(cli, ["run", "--out", str(run)])
    assert result.exit_code == 2 and "already holds results" in result.stderr
    assert (run / "summary.json").read_text() == "{}"


def test_console_script_exit_code_and_stderr():
    exe = Path(sys.executable).with_name("fl-sim")
    proc = subprocess.run([str(exe), "run", "num-supernodes=0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "fl-sim: error: num-supernodes=0 is not allowed; num-supernodes must be an integer >= 1"]


def test_keys_command_prints_the_pyproject_block():
    result = CliRunner().invoke(cli, ["keys", "--toml"])
    assert result.exit_code == 0
    assert tomllib.loads(result.stdout)["tool"]["flwr"]["app"]["config"] == C.defaults()
