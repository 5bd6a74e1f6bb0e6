"""The websocket transport: ``ws://HOST:PORT`` and ``wss://HOST:PORT`` reach worker processes.

``await ft.connect("ws://127.0.0.1:8765", token=...)`` opens one. Options
(keyword arguments of :func:`fedtensor.connect`):

``token``
    The worker's token, sent as ``Authorization: Bearer <token>``.
``session``
    A name under which the worker keeps this client's objects after a
    disconnection (for the worker's ``--session-ttl``), so that
    ``await worker.reconnect()`` finds them again. Anyone with the token who
    knows the name can attach to it: use a long random name.
``ssl``
    An :class:`ssl.SSLContext` for ``wss://``; by default the system's trust
    store, with certificate and host name verification.
``max_message``
    Bytes per websocket message (default 1 MiB); larger frames are split.
``max_frame``
    The largest reply frame accepted (default 16 GiB).
``ping_interval``, ``ping_timeout``
    Websocket heartbeats (default 20 s and 20 s). The worker computes on a
    thread of its own, so it answers pings during long operations: a timeout
    means the worker, its host or the network is gone.

Commands are encoded and written when the client flushes its outbox; replies
are decoded and handed to the client in the call that received them (see
:mod:`fedtensor.net.peer`: no reader or writer task stands in between). When the
connection ends, every pending wait fails with
:class:`~fedtensor.WorkerUnavailable` (or :class:`~fedtensor.LimitExceeded`
when the worker closed the connection for crossing a limit).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import ssl as ssl_module
from collections.abc import Sequence
from typing import Any, ClassVar

from websockets.client import ClientProtocol
from websockets.exceptions import InvalidHandshake, InvalidStatus, InvalidURI
from websockets.http11 import Response
from websockets.uri import parse_uri

from fedtensor.abc import Connection, ReplySink, Transport
from fedtensor.errors import (
    AuthenticationFailed,
    FedTensorError,
    LimitExceeded,
    ProtocolError,
    WorkerUnavailable,
)
from fedtensor.net.peer import WebSocketPeer
from fedtensor.protocol.codec import decode_frame, encode_frame
from fedtensor.protocol.messages import Command
from fedtensor.protocol.wsconnection import CONNECTING, OPEN
from fedtensor.protocol.wsframes import CloseCode
from fedtensor.worker.server import SESSION_HEADER, WORKER_HEADER

__all__ = ["WebSocketConnection", "WebSocketTransport"]

DEFAULT_MAX_MESSAGE = 1 << 20
DEFAULT_MAX_FRAME = 16 << 30


class _ClientPeer(WebSocketPeer):
    """The client's end of a connection to a worker process."""

    client = True

    def __init__(self, protocol: ClientProtocol, headers: list[tuple[str, str]], **options: Any):
        super().__init__(**options)
        self.protocol = protocol
        self.headers = headers
        self.handshake: asyncio.Future[Response] = self.loop.create_future()
        self.connection: WebSocketConnection | None = None
        #: The fault in what the worker sent that closed the connection, if one did.
        self.error: FedTensorError | None = None
        self._fed = 0  # handshake bytes given to the protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        request = self.protocol.connect()
        for name, value in self.headers:
            request.headers[name] = value
        request.headers["User-Agent"] = "fedtensor"
        self.protocol.send_request(request)
        for data in self.protocol.data_to_send():
            if data:
                self.transport.write(data)  # type: ignore[union-attr]

    def handshake_received(self, head: bytes) -> bool:
        # A refusal's body follows its head: read on until the response is whole.
        received = bytes(self.handshake_bytes)
        self.protocol.receive_data(received[self._fed :])
        self._fed = len(received)
        return self._check_response()

    def _check_response(self) -> bool:
        response = next(
            (e for e in self.protocol.events_received() if isinstance(e, Response)), None
        )
        if response is None:
            return False
        if self.protocol.handshake_exc is not None:
            self._fail_handshake(self.protocol.handshake_exc)
            return False
        self.opened()
        if not self.handshake.done():
            self.handshake.set_result(response)
        return True

    def _fail_handshake(self, exc: BaseException) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def frame_received(self, frame: memoryview) -> None:
        try:
            replies = decode_frame(frame)
        except (LimitExceeded, ProtocolError) as exc:
            self.reject(exc)
            return
        if self.connection is None:  # sent with the handshake's answer: no command yet
            self.fail(CloseCode.POLICY_VIOLATION, "a reply before any command")
            return
        self.connection.sink.replies_received(replies)

    def reject(self, error: LimitExceeded | ProtocolError) -> None:
        # A bad reply closes with the code it is owed, as on the worker, and the
        # pending waits fail with the error itself (a frame that did not reassemble,
        # or did not decode, alike).
        self.error = self.error or error
        super().reject(error)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state is CONNECTING and not self.handshake.done():
            # A refusal ends with its body: the parser may be waiting for EOF.
            self.protocol.receive_eof()
            if not self._check_response() and not self.handshake.done():
                self.handshake.set_exception(
                    ConnectionError(
                        self.local_reason or "the connection closed during the handshake"
                    )
                )
        super().connection_lost(exc)

    def connection_closed(self) -> None:
        if self.connection is not None:
            self.connection.closed()


class WebSocketConnection(Connection):
    """A client's connection to one worker process."""

    def __init__(self, peer: _ClientPeer, sink: ReplySink, response: Response) -> None:
        self._peer = peer
        self.sink = sink
        self._closing = False
        self.worker_id = response.headers.get(WORKER_HEADER)
        peer.connection = self

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._peer.transport

    def send(self, batch: Sequence[Command]) -> None:
        # Encoded now: the values in commands are the client's own copies, so the
        # chunks may point into them until they are written.
        self._peer.send_frame(encode_frame(batch))

    def closed(self) -> None:
        if not self._closing:
            self.sink.connection_lost(self._peer.error or _closed_error(self._peer))

    async def aclose(self) -> None:
        self._closing = True
        self._peer.close()
        with contextlib.suppress(builtins.TimeoutError):
            async with asyncio.timeout(self._peer.close_timeout + 1.0):
                await asyncio.shield(self._peer.closed)
        self._peer.abort("closed by the client")


def _closed_error(peer: WebSocketPeer) -> FedTensorError:
    code = peer.close_code
    reason = peer.close_reason or "no reason given"
    if code == CloseCode.MESSAGE_TOO_BIG:
        return LimitExceeded(f"the worker closed the connection: {reason}")
    if code is None or code == CloseCode.ABNORMAL_CLOSURE:
        why = f": {peer.local_reason}" if peer.local_reason else " (no close frame)"
        return WorkerUnavailable(f"the connection to the worker broke{why}")
    return WorkerUnavailable(f"the worker closed the connection (code {code}: {reason})")


class WebSocketTransport(Transport):
    """Connects to worker processes over websockets (``ws://``, ``wss://``)."""

    schemes: ClassVar[tuple[str, ...]] = ("ws", "wss")

    async def connect(
        self, url: str, sink: ReplySink, *, timeout: float, **options: Any
    ) -> WebSocketConnection:
        token: str | None = options.pop("token", None)
        session: str | None = options.pop("session", None)
        ssl: ssl_module.SSLContext | None = options.pop("ssl", None)
        max_message = int(options.pop("max_message", DEFAULT_MAX_MESSAGE))
        max_frame = int(options.pop("max_frame", DEFAULT_MAX_FRAME))
        ping_interval: float | None = options.pop("ping_interval", 20.0)
        ping_timeout: float | None = options.pop("ping_timeout", 20.0)
        if options:
            raise TypeError(f"unknown options for {url}: {', '.join(sorted(options))}")
        try:
            uri = parse_uri(url)
        except InvalidURI as exc:
            raise WorkerUnavailable(f"cannot reach a worker at {url}: {exc}") from exc
        headers = [("Authorization", f"Bearer {token}")] if token is not None else []
        if session is not None:
            headers.append((SESSION_HEADER, session))
        # wss:// verifies the worker's certificate against the system's trust store
        # unless a context is given; ws:// takes none.
        tls = (ssl or ssl_module.create_default_context()) if uri.secure else None
        loop = asyncio.get_running_loop()

        def make_peer() -> _ClientPeer:
            return _ClientPeer(
                ClientProtocol(uri, max_size=None),
                headers,
                max_message=max_message,
                max_frame=max_frame,
                ping_interval=ping_interval,
                ping_timeout=ping_timeout,
                open_timeout=timeout,
                close_timeout=min(timeout, 10.0),
            )

        peer: _ClientPeer | None = None
        try:
            async with asyncio.timeout(timeout):
                _, peer = await loop.create_connection(
                    make_peer,
                    uri.host,
                    uri.port,
                    ssl=tls,
                    server_hostname=uri.host if tls else None,
                )
                response = await peer.handshake
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status == 409:
                raise WorkerUnavailable(
                    f"the worker at {url} refused the handshake: session {session!r} is in use"
                ) from exc
            if status in (401, 403):
                raise AuthenticationFailed(
                    f"the worker at {url} refused the handshake (HTTP {status}): "
                    "missing or wrong token"
                ) from exc
            raise WorkerUnavailable(f"the worker at {url} answered HTTP {status}") from exc
        except (OSError, InvalidHandshake, builtins.TimeoutError) as exc:
            if peer is not None:
                peer.abort("the handshake failed")
            raise WorkerUnavailable(f"cannot reach a worker at {url}: {exc}") from exc
        if peer.state is not OPEN:  # failed on what came with the handshake's answer
            peer.abort("the connection failed as it opened")
            raise peer.error or _closed_error(peer)
        return WebSocketConnection(peer, sink, response)
