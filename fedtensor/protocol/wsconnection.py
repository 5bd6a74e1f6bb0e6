"""The websocket connection's state machine (RFC 6455 sections 1.4, 5.5 and 7), sans I/O.

Theory of operation
-------------------
:class:`Connection` is one end of a websocket connection as data: it is told
what happened (the handshake finished, a frame arrived, the application wants
to close, a fault was found, the timer fired, TCP went away) and answers with
the actions (:data:`Action`) its driver must take, in order: write these
bytes, drop the queued messages, set the timer, end or abort TCP. It owns the
connection's :class:`State`, the closing handshake and the keepalive pings;
it does no I/O, reads no clock and knows no event loop.
:mod:`fedtensor.net.peer` drives it on asyncio; the tests drive it by hand.

What it does not own is the bytes of data messages. Frames are parsed by
:class:`~fedtensor.protocol.wsframes.Parser` and written by the driver, and a
binary message received while the connection is ``OPEN`` is the
application's: :meth:`Connection.receive` answers :class:`Deliver` for it, and
the driver applies that rule inline on its data path (one comparison with
:data:`OPEN`) rather than calling in, so that a data message costs no call and
no action object here. Every other event goes through :meth:`Connection.receive`.

The states, and every transition (the methods are the inputs)::

    CONNECTING --opened--> OPEN
    CONNECTING --close, fail, abort, handshake timer--> abort TCP
    OPEN --close--> CLOSING         our close frame queued behind the messages
                                    queued before it (close_written once sent)
    OPEN --their close frame--> CLOSING   the queue dropped, their code echoed
    OPEN --fail--> CLOSING          the queue dropped, our close frame now
    OPEN --pong timer--> CLOSING    close frame INTERNAL_ERROR, abort TCP
    CLOSING --their close frame--> the end of TCP (below)
    CLOSING --fail--> the end of TCP
    CLOSING --close timer--> abort TCP
    any --connection_lost--> CLOSED

**Closing** (RFC 6455 sections 5.5.1 and 7.1). Each side sends one close
frame. The side that receives a close frame before sending its own answers at
once with the same code (an empty frame if the peer's had none) and drops the
messages it had queued, which the peer would not read. After the peer's close
frame nothing more is read: a second close frame, or data, is never seen.
Once this side has sent its close frame, it takes no more data (the
application asked to close) and sends no more frames at all.

**The end of TCP.** Once both close frames have passed, the server *half*
closes TCP (RFC 6455 section 7.1.1: the server closes first, so that its end,
not the client's, waits in TIME_WAIT) and reads on, dropping what comes, until
the client closes its half; the client waits for the server's end of stream,
then closes. Closing the whole socket instead would make the server's kernel
answer any byte the client still sends with a reset, and the client's kernel
may then throw away the close frame it had not read yet (the reason the
connection ended). A transport that cannot half-close (TLS) closes. A side
waits ``close_timeout`` at most for each step, then aborts TCP.

**Failing** (section 7.1.7). A fault found in what the peer sent closes the
connection with the code the fault is owed (the table below): the queued
messages are dropped, the close frame goes out at once (unless ours was sent
already), and nothing more is read, not even the peer's close frame ("MUST
NOT continue to attempt to process data"): the server ends TCP as above
straight away, and the client waits for it. A fault found before the
connection is open aborts TCP; one in bytes past the last read (after the
peer's close frame, or after a first fault) is ignored.

**Keepalive** (section 5.5.2). ``ping_interval`` seconds after the
connection opens, and after each matching pong, a ping with 4 random bytes
goes out; a pong with that payload clears it, and any other pong is ignored
(an unsolicited pong is allowed, section 5.5.3). Without the matching pong
within ``ping_timeout`` the peer is taken for dead: a close frame
``INTERNAL_ERROR`` "keepalive ping timeout" is written, for a peer that is
only slow, and TCP is aborted at once, since a dead peer would never answer
a closing handshake. A ping from the peer is answered with a pong of the same
payload until this side's close frame has been sent.

**One timer.** At most one wait is pending at any time (the handshake, the
next ping, the pong, the closing handshake), so the driver keeps one timer:
:class:`SetTimer` replaces it, and :meth:`Connection.timer_expired` says it
fired; :attr:`Connection.wait` says what it was for.

Close codes: one fault, one code
--------------------------------
The same fault gets the same code on the worker and on the client. Faults are
found by the parser (``wsframes``), the reassembler (``chunks``), the codec,
this class, or the worker (``worker.server``)::

    fault                                                  close code             found by
    -----------------------------------------------------  ---------------------  ----------
    framing that breaks RFC 6455: reserved bits, unknown   1002 PROTOCOL_ERROR    parser
      opcode, masking, a fragmented or long control
      frame, a stray or missing continuation, a 64-bit
      length with its top bit set, a bad close code
    a close reason that is not UTF-8                       1007 INVALID_DATA      parser
    a text message (fedtensor speaks binary)               1003 UNSUPPORTED_DATA  this class
    a message over max_message, a frame over max_frame,    1009 MESSAGE_TOO_BIG   parser,
      a message in over max_fragments frames (a count:                            reassembler
      empty continuation frames count)
    a valid message that is not a valid fedtensor frame    1007 INVALID_DATA      reassembler,
      (a chunk header, the CBOR, a message's shape)                               codec
    a valid frame the receiver does not take (a reply      1008 POLICY_VIOLATION  worker
      sent to a worker), a client flooding the worker
    no pong within ping_timeout                            1011 INTERNAL_ERROR    this class
    the worker shuts down                                  1001 GOING_AWAY        worker
    the application closes                                 1000 NORMAL_CLOSURE    caller

:func:`close_code_for` maps the errors of the parser, the reassembler and the
codec to their codes, for the worker and the client alike.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Sequence
from dataclasses import dataclass

from fedtensor.errors import LimitExceeded, ProtocolError
from fedtensor.protocol.wsframes import (
    Close,
    CloseCode,
    Event,
    Message,
    Opcode,
    Ping,
    Pong,
    Violation,
    close_frame,
    control_frame,
)

__all__ = [
    "CLOSED",
    "CLOSING",
    "CONNECTING",
    "KEEPALIVE_TIMEOUT",
    "OPEN",
    "AbortTCP",
    "Action",
    "Connection",
    "Deliver",
    "DropQueued",
    "HalfCloseTCP",
    "Send",
    "SendAfterQueued",
    "SetTimer",
    "State",
    "Wait",
    "close_code_for",
]


class State(enum.IntEnum):
    """The state of a websocket connection (RFC 6455 section 4 and 7)."""

    CONNECTING = 0  # the HTTP handshake is under way
    OPEN = 1  # messages flow both ways
    CLOSING = 2  # a close frame was sent or received (or ours is queued)
    CLOSED = 3  # TCP is gone


# The members as module globals: on Python 3.11 ``State.OPEN`` is a lookup through
# the enum's metaclass that costs 5x the comparison, and the driver compares per frame.
CONNECTING, OPEN, CLOSING, CLOSED = State


class Wait(enum.IntEnum):
    """What the connection's one timer is set for."""

    NOTHING = 0
    HANDSHAKE = 1  # CONNECTING: the handshake must end within open_timeout
    PING = 2  # OPEN: the next ping is due after ping_interval
    PONG = 3  # OPEN: the outstanding ping's pong is due within ping_timeout
    CLOSE = 4  # CLOSING: the peer's close frame (or, for a client, TCP's end) is due


# -- actions --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Write ``data`` (a control frame) now, ahead of the messages not yet written."""

    data: bytes


@dataclass(frozen=True, slots=True)
class SendAfterQueued:
    """Write ``data`` (our close frame) after the messages already queued, then call
    :meth:`Connection.close_written`; unless a :class:`DropQueued` drops it first."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Deliver:
    """Hand the binary message ``data`` to the application."""

    data: memoryview


@dataclass(frozen=True, slots=True)
class DropQueued:
    """Drop the messages queued and not yet written: the peer would not read them."""


@dataclass(frozen=True, slots=True)
class SetTimer:
    """Replace the timer: call :meth:`Connection.timer_expired` after ``seconds``
    (``None``: no timer)."""

    wait: Wait
    seconds: float | None


@dataclass(frozen=True, slots=True)
class HalfCloseTCP:
    """End this side's half of TCP once what was written has gone out, and read on
    (dropping what comes) until the peer ends its half; a transport that cannot
    half-close closes."""


@dataclass(frozen=True, slots=True)
class AbortTCP:
    """Drop TCP now, discarding what was not written yet."""


Action = Send | SendAfterQueued | Deliver | DropQueued | SetTimer | HalfCloseTCP | AbortTCP

_NOTHING: tuple[Action, ...] = ()
_DROP_QUEUED = DropQueued()
_HALF_CLOSE_TCP = HalfCloseTCP()
_ABORT_TCP = AbortTCP()
_NO_TIMER = SetTimer(Wait.NOTHING, None)

#: The reason of the close frame written when a pong does not come.
KEEPALIVE_TIMEOUT = "keepalive ping timeout"


def close_code_for(error: ProtocolError | LimitExceeded) -> CloseCode:
    """The close code owed for a fault in received bytes (the table above)."""
    if isinstance(error, Violation):
        return error.code
    if isinstance(error, LimitExceeded):
        return CloseCode.MESSAGE_TOO_BIG
    return CloseCode.INVALID_DATA


class Connection:
    """One end of a websocket connection, sans I/O: the inputs are its methods, each
    of which returns the actions the driver must take, in order.

    ``client``: whether this end masks what it sends (RFC 6455 section 5.3) and
    leaves closing TCP to the server. ``ping_interval`` (``None``: no pings),
    ``ping_timeout`` (``None``: wait for a pong forever), ``open_timeout`` and
    ``close_timeout`` are in seconds.
    """

    def __init__(
        self,
        *,
        client: bool,
        ping_interval: float | None,
        ping_timeout: float | None,
        open_timeout: float,
        close_timeout: float,
    ) -> None:
        self.client = client
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.open_timeout = open_timeout
        self.close_timeout = close_timeout
        self.state = CONNECTING
        #: Whether received bytes are parsed into frames: from the opening until
        #: the peer's close frame or a fault (then they are dropped).
        self.reading = False
        #: What the timer is set for.
        self.wait = Wait.NOTHING
        #: The payload of the ping whose pong is awaited.
        self.ping_payload: bytes | None = None
        #: The peer's close frame, once received.
        self.close_received: Close | None = None
        #: This end's close frame, once written.
        self.close_sent: Close | None = None
        #: This end's close frame while it waits behind the queued messages.
        self._close_queued: Close | None = None
        #: Why this end closed or dropped the connection, if it did.
        self.local_reason: str | None = None

    @property
    def close_code(self) -> int | None:
        """The code the peer closed with; ``ABNORMAL_CLOSURE`` once closed without one."""
        if self.close_received is not None:
            return self.close_received.code
        return CloseCode.ABNORMAL_CLOSURE if self.state is CLOSED else None

    @property
    def close_reason(self) -> str:
        return self.close_received.reason if self.close_received is not None else ""

    # -- the opening -------------------------------------------------------------------------

    def connection_made(self) -> Sequence[Action]:
        """TCP is up: the handshake has ``open_timeout`` seconds."""
        return (self._set_timer(Wait.HANDSHAKE),)

    def opened(self) -> Sequence[Action]:
        """The handshake succeeded: frames flow."""
        assert self.state is CONNECTING
        self.state = OPEN
        self.reading = True
        return (self._set_timer(Wait.PING),)

    # -- receiving ---------------------------------------------------------------------------

    def receive(self, event: Event) -> Sequence[Action]:
        """An event the parser produced."""
        if not self.reading:
            return _NOTHING  # parsed from bytes past the last read: never seen
        # (While OPEN, close_received is None and close_sent is None.)
        match event:
            case Message(data=data, text=text):
                if self.state is not OPEN:
                    return _NOTHING  # closing: the application takes no more data
                if text:
                    return self.fail(CloseCode.UNSUPPORTED_DATA, "text is not a frame")
                return (Deliver(data),)
            case Ping(data=data):
                if self.close_sent is not None:
                    return _NOTHING  # our close frame was the last frame we send
                return (Send(control_frame(Opcode.PONG, data, mask=self.client)),)
            case Pong(data=data):
                if self.ping_payload is None or data != self.ping_payload:
                    return _NOTHING  # unsolicited, or for an earlier ping: ignored
                self.ping_payload = None
                if self.state is not OPEN:
                    return _NOTHING  # the timer waits for the closing handshake now
                return (self._set_timer(Wait.PING),)
            case Close():
                return self._close_received(event)

    def _close_received(self, close: Close) -> Sequence[Action]:
        self.close_received = close
        self.reading = False  # RFC 6455 1.4: the rest is discarded
        if self.close_sent is not None:
            return self._end_tcp()  # it answers ours
        # Answer with the same code, at once: what is queued would not be read.
        self._close_queued = None
        self.close_sent = Close(close.code, "")
        self.state = CLOSING
        echo = Send(close_frame(close.code, "", mask=self.client))
        return (_DROP_QUEUED, echo, *self._end_tcp())

    # -- closing -----------------------------------------------------------------------------

    def close(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "") -> Sequence[Action]:
        """The application closes: a close frame after the messages already queued."""
        if self.state is CONNECTING:
            return self.abort(reason or "closed during the handshake")
        if self.state is not OPEN:
            return _NOTHING
        self.local_reason = self.local_reason or reason
        self.state = CLOSING
        self._close_queued = Close(code, reason)
        return (SendAfterQueued(close_frame(code, reason, mask=self.client)),)

    def close_written(self) -> Sequence[Action]:
        """The close frame of :class:`SendAfterQueued` was written."""
        assert self._close_queued is not None
        self.close_sent, self._close_queued = self._close_queued, None
        return (self._set_timer(Wait.CLOSE),)

    def fail(self, code: int, reason: str) -> Sequence[Action]:
        """A fault in what the peer sent (or a limit it crossed): close with ``code``."""
        if self.state is CONNECTING:
            return self.abort(reason)
        if not self.reading:
            return _NOTHING  # about bytes past the last read
        self.reading = False
        self.local_reason = reason
        if self.close_sent is not None:
            return (_DROP_QUEUED, *self._end_tcp())  # ours went out: nothing more to say
        self._close_queued = None
        self.close_sent = Close(code, reason)
        self.state = CLOSING
        frame = Send(close_frame(code, reason, mask=self.client))
        return (_DROP_QUEUED, frame, *self._end_tcp())

    def abort(self, reason: str) -> Sequence[Action]:
        """Drop TCP now (a timeout, a broken handshake, a worker going down)."""
        if self.state is CLOSED:
            return _NOTHING
        self.local_reason = self.local_reason or reason
        self.reading = False
        return (_ABORT_TCP,)

    def _end_tcp(self) -> tuple[Action, ...]:
        """This side reads no more: the server ends TCP, the client waits for it to."""
        if self.client:
            return (self._set_timer(Wait.CLOSE),)
        return (_HALF_CLOSE_TCP, self._set_timer(Wait.CLOSE))

    # -- time --------------------------------------------------------------------------------

    def timer_expired(self) -> Sequence[Action]:
        """The timer of the last :class:`SetTimer` fired."""
        wait, self.wait = self.wait, Wait.NOTHING
        if wait is Wait.PING and self.state is OPEN:
            self.ping_payload = os.urandom(4)
            ping = Send(control_frame(Opcode.PING, self.ping_payload, mask=self.client))
            return (ping, self._set_timer(Wait.PONG))
        if wait is Wait.PONG and self.state is OPEN and self.ping_payload is not None:
            reason = KEEPALIVE_TIMEOUT
            self.local_reason = reason
            self.close_sent = Close(CloseCode.INTERNAL_ERROR, reason)
            self.state = CLOSING
            self.reading = False
            frame = close_frame(CloseCode.INTERNAL_ERROR, reason, mask=self.client)
            return (_DROP_QUEUED, Send(frame), _ABORT_TCP)
        if wait is Wait.HANDSHAKE and self.state is CONNECTING:
            return self.abort("the handshake timed out")
        if wait is Wait.CLOSE and self.state is CLOSING:
            return self.abort("the closing handshake timed out")
        return _NOTHING

    def _set_timer(self, wait: Wait) -> SetTimer:
        seconds = {
            Wait.HANDSHAKE: self.open_timeout,
            Wait.PING: self.ping_interval,
            Wait.PONG: self.ping_timeout,
            Wait.CLOSE: self.close_timeout,
        }.get(wait)
        if seconds is None:
            self.wait = Wait.NOTHING
            return _NO_TIMER
        self.wait = wait
        return SetTimer(wait, seconds)

    # -- the end -----------------------------------------------------------------------------

    def connection_lost(self) -> Sequence[Action]:
        """TCP is gone (closed by either side, aborted, or broken)."""
        if self.state is CLOSED:
            return _NOTHING
        self.state = CLOSED
        self.reading = False
        self._close_queued = None
        return (self._set_timer(Wait.NOTHING),)
