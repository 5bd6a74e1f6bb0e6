"""``fedtensor demo``: a small CNN trained federatedly on handwritten digits.

The data set is scikit-learn's ``load_digits`` (1,797 8x8 images of the digits
0-9, shipped inside the package: nothing is downloaded). A seeded 80/20 split
gives training and held-out examples; the training examples are split over the
workers (IID by default) and sent there; the model trains with FedAvg rounds
and the held-out accuracy is printed each round. At the end the same model
trains centrally, in plain torch, for the same number of epochs, and the two
accuracies are printed side by side.

Without ``--workers`` the workers are in-process virtual workers; with
``--workers ws://HOST:PORT ...`` they are ``fedtensor worker`` processes; with
``--parallel`` one worker process per core, started and stopped by the demo
(:func:`fedtensor.local_workers`), so that the workers train in parallel.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedtensor.client.handles import WorkerHandle, connect
from fedtensor.errors import FedTensorError
from fedtensor.federated.datasets import federate
from fedtensor.federated.fit import evaluate, fit
from fedtensor.federated.privacy import DPSGD, CentralDP
from fedtensor.federated.secagg import SecAggPlus
from fedtensor.federated.strategies import FedAdam, FedAvg, FedAvgM, FedProx, Strategy
from fedtensor.local import available_cores, local_workers
from fedtensor.virtual import VirtualWorker

__all__ = ["DigitsCNN", "load_digits", "main", "train_centrally"]

STRATEGIES: dict[str, Callable[[], Strategy]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedavgm": FedAvgM,
    "fedadam": FedAdam,
}


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions and two linear layers for 8x8 digit images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))  # type: ignore[no-any-return]


def load_digits(
    seed: int = 0, test_fraction: float = 0.2
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``((train_x, train_y), (test_x, test_y))`` from scikit-learn's digits, scaled to [0, 1]."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits  # type: ignore[import-untyped]
    except ImportError as exc:
        raise ImportError(
            "the demo data needs scikit-learn: pip install 'fedtensor[demo]'"
        ) from exc
    digits = sklearn_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    labels = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    cut = len(images) - int(len(images) * test_fraction)
    train, test = order[:cut], order[cut:]
    return (images[train], labels[train]), (images[test], labels[test])


def train_centrally(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int = 0,
) -> None:
    """Plain torch minibatch SGD on all of ``data``: the baseline federated training meets."""
    examples, labels = data
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    model.train()
    for _epoch in range(epochs):
        permutation = torch.randperm(len(examples), generator=order)
        for start in range(0, len(examples), batch_size):
            batch = permutation[start : start + batch_size]
            loss = F.cross_entropy(model(examples[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedtensor demo",
        description="Train a small CNN federatedly on scikit-learn's digits and compare "
        "it with centralized training.",
    )
    parser.add_argument(
        "--workers",
        nargs="+",
        metavar="URL",
        help="worker URLs (ws://HOST:PORT); default: in-process virtual workers",
    )
    parser.add_argument(
        "--virtual", type=int, default=4, metavar="N", help="virtual workers (default 4)"
    )
    parser.add_argument(
        "--parallel",
        action="store_true",
        help="train on one worker process per core (ft.local_workers), in parallel, "
        "instead of virtual workers (which train one after another)",
    )
    parser.add_argument(
        "--token-env",
        default="FEDTENSOR_TOKEN",
        metavar="NAME",
        help="environment variable holding the workers' token (default FEDTENSOR_TOKEN; "
        "never on the command line, where other users could read it)",
    )
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=2, help="local epochs per round")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--split", choices=("iid", "dirichlet", "shards"), default="iid")
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    parser.add_argument("--strategy", choices=sorted(STRATEGIES), default="fedavg")
    parser.add_argument("--fraction", type=float, default=1.0, help="workers sampled per round")
    parser.add_argument("--min-workers", type=int, default=1)
    parser.add_argument("--round-timeout", type=float, default=None, metavar="SECONDS")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", metavar="FILE", help="save a checkpoint every round")
    parser.add_argument("--resume", action="store_true", help="start after the checkpoint's round")
    parser.add_argument("--plot", metavar="PNG", help="write the curves to this PNG file")
    parser.add_argument("--no-central", action="store_true", help="skip the centralized baseline")
    parser.add_argument(
        "--dp-epsilon",
        type=float,
        metavar="E",
        help="train with differential privacy, spending at most E (at delta 1e-5): DP-SGD "
        "on every worker (example-level), or central DP with --dp-level user; the noise is "
        "derived from E and the rounds",
    )
    parser.add_argument("--dp-level", choices=("example", "user"), default="example")
    parser.add_argument("--dp-clip", type=float, default=1.0, help="DP's clipping norm")
    parser.add_argument(
        "--secure-aggregation",
        action="store_true",
        help="aggregate by SecAgg+: this process learns only the sum of each round's updates",
    )
    return parser


async def _run(options: argparse.Namespace, out: Any) -> int:
    (train, test) = load_digits(options.seed)
    async with contextlib.AsyncExitStack() as stack:
        workers: list[WorkerHandle]
        if options.workers:
            token = os.environ.get(options.token_env)
            workers = [
                await stack.enter_async_context(connect(url, token=token))
                for url in options.workers
            ]
        elif options.parallel:
            workers = list(await stack.enter_async_context(local_workers(available_cores())))
        else:
            workers = [
                await stack.enter_async_context(VirtualWorker(f"worker{i}"))
                for i in range(options.virtual)
            ]
        data = federate(train, workers, split=options.split, alpha=options.alpha, seed=options.seed)
        where = (
            "worker processes"
            if options.workers
            else "local worker processes (one per core)"
            if options.parallel
            else "in-process virtual workers"
        )
        print(f"digits: {len(train[0])} training and {len(test[0])} held-out images", file=out)
        print(f"federated over {len(workers)} {where}: {data}", file=out)
        torch.manual_seed(options.seed)
        model = DigitsCNN()
        initial = {key: value.clone() for key, value in model.state_dict().items()}
        started = time.perf_counter()
        history = await fit(
            model,
            data,
            rounds=options.rounds,
            epochs=options.epochs,
            batch_size=options.batch_size,
            lr=options.lr,
            strategy=STRATEGIES[options.strategy](),
            fraction=options.fraction,
            min_workers=options.min_workers,
            round_timeout=options.round_timeout,
            eval_data=test,
            checkpoint=options.checkpoint,
            resume=options.resume,
            progress=out,
            seed=options.seed,
            **_privacy_options(options, data, out),
            secure_aggregation=SecAggPlus() if options.secure_aggregation else None,
        )
        federated_seconds = time.perf_counter() - started
    print("", file=out)
    print(history.table(), file=out)
    if not history:
        print("no rounds to run (the checkpoint already holds them)", file=out)
        return 0
    final = history[-1]
    print(
        f"\nfederated: {100 * final.eval_accuracy:.1f}% held-out accuracy after "
        f"{options.rounds} rounds x {options.epochs} local epoch(s) in {federated_seconds:.1f} s",
        file=out,
    )
    if not options.no_central:
        model.load_state_dict(initial)
        started = time.perf_counter()
        train_centrally(
            model,
            train,
            epochs=options.rounds * options.epochs,
            lr=options.lr,
            batch_size=options.batch_size,
            seed=options.seed,
        )
        central_seconds = time.perf_counter() - started
        _, central_accuracy = evaluate(model, *test)
        print(
            f"centralized: {100 * central_accuracy:.1f}% after the same "
            f"{options.rounds * options.epochs} epochs in {central_seconds:.1f} s",
            file=out,
        )
    if options.plot:
        path = history.plot(options.plot)
        print(f"curves written to {path}", file=out)
    return 0


def _privacy_options(options: argparse.Namespace, data: Any, out: Any) -> dict[str, Any]:
    """``fit``'s ``dp`` and ``target_epsilon`` for ``--dp-epsilon`` (none without it)."""
    if options.dp_epsilon is None:
        return {}
    dp: CentralDP | DPSGD
    if options.dp_level == "user":
        workers = len(data.shards)
        dp = CentralDP.for_epsilon(
            options.dp_epsilon,
            rounds=options.rounds,
            workers=workers,
            sampled=min(workers, max(options.min_workers, math.ceil(options.fraction * workers))),
            clip_norm=options.dp_clip,
        )
        what = "user-level central DP"
    else:
        dp = DPSGD.for_epsilon(
            options.dp_epsilon,
            rounds=options.rounds,
            examples=min(shard.size for shard in data.shards),
            batch_size=options.batch_size,
            epochs=options.epochs,
            clip_norm=options.dp_clip,
        )
        what = "example-level DP-SGD"
    print(
        f"differential privacy: {what}, clip {options.dp_clip:g}, noise multiplier "
        f"{dp.noise_multiplier:.3f} for epsilon {options.dp_epsilon:g} at delta {dp.delta:g}",
        file=out,
    )
    return {"dp": dp, "target_epsilon": options.dp_epsilon}


def main(argv: Sequence[str] | None = None, out: Any = None) -> int:
    """The ``fedtensor demo`` command; returns its exit status."""
    options = _parser().parse_args(argv)
    stream = sys.stdout if out is None else out
    try:
        return asyncio.run(_run(options, stream))
    except (FedTensorError, ImportError) as exc:
        print(f"fedtensor demo: {exc}", file=sys.stderr)
        return 1
