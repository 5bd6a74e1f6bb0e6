"""Secret-shared arithmetic against the same arithmetic in the clear, in one run.

Three worker processes on 127.0.0.1 (bob and alice hold the shares, charlie is the crypto
provider) sharing a federation key, so the Beaver triples travel worker to worker. Per
size ``n``, the best of ``--repeat`` runs of:

- **shared matmul**: ``await (sx.matmul(sw)).get()`` of two fixed-precision ``n x n``
  tensors shared over bob and alice (a triple from charlie, moved to both, e and f
  opened, the result reconstructed);
- **shared add**: ``await (sx + sw).get()``;
- **shared comparison**: ``await (await sx.gt(0)).get()`` (eight triples, eight openings);
- **max along a dim**: ``await sx.max(dim=1)``, values and indices reconstructed (log2(n)
  rounds of a comparison and a selection);
- **a worker's share**: bob's ``n x n`` tensor shared by bob over bob and alice
  (``await ft.fix_precision(ptr).share(...)``: bob draws the shares, alice's moves worker
  to worker), then reconstructed: PySyft's Part 10 step, against **a client's share**, the
  same with the tensor here (the client draws the shares and sends them);
- **baseline**: ``x @ w`` sent to bob as a plain pointer, ``await (x_ptr @ w_ptr).get()``
  (one worker, no secrecy): the same work in the clear over the same transport.

It prints the times, the shared matmul's ratio to the baseline, and one local int64
``n x n`` matmul (torch has no BLAS for integers: each party does several of those).

    python -m benchmarks.sharing [--sizes 64 256] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import torch

import fedtensor as ft
from fedtensor.testing import start_worker_process


async def _best(run: Callable[[], Awaitable[Any]], repeat: int) -> float:
    await run()  # warm-up: first-use costs (connections between workers, imports)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        await run()
        best = min(best, time.perf_counter() - start)
    return best


async def _one_size(bob: Any, alice: Any, charlie: Any, n: int, repeat: int) -> None:
    x, w = torch.rand(n, n) - 0.5, torch.rand(n, n) - 0.5
    sx = ft.fix_precision(x).share(bob, alice, crypto_provider=charlie)
    sw = ft.fix_precision(w).share(bob, alice, crypto_provider=charlie)
    px, pw = ft.send(x, bob), ft.send(w, bob)
    await px.sum()  # stored before the clocks start
    ring_x, ring_w = ft.fix_precision(x).ring, ft.fix_precision(w).ring

    async def plain() -> None:
        await (px @ pw).get()

    async def shared_add() -> None:
        await (sx + sw).get()

    async def shared_matmul() -> None:
        await (await sx.matmul(sw)).get()

    async def shared_compare() -> None:
        await (await sx.gt(0)).get()

    async def int64_matmul() -> None:  # what each party's torch does, 4 times
        torch.matmul(ring_x, ring_w)

    async def max_dim() -> None:
        values, indices = await sx.max(dim=1)
        await asyncio.gather(values.get(), indices.get())

    async def workers_share() -> None:
        await (await ft.fix_precision(px).share(bob, alice, crypto_provider=charlie)).get()

    async def clients_share() -> None:
        await ft.fix_precision(x).share(bob, alice, crypto_provider=charlie).get()

    base = await _best(plain, repeat)
    add = await _best(shared_add, repeat)
    matmul = await _best(shared_matmul, repeat)
    compare = await _best(shared_compare, repeat)
    local = await _best(int64_matmul, repeat)
    maximum = await _best(max_dim, repeat)
    by_worker = await _best(workers_share, repeat)
    by_client = await _best(clients_share, repeat)
    print(
        f"{n:>5} {base * 1e3:>9.1f} {add * 1e3:>14.1f} {matmul * 1e3:>17.1f} "
        f"{matmul / base:>5.1f}x {compare * 1e3:>12.1f} {local * 1e3:>18.1f} "
        f"{maximum * 1e3:>13.1f} {by_worker * 1e3:>17.1f} {by_client * 1e3:>17.1f}"
    )


async def _measure(urls: list[tuple[str, str]], sizes: list[int], repeat: int) -> None:
    (bob_url, bob_token), (alice_url, alice_token), (charlie_url, charlie_token) = urls
    async with (
        ft.connect(bob_url, token=bob_token) as bob,
        ft.connect(alice_url, token=alice_token) as alice,
        ft.connect(charlie_url, token=charlie_token) as charlie,
    ):
        print(
            f"{'n':>5} {'plain ms':>9} {'shared add ms':>14} {'shared matmul ms':>17} "
            f"{'ratio':>6} {'x > 0 ms':>12} {'local int64 mm ms':>18} {'max(dim=1) ms':>13} "
            f"{'worker share ms':>17} {'client share ms':>17}"
        )
        for n in sizes:
            await _one_size(bob, alice, charlie, n, repeat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    os.environ["FEDTENSOR_FEDERATION_KEY"] = os.urandom(16).hex()  # inherited by the workers
    workers = []
    try:
        for name in ("bob", "alice", "charlie"):
            workers.append(start_worker_process(name, "--threads", "1"))
        urls = [(worker.url, worker.token) for worker in workers]
        asyncio.run(_measure(urls, args.sizes, args.repeat))
    finally:
        for worker in workers:
            worker.stop()


if __name__ == "__main__":
    main()
