"""The wire codec: messages to bytes and back, with no I/O.

Theory of operation
-------------------
This module is sans-I/O: it turns a batch of messages into bytes and bytes
back into messages, and knows nothing about sockets, event loops or framing on
the wire (how a transport delimits one frame from the next is the transport's
business). Everything here is synchronous and pure.

A *frame* is one CBOR data item (RFC 8949). The codec is a small CBOR encoder
and decoder written for fedtensor's closed value grammar instead of a general
library, for one reason: tensors. A general CBOR library copies every byte
string it decodes and is slow to encode a ``memoryview``; fedtensor's frames
carry tensors of hundreds of megabytes, and the codec moves them with as few
copies as possible:

* :func:`encode_frame` returns *chunks* (scatter-gather): the small CBOR heads
  are collected in one ``bytearray`` between tensor payloads, and each tensor
  payload is a ``memoryview`` over the tensor's own memory. A frame without
  tensors is one chunk; a contiguous CPU tensor is never copied (a
  non-contiguous one is made contiguous first: one copy). A transport that can
  write a list of buffers (``socket.sendmsg``, ``writelines``) sends the
  chunks as they are. The views read the tensors when the chunks are sent, so
  a tensor must not be modified until then; each view keeps its tensor alive.
* :func:`frame_bytes` joins the chunks into one new ``bytearray``: one copy.
* :func:`decode_frame` over a writable buffer (a ``bytearray``, or a writable
  ``memoryview`` over one) builds each tensor with :func:`torch.frombuffer`
  directly over the buffer: no copy; the tensors share memory with the buffer
  and keep it alive (and un-resizable). Over read-only ``bytes`` each tensor
  is copied once, since torch must not alias memory Python considers
  immutable. A vector of at most 1 KiB is copied anyway: a copy of a few
  bytes costs less than the two torch calls of a shaped view, and the small
  tensors of a round trip then do not keep the frame's buffer alive.

So that a tensor can alias the receive buffer, the encoder places every tensor
payload at an offset that is a multiple of 8 bytes from the start of the frame
(16 for 16-byte elements). It does this without padding items: CBOR lets an
argument be written in a wider head than the shortest one (``0xd8 0x28``,
``0xd9 0x00 0x28``, ``0xda 0x00 0x00 0x00 0x28`` all mean tag 40), so the
encoder widens some of the heads in front of the payload until it lands on
the boundary. Such a frame is still well-formed CBOR; it is only not in
"preferred serialization". If a payload the decoder receives is misaligned
in memory anyway (another encoder, or a buffer that does not start the
frame), that tensor is copied.

The decoder is the trust boundary: frames come from the network. Every
malformed input raises :class:`~fedtensor.ProtocolError` and nothing else.
Every declared length is checked against the bytes that remain before
anything is allocated, so no input makes the decoder allocate more than the
input's size (a tensor's elements are the input's own bytes); nesting is
bounded by :data:`MAX_DEPTH`, so no input recurses deeply; message fields are
type-checked, so a worker never sees a value outside the grammar. The encoder
checks the same rules, so it never produces a frame that the decoder rejects.

Byte format
-----------
All integers in CBOR heads are big-endian; tensor elements are little-endian
(the codec refuses to import on a big-endian host). ``uint`` is CBOR major
type 0 (an integer in ``0 .. 2**64-1``).

Frame::

    [1, [message, ...]]                      1 is the protocol version

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
naming the element type around a byte string of the raw elements. The tags
RFC 8746 defines are used where they exist; the others are fedtensor's own
(numbers 48800 and up, in the first-come-first-served range, unregistered):

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
tensors stay pure RFC 8746, so any CBOR decoder reads them.

Alignment: a tensor payload starts at a frame offset that is a multiple of
``max(8, itemsize)``. The encoder gets there by widening, as little as it
can, the heads of tag 40, of the 2-array under it, of the shape array and of
the typed-array tag. For example, ``Store(1, torch.tensor([1.5, -2.0]))``::

    82 01 81                   [1, [
    83 01 01                     [1, 1,
    d8 28                          tag 40
    82                             [
    98 01 02                         [2],              shape head widened by 1
    d9 00 55                         tag 85 (float32)  tag head widened by 1
    48                               8-byte string
    00 00 c0 3f 00 00 00 c0          1.5, -2.0         at offset 16
                                   ]]]]

Nesting: an array, map or tag may be enclosed by at most ``MAX_DEPTH - 1``
arrays, maps and tags, counted from the top of the item (for a frame, the
frame's own arrays count). Not in the grammar, and rejected: byte strings
outside typed arrays, indefinite lengths, undefined and other simple values,
unknown tags, non-text or duplicate map keys, bytes after the item.
"""

from __future__ import annotations

import ctypes
import struct
import sys
import types
from collections.abc import Callable, Sequence
from functools import cache
from itertools import product
from typing import Any, Final, NoReturn

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

__all__ = [
    "MAX_DEPTH",
    "PROTOCOL_VERSION",
    "decode_frame",
    "decode_value",
    "encode_frame",
    "encode_value",
    "frame_bytes",
]

if sys.byteorder != "little":  # pragma: no cover - torch ships for little-endian hosts only
    raise ImportError("fedtensor's wire codec requires a little-endian host")

PROTOCOL_VERSION: Final = 1
MAX_DEPTH: Final = 64
"""The deepest an array, map or tag may be nested (see the module docstring)."""

Chunk = bytes | bytearray | memoryview

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

# Project tags for values.
_TAG_GRAD: Final = 48820
_TAG_TUPLE: Final = 48821
_TAG_SLICE: Final = 48822
_TAG_ELLIPSIS: Final = 48823
_TAG_DTYPE: Final = 48824
_TAG_REF: Final = 48825
_TAG_COMPLEX: Final = 48826
_TAG_NDARRAY: Final = 40  # RFC 8746 multi-dimensional array, row-major

_MSG_STORE: Final = 1
_MSG_CALL: Final = 2
_MSG_FETCH: Final = 3
_MSG_RELEASE: Final = 4
_MSG_LIST_OBJECTS: Final = 5
_MSG_REPLY: Final = 16
_MSG_FAILURE: Final = 17

_PACK_BB = struct.Struct(">BB").pack
_PACK_BH = struct.Struct(">BH").pack
_PACK_BI = struct.Struct(">BI").pack
_PACK_BQ = struct.Struct(">BQ").pack
_PACK_BD = struct.Struct(">Bd").pack
_UNPACK_H = struct.Struct(">H").unpack_from
_UNPACK_I = struct.Struct(">I").unpack_from
_UNPACK_Q = struct.Struct(">Q").unpack_from
_UNPACK_E = struct.Struct(">e").unpack_from
_UNPACK_F = struct.Struct(">f").unpack_from
_UNPACK_D = struct.Struct(">d").unpack_from


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
# Heads


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


def _head_width(n: int) -> int:
    """The size in bytes of the shortest head for argument ``n``."""
    if n < 24:
        return 1
    if n < 0x100:
        return 2
    if n < 0x10000:
        return 3
    return 5 if n < 0x100000000 else 9


_WIDTHS: Final = (1, 2, 3, 5, 9)
_AI_OF_WIDTH: Final = {2: 24, 3: 25, 5: 26, 9: 27}


def _write_wide_head(out: bytearray, major: int, n: int, width: int) -> None:
    """Append a head of exactly ``width`` bytes (at least the shortest)."""
    if width == 1:
        out.append(major | n)
    else:
        out.append(major | _AI_OF_WIDTH[width])
        out += n.to_bytes(width - 1, "big")


@cache
def _alignment_plan(
    shape_head: int, tag_head: int, misalignment: int, align: int
) -> tuple[int, int, int, int]:
    """Head widths that bring a tensor payload onto an ``align`` boundary.

    In front of the payload sit four heads whose width the encoder may choose:
    tag 40, the 2-array under it, the shape array and the typed-array tag;
    ``shape_head`` and ``tag_head`` are the shortest widths of the last two
    (those of the first two are 2 and 1). ``misalignment`` is where the payload
    would start, modulo ``align``, with every head at its shortest. Returns the
    four widths that add the fewest bytes and land the payload on the boundary.
    """
    minimum = (2, 1, shape_head, tag_head)
    best: tuple[int, int, int, int] | None = None
    best_extra = 0
    for widths in product(*([w for w in _WIDTHS if w >= m] for m in minimum)):
        extra = sum(widths) - sum(minimum)
        if (misalignment + extra) % align == 0 and (best is None or extra < best_extra):
            best, best_extra = (widths[0], widths[1], widths[2], widths[3]), extra
    # Every residue is reachable for typed-array tags below 65536 (all of ours)
    # and shapes of fewer than 2**32 dimensions.
    if best is None:  # pragma: no cover
        raise AssertionError(f"no head widths align a payload to {align}")
    return best


# ---------------------------------------------------------------------------
# Encoder

# ctypes array types keyed by a power-of-two size. Creating an array type costs
# ~16 us while a cached one is free, so a payload view is cut from an array of
# the next power of two instead of making a type for every payload size.
_RAW_TYPES: dict[int, type[ctypes.Array[ctypes.c_char]]] = {}


#: Vectors of at most this many bytes are decoded into memory of their own.
_SMALL_TENSOR = 1024


def _shaped(flat: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """A contiguous tensor of ``shape`` over ``flat``'s memory, from its storage offset.

    Not ``flat.view(shape)``: a view would keep ``flat`` as its ``_base``, and a
    worker treats a tensor with a ``_base`` as sharing memory (it copies it before
    handing it over). ``set_`` gives a tensor of its own over the same storage.
    """
    shaped = torch.empty(0, dtype=flat.dtype)
    shaped.set_(flat.untyped_storage(), flat.storage_offset(), shape, _strides(list(shape)))
    return shaped


def _memory_of(tensor: torch.Tensor, owner: object = None) -> memoryview:
    """A read-write view of a contiguous CPU tensor's bytes, without a copy.

    The view keeps the tensor alive: it holds the ctypes array that holds the
    tensor (or ``owner``, which must hold the tensor).
    """
    nbytes = tensor.nbytes
    size = 1 << (nbytes - 1).bit_length()
    raw_type = _RAW_TYPES.get(size)
    if raw_type is None:
        raw_type = _RAW_TYPES[size] = ctypes.c_char * size
    raw = raw_type.from_address(tensor.data_ptr())
    raw._fedtensor_tensor = tensor if owner is None else owner  # type: ignore[attr-defined]
    # Only the first nbytes are ever read: the slice is the whole exported view.
    return memoryview(raw).cast("B")[:nbytes]


class _Encoder:
    """Accumulates heads in ``out`` and cuts a chunk at each tensor payload."""

    __slots__ = ("base", "chunks", "out")

    def __init__(self) -> None:
        self.out = bytearray()
        self.chunks: list[Chunk] = []
        self.base = 0  # the frame offset at which ``out`` starts

    def payload(self, view: memoryview) -> None:
        self.chunks.append(self.out)
        self.chunks.append(view)
        self.base += len(self.out) + len(view)
        self.out = bytearray()

    def finish(self) -> list[Chunk]:
        if self.out or not self.chunks:
            self.chunks.append(self.out)
        return self.chunks


_Encode = Callable[[_Encoder, Any, int], None]


def _too_deep() -> NoReturn:
    raise ProtocolError(f"value nested deeper than MAX_DEPTH ({MAX_DEPTH})")


def _encode(enc: _Encoder, value: Any, depth: int) -> None:
    """Encode one value; ``depth`` counts the arrays, maps and tags around it."""
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
    data = value.encode()
    out = enc.out
    _write_head(out, _TEXT, len(data))
    out += data


def _encode_text(out: bytearray, value: Any, what: str) -> None:
    if not isinstance(value, str):
        raise ProtocolError(f"{what} must be a str, not {type(value).__qualname__!r}")
    data = value.encode()
    _write_head(out, _TEXT, len(data))
    out += data


def _encode_list(enc: _Encoder, value: Sequence[Any], depth: int) -> None:
    if depth >= MAX_DEPTH:
        _too_deep()
    _write_head(enc.out, _ARRAY, len(value))
    depth += 1
    for item in value:
        _encode(enc, item, depth)


_TUPLE_HEAD: Final = b"\xd9\xbe\xb5"  # tag 48821


def _encode_tuple(enc: _Encoder, value: tuple[Any, ...], depth: int) -> None:
    if depth + 1 >= MAX_DEPTH:
        _too_deep()
    out = enc.out
    out += _TUPLE_HEAD
    _write_head(out, _ARRAY, len(value))
    depth += 2
    for item in value:
        _encode(enc, item, depth)


def _encode_dict(enc: _Encoder, value: dict[Any, Any], depth: int) -> None:
    if depth >= MAX_DEPTH:
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
    _encode_uint(out, value.id, "Ref.id")


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


def _encode_plain_tensor(enc: _Encoder, tensor: torch.Tensor, depth: int) -> None:
    """Encode a tensor as an RFC 8746 array, ignoring autograd state."""
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
    shape = tensor.shape
    nbytes = tensor.nbytes
    align = max(8, tensor.element_size())

    dims = bytearray()
    for dim in shape:
        _write_head(dims, _UINT, dim)
    shape_head = _head_width(len(shape))
    tag_head = _head_width(tag)
    # Where the payload would start with the four adjustable heads at their
    # shortest: 2 (tag 40) + 1 (2-array) + shape head + dims + tag head + bstr head.
    start = enc.base + len(enc.out) + 3 + shape_head + len(dims) + tag_head
    start += _head_width(nbytes)
    w_ndarray, w_pair, w_shape, w_tag = _alignment_plan(shape_head, tag_head, start % align, align)

    out = enc.out
    _write_wide_head(out, _TAG, _TAG_NDARRAY, w_ndarray)
    _write_wide_head(out, _ARRAY, 2, w_pair)
    _write_wide_head(out, _ARRAY, len(shape), w_shape)
    out += dims
    _write_wide_head(out, _TAG, tag, w_tag)
    _write_head(out, _BYTES, nbytes)
    if nbytes:
        enc.payload(_memory_of(tensor))


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


def _encode_store(enc: _Encoder, message: Store) -> None:
    out = enc.out
    out += b"\x83\x01"
    _encode_uint(out, message.id, "Store.id")
    _encode(enc, message.value, 3)


def _encode_call(enc: _Encoder, message: Call) -> None:
    out = enc.out
    out += b"\x85\x02"
    _encode_uint(out, message.id, "Call.id")
    _encode_text(out, message.op, "Call.op")
    args = message.args
    if not isinstance(args, tuple | list):
        raise ProtocolError(f"Call.args must be a tuple, not {type(args).__qualname__!r}")
    _encode_list(enc, args, 3)
    kwargs = message.kwargs
    if not isinstance(kwargs, dict):
        raise ProtocolError(f"Call.kwargs must be a dict, not {type(kwargs).__qualname__!r}")
    _encode_dict(enc, kwargs, 3)


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
    _encode(enc, message.value, 3)


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

_FRAME_HEAD: Final = b"\x82\x01"  # [1, ...


def encode_frame(messages: Sequence[Message]) -> list[Chunk]:
    """Encode a batch of messages as one frame, in chunks.

    The concatenation of the chunks is the frame. Tensor payloads are
    ``memoryview`` chunks over the tensors' own memory (see the module
    docstring); everything else is collected in ``bytearray`` chunks.
    """
    enc = _Encoder()
    try:
        out = enc.out
        out += _FRAME_HEAD
        _write_head(out, _ARRAY, len(messages))
        for message in messages:
            encoder = _MESSAGE_ENCODERS.get(type(message))
            if encoder is None:
                raise ProtocolError(f"not a message: {type(message).__qualname__!r}")
            encoder(enc, message)
    except ProtocolError:
        raise
    except Exception as exc:
        raise ProtocolError(f"cannot encode frame: {exc!r}") from exc
    return enc.finish()


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
    """Encode one value as a self-contained CBOR item."""
    enc = _Encoder()
    try:
        _encode(enc, value, 0)
    except ProtocolError:
        raise
    except Exception as exc:
        raise ProtocolError(f"cannot encode value: {exc!r}") from exc
    return _join(enc.finish())


# ---------------------------------------------------------------------------
# Decoder


def _numel(shape: list[int], limit: int) -> int:
    """The product of ``shape``, or any number above ``limit`` if it exceeds it.

    Stops early so that a long shape of huge dimensions costs no big-int work.
    """
    if 0 in shape:
        return 0
    numel = 1
    for dim in shape:
        numel *= dim
        if numel > limit:
            break
    return numel


def _strides(shape: list[int]) -> list[int]:
    """Row-major (contiguous) strides of ``shape``, as torch computes them."""
    strides = [1] * len(shape)
    step = 1
    for dim in range(len(shape) - 1, -1, -1):
        strides[dim] = step
        step *= max(shape[dim], 1)
    return strides


class _Decoder:
    """Reads items from ``data`` at ``pos``; every method raises ProtocolError.

    ``depth`` arguments count the arrays, maps and tags enclosing the item
    about to be read, as in the encoder.
    """

    __slots__ = ("data", "end", "pos", "writable")

    def __init__(self, buf: Chunk) -> None:
        data: Chunk
        if type(buf) is bytes or type(buf) is bytearray:
            data = buf
        else:
            data = memoryview(buf)
            if data.ndim != 1 or data.format != "B" or not data.c_contiguous:
                data = data.cast("B")
        self.data = data
        self.end = len(data)
        self.pos = 0
        self.writable = type(data) is bytearray or (type(data) is memoryview and not data.readonly)

    def fail(self, message: str) -> NoReturn:
        raise ProtocolError(f"{message} (at byte {self.pos})")

    def finish(self) -> None:
        if self.pos != self.end:
            self.fail(f"trailing bytes after the item ({self.end - self.pos})")

    # -- heads --------------------------------------------------------------

    def argument(self, initial: int) -> int:
        """Read the argument of a head whose initial byte was just consumed.

        The callers handle arguments below 24 (held in the initial byte) inline.
        """
        info = initial & 0x1F
        data = self.data
        pos = self.pos
        if info == 24:
            self.pos = pos + 1
            return data[pos]
        if info == 25:
            self.pos = pos + 2
            value: int = _UNPACK_H(data, pos)[0]
        elif info == 26:
            self.pos = pos + 4
            value = _UNPACK_I(data, pos)[0]
        elif info == 27:
            self.pos = pos + 8
            value = _UNPACK_Q(data, pos)[0]
        elif info == 31:
            self.pos = pos - 1
            self.fail("indefinite-length items are not allowed")
        else:
            self.pos = pos - 1
            self.fail(f"reserved additional information {info}")
        return value

    def head(self, major: int, what: str) -> int:
        """Read a head of major type ``major`` and return its argument."""
        pos = self.pos
        initial = self.data[pos]
        if initial & 0xE0 != major:
            self.fail(f"expected {what}")
        self.pos = pos + 1
        info = initial & 0x1F
        return info if info < 24 else self.argument(initial)

    def container(self, major: int, depth: int, what: str) -> int:
        """Read an array or map head and return its length, checked."""
        if depth >= MAX_DEPTH:
            self.fail(f"nesting deeper than MAX_DEPTH ({MAX_DEPTH})")
        pos = self.pos
        initial = self.data[pos]
        if initial & 0xE0 != major:
            self.fail(f"expected {what}")
        self.pos = pos + 1
        n = initial & 0x1F
        if n >= 24:
            n = self.argument(initial)
        # Each element takes at least one byte, so a length the remaining bytes
        # cannot hold is a lie; checking it first bounds every allocation.
        if (n << 1 if major == _MAP else n) > self.end - self.pos:
            self.fail(f"{what} of {n} items is longer than the input")
        return n

    def array(self, length: int, depth: int, what: str) -> None:
        if self.container(_ARRAY, depth, what) != length:
            self.fail(f"expected {what} of {length} items")

    def tag(self, depth: int) -> int:
        if depth >= MAX_DEPTH:
            self.fail(f"nesting deeper than MAX_DEPTH ({MAX_DEPTH})")
        return self.head(_TAG, "a tag")

    # -- scalars --------------------------------------------------------------

    def uint(self, what: str) -> int:
        pos = self.pos
        initial = self.data[pos]
        if initial < 24:  # the common small id, inline
            self.pos = pos + 1
            return initial
        return self.head(_UINT, what)

    def text(self, what: str) -> str:
        pos = self.pos
        initial = self.data[pos]
        if _TEXT <= initial < _TEXT + 24:  # a short string, inline
            self.pos = pos + 1
            return self.string(initial - _TEXT)
        return self.string(self.head(_TEXT, what))

    def string(self, n: int) -> str:
        pos = self.pos
        end = pos + n
        if end > self.end:
            self.fail(f"text string of {n} bytes is longer than the input")
        try:
            value = str(self.data[pos:end], "utf-8")
        except UnicodeDecodeError:
            self.fail("text string is not valid UTF-8")
        self.pos = end
        return value

    def boolean(self, what: str) -> bool:
        initial = self.data[self.pos]
        if initial != _TRUE and initial != _FALSE:
            self.fail(f"{what} must be a bool")
        self.pos += 1
        return initial == _TRUE

    def simple(self, initial: int) -> Any:
        """Decode major type 7, the initial byte just consumed."""
        if initial == _NULL:
            return None
        if initial == _TRUE:
            return True
        if initial == _FALSE:
            return False
        data = self.data
        pos = self.pos
        if initial == 0xFB:
            self.pos = pos + 8
            return _UNPACK_D(data, pos)[0]
        if initial == 0xFA:
            self.pos = pos + 4
            return _UNPACK_F(data, pos)[0]
        if initial == 0xF9:
            self.pos = pos + 2
            return _UNPACK_E(data, pos)[0]
        self.pos = pos - 1
        if initial == 0xFF:
            self.fail("unexpected break")
        self.fail(f"simple value 0x{initial:02x} is not a value")

    # -- values ---------------------------------------------------------------

    def value(self, depth: int) -> Any:
        pos = self.pos
        initial = self.data[pos]
        self.pos = pos + 1
        if initial < 24:
            return initial
        major = initial & 0xE0
        if major == 0xE0:
            return self.simple(initial)
        if major >= _ARRAY and depth >= MAX_DEPTH:
            self.pos = pos
            self.fail(f"nesting deeper than MAX_DEPTH ({MAX_DEPTH})")
        n = initial & 0x1F
        if n >= 24:
            n = self.argument(initial)
        if major == _UINT:
            return n
        if major == _NINT:
            return -1 - n
        if major == _TEXT:
            return self.string(n)
        if major == _ARRAY:
            if n > self.end - self.pos:
                self.fail(f"array of {n} items is longer than the input")
            depth += 1
            return [self.value(depth) for _ in range(n)]
        if major == _MAP:
            if n << 1 > self.end - self.pos:
                self.fail(f"map of {n} pairs is longer than the input")
            return self.pairs(n, depth + 1)
        if major == _TAG:
            decoder = _TAG_DECODERS.get(n)
            if decoder is None:
                self.pos = pos
                self.fail(f"unknown tag {n}")
            return decoder(self, depth)
        self.pos = pos
        self.fail("byte strings are not values")

    def pairs(self, n: int, depth: int) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for _ in range(n):
            key = self.text("a text map key")
            if key in result:
                self.fail(f"duplicate map key {key!r}")
            result[key] = self.value(depth)
        return result

    def values(self, depth: int, what: str) -> list[Any]:
        n = self.container(_ARRAY, depth, what)
        depth += 1
        return [self.value(depth) for _ in range(n)]

    # Tag decoders: the tag head at ``depth`` was just consumed.

    def tuple_(self, depth: int) -> tuple[Any, ...]:
        return tuple(self.values(depth + 1, "an array in a tuple"))

    def slice_(self, depth: int) -> slice:
        self.array(3, depth + 1, "an array in a slice")
        depth += 2
        return slice(self.value(depth), self.value(depth), self.value(depth))

    def ellipsis(self, depth: int) -> types.EllipsisType:
        if self.data[self.pos] != _NULL:
            self.fail("expected null in an Ellipsis")
        self.pos += 1
        return ...

    def dtype(self, depth: int) -> torch.dtype:
        name = self.text("a dtype name")
        dtype = _DTYPE_BY_NAME.get(name)
        if dtype is None:
            self.fail(f"unknown dtype {name!r}")
        return dtype

    def ref(self, depth: int) -> Ref:
        return Ref(self.uint("a uint in a Ref"))

    def complex_(self, depth: int) -> complex:
        self.array(2, depth + 1, "an array in a complex")
        real = self.value(depth + 2)
        imag = self.value(depth + 2)
        if type(real) is not float or type(imag) is not float:
            self.fail("a complex must hold two floats")
        return complex(real, imag)

    def grad_tensor(self, depth: int) -> torch.Tensor:
        self.array(3, depth + 1, "an array in a tensor with grad")
        depth += 2
        tensor = self.ndarray(depth)
        requires_grad = self.boolean("requires_grad")
        grad = None
        if self.data[self.pos] == _NULL:
            self.pos += 1
        else:
            grad = self.ndarray(depth)
        if requires_grad:
            tensor.requires_grad_(True)
        if grad is not None:
            tensor.grad = grad
        return tensor

    def ndarray(self, depth: int) -> torch.Tensor:
        """Read a whole tag-40 item at ``depth``."""
        if self.tag(depth) != _TAG_NDARRAY:
            self.fail("expected a tensor")
        return self.tensor(depth)

    def tensor(self, depth: int) -> torch.Tensor:
        self.array(2, depth + 1, "an array in a tensor")
        ndim = self.container(_ARRAY, depth + 2, "a tensor shape")
        shape = [self.uint("a dimension") for _ in range(ndim)]
        typed = _DTYPE_OF_TAG.get(self.tag(depth + 2))
        if typed is None:
            self.fail("unknown typed-array tag in a tensor")
        dtype, big_endian = typed
        nbytes = self.head(_BYTES, "a byte string in a typed array")
        offset = self.pos
        if nbytes > self.end - offset:
            self.fail(f"typed array of {nbytes} bytes is longer than the input")
        itemsize = dtype.itemsize
        if _numel(shape, nbytes) * itemsize != nbytes:
            self.fail(f"a {dtype} tensor of shape {shape} cannot hold {nbytes} bytes")
        end = self.pos = offset + nbytes
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        # A small vector gets memory of its own: a copy of a few bytes costs less than
        # the views below, and leaves the frame's buffer free to go.
        small = nbytes <= _SMALL_TENSOR and len(shape) == 1 and not big_endian
        tensor = None
        if self.writable and not big_endian and not small:
            tensor = torch.frombuffer(
                self.data, dtype=dtype, count=nbytes // itemsize, offset=offset
            )
            if tensor.data_ptr() % itemsize:
                tensor = None  # misaligned elements: copy them
        if tensor is None:
            # The one copy: read-only input, a byte swap, misaligned elements, a small vector.
            with memoryview(self.data) as view:
                copied = bytearray(view[offset:end])
            if big_endian:
                raw = torch.frombuffer(copied, dtype=torch.uint8)
                tensor = raw.view(-1, itemsize).flip(1).view(dtype)
            else:
                tensor = torch.frombuffer(copied, dtype=dtype)
        if dtype is torch.bool and bool((tensor.view(torch.uint8) > 1).any()):
            self.fail("a bool tensor holds a byte other than 0 or 1")
        if small:
            return tensor  # already the vector, over memory of its own
        return _shaped(tensor, shape)

    # -- messages -------------------------------------------------------------

    def frame(self) -> list[Message]:
        self.array(2, 0, "a frame array")
        version = self.uint("a protocol version")
        if version != PROTOCOL_VERSION:
            self.fail(f"unknown protocol version {version}")
        n = self.container(_ARRAY, 1, "an array of messages")
        messages: list[Message] = []
        for _ in range(n):
            length = self.container(_ARRAY, 2, "a message array")
            code = self.uint("a message code")
            decoder = _MESSAGE_DECODERS.get(code)
            if decoder is None:
                self.fail(f"unknown message code {code}")
            arity, decode = decoder
            if length != arity:
                self.fail(f"message {code} must have {arity} elements, not {length}")
            messages.append(decode(self))
        self.finish()
        return messages

    def store(self) -> Store:
        return Store(self.uint("Store.id"), self.value(3))

    def call(self) -> Call:
        id_ = self.uint("Call.id")
        op = self.text("Call.op")
        n = self.container(_ARRAY, 3, "Call.args")
        args = tuple([self.value(4) for _ in range(n)])
        n = self.container(_MAP, 3, "Call.kwargs")
        return Call(id_, op, args, self.pairs(n, 4))

    def fetch(self) -> Fetch:
        return Fetch(self.uint("Fetch.request"), self.uint("Fetch.id"), self.boolean("Fetch.free"))

    def release(self) -> Release:
        n = self.container(_ARRAY, 3, "Release.ids")
        return Release(tuple([self.uint("a Release id") for _ in range(n)]))

    def list_objects(self) -> ListObjects:
        return ListObjects(self.uint("ListObjects.request"))

    def reply(self) -> Reply:
        return Reply(self.uint("Reply.request"), self.value(3))

    def failure(self) -> Failure:
        return Failure(
            self.uint("Failure.request"),
            self.text("Failure.kind"),
            self.text("Failure.error_type"),
            self.text("Failure.message"),
        )


_TAG_DECODERS: Final[dict[int, Callable[[_Decoder, int], Any]]] = {
    _TAG_NDARRAY: _Decoder.tensor,
    _TAG_GRAD: _Decoder.grad_tensor,
    _TAG_TUPLE: _Decoder.tuple_,
    _TAG_SLICE: _Decoder.slice_,
    _TAG_ELLIPSIS: _Decoder.ellipsis,
    _TAG_DTYPE: _Decoder.dtype,
    _TAG_REF: _Decoder.ref,
    _TAG_COMPLEX: _Decoder.complex_,
}

# Message code -> (array length, decoder).
_MESSAGE_DECODERS: Final[dict[int, tuple[int, Callable[[_Decoder], Message]]]] = {
    _MSG_STORE: (3, _Decoder.store),
    _MSG_CALL: (5, _Decoder.call),
    _MSG_FETCH: (4, _Decoder.fetch),
    _MSG_RELEASE: (2, _Decoder.release),
    _MSG_LIST_OBJECTS: (2, _Decoder.list_objects),
    _MSG_REPLY: (3, _Decoder.reply),
    _MSG_FAILURE: (5, _Decoder.failure),
}


def _decode(buf: Chunk, read: Callable[[_Decoder], Any]) -> Any:
    try:
        return read(_Decoder(buf))
    except ProtocolError:
        raise
    except (IndexError, struct.error) as exc:
        raise ProtocolError("truncated input: an item runs past the end") from exc
    except Exception as exc:
        raise ProtocolError(f"malformed input: {exc!r}") from exc


def decode_frame(buf: Chunk) -> list[Message]:
    """Decode one frame; its tensors alias ``buf`` when it is writable."""
    messages: list[Message] = _decode(buf, _Decoder.frame)
    return messages


def _read_value(decoder: _Decoder) -> Any:
    value = decoder.value(0)
    decoder.finish()
    return value


def decode_value(buf: Chunk) -> Any:
    """Decode one self-contained value, as :func:`encode_value` wrote it."""
    return _decode(buf, _read_value)
