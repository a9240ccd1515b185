"""Shared fixtures. Tests run on CPU with one torch thread; Flower telemetry is off."""

from __future__ import annotations

import os
import time
import uuid

import pytest
import torch

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def flower_task_identity():
    """Flower builds server messages only inside a running app; give tests the identity a ServerApp would have."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield


def make_message(content, src_node_id: int = 1, message_type: str = "train", reply_to: str = ""):
    """A Flower Message outside a running app (tests need explicit Metadata)."""
    from flwr.app import Message, Metadata

    md = Metadata(run_id=1, message_id=uuid.uuid4().hex, src_node_id=src_node_id, dst_node_id=0,
                  reply_to_message_id=reply_to or uuid.uuid4().hex, group_id="1", created_at=time.time(), ttl=3600,
                  message_type=message_type)
    return Message(content=content, metadata=md)


@pytest.fixture(scope="session")
def fmnist():
    """The embedded Fashion-MNIST subset."""
    from fl_sim.task.datasets import load_dataset

    return load_dataset("fashion-mnist")
