"""A worker served over websockets: the network face of a :class:`WorkerActor`.

Theory of operation
-------------------
One :class:`WorkerServer` owns one actor, which runs on a thread of its own so
that this event loop stays free for I/O: handshakes, pings and other clients
are answered while a long operation computes.

Per connection:

- The handshake is refused (HTTP 401) unless it carries the worker's token as
  ``Authorization: Bearer <token>``; tokens are compared in constant time. The
  response names the worker in ``X-Fedtensor-Worker``.
- The connection gets its own :class:`~fedtensor._worker.Session`: a namespace
  no other client can reach, freed when the connection ends. A client that
  names a session (``X-Fedtensor-Session``) keeps it for ``session_ttl``
  seconds after a disconnection and gets it back when it reconnects with the
  same name; a name already attached to a live connection is refused (409).
- A reader turns messages into frames (:mod:`fedtensor._chunks`) and frames
  into commands (:mod:`fedtensor._codec`) and submits them. Bytes that are not
  a valid frame close the connection with a reason (1007; 1009 for a frame over
  the size limit; 1008 for a message that is not a command). Commands beyond
  the pending limit are not run: their results become ``LimitExceeded`` errors.
- Replies are encoded on the actor's thread (so a value that cannot be encoded
  fails its own fetch) and written by a writer task, split into messages of at
  most ``max_message`` bytes.

Shutdown (:meth:`WorkerServer.shutdown`, on SIGINT/SIGTERM in the CLI) stops
accepting connections, lets the actor finish every command already received,
sends their replies, then closes each connection with 1001 (going away).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import ssl as ssl_module
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus

import anyio
import anyio.abc
import torch
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from ._chunks import Reassembler, split_frame
from ._codec import Chunk, decode_frame, encode_frame
from ._exceptions import LimitExceeded, ProtocolError
from ._messages import Call, Fetch, ListObjects, Message, Release, Store
from ._worker import Failed, Session, WorkerActor

__all__ = ["Limits", "WorkerServer"]

_log = logging.getLogger("fedtensor.server")

_COMMANDS = (Store, Call, Fetch, Release, ListObjects)

#: The HTTP header that names the worker in the handshake response.
WORKER_HEADER = "X-Fedtensor-Worker"
#: The HTTP header in which a client names a session that outlives its connection.
SESSION_HEADER = "X-Fedtensor-Session"


@dataclass(frozen=True)
class Limits:
    """What one client may ask of a worker."""

    #: Bytes in one websocket message; larger frames are split by the transport.
    max_message: int = 1 << 20
    #: Bytes in one frame (a batch of commands, tensors included).
    max_frame: int = 4 << 30
    #: Bytes of tensors one client may keep stored; ``None``: no bound.
    memory_quota: int | None = None
    #: Commands one client may have received and not yet run.
    max_pending: int = 100_000


class _Link:
    """One client connection: its session and its queue of outgoing frames."""

    def __init__(self, connection: ServerConnection, session: Session) -> None:
        self.connection = connection
        self.session = session
        # Encoded reply frames to write; None: close the connection (going away).
        self.outgoing: asyncio.Queue[list[Chunk] | None] = asyncio.Queue()


class WorkerServer:
    """Serves one worker actor to websocket clients."""

    def __init__(
        self,
        id: str,
        *,
        token: str | None,
        limits: Limits | None = None,
        ssl: ssl_module.SSLContext | None = None,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        grace: float = 30.0,
        session_ttl: float = 300.0,
        datasets: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        self.id = id
        self.limits = limits or Limits()
        self.actor = WorkerActor(id, threaded=True, datasets=datasets)
        self._token = token.encode() if token is not None else None
        self._ssl = ssl
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._grace = grace
        self._links: set[_Link] = set()
        self._session_ttl = session_ttl
        self._attached: set[str] = set()  # named sessions with a live connection
        self._detached: dict[str, tuple[Session, asyncio.TimerHandle]] = {}
        self._server: Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = asyncio.Event()
        self.url: str | None = None

    # -- life cycle --------------------------------------------------------------------------------

    async def serve(
        self,
        host: str,
        port: int,
        *,
        task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port`` (0: any free port) until :meth:`shutdown`."""
        self._loop = asyncio.get_running_loop()
        thread = threading.Thread(
            target=self.actor.serve_in_thread, name=f"fedtensor-worker-{self.id}", daemon=True
        )
        thread.start()
        try:
            async with serve(
                self._handle,
                host,
                port,
                process_request=self._authenticate,
                process_response=self._name_worker,
                compression=None,  # permessage-deflate moves tensors at ~25 MB/s
                max_size=self.limits.max_message + 16,  # room for the chunk header
                ping_interval=self._ping_interval,
                ping_timeout=self._ping_timeout,
                ssl=self._ssl,
                server_header=None,
            ) as server:
                self._server = server
                bound = server.sockets[0].getsockname()
                scheme = "wss" if self._ssl is not None else "ws"
                self.url = f"{scheme}://{bound[0]}:{bound[1]}"
                task_status.started(self.url)
                await self._stopping.wait()
                await self._drain_and_close(server)
        finally:
            for _session, expiry in self._detached.values():
                expiry.cancel()
            self._detached.clear()
            self.actor.close()
            await anyio.to_thread.run_sync(thread.join, self._grace)

    def shutdown(self) -> None:
        """Finish in-flight commands, close every connection, and return from :meth:`serve`."""
        self._stopping.set()

    async def _drain_and_close(self, server: Server) -> None:
        server.close(close_connections=False)  # no new connections
        finished = asyncio.Event()
        loop = asyncio.get_running_loop()
        # Everything received before this point runs before the barrier is reached.
        self.actor.barrier(lambda: _call_soon(loop, finished.set))
        with anyio.move_on_after(self._grace):
            await finished.wait()
        for link in list(self._links):
            link.outgoing.put_nowait(None)  # after the replies already queued
        with anyio.move_on_after(self._grace):
            await server.wait_closed()

    # -- handshake ---------------------------------------------------------------------------------

    def _authenticate(self, connection: ServerConnection, request: Request) -> Response | None:
        if self._token is not None:
            given = request.headers.get("Authorization", "")
            scheme, _, credentials = given.partition(" ")
            # compare_digest takes the same time whatever the first differing byte.
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                credentials.encode(), self._token
            ):
                _log.warning(
                    "refused a handshake from %s: bad or missing token", connection.remote_address
                )
                response = connection.respond(HTTPStatus.UNAUTHORIZED, "missing or invalid token\n")
                response.headers["WWW-Authenticate"] = 'Bearer realm="fedtensor"'
                return response
        name = request.headers.get(SESSION_HEADER)
        if name is not None and name in self._attached:
            return connection.respond(HTTPStatus.CONFLICT, "that session is in use\n")
        return None

    def _name_worker(
        self, connection: ServerConnection, request: Request, response: Response
    ) -> Response:
        headers: Headers = response.headers
        headers[WORKER_HEADER] = self.id
        return response

    # -- one connection ----------------------------------------------------------------------------

    async def _handle(self, connection: ServerConnection) -> None:
        loop = asyncio.get_running_loop()
        link: _Link | None = None

        def deliver(replies: list[Message]) -> None:
            # On the actor's thread: encoding here lets a value that cannot be
            # encoded fail its own fetch (the actor retries reply by reply).
            chunks = encode_frame(replies)
            loop.call_soon_threadsafe(outgoing_put, chunks)

        def lost(exc: BaseException) -> None:
            loop.call_soon_threadsafe(outgoing_put, None)

        def outgoing_put(chunks: list[Chunk] | None) -> None:
            if link is not None:
                link.outgoing.put_nowait(chunks)

        assert connection.request is not None
        name = connection.request.headers.get(SESSION_HEADER)
        session = self._attach(name, deliver, lost)
        link = _Link(connection, session)
        self._links.add(link)
        _log.info("client %s connected (session %s)", connection.remote_address, name)
        try:
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(self._write, link)
                await self._read(link)
                # The reader ended (the client left, or was closed for bad input).
                task_group.cancel_scope.cancel()
        finally:
            self._links.discard(link)
            count = len(session.objects)
            if name is None:
                session.close()
                _log.info(
                    "client %s disconnected; its %d objects are freed",
                    connection.remote_address,
                    count,
                )
            else:
                self._detach(name, session)
                _log.info(
                    "client %s disconnected; session %s keeps its %d objects for %g s",
                    connection.remote_address,
                    name,
                    count,
                    self._session_ttl,
                )

    def _attach(
        self,
        name: str | None,
        deliver: Callable[[list[Message]], None],
        lost: Callable[[BaseException], None],
    ) -> Session:
        """A new session, or the named session a reconnecting client left behind."""
        if name is not None:
            self._attached.add(name)
            kept = self._detached.pop(name, None)
            if kept is not None:
                session, expiry = kept
                expiry.cancel()
                session.deliver, session.lost = deliver, lost
                return session
        return self.actor.open_session(
            deliver, lost, aliases_values=True, memory_quota=self.limits.memory_quota
        )

    def _detach(self, name: str, session: Session) -> None:
        """Keep a named session's objects for ``session_ttl`` seconds, for a reconnection."""
        self._attached.discard(name)
        session.deliver = _drop_replies  # nobody to answer until the client is back
        loop = asyncio.get_running_loop()
        expiry = loop.call_later(self._session_ttl, self._expire, name)
        self._detached[name] = (session, expiry)

    def _expire(self, name: str) -> None:
        kept = self._detached.pop(name, None)
        if kept is not None:
            kept[0].close()
            _log.info("session %s expired; its objects are freed", name)

    async def _read(self, link: _Link) -> None:
        connection, session, limits = link.connection, link.session, self.limits
        max_frame = limits.max_frame
        if limits.memory_quota is not None:
            # A frame is stored data: none may be larger than what the client may store.
            max_frame = min(max_frame, limits.memory_quota + limits.max_message)
        reassembler = Reassembler(max_frame)
        try:
            async for message in connection:
                if isinstance(message, str):
                    await _close(connection, CloseCode.UNSUPPORTED_DATA, "text is not a frame")
                    return
                try:
                    frame = reassembler.feed(message)
                    if frame is None:
                        continue
                    batch = decode_frame(frame)
                except LimitExceeded as exc:
                    await _close(connection, CloseCode.MESSAGE_TOO_BIG, str(exc))
                    return
                except ProtocolError as exc:
                    await _close(connection, CloseCode.INVALID_DATA, f"bad frame: {exc}")
                    return
                stray = next((m for m in batch if not isinstance(m, _COMMANDS)), None)
                if stray is not None:
                    reason = f"{type(stray).__name__} is not a command"
                    await _close(connection, CloseCode.POLICY_VIOLATION, reason)
                    return
                if session.pending + len(batch) > limits.max_pending:
                    if session.pending > 2 * limits.max_pending:
                        # Refusing costs queue space too: a client that keeps
                        # flooding is cut off rather than allowed to grow it.
                        reason = f"over {limits.max_pending} pending commands"
                        await _close(connection, CloseCode.POLICY_VIOLATION, reason)
                        return
                    batch = _refuse(batch, limits.max_pending)
                session.submit(batch)
                _log.debug("received %d commands from %s", len(batch), connection.remote_address)
        except ConnectionClosed:
            pass

    async def _write(self, link: _Link) -> None:
        connection, outgoing = link.connection, link.outgoing
        max_message = self.limits.max_message
        try:
            while True:
                chunks = await outgoing.get()
                if chunks is None:
                    await connection.close(CloseCode.GOING_AWAY, "worker shutting down")
                    return
                for message in split_frame(chunks, max_message):
                    await connection.send(message)
        except ConnectionClosed:
            pass


def _drop_replies(replies: list[Message]) -> None:
    pass


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], object]) -> None:
    loop.call_soon_threadsafe(callback)


def _refuse(batch: Sequence[Message], max_pending: int) -> list[Message]:
    """``batch`` with every result replaced by a limit error (fetches then report it)."""
    failure = Failed(
        "limit",
        "TooManyPendingCommands",
        f"the client has more than {max_pending} commands waiting on the worker",
    )
    refused: list[Message] = []
    for message in batch:
        if isinstance(message, Call | Store):
            refused.append(Store(message.id, failure))
        else:
            refused.append(message)
    return refused


async def _close(connection: ServerConnection, code: CloseCode, reason: str) -> None:
    # A close reason must fit in a control frame: 123 bytes of UTF-8.
    encoded = reason.encode()[:123]
    _log.warning("closing %s: %s", connection.remote_address, reason)
    await connection.close(code, encoded.decode(errors="ignore"))
