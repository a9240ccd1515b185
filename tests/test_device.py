"""The ``device`` and ``attack-device`` keys: resolution, one-line errors, the path to every component, the dataset
copied to the device once per process, and memory that stays flat over rounds (tensor count on the CPU, allocated
bytes on CUDA). The CUDA tests are skipped on machines without CUDA (CI has none)."""

from __future__ import annotations

import gc
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from attacker import ATTACKS, Budget
from fl_sim.audit import fedsgd_payload
from fl_sim.config import check_devices, resolve, specs
from fl_sim.task.config import TaskConfig, resolve_device
from fl_sim.task.datasets import on_device, to_tensor
from fl_sim.task.keys import ConfigError

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA (the CUDA paths are unmeasured without a GPU)")
FL_SIM = str(Path(sys.executable).with_name("fl-sim"))


# -- resolution and errors -------------------------------------------------------------------------------------------
def test_cpu_and_auto_resolve_to_the_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("value", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_is_a_one_line_error_naming_the_key(monkeypatch, value):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError) as err:
        resolve_device(value, "attack-device")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"attack-device={value!r} is not allowed on this machine")


def test_a_gpu_index_beyond_the_machine_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("auto") == torch.device("cuda", 0)
    with pytest.raises(ConfigError, match=r"device='cuda:2' is not allowed on this machine: it has 2 CUDA"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("key,value", [("device", "gpu"), ("device", "cuda:"), ("device", ""),
                                       ("attack-device", "mps"), ("attack-device", "CPU")])
def test_bad_device_names_fail_when_the_config_is_resolved(key, value):
    with pytest.raises(ConfigError) as err:
        resolve({key: value})
    assert str(err.value).startswith(f"{key}={value!r} is not allowed; {key} must be auto, cpu, cuda or cuda:N")


def test_a_gpu_share_per_client_needs_a_gpu_device():
    with pytest.raises(ConfigError, match="client-num-gpus=0.1 is not allowed with device='cpu'"):
        check_devices(resolve({"device": "cpu", "client-num-gpus": 0.1}))


@pytest.mark.skipif(CUDA, reason="checks the error on a machine without CUDA")
def test_fl_sim_run_device_cuda_without_cuda_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([FL_SIM, "run", "device=cuda", "--out", str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines == ["fl-sim: error: device='cuda' is not allowed on this machine: CUDA is not available; device "
                     "must be auto or cpu here"]
    assert not (tmp_path / "out").exists()  # nothing started


@pytest.mark.skipif(CUDA, reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("args", [["run", "attack-device=cuda:0"],
                                  ["attack", "--dataset", "fashion-mnist", "--index", "0", "device=cuda"]])
def test_other_commands_asking_for_cuda_exit_2_before_anything_starts(tmp_path, args):
    from typer.testing import CliRunner

    from fl_sim.cli import cli

    res = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    assert "is not allowed on this machine: CUDA is not available" in res.output
    assert not (tmp_path / "out").exists()


# -- the device reaches every component ------------------------------------------------------------------------------
def test_the_device_keys_reach_the_task_the_strategy_and_the_attack_budget(tmp_path, fmnist):
    from fl_sim.results import RunRecorder
    from strategies.strategy import CuriousFedAvg

    cfg = resolve({"device": "auto", "attack-device": "cpu", "out-dir": str(tmp_path), "run-name": "r"})
    spec = specs(cfg).server
    assert spec.task.device == "auto" and spec.attack.device == "cpu"
    strat = CuriousFedAvg(spec, fmnist, RunRecorder(tmp_path / "r", cfg, tensorboard=False))
    expected = torch.device("cuda", torch.cuda.current_device()) if CUDA else torch.device("cpu")
    assert strat.device == expected and next(strat.eval_model.parameters()).device == expected
    assert strat.attack_device == torch.device("cpu")
    assert spec.attack.budget_for(0, 3, strat.attack_device).device == torch.device("cpu")


class _Built(Exception):
    """Raised by the spy once an attack has built its model: the test needs the device, not the attack's result."""


@pytest.mark.parametrize("name", sorted(set(ATTACKS) - {"rgap"}))  # R-GAP's closed form runs on the CPU by design
def test_attacks_build_their_model_on_the_budget_device(monkeypatch, fmnist, name):
    """Every optimising attack builds the global model on ``Budget.device`` (``attack-device``), not on a default.

    ``cpu:0`` is a device the default (``"cpu"``) is not equal to, so an attack that ignores the budget fails here
    on a machine without CUDA too (dimitrov, gradinversion and grnn once did)."""
    from attacker.payload import AttackPayload

    x = to_tensor(fmnist.x_train[[5]], fmnist.mean, fmnist.std)
    payload, _, _ = fedsgd_payload("lenet-tanh", x, torch.as_tensor(fmnist.y_train[[5]]), fmnist.mean, fmnist.std)
    seen = []

    def spy(self, device="cpu"):
        seen.append(torch.device(device))
        raise _Built

    monkeypatch.setattr(AttackPayload, "build_model", spy)
    budget = Budget(iterations=2, seed=0, device=torch.device("cpu:0"))
    with pytest.raises(_Built):
        ATTACKS[name].run(payload, budget, None)
    assert seen == [torch.device("cpu:0")]


def test_an_explicit_cpu_budget_changes_no_number_of_an_attack(fmnist):
    """Threading the device through changed nothing on the CPU: default budget and device='cpu' agree bit for bit."""
    x = to_tensor(fmnist.x_train[[9]], fmnist.mean, fmnist.std)
    payload, _, _ = fedsgd_payload("lenet-tanh", x, torch.as_tensor(fmnist.y_train[[9]]), fmnist.mean, fmnist.std)
    a = ATTACKS["idlg"].run(payload, Budget(iterations=3, seed=1), None)
    b = ATTACKS["idlg"].run(payload, Budget(iterations=3, seed=1, device=torch.device("cpu")), None)
    assert torch.equal(a.images, b.images) and a.objective == b.objective


# -- the dataset on the device, once ---------------------------------------------------------------------------------
def test_each_split_goes_to_the_device_once_and_shares_memory_on_the_cpu(fmnist):
    x1, y1 = on_device(fmnist, "train", "cpu")
    x2, y2 = on_device(fmnist, "train", torch.device("cpu"))
    assert x1 is x2 and y1 is y2  # cached per process
    assert x1.dtype == torch.uint8 and tuple(x1.shape) == fmnist.x_train.shape and y1.dtype == torch.int64
    if fmnist.x_train.flags.writeable:
        assert x1.data_ptr() == fmnist.x_train.ctypes.data  # no copy on the CPU
    xt, _ = on_device(fmnist, "test", "cpu")
    assert tuple(xt.shape) == fmnist.x_test.shape
    with pytest.raises(ValueError, match="split='val'"):
        on_device(fmnist, "val", "cpu")


def test_batches_from_the_device_copy_equal_the_numpy_path_bit_for_bit(fmnist):
    idx = np.array([3, 17, 17, 4001, 9999])
    x_all, y_all = on_device(fmnist, "train", "cpu")
    rows = torch.as_tensor(idx)
    assert torch.equal(to_tensor(x_all[rows], fmnist.mean, fmnist.std),
                       to_tensor(fmnist.x_train[idx], fmnist.mean, fmnist.std))
    assert torch.equal(y_all[rows], torch.as_tensor(fmnist.y_train[idx]))


def test_a_fedsgd_client_update_is_the_plain_gradient_step(fmnist):
    """The client's pipeline (batches indexed on the device copy) gives θ − lr·∇ℓ of its one sample, bit for bit."""
    from clients import secrets
    from clients.pipeline import client_update
    from flwr.app import RecordDict

    from fl_sim.task.models import build_model
    from fl_sim.task.partition import partitions

    cfg = resolve({"device": "cpu", "num-supernodes": 4})
    run = specs(cfg)
    torch.manual_seed(0)
    model = build_model(cfg["model"], fmnist.input_shape, fmnist.num_classes)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    part = partitions(fmnist.name, "", 4, "iid", 0.5, 0)[2]
    tc = run.server.task.train_config(0.1, 1)
    secret = secrets.node_secret(0, 2)
    upd = client_update(run.client, state, fmnist, part, tc, RecordDict(), secrets.once_seed(secret, 0),
                        secrets.round_seed(secret, 0, 1), torch.device("cpu"))
    (i,) = upd.sample_indices
    x = to_tensor(fmnist.x_train[[i]], fmnist.mean, fmnist.std)
    loss = torch.nn.functional.cross_entropy(model(x), torch.as_tensor(fmnist.y_train[[i]]))
    grads = torch.autograd.grad(loss, list(model.parameters()))
    for (n, p), g in zip(model.named_parameters(), grads):
        assert torch.equal(upd.state[n], p.detach().clone().add_(g, alpha=-0.1)), n  # as the client's SGD step


# -- memory stays flat over rounds -----------------------------------------------------------------------------------
def _message(content, message_type, dst):
    from flwr.app import Message, Metadata

    md = Metadata(run_id=1, message_id=uuid.uuid4().hex, src_node_id=0, dst_node_id=dst, reply_to_message_id="",
                  group_id="1", created_at=time.time(), ttl=3600, message_type=message_type)
    return Message(content=content, metadata=md)


def _federation(tmp_path, device: str, clients: int = 2):
    """The real ClientApp and the real strategy (with the run directory's recorder, TensorBoard included), driven
    round by round in this process; returns ``step(round) -> None``."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

    from clients.client_app import app
    from fl_sim.results import RunRecorder
    from fl_sim.task.datasets import load_dataset
    from fl_sim.task.models import build_model
    from strategies.strategy import CuriousFedAvg

    cfg = resolve({"device": device, "num-supernodes": clients, "attack-every": 2, "attack-iterations": 3,
                   "num-server-rounds": 12, "out-dir": str(tmp_path), "run-name": f"mem-{device}"})
    data = load_dataset("fashion-mnist")
    torch.manual_seed(0)
    recorder = RunRecorder(tmp_path / f"mem-{device}", cfg)
    strat = CuriousFedAvg(specs(cfg).server, data, recorder)
    contexts = [Context(run_id=1, node_id=i + 1, node_config={"partition-id": i, "num-partitions": clients},
                        state=RecordDict(), run_config=dict(cfg)) for i in range(clients)]

    class Grid:
        def get_node_ids(self):
            return list(range(1, clients + 1))

        def send_and_receive(self, messages, *, timeout=None):
            return [app(_message(m.content, m.metadata.message_type, m.metadata.dst_node_id),
                        contexts[m.metadata.dst_node_id - 1]) for m in messages]

    arrays = {"a": ArrayRecord(build_model(cfg["model"], data.input_shape, data.num_classes).state_dict())}

    def step(rnd: int) -> None:
        msgs = list(strat.configure_train(rnd, arrays["a"], ConfigRecord(), Grid()))
        replies = [app(_message(RecordDict({"arrays": m.content["arrays"],
                                            "config": ConfigRecord(dict(m.content["config"]))}), "train",
                                m.metadata.dst_node_id), contexts[m.metadata.dst_node_id - 1]) for m in msgs]
        out, _ = strat.aggregate_train(rnd, replies)
        arrays["a"] = out
        strat.evaluate_round(rnd, out)

    return step, recorder, strat


def _live_tensors() -> tuple[int, int]:
    gc.collect()
    count, nbytes = 0, 0
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor):  # type(): no __class__ lookup on proxies and deprecated aliases
            count += 1
            nbytes += obj.numel() * obj.element_size()
    return count, nbytes


def test_cpu_memory_stays_flat_over_rounds(tmp_path):
    """The CPU proxy of "GPU memory stays flat": after warm-up, the number and bytes of live tensors do not grow
    from round to round (no kept graphs, per-round models, caches of updates or attack results)."""
    step, recorder, strat = _federation(tmp_path, "cpu")
    seen = []
    try:
        for rnd in range(1, 9):
            step(rnd)
            seen.append(_live_tensors())
    finally:
        recorder.close()
    assert len(strat.last_record["attacks"]) == 0 and strat.last_record["round"] == 8
    # attack rounds 1, 3, 5, 7 and plain rounds alternate: compare like with like after two warm-up rounds
    assert seen[7] == seen[3] and seen[6] == seen[2], seen
    assert (tmp_path / "mem-cpu" / "reconstructions.npz").is_file()


@needs_cuda
def test_cuda_memory_stays_flat_over_rounds(tmp_path):
    """On CUDA: allocated bytes at the end of a round and the peak within a round do not grow after warm-up."""
    step, recorder, strat = _federation(tmp_path, "cuda")
    assert strat.device.type == "cuda"
    allocated, peaks = [], []
    try:
        for rnd in range(1, 11):
            torch.cuda.reset_peak_memory_stats()
            step(rnd)
            torch.cuda.synchronize()
            allocated.append(torch.cuda.memory_allocated())
            peaks.append(torch.cuda.max_memory_allocated())
    finally:
        recorder.close()
    assert allocated[9] <= allocated[3] and allocated[8] <= allocated[2], allocated
    assert max(peaks[6:]) <= max(peaks[2:6]) * 1.05 + 2**20, peaks
    x, _ = on_device(strat.data, "test", strat.device)
    assert x.device.type == "cuda"


@needs_cuda
def test_cuda_client_and_server_agree_with_the_cpu(tmp_path, fmnist):
    """The same round on CUDA and on the CPU: the same sample, an update equal to float32 rounding, and an attack
    that recovers the image on both devices."""
    from fl_sim.audit import audit_dataset, run_audit

    data = audit_dataset("fashion-mnist", fmnist.x_train[[11]], fmnist.y_train[[11]])
    out = {}
    for device in ("cpu", "cuda"):
        cfg = resolve({"device": device, "attack-iterations": 100, "batch-size": 1})
        out[device] = run_audit(cfg, data)
    assert out["cuda"]["true_labels"] == out["cpu"]["true_labels"]
    assert out["cuda"]["labels"] == out["cpu"]["labels"]
    assert out["cuda"]["psnr"] > 40 and out["cpu"]["psnr"] > 40
    assert out["cuda"]["settings"]["device"] == "cuda"


@needs_cuda
def test_task_config_resolves_cuda_here():
    task = TaskConfig.from_config({"device": "cuda"})
    assert task.torch_device().type == "cuda"
