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
- The connection gets its own :class:`~fedtensor.worker.actor.Session`: a namespace
  no other client can reach, freed when the connection ends. A client that
  names a session (``X-Fedtensor-Session``) keeps it for ``session_ttl``
  seconds after a disconnection and gets it back when it reconnects with the
  same name; a name already attached to a live connection is refused (409).
- Frames are read and written by a :class:`~fedtensor.net.peer.WebSocketPeer`
  (this module's :class:`_ServerPeer`) on the event loop. Each complete frame
  is decoded into commands (:mod:`fedtensor.protocol.codec`) and submitted in the same
  call that received it. Bytes that are not a valid frame close the
  connection with a reason and the code the fault is owed (the table in
  :mod:`fedtensor.protocol.wsconnection`: 1007 for bytes that are not a valid
  frame, 1009 for a frame over the size limit, 1008 for a message that is not
  a command). Commands beyond the pending limit are not run: their results
  become ``LimitExceeded`` errors.
- Memory held for one client is bounded in bytes as well: beyond
  :data:`READ_AHEAD` bytes of frames waiting for the actor, or of replies
  the client has not taken yet, the worker stops reading from that client
  until the actor (or the client) has caught up; TCP slows the client down.
  Control frames too: a pong (or a close frame) written while the client is
  not taking what the worker writes (the transport's buffer is past its
  high-water mark) stops reading until that buffer drains, so a client that
  pings and never reads holds a bounded buffer of pongs, not one per ping.
- A connection's objects are freed when it ends, by reference counting: the
  session's callbacks, which hold the connection, are dropped then (a detached
  named session keeps its objects, not the connection).
- Replies are encoded on the actor's thread (so a value that cannot be encoded
  fails its own fetch) and handed to the event loop, which writes them split
  into messages of at most ``max_message`` bytes.

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
from websockets.http11 import Request, Response
from websockets.server import ServerProtocol

from fedtensor.errors import LimitExceeded, ProtocolError
from fedtensor.net.peer import WebSocketPeer
from fedtensor.protocol.codec import decode_frame, encode_frame
from fedtensor.protocol.messages import Call, Fetch, ListObjects, Message, Release, Store
from fedtensor.protocol.wsframes import CloseCode
from fedtensor.worker.actor import Failed, Session, WorkerActor

__all__ = ["Limits", "WorkerServer"]

_log = logging.getLogger("fedtensor.server")

_COMMANDS = (Store, Call, Fetch, Release, ListObjects)

#: The HTTP header that names the worker in the handshake response.
WORKER_HEADER = "X-Fedtensor-Worker"
#: The HTTP header in which a client names a session that outlives its connection.
SESSION_HEADER = "X-Fedtensor-Session"

#: Bytes the worker holds for one client before it stops reading from it: frames
#: received and waiting for the actor, or replies waiting to be sent. TCP then
#: slows the client down; the worker reads on once the actor, or the client,
#: has caught up. (The pending-command limit bounds commands, not bytes.)
READ_AHEAD = 64 << 20

#: Seconds a client has to complete the handshake, and to answer a close.
_OPEN_TIMEOUT = 10.0
_CLOSE_TIMEOUT = 10.0


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
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self._grace = grace
        self._peers: set[_ServerPeer] = set()
        self._session_ttl = session_ttl
        self._attached: set[str] = set()  # named sessions with a live connection
        self._detached: dict[str, tuple[Session, asyncio.TimerHandle]] = {}
        self._stopping = asyncio.Event()
        self.url: str | None = None
        max_frame = self.limits.max_frame
        if self.limits.memory_quota is not None:
            # A frame is stored data: none may be larger than what the client may store.
            max_frame = min(max_frame, self.limits.memory_quota + self.limits.max_message)
        self.max_frame = max_frame

    # -- life cycle --------------------------------------------------------------------------------

    async def serve(
        self,
        host: str,
        port: int,
        *,
        task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port`` (0: any free port) until :meth:`shutdown`."""
        loop = asyncio.get_running_loop()
        thread = threading.Thread(
            target=self.actor.serve_in_thread, name=f"fedtensor-worker-{self.id}", daemon=True
        )
        thread.start()
        try:
            server = await loop.create_server(lambda: _ServerPeer(self), host, port, ssl=self._ssl)
            async with server:
                bound = server.sockets[0].getsockname()
                scheme = "wss" if self._ssl is not None else "ws"
                self.url = f"{scheme}://{bound[0]}:{bound[1]}"
                task_status.started(self.url)
                await self._stopping.wait()
                await self._drain_and_close(server)
        finally:
            for peer in list(self._peers):
                peer.abort("the worker stopped")
            for _session, expiry in self._detached.values():
                expiry.cancel()
            self._detached.clear()
            self.actor.close()
            await anyio.to_thread.run_sync(thread.join, self._grace)

    def shutdown(self) -> None:
        """Finish in-flight commands, close every connection, and return from :meth:`serve`."""
        self._stopping.set()

    async def _drain_and_close(self, server: asyncio.Server) -> None:
        server.close()  # no new connections
        _log.info(
            "shutting down: finishing the commands received, then closing %d connections",
            len(self._peers),
        )
        finished = asyncio.Event()
        loop = asyncio.get_running_loop()
        # Everything received before this point runs before the barrier is reached;
        # its replies are handed to the loop before ``finished`` is set.
        self.actor.barrier(lambda: _call_soon(loop, finished.set))
        with anyio.move_on_after(self._grace):
            await finished.wait()
        peers = list(self._peers)
        for peer in peers:
            peer.close(CloseCode.GOING_AWAY, "worker shutting down")  # after the queued replies
        with anyio.move_on_after(self._grace):
            for peer in peers:
                await peer.closed

    # -- handshake ---------------------------------------------------------------------------------

    def _authenticate(
        self, peer: _ServerPeer, protocol: ServerProtocol, request: Request
    ) -> Response | None:
        """A response refusing the handshake, or None to accept it."""
        if self._token is not None:
            given = request.headers.get("Authorization", "")
            scheme, _, credentials = given.partition(" ")
            # compare_digest takes the same time whatever the first differing byte.
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                credentials.encode(), self._token
            ):
                _log.warning(
                    "refused a handshake from %s: bad or missing token", peer.remote_address
                )
                response = protocol.reject(HTTPStatus.UNAUTHORIZED, "missing or invalid token\n")
                response.headers["WWW-Authenticate"] = 'Bearer realm="fedtensor"'
                return response
        name = request.headers.get(SESSION_HEADER)
        if name is not None and name in self._attached:
            return protocol.reject(HTTPStatus.CONFLICT, "that session is in use\n")
        return None

    # -- one connection ----------------------------------------------------------------------------

    def _connected(self, peer: _ServerPeer, name: str | None) -> None:
        loop = asyncio.get_running_loop()
        loop_thread = threading.get_ident()

        def deliver(replies: list[Message]) -> None:
            # On the actor's thread, or on this one for commands run inline.
            # Encoding here lets a value that cannot be encoded fail its own
            # fetch (the actor retries reply by reply).
            chunks = encode_frame(replies)
            if threading.get_ident() == loop_thread:
                peer.send_frame(chunks)
            else:
                loop.call_soon_threadsafe(peer.send_frame, chunks)

        def lost(exc: BaseException) -> None:
            loop.call_soon_threadsafe(peer.close, CloseCode.GOING_AWAY, "worker shutting down")

        peer.name = name
        peer.session = self._attach(name, deliver, lost)
        self._peers.add(peer)
        _log.info("client %s connected (session %s)", peer.remote_address, name)

    def _disconnected(self, peer: _ServerPeer) -> None:
        self._peers.discard(peer)
        session, name = peer.session, peer.name
        if session is None:
            return
        # The session's callbacks hold the peer, and the peer the session: a cycle,
        # and for a named session a closed connection kept for session_ttl.
        peer.session = None
        session.deliver, session.lost = _drop_replies, _ignore_loss
        count = len(session.objects)
        if name is None:
            session.close()
            _log.info(
                "client %s disconnected; its %d objects are freed", peer.remote_address, count
            )
        else:
            self._detach(name, session)
            _log.info(
                "client %s disconnected; session %s keeps its %d objects for %g s",
                peer.remote_address,
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
        session.lost = _ignore_loss
        loop = asyncio.get_running_loop()
        expiry = loop.call_later(self._session_ttl, self._expire, name)
        self._detached[name] = (session, expiry)

    def _expire(self, name: str) -> None:
        kept = self._detached.pop(name, None)
        if kept is not None:
            kept[0].close()
            _log.info("session %s expired; its objects are freed", name)

    def _frame_received(self, peer: _ServerPeer, frame: memoryview) -> None:
        session, limits = peer.session, self.limits
        assert session is not None
        try:
            batch = decode_frame(frame)
        except (LimitExceeded, ProtocolError) as exc:
            peer.reject(exc)  # the code it is owed, as on the client
            return
        stray = next((m for m in batch if not isinstance(m, _COMMANDS)), None)
        if stray is not None:
            peer.fail(CloseCode.POLICY_VIOLATION, f"{type(stray).__name__} is not a command")
            return
        if session.pending + len(batch) > limits.max_pending:
            if session.pending > 2 * limits.max_pending:
                # Refusing costs queue space too: a client that keeps
                # flooding is cut off rather than allowed to grow it.
                peer.fail(CloseCode.POLICY_VIOLATION, f"over {limits.max_pending} pending commands")
                return
            batch = _refuse(batch, limits.max_pending)
        if self.actor.run_inline(session, batch):
            peer.queued += len(frame)
            if peer.queued > READ_AHEAD and "queued" not in peer.holds:
                # Read on once the actor has run everything queued so far.
                peer.hold("queued")
                loop = asyncio.get_running_loop()
                self.actor.barrier(lambda: _call_soon(loop, peer.actor_caught_up))
        _log.debug("received %d commands from %s", len(batch), peer.remote_address)


class _ServerPeer(WebSocketPeer):
    """The worker's end of one client's connection."""

    client = False

    def __init__(self, server: WorkerServer) -> None:
        super().__init__(
            max_message=server.limits.max_message,
            max_frame=server.max_frame,
            ping_interval=server.ping_interval,
            ping_timeout=server.ping_timeout,
            open_timeout=_OPEN_TIMEOUT,
            close_timeout=_CLOSE_TIMEOUT,
        )
        self.server = server
        self.session: Session | None = None
        self.name: str | None = None
        #: Bytes of frames queued for the actor since it last caught up.
        self.queued = 0
        #: Why reading from this client is paused ("queued", "unsent", "control");
        #: empty: reading.
        self.holds: set[str] = set()

    def handshake_received(self, head: bytes) -> bool:
        assert self.transport is not None
        protocol = ServerProtocol(logger=_log)
        protocol.receive_data(head)
        events = protocol.events_received()
        request = events[0] if events else None
        if not isinstance(request, Request) or protocol.handshake_exc is not None:
            response = protocol.reject(HTTPStatus.BAD_REQUEST, "not a websocket handshake\n")
        else:
            response = self.server._authenticate(self, protocol, request) or protocol.accept(
                request
            )
        if response.status_code == 101:
            response.headers[WORKER_HEADER] = self.server.id
        protocol.send_response(response)
        for data in protocol.data_to_send():
            if data:
                self.transport.write(data)
        if response.status_code != 101:
            self.transport.close()
            return False
        assert isinstance(request, Request)
        self.opened()
        self.server._connected(self, request.headers.get(SESSION_HEADER))
        return True

    def frame_received(self, frame: memoryview) -> None:
        self.server._frame_received(self, frame)

    def hold(self, reason: str) -> None:
        if not self.holds and self.transport is not None:
            _log.debug("stop reading from %s: %s", self.remote_address, reason)
            self.transport.pause_reading()
        self.holds.add(reason)

    def release(self, reason: str) -> None:
        if reason in self.holds:
            self.holds.discard(reason)
            if not self.holds and self.transport is not None and not self.transport.is_closing():
                _log.debug("read from %s again", self.remote_address)
                self.transport.resume_reading()

    def control_backed_up(self) -> None:
        if "control" not in self.holds:  # called for each pong until writing resumes
            self.hold("control")

    def resume_writing(self) -> None:
        self.release("control")  # what the client had not taken is down to the low mark
        super().resume_writing()

    def actor_caught_up(self) -> None:
        self.queued = 0
        self.release("queued")

    def unsent_changed(self) -> None:
        if self.unsent > READ_AHEAD:
            self.hold("unsent")
        elif self.holds:
            self.release("unsent")

    def connection_closed(self) -> None:
        self.server._disconnected(self)


def _drop_replies(replies: list[Message]) -> None:
    pass


def _ignore_loss(exc: BaseException) -> None:
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
