"""``python -m benchmarks.wss_throughput [--reps N]``: ``ft.send`` + ``get`` of 64 MiB float32
over ``wss://`` with the worker's own TLS layer (``fedtensor/net/tls.py``), against the same
with asyncio's TLS (``ssl=`` on the accepted socket, what the worker used before) and over
``ws://``: three worker processes on 127.0.0.1, timed interleaved in the same run (the shared
machine's figures move between runs; the ratios are the figures to compare). It prints the
median of each, in ms and in GB/s of tensor bytes moved (both ways), and the ratios.

``--serve CERT KEY [--asyncio-tls]`` is the worker role it starts (token ``t``).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
import torch
import trustme

import fedtensor as ft
from fedtensor.worker.server import WorkerServer, _ServerPeer

SIZE = 64 << 20
TOKEN = "t"


async def _serve(certfile: str | None, keyfile: str | None, asyncio_tls: bool) -> None:
    context = None
    if certfile is not None and keyfile is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certfile, keyfile)
    if asyncio_tls:  # the worker's connection set-up before fedtensor/net/tls.py

        async def start(self: WorkerServer, peer: _ServerPeer, connection: socket.socket) -> None:
            loop = asyncio.get_running_loop()
            await loop.connect_accepted_socket(lambda: peer, connection, ssl=context)

        WorkerServer._start = start  # type: ignore[method-assign]
    async with anyio.create_task_group() as task_group:
        server = WorkerServer("bench", token=TOKEN, ssl=context)
        url = await task_group.start(server.serve, "127.0.0.1", 0)
        print("ready on", url, flush=True)
        await anyio.to_thread.run_sync(sys.stdin.read)  # until the benchmark closes it
        server.shutdown()


async def _time_one(url: str, context: ssl.SSLContext | None, t: torch.Tensor) -> float:
    async with ft.connect(url, token=TOKEN, timeout=120, ssl=context) as client:
        await ft.send(torch.ones(4), client).get()  # connected and warm
        started = time.perf_counter()
        back = await ft.send(t, client).get()
        elapsed = time.perf_counter() - started
    assert torch.equal(back, t)
    return elapsed


def _start(*args: str) -> tuple[subprocess.Popen[str], str]:
    command = [sys.executable, "-m", "benchmarks.wss_throughput", "--serve", *args]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    if " ready on " not in f" {line}":
        process.kill()
        raise RuntimeError(f"the worker did not start: {line!r}")
    return process, line.split()[-1]


async def _main(reps: int) -> None:
    authority = trustme.CA()
    trusting = ssl.create_default_context()
    authority.configure_trust(trusting)
    with tempfile.TemporaryDirectory() as folder:
        certfile, keyfile = Path(folder, "cert.pem"), Path(folder, "key.pem")
        certificate = authority.issue_cert("127.0.0.1")
        certificate.private_key_and_cert_chain_pem.write_to_path(str(certfile))
        certificate.private_key_pem.write_to_path(str(keyfile))
        workers = {
            "wss, fedtensor's TLS": (_start(str(certfile), str(keyfile)), trusting),
            "wss, asyncio's TLS": (_start(str(certfile), str(keyfile), "--asyncio-tls"), trusting),
            "ws": (_start(), None),
        }
    t = torch.randn(SIZE // 4)
    times: dict[str, list[float]] = {name: [] for name in workers}
    try:
        for _ in range(reps):
            for name, ((_, url), context) in workers.items():
                times[name].append(await _time_one(url, context, t))
    finally:
        for (process, _), _ in workers.values():
            if process.stdin is not None:
                process.stdin.close()
            process.wait(30)
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, median in medians.items():
        print(f"{name:>22}: {median * 1e3:8.1f} ms  {2 * SIZE / median / 1e9:6.2f} GB/s")
    ours, theirs, plain = medians.values()
    print(f"fedtensor's TLS / asyncio's TLS: {ours / theirs:.2f}x the time")
    print(f"fedtensor's TLS / ws: {ours / plain:.2f}x, asyncio's TLS / ws: {theirs / plain:.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--serve", nargs="*", metavar="CERT_KEY")
    parser.add_argument("--asyncio-tls", action="store_true")
    args = parser.parse_args()
    if args.serve is not None:
        files = args.serve or [None, None]
        asyncio.run(_serve(files[0], files[1], args.asyncio_tls))
    else:
        asyncio.run(_main(args.reps))
