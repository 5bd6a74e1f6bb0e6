"""The wire codec: round trips, zero copy, alignment, interop with cbor2, hostile input.

Tests that protect a check of the decoder name it; each was seen to fail with that check
taken out of fedtensor/protocol/codec.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import math
import pickle
import struct
import tracemalloc
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import cbor2
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedtensor.errors import ProtocolError
from fedtensor.protocol import codec
from fedtensor.protocol.codec import (
    INLINE_LIMIT,
    MAX_DEPTH,
    NestingTooDeep,
    decode_frame,
    decode_value,
    encode_frame,
    encode_value,
    frame_bytes,
)
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

DTYPE_NAMES = [
    "bool",
    "uint8",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "bfloat16",
    "float32",
    "float64",
    "complex32",
    "complex64",
    "complex128",
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "float4_e2m1fn_x2",
]
DTYPES = [d for n in DTYPE_NAMES if isinstance(d := getattr(torch, n, None), torch.dtype)]
ALL_TORCH_DTYPES = sorted({d for d in vars(torch).values() if isinstance(d, torch.dtype)}, key=str)
GRAD_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64]
MAX_ID = 2**64 - 1

quick = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------
# Helpers


def buffer_range(buf: bytearray) -> tuple[int, int]:
    """The address range of a bytearray's memory."""
    address = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))
    return address, address + len(buf)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, for exact comparison (NaNs, -0.0, float8, ...)."""
    if tensor.numel() == 0:
        return torch.empty(0, dtype=torch.uint8)
    flat = tensor.detach().resolve_conj().resolve_neg().reshape(-1)
    # clone(contiguous_format) also fixes the stride of size-1 dims, which view() checks.
    return flat.clone(memory_format=torch.contiguous_format).view(torch.uint8)


def make_tensor(dtype: torch.dtype, shape: list[int], raw: bytes) -> torch.Tensor:
    """A tensor of ``shape`` whose elements are the bytes ``raw``."""
    if not raw:
        return torch.empty(shape, dtype=dtype)
    u8 = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    if dtype == torch.bool:
        u8 = u8 % 2  # a bool byte must be 0 or 1
    return u8.view(dtype).reshape(shape).clone()


def assert_same(a: Any, b: Any) -> None:
    """Strict equality: same types all the way down, floats and tensors bit for bit."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype
        assert a.shape == b.shape
        assert a.requires_grad == b.requires_grad
        assert torch.equal(bits(a), bits(b))
        grad_a = a.grad if a.is_leaf else None
        assert_same(grad_a, b.grad)
    elif isinstance(a, float):
        assert struct.pack("<d", a) == struct.pack("<d", b)
    elif isinstance(a, complex):
        assert_same(a.real, b.real)
        assert_same(a.imag, b.imag)
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, slice):
        assert_same((a.start, a.stop, a.step), (b.start, b.stop, b.step))
    elif dataclasses.is_dataclass(a):
        for field in dataclasses.fields(a):
            assert_same(getattr(a, field.name), getattr(b, field.name))
    else:
        assert a == b


def buffers(frame: bytearray) -> list[bytes | bytearray | memoryview]:
    """The same frame as every kind of buffer the decoder accepts."""
    return [frame, bytes(frame), memoryview(bytearray(frame)), memoryview(bytes(frame))]


def roundtrip_value(value: Any) -> None:
    for buf in buffers(encode_value(value)):
        assert_same(value, decode_value(buf))


def roundtrip_frame(messages: list[Message]) -> None:
    frame = frame_bytes(messages)
    # An independent decoder finds it well-formed: [2, buffers, messages].
    version, payloads, items = cbor2.loads(bytes(frame))
    assert (version, type(payloads), len(items)) == (2, bytes, len(messages))
    for buf in buffers(frame):
        assert_same(messages, decode_frame(buf))


def rejects(buf: bytes | bytearray) -> None:
    """Both entry points answer ``buf`` with ProtocolError (and nothing else)."""
    with pytest.raises(ProtocolError):
        decode_value(buf)
    with pytest.raises(ProtocolError):
        decode_frame(buf)


FRAME_HEAD = b"\x83\x02\x40"  # [2, h'' (no buffers), ...


def as_frame(value_item: bytes) -> bytes:
    """A frame holding ``Reply(1, <value_item>)``, built by hand."""
    return FRAME_HEAD + b"\x81\x83\x10\x01" + value_item


def cbor_frame(messages: list[Any], buffers: bytes = b"") -> bytes:
    """A frame built by cbor2 from CBOR-level messages (tags as ``cbor2.CBORTag``)."""
    return cbor2.dumps([2, buffers, messages])


def peak_allocation(decode: Callable[[bytes], Any], buf: bytes) -> int:
    """The most memory Python's allocator hands out while ``decode`` refuses ``buf``.

    cbor2 builds its byte and text strings there, so a string made at its declared
    length would show.
    """
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError):
            decode(buf)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def accepts_or_rejects(decode: Callable[[bytes], Any], buf: bytes) -> None:
    """``decode`` either succeeds or raises ProtocolError; anything else fails the test."""
    with contextlib.suppress(ProtocolError):
        decode(buf)


def quiet_empty(dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty(2, dtype=dtype)``; quantized dtypes warn that they are deprecated."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.empty(2, dtype=dtype)


# ---------------------------------------------------------------------------
# Strategies

shapes = st.lists(st.integers(0, 4), max_size=4)


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    """Tensors of every dtype with random bytes, contiguous or not."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(shapes)
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided"]))
    if layout == "strided" and shape:
        shape = [2 * shape[0], *shape[1:]]
    n = math.prod(shape) * dtype.itemsize
    tensor = make_tensor(dtype, shape, draw(st.binary(min_size=n, max_size=n)))
    if layout == "transposed" and tensor.dim() >= 2:
        tensor = tensor.transpose(0, -1)
    elif layout == "strided" and shape:
        tensor = tensor[::2]
    return tensor


@st.composite
def grad_tensors(draw: st.DrawFn) -> torch.Tensor:
    """Leaf tensors that require grad, some with a .grad."""
    dtype = draw(st.sampled_from(GRAD_DTYPES))
    shape = draw(shapes)
    ramp = torch.arange(math.prod(shape), dtype=torch.float64).reshape(shape) - 1.5
    tensor = ramp.to(dtype).clone().requires_grad_(True)
    if draw(st.booleans()):
        tensor.grad = (ramp * 0.25).to(dtype)
    return tensor


ids = st.integers(0, MAX_ID)
leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**64), MAX_ID)
    | st.floats()
    | st.complex_numbers()
    | st.text()
    | st.just(...)
    | st.sampled_from(ALL_TORCH_DTYPES)
    | st.builds(Ref, ids)
    | tensors()
    | grad_tensors()
)
values = st.recursive(
    leaves,
    lambda children: (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=4).map(tuple)
        | st.dictionaries(st.text(max_size=6), children, max_size=4)
        | st.builds(slice, children, children, children)
    ),
    max_leaves=12,
)
messages = st.one_of(
    st.builds(Store, ids, values),
    st.builds(
        Call,
        ids,
        st.text(),
        st.lists(values, max_size=3).map(tuple),
        st.dictionaries(st.text(max_size=6), values, max_size=3),
    ),
    st.builds(Fetch, ids, ids, st.booleans()),
    st.builds(Release, st.lists(ids, max_size=5).map(tuple)),
    st.builds(ListObjects, ids),
    st.builds(Reply, ids, values),
    st.builds(Failure, ids, st.text(), st.text(), st.text()),
)


# ---------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [[], [0], [3], [2, 0, 3], [2, 3, 4]], ids=str)
def test_every_dtype_roundtrips(dtype: torch.dtype, shape: list[int]) -> None:
    n = math.prod(shape) * dtype.itemsize
    raw = bytes((7 * i + 3) % 256 for i in range(n))
    roundtrip_value(make_tensor(dtype, shape, raw))


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (None, "f6"),
        (True, "f5"),
        (23, "17"),
        (24, "18 18"),
        (-1, "20"),
        (MAX_ID, "1b ff ff ff ff ff ff ff ff"),
        (-(2**64), "3b ff ff ff ff ff ff ff ff"),
        (1.5, "fb 3f f8 00 00 00 00 00 00"),
        ("é", "62 c3 a9"),
        ([0, 2], "82 00 02"),
        ((0, 2), "d9 be b5 82 00 02"),
        ({"a": None}, "a1 61 61 f6"),
        (slice(1, None, -1), "d9 be b6 83 01 f6 20"),
        (..., "d9 be b7 f6"),
        (torch.float32, "d9 be b8 67 66 6c 6f 61 74 33 32"),
        (Ref(5), "d9 be b9 05"),
        (1 + 2j, "d9 be ba 82 fb 3f f0 00 00 00 00 00 00 fb 40 00 00 00 00 00 00 00"),
    ],
    ids=repr,
)
def test_exact_encoding_of_values(value: Any, encoded: str) -> None:
    assert encode_value(value).hex(" ") == encoded


def test_exact_encoding_of_frames() -> None:
    # The first two are the examples in the module docstring of fedtensor.protocol.codec.
    tensor_frame = frame_bytes([Store(1, torch.tensor([1.5, -2.0]))])
    assert tensor_frame.hex(" ") == (
        "83 02 40 81 83 01 01 d8 28 82 81 02 d8 55 48 00 00 c0 3f 00 00 00 c0"
    )
    large_frame = frame_bytes([Store(1, torch.ones(300))])
    assert large_frame[:16].hex(" ") == "83 02 5b 00 00 00 00 00 00 04 b5 00 00 00 00 00"
    assert large_frame[16:1216] == struct.pack("<300f", *[1.0] * 300)
    assert large_frame[1216:].hex(" ") == (
        "81 83 01 01 d8 28 82 81 19 01 2c d8 55 d9 be bb 82 05 19 04 b0"
    )
    call_frame = frame_bytes([Call(7, "torch.add", (Ref(5), Ref(6)), {})])
    assert (
        call_frame
        == b"\x83\x02\x40\x81\x85\x02\x07\x69torch.add\x82\xd9\xbe\xb9\x05\xd9\xbe\xb9\x06\xa0"
    )


def test_special_float_values_roundtrip_bit_for_bit() -> None:
    specials = [0.0, -0.0, math.inf, -math.inf, math.nan, 1e-310, -1.5]
    for dtype in [torch.float16, torch.bfloat16, torch.float32, torch.float64]:
        tensor = torch.tensor(specials, dtype=dtype)
        decoded = decode_value(encode_value(tensor))
        torch.testing.assert_close(decoded, tensor, equal_nan=True, rtol=0, atol=0)
        assert torch.equal(bits(decoded), bits(tensor))


def _can_make(dtype: torch.dtype) -> bool:
    try:
        quiet_empty(dtype)
    except (RuntimeError, TypeError):
        return False
    return True


# Dtypes torch can make a CPU tensor of (the others, e.g. quantized, only have names).
CREATABLE_DTYPES = [dtype for dtype in ALL_TORCH_DTYPES if _can_make(dtype)]


@pytest.mark.parametrize("dtype", CREATABLE_DTYPES, ids=str)
def test_every_torch_dtype_roundtrips_or_is_refused(dtype: torch.dtype) -> None:
    tensor = quiet_empty(dtype)
    if dtype in DTYPES:
        roundtrip_value(make_tensor(dtype, [2], bytes(range(2 * dtype.itemsize))))
    else:
        with pytest.raises(ProtocolError):
            encode_value(tensor)


@pytest.mark.parametrize("dtype", ALL_TORCH_DTYPES, ids=str)
def test_every_torch_dtype_can_be_named(dtype: torch.dtype) -> None:
    roundtrip_value(dtype)  # as an argument (x.to(torch.bfloat16)), tensors of it or not


def test_the_common_dtypes_are_creatable_and_encodable() -> None:
    for dtype in (torch.bool, torch.uint8, torch.int64, torch.float32, torch.bfloat16):
        assert dtype in CREATABLE_DTYPES
        assert dtype in DTYPES


@given(tensors())
@quick
def test_random_tensors_roundtrip(tensor: torch.Tensor) -> None:
    roundtrip_value(tensor)
    roundtrip_frame([Store(1, tensor), Reply(2, [tensor, tensor])])


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.arange(24.0).reshape(2, 3, 4).transpose(0, 2),
        lambda: torch.arange(24.0).reshape(4, 6)[::2, 1::3],
        lambda: torch.arange(3.0).expand(4, 3),
        lambda: torch.arange(24.0).reshape(1, 2, 3, 4).to(memory_format=torch.channels_last),
        lambda: torch.arange(10, dtype=torch.int64)[3:7],
        lambda: torch.arange(10.0).flip(0),
        lambda: torch.tensor([1 + 2j, 3 - 4j]).conj(),
        lambda: torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex128).conj().imag,
    ],
    ids=["transpose", "step", "expand", "channels-last", "offset", "flip", "conj", "neg-view"],
)
def test_views_roundtrip_as_their_values(make: Callable[[], torch.Tensor]) -> None:
    tensor = make()
    for buf in buffers(encode_value(tensor)):
        decoded = decode_value(buf)
        assert decoded.shape == tensor.shape
        assert decoded.is_contiguous()
        assert torch.equal(decoded, tensor.resolve_conj().resolve_neg())


def test_requires_grad_and_grad_survive() -> None:
    leaf = torch.tensor([1.0, 2.0], requires_grad=True)
    (leaf * leaf).sum().backward()
    decoded = decode_value(encode_value(leaf))
    assert decoded.requires_grad
    assert decoded.is_leaf
    assert torch.equal(decoded.grad, torch.tensor([2.0, 4.0]))
    assert torch.equal(decoded.detach(), leaf.detach())
    # A grad on a tensor that no longer requires grad.
    plain = torch.zeros(2)
    plain.grad = torch.ones(2)
    decoded = decode_value(encode_value(plain))
    assert not decoded.requires_grad
    assert torch.equal(decoded.grad, torch.ones(2))
    # A non-leaf arrives as a leaf that requires grad (reading its .grad would warn).
    decoded = decode_value(encode_value(leaf * 3))
    assert decoded.requires_grad
    assert decoded.is_leaf
    assert decoded.grad is None
    # A Parameter arrives as a plain tensor that requires grad.
    decoded = decode_value(encode_value(torch.nn.Parameter(torch.ones(3))))
    assert type(decoded) is torch.Tensor
    assert decoded.requires_grad


@given(grad_tensors())
@quick
def test_grad_tensors_roundtrip(tensor: torch.Tensor) -> None:
    roundtrip_value(tensor)


def test_plain_tensor_is_rfc8746_and_cbor2_reads_it() -> None:
    tensor = torch.tensor([[1.5, -2.0, 3.25]], dtype=torch.float32)
    decoded = cbor2.loads(bytes(frame_bytes([Store(9, tensor)])))
    assert decoded[:2] == [2, b""]
    [[code, id_, item]] = decoded[2]
    assert (code, id_) == (1, 9)
    assert isinstance(item, cbor2.CBORTag)
    assert item.tag == 40
    shape, typed = item.value
    assert list(shape) == [1, 3]
    assert isinstance(typed, cbor2.CBORTag)
    assert typed.tag == 85
    assert typed.value == struct.pack("<3f", 1.5, -2.0, 3.25)


def test_reads_rfc8746_big_endian_arrays_from_cbor2() -> None:
    item = cbor2.CBORTag(40, [[2], cbor2.CBORTag(81, struct.pack(">2f", 1.5, -2.0))])
    expected = torch.tensor([1.5, -2.0], dtype=torch.float32)
    for buf in (cbor2.dumps(item), bytearray(cbor2.dumps(item))):
        assert_same(decode_value(buf), expected)
    [reply] = decode_frame(cbor_frame([[16, 4, item]]))
    assert reply == Reply(4, reply.value)
    assert_same(reply.value, expected)


@pytest.mark.parametrize(
    ("tag", "fmt", "dtype"),
    [
        (65, "H", torch.uint16),
        (66, "I", torch.uint32),
        (67, "Q", torch.uint64),
        (73, "h", torch.int16),
        (74, "i", torch.int32),
        (75, "q", torch.int64),
        (80, "e", torch.float16),
        (81, "f", torch.float32),
        (82, "d", torch.float64),
        (68, "B", torch.uint8),
    ],
)
def test_reads_every_rfc8746_big_endian_and_clamped_tag(
    tag: int, fmt: str, dtype: torch.dtype
) -> None:
    numbers = [1, 2, 3, 100, 7, 0]
    raw = struct.pack(f">{len(numbers)}{fmt}", *numbers)
    item = cbor2.dumps(cbor2.CBORTag(40, [[2, 3], cbor2.CBORTag(tag, raw)]))
    expected = make_tensor(dtype, [2, 3], struct.pack(f"<{len(numbers)}{fmt}", *numbers))
    for buf in (item, bytearray(item)):
        assert_same(decode_value(buf), expected)


def test_scalars_and_containers_roundtrip() -> None:
    for value in [
        None,
        True,
        False,
        0,
        23,
        24,
        255,
        256,
        2**32,
        MAX_ID,
        -1,
        -(2**64),
        1.5,
        -0.0,
        math.inf,
        "",
        "héllo ☃",
        1 + 2j,
        ...,
        slice(None),
        slice(1, -1, 2),
        Ref(0),
        Ref(MAX_ID),
        torch.float32,
        torch.bfloat16,
        [],
        (),
        {},
        [[0, 2]],
        [(0, 2)],
        {"a": (1, [2, {"b": None}])},
    ]:
        roundtrip_value(value)


def test_lists_and_tuples_stay_distinct() -> None:
    assert decode_value(encode_value([0, 2])) == [0, 2]
    assert decode_value(encode_value((0, 2))) == (0, 2)
    assert type(decode_value(encode_value((0, 2)))) is tuple


def test_tuple_subclasses_encode_as_tuples() -> None:
    assert_same(decode_value(encode_value(torch.Size([2, 3]))), (2, 3))
    values, indices = torch.max(torch.tensor([[1, 5], [7, 2]]), dim=1)
    decoded = decode_value(encode_value(torch.max(torch.tensor([[1, 5], [7, 2]]), dim=1)))
    assert type(decoded) is tuple
    assert_same(decoded, (values, indices))


def test_float_forms_decode() -> None:
    assert decode_value(b"\xf9\x3e\x00") == 1.5  # half
    assert decode_value(b"\xfa\x3f\xc0\x00\x00") == 1.5  # single
    assert decode_value(cbor2.dumps(1.5)) == 1.5


def test_non_minimal_heads_decode() -> None:
    assert decode_value(b"\x1b" + (5).to_bytes(8, "big")) == 5
    assert decode_value(b"\x99\x00\x02\x01\x02") == [1, 2]
    assert decode_value(b"\x7a\x00\x00\x00\x01a") == "a"
    assert decode_value(b"\xdb" + (48825).to_bytes(8, "big") + b"\x18\x07") == Ref(7)


@given(values)
@quick
def test_values_roundtrip(value: Any) -> None:
    roundtrip_value(value)


@given(st.lists(messages, max_size=4))
@quick
def test_messages_roundtrip(batch: list[Message]) -> None:
    roundtrip_frame(batch)


def test_field_types_after_decoding() -> None:
    batch: list[Message] = [
        Call(7, "torch.add", (Ref(5), Ref(6)), {"alpha": 2}),
        Release((1, 2)),
        Fetch(1, 7, True),
        ListObjects(9),
    ]
    call, release, fetch, list_objects = decode_frame(frame_bytes(batch))
    assert list_objects == ListObjects(9)
    assert call == batch[0]
    assert type(call.args) is tuple
    assert type(call.kwargs) is dict
    assert release == Release((1, 2))
    assert type(release.ids) is tuple
    assert fetch == Fetch(1, 7, True)
    assert fetch.free is True
    assert decode_frame(frame_bytes([])) == []


# ---------------------------------------------------------------------------
# Chunks, zero copy and alignment


def test_frame_without_tensors_is_one_chunk() -> None:
    chunks = encode_frame([Call(7, "torch.add", (Ref(5), Ref(6)), {}), Fetch(1, 7, False)])
    assert len(chunks) == 1
    assert type(chunks[0]) is bytearray


def address(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def test_tensor_payload_is_a_view_of_the_tensor() -> None:
    tensor = torch.arange(1000, dtype=torch.float32)
    chunks = encode_frame([Store(1, tensor), Store(2, "after")])
    # The frame's and the buffers' heads with the padding, the payload, the messages.
    assert [type(c) for c in chunks] == [bytearray, memoryview, memoryview]
    assert len(chunks[0]) == 16
    view = chunks[1]
    assert isinstance(view, memoryview)
    assert len(view) == tensor.nbytes
    assert address(view) == tensor.data_ptr()


def test_tensors_up_to_the_inline_limit_travel_inline() -> None:
    at_limit = torch.zeros(INLINE_LIMIT, dtype=torch.uint8)
    above = torch.zeros(INLINE_LIMIT + 1, dtype=torch.uint8)
    assert len(encode_frame([Store(1, at_limit)])) == 1
    chunks = encode_frame([Store(1, above), Store(2, at_limit)])
    assert [len(c) for c in chunks if isinstance(c, memoryview)][:1] == [INLINE_LIMIT + 1]
    assert_same(decode_frame(frame_bytes([Store(1, above)])), [Store(1, above)])
    # A value is one self-contained item: its large tensors stay inline.
    assert cbor2.loads(bytes(encode_value(above))).value[1].value == bytes(INLINE_LIMIT + 1)


def test_payload_view_keeps_the_tensor_alive() -> None:
    tensor = torch.full((4096,), 3.0)
    alive = weakref.ref(tensor)
    chunks = encode_frame([Store(1, tensor)])
    del tensor
    gc.collect()
    assert alive() is not None
    assert bytes(chunks[1]) == struct.pack("<4096f", *[3.0] * 4096)
    del chunks
    gc.collect()
    assert alive() is None


def test_non_contiguous_tensor_is_copied_and_the_copy_kept_alive() -> None:
    base = torch.arange(1200.0).reshape(30, 40)
    chunks = encode_frame([Store(1, base.t())])
    gc.collect()
    base.zero_()  # the frame holds a copy, not a view of base
    assert bytes(chunks[1]) == struct.pack(
        "<1200f", *torch.arange(1200.0).reshape(30, 40).t().reshape(-1).tolist()
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_payloads_are_aligned_and_decode_in_place(dtype: torch.dtype) -> None:
    tensor = make_tensor(dtype, [550, 2], bytes(i % 251 for i in range(1100 * dtype.itemsize)))
    for skew in range(17):
        batch: list[Message] = [Store(1, "x" * skew), Store(2, tensor), Reply(3, (tensor, skew))]
        chunks = encode_frame(batch)
        offset = 0
        payloads = 0
        for chunk in chunks:
            if len(chunk) == tensor.nbytes:
                assert offset % 16 == 0, (skew, offset)
                payloads += 1
            offset += len(chunk)
        assert payloads == 2
        frame = frame_bytes(batch)
        assert len(frame) == offset
        start, end = buffer_range(frame)
        decoded = decode_frame(frame)
        assert_same(batch, decoded)
        for decoded_tensor in (decoded[1].value, *decoded[2].value[:1]):
            assert start <= decoded_tensor.data_ptr() < end  # no copy
            assert (decoded_tensor.data_ptr() - start) % 16 == 0


def test_large_tensor_zero_copy() -> None:
    tensor = torch.randn(4 * 1024 * 1024)  # 16 MiB
    chunks = encode_frame([Store(1, tensor)])
    assert sum(len(c) for c in chunks) - tensor.nbytes < 64  # the payload is not in a header
    frame = frame_bytes([Store(1, tensor)])
    start, end = buffer_range(frame)
    [store] = decode_frame(frame)
    assert isinstance(store, Store)
    assert start <= store.value.data_ptr()
    assert store.value.data_ptr() + tensor.nbytes <= end
    assert torch.equal(store.value, tensor)
    [copied] = decode_frame(memoryview(bytes(frame)))
    assert isinstance(copied, Store)
    assert not start <= copied.value.data_ptr() < end
    assert torch.equal(copied.value, tensor)


def test_writable_memoryview_decodes_in_place() -> None:
    frame = frame_bytes([Store(1, torch.arange(1024.0))])
    start, end = buffer_range(frame)
    [store] = decode_frame(memoryview(frame))
    assert isinstance(store, Store)
    assert start <= store.value.data_ptr() < end


def test_small_tensors_get_memory_of_their_own() -> None:
    # Up to INLINE_LIMIT bytes, a tensor is copied out of the frame (cheaper than a
    # view of it); a larger one, of any rank, is a view of the frame.
    small, large = torch.arange(256.0), torch.arange(257.0)
    matrix, large_matrix = torch.ones(2, 2), torch.ones(20, 20)
    originals = (small, large, matrix, large_matrix)
    frame = frame_bytes([Store(i, t) for i, t in enumerate(originals)])
    start, end = buffer_range(frame)
    decoded = decode_frame(memoryview(frame))
    values = [message.value for message in decoded if isinstance(message, Store)]
    for value, original in zip(values, originals, strict=True):
        assert_same(value, original)
        assert value._base is None
    assert [start <= value.data_ptr() < end for value in values] == [False, True, False, True]


def test_misaligned_buffer_is_copied() -> None:
    tensor = torch.arange(200.0, dtype=torch.float64)
    frame = frame_bytes([Store(1, tensor)])
    shifted = bytearray(1) + frame
    start, end = buffer_range(shifted)
    [store] = decode_frame(memoryview(shifted)[1:])
    assert isinstance(store, Store)
    assert not start <= store.value.data_ptr() < end
    assert store.value.data_ptr() % 8 == 0
    assert torch.equal(store.value, tensor)


# ---------------------------------------------------------------------------
# Refusing values outside the grammar


class Unknown:
    pass


@pytest.mark.parametrize(
    "value",
    [
        lambda: None,
        object(),
        Unknown(),
        2**64,
        2**70,
        -(2**64) - 1,
        {1: 2},
        {("a",): 2},
        b"bytes",
        bytearray(b"x"),
        {1, 2},
        Ref(-1),
        Ref(2**64),
        "\ud800",
        torch.zeros(2, 2).to_sparse(),
        torch.zeros(2, device="meta"),
    ],
    ids=repr,
)
def test_encoding_a_value_outside_the_grammar_is_refused(value: Any) -> None:
    with pytest.raises(ProtocolError):
        encode_value(value)
    with pytest.raises(ProtocolError):
        encode_frame([Reply(1, value)])


@pytest.mark.parametrize(
    "message",
    [
        Store(-1, 0),
        Store(True, 0),  # type: ignore[arg-type]
        Store(2**64, 0),
        Call(1, 5, (), {}),  # type: ignore[arg-type]
        Call(1, "op", 5, {}),  # type: ignore[arg-type]
        Call(1, "op", (), {1: 2}),
        Fetch(1, 2, 1),  # type: ignore[arg-type]
        Release((1, "2")),  # type: ignore[arg-type]
        Failure(1, "remote", None, "m"),  # type: ignore[arg-type]
        "not a message",
    ],
    ids=repr,
)
def test_encoding_a_malformed_message_is_refused(message: Any) -> None:
    with pytest.raises(ProtocolError):
        encode_frame([message])


def test_encoding_a_quantized_tensor_is_refused() -> None:
    with pytest.raises(ProtocolError):
        encode_value(quiet_empty(torch.quint8))


def nest(depth: int, innermost: Any = 0) -> Any:
    """``depth`` lists, one in the other, around ``innermost``."""
    value = innermost
    for _ in range(depth):
        value = [value]
    return value


def test_nesting_limit_is_shared_by_encoder_and_decoder() -> None:
    # Protects the decoder's nesting bound (cbor2's max_depth) and the encoder's.
    assert_same(decode_value(encode_value(nest(MAX_DEPTH))), nest(MAX_DEPTH))
    with pytest.raises(NestingTooDeep):
        encode_value(nest(MAX_DEPTH + 1))
    with pytest.raises(NestingTooDeep):
        decode_value(b"\x81" * (MAX_DEPTH + 1) + b"\x00")
    # An empty array or map holds nothing, so it does not count (cbor2's rule).
    assert_same(decode_value(encode_value(nest(MAX_DEPTH, []))), nest(MAX_DEPTH, []))
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    with pytest.raises(NestingTooDeep):
        encode_value(cyclic)


def test_nesting_limit_counts_the_frame_and_tensor_internals() -> None:
    # A tensor is 3 levels deep (tag 40, its array, the typed-array tag): in a list
    # nested so deep that a tensor cannot fit, it is refused on both sides.
    value: Any = torch.ones(1)
    for _ in range(MAX_DEPTH - 3):
        value = [value]
    assert_same(decode_value(encode_value(value)), value)
    with pytest.raises(NestingTooDeep):
        encode_value([value])
    with pytest.raises(NestingTooDeep):
        decode_value(b"\x81" + bytes(encode_value(value)))
    # In a frame, the frame's three arrays enclose each message's value.
    in_frame = nest(MAX_DEPTH - 3)
    assert_same(decode_frame(frame_bytes([Reply(1, in_frame)])), [Reply(1, in_frame)])
    with pytest.raises(NestingTooDeep):
        frame_bytes([Reply(1, [in_frame])])
    with pytest.raises(NestingTooDeep):
        decode_frame(as_frame(b"\x81" * (MAX_DEPTH - 2) + b"\x00"))


def test_a_large_tensor_too_deep_for_a_reference_stays_inline() -> None:
    # Out of band, a tensor nests two levels deeper (the reference's tag and array).
    value: Any = torch.arange(300.0)
    for _ in range(MAX_DEPTH - 7):  # at depth 60 in a frame: a reference would reach 64
        value = [value]
    assert len(encode_frame([Reply(1, value)])) == 1  # no buffers: inline
    assert_same(decode_frame(frame_bytes([Reply(1, value)])), [Reply(1, value)])
    shallower = value[0]
    assert len(encode_frame([Reply(1, shallower)])) == 3  # head, payload, messages
    assert_same(decode_frame(frame_bytes([Reply(1, shallower)])), [Reply(1, shallower)])


# ---------------------------------------------------------------------------
# Hostile input


def valid_frames() -> list[bytearray]:
    grad = torch.tensor([1.0, -1.0], requires_grad=True)
    grad.grad = torch.tensor([0.5, 0.25])
    return [
        frame_bytes([Call(7, "torch.add", (Ref(5), Ref(6)), {"alpha": 2.5})]),
        frame_bytes(
            [Store(1, torch.arange(6, dtype=torch.int32).reshape(2, 3)), Fetch(2, 1, True)]
        ),
        frame_bytes([Reply(3, {"x": (1, [None, ...], slice(0, 3)), "d": torch.bfloat16})]),
        frame_bytes([Reply(4, grad), Release((1, 2, 3)), Failure(5, "remote", "E", "msg")]),
        frame_bytes([Store(2, 1 - 2j), Store(3, torch.tensor([True, False]))]),
        # Two large tensors: the buffers and the references into them.
        frame_bytes([Store(1, torch.ones(300, dtype=torch.bool)), Reply(2, [torch.ones(260)])]),
    ]


FRAMES = range(len(valid_frames()))


@pytest.mark.parametrize("index", FRAMES)
def test_every_truncation_is_rejected(index: int) -> None:
    frame = bytes(valid_frames()[index])
    for end in range(len(frame)):
        with pytest.raises(ProtocolError):
            decode_frame(frame[:end])
        with pytest.raises(ProtocolError):
            decode_frame(bytearray(frame[:end]))


@pytest.mark.parametrize("index", FRAMES)
def test_every_single_byte_mutation_is_decoded_or_rejected(index: int) -> None:
    frame = valid_frames()[index]
    for position in range(len(frame)):
        for new in {0x00, 0x17, 0x1B, 0x5B, 0x7F, 0x9B, 0xBF, 0xFF, frame[position] ^ 0x20}:
            mutated = bytearray(frame)
            mutated[position] = new
            accepts_or_rejects(decode_frame, bytes(mutated))
            accepts_or_rejects(decode_frame, mutated)


@given(st.data())
@settings(max_examples=150, deadline=None)
def test_random_mutations_are_decoded_or_rejected(data: st.DataObject) -> None:
    frame = bytearray(data.draw(st.sampled_from(valid_frames())))
    for _ in range(data.draw(st.integers(1, 4))):
        frame[data.draw(st.integers(0, len(frame) - 1))] = data.draw(st.integers(0, 255))
    accepts_or_rejects(decode_frame, bytes(frame))
    accepts_or_rejects(decode_frame, frame)


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_random_bytes_are_decoded_or_rejected(raw: bytes) -> None:
    accepts_or_rejects(decode_frame, raw)
    accepts_or_rejects(decode_value, raw)
    # Past the frame's head, to reach the message and value decoders.
    accepts_or_rejects(decode_frame, FRAME_HEAD + raw)
    accepts_or_rejects(decode_frame, as_frame(raw))
    accepts_or_rejects(decode_value, b"\xd8\x28\x82" + raw)  # inside a tensor
    # With 16 bytes of buffers to refer to.
    accepts_or_rejects(decode_frame, b"\x83\x02\x50" + bytes(range(16)) + raw)


def huge(head: int, n: int) -> bytes:
    return bytes([head]) + n.to_bytes(8, "big")


@pytest.mark.parametrize(
    "item",
    [
        huge(0x9B, 2**60),  # an array
        huge(0xBB, 2**60),  # a map
        huge(0x5B, 2**62),  # a byte string
        huge(0x7B, 2**62),  # a text string
        huge(0x7B, 2**30) + b"abc",
        huge(0x7B, 2**64 - 1) + b"abc",
        b"\xd8\x28\x82" + huge(0x9B, 2**60) + b"\xd8\x55\x40",  # a tensor's shape
        b"\xd8\x28\x82\x81\x02\xd8\x55" + huge(0x5B, 2**62) + b"\x00" * 8,  # its elements
    ],
)
def test_lengths_declared_past_the_input_are_rejected_without_allocating(item: bytes) -> None:
    # cbor2's own bound (verified here, not fedtensor's code): a declared length
    # costs it at most 64 KiB until the bytes run out.
    assert peak_allocation(decode_value, item) < 1 << 20
    assert peak_allocation(decode_frame, as_frame(item)) < 1 << 20


def test_buffers_declared_past_the_frame_are_rejected() -> None:
    # Protects decode_frame's check of the buffers' length against the frame's.
    for size in (18, 2**40, 2**64 - 1):
        frame = b"\x83\x02" + huge(0x5B, size) + bytes(16) + b"\x80"
        with pytest.raises(ProtocolError, match=r"buffers of .* run past the end of the frame"):
            decode_frame(frame)
        with pytest.raises(ProtocolError, match=r"buffers of .* run past the end of the frame"):
            decode_frame(bytearray(frame))


@pytest.mark.parametrize(
    "shape",
    [[2**63, 2**63, 2**63], [2**64 - 1, 0], [0, 2**63], [0, 2**40, 2**40], [2**62, 2, 0]],
    ids=str,
)
def test_shapes_torch_cannot_index_are_rejected(shape: list[int]) -> None:
    # Protects _numel's bound: without it, torch raises RuntimeError or TypeError.
    for raw in (b"", b"abcd"):
        item = cbor2.dumps(rfc_tensor(shape, 85, raw))
        rejects(item)
        rejects(as_frame(item))


def test_deep_nesting_is_rejected() -> None:
    # Protects cbor2's max_depth=MAX_DEPTH: its default (400) would let these through.
    just_too_deep = MAX_DEPTH + 1
    for item in [
        b"\x81" * just_too_deep + b"\x00",
        b"\xd9\xbe\xb5\x81" * (just_too_deep // 2 + 1) + b"\x00",  # nested tuples
        b"\xa1\x61a" * just_too_deep + b"\x00",  # nested maps
        b"\xd9\xbe\xb6\x83" * (just_too_deep // 2 + 1) + b"\xf6\xf6\xf6",  # nested slices
        b"\x81" * 10_000 + b"\x00",
    ]:
        with pytest.raises(NestingTooDeep):
            decode_value(item)
        with pytest.raises(NestingTooDeep):
            decode_frame(as_frame(item))


@pytest.mark.parametrize(
    "item",
    [
        b"\x9f\x01\xff",  # indefinite array
        b"\xbf\x61a\x01\xff",  # indefinite map
        b"\x5f\x41a\xff",  # indefinite byte string
        b"\x7f\x61a\xff",  # indefinite text string
        b"\xff",  # a lone break
        b"\x1c",  # reserved additional information
        b"\xf7",  # undefined
        b"\xf0",  # unassigned simple value
        b"\xf8\x20",  # one-byte simple value
        b"\x43abc",  # byte strings are not values
        b"\xa1\x01\x02",  # a non-text map key
        b"\xa1\x41a\x02",  # a byte string map key
        b"\xa2\x61a\x01\x61a\x02",  # a duplicate map key
        b"\x62\xff\xfe",  # invalid UTF-8
        b"\xd9\xbe\xb4\x80",  # grad wrapper around nothing
        b"\xc1\x01",  # an unknown (epoch time) tag
        b"\xd8\x55\x44abcd",  # a typed array outside tag 40
        b"\xd9\xbe\xb8\x65float",  # the alias "float" is not a dtype name
        b"\xd9\xbe\xb8\x69__class__",
        b"\xd9\xbe\xb9\x20",  # a negative Ref id
        b"\xd9\xbe\xb7\x00",  # Ellipsis around 0
        b"\xd9\xbe\xba\x82\x01\x02",  # complex of ints
        b"\xd9\xbe\xb6\x82\x01\x02",  # a slice of two
        b"\xd9\xbe\xb5\xa0",  # a tuple around a map
        b"\x01\x02",  # trailing bytes
        b"",
        b"\xd8\x28\x82\x81\x03\xd8\x55\x44abcd",  # 3 float32s in 4 bytes
        b"\xd9\xbe\xa0" + b"\x00",
        b"\xd8\x28\x82\x81\x02\xd9\xbe\xa0\x42\x00\x02",  # a bool byte of 2
        b"\xd8\x28\x82\x81\x01\xd9\xbe\xa0\x41\x01\x00",  # trailing after a tensor
        b"\xd8\x28\x82\x81\x01\xd9\x04\x10\x41\x01",  # column-major tag 1040 as element type
        b"\xd9\xbe\xbb\x82\x00\x04",  # a buffer reference outside a typed array
        b"\xd8\x28\x82\x81\x01\xd8\x55\xd9\xbe\xbb\x82\x00\x04",  # one outside a frame
    ],
)
def test_malformed_values_are_rejected(item: bytes) -> None:
    rejects(item)
    rejects(as_frame(item))


@pytest.mark.parametrize(
    "item",
    [
        b"\xd8\x1c\x81\x01",  # 28: a shareable value
        b"\x82\xd8\x1c\x81\x01\xd8\x1d\x00",  # 29: a shared reference (cycles, aliasing)
        b"\xd9\x01\x00\x81\x61a",  # 256: a string namespace
        b"\xd8\x19\x00",  # 25: a string reference
        b"\xd8\x23\x65(a+)+",  # 35: a regular expression (cbor2 would compile it)
        b"\xd8\x24\x60",  # 36: a MIME message (cbor2 would parse it)
        b"\xc0\x74" + b"2020-01-01T00:00:00Z",  # 0: a date
        b"\xc2\x49" + bytes(9),  # 2: a big integer
        b"\xd9\x01\x02\x81\x01",  # 258: a set
        b"\xd9\xd9\xf7\x01",  # 55799: self-described CBOR
        b"\xd9\xa7\xf8\x82\x01\x02",  # 43000: cbor2's complex numbers
    ],
)
def test_cbor2s_own_tags_are_refused(item: bytes) -> None:
    for decode in (decode_value, lambda b: decode_frame(as_frame(b))):
        with pytest.raises(ProtocolError, match="unknown tag"):
            decode(item)


def grad_item(tensor: Any, requires_grad: bool, grad: Any) -> bytes:
    return cbor2.dumps(cbor2.CBORTag(48820, [tensor, requires_grad, grad]))


def rfc_tensor(shape: list[int], tag: int, raw: Any) -> cbor2.CBORTag:
    return cbor2.CBORTag(40, [shape, cbor2.CBORTag(tag, raw)])


@pytest.mark.parametrize(
    "item",
    [
        grad_item(rfc_tensor([1], 78, b"\x01\x00\x00\x00"), True, None),  # int grad
        grad_item(rfc_tensor([1], 85, b"\x00" * 4), True, rfc_tensor([2], 85, b"\x00" * 8)),
        grad_item(rfc_tensor([1], 85, b"\x00" * 4), True, rfc_tensor([1], 86, b"\x00" * 8)),
        grad_item(rfc_tensor([1], 85, b"\x00" * 4), True, 1.0),
        grad_item(1.0, True, None),
        grad_item(rfc_tensor([1], 85, b"\x00" * 4), 1, None),
        cbor2.dumps(rfc_tensor([1.5], 85, b"\x00" * 4)),  # type: ignore[list-item]
        cbor2.dumps(rfc_tensor([-1], 85, b"\x00" * 4)),
        cbor2.dumps(rfc_tensor([True], 85, b"\x00" * 4)),  # type: ignore[list-item]
        cbor2.dumps(rfc_tensor([4], 85, "abcd")),  # elements as text
        cbor2.dumps(cbor2.CBORTag(40, [[1], [1.0]])),  # plain array elements
        cbor2.dumps(cbor2.CBORTag(40, [[1], cbor2.CBORTag(85, b"\x00" * 4), 0])),
        cbor2.dumps(cbor2.CBORTag(40, {"shape": [1]})),
        cbor2.dumps(cbor2.CBORTag(40, [cbor2.CBORTag(48821, [1]), cbor2.CBORTag(85, bytes(4))])),
    ],
)
def test_malformed_tensors_are_rejected(item: bytes) -> None:
    rejects(item)
    rejects(as_frame(item))


@pytest.mark.parametrize(
    "frame",
    [
        [3, b"", []],  # unknown version
        [1, []],  # a frame of version 1
        [1, [[16, 1, None]]],
        [2, b"", [], 0],
        [2, b""],
        [2],
        [],
        [True, b"", []],
        [2, "", []],  # buffers not a byte string
        [2, [], []],
        [2, b"", {}],  # messages not an array
        [2, b"", [[99, 1]]],  # unknown message code
        [2, b"", [[]]],
        [2, b"", [[True, 1, 0]]],
        [2, b"", [["1", 1, 0]]],
        [2, b"", [[1, 1]]],  # Store of 2 elements
        [2, b"", [[1, True, 0]]],  # a bool id
        [2, b"", [[1, -1, 0]]],  # a negative id
        [2, b"", [[1, 1.0, 0]]],  # a float id
        [2, b"", [[1, "1", 0]]],
        [2, b"", [[2, 1, 5, [], {}]]],  # op not a str
        [2, b"", [[2, 1, "op", cbor2.CBORTag(48821, []), {}]]],  # args not an array
        [2, b"", [[2, 1, "op", [], []]]],  # kwargs not a map
        [2, b"", [[2, 1, "op", [], {1: 2}]]],
        [2, b"", [[2, 1, "op", [b"bytes"], {}]]],
        [2, b"", [[2, 1, "op", [], {"k": b"bytes"}]]],
        [2, b"", [[3, 1, 2, 1]]],  # free not a bool
        [2, b"", [[3, 1, -2, True]]],
        [2, b"", [[4, 1]]],  # ids not an array
        [2, b"", [[4, [1, "2"]]]],
        [2, b"", [[4, [1, True]]]],
        [2, b"", [[5, -1]]],
        [2, b"", [[17, 1, "remote", "E", None]]],
        [2, b"", [{"code": 1}]],
        [2, b"", [[16, 1, b"bytes"]]],
        [2, b"", [[16, 1, [cbor2.undefined]]]],
    ],
    ids=repr,
)
def test_malformed_frames_are_rejected(frame: Any) -> None:
    with pytest.raises(ProtocolError):
        decode_frame(cbor2.dumps(frame))


def test_a_frame_of_the_previous_version_is_named() -> None:
    with pytest.raises(ProtocolError, match="unknown protocol version 1"):
        decode_frame(b"\x82\x01\x81\x82\x05\x01")


# ---------------------------------------------------------------------------
# References into the buffers


def frame_with_buffers(buffers: bytes, *references: tuple[int, int]) -> bytes:
    """A frame whose Reply holds one uint8 tensor per reference into ``buffers``."""
    tensors = [
        cbor2.CBORTag(40, [[length], cbor2.CBORTag(64, cbor2.CBORTag(48827, [offset, length]))])
        for offset, length in references
    ]
    return cbor_frame([[16, 1, tensors]], buffers)


def test_references_resolve_into_the_buffers() -> None:
    buffers = bytes(range(40))
    [reply] = decode_frame(frame_with_buffers(buffers, (0, 8), (8, 0), (20, 20)))
    assert isinstance(reply, Reply)
    assert [t.tolist() for t in reply.value] == [list(range(8)), [], list(range(20, 40))]


@pytest.mark.parametrize(
    "references",
    [
        [(0, 41)],  # past the end of the buffers
        [(40, 1)],
        [(2**63, 2**63)],
        [(2**64 - 1, 1)],
        [(0, 2**64 - 1)],
    ],
    ids=str,
)
def test_references_past_the_buffers_are_rejected(references: list[tuple[int, int]]) -> None:
    # Protects _Buffers.reference's bound: without it, torch.frombuffer raises
    # ValueError past the frame's end, or the tensor aliases the messages.
    frame = frame_with_buffers(bytes(40), *references)
    for buf in (frame, bytearray(frame), frame + b"\x00" * 64):
        with pytest.raises(ProtocolError):
            decode_frame(buf)


def test_a_reference_into_the_messages_is_rejected() -> None:
    # The buffers end before the messages: a reference may not reach them (their
    # bytes would become a tensor's). Protects the same bound.
    frame = frame_with_buffers(bytes(8), (0, 24))
    assert len(b"\x83\x02\x48") + 24 <= len(frame)  # inside the frame, past the buffers
    for buf in (frame, bytearray(frame)):
        with pytest.raises(ProtocolError, match="runs past the end of the buffers"):
            decode_frame(buf)


@pytest.mark.parametrize(
    "references",
    [[(0, 8), (4, 8)], [(8, 8), (0, 8)], [(0, 8), (0, 8)], [(0, 16), (15, 1)]],
    ids=str,
)
def test_overlapping_references_are_rejected(references: list[tuple[int, int]]) -> None:
    # Protects the order of references: two tensors never share elements.
    for buf in (frame_with_buffers(bytes(16), *references),):
        with pytest.raises(ProtocolError, match="overlaps or precedes"):
            decode_frame(buf)
        with pytest.raises(ProtocolError, match="overlaps or precedes"):
            decode_frame(bytearray(buf))


def test_references_cannot_amplify_the_frame() -> None:
    # Without the order check, 64 references to the same 64 KiB of read-only input
    # would be copied 64 times: 4 MiB out of a 64 KiB frame.
    frame = frame_with_buffers(bytes(1 << 16), *[(0, 1 << 16)] * 64)
    with pytest.raises(ProtocolError, match="overlaps or precedes"):
        decode_frame(frame)


@pytest.mark.parametrize(
    "reference",
    [[0], [0, 1, 2], [-1, 1], [0, -1], [0.0, 1], ["0", 1], {"offset": 0}, None],
    ids=repr,
)
def test_malformed_references_are_rejected(reference: Any) -> None:
    typed = cbor2.CBORTag(64, cbor2.CBORTag(48827, reference))
    frame = cbor_frame([[16, 1, cbor2.CBORTag(40, [[1], typed])]], bytes(4))
    with pytest.raises(ProtocolError, match="buffer reference"):
        decode_frame(frame)


def test_a_reference_must_hold_exactly_its_tensor() -> None:
    # Protects the element count check for references: 3 float32s are not 8 bytes.
    typed = cbor2.CBORTag(85, cbor2.CBORTag(48827, [0, 8]))
    frame = cbor_frame([[16, 1, cbor2.CBORTag(40, [[3], typed])]], bytes(16))
    with pytest.raises(ProtocolError, match="cannot hold 8 bytes"):
        decode_frame(bytearray(frame))
    typed = cbor2.CBORTag(85, cbor2.CBORTag(48827, [0, 16]))
    frame = cbor_frame([[16, 1, cbor2.CBORTag(40, [[2, 3], typed])]], bytes(16))
    with pytest.raises(ProtocolError, match="cannot hold 16 bytes"):
        decode_frame(frame)


def test_big_endian_and_misaligned_references_are_copied() -> None:
    raw = struct.pack(">3f", 1.5, -2.0, 3.25)
    typed = cbor2.CBORTag(81, cbor2.CBORTag(48827, [1, 12]))
    frame = bytearray(cbor_frame([[16, 1, cbor2.CBORTag(40, [[3], typed])]], b"\x00" + raw))
    start, end = buffer_range(frame)
    [reply] = decode_frame(frame)
    assert isinstance(reply, Reply)
    assert_same(reply.value, torch.tensor([1.5, -2.0, 3.25]))
    assert not start <= reply.value.data_ptr() < end
    little = cbor2.CBORTag(85, cbor2.CBORTag(48827, [1, 12]))
    frame = bytearray(cbor_frame([[16, 1, cbor2.CBORTag(40, [[3], little])]], b"\x00" + raw[::-1]))
    [reply] = decode_frame(frame)
    assert isinstance(reply, Reply)
    assert reply.value.data_ptr() % 4 == 0


# ---------------------------------------------------------------------------
# Only findings about the input become ProtocolError


class Boom(Exception):
    pass


@pytest.mark.parametrize("error", [Boom("a bug"), MemoryError(), KeyboardInterrupt()], ids=repr)
def test_other_errors_in_a_tag_decoder_are_not_turned_into_protocol_errors(
    monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    def broken(item: Any) -> Any:
        raise error

    tags = codec._Tags(codec._TAGS)
    tags[48825] = codec._tag_decoder(broken)
    monkeypatch.setattr(codec, "_TAGS", tags)
    with pytest.raises(type(error)) as raised:
        decode_frame(frame_bytes([Call(1, "torch.neg", (Ref(0),), {})]))
    assert raised.value is error
    with pytest.raises(type(error)):
        decode_value(encode_value(Ref(3)))


def test_pickle_is_rejected() -> None:
    for obj in [{"a": 1}, [1, 2, 3], torch.ones(2), Store(1, 2)]:
        rejects(pickle.dumps(obj))
