"""The in-memory transport: ``memory://ID`` reaches the in-process worker ``ID``.

Commands and replies travel as Python objects, which is what makes virtual
workers cheap. Value semantics are kept all the same: the client copies what
it sends, and the worker copies what it replies with unless it hands over an
object it forgets (``get()``). With ``encode=True`` (or the environment
variable ``FEDTENSOR_MEMORY_ENCODE=1``) every batch is instead encoded to a
wire frame and decoded again, exactly as a network transport would, so the
whole API can be tested against the real wire format without a network.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar
from urllib.parse import urlsplit

from fedtensor.abc import Connection, ReplySink, Transport
from fedtensor.client.handles import encode_by_default
from fedtensor.errors import WorkerUnavailable
from fedtensor.protocol.messages import Command, Message
from fedtensor.worker.actor import WorkerActor, in_process_workers

__all__ = ["MemoryConnection", "MemoryTransport"]


class MemoryConnection(Connection):
    """A client's session on an in-process worker."""

    in_process: ClassVar[bool] = True

    def __init__(self, actor: WorkerActor, sink: ReplySink, *, encode: bool) -> None:
        self._actor = actor
        self._sink = sink
        self._encode = encode
        self._session = actor.open_session(
            self._deliver, sink.connection_lost, aliases_values=not encode
        )

    def send(self, batch: Sequence[Command]) -> None:
        if self._encode:
            from fedtensor.protocol.codec import decode_frame, frame_bytes

            batch = decode_frame(frame_bytes(batch))  # type: ignore[assignment]
        self._session.submit(batch)

    def _deliver(self, replies: Sequence[Message]) -> None:
        if self._encode:
            from fedtensor.protocol.codec import decode_frame, frame_bytes

            replies = decode_frame(frame_bytes(replies))
        self._sink.replies_received(replies)

    def drain(self) -> None:
        self._actor.drain()

    async def aclose(self) -> None:
        self._session.close()


class MemoryTransport(Transport):
    """Connects to workers of this process by id."""

    schemes: ClassVar[tuple[str, ...]] = ("memory",)

    async def connect(
        self, url: str, sink: ReplySink, *, timeout: float, **options: Any
    ) -> MemoryConnection:
        name = urlsplit(url).netloc
        actor = in_process_workers().get(name)
        if actor is None or actor.closed:
            raise WorkerUnavailable(f"no in-process worker named {name!r}")
        encode = options.pop("encode", None)
        if options:
            raise TypeError(f"unknown options for memory://: {', '.join(sorted(options))}")
        return MemoryConnection(
            actor, sink, encode=encode_by_default() if encode is None else bool(encode)
        )
