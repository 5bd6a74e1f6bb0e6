"""Simulated clients on 1, 2 and 4 Ray executors: the time of a round of 100 clients.

``python -m benchmarks.ray_executors [--quick]`` (also a part of ``--scale``). The work is the
simulation suite's 1,000-client case (benchmarks/simulation.py): scikit-learn's digits (1,437
training examples) cut into 1,000 IID clients by ``ft.simulate_clients``, an MLP 64-32-10,
FedAvg, SGD lr 0.1, batches of 16, 1 local epoch, 100 clients sampled per round. The executors
are ``ft.ray.workers(n)`` on one local Ray instance of 2 CPUs, each asking for
``min(1, 2 / n)`` CPU (so that 4 fit: Ray refuses to place what it has no CPUs for) and
training on one torch thread. For each n, one after another: a first round (tracing, storing
the plan, every block landing), then R timed rounds (10; 3 with ``--quick``) from the same
weights; the figure is their median. The baseline is 1 executor, measured in the same run.

On a 2-core machine 4 executors cannot be faster than 2: they share the same two cores (and
this process, which sends every client's commands and aggregates, needs one too).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

import fedtensor as ft
from benchmarks import common
from benchmarks.common import Baseline, Config, Row
from benchmarks.flower_side import MLP
from fedtensor.demo import load_digits

LR, BATCH_SIZE, PER_ROUND, CLIENTS, SEED = 0.1, 16, 100, 1_000, 0
EXECUTORS = (1, 2, 4)
RAY_CPUS = 2


async def _executors(count: int, train: Any, rounds: int) -> dict[str, float]:
    """``count`` Ray executors: the first round and the median later round, in seconds."""
    cpus = min(1.0, RAY_CPUS / count)
    async with ft.ray.workers(count, num_cpus=cpus, host="127.0.0.1", timeout=300) as workers:
        clients = ft.simulate_clients(train, clients=CLIENTS, executors=list(workers), seed=SEED)
        torch.manual_seed(SEED)
        model = MLP()
        options: dict[str, Any] = {
            "fraction": PER_ROUND / CLIENTS, "batch_size": BATCH_SIZE, "lr": LR, "seed": SEED,
            "progress": False,
        }  # fmt: skip
        started = time.perf_counter()
        first = await ft.fit(model, clients, rounds=1, **options)
        first_s = time.perf_counter() - started
        later = await ft.fit(model, clients, rounds=rounds, **options)
        completed = min(len(m.completed) for m in [*first, *later])
        clients.close()
    if completed != PER_ROUND:
        raise RuntimeError(f"{count} executors: a round completed only {completed} clients")
    return {"first_s": first_s, "round_s": statistics.median(m.seconds for m in later)}


async def run(rounds: int, env: dict[str, Any]) -> list[Row]:
    """One row per executor count, 1 executor its baseline."""
    try:
        import ray
    except ImportError:
        return [Row("ray_executors", "Ray executors", "", error="ray is not installed")]
    (train, _), threads = load_digits(seed=SEED), torch.get_num_threads()
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(
            num_cpus=RAY_CPUS, include_dashboard=False, log_to_driver=False,
            configure_logging=False, _node_ip_address="127.0.0.1",
        )  # fmt: skip
    torch.set_num_threads(1)  # this process aggregates tiny models: one thread
    try:
        figures = {count: await _executors(count, train, rounds) for count in EXECUTORS}
    finally:
        torch.set_num_threads(threads)
        if started_ray:
            ray.shutdown()
    env["ray_executors"] = {str(count): value for count, value in figures.items()}
    rows = []
    for count in EXECUTORS[1:]:
        row = Row(
            f"ray_executors{count}",
            f"a round of {PER_ROUND} of {CLIENTS:,} simulated clients: {count} Ray executors",
            "s",
            fedtensor=figures[count]["round_s"],
            baselines=[Baseline("1 Ray executor", figures[1]["round_s"])],
        )
        if count == 4:
            row.target_text = f"none: 4 executors share {RAY_CPUS} cores"
        rows.append(row.finish())
    return rows


def notes(rows: list[Row], env: dict[str, Any]) -> str:
    figures = env.get("ray_executors", {})
    lines = [
        [count, f"{value['first_s']:.2f}", f"{value['round_s']:.3f}"]
        for count, value in figures.items()
    ]
    if not lines:
        return ""
    return "\n" + common.table(["Ray executors", "first round s", "later round s"], lines)


def run_from_args(args: argparse.Namespace) -> int:
    cfg = Config.pick(args.quick, {"rounds": (3, 10)})

    async def suite(env: dict[str, Any]) -> list[Row]:
        return await run(cfg.rounds["rounds"], env)

    return common.run_suite(args, "ray_executors", cfg, suite, notes)


if __name__ == "__main__":
    import sys
    from pathlib import Path

    parser = argparse.ArgumentParser(prog="python -m benchmarks.ray_executors", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="3 timed rounds, not 10")
    parser.add_argument("--uvloop", action="store_true", help="on uvloop, if it is installed")
    parser.add_argument("--json", type=Path, default=common.REPO / "benchmarks/results/latest.json")
    sys.exit(run_from_args(parser.parse_args()))
