"""Federated training with ``ft.fit``, next to the same training done locally with plain torch.

Run from the repository root::

    python -m benchmarks --federated            # full run (~40 s on 2 cores)
    python -m benchmarks --federated --quick    # smoke run (~15 s)
    python -m benchmarks.federated [--quick]    # the same

The task is the demo's (:mod:`fedtensor.demo`): ``DigitsCNN`` on the training split of
scikit-learn's digits (``load_digits(0)``: 1,438 training and 359 held-out 8x8 images),
minibatch SGD with lr 0.2 and batches of 16, for E epochs (E = 10; 3 with ``--quick``).
Every contender starts from the same weights (``torch.manual_seed(0)`` before the model is
built) and is measured in this run, the contenders interleaved, ``gc.collect()`` before each:

1. baseline: ``train_centrally(model, train, epochs=E, ...)``, plain local torch.
2. ``await ft.fit(model, data, rounds=E, epochs=1, ...)`` with the data split (IID, seed 0)
   over 4 in-process ``VirtualWorker`` s, and over 2. Target: <= 1.2 x the baseline.
3. the same over 2 ``fedtensor worker`` processes on 127.0.0.1, reached over websockets,
   each started with ``--threads`` = half this process's torch threads: the machine's cores
   shared out between them, as two machines would each have their own.
   Target: <= 1.5 x the baseline.
4. (no target) the same over 2 worker processes left at torch's default threads: two
   processes of N threads each on N cores oversubscribe them, and torch's OpenMP threads
   then wait on one another (measured up to 10x slower on 2 cores).

``ft.federate`` sends the shards before the clock starts: that one-time cost is reported on
its own ("data send"). Each setup first runs a warm-up (a 1-round fit; a 1-epoch central
training), which pays one-time costs such as the import of ``torch._dynamo`` on the first
optimizer step of a process. Figures are medians over the repetitions (3; 1 with
``--quick``). Per-round figures come from the ``History`` of every timed fit: the mean wall
time of a round, of its first round (the plan is stored on the workers then), the longest
local training of a round (``compute_seconds``), the mean model-update transfer time per
worker (``transfer_seconds``), and the model-state bytes sent and received per round.
The held-out accuracy (``ft.evaluate``) after each training shows they trained comparably;
FedAvg over k workers takes 1/k as many steps per epoch, so it may trail the baseline.
On a shared machine the CPU time other processes took during the timed runs is reported
(Linux ``/proc``); more than a few percent skews every figure.
The program always exits 0: it reports PASS/MISS against the targets, it is not a test.
"""

# ruff: noqa: E402  (the imports follow the sys.path set-up on purpose)
from __future__ import annotations

import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

import argparse
import asyncio
import contextlib
import gc
import io
import math
import os
import statistics
import time
import traceback
import warnings
from collections.abc import Awaitable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

import torch

import fedtensor as ft
from benchmarks.run import _error_text, _fmt_load, _run, machine_facts, report
from fedtensor.demo import DigitsCNN, load_digits, train_centrally
from fedtensor.testing import WorkerProcess, start_worker_process

__all__ = ["FedConfig", "FedRow", "main", "run_federated", "run_from_args"]

Examples = tuple[torch.Tensor, torch.Tensor]

LR = 0.2
BATCH_SIZE = 16
SEED = 0

TARGET_VIRTUAL_FACTOR = 1.2
TARGET_PROCESS_FACTOR = 1.5

START_TIMEOUT_S = 90.0
CONNECT_TIMEOUT_S = 60.0


# -- configuration and results ---------------------------------------------------------------------


@dataclass(frozen=True)
class FedConfig:
    """Epochs (= rounds of one local epoch) and timed repetitions of each contender."""

    quick: bool
    epochs: int
    reps: int

    @staticmethod
    def make(quick: bool) -> FedConfig:
        return FedConfig(True, 3, 1) if quick else FedConfig(False, 10, 3)


@dataclass
class FedRow:
    """One contender: its timed trainings, per-round figures, accuracy, ratio and status."""

    key: str
    title: str
    workers: int  # 0 for the local baseline
    target_factor: float | None = None
    samples_s: list[float] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)
    eval_losses: list[float] = field(default_factory=list)
    data_send_s: float | None = None
    rounds: list[dict[str, Any]] = field(default_factory=list)  # RoundMetrics of timed fits
    seconds: float | None = None  # median of samples_s
    baseline_s: float | None = None
    ratio: float | None = None
    status: str = "INFO"  # PASS, MISS, INFO (no target) or ERROR
    error: str | None = None
    traceback: str | None = None

    @property
    def federated(self) -> bool:
        return self.workers > 0

    def fail(self, exc: BaseException) -> None:
        self.error = _error_text(exc)
        self.traceback = traceback.format_exc(limit=8)

    def finish(self, baseline_s: float | None) -> None:
        """Median, ratio against ``baseline_s`` and status."""
        if self.samples_s:
            self.seconds = statistics.median(self.samples_s)
        self.baseline_s = baseline_s
        if self.seconds is not None and baseline_s:
            self.ratio = self.seconds / baseline_s
        if self.error is not None:
            self.status = "ERROR"
        elif self.target_factor is not None and self.ratio is not None:
            self.status = "PASS" if self.ratio <= self.target_factor else "MISS"

    def round_mean(self, name: str) -> float | None:
        values = [float(r[name]) for r in self.rounds]
        return statistics.fmean(values) if values else None

    def first_round_mean(self) -> float | None:
        values = [float(r["seconds"]) for r in self.rounds if r["round"] == 1]
        return statistics.fmean(values) if values else None


def _round_record(metrics: ft.RoundMetrics) -> dict[str, Any]:
    values = asdict(metrics)
    values["sampled"], values["completed"] = list(metrics.sampled), list(metrics.completed)
    return values


# -- the contenders --------------------------------------------------------------------------------


def _fresh_model() -> DigitsCNN:
    torch.manual_seed(SEED)
    return DigitsCNN()


def train_local(train: Examples, test: Examples, epochs: int) -> tuple[float, float, float]:
    """The baseline: seconds of ``train_centrally``, then held-out loss and accuracy."""
    model = _fresh_model()
    start = time.perf_counter()
    train_centrally(model, train, epochs=epochs, lr=LR, batch_size=BATCH_SIZE, seed=SEED)
    elapsed = time.perf_counter() - start
    loss, accuracy = ft.evaluate(model, *test)
    return elapsed, loss, accuracy


async def train_federated(
    data: ft.FederatedDataset, test: Examples, rounds: int
) -> tuple[float, float, float, ft.History]:
    """Seconds of ``ft.fit`` (``rounds`` x 1 local epoch), held-out loss and accuracy, history."""
    model = _fresh_model()
    start = time.perf_counter()
    history = await ft.fit(
        model,
        data,
        rounds=rounds,
        epochs=1,
        batch_size=BATCH_SIZE,
        lr=LR,
        progress=False,
        seed=SEED,
    )
    elapsed = time.perf_counter() - start
    loss, accuracy = ft.evaluate(model, *test)
    return elapsed, loss, accuracy, history


async def send_data(train: Examples, workers: Sequence[ft.WorkerHandle]) -> tuple[Any, float]:
    """``ft.federate`` the training set and wait until every shard is stored; the seconds."""
    start = time.perf_counter()
    data = ft.federate(train, workers, seed=SEED)
    stored: list[Awaitable[Any]] = [p for s in data.shards for p in (s.data, s.targets)]
    await asyncio.gather(*stored)
    return data, time.perf_counter() - start


@dataclass
class _Setup:
    """A federated contender ready to time: its row and its data on the workers."""

    row: FedRow
    data: ft.FederatedDataset | None = None


async def _start_processes(names: Sequence[str], *args: str) -> list[WorkerProcess]:
    """Start the worker processes at once (each imports torch); stop them all on failure."""
    outcomes = await asyncio.gather(
        *(
            asyncio.to_thread(start_worker_process, name, *args, timeout=START_TIMEOUT_S)
            for name in names
        ),
        return_exceptions=True,
    )
    started = [o for o in outcomes if isinstance(o, WorkerProcess)]
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    if failures:
        await _stop_processes(started)
        raise failures[0]
    return started


async def _stop_processes(processes: Sequence[WorkerProcess]) -> None:
    await asyncio.gather(*(asyncio.to_thread(p.stop) for p in processes), return_exceptions=True)


# -- CPU time of other processes (a shared machine skews every figure) -----------------------------


def _machine_busy_s() -> float | None:
    """CPU seconds the whole machine spent busy since boot (Linux ``/proc/stat``)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` so far; 0.0 if unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


class CpuWatch:
    """CPU seconds spent by processes other than this one and ``pids`` over a stretch."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self._machine = _machine_busy_s()
        self._ours = self._our_cpu_s()
        self._wall = time.perf_counter()

    def _our_cpu_s(self) -> float:
        times = os.times()
        return times.user + times.system + sum(_process_cpu_s(pid) for pid in self.pids)

    def stop(self) -> dict[str, float] | None:
        machine = _machine_busy_s()
        if machine is None or self._machine is None:
            return None
        wall = time.perf_counter() - self._wall
        ours = self._our_cpu_s() - self._ours
        others = max(0.0, machine - self._machine - ours)
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        return {
            "wall_s": wall,
            "ours_cpu_s": ours,
            "others_cpu_s": others,
            "others_share": others / (wall * max(cpus, 1)) if wall > 0 else 0.0,
        }


# -- the run ---------------------------------------------------------------------------------------


async def run_federated(cfg: FedConfig, env: dict[str, Any]) -> list[FedRow]:
    """Prepare every contender, warm each up, then time them interleaved."""
    loop_errors: list[str] = env.setdefault("loop_errors", [])

    def handler(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        loop_errors.append(
            str(context.get("message")) + (f" ({_error_text(exc)})" if exc is not None else "")
        )

    asyncio.get_running_loop().set_exception_handler(handler)
    phases: dict[str, float] = env.setdefault("phases_s", {})
    clock = time.perf_counter()

    def phase(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        phases[name] = phases.get(name, 0.0) + now - clock
        clock = now

    # The processes start first, in the background: each imports torch, which takes seconds.
    # Two workers on one machine share its cores (`--threads`), as two machines would each
    # have their own; the pair left at torch's default (a thread per core each) oversubscribes
    # the cores, and torch's threads then wait on one another (a row without a target).
    few_threads = max(1, torch.get_num_threads() // 2)
    env["few_threads"] = few_threads

    few_group = asyncio.ensure_future(
        _start_processes(["fed0-t", "fed1-t"], "--threads", str(few_threads))
    )

    async def start_default_threads() -> list[WorkerProcess]:
        with contextlib.suppress(Exception):  # one pair at a time: each start imports torch
            await asyncio.shield(few_group)
        return await _start_processes(["fed0", "fed1"])

    default_group = asyncio.ensure_future(start_default_threads())
    groups = [few_group, default_group]

    train, test = load_digits(SEED)
    env["train_examples"], env["test_examples"] = len(train[0]), len(test[0])
    env["parameters"] = sum(p.numel() for p in DigitsCNN().parameters())

    baseline = FedRow("local", "local torch: train_centrally", 0)
    setups = [
        _Setup(FedRow("virtual4", "ft.fit, 4 virtual workers", 4, TARGET_VIRTUAL_FACTOR)),
        _Setup(FedRow("virtual2", "ft.fit, 2 virtual workers", 2, TARGET_VIRTUAL_FACTOR)),
        _Setup(
            FedRow(
                "processes2",
                f"ft.fit, 2 worker processes (ws), --threads {few_threads}",
                2,
                TARGET_PROCESS_FACTOR,
            )
        ),
        _Setup(FedRow("processes2_default_threads", "  the same, torch's default threads each", 2)),
    ]
    virtual = setups[:2]
    remote = list(zip(setups[2:], groups, strict=True))
    processes: list[WorkerProcess] = []
    try:
        async with contextlib.AsyncExitStack() as stack:
            for setup in virtual:
                try:
                    workers = [
                        await stack.enter_async_context(
                            ft.VirtualWorker(f"{setup.row.key}-{i}", timeout=CONNECT_TIMEOUT_S)
                        )
                        for i in range(setup.row.workers)
                    ]
                    setup.data, setup.row.data_send_s = await send_data(train, workers)
                except Exception as exc:
                    setup.row.fail(exc)
            phase("virtual workers and their data")
            for setup, group in remote:
                try:
                    started = await group
                    processes += started
                    handles: list[ft.WorkerHandle] = [
                        await stack.enter_async_context(
                            ft.connect(p.url, token=p.token, timeout=CONNECT_TIMEOUT_S)
                        )
                        for p in started
                    ]
                    setup.data, setup.row.data_send_s = await send_data(train, handles)
                except Exception as exc:
                    setup.row.fail(exc)
            phase("worker processes (waiting for their start) and their data")

            # Warm-up: one-time costs (torch._dynamo's import on a process's first optimizer
            # step, the first trace, lazy imports) are paid here, on every setup.
            try:
                train_local(train, test, 1)
            except Exception as exc:
                baseline.fail(exc)
            for setup in setups:
                if setup.data is not None and setup.row.error is None:
                    try:
                        await train_federated(setup.data, test, 1)
                    except Exception as exc:
                        setup.row.fail(exc)
            phase("warm-up")

            watch = CpuWatch([p.process.pid for p in processes])
            for _rep in range(cfg.reps):
                if baseline.error is None:
                    gc.collect()
                    try:
                        elapsed, loss, accuracy = train_local(train, test, cfg.epochs)
                        baseline.samples_s.append(elapsed)
                        baseline.eval_losses.append(loss)
                        baseline.accuracies.append(accuracy)
                    except Exception as exc:
                        baseline.fail(exc)
                for setup in setups:
                    row = setup.row
                    if setup.data is None or row.error is not None:
                        continue
                    gc.collect()
                    try:
                        elapsed, loss, accuracy, history = await train_federated(
                            setup.data, test, cfg.epochs
                        )
                    except Exception as exc:
                        row.fail(exc)
                        continue
                    row.samples_s.append(elapsed)
                    row.eval_losses.append(loss)
                    row.accuracies.append(accuracy)
                    row.rounds += [_round_record(m) for m in history]
            env["cpu_during_timing"] = watch.stop()
            phase("timed runs")
            for setup in setups:
                setup.data = None  # the pointers go before the workers close
            gc.collect()
            await asyncio.sleep(0)
    finally:
        for group in groups:  # a start still under way (after an error) is waited for
            with contextlib.suppress(Exception):
                for p in await group:
                    if p not in processes:
                        processes.append(p)
        env["pids"] = {"benchmark": os.getpid(), "workers": [p.process.pid for p in processes]}
        await _stop_processes(processes)
        phase("closing")
    baseline_s = statistics.median(baseline.samples_s) if baseline.samples_s else None
    rows = [baseline, *(s.row for s in setups)]
    for row in rows:
        row.finish(baseline_s)
    return rows


# -- reporting -------------------------------------------------------------------------------------


def _table(header: Sequence[str], lines: Sequence[Sequence[str]], left: int = 1) -> str:
    """A markdown table, columns padded; the first ``left`` columns flush left."""
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]

    def cells(values: Sequence[str]) -> str:
        padded = [
            v.ljust(w) if i < left else v.rjust(w)
            for i, (v, w) in enumerate(zip(values, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(
        ":" + "-" * (w + 1) if i < left else "-" * (w + 1) + ":" for i, w in enumerate(widths)
    )
    return "\n".join([cells(header), rule + "|", *(cells(line) for line in lines)]) + "\n"


def _s(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _bytes(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _percent(values: Sequence[float]) -> str:
    return f"{100 * statistics.median(values):.1f}%" if values else "-"


def render(rows: Sequence[FedRow], label: str, facts: dict[str, Any], env: dict[str, Any]) -> str:
    cfg: FedConfig = env["config"]
    out = io.StringIO()
    out.write(
        f"fedtensor federated-training benchmark ({'quick' if cfg.quick else 'full'} run) - "
        f"event loop: {label}\n"
        f"python {facts['python']}, torch {facts['torch']} ({facts['torch_threads']} threads), "
        f"{facts['cpus_usable']} CPUs, {facts['platform']}\n"
        f"load average at start: {_fmt_load(facts['loadavg_at_start'])} (compare ratios "
        "within one run)\n"
        f"DigitsCNN ({env.get('parameters', 0):,} parameters) on digits "
        f"({env.get('train_examples', 0):,} training / {env.get('test_examples', 0)} held-out "
        f"images): {cfg.epochs} epochs = ft.fit rounds={cfg.epochs} x epochs=1, SGD lr {LR:g}, "
        f"batch {BATCH_SIZE}, seed {SEED};\nmedian of {cfg.reps} timed run"
        f"{'s' if cfg.reps > 1 else ''} per contender after a warm-up, contenders interleaved; "
        "ratio = seconds / baseline seconds\n\n"
    )
    lines: list[list[str]] = []
    for r in rows:
        if r.error is not None:
            lines.append([r.title, "ERROR", _s(r.baseline_s), "-", "-", "ERROR"])
            continue
        target = "-" if r.target_factor is None else f"<= {r.target_factor:g}x"
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}x"
        status = "-" if r.status == "INFO" else r.status
        lines.append([r.title, _s(r.seconds), _s(r.baseline_s), ratio, target, status])
    out.write(
        _table(["row", "seconds", "baseline seconds", "ratio", "target", "met?"], lines, left=1)
    )
    out.write("\nper round (means over every round of the timed fits) and held-out accuracy\n\n")
    per_round: list[list[str]] = []
    for r in rows:
        if r.error is not None:
            continue
        if not r.federated:
            epoch_s = None if r.seconds is None else r.seconds / cfg.epochs
            per_round.append(
                [r.title, _s(epoch_s), "-", "-", "-", "-", "-", "-", _percent(r.accuracies)]
            )
            continue
        per_round.append(
            [
                r.title,
                _s(r.round_mean("seconds")),
                _s(r.first_round_mean()),
                _s(r.round_mean("compute_seconds")),
                _s(r.round_mean("transfer_seconds")),
                _bytes(r.round_mean("bytes_sent")),
                _bytes(r.round_mean("bytes_received")),
                _s(r.data_send_s),
                _percent(r.accuracies),
            ]
        )
    out.write(
        _table(
            [
                "row",
                "s/round",
                "round 1 s",
                "compute s/round",
                "transfer s/worker/round",
                "bytes sent/round",
                "bytes received/round",
                "data send s",
                "held-out acc",
            ],
            per_round,
        )
    )
    out.write(
        "\ns/round of the baseline: seconds per epoch. compute: the longest local training of "
        "a round; transfer: per worker, time to its update minus its training (model there, "
        "queueing, update back); data send: ft.federate of the training set, once, untimed "
        "above\n"
    )
    few = env.get("few_threads")
    if few is not None:
        out.write(
            f"the target row starts its 2 worker processes with --threads {few}; the last row "
            f"(no target) leaves them at torch's default ({facts['torch_threads']} here, as in "
            "this process)\n"
        )
    cpu = env.get("cpu_during_timing")
    if cpu is not None:
        busy = cpu["others_share"] > 0.05
        out.write(
            f"other processes on this machine used {cpu['others_cpu_s']:.1f} CPU-seconds "
            f"during the {cpu['wall_s']:.1f} s of timed runs ({100 * cpu['others_share']:.0f}% "
            "of the machine's CPU time)"
            + ("  <- a busy machine: these figures are skewed, run again\n" if busy else "\n")
        )
    phases: dict[str, float] = env.get("phases_s", {})
    if phases:
        out.write(
            "phases: " + "; ".join(f"{name} {seconds:.1f} s" for name, seconds in phases.items())
        )
        out.write("\n")
    for r in rows:
        if r.error is not None:
            out.write(f"{r.title}: ERROR: {r.error}\n")
    missed = [r.title for r in rows if r.status in ("MISS", "ERROR")]
    out.write("\nmissed targets / errors: " + ("; ".join(missed) if missed else "none") + "\n")
    return out.getvalue()


def run_from_args(args: argparse.Namespace) -> int:
    """``python -m benchmarks --federated [--quick] [--uvloop] [--json PATH]``."""
    cfg = FedConfig.make(bool(args.quick))
    facts = machine_facts()
    env: dict[str, Any] = {"config": cfg}
    started = time.perf_counter()
    try:
        rows, label = _run(run_federated(cfg, env), bool(args.uvloop))
    except Exception as exc:  # nothing could be set up: report it, as rows do
        label = "n/a"
        row = FedRow("federated", "federated benchmark", 0)
        row.fail(exc)
        row.finish(None)
        rows = [row]
    elapsed = time.perf_counter() - started
    print(render(rows, label, facts, env), end="")
    report(
        args.json,
        "federated",
        quick=cfg.quick,
        loop_label=label,
        facts=facts,
        config=asdict(cfg),
        rows=rows,
        elapsed=elapsed,
        loop_errors=env.get("loop_errors", []),
        extra={
            "hyperparameters": {"lr": LR, "batch_size": BATCH_SIZE, "seed": SEED},
            "phases_s": env.get("phases_s"),
            "few_threads": env.get("few_threads"),
            "cpu_during_timing": env.get("cpu_during_timing"),
            "pids": env.get("pids"),
            "ratio_convention": "ratio = seconds / baseline (train_centrally) seconds, same run",
        },
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.federated [--quick]``: the same as ``-m benchmarks --federated``."""
    from benchmarks.run import parse_args

    return run_from_args(parse_args(["--federated", *(argv or [])]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
