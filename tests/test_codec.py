"""The wire codec: round trips, zero copy, alignment, interop with cbor2, hostile input."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import math
import pickle
import struct
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
from fedtensor.protocol.codec import (
    MAX_DEPTH,
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
    cbor2.loads(bytes(frame))  # an independent decoder finds it well-formed
    for buf in buffers(frame):
        assert_same(messages, decode_frame(buf))


def rejects(buf: bytes | bytearray) -> None:
    """Both entry points answer ``buf`` with ProtocolError (and nothing else)."""
    with pytest.raises(ProtocolError):
        decode_value(buf)
    with pytest.raises(ProtocolError):
        decode_frame(buf)


def as_frame(value_item: bytes) -> bytes:
    """A frame holding ``Reply(1, <value_item>)``, built by hand."""
    return b"\x82\x01\x81\x83\x10\x01" + value_item


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
    # The first is the example in the module docstring of fedtensor.protocol.codec.
    tensor_frame = frame_bytes([Store(1, torch.tensor([1.5, -2.0]))])
    assert tensor_frame.hex(" ") == (
        "82 01 81 83 01 01 d8 28 82 98 01 02 d9 00 55 48 00 00 c0 3f 00 00 00 c0"
    )
    call_frame = frame_bytes([Call(7, "torch.add", (Ref(5), Ref(6)), {})])
    assert (
        call_frame
        == b"\x82\x01\x81\x85\x02\x07\x69torch.add\x82\xd9\xbe\xb9\x05\xd9\xbe\xb9\x06\xa0"
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
    assert decoded[:1] == [1]
    [[code, id_, item]] = decoded[1]
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
    [reply] = decode_frame(cbor2.dumps([1, [[16, 4, item]]]))
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


def test_tensor_payload_is_a_view_of_the_tensor() -> None:
    tensor = torch.arange(1000, dtype=torch.float32)
    chunks = encode_frame([Store(1, tensor), Store(2, "after")])
    assert [type(c) for c in chunks] == [bytearray, memoryview, bytearray]
    view = chunks[1]
    assert isinstance(view, memoryview)
    assert len(view) == tensor.nbytes
    assert ctypes.addressof(ctypes.c_char.from_buffer(view)) == tensor.data_ptr()


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
    base = torch.arange(12.0).reshape(3, 4)
    chunks = encode_frame([Store(1, base.t())])
    gc.collect()
    base.zero_()  # the frame holds a copy, not a view of base
    assert bytes(chunks[1]) == struct.pack(
        "<12f", *torch.arange(12.0).reshape(3, 4).t().reshape(-1).tolist()
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_payloads_are_aligned_and_decode_in_place(dtype: torch.dtype) -> None:
    align = max(8, dtype.itemsize)
    tensor = make_tensor(dtype, [3, 2], bytes(range(6 * dtype.itemsize)))
    for skew in range(17):
        batch: list[Message] = [Store(1, "x" * skew), Store(2, tensor), Reply(3, (tensor, skew))]
        chunks = encode_frame(batch)
        offset = 0
        for chunk in chunks:
            if isinstance(chunk, memoryview):
                assert offset % align == 0, (skew, offset)
            offset += len(chunk)
        frame = frame_bytes(batch)
        assert len(frame) == offset
        cbor2.loads(bytes(frame))  # wider heads are still well-formed CBOR
        start, end = buffer_range(frame)
        decoded = decode_frame(frame)
        assert_same(batch, decoded)
        for decoded_tensor in (decoded[1].value, *decoded[2].value[:1]):
            assert start <= decoded_tensor.data_ptr() < end  # no copy
            assert (decoded_tensor.data_ptr() - start) % align == 0


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


def test_small_vectors_get_memory_of_their_own() -> None:
    # Up to 1 KiB, a vector is copied out of the frame (cheaper than a view of it);
    # a larger one, or a small tensor of another rank, is a view of the frame.
    small, large, matrix = torch.arange(256.0), torch.arange(257.0), torch.ones(2, 2)
    frame = frame_bytes([Store(1, small), Store(2, large), Store(3, matrix)])
    start, end = buffer_range(frame)
    decoded = decode_frame(memoryview(frame))
    values = [message.value for message in decoded if isinstance(message, Store)]
    assert [torch.equal(a, b) for a, b in zip(values, (small, large, matrix), strict=True)] == [
        True,
        True,
        True,
    ]
    assert not start <= values[0].data_ptr() < end
    assert values[0]._base is None
    assert start <= values[1].data_ptr() < end
    assert start <= values[2].data_ptr() < end


def test_misaligned_buffer_is_copied() -> None:
    frame = frame_bytes([Store(1, torch.arange(16.0, dtype=torch.float64))])
    shifted = bytearray(1) + frame
    [store] = decode_frame(memoryview(shifted)[1:])
    assert isinstance(store, Store)
    assert store.value.data_ptr() % 8 == 0
    assert torch.equal(store.value, torch.arange(16.0, dtype=torch.float64))


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


def test_nesting_limit_is_shared_by_encoder_and_decoder() -> None:
    def nest(depth: int) -> list[Any]:
        value: list[Any] = []
        for _ in range(depth - 1):
            value = [value]
        return value

    decode_value(encode_value(nest(MAX_DEPTH)))
    with pytest.raises(ProtocolError):
        encode_value(nest(MAX_DEPTH + 1))
    rejects(b"\x81" * MAX_DEPTH + b"\x80")
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    with pytest.raises(ProtocolError):
        encode_value(cyclic)


def test_nesting_limit_counts_tensor_internals() -> None:
    # A list nested so deep that a tensor in it cannot fit: refused on both sides.
    value: Any = torch.ones(1)
    for _ in range(MAX_DEPTH - 3):
        value = [value]
    decode_value(encode_value(value))
    too_deep = [value]
    with pytest.raises(ProtocolError):
        encode_value(too_deep)
    rejects(b"\x81" + bytes(encode_value(value)))


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
    ]


@pytest.mark.parametrize("index", range(5))
def test_every_truncation_is_rejected(index: int) -> None:
    frame = bytes(valid_frames()[index])
    for end in range(len(frame)):
        with pytest.raises(ProtocolError):
            decode_frame(frame[:end])
        with pytest.raises(ProtocolError):
            decode_frame(bytearray(frame[:end]))


@pytest.mark.parametrize("index", range(5))
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
    # Past the frame envelope, to reach the message and value decoders.
    accepts_or_rejects(decode_frame, b"\x82\x01\x81" + raw)
    accepts_or_rejects(decode_frame, as_frame(raw))
    accepts_or_rejects(decode_value, b"\xd8\x28\x82" + raw)  # inside a tensor


def huge(head: int, n: int) -> bytes:
    return bytes([head]) + n.to_bytes(8, "big")


@pytest.mark.parametrize(
    ("item", "reason"),
    [
        (huge(0x9B, 2**60), "array of 1152921504606846976 items is longer"),
        (huge(0xBB, 2**60), "map of 1152921504606846976 pairs is longer"),
        (huge(0x5B, 2**62), "byte strings are not values"),
        (huge(0x7B, 2**62), "text string of 4611686018427387904 bytes is longer"),
        (huge(0x7B, 2**64 - 1) + b"abc", "is longer than the input"),
        # Tensors: a shape whose product overflows 64 bits, or huge lengths inside.
        (b"\xd8\x28\x82\x83" + huge(0x1B, 2**63) * 3 + b"\xd8\x55\x44abcd", "cannot hold 4 bytes"),
        (b"\xd8\x28\x82\x82" + huge(0x1B, 2**64 - 1) + b"\x00\xd8\x55\x40", "malformed"),
        (b"\xd8\x28\x82" + huge(0x9B, 2**60) + b"\xd8\x55\x40", "tensor shape of"),
        (
            b"\xd8\x28\x82\x81\x02\xd8\x55" + huge(0x5B, 2**62) + b"\x00" * 8,
            "typed array of 4611686018427387904 bytes is longer",
        ),
    ],
)
def test_huge_declared_lengths_are_rejected_at_once(item: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        decode_value(item)
    with pytest.raises(ProtocolError, match=reason):
        decode_frame(as_frame(item))


def test_deep_nesting_is_rejected() -> None:
    rejects(b"\x81" * 10_000 + b"\x00")
    rejects(as_frame(b"\x81" * 10_000 + b"\x00"))
    rejects(b"\xd9\xbe\xb5\x81" * 10_000 + b"\x00")  # nested tuples
    rejects(b"\xa1\x61a" * 10_000 + b"\x00")  # nested maps
    rejects(b"\xd9\xbe\xb6\x83" * 10_000 + b"\xf6\xf6\xf6")  # nested slices


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
    ],
)
def test_malformed_values_are_rejected(item: bytes) -> None:
    rejects(item)
    rejects(as_frame(item))


def grad_item(tensor: Any, requires_grad: bool, grad: Any) -> bytes:
    return cbor2.dumps(cbor2.CBORTag(48820, [tensor, requires_grad, grad]))


def rfc_tensor(shape: list[int], tag: int, raw: bytes) -> cbor2.CBORTag:
    return cbor2.CBORTag(40, [shape, cbor2.CBORTag(tag, raw)])


@pytest.mark.parametrize(
    "item",
    [
        grad_item(rfc_tensor([1], 78, b"\x01\x00\x00\x00"), True, None),  # int grad
        grad_item(rfc_tensor([1], 85, b"\x00" * 4), True, rfc_tensor([2], 85, b"\x00" * 8)),
        grad_item(rfc_tensor([1], 85, b"\x00" * 4), True, 1.0),
        grad_item(1.0, True, None),
        grad_item(rfc_tensor([1], 85, b"\x00" * 4), 1, None),
        cbor2.dumps(rfc_tensor([1.5], 85, b"\x00" * 4)),  # type: ignore[list-item]
        cbor2.dumps(rfc_tensor([-1], 85, b"\x00" * 4)),
        cbor2.dumps(cbor2.CBORTag(40, [[1], [1.0]])),  # plain array elements
        cbor2.dumps(cbor2.CBORTag(40, [[1], cbor2.CBORTag(85, b"\x00" * 4), 0])),
        cbor2.dumps(cbor2.CBORTag(40, [[0, 2**63], cbor2.CBORTag(85, b"")])),
    ],
)
def test_malformed_tensors_are_rejected(item: bytes) -> None:
    rejects(item)
    rejects(as_frame(item))


@pytest.mark.parametrize(
    "frame",
    [
        [2, []],  # unknown version
        [1, [], 0],
        [1],
        [True, []],
        [1, [[99, 1]]],  # unknown message code
        [1, [[1, 1]]],  # Store of 2 elements
        [1, [[1, True, 0]]],  # a bool id
        [1, [[1, -1, 0]]],  # a negative id
        [1, [[1, 1.0, 0]]],  # a float id
        [1, [[1, "1", 0]]],
        [1, [[2, 1, 5, [], {}]]],  # op not a str
        [1, [[2, 1, "op", cbor2.CBORTag(48821, []), {}]]],  # args not an array
        [1, [[2, 1, "op", [], []]]],  # kwargs not a map
        [1, [[2, 1, "op", [], {1: 2}]]],
        [1, [[3, 1, 2, 1]]],  # free not a bool
        [1, [[4, 1]]],  # ids not an array
        [1, [[4, [1, "2"]]]],
        [1, [[4, [1, True]]]],
        [1, [[17, 1, "remote", "E", None]]],
        [1, [{"code": 1}]],
        [1, [[16, 1, b"bytes"]]],
    ],
    ids=repr,
)
def test_malformed_frames_are_rejected(frame: Any) -> None:
    with pytest.raises(ProtocolError):
        decode_frame(cbor2.dumps(frame))


def test_pickle_is_rejected() -> None:
    for obj in [{"a": 1}, [1, 2, 3], torch.ones(2), Store(1, 2)]:
        rejects(pickle.dumps(obj))
