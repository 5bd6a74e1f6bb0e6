"""Before authentication a connection costs a worker almost nothing and cannot linger
(issue 12, "a worker no client can take down").

- Memory: a connection that has not completed the handshake holds the head received
  so far (read 1 KiB at a time into a buffer its thread's connections share), no
  frame parser; 500 silent connections grow a worker process by a few KiB each
  (before: 274 KiB each). On ``wss://``: tests/test_tls_layer.py.
- A cap on connections that have not completed the handshake: past it, a new one is
  closed as soon as it is accepted, and once they go, clients are served again.
- A time limit from the TCP accept to the accepted handshake, on ``ws://`` and on
  ``wss://`` with the TLS handshake counted in it: a silent connection, a client
  that sends half an HTTP head, and one that completes TLS late and then sends half
  a head are all closed within the limit (before, on ``wss://``, a silent connection
  lingered for asyncio's 60 s and a late TLS client got a fresh 10 s).

Workers are served in this process (on 127.0.0.1) and spoken to over raw sockets,
except for the memory test, which measures a worker process's resident memory.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import AsyncIterator

import anyio
import pytest
import torch
import trustme

import fedtensor as ft
from fedtensor.net.peer import HEAD_CHUNK, _head_scratch
from fedtensor.testing import WorkerProcess
from fedtensor.worker.server import MAX_REQUEST_HEAD, Limits, WorkerServer, _ServerPeer

pytestmark = pytest.mark.anyio

TOKEN = "t"

#: What "almost nothing" means here: a connection before its handshake.
PREAUTH_BUDGET = 16 << 10


def _address(url: str) -> tuple[str, int]:
    host, port = url.split("://")[1].split(":")
    return host, int(port)


def _half_head() -> bytes:
    """The first lines of an upgrade request, never finished."""
    return b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) << 10
    raise AssertionError("no VmRSS")


async def _round_trip(url: str, *, ssl_context: ssl.SSLContext | None = None) -> None:
    async with ft.connect(url, token=TOKEN, timeout=30, ssl=ssl_context) as client:
        x = ft.send(torch.arange(4.0), client)
        assert torch.equal(await (x * 2).get(), torch.arange(4.0) * 2)


async def _wait_closed(reader: asyncio.StreamReader) -> None:
    """Return once the worker has ended the connection (an end of stream, or a reset)."""
    try:
        while await reader.read(1 << 16):
            pass
    except (ConnectionError, ssl.SSLError):
        pass


@pytest.fixture
async def serve(authority: trustme.CA) -> AsyncIterator[object]:
    """A factory of workers served in this process: ``await serve(limits, tls=False)``."""
    async with anyio.create_task_group() as task_group:
        servers: list[WorkerServer] = []

        async def start(limits: Limits, *, tls: bool = False) -> WorkerServer:
            context = None
            if tls:
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                authority.issue_cert("127.0.0.1").configure_cert(context)
            server = WorkerServer("preauth", token=TOKEN, limits=limits, ssl=context, grace=5.0)
            await task_group.start(server.serve, "127.0.0.1", 0)
            servers.append(server)
            return server

        yield start
        for server in servers:
            server.shutdown()


# -- memory -------------------------------------------------------------------------------------


async def test_a_connection_before_its_handshake_holds_no_parser_and_little_buffer(
    serve: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    head = _half_head() + b"X-Padding: " + b"p" * 5000 + b"\r\n"  # 5 KiB, no end
    received = asyncio.Event()
    updated = _ServerPeer.buffer_updated

    def spy(peer: _ServerPeer, nbytes: int) -> None:
        updated(peer, nbytes)
        if len(peer.handshake_bytes) == len(head):
            received.set()

    monkeypatch.setattr(_ServerPeer, "buffer_updated", spy)
    server: WorkerServer = await serve(Limits(handshake_timeout=30))  # type: ignore[operator]
    assert server.url is not None
    reader, writer = await asyncio.open_connection(*_address(server.url))
    try:
        writer.write(head)
        with anyio.fail_after(10):
            await received.wait()
        [peer] = server._handshaking
        assert peer._parser is None  # its 256 KiB buffer comes with the open connection
        # It reads into its thread's buffer, shared by every connection not yet open,
        # and holds only the head received so far.
        assert len(peer.get_buffer(-1)) == HEAD_CHUNK
        assert peer.get_buffer(-1) is _head_scratch()
        assert len(peer.handshake_bytes) <= MAX_REQUEST_HEAD <= PREAUTH_BUDGET
        # Past MAX_REQUEST_HEAD bytes without an end, TCP is dropped.
        writer.write(b"q" * MAX_REQUEST_HEAD)
        with anyio.fail_after(10):
            await _wait_closed(reader)
    finally:
        writer.close()
    await _round_trip(server.url)


async def test_silent_connections_cost_a_worker_process_little_memory(
    ft_worker_processes: object, sockets: list[socket.socket]
) -> None:
    process: WorkerProcess = ft_worker_processes(  # type: ignore[operator]
        "preauth-memory", "--max-unauthenticated", "1000", "--handshake-timeout", "120"
    )
    host, port = _address(process.url)
    pid = process.process.pid

    async def round_trip() -> None:
        async with ft.connect(process.url, token=process.token, timeout=30) as client:
            x = ft.send(torch.arange(4.0), client)
            assert torch.equal(await (x * 2).get(), torch.arange(4.0) * 2)

    # Warm up: a client, and silent connections opened and closed (the allocator's pools).
    await round_trip()
    for _ in range(2):
        batch = [socket.create_connection((host, port), timeout=10) for _ in range(100)]
        await round_trip()  # the worker accepted them all (it accepts in order)
        for sock in batch:
            sock.close()
    await round_trip()
    before = _rss(pid)
    count = 500
    sockets.extend(socket.create_connection((host, port), timeout=10) for _ in range(count))
    await round_trip()  # accepted, in order, before this client was
    grown = _rss(pid) - before
    # Before: 274 KiB a connection (a 256 KiB parser buffer and a 16 KiB head buffer).
    assert grown / count < PREAUTH_BUDGET, f"{grown / count / 1024:.1f} KiB a connection"


# -- the cap --------------------------------------------------------------------------------------


async def test_connections_past_the_unauthenticated_cap_are_closed_at_once(
    serve: object, sockets: list[socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    none_handshaking = asyncio.Event()
    over = _ServerPeer.handshake_over

    def spy(peer: _ServerPeer) -> None:
        over(peer)
        if not peer.server._handshaking:
            none_handshaking.set()

    monkeypatch.setattr(_ServerPeer, "handshake_over", spy)
    server: WorkerServer = await serve(  # type: ignore[operator]
        Limits(handshake_timeout=60, max_unauthenticated=4)
    )
    assert server.url is not None
    loop = asyncio.get_running_loop()
    for _ in range(4):
        sock = socket.socket()
        sock.setblocking(False)
        sockets.append(sock)
        await loop.sock_connect(sock, _address(server.url))
    # The worker accepts in order: the next connection finds four handshaking, and is
    # closed at once (not after the 60 s handshake timeout).
    reader, writer = await asyncio.open_connection(*_address(server.url))
    try:
        writer.write(_half_head())
        with anyio.fail_after(10):
            await _wait_closed(reader)
    finally:
        writer.close()
    assert server.refused == 1
    assert len(server._handshaking) == 4
    with pytest.raises(ft.WorkerUnavailable):
        await _round_trip(server.url)  # a client with the token too: no room
    assert server.refused == 2
    none_handshaking.clear()
    for sock in sockets:
        sock.close()
    # Once the worker has seen them go, clients are served again.
    with anyio.fail_after(10):
        await none_handshaking.wait()
    await _round_trip(server.url)


# -- the time limit -------------------------------------------------------------------------------


@pytest.mark.parametrize("tls", [False, True], ids=["ws", "wss"])
@pytest.mark.parametrize("sends", ["nothing", "half-a-head"])
async def test_a_connection_without_a_handshake_is_closed_within_the_limit(
    serve: object, client_tls: ssl.SSLContext, tls: bool, sends: str
) -> None:
    limit = 1.0
    server: WorkerServer = await serve(  # type: ignore[operator]
        Limits(handshake_timeout=limit), tls=tls
    )
    assert server.url is not None
    started = time.monotonic()
    if sends == "nothing":  # TCP only: on wss, the TLS handshake never even starts
        reader, writer = await asyncio.open_connection(*_address(server.url))
    else:
        reader, writer = await asyncio.open_connection(
            *_address(server.url), ssl=client_tls if tls else None
        )
        writer.write(_half_head())
    try:
        with anyio.fail_after(limit + 9):  # before: 60 s for a silent wss connection
            await _wait_closed(reader)
    finally:
        writer.close()
    assert time.monotonic() - started < limit + 2
    await _round_trip(server.url, ssl_context=client_tls if tls else None)


async def test_a_late_tls_handshake_leaves_the_http_head_only_what_is_left(
    serve: object, client_tls: ssl.SSLContext
) -> None:
    limit = 2.0
    server: WorkerServer = await serve(Limits(handshake_timeout=limit), tls=True)  # type: ignore[operator]
    assert server.url is not None
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    await loop.sock_connect(sock, _address(server.url))
    accepted = time.monotonic()
    await anyio.sleep(0.6 * limit)  # the attack: TLS begins late...
    reader, writer = await asyncio.open_connection(
        sock=sock, ssl=client_tls, server_hostname="127.0.0.1"
    )
    try:
        writer.write(_half_head())  # ...and the head never ends
        with anyio.fail_after(limit + 9):
            await _wait_closed(reader)
    finally:
        writer.close()
    # Before: the head got a full handshake timeout of its own after TLS (0.6 + 1 limits).
    elapsed = time.monotonic() - accepted
    assert elapsed < limit + 0.3 * limit, f"closed after {elapsed:.2f} s"
    await _round_trip(server.url, ssl_context=client_tls)
