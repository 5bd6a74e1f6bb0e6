"""Secure aggregation's cost: one ``ft.fit`` round with SecAgg+ next to the same round without.

A 100k-parameter model (an MLP 64-1000-36: 101,036 parameters) on 10, 50 and 100 virtual
workers, each with 320 examples of random 8x8 inputs (one local epoch: 10 steps of SGD on
batches of 32; ``--secagg-steps 1`` for the worst case, one step, where masking dominates):
the plain round (``ft.FedAvg``: every worker's state fetched and averaged) is the baseline,
the secure round (``secure_aggregation=ft.SecAggPlus()``, defaults: ``k = 2 ceil(log2 n)``
neighbours, a majority threshold, 22-bit quantization, masked mod 2**32: each worker's weight
is folded in before quantizing, so the sums fit the 32-bit ring) the contender. Both run in this
process on one torch thread (the workers' masking shares it with the aggregator), from the same
weights, after a warm-up round of each; the figure is the median round wall time (``History``'s
``seconds``) of 3 runs (1 with ``--quick``); the notes add the median CPU time of this process
per round (all the virtual workers run in it), steadier than wall time on a busy machine. The
target: at most 2x the plain round at 100 workers (Bell et al.: k = O(log n) keeps each worker's
cost polylogarithmic).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fedtensor as ft
from benchmarks import common
from benchmarks.common import Baseline, Config, Row

WORKERS = (10, 50, 100)
BATCH = 32
TARGET_FACTOR = 2.0


class Mlp(nn.Module):
    """64 -> 1000 -> 36: 101,036 parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(64, 1000)
        self.out = nn.Linear(1000, 36)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x.flatten(1))))  # type: ignore[no-any-return]


async def _round_seconds(
    data: ft.FederatedDataset, secure: ft.SecAggPlus | None, runs: int
) -> tuple[list[float], list[float], dict[str, float]]:
    """Each run's round wall time, and the CPU time this process spent on it (every
    virtual worker runs here: on a busy machine the CPU time is the steadier figure)."""
    torch.manual_seed(0)
    model = Mlp()
    options: dict[str, Any] = {"lr": 0.05, "batch_size": BATCH, "progress": False}
    await ft.fit(model, data, rounds=1, secure_aggregation=secure, **options)  # warm-up
    seconds, cpu, report = [], [], {}
    for _ in range(runs):
        started = time.process_time()
        history = await ft.fit(model, data, rounds=1, secure_aggregation=secure, **options)
        cpu.append(time.process_time() - started)
        if history[0].skipped:
            raise RuntimeError(f"the round was skipped: {history[0].skip_reason}")
        seconds.append(history[0].seconds)
        report = history[0].secure_aggregation
    return seconds, cpu, report


async def run_secagg(cfg: Config, env: dict[str, Any], steps: int = 10) -> list[Row]:
    # One torch thread for both contenders: the workers share this process anyway, and on a
    # machine busier than its cores torch's thread pool stalls every pass over a tensor.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return await _rows(cfg, env, steps)
    finally:
        torch.set_num_threads(threads)


async def _rows(cfg: Config, env: dict[str, Any], steps: int) -> list[Row]:
    rows = []
    env["local_steps"] = steps
    examples_per_worker = steps * BATCH
    for count in WORKERS:
        title = f"a round of {count} workers ({steps} local steps), SecAgg+ vs plain"
        row = Row(f"secagg_{count}", title, "s")
        async with contextlib.AsyncExitStack() as stack:
            workers = [
                await stack.enter_async_context(ft.VirtualWorker(f"s{i}")) for i in range(count)
            ]
            generator = torch.Generator().manual_seed(0)
            examples = torch.randn(count * examples_per_worker, 1, 8, 8, generator=generator)
            labels = torch.randint(0, 36, (count * examples_per_worker,), generator=generator)
            data = ft.federate((examples, labels), workers, seed=0)
            plain, plain_cpu, _ = await _round_seconds(data, None, cfg.rounds["runs"])
            secure, secure_cpu, report = await _round_seconds(
                data, ft.SecAggPlus(), cfg.rounds["runs"]
            )
            del data
        row.fedtensor = statistics.median(secure)
        baseline = statistics.median(plain)
        row.baselines = [Baseline("the same round without secure aggregation", baseline)]
        if count == max(WORKERS):
            row.target, row.target_text = TARGET_FACTOR * baseline, f"<= {TARGET_FACTOR:g}x plain"
        row.ratio_text = f"{row.fedtensor / baseline:.2f}x the plain round"
        figures = {
            "plain_s": plain,
            "secure_s": secure,
            "plain_cpu_s": plain_cpu,
            "secure_cpu_s": secure_cpu,
            **report,
        }
        row.extra = dict(figures)
        env.setdefault("secagg", {})[count] = figures
        rows.append(row.finish())
    return rows


def notes(rows: list[Row], env: dict[str, Any]) -> str:
    lines = []
    for count, figures in env.get("secagg", {}).items():
        plain, secure = (
            statistics.median(figures["plain_s"]),
            statistics.median(figures["secure_s"]),
        )
        cpu_plain = statistics.median(figures["plain_cpu_s"])
        cpu_secure = statistics.median(figures["secure_cpu_s"])
        lines.append(
            f"{count} workers: plain {plain:.3f} s, SecAgg+ {secure:.3f} s ({secure / plain:.2f}x),"
            f" k = {figures.get('neighbours', 0):.0f}, t = {figures.get('threshold', 0):.0f},"
            f" mod 2**{figures.get('modulus_bits', 48):.0f},"
            f" {1000 * (secure - plain) / count:.1f} ms more per worker; CPU time"
            f" {cpu_plain:.3f} s against {cpu_secure:.3f} s ({cpu_secure / cpu_plain:.2f}x)"
        )
    return "\n" + "\n".join(lines) + "\n"


def run_from_args(args: argparse.Namespace) -> int:
    cfg = Config.pick(args.quick, {"runs": (1, 3)})
    steps = getattr(args, "secagg_steps", 10)

    async def suite(env: dict[str, Any]) -> list[Row]:
        return await run_secagg(cfg, env, steps)

    return common.run_suite(args, "secagg", cfg, suite, notes)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks.secagg")
    parser.add_argument("--quick", action="store_true", help="one run of each")
    parser.add_argument("--uvloop", action="store_true")
    parser.add_argument("--secagg-steps", type=int, default=10, help="local steps per round")
    parser.add_argument("--json", type=Path, default=common.REPO / "benchmarks/results/latest.json")
    raise SystemExit(run_from_args(parser.parse_args()))
