"""The interface between fedtensor's core and its transports.

The core (pointers, the client engine, the worker actor) knows transports only
through these classes. A transport carries batches of commands from one client
to one worker, in order, and carries replies back; it decides how (Python
objects on an in-process queue, CBOR frames over a websocket, ...).

Client side::

    connection = await transport.connect(url, sink, timeout=10.0)
    connection.send([Call(...), Fetch(...)])   # never blocks, keeps order
    ...                                        # sink.replies_received([...]) is called
    await connection.aclose()                  # sink.connection_lost(None) is not called

Third-party transports register a :class:`Transport` subclass under the entry
point group ``fedtensor.transports`` with the URL scheme as the name::

    [project.entry-points."fedtensor.transports"]
    mytcp = "mypackage.transport:MyTcpTransport"
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol

from fedtensor.protocol.messages import Command, Message

__all__ = ["Connection", "ReplySink", "Transport"]


class ReplySink(Protocol):
    """What a connection reports to: the client engine implements it."""

    def replies_received(self, batch: Sequence[Message]) -> None:
        """A batch of replies arrived (called on the client's event loop)."""

    def connection_lost(self, exc: BaseException | None) -> None:
        """The connection ended without the client closing it (worker died, network)."""


class Connection(abc.ABC):
    """One client's ordered, reliable channel to one worker."""

    #: True when the worker behind this connection runs in this process and can
    #: be asked to run everything queued for it right now (see :meth:`drain`).
    in_process: ClassVar[bool] = False

    #: The worker's own name for itself, where the transport learns it.
    worker_id: str | None = None

    @abc.abstractmethod
    def send(self, batch: Sequence[Command]) -> None:
        """Queue ``batch`` for the worker. Never blocks; batches arrive in order.

        Must be called on the event loop the connection was made on.
        """

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close the connection; the worker frees this client's objects."""

    def drain(self) -> None:
        """Make the worker run everything sent so far (in-process transports only)."""
        raise NotImplementedError


class Transport(abc.ABC):
    """Makes connections to workers named by URLs of its schemes."""

    #: The URL schemes this transport serves, e.g. ``("memory",)``.
    schemes: ClassVar[tuple[str, ...]]

    @abc.abstractmethod
    async def connect(
        self, url: str, sink: ReplySink, *, timeout: float, **options: Any
    ) -> Connection:
        """Connect to the worker at ``url``; raise a :class:`~fedtensor.FedTensorError`."""
