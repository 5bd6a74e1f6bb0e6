"""Frames over a message transport with a size limit: splitting and reassembly, sans I/O.

Theory of operation
-------------------
A network transport moves *messages* (websocket messages, say) and bounds their
size, to protect the receiver's memory. A fedtensor frame (see
:mod:`fedtensor._codec`) has no size bound: a tensor can be gigabytes. So a
frame travels as one or more messages, each starting with one byte that says
what it carries::

    0x00 WHOLE   the rest of the message is a complete frame
    0x01 START   then an 8-byte big-endian total frame length, then the first bytes
    0x02 MORE    the next bytes of the frame being reassembled

The receiver allocates the frame's buffer once, when it reads START, after
checking the declared length against its limit (so a lying peer cannot make it
allocate more than it allows), and copies each MORE into place: the only copy
on the receiving side. The reassembled buffer is a writable ``bytearray``
holding the frame alone, so the codec can build tensors over it without copying.

Nothing here does I/O: :func:`split_frame` turns the codec's chunks into
messages and :class:`Reassembler` turns messages back into frames.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence

from ._exceptions import LimitExceeded, ProtocolError

__all__ = ["MORE", "START", "WHOLE", "Reassembler", "split_frame"]

WHOLE = 0x00
START = 0x01
MORE = 0x02

_START_HEAD = struct.Struct(">BQ")

Buffer = bytes | bytearray | memoryview


def split_frame(chunks: Sequence[Buffer], max_message: int) -> Iterator[bytes | bytearray]:
    """The messages that carry the frame made of ``chunks``, none over ``max_message`` bytes."""
    total = sum(len(chunk) for chunk in chunks)
    if total + 1 <= max_message:
        message = bytearray(total + 1)
        message[0] = WHOLE
        _gather(chunks, memoryview(message)[1:])
        yield message
        return
    if max_message <= _START_HEAD.size:
        raise ValueError(f"max_message must exceed {_START_HEAD.size} bytes")
    views = [memoryview(chunk).cast("B") for chunk in chunks]
    index, offset = 0, 0  # position in `views`
    first = True
    remaining = total
    while remaining:
        head = _START_HEAD.pack(START, total) if first else bytes((MORE,))
        size = min(remaining, max_message - len(head))
        message = bytearray(len(head) + size)
        message[: len(head)] = head
        out = memoryview(message)[len(head) :]
        filled = 0
        while filled < size:
            view = views[index]
            take = min(len(view) - offset, size - filled)
            out[filled : filled + take] = view[offset : offset + take]
            filled += take
            offset += take
            if offset == len(view):
                index, offset = index + 1, 0
        remaining -= size
        first = False
        yield message


def _gather(chunks: Sequence[Buffer], out: memoryview) -> None:
    position = 0
    for chunk in chunks:
        size = len(chunk) if not isinstance(chunk, memoryview) else chunk.nbytes
        out[position : position + size] = chunk
        position += size


class Reassembler:
    """Turns received messages back into frames.

    ``max_frame`` bounds the size of one frame (``LimitExceeded`` beyond it).
    """

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self._buffer: bytearray | None = None
        self._view: memoryview | None = None
        self._filled = 0

    @property
    def pending(self) -> int:
        """Bytes of the frame being reassembled that are still to come."""
        return 0 if self._buffer is None else len(self._buffer) - self._filled

    def feed(self, message: Buffer) -> memoryview | bytearray | None:
        """Take one message; return a complete frame, or ``None`` while one is partial."""
        if not message:
            raise ProtocolError("empty message")
        view = memoryview(message).cast("B")
        kind = view[0]
        if kind == WHOLE:
            if self._buffer is not None:
                raise ProtocolError("a whole frame arrived in the middle of a split one")
            if len(view) - 1 > self.max_frame:
                raise LimitExceeded(
                    f"frame of {len(view) - 1} bytes exceeds the limit of {self.max_frame}"
                )
            return view[1:]
        if kind == START:
            if self._buffer is not None:
                raise ProtocolError("a frame started before the previous one ended")
            if len(view) < _START_HEAD.size:
                raise ProtocolError("truncated frame header")
            _, total = _START_HEAD.unpack_from(view)
            if total > self.max_frame:
                raise LimitExceeded(f"frame of {total} bytes exceeds the limit of {self.max_frame}")
            self._buffer = bytearray(total)
            self._view = memoryview(self._buffer)
            self._filled = 0
            return self._append(view[_START_HEAD.size :])
        if kind == MORE:
            if self._buffer is None:
                raise ProtocolError("a continuation arrived with no frame started")
            return self._append(view[1:])
        raise ProtocolError(f"unknown message kind {kind:#x}")

    def _append(self, data: memoryview) -> bytearray | None:
        assert self._buffer is not None
        assert self._view is not None
        end = self._filled + len(data)
        if end > len(self._buffer):
            raise ProtocolError("a split frame carried more bytes than it declared")
        self._view[self._filled : end] = data
        self._filled = end
        if end < len(self._buffer):
            return None
        frame = self._buffer
        self._buffer = self._view = None
        return frame
