"""Federated evaluation: how the global model does on each client's own held-out data.

    python examples/federated_evaluation.py            # writes federated_evaluation.png
    python examples/federated_evaluation.py --plot docs/federated_evaluation.png

The digits are split over 8 in-process workers with Dirichlet label skew (alpha 0.5: each
worker sees mostly a few classes); each keeps 20% of its shard out of training (``holdout=0.2``).
Every round, the global model is evaluated on the held-out parts of half the workers, on the
workers (``fedtensor.evaluate``: no data leaves them, no code is sent); the history has the
example-weighted mean and the 10th, 50th and 90th percentile of per-client accuracy, which
the progress line and the plot show next to the central evaluation.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

import torch

import fedtensor as ft
from fedtensor.demo import DigitsCNN, load_digits


async def main(rounds: int, plot: str) -> None:
    train, test = load_digits(seed=0)
    async with contextlib.AsyncExitStack() as stack:
        workers = [
            await stack.enter_async_context(ft.VirtualWorker(f"client{i}")) for i in range(8)
        ]
        federated = ft.federate(
            train, workers, split="dirichlet", alpha=0.5, seed=0, holdout=0.2, min_size=20
        )
        torch.manual_seed(0)
        model = DigitsCNN()
        history = await ft.fit(
            model, federated, rounds=rounds, epochs=2, batch_size=16, lr=0.2,
            eval_data=test, evaluate_fraction=0.5, evaluate_every=1, seed=0,
        )  # fmt: skip
        del federated
    last = history[-1]
    low, median, high = last.client_eval_accuracy_quantiles
    print(
        f"after {rounds} rounds: central {100 * last.eval_accuracy:.1f}%, clients "
        f"{100 * last.client_eval_accuracy:.1f}% (p10 {100 * low:.1f}%, p50 "
        f"{100 * median:.1f}%, p90 {100 * high:.1f}%)"
    )
    print(f"plot: {history.plot(plot)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--plot", default="federated_evaluation.png")
    options = parser.parse_args()
    asyncio.run(main(options.rounds, options.plot))
