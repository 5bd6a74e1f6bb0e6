"""Moving a tensor between two worker processes: straight (``ptr.move``) vs through the client.

Two ``fedtensor worker`` processes on 127.0.0.1 share a federation key. Per size, the best
of ``--repeat`` runs of:

- **direct**: ``await x.move(alice)``, then a small fetch on alice (the tensor is there);
- **via client** (the baseline, what a program without ``move`` does): ``await x.get()``
  from bob, ``ft.send`` to alice, the same small fetch.

It prints both times, their ratio, and the bytes the client received during each (every
byte its websocket connections read), which is the point: a move brings the client a
few hundred bytes whatever the tensor's size.

    python -m benchmarks.move [--sizes-mib 8 64] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Awaitable, Callable

import torch

import fedtensor as ft
from fedtensor.net import peer as peer_module
from fedtensor.testing import start_worker_process

_received = [0]
_buffer_updated = peer_module.WebSocketPeer.buffer_updated


def _counting(self: peer_module.WebSocketPeer, nbytes: int) -> None:
    _received[0] += nbytes
    _buffer_updated(self, nbytes)


async def _timed(run: Callable[[], Awaitable[None]]) -> tuple[float, int]:
    before, start = _received[0], time.perf_counter()
    await run()
    return time.perf_counter() - start, _received[0] - before


async def _measure(urls: list[tuple[str, str]], sizes: list[int], repeat: int) -> None:
    (bob_url, bob_token), (alice_url, alice_token) = urls
    async with (
        ft.connect(bob_url, token=bob_token) as bob,
        ft.connect(alice_url, token=alice_token) as alice,
    ):
        print(
            f"{'MiB':>5} {'direct ms':>10} {'via client ms':>14} {'ratio':>6} "
            f"{'direct bytes to client':>23} {'via client bytes':>17}"
        )
        for mib in sizes:
            tensor = torch.randn(mib << 18)  # float32: mib MiB
            best: dict[str, tuple[float, int]] = {}
            for _ in range(repeat):
                for name in ("direct", "via client"):
                    x = ft.send(tensor, bob)
                    await x.sum()  # stored on bob before the clock starts

                    async def direct(x: ft.PointerTensor = x) -> None:
                        await x.move(alice)
                        await x.sum()

                    async def via_client(x: ft.PointerTensor = x) -> None:
                        y = ft.send(await x.get(), alice)
                        await y.sum()

                    result = await _timed(direct if name == "direct" else via_client)
                    if name not in best or result[0] < best[name][0]:
                        best[name] = result
                    del x
            (d, d_bytes), (c, c_bytes) = best["direct"], best["via client"]
            print(
                f"{mib:>5} {d * 1e3:>10.1f} {c * 1e3:>14.1f} {c / d:>6.2f} "
                f"{d_bytes:>23,} {c_bytes:>17,}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    os.environ["FEDTENSOR_FEDERATION_KEY"] = os.urandom(16).hex()  # inherited by the workers
    peer_module.WebSocketPeer.buffer_updated = _counting  # type: ignore[method-assign]
    bob = start_worker_process("bob", "--threads", "1")
    alice = start_worker_process("alice", "--threads", "1")
    try:
        urls = [(bob.url, bob.token), (alice.url, alice.token)]
        asyncio.run(_measure(urls, args.sizes_mib, args.repeat))
    finally:
        bob.stop()
        alice.stop()


if __name__ == "__main__":
    main()
