"""The ClientApp's cheaper per-message steps give what the plain ones give (issue 13, docs/performance.md).

* :mod:`fl_sim.task.arrays` against Flower's own ``ArrayRecord`` conversions: the same tensors and the same bytes.
* :func:`clients.pipeline.prepare_model` reloading a kept model against building a fresh one: the same update, bit
  for bit, and no reuse of a model a defense left hooks on.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, RecordDict

from clients import pipeline
from clients.config import ClientSpec
from fl_sim.config import resolve
from fl_sim.task import contract
from fl_sim.task.arrays import to_array_record, to_state_dict
from fl_sim.task.models import build_model


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"w": torch.randn(4, 3, 5, generator=g), "b": torch.randn(7, generator=g), "s": torch.tensor(2.5),
            "n": torch.tensor([1, 2, 3], dtype=torch.int64), "h": torch.randn(2, 3, generator=g).half(),
            "t": torch.randn(3, 4, generator=g).t()}  # not C-contiguous


def test_to_state_dict_equals_flowers_conversion():
    record = ArrayRecord({k: v.contiguous() for k, v in _state().items()})
    ours, flowers = to_state_dict(record), record.to_torch_state_dict()
    assert list(ours) == list(flowers)
    for k in flowers:
        assert ours[k].dtype == flowers[k].dtype and ours[k].shape == flowers[k].shape, k
        assert torch.equal(ours[k], flowers[k]), k
    ours["w"].add_(1.0)  # its own writable memory: the record is untouched
    assert torch.equal(to_state_dict(record)["w"], flowers["w"])


def test_to_array_record_writes_numpys_bytes():
    state = _state()
    ours = to_array_record(state)
    flowers = ArrayRecord({k: v.contiguous() for k, v in state.items()})
    assert list(ours) == list(flowers)
    for k in flowers:
        assert ours[k].data == flowers[k].data, k
        assert (ours[k].dtype, tuple(ours[k].shape), ours[k].stype) == \
            (flowers[k].dtype, tuple(flowers[k].shape), flowers[k].stype), k
        np.testing.assert_array_equal(ours[k].numpy(), state[k].numpy())


def _spec(defense: str = "none", model: str = "lenet") -> ClientSpec:
    return ClientSpec.from_config(resolve({"model": model, "dataset": "fashion-mnist", "defense": defense}))


def _update(spec, global_state, data, rnd: int):
    tc = contract.TrainConfig("fedavg", 0.1, 8, 3, 1, rnd)
    part = np.arange(64)
    return pipeline.client_update(spec, global_state, data, part, tc, RecordDict(), 11, 100 + rnd,
                                  torch.device("cpu"))


@pytest.mark.parametrize("defense", ["none", "dp-gaussian", "soteria", "graddefense"])
def test_a_reloaded_model_gives_the_fresh_models_update_bit_for_bit(defense, fmnist, monkeypatch):
    spec = _spec(defense)
    g0 = {k: v.clone() for k, v in build_model("lenet", (1, 28, 28), 10).state_dict().items()}
    pipeline._KEPT.clear()
    first = _update(spec, g0, fmnist, 1)
    assert pipeline._KEPT, "client_update hands its model back"
    kept = next(iter(pipeline._KEPT.values()))[0]
    second = _update(spec, g0, fmnist, 2)  # reloads the kept model (trained in round 1) with g0
    assert next(iter(pipeline._KEPT.values()))[0] is kept
    pipeline._KEPT.clear()
    fresh = _update(spec, g0, fmnist, 2)  # builds a new one
    assert next(iter(pipeline._KEPT.values()))[0] is not kept
    for k in fresh.state:
        assert torch.equal(second.state[k], fresh.state[k]), k
    assert second.metrics[contract.TRAIN_LOSS] == fresh.metrics[contract.TRAIN_LOSS]
    assert not any(torch.equal(first.state[k], second.state[k]) for k in first.state if k.endswith("weight"))


def _kept_after_one_round(fmnist):
    """``(spec, global state, kept model, its signature)`` after one round of a plain LeNet client."""
    spec = _spec()
    g0 = {k: v.clone() for k, v in build_model("lenet", (1, 28, 28), 10).state_dict().items()}
    pipeline._KEPT.clear()
    _update(spec, g0, fmnist, 1)
    kept, sig = next(iter(pipeline._KEPT.values()))
    return spec, g0, kept, sig


def test_a_model_with_hooks_left_on_is_not_reused(fmnist):
    spec, g0, kept, sig = _kept_after_one_round(fmnist)
    assert pipeline.reusable(kept, sig)
    handle = next(kept.modules()).register_forward_hook(lambda m, i, o: None)
    assert not pipeline.reusable(kept, sig)
    model, _ = pipeline.prepare_model(spec, g0, RecordDict(), 11, torch.device("cpu"))
    assert model is not kept
    handle.remove()
    p = next(model.parameters())
    pipeline.keep_model(spec, model, torch.device("cpu"))
    kept, sig = next(iter(pipeline._KEPT.values()))
    h = p.register_hook(lambda grad: grad)
    assert not pipeline.reusable(kept, sig)
    h.remove()
    assert pipeline.reusable(kept, sig)


def test_a_defense_with_on_model_always_gets_a_fresh_model(fmnist):
    spec = _spec("fedkl", "lenet-kl")
    assert spec.defense.on_model is not None
    g0 = {k: v.clone() for k, v in build_model(spec.task.model, (1, 28, 28), 10).state_dict().items()}
    pipeline._KEPT.clear()
    _update(spec, g0, fmnist, 1)
    assert not pipeline._KEPT


def test_graddefense_slice_mask_and_cached_bounds_equal_the_per_step_computation():
    from clients.defenses import graddefense as gd

    sizes, sens = [150, 6, 2400, 16, 48000, 120, 840, 10], [0.3, 0.1, 0.5, 0.2, 0.9, 0.05, 0.0, 0.0]
    bounds = gd.slice_bounds(sizes, sens, 10)
    cached = gd.cached_slice_bounds(tuple(sizes), tuple(sens), 10)
    np.testing.assert_array_equal(cached, bounds)
    assert gd.cached_slice_bounds(tuple(sizes), tuple(sens), 10) is cached and not cached.flags.writeable
    total = sum(sizes)
    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        chosen = torch.randperm(10, generator=g)[: int(torch.randint(0, 11, (1,), generator=g))]
        # the reference: each entry's slice id by bucketing, then membership
        sid = torch.bucketize(torch.arange(total), torch.as_tensor(bounds[1:-1]), right=True)
        assert torch.equal(gd.slice_mask(bounds, chosen, total, torch.device("cpu")), torch.isin(sid, chosen))


def test_array_to_numpy_refuses_corrupt_bytes_like_flower():
    from flwr.app import Array

    from fl_sim.task.arrays import array_to_numpy

    good = ArrayRecord({"w": torch.randn(5, 4)})["w"]
    cut = Array(dtype=good.dtype, shape=tuple(good.shape), stype=good.stype, data=good.data[:-4])
    for a in (cut, Array(dtype=good.dtype, shape=tuple(good.shape), stype=good.stype, data=b"not an npy")):
        with pytest.raises(Exception) as ours:
            array_to_numpy(a)
        with pytest.raises(Exception) as flowers:
            a.numpy()
        assert type(ours.value) is type(flowers.value)
    np.testing.assert_array_equal(array_to_numpy(good), good.numpy())


def test_array_to_numpy_without_copy_is_a_read_only_view_of_the_same_values():
    from fl_sim.task.arrays import array_to_numpy

    for k, v in to_array_record(_state()).items():
        view, copied = array_to_numpy(v, copy=False), array_to_numpy(v)
        assert view.dtype == copied.dtype and view.shape == copied.shape, k
        np.testing.assert_array_equal(view, copied)
        assert copied.flags.writeable and not view.flags.writeable, k


def test_load_global_copies_into_the_models_own_tensors_like_load_state_dict():
    torch.manual_seed(0)
    model = build_model("lenet", (1, 28, 28), 10)
    reference = build_model("lenet", (1, 28, 28), 10)
    pipeline._TARGETS[id(model)] = pipeline._plain_targets(model)
    weight = model.fc.weight
    g = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    pipeline.load_global(model, g)
    reference.load_state_dict(g)
    assert model.fc.weight is weight  # filled in place
    for k, v in reference.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    with pytest.raises(RuntimeError, match="Unexpected key"):  # load_state_dict's own strictness
        pipeline.load_global(model, {**g, "extra": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="size mismatch"):
        pipeline.load_global(model, {**g, "fc.bias": torch.zeros(3)})
    pipeline._TARGETS.clear()


def test_a_model_whose_parameter_was_replaced_is_not_reused(fmnist):
    spec, g0, kept, sig = _kept_after_one_round(fmnist)
    kept.fc.bias = torch.nn.Parameter(kept.fc.bias.detach().clone())  # same name, shape and dtype, a new object
    assert not pipeline.reusable(kept, sig)
    model, _ = pipeline.prepare_model(spec, g0, RecordDict(), 11, torch.device("cpu"))
    assert model is not kept and torch.equal(model.fc.bias, g0["fc.bias"])


def test_a_model_with_a_load_hook_is_not_reused(fmnist):
    _, _, kept, sig = _kept_after_one_round(fmnist)
    kept.register_load_state_dict_post_hook(lambda module, keys: None)
    assert not pipeline.reusable(kept, sig)


def test_a_model_with_extra_state_is_loaded_by_load_state_dict():
    class WithExtra(torch.nn.Linear):
        def get_extra_state(self):
            return {"tag": 1}

        def set_extra_state(self, state):
            self.tag = state["tag"]

    model = torch.nn.Sequential(WithExtra(3, 2))
    assert pipeline._plain_targets(model) is None
    assert pipeline._plain_targets(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))) is not None
