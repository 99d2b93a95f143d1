"""`InProcessGrid`: a Flower Grid whose nodes are the study's ClientApp in this process, so the study's ServerApp
runs a playground federation without Ray or a SuperLink (`serve`: the ServerApp run to its end on such a grid).

Written by hand: Flower 1.42 offers no public in-process Grid (its simulation's grid needs a SuperLink state and a
Ray backend). It sets three private message-metadata fields and `TaskIdentity`'s private attributes, as Flower's
own runtime does; `tests/test_playground.py` fails if a Flower release changes them."""

from __future__ import annotations

import contextlib
import logging
import traceback
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedseg.federated import server_app

# --------------------------------------------------------------------------------------------------
# The grid: the server's messages delivered to the study's ClientApp in this process
# --------------------------------------------------------------------------------------------------

class InProcessGrid(Grid):
    """A Flower `Grid` whose nodes are the study's ClientApp in this process, one `Context` per site.

    `send_and_receive` delivers each message as a SuperNode would: serialised and read back (so the client gets a
    copy, never the server's object), with the node's own Context; the ClientApp's reply (an error reply, code 2,
    when it raises) comes back serialised too. `on_sent(kind, messages, replies)` sees every exchange."""

    def __init__(self, app: ClientApp, run_config: Mapping[str, Any], num_nodes: int, run_id: int = 1,
                 on_sent: Callable[[str, list[Message], list[Message]], None] | None = None):
        self.app, self.on_sent, self.run_config = app, on_sent, dict(run_config)
        self._run = Run.create_empty(run_id)
        self.contexts = {
            1000 + pid: Context(run_id=run_id, node_id=1000 + pid, node_config={"partition-id": pid,
                                                                              "num-partitions": num_nodes},
                                state=RecordDict(), run_config=dict(run_config))
            for pid in range(num_nodes)}
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            message.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
            message.metadata.__dict__["_run_id"] = self._run.run_id
            received = message_from_proto(message_to_proto(message))  # what a SuperNode receives: a copy
            self._replies[message.metadata.message_id] = self._deliver(received)
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        replies = list(self.pull_messages(self.push_messages(messages)))
        if self.on_sent is not None and messages:
            self.on_sent(messages[0].metadata.message_type, messages, replies)
        return replies

    def _deliver(self, message: Message) -> Message:
        """The ClientApp's reply to `message` on its node, as the simulation engine makes it (vce_api)."""
        context = self.contexts[message.metadata.dst_node_id]
        try:
            reply = self.app(message, context)
        except Exception as error:  # noqa: BLE001 - a SuperNode reports any ClientApp failure as an error reply
            reason = f"{type(error)}:<'{error}'>\n{traceback.format_exc()}"
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)
        reply.metadata.__dict__["_message_id"] = str(uuid.uuid4())
        return message_from_proto(message_to_proto(reply))


def serve(grid: InProcessGrid) -> None:
    """The study's ServerApp (`server_app.main`, the function a deployment starts) run to its end on `grid`, in
    this process: with a server Context on the grid's run config, as Flower's ServerApp runtime gives it
    (`_server_identity`), Flower's INFO log quiet while a dashboard shows the rounds."""
    server = Context(run_id=grid.run.run_id, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(),
                     run_config=dict(grid.run_config))
    with _server_identity(grid.run.run_id), _quiet_flower():
        server_app.main(grid, server)


@contextlib.contextmanager
def _server_identity(run_id: int):
    """This process is the ServerApp while the federation runs: Flower's `TaskIdentity` as its ServerApp runtime
    sets it (`flwr.superlink.runtime.run_serverapp`), which the strategy's new messages take their run and sender
    from; restored afterwards."""
    before = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = before


@contextlib.contextmanager
def _quiet_flower():
    """Flower's INFO log (each round's metrics, as `flwr run` prints them) silenced while the dashboard shows them."""
    logger = logging.getLogger("flwr")
    before = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(before)
