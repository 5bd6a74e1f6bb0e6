"""Federated learning in a few lines: a CNN trained on digits that stay on the workers.

    python examples/federated_digits.py                       # 4 in-process workers
    python examples/federated_digits.py --workers ws://127.0.0.1:8765 ws://127.0.0.1:8766

(for worker processes, start them first with ``fedtensor worker --id NAME --port PORT``
and the same ``FEDTENSOR_TOKEN`` in the environment of both sides). ``fedtensor demo``
is the same, with more options and the centralized baseline beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits  # type: ignore[import-untyped]
from torch import nn

import fedtensor as ft


class CNN(nn.Module):
    """Any module will do: it is traced into a plan, and its code never leaves this process."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))  # type: ignore[no-any-return]


async def main(urls: list[str], rounds: int) -> None:
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    train, test = order[:1437], order[1437:]

    async with contextlib.AsyncExitStack() as stack:
        if urls:
            token = os.environ.get("FEDTENSOR_TOKEN")
            workers = [
                await stack.enter_async_context(ft.connect(url, token=token)) for url in urls
            ]
        else:
            workers = [
                await stack.enter_async_context(ft.VirtualWorker(name))
                for name in ("bob", "alice", "carol", "dave")
            ]
        # The training images go to the workers; from here on only pointers are held here.
        data = ft.federate((images[train], labels[train]), workers, split="iid", seed=0)
        print(data)

        torch.manual_seed(0)
        model = CNN()
        history = await ft.fit(
            model,
            data,
            rounds=rounds,
            epochs=1,
            batch_size=16,
            lr=0.2,
            strategy=ft.FedAvg(),
            eval_data=(images[test], labels[test]),
        )
    print(history.table())
    print(f"held-out accuracy: {100 * history[-1].eval_accuracy:.1f}%")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", nargs="+", default=[], metavar="URL")
    parser.add_argument("--rounds", type=int, default=15)
    arguments = parser.parse_args()
    asyncio.run(main(arguments.workers, arguments.rounds))
