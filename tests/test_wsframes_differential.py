"""fedtensor's websocket framing against the reference implementation, ``websockets``.

tests/test_wsframes.py builds its frames with fedtensor's own :func:`header`, so a mistake
shared by the builder and the parser would pass there. Here the other side of every
exchange is the ``websockets`` library (the one the tests' raw clients use):

1. Frames written by websockets' ``Frame(...).serialize(mask=..., extensions=[])``
   (masked as a client writes them, unmasked as a server does; fragmented messages;
   pings, pongs and a close between fragments; payload lengths around 125/126, 65535/65536
   and the parser's large-payload threshold), cut into arbitrary reads, are parsed by
   fedtensor's :class:`Parser` into the events they stand for.
2. Every frame fedtensor writes (the builders, a client's and a worker's data messages as
   :class:`WebSocketPeer` writes them, and the control frames of the connection's state
   machine) is parsed by websockets (``Frame.parse`` over a ``StreamReader``, and the
   sans-I/O ``Protocol``) into the same opcode, payload and fin.
3. A stream with one fault in it is refused by both with the same close code.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.frames import Close as WsClose
from websockets.frames import Frame
from websockets.frames import Opcode as WsOpcode
from websockets.protocol import Protocol, Side, State
from websockets.streams import StreamReader

from fedtensor.net.peer import WebSocketPeer
from fedtensor.protocol.chunks import split_frame
from fedtensor.protocol.wsconnection import Connection, Send, SendAfterQueued
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
)

LIMIT = 1 << 24

#: Payload lengths where the header changes form (125/126, 65535/65536) and where
#: fedtensor's parser switches to receiving in place (DIRECT_THRESHOLD).
BOUNDARIES = sorted(
    {0, 1, 124, 125, 126, 127, 65534, 65535, 65536, 65537, DIRECT_THRESHOLD - 1}
    | {DIRECT_THRESHOLD, DIRECT_THRESHOLD + 1, 200_003}
)

#: Close codes websockets may send (its EXTERNAL_CLOSE_CODES) and a few of the 3000-4999.
SENDABLE_CODES = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014]
SENDABLE_CODES += [3000, 3999, 4000, 4999]


def payload_of(size: int, seed: int) -> bytes:
    return random.Random(seed * 1_000_003 + size).randbytes(size)


def serialize(opcode: WsOpcode, data: bytes, *, mask: bool, fin: bool = True) -> bytes:
    """A frame as websockets writes it."""
    return Frame(opcode, data, fin=fin).serialize(mask=mask, extensions=[])


def fedtensor_events(wire: bytes, *, masked_side: bool, cuts: list[int]) -> list[object]:
    """The events fedtensor's parser makes of ``wire`` fed in pieces cut at ``cuts``,
    messages as (payload, text) pairs."""
    parser = Parser(masked=masked_side, max_message=LIMIT)
    previous = 0
    for cut in [*sorted(cuts), len(wire)]:
        parser.receive(wire[previous:cut])
        previous = cut
    return [_comparable(event) for event in parser.take_events()]


def _comparable(event: Event) -> object:
    if isinstance(event, Message):
        return (bytes(event.data), event.text)
    return event


def websockets_frames(wire: bytes, *, masked_side: bool) -> list[Frame]:
    """The frames websockets' own parser reads from ``wire`` (which must hold whole frames)."""
    reader = StreamReader()
    reader.feed_data(wire)
    frames = []
    while reader.buffer:
        parse = Frame.parse(reader.read_exact, mask=masked_side, max_size=None, extensions=[])
        try:
            next(parse)
        except StopIteration as done:
            frames.append(done.value)
        else:
            raise AssertionError("websockets wants more bytes than a whole frame")
    return frames


def websockets_protocol(wire: bytes, *, written_by_client: bool) -> tuple[Protocol, list[Frame]]:
    """websockets' sans-I/O connection on the receiving end of ``wire``, and its frames."""
    protocol = Protocol(
        Side.SERVER if written_by_client else Side.CLIENT, state=State.OPEN, max_size=None
    )
    protocol.receive_data(wire)
    frames = []
    for event in protocol.events_received():
        assert isinstance(event, Frame)  # once open, its events are frames
        frames.append(event)
    return protocol, frames


# -- 1. websockets writes, fedtensor reads ---------------------------------------------------------


@st.composite
def websockets_traffic(draw: st.DrawFn) -> tuple[bool, bytes, list[object]]:
    """Whether it is masked, the bytes websockets writes, and the events they stand for."""
    mask = draw(st.booleans())
    wire = bytearray()
    expected: list[object] = []

    def controls() -> None:
        # Control frames may come between any two frames, fragments included.
        for kind in draw(st.lists(st.sampled_from([WsOpcode.PING, WsOpcode.PONG]), max_size=2)):
            data = draw(st.binary(max_size=125))
            wire.extend(serialize(kind, data, mask=mask))
            expected.append(Ping(data) if kind is WsOpcode.PING else Pong(data))

    for _ in range(draw(st.integers(0, 4))):
        if draw(st.booleans()):
            payload = draw(st.binary(max_size=300))
        else:
            payload = payload_of(draw(st.sampled_from(BOUNDARIES)), draw(st.integers(0, 99)))
        text = draw(st.booleans())
        cuts = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=3)))
        pieces = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)], strict=True)]
        for index, piece in enumerate(pieces):
            opcode = (WsOpcode.TEXT if text else WsOpcode.BINARY) if index == 0 else WsOpcode.CONT
            last = index == len(pieces) - 1
            wire += serialize(opcode, piece, mask=mask, fin=last)
            if last:
                expected.append((payload, text))
            controls()
    controls()
    if draw(st.booleans()):
        code = draw(st.sampled_from(SENDABLE_CODES))
        reason = draw(st.text(max_size=30))
        wire += serialize(WsOpcode.CLOSE, WsClose(code, reason).serialize(), mask=mask)
        expected.append(Close(code, reason))
    return mask, bytes(wire), expected


@given(websockets_traffic(), st.data())
@settings(max_examples=150, deadline=None)
def test_fedtensor_parses_what_websockets_writes(
    traffic: tuple[bool, bytes, list[object]], data: st.DataObject
) -> None:
    mask, wire, expected = traffic
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=12), label="cuts")
    assert fedtensor_events(wire, masked_side=mask, cuts=cuts) == expected


@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("size", BOUNDARIES)
@pytest.mark.parametrize("opcode", [WsOpcode.BINARY, WsOpcode.TEXT])
def test_each_length_boundary_whole_and_fragmented(mask: bool, size: int, opcode: WsOpcode) -> None:
    payload = payload_of(size, 1)
    whole = serialize(opcode, payload, mask=mask)
    # The same payload as three fragments, a ping between the first two.
    cut1, cut2 = size // 3, 2 * size // 3
    fragmented = (
        serialize(opcode, payload[:cut1], mask=mask, fin=False)
        + serialize(WsOpcode.PING, b"between", mask=mask)
        + serialize(WsOpcode.CONT, payload[cut1:cut2], mask=mask, fin=False)
        + serialize(WsOpcode.CONT, payload[cut2:], mask=mask)
    )
    text = opcode is WsOpcode.TEXT
    for cuts in ([], [1], [2, 3, 5, 9, 14], list(range(0, len(whole), 4097))):
        assert fedtensor_events(whole, masked_side=mask, cuts=cuts) == [(payload, text)]
        assert fedtensor_events(fragmented, masked_side=mask, cuts=cuts) == [
            Ping(b"between"),
            (payload, text),
        ]


@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("code", [*SENDABLE_CODES, None])
def test_fedtensor_reads_websockets_close_frames(mask: bool, code: int | None) -> None:
    data = b"" if code is None else WsClose(code, "réason").serialize()
    events = fedtensor_events(serialize(WsOpcode.CLOSE, data, mask=mask), masked_side=mask, cuts=[])
    assert events == [
        Close(CloseCode.NO_STATUS_RCVD, "") if code is None else Close(code, "réason")
    ]


# -- 2. fedtensor writes, websockets reads ---------------------------------------------------------


def fedtensor_data_frame(payload: bytes, *, mask: bool, fin: bool, opcode: Opcode) -> bytes:
    """A data frame as fedtensor's peer writes one (header, then the payload masked once)."""
    if not mask:
        return header(opcode, len(payload), fin=fin) + payload
    key = random.Random(len(payload)).randbytes(4)
    body = masked(bytearray(payload), key, in_place=True)
    return header(opcode, len(payload), key, fin=fin) + bytes(body)


@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("size", BOUNDARIES)
def test_websockets_parses_fedtensor_data_frames(mask: bool, size: int) -> None:
    payload = payload_of(size, 2)
    wire = fedtensor_data_frame(payload, mask=mask, fin=False, opcode=Opcode.BINARY)
    wire += fedtensor_data_frame(b"end", mask=mask, fin=True, opcode=Opcode.CONTINUATION)
    frames = websockets_frames(wire, masked_side=mask)
    assert [(f.opcode, bytes(f.data), f.fin) for f in frames] == [
        (WsOpcode.BINARY, payload, False),
        (WsOpcode.CONT, b"end", True),
    ]
    protocol, received = websockets_protocol(wire, written_by_client=mask)
    assert protocol.parser_exc is None
    assert [bytes(f.data) for f in received] == [payload, b"end"]


@given(
    st.sampled_from([Opcode.PING, Opcode.PONG]),
    st.binary(max_size=125),
    st.booleans(),
)
@settings(max_examples=100, deadline=None)
def test_websockets_parses_fedtensor_control_frames(
    opcode: Opcode, payload: bytes, mask: bool
) -> None:
    [frame] = websockets_frames(control_frame(opcode, payload, mask=mask), masked_side=mask)
    assert (frame.opcode, bytes(frame.data), frame.fin) == (WsOpcode(opcode), payload, True)


@given(st.sampled_from(SENDABLE_CODES), st.text(max_size=200), st.booleans())
@settings(max_examples=100, deadline=None)
def test_websockets_parses_fedtensor_close_frames(code: int, reason: str, mask: bool) -> None:
    wire = close_frame(code, reason, mask=mask)
    [frame] = websockets_frames(wire, masked_side=mask)
    assert frame.opcode is WsOpcode.CLOSE
    parsed = WsClose.parse(bytes(frame.data))
    assert parsed.code == code
    # A long reason is cut on a character boundary to fit the 125-byte control frame.
    assert reason.startswith(parsed.reason)
    assert len(parsed.reason.encode()) <= 123
    assert parsed.reason == reason or len(reason.encode()) > 123


def test_websockets_reads_an_empty_close_frame_as_no_status() -> None:
    [frame] = websockets_frames(
        close_frame(CloseCode.NO_STATUS_RCVD, "", mask=True), masked_side=True
    )
    assert WsClose.parse(bytes(frame.data)).code == CloseCode.NO_STATUS_RCVD


class _Transport:
    """Collects what a peer writes."""

    def __init__(self) -> None:
        self.written = bytearray()

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str) -> None:
        return None


def _peer(client: bool, max_message: int) -> tuple[WebSocketPeer, _Transport]:
    class Peer(WebSocketPeer):
        def frame_received(self, frame: memoryview) -> None:
            raise AssertionError("nothing is sent to it")

    Peer.client = client
    peer = Peer(
        max_message=max_message,
        max_frame=LIMIT,
        ping_interval=None,
        ping_timeout=None,
        open_timeout=60.0,
        close_timeout=60.0,
    )
    transport = _Transport()
    peer.connection_made(transport)  # type: ignore[arg-type]
    peer.opened()
    return peer, transport


@st.composite
def chunk_lists(draw: st.DrawFn) -> list[bytes]:
    """The chunks of a frame: small ones, and ones at the length boundaries."""
    chunks = []
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):
            chunks.append(draw(st.binary(max_size=200)))
        else:
            chunks.append(payload_of(draw(st.sampled_from(BOUNDARIES)), draw(st.integers(0, 9))))
    return chunks


@pytest.mark.anyio
@pytest.mark.parametrize("client", [False, True], ids=["worker", "client"])
async def test_websockets_parses_what_a_peer_writes(client: bool) -> None:
    # hypothesis's @given cannot wrap a coroutine: draw the examples inside one loop.
    @given(chunk_lists(), st.sampled_from([16, 126, 127, 1000, 65536, 65537, 1 << 20]))
    @settings(max_examples=60, deadline=None)
    def check(chunks: list[bytes], max_message: int) -> None:
        peer, transport = _peer(client, max_message)
        peer.send_frame(list(chunks))
        peer.send_frame([b"second"])
        peer.close(CloseCode.GOING_AWAY, "done")
        protocol, frames = websockets_protocol(bytes(transport.written), written_by_client=client)
        assert protocol.parser_exc is None
        expected = [bytes(m) for m in split_frame(chunks, max_message)]
        expected += [bytes(m) for m in split_frame([b"second"], max_message)]
        data = [f for f in frames if f.opcode is not WsOpcode.CLOSE]
        assert [(f.opcode, bytes(f.data), f.fin) for f in data] == [
            (WsOpcode.BINARY, m, True) for m in expected
        ]
        assert frames[-1].opcode is WsOpcode.CLOSE
        assert protocol.close_rcvd is not None
        assert (protocol.close_rcvd.code, protocol.close_rcvd.reason) == (1001, "done")

    check()


@pytest.mark.parametrize("client", [False, True], ids=["worker", "client"])
def test_websockets_parses_the_state_machines_control_frames(client: bool) -> None:
    websocket = Connection(
        client=client, ping_interval=1.0, ping_timeout=1.0, open_timeout=1.0, close_timeout=1.0
    )
    websocket.connection_made()
    websocket.opened()
    written = bytearray()
    for actions in (
        websocket.timer_expired(),  # a keepalive ping
        websocket.receive(Ping(b"ping from the peer")),  # its pong
        websocket.close(CloseCode.NORMAL_CLOSURE, "bye"),
    ):
        for action in actions:
            if isinstance(action, Send | SendAfterQueued):
                written += action.data
    protocol, frames = websockets_protocol(bytes(written), written_by_client=client)
    assert protocol.parser_exc is None
    assert [(f.opcode, bytes(f.data)) for f in frames[:2]] == [
        (WsOpcode.PING, websocket.ping_payload),
        (WsOpcode.PONG, b"ping from the peer"),
    ]
    assert protocol.close_rcvd is not None
    assert (protocol.close_rcvd.code, protocol.close_rcvd.reason) == (1000, "bye")


# -- 3. one fault, one code: the same as websockets ------------------------------------------------


def raw(first: int, payload: bytes, *, mask: bool, length: int | None = None) -> bytes:
    """A frame from its first byte, built by hand (neither library's builder)."""
    n = len(payload) if length is None else length
    bit = 0x80 if mask else 0
    if n < 126:
        head = bytes((first, bit | n))
    elif n < 1 << 16:
        head = bytes((first, bit | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((first, bit | 127)) + n.to_bytes(8, "big")
    if not mask:
        return head + payload
    key = b"\x11\x22\x33\x44"
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


#: The receivers' message limit in the fault tests (websockets applies it to control frames
#: too, so it is above 125: a long ping is then refused for its length alone).
FAULT_LIMIT = 150


def _faults(mask: bool) -> Iterator[tuple[str, bytes]]:
    """Streams with one fault each, for a receiver that expects frames masked or not."""
    yield "reserved bit 1", raw(0xC2, b"abc", mask=mask)
    yield "reserved bit 3", raw(0x92, b"abc", mask=mask)
    yield "unknown opcode", raw(0x83, b"", mask=mask)
    yield "wrong masking", raw(0x82, b"abc", mask=not mask)
    yield "long ping", raw(0x89, b"p" * 126, mask=mask)
    yield "fragmented ping", raw(0x09, b"p", mask=mask)
    yield "continuation first", raw(0x80, b"abc", mask=mask)
    yield "message inside a message", raw(0x02, b"a", mask=mask) + raw(0x82, b"b", mask=mask)
    yield "one-byte close", raw(0x88, b"\x03", mask=mask)
    for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000):
        yield f"close code {code}", raw(0x88, code.to_bytes(2, "big"), mask=mask)
    yield "close reason not UTF-8", raw(0x88, b"\x03\xe8\xc3(", mask=mask)
    yield "message over the limit", raw(0x82, b"", mask=mask, length=FAULT_LIMIT + 1)
    yield (
        "fragments over the limit",
        raw(0x02, b"a" * 100, mask=mask) + raw(0x80, b"", mask=mask, length=FAULT_LIMIT - 99),
    )


FAULTS = [
    (side, name, wire) for side in ("server", "client") for name, wire in _faults(side == "server")
]


@pytest.mark.parametrize(
    ("side", "wire"),
    [(side, wire) for side, _, wire in FAULTS],
    ids=[f"{side}-{name}" for side, name, _ in FAULTS],
)
def test_a_fault_gets_the_same_close_code_as_from_websockets(side: str, wire: bytes) -> None:
    server = side == "server"  # a server expects masked frames, a client unmasked ones
    protocol = Protocol(
        Side.SERVER if server else Side.CLIENT, state=State.OPEN, max_size=FAULT_LIMIT
    )
    protocol.receive_data(wire)
    assert protocol.close_sent is not None, "websockets accepted it"
    parser = Parser(masked=server, max_message=FAULT_LIMIT)
    with pytest.raises(Violation) as raised:
        parser.receive(wire)
    assert raised.value.code == protocol.close_sent.code
    assert raised.value.code in (CloseCode.PROTOCOL_ERROR, CloseCode.INVALID_DATA, 1009)


def test_a_64_bit_length_with_its_top_bit_is_where_the_two_differ() -> None:
    # RFC 6455 5.2: the most significant bit of a 64-bit length MUST be 0. fedtensor
    # names that (PROTOCOL_ERROR); websockets checks the size first (MESSAGE_TOO_BIG).
    wire = bytes((0x82, 0xFF)) + (1 << 63).to_bytes(8, "big") + b"mask"
    protocol = Protocol(Side.SERVER, state=State.OPEN, max_size=100)
    protocol.receive_data(wire)
    assert protocol.close_sent is not None
    assert protocol.close_sent.code == CloseCode.MESSAGE_TOO_BIG
    with pytest.raises(Violation) as raised:
        Parser(masked=True, max_message=100).receive(wire)
    assert raised.value.code == CloseCode.PROTOCOL_ERROR
