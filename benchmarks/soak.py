"""Soak: many clients of mixed, misbehaving traffic against one worker process for minutes,
and the worker's resident memory before and after (issue 12: "a worker no client can take
down"; target: the end within 10% of the start).

``python -m benchmarks.soak [--minutes 10] [--clients 8] [--seed 0]``

Each client loops over a random mix, checking every value it gets back:

- a small round trip (send, add, get) and a pipelined chain of adds;
- a large tensor (4-8 MiB: a split frame) sent, computed on and fetched;
- Python values made on the worker (``tolist``), kept, then released;
- objects left behind on purpose: a connection closed with objects stored (the worker
  frees them with the session);
- a disconnection mid-message: a raw connection sends the handshake, the head of a split
  frame of 8 MiB and part of its first message, then resets TCP.

Every client also reconnects now and then. The worker runs in a process of its own,
started with a handler that runs ``gc.collect()`` on SIGUSR1, so that its memory is read
after a full collection: once it is ready, before any client, then after the run once
every client has left, and (without a collection) every minute in between.

There is no warm-up: the start is the worker as it starts. The memory a worker keeps
for traffic (recycled buffers, ``protocol/pool.py``, up to 256 MiB, and the C
allocator's free pages) is its own to give back once the last client has left
(:func:`fedtensor.protocol.pool.release_idle`); before it did, the memory after the run
was 10% above the memory after a warm-up, most of it the pool's high-water mark.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch

import fedtensor as ft
from fedtensor.protocol.chunks import START
from fedtensor.protocol.wsframes import Opcode, header
from fedtensor.testing import WorkerProcess

#: Runs the worker's command line with a SIGUSR1 handler that collects garbage.
_WORKER = (
    "import gc, signal, sys; signal.signal(signal.SIGUSR1, lambda *_: gc.collect()); "
    "from fedtensor.cli import main; sys.exit(main(sys.argv[1:]))"
)
TARGET_GROWTH = 0.10


@dataclass
class Tally:
    """What the clients did, all together."""

    counts: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def count(self, kind: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1


def start_worker(*args: str) -> WorkerProcess:
    token = secrets.token_urlsafe(24)
    log = tempfile.TemporaryFile("w+", prefix="fedtensor-soak-")  # noqa: SIM115
    command = [sys.executable, "-c", _WORKER, "worker", "--id", "soak", "--host", "127.0.0.1"]
    command += ["--port", "0", "--log-level", "ERROR", *args]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=log,
        stdin=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "FEDTENSOR_TOKEN": token},
    )
    worker = WorkerProcess("soak", "", token, process, log)
    for line in process.stdout or ():
        if " ready on " in line:
            worker.url = line.rsplit(" ", 1)[1].strip()
            return worker
    raise RuntimeError(f"the worker exited ({process.wait()}): {worker.log()[-400:]}")


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) << 10
    raise RuntimeError("no VmRSS")


async def collected_rss(worker: WorkerProcess) -> int:
    """The worker's resident memory after a full garbage collection (and a moment's calm)."""
    worker.process.send_signal(signal.SIGUSR1)
    await asyncio.sleep(1.0)
    return rss(worker.process.pid)


def _check(value: object, expected: torch.Tensor, what: str, tally: Tally) -> None:
    if not isinstance(value, torch.Tensor) or not torch.equal(value, expected):
        tally.errors.append(f"{what}: wrong value")


async def _abort_mid_message(url: str, token: str) -> None:
    """Handshake, the head of an 8 MiB split frame and 200 KiB of it, then a TCP reset."""
    host, port = url.removeprefix("ws://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            (
                "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n"
            ).encode()
        )
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        key = b"\0\0\0\0"  # masked with zeros: the payload as it is
        head = struct.pack(">BQ", START, 8 << 20)
        writer.write(header(Opcode.BINARY, len(head), key) + head)
        writer.write(header(Opcode.BINARY, 1 << 20, key) + bytes(200 << 10))
        await writer.drain()
    finally:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()


async def _one_step(client: ft.RemoteWorker, rng: random.Random, tally: Tally) -> None:
    kind = rng.choices(
        ["round_trip", "chain", "big", "values", "left_behind"], weights=[40, 20, 10, 20, 10]
    )[0]
    if kind == "round_trip":
        t = torch.randn(rng.randint(1, 64))
        _check(await (ft.send(t, client) + 1).get(), t + 1, kind, tally)
    elif kind == "chain":
        x = ft.send(torch.zeros(16), client)
        for _ in range(50):
            x = x + 1
        _check(await x.get(), torch.full((16,), 50.0), kind, tally)
    elif kind == "big":
        # 4, 6 or 8 MiB: buffers of these sizes are recycled (protocol/pool.py), and the
        # warm-up brings the pool to its steady state.
        t = torch.randn(rng.choice([1 << 20, 3 << 19, 2 << 20]))
        y = ft.send(t, client) * 2
        _check(await y.get(), t * 2, kind, tally)
    elif kind == "values":  # Python lists made on the worker (tolist), kept, then released
        t = torch.arange(float(rng.randint(1, 2000)))
        x = ft.send(t, client)
        lists = [x.tolist() for _ in range(10)]
        if await lists[0].get() != t.tolist():
            tally.errors.append("values: wrong value")
        del lists, x
    else:  # objects left on the worker: freed with the session
        kept = [ft.send(torch.randn(1000), client) for _ in range(10)]
        await kept[-1]
        tally.count(kind)
        raise _Reconnect(kept)
    tally.count(kind)


class _Reconnect(Exception):
    """Not an error: leave the connection with the objects ``kept`` still stored."""

    def __init__(self, kept: object) -> None:
        self.kept = kept


async def client_loop(
    worker: WorkerProcess, number: int, until: float, seed: int, tally: Tally
) -> None:
    rng = random.Random(seed * 1000 + number)
    while time.monotonic() < until:
        try:
            async with ft.connect(worker.url, token=worker.token, timeout=120) as client:
                for _ in range(rng.randint(20, 200)):
                    if time.monotonic() >= until:
                        break
                    if rng.random() < 0.02:
                        await _abort_mid_message(worker.url, worker.token)
                        tally.count("aborted_mid_message")
                    await _one_step(client, rng, tally)
            tally.count("reconnect")
        except _Reconnect:
            tally.count("reconnect")
        except Exception as exc:
            tally.errors.append(f"client {number}: {type(exc).__name__}: {exc}")


async def soak(minutes: float, clients: int, seed: int) -> int:
    worker = start_worker()
    try:
        start = await collected_rss(worker)  # ready, before any client
        print(f"worker ready: RSS {start / 2**20:.1f} MiB", flush=True)
        tally = Tally()
        peak = start
        until = time.monotonic() + minutes * 60.0
        running = asyncio.gather(
            *(client_loop(worker, n, until, seed + 100, tally) for n in range(clients))
        )
        samples = 0
        while not running.done():
            await asyncio.wait([running], timeout=5.0)
            peak = max(peak, rss(worker.process.pid))
            samples += 1
            if samples % 12 == 0:
                print(
                    f"  {samples * 5 / 60:.0f} min: RSS {rss(worker.process.pid) / 2**20:.1f} MiB",
                    flush=True,
                )
        await running
        end = await collected_rss(worker)
    finally:
        worker.stop()
    growth = end / start - 1.0
    status = "PASS" if abs(growth) <= TARGET_GROWTH and not tally.errors else "MISS"
    print(
        f"soak: {clients} clients x {minutes:g} min against a worker process: RSS "
        f"{start / 2**20:.1f} MiB when ready, {end / 2**20:.1f} MiB at the end "
        f"({growth:+.1%}; peak {peak / 2**20:.1f} MiB); target within "
        f"{TARGET_GROWTH:.0%}: {status}"
    )
    print("  " + ", ".join(f"{kind} {n:,}" for kind, n in sorted(tally.counts.items())))
    if tally.errors:
        print(f"  {len(tally.errors)} errors, the first: {tally.errors[:3]}")
    return 0 if status == "PASS" else 1


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sys.exit(asyncio.run(soak(args.minutes, args.clients, args.seed)))


if __name__ == "__main__":
    main()
