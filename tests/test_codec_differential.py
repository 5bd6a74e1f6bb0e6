"""fedtensor's codec against cbor2, a CBOR implementation that shares none of its code.

Both ways, over random batches of every message type, nested values of the grammar, and
tensors small (inline) and large (in the frame's buffers) of several dtypes:

* a frame fedtensor encodes, read by plain ``cbor2.loads`` (a generic tag hook turns every
  tag into plain data, and references into the buffers are resolved there), gives the
  plain form of the messages, which this file derives from the byte format documented in
  :mod:`fedtensor.protocol.codec`, not from its code;
* a frame cbor2 builds from that plain form (inline, or with the tensors' elements moved to
  buffers at offsets fedtensor's encoder would not choose) decodes with fedtensor to the
  same messages.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from collections.abc import Mapping
from typing import Any

import cbor2
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_codec import DTYPES, assert_same, grad_tensors, ids, make_tensor, tensors

from fedtensor.protocol.codec import INLINE_LIMIT, decode_frame, frame_bytes
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

# torch warns (once per process) the first time it allocates a complex32 tensor.
pytestmark = pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental:UserWarning")

# The format, as the codec's docstring gives it.
TYPED_ARRAY_TAG = {
    "uint8": 64,
    "uint16": 69,
    "uint32": 70,
    "uint64": 71,
    "int8": 72,
    "int16": 77,
    "int32": 78,
    "int64": 79,
    "float16": 84,
    "float32": 85,
    "float64": 86,
    "bool": 48800,
    "bfloat16": 48801,
    "complex32": 48802,
    "complex64": 48803,
    "complex128": 48804,
    "float8_e4m3fn": 48805,
    "float8_e5m2": 48806,
    "float8_e4m3fnuz": 48807,
    "float8_e5m2fnuz": 48808,
    "float8_e8m0fnu": 48809,
    "float4_e2m1fn_x2": 48810,
}
NDARRAY, GRAD, TUPLE, SLICE, ELLIPSIS, DTYPE, REF, COMPLEX, BUFFER = (
    40,
    48820,
    48821,
    48822,
    48823,
    48824,
    48825,
    48826,
    48827,
)
MESSAGE_CODES = {
    Store: 1,
    Call: 2,
    Fetch: 3,
    Release: 4,
    ListObjects: 5,
    Reply: 16,
    Failure: 17,
}
VERSION = 2
ALIGN = 16


@dataclasses.dataclass(frozen=True)
class Tagged:
    """A tag as plain data."""

    number: int
    content: Any


tagged = Tagged


def is_tagged(value: Any) -> bool:
    return type(value) is Tagged


# ---------------------------------------------------------------------------
# The plain form of messages, from the documented format


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def plain_tensor(tensor: torch.Tensor) -> Tagged:
    typed = tagged(TYPED_ARRAY_TAG[dtype_name(tensor.dtype)], raw_bytes(tensor))
    return tagged(NDARRAY, [list(tensor.shape), typed])


def raw_bytes(tensor: torch.Tensor) -> bytes:
    """A tensor's elements in row-major order, as bytes (little-endian: the host's order)."""
    if tensor.numel() == 0:
        return b""
    values = tensor.detach().resolve_conj().resolve_neg().reshape(-1)
    flat = values.clone(memory_format=torch.contiguous_format)
    return bytes(flat.view(torch.uint8).tolist())


def plain_value(value: Any) -> Any:
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, Ref):
        return tagged(REF, int(value))
    if isinstance(value, torch.Tensor):
        grad = value.grad if value.is_leaf else None
        if not value.requires_grad and grad is None:
            return plain_tensor(value)
        return tagged(
            GRAD,
            [
                plain_tensor(value),
                value.requires_grad,
                None if grad is None else plain_tensor(grad),
            ],
        )
    if isinstance(value, list):
        return [plain_value(item) for item in value]
    if isinstance(value, tuple):
        return tagged(TUPLE, [plain_value(item) for item in value])
    if isinstance(value, dict):
        return {key: plain_value(item) for key, item in value.items()}
    if isinstance(value, slice):
        return tagged(
            SLICE, [plain_value(value.start), plain_value(value.stop), plain_value(value.step)]
        )
    if value is ...:
        return tagged(ELLIPSIS, None)
    if isinstance(value, torch.dtype):
        return tagged(DTYPE, dtype_name(value))
    if isinstance(value, complex):
        return tagged(COMPLEX, [value.real, value.imag])
    raise AssertionError(f"not in the grammar: {value!r}")


def plain_message(message: Message) -> list[Any]:
    code = MESSAGE_CODES[type(message)]
    if isinstance(message, Store):
        return [code, message.id, plain_value(message.value)]
    if isinstance(message, Call):
        return [
            code,
            message.id,
            message.op,
            [plain_value(arg) for arg in message.args],
            {key: plain_value(item) for key, item in message.kwargs.items()},
        ]
    if isinstance(message, Fetch):
        return [code, message.request, message.id, message.free]
    if isinstance(message, Release):
        return [code, list(message.ids)]
    if isinstance(message, ListObjects):
        return [code, message.request]
    if isinstance(message, Reply):
        return [code, message.request, plain_value(message.value)]
    return [code, message.request, message.kind, message.error_type, message.message]


def same_plain(a: Any, b: Any, *, any_nan: bool = False) -> bool:
    """Equal plain data, floats bit for bit (or any NaN for any NaN, if ``any_nan``)."""
    if type(a) is not type(b):
        return False
    if type(a) is float:
        if any_nan and math.isnan(a) and math.isnan(b):
            return True
        return struct.pack("<d", a) == struct.pack("<d", b)
    if type(a) is Tagged:
        return a.number == b.number and same_plain(a.content, b.content, any_nan=any_nan)
    if type(a) is list:
        return len(a) == len(b) and all(
            same_plain(x, y, any_nan=any_nan) for x, y in zip(a, b, strict=True)
        )
    if type(a) is dict:
        return list(a) == list(b) and all(same_plain(a[k], b[k], any_nan=any_nan) for k in a)
    return bool(a == b)


# ---------------------------------------------------------------------------
# cbor2's side


def generic_tag_hook(tag: cbor2.CBORTag, immutable: bool) -> Tagged:
    return Tagged(tag.tag, thawed(tag.value))


def thawed(value: Any) -> Any:
    """cbor2 decodes a tag's content immutable (arrays as tuples): back to lists and dicts."""
    if type(value) is tuple:
        return [thawed(item) for item in value]
    if isinstance(value, Mapping):
        return {key: thawed(item) for key, item in value.items()}
    return value


def read_with_cbor2(frame: bytes) -> tuple[bytes, int, list[Any]]:
    """The buffers, their offset in the frame, and the messages with references resolved."""
    version, buffers, messages = cbor2.loads(frame, tag_hook=generic_tag_hook)
    assert version == VERSION
    assert type(buffers) is bytes
    # The buffers' content starts after the frame's array and version (83 02) and the
    # byte string's head.
    assert frame[:2] == b"\x83\x02"
    info = frame[2] & 0x1F
    start = 3 if info < 24 else 3 + (1 << (info - 24))
    assert frame[start : start + len(buffers)] == buffers
    references: list[tuple[int, int]] = []

    def resolve(value: Any) -> Any:
        if is_tagged(value):
            if value.number == BUFFER:
                offset, length = value.content
                references.append((offset, length))
                return buffers[offset : offset + length]
            return Tagged(value.number, resolve(value.content))
        if type(value) is list:
            return [resolve(item) for item in value]
        if type(value) is dict:
            return {key: resolve(item) for key, item in value.items()}
        return value

    resolved = resolve(messages)
    # The encoder's placement: in order, disjoint, each at a frame offset that is a
    # multiple of 16, each over INLINE_LIMIT bytes.
    end = 0
    for offset, length in references:
        assert offset >= end
        assert (start + offset) % ALIGN == 0
        assert length > INLINE_LIMIT
        end = offset + length
    return buffers, start, resolved


def to_cbor2(value: Any) -> Any:
    """Plain data as the objects cbor2 encodes: tags as ``cbor2.CBORTag``."""
    if is_tagged(value):
        return cbor2.CBORTag(value.number, to_cbor2(value.content))
    if type(value) is list:
        return [to_cbor2(item) for item in value]
    if type(value) is dict:
        return {key: to_cbor2(item) for key, item in value.items()}
    return value


def to_buffers(value: Any, buffers: bytearray, gap: int) -> Any:
    """``value`` with each typed array's elements moved to ``buffers``, ``gap`` bytes apart."""
    if is_tagged(value):
        number, content = value.number, value.content
        if number in TYPED_ARRAY_TAG.values() and content:
            buffers += bytes(gap)
            offset = len(buffers)
            buffers += content
            return tagged(number, tagged(BUFFER, [offset, len(content)]))
        return tagged(number, to_buffers(content, buffers, gap))
    if type(value) is list:
        return [to_buffers(item, buffers, gap) for item in value]
    if type(value) is dict:
        return {key: to_buffers(item, buffers, gap) for key, item in value.items()}
    return value


# ---------------------------------------------------------------------------
# Strategies


@st.composite
def large_tensors(draw: st.DrawFn) -> torch.Tensor:
    """Tensors over INLINE_LIMIT bytes, which travel in the buffers."""
    dtype = draw(st.sampled_from(DTYPES))
    rows = draw(st.integers(1, 3))
    columns = INLINE_LIMIT // (rows * dtype.itemsize) + draw(st.integers(1, 40))
    n = rows * columns * dtype.itemsize
    seed = draw(st.integers(0, 255))
    return make_tensor(dtype, [rows, columns], bytes((seed + 7 * i) % 256 for i in range(n)))


leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64 - 1)
    | st.floats()
    | st.complex_numbers()
    | st.text(max_size=8)
    | st.just(...)
    | st.sampled_from([torch.float32, torch.int64, torch.bfloat16, torch.bool])
    | st.builds(Ref, ids)
    | tensors()
    | grad_tensors()
    | large_tensors()
)
values = st.recursive(
    leaves,
    lambda children: (
        st.lists(children, max_size=3)
        | st.lists(children, max_size=3).map(tuple)
        | st.dictionaries(st.text(max_size=4), children, max_size=3)
        | st.builds(slice, children, children, children)
    ),
    max_leaves=8,
)
messages = st.one_of(
    st.builds(Store, ids, values),
    st.builds(
        Call,
        ids,
        st.text(max_size=12),
        st.lists(values, max_size=3).map(tuple),
        st.dictionaries(st.text(max_size=4), values, max_size=2),
    ),
    st.builds(Fetch, ids, ids, st.booleans()),
    st.builds(Release, st.lists(ids, max_size=4).map(tuple)),
    st.builds(ListObjects, ids),
    st.builds(Reply, ids, values),
    st.builds(Failure, ids, st.text(max_size=8), st.text(max_size=8), st.text(max_size=8)),
)
# Half the batches carry at least one large tensor, next to any value.
batches = st.lists(messages, max_size=4) | st.builds(
    lambda batch, tensor, value: [*batch, Reply(0, [value, tensor])],
    st.lists(messages, max_size=3),
    large_tensors(),
    values,
)
differential = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


# ---------------------------------------------------------------------------
# Tests


@given(batches)
@differential
def test_cbor2_reads_what_fedtensor_writes(batch: list[Message]) -> None:
    frame = bytes(frame_bytes(batch))
    _, _, decoded = read_with_cbor2(frame)
    expected = [plain_message(message) for message in batch]
    assert same_plain(decoded, expected), (decoded, expected)


@given(batches, st.integers(0, 17))
@differential
def test_fedtensor_reads_what_cbor2_writes(batch: list[Message], gap: int) -> None:
    plain = [plain_message(message) for message in batch]
    inline = cbor2.dumps([VERSION, b"", to_cbor2(plain)])
    buffers = bytearray()
    moved = to_buffers(plain, buffers, gap)
    out_of_band = cbor2.dumps([VERSION, bytes(buffers), to_cbor2(moved)])
    for frame in (inline, out_of_band):
        for buf in (frame, bytearray(frame)):
            decoded = decode_frame(buf)
            # cbor2 writes every NaN as the same half-precision NaN.
            assert same_plain([plain_message(message) for message in decoded], plain, any_nan=True)
            if not any(math.isnan(x) for x in floats_in(plain)):
                assert_same(batch, decoded)


def floats_in(value: Any) -> list[float]:
    if type(value) is float:
        return [value]
    if is_tagged(value):
        return floats_in(value.content)
    if type(value) is list:
        return [x for item in value for x in floats_in(item)]
    if type(value) is dict:
        return [x for item in value.values() for x in floats_in(item)]
    return []


def test_the_plain_form_is_what_the_docstring_shows() -> None:
    # The two examples of the codec's docstring, through cbor2 alone.
    frame = bytes(frame_bytes([Store(1, torch.tensor([1.5, -2.0])), Store(2, torch.ones(300))]))
    buffers, start, decoded = read_with_cbor2(frame)
    assert start == 11
    assert len(buffers) == 5 + 1200
    assert decoded == [
        [1, 1, tagged(40, [[2], tagged(85, struct.pack("<2f", 1.5, -2.0))])],
        [1, 2, tagged(40, [[300], tagged(85, struct.pack("<300f", *[1.0] * 300))])],
    ]
