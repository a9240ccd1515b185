"""``fl_sim.simulation.InProcessBackend``: what a Ray ``ClientAppActor`` does, in this process."""

from __future__ import annotations

import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.simulation.ray_transport.ray_actor import ClientAppException

from fl_sim.simulation import InProcessBackend


def _message() -> Message:
    content = RecordDict({"arrays": ArrayRecord({"w": Array(torch.arange(4.0).numpy())}),
                          "config": ConfigRecord({"lr": 0.1})})
    return Message(content=content, dst_node_id=1, message_type="train")


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})


def _backend(app: ClientApp) -> InProcessBackend:
    backend = InProcessBackend({})
    backend.build(lambda: app)
    return backend


def test_the_client_works_on_copies_of_the_message_and_context():
    """A ClientApp that edits what it received changes neither the server's message nor the stored context, and
    its reply is not an object it could still change (a pickle round trip each way, as Ray's serialisation)."""
    app = ClientApp()
    seen = {}

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        msg.content["config"]["lr"] = 99.0
        msg.content["arrays"] = ArrayRecord({"w": Array(torch.zeros(4).numpy())})
        context.state["count"] = ConfigRecord({"n": 1})
        reply = Message(content=RecordDict({"config": ConfigRecord({"got": 1})}), reply_to=msg)
        seen["reply"], seen["context"] = reply, context
        return reply

    msg, ctx = _message(), _context()
    reply, new_ctx = _backend(app).process_message(msg, ctx)
    assert msg.content["config"]["lr"] == 0.1
    assert msg.content["arrays"]["w"].numpy().tolist() == [0.0, 1.0, 2.0, 3.0]
    assert "count" not in ctx.state and new_ctx.state["count"]["n"] == 1
    assert reply.content["config"]["got"] == 1 and reply is not seen["reply"] and new_ctx is not seen["context"]


def test_a_raising_client_becomes_a_client_app_exception():
    """The engine turns ``ClientAppException`` into Flower's error reply, as it does for a Ray actor."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        raise RuntimeError("boom")

    with pytest.raises(ClientAppException, match="boom"):
        _backend(app).process_message(_message(), _context())


def test_the_drivers_torch_threads_are_restored_after_each_call():
    """The ClientApp sets ``client-num-cpus`` torch threads; the ServerApp's evaluation keeps the driver's own."""
    app = ClientApp()
    inside = []

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        inside.append(torch.get_num_threads())
        return Message(content=RecordDict(), reply_to=msg)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _backend(app).process_message(_message(), _context())
        assert inside == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_process_message_before_build_is_an_error():
    with pytest.raises(ValueError, match="build"):
        InProcessBackend({}).process_message(_message(), _context())
