"""The scale suite: the demo's training on 1, 2 and 4 local worker processes, and Ray's transports.

Local workers. The demo's task (``DigitsCNN`` on digits, SGD lr 0.2, batches of 16, 2 local
epochs a round) for R rounds (10; 3 with ``--quick``) from the same weights, over
``ft.local_workers(n)`` for n = 1, 2, 4 (the cores shared out: ``--threads`` 2 for one process
on two cores, 1 each for more; and 1 process on 1 thread), next to ``train_centrally`` on all
cores (and on one thread: torch's threads spin and wait for each other, which costs much on a
busy machine) for 2R epochs: the same total work (every example seen 2R times), the same run.
``ft.federate`` sends the data before the clock starts; a warm-up round (or epoch) pays
one-time costs first; one timed run each (run the suite twice), interleaved. Target: 2
processes at least 1.6x faster than 1 (the faster of the two single-process figures).

Ray. One fedtensor worker as a Ray actor (a local Ray instance, 2 CPUs), reached two ways:
fedtensor's websocket, which ``ft.ray.workers`` uses (round trip: ``ft.send`` 5 elements, add,
``get``; bulk: ``ft.send`` + ``get`` of 64 MiB float32), and the alternative, frames as
``bytes`` through Ray actor calls (``WorkerActor.echo``: the same request frame, or 64 MiB of
bytes, there and back). The Ray figure is a lower bound of that transport: the actor only hands
the bytes back, where a worker would also decode and run them.

Ray executors: a round of 100 of 1,000 simulated clients on 1, 2 and 4 Ray executors
(benchmarks/ray_executors.py, which says how).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import fedtensor as ft
from benchmarks import common, ray_executors
from benchmarks.common import BULK_BYTES, Baseline, Config, Row
from fedtensor.demo import DigitsCNN, load_digits, train_centrally

LR, BATCH_SIZE, LOCAL_EPOCHS, SEED = 0.2, 16, 2, 0
#: The local worker groups: key -> (processes, torch threads each; None: the cores shared out).
GROUPS: dict[str, tuple[int, int | None]] = {
    "processes1": (1, None),
    "processes1_t1": (1, 1),
    "processes2": (2, None),
    "processes4": (4, None),
}
TARGET_SPEEDUP = 1.6  # 2 processes against 1


async def _train(data: ft.FederatedDataset | int | None, train: Any, test: Any, rounds: int) -> Any:
    """One training from the same weights: (seconds, held-out accuracy, seconds per round)."""
    torch.manual_seed(SEED)
    model = DigitsCNN()
    gc.collect()
    start = time.perf_counter()
    per_round: list[float] = []
    if data is None:
        epochs = rounds * LOCAL_EPOCHS
        train_centrally(model, train, epochs=epochs, lr=LR, batch_size=BATCH_SIZE, seed=SEED)
    elif isinstance(data, int):  # train_centrally on this many threads
        threads, epochs = torch.get_num_threads(), rounds * LOCAL_EPOCHS
        torch.set_num_threads(data)
        try:
            train_centrally(model, train, epochs=epochs, lr=LR, batch_size=BATCH_SIZE, seed=SEED)
        finally:
            torch.set_num_threads(threads)
    else:
        history = await ft.fit(
            model,
            data,
            rounds=rounds,
            epochs=LOCAL_EPOCHS,
            lr=LR,
            batch_size=BATCH_SIZE,
            seed=SEED,
            progress=False,
        )
        per_round = [metrics.seconds for metrics in history]
    seconds = time.perf_counter() - start
    return seconds, ft.evaluate(model, *test)[1], per_round


async def run_local(cfg: Config, env: dict[str, Any]) -> list[Row]:
    """Every contender's data sent, a warm-up each, then timed runs interleaved."""
    train, test = load_digits(SEED)
    rounds, runs = cfg.rounds["rounds"], cfg.rounds["runs"]
    async with contextlib.AsyncExitStack() as stack:
        # The groups start together (each process imports torch: seconds), and idle meanwhile.
        # This loop answers the workers' pings only between trainings (train_centrally blocks
        # it), which on a loaded machine outlast the default 20 s ping timeout.
        groups = await asyncio.gather(
            *(
                stack.enter_async_context(ft.local_workers(n, threads, name=key, ping_timeout=600))
                for key, (n, threads) in GROUPS.items()
            )
        )
        contenders: dict[str, ft.FederatedDataset | int | None] = {"central": None, "central1": 1}
        for key, group in zip(GROUPS, groups, strict=True):
            shards = ft.federate(train, list(group), seed=SEED)
            await asyncio.gather(*(p for s in shards.shards for p in (s.data, s.targets)))
            contenders[key] = shards
            env[f"threads_{key}"] = group.threads
        for contender in contenders.values():
            await _train(contender, train, test, 1)
        results: dict[str, list[Any]] = {key: [] for key in contenders}
        for _ in range(runs):
            for key, contender in contenders.items():
                results[key].append(await _train(contender, train, test, rounds))
        contenders.clear()  # the pointers go before the workers stop

    def median(key: str) -> float:
        return float(statistics.median(r[0] for r in results[key]))

    env["accuracy"] = {k: statistics.fmean(r[1] for r in v) for k, v in results.items()}
    env["seconds_per_round"] = {
        k: statistics.fmean(s for r in v for s in r[2])
        for k, v in results.items()
        if not k.startswith("central")
    }
    central, central1 = median("central"), median("central1")
    one, one_t1 = median("processes1"), median("processes1_t1")
    rows = []
    for key, (n, _) in GROUPS.items():
        threads = env[f"threads_{key}"][0]
        row = Row(
            f"local_workers_{key.removeprefix('processes')}",
            f"ft.fit, {n} local worker process{'es' * (n > 1)} (--threads {threads})",
            "s",
        )
        row.fedtensor = median(key)
        if n > 1:
            row.baselines.append(
                Baseline(f"1 process, --threads {env['threads_processes1'][0]}", one)
            )
            row.baselines.append(Baseline("1 process, --threads 1", one_t1))
        row.baselines.append(Baseline("train_centrally, all cores", central))
        row.baselines.append(Baseline("train_centrally, 1 thread", central1))
        if n == 2:
            # Against the faster of the two single processes: on a busy machine torch's
            # threads spin waiting for each other, and 1 thread beats 2.
            row.target = min(one, one_t1) / TARGET_SPEEDUP
            row.target_text = f">= {TARGET_SPEEDUP:g}x faster than the faster 1 process"
        rows.append(row.finish())
    return rows


async def run_ray(cfg: Config, env: dict[str, Any]) -> list[Row]:
    """One worker actor: the websocket against frames as bytes through Ray actor calls."""
    try:
        import ray
    except ImportError:
        return [Row("ray", "Ray transports", "", error="ray is not installed")]
    from fedtensor.protocol.codec import encode_frame

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        async with ft.ray.workers(1, host="127.0.0.1") as workers:
            worker, actor = workers[0], workers.actors[0]
            small, bulk = torch.ones(5), torch.ones(BULK_BYTES // 4)
            frame = b"".join(bytes(part) for part in encode_frame(common.request_batch()))
            payload = bytes(BULK_BYTES)
            env["request_frame_bytes"] = len(frame)
            reps = cfg.rounds["roundtrips"]

            async def websocket_roundtrips() -> list[int]:
                return await common.timed_roundtrips(worker, small, reps)

            async def ray_roundtrips() -> list[int]:
                return await common.repeat(lambda: ray.get(actor.echo.remote(frame)), reps)

            async def websocket_bulk() -> int:
                start = common.now()
                value = await ft.send(bulk, worker).get()
                elapsed = common.now() - start
                assert value.shape == bulk.shape
                return elapsed

            async def ray_bulk() -> int:
                start = common.now()
                value = ray.get(actor.echo.remote(payload))
                elapsed = common.now() - start
                assert len(value) == BULK_BYTES
                return elapsed

            roundtrip = await common.timed_row(
                Row("ray_roundtrip", "round trip to a Ray actor: fedtensor's websocket", "us"),
                lambda ns: ns / 1e3,
                {
                    "websocket": websocket_roundtrips,
                    "the frame as bytes, Ray actor call": ray_roundtrips,
                },
                cfg,
            )
            throughput = await common.timed_row(
                Row(
                    "ray_bulk",
                    "64 MiB there and back: fedtensor's websocket",
                    "GB/s",
                    higher_is_better=True,
                ),
                lambda ns: BULK_BYTES / ns,
                {"websocket": websocket_bulk, "64 MiB bytes, Ray actor call": ray_bulk},
                cfg,
            )
    finally:
        if started_ray:
            ray.shutdown()
    return [roundtrip.finish(), throughput.finish()]


def notes(rows: list[Row], env: dict[str, Any]) -> str:
    per_round = env.get("seconds_per_round", {})
    accuracy = env.get("accuracy", {})
    lines = [
        [key, f"{per_round[key]:.3f}" if key in per_round else "-", f"{100 * value:.1f}"]
        for key, value in accuracy.items()
    ]
    return (
        (
            "\n" + common.table(["contender", "s/round", "held-out acc %"], lines or [["-"] * 3])
            if lines
            else ""
        )
        + (
            f"the request frame through Ray: {env['request_frame_bytes']} bytes\n"
            if "request_frame_bytes" in env
            else ""
        )
        + ray_executors.notes(rows, env)
    )


def run_from_args(args: argparse.Namespace) -> int:
    cfg = Config.pick(
        args.quick,
        {"rounds": (3, 10), "runs": (1, 1), "roundtrips": (50, 300), "ray_roundtrip": (1, 3)},
    )
    cfg = Config(cfg.quick, {**cfg.rounds, "ray_bulk": cfg.rounds["ray_roundtrip"]}, 1, 30.0)

    async def suite(env: dict[str, Any]) -> list[Row]:
        env.update(rounds=cfg.rounds["rounds"], local_epochs=LOCAL_EPOCHS, lr=LR)
        rows = await common.guarded("local_workers", lambda: run_local(cfg, env))
        if getattr(args, "local_only", False):  # python -m benchmarks.scale --local-only
            return rows
        rows += await common.guarded("ray", lambda: run_ray(cfg, env))
        # 100 simulated clients a round on 1, 2, 4 Ray executors (benchmarks/ray_executors.py)
        return rows + await common.guarded(
            "ray_executors", lambda: ray_executors.run(cfg.rounds["rounds"], env)
        )

    return common.run_suite(args, "scale", cfg, suite, notes)


if __name__ == "__main__":  # python -m benchmarks.scale [--quick] [--local-only]: this suite alone
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="3 rounds instead of 10")
    parser.add_argument(
        "--local-only", action="store_true", help="local worker processes only (no Ray)"
    )
    parser.add_argument("--uvloop", action="store_true", help="on uvloop, if it is installed")
    parser.add_argument("--json", type=Path, default=common.REPO / "benchmarks/results/latest.json")
    raise SystemExit(run_from_args(parser.parse_args()))
