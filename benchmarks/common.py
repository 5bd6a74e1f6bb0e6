"""What the benchmark suites share: rows, interleaved timing, the table, the JSON results.

Theory of operation
-------------------
This shared machine's absolute figures move by up to 1.5x between runs, so each fedtensor
figure is measured next to its baselines *in the same run*, interleaved with them, and a target
stated as a ratio ("<= 1.5x the echo") is turned by the suite into a figure from the baseline
measured in that run. So one :class:`Row` (fedtensor's figure, its baselines', the target, all
in one unit) serves every suite, and one :func:`render` draws every table. :func:`run_suite`
merges a suite's results into ``benchmarks/results/latest.json``, the in-memory suite's at the
top level and the others under their own key. The programs report; they always exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import datetime
import gc
import importlib.metadata
import inspect
import io
import json
import os
import platform
import pstats
import statistics
import subprocess
import time
import traceback
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import fedtensor as ft
from fedtensor.protocol.messages import Call, Fetch, Message, Ref, Release, Store

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20
BULK_BYTES = 64 * MIB
CHAIN_LENGTH = 10_000
now = time.perf_counter_ns
Timed = Callable[[], Awaitable[int | list[int]]]  # nanoseconds of a call, or of each in a block


@dataclass(frozen=True)
class Config:
    """A suite's repetitions: ``rounds[name]`` timed rounds of each contender of row ``name``
    (a round of a row timed in blocks is ``block`` calls); a row stops past ``budget_s``, after
    3 rounds."""

    quick: bool
    rounds: dict[str, int]
    block: int = 1
    budget_s: float = 0.0

    @staticmethod
    def pick(quick: bool, rounds: dict[str, tuple[int, int]], *block_budget: Any) -> Config:
        """From (quick, full) pairs: ``rounds`` by row, then ``block`` and ``budget_s``."""
        rounds_picked = {name: pair[not quick] for name, pair in rounds.items()}
        return Config(quick, rounds_picked, *(pair[not quick] for pair in block_budget))


@dataclass
class Baseline:
    """A baseline's figure in its row's unit, or why there is none."""

    name: str
    value: float | None = None
    error: str | None = None
    versus: str = ""  # how fedtensor compares with it (Row.finish says, if the suite did not)


@dataclass
class Row:
    """One benchmark: fedtensor's figure, its baselines, its target and status."""

    key: str
    title: str
    unit: str  # "us", "ms", "s", "ops/s" or "GB/s"
    higher_is_better: bool = False
    fedtensor: float | None = None
    baselines: list[Baseline] = field(default_factory=list)
    target: float | None = None  # on `fedtensor`, in `unit`
    target_text: str = "none set"
    ratio: float | None = None  # fedtensor / the first baseline, in the row's unit
    ratio_text: str = ""  # the table's "fedtensor is": the first baseline's `versus` if unset
    status: str = "INFO"  # PASS, MISS, INFO (no target) or ERROR
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def finish(self) -> Row:
        fed, first = self.fedtensor, self.baselines[0].value if self.baselines else None
        for b in self.baselines:
            if not b.versus and fed and b.value:
                slower = b.value / fed if self.higher_is_better else fed / b.value
                b.versus = f"{slower:.2f}x slower" if slower >= 1 else f"{1 / slower:.2f}x faster"
        self.ratio = fed / first if fed is not None and first else None
        self.ratio_text = self.ratio_text or (self.baselines[0].versus if self.baselines else "")
        if self.error is not None:
            self.status = "ERROR"
        elif self.target is not None and fed is not None:
            met = fed >= self.target if self.higher_is_better else fed <= self.target
            self.status = "PASS" if met else "MISS"
        return self


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


async def guarded(key: str, bench: Callable[[], Awaitable[Row | list[Row]]]) -> list[Row]:
    """Run one benchmark; an exception becomes an ERROR row, and the suite runs on."""
    try:
        made = await bench()
    except Exception as exc:
        made = Row(key, key, "", error=error_text(exc), extra={"trace": traceback.format_exc()})
    return [row.finish() for row in (made if isinstance(made, list) else [made])]


async def timed_row(
    row: Row, figure: Callable[[float], float], contenders: Mapping[str, Timed], cfg: Config
) -> Row:
    """``row`` with the ``figure`` (in its unit) of each contender's median nanoseconds:
    fedtensor's first, then its baselines by name, ahead of those ``row`` lists already (that
    could not run). One untimed round first (warm-up), then ``cfg.rounds[row.key]`` rounds of
    one call of each in turn, ``gc.collect()`` before each (no one pays for another's garbage);
    past ``cfg.budget_s``, after 3 rounds, it stops."""
    samples: list[list[int]] = [[] for _ in contenders]
    for contender in contenders.values():
        await contender()
    started, done = now(), 0
    rounds = cfg.rounds[row.key.removesuffix("_encode")]
    while done < rounds and (done < 3 or now() - started < cfg.budget_s * 1e9):
        for contender, sink in zip(contenders.values(), samples, strict=True):
            gc.collect()
            got = await contender()
            sink += got if isinstance(got, list) else [got]
        done += 1
    fed, *others = (figure(statistics.median(sample)) for sample in samples)
    row.fedtensor, names = fed, list(contenders)[1:]
    row.baselines[:0] = [Baseline(n, v) for n, v in zip(names, others, strict=True)]
    return row


async def repeat(op: Callable[[], object], reps: int) -> list[int]:
    """Nanoseconds of each of ``reps`` calls of ``op``, awaited if it returns an awaitable (its
    result is dropped outside the clock)."""
    samples = []
    for _ in range(reps):
        start = now()
        result = op()
        if inspect.isawaitable(result):
            result = await result
        samples.append(now() - start)
        del result
    return samples


def check(value: Any, expected: torch.Tensor, who: str) -> None:
    if not isinstance(value, torch.Tensor) or not torch.equal(value, expected):
        raise AssertionError(f"wrong result from {who}: {value!r}")


async def timed_roundtrips(worker: Any, t: torch.Tensor, reps: int) -> list[int]:
    """Nanoseconds of each of ``reps`` round trips: ``ft.send(t)``, ``+ 1``, ``get()``."""
    samples = []
    for _ in range(reps):
        start = now()
        await (ft.send(t, worker) + 1).get()
        samples.append(now() - start)
    return samples


async def timed_chain(worker: Any, t: torch.Tensor, length: int, *, include_send: bool) -> int:
    """Nanoseconds of ``length`` chained ``x = x + 1`` on ``worker``, then one (checked) get;
    ``include_send``: whether the clock also covers ``ft.send`` of ``t``."""
    start = now()
    x = ft.send(t, worker)
    if not include_send:
        await x  # stored before the clock starts
        gc.collect()
        start = now()
    for _ in range(length):
        x = x + 1
    value = await x.get()
    elapsed = now() - start
    check(value, t + length, "the worker")
    return elapsed


def request_batch() -> list[Message]:
    """A round trip's request as a worker receives it: store 5 elements, add, fetch, release."""
    add = Call(2, "Tensor.__add__", (Ref(1), 1), {})
    return [Store(1, torch.ones(5)), add, Fetch(1, 2, True), Release((1,))]


async def profiled(name: str, workers: Sequence[Any], t: torch.Tensor, top: int) -> str:
    """The ``top`` entries of a cProfile of 3 runs (after 1) of row ``name``'s fedtensor path;
    bulk and fanout send ``t`` to all ``workers`` and get it back (300 times, if it is small)."""
    profiler, bob = cProfile.Profile(), workers[0]

    async def once() -> object:
        if name == "roundtrip":
            return await timed_roundtrips(bob, t, 2000)
        if name in ("chain", "pipelined", "dependent"):
            length, runs = (100, 20) if name == "dependent" else (CHAIN_LENGTH, 1)
            return [await timed_chain(bob, t, length, include_send=True) for _ in range(runs)]
        return [await ft.send(t, *workers).get() for _ in range(300 if t.numel() < 1000 else 1)]

    await once()
    for _ in range(3):
        gc.collect()
        with profiler:
            await once()
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(top)
    return stream.getvalue()


def run_async(coro: Coroutine[Any, Any, Any], uvloop: bool, errors: list[str]) -> tuple[Any, str]:
    """``coro``'s result on a new loop (uvloop's, if asked and installed), and the loop's name;
    what the loop reports goes to ``errors``."""

    async def main() -> Any:
        def handler(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            exc = context.get("exception")
            errors.append(f"{context.get('message')}" + (f" ({error_text(exc)})" if exc else ""))

        asyncio.get_running_loop().set_exception_handler(handler)
        result = await coro
        gc.collect()
        await asyncio.sleep(0)  # stray futures are reported while the handler is installed
        return result

    factory = None
    if uvloop:
        with contextlib.suppress(ImportError):
            import uvloop as uvloop_module

            factory = uvloop_module.new_event_loop
    if factory is None:
        return asyncio.run(main()), "asyncio" + " (uvloop is not installed)" * uvloop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main()), f"uvloop {importlib.metadata.version('uvloop')}"


def fmt(value: float | None, unit: str) -> str:
    spec = {"us": ",.1f", "ms": ",.2f", "s": ",.3f", "ops/s": ",.0f", "GB/s": ".2f"}
    return "-" if value is None else f"{value:{spec.get(unit, '.4g')}} {unit}".rstrip()


def table(header: Sequence[str], lines: Sequence[Sequence[str]], align: str = "") -> str:
    """A markdown table, columns padded; ``align``: "l" or "r" per column (default "lrr...")."""
    align = align or "l" + "r" * (len(header) - 1)
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    columns = list(zip(widths, align, strict=True))

    def cells(values: Sequence[str]) -> str:
        padded = [
            v.ljust(w) if a == "l" else v.rjust(w)
            for v, (w, a) in zip(values, columns, strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = "|".join(":" + "-" * (w + 1) if a == "l" else "-" * (w + 1) + ":" for w, a in columns)
    return "\n".join([cells(header), f"|{rule}|", *map(cells, lines)]) + "\n"


def render(rows: Sequence[Row]) -> str:
    """The rows as one table (a line per baseline), then what is unavailable or missed."""
    lines = []
    for r in rows:
        first, *more = r.baselines or [Baseline("")]
        value = "unavailable" if first.error else fmt(first.value, r.unit) if first.name else ""
        fed, name = ("ERROR", r.error[:120]) if r.error else (fmt(r.fedtensor, r.unit), first.name)
        lines.append([r.title, fed, name, value, r.ratio_text, r.target_text, r.status])
        for b in more:
            value = "unavailable" if b.error else fmt(b.value, r.unit)
            lines.append(["", "", b.name, value, b.versus, "", ""])
    header = ["benchmark", "fedtensor", "baseline", "value", "fedtensor is", "target", "status"]
    missed = "; ".join(r.title for r in rows if r.status in ("MISS", "ERROR")) or "none"
    unavailable = sorted({b.error for r in rows for b in r.baselines if b.error})
    return (
        table(header, lines, "lrlrrll")
        + "".join(f"baseline unavailable: {reason}\n" for reason in unavailable)
        + f"missed targets / errors: {missed}\n"
    )


def _cpu_seconds() -> tuple[float, float]:
    """CPU seconds the machine spent busy since boot (Linux), and this process with its
    children that have ended (the suites' helper processes)."""
    ticks = [int(n) for n in Path("/proc/stat").read_text().split()[1:8]]
    busy = sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait
    return busy / os.sysconf("SC_CLK_TCK"), sum(os.times()[:4])


def run_suite(
    args: argparse.Namespace,
    key: str,
    config: Any,
    suite: Callable[[dict[str, Any]], Coroutine[Any, Any, list[Row]]],
    notes: Callable[[list[Row], dict[str, Any]], str] = lambda rows, env: "",
) -> int:
    """Run ``suite(env)`` (``env``: its record of the run, saved too), print its table and
    ``notes``, and merge the results into ``args.json`` (the in-memory suite's at the top)."""
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    versions = {name: importlib.metadata.version(name) for name in ("torch", "websockets")}
    env: dict[str, Any] = {"loop_errors": []}
    cpus = len(os.sched_getaffinity(0))
    started, (busy_before, ours_before) = time.perf_counter(), _cpu_seconds()
    load, mode = os.getloadavg(), "quick" if args.quick else "full"
    rows, label = run_async(guarded(key, lambda: suite(env)), args.uvloop, env["loop_errors"])
    elapsed, (busy, ours) = time.perf_counter() - started, _cpu_seconds()
    others = max(0.0, busy - busy_before - (ours - ours_before)) / (elapsed * cpus)
    print(
        f"fedtensor {key} benchmarks ({mode} run) on {label}, python {platform.python_version()}"
        f", torch {versions['torch']} ({torch.get_num_threads()} threads), websockets "
        f"{versions['websockets']}, {cpus} CPUs, load average "
        f"{load[0]:.2f}: other processes skew every figure, compare ratios\n\n"
        + render(rows)
        + notes(rows, env)
        + f"event-loop errors: {len(env['loop_errors'])}; total time {elapsed:.1f} s, other "
        f"processes took {100 * others:.0f}% of the CPUs"
        + (" (a busy machine: figures skewed)" if others > 0.05 else "")
    )
    result = {
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "mode": mode,
        "machine": {"cpus": cpus, "platform": platform.platform(), "commit": git.stdout.strip()},
        "versions": versions | {"fedtensor": ft.__version__, "event_loop": label},
        "config": asdict(config),
        "elapsed_s": elapsed,
        "loadavg_at_start": load,
        "others_cpu_share": others,
        "env": env,
        "rows": [asdict(row) for row in rows],  # ratio = fedtensor / the first baseline
    }
    path: Path = args.json
    merged: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError, TypeError):  # none yet, or not ours
        merged = dict(json.loads(path.read_text()))
    merged.update(result if key == "memory" else {key: result})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(merged, indent=2, default=str) + "\n")
        print(f"results written to {path}" + ("" if key == "memory" else f" (key {key!r})"))
    except OSError as exc:
        print(f"could not write {path}: {exc}")
    return 0
