"""Fair service between a worker's clients (issue 12, "one client stalls everyone").

- A long chain of operations from client A does not hold up client B's small round
  trip: each client has a lane of its own, run round robin by a pool of compute
  threads (fedtensor/worker/scheduler.py). Before, one compute thread ran every
  client's commands in arrival order, and B waited for all of A's chain.
- A large valid frame that takes seconds to decode (a store of a million empty
  lists) does not stop other clients: it is decoded on its client's lane, not on the
  event loop, through a stream that lets other threads run (fedtensor/protocol/codec.py).

Both tests run against a worker process and assert on the order of events (B's
round trips complete before A's result arrives), not on times.
"""

from __future__ import annotations

import asyncio
import math
import time

import anyio
import pytest
import torch

import fedtensor as ft
from fedtensor.protocol.chunks import split_frame
from fedtensor.protocol.codec import encode_frame
from fedtensor.protocol.messages import ListObjects, Store
from fedtensor.protocol.wsframes import Opcode, header
from fedtensor.testing import WorkerProcess

pytestmark = pytest.mark.anyio

#: A masking key of zeros: the masked payload is the payload itself.
ZERO_KEY = b"\0\0\0\0"


def _chain(x: ft.PointerTensor, steps: int) -> ft.PointerTensor:
    for _ in range(steps):
        x = (x @ x).tanh()
    return x


def _steps_lasting(seconds: float, x: torch.Tensor) -> int:
    """How many `_chain` steps on ``x`` take about ``seconds`` here (at most 100)."""
    started = time.perf_counter()
    for _ in range(3):
        x = (x @ x).tanh()
    step = (time.perf_counter() - started) / 3
    return min(100, max(3, math.ceil(seconds / step)))


async def _small_round_trip(client: ft.RemoteWorker) -> None:
    y = ft.send(torch.arange(7.0), client)
    assert torch.equal(await (y + 1).get(), torch.arange(7.0) + 1)


async def test_a_long_chain_does_not_hold_up_another_clients_round_trip(
    ft_worker_processes: object,
) -> None:
    process: WorkerProcess = ft_worker_processes("fair-chain")  # type: ignore[operator]
    local = torch.randn(500, 500) / 23
    steps = _steps_lasting(0.8, local)
    async with (
        ft.connect(process.url, token=process.token, timeout=60) as a,
        ft.connect(process.url, token=process.token, timeout=60) as b,
    ):
        await _small_round_trip(a)
        await _small_round_trip(b)
        x = ft.send(local, a)
        first = _chain(x, steps)
        halfway = asyncio.ensure_future(first.sum().get())
        await asyncio.sleep(0)  # the fetch is queued, and the batch sent with it
        second = _chain(first, steps)
        final = asyncio.ensure_future(second.sum().get())
        # A's first half is done: its second half, sent right behind it, is running.
        with anyio.fail_after(60):
            await halfway
        await _small_round_trip(b)
        # B's round trip did not wait for A's chain (before: it did, by ~1 s).
        assert not final.done()
        with anyio.fail_after(60):
            await final
        del x, first, second


async def _raw_client(url: str, token: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A websocket connection made by hand, after the worker accepted its handshake."""
    host, port = url.removeprefix("ws://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        (
            "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {token}\r\n\r\n"
        ).encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


async def test_a_large_frame_slow_to_decode_does_not_stop_other_clients(
    ft_worker_processes: object,
) -> None:
    process: WorkerProcess = ft_worker_processes("fair-decode")  # type: ignore[operator]
    # A valid 1 MB frame that takes seconds to decode (before: on the event loop), then
    # a command whose reply says the worker is past it.
    frame = encode_frame([Store(1, [[] for _ in range(1_000_000)]), ListObjects(7)])
    messages = [
        header(Opcode.BINARY, len(message), ZERO_KEY) + bytes(message)
        for message in split_frame(frame, 1 << 20)
    ]
    async with ft.connect(process.url, token=process.token, timeout=60) as b:
        await _small_round_trip(b)
        reader, writer = await _raw_client(process.url, process.token)
        try:
            writer.writelines(messages)
            await writer.drain()
            replied = asyncio.ensure_future(reader.read(1))  # A's answer, whatever it is
            # Before: the worker's loop was decoding for seconds, and B's round trips
            # waited behind it; the first to finish came after A's answer.
            for _ in range(5):
                with anyio.fail_after(60):
                    await _small_round_trip(b)
                assert not replied.done()
            with anyio.fail_after(60):
                assert await replied  # A is served too
        finally:
            writer.close()
