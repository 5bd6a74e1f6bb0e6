"""Frames split into size-limited messages and put together again (sans I/O)."""

from __future__ import annotations

import ctypes
import gc
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fedtensor as ft
from fedtensor.protocol.chunks import START, WHOLE, Reassembler, split_frame
from fedtensor.protocol.codec import decode_frame, encode_frame, frame_bytes
from fedtensor.protocol.messages import Reply, Store
from fedtensor.protocol.pool import BufferPool, pooled_copy


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.binary(max_size=300), min_size=1, max_size=5),
    st.integers(min_value=10, max_value=400),
)
def test_split_and_reassemble_round_trip(chunks: list[bytes], max_message: int) -> None:
    messages = [bytes(m) for m in split_frame(chunks, max_message)]
    assert all(len(m) <= max_message for m in messages)
    reassembler = Reassembler(max_frame=10_000)
    frames = [reassembler.feed(m) for m in messages]
    assert all(frame is None for frame in frames[:-1])
    assert frames[-1] is not None
    assert bytes(frames[-1]) == b"".join(chunks)
    assert reassembler.pending == 0


def test_small_frames_travel_whole_and_large_ones_split_without_copies() -> None:
    assert [bytes(m) for m in split_frame([b"ab", b"c"], 10)] == [bytes([WHOLE]) + b"abc"]
    payload = bytearray(b"x" * 25)
    messages = list(split_frame([payload], 10))
    assert bytes(messages[0]) == bytes([START]) + (25).to_bytes(8, "big")
    assert [len(m) for m in messages[1:]] == [10, 10, 5]
    payload[0] = ord("y")  # the data messages are views of the payload itself
    assert bytes(messages[1])[0] == ord("y")


def test_reassembled_frame_is_a_writable_buffer() -> None:
    reassembler = Reassembler(max_frame=100)
    messages = list(split_frame([b"a" * 50], 20))
    frames = [reassembler.feed(m) for m in messages]
    frame = frames[-1]
    assert isinstance(frame, memoryview)
    assert not frame.readonly
    assert bytes(frame) == b"a" * 50


@pytest.mark.parametrize(
    ("messages", "error", "words"),
    [
        ([b""], ft.ProtocolError, "empty"),
        ([b"\x07"], ft.ProtocolError, "unknown message kind"),
        ([b"\x01" + (5).to_bytes(8, "big") + b"x"], ft.ProtocolError, "9 bytes"),
        ([b"\x01" + (0).to_bytes(8, "big")], ft.ProtocolError, "empty"),
        ([b"\x01" + (4).to_bytes(8, "big"), b"abcdef"], ft.ProtocolError, "more bytes"),
        ([b"\x01" + (1 << 62).to_bytes(8, "big")], ft.LimitExceeded, "exceeds the limit"),
        ([b"\x00" + b"x" * 101], ft.LimitExceeded, "exceeds the limit of 100"),
    ],
)
def test_bad_messages(messages: list[bytes], error: type[Exception], words: str) -> None:
    reassembler = Reassembler(max_frame=100)
    *accepted, refused = messages
    for message in accepted:
        assert reassembler.feed(message) is None
    with pytest.raises(error, match=words):
        reassembler.feed(refused)


# -- destinations and the buffer pool -------------------------------------------------------------


def test_a_data_message_received_in_place_is_not_copied() -> None:
    reassembler = Reassembler(max_frame=1000)
    assert reassembler.destination(4) is None  # no split frame in progress
    assert reassembler.feed(bytes([START]) + (6).to_bytes(8, "big")) is None
    place = reassembler.destination(4)
    assert place is not None
    place[:] = b"abcd"  # as the kernel would write it
    assert reassembler.feed(place) is None
    assert reassembler.pending == 2
    assert reassembler.destination(3) is None  # more than the frame has room for
    frame = reassembler.feed(b"ef")
    assert frame is not None
    assert bytes(frame) == b"abcdef"


def test_a_split_frame_decodes_in_place_in_its_reassembled_buffer() -> None:
    # End to end: the codec's chunks (heads, the tensors' own memory, the messages)
    # split into messages, put together again, and decoded over the frame's buffer.
    tensors = [torch.arange(3000.0), torch.ones(50, 40, dtype=torch.float64)]
    chunks = encode_frame([Store(1, tensors[0]), Reply(2, {"w": tensors[1], "n": 7})])
    messages = [bytes(m) for m in split_frame(chunks, 1000)]
    assert len(messages) > 2  # split: a header, then data messages of raw bytes
    reassembler = Reassembler(max_frame=1 << 20)
    frames = [reassembler.feed(m) for m in messages]
    frame = frames[-1]
    assert frame is not None
    assert all(f is None for f in frames[:-1])
    store, reply = decode_frame(frame)
    assert isinstance(store, Store)
    assert isinstance(reply, Reply)
    assert torch.equal(store.value, tensors[0])
    assert torch.equal(reply.value["w"], tensors[1])
    assert reply.value["n"] == 7
    start = address(frame)
    for decoded in (store.value, reply.value["w"]):
        assert start <= decoded.data_ptr() < start + len(frame)  # no copy


def address(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def test_pooled_buffer_comes_back_when_the_last_tensor_over_it_dies() -> None:
    pool = BufferPool(min_size=64, max_bytes=1 << 20)
    tensor = torch.arange(1024.0)  # not small: decoded as a view of the frame
    view = pool.take(len(frame_bytes([Store(1, tensor)])))
    view[:] = frame_bytes([Store(1, tensor)])
    [store] = decode_frame(view)
    assert isinstance(store, Store)
    address = store.value.data_ptr()
    del view
    gc.collect()
    assert pool.held == 0  # the decoded tensor still uses the memory
    assert torch.equal(store.value, tensor)
    size = store.value.untyped_storage().nbytes()
    del store
    gc.collect()
    assert pool.held > 0
    again = pool.take(len(frame_bytes([Store(1, tensor)])))
    assert pool.held == 0
    [other] = decode_frame(again)  # the same memory, read again
    assert isinstance(other, Store)
    assert other.value.data_ptr() == address
    assert size > 0


def test_pool_keeps_at_most_max_bytes_and_serves_small_sizes_fresh() -> None:
    pool = BufferPool(min_size=100, max_bytes=250)
    views = [pool.take(100) for _ in range(3)]
    small = pool.take(10)
    del views, small
    gc.collect()
    assert pool.held == 200  # the third buffer would pass 250
    pool.clear()
    assert pool.held == 0


def test_pool_takes_buffers_back_from_other_threads() -> None:
    pool = BufferPool(min_size=16, max_bytes=1 << 20)
    views = [pool.take(32) for _ in range(8)]
    done = threading.Event()

    def drop() -> None:
        views.clear()
        gc.collect()
        done.set()

    thread = threading.Thread(target=drop)
    thread.start()
    assert done.wait(10)
    thread.join(10)
    assert pool.held == 8 * 32


@pytest.mark.parametrize(
    "tensor",
    [
        torch.arange(300_000.0).reshape(600, 500),
        torch.arange(300_000.0).reshape(600, 500).t(),  # not contiguous
        torch.ones(300_000, dtype=torch.bool),
        torch.arange(10.0),  # small: a plain clone
    ],
    ids=["matrix", "transposed", "bool", "small"],
)
def test_pooled_copy_is_an_independent_copy(tensor: torch.Tensor) -> None:
    copy = pooled_copy(tensor)
    assert torch.equal(copy, tensor)
    assert copy.dtype == tensor.dtype
    assert copy._base is None
    assert copy.untyped_storage().data_ptr() != tensor.untyped_storage().data_ptr()
    before = tensor.clone()
    copy.zero_()
    assert torch.equal(tensor, before)
