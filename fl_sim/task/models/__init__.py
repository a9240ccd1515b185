"""Model registry: name → builder ``(input_shape (C, H, W), num_classes) -> nn.Module``.

A new model is one module with a builder plus one ``MODELS.register`` line below. Every builder returns a
classifier mapping ``float32 (B, C, H, W)`` to logits ``(B, num_classes)`` whose last layer is an ``nn.Linear``
(:func:`classifier_layer`); a test builds every model for every dataset shape.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from fl_sim.task.models import cnn, convnet, keylock, lenet, resnet, rgap_nets
from fl_sim.task.models.common import batchnorm_buffers, classifier_layer, evaluate, flat_size
from fl_sim.task.models.keylock import KeyLock, private_state_keys
from fl_sim.task.registry import Registry

Builder = Callable[[tuple[int, int, int], int], nn.Module]

#: Model registry.
MODELS: Registry[Builder] = Registry("model")
MODELS.register("lenet", lenet.lenet)
MODELS.register("lenet-tanh", lenet.lenet_tanh)
MODELS.register("cnn", cnn.SimpleCNN)
MODELS.register("lenet-kl", keylock.LeNetKL)
MODELS.register("resnet20-kl", keylock.ResNet20KL)
MODELS.register("convnet", convnet.ConvNet)
MODELS.register("cnn6", rgap_nets.cnn6)
MODELS.register("cnn6-d", rgap_nets.cnn6_d)
MODELS.register("fcn3", rgap_nets.fcn3)
MODELS.register("resnet20", resnet.resnet20)
MODELS.register("resnet18", resnet.resnet18)


def build_model(name: str, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Build model ``name`` for inputs ``(C, H, W)`` and ``num_classes`` outputs.

    Raises:
        RegistryError: unknown name (a ``KeyError`` whose message lists the registry).
    """
    return MODELS[name](tuple(input_shape), int(num_classes))


__all__ = ["MODELS", "KeyLock", "batchnorm_buffers", "build_model", "classifier_layer", "evaluate", "flat_size",
           "private_state_keys"]
