"""The websocket connection's state machine, :mod:`fedtensor.protocol.wsconnection`, sans I/O.

The machine is driven by hand, in both roles: events in, actions out. Frames it writes are
read back with :class:`~fedtensor.protocol.wsframes.Parser` (masked when a client wrote
them), so the tests check the bytes on the wire, not only the machine's own bookkeeping.
Covered: the closing handshake started by either side, the echo of a close frame (once),
a second close ignored, data refused after a close, pings answered, pongs matched, the
keepalive timeout, faults closing with the code the table gives them on both roles, the
timers; then the asyncio driver (:mod:`fedtensor.net.peer`) applying the data path's
inlined rule and the actions on a fake transport; and, end to end on 127.0.0.1, the same
bad message closing with the same code whether a worker or a client receives it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import anyio
import pytest
from websockets.asyncio.client import connect as raw_connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.speedups import apply_mask

from fedtensor.errors import LimitExceeded, ProtocolError
from fedtensor.net.peer import WebSocketPeer
from fedtensor.protocol.chunks import Reassembler
from fedtensor.protocol.messages import Fetch
from fedtensor.protocol.wsconnection import (
    CLOSED,
    CLOSING,
    CONNECTING,
    OPEN,
    AbortTCP,
    Action,
    Connection,
    Deliver,
    DropQueued,
    HalfCloseTCP,
    Send,
    SendAfterQueued,
    SetTimer,
    State,
    Wait,
    close_code_for,
)
from fedtensor.protocol.wsframes import (
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
)
from fedtensor.transports.websocket import WebSocketTransport
from fedtensor.worker.server import WorkerServer

PING_INTERVAL, PING_TIMEOUT, OPEN_TIMEOUT, CLOSE_TIMEOUT = 1.5, 2.5, 3.5, 4.5
ROLES = ["server", "client"]


def connection(role: str, *, ping_interval: float | None = PING_INTERVAL) -> Connection:
    """An open connection in ``role``, its opening actions checked."""
    websocket = Connection(
        client=role == "client",
        ping_interval=ping_interval,
        ping_timeout=PING_TIMEOUT,
        open_timeout=OPEN_TIMEOUT,
        close_timeout=CLOSE_TIMEOUT,
    )
    assert websocket.state is CONNECTING
    assert websocket.connection_made() == (SetTimer(Wait.HANDSHAKE, OPEN_TIMEOUT),)
    opened = websocket.opened()
    assert websocket.state is OPEN
    assert websocket.reading
    if ping_interval is not None:
        assert opened == (SetTimer(Wait.PING, ping_interval),)
    return websocket


def wire(websocket: Connection, data: bytes) -> list[Event]:
    """The frames ``websocket`` wrote in ``data``, read as its peer reads them."""
    parser = Parser(masked=websocket.client, max_message=1 << 20)
    parser.receive(data)
    return parser.take_events()


def sent(websocket: Connection, actions: Sequence[Action]) -> list[Event]:
    """The frames of the actions' Send and SendAfterQueued, in order."""
    events: list[Event] = []
    for action in actions:
        if isinstance(action, Send | SendAfterQueued):
            events += wire(websocket, action.data)
    return events


def kinds(actions: Sequence[Action]) -> list[type]:
    return [type(action) for action in actions]


def end_of_tcp(role: str) -> list[Action]:
    """What a side does once it reads no more: the server ends TCP, the client waits."""
    timer = SetTimer(Wait.CLOSE, CLOSE_TIMEOUT)
    return [HalfCloseTCP(), timer] if role == "server" else [timer]


# -- the closing handshake ------------------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_closing_started_here(role: str) -> None:
    websocket = connection(role)
    actions = websocket.close(CloseCode.GOING_AWAY, "bye")
    # The close frame waits behind the messages queued before it.
    assert kinds(actions) == [SendAfterQueued]
    assert sent(websocket, actions) == [Close(CloseCode.GOING_AWAY, "bye")]
    assert websocket.state is CLOSING
    assert websocket.close_sent is None  # not written yet
    assert websocket.close_written() == (SetTimer(Wait.CLOSE, CLOSE_TIMEOUT),)
    assert websocket.close_sent == Close(CloseCode.GOING_AWAY, "bye")
    assert websocket.reading  # for the peer's answer
    # The peer answers: both close frames have passed, nothing more is sent.
    answer = websocket.receive(Close(CloseCode.GOING_AWAY, ""))
    assert list(answer) == end_of_tcp(role)
    assert not websocket.reading
    assert websocket.close_code == CloseCode.GOING_AWAY
    assert websocket.connection_lost() == (SetTimer(Wait.NOTHING, None),)
    assert websocket.state is CLOSED
    assert websocket.close_code == CloseCode.GOING_AWAY


@pytest.mark.parametrize("role", ROLES)
def test_closing_started_by_the_peer_is_echoed_with_its_code(role: str) -> None:
    websocket = connection(role)
    actions = websocket.receive(Close(CloseCode.GOING_AWAY, "shutting down"))
    # The queued messages are dropped (the peer reads no more), then the echo goes out.
    assert kinds(actions)[:2] == [DropQueued, Send]
    assert sent(websocket, actions) == [Close(CloseCode.GOING_AWAY, "")]
    assert list(actions[2:]) == end_of_tcp(role)
    assert websocket.state is CLOSING
    assert websocket.close_received == Close(CloseCode.GOING_AWAY, "shutting down")
    assert websocket.close_reason == "shutting down"
    assert not websocket.reading


@pytest.mark.parametrize("role", ROLES)
def test_an_empty_close_frame_is_echoed_empty(role: str) -> None:
    websocket = connection(role)
    actions = websocket.receive(Close(CloseCode.NO_STATUS_RCVD, ""))
    [echo] = [action for action in actions if isinstance(action, Send)]
    assert len(echo.data) == (6 if role == "client" else 2)  # a header (and a mask): no code
    assert sent(websocket, actions) == [Close(CloseCode.NO_STATUS_RCVD, "")]


@pytest.mark.parametrize("role", ROLES)
def test_a_close_is_echoed_once_and_a_second_close_is_ignored(role: str) -> None:
    websocket = connection(role)
    first = websocket.receive(Close(CloseCode.NORMAL_CLOSURE, ""))
    assert len(sent(websocket, first)) == 1
    assert websocket.receive(Close(CloseCode.NORMAL_CLOSURE, "again")) == ()
    assert websocket.receive(Close(CloseCode.PROTOCOL_ERROR, "")) == ()
    assert websocket.close_received == Close(CloseCode.NORMAL_CLOSURE, "")
    # Nor does the application's close send another.
    assert websocket.close(CloseCode.NORMAL_CLOSURE, "me too") == ()


@pytest.mark.parametrize("role", ROLES)
def test_a_close_arriving_while_ours_is_queued_is_answered_at_once(role: str) -> None:
    websocket = connection(role)
    assert kinds(websocket.close(CloseCode.NORMAL_CLOSURE, "mine")) == [SendAfterQueued]
    actions = websocket.receive(Close(CloseCode.GOING_AWAY, ""))
    # Ours (still queued) is dropped with the queue; theirs is echoed now.
    assert kinds(actions)[:2] == [DropQueued, Send]
    assert sent(websocket, actions) == [Close(CloseCode.GOING_AWAY, "")]
    assert websocket.close_sent == Close(CloseCode.GOING_AWAY, "")


@pytest.mark.parametrize("role", ROLES)
def test_data_after_a_close_is_refused(role: str) -> None:
    message = Message(memoryview(b"\x00payload"))
    websocket = connection(role)
    assert websocket.receive(message) == (Deliver(message.data),)  # while open
    websocket.receive(Close(CloseCode.NORMAL_CLOSURE, ""))
    assert websocket.receive(message) == ()
    # After our own close frame, too: the application asked to close.
    websocket = connection(role)
    websocket.close()
    assert websocket.receive(message) == ()
    websocket.close_written()
    assert websocket.receive(message) == ()


@pytest.mark.parametrize("role", ROLES)
def test_the_close_timer_aborts(role: str) -> None:
    websocket = connection(role)
    websocket.close()
    websocket.close_written()
    assert websocket.wait is Wait.CLOSE
    assert websocket.timer_expired() == (AbortTCP(),)
    assert websocket.local_reason == "the closing handshake timed out"


def test_the_handshake_timer_aborts_and_is_cancelled_by_the_opening() -> None:
    websocket = Connection(
        client=False, ping_interval=None, ping_timeout=None, open_timeout=1.0, close_timeout=1.0
    )
    assert websocket.connection_made() == (SetTimer(Wait.HANDSHAKE, 1.0),)
    assert websocket.timer_expired() == (AbortTCP(),)
    assert websocket.local_reason == "the handshake timed out"
    other = Connection(
        client=False, ping_interval=None, ping_timeout=None, open_timeout=1.0, close_timeout=1.0
    )
    other.connection_made()
    assert other.opened() == (SetTimer(Wait.NOTHING, None),)  # no pings: no timer at all
    assert other.timer_expired() == ()  # a stale timer does nothing


@pytest.mark.parametrize("role", ROLES)
def test_closing_before_the_opening_aborts(role: str) -> None:
    websocket = Connection(
        client=role == "client",
        ping_interval=None,
        ping_timeout=None,
        open_timeout=1.0,
        close_timeout=1.0,
    )
    assert websocket.close() == (AbortTCP(),)
    assert websocket.fail(CloseCode.PROTOCOL_ERROR, "bad") == (AbortTCP(),)
    assert websocket.state is CONNECTING  # until TCP is gone
    websocket.connection_lost()
    assert websocket.close_code == CloseCode.ABNORMAL_CLOSURE
    assert websocket.abort("again") == ()


@pytest.mark.parametrize("role", ROLES)
def test_a_connection_lost_without_a_close_frame_is_abnormal(role: str) -> None:
    websocket = connection(role)
    assert websocket.close_code is None
    websocket.connection_lost()
    assert websocket.state is State.CLOSED
    assert websocket.close_code == CloseCode.ABNORMAL_CLOSURE
    assert websocket.receive(Ping(b"x")) == ()
    assert websocket.connection_lost() == ()


# -- pings and pongs ------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("payload", [b"", b"hello", bytes(range(125))])
def test_a_ping_is_answered_with_a_pong_of_the_same_payload(role: str, payload: bytes) -> None:
    websocket = connection(role)
    actions = websocket.receive(Ping(payload))
    assert kinds(actions) == [Send]
    assert sent(websocket, actions) == [Pong(payload)]


@pytest.mark.parametrize("role", ROLES)
def test_pings_are_not_answered_after_our_close_frame(role: str) -> None:
    websocket = connection(role)
    websocket.close()
    assert len(sent(websocket, websocket.receive(Ping(b"p")))) == 1  # ours is still queued
    websocket.close_written()
    assert websocket.receive(Ping(b"p")) == ()


@pytest.mark.parametrize("role", ROLES)
def test_a_pong_matching_the_ping_clears_it(role: str) -> None:
    websocket = connection(role)  # its timer set for the first ping
    actions = websocket.timer_expired()
    payload = websocket.ping_payload
    assert payload is not None
    assert len(payload) == 4
    assert sent(websocket, actions) == [Ping(payload)]
    assert actions[-1] == SetTimer(Wait.PONG, PING_TIMEOUT)
    # An unsolicited pong, or one for another payload, changes nothing.
    assert websocket.receive(Pong(b"other")) == ()
    assert websocket.receive(Pong(b"")) == ()
    assert websocket.ping_payload == payload
    assert websocket.wait is Wait.PONG
    # The matching one clears it, and the next ping is due after the interval.
    assert websocket.receive(Pong(payload)) == (SetTimer(Wait.PING, PING_INTERVAL),)
    assert websocket.ping_payload is None
    assert websocket.receive(Pong(payload)) == ()  # a second one is unsolicited
    again = websocket.timer_expired()
    assert websocket.ping_payload is not None
    assert sent(websocket, again) == [Ping(websocket.ping_payload)]


@pytest.mark.parametrize("role", ROLES)
def test_a_missed_pong_fails_the_connection_with_internal_error(role: str) -> None:
    websocket = connection(role)
    websocket.timer_expired()  # the ping
    actions = websocket.timer_expired()  # no pong within ping_timeout
    assert kinds(actions) == [DropQueued, Send, AbortTCP]  # a dead peer would never answer
    assert sent(websocket, actions) == [Close(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")]
    assert websocket.state is CLOSING
    assert websocket.local_reason == "keepalive ping timeout"
    assert not websocket.reading


@pytest.mark.parametrize("role", ROLES)
def test_a_pong_in_time_keeps_the_connection(role: str) -> None:
    websocket = connection(role)
    websocket.timer_expired()
    assert websocket.ping_payload is not None
    websocket.receive(Pong(websocket.ping_payload))
    assert websocket.wait is Wait.PING
    # The timer that fires now is the next ping's, not a keepalive failure.
    assert kinds(websocket.timer_expired()) == [Send, SetTimer]
    assert websocket.state is OPEN


# -- faults: one fault, one code ------------------------------------------------------------------


def _violation(masked: bool, data: bytes) -> Violation:
    parser = Parser(masked=masked, max_message=100)
    with pytest.raises(Violation) as raised:
        parser.receive(data)
    return raised.value


def _reassembly_error(message: bytes) -> ProtocolError | LimitExceeded:
    with pytest.raises((ProtocolError, LimitExceeded)) as raised:
        Reassembler(max_frame=1000).feed(memoryview(bytearray(message)))
    assert isinstance(raised.value, ProtocolError | LimitExceeded)
    return raised.value


KEY = b"\x01\x02\x03\x04"

# name: (the bytes, for a receiver that expects masked frames or not), the code they are owed
FAULTS: dict[str, tuple[Callable[[bool], bytes], int]] = {
    "reserved bits": (lambda masked: bytes((0xC2, 0x80 if masked else 0)), 1002),
    "unknown opcode": (lambda masked: bytes((0x83, 0x80 if masked else 0)), 1002),
    "wrong masking": (lambda masked: bytes((0x82, 0x00 if masked else 0x80)), 1002),
    "long control frame": (
        lambda masked: header(Opcode.PING, 126, KEY if masked else None),
        1002,
    ),
    "stray continuation": (
        lambda masked: header(Opcode.CONTINUATION, 0, KEY if masked else None),
        1002,
    ),
    "bad close code": (
        lambda masked: control_frame(Opcode.CLOSE, (1005).to_bytes(2, "big"), mask=masked),
        1002,
    ),
    "close reason not UTF-8": (
        lambda masked: control_frame(Opcode.CLOSE, b"\x03\xe8\xff", mask=masked),
        1007,
    ),
    "message too big": (lambda masked: header(Opcode.BINARY, 101, KEY if masked else None), 1009),
}

REASSEMBLY: dict[str, tuple[bytes, int]] = {
    "empty message": (b"", 1007),
    "unknown chunk kind": (b"\x07abc", 1007),
    "bad split header": (b"\x01\x00\x00", 1007),
    "frame over max_frame": (b"\x01" + (5000).to_bytes(8, "big"), 1009),
}


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("name", sorted(FAULTS))
def test_a_framing_fault_closes_with_its_code_on_both_roles(role: str, name: str) -> None:
    websocket = connection(role)
    make, code = FAULTS[name]
    error = _violation(masked=not websocket.client, data=make(not websocket.client))
    assert close_code_for(error) == code
    actions = websocket.fail(close_code_for(error), error.reason)
    _check_failed(websocket, role, actions, code, error.reason)


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("name", sorted(REASSEMBLY))
def test_a_bad_fedtensor_frame_closes_with_its_code_on_both_roles(role: str, name: str) -> None:
    websocket = connection(role)
    message, code = REASSEMBLY[name]
    error = _reassembly_error(message)
    assert close_code_for(error) == code
    actions = websocket.fail(close_code_for(error), str(error))
    _check_failed(websocket, role, actions, code, str(error))


@pytest.mark.parametrize("role", ROLES)
def test_a_text_message_closes_with_unsupported_data_on_both_roles(role: str) -> None:
    websocket = connection(role)
    actions = websocket.receive(Message(memoryview(b"hello"), text=True))
    _check_failed(websocket, role, actions, 1003, "text is not a frame")


def test_close_code_for_maps_each_kind_of_error() -> None:
    assert close_code_for(Violation(CloseCode.PROTOCOL_ERROR, "x")) is CloseCode.PROTOCOL_ERROR
    assert close_code_for(Violation(CloseCode.MESSAGE_TOO_BIG, "x")) is CloseCode.MESSAGE_TOO_BIG
    assert close_code_for(ProtocolError("bad CBOR")) is CloseCode.INVALID_DATA
    assert close_code_for(LimitExceeded("too big")) is CloseCode.MESSAGE_TOO_BIG


def _check_failed(
    websocket: Connection, role: str, actions: Sequence[Action], code: int, reason: str
) -> None:
    # The queue is dropped, our close frame with the code goes out at once, and this
    # side reads no more (RFC 6455 7.1.7): the server ends TCP, the client waits for it.
    assert kinds(actions)[:2] == [DropQueued, Send]
    assert sent(websocket, actions) == [Close(code, reason)]
    assert list(actions[2:]) == end_of_tcp(role)
    assert websocket.state is CLOSING
    assert websocket.local_reason == reason
    assert not websocket.reading
    # Not even the peer's close frame is processed after a fault; a second fault,
    # in bytes past the last read, is ignored.
    assert websocket.receive(Close(CloseCode.NORMAL_CLOSURE, "")) == ()
    assert websocket.fail(CloseCode.PROTOCOL_ERROR, "later") == ()
    assert websocket.local_reason == reason


@pytest.mark.parametrize("role", ROLES)
def test_a_fault_after_our_close_frame_sends_no_second_one(role: str) -> None:
    websocket = connection(role)
    websocket.close()
    websocket.close_written()
    actions = websocket.fail(CloseCode.PROTOCOL_ERROR, "garbage while closing")
    assert sent(websocket, actions) == []
    assert list(actions) == [DropQueued(), *end_of_tcp(role)]


# -- the asyncio driver ---------------------------------------------------------------------------


class _Transport:
    """What WebSocketPeer uses of an asyncio transport, recording what happens to it."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.eof_written = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        assert not self.eof_written
        self.written += data

    def is_closing(self) -> bool:
        return self.eof_written or self.aborted

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def abort(self) -> None:
        self.aborted = True

    def get_extra_info(self, name: str) -> None:
        return None


class _Peer(WebSocketPeer):
    client = False

    def __init__(self) -> None:
        super().__init__(
            max_message=1 << 16,
            max_frame=1 << 20,
            ping_interval=None,
            ping_timeout=None,
            open_timeout=60.0,
            close_timeout=60.0,
        )
        self.frames: list[bytes] = []
        self.fake = _Transport()
        self.connection_made(self.fake)  # type: ignore[arg-type]
        self.opened()

    def frame_received(self, frame: memoryview) -> None:
        self.frames.append(bytes(frame))

    def feed(self, data: bytes) -> None:
        while data:
            target = self.get_buffer(-1)
            n = min(len(target), len(data))
            target[:n] = data[:n]
            data = data[n:]
            self.buffer_updated(n)


def _from_client(opcode: Opcode, payload: bytes) -> bytes:
    return header(opcode, len(payload), KEY) + apply_mask(payload, KEY)


@pytest.mark.anyio
async def test_the_driver_delivers_data_only_while_open() -> None:
    peer = _Peer()
    # A frame, the client's close frame, and a frame after it, in one read.
    peer.feed(
        _from_client(Opcode.BINARY, b"\x00first")
        + _from_client(Opcode.CLOSE, close_frame(1000, "", mask=False)[2:])
        + _from_client(Opcode.BINARY, b"\x00after the close")
    )
    assert peer.frames == [b"first"]  # the data path's own check refused the last one
    assert wire(peer.websocket, bytes(peer.fake.written)) == [Close(CloseCode.NORMAL_CLOSURE, "")]
    assert peer.fake.eof_written  # both close frames passed: the server ends TCP
    peer.connection_lost(None)
    assert peer.close_code == CloseCode.NORMAL_CLOSURE
    assert peer.closed.done()


@pytest.mark.anyio
async def test_the_driver_closes_with_the_code_of_a_fault_and_stops_reading() -> None:
    peer = _Peer()
    peer.feed(_from_client(Opcode.BINARY, b"\x07not a chunk kind"))
    assert wire(peer.websocket, bytes(peer.fake.written)) == [
        Close(CloseCode.INVALID_DATA, "bad frame: unknown message kind 0x7")
    ]
    assert peer.fake.eof_written
    # What follows is never delivered, whatever it is.
    peer.feed(b"\xff" * 10_000)
    assert peer.frames == []
    assert peer.state is CLOSING
    assert peer.local_reason == "bad frame: unknown message kind 0x7"
    peer.connection_lost(None)
    assert peer.state is CLOSED


@pytest.mark.anyio
async def test_the_driver_sends_its_close_frame_after_the_queued_messages() -> None:
    peer = _Peer()
    peer.pause_writing()
    peer.send_frame([b"queued"])
    peer.close(CloseCode.GOING_AWAY, "done")
    assert peer.fake.written == b""  # paused: nothing went out yet
    peer.send_frame([b"too late"])  # dropped: the connection is closing
    peer.resume_writing()
    events = wire(peer.websocket, bytes(peer.fake.written))
    assert len(events) == 2
    assert isinstance(events[0], Message)
    assert bytes(events[0].data) == b"\x00queued"
    assert events[1] == Close(CloseCode.GOING_AWAY, "done")
    assert peer.websocket.close_sent == Close(CloseCode.GOING_AWAY, "done")
    assert not peer.fake.eof_written  # waiting for the client's close frame
    peer.feed(_from_client(Opcode.CLOSE, close_frame(1001, "", mask=False)[2:]))
    assert peer.fake.eof_written
    peer.connection_lost(None)


def test_ping_payloads_are_random() -> None:
    payloads = set()
    for _ in range(20):
        websocket = connection("server")
        websocket.timer_expired()
        payloads.add(websocket.ping_payload)
    assert len(payloads) == 20


# -- one fault, one code, end to end --------------------------------------------------------------

# name: (a message a peer sends, the close code the receiver owes it, words of the reason)
BAD_MESSAGES: dict[str, tuple[bytes | str, int, str]] = {
    "garbage CBOR": (b"\x00\xff\xfe\xfd garbage", 1007, "bad frame"),
    "unknown chunk kind": (b"\x07abc", 1007, "unknown message kind"),
    "bad split header": (b"\x01" + (10).to_bytes(8, "big") + b"xx", 1007, "9 bytes"),
    "text": ("hello", 1003, "text"),
}


@pytest.mark.anyio
@pytest.mark.parametrize("name", sorted(BAD_MESSAGES))
async def test_the_same_bad_message_gets_the_same_code_from_worker_and_client(name: str) -> None:
    message, code, words = BAD_MESSAGES[name]
    with anyio.fail_after(30):
        assert await _code_from_a_worker(message) == (code, words)
        assert await _code_from_a_client(message) == (code, words)


async def _code_from_a_worker(message: bytes | str) -> tuple[int, str]:
    """The close code and reason an in-process worker answers ``message`` with."""
    server = WorkerServer("local", token="t", grace=5.0)
    async with anyio.create_task_group() as task_group:
        url = await task_group.start(server.serve, "127.0.0.1", 0)
        async with raw_connect(url, additional_headers={"Authorization": "Bearer t"}) as ws:
            await ws.send(message)
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
        server.shutdown()
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code, _words(closed.value.rcvd.reason, message)


async def _code_from_a_client(message: bytes | str) -> tuple[int, str]:
    """The close code and reason fedtensor's client answers ``message`` with, as a reply."""
    received: asyncio.Future[Close | None] = asyncio.get_running_loop().create_future()

    async def handler(ws: ServerConnection) -> None:
        await ws.recv()  # the client's command: its connection is set up
        await ws.send(message)
        try:
            await ws.recv()
        except ConnectionClosed as exc:
            rcvd = exc.rcvd
            received.set_result(None if rcvd is None else Close(rcvd.code, rcvd.reason))

    class Sink:
        def __init__(self) -> None:
            self.lost: BaseException | None = None
            self.gone = asyncio.Event()

        def replies_received(self, batch: object) -> None:
            raise AssertionError("nothing valid was sent")

        def connection_lost(self, exc: BaseException | None) -> None:
            self.lost = exc
            self.gone.set()

    sink = Sink()
    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        connection = await WebSocketTransport().connect(f"ws://127.0.0.1:{port}", sink, timeout=10)
        connection.send([Fetch(1, 1, False)])
        close = await received
        await sink.gone.wait()  # the server ended TCP after the closing handshake
    assert close is not None, "the client sent no close frame"
    if close.code != CloseCode.UNSUPPORTED_DATA:
        # The client's waits fail with the fault itself, in fedtensor's hierarchy.
        assert isinstance(sink.lost, ProtocolError)
    return close.code, _words(close.reason, message)


def _words(reason: str, message: bytes | str) -> str:
    words = BAD_MESSAGES[next(name for name, (m, _, _) in BAD_MESSAGES.items() if m == message)][2]
    assert words in reason, reason
    return words
