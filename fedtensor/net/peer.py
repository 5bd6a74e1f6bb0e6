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
at once; a close frame waits behind the messages queued before it. A control
frame (a pong, a close frame) written while asyncio has paused writing goes
into a buffer the peer is not draining: :meth:`control_backed_up` says so, and
the worker stops reading from that peer until writing resumes, so that a
peer that pings and never reads cannot grow the buffer of pongs without bound.

The connection's states, its closing handshake and its keepalive pings are
:class:`~fedtensor.protocol.wsconnection.Connection`'s (sans I/O; its module
header tells the whole story, with the close code each fault gets): this class
feeds it what happens (frames, timer, TCP) and carries out the actions it
answers (write a control frame, drop the queued messages, set the one timer,
close or abort TCP). Only the data path skips it: a binary message received
while the connection is open goes straight to the reassembler, with no call
into the state machine. The event loop never waits on computation (the worker
computes on threads of its own), so a long operation does not delay pongs.
:meth:`connection_closed` is called once, when TCP is gone.

Before the handshake a connection costs almost nothing: the head is read in
pieces of :data:`HEAD_CHUNK` bytes into a buffer shared by every connection of
the thread (asyncio fills it and calls :meth:`buffer_updated` in one callback,
which copies the bytes out at once) and kept in a buffer of the connection's
that grows only as bytes arrive (to ``max_head`` at most); the frame parser,
whose receive buffer is 256 KiB, is made only once the connection opens. A
thousand connections that never send a byte cost a few MiB, not a quarter of a
GiB. On the worker's
``wss://`` the transport is a :class:`~fedtensor.net.tls.TLSLayer`, whose own
buffers are as small until :meth:`opened` tells it to grow them.

When TCP is gone the parser and the reassembler drop their buffers and the
parser its callbacks (bound methods of this object): a closed peer holds no
reference cycle, so it is freed, buffers and all, as soon as the last
reference to it goes, without waiting for the garbage collector.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from typing import ClassVar, cast

from fedtensor.errors import LimitExceeded, ProtocolError
from fedtensor.net.tls import TLSLayer
from fedtensor.protocol.chunks import Reassembler, split_frame
from fedtensor.protocol.codec import Chunk
from fedtensor.protocol.pool import POOL
from fedtensor.protocol.wsconnection import (
    CLOSED,
    CONNECTING,
    OPEN,
    AbortTCP,
    Action,
    Connection,
    Deliver,
    DropQueued,
    HalfCloseTCP,
    Send,
    SendAfterQueued,
    SetTimer,
    State,
    Wait,
    close_code_for,
)
from fedtensor.protocol.wsframes import (
    CloseCode,
    Event,
    Message,
    Opcode,
    Parser,
    Violation,
    header,
    masked,
)

__all__ = ["HEAD_CHUNK", "MAX_HANDSHAKE", "WebSocketPeer"]

_log = logging.getLogger("fedtensor.websocket")

#: Bytes of an HTTP upgrade request or response, headers included.
MAX_HANDSHAKE = 16 << 10

#: Bytes read at a time before the connection opens: a silent connection holds this much.
HEAD_CHUNK = 1 << 10

#: Messages shorter than this are written with their header in one call.
_JOIN_BELOW = 64 << 10

#: Where received bytes go once they are no longer read (after the peer's close
#: frame, or a fault): written by the kernel, read by nobody.
_DISCARDED = memoryview(bytearray(4096))

_BINARY = Opcode.BINARY  # a global, not an enum lookup per message (see wsframes)

_per_thread = threading.local()


def _head_scratch() -> memoryview:
    """This thread's buffer that heads are read into, for every connection before it opens."""
    buffer: memoryview | None = getattr(_per_thread, "head", None)
    if buffer is None:
        buffer = _per_thread.head = memoryview(bytearray(HEAD_CHUNK))
    return buffer


class WebSocketPeer(asyncio.BufferedProtocol):
    """One end of a websocket connection carrying fedtensor frames."""

    #: True for the end that masks what it sends (RFC 6455 section 5.3).
    client: ClassVar[bool]
    #: Bytes of the HTTP head this end reads before it gives up.
    max_head: ClassVar[int] = MAX_HANDSHAKE

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
        #: The connection's state machine: what this class does I/O for.
        self.websocket = Connection(
            client=self.client,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            open_timeout=open_timeout,
            close_timeout=close_timeout,
        )
        self.max_message = max_message
        self._reassembler = Reassembler(max_frame)
        #: Made when the connection opens (see the module's theory: its buffer is 256 KiB).
        self._parser: Parser | None = None
        #: What was received before the connection opened.
        self.handshake_bytes = bytearray()
        # Frames to send (their messages, and their size), and where a close frame goes.
        self._outgoing: collections.deque[tuple[Iterator[Chunk], int] | SendAfterQueued] = (
            collections.deque()
        )
        #: Bytes of frames handed to send_frame and not yet all written to the transport.
        self.unsent = 0
        self._paused = False
        self._timer: asyncio.TimerHandle | None = None
        self.closed = self.loop.create_future()

    # -- the state machine's, for callers -----------------------------------------------------

    @property
    def state(self) -> State:
        return self.websocket.state

    @property
    def close_code(self) -> int | None:
        """The code the peer closed with (``ABNORMAL_CLOSURE`` if it sent none)."""
        return self.websocket.close_code

    @property
    def close_reason(self) -> str:
        return self.websocket.close_reason

    @property
    def local_reason(self) -> str | None:
        """Why this end closed or aborted the connection, if it did."""
        return self.websocket.local_reason

    @property
    def close_timeout(self) -> float:
        return self.websocket.close_timeout

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

    def control_backed_up(self) -> None:
        """A control frame was written while writing is paused: the peer is not reading.

        The worker stops reading until ``resume_writing``. The client does not: a
        client that stopped reading while the worker also holds back (for replies
        the client has not taken) would wait on the worker forever.
        """

    @property
    def remote_address(self) -> object:
        return self.transport.get_extra_info("peername") if self.transport else None

    def opened(self) -> None:
        """Switch to the open phase (the subclass calls this once the handshake is done)."""
        self._parser = Parser(
            masked=not self.client,
            # Room for the one-byte kind (or the 9-byte split header).
            max_message=self.max_message + 16,
            allocate=self._allocate,
            handle=self._handle_event,
        )
        if isinstance(self.transport, TLSLayer):
            self.transport.opened()  # its ciphertext buffer grows now too, not before
        self._act(self.websocket.opened())

    # -- asyncio callbacks ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: uvloop's transports are not asyncio.Transport subclasses.
        self.transport = cast(asyncio.Transport, transport)
        self._act(self.websocket.connection_made())

    def get_buffer(self, sizehint: int) -> memoryview:
        parser = self._parser
        if parser is not None and self.websocket.reading:
            return parser.get_buffer(sizehint)
        if self.websocket.state is CONNECTING:
            return _head_scratch()  # copied into handshake_bytes by _head_updated at once
        return _DISCARDED

    def buffer_updated(self, nbytes: int) -> None:
        websocket = self.websocket
        if not websocket.reading:
            if websocket.state is CONNECTING:
                self._head_updated(nbytes)
            return  # after the peer's close frame, or a fault: dropped
        try:
            self._parser.buffer_updated(nbytes)  # type: ignore[union-attr]  # reading: made
        except Violation as exc:
            self.fail(exc.code, exc.reason)

    def eof_received(self) -> bool | None:
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        if self.websocket.state is CLOSED:
            return
        self._act(self.websocket.connection_lost())
        self._drop_outgoing()
        if self._parser is not None:
            self._parser.release()  # breaks the cycle through its callbacks (see above)
        self._reassembler.clear()
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
        self.handshake_bytes += _head_scratch()[:nbytes]
        end = self.handshake_bytes.find(b"\r\n\r\n")
        if end < 0:
            if len(self.handshake_bytes) >= self.max_head:
                self.abort(f"no HTTP head within {self.max_head} bytes")
            return
        head, rest = bytes(self.handshake_bytes[: end + 4]), bytes(self.handshake_bytes[end + 4 :])
        if not self.handshake_received(head) or self.websocket.state is not OPEN:
            return
        self.handshake_bytes = bytearray()
        if rest:
            try:
                self._parser.receive(rest)  # type: ignore[union-attr]  # open: made
            except Violation as exc:
                self.fail(exc.code, exc.reason)

    def _allocate(self, length: int) -> memoryview:
        in_place = self._reassembler.destination(length)
        if in_place is not None:
            return in_place
        return POOL.take(length)

    def _handle_event(self, event: Event) -> None:
        """The parser's handler: each event, in the call that parsed it."""
        websocket = self.websocket
        if type(event) is not Message or event.text or websocket.state is not OPEN:
            before = websocket.local_reason
            self._act(websocket.receive(event))
            self._log_fault(before)  # a text message is one
            return
        # A binary message while open: Connection.receive would answer Deliver. The
        # data path applies that rule here, with no call and no action object.
        try:
            frame = self._reassembler.feed(event.data)
        except (LimitExceeded, ProtocolError) as exc:
            self.reject(exc)
            return
        if frame is not None:
            self.frame_received(frame)

    def _log_fault(self, before: str | None) -> None:
        """Log why this end is closing, if the last input made it (a fault, not bytes
        past the last read, which the state machine ignores)."""
        reason = self.websocket.local_reason
        if reason is not before:
            _log.warning("closing the connection with %s: %s", self.remote_address, reason)

    # -- sending ----------------------------------------------------------------------------------

    def send_frame(self, chunks: list[Chunk]) -> None:
        """Send one fedtensor frame (dropped once the connection is closing)."""
        if self.websocket.state is not OPEN:
            return
        size = sum(memoryview(chunk).nbytes for chunk in chunks)
        self.unsent += size
        self._outgoing.append((split_frame(chunks, self.max_message), size))
        if not self._paused:
            self._pump()
        if self.unsent:
            self.unsent_changed()

    def close(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "") -> None:
        """Start the closing handshake after the messages already queued."""
        self._act(self.websocket.close(code, reason))

    def fail(self, code: int, reason: str) -> None:
        """Close at once for a fault in what the peer sent, dropping what is queued."""
        websocket = self.websocket
        before = websocket.local_reason
        self._act(websocket.fail(code, reason))
        self._log_fault(before)

    def reject(self, error: LimitExceeded | ProtocolError) -> None:
        """Fail the connection for a received frame that cannot be used, with the code
        the fault is owed (:func:`~fedtensor.protocol.wsconnection.close_code_for`)."""
        reason = str(error) if isinstance(error, LimitExceeded) else f"bad frame: {error}"
        self.fail(close_code_for(error), reason)

    def abort(self, reason: str) -> None:
        """Drop TCP now."""
        self._act(self.websocket.abort(reason))

    def _pump(self) -> None:
        outgoing = self._outgoing
        while outgoing and not self._paused:
            item = outgoing[0]
            if type(item) is SendAfterQueued:
                outgoing.popleft()
                self._write(item.data)
                self._act(self.websocket.close_written())
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
            head = header(_BINARY, memoryview(payload).nbytes, key)
        else:
            payload = message
            head = header(_BINARY, memoryview(payload).nbytes)
        if memoryview(payload).nbytes < _JOIN_BELOW:
            transport.write(head + payload)
        else:
            transport.write(head)
            transport.write(payload)

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    # -- the state machine's actions --------------------------------------------------------------

    def _act(self, actions: Sequence[Action]) -> None:
        """Carry out what the state machine answered, in order."""
        for action in actions:
            match action:
                case Send(data=data):
                    self._write(data)
                    if self._paused:  # set by the write itself past the high-water mark
                        self.control_backed_up()
                case SetTimer(seconds=seconds):
                    if self._timer is not None:
                        self._timer.cancel()
                        self._timer = None
                    if seconds is not None:
                        self._timer = self.loop.call_later(seconds, self._timer_expired)
                case DropQueued():
                    self._drop_outgoing()
                case SendAfterQueued():
                    self._outgoing.append(action)
                    if not self._paused:
                        self._pump()
                case HalfCloseTCP():
                    transport = self.transport
                    if transport is not None and not transport.is_closing():
                        if transport.can_write_eof():
                            transport.write_eof()  # after what is buffered
                        else:
                            transport.close()
                case AbortTCP():
                    if self.transport is not None:
                        self.transport.abort()
                case Deliver():
                    # Answered only for a binary message while open, which
                    # _handle_event delivers itself without asking.
                    raise AssertionError("the data path asked the state machine")

    def _timer_expired(self) -> None:
        self._timer = None
        if self.websocket.wait is Wait.PONG:
            _log.warning("no pong from %s: the peer is gone", self.remote_address)
        self._act(self.websocket.timer_expired())
