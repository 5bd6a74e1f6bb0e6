"""Frames split into size-limited messages and put together again (sans I/O)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fedtensor as ft
from fedtensor._chunks import START, WHOLE, Reassembler, split_frame


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
