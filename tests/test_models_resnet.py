"""The CIFAR ResNets (resnet20, resnet18) and the ``send-buffers`` key: BatchNorm buffers travel with the update, or
stay on the client (FedBN) and come back at its next round."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import RecordDict

from clients.config import ClientSpec
from clients.pipeline import LOCAL_BUFFERS, client_update, prepare_model
from fl_sim.config import ConfigError, resolve
from fl_sim.task.contract import TrainConfig
from fl_sim.task.models import batchnorm_buffers, build_model, classifier_layer

# Parameter counts for 10 classes at 3×32×32 (shared/reference/realistic-attacks.md §6, counted there with torch
# from the architecture descriptions): ResNet-20 with option-B shortcuts (breaching's resnet20), ResNet-18 CIFAR
# variant (kuangliu/pytorch-cifar @6e59390). akamaster/pytorch_resnet_cifar10's README gives 0.27M for ResNet-20.
COUNTS = {"resnet20": (272_474, 21, 65), "resnet18": (11_173_962, 20, 62)}


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_resnets_have_the_published_size_and_end_in_fc(name):
    params, bns, tensors = COUNTS[name]
    net = build_model(name, (3, 32, 32), 10)
    assert sum(p.numel() for p in net.parameters()) == params
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == bns
    named = [n for n, _ in net.named_parameters()]
    assert len(named) == tensors and named[-2:] == ["fc.weight", "fc.bias"]
    assert classifier_layer(net) is net.fc
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in net.modules())  # CIFAR stem: no max-pool
    assert all(m.bias is None for m in net.modules() if isinstance(m, torch.nn.Conv2d))


@pytest.mark.parametrize("name", sorted(COUNTS))
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28)])
def test_resnets_take_both_input_shapes_in_train_and_eval_mode(name, shape):
    net = build_model(name, shape, 10)
    x = torch.randn(3, *shape)
    assert net.train()(x).shape == (3, 10) and net.eval()(x).shape == (3, 10)
    first = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.in_channels == shape[0] and first.kernel_size == (3, 3) and first.stride == (1, 1)


def test_resnet20_stages_are_he_et_al_s():
    net = build_model("resnet20", (3, 32, 32), 10)
    sizes = []
    hooks = [b.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[1:]))) for b in net.layers]
    net.eval()(torch.zeros(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert sizes == [(16, 32, 32)] * 3 + [(32, 16, 16)] * 3 + [(64, 8, 8)] * 3


def test_the_fedkl_resnet_shares_the_basic_blocks():
    plain = set(build_model("resnet20", (3, 32, 32), 10).state_dict())
    locked = set(build_model("resnet20-kl", (3, 32, 32), 10).state_dict())
    assert {k for k in plain if k.startswith("layers.")} == {k for k in locked if k.startswith("layers.")}


def test_batchnorm_buffers_names_every_batchnorm_buffer_and_nothing_else():
    net = build_model("resnet20", (3, 32, 32), 10)
    names = batchnorm_buffers(net)
    assert len(names) == 3 * 21 and set(names) == {n for n, _ in net.named_buffers()}
    assert batchnorm_buffers(build_model("lenet-tanh", (1, 28, 28), 10)) == ()


def _round(spec, global_state, state, fmnist, server_round=1):
    part = np.arange(8)
    tc = TrainConfig("fedsgd", 0.1, 4, server_round=server_round)
    return client_update(spec, global_state, fmnist, part, tc, state, 1, 100 + server_round, torch.device("cpu"))


def test_send_buffers_true_lets_the_batch_statistics_travel(fmnist):
    spec = ClientSpec.from_config(resolve({"model": "resnet20", "batch-size": 4}))
    torch.manual_seed(0)
    global_state = build_model("resnet20", fmnist.input_shape, 10).state_dict()
    upd = _round(spec, global_state, RecordDict(), fmnist)
    assert int(upd.state["bn1.num_batches_tracked"]) == 1
    assert not torch.equal(upd.state["bn1.running_mean"], global_state["bn1.running_mean"])


def test_send_buffers_false_keeps_them_on_the_client_and_restores_them_next_round(fmnist):
    spec = ClientSpec.from_config(resolve({"model": "resnet20", "batch-size": 4, "send-buffers": False}))
    torch.manual_seed(0)
    global_state = {k: v.clone() for k, v in build_model("resnet20", fmnist.input_shape, 10).state_dict().items()}
    state = RecordDict()
    upd = _round(spec, global_state, state, fmnist)
    names = batchnorm_buffers(build_model("resnet20", fmnist.input_shape, 10))
    assert all(torch.equal(upd.state[k], global_state[k]) for k in names)  # the global buffers go back unchanged
    assert any(not torch.equal(upd.state[k], global_state[k]) for k in upd.state if k not in names)  # weights move
    local = state[LOCAL_BUFFERS].to_torch_state_dict()
    assert set(local) == set(names) and int(local["bn1.num_batches_tracked"]) == 1
    # the next round (and an evaluation) starts from the client's own buffers, not the global ones
    model, _ = prepare_model(spec, global_state, state, 1, torch.device("cpu"))
    assert torch.equal(model.state_dict()["bn1.running_mean"], local["bn1.running_mean"])
    _round(spec, global_state, state, fmnist, server_round=2)
    assert int(state[LOCAL_BUFFERS].to_torch_state_dict()["bn1.num_batches_tracked"]) == 2


def test_send_buffers_takes_only_booleans():
    with pytest.raises(ConfigError, match="send-buffers"):
        resolve({"send-buffers": "sometimes"})
