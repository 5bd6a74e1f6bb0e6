"""The wire codec: messages to bytes and back, with no I/O.

Theory of operation
-------------------
This module is sans-I/O: it turns a batch of messages into bytes and bytes
back into messages, and knows nothing about sockets, event loops or framing on
the wire (how a transport delimits one frame from the next is the transport's
business). Everything here is synchronous and pure.

A *frame* is one CBOR data item (RFC 8949) of three parts: the protocol
version, the *buffers* (one byte string that holds the elements of every
large tensor in the frame, back to back) and the *messages*. Tensors of at
most :data:`INLINE_LIMIT` bytes travel inline in the messages, as RFC 8746
typed arrays; a larger tensor's typed array holds instead a reference, an
offset and a length, to its elements in the buffers. So the messages stay
small whatever the frame carries, and large tensors never pass through a
CBOR library, which would copy them:

* :func:`encode_frame` returns *chunks* (scatter-gather): the frame's head
  with the buffers' head, then each large tensor's elements as a
  ``memoryview`` over the tensor's own memory (with zero padding between
  them), then the messages (a view of one ``bytearray``). A frame without
  large tensors is one chunk, a ``bytearray``. A contiguous CPU tensor is never copied (a
  non-contiguous one is made contiguous first: one copy). A transport that
  can write a list of buffers (``socket.sendmsg``, ``writelines``) sends the
  chunks as they are. The views read the tensors when the chunks are sent, so
  a tensor must not be modified until then; each view keeps its tensor alive.
* :func:`frame_bytes` joins the chunks into one new ``bytearray``: one copy.
* :func:`decode_frame` reads the heads in front of the buffers itself (the
  frame's array, the version, the buffers' byte string), skips the buffers,
  and has cbor2's compiled decoder read the messages.
  Over a writable buffer (a ``bytearray``, or a writable ``memoryview`` over
  one) each large tensor is built directly over its elements in the buffers
  (:func:`torch.frombuffer`): no copy; the tensor shares memory with the
  buffer and keeps it alive (and un-resizable), and its storage is the whole
  buffer, so that memory counted by storage counts what it pins. Over read-only ``bytes`` each
  large tensor is copied once, since torch must not alias memory Python
  considers immutable. A small tensor gets memory of its own (cbor2 copies
  its bytes out of the frame, and one more copy makes them writable): a copy
  of at most 1 KiB costs less than a shaped view, and the small tensors of a
  round trip then do not keep the frame's buffer alive.

So that a tensor can alias the receive buffer, the encoder places the
elements of every large tensor at an offset from the start of the frame
that is a multiple of 16 (the largest element size), with zero padding in
front of each in the buffers. If the elements the decoder receives are
misaligned in memory anyway (another encoder, or a buffer that does not start
the frame), that tensor is copied.

cbor2 decodes; a small encoder of fedtensor's own encodes. cbor2 6's decoder
is compiled (Rust); it calls back into Python once per tag, so that each tag
of fedtensor's grammar becomes its value as it is read, and this module then
checks the messages and builds them. Its encoder checks every container and
tag for cycles, which makes it no faster than writing the heads in Python,
and the item would first have to be built of lists and ``CBORTag`` objects;
so the encoder below writes CBOR heads itself (most of its code is type
checks). Measured on the 4-command request of a round trip (Store of
``torch.tensor([1, 2, 3, 4, 5])``, Call ``add`` of two Refs, Fetch, Release;
82 bytes), best of 40 runs of 2,000 calls in CPU time, on this project's
2-core test machine, with the previous codec (hand-written in Python both
ways) imported beside this one:

    decode_frame                                           8.9 us
      the previous decoder                                11.0 us
      cbor2.loads of the same bytes (tags left as tags)    2.1 us
      the decoded objects alone, built directly            3.0 us
    frame_bytes                                            5.4 us
      the previous encoder                                 7.9 us
      cbor2.dumps of the same item, prebuilt               5.8 us
      cbor2.dumps, building the item first                 8.8 us

Most of decoding is Python work that no CBOR library removes: building the
objects (the four message dataclasses take 1.4 us, the tensor 0.9), checking
the messages (1.2 us more), a call per tag. A 64 MiB tensor is encoded (5 us)
and decoded (9 us) without a copy.

The decoder is the trust boundary: frames come from the network. Every
malformed input raises :class:`~fedtensor.ProtocolError` and nothing else
(nesting deeper than :data:`MAX_DEPTH` raises its subclass
:class:`NestingTooDeep`), and no input makes the decoder allocate more than
the input's size:

* The heads read by hand are checked against the input's length before
  anything else: the buffers must end inside the frame.
* cbor2 reads the messages with its options set for untrusted input
  (``max_depth``, no indefinite lengths, no duplicate map keys, only text or
  byte string map keys). It decodes iteratively and checks nesting as it
  goes, so no input recurses deeply; a declared length past the end of the
  input costs it at most 64 KiB before it stops (both measured: 10,000
  nested arrays and a byte string declared 2**40 bytes long, in 10 bytes).
  Every tag goes through fedtensor's table (cbor2's ``semantic_decoders``):
  a tag outside the grammar is refused before its content is read, so
  cbor2's own tags (shared references, regular expressions, dates, big
  integers, sets ...) never run.
* A reference into the buffers must lie inside them, after the previous
  reference (so no two tensors share elements, and the tensors of a frame
  hold at most the frame's bytes), and must hold exactly the elements its
  shape and dtype call for; so must an inline typed array.
* Message fields are type-checked and values walked, so a worker never sees
  a value outside the grammar.
* cbor2 reports an exception raised inside a tag decoder as a
  ``CBORDecodeError`` caused by it; the decoder raises the cause again as
  itself, so only fedtensor's findings and cbor2's own become
  ``ProtocolError`` (a bug, a ``MemoryError``, a ``KeyboardInterrupt`` stay
  what they are).

The encoder checks the same rules, so it never produces a frame that the
decoder rejects.

Byte format
-----------
All integers in CBOR heads are big-endian; tensor elements are little-endian
(the codec refuses to import on a big-endian host). ``uint`` is CBOR major
type 0 (an integer in ``0 .. 2**64-1``).

Frame::

    [2, buffers, [message, ...]]      2 is the protocol version

``buffers`` is a byte string: the elements of the frame's large tensors, in
the order the messages refer to them, each preceded by zero padding (the
encoder writes its head in 9 bytes when it is not empty, so that the padding
is the same whatever its length). Without large tensors it is empty (``40``).

Messages are arrays whose first element is the message code:

    ====== ========================================================
    code   array
    ====== ========================================================
    1      Store   ``[1, id, value]``
    2      Call    ``[2, id, op, [value, ...], {text: value, ...}]``
    3      Fetch   ``[3, request, id, free]``
    4      Release ``[4, [id, ...]]``
    5      ListObjects ``[5, request]``
    16     Reply   ``[16, request, value]``
    17     Failure ``[17, request, kind, error_type, message]``
    ====== ========================================================

``id`` and ``request`` are ``uint``; ``op``, ``kind``, ``error_type`` and
``message`` are text strings; ``free`` is a boolean. ``Call.args`` decodes to
a tuple, ``Call.kwargs`` to a dict, ``Release.ids`` to a tuple.

Values:

    ============== ==================================================
    Python         CBOR
    ============== ==================================================
    None           null (``0xf6``)
    bool           false / true (``0xf4`` / ``0xf5``)
    int            major type 0 or 1, shortest head (``-2**64 .. 2**64-1``)
    float          double (``0xfb`` + 8 bytes); half and single decode too
    str            text string (UTF-8)
    list           array
    tuple          tag 48821 ``[value, ...]`` (``torch.Size`` and other
                   tuple subclasses encode as tuples)
    dict           map with text keys, no duplicates
    slice          tag 48822 ``[start, stop, step]``
    Ellipsis       tag 48823 ``null``
    torch.dtype    tag 48824 ``"float32"`` (``str(dtype)`` minus ``torch.``)
    Ref            tag 48825 ``uint``
    complex        tag 48826 ``[real, imag]`` (two floats)
    torch.Tensor   tag 40 ``[[uint, ...], typed array]`` (RFC 8746)
    ... with grad  tag 48820 ``[tensor, requires_grad, tensor or null]``
    ============== ==================================================

A tensor is an RFC 8746 multi-dimensional array in row-major order: tag 40
around ``[shape, elements]``, where ``elements`` is a *typed array*: a tag
naming the element type around either a byte string of the raw elements (a
tensor of at most :data:`INLINE_LIMIT` bytes), or tag 48827 ``[offset,
length]`` (two ``uint``): the ``length`` bytes of the buffers' content that
start ``offset`` bytes after its first. The tags RFC 8746 defines are used
where they exist; the others are fedtensor's own (numbers 48800 and up, in
the first-come-first-served range, unregistered):

    ================= ============== ==============================
    dtype             tag            decoded also
    ================= ============== ==============================
    uint8             64             68 (uint8, clamped)
    uint16            69             65 (big-endian)
    uint32            70             66 (big-endian)
    uint64            71             67 (big-endian)
    int8              72
    int16             77             73 (big-endian)
    int32             78             74 (big-endian)
    int64             79             75 (big-endian)
    float16           84             80 (big-endian)
    float32           85             81 (big-endian)
    float64           86             82 (big-endian)
    bool              48800          (bytes must be 0 or 1)
    bfloat16          48801
    complex32         48802
    complex64         48803
    complex128        48804
    float8_e4m3fn     48805
    float8_e5m2       48806
    float8_e4m3fnuz   48807
    float8_e5m2fnuz   48808
    float8_e8m0fnu    48809
    float4_e2m1fn_x2  48810
    ================= ============== ==============================

Big-endian typed arrays are byte-swapped into a copy. Dtypes that the running
torch lacks are left out. Quantized tensors, torch's placeholder dtypes
(``uint1`` ... ``uint7``, ``int1`` ... ``int7``, ``bits*``), and sparse,
nested or non-CPU tensors are refused. A tensor that requires grad or has a
``.grad`` is wrapped in tag 48820; the grad is encoded as a plain tensor, and
decoding restores ``requires_grad`` (on a new leaf) and ``.grad``. Plain
tensors of the messages are pure RFC 8746 when inline, so any CBOR decoder
reads them; a large one needs its reference resolved in the buffers.

For example, ``Store(1, torch.tensor([1.5, -2.0]))``::

    83 02 40                   [2, h'',             no large tensors
    81                           [
    83 01 01                       [1, 1,
    d8 28 82                         tag 40 [
    81 02                              [2],
    d8 55 48                           tag 85 (float32), 8 bytes:
    00 00 c0 3f 00 00 00 c0            1.5, -2.0
                                   ]]]]

and ``Store(1, torch.ones(300))``, whose 1,200 bytes go to the buffers::

    83 02                      [2,
    5b 00 00 00 00 00 00 04 b5   h'<1,205 bytes>',
      00 00 00 00 00               5 bytes of padding: the elements start at
      00 00 80 3f ...              frame offset 16, and take 1,200 bytes
    81 83 01 01 d8 28 82         [[1, 1, tag 40 [
    81 19 01 2c                        [300],
    d8 55 d9 be bb 82 05 19 04 b0      tag 85 (float32) tag 48827 [5, 1200]
                                 ]]]]

Nesting follows cbor2's rule: a tag, or an array or map with at least one
element, may be enclosed by at most ``MAX_DEPTH - 1`` tags and non-empty
arrays and maps, counted from the top of the item (for a frame, its own
arrays count: a message's value is enclosed by three). An empty array or map
encloses nothing, and is not counted. Not in the grammar, and rejected: byte
strings outside typed arrays, indefinite lengths, undefined and other simple
values, unknown tags, non-text or duplicate map keys, references outside a
frame's buffers, bytes after the item, frames of another version.
"""

from __future__ import annotations

import ctypes
import io
import struct
import sys
import types
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Final, NoReturn

import cbor2
import torch

from fedtensor.errors import ProtocolError
from fedtensor.protocol.messages import (
    Call,
    Failure,
    Fetch,
    ListObjects,
    Message,
    Ref,
    Release,
    Reply,
    Store,
)
from fedtensor.protocol.tensors import memory_of, shaped

__all__ = [
    "DECODE_EXPANSION",
    "INLINE_LIMIT",
    "MAX_DEPTH",
    "PROTOCOL_VERSION",
    "Chunk",
    "NestingTooDeep",
    "decode_frame",
    "decode_value",
    "decoded_bound",
    "encode_frame",
    "encode_value",
    "frame_bytes",
]

if sys.byteorder != "little":  # pragma: no cover - torch ships for little-endian hosts only
    raise ImportError("fedtensor's wire codec requires a little-endian host")

PROTOCOL_VERSION: Final = 2
MAX_DEPTH: Final = 64
"""The deepest an array, map or tag may be nested (see the module docstring)."""
INLINE_LIMIT: Final = 1024
#: At most how many bytes of Python objects one byte of a frame's CBOR structure
#: (the frame outside its out-of-band tensor buffers) decodes into. Measured with
#: tracemalloc over cbor2: an empty map (one byte) becomes 72 bytes (a dict and its
#: slot in the enclosing list), an empty list 64, a half float 11; the smallest
#: tensor item (about 8 bytes) is charged a 512-byte tensor object by a worker.
DECODE_EXPANSION: Final = 80
"""Tensors of at most this many bytes travel inline; larger ones in the frame's buffers."""

Chunk = bytes | bytearray | memoryview


class NestingTooDeep(ProtocolError):
    """A value or a frame nests arrays, maps and tags deeper than :data:`MAX_DEPTH`."""


# Major types, shifted into place in the initial byte.
_UINT: Final = 0x00
_NINT: Final = 0x20
_BYTES: Final = 0x40
_TEXT: Final = 0x60
_ARRAY: Final = 0x80
_MAP: Final = 0xA0
_TAG: Final = 0xC0

_FALSE: Final = 0xF4
_TRUE: Final = 0xF5
_NULL: Final = 0xF6

_UINT_LIMIT: Final = 1 << 64
_SIZE_LIMIT: Final = 1 << 63  # torch's sizes and strides are int64

# Project tags for values.
_TAG_GRAD: Final = 48820
_TAG_TUPLE: Final = 48821
_TAG_SLICE: Final = 48822
_TAG_ELLIPSIS: Final = 48823
_TAG_DTYPE: Final = 48824
_TAG_REF: Final = 48825
_TAG_COMPLEX: Final = 48826
_TAG_BUFFER: Final = 48827  # [offset, length] in the frame's buffers
_TAG_NDARRAY: Final = 40  # RFC 8746 multi-dimensional array, row-major

_MSG_STORE: Final = 1
_MSG_CALL: Final = 2
_MSG_FETCH: Final = 3
_MSG_RELEASE: Final = 4
_MSG_LIST_OBJECTS: Final = 5
_MSG_REPLY: Final = 16
_MSG_FAILURE: Final = 17

#: Payloads in the buffers start at frame offsets that are multiples of this.
_ALIGN: Final = 16
# The frame's head when its buffers are empty, and when they are not: the
# buffers' head is then 9 bytes wide whatever their length, so the buffers'
# content starts at the same frame offset in every frame.
_FRAME_HEAD: Final = b"\x83\x02\x40"
_FRAME_HEAD_WITH_BUFFERS: Final = b"\x83\x02\x5b"
_BUFFERS_START: Final = len(_FRAME_HEAD_WITH_BUFFERS) + 8
_PADDING: Final = memoryview(bytes(_ALIGN - 1))

_PACK_BB = struct.Struct(">BB").pack
_PACK_BH = struct.Struct(">BH").pack
_PACK_BI = struct.Struct(">BI").pack
_PACK_BQ = struct.Struct(">BQ").pack
_PACK_BD = struct.Struct(">Bd").pack
_string_at = ctypes.string_at


# ---------------------------------------------------------------------------
# dtype tables

# (dtype name, tag for little-endian elements, tag for big-endian elements).
_TYPED_ARRAY_TAGS: Final[tuple[tuple[str, int, int | None], ...]] = (
    ("uint8", 64, None),
    ("uint16", 69, 65),
    ("uint32", 70, 66),
    ("uint64", 71, 67),
    ("int8", 72, None),
    ("int16", 77, 73),
    ("int32", 78, 74),
    ("int64", 79, 75),
    ("float16", 84, 80),
    ("float32", 85, 81),
    ("float64", 86, 82),
    ("bool", 48800, None),
    ("bfloat16", 48801, None),
    ("complex32", 48802, None),
    ("complex64", 48803, None),
    ("complex128", 48804, None),
    ("float8_e4m3fn", 48805, None),
    ("float8_e5m2", 48806, None),
    ("float8_e4m3fnuz", 48807, None),
    ("float8_e5m2fnuz", 48808, None),
    ("float8_e8m0fnu", 48809, None),
    ("float4_e2m1fn_x2", 48810, None),
)
_TAG_UINT8_CLAMPED: Final = 68


def _build_typed_array_tables() -> tuple[
    dict[torch.dtype, int], dict[int, tuple[torch.dtype, bool]]
]:
    tag_of: dict[torch.dtype, int] = {}
    dtype_of: dict[int, tuple[torch.dtype, bool]] = {}
    for name, le_tag, be_tag in _TYPED_ARRAY_TAGS:
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype):
            continue  # an older torch without this dtype
        tag_of[dtype] = le_tag
        dtype_of[le_tag] = (dtype, False)
        if be_tag is not None:
            dtype_of[be_tag] = (dtype, True)
    dtype_of[_TAG_UINT8_CLAMPED] = (torch.uint8, False)
    return tag_of, dtype_of


_TAG_OF_DTYPE, _DTYPE_OF_TAG = _build_typed_array_tables()

# Every dtype this torch defines, by canonical name ("float32", never the alias
# "float"). Built once here; decoding looks names up in it and never calls
# getattr on a name from the wire.
_DTYPE_BY_NAME: Final[dict[str, torch.dtype]] = {
    str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)
}
_NAME_OF_DTYPE: Final[dict[torch.dtype, str]] = {d: n for n, d in _DTYPE_BY_NAME.items()}


# ---------------------------------------------------------------------------
# Encoder


def _write_head(out: bytearray, major: int, n: int) -> None:
    """Append the shortest head for major type ``major`` and argument ``n``."""
    if n < 24:
        out.append(major | n)
    elif n < 0x100:
        out += _PACK_BB(major | 24, n)
    elif n < 0x10000:
        out += _PACK_BH(major | 25, n)
    elif n < 0x100000000:
        out += _PACK_BI(major | 26, n)
    else:
        out += _PACK_BQ(major | 27, n)


class _Encoder:
    """Accumulates the CBOR item in ``out``, and the large tensors' payloads beside it."""

    __slots__ = ("end", "out", "out_of_band", "payloads")

    def __init__(self, head: bytes, *, out_of_band: bool) -> None:
        self.out = bytearray(head)
        #: Whether large tensors go to the buffers (a frame) or stay inline (a value).
        self.out_of_band = out_of_band
        #: (offset in the buffers' content, the payload), in order.
        self.payloads: list[tuple[int, memoryview]] = []
        #: Where the buffers' content ends so far.
        self.end = 0

    def payload(self, view: memoryview) -> int:
        """Place ``view`` in the buffers, aligned; return its offset there."""
        offset = -(-(_BUFFERS_START + self.end) // _ALIGN) * _ALIGN - _BUFFERS_START
        self.payloads.append((offset, view))
        self.end = offset + len(view)
        return offset

    def frame_chunks(self) -> list[Chunk]:
        """The frame: its head, the buffers (head, padding, payloads), the messages."""
        if not self.payloads:
            return [self.out]  # already the whole frame: it starts with _FRAME_HEAD
        head = bytearray(_FRAME_HEAD_WITH_BUFFERS)
        head += self.end.to_bytes(8, "big")
        head += _PADDING[: self.payloads[0][0]]
        chunks: list[Chunk] = [head]
        position = self.payloads[0][0]
        for offset, view in self.payloads:
            if offset > position:
                chunks.append(_PADDING[: offset - position])
            chunks.append(view)
            position = offset + len(view)
        chunks.append(memoryview(self.out)[len(_FRAME_HEAD) :])
        return chunks


_Encode = Callable[[_Encoder, Any, int], None]


def _too_deep() -> NoReturn:
    raise NestingTooDeep(f"value nested deeper than MAX_DEPTH ({MAX_DEPTH})")


def _encode(enc: _Encoder, value: Any, depth: int) -> None:
    """Encode one value; ``depth`` counts the tags and non-empty arrays and maps around it."""
    encoder = _ENCODERS.get(type(value))
    if encoder is None:
        encoder = _subclass_encoder(value)
    encoder(enc, value, depth)


def _subclass_encoder(value: Any) -> _Encode:
    # Subclasses of grammar types: torch.Size and torch.return_types (tuples),
    # nn.Parameter (a tensor), IntEnum, OrderedDict, and so on.
    for base, encoder in _SUBCLASS_ENCODERS:
        if isinstance(value, base):
            return encoder
    raise ProtocolError(f"cannot encode a value of type {type(value).__qualname__!r}")


def _encode_none(enc: _Encoder, value: None, depth: int) -> None:
    enc.out.append(_NULL)


def _encode_bool(enc: _Encoder, value: bool, depth: int) -> None:
    enc.out.append(_TRUE if value else _FALSE)


def _encode_int(enc: _Encoder, value: int, depth: int) -> None:
    if 0 <= value < 24:
        enc.out.append(value)
    elif 0 <= value < _UINT_LIMIT:
        _write_head(enc.out, _UINT, value)
    elif -_UINT_LIMIT <= value < 0:
        _write_head(enc.out, _NINT, -1 - value)
    else:
        raise ProtocolError(f"integer {value} is outside the 64-bit range CBOR can carry")


def _encode_uint(out: bytearray, value: Any, what: str) -> None:
    if type(value) is not int or not 0 <= value < _UINT_LIMIT:
        raise ProtocolError(f"{what} must be an int in 0..2**64-1, not {value!r}")
    if value < 24:
        out.append(value)
    else:
        _write_head(out, _UINT, value)


def _encode_float(enc: _Encoder, value: float, depth: int) -> None:
    enc.out += _PACK_BD(0xFB, value)


def _encode_str(enc: _Encoder, value: str, depth: int) -> None:
    _encode_text(enc.out, value, "a str")


def _encode_text(out: bytearray, value: Any, what: str) -> None:
    if not isinstance(value, str):
        raise ProtocolError(f"{what} must be a str, not {type(value).__qualname__!r}")
    try:
        data = value.encode()
    except UnicodeEncodeError as exc:  # a lone surrogate
        raise ProtocolError(f"{what} is not valid Unicode: {exc}") from exc
    _write_head(out, _TEXT, len(data))
    out += data


def _encode_list(enc: _Encoder, value: Sequence[Any], depth: int) -> None:
    if value and depth >= MAX_DEPTH:
        _too_deep()
    _write_head(enc.out, _ARRAY, len(value))
    depth += 1
    for item in value:
        _encode(enc, item, depth)


_TUPLE_HEAD: Final = b"\xd9\xbe\xb5"  # tag 48821


def _encode_tuple(enc: _Encoder, value: tuple[Any, ...], depth: int) -> None:
    if depth >= MAX_DEPTH or (value and depth + 1 >= MAX_DEPTH):
        _too_deep()
    out = enc.out
    out += _TUPLE_HEAD
    _write_head(out, _ARRAY, len(value))
    depth += 2
    for item in value:
        _encode(enc, item, depth)


def _encode_dict(enc: _Encoder, value: dict[Any, Any], depth: int) -> None:
    if value and depth >= MAX_DEPTH:
        _too_deep()
    _write_head(enc.out, _MAP, len(value))
    depth += 1
    for key, item in value.items():
        _encode_text(enc.out, key, "a map key")
        _encode(enc, item, depth)


_SLICE_HEAD: Final = b"\xd9\xbe\xb6\x83"  # tag 48822, array of 3


def _encode_slice(enc: _Encoder, value: slice, depth: int) -> None:
    if depth + 1 >= MAX_DEPTH:
        _too_deep()
    enc.out += _SLICE_HEAD
    depth += 2
    _encode(enc, value.start, depth)
    _encode(enc, value.stop, depth)
    _encode(enc, value.step, depth)


_ELLIPSIS_ITEM: Final = b"\xd9\xbe\xb7\xf6"  # tag 48823, null


def _encode_ellipsis(enc: _Encoder, value: types.EllipsisType, depth: int) -> None:
    if depth >= MAX_DEPTH:
        _too_deep()
    enc.out += _ELLIPSIS_ITEM


_DTYPE_HEAD: Final = b"\xd9\xbe\xb8"  # tag 48824


def _encode_dtype(enc: _Encoder, value: torch.dtype, depth: int) -> None:
    if depth >= MAX_DEPTH:
        _too_deep()
    enc.out += _DTYPE_HEAD
    _encode_text(enc.out, _NAME_OF_DTYPE[value], "a dtype name")


_REF_HEAD: Final = b"\xd9\xbe\xb9"  # tag 48825


def _encode_ref(enc: _Encoder, value: Ref, depth: int) -> None:
    if depth >= MAX_DEPTH:
        _too_deep()
    out = enc.out
    out += _REF_HEAD
    _encode_uint(out, int(value), "Ref.id")


_COMPLEX_HEAD: Final = b"\xd9\xbe\xba\x82"  # tag 48826, array of 2


def _encode_complex(enc: _Encoder, value: complex, depth: int) -> None:
    if depth + 1 >= MAX_DEPTH:
        _too_deep()
    out = enc.out
    out += _COMPLEX_HEAD
    out += _PACK_BD(0xFB, value.real)
    out += _PACK_BD(0xFB, value.imag)


_GRAD_HEAD: Final = b"\xd9\xbe\xb4\x83"  # tag 48820, array of 3


def _encode_tensor(enc: _Encoder, value: torch.Tensor, depth: int) -> None:
    # Reading .grad of a non-leaf that does not retain it makes torch warn.
    grad = value.grad if value.is_leaf or value.retains_grad else None
    if not value.requires_grad and grad is None:
        _encode_plain_tensor(enc, value, depth)
        return
    if depth + 1 >= MAX_DEPTH:
        _too_deep()
    enc.out += _GRAD_HEAD
    _encode_plain_tensor(enc, value.detach(), depth + 2)
    enc.out.append(_TRUE if value.requires_grad else _FALSE)
    if grad is None:
        enc.out.append(_NULL)
    else:
        _encode_plain_tensor(enc, grad.detach(), depth + 2)


_NDARRAY_HEAD: Final = b"\xd8\x28\x82"  # tag 40, array of 2
_BUFFER_HEAD: Final = b"\xd9\xbe\xbb\x82"  # tag 48827, array of 2


def _encode_plain_tensor(enc: _Encoder, tensor: torch.Tensor, depth: int) -> None:
    """Encode a tensor as an RFC 8746 array, ignoring autograd state."""
    # Tag 40 at depth, its array at depth + 1, the shape and the typed-array tag
    # at depth + 2; out of band, the reference's tag and array at depth + 3, + 4.
    if depth + 2 >= MAX_DEPTH:
        _too_deep()
    if tensor.layout != torch.strided or tensor.is_nested:
        raise ProtocolError(f"cannot encode a {tensor.layout} tensor; only dense tensors")
    if not tensor.is_cpu:
        raise ProtocolError(f"cannot encode a tensor on {tensor.device}; move it to the CPU")
    tag = _TAG_OF_DTYPE.get(tensor.dtype)
    if tag is None:
        raise ProtocolError(f"cannot encode a tensor of dtype {tensor.dtype}")
    # A lazily conjugated or negated view stores the unmodified values.
    if tensor.is_conj():
        tensor = tensor.resolve_conj()
    if tensor.is_neg():
        tensor = tensor.resolve_neg()
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    out = enc.out
    out += _NDARRAY_HEAD
    shape = tensor.shape
    _write_head(out, _ARRAY, len(shape))
    for dim in shape:
        _write_head(out, _UINT, dim)
    _write_head(out, _TAG, tag)
    nbytes = tensor.nbytes
    # Out of band, the reference's tag and array nest two levels deeper: a large
    # tensor that deep stays inline.
    if nbytes <= INLINE_LIMIT or not enc.out_of_band or depth + 4 >= MAX_DEPTH:
        _write_head(out, _BYTES, nbytes)
        if nbytes:
            out += _string_at(tensor.data_ptr(), nbytes)
        return
    offset = enc.payload(memory_of(tensor))
    out += _BUFFER_HEAD
    _write_head(out, _UINT, offset)
    _write_head(out, _UINT, nbytes)


_ENCODERS: Final[dict[type, _Encode]] = {
    type(None): _encode_none,
    bool: _encode_bool,
    int: _encode_int,
    float: _encode_float,
    str: _encode_str,
    list: _encode_list,
    tuple: _encode_tuple,
    dict: _encode_dict,
    slice: _encode_slice,
    types.EllipsisType: _encode_ellipsis,
    torch.dtype: _encode_dtype,
    Ref: _encode_ref,
    complex: _encode_complex,
    torch.Tensor: _encode_tensor,
}

# Checked in order; bool cannot be subclassed, so int comes first safely.
_SUBCLASS_ENCODERS: Final[tuple[tuple[type, _Encode], ...]] = (
    (torch.Tensor, _encode_tensor),
    (int, lambda enc, value, depth: _encode_int(enc, int(value), depth)),
    (float, lambda enc, value, depth: _encode_float(enc, float(value), depth)),
    (complex, lambda enc, value, depth: _encode_complex(enc, complex(value), depth)),
    (str, lambda enc, value, depth: _encode_str(enc, str(value), depth)),
    (tuple, _encode_tuple),
    (list, _encode_list),
    (dict, _encode_dict),
)


# A message's value is enclosed by the frame's array, the messages' array and
# the message's own.
_MESSAGE_DEPTH: Final = 3


def _encode_store(enc: _Encoder, message: Store) -> None:
    out = enc.out
    out += b"\x83\x01"
    _encode_uint(out, message.id, "Store.id")
    _encode(enc, message.value, _MESSAGE_DEPTH)


def _encode_call(enc: _Encoder, message: Call) -> None:
    out = enc.out
    out += b"\x85\x02"
    _encode_uint(out, message.id, "Call.id")
    _encode_text(out, message.op, "Call.op")
    args = message.args
    if not isinstance(args, tuple | list):
        raise ProtocolError(f"Call.args must be a tuple, not {type(args).__qualname__!r}")
    _encode_list(enc, args, _MESSAGE_DEPTH)
    kwargs = message.kwargs
    if not isinstance(kwargs, dict):
        raise ProtocolError(f"Call.kwargs must be a dict, not {type(kwargs).__qualname__!r}")
    _encode_dict(enc, kwargs, _MESSAGE_DEPTH)


def _encode_fetch(enc: _Encoder, message: Fetch) -> None:
    out = enc.out
    out += b"\x84\x03"
    _encode_uint(out, message.request, "Fetch.request")
    _encode_uint(out, message.id, "Fetch.id")
    if type(message.free) is not bool:
        raise ProtocolError(f"Fetch.free must be a bool, not {message.free!r}")
    out.append(_TRUE if message.free else _FALSE)


def _encode_release(enc: _Encoder, message: Release) -> None:
    out = enc.out
    out += b"\x82\x04"
    ids = message.ids
    if not isinstance(ids, tuple | list):
        raise ProtocolError(f"Release.ids must be a tuple, not {type(ids).__qualname__!r}")
    _write_head(out, _ARRAY, len(ids))
    for id_ in ids:
        _encode_uint(out, id_, "a Release id")


def _encode_list_objects(enc: _Encoder, message: ListObjects) -> None:
    out = enc.out
    out += b"\x82\x05"
    _encode_uint(out, message.request, "ListObjects.request")


def _encode_reply(enc: _Encoder, message: Reply) -> None:
    out = enc.out
    out += b"\x83\x10"
    _encode_uint(out, message.request, "Reply.request")
    _encode(enc, message.value, _MESSAGE_DEPTH)


def _encode_failure(enc: _Encoder, message: Failure) -> None:
    out = enc.out
    out += b"\x85\x11"
    _encode_uint(out, message.request, "Failure.request")
    _encode_text(out, message.kind, "Failure.kind")
    _encode_text(out, message.error_type, "Failure.error_type")
    _encode_text(out, message.message, "Failure.message")


_MESSAGE_ENCODERS: Final[dict[type, Callable[[_Encoder, Any], None]]] = {
    Store: _encode_store,
    Call: _encode_call,
    Fetch: _encode_fetch,
    Release: _encode_release,
    ListObjects: _encode_list_objects,
    Reply: _encode_reply,
    Failure: _encode_failure,
}


def encode_frame(messages: Sequence[Message]) -> list[Chunk]:
    """Encode a batch of messages as one frame, in chunks.

    The concatenation of the chunks is the frame. Large tensors' payloads are
    ``memoryview`` chunks over the tensors' own memory (see the module
    docstring); the messages are one ``bytearray`` chunk.
    """
    enc = _Encoder(_FRAME_HEAD, out_of_band=True)
    _write_head(enc.out, _ARRAY, len(messages))
    for message in messages:
        encoder = _MESSAGE_ENCODERS.get(type(message))
        if encoder is None:
            raise ProtocolError(f"not a message: {type(message).__qualname__!r}")
        encoder(enc, message)
    return enc.frame_chunks()


def _join(chunks: list[Chunk]) -> bytearray:
    if len(chunks) == 1 and type(chunks[0]) is bytearray:
        return chunks[0]  # the encoder's own buffer: no one else holds it
    dst = bytearray(sum(len(chunk) for chunk in chunks))
    with memoryview(dst) as view:
        pos = 0
        for chunk in chunks:
            end = pos + len(chunk)
            view[pos:end] = chunk
            pos = end
    return dst


def frame_bytes(messages: Sequence[Message]) -> bytearray:
    """Encode a batch of messages as one frame in one new ``bytearray``."""
    return _join(encode_frame(messages))


def encode_value(value: Any) -> bytearray:
    """Encode one value as a self-contained CBOR item (its tensors all inline)."""
    enc = _Encoder(b"", out_of_band=False)
    _encode(enc, value, 0)
    return enc.out


# ---------------------------------------------------------------------------
# Decoder
#
# cbor2 builds the item; every tag in it is turned into its value by a function
# of the table below as soon as its content is read, and the messages and their
# values are checked once cbor2 is done. A function of the table raises
# ProtocolError; cbor2 passes it on as the cause of a CBORDecodeError.


def _fail(message: str) -> NoReturn:
    raise ProtocolError(message)


def _type_name(value: Any) -> str:
    return type(value).__qualname__


class _Tags(dict[int, Any]):
    """cbor2's ``semantic_decoders``: fedtensor's tags, and a refusal of every other.

    cbor2 looks every tag up here before it reads the tag's content, and falls
    back to its own decoders (shared references, dates, regular expressions,
    ...) only on a ``LookupError``, which this table never raises.
    """

    __slots__ = ()

    def __missing__(self, tag: int) -> NoReturn:
        raise ProtocolError(f"unknown tag {tag}")


def _tag_decoder(build: Callable[[Any], Any]) -> Any:
    """A cbor2 semantic decoder that turns a tag's decoded content into ``build(content)``.

    cbor2 looks two attributes up on every semantic decoder it calls, and on a
    plain function each lookup fails with an AttributeError: 0.45 us a tag,
    against 0.13 us for the whole call made this way (measured on the request
    of the module docstring). :func:`cbor2.shareable_decoder` sets
    them; cbor2 then calls the decoder with its ``immutable`` flag for a pair
    ``(instance, callback)`` (the instance is only for shared references, which
    fedtensor refuses) and ``callback`` with the content. A dict lookup gives
    the same pair for either flag, without a Python call.
    """
    pair = (None, build)
    return cbor2.shareable_decoder(partial({False: pair, True: pair}.__getitem__))


class _Payload:
    """A large tensor's elements in a frame, checked: ``nbytes`` at ``start`` of ``data``."""

    __slots__ = ("data", "nbytes", "start", "writable")

    def __init__(self, data: Chunk, start: int, nbytes: int, writable: bool) -> None:
        self.data = data
        self.start = start
        self.nbytes = nbytes
        self.writable = writable


class _Buffers:
    """The buffers of the frame being decoded; resolves its references (tag 48827)."""

    __slots__ = ("data", "end", "next", "start", "writable")

    def __init__(self, data: Chunk, start: int, end: int, writable: bool) -> None:
        self.data = data
        self.start = start  # the frame offset of the buffers' content
        self.end = end
        self.writable = writable
        self.next = start  # where the next reference may begin: references do not overlap

    def reference(self, item: Any) -> _Payload:
        if type(item) is not list or len(item) != 2:
            _fail("a buffer reference must be [offset, length]")
        offset, nbytes = item
        if type(offset) is not int or type(nbytes) is not int or offset < 0 or nbytes < 0:
            _fail("a buffer reference must hold two uints")
        start = self.start + offset
        if start < self.next:
            _fail(f"buffer reference at {offset} overlaps or precedes the one before it")
        if nbytes > self.end - start:
            _fail(f"buffer reference [{offset}, {nbytes}] runs past the end of the buffers")
        self.next = start + nbytes
        return _Payload(self.data, start, nbytes, self.writable)


def _no_buffers(item: Any) -> NoReturn:
    _fail("a buffer reference outside a frame's buffers")


def _numel(shape: Any) -> int:
    """The number of elements of ``shape``, checked: uints whose strides fit torch's int64."""
    if type(shape) is not list:
        _fail("a tensor's shape must be an array")
    numel = span = 1
    for dim in shape:
        if type(dim) is not int or dim < 0:
            _fail(f"a tensor's dimension must be a uint, not {dim!r}")
        numel *= dim
        span *= dim or 1
        if span >= _SIZE_LIMIT:
            _fail(f"a tensor of shape {shape} is larger than torch can index")
    return numel


_CBORTag: Final = cbor2.CBORTag
_BOOL: Final = torch.bool
_frombuffer: Final = torch.frombuffer


def _ndarray(item: Any) -> torch.Tensor:
    """Tag 40: ``[shape, typed array]``, the typed array still a CBORTag (see _build_tags)."""
    if type(item) is not list or len(item) != 2:
        _fail("a tensor must be [shape, typed array]")
    shape, typed = item
    if type(typed) is not _CBORTag:  # only the typed-array tags decode to one
        _fail(f"a tensor's elements must be a typed array, not {_type_name(typed)}")
    dtype, big_endian = _DTYPE_OF_TAG[typed.tag]
    elements = typed.value
    kind = type(elements)
    if kind is bytes:
        nbytes = len(elements)
    elif kind is _Payload:
        nbytes = elements.nbytes
    else:
        _fail(f"a typed array must hold a byte string, not {kind.__qualname__}")
    if type(shape) is list and len(shape) == 1 and type(shape[0]) is int and shape[0] >= 0:
        numel = shape[0]  # a vector, the common case, checked inline
    else:
        numel = _numel(shape)
    if numel * dtype.itemsize != nbytes:
        _fail(f"a {dtype} tensor of shape {shape} cannot hold {nbytes} bytes")
    if not nbytes:
        return torch.empty(shape, dtype=dtype)
    if kind is bytes and not big_endian:
        # cbor2's bytes are read-only: a copy of its own to build the tensor over.
        flat = _frombuffer(bytearray(elements), dtype=dtype)
    else:
        flat = _elements(dtype, big_endian, elements, nbytes)
    if dtype is _BOOL and bool((flat.view(torch.uint8) > 1).any()):
        _fail("a bool tensor holds a byte other than 0 or 1")
    if len(shape) == 1 and not big_endian:
        return flat  # from torch.frombuffer: already a tensor of its own, of this shape
    return shaped(flat, shape)


def _elements(
    dtype: torch.dtype, big_endian: bool, elements: bytes | _Payload, nbytes: int
) -> torch.Tensor:
    """The elements of a typed array, big-endian or in the buffers, as a flat tensor."""
    if isinstance(elements, bytes):
        copied = bytearray(elements)
    else:
        itemsize = dtype.itemsize
        start = elements.start
        if elements.writable and not big_endian:
            # In place: the tensor aliases the frame's buffer, and its storage is the
            # whole buffer, which it keeps alive. So whoever counts memory by storage
            # (a worker's budget) sees every byte a received tensor pins, and the
            # tensors of one frame share that storage, counted once.
            whole = torch.frombuffer(elements.data, dtype=torch.uint8)
            if start % itemsize == 0 and whole.data_ptr() % itemsize == 0:
                flat = torch.empty(0, dtype=dtype)
                flat.set_(whole.untyped_storage(), start // itemsize, (nbytes // itemsize,), (1,))
                return flat
        # The one copy: read-only input, a byte swap, misaligned elements.
        with memoryview(elements.data) as view:
            copied = bytearray(view[start : start + nbytes])
    if big_endian:
        raw = torch.frombuffer(copied, dtype=torch.uint8)
        return raw.view(-1, dtype.itemsize).flip(1).view(dtype)
    return torch.frombuffer(copied, dtype=dtype)


def _is_plain_tensor(value: Any) -> bool:
    return type(value) is torch.Tensor and not value.requires_grad and value.grad is None


def _grad_tensor(item: Any) -> torch.Tensor:
    """Tag 48820: ``[tensor, requires_grad, grad or null]``."""
    if type(item) is not list or len(item) != 3:
        _fail("a tensor with grad must be [tensor, requires_grad, grad]")
    tensor: torch.Tensor
    tensor, requires_grad, grad = item
    if not _is_plain_tensor(tensor):
        _fail("a tensor with grad must wrap a tensor")
    if type(requires_grad) is not bool:
        _fail("requires_grad must be a bool")
    if grad is not None and not _is_plain_tensor(grad):
        _fail("a grad must be a tensor or null")
    try:
        if requires_grad:
            tensor.requires_grad_(True)
        if grad is not None:
            tensor.grad = grad
    except RuntimeError as exc:  # an integer tensor, or a grad of another shape or dtype
        raise ProtocolError(f"a tensor cannot take this autograd state: {exc}") from exc
    return tensor


def _tuple(item: Any) -> tuple[Any, ...]:
    if type(item) is not list:
        _fail("a tuple must hold an array")
    return tuple(item)


def _slice(item: Any) -> slice:
    if type(item) is not list or len(item) != 3:
        _fail("a slice must hold [start, stop, step]")
    return slice(*item)


def _ellipsis(item: Any) -> types.EllipsisType:
    if item is not None:
        _fail("an Ellipsis must hold null")
    return ...


def _dtype(item: Any) -> torch.dtype:
    dtype = _DTYPE_BY_NAME.get(item) if type(item) is str else None
    if dtype is None:
        _fail(f"unknown dtype {item!r}")
    return dtype


def _ref(item: Any) -> Ref:
    if type(item) is not int or item < 0:
        _fail(f"a Ref must hold a uint, not {item!r}")
    return Ref(item)


def _complex(item: Any) -> complex:
    if type(item) is not list or len(item) != 2:
        _fail("a complex must hold [real, imag]")
    real, imag = item
    if type(real) is not float or type(imag) is not float:
        _fail("a complex must hold two floats")
    return complex(real, imag)


def _build_tags() -> _Tags:
    tags = _Tags(
        {
            _TAG_NDARRAY: _tag_decoder(_ndarray),
            _TAG_GRAD: _tag_decoder(_grad_tensor),
            _TAG_TUPLE: _tag_decoder(_tuple),
            _TAG_SLICE: _tag_decoder(_slice),
            _TAG_ELLIPSIS: _tag_decoder(_ellipsis),
            _TAG_DTYPE: _tag_decoder(_dtype),
            _TAG_REF: _tag_decoder(_ref),
            _TAG_COMPLEX: _tag_decoder(_complex),
            _TAG_BUFFER: _tag_decoder(_no_buffers),
        }
    )
    # A typed array becomes a CBORTag, made by cbor2 without a Python call, that
    # only tag 40 accepts (every other tag is refused, so no other CBORTag is made).
    for tag in _DTYPE_OF_TAG:
        tags[tag] = _tag_decoder(partial(cbor2.CBORTag, tag))
    return tags


#: The tags of a value, and of a frame without buffers.
_TAGS: Final = _build_tags()

# Values that hold no other value; everything else is walked, or refused.
_SCALARS: Final = frozenset(
    {type(None), bool, int, float, str, complex, Ref, torch.dtype, types.EllipsisType}
    | {torch.Tensor}
)


def _check_value(value: Any) -> None:
    """Refuse anything in ``value`` outside the grammar (its tags are values already)."""
    kind = type(value)
    if kind in _SCALARS:
        return
    if kind is list or kind is tuple:
        for item in value:
            _check_value(item)
    elif kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                _fail(f"a map key must be text, not {_type_name(key)}")
            _check_value(item)
    elif kind is slice:
        _check_value(value.start)
        _check_value(value.stop)
        _check_value(value.step)
    elif kind is cbor2.CBORTag:
        _fail("a typed array outside a tensor")
    elif kind is _Payload:
        _fail("a buffer reference outside a typed array")
    else:  # a byte string, undefined, a simple value
        _fail(f"{kind.__qualname__} is not a value")


# The message decoders check each field inline: a message is decoded per
# command, and a call per field would cost more than the checks.


def _store(item: list[Any]) -> Store:
    id_, value = item[1], item[2]
    if type(id_) is not int or id_ < 0:
        _fail(f"Store.id must be a uint, not {id_!r}")
    if type(value) not in _SCALARS:
        _check_value(value)
    return Store(id_, value)


def _call(item: list[Any]) -> Call:
    id_, op, args, kwargs = item[1], item[2], item[3], item[4]
    if type(id_) is not int or id_ < 0:
        _fail(f"Call.id must be a uint, not {id_!r}")
    if type(op) is not str:
        _fail(f"Call.op must be text, not {_type_name(op)}")
    if type(args) is not list:
        _fail(f"Call.args must be an array, not {_type_name(args)}")
    if type(kwargs) is not dict:
        _fail(f"Call.kwargs must be a map, not {_type_name(kwargs)}")
    for arg in args:
        if type(arg) not in _SCALARS:
            _check_value(arg)
    if kwargs:
        _check_value(kwargs)
    return Call(id_, op, tuple(args), kwargs)


def _fetch(item: list[Any]) -> Fetch:
    request, id_, free = item[1], item[2], item[3]
    if type(request) is not int or request < 0 or type(id_) is not int or id_ < 0:
        _fail(f"Fetch.request and Fetch.id must be uints, not {request!r} and {id_!r}")
    if type(free) is not bool:
        _fail(f"Fetch.free must be a bool, not {free!r}")
    return Fetch(request, id_, free)


def _release(item: list[Any]) -> Release:
    ids = item[1]
    if type(ids) is not list:
        _fail(f"Release.ids must be an array, not {_type_name(ids)}")
    for id_ in ids:
        if type(id_) is not int or id_ < 0:
            _fail(f"a Release id must be a uint, not {id_!r}")
    return Release(tuple(ids))


def _uint(value: Any, what: str) -> int:
    if type(value) is not int or value < 0:
        _fail(f"{what} must be a uint, not {value!r}")
    return value


def _text(value: Any, what: str) -> str:
    if type(value) is not str:
        _fail(f"{what} must be text, not {_type_name(value)}")
    return value


def _list_objects(item: list[Any]) -> ListObjects:
    return ListObjects(_uint(item[1], "ListObjects.request"))


def _reply(item: list[Any]) -> Reply:
    request, value = item[1], item[2]
    if type(value) not in _SCALARS:
        _check_value(value)
    return Reply(_uint(request, "Reply.request"), value)


def _failure(item: list[Any]) -> Failure:
    return Failure(
        _uint(item[1], "Failure.request"),
        _text(item[2], "Failure.kind"),
        _text(item[3], "Failure.error_type"),
        _text(item[4], "Failure.message"),
    )


# Message code -> (array length, decoder).
_MESSAGE_DECODERS: Final[dict[int, tuple[int, Callable[[list[Any]], Message]]]] = {
    _MSG_STORE: (3, _store),
    _MSG_CALL: (5, _call),
    _MSG_FETCH: (4, _fetch),
    _MSG_RELEASE: (2, _release),
    _MSG_LIST_OBJECTS: (2, _list_objects),
    _MSG_REPLY: (3, _reply),
    _MSG_FAILURE: (5, _failure),
}


def _messages(items: Any) -> list[Message]:
    if type(items) is not list:
        _fail(f"a frame's messages must be an array, not {_type_name(items)}")
    messages: list[Message] = []
    for item in items:
        if type(item) is not list or not item:
            _fail("a message must be a non-empty array")
        code = item[0]
        decoder = _MESSAGE_DECODERS.get(code) if type(code) is int else None
        if decoder is None:
            _fail(f"unknown message code {code!r}")
        arity, decode = decoder
        if len(item) != arity:
            _fail(f"message {code} must have {arity} elements, not {len(item)}")
        messages.append(decode(item))
    return messages


def _input(buf: Chunk) -> tuple[Chunk, bool]:
    """``buf`` as bytes the codec can index, and whether tensors may alias it."""
    if type(buf) is bytes:
        return buf, False
    if type(buf) is bytearray:
        return buf, True
    data = memoryview(buf)
    if data.ndim != 1 or data.format != "B" or not data.c_contiguous:
        data = data.cast("B")
    return data, not data.readonly


def _head(data: Chunk, pos: int, major: int, what: str) -> tuple[int, int]:
    """Read a head of major type ``major`` at ``pos``: its argument, and where it ends."""
    if pos >= len(data):
        _fail(f"truncated input: expected {what}")
    initial = data[pos]
    if initial & 0xE0 != major:
        _fail(f"expected {what}")
    info = initial & 0x1F
    if info < 24:
        return info, pos + 1
    if info > 27:
        _fail(f"{what} has an indefinite length or reserved additional information")
    end = pos + 1 + (1 << (info - 24))
    if end > len(data):
        _fail(f"truncated input: {what} runs past the end")
    return int.from_bytes(data[pos + 1 : end], "big"), end


#: Items of at least this many bytes are read by cbor2 through :class:`_YieldingStream`.
YIELD_ABOVE = 4 << 10
#: Bytes cbor2 reads at a time from a :class:`_YieldingStream`.
_YIELD_READ_SIZE = 512


class _YieldingStream(io.BytesIO):
    """A stream whose reads are Python calls, so that other threads run between them.

    cbor2's compiled decoder holds the GIL for a whole item: a 1 MB item of empty
    lists holds every other thread (a worker's event loop, its other clients) for
    seconds. Reading it through a Python method every ``_YIELD_READ_SIZE`` bytes
    gives the interpreter a point to switch threads at (measured: the item's
    decoding takes 1.4x as long; a large item is mostly tensor bytes, read whole).
    """

    def read(self, size: int | None = -1, /) -> bytes:
        return super().read(size)


def _decode_item(data: Chunk, pos: int, tags: _Tags, max_depth: int) -> Any:
    """Have cbor2 decode the one item that fills ``data`` from ``pos`` to its end."""
    end = len(data)
    stream_type = io.BytesIO if end - pos < YIELD_ABOVE else _YieldingStream
    if type(data) is bytes:
        stream = stream_type(data)  # shares the bytes
        stream.seek(pos)
    else:
        stream = stream_type(memoryview(data)[pos:])  # a copy of the part cbor2 reads
        end -= pos
    try:
        item = cbor2.load(
            stream,
            read_size=4096 if stream_type is io.BytesIO else _YIELD_READ_SIZE,
            semantic_decoders=tags,
            max_depth=max_depth,
            allow_indefinite=False,
            allow_duplicate_keys=False,
            strict_hashable_types=True,
        )
    except cbor2.CBORDecodeError as exc:
        cause = exc.__cause__
        if cause is None or isinstance(cause, UnicodeDecodeError):  # cbor2's own finding
            if "nesting depth" in str(exc):
                raise NestingTooDeep(f"nesting deeper than MAX_DEPTH ({MAX_DEPTH})") from exc
            raise ProtocolError(f"malformed CBOR: {exc}") from exc
        # Ours (a ProtocolError), or no finding about the input at all (a bug, a
        # MemoryError, a KeyboardInterrupt): raised again as what it is.
        raise cause from None
    # cbor2 reads one item and leaves whatever follows it.
    if stream.tell() != end:
        _fail(f"trailing bytes after the item ({end - stream.tell()})")
    return item


def decode_frame(buf: Chunk) -> list[Message]:
    """Decode one frame; its large tensors alias ``buf`` when it is writable."""
    data, writable = _input(buf)
    if data[:3] == _FRAME_HEAD:  # the common frame, without large tensors
        return _messages(_decode_item(data, 3, _TAGS, MAX_DEPTH - 1))
    length, pos = _head(data, 0, _ARRAY, "a frame array")
    version, pos = _head(data, pos, _UINT, "a protocol version") if length else (None, pos)
    if version != PROTOCOL_VERSION:
        _fail(f"unknown protocol version {version} (this is version {PROTOCOL_VERSION})")
    if length != 3:
        _fail(f"a frame must be an array of 3, not {length}")
    size, start = _head(data, pos, _BYTES, "a byte string of buffers")
    if size > len(data) - start:
        _fail(f"buffers of {size} bytes run past the end of the frame")
    end = start + size
    tags = _TAGS
    if size:
        tags = _Tags(_TAGS)
        tags[_TAG_BUFFER] = _tag_decoder(_Buffers(data, start, end, writable).reference)
    # The frame's own array is open: one level of nesting less for cbor2.
    return _messages(_decode_item(data, end, tags, MAX_DEPTH - 1))


def decoded_bound(buf: Chunk) -> int:
    """At most how many bytes decoding frame ``buf`` allocates: its CBOR structure times
    :data:`DECODE_EXPANSION`. Its out-of-band buffers are not counted: over a writable
    frame the large tensors alias them in place (over read-only bytes each is copied
    once more). Reads only the frame's first heads; a frame whose heads are malformed
    is bounded as if all of it were structure (decoding then fails)."""
    data, _ = _input(buf)
    if data[:3] == _FRAME_HEAD:
        return (len(data) - 3) * DECODE_EXPANSION
    try:
        length, pos = _head(data, 0, _ARRAY, "a frame array")
        _, pos = _head(data, pos, _UINT, "a protocol version") if length else (None, pos)
        size, start = _head(data, pos, _BYTES, "a byte string of buffers")
    except ProtocolError:
        return len(data) * DECODE_EXPANSION
    size = min(size, max(len(data) - start, 0))
    return (len(data) - size) * DECODE_EXPANSION


def decode_value(buf: Chunk) -> Any:
    """Decode one self-contained value, as :func:`encode_value` wrote it."""
    value = _decode_item(_input(buf)[0], 0, _TAGS, MAX_DEPTH)
    if type(value) not in _SCALARS:
        _check_value(value)
    return value
