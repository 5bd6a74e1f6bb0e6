"""The federated suite: ``ft.fit`` next to the same training with plain torch, in one run.

The demo's task: ``DigitsCNN`` on digits, SGD (lr 0.2, batches of 16) for E epochs (10; 3 with
``--quick``) from the same weights: ``train_centrally`` (the baseline); ``ft.fit(rounds=E,
epochs=1)`` over 4 and over 2 virtual workers; over 2 worker processes (websockets), each with
``--threads`` half this process's (the cores shared out, as two machines would have); and the
same at torch's default threads (no target: they oversubscribe the cores). ``ft.federate``
sends the data before the clock starts; a warm-up (1 round or epoch) pays one-time costs
first. Figures are medians of 3 runs (1 with ``--quick``), per round means from ``History``;
the held-out accuracy shows they trained comparably (FedAvg over k workers: 1/k the steps).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import statistics
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

import fedtensor as ft
from benchmarks import common
from benchmarks.common import Baseline, Config, Row
from fedtensor.demo import DigitsCNN, load_digits, train_centrally
from fedtensor.testing import WorkerProcess, start_worker_process

LR, BATCH_SIZE, SEED = 0.2, 16, 0
HYPERPARAMETERS: dict[str, Any] = {"lr": LR, "batch_size": BATCH_SIZE, "seed": SEED}
ROUND_COLUMNS = {  # the per-round table: a RoundMetrics field, its format
    "s/round": ("seconds", ".3f"),
    "compute s/round": ("compute_seconds", ".3f"),
    "transfer s/worker/round": ("transfer_seconds", ".3f"),
    "bytes sent/round": ("bytes_sent", ",.0f"),
    "bytes received/round": ("bytes_received", ",.0f"),
}
TARGET_VIRTUAL_FACTOR = 1.2
TARGET_PROCESS_FACTOR = 1.5


@dataclass
class Contender:
    """A way to train, its data (on its workers), and what its timed runs measured."""

    key: str
    title: str
    workers: int  # 0: the local baseline
    factor: float | None = None  # target: at most this x the baseline's seconds
    data: ft.FederatedDataset | None = None
    error: str | None = None
    seconds: list[float] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)  # RoundMetrics of timed fits
    data_send_s: float | None = None

    async def train(self, train: Any, test: Any, epochs: int) -> None:
        """One training, recorded: seconds, held-out accuracy, rounds."""
        torch.manual_seed(SEED)
        model, start, history = DigitsCNN(), time.perf_counter(), []
        try:
            if self.data is None:
                train_centrally(model, train, epochs=epochs, **HYPERPARAMETERS)
            else:
                fit = {"rounds": epochs, "epochs": 1, "progress": False, **HYPERPARAMETERS}
                history = list(await ft.fit(model, self.data, **fit))
        except Exception as exc:
            self.fail(exc)
            return
        self.seconds.append(time.perf_counter() - start)
        self.accuracies.append(ft.evaluate(model, *test)[1])
        self.rounds += map(asdict, history)

    async def send_data(self, train: Any, workers: Sequence[Any]) -> None:
        """``ft.federate`` the training set; wait until every shard is stored (timed)."""
        start = time.perf_counter()
        data = ft.federate(train, workers, seed=SEED)
        await asyncio.gather(*(p for shard in data.shards for p in (shard.data, shard.targets)))
        self.data, self.data_send_s = data, time.perf_counter() - start

    def fail(self, exc: Exception) -> None:
        self.error = self.error or f"{common.error_text(exc)}\n{traceback.format_exc()}"

    def row(self, baseline_s: float | None) -> Row:
        row = Row(self.key, self.title, "s", error=self.error and self.error.split("\n")[0])
        row.fedtensor = statistics.median(self.seconds) if self.seconds else None
        row.baselines = [Baseline("train_centrally", baseline_s)] * bool(self.workers)
        if self.factor is not None and baseline_s is not None:
            row.target, row.target_text = self.factor * baseline_s, f"<= {self.factor:g}x"
        fields = ("seconds", "accuracies", "rounds", "data_send_s", "error")
        row.extra = {k: getattr(self, k) for k in fields}
        return row.finish()


async def _start_processes(names: Sequence[str], *args: str) -> list[WorkerProcess]:
    """Start worker processes at once (each imports torch); stop them all on a failure."""
    # Our event loop answers their pings only between local trainings (the baseline, virtual
    # workers' updates), which on a loaded machine outlast the default 20 s ping timeout.
    args += ("--ping-timeout", "600")
    outcomes = await asyncio.gather(
        *(asyncio.to_thread(start_worker_process, n, *args, timeout=90.0) for n in names),
        return_exceptions=True,
    )
    started = [o for o in outcomes if isinstance(o, WorkerProcess)]
    if len(started) < len(outcomes):
        await asyncio.gather(*(asyncio.to_thread(p.stop) for p in started))
        raise next(o for o in outcomes if isinstance(o, BaseException))
    return started


async def run_federated(cfg: Config, env: dict[str, Any]) -> list[Row]:
    """Prepare every contender, warm each up, then time them interleaved."""
    # The processes start first, in the background (each imports torch: seconds).
    few = env["few_threads"] = max(1, torch.get_num_threads() // 2)
    pairs = [
        asyncio.ensure_future(_start_processes(["fed0-t", "fed1-t"], "--threads", str(few))),
        asyncio.ensure_future(_start_processes(["fed0", "fed1"])),
    ]
    train, test = load_digits(SEED)
    contenders = [
        Contender("local", "local torch: train_centrally", 0),
        Contender("virtual4", "ft.fit, 4 virtual workers", 4, TARGET_VIRTUAL_FACTOR),
        Contender("virtual2", "ft.fit, 2 virtual workers", 2, TARGET_VIRTUAL_FACTOR),
        Contender(
            "processes2",
            f"ft.fit, 2 worker processes (ws), --threads {few}",
            2,
            TARGET_PROCESS_FACTOR,
        ),
        Contender("processes2_default_threads", "  the same, torch's default threads each", 2),
    ]
    processes: list[WorkerProcess] = []
    try:
        async with contextlib.AsyncExitStack() as stack:
            for c, pair in zip(contenders[1:], [None, None, *pairs], strict=True):
                try:
                    workers: list[Any]
                    if pair is None:
                        names = [f"{c.key}-{i}" for i in range(c.workers)]
                        workers = [
                            await stack.enter_async_context(ft.VirtualWorker(n, timeout=60))
                            for n in names
                        ]
                    else:
                        processes += (started := await pair)
                        connections = (
                            ft.connect(p.url, token=p.token, timeout=60) for p in started
                        )
                        workers = [await stack.enter_async_context(link) for link in connections]
                    await c.send_data(train, workers)
                except Exception as exc:
                    c.fail(exc)
            ready = [
                c for c in contenders if c.error is None and (c.data is not None or not c.workers)
            ]
            for c in ready:  # one-time costs are paid here, by every contender
                await c.train(train, test, 1)
                c.seconds, c.accuracies, c.rounds = [], [], []
            for _ in range(cfg.rounds["runs"]):
                for c in ready:
                    if c.error is None:
                        gc.collect()
                        await c.train(train, test, cfg.rounds["epochs"])
            for c in contenders:
                c.data = None  # the pointers go before the workers close
            gc.collect()
    finally:
        for pair in pairs:  # a start still under way (after an error) is waited for
            with contextlib.suppress(Exception):
                processes += [p for p in await pair if p not in processes]
        env["pids"] = [os.getpid(), *(p.process.pid for p in processes)]
        await asyncio.gather(*(asyncio.to_thread(p.stop) for p in processes))
    baseline = contenders[0].seconds
    return [c.row(statistics.median(baseline) if baseline else None) for c in contenders]


def notes(rows: list[Row], env: dict[str, Any]) -> str:
    """Per round: means over every round of the timed fits; held-out accuracy; the machine."""

    def mean(values: Sequence[float], spec: str = ".3f") -> str:
        return f"{statistics.fmean(values):{spec}}" if values else "-"

    lines = []
    for r in (r for r in rows if r.error is None and "rounds" in r.extra):
        per_epoch = [{"round": 0, "seconds": (r.fedtensor or 0) / env["epochs"]}]  # the baseline
        rounds, send = r.extra["rounds"] or per_epoch, r.extra["data_send_s"]
        cells = [mean([m[k] for m in rounds if k in m], f) for k, f in ROUND_COLUMNS.values()]
        first = mean([m["seconds"] for m in rounds if m["round"] == 1])
        accuracy = mean([100 * a for a in r.extra["accuracies"]], ".1f")
        lines.append([r.title, cells[0], first, *cells[1:], mean([send] if send else []), accuracy])
    header = ["row", *list(ROUND_COLUMNS)[:1], "round 1 s", *list(ROUND_COLUMNS)[1:]]
    return (
        f"\nper round (the baseline: per epoch), {env['epochs']} epochs, SGD lr {LR:g}, batch "
        f"{BATCH_SIZE}; every figure a mean over the timed runs\n\n"
        + common.table([*header, "data send s", "held-out acc %"], lines or [["-"] * 9])
        + "compute: the longest local training of a round; transfer: per worker, time to its "
        "update minus its training; data send: ft.federate of the training set, untimed above\n"
        f"the target row's processes run --threads {env.get('few_threads')}, the last row's "
        f"torch's default ({torch.get_num_threads()} here)\n"
    )


def run_from_args(args: argparse.Namespace) -> int:
    cfg = Config.pick(args.quick, {"epochs": (3, 10), "runs": (1, 3)})

    async def suite(env: dict[str, Any]) -> list[Row]:
        env.update(epochs=cfg.rounds["epochs"], **HYPERPARAMETERS)
        return await run_federated(cfg, env)

    return common.run_suite(args, "federated", cfg, suite, notes)
