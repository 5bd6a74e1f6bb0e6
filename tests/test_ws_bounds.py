"""Memory the websocket layer bounds for a client that misbehaves, and closed connections
freed by reference counting alone (issue 12, "a worker no client can take down").

- A message in many (even empty) fragments: the parser's bookkeeping grows with the
  bytes, not the frames, and a message over ``max_fragments`` frames closes with 1009.
- Pings from a client that never reads its pongs: the worker stops reading from it
  once the pongs back up, and serves others meanwhile.
- A closed connection's peer object dies as soon as asyncio lets go of it, with the
  garbage collector off: it holds no reference cycle.

The network tests serve a worker in this process, on 127.0.0.1, and speak to it over
raw sockets with frames built by hand.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import struct
import tracemalloc
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio
import pytest
import torch

import fedtensor as ft
from fedtensor.errors import ProtocolError
from fedtensor.protocol.chunks import START, Reassembler
from fedtensor.protocol.wsframes import (
    MAX_FRAGMENTS,
    CloseCode,
    Message,
    Opcode,
    Parser,
    Violation,
    header,
)
from fedtensor.worker.server import WorkerServer, _ServerPeer

pytestmark = pytest.mark.anyio

TOKEN = "t"
#: A masking key of zeros: the masked payload is the payload itself.
ZERO_KEY = b"\0\0\0\0"


def _frame(opcode: Opcode, payload: bytes = b"", *, fin: bool = True) -> bytes:
    """A frame as a client sends it (masked, with a key of zeros)."""
    return header(opcode, len(payload), ZERO_KEY, fin=fin) + payload


# -- the parser -----------------------------------------------------------------------------------


def test_empty_fragments_cost_no_memory_per_frame() -> None:
    parser = Parser(masked=True, max_message=1 << 20, max_fragments=10**9)
    parser.receive(_frame(Opcode.BINARY, b"x", fin=False))
    empties = _frame(Opcode.CONTINUATION, fin=False) * 10_000  # 60 KB a batch
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for _ in range(20):  # 200,000 empty frames, 1.2 MB received
            parser.receive(empties)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # An object per fragment would be ~50 MB here (measured: 240 bytes a frame).
    assert grown < 64 << 10
    parser.receive(_frame(Opcode.CONTINUATION, b"y"))
    [message] = parser.take_events()
    assert isinstance(message, Message)
    assert bytes(message.data) == b"xy"


def test_a_message_over_max_fragments_frames_is_too_big() -> None:
    parser = Parser(masked=True, max_message=1 << 20, max_fragments=3)
    first, more = (
        _frame(Opcode.BINARY, b"a", fin=False),
        _frame(Opcode.CONTINUATION, b"b", fin=False),
    )
    parser.receive(first + more + _frame(Opcode.CONTINUATION, b"c"))  # 3 frames: allowed
    assert [bytes(m.data) for m in parser.take_events() if isinstance(m, Message)] == [b"abc"]
    parser.receive(first + more + more)
    with pytest.raises(Violation) as refused:
        parser.receive(_frame(Opcode.CONTINUATION))  # the 4th, empty or not
    assert refused.value.code == CloseCode.MESSAGE_TOO_BIG
    # Control frames between fragments are not fragments.
    parser = Parser(masked=True, max_message=1 << 20, max_fragments=2)
    parser.receive(first + _frame(Opcode.PING) * 5 + _frame(Opcode.CONTINUATION, b"z"))
    assert [bytes(m.data) for m in parser.take_events() if isinstance(m, Message)] == [b"az"]


def test_an_empty_message_in_a_split_frame_is_refused() -> None:
    reassembler = Reassembler(1 << 20)
    assert reassembler.feed(struct.pack(">BQ", START, 10)) is None
    with pytest.raises(ProtocolError, match="empty message"):
        reassembler.feed(b"")
    reassembler.clear()  # what a closed connection does: the frame's buffer goes
    assert reassembler.pending == 0
    frame = reassembler.feed(b"\0ab")  # a new frame, not the rest of the old one
    assert frame is not None
    assert bytes(frame) == b"ab"


# -- a worker in this process ---------------------------------------------------------------------


@dataclass
class _Watch:
    """What happened to the worker's connections."""

    peers: list[weakref.ref[_ServerPeer]] = field(default_factory=list)
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    holds: list[str] = field(default_factory=list)
    held: asyncio.Event = field(default_factory=asyncio.Event)
    received: int = 0  # bytes, all connections together
    received_enough: asyncio.Event = field(default_factory=asyncio.Event)
    expected: int = 1 << 62


@pytest.fixture
async def served(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[WorkerServer, _Watch]]:
    """A worker served in this process, watched (by class attributes, so the watch
    holds no connection: only weak references)."""
    watch = _Watch()
    made, lost = _ServerPeer.connection_made, _ServerPeer.connection_lost
    hold, updated = _ServerPeer.hold, _ServerPeer.buffer_updated

    def spy_made(peer: _ServerPeer, transport: asyncio.BaseTransport) -> None:
        watch.peers.append(weakref.ref(peer))
        made(peer, transport)

    def spy_lost(peer: _ServerPeer, exc: Exception | None) -> None:
        lost(peer, exc)
        # After the callback that called this one, in which asyncio's transport
        # lets go of the protocol.
        asyncio.get_running_loop().call_soon(watch.lost.set)

    def spy_hold(peer: _ServerPeer, reason: str) -> None:
        hold(peer, reason)
        watch.holds.append(reason)
        watch.held.set()

    def spy_updated(peer: _ServerPeer, nbytes: int) -> None:
        updated(peer, nbytes)
        watch.received += nbytes
        if watch.received >= watch.expected:
            watch.received_enough.set()

    monkeypatch.setattr(_ServerPeer, "connection_made", spy_made)
    monkeypatch.setattr(_ServerPeer, "connection_lost", spy_lost)
    monkeypatch.setattr(_ServerPeer, "hold", spy_hold)
    monkeypatch.setattr(_ServerPeer, "buffer_updated", spy_updated)
    server = WorkerServer("local", token=TOKEN, grace=5.0)
    async with anyio.create_task_group() as task_group:
        await task_group.start(server.serve, "127.0.0.1", 0)
        yield server, watch
        server.shutdown()


def _upgrade_request(token: str) -> bytes:
    return (
        "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {token}\r\n\r\n"
    ).encode()


async def _raw_connect(
    server: WorkerServer, *, token: str = TOKEN, receive_buffer: int | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """A raw TCP connection to ``server`` after its answer to the handshake (returned)."""
    assert server.url is not None
    host, port = server.url.removeprefix("ws://").split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.setblocking(False)
    with anyio.fail_after(10):
        await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(_upgrade_request(token))
        head = await reader.readuntil(b"\r\n\r\n")
    return reader, writer, head


async def _still_serves(server: WorkerServer) -> None:
    """A well-formed client gets correct answers from ``server``."""
    assert server.url is not None
    async with ft.connect(server.url, token=TOKEN, timeout=30) as client:
        x = ft.send(torch.arange(4.0), client)
        assert torch.equal(await (x * 2).get(), torch.arange(4.0) * 2)
        del x


# -- fragments ------------------------------------------------------------------------------------


async def test_a_message_in_too_many_empty_fragments_closes_with_1009(
    served: tuple[WorkerServer, _Watch],
) -> None:
    server, _ = served
    reader, writer, head = await _raw_connect(server)
    assert head.startswith(b"HTTP/1.1 101")
    try:
        empty = _frame(Opcode.CONTINUATION, fin=False)
        writer.write(_frame(Opcode.BINARY, b"\0", fin=False) + empty * (100 * MAX_FRAGMENTS))
        with anyio.fail_after(10):
            close = await reader.readexactly(2)
            assert close[0] == 0x88  # a close frame, final
            body = await reader.readexactly(close[1])
            writer.write(_frame(Opcode.CLOSE))
            assert await reader.read() == b""  # then the worker ends TCP
    finally:
        writer.transport.abort()
    assert int.from_bytes(body[:2], "big") == CloseCode.MESSAGE_TOO_BIG
    assert f"more than {MAX_FRAGMENTS} fragments" in body[2:].decode()
    await _still_serves(server)


# -- pings ----------------------------------------------------------------------------------------


async def test_a_worker_stops_reading_pings_whose_pongs_are_not_read(
    served: tuple[WorkerServer, _Watch],
) -> None:
    server, watch = served
    # A small receive buffer: the worker's pongs back up after a few KiB.
    _reader, writer, _ = await _raw_connect(server, receive_buffer=4096)
    try:
        ping = _frame(Opcode.PING, b"p" * 125)
        flood = ping * ((64 << 20) // len(ping))  # 64 MiB of pings, never a read
        writer.write(flood)
        with anyio.fail_after(30):
            await watch.held.wait()
        assert watch.holds == ["control"]
        [peer] = server._peers
        assert peer.transport is not None
        # Past the high-water mark (64 KiB) by the pongs of one read (64 KiB) at most.
        assert peer.transport.get_write_buffer_size() < 256 << 10
        await _still_serves(server)  # many turns of the loop: the worker reads no more
        assert peer.holds == {"control"}
        assert peer.transport.get_write_buffer_size() < 256 << 10
        # Most of the flood is still on the client's side (the kernels' buffers in
        # between hold a few MiB at most).
        assert writer.transport.get_write_buffer_size() > len(flood) // 2
        assert watch.received < len(flood) // 2
    finally:
        writer.transport.abort()


# -- connections freed by reference counting ------------------------------------------------------


async def test_a_cleanly_closed_connection_is_freed_without_the_gc(
    served: tuple[WorkerServer, _Watch],
) -> None:
    server, watch = served
    assert server.url is not None
    gc.disable()
    try:
        async with ft.connect(server.url, token=TOKEN, timeout=30) as client:
            x = ft.send(torch.arange(1000.0), client)
            assert torch.equal(await x, torch.arange(1000.0))
            del x
        with anyio.fail_after(10):
            await watch.lost.wait()
        [peer] = watch.peers
        assert peer() is None
    finally:
        gc.enable()


async def test_a_connection_aborted_mid_message_is_freed_without_the_gc(
    served: tuple[WorkerServer, _Watch],
) -> None:
    server, watch = served
    gc.disable()
    try:
        _reader, writer, head = await _raw_connect(server)
        assert head.startswith(b"HTTP/1.1 101")
        # A split frame of 8 MiB, and 200 KiB of its first 1 MiB message.
        frames = _frame(Opcode.BINARY, struct.pack(">BQ", START, 8 << 20))
        frames += header(Opcode.BINARY, 1 << 20, ZERO_KEY) + bytes(200 << 10)
        watch.expected = len(_upgrade_request(TOKEN)) + len(frames)
        writer.write(frames)
        with anyio.fail_after(10):
            await watch.received_enough.wait()
        [peer] = watch.peers
        assert peer()._reassembler.pending == 8 << 20  # type: ignore[union-attr]
        # Abort: a reset, not an end of stream.
        sock = writer.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        with anyio.fail_after(10):
            await watch.lost.wait()
        assert peer() is None
    finally:
        gc.enable()
    await _still_serves(server)


async def test_a_connection_refused_at_the_handshake_is_freed_without_the_gc(
    served: tuple[WorkerServer, _Watch],
) -> None:
    server, watch = served
    gc.disable()
    try:
        _reader, writer, head = await _raw_connect(server, token="wrong")
        assert head.startswith(b"HTTP/1.1 401")
        with anyio.fail_after(10):
            await watch.lost.wait()
        writer.transport.abort()
        [peer] = watch.peers
        assert peer() is None
    finally:
        gc.enable()
