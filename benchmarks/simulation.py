"""The simulation suite: 1,000 and 10,000 simulated clients (``ft.simulate_clients``), 100 a round.

The work is that of Flower's simulation engine measured side by side (anchors.md): an MLP
64-32-10, FedAvg, SGD lr 0.1, batches of 16, 1 local epoch, 100 clients sampled per round, 10
rounds (3 with ``--quick``), central evaluation on the digits' held-out fifth. 1,000 clients
split scikit-learn's digits (1,437 training examples, as Flower's run did); 10,000 clients
split 100,000 digit-shaped examples (the digits repeated with a little noise; nothing
downloaded). Each runs on pools of executors, one after another: 1 virtual worker in this
process (torch at 1 thread: one core), 1 local worker process and 2 local worker processes
(``ft.local_workers(pin=True)``, ``--threads 1`` each: a core each), these 2 sampling
uniformly (as Flower does) and then stratified by executor (``ft.fit(sampling="stratified")``:
50 clients each every round, where uniform sampling gives the busier one 54 on average);
1,000 clients also as 1,000 virtual workers (``ft.federate``, one core: how such a run was
written before). With
``--single-updates`` the 2 processes also run before that pool with every client's update
sent back alone (a FedAvg that turns partial sums off: the reply of a round before them,
"single updates (before)"), for a before-and-after in one run; ``ft.fit`` now has each
executor answer with its clients' weighted sum.

Figures: setup (executors started, the data placed), the first round (from calling ``ft.fit``:
tracing the model and storing the plan included), the mean of later rounds, the peak PSS and RSS
of the process tree (this process and its executors, sampled after the setup and after every
round), and the accuracy after the last round. The pools take turns, 3 times (once with
``--quick``), and each shows its fastest turn, with the most memory any turn took: on this
shared machine the same pool's later rounds varied by up to a third from one turn to the next
(a slow spell falls on one turn of each pool, not on every turn of one).

Flower 1.42's simulation engine then does the same work for each client count, one system at a
time, in a subprocess (benchmarks/flower_side.py: ``run_simulation``, Ray backend, 1 CPU per
client; the same data, partition, model and initial weights, checked by a digest): its first
round from calling ``run_simulation`` (Ray's start-up included: its setup), its later rounds,
the peak PSS of its process tree (Ray's processes included) and its accuracy. Without flwr
(``pip install 'fedtensor[flower]'``), or with ``--no-flower``, the suite says so and shows
the figures recorded in anchors.md instead, marked "recorded, not measured". Targets: later
rounds on 2 cores at least 1.6x faster than on the faster 1-core pool, the first round under
2 s, 10,000 clients under 1 GB PSS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import torch

import fedtensor as ft
from benchmarks import common
from benchmarks.common import Baseline, Config, Row
from benchmarks.flower_side import (
    MLP,
    SEED,
    SYNTHETIC_EXAMPLES,
    benchmark_data,
    client_parts,
    digest,
)

LR, BATCH_SIZE, PER_ROUND = 0.1, 16, 100
CLIENTS = (1_000, 10_000)
FLOWER_TIMEOUT_S = 1_800  # Flower's whole run, start-up included, on a loaded machine
FLOWER_TITLE = "Flower 1.42 simulation (Ray, 1 CPU per client)"
POOLS = {  # key: (title, executors, in this process); "workers": one virtual worker a client
    "workers": ("1 virtual worker per client (ft.federate, before)", 0, True),
    "virtual1": ("1 virtual worker (in process, 1 thread)", 1, True),
    "process1": ("1 local worker process (--threads 1, pinned)", 1, False),
    # With --single-updates: 2 processes sending every client's update back alone, as
    # before partial sums (run before "process2", in the same run).
    "process2_single": ("2 local worker processes, single updates (before)", 2, False),
    "process2": ("2 local worker processes (--threads 1 each, pinned)", 2, False),
    # The same, each round's 100 spread over the executors in proportion (50 each):
    # ft.fit(sampling="stratified").
    "process2_stratified": ("2 local worker processes, sampling stratified", 2, False),
}
TARGET_SPEEDUP = 1.6
TARGET_FIRST_ROUND_S = 2.0
TARGET_PSS_BYTES = 10**9  # 1 GB, as PSS is reported here (decimal)
# anchors.md, "Flower's simulation engine, measured side by side": first round s, later s,
# PSS GB (processes); and fedtensor's 1,000 virtual workers before simulated clients.
FLOWER = {1_000: (18.6, 1.05, 1.47, 13)}
VIRTUAL_WORKERS_BEFORE = {1_000: (0.21, 0.135, 0.40)}
FLOWER_ABSENT = "flwr is not installed (pip install 'fedtensor[flower]')"


class SingleUpdates(ft.FedAvg):
    """FedAvg asking each executor for every client's update (no partial sums): the
    reply of a round before partial sums, for the "before" row."""

    partial_sums_ok = False


def flower_missing() -> str | None:
    """Why Flower's side cannot run here, or None."""
    return FLOWER_ABSENT if importlib.util.find_spec("flwr") is None else None


def _run_flower(clients: int, rounds: int) -> dict[str, Any]:
    """benchmarks/flower_side.py in a subprocess (its own Ray instance): its JSON line."""
    command = [
        sys.executable, "-m", "benchmarks.flower_side", "--clients", str(clients),
        "--rounds", str(rounds), "--per-round", str(PER_ROUND),
    ]  # fmt: skip
    environment = os.environ | {"PYTHONPATH": str(common.REPO)}
    done = subprocess.run(
        command, cwd=common.REPO, env=environment, capture_output=True, text=True,
        timeout=FLOWER_TIMEOUT_S, check=False,
    )  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"Flower's side exited {done.returncode}: " + " | ".join(tail))
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def _memory(pids: Sequence[int]) -> tuple[int, int]:
    """PSS and RSS, in bytes, summed over ``pids`` (Linux; 0 where unreadable)."""
    pss = rss = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith(("Pss:", "Rss:")):
                    value = int(line.split()[1]) * 1024
                    if line.startswith("Pss:"):
                        pss += value
                    else:
                        rss += value
    return pss, rss


@contextlib.asynccontextmanager
async def _pool(key: str, clients: int) -> AsyncIterator[tuple[list[Any], list[int]]]:
    """The pool's executors and the process ids of the tree."""
    _, count, in_process = POOLS[key]
    if in_process:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            async with contextlib.AsyncExitStack() as stack:
                names = [f"sim{clients}-{key}-{i}" for i in range(count or clients)]
                executors = [
                    await stack.enter_async_context(ft.VirtualWorker(name, timeout=120))
                    for name in names
                ]
                yield executors, [os.getpid()]
        finally:
            torch.set_num_threads(threads)
    else:
        name = f"sim{clients}-{key}"
        # This loop answers pings only between its own steps: a loaded machine outlasts 20 s.
        # Each process on a core of its own (pin), woken without preempting this one.
        async with ft.local_workers(
            count, 1, name=name, ping_timeout=600, timeout=120, pin=True
        ) as workers:
            yield list(workers), [os.getpid(), *workers.pids]


async def _run(
    key: str, clients: int, train: Any, test: Any, rounds: int, env: dict[str, Any]
) -> dict[str, Any]:
    """One pool, one client count: setup, fit, figures."""
    gc.collect()
    started = time.perf_counter()
    async with _pool(key, clients) as (executors, pids):
        data: ft.FederatedDataset
        if key == "workers":
            data = ft.federate(train, executors, seed=SEED)
        else:
            data = ft.simulate_clients(train, clients=clients, executors=executors, seed=SEED)
        for shard in {id(s.worker): s for s in data.shards}.values():  # one per executor
            await shard.targets[:1].fetch(free=True, timeout=120)  # its block is stored
        setup = time.perf_counter() - started
        peak_pss, peak_rss = _memory(pids)
        round_ends: list[float] = []

        def sample(_: ft.RoundMetrics) -> None:
            nonlocal peak_pss, peak_rss
            round_ends.append(time.perf_counter())
            pss, rss = _memory(pids)
            peak_pss, peak_rss = max(peak_pss, pss), max(peak_rss, rss)

        torch.manual_seed(SEED)
        model = MLP()
        fit_started = time.perf_counter()
        strategy = SingleUpdates() if key.endswith("_single") else ft.FedAvg()
        sampling = "stratified" if key.endswith("_stratified") else "uniform"
        history = await ft.fit(
            model, data, rounds=rounds, fraction=PER_ROUND / clients, batch_size=BATCH_SIZE,
            lr=LR, seed=SEED, progress=False, on_round=sample, strategy=strategy,
            sampling=sampling,
        )  # fmt: skip
        completed = [len(m.completed) for m in history]
        if isinstance(data, ft.SimulatedClients):
            data.close()
        del data
    return {
        "setup_s": setup,
        "first_round_s": round_ends[0] - fit_started,
        "later_round_s": statistics.fmean(m.seconds for m in list(history)[1:]),
        "peak_pss": peak_pss,
        "peak_rss": peak_rss,
        "processes": len(pids),
        "accuracy": ft.evaluate(model, *test)[1],
        "completed_per_round": min(completed),
    }


async def _flower(clients: int, rounds: int, env: dict[str, Any]) -> list[Baseline]:
    """Flower's side for ``clients``, after fedtensor's (one system at a time): the baselines
    for fedtensor's rows (its figures go to ``env["flower"]``)."""
    why_not = env.get("flower_skipped")
    if not why_not:
        train, _ = benchmark_data(clients)
        expected = digest(train, client_parts(train[1], clients))
        try:
            result = await asyncio.to_thread(_run_flower, clients, rounds)
            if result["digest"] != expected:
                raise RuntimeError(f"Flower trained on other data: digest {result['digest']}")
        except Exception as exc:
            why_not = f"Flower's side failed: {common.error_text(exc)}"
        else:
            env.setdefault("flower", {})[str(clients)] = result
            return [Baseline("Flower 1.42 (measured, same run)", result["later_round_s"])]
    env.setdefault("flower_errors", {})[str(clients)] = why_not
    baselines = [Baseline("Flower 1.42", error=why_not)]
    if clients in FLOWER:
        baselines.append(Baseline("Flower 1.42 (recorded, not measured)", FLOWER[clients][1]))
    return baselines


async def run_simulation(cfg: Config, env: dict[str, Any]) -> list[Row]:
    _, test = benchmark_data(1_000)
    sets = {clients: benchmark_data(clients)[0] for clients in CLIENTS}
    rows: list[Row] = []
    results: dict[str, Any] = env.setdefault("results", {})
    repeats = cfg.rounds["repeats"]
    for clients in CLIENTS:
        keys = [
            key
            for key in POOLS
            # 10,000 virtual workers: not the design under test, and slow to open;
            # single updates (before partial sums) only with --single-updates.
            if not (key == "workers" and clients > 1_000)
            and not (key == "process2_single" and not env.get("single_updates"))
        ]
        runs: dict[str, list[dict[str, Any]]] = {key: [] for key in keys}
        errors: dict[str, str] = {}
        # The pools take turns, ``repeats`` times: a slow spell of this shared machine
        # falls on one turn of each, not on all the turns of one pool.
        for _ in range(repeats):
            for key in keys:
                if key in errors:
                    continue
                try:
                    runs[key].append(
                        await _run(key, clients, sets[clients], test, cfg.rounds["rounds"], env)
                    )
                except Exception as exc:
                    errors[key] = common.error_text(exc)
        measured: dict[str, dict[str, Any]] = {}
        for key in keys:
            row = Row(f"simulation{clients}_{key}", f"{clients:,} clients, {POOLS[key][0]}", "s")
            if key in errors:
                row.error = errors[key]
                rows.append(row.finish())
                continue
            # The fastest turn's figures; its memory, the most any turn took.
            result = dict(min(runs[key], key=lambda run: run["later_round_s"]))
            result["peak_pss"] = max(run["peak_pss"] for run in runs[key])
            result["peak_rss"] = max(run["peak_rss"] for run in runs[key])
            result["later_round_s_turns"] = [run["later_round_s"] for run in runs[key]]
            measured[key] = results[f"{clients}_{key}"] = result
            row.fedtensor = result["later_round_s"]
            row.extra = result
            if key.startswith("process2"):
                one_core = [
                    measured[k]["later_round_s"]
                    for k in ("workers", "virtual1", "process1")
                    if k in measured
                ]
                if one_core:
                    row.baselines.append(Baseline("the faster 1-core pool", min(one_core)))
                if one_core and key in ("process2", "process2_stratified"):
                    row.target = min(one_core) / TARGET_SPEEDUP
                    row.target_text = f">= {TARGET_SPEEDUP:g}x faster"
                if key == "process2" and "process2_single" in measured:
                    before = measured["process2_single"]["later_round_s"]
                    row.baselines.append(Baseline("single updates (before), same run", before))
            rows.append(row)
        flower = await _flower(clients, cfg.rounds["rounds"], env)
        for row in rows:
            if row.key.startswith(f"simulation{clients}_"):
                # a copy per row: finish() sets each baseline's versus from its row's figure
                row.baselines.extend(dataclasses.replace(b) for b in flower)
                row.finish()
    return rows


def _gb(value: float) -> str:
    return f"{value / 1e9:.2f}"


def _times(ours: float, theirs: float) -> str:
    """How many times ``ours`` (smaller is better) beats ``theirs``."""
    return f"{theirs / ours:.1f}x" if ours > 0 else "-"


def notes(rows: list[Row], env: dict[str, Any]) -> str:
    lines, ratios = [], []
    flower: dict[str, dict[str, Any]] = env.get("flower", {})
    for clients in CLIENTS:
        for row in rows:
            result = row.extra
            if not result or not row.key.startswith(f"simulation{clients}_"):
                continue
            first_ok = "PASS" if result["first_round_s"] < TARGET_FIRST_ROUND_S else "MISS"
            pss_ok = "PASS" if result["peak_pss"] < TARGET_PSS_BYTES else "MISS"
            lines.append([
                row.title, f"{result['setup_s']:.2f}", f"{result['first_round_s']:.2f} {first_ok}",
                f"{result['later_round_s']:.3f}",
                f"{_gb(result['peak_pss'])} {pss_ok} ({result['processes']})",
                _gb(result["peak_rss"]), f"{100 * result['accuracy']:.1f}",
            ])  # fmt: skip
            theirs = flower.get(str(clients))
            if theirs:
                ratios.append([
                    row.title,
                    _times(result["setup_s"] + result["first_round_s"], theirs["first_round_s"]),
                    _times(result["later_round_s"], theirs["later_round_s"]),
                    _times(result["peak_pss"], theirs["peak_pss"]),
                ])  # fmt: skip
        theirs = flower.get(str(clients))
        if theirs:
            lines.append([
                f"{clients:,} clients, {FLOWER_TITLE}, measured", "(in round 1)",
                f"{theirs['first_round_s']:.2f} ({theirs['round1_only_s']:.2f} after start)",
                f"{theirs['later_round_s']:.3f}",
                f"{_gb(theirs['peak_pss'])} ({theirs['processes']})", _gb(theirs["peak_rss"]),
                f"{100 * theirs['accuracy']:.1f}",
            ])  # fmt: skip
        elif clients in FLOWER:
            first, later, pss, processes = FLOWER[clients]
            lines.append([
                f"{clients:,} clients, Flower 1.42 simulation (recorded, not measured)", "-",
                f"{first:.2f}", f"{later:.3f}", f"{pss:.2f} ({processes})", "-", "-",
            ])  # fmt: skip
        if clients in VIRTUAL_WORKERS_BEFORE:
            first, later, pss = VIRTUAL_WORKERS_BEFORE[clients]
            lines.append([
                f"{clients:,} clients, {clients:,} virtual workers (recorded, before)", "-",
                f"{first:.2f}", f"{later:.3f}", f"{pss:.2f} (1)", "-", "-",
            ])  # fmt: skip
    header = [
        "clients, pool", "setup s", "round 1 s (< 2)", "later s/round", "peak PSS GB (procs)",
        "peak RSS GB", "accuracy %",
    ]  # fmt: skip
    text = (
        f"\n{env.get('rounds')} rounds of {PER_ROUND} clients, MLP 64-32-10, SGD lr {LR:g}, "
        f"batch {BATCH_SIZE}; 1,000 clients on the digits' 1,437 training examples, 10,000 on "
        f"{SYNTHETIC_EXAMPLES:,} digit-shaped ones; accuracy on the digits' held-out fifth\n\n"
        + common.table(header, lines or [["-"] * len(header)])
        + "round 1: from calling ft.fit (tracing, storing the plan) to its end, and for Flower "
        "from calling run_simulation (Ray's start-up, its setup, included); PSS/RSS: the "
        "process tree (executors; Flower's Ray processes), sampled after the setup and every "
        "round (Flower: and every 0.5 s)\n"
    )
    if ratios:
        text += "\nfedtensor against Flower 1.42 measured in this run (times faster, smaller):\n\n"
        text += common.table(
            ["clients, pool", "setup + round 1", "later rounds", "peak PSS"], ratios
        )
    for clients, why_not in env.get("flower_errors", {}).items():
        recorded = " (the Flower figures above are recorded, not measured)"
        text += (
            f"Flower, {int(clients):,} clients: not measured: {why_not}"
            + (recorded if int(clients) in FLOWER else "")
            + "\n"
        )
    return text


def run_from_args(args: argparse.Namespace) -> int:
    cfg = Config.pick(args.quick, {"rounds": (3, 10), "repeats": (1, 3)})
    skipped = "--no-flower" if getattr(args, "no_flower", False) else flower_missing()
    if skipped:
        print(
            f"simulation suite: Flower's side is not run ({skipped}); its figures are the "
            "ones recorded in anchors.md, marked 'recorded, not measured'",
            flush=True,
        )

    async def suite(env: dict[str, Any]) -> list[Row]:
        env.update(rounds=cfg.rounds["rounds"], lr=LR, batch_size=BATCH_SIZE, per_round=PER_ROUND)
        env["flower_skipped"] = skipped
        env["single_updates"] = getattr(args, "single_updates", False)
        return await run_simulation(cfg, env)

    return common.run_suite(args, "simulation", cfg, suite, notes)


if __name__ == "__main__":  # python -m benchmarks.simulation [--quick]: this suite alone
    parser = argparse.ArgumentParser(prog="python -m benchmarks.simulation", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="3 rounds instead of 10, each pool once, not 3 times"
    )
    parser.add_argument("--no-flower", action="store_true", help="do not run Flower's side")
    parser.add_argument(
        "--single-updates",
        action="store_true",
        help="also run 2 processes with single updates (no partial sums: before), same run",
    )
    parser.add_argument("--uvloop", action="store_true", help="on uvloop, if it is installed")
    parser.add_argument("--json", type=Path, default=common.REPO / "benchmarks/results/latest.json")
    raise SystemExit(run_from_args(parser.parse_args()))
