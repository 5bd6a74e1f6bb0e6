"""Websocket framing (RFC 6455, section 5), sans I/O: bytes in, events out.

Theory of operation
-------------------
fedtensor's worker and client speak real websockets, but drive the frames
themselves rather than through the ``websockets`` library's connection
classes. Those classes serve any application well; fedtensor's traffic has two
shapes they are not built for, and both are measured in ``benchmarks/``:

* **Small frames, one at a time.** A round trip of one small command should
  cost little more than the loopback itself. The I/O layer that drives this
  parser (:mod:`fedtensor.net.peer`) hands a frame to the application in the same
  call that received its bytes: no reader task, no queue in between.
* **Large frames.** A tensor of hundreds of megabytes must not be copied on
  its way through. The parser lets the kernel write a large payload straight
  into its final place (:meth:`Parser.get_buffer` hands out the destination,
  which the owner chooses through ``allocate``: for fedtensor, the tensor's
  slot in the frame being reassembled), and unmasks it there.

What the parser accepts: binary messages, possibly fragmented, each at most
``max_message`` bytes and ``max_fragments`` frames (:class:`Violation` with
``MESSAGE_TOO_BIG`` beyond either, checked on the header, before any
allocation); ping, pong and close control frames. A fragmented message's
pieces are joined as they come, into one buffer: what it costs grows with its
bytes, never with its frame count (an empty continuation frame costs nothing
but its count, and the count is bounded). What it refuses, with the close
code the peer is owed (``PROTOCOL_ERROR`` unless said otherwise): reserved bits (no extension is
ever negotiated), unknown opcodes, control frames that are fragmented or
longer than 125 bytes, a continuation without a start, unmasked frames from a
client or masked frames from a server, a close frame with a malformed code,
and a close reason that is not UTF-8 (``INVALID_DATA``, as for any text that
is not UTF-8). Text messages are delivered (as :class:`Message` with
``text=True``) for the owner to refuse. The close codes every fault gets, here
and above, are tabled in :mod:`fedtensor.protocol.wsconnection`.

The builders (:func:`header`, :func:`control_frame`, :func:`masked`) make the
bytes to send. Nothing here does I/O or knows about an event loop.
"""

from __future__ import annotations

import enum
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

try:  # the C version (in the wheels): the pure Python one is ~250x slower
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets built without its extension
    from websockets.utils import apply_mask

from fedtensor.errors import ProtocolError

__all__ = [
    "DIRECT_THRESHOLD",
    "MAX_FRAGMENTS",
    "Close",
    "CloseCode",
    "Event",
    "Message",
    "Opcode",
    "Parser",
    "Ping",
    "Pong",
    "Violation",
    "close_frame",
    "control_frame",
    "header",
    "masked",
    "unmask",
]


class Opcode(enum.IntEnum):
    """A frame's opcode (RFC 6455 section 5.2)."""

    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


class CloseCode(enum.IntEnum):
    """The status codes of a close frame (RFC 6455 section 7.4.1, and the IANA registry).

    The names are the RFC's, as in ``websockets.frames.CloseCode``. Which fault
    gets which code is tabled in :mod:`fedtensor.protocol.wsconnection`.
    """

    NORMAL_CLOSURE = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    # 1004 is reserved.
    NO_STATUS_RCVD = 1005  # never sent: a close frame without a code reads as this
    ABNORMAL_CLOSURE = 1006  # never sent: the connection ended without a close frame
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    MANDATORY_EXTENSION = 1010
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013
    BAD_GATEWAY = 1014
    TLS_HANDSHAKE = 1015  # never sent: the TLS handshake failed


# The opcodes' values as plain module globals, for the parser's per-frame tests: on
# Python 3.11 ``Opcode.CLOSE`` is a lookup through the enum's metaclass (5x the
# comparison itself), and comparing an int with an enum member costs a little more
# than with an int.
_CONTINUATION, _TEXT, _BINARY = int(Opcode.CONTINUATION), int(Opcode.TEXT), int(Opcode.BINARY)
_CLOSE, _PING, _PONG = int(Opcode.CLOSE), int(Opcode.PING), int(Opcode.PONG)
_DATA_OPCODES = (_CONTINUATION, _TEXT, _BINARY)
_CONTROL_OPCODES = (_CLOSE, _PING, _PONG)

#: Payloads at least this long are received straight into their destination;
#: shorter ones are copied out of the receive buffer (cheaper than a switch).
DIRECT_THRESHOLD = 64 << 10

#: Frames in one fragmented message, by default. fedtensor's own peers never
#: fragment; another client might, in pieces of a few KiB. A bound in bytes
#: alone would let a peer send empty frames forever, each costing a parse.
MAX_FRAGMENTS = 1024

#: Registered close codes a peer may send (RFC 6455 section 7.4), by value; 3000-4999
#: (libraries' and applications' own) may be sent as well.
_SENDABLE_CODES = {
    int(code): code
    for code in CloseCode
    if code not in (CloseCode.NO_STATUS_RCVD, CloseCode.ABNORMAL_CLOSURE, CloseCode.TLS_HANDSHAKE)
}

_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")
_CLOSE_CODE = struct.Struct(">H")

Buffer = bytes | bytearray | memoryview


class Violation(ProtocolError):
    """The peer broke the websocket protocol or a limit: close the connection with ``code``.

    After a violation the parser is out of step with the byte stream: nothing
    more can be parsed from it.
    """

    def __init__(self, code: CloseCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason

    def __reduce__(self) -> tuple[object, ...]:
        # Keeps the exception copyable (pytest and tracebacks copy exceptions).
        return (type(self), (self.code, self.reason))


@dataclass(frozen=True, slots=True)
class Message:
    """A complete data message (its fragments joined)."""

    data: memoryview
    text: bool = False


@dataclass(frozen=True, slots=True)
class Ping:
    data: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    data: bytes


@dataclass(frozen=True, slots=True)
class Close:
    """A close frame: ``code`` ``NO_STATUS_RCVD`` (1005) when it carried none.

    ``code`` is a :class:`CloseCode` when registered, else an int in 3000-4999.
    """

    code: int
    reason: str


Event = Message | Ping | Pong | Close


# -- building frames ------------------------------------------------------------------------------


def header(opcode: Opcode, length: int, mask: bytes | None = None, *, fin: bool = True) -> bytes:
    """The head of a frame carrying ``length`` payload bytes (masked with ``mask`` if given)."""
    first = (0x80 if fin else 0) | opcode
    bit = 0x80 if mask is not None else 0
    if length < 126:
        head = bytes((first, bit | length))
    elif length < 1 << 16:
        head = bytes((first, bit | 126)) + _U16.pack(length)
    else:
        head = bytes((first, bit | 127)) + _U64.pack(length)
    return head if mask is None else head + mask


def control_frame(opcode: Opcode, payload: bytes, *, mask: bool) -> bytes:
    """A whole control frame (ping, pong, close): at most 125 payload bytes."""
    assert opcode in _CONTROL_OPCODES
    assert len(payload) <= 125
    if not mask:
        return header(opcode, len(payload)) + payload
    key = os.urandom(4)
    return header(opcode, len(payload), key) + apply_mask(payload, key)


def close_frame(code: int, reason: str, *, mask: bool) -> bytes:
    """A close frame; the reason is cut to fit a control frame (123 bytes of UTF-8).

    ``NO_STATUS_RCVD`` makes an empty close frame (the code says that none was sent).
    """
    if code == CloseCode.NO_STATUS_RCVD:
        return control_frame(Opcode.CLOSE, b"", mask=mask)
    text = reason.encode()[:123].decode(errors="ignore").encode()
    return control_frame(Opcode.CLOSE, _CLOSE_CODE.pack(code) + text, mask=mask)


def masked(payload: Buffer, key: bytes, *, in_place: bool) -> Buffer:
    """``payload`` masked with ``key``: in place when allowed (and writable), else a copy."""
    view = memoryview(payload).cast("B")
    if in_place and not view.readonly:
        unmask(view, key)  # masking and unmasking are the same XOR
        return view
    return apply_mask(view, key)


def unmask(view: memoryview, key: bytes) -> None:
    """XOR ``view`` with the 4-byte ``key`` repeated, in place.

    websockets' C ``apply_mask`` (SSE2, ~20 GB/s here) makes a copy, which is
    written back. A vectorised XOR in torch would work in place, but it splits
    the work over torch's threads, which on a busy 2-core machine made it 10x
    slower than this.
    """
    view[:] = apply_mask(view, key)


# -- parsing frames -------------------------------------------------------------------------------


def _fresh_buffer(length: int) -> memoryview:
    return memoryview(bytearray(length))


class Parser:
    """Turns the bytes of one direction of a websocket connection into events.

    ``masked``: whether frames must be masked (frames a server receives) or must
    not be (frames a client receives). ``max_message`` bounds a message's bytes,
    ``max_fragments`` its frames. ``allocate(length)`` gives the writable
    buffer that a large unfragmented binary message is received into.

    Feed it as an :class:`asyncio.BufferedProtocol` is fed: write into
    :meth:`get_buffer`, report with :meth:`buffer_updated`. Or call
    :meth:`receive` with bytes. Each event goes to ``handle`` as soon as it is
    parsed (before the next frame is even looked at, so that ``allocate`` sees
    the effects of every earlier message); without ``handle``, events collect
    in :attr:`events`.
    """

    def __init__(
        self,
        *,
        masked: bool,
        max_message: int,
        max_fragments: int = MAX_FRAGMENTS,
        allocate: Callable[[int], memoryview] = _fresh_buffer,
        handle: Callable[[Event], None] | None = None,
    ) -> None:
        self.masked = masked
        self.max_message = max_message
        self.max_fragments = max_fragments
        self._allocate = allocate
        self._buffer = bytearray(max(4 * DIRECT_THRESHOLD, 256 << 10))
        self._view = memoryview(self._buffer)
        self._start = 0  # unparsed bytes are _buffer[_start:_end]
        self._end = 0
        # The payload being received straight into its destination, if any.
        self._direct: memoryview | None = None
        self._direct_filled = 0
        self._direct_key: bytes | None = None
        self._direct_fin = True
        self._direct_opcode = _BINARY
        # A fragmented message so far: its bytes joined (one buffer, not one object
        # per fragment: memory follows the bytes received), its frame count, its kind.
        self._fragments: bytearray | None = None
        self._fragment_count = 0
        self._fragments_text = False
        self.events: list[Event] = []
        self._emit = handle or self.events.append

    # -- input --------------------------------------------------------------------------------

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the next received bytes go (non-empty)."""
        if self._direct is not None:
            return self._direct[self._direct_filled :]
        if len(self._buffer) - self._end < DIRECT_THRESHOLD or self._start > len(self._buffer) // 2:
            self._compact()
        # At most DIRECT_THRESHOLD at a time: what a read brings in beyond a large
        # frame's header would be copied to its destination rather than land there.
        return self._view[self._end : self._end + DIRECT_THRESHOLD]

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written at the start of the last :meth:`get_buffer`."""
        if self._direct is not None:
            self._direct_filled += nbytes
            if self._direct_filled == len(self._direct):
                self._finish_direct()
            return
        self._end += nbytes
        self._parse()

    def receive(self, data: Buffer) -> None:
        """Feed ``data`` (handshake leftovers, tests)."""
        source = memoryview(data).cast("B")
        while source:
            target = self.get_buffer()
            n = min(len(target), len(source))
            target[:n] = source[:n]
            source = source[n:]
            self.buffer_updated(n)

    def release(self) -> None:
        """Drop the buffers, and the owner's callbacks: nothing more will be parsed.

        The callbacks are usually the owner's bound methods, so the owner and its
        parser hold each other: a cycle only the garbage collector would free,
        with every buffer in it.
        """
        self._emit = self.events.append
        self._allocate = _fresh_buffer
        self._buffer = bytearray()
        self._view = memoryview(self._buffer)
        self._start = self._end = 0
        self._direct = self._direct_key = None
        self._fragments = None

    def take_events(self) -> list[Event]:
        """The events collected so far (without ``handle``)."""
        events = self.events[:]
        self.events.clear()
        return events

    # -- internals ----------------------------------------------------------------------------

    def _compact(self) -> None:
        size = self._end - self._start
        if self._start:
            self._view[:size] = self._view[self._start : self._end]
        self._start, self._end = 0, size

    def _parse(self) -> None:
        view = self._view
        while True:
            start = self._start
            available = self._end - start
            if available < 2:
                break
            first, second = view[start], view[start + 1]
            fin = bool(first & 0x80)
            opcode = first & 0x0F
            if first & 0x70:
                raise Violation(
                    CloseCode.PROTOCOL_ERROR, "reserved bits are set (no extension was negotiated)"
                )
            if opcode not in _DATA_OPCODES and opcode not in _CONTROL_OPCODES:
                raise Violation(CloseCode.PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
            if bool(second & 0x80) != self.masked:
                raise Violation(
                    CloseCode.PROTOCOL_ERROR,
                    "a client's frames must be masked"
                    if self.masked
                    else "a server's frames must not be masked",
                )
            length = second & 0x7F
            head = (
                2 + (2 if length == 126 else 8 if length == 127 else 0) + (4 if self.masked else 0)
            )
            if available < head:
                break
            if length == 126:
                (length,) = _U16.unpack_from(view, start + 2)
            elif length == 127:
                (length,) = _U64.unpack_from(view, start + 2)
                if length >> 63:
                    raise Violation(CloseCode.PROTOCOL_ERROR, "the length's top bit is set")
            key = bytes(view[start + head - 4 : start + head]) if self.masked else None
            if opcode >= _CLOSE:
                if not fin:
                    raise Violation(
                        CloseCode.PROTOCOL_ERROR, "a control frame cannot be fragmented"
                    )
                if length > 125:
                    raise Violation(
                        CloseCode.PROTOCOL_ERROR, "a control frame carries at most 125 bytes"
                    )
            else:
                self._check_data_frame(opcode, length)
            body = start + head
            if available - head >= length:
                payload = bytearray(view[body : body + length])
                if key is not None and length:
                    unmask(memoryview(payload), key)
                self._start = body + length
                self._frame(fin, opcode, memoryview(payload))
                continue
            if length >= DIRECT_THRESHOLD:
                # Large: the rest goes straight to the destination (see get_buffer).
                if fin and opcode == _BINARY:
                    destination = self._allocate(length)
                else:
                    destination = _fresh_buffer(length)
                have = available - head
                destination[:have] = view[body : self._end]
                self._start = self._end = 0
                self._direct = destination
                self._direct_filled = have
                self._direct_key, self._direct_fin, self._direct_opcode = key, fin, opcode
                break
            if body + length > len(self._buffer):
                self._compact()  # the buffer holds 4 * DIRECT_THRESHOLD: the frame fits
            break
        if self._start == self._end:
            self._start = self._end = 0

    def _check_data_frame(self, opcode: int, length: int) -> None:
        if opcode == _CONTINUATION:
            if self._fragments is None:
                raise Violation(
                    CloseCode.PROTOCOL_ERROR, "a continuation frame without a message to continue"
                )
            if self._fragment_count >= self.max_fragments:
                raise Violation(
                    CloseCode.MESSAGE_TOO_BIG,
                    f"a message in more than {self.max_fragments} fragments",
                )
            total = len(self._fragments) + length
        else:
            if self._fragments is not None:
                raise Violation(
                    CloseCode.PROTOCOL_ERROR, "a new message began before the last one ended"
                )
            total = length
        if total > self.max_message:
            raise Violation(
                CloseCode.MESSAGE_TOO_BIG,
                f"a message of {total} bytes exceeds the limit of {self.max_message}",
            )

    def _finish_direct(self) -> None:
        payload = self._direct
        assert payload is not None
        self._direct = None
        if self._direct_key is not None:
            unmask(payload, self._direct_key)
        self._frame(self._direct_fin, self._direct_opcode, payload)
        self._parse()  # nothing is buffered, but keeps one exit path

    def _frame(self, fin: bool, opcode: int, payload: memoryview) -> None:
        if opcode == _CLOSE:
            self._emit(_close_event(payload))
        elif opcode == _PING:
            self._emit(Ping(bytes(payload)))
        elif opcode == _PONG:
            self._emit(Pong(bytes(payload)))
        elif opcode == _CONTINUATION:
            joined = self._fragments
            assert joined is not None
            joined += payload
            self._fragment_count += 1
            if fin:
                self._fragments = None
                self._emit(Message(memoryview(joined), self._fragments_text))
        elif fin:
            self._emit(Message(payload, opcode == _TEXT))
        else:
            self._fragments = bytearray(payload)
            self._fragment_count = 1
            self._fragments_text = opcode == _TEXT


def _close_event(payload: memoryview) -> Close:
    if len(payload) == 0:
        return Close(CloseCode.NO_STATUS_RCVD, "")
    if len(payload) == 1:
        raise Violation(CloseCode.PROTOCOL_ERROR, "a close frame's code must be 2 bytes")
    (code,) = _CLOSE_CODE.unpack_from(payload)
    if code in _SENDABLE_CODES:
        code = _SENDABLE_CODES[code]
    elif not 3000 <= code < 5000:
        raise Violation(CloseCode.PROTOCOL_ERROR, f"close code {code} cannot be sent")
    try:
        reason = bytes(payload[2:]).decode()
    except UnicodeDecodeError as exc:
        raise Violation(CloseCode.INVALID_DATA, "a close reason must be UTF-8") from exc
    return Close(code, reason)
