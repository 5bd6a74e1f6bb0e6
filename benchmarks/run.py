"""fedtensor benchmarks: remote work next to the same work done locally with plain torch.

Run from the repository root with ``python -m benchmarks`` or ``python benchmarks/run.py``::

    python -m benchmarks                 # full run (~1-2 minutes on 2 cores), default asyncio loop
    python -m benchmarks --uvloop        # the same on uvloop
    python -m benchmarks --quick         # smoke run, a few seconds
    python -m benchmarks --json out.json # JSON path (default benchmarks/results/latest.json)
    python -m benchmarks --profile chain # cProfile of one row's fedtensor hot path, top entries
    python -m benchmarks --network       # worker processes over websockets (benchmarks/network.py)
    python -m benchmarks --federated     # ft.fit vs local torch training (benchmarks/federated.py)

Rows (each timed for fedtensor and, in the same run and interleaved with it, for plain torch):

1. round trip: ``ft.send`` of a 5-element tensor, a remote add, ``await ...get()``;
   local: ``t.clone()`` + ``torch.add``. Median microseconds per round trip.
2. pipelined chain: 10,000 ``x = x + 1`` on a pointer, then one ``await x.get()``;
   local: the same 10,000 adds. Operations per second.
3. bulk: ``ft.send`` + ``await get()`` of a 64 MiB float32 tensor; local: ``t.clone()``.
   GB/s = 64 MiB (67,108,864 bytes) / time of send + get, with GB = 1e9 bytes.
4. fan-out: ``ft.send(t, *workers)`` + ``await m.get()`` of a 16 MiB tensor to 1, 2, 4 and
   8 workers; local: N x ``t.clone()``.

Rows 1-3 run again on ``encode=True`` workers (every batch goes through the wire codec);
those rows report the cost of the wire format and have no target: the targets are the
in-memory path's.
The program always exits 0: it reports PASS/MISS against the targets, it is not a test.
"""

# ruff: noqa: E402  (the imports follow the sys.path set-up on purpose)
from __future__ import annotations

import sys
from pathlib import Path

# `python benchmarks/run.py` puts benchmarks/ first on sys.path: use this checkout's fedtensor.
_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

import argparse
import asyncio
import contextlib
import cProfile
import datetime
import functools
import gc
import importlib.metadata
import io
import json
import os
import platform
import pstats
import statistics
import subprocess
import time
import traceback
import warnings
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

# torch warns at import when numpy is absent; numpy is not a dependency.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

import torch

import fedtensor as ft

__all__ = ["Config", "Row", "main"]

MIB = 1 << 20
BULK_BYTES = 64 * MIB
FANOUT_BYTES = 16 * MIB
FANOUT_WORKERS = (1, 2, 4, 8)
CHAIN_LENGTH = 10_000

TARGET_ROUNDTRIP_US = 30.0
TARGET_CHAIN_OPS = 50_000.0
TARGET_BULK_GBPS = 1.5

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "latest.json"

_now = time.perf_counter_ns


# -- configuration and results ---------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """How many repetitions each row gets, and how long it may take at most."""

    quick: bool
    roundtrip_warmup: int
    roundtrip_blocks: int  # fedtensor and local blocks alternate
    roundtrip_block_reps: int
    chain_runs: int
    bulk_reps: int
    fanout_reps: int
    row_budget_s: float  # a row stops repeating (after at least 3 reps) past this

    @staticmethod
    def make(quick: bool) -> Config:
        if quick:
            return Config(True, 100, 2, 150, 3, 3, 3, 3.0)
        return Config(False, 500, 10, 500, 9, 15, 15, 15.0)


@dataclass
class Stats:
    """A sample of times in nanoseconds, summarized."""

    n: int
    median_ns: float
    min_ns: float
    p10_ns: float
    p90_ns: float

    @staticmethod
    def of(samples: Sequence[int]) -> Stats:
        ordered = sorted(samples)
        n = len(ordered)
        return Stats(
            n=n,
            median_ns=float(statistics.median(ordered)),
            min_ns=float(ordered[0]),
            p10_ns=float(ordered[int(0.1 * (n - 1))]),
            p90_ns=float(ordered[int(0.9 * (n - 1))]),
        )


@dataclass
class Row:
    """One benchmark row: fedtensor and local figures, their ratio, target and status."""

    key: str
    title: str
    unit: str
    higher_is_better: bool
    fedtensor: float | None = None
    local: float | None = None
    ratio: float | None = None  # always fedtensor / local, in the row's unit
    ratio_text: str = ""
    target: float | None = None
    target_text: str = "none set"
    status: str = "INFO"  # PASS, MISS, INFO (no target) or ERROR
    error: str | None = None
    fedtensor_stats: Stats | None = None
    local_stats: Stats | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def finish(self) -> None:
        """Compute ratio, ratio text and status from the figures."""
        if self.fedtensor is not None and self.local is not None and self.local > 0:
            self.ratio = self.fedtensor / self.local
            if self.higher_is_better:
                self.ratio_text = f"{self.ratio:.3g}x of local"
            elif self.ratio >= 1:
                self.ratio_text = f"{self.ratio:.3g}x slower"
            else:
                self.ratio_text = f"{1 / self.ratio:.3g}x faster"
        if self.error is not None:
            self.status = "ERROR"
        elif self.target is not None and self.fedtensor is not None:
            met = (
                self.fedtensor >= self.target
                if self.higher_is_better
                else self.fedtensor <= self.target
            )
            self.status = "PASS" if met else "MISS"


# -- helpers ---------------------------------------------------------------------------------------


def _budget_left(started_ns: int, budget_s: float, done: int, minimum: int = 3) -> bool:
    return done < minimum or (_now() - started_ns) < budget_s * 1e9


async def _alternate(
    fed: Callable[[], Awaitable[int]],
    local: Callable[[], int],
    reps: int,
    budget_s: float,
) -> tuple[list[int], list[int]]:
    """Time ``fed`` and ``local`` alternately, ``gc.collect()`` before each; ns per call."""
    fed_ns: list[int] = []
    local_ns: list[int] = []
    started = _now()
    while len(fed_ns) < reps and _budget_left(started, budget_s, len(fed_ns)):
        gc.collect()
        fed_ns.append(await fed())
        gc.collect()
        local_ns.append(local())
    return fed_ns, local_ns


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _worker(name: str, encode: bool) -> ft.VirtualWorker:
    return ft.VirtualWorker(f"bench-{name}{'-enc' if encode else ''}", encode=encode, timeout=60.0)


# -- row 1: round trip -----------------------------------------------------------------------------


async def timed_roundtrips(worker: Any, t: torch.Tensor, reps: int) -> list[int]:
    """Nanoseconds of each of ``reps`` round trips: ``ft.send(t)``, ``+ 1``, ``get()``."""
    samples: list[int] = []
    now = _now
    for _ in range(reps):
        start = now()
        x = ft.send(t, worker)
        z = x + 1
        await z.get()
        samples.append(now() - start)
    return samples


def _roundtrip_local_block(t: torch.Tensor, reps: int) -> list[int]:
    samples: list[int] = []
    now = _now
    for _ in range(reps):
        start = now()
        c = t.clone()
        torch.add(c, 1)
        samples.append(now() - start)
    return samples


_ENCODED_TARGET = "report only"


async def bench_roundtrip(cfg: Config, encode: bool) -> Row:
    row = Row(
        key="roundtrip" + ("_encode" if encode else ""),
        title="round trip: send 5 elems + add + get" + (" [encode]" if encode else ""),
        unit="us",
        higher_is_better=False,
        # The targets are for the in-memory path; [encode] rows measure the wire format.
        target=None if encode else TARGET_ROUNDTRIP_US,
        target_text=_ENCODED_TARGET if encode else f"<= {TARGET_ROUNDTRIP_US:g} us",
    )
    t = torch.tensor([1, 2, 3, 4, 5])
    async with _worker("roundtrip", encode) as worker:
        checked = await (ft.send(t, worker) + 1).get()
        if not torch.equal(checked, t + 1):
            raise AssertionError(f"wrong result {checked}")
        await timed_roundtrips(worker, t, cfg.roundtrip_warmup)
        _roundtrip_local_block(t, cfg.roundtrip_warmup)
        fed: list[int] = []
        local: list[int] = []
        started = _now()
        for block in range(cfg.roundtrip_blocks):
            if not _budget_left(started, cfg.row_budget_s, block, minimum=1):
                break
            gc.collect()
            fed += await timed_roundtrips(worker, t, cfg.roundtrip_block_reps)
            gc.collect()
            local += _roundtrip_local_block(t, cfg.roundtrip_block_reps)
    row.fedtensor_stats, row.local_stats = Stats.of(fed), Stats.of(local)
    row.fedtensor = row.fedtensor_stats.median_ns / 1e3
    row.local = row.local_stats.median_ns / 1e3
    row.extra["definition"] = "median microseconds per (ft.send + x + 1 + await get())"
    return row


# -- row 2: pipelined chain ------------------------------------------------------------------------


async def timed_chain(worker: Any, t: torch.Tensor, length: int, *, include_send: bool) -> int:
    """Nanoseconds for ``length`` chained ``x = x + 1`` on ``worker``, then one get (checked).

    ``include_send``: whether the clock also covers ``ft.send`` of ``t``.
    """
    start = _now()
    x = ft.send(t, worker)
    if not include_send:
        await x  # stored before the clock starts
        gc.collect()
        start = _now()
    for _ in range(length):
        x = x + 1
    value = await x.get()
    elapsed = _now() - start
    if not torch.equal(value, t + length):
        raise AssertionError(f"wrong result {value}")
    return elapsed


async def bench_chain(cfg: Config, encode: bool) -> Row:
    row = Row(
        key="chain" + ("_encode" if encode else ""),
        title=f"pipelined: {CHAIN_LENGTH:,} chained adds + get" + (" [encode]" if encode else ""),
        unit="ops/s",
        higher_is_better=True,
        # The targets are for the in-memory path; [encode] rows measure the wire format.
        target=None if encode else TARGET_CHAIN_OPS,
        target_text=_ENCODED_TARGET if encode else f">= {TARGET_CHAIN_OPS:,.0f} ops/s",
    )
    t = torch.zeros(5)

    async with _worker("chain", encode) as worker:

        async def fed() -> int:
            return await timed_chain(worker, t, CHAIN_LENGTH, include_send=False)

        def local() -> int:
            x = t.clone()
            start = _now()
            for _ in range(CHAIN_LENGTH):
                x = x + 1
            return _now() - start

        await fed()  # warm-up
        local()
        fed_ns, local_ns = await _alternate(fed, local, cfg.chain_runs, cfg.row_budget_s)
    row.fedtensor_stats, row.local_stats = Stats.of(fed_ns), Stats.of(local_ns)
    row.fedtensor = CHAIN_LENGTH / (row.fedtensor_stats.median_ns / 1e9)
    row.local = CHAIN_LENGTH / (row.local_stats.median_ns / 1e9)
    row.extra["definition"] = f"{CHAIN_LENGTH} / median time of (the adds + await get())"
    return row


# -- row 3: bulk send + get ------------------------------------------------------------------------


async def bench_bulk(cfg: Config, encode: bool) -> Row:
    row = Row(
        key="bulk" + ("_encode" if encode else ""),
        title="send + get 64 MiB float32" + (" [encode]" if encode else ""),
        unit="GB/s",
        higher_is_better=True,
        # The targets are for the in-memory path; [encode] rows measure the wire format.
        target=None if encode else TARGET_BULK_GBPS,
        target_text=_ENCODED_TARGET if encode else f">= {TARGET_BULK_GBPS:g} GB/s",
    )
    t = torch.arange(BULK_BYTES // 4, dtype=torch.float32)
    async with _worker("bulk", encode) as worker:

        async def fed() -> int:
            start = _now()
            pointer = ft.send(t, worker)
            value = await pointer.get()
            elapsed = _now() - start
            del value
            return elapsed

        def local() -> int:
            start = _now()
            copy = t.clone()
            elapsed = _now() - start
            del copy
            return elapsed

        value = await ft.send(t, worker).get()
        if not torch.equal(value, t):
            raise AssertionError("64 MiB tensor came back different")
        del value
        local()
        fed_ns, local_ns = await _alternate(fed, local, cfg.bulk_reps, cfg.row_budget_s)
    row.fedtensor_stats, row.local_stats = Stats.of(fed_ns), Stats.of(local_ns)
    row.fedtensor = BULK_BYTES / row.fedtensor_stats.median_ns  # bytes/ns == GB/s
    row.local = BULK_BYTES / row.local_stats.median_ns
    row.extra["definition"] = (
        "GB/s = 67,108,864 bytes / median time of (ft.send + await get()), GB = 1e9 bytes; "
        "local = the same bytes / median time of t.clone()"
    )
    row.extra["fedtensor_median_ms"] = row.fedtensor_stats.median_ns / 1e6
    row.extra["local_median_ms"] = row.local_stats.median_ns / 1e6
    return row


# -- row 4: fan-out --------------------------------------------------------------------------------


async def bench_fanout(cfg: Config) -> list[Row]:
    t = torch.arange(FANOUT_BYTES // 4, dtype=torch.float32)
    rows: list[Row] = []
    async with contextlib.AsyncExitStack() as stack:
        workers = [
            await stack.enter_async_context(_worker(f"fanout{i}", False))
            for i in range(max(FANOUT_WORKERS))
        ]
        for n in FANOUT_WORKERS:
            chosen = workers[:n]

            async def fed(chosen: list[ft.VirtualWorker] = chosen) -> int:
                start = _now()
                pointers = ft.send(t, *chosen)
                values = await pointers.get()
                elapsed = _now() - start
                del values
                return elapsed

            def local(n: int = n) -> int:
                start = _now()
                copies = [t.clone() for _ in range(n)]
                elapsed = _now() - start
                del copies
                return elapsed

            values = await ft.send(t, *chosen).get()
            values = [values] if n == 1 else values
            if len(values) != n or not all(torch.equal(v, t) for v in values):
                raise AssertionError(f"fan-out to {n} workers came back wrong")
            del values
            fed_ns, local_ns = await _alternate(fed, local, cfg.fanout_reps, cfg.row_budget_s / 2)
            row = Row(
                key=f"fanout_{n}",
                title=f"fan-out 16 MiB to {n} worker{'s' if n > 1 else ''}",
                unit="ms",
                higher_is_better=False,
                fedtensor_stats=Stats.of(fed_ns),
                local_stats=Stats.of(local_ns),
            )
            row.fedtensor = Stats.of(fed_ns).median_ns / 1e6
            row.local = Stats.of(local_ns).median_ns / 1e6
            row.extra["workers"] = n
            row.extra["definition"] = (
                "median ms of ft.send(t, *workers) + await get(); local = n x t.clone()"
            )
            rows.append(row)
    base = rows[0].fedtensor
    for row in rows:
        if base and row.fedtensor is not None:
            row.extra["vs_1_worker"] = row.fedtensor / base
            row.extra["ms_per_worker"] = row.fedtensor / row.extra["workers"]
    return rows


# -- running ---------------------------------------------------------------------------------------


async def _guarded(make: Callable[[], Coroutine[Any, Any, Row]], key: str, title: str) -> Row:
    try:
        row = await make()
    except Exception as exc:
        row = Row(key=key, title=title, unit="", higher_is_better=False, error=_error_text(exc))
        row.extra["traceback"] = traceback.format_exc(limit=6)
    row.finish()
    return row


async def run_all(cfg: Config, loop_errors: list[str]) -> list[Row]:
    loop = asyncio.get_running_loop()

    def handler(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        loop_errors.append(
            str(context.get("message")) + (f" ({_error_text(exc)})" if exc is not None else "")
        )

    loop.set_exception_handler(handler)
    rows: list[Row] = []
    benches: list[tuple[str, Callable[[Config, bool], Coroutine[Any, Any, Row]]]] = [
        ("roundtrip", bench_roundtrip),
        ("chain", bench_chain),
        ("bulk", bench_bulk),
    ]
    for encode in (False, True):
        for key, bench in benches:
            rows.append(
                await _guarded(
                    functools.partial(bench, cfg, encode),
                    key + ("_encode" if encode else ""),
                    key + (" [encode]" if encode else ""),
                )
            )
    try:
        fanout = await bench_fanout(cfg)
    except Exception as exc:
        fanout = [Row("fanout", "fan-out", "ms", False, error=_error_text(exc))]
    for row in fanout:
        row.finish()
    rows += fanout
    gc.collect()
    await asyncio.sleep(0)  # let stray futures be reported while the handler is installed
    return rows


def _loop_factory(use_uvloop: bool) -> tuple[Callable[[], asyncio.AbstractEventLoop] | None, str]:
    if not use_uvloop:
        return None, "asyncio (default event loop)"
    try:
        import uvloop
    except ImportError:
        return None, "asyncio (default event loop; --uvloop asked but uvloop is not installed)"
    return uvloop.new_event_loop, f"uvloop {importlib.metadata.version('uvloop')}"


def _run(coro: Coroutine[Any, Any, Any], use_uvloop: bool) -> tuple[Any, str]:
    factory, label = _loop_factory(use_uvloop)
    if factory is None:
        return asyncio.run(coro), label
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro), label


# -- reporting -------------------------------------------------------------------------------------


def machine_facts() -> dict[str, Any]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=_REPO, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count() or 0
    return {
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "fedtensor": ft.__version__,
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "git_commit": commit,
    }


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "us":
        return f"{value:,.1f} us"
    if unit == "ops/s":
        return f"{value:,.0f} ops/s"
    if unit == "GB/s":
        return f"{value:.2f} GB/s"
    if unit == "ms":
        return f"{value:,.2f} ms"
    return f"{value:.4g} {unit}"


def _fmt_load(load: Sequence[float] | None) -> str:
    return "n/a" if load is None else " ".join(f"{x:.2f}" for x in load)


def render(rows: Sequence[Row], loop_label: str, facts: dict[str, Any], quick: bool) -> str:
    out = io.StringIO()
    mode = "quick" if quick else "full"
    out.write(
        f"fedtensor benchmarks ({mode} run) - event loop: {loop_label}\n"
        f"python {facts['python']}, torch {facts['torch']} ({facts['torch_threads']} threads), "
        f"{facts['cpus_usable']} CPUs, {facts['platform']}\n"
        f"load average at start: {_fmt_load(facts['loadavg_at_start'])} "
        "(other processes on this machine skew every figure; compare ratios within one run)\n"
        "ratio = fedtensor / local: for times 'x slower' (or 'x faster'), "
        "for throughputs 'x of local'\n\n"
    )
    header = (
        f"{'benchmark':<46} {'fedtensor':>16} {'local torch':>16} {'ratio':>15} "
        f"{'target':>18}  status"
    )
    out.write(header + "\n" + "-" * len(header) + "\n")
    main_rows = [r for r in rows if not r.key.startswith("fanout")]
    for r in main_rows:
        if r.error is not None:
            out.write(f"{r.title:<46} {'ERROR: ' + r.error}\n")
            continue
        out.write(
            f"{r.title:<46} {_fmt(r.fedtensor, r.unit):>16} {_fmt(r.local, r.unit):>16} "
            f"{r.ratio_text:>15} {r.target_text:>18}  {r.status}\n"
        )
    out.write(
        "\nrow 3: GB/s = 64 MiB (67,108,864 bytes) / median time of (ft.send + await get()),"
        " GB = 1e9 bytes;\n       local = the same bytes / median time of t.clone()\n"
    )
    fan = [r for r in rows if r.key.startswith("fanout")]
    if fan:
        out.write(
            "\nrow 4: fan-out of a 16 MiB float32 tensor: ft.send(t, *workers) + await m.get()"
            " (median ms; no target set)\n"
        )
        sub = (
            f"{'workers':>7} {'fedtensor':>12} {'local N x clone':>16} {'vs local':>14} "
            f"{'vs 1 worker':>12} {'per worker':>12}"
        )
        out.write(sub + "\n" + "-" * len(sub) + "\n")
        for r in fan:
            if r.error is not None:
                out.write(f"{r.title}: ERROR: {r.error}\n")
                continue
            out.write(
                f"{r.extra['workers']:>7} {_fmt(r.fedtensor, 'ms'):>12} "
                f"{_fmt(r.local, 'ms'):>16} {r.ratio_text:>14} "
                f"{r.extra.get('vs_1_worker', 0.0):>11.2f}x "
                f"{_fmt(r.extra.get('ms_per_worker'), 'ms'):>12}\n"
            )
    missed = [r.title for r in rows if r.status in ("MISS", "ERROR")]
    out.write("\nmissed targets / errors: " + ("; ".join(missed) if missed else "none") + "\n")
    return out.getvalue()


# -- profiling -------------------------------------------------------------------------------------

PROFILES = ("roundtrip", "chain", "bulk", "fanout")


async def _profiled(name: str, encode: bool, profiler: cProfile.Profile) -> None:
    small = torch.tensor([1, 2, 3, 4, 5])
    async with contextlib.AsyncExitStack() as stack:
        count = 8 if name == "fanout" else 1
        workers = [
            await stack.enter_async_context(_worker(f"profile{i}", encode)) for i in range(count)
        ]
        worker = workers[0]
        if name == "roundtrip":
            await timed_roundtrips(worker, small, 500)
            gc.collect()
            profiler.enable()
            await timed_roundtrips(worker, small, 5000)
            profiler.disable()
        elif name == "chain":
            for run in range(4):
                x = ft.send(torch.zeros(5), worker)
                await x
                gc.collect()
                if run:
                    profiler.enable()
                for _ in range(CHAIN_LENGTH):
                    x = x + 1
                await x.get()
                profiler.disable()
        elif name == "bulk":
            t = torch.arange(BULK_BYTES // 4, dtype=torch.float32)
            await ft.send(t, worker).get()
            for _ in range(10):
                gc.collect()
                profiler.enable()
                await ft.send(t, worker).get()
                profiler.disable()
        else:
            t = torch.arange(FANOUT_BYTES // 4, dtype=torch.float32)
            await ft.send(t, *workers).get()
            for _ in range(10):
                gc.collect()
                profiler.enable()
                await ft.send(t, *workers).get()
                profiler.disable()


def profile_row(name: str, encode: bool, use_uvloop: bool, top: int) -> str:
    profiler = cProfile.Profile()
    _, label = _run(_profiled(name, encode, profiler), use_uvloop)
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    stats.sort_stats("tottime").print_stats(top)
    return f"cProfile of {name}{' [encode]' if encode else ''} on {label}\n{stream.getvalue()}"


# -- entry point -----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description="fedtensor vs local torch benchmarks"
    )
    parser.add_argument("--quick", action="store_true", help="fast smoke run, fewer repetitions")
    parser.add_argument(
        "--json", type=Path, default=DEFAULT_JSON, help=f"where to write results ({DEFAULT_JSON})"
    )
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop if installed")
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument(
        "--network",
        action="store_true",
        help="instead: worker processes over websockets vs raw websockets and torch.rpc "
        "(see benchmarks/network.py; JSON under the key 'network')",
    )
    modes.add_argument(
        "--federated",
        action="store_true",
        help="instead: ft.fit on virtual workers and worker processes vs plain torch "
        "training (see benchmarks/federated.py; JSON under the key 'federated')",
    )
    parser.add_argument(
        "--profile",
        choices=PROFILES,
        help="instead of the table, cProfile this row's fedtensor hot path",
    )
    parser.add_argument("--encode", action="store_true", help="with --profile: encode=True")
    parser.add_argument("--top", type=int, default=15, help="with --profile: entries to show")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.network:
        from benchmarks.network import run_from_args

        return run_from_args(args)
    if args.federated:
        from benchmarks.federated import run_from_args as run_federated_from_args

        return run_federated_from_args(args)
    if args.profile:
        print(profile_row(args.profile, args.encode, args.uvloop, args.top))
        return 0
    cfg = Config.make(args.quick)
    facts = machine_facts()
    loop_errors: list[str] = []
    started = time.perf_counter()
    rows, loop_label = _run(run_all(cfg, loop_errors), args.uvloop)
    elapsed = time.perf_counter() - started
    print(render(rows, loop_label, facts, args.quick), end="")
    report(
        args.json,
        None,
        quick=args.quick,
        loop_label=loop_label,
        facts=facts,
        config=asdict(cfg),
        rows=rows,
        elapsed=elapsed,
        loop_errors=loop_errors,
        extra={"ratio_convention": "ratio = fedtensor / local in each row's unit"},
    )
    return 0


def report(
    path: Path,
    key: str | None,
    *,
    quick: bool,
    loop_label: str,
    facts: dict[str, Any],
    config: dict[str, Any],
    rows: Sequence[Any],
    elapsed: float,
    loop_errors: list[str],
    extra: dict[str, Any],
) -> None:
    """Print the end of a run and merge its results into the JSON file at ``path``.

    The in-memory run writes at the top level (``key`` None), the network and
    federated runs under their own key, so one file keeps the latest of each.
    Every row has ``key`` and ``status`` (PASS, MISS, INFO or ERROR).
    """
    if loop_errors:
        print(f"event-loop errors reported during the run: {len(loop_errors)} (see JSON)")
    print(f"total time {elapsed:.1f} s")
    result = {
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "mode": "quick" if quick else "full",
        "event_loop": loop_label,
        "machine": facts,
        "config": config,
        "elapsed_s": elapsed,
        **extra,
        "rows": [asdict(row) for row in rows],
        "missed": [row.key for row in rows if row.status == "MISS"],
        "errors": [row.key for row in rows if row.status == "ERROR"],
        "loop_errors": loop_errors,
        "loadavg_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    try:
        existing: dict[str, Any] = {}
        if path.exists():
            with contextlib.suppress(ValueError):
                loaded = json.loads(path.read_text())
                existing = loaded if isinstance(loaded, dict) else {}
        if key is None:
            existing.update(result)
        else:
            existing[key] = result
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(existing, indent=2) + "\n")
        print(f"results written to {path}" + (f" (key {key!r})" if key else ""))
    except OSError as exc:
        print(f"could not write {path}: {exc}")


if __name__ == "__main__":
    sys.exit(main())
