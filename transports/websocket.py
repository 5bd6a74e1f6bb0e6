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

Commands are encoded when the client flushes its outbox, and a writer task
sends them in order; a reader task decodes replies. Both stop when the
connection closes, and every pending wait then fails with
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

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.frames import CloseCode

from fedtensor._chunks import Reassembler, split_frame
from fedtensor._codec import Chunk, decode_frame, encode_frame
from fedtensor._exceptions import (
    AuthenticationFailed,
    FedTensorError,
    LimitExceeded,
    ProtocolError,
    WorkerUnavailable,
)
from fedtensor._messages import Command
from fedtensor._server import SESSION_HEADER, WORKER_HEADER
from fedtensor.abc import Connection, ReplySink, Transport

__all__ = ["WebSocketConnection", "WebSocketTransport"]

DEFAULT_MAX_MESSAGE = 1 << 20
DEFAULT_MAX_FRAME = 16 << 30


class WebSocketConnection(Connection):
    """A client's connection to one worker process."""

    def __init__(
        self,
        websocket: ClientConnection,
        sink: ReplySink,
        *,
        max_message: int,
        max_frame: int,
        close_timeout: float,
    ) -> None:
        self._websocket = websocket
        self._sink = sink
        self._max_message = max_message
        self._reassembler = Reassembler(max_frame)
        self._close_timeout = close_timeout
        self._closing = False
        # Encoded frames to write, in order; None: flush and stop.
        self._outgoing: asyncio.Queue[list[Chunk] | None] = asyncio.Queue()
        self.worker_id = (
            websocket.response.headers.get(WORKER_HEADER) if websocket.response else None
        )
        self._writer = asyncio.create_task(self._write(), name="fedtensor-ws-writer")
        self._reader = asyncio.create_task(self._read(), name="fedtensor-ws-reader")

    def send(self, batch: Sequence[Command]) -> None:
        # Encoded now: the values in commands are the client's own copies, so the
        # chunks may point into them until the writer has sent them.
        self._outgoing.put_nowait(encode_frame(batch))

    async def _write(self) -> None:
        websocket, outgoing = self._websocket, self._outgoing
        try:
            while (chunks := await outgoing.get()) is not None:
                for message in split_frame(chunks, self._max_message):
                    await websocket.send(message)
        except ConnectionClosed:
            pass  # the reader reports why

    async def _read(self) -> None:
        error: FedTensorError | None = None
        try:
            async for message in self._websocket:
                if isinstance(message, str):
                    raise ProtocolError("the worker sent text, not a frame")
                frame = self._reassembler.feed(message)
                if frame is not None:
                    self._sink.replies_received(decode_frame(frame))
        except ConnectionClosed:
            pass
        except (ProtocolError, LimitExceeded) as exc:
            error = exc
            await self._websocket.close(CloseCode.PROTOCOL_ERROR, str(exc)[:120])
        if error is None:
            error = _closed_error(self._websocket)
        if not self._closing:
            self._writer.cancel()  # nothing more can be sent
            self._sink.connection_lost(error)

    async def aclose(self) -> None:
        self._closing = True
        self._outgoing.put_nowait(None)
        with contextlib.suppress(builtins.TimeoutError):
            async with asyncio.timeout(self._close_timeout):
                await self._writer
        self._writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._writer
        await self._websocket.close()
        with contextlib.suppress(builtins.TimeoutError, asyncio.CancelledError):
            async with asyncio.timeout(self._close_timeout):
                await self._reader


def _closed_error(websocket: ClientConnection) -> FedTensorError:
    code = websocket.close_code
    reason = websocket.close_reason or "no reason given"
    if code == CloseCode.MESSAGE_TOO_BIG:
        return LimitExceeded(f"the worker closed the connection: {reason}")
    if code is None or code == CloseCode.ABNORMAL_CLOSURE:
        return WorkerUnavailable("the connection to the worker broke (no close frame)")
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
        headers = [("Authorization", f"Bearer {token}")] if token is not None else []
        if session is not None:
            headers.append((SESSION_HEADER, session))
        # wss:// verifies the worker's certificate against the system's trust store
        # unless a context is given; ws:// takes none.
        tls: dict[str, Any] = {"ssl": ssl} if ssl is not None and url.startswith("wss:") else {}
        try:
            websocket = await ws_connect(
                url,
                additional_headers=headers,
                compression=None,  # permessage-deflate moves tensors at ~25 MB/s
                max_size=max_message + 16,  # room for the chunk header
                open_timeout=timeout,
                close_timeout=min(timeout, 10.0),
                ping_interval=ping_interval,
                ping_timeout=ping_timeout,
                **tls,
                proxy=None,
                user_agent_header="fedtensor",
            )
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
        except (OSError, InvalidHandshake, InvalidURI, builtins.TimeoutError) as exc:
            raise WorkerUnavailable(f"cannot reach a worker at {url}: {exc}") from exc
        return WebSocketConnection(
            websocket,
            sink,
            max_message=max_message,
            max_frame=max_frame,
            close_timeout=min(timeout, 10.0),
        )
