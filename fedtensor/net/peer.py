"""Websocket connections on asyncio: the I/O layer around :mod:`fedtensor.protocol.wsframes`.

Theory of operation
-------------------
A :class:`WebSocketPeer` is an :class:`asyncio.BufferedProtocol`: asyncio calls
it when bytes arrive and when the socket can take more. It carries fedtensor
frames (see :mod:`fedtensor.protocol.chunks`) as binary websocket messages, in two
phases:

1. **Handshake.** The HTTP upgrade is read up to its blank line and handed to
   the subclass (:meth:`handshake_received`), which uses the ``websockets``
   library's sans-I/O ``ServerProtocol`` or ``ClientProtocol`` to check it and
   answer. Nothing else is read before the connection is open; a handshake
   longer than :data:`MAX_HANDSHAKE` bytes, or slower than ``open_timeout``,
   ends the connection.
2. **Open.** Received bytes go to the :class:`~fedtensor.protocol.wsframes.Parser`; its
   messages go to a :class:`~fedtensor.protocol.chunks.Reassembler`; each complete
   frame goes to :meth:`frame_received`, *in the same call*: no task and no
   queue stand between the socket and the application. A large message is
   received in place, straight into the frame being reassembled.

Sending (:meth:`send_frame`) splits a frame into messages lazily and writes
them while the transport accepts more: when asyncio pauses writing, the rest
waits for ``resume_writing``, so a 64 MiB tensor is never copied whole into
the transport's buffer. A client masks each message as it writes it (RFC
6455 requires it); a server writes the tensors' own memory. Pongs are written
at once; a close frame waits behind the messages queued before it.

Heartbeats: every ``ping_interval`` seconds a ping goes out; without its pong
within ``ping_timeout`` the peer is taken for dead and the connection is
aborted. The event loop never waits on computation (the worker computes on a
thread of its own), so a long operation does not delay pongs.

Closing follows RFC 6455: the side that closes sends a close frame and waits
(at most ``close_timeout``) for the other's; the server then closes TCP, the
client waits for it to. :meth:`connection_closed` is called once, with the
code and reason the peer sent (1006 when none arrived).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar, cast

from fedtensor.errors import LimitExceeded, ProtocolError
from fedtensor.protocol.chunks import Reassembler, split_frame
from fedtensor.protocol.codec import Chunk
from fedtensor.protocol.pool import POOL
from fedtensor.protocol.wsframes import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    Close,
    Event,
    Message,
    Parser,
    Ping,
    Pong,
    Violation,
    close_frame,
    control_frame,
    header,
    masked,
)

__all__ = ["CLOSED", "CLOSING", "CONNECTING", "MAX_HANDSHAKE", "OPEN", "WebSocketPeer"]

_log = logging.getLogger("fedtensor.websocket")

#: Bytes of an HTTP upgrade request or response, headers included.
MAX_HANDSHAKE = 16 << 10

#: Messages shorter than this are written with their header in one call.
_JOIN_BELOW = 64 << 10

CONNECTING, OPEN, CLOSING, CLOSED = "connecting", "open", "closing", "closed"


@dataclass(frozen=True, slots=True)
class _Closing:
    """The place of the close frame in the outgoing queue."""

    code: int
    reason: str


class WebSocketPeer(asyncio.BufferedProtocol):
    """One end of a websocket connection carrying fedtensor frames."""

    #: True for the end that masks what it sends (RFC 6455 section 5.3).
    client: ClassVar[bool]

    def __init__(
        self,
        *,
        max_message: int,
        max_frame: int,
        ping_interval: float | None,
        ping_timeout: float | None,
        open_timeout: float,
        close_timeout: float,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.state = CONNECTING
        self.max_message = max_message
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._close_timeout = close_timeout
        self._reassembler = Reassembler(max_frame)
        self._parser = Parser(
            masked=not self.client,
            # Room for the one-byte kind (or the 9-byte split header).
            max_message=max_message + 16,
            allocate=self._allocate,
            handle=self._handle_event,
        )
        #: What was received before the connection opened.
        self.handshake_bytes = bytearray()
        self._head_buffer = memoryview(bytearray(MAX_HANDSHAKE))
        # Frames to send (their messages, and their size), and where a close frame goes.
        self._outgoing: collections.deque[tuple[Iterator[Chunk], int] | _Closing] = (
            collections.deque()
        )
        #: Bytes of frames handed to send_frame and not yet all written to the transport.
        self.unsent = 0
        self._paused = False
        self._timer: asyncio.TimerHandle | None = self.loop.call_later(
            open_timeout, self._handshake_timed_out
        )
        self._ping_handle: asyncio.TimerHandle | None = None
        self._ping_payload: bytes | None = None
        #: The close code and reason the peer sent (1006 if it sent none).
        self.close_code: int | None = None
        self.close_reason = ""
        #: Why this end closed or aborted the connection, if it did.
        self.local_reason: str | None = None
        self.closed = self.loop.create_future()

    # -- for subclasses ---------------------------------------------------------------------------

    def handshake_received(self, head: bytes) -> bool:
        """Handle the HTTP head; answer it; return True once the connection is open."""
        raise NotImplementedError

    def frame_received(self, frame: memoryview) -> None:
        """A complete fedtensor frame arrived."""
        raise NotImplementedError

    def connection_closed(self) -> None:
        """The connection ended (once, after ``close_code`` is set)."""

    def unsent_changed(self) -> None:
        """:attr:`unsent` changed (a frame was queued, or all of one written)."""

    @property
    def remote_address(self) -> object:
        return self.transport.get_extra_info("peername") if self.transport else None

    def opened(self) -> None:
        """Switch to the open phase (the subclass calls this once the handshake is done)."""
        self.state = OPEN
        self._cancel_timer()
        self._schedule_ping()

    # -- asyncio callbacks ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: uvloop's transports are not asyncio.Transport subclasses.
        self.transport = cast(asyncio.Transport, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.state is CONNECTING:
            return self._head_buffer
        return self._parser.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        if self.state is CONNECTING:
            self._head_updated(nbytes)
            return
        if self.state is CLOSED or self.close_code is not None:
            return  # after a close frame, nothing more is read
        try:
            self._parser.buffer_updated(nbytes)
        except Violation as exc:
            self.fail(exc.code, exc.reason)

    def eof_received(self) -> bool | None:
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state is CLOSED:
            return
        self.state = CLOSED
        self._cancel_timer()
        if self._ping_handle is not None:
            self._ping_handle.cancel()
        if self.close_code is None:
            self.close_code = 1006
        self._drop_outgoing()
        if not self.closed.done():
            self.closed.set_result(None)
        self.connection_closed()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._pump()

    # -- receiving --------------------------------------------------------------------------------

    def _head_updated(self, nbytes: int) -> None:
        self.handshake_bytes += self._head_buffer[:nbytes]
        end = self.handshake_bytes.find(b"\r\n\r\n")
        if end < 0:
            if len(self.handshake_bytes) >= MAX_HANDSHAKE:
                self.abort(f"no HTTP head within {MAX_HANDSHAKE} bytes")
            return
        head, rest = bytes(self.handshake_bytes[: end + 4]), bytes(self.handshake_bytes[end + 4 :])
        if not self.handshake_received(head) or self.state is not OPEN:
            return
        self.handshake_bytes = bytearray()
        self._head_buffer = memoryview(b"")  # not needed again: 16 KiB per connection
        if rest:
            try:
                self._parser.receive(rest)
            except Violation as exc:
                self.fail(exc.code, exc.reason)

    def _allocate(self, length: int) -> memoryview:
        in_place = self._reassembler.destination(length)
        if in_place is not None:
            return in_place
        return POOL.take(length)

    def _handle_event(self, event: Event) -> None:
        if self.state is not OPEN and self.close_code is None and type(event) is not Close:
            return  # closing: only the peer's close frame still matters
        if self.close_code is not None:
            return
        if type(event) is Message:
            if event.text:
                self.fail(1003, "text is not a frame")
                return
            try:
                frame = self._reassembler.feed(event.data)
            except LimitExceeded as exc:
                self.fail(1009, str(exc))
                return
            except ProtocolError as exc:
                self.fail(1007, f"bad frame: {exc}")
                return
            if frame is not None:
                self.frame_received(frame)
        elif type(event) is Ping:
            self._write(control_frame(OP_PONG, event.data, mask=self.client))
        elif type(event) is Pong:
            if event.data == self._ping_payload and self.state is OPEN:
                self._ping_payload = None
                self._cancel_timer()
                self._schedule_ping()
        else:
            assert type(event) is Close
            self._close_received(event)

    def _close_received(self, event: Close) -> None:
        self.close_code, self.close_reason = event.code, event.reason
        if self.state is OPEN:
            # Answer with the same code (none if it sent none), after what is queued.
            self._drop_outgoing()  # the peer reads nothing more
            payload = b"" if event.code == 1005 else event.code.to_bytes(2, "big")
            self._write(control_frame(OP_CLOSE, payload, mask=self.client))
            self.state = CLOSING
        self._expect_tcp_close()

    def _expect_tcp_close(self) -> None:
        assert self.transport is not None
        if not self.client:
            self.transport.close()  # the server closes TCP first (RFC 6455 7.1.1)
            return
        self._cancel_timer()
        self._timer = self.loop.call_later(self._close_timeout, self.transport.abort)

    # -- sending ----------------------------------------------------------------------------------

    def send_frame(self, chunks: list[Chunk]) -> None:
        """Send one fedtensor frame (dropped once the connection is closing)."""
        if self.state is not OPEN:
            return
        size = sum(memoryview(chunk).nbytes for chunk in chunks)
        self.unsent += size
        self._outgoing.append((split_frame(chunks, self.max_message), size))
        if not self._paused:
            self._pump()
        if self.unsent:
            self.unsent_changed()

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake after the messages already queued."""
        if self.state is not OPEN:
            if self.state is CONNECTING:
                self.abort(reason or "closed during the handshake")
            return
        self.local_reason = self.local_reason or reason
        self.state = CLOSING
        self._outgoing.append(_Closing(code, reason))  # the close frame's place in the queue
        if not self._paused:
            self._pump()

    def fail(self, code: int, reason: str) -> None:
        """Close at once for a protocol violation or a limit, dropping what is queued."""
        _log.warning("closing the connection with %s: %s", self.remote_address, reason)
        if self.state is not OPEN:
            self.abort(reason)
            return
        self.local_reason = reason
        self._drop_outgoing()
        self._paused = False
        self.close(code, reason)

    def abort(self, reason: str) -> None:
        self.local_reason = self.local_reason or reason
        if self.transport is not None:
            self.transport.abort()

    def _pump(self) -> None:
        outgoing = self._outgoing
        while outgoing and not self._paused:
            item = outgoing[0]
            if type(item) is _Closing:
                outgoing.popleft()
                code, reason = item.code, item.reason
                self._write(close_frame(code, reason, mask=self.client))
                self._cancel_timer()
                if self.close_code is not None:
                    self._expect_tcp_close()  # theirs came first and was answered
                else:
                    assert self.transport is not None
                    self._timer = self.loop.call_later(self._close_timeout, self.transport.abort)
                return
            messages, size = item  # type: ignore[misc]
            message = next(messages, None)
            if message is None:
                outgoing.popleft()
                self.unsent -= size
                self.unsent_changed()
                continue
            self._write_message(message)

    def _drop_outgoing(self) -> None:
        self._outgoing.clear()
        self.unsent = 0

    def _write_message(self, message: Chunk) -> None:
        transport = self.transport
        assert transport is not None
        if self.client:
            key = os.urandom(4)
            # split_frame's whole messages are new buffers of its own: masked in place.
            payload = masked(message, key, in_place=isinstance(message, bytearray))
            head = header(OP_BINARY, memoryview(payload).nbytes, key)
        else:
            payload = message
            head = header(OP_BINARY, memoryview(payload).nbytes)
        if memoryview(payload).nbytes < _JOIN_BELOW:
            transport.write(head + payload)
        else:
            transport.write(head)
            transport.write(payload)

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    # -- timers -----------------------------------------------------------------------------------

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _handshake_timed_out(self) -> None:
        if self.state is CONNECTING:
            self.abort("the handshake timed out")

    def _schedule_ping(self) -> None:
        if self._ping_interval is not None and self.state is OPEN:
            self._ping_handle = self.loop.call_later(self._ping_interval, self._send_ping)

    def _send_ping(self) -> None:
        if self.state is not OPEN:
            return
        self._ping_payload = os.urandom(4)
        self._write(control_frame(OP_PING, self._ping_payload, mask=self.client))
        if self._ping_timeout is not None:
            self._timer = self.loop.call_later(self._ping_timeout, self._ping_timed_out)

    def _ping_timed_out(self) -> None:
        if self.state is OPEN:
            _log.warning("no pong from %s: the peer is gone", self.remote_address)
            self.abort("keepalive ping timeout")
