"""What PySyft-style training on pointers costs, against baselines measured in the same run.

Run with ``python -m benchmarks.pysyft_training`` (``--quick`` for fewer rounds). Rows:

- a training step of ``torch.optim.SGD`` on a remote ``nn.Linear`` (forward, MSE,
  backward, step, all pipelined to a virtual worker, one ``loss.get()`` every step)
  against the same step run locally;
- the same step without the ``loss.get()`` (pipelined, 100 steps then one fetch);
- 10,000 chained adds then one ``get``, with result shapes inferred on the client
  (:mod:`fedtensor.client.meta`) against the same chain with inference switched off:
  what knowing shapes locally costs a pipeline.

Rounds are interleaved (fedtensor, baseline, fedtensor, ...) and the medians compared, since
this shared machine's absolute figures move between runs.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import torch

import fedtensor as ft
from fedtensor.client import pointer as _pointer

STEPS = 100
CHAIN = 10_000


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.randn(32, 8), torch.randn(32, 1)


async def _median(timed: Callable[[], Awaitable[float]], rounds: int) -> float:
    return statistics.median([await timed() for _ in range(rounds)])


async def main(rounds: int) -> None:
    data, target = _data()
    async with ft.VirtualWorker("bench") as bob:
        remote_data, remote_target = ft.send(data, bob), ft.send(target, bob)
        model = ft.send(torch.nn.Linear(8, 1), bob)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        local_model = torch.nn.Linear(8, 1)
        local_optimizer = torch.optim.SGD(local_model.parameters(), lr=0.01, momentum=0.9)

        def step(model: Any, optimizer: Any, x: Any, y: Any) -> Any:
            optimizer.zero_grad()
            loss: Any = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            optimizer.step()
            return loss

        async def remote_fetching() -> float:
            start = time.perf_counter()
            for _ in range(STEPS):
                await step(model, optimizer, remote_data, remote_target).get()
            return (time.perf_counter() - start) / STEPS

        async def remote_pipelined() -> float:
            start = time.perf_counter()
            for _ in range(STEPS - 1):
                step(model, optimizer, remote_data, remote_target)
            await step(model, optimizer, remote_data, remote_target).get()
            return (time.perf_counter() - start) / STEPS

        async def local() -> float:
            start = time.perf_counter()
            for _ in range(STEPS):
                step(local_model, local_optimizer, data, target).item()
            return (time.perf_counter() - start) / STEPS

        def chain(infer: Callable[..., Any]) -> Callable[[], Awaitable[float]]:
            async def timed() -> float:
                _pointer.infer = infer  # type: ignore[attr-defined]
                try:
                    x = ft.send(torch.ones(5), bob)
                    start = time.perf_counter()
                    for _ in range(CHAIN):
                        x = x + 1
                    await x.get()
                    return CHAIN / (time.perf_counter() - start)
                finally:
                    _pointer.infer = inferring  # type: ignore[attr-defined]

            return timed

        inferring = _pointer.infer  # type: ignore[attr-defined]
        await remote_fetching()  # warm-up: fills the shape cache, imports torch.optim's paths
        figures: dict[str, list[float]] = {
            name: [] for name in ("fetch", "pipe", "local", "on", "off")
        }
        contenders = {
            "fetch": remote_fetching,
            "pipe": remote_pipelined,
            "local": local,
            "on": chain(inferring),
            "off": chain(lambda *args: None),
        }
        for _ in range(rounds):
            for name, timed in contenders.items():
                figures[name].append(await timed())
        median = {name: statistics.median(values) for name, values in figures.items()}
        print("| benchmark | fedtensor | baseline | ratio |")
        print("| --- | --- | --- | --- |")
        print(
            f"| SGD step on a remote nn.Linear, loss.get() each step | "
            f"{median['fetch'] * 1e6:.0f} µs | local step {median['local'] * 1e6:.0f} µs | "
            f"{median['fetch'] / median['local']:.1f}x |"
        )
        print(
            f"| the same step, pipelined ({STEPS} steps, one get) | "
            f"{median['pipe'] * 1e6:.0f} µs | local step {median['local'] * 1e6:.0f} µs | "
            f"{median['pipe'] / median['local']:.1f}x |"
        )
        print(
            f"| {CHAIN:,} chained adds, then get | {median['on']:,.0f} ops/s (shapes inferred) | "
            f"{median['off']:,.0f} ops/s (inference off) | {median['on'] / median['off']:.2f}x |"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds instead of 9")
    arguments = parser.parse_args()
    asyncio.run(main(3 if arguments.quick else 9))
