"""Simulated clients on worker processes: one command per executor against one per client.

``python -m benchmarks.simulation_commands [--rounds N]``: the simulation suite's work (MLP
64-32-10, SGD lr 0.1, batches of 16, 100 clients a round; 1,000 clients on the digits, 10,000
on 100,000 digit-shaped examples) on 1 virtual executor, 1 and 2 local worker processes
(``--threads 1``), each twice in the same run, one after the other: *before*, each sampled
client as its own ``fedtensor.local_update`` (the path ``ft.fit`` takes for a plain shard,
forced by hiding ``ClientShard`` from it) on workers started without ``--warm-up``; *after*,
as ``ft.fit`` runs simulated clients now: one ``fedtensor.local_updates`` per executor and
round (:mod:`fedtensor.worker.local_updates`), on warmed-up workers. Prints the first round
(from calling ``ft.fit``), the mean later round and a checksum of the final weights, which
must be the same before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time
from typing import Any

import torch

import fedtensor as ft
import fedtensor.federated.fit as _fit
from benchmarks.flower_side import MLP, digits_like
from fedtensor.demo import load_digits

POOLS = ("virtual1", "process1", "process2")


class _NotASimulatedClient:
    """Stands in for ``ClientShard`` in ``ft.fit``: no shard is one, so each trains alone."""


async def _run(after: bool, pool: str, clients: int, data: Any, rounds: int) -> tuple[float, ...]:
    names = vars(_fit)  # ft.fit's module globals: where it looks ClientShard up
    real = names["ClientShard"]
    names["ClientShard"] = real if after else _NotASimulatedClient
    try:
        async with contextlib.AsyncExitStack() as stack:
            if pool == "virtual1":
                worker = ft.VirtualWorker(f"{pool}-{after}-{clients}")
                executors: list[Any] = [await stack.enter_async_context(worker)]
            else:
                group = ft.local_workers(
                    int(pool[-1]), 1, name=f"{pool}-{after}", warm_up=after, ping_timeout=600
                )
                executors = list(await stack.enter_async_context(group))
            simulated = ft.simulate_clients(data, clients=clients, executors=executors, seed=0)
            for shard in {id(s.worker): s for s in simulated.shards}.values():
                await shard.targets[:1].fetch(free=True, timeout=120)  # its block is stored
            torch.manual_seed(0)
            model = MLP()
            ends: list[float] = []
            started = time.perf_counter()
            history = await ft.fit(
                model, simulated, rounds=rounds, fraction=100 / clients, batch_size=16, lr=0.1,
                seed=0, progress=False, on_round=lambda _: ends.append(time.perf_counter()),
            )  # fmt: skip
            simulated.close()
    finally:
        names["ClientShard"] = real
    later = statistics.fmean(metrics.seconds for metrics in list(history)[1:])
    checksum = sum(float(value.double().sum()) for value in model.state_dict().values())
    return ends[0] - started, later, checksum


async def main(rounds: int) -> None:
    torch.set_num_threads(1)
    train, _ = load_digits(0)
    sets = {1_000: train, 10_000: digits_like(train, 100_000)}
    async with ft.VirtualWorker("warm-up") as worker:  # this process's one-time costs first
        simulated = ft.simulate_clients(train, clients=100, executors=[worker])
        await ft.fit(MLP(), simulated, rounds=1, fraction=0.1, progress=False)
        simulated.close()
    print("clients pool      path   round 1 s  later s/round  weights checksum")
    for clients, data in sets.items():
        for pool in POOLS:
            figures = {}
            for after in (False, True):
                first, later, checksum = await _run(after, pool, clients, data, rounds)
                figures[after] = later
                print(
                    f"{clients:>7,} {pool:9} {'after' if after else 'before':6} {first:9.3f} "
                    f"{later:14.4f}  {checksum:.6f}",
                    flush=True,
                )
            print(f"{'':17}before/after: {figures[False] / figures[True]:.2f}x", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.simulation_commands", description=__doc__
    )
    parser.add_argument("--rounds", type=int, default=6)
    asyncio.run(main(parser.parse_args().rounds))
