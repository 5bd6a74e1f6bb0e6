"""Frames over a message transport with a size limit: splitting and reassembly, sans I/O.

Theory of operation
-------------------
A network transport moves *messages* (websocket messages, say) and bounds their
size, to protect the receiver's memory. A fedtensor frame (see
:mod:`fedtensor.protocol.codec`) has no size bound: a tensor can be gigabytes. So a
frame travels in one of two ways::

    0x00 frame                          a whole frame in one message
    0x01 total (8 bytes, big-endian)    a split frame: the next messages carry
                                        its ``total`` bytes, as they are

A split frame's data messages carry no header at all, so the sender can pass
slices of the tensors' own memory to the transport without copying them, and
the receiver knows how many bytes are still to come. The receiver allocates
the frame's buffer once, on the header, after checking ``total`` against its
limit (a lying peer cannot make it allocate more than it allows), and copies
each data message into place: the only copy on the receiving side. The
reassembled buffer is a writable memoryview holding the frame alone, so the
codec can build tensors over it without copying.

Large frame buffers come from :data:`fedtensor.protocol.pool.POOL`, and a recycled
buffer is written whole by the next frame before anything reads it, so no
data crosses from one frame (or client) to another.

Nothing here does I/O: :func:`split_frame` turns the codec's chunks into
messages and :class:`Reassembler` turns messages back into frames.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence

from fedtensor.errors import LimitExceeded, ProtocolError
from fedtensor.protocol.pool import POOL

__all__ = ["START", "WHOLE", "Reassembler", "split_frame"]

WHOLE = 0x00
START = 0x01

_START_HEAD = struct.Struct(">BQ")

Buffer = bytes | bytearray | memoryview


def split_frame(chunks: Sequence[Buffer], max_message: int) -> Iterator[Buffer]:
    """The messages that carry the frame made of ``chunks``, none over ``max_message`` bytes.

    The data messages of a split frame are views of ``chunks``, not copies: the
    caller must be done with each message before the chunks change.
    """
    total = sum(memoryview(chunk).nbytes for chunk in chunks)
    if total + 1 <= max_message:
        message = bytearray(total + 1)
        message[0] = WHOLE
        position = 1
        for chunk in chunks:
            size = memoryview(chunk).nbytes
            message[position : position + size] = chunk
            position += size
        yield message
        return
    yield _START_HEAD.pack(START, total)
    for chunk in chunks:
        view = memoryview(chunk).cast("B")
        for start in range(0, len(view), max_message):
            yield view[start : start + max_message]


class Reassembler:
    """Turns received messages back into frames.

    ``max_frame`` bounds the size of one frame (``LimitExceeded`` beyond it).
    """

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self._buffer: memoryview | None = None
        self._view: memoryview | None = None
        self._filled = 0
        self._placed: memoryview | None = None

    @property
    def pending(self) -> int:
        """Bytes of the frame being reassembled that are still to come."""
        return 0 if self._buffer is None else len(self._buffer) - self._filled

    def clear(self) -> None:
        """Drop the frame being reassembled (the connection is gone)."""
        self._buffer = self._view = self._placed = None
        self._filled = 0

    def destination(self, length: int) -> memoryview | None:
        """Where the next message, of ``length`` bytes, can be received in place.

        Only while a split frame has room for it; the message must then be fed
        as the very view returned, which :meth:`feed` takes without copying.
        """
        if self._view is None or self._filled + length > len(self._view):
            return None
        self._placed = self._view[self._filled : self._filled + length]
        return self._placed

    def feed(self, message: Buffer) -> memoryview | None:
        """Take one message; return a complete frame, or ``None`` while one is partial."""
        if message is self._placed:
            self._placed = None
            return self._advance(len(message))
        self._placed = None
        view = memoryview(message).cast("B")
        if self._buffer is not None:
            return self._append(view)
        if not view:
            raise ProtocolError("empty message")
        kind = view[0]
        if kind == WHOLE:
            if len(view) - 1 > self.max_frame:
                raise LimitExceeded(
                    f"frame of {len(view) - 1} bytes exceeds the limit of {self.max_frame}"
                )
            return view[1:]
        if kind == START:
            if len(view) != _START_HEAD.size:
                raise ProtocolError("a split frame's header must be 9 bytes")
            _, total = _START_HEAD.unpack_from(view)
            if total > self.max_frame:
                raise LimitExceeded(f"frame of {total} bytes exceeds the limit of {self.max_frame}")
            if total == 0:
                raise ProtocolError("a split frame cannot be empty")
            self._buffer = POOL.take(total)
            self._view = self._buffer
            self._filled = 0
            return None
        raise ProtocolError(f"unknown message kind {kind:#x}")

    def _append(self, data: memoryview) -> memoryview | None:
        assert self._buffer is not None
        assert self._view is not None
        if not data:
            # split_frame never sends one: a peer that does makes no progress.
            raise ProtocolError("an empty message in a split frame")
        end = self._filled + len(data)
        if end > len(self._buffer):
            raise ProtocolError("a split frame carried more bytes than it declared")
        self._view[self._filled : end] = data
        return self._advance(len(data))

    def _advance(self, size: int) -> memoryview | None:
        assert self._buffer is not None
        self._filled += size
        if self._filled < len(self._buffer):
            return None
        frame = self._buffer
        self._buffer = self._view = None
        return frame
