"""Asynchronous training with slow workers: FedBuff against synchronous FedAvg, time to accuracy.

The demo's task (``DigitsCNN`` on digits, SGD lr 0.2, batches of 16, the training set split IID)
on 3 worker processes (``--threads 1``) that are 1x, 2x and 10x slow: each sleeps
``--step-delay`` 1, 2 and 10 times ``BASE_DELAY`` after every local step (the delays dominate
the few milliseconds a step computes, so the speeds are close to 1:2:10). Both contenders start
from the same weights on the same workers, one local epoch per update, and are evaluated on the
held-out digits after every round (FedAvg) or model version (FedBuff):

``ft.FedAvg`` (synchronous)
    Every round waits for the slowest worker.
``ft.FedBuff(buffer_size=2)``
    Every worker trains continuously on the newest model it was sent; every 2 updates make a
    version, weighted by staleness ``1/sqrt(1 + s)``.

The figure is the wall time from the call of ``ft.fit`` to the first evaluation at or above
``TARGET_ACCURACY`` (the demo's 95%), the median of the runs (1 with ``--quick``, else 2,
interleaved; the workers are idle before each, and a warm-up round paid one-time costs). The
target: FedBuff in less time than FedAvg. Both accuracy curves go to one PNG,
``docs/fedbuff.png`` (needs matplotlib), which the README shows. ``python -m benchmarks
--federated`` runs this suite after the federated one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import fedtensor as ft
from benchmarks import common
from benchmarks.common import Baseline, Config, Row
from fedtensor.demo import DigitsCNN, load_digits
from fedtensor.testing import WorkerProcess, start_worker_process

LR, BATCH_SIZE, SEED = 0.2, 16, 0
HYPERPARAMETERS: dict[str, Any] = {"lr": LR, "batch_size": BATCH_SIZE, "seed": SEED}
BASE_DELAY = 0.01  # seconds after each local step of the fastest worker
SLOWDOWNS = (1, 2, 10)
TARGET_ACCURACY = 0.95
MAX_ROUNDS = {"fedavg": 20, "fedbuff": 90}  # a run that never reaches the target stops here
FIGURE = common.REPO / "docs/fedbuff.png"


class _Reached(Exception):
    """Raised from ``on_round`` to end a run at the target accuracy."""


@dataclass
class Contender:
    key: str
    title: str
    seconds: list[float] = field(default_factory=list)  # time to the target, per run
    curves: list[list[tuple[float, float]]] = field(default_factory=list)  # (s, accuracy)
    staleness: list[int] = field(default_factory=list)
    error: str | None = None

    def strategy(self) -> ft.Strategy:
        return ft.FedBuff(buffer_size=2) if self.key == "fedbuff" else ft.FedAvg()

    async def train(self, data: ft.FederatedDataset, test: Any) -> None:
        torch.manual_seed(SEED)
        model, curve = DigitsCNN(), []
        started = time.perf_counter()

        def record(metrics: ft.RoundMetrics) -> None:
            curve.append((time.perf_counter() - started, metrics.eval_accuracy))
            self.staleness += metrics.staleness
            if metrics.eval_accuracy >= TARGET_ACCURACY:
                raise _Reached

        try:
            await ft.fit(
                model, data, rounds=MAX_ROUNDS[self.key], strategy=self.strategy(),
                eval_data=test, on_round=record, progress=False, **HYPERPARAMETERS,
            )  # fmt: skip
        except _Reached:
            self.seconds.append(curve[-1][0])
        except Exception as exc:
            self.error = self.error or f"{common.error_text(exc)}\n{traceback.format_exc()}"
        else:
            self.error = self.error or f"never reached {TARGET_ACCURACY:.0%} accuracy"
        self.curves.append(curve)


async def _start(delays: Sequence[float]) -> list[WorkerProcess]:
    def start(index: int, delay: float) -> WorkerProcess:
        options = ("--threads", "1", "--step-delay", str(delay), "--ping-timeout", "600")
        return start_worker_process(f"async{index}", *options, timeout=90.0)

    outcomes = await asyncio.gather(
        *(asyncio.to_thread(start, i, delay) for i, delay in enumerate(delays)),
        return_exceptions=True,
    )
    started = [o for o in outcomes if isinstance(o, WorkerProcess)]
    if len(started) < len(outcomes):
        await asyncio.gather(*(asyncio.to_thread(p.stop) for p in started))
        raise next(o for o in outcomes if isinstance(o, BaseException))
    return started


async def _idle(workers: Sequence[Any]) -> None:
    """Wait until each worker finished what it was given (a FedBuff run leaves updates)."""
    await asyncio.gather(*((ft.send(torch.zeros(1), w) + 1).get() for w in workers))


async def run_asynchronous(cfg: Config, env: dict[str, Any]) -> list[Row]:
    delays = [BASE_DELAY * slowdown for slowdown in SLOWDOWNS]
    env.update(delays=delays, target_accuracy=TARGET_ACCURACY)
    contenders = [
        Contender("fedavg", "ft.FedAvg, synchronous"),
        Contender("fedbuff", "ft.FedBuff(buffer_size=2)"),
    ]
    train, test = load_digits(SEED)
    processes = await _start(delays)
    try:
        async with contextlib.AsyncExitStack() as stack:
            workers = [
                await stack.enter_async_context(ft.connect(p.url, token=p.token, timeout=120))
                for p in processes
            ]
            data = ft.federate(train, workers, seed=SEED)
            # One-time costs (the first plan, torch's first convolutions) are paid here.
            await ft.fit(DigitsCNN(), data, rounds=1, progress=False, **HYPERPARAMETERS)
            for _ in range(cfg.rounds["runs"]):
                for contender in contenders:
                    await _idle(workers)
                    await contender.train(data, test)
            del data
    finally:
        await asyncio.gather(*(asyncio.to_thread(p.stop) for p in processes))
    env["curves"] = {c.key: c.curves for c in contenders}
    env["figure"] = _figure(contenders)
    fedavg, fedbuff = contenders
    baseline = statistics.median(fedavg.seconds) if fedavg.seconds else None
    row = Row(
        "fedbuff_time_to_accuracy",
        f"time to {TARGET_ACCURACY:.0%}: FedBuff, workers 1x/2x/10x slow",
        "s",
        error=(fedbuff.error or fedavg.error or "").split("\n")[0] or None,
    )
    row.fedtensor = statistics.median(fedbuff.seconds) if fedbuff.seconds else None
    row.baselines = [Baseline("FedAvg (synchronous)", baseline, fedavg.error)]
    if baseline is not None:
        row.target, row.target_text = baseline, "< FedAvg"
    row.extra = {"fedavg_s": fedavg.seconds, "fedbuff_s": fedbuff.seconds}
    row.extra["fedbuff_staleness"] = fedbuff.staleness
    return [row.finish()]


def _figure(contenders: Sequence[Contender]) -> str:
    """Both accuracy curves (their first run) against wall time, in one PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return "not drawn: matplotlib is not installed (pip install 'fedtensor[plot]')"
    figure, axes = plt.subplots(figsize=(7, 4))
    for contender in contenders:
        if contender.curves:
            curve = contender.curves[0]
            axes.plot(
                [s for s, _ in curve], [a for _, a in curve], marker=".", label=contender.title
            )
    axes.axhline(TARGET_ACCURACY, color="grey", linestyle=":", label=f"{TARGET_ACCURACY:.0%}")
    slowdowns = "/".join(f"{s}x" for s in SLOWDOWNS)
    axes.set_title(f"digits CNN, 3 worker processes {slowdowns} slow")
    axes.set_xlabel("wall time (s)")
    axes.set_ylabel("held-out accuracy")
    axes.set_ylim(0.0, 1.0)
    axes.set_xlim(left=0.0)
    axes.legend(loc="lower right")
    figure.tight_layout()
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(FIGURE, format="png", dpi=100)
    plt.close(figure)
    return str(FIGURE.relative_to(common.REPO))


def notes(rows: list[Row], env: dict[str, Any]) -> str:
    lines = []
    for key, curves in env.get("curves", {}).items():
        for run, curve in enumerate(curves):
            points = ", ".join(f"{s:.1f}s {100 * a:.1f}%" for s, a in curve)
            lines.append(f"{key} run {run + 1}: {points}")
    staleness = rows[0].extra.get("fedbuff_staleness", []) if rows else []
    if staleness:
        lines.append(
            f"FedBuff staleness: mean {statistics.fmean(staleness):.2f}, max {max(staleness)}"
        )
    delays = ", ".join(f"{d:g}" for d in env.get("delays", []))
    return (
        f"\nworkers' --step-delay: {delays} s; accuracy after each round/version "
        f"(wall time since fit began):\n" + "\n".join(lines) + f"\nfigure: {env.get('figure')}\n"
    )


def run_from_args(args: argparse.Namespace) -> int:
    cfg = Config.pick(args.quick, {"runs": (1, 2)})

    async def suite(env: dict[str, Any]) -> list[Row]:
        return await run_asynchronous(cfg, env)

    return common.run_suite(args, "asynchronous", cfg, suite, notes)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks.asynchronous")
    parser.add_argument("--quick", action="store_true", help="one run of each")
    parser.add_argument("--uvloop", action="store_true")
    parser.add_argument("--json", type=Path, default=common.REPO / "benchmarks/results/latest.json")
    raise SystemExit(run_from_args(parser.parse_args()))
