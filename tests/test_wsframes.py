"""The sans-I/O websocket framing of :mod:`fedtensor.protocol.wsframes` (RFC 6455, section 5).

Frames are built here with :func:`header` and websockets' C ``apply_mask`` (or the module's
own :func:`masked`) and fed to a :class:`Parser` whole, byte by byte, in odd-sized pieces and
through its ``get_buffer``/``buffer_updated`` interface. Covered: round trips around the
header-length boundaries and the large-payload path that receives straight into the buffer
``allocate`` hands out, fragmentation, text, control frames, every protocol violation with
the close code it is owed, the masking helpers, and a property test over random traffic.
"""

from __future__ import annotations

import array
import copy
import random
import struct
from collections.abc import Iterator, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.speedups import apply_mask

from fedtensor.errors import ProtocolError
from fedtensor.protocol.wsframes import (
    DIRECT_THRESHOLD,
    Close,
    CloseCode,
    Event,
    Message,
    Opcode,
    Parser,
    Ping,
    Pong,
    Violation,
    close_frame,
    control_frame,
    header,
    masked,
    unmask,
)

KEY = b"\x9a\x0b\xfe\x13"
LIMIT = 1 << 24


def payload_of(size: int, seed: int = 0) -> bytes:
    """``size`` pseudo-random bytes, the same for the same arguments."""
    return random.Random(size * 7919 + seed).randbytes(size)


def frame(
    opcode: Opcode, payload: bytes, *, mask: bool, fin: bool = True, key: bytes = KEY
) -> bytes:
    """One whole frame, masked with ``key`` when ``mask``."""
    if not mask:
        return header(opcode, len(payload), fin=fin) + payload
    return header(opcode, len(payload), key, fin=fin) + apply_mask(payload, key)


def pieces(data: bytes, size: int) -> Iterator[bytes]:
    """``data`` cut into pieces of ``size`` bytes (the last one shorter)."""
    for start in range(0, len(data), size):
        yield data[start : start + size]


def feed_pieces(parser: Parser, data: bytes, size: int) -> None:
    for piece in pieces(data, size):
        parser.receive(piece)


def feed_via_buffer(parser: Parser, data: bytes, most: int) -> None:
    """Feed as an asyncio.BufferedProtocol is fed: at most ``most`` bytes per read."""
    source = memoryview(data)
    while source:
        target = parser.get_buffer()
        assert len(target) > 0
        n = min(len(target), len(source), most)
        target[:n] = source[:n]
        source = source[n:]
        parser.buffer_updated(n)


def messages(events: Sequence[Event]) -> list[tuple[bytes, bool]]:
    """``events``, which must all be messages, as (payload, text) pairs."""
    out = []
    for event in events:
        assert isinstance(event, Message), event
        out.append((bytes(event.data), event.text))
    return out


class Allocations:
    """An ``allocate`` that records its calls and keeps the buffers it handed out."""

    def __init__(self) -> None:
        self.lengths: list[int] = []
        self.buffers: list[bytearray] = []
        self.views: list[memoryview] = []

    def __call__(self, length: int) -> memoryview:
        buffer = bytearray(length)
        view = memoryview(buffer)
        self.lengths.append(length)
        self.buffers.append(buffer)
        self.views.append(view)
        return view


def violation(parser: Parser, data: bytes) -> CloseCode:
    """The close code of the :class:`Violation` that feeding ``data`` raises."""
    with pytest.raises(Violation) as raised:
        parser.receive(data)
    assert raised.value.reason
    assert str(raised.value) == raised.value.reason
    assert isinstance(raised.value, ProtocolError)  # in fedtensor's own hierarchy
    copied = copy.copy(raised.value)  # copyable, as pytest and tracebacks need
    assert (copied.code, copied.reason) == (raised.value.code, raised.value.reason)
    assert type(raised.value.code) is CloseCode
    return raised.value.code


# -- building frames ------------------------------------------------------------------------------


def test_header_encodes_each_length_form() -> None:
    assert header(Opcode.BINARY, 0) == b"\x82\x00"
    assert header(Opcode.BINARY, 125) == b"\x82\x7d"
    assert header(Opcode.BINARY, 126) == b"\x82\x7e\x00\x7e"
    assert header(Opcode.BINARY, 65535) == b"\x82\x7e\xff\xff"
    assert header(Opcode.BINARY, 65536) == b"\x82\x7f" + (65536).to_bytes(8, "big")
    assert header(Opcode.BINARY, 200_000) == b"\x82\x7f" + (200_000).to_bytes(8, "big")
    assert header(Opcode.TEXT, 3, fin=False) == b"\x01\x03"
    assert header(Opcode.CONTINUATION, 3) == b"\x80\x03"
    assert header(Opcode.BINARY, 5, KEY) == b"\x82\x85" + KEY
    assert header(Opcode.BINARY, 300, KEY) == b"\x82\xfe\x01\x2c" + KEY
    assert header(Opcode.BINARY, 70_000, KEY) == b"\x82\xff" + (70_000).to_bytes(8, "big") + KEY


def test_control_frame_masks_only_when_asked() -> None:
    assert control_frame(Opcode.PING, b"abc", mask=False) == b"\x89\x03abc"
    built = control_frame(Opcode.PONG, b"abc", mask=True)
    assert built[:2] == b"\x8a\x83"
    key = built[2:6]
    assert len(built) == 9
    assert apply_mask(built[6:], key) == b"abc"


def test_close_frame_cuts_a_long_reason_on_a_character_boundary() -> None:
    assert close_frame(CloseCode.NORMAL_CLOSURE, "bye", mask=False) == b"\x88\x05\x03\xe8bye"
    built = close_frame(CloseCode.GOING_AWAY, "é" * 100, mask=False)  # 200 bytes of UTF-8
    assert len(built) == 2 + 2 + 122  # 61 whole characters: 122 of the 123 bytes allowed
    parser = Parser(masked=False, max_message=LIMIT)
    parser.receive(built)
    assert parser.take_events() == [Close(CloseCode.GOING_AWAY, "é" * 61)]


# -- round trips ---------------------------------------------------------------------------------

SIZES = [0, 1, 125, 126, 65535, 65536, 200_000]
FEEDS = ["whole", "bytewise", "pieces-7", "pieces-1000", "pieces-65537", "buffer-4099"]
ROUND_TRIPS = [
    (size, mask, feed)
    for size in SIZES
    for mask in (False, True)
    for feed in FEEDS
    if feed != "bytewise" or size <= 126
]


def feed(parser: Parser, data: bytes, how: str) -> None:
    if how == "whole":
        parser.receive(data)
    elif how == "bytewise":
        feed_pieces(parser, data, 1)
    elif how.startswith("pieces-"):
        feed_pieces(parser, data, int(how.partition("-")[2]))
    else:
        assert how.startswith("buffer-")
        feed_via_buffer(parser, data, int(how.partition("-")[2]))


@pytest.mark.parametrize(("size", "mask", "how"), ROUND_TRIPS)
def test_a_binary_message_round_trips(size: int, mask: bool, how: str) -> None:
    payload = payload_of(size)
    allocations = Allocations()
    parser = Parser(masked=mask, max_message=LIMIT, allocate=allocations)
    feed(parser, frame(Opcode.BINARY, payload, mask=mask), how)
    events = parser.take_events()
    assert messages(events) == [(payload, False)]
    assert parser.take_events() == []
    # Exactly the payloads of DIRECT_THRESHOLD bytes or more go to allocate.
    assert allocations.lengths == ([size] if size >= DIRECT_THRESHOLD else [])


@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("how", ["whole", "pieces-3", "pieces-4097", "pieces-65536", "buffer-1"])
def test_messages_back_to_back_come_out_in_order(mask: bool, how: str) -> None:
    sizes = [0, 5, 70_000, 126, 125, 200_000, 3, 65535, 65536, 1]
    if how == "buffer-1":
        sizes = [0, 5, 126, 125, 3, 1, 300]  # one byte per read: keep it short
    payloads = [payload_of(size, seed) for seed, size in enumerate(sizes)]
    data = b"".join(frame(Opcode.BINARY, payload, mask=mask) for payload in payloads)
    parser = Parser(masked=mask, max_message=LIMIT)
    feed(parser, data, how)
    assert messages(parser.take_events()) == [(payload, False) for payload in payloads]


@pytest.mark.parametrize("mask", [False, True])
def test_many_medium_messages_through_the_receive_buffer(mask: bool) -> None:
    """Several MB of frames below DIRECT_THRESHOLD, in uneven reads: the buffer compacts."""
    rng = random.Random(2024)
    payloads = [payload_of(rng.randrange(0, DIRECT_THRESHOLD), seed) for seed in range(120)]
    data = b"".join(frame(Opcode.BINARY, payload, mask=mask) for payload in payloads)
    parser = Parser(masked=mask, max_message=LIMIT)
    position = 0
    while position < len(data):
        step = rng.choice((1, 2, 13, 4096, 30_001, 65535, 65536, 65537, 131_072))
        parser.receive(data[position : position + step])
        position += step
    assert messages(parser.take_events()) == [(payload, False) for payload in payloads]


def test_get_buffer_is_never_empty_and_reads_at_most_the_threshold() -> None:
    parser = Parser(masked=False, max_message=LIMIT)
    assert len(parser.get_buffer()) == DIRECT_THRESHOLD
    parser.receive(header(Opcode.BINARY, 1000) + b"x" * 10)  # a partial frame stays buffered
    assert len(parser.get_buffer()) == DIRECT_THRESHOLD
    parser.receive(b"x" * 990)
    assert messages(parser.take_events()) == [(b"x" * 1000, False)]


# -- the large-payload path -----------------------------------------------------------------------


@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("size", [DIRECT_THRESHOLD, 200_000, 1 << 20])
def test_a_large_message_lands_in_the_allocated_buffer(mask: bool, size: int) -> None:
    payload = payload_of(size)
    allocations = Allocations()
    parser = Parser(masked=mask, max_message=LIMIT, allocate=allocations)
    parser.receive(frame(Opcode.BINARY, payload, mask=mask))
    [event] = parser.take_events()
    assert isinstance(event, Message)
    assert allocations.lengths == [size]
    assert event.data is allocations.views[0]  # that very buffer, not a copy of it
    assert allocations.buffers[0] == payload  # unmasked where it landed
    assert not event.text


@pytest.mark.parametrize("mask", [False, True])
def test_get_buffer_hands_out_the_destination_of_a_large_payload(mask: bool) -> None:
    size = 300_000
    payload = payload_of(size)
    data = frame(Opcode.BINARY, payload, mask=mask)
    allocations = Allocations()
    parser = Parser(masked=mask, max_message=LIMIT, allocate=allocations)
    head = len(data) - size
    parser.receive(data[: head + 10])  # the header and the first 10 bytes of the payload
    assert allocations.lengths == [size]
    destination = allocations.buffers[0]
    assert destination[:10] == data[head : head + 10]  # copied there, still masked
    position = head + 10
    while position < len(data):
        target = parser.get_buffer()
        assert target.obj is destination  # the kernel would write straight into place
        assert len(target) == len(data) - position  # all of the rest, at once
        n = min(len(target), 77_777)
        target[:n] = data[position : position + n]
        position += n
        parser.buffer_updated(n)
    [event] = parser.take_events()
    assert isinstance(event, Message)
    assert event.data is allocations.views[0]
    assert destination == payload
    # Afterwards the parser reads into its own buffer again.
    assert parser.get_buffer().obj is not destination


def test_allocate_sees_every_earlier_message() -> None:
    """Each event is handed over before the next frame's header is even looked at."""
    log: list[object] = []

    def allocate(length: int) -> memoryview:
        log.append(("allocate", length))
        return memoryview(bytearray(length))

    def handle(event: Event) -> None:
        assert isinstance(event, Message)
        log.append(("message", len(event.data)))

    parser = Parser(masked=True, max_message=LIMIT, allocate=allocate, handle=handle)
    parser.receive(
        frame(Opcode.BINARY, b"first", mask=True)
        + frame(Opcode.BINARY, payload_of(100_000), mask=True)
        + frame(Opcode.BINARY, payload_of(70_000), mask=True)
    )
    assert log == [
        ("message", 5),
        ("allocate", 100_000),
        ("message", 100_000),
        ("allocate", 70_000),
        ("message", 70_000),
    ]


@pytest.mark.parametrize("mask", [False, True])
def test_large_fragments_and_text_do_not_use_allocate(mask: bool) -> None:
    first, second = payload_of(80_000, 1), payload_of(90_000, 2)
    text = ("ü" * 40_000).encode()
    allocations = Allocations()
    parser = Parser(masked=mask, max_message=LIMIT, allocate=allocations)
    parser.receive(
        frame(Opcode.BINARY, first, mask=mask, fin=False)
        + frame(Opcode.CONTINUATION, second, mask=mask)
        + frame(Opcode.TEXT, text, mask=mask)
    )
    assert messages(parser.take_events()) == [(first + second, False), (text, True)]
    assert allocations.lengths == []


# -- fragmentation and text -----------------------------------------------------------------------


@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("how", ["whole", "bytewise", "pieces-5"])
def test_fragments_are_joined(mask: bool, how: str) -> None:
    parts = [b"abc", b"", b"defgh", b"i" * 200]
    data = frame(Opcode.BINARY, parts[0], mask=mask, fin=False)
    data += b"".join(frame(Opcode.CONTINUATION, part, mask=mask, fin=False) for part in parts[1:-1])
    data += frame(Opcode.CONTINUATION, parts[-1], mask=mask)
    data += frame(Opcode.BINARY, b"after", mask=mask)
    parser = Parser(masked=mask, max_message=LIMIT)
    feed(parser, data, how)
    assert messages(parser.take_events()) == [(b"".join(parts), False), (b"after", False)]


@pytest.mark.parametrize("mask", [False, True])
def test_a_ping_between_fragments_comes_out_in_order(mask: bool) -> None:
    data = (
        frame(Opcode.BINARY, b"one-", mask=mask, fin=False)
        + frame(Opcode.PING, b"p1", mask=mask)
        + frame(Opcode.CONTINUATION, b"two-", mask=mask, fin=False)
        + frame(Opcode.PONG, b"p2", mask=mask)
        + frame(Opcode.CONTINUATION, b"three", mask=mask)
    )
    parser = Parser(masked=mask, max_message=LIMIT)
    parser.receive(data)
    events = parser.take_events()
    assert events[:2] == [Ping(b"p1"), Pong(b"p2")]
    assert messages(events[2:]) == [(b"one-two-three", False)]


@pytest.mark.parametrize("mask", [False, True])
def test_a_large_fragmented_message_is_joined(mask: bool) -> None:
    parts = [payload_of(70_000, 1), payload_of(3, 2), payload_of(100_000, 3)]
    data = (
        frame(Opcode.BINARY, parts[0], mask=mask, fin=False)
        + frame(Opcode.PING, b"", mask=mask)
        + frame(Opcode.CONTINUATION, parts[1], mask=mask, fin=False)
        + frame(Opcode.CONTINUATION, parts[2], mask=mask)
    )
    parser = Parser(masked=mask, max_message=LIMIT)
    feed_pieces(parser, data, 50_001)
    events = parser.take_events()
    assert events[0] == Ping(b"")
    assert messages(events[1:]) == [(b"".join(parts), False)]


@pytest.mark.parametrize("mask", [False, True])
def test_text_messages_are_delivered_as_text(mask: bool) -> None:
    parser = Parser(masked=mask, max_message=LIMIT)
    parser.receive(
        frame(Opcode.TEXT, "héllo".encode(), mask=mask)
        + frame(Opcode.TEXT, b"wor", mask=mask, fin=False)
        + frame(Opcode.CONTINUATION, b"ld", mask=mask)
        + frame(Opcode.TEXT, b"", mask=mask)
        + frame(Opcode.BINARY, b"bin", mask=mask)
    )
    assert messages(parser.take_events()) == [
        ("héllo".encode(), True),
        (b"world", True),
        (b"", True),
        (b"bin", False),
    ]


# -- control frames -------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [False, True])
def test_ping_and_pong_carry_their_payloads(mask: bool) -> None:
    parser = Parser(masked=mask, max_message=LIMIT)
    parser.receive(
        control_frame(Opcode.PING, b"hello", mask=mask)
        + control_frame(Opcode.PONG, b"", mask=mask)
        + control_frame(Opcode.PING, b"\x00" * 125, mask=mask)
        + control_frame(Opcode.PONG, bytes(range(125)), mask=mask)
    )
    events = parser.take_events()
    assert events == [Ping(b"hello"), Pong(b""), Ping(b"\x00" * 125), Pong(bytes(range(125)))]
    assert all(type(event.data) is bytes for event in events if isinstance(event, Ping | Pong))


@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize(
    ("code", "reason"),
    [(1000, "bye"), (1001, ""), (1011, "ünïcode"), (1014, "gateway"), (3000, "x"), (4999, "z")],
)
def test_a_close_frame_carries_its_code_and_reason(mask: bool, code: int, reason: str) -> None:
    parser = Parser(masked=mask, max_message=LIMIT)
    parser.receive(close_frame(code, reason, mask=mask))
    [event] = parser.take_events()
    assert event == Close(code, reason)
    assert isinstance(event, Close)
    # A registered code comes out as its CloseCode member; the rest as plain ints.
    assert type(event.code) is (CloseCode if code < 3000 else int)


@pytest.mark.parametrize("mask", [False, True])
def test_an_empty_close_frame_means_no_status_received(mask: bool) -> None:
    parser = Parser(masked=mask, max_message=LIMIT)
    parser.receive(control_frame(Opcode.CLOSE, b"", mask=mask))
    assert parser.take_events() == [Close(CloseCode.NO_STATUS_RCVD, "")]
    # And close_frame makes that empty frame for the code.
    assert close_frame(CloseCode.NO_STATUS_RCVD, "ignored", mask=False) == b"\x88\x00"


@pytest.mark.parametrize("mask", [False, True])
def test_a_one_byte_close_payload_is_a_violation(mask: bool) -> None:
    parser = Parser(masked=mask, max_message=LIMIT)
    assert (
        violation(parser, control_frame(Opcode.CLOSE, b"\x03", mask=mask))
        == CloseCode.PROTOCOL_ERROR
    )


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535])
def test_a_close_code_that_may_not_be_sent_is_a_violation(code: int) -> None:
    parser = Parser(masked=True, max_message=LIMIT)
    payload = struct.pack(">H", code) + b"why"
    assert (
        violation(parser, control_frame(Opcode.CLOSE, payload, mask=True))
        == CloseCode.PROTOCOL_ERROR
    )


@pytest.mark.parametrize("reason", [b"\xff", b"ok\xc3", b"\xed\xa0\x80"])
def test_a_close_reason_that_is_not_utf8_is_a_violation(reason: bytes) -> None:
    parser = Parser(masked=False, max_message=LIMIT)
    payload = struct.pack(">H", 1000) + reason
    assert (
        violation(parser, control_frame(Opcode.CLOSE, payload, mask=False))
        == CloseCode.INVALID_DATA
    )


# -- violations -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bit", [0x40, 0x20, 0x10])
@pytest.mark.parametrize("opcode", [Opcode.BINARY, Opcode.PING])
def test_reserved_bits_are_a_violation(bit: int, opcode: Opcode) -> None:
    parser = Parser(masked=True, max_message=LIMIT)
    data = bytearray(frame(opcode, b"abc", mask=True))
    data[0] |= bit
    assert violation(parser, bytes(data)) == CloseCode.PROTOCOL_ERROR


@pytest.mark.parametrize("opcode", [0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_an_unknown_opcode_is_a_violation(opcode: int) -> None:
    parser = Parser(masked=False, max_message=LIMIT)
    assert violation(parser, bytes((0x80 | opcode, 0))) == CloseCode.PROTOCOL_ERROR


@pytest.mark.parametrize("opcode", [Opcode.BINARY, Opcode.PING, Opcode.CLOSE])
def test_a_server_refuses_an_unmasked_frame(opcode: Opcode) -> None:
    parser = Parser(masked=True, max_message=LIMIT)
    assert violation(parser, header(opcode, 0)) == CloseCode.PROTOCOL_ERROR


@pytest.mark.parametrize("opcode", [Opcode.BINARY, Opcode.PONG, Opcode.CLOSE])
def test_a_client_refuses_a_masked_frame(opcode: Opcode) -> None:
    parser = Parser(masked=False, max_message=LIMIT)
    assert violation(parser, header(opcode, 0, KEY)) == CloseCode.PROTOCOL_ERROR


@pytest.mark.parametrize("opcode", [Opcode.PING, Opcode.PONG, Opcode.CLOSE])
def test_a_fragmented_control_frame_is_a_violation(opcode: Opcode) -> None:
    parser = Parser(masked=True, max_message=LIMIT)
    assert violation(parser, header(opcode, 2, KEY, fin=False)) == CloseCode.PROTOCOL_ERROR


@pytest.mark.parametrize("opcode", [Opcode.PING, Opcode.PONG, Opcode.CLOSE])
@pytest.mark.parametrize("length", [126, 65536])
def test_a_control_frame_over_125_bytes_is_a_violation(opcode: Opcode, length: int) -> None:
    parser = Parser(masked=False, max_message=LIMIT)
    assert (
        violation(parser, header(opcode, length)) == CloseCode.PROTOCOL_ERROR
    )  # on the header alone


@pytest.mark.parametrize("mask", [False, True])
def test_a_continuation_without_a_start_is_a_violation(mask: bool) -> None:
    parser = Parser(masked=mask, max_message=LIMIT)
    parser.receive(frame(Opcode.BINARY, b"whole", mask=mask))  # a finished message is no start
    assert messages(parser.take_events()) == [(b"whole", False)]
    assert (
        violation(parser, frame(Opcode.CONTINUATION, b"more", mask=mask))
        == CloseCode.PROTOCOL_ERROR
    )


@pytest.mark.parametrize("opcode", [Opcode.BINARY, Opcode.TEXT])
def test_a_new_message_during_a_fragmented_one_is_a_violation(opcode: Opcode) -> None:
    parser = Parser(masked=True, max_message=LIMIT)
    parser.receive(frame(Opcode.BINARY, b"start", mask=True, fin=False))
    assert violation(parser, frame(opcode, b"again", mask=True)) == CloseCode.PROTOCOL_ERROR
    assert parser.take_events() == []


@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("length", [101, 126, 65536, 200_000, 1 << 40])
def test_a_message_over_the_limit_is_refused_on_its_header(mask: bool, length: int) -> None:
    allocations = Allocations()
    parser = Parser(masked=mask, max_message=100, allocate=allocations)
    head = header(Opcode.BINARY, length, KEY if mask else None)
    # Every byte of the header but the last is not enough to judge.
    parser.receive(head[:-1])
    with pytest.raises(Violation) as raised:
        parser.receive(head[-1:])  # no payload byte has arrived
    assert raised.value.code == CloseCode.MESSAGE_TOO_BIG
    assert allocations.lengths == []
    assert parser.take_events() == []


@pytest.mark.parametrize("mask", [False, True])
def test_a_large_message_over_the_limit_never_reaches_allocate(mask: bool) -> None:
    allocations = Allocations()
    parser = Parser(masked=mask, max_message=DIRECT_THRESHOLD * 2, allocate=allocations)
    payload = payload_of(DIRECT_THRESHOLD * 2 + 1)
    assert violation(parser, frame(Opcode.BINARY, payload, mask=mask)) == CloseCode.MESSAGE_TOO_BIG
    assert allocations.lengths == []


@pytest.mark.parametrize("mask", [False, True])
def test_a_message_of_exactly_the_limit_is_accepted(mask: bool) -> None:
    for size in (100, 70_000):
        parser = Parser(masked=mask, max_message=size)
        payload = payload_of(size)
        parser.receive(frame(Opcode.BINARY, payload, mask=mask))
        assert messages(parser.take_events()) == [(payload, False)]


@pytest.mark.parametrize("mask", [False, True])
def test_fragments_whose_total_crosses_the_limit_are_refused(mask: bool) -> None:
    parser = Parser(masked=mask, max_message=100)
    parser.receive(frame(Opcode.BINARY, b"a" * 60, mask=mask, fin=False))
    parser.receive(frame(Opcode.CONTINUATION, b"b" * 40, mask=mask, fin=False))  # 100: still fine
    parser.receive(frame(Opcode.PING, b"x" * 50, mask=mask))  # control frames do not count
    assert parser.take_events() == [Ping(b"x" * 50)]
    head = header(Opcode.CONTINUATION, 1, KEY if mask else None)
    assert violation(parser, head) == CloseCode.MESSAGE_TOO_BIG  # on the header: 101 bytes in all
    assert parser.take_events() == []


def test_a_fragmented_large_message_over_the_limit_is_refused_before_its_payload() -> None:
    allocations = Allocations()
    parser = Parser(masked=False, max_message=150_000, allocate=allocations)
    parser.receive(frame(Opcode.BINARY, payload_of(100_000), mask=False, fin=False))
    assert violation(parser, header(Opcode.CONTINUATION, 50_001)) == CloseCode.MESSAGE_TOO_BIG
    assert allocations.lengths == []


@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("length", [1 << 63, (1 << 64) - 1])
def test_a_64_bit_length_with_its_top_bit_set_is_a_violation(mask: bool, length: int) -> None:
    parser = Parser(masked=mask, max_message=LIMIT)
    data = bytes((0x82, (0x80 if mask else 0) | 127)) + length.to_bytes(8, "big")
    assert violation(parser, data + (KEY if mask else b"")) == CloseCode.PROTOCOL_ERROR


# -- masking --------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 3, 4, 5, 1021, (1 << 20) + 3])
def test_masked_in_place_on_a_bytearray_masks_it_in_place(size: int) -> None:
    original = payload_of(size)
    buffer = bytearray(original)
    result = masked(buffer, KEY, in_place=True)
    assert isinstance(result, memoryview)
    assert result.obj is buffer
    assert buffer == apply_mask(original, KEY)
    assert bytes(result) == bytes(buffer)


@pytest.mark.parametrize("size", [0, 7, (1 << 20) + 1])
def test_masked_on_read_only_bytes_returns_a_masked_copy(size: int) -> None:
    original = payload_of(size)
    result = masked(original, KEY, in_place=True)
    assert bytes(result) == apply_mask(original, KEY)
    assert original == payload_of(size)  # untouched (bytes cannot change, but say it)
    readonly = memoryview(bytearray(original)).toreadonly()
    result = masked(readonly, KEY, in_place=True)
    assert bytes(result) == apply_mask(original, KEY)
    assert bytes(readonly) == original


def test_masked_without_in_place_copies_a_writable_buffer() -> None:
    original = payload_of(1001)
    buffer = bytearray(original)
    result = masked(buffer, KEY, in_place=False)
    assert bytes(result) == apply_mask(original, KEY)
    assert buffer == original


def test_masked_works_on_the_bytes_of_a_typed_buffer() -> None:
    values = array.array("i", range(-50, 51))
    original = values.tobytes()
    result = masked(memoryview(values), KEY, in_place=True)
    assert bytes(result) == apply_mask(original, KEY)
    assert values.tobytes() == apply_mask(original, KEY)


@pytest.mark.parametrize("size", [0, 1, 2, 3, 5, 6, 7, 9, 4093, (1 << 20) + 3, 1 << 20])
def test_unmask_twice_restores_the_data(size: int) -> None:
    original = payload_of(size)
    buffer = bytearray(original)
    view = memoryview(buffer)
    unmask(view, KEY)
    assert buffer == apply_mask(original, KEY)
    if size >= 4:
        assert buffer != original
    unmask(view, KEY)
    assert buffer == original


def test_unmask_of_a_slice_changes_only_the_slice() -> None:
    original = payload_of(1 << 20)
    buffer = bytearray(original)
    unmask(memoryview(buffer)[5 : (1 << 20) - 2], KEY)
    assert buffer[:5] == original[:5]
    assert buffer[-2:] == original[-2:]
    assert buffer[5:-2] == apply_mask(original[5:-2], KEY)


def test_frames_built_with_masked_parse_back() -> None:
    payload = payload_of(100_003)
    body = masked(bytearray(payload), KEY, in_place=True)
    parser = Parser(masked=True, max_message=LIMIT)
    parser.receive(header(Opcode.BINARY, len(payload), KEY) + bytes(body))
    assert messages(parser.take_events()) == [(payload, False)]


# -- delivery -------------------------------------------------------------------------------------


def test_handle_gets_each_event_as_it_is_parsed() -> None:
    seen: list[Event] = []
    parser = Parser(masked=True, max_message=LIMIT, handle=seen.append)
    parser.receive(frame(Opcode.BINARY, b"a", mask=True))
    assert messages(seen) == [(b"a", False)]
    second = frame(Opcode.PING, b"p", mask=True) + frame(Opcode.BINARY, b"bc", mask=True)
    parser.receive(second + frame(Opcode.BINARY, b"def", mask=True)[:3])  # a partial third
    assert seen[1] == Ping(b"p")
    assert messages(seen[2:]) == [(b"bc", False)]
    parser.receive(frame(Opcode.BINARY, b"def", mask=True)[3:])
    parser.receive(close_frame(CloseCode.NORMAL_CLOSURE, "done", mask=True))
    assert len(seen) == 5
    assert messages(seen[3:4]) == [(b"def", False)]
    assert seen[4] == Close(CloseCode.NORMAL_CLOSURE, "done")
    assert parser.events == []  # with handle, nothing collects


def test_without_handle_events_collect_until_taken() -> None:
    parser = Parser(masked=False, max_message=LIMIT)
    parser.receive(frame(Opcode.BINARY, b"1", mask=False) + frame(Opcode.PONG, b"2", mask=False))
    assert len(parser.events) == 2
    taken = parser.take_events()
    assert taken[1] == Pong(b"2")
    assert parser.events == []
    assert parser.take_events() == []


def test_an_event_raised_by_handle_stops_the_parse() -> None:
    def handle(event: Event) -> None:
        raise RuntimeError("refused")

    parser = Parser(masked=False, max_message=LIMIT, handle=handle)
    with pytest.raises(RuntimeError, match="refused"):
        parser.receive(frame(Opcode.BINARY, b"x", mask=False))


# -- a property -----------------------------------------------------------------------------------


@st.composite
def traffic(draw: st.DrawFn) -> tuple[bool, list[bytes], bytes]:
    """A parser side, payloads, and the bytes on the wire (some payloads in two fragments)."""
    mask = draw(st.booleans())
    payloads = draw(st.lists(st.binary(max_size=3000), max_size=8))
    wire = bytearray()
    for payload in payloads:
        cut = draw(st.integers(0, len(payload)))
        fragmented = draw(st.booleans()) and len(payload) > 0
        key = draw(st.binary(min_size=4, max_size=4))
        if fragmented:
            wire += frame(Opcode.BINARY, payload[:cut], mask=mask, fin=False, key=key)
            wire += frame(Opcode.CONTINUATION, payload[cut:], mask=mask, key=key)
        else:
            wire += frame(Opcode.BINARY, payload, mask=mask, key=key)
    return mask, payloads, bytes(wire)


@given(traffic(), st.data())
@settings(max_examples=200, deadline=None)
def test_any_split_of_the_traffic_gives_the_same_payloads(
    sent: tuple[bool, list[bytes], bytes], data: st.DataObject
) -> None:
    mask, payloads, wire = sent
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=20)))
    parser = Parser(masked=mask, max_message=LIMIT)
    previous = 0
    for cut in [*cuts, len(wire)]:
        parser.receive(wire[previous:cut])
        previous = cut
    assert messages(parser.take_events()) == [(payload, False) for payload in payloads]


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=2000),
    st.booleans(),
    st.lists(st.integers(min_value=1, max_value=300), max_size=20),
)
def test_arbitrary_bytes_give_events_or_a_violation_and_nothing_else(
    data: bytes, masked_side: bool, cuts: list[int]
) -> None:
    # The parser is the trust boundary of a worker: any input ends in events or a
    # Violation (closed with its code), and never allocates more than max_message.
    allocated: list[int] = []

    def allocate(length: int) -> memoryview:
        allocated.append(length)
        return memoryview(bytearray(length))

    parser = Parser(masked=masked_side, max_message=512, allocate=allocate)
    pieces, position = [], 0
    for cut in cuts:
        pieces.append(data[position : position + cut])
        position += cut
    pieces.append(data[position:])
    code = None
    try:
        for piece in pieces:
            parser.receive(piece)
    except Violation as exc:
        code = exc.code
    assert code in (
        None,
        CloseCode.PROTOCOL_ERROR,
        CloseCode.INVALID_DATA,
        CloseCode.MESSAGE_TOO_BIG,
    )
    assert all(length <= 512 for length in allocated)
    for event in parser.take_events():
        if isinstance(event, Message):
            assert len(event.data) <= 512
