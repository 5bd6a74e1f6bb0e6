"""Worker processes over websockets: authentication, TLS, limits, hostile input, faults, CLI.

Every worker here is a real `fedtensor worker` process on 127.0.0.1, started and stopped
by the tests (the conformance suite in test_api/test_semantics covers the API itself).
"""

from __future__ import annotations

import asyncio
import math
import os
import pickle
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator

import anyio
import pytest
import torch
import trustme
from websockets.asyncio.client import connect as raw_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

import fedtensor as ft
import fedtensor.sync as sy
from fedtensor.protocol.codec import frame_bytes
from fedtensor.protocol.messages import Call, Fetch, Ref, Reply, Store
from fedtensor.testing import WorkerProcess, start_worker_process
from fedtensor.worker.server import READ_AHEAD, WorkerServer, _ServerPeer

pytestmark = pytest.mark.anyio

StartWorker = Callable[..., WorkerProcess]


@pytest.fixture(scope="module")
def worker() -> Iterator[WorkerProcess]:
    """One plain worker process for the tests that do not need their own."""
    process = start_worker_process("bob")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def strict_worker() -> Iterator[WorkerProcess]:
    """A worker with small limits: 64 KiB messages, 1 MiB quota, 100 pending commands."""
    process = start_worker_process(
        "strict", "--max-message-size", "64K", "--memory-quota", "1M", "--max-pending", "100"
    )
    yield process
    process.stop()


async def _still_serves(process: WorkerProcess) -> None:
    """A well-formed client gets correct answers from ``process``."""
    async with ft.connect(process.url, token=process.token, timeout=30) as client:
        x = ft.send(torch.arange(4.0), client)
        assert torch.equal(await (x * 2).get(), torch.arange(4.0) * 2)
        del x


def _headers(process: WorkerProcess) -> dict[str, str]:
    return {"Authorization": f"Bearer {process.token}"}


# -- authentication and TLS ------------------------------------------------------------------------


async def test_handshake_without_the_right_token_is_refused(worker: WorkerProcess) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": worker.token}):
        with pytest.raises(InvalidStatus) as refused:
            async with raw_connect(worker.url, additional_headers=headers):
                pass
        assert refused.value.response.status_code == 401
    with pytest.raises(ft.AuthenticationFailed, match="401"):
        await ft.connect(worker.url, token="wrong")
    with pytest.raises(ft.AuthenticationFailed):
        await ft.connect(worker.url)
    await _still_serves(worker)


async def test_tls_end_to_end_with_certificate_verification(
    tmp_path: pytest.TempPathFactory, ft_worker_processes: StartWorker
) -> None:
    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"  # type: ignore[operator]
    certificate.private_key_and_cert_chain_pem.write_to_path(str(certfile))
    certificate.private_key_pem.write_to_path(str(keyfile))
    process = ft_worker_processes("tls", "--certfile", str(certfile), "--keyfile", str(keyfile))
    assert process.url.startswith("wss://127.0.0.1:")

    trusting = ssl.create_default_context()
    authority.configure_trust(trusting)
    async with ft.connect(process.url, token=process.token, ssl=trusting) as client:
        x = ft.send(torch.ones(3), client)
        assert torch.equal(await (x + 1).get(), torch.full((3,), 2.0))
        big = torch.randn(1_500_001)  # split into messages, received in place through TLS
        assert torch.equal(await ft.send(big, client).get(), big)
        del x
    # The client verifies certificates by default: an unknown authority is refused.
    with pytest.raises(ft.WorkerUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
        await ft.connect(process.url, token=process.token)


# -- the transport's own framing ------------------------------------------------------------------


async def test_large_tensors_round_trip_bit_exact(worker: WorkerProcess) -> None:
    # An odd size: the last websocket message is short and the payload is not a
    # multiple of the 4-byte mask. Twice, so the second lands in recycled buffers.
    async with ft.connect(worker.url, token=worker.token) as client:
        for seed in (1, 2):
            big = torch.randn(2_500_003, generator=torch.Generator().manual_seed(seed))
            back = await ft.send(big, client).get()
            assert torch.equal(back, big)
            assert back.data_ptr() != big.data_ptr()


def test_a_client_on_uvloop(worker: WorkerProcess) -> None:
    # uvloop's transports are not asyncio.Transport subclasses; the client takes them.
    async def main() -> tuple[torch.Tensor, torch.Tensor]:
        async with ft.connect(worker.url, token=worker.token) as client:
            small = await (ft.send(torch.arange(4.0), client) * 3).get()
            large = await ft.send(torch.arange(600_000.0), client).get()
            return small, large

    small, large = anyio.run(main, backend_options={"use_uvloop": True})
    assert torch.equal(small, torch.arange(4.0) * 3)
    assert torch.equal(large, torch.arange(600_000.0))


async def _raw_upgrade(process: WorkerProcess) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection past the websocket handshake, for writing frames by hand."""
    host, port = process.url.removeprefix("ws://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"GET / HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {process.token}\r\n\r\n".encode()
    )
    with anyio.fail_after(10):
        head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101")
    return reader, writer


BAD_FRAMES = {
    "reserved bits": bytes([0xC2, 0x80]) + b"mask",
    "unknown opcode": bytes([0x83, 0x80]) + b"mask",
    "unmasked": bytes([0x82, 0x01, 0x00]),
    "long control frame": bytes([0x89, 0xFE, 0x00, 0x80]) + b"mask" + b"x" * 128,
    "continuation first": bytes([0x80, 0x80]) + b"mask",
    "huge length": bytes([0x82, 0xFF]) + (1 << 62).to_bytes(8, "big") + b"mask",
}


@pytest.mark.parametrize("frame", BAD_FRAMES.values(), ids=BAD_FRAMES.keys())
async def test_bad_websocket_frames_close_that_connection_only(
    strict_worker: WorkerProcess, frame: bytes
) -> None:
    reader, writer = await _raw_upgrade(strict_worker)
    try:
        writer.write(frame)
        with anyio.fail_after(10):
            head = await reader.readexactly(2)  # the worker's close frame (unmasked)
            reply = await reader.readexactly(head[1])
            writer.write(bytes([0x88, 0x80]) + b"\0\0\0\0")  # our close, masked with zeros
            assert await reader.read() == b""  # then the worker closes TCP
    finally:
        writer.close()
    assert head[0] == 0x88
    code = int.from_bytes(reply[:2], "big")
    assert code == (1009 if frame[1] & 0x7F == 127 else 1002)
    await _still_serves(strict_worker)


async def test_a_handshake_without_an_end_is_cut_off(worker: WorkerProcess) -> None:
    host, port = worker.url.removeprefix("ws://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"GET / HTTP/1.1\r\nX-Long: " + b"a" * (20 << 10))
        with anyio.fail_after(10):
            try:
                answer = await reader.read()
            except ConnectionResetError:  # aborted with data unread: a reset
                answer = b""
        assert answer == b""  # closed without an answer
    finally:
        writer.close()
    await _still_serves(worker)


# -- limits ----------------------------------------------------------------------------------------


async def test_tensors_larger_than_a_message_travel_in_chunks(strict_worker: WorkerProcess) -> None:
    async with ft.connect(strict_worker.url, token=strict_worker.token, max_message=64 << 10) as c:
        big = torch.randn(100_000)  # 400 KB, beyond the 64 KiB message limit
        x = ft.send(big, c)
        assert torch.equal(await x, big)  # a reply larger than a message comes back too
        assert torch.equal(await x.get(), big)


async def test_memory_quota(strict_worker: WorkerProcess) -> None:
    async with ft.connect(strict_worker.url, token=strict_worker.token, max_message=64 << 10) as c:
        first = ft.send(torch.ones(150_000), c)  # 600 KB: fits the 1 MiB quota
        assert torch.equal(await first, torch.ones(150_000))  # (a frame of its own)
        second = ft.send(torch.ones(150_000), c)  # 600 KB more: over it
        with pytest.raises(ft.LimitExceeded, match="memory quota of 1048576 bytes"):
            await second
        derived = first.repeat(2)  # 1.2 MB computed on the worker: refused as well
        with pytest.raises(ft.LimitExceeded, match="memory quota"):
            await derived
        assert torch.equal(await first.get(), torch.ones(150_000))
        # Freed memory counts no more.
        for _ in range(3):
            assert torch.equal(await ft.send(torch.ones(200_000), c).get(), torch.ones(200_000))
        del second, derived
    # One frame larger than the whole quota could never be stored: the worker does not
    # even allocate it, and closes that connection naming the limit.
    async with ft.connect(strict_worker.url, token=strict_worker.token, max_message=64 << 10) as c:
        too_big = ft.send(torch.ones(300_000), c)
        with pytest.raises(ft.LimitExceeded, match="exceeds the limit"):
            await too_big
        del too_big
    await _still_serves(strict_worker)


async def test_pending_command_limit(strict_worker: WorkerProcess) -> None:
    async with ft.connect(strict_worker.url, token=strict_worker.token) as c:
        x = ft.send(torch.zeros(1), c)
        for _ in range(200):  # one batch of 200 commands (and releases): over 100
            x = x + 1
        with pytest.raises(ft.LimitExceeded, match="more than 100 commands"):
            await x
        y = ft.send(torch.zeros(1), c)
        assert torch.equal(await (y + 1).get(), torch.ones(1))
        del x


async def test_frame_over_the_limit_closes_with_a_reason(
    ft_worker_processes: StartWorker,
) -> None:
    process = ft_worker_processes("small-frames", "--max-frame-size", "256K")
    async with ft.connect(process.url, token=process.token) as c:
        x = ft.send(torch.ones(200_000), c)  # an 800 KB frame
        with pytest.raises(ft.LimitExceeded, match="exceeds the limit of 262144"):
            await x
        del x
    await _still_serves(process)


# -- hostile input ---------------------------------------------------------------------------------


def _frame_message(*messages: object) -> bytes:
    return b"\x00" + bytes(frame_bytes(messages))  # type: ignore[arg-type]


HOSTILE: dict[str, tuple[bytes | str, int, str]] = {
    # name: (message, close code, words of the reason)
    "empty": (b"", 1007, "empty message"),
    "garbage": (b"\x00\xff\xfe\xfd garbage", 1007, "bad frame"),
    "truncated": (_frame_message(Store(1, torch.ones(8)))[:-5], 1007, "bad frame"),
    "deeply nested": (b"\x00\x83\x02\x40" + b"\x81" * 60_000, 1007, "bad frame"),
    "pickle": (b"\x00" + pickle.dumps({"a": torch.ones(2)}), 1007, "bad frame"),
    "unknown message": (b"\x00\x83\x02\x40\x81\x82\x18\x63\x00", 1007, "unknown message code"),
    "reply sent to a worker": (_frame_message(Reply(1, 2)), 1008, "not a command"),
    "text": ("hello", 1003, "text"),
    "huge declared frame": (b"\x01" + (1 << 60).to_bytes(8, "big"), 1009, "exceeds"),
    "bad split header": (b"\x01" + (10).to_bytes(8, "big") + b"xx", 1007, "9 bytes"),
    "huge declared array": (b"\x00\x83\x02\x40\x9b" + (1 << 60).to_bytes(8, "big"), 1007, "bad"),
    "unknown chunk kind": (b"\x07abc", 1007, "unknown message kind"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
async def test_hostile_input_closes_that_client_only(
    strict_worker: WorkerProcess, name: str
) -> None:
    message, code, words = HOSTILE[name]
    async with ft.connect(strict_worker.url, token=strict_worker.token) as bystander:
        kept = ft.send(torch.arange(3.0), bystander)
        with anyio.fail_after(30):
            async with raw_connect(
                strict_worker.url, additional_headers=_headers(strict_worker)
            ) as ws:
                await ws.send(message)
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.recv()
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == code
        assert words in closed.value.rcvd.reason
        # The other client and its objects are untouched.
        assert torch.equal(await kept.get(), torch.arange(3.0))
    await _still_serves(strict_worker)


async def test_forbidden_operation_over_the_network(worker: WorkerProcess) -> None:
    async with raw_connect(worker.url, additional_headers=_headers(worker)) as ws:
        await ws.send(_frame_message(Store(1, torch.ones(2)), Call(2, "torch.load", (Ref(1),), {})))
        await ws.send(_frame_message(Fetch(7, 2, False), Fetch(8, 1, True)))
        reply = await ws.recv()
    text = bytes(reply) if isinstance(reply, bytes) else reply.encode()
    assert b"ForbiddenOperation" in text
    assert b"not allowed" in text


@pytest.mark.timeout(120)
async def test_fuzzed_frames_never_stop_the_worker(strict_worker: WorkerProcess) -> None:
    from hypothesis import HealthCheck, assume, given, settings
    from hypothesis import strategies as st

    from fedtensor.protocol.chunks import START, WHOLE
    from fedtensor.protocol.codec import decode_frame
    from fedtensor.protocol.messages import Failure

    valid = [
        _frame_message(
            Store(1, torch.arange(6.0).view(2, 3)), Call(2, "torch.add", (Ref(1), 1), {})
        ),
        _frame_message(Fetch(3, 2, True)),
    ]

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        st.sampled_from(valid),
        st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=6),
        st.integers(0, 400),
    )
    def fuzz(frame: bytes, flips: list[tuple[int, int]], cut: int) -> None:
        data = bytearray(frame)
        for position, value in flips:
            if position < len(data):
                data[position] = value
        data = data[: max(1, len(data) - cut)]
        # A 9-byte split-frame header announces data to come, which the worker rightly
        # waits for (HOSTILE has the split header's faults); every other input is either
        # a valid frame, answered, or not one, and closes the connection.
        assume(not (data[0] == START and len(data) == 9))

        async def one() -> bytes | str | ConnectionClosed:
            with anyio.fail_after(30):
                async with raw_connect(
                    strict_worker.url, additional_headers=_headers(strict_worker)
                ) as ws:
                    await ws.send(bytes(data))
                    await ws.send(_frame_message(Fetch(99, 1, False)))
                    try:
                        return await ws.recv()
                    except ConnectionClosed as closed:
                        return closed

        outcome = asyncio.run(one())
        if isinstance(outcome, ConnectionClosed):
            # Not a frame, or not commands: closed with a code and a reason, not dropped.
            assert outcome.rcvd is not None, f"{bytes(data)!r}: no close frame"
            assert outcome.rcvd.code in (1007, 1008, 1009), (bytes(data), outcome.rcvd)
            assert outcome.rcvd.reason, bytes(data)
        else:
            # A mutation can leave a valid frame: the worker answers it with replies.
            assert isinstance(outcome, bytes), (bytes(data), outcome)
            assert outcome[0] == WHOLE, (bytes(data), outcome)
            replies = decode_frame(outcome[1:])
            assert replies, bytes(data)
            assert all(isinstance(reply, Reply | Failure) for reply in replies), replies

    await anyio.to_thread.run_sync(fuzz)
    await _still_serves(strict_worker)


# -- faults ----------------------------------------------------------------------------------------


def _heavy_chain(x: ft.PointerTensor, steps: int) -> ft.PointerTensor:
    for _ in range(steps):
        x = (x @ x).tanh()
    return x


def _heavy_chain_local(x: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        x = (x @ x).tanh()
    return x


def _steps_lasting(seconds: float, x: torch.Tensor) -> int:
    """How many `_heavy_chain` steps on ``x`` take about ``seconds`` on this machine.

    At most 100, so that the chain (two calls and a release per step) stays
    within one frame of the client's outbox.
    """
    started = time.perf_counter()
    _heavy_chain_local(x, 3)
    step = (time.perf_counter() - started) / 3
    return min(100, max(3, math.ceil(seconds / step)))


async def test_killed_worker_fails_pending_pointers_and_a_restart_serves_again(
    ft_worker_processes: StartWorker,
) -> None:
    process = ft_worker_processes("doomed")
    port = process.url.rsplit(":", 1)[1]
    client = await ft.connect(process.url, token=process.token, timeout=60)
    x = ft.send(torch.randn(1500, 1500), client)
    pending = asyncio.ensure_future(_heavy_chain(x, 40).get())
    await asyncio.sleep(0)  # the chain is on its way
    process.kill()
    with anyio.fail_after(20):  # far below the 60 s timeout: no hang
        with pytest.raises(ft.WorkerUnavailable):
            await pending
        with pytest.raises(ft.WorkerUnavailable):
            await x
    await client.aclose()
    del x
    restarted = start_worker_process("doomed", "--port", port, token=process.token)
    try:
        assert restarted.url == process.url
        await _still_serves(restarted)
    finally:
        restarted.stop()


async def test_a_killed_client_leaves_the_worker_healthy_and_its_objects_freed(
    ft_worker_processes: StartWorker,
) -> None:
    process = ft_worker_processes("survivor", "--log-level", "INFO")
    script = (
        "import asyncio, os, signal, torch, fedtensor as ft\n"
        "async def main():\n"
        f"    c = await ft.connect({process.url!r}, token={process.token!r})\n"
        "    keep = [ft.send(torch.ones(1000), c) for _ in range(3)]\n"
        "    await keep[0]\n"
        "    ft.send(torch.ones(5_000_000), c)  # mid-stream: killed while this goes out\n"
        "    await asyncio.sleep(0)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "asyncio.run(main())\n"
    )
    victim = await anyio.run_process([sys.executable, "-c", script], check=False)
    assert victim.returncode == -9
    await _still_serves(process)
    process.stop()
    log = process.log()
    # 3 objects, or 4 if the big send got through before the kill: freed either way.
    assert re.search(r"disconnected; its [34] objects are freed", log), log


@pytest.mark.timeout(120)
async def test_heartbeats_tolerate_a_long_operation(ft_worker_processes: StartWorker) -> None:
    process = ft_worker_processes("slow", "--ping-interval", "0.2", "--ping-timeout", "0.5")
    local = torch.randn(1500, 1500) / 40
    steps = _steps_lasting(2.0, local)
    async with ft.connect(
        process.url, token=process.token, ping_interval=0.2, ping_timeout=0.5
    ) as client:
        x = ft.send(local, client)
        started = time.perf_counter()
        result = await _heavy_chain(x, steps).get()  # pings every 0.2 s all along
        assert time.perf_counter() - started > 1.0  # twice the ping timeout, at least
        assert result.shape == (1500, 1500)
        del x


async def test_heartbeats_detect_a_frozen_worker(ft_worker_processes: StartWorker) -> None:
    process = ft_worker_processes("frozen")
    async with ft.connect(
        process.url, token=process.token, ping_interval=0.2, ping_timeout=0.5, timeout=60
    ) as client:
        x = ft.send(torch.ones(3), client)
        assert torch.equal(await x, torch.ones(3))
        os.kill(process.process.pid, signal.SIGSTOP)
        try:
            # Well before the fetch's own 60 s timeout: the missing pong gives it away.
            with anyio.fail_after(10), pytest.raises(ft.WorkerUnavailable, match="ping"):
                await x
        finally:
            os.kill(process.process.pid, signal.SIGCONT)
        del x


async def test_heartbeats_detect_a_silent_client(ft_worker_processes: StartWorker) -> None:
    process = ft_worker_processes("pinger", "--ping-interval", "0.2", "--ping-timeout", "0.5")
    reader, writer = await _raw_upgrade(process)  # a client that never answers pings
    try:
        with anyio.fail_after(10):
            head = await reader.readexactly(2)
            assert head[0] == 0x89  # a ping
            try:
                while await reader.read(100):  # more pings, then the worker gives up
                    pass
            except ConnectionResetError:
                pass  # aborted: a reset
    finally:
        writer.close()
    await _still_serves(process)


_HeldServer = tuple[WorkerServer, list[str], asyncio.Event, list[tuple[bool, int]]]


@pytest.fixture
async def in_process_server(
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[_HeldServer]:
    """A worker served in this process, and the reasons it stopped reading from a client.

    Each time it stops reading for replies not taken, ``parked_when_held`` gets
    whether the client's commands were parked then and the bytes of replies not
    yet taken: by the time a test looks, the socket's buffers may have taken a
    reply and the commands be on their way to run (and park again).
    """
    parked_when_held: list[tuple[bool, int]] = []
    holds: list[str] = []
    held = asyncio.Event()
    hold = _ServerPeer.hold

    def spy(peer: _ServerPeer, reason: str) -> None:
        hold(peer, reason)
        if reason != "control":  # pongs behind replies not taken: not what is tested
            holds.append(reason)
            if reason == "parked":
                assert peer.session is not None
                parked_when_held.append((peer.session.parked is not None, peer.unsent))
            held.set()

    monkeypatch.setattr(_ServerPeer, "hold", spy)
    server = WorkerServer("local", token="t", grace=5.0)
    async with anyio.create_task_group() as task_group:
        await task_group.start(server.serve, "127.0.0.1", 0)
        yield server, holds, held, parked_when_held
        server.shutdown()


async def test_a_worker_stops_reading_while_a_client_has_too_much_queued(
    in_process_server: _HeldServer,
) -> None:
    server, holds, held, _ = in_process_server
    assert server.url is not None
    local = torch.randn(1000, 1000) / 30
    async with ft.connect(server.url, token="t") as client:
        busy = _heavy_chain(ft.send(local, client), _steps_lasting(1.0, local))
        parts = [torch.full((5 << 20,), float(i)) for i in range(4)]  # 4 x 20 MiB, queued
        pointers = [ft.send(part, client) for part in parts]
        with anyio.fail_after(30):
            await held.wait()
            assert holds == ["queued"]
            for pointer, part in zip(pointers, parts, strict=True):
                assert torch.equal(await pointer, part)
            await busy
        [peer] = server._peers
        assert peer.holds == set()  # reading again
        del busy, pointers


async def test_a_worker_stops_reading_from_a_client_that_does_not_read_its_replies(
    in_process_server: _HeldServer,
) -> None:
    server, holds, held, parked_when_held = in_process_server
    assert server.url is not None
    big = torch.randn(4 << 20)  # 16 MiB
    async with ft.connect(server.url, token="t") as client:
        x = ft.send(big, client)
        assert torch.equal(await x, big)
        transport = client.client._connection.transport  # type: ignore[union-attr]
        transport.pause_reading()  # replies pile up on the worker
        fetches = [asyncio.ensure_future(x.value()) for _ in range(8)]  # 128 MiB of replies
        with anyio.fail_after(30):
            await held.wait()
            # The fetches past READ_AHEAD bytes of replies wait for the client to read.
            assert set(holds) == {"parked"}
            commands_parked, unsent = parked_when_held[0]
            assert commands_parked
            assert unsent <= READ_AHEAD
            assert not all(fetch.done() for fetch in fetches)
            [peer] = server._peers
            assert peer.unsent <= READ_AHEAD
            transport.resume_reading()
            for value in await asyncio.gather(*fetches):
                assert torch.equal(value, big)
        assert peer.holds == set()
        assert peer.unsent == 0
        del x


# -- the command line ------------------------------------------------------------------------------


def _worker_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedtensor", "worker", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "FEDTENSOR_TOKEN": "t"},
        check=False,
    )


def test_bad_configuration_exits_with_a_one_line_reason(tmp_path: pytest.TempPathFactory) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = _worker_command("--id", "x", "--port", port)
    assert result.returncode == 2
    assert re.search(
        r"^fedtensor worker: cannot listen on 127.0.0.1:\d+: .*in use", result.stderr, re.M
    )
    missing = str(tmp_path / "missing.pem")  # type: ignore[operator]
    result = _worker_command("--id", "x", "--port", "0", "--certfile", missing)
    assert result.returncode == 2
    assert "fedtensor worker: cannot load the TLS certificate" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "fedtensor", "worker", "--id", "x"],
        capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"}, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "fedtensor worker: no token: set FEDTENSOR_TOKEN" in result.stderr


async def test_sigterm_finishes_in_flight_commands_then_closes(
    ft_worker_processes: StartWorker,
) -> None:
    process = ft_worker_processes("graceful", "--log-level", "DEBUG")
    local = torch.randn(1500, 1500) / 40
    # Long enough that the signal, sent once the chain has arrived, lands while it runs:
    # a chain that finished first would be answered without the shutdown's drain.
    steps = _steps_lasting(2.0, local)
    async with ft.connect(process.url, token=process.token) as client:
        x = ft.send(local, client)
        pending = asyncio.ensure_future(_heavy_chain(x, steps).get())
        with anyio.fail_after(30):
            # Another process's log offers no event to wait on: poll it, with a deadline.
            # (one frame: the send, the calls, the releases between them, the fetch)
            while not re.search(r"received \d+ commands", process.log()):  # noqa: ASYNC110
                await anyio.sleep(0.05)
        process.process.terminate()  # the chain has reached the worker: it is in flight
        # The one signal: the worker finishes the chain, answers, closes and exits by itself.
        # (process.stop() would send a second SIGTERM, which kills a worker whose event loop
        # has already closed, and so its signal handlers gone, with -15.)
        status = await anyio.to_thread.run_sync(process.process.wait, 45)
        assert status == 0, process.log()
        assert "shutting down: finishing the commands received" in process.log()
        with anyio.fail_after(30):
            result = await pending  # answered before the worker went away
        assert result.shape == (1500, 1500)
        with anyio.fail_after(30), pytest.raises(ft.WorkerUnavailable, match="1001"):
            await x  # the connection was closed as going away (1001), not dropped
        del x


# -- the seed notebook against two worker processes ------------------------------------------------


def test_seed_notebook_against_two_worker_processes(ft_worker_processes: StartWorker) -> None:
    bob_process, alice_process = ft_worker_processes("bob"), ft_worker_processes("alice")
    hook = sy.TorchHook(torch)
    try:
        bob = sy.connect(bob_process.url, token=bob_process.token)
        alice = sy.connect(alice_process.url, token=alice_process.token)
        x = torch.tensor([1, 2, 3, 4, 5]).send(bob)
        assert list(bob._objects) == [x.id_at_location]
        assert x.location.id == "bob"
        assert torch.equal(x.get(), torch.tensor([1, 2, 3, 4, 5]))
        assert dict(bob._objects) == {}
        x = torch.tensor([1, 2, 3, 4, 5]).send(bob, alice)
        assert torch.equal(x.get(sum_results=True), torch.tensor([2, 4, 6, 8, 10]))
        x = torch.tensor([1, 2, 3, 4, 5]).send(bob)
        y = torch.tensor([1, 1, 1, 1, 1]).send(bob)
        assert torch.equal(torch.add(x, y).get(), torch.tensor([2, 3, 4, 5, 6]))
        x = torch.tensor([1.0, 2, 3, 4, 5], requires_grad=True).send(bob)
        y = torch.tensor([1.0, 1, 1, 1, 1], requires_grad=True).send(bob)
        (x + y).sum().backward()
        assert torch.equal(x.get().grad, torch.ones(5))
        del y
        assert dict(bob._objects) == {}
        assert dict(alice._objects) == {}
    finally:
        hook.unhook()


# -- named sessions --------------------------------------------------------------------------------


def _drop_connection(worker: ft.RemoteWorker) -> None:
    """Cut the TCP connection under the client, as a network failure would."""
    connection = worker.client._connection
    assert connection is not None
    connection.transport.abort()  # type: ignore[attr-defined]


async def test_a_named_session_survives_a_lost_connection(worker: WorkerProcess) -> None:
    name = "session-" + worker.token[:12]
    bob = await ft.connect(worker.url, token=worker.token, session=name)
    try:
        x = ft.send(torch.arange(3.0), bob)
        assert torch.equal(await x, torch.arange(3.0))
        # Only one live connection per session name.
        with pytest.raises(ft.WorkerUnavailable, match="in use"):
            await ft.connect(worker.url, token=worker.token, session=name)
        _drop_connection(bob)
        with anyio.fail_after(20), pytest.raises(ft.WorkerUnavailable):
            await x
        await bob.reconnect()
        assert torch.equal(await (x + 1).get(), torch.arange(1.0, 4.0))  # the same pointer
        assert await bob.object_ids() == [x.id_at_location]
        assert torch.equal(await x.get(), torch.arange(3.0))
    finally:
        await bob.aclose()


async def test_an_unnamed_session_is_freed_with_its_connection(worker: WorkerProcess) -> None:
    bob = await ft.connect(worker.url, token=worker.token)
    try:
        x = ft.send(torch.arange(3.0), bob)
        assert torch.equal(await x, torch.arange(3.0))
        _drop_connection(bob)
        with anyio.fail_after(20), pytest.raises(ft.WorkerUnavailable):
            await x
        await bob.reconnect()
        with pytest.raises(ft.ObjectNotFound):
            await x
        assert await bob.object_ids() == []
    finally:
        await bob.aclose()


async def test_a_named_session_expires(ft_worker_processes: StartWorker) -> None:
    process = ft_worker_processes("brief", "--session-ttl", "0.2", "--log-level", "INFO")
    bob = await ft.connect(process.url, token=process.token, session="brief-session")
    try:
        x = ft.send(torch.arange(3.0), bob)
        assert torch.equal(await x, torch.arange(3.0))
        _drop_connection(bob)
        with anyio.fail_after(30):
            # Another process's log offers no event to wait on: poll it, with a deadline.
            while "session brief-session expired" not in process.log():  # noqa: ASYNC110
                await anyio.sleep(0.05)
        await bob.reconnect()
        with pytest.raises(ft.ObjectNotFound):
            await x
        assert await bob.object_ids() == []
    finally:
        await bob.aclose()


async def test_a_multi_pointer_across_a_virtual_and_a_remote_worker(worker: WorkerProcess) -> None:
    async with (
        ft.VirtualWorker("local-alice") as alice,
        ft.connect(worker.url, token=worker.token) as bob,
    ):
        m = ft.send(torch.arange(4.0), bob, alice)
        assert [w.id for w in m.location] == ["bob", "local-alice"]
        doubled = m * 2
        assert torch.equal(await doubled.get(sum_results=True), torch.arange(4.0) * 4)
        a = ft.send(torch.tensor([1.0, 2.0], requires_grad=True), bob, alice)
        (a * 3).sum().backward()
        grads = [t.grad for t in await a.get()]
        assert all(torch.equal(g, torch.full((2,), 3.0)) for g in grads)
        del m
        assert await bob.object_ids() == []
        assert await alice.object_ids() == []
