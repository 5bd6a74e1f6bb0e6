"""A worker served over websockets: the network face of a :class:`WorkerActor`.

Theory of operation
-------------------
One :class:`WorkerServer` owns one actor, which computes on a few threads of its
own (``compute_threads``: a lane per client, run round robin; see
:mod:`fedtensor.worker.scheduler`) so that this event loop stays free for I/O
(handshakes, pings and other clients are answered while a long operation
computes) and so that one client's long operation does not hold up another's.

Before authentication a connection costs almost nothing and cannot linger:

- The worker accepts TCP connections itself (:meth:`WorkerServer._accept`), so
  that past ``Limits.max_unauthenticated`` connections that have not completed
  the handshake, a new one is closed the moment it is accepted: nothing is
  allocated for it, and clients already connected are served on.
- A connection has ``Limits.handshake_timeout`` seconds from its TCP accept to
  an accepted websocket handshake, the TLS handshake of ``wss://`` included
  (one timer, the peer's, runs from the accept), else TCP is dropped.
- Until then it holds a 1 KiB read buffer and the head received so far (at
  most :data:`MAX_REQUEST_HEAD` bytes); the frame parser and its buffers come
  with the open connection (see :mod:`fedtensor.net.peer`). On ``wss://``, TLS
  is driven by a :class:`~fedtensor.net.tls.TLSLayer` (not asyncio's ``ssl=``,
  whose 256 KiB read buffer comes with every accepted connection): nothing of
  OpenSSL's until the first byte, its connection state (about 16 KiB) once TLS
  is done, and buffers as small as on ``ws://`` until the handshake is accepted.

Per connection:

- The handshake is refused (HTTP 401) unless it carries the worker's token as
  ``Authorization: Bearer <token>``; tokens are compared in constant time. The
  response names the worker in ``X-Fedtensor-Worker``. The one exception is
  another worker delivering a tensor (``ptr.move``): its handshake carries a
  one-time capability this worker issued and a proof made with the federation
  key instead (403 otherwise), and the connection may only store one value where
  the capability says (:mod:`fedtensor.worker.delivery`).
- The connection gets its own :class:`~fedtensor.worker.actor.Session`: a namespace
  no other client can reach, freed when the connection ends. A client that
  names a session (``X-Fedtensor-Session``) keeps it for ``session_ttl``
  seconds after a disconnection and gets it back when it reconnects with the
  same name; a name already attached to a live connection is refused (409).
- Frames are read and written by a :class:`~fedtensor.net.peer.WebSocketPeer`
  (this module's :class:`_ServerPeer`) on the event loop. Each complete frame
  is decoded into commands (:mod:`fedtensor.protocol.codec`) and submitted in the same
  call that received it; a frame of :data:`DECODE_ON_LOOP_BELOW` bytes or more
  is decoded on the client's lane instead, in order with its commands, since
  decoding takes time linear in the frame's items. Bytes that are not a valid frame close the
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
  Replies are bounded before they exist: a fetch that would take the replies
  computed and not yet written past :data:`READ_AHEAD` waits, with the
  client's later commands, until the client has read enough (the session is
  parked; see :class:`fedtensor.worker.budget.Replies`), so a small frame of
  many fetches of a large tensor costs at most that much.
- Everything a client stores, and what one of its operations would allocate,
  is counted against ``Limits.memory_quota`` (by default a quarter of the
  machine's memory; see :mod:`fedtensor.worker.budget`).
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
import socket
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
from fedtensor.net.tls import TLSLayer
from fedtensor.protocol.codec import Chunk, decode_frame, decoded_bound, encode_frame
from fedtensor.protocol.messages import Call, Fetch, ListObjects, Message, Release, Store
from fedtensor.protocol.pool import release_idle, steady_allocator
from fedtensor.protocol.wsconnection import close_code_for
from fedtensor.protocol.wsframes import CloseCode
from fedtensor.worker.actor import Failed, Session, WorkerActor
from fedtensor.worker.budget import Replies, default_budget
from fedtensor.worker.capabilities import CAPABILITY_HEADER, DEFAULT_TTL, CapabilityIssuer, Grant
from fedtensor.worker.delivery import admit_delivery, delivery_received, send_blocking
from fedtensor.worker.scheduler import default_compute_threads

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

#: Bytes a frame may take to decode (decoded_bound) even past what is left of the
#: client's budget: its stores are then refused one by one (LimitExceeded), the
#: connection kept. A frame that could take more, and more than is left, closes the
#: connection with 1009 before it is decoded.
_DECODE_SLACK = 16 << 20

#: Seconds a client has to answer a close.
_CLOSE_TIMEOUT = 10.0

#: Frames at least this long are decoded on the client's lane, not on the event loop.
DECODE_ON_LOOP_BELOW = 16 << 10

#: Bytes of a client's HTTP upgrade request the worker reads before it gives up
#: (a real one is a few hundred bytes).
MAX_REQUEST_HEAD = 8 << 10

#: Connections the kernel queues for the worker to accept.
_BACKLOG = 512


@dataclass(frozen=True)
class Limits:
    """What one client may ask of a worker."""

    #: Bytes in one websocket message; larger frames are split by the transport.
    max_message: int = 1 << 20
    #: Bytes in one frame (a batch of commands, tensors included).
    max_frame: int = 4 << 30
    #: Bytes one client may hold on the worker: every value it stores, and what
    #: one of its operations may allocate (see :mod:`fedtensor.worker.budget`);
    #: by default a quarter of the machine's memory; ``None``: no bound.
    memory_quota: int | None = default_budget()
    #: Commands one client may have received and not yet run.
    max_pending: int = 100_000
    #: Seconds from a connection's TCP accept to its accepted websocket handshake,
    #: the TLS handshake included.
    handshake_timeout: float = 10.0
    #: Connections at once that have not completed the handshake; more are closed
    #: as soon as they are accepted.
    max_unauthenticated: int = 256


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
        dataset_tags: Mapping[str, Sequence[str]] | None = None,
        federation_key: bytes | None = None,
        advertise_url: str | None = None,
        capability_ttl: float = DEFAULT_TTL,
        compute_threads: int | None = None,
    ) -> None:
        self.id = id
        self.limits = limits or Limits()
        #: Threads that run clients' commands, round robin by client (worker/scheduler.py).
        self.compute_threads = compute_threads or default_compute_threads()
        self.actor = WorkerActor(id, threaded=True, datasets=datasets)
        # Tags for held data sets, and moving tensors between workers (worker/delivery.py).
        self.advertise_url = advertise_url
        self._loop: asyncio.AbstractEventLoop | None = None
        exchange = self.actor.exchange
        exchange.set_dataset_tags(dataset_tags)
        exchange.federation_key = federation_key
        exchange.issuer = CapabilityIssuer(
            id,
            federation_key,
            lambda: self.advertise_url or self.url,
            ttl=capability_ttl,
            max_message=self.limits.max_message,
        )
        exchange.send = lambda *args: send_blocking(self._loop, *args)
        self._token = token.encode() if token is not None else None
        self._ssl = ssl
        if ssl is not None:
            # A TLS 1.2 client's renegotiation: not needed, and a write during one would end
            # the connection (fedtensor/net/tls.py). TLS 1.3 has none.
            ssl.options |= ssl_module.OP_NO_RENEGOTIATION
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self._grace = grace
        self._peers: set[_ServerPeer] = set()
        #: Connections accepted whose handshake is not done (TLS included).
        self._handshaking: set[_ServerPeer] = set()
        self._starting: set[asyncio.Task[None]] = set()
        #: Connections closed at once because ``max_unauthenticated`` were handshaking.
        self.refused = 0
        self._refusal_logged_at = -1e9
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
        loop = self._loop = asyncio.get_running_loop()
        steady_allocator()  # large blocks mapped, not pinned in the heaps (protocol/pool.py)
        threads = [
            threading.Thread(
                target=self.actor.serve_in_thread,
                name=f"fedtensor-worker-{self.id}-{number}",
                daemon=True,
            )
            for number in range(self.compute_threads)
        ]
        for thread in threads:
            thread.start()
        accepting: list[asyncio.Task[None]] = []
        try:
            listener = await _listen(host, port)
            try:
                accepting.append(loop.create_task(self._accept(listener)))
                bound = listener.getsockname()
                scheme = "wss" if self._ssl is not None else "ws"
                self.url = f"{scheme}://{bound[0]}:{bound[1]}"
                task_status.started(self.url)
                await self._stopping.wait()
                await self._drain_and_close(listener, accepting)
            finally:
                listener.close()
        finally:
            tasks = accepting + list(self._starting)
            for task in tasks:
                task.cancel()
            for peer in list(self._peers | self._handshaking):
                peer.abort("the worker stopped")
            await asyncio.gather(*tasks, return_exceptions=True)
            for _session, expiry in self._detached.values():
                expiry.cancel()
            self._detached.clear()
            self.actor.close()
            for thread in threads:
                await anyio.to_thread.run_sync(thread.join, self._grace)

    def shutdown(self) -> None:
        """Finish in-flight commands, close every connection, and return from :meth:`serve`."""
        self._stopping.set()

    async def _drain_and_close(
        self, listener: socket.socket, accepting: list[asyncio.Task[None]]
    ) -> None:
        for task in accepting:  # no new connections
            task.cancel()
        listener.close()
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

    # -- accepting ---------------------------------------------------------------------------------

    async def _accept(self, listener: socket.socket) -> None:
        """Accept connections until cancelled, closing at once those past the cap."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                connection, _ = await loop.sock_accept(listener)
            except OSError as exc:  # out of file descriptors, say: the next may work
                _log.warning("cannot accept a connection: %s", exc)
                await asyncio.sleep(0.1)  # not a busy loop while it lasts
                continue
            self._accepted(connection)
            # (No local may keep the last connection's peer alive while waiting.)
            del connection

    def _accepted(self, connection: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        if len(self._handshaking) >= self.limits.max_unauthenticated:
            connection.close()
            self.refused += 1
            now = loop.time()
            if now - self._refusal_logged_at > 10.0:
                self._refusal_logged_at = now
                _log.warning(
                    "refusing connections: %d are handshaking (--max-unauthenticated)",
                    len(self._handshaking),
                )
            return
        peer = _ServerPeer(self)
        self._handshaking.add(peer)
        task = loop.create_task(self._start(peer, connection))
        self._starting.add(task)
        task.add_done_callback(self._starting.discard)

    async def _start(self, peer: _ServerPeer, connection: socket.socket) -> None:
        """Make ``connection`` ``peer``'s transport (through a TLSLayer, for wss)."""
        loop = asyncio.get_running_loop()
        context = self._ssl
        try:
            if context is None:
                await loop.connect_accepted_socket(lambda: peer, connection)
            else:
                # Not asyncio's ssl=: its 256 KiB buffer per connection comes before the
                # token is checked. The TLS handshake is timed by the peer's handshake timer.
                await loop.connect_accepted_socket(lambda: TLSLayer(context, peer), connection)
        except Exception as exc:  # a reset before asyncio took the socket
            _log.debug("a connection ended before its handshake: %r", exc)
            connection.close()
            peer.handshake_over()

    # -- handshake ---------------------------------------------------------------------------------

    def _authenticate(
        self, peer: _ServerPeer, protocol: ServerProtocol, request: Request
    ) -> Response | None:
        """A response refusing the handshake, or None to accept it."""
        if CAPABILITY_HEADER in request.headers:  # another worker delivering a tensor
            return admit_delivery(self.actor.exchange.issuer, peer, protocol, request)
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
        if peer.delivery is not None:  # no session of its own: see worker/delivery.py
            self._peers.add(peer)
            return
        loop = asyncio.get_running_loop()
        loop_thread = threading.get_ident()
        # Replies not taken yet, bounded per client (see fedtensor.worker.budget.Replies).
        gate = Replies(
            READ_AHEAD,
            lambda: peer.unsent,
            lambda: loop.call_soon_threadsafe(peer.replies_sent),  # stop reading from it
        )

        def send(chunks: list[Chunk], size: int) -> None:
            peer.send_frame(chunks)  # counted in peer.unsent (or dropped) first...
            gate.arrived += size  # ...then no longer in flight
            peer.replies_sent()

        def deliver(replies: list[Message]) -> None:
            # On the actor's thread, or on this one for commands run inline.
            # Encoding here lets a value that cannot be encoded fail its own
            # fetch (the actor retries reply by reply).
            chunks = encode_frame(replies)
            size = sum(memoryview(chunk).nbytes for chunk in chunks)
            gate.hand_on(replies, size)
            if threading.get_ident() == loop_thread:
                send(chunks, size)
            else:
                loop.call_soon_threadsafe(send, chunks, size)

        def lost(exc: BaseException) -> None:
            loop.call_soon_threadsafe(peer.close, CloseCode.GOING_AWAY, "worker shutting down")

        peer.name = name
        peer.session = self._attach(name, deliver, lost)
        peer.session.replies = gate
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
        session.replies = None  # it reads the peer's unsent bytes: part of the cycle
        count = len(session.objects)
        if name is None:
            session.close()
            _log.info(
                "client %s disconnected; its %d objects are freed", peer.remote_address, count
            )
        else:
            self._detach(name, session)
            session.resume_if_drained()  # commands held for replies run, the replies dropped
            _log.info(
                "client %s disconnected; session %s keeps its %d objects for %g s",
                peer.remote_address,
                name,
                count,
                self._session_ttl,
            )
        if not any(other.session is not None for other in self._peers):
            # The last client left: once what it queued has run (its objects freed), the
            # buffers kept for large transfers and the allocator's free pages go back to
            # the system (protocol/pool.py): a worker at rest holds what it held at start.
            self.actor.barrier(release_idle)

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
        if peer.delivery is not None:
            delivery_received(peer, frame)
            return
        session = peer.session
        assert session is not None
        if peer.faulted:  # a deferred frame was bad: the connection is closing
            return
        if len(frame) >= DECODE_ON_LOOP_BELOW:
            # Decoding takes time linear in the frame's items (a 4 MB frame of empty
            # lists: seconds), which would hold up every client and ping here: a
            # large frame is decoded on the client's lane, in order with its commands.
            loop = asyncio.get_running_loop()
            self.actor.defer(session, lambda: self._commands(peer, session, frame, loop))
            batch: Sequence[Message] | None = ()
            submitted = True
        else:
            batch = self._commands(peer, session, frame, None)
            if batch is None:
                return
            submitted = self.actor.run_inline(session, batch)
        if submitted:
            peer.queued += len(frame)
            if peer.queued > READ_AHEAD and "queued" not in peer.holds:
                # Read on once the actor has run everything this client queued so far.
                peer.hold("queued")
                loop = asyncio.get_running_loop()
                self.actor.barrier(lambda: _call_soon(loop, peer.actor_caught_up), session)
        if session.parked is not None:  # held for replies not taken: read no more
            peer.replies_sent()

    def _commands(
        self,
        peer: _ServerPeer,
        session: Session,
        frame: memoryview,
        loop: asyncio.AbstractEventLoop | None,
    ) -> Sequence[Message] | None:
        """The commands in ``frame``, or None after failing the connection for it.

        On the event loop (``loop`` None), or on the client's lane (``loop`` the event
        loop, to which a fault is handed).
        """
        if peer.faulted:
            return None
        limits = self.limits

        def fault(code: int, reason: str) -> None:
            if loop is None:
                peer.fail(code, reason)
            else:
                peer.faulted = True  # this client's frames queued behind it are dropped
                loop.call_soon_threadsafe(peer.fail, code, reason)

        ledger = session.ledger
        bound = decoded_bound(frame) if ledger is not None else 0
        if ledger is not None and bound > max(ledger.remaining, _DECODE_SLACK):
            # Decoding allocates before any store is charged: a frame of empty lists
            # grows 64-fold. Refused before it allocates, like a frame over max_frame.
            # (Under the slack it is decoded, and its stores refused one by one.)
            fault(
                CloseCode.MESSAGE_TOO_BIG,
                f"decoding this frame could take {bound} bytes, past the "
                f"{ledger.remaining} bytes left of the client's memory budget",
            )
            return None
        try:
            batch = decode_frame(frame)
        except (LimitExceeded, ProtocolError) as exc:
            # The code it is owed, as on the client.
            reason = str(exc) if isinstance(exc, LimitExceeded) else f"bad frame: {exc}"
            fault(close_code_for(exc), reason)
            return None
        stray = next((m for m in batch if not isinstance(m, _COMMANDS)), None)
        if stray is not None:
            fault(CloseCode.POLICY_VIOLATION, f"{type(stray).__name__} is not a command")
            return None
        if session.pending + len(batch) > limits.max_pending:
            if session.pending > 2 * limits.max_pending:
                # Refusing costs queue space too: a client that keeps
                # flooding is cut off rather than allowed to grow it.
                fault(CloseCode.POLICY_VIOLATION, f"over {limits.max_pending} pending commands")
                return None
            batch = _refuse(batch, limits.max_pending)
        _log.debug("received %d commands from %s", len(batch), peer.remote_address)
        return batch


class _ServerPeer(WebSocketPeer):
    """The worker's end of one client's connection."""

    client = False
    max_head = MAX_REQUEST_HEAD

    def __init__(self, server: WorkerServer) -> None:
        super().__init__(
            max_message=server.limits.max_message,
            max_frame=server.max_frame,
            ping_interval=server.ping_interval,
            ping_timeout=server.ping_timeout,
            open_timeout=server.limits.handshake_timeout,
            close_timeout=_CLOSE_TIMEOUT,
        )
        self.server = server
        #: When the handshake must be done by: from the TCP accept, TLS included.
        self._deadline = self.loop.time() + server.limits.handshake_timeout
        self.session: Session | None = None
        #: What a delivery connection from another worker may store (worker/delivery.py).
        self.delivery: Grant | None = None
        self.name: str | None = None
        #: Bytes of frames queued for the actor since it last caught up.
        self.queued = 0
        #: A frame decoded off the loop was bad: the connection is being failed.
        self.faulted = False
        #: Why reading from this client is paused ("queued", "unsent", "control");
        #: empty: reading.
        self.holds: set[str] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The handshake's time runs from the TCP accept (on wss, the TLSLayer calls this
        # at the accept: its TLS handshake runs on this timer too).
        self.websocket.open_timeout = max(self._deadline - self.loop.time(), 0.0)
        super().connection_made(transport)

    def handshake_over(self) -> None:
        """The connection is authenticated, or gone: it leaves the unauthenticated count."""
        self.server._handshaking.discard(self)

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
        self.handshake_over()
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
        session = self.session
        if session is not None and (session.parked is not None or "parked" in self.holds):
            self.replies_sent()

    def replies_sent(self) -> None:
        """Replies were sent: commands parked for them may run, and reading go on;
        or the client's commands are parked for them: read no more from it."""
        session = self.session
        if session is None:
            return
        if session.resume_if_drained():
            self.release("parked")
        elif "parked" not in self.holds:
            self.hold("parked")

    def connection_closed(self) -> None:
        self.handshake_over()
        self.server._disconnected(self)


async def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on the first address ``host`` resolves to."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    family, kind, protocol, _, address = infos[0]
    listener = socket.socket(family, kind, protocol)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's servers
        listener.bind(address)
        listener.listen(_BACKLOG)
        listener.setblocking(False)
    except BaseException:
        listener.close()
        raise
    return listener


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
