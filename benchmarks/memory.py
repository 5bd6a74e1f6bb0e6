"""The in-memory suite: virtual workers, next to the same work done with plain local torch.

1. round trip: ``ft.send`` of 5 elements, a remote add, ``get`` (us); local: clone + add.
2. pipelined: 10,000 chained ``x = x + 1`` on a pointer, then one ``get`` (ops/s).
3. bulk: ``ft.send`` + ``get`` of 64 MiB float32 (GB/s = 67,108,864 bytes / time, GB = 1e9
   bytes); local: ``clone``. Rows 1-3 again on ``encode=True`` workers (the wire format's cost).
4. fan-out: ``ft.send(t, *workers)`` + ``get`` of 16 MiB to 1, 2, 4 and 8 workers (ms).
5. open 10,000 ``ft.VirtualWorker`` s, then close them in opening order (s), against 1,000;
   again with the cycle collector paused (what the runtime itself costs).
6. a worker's ``decode_frame`` of a round trip's request frame (us), against ``cbor2.loads`` of
   the same bytes and, with ``--compare-codec PATH``, an older ``codec.py`` (imported by path,
   on its own frame of the same messages), whose figure then sets the target.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
import torch

import fedtensor as ft
from benchmarks import common
from benchmarks.common import BULK_BYTES, CHAIN_LENGTH, Baseline, Config, Row, Timed, check, now
from fedtensor.protocol import codec
from fedtensor.protocol.messages import Store

FANOUT_BYTES = 16 * common.MIB
FEW_WORKERS, MANY_WORKERS = 1_000, 10_000
DECODES_PER_SAMPLE = 100
PREVIOUS_DECODE_US = 19.5  # the decoder of commit eb7f04f on this machine (README)
TARGET_ROUNDTRIP_US = 30.0
TARGET_CHAIN_OPS = 50_000.0
TARGET_BULK_GBPS = 1.5
TARGET_WORKERS_TIME_FACTOR = 15.0
TARGET_DECODE_SPEEDUP = 3.0


def _worker(name: str, encode: bool = False) -> ft.VirtualWorker:
    return ft.VirtualWorker(f"bench-{name}{'-enc' * encode}", encode=encode, timeout=60.0)


async def _timed_row(row: Row, encode: bool, figure: Callable[[float], float], *args: Any) -> Row:
    """Rows 1-3; on encoding workers without a target (the targets are the in-memory path's)."""
    if encode:
        row.key, row.title, row.target = f"{row.key}_encode", f"{row.title} [encode]", None
        row.target_text = "report only"
    return await common.timed_row(row, figure, *args)


async def bench_roundtrip(cfg: Config, encode: bool) -> Row:
    row = Row("roundtrip", "round trip: send 5 elems + add + get", "us")
    row.target, row.target_text = TARGET_ROUNDTRIP_US, f"<= {TARGET_ROUNDTRIP_US:g} us"
    t, reps = torch.tensor([1, 2, 3, 4, 5]), cfg.block

    async def local_block() -> list[int]:  # as tight a loop as fedtensor's
        samples = []
        for _ in range(reps):
            start = now()
            torch.add(t.clone(), 1)
            samples.append(now() - start)
        return samples

    async with _worker("roundtrip", encode) as worker:
        check(await (ft.send(t, worker) + 1).get(), t + 1, worker.id)
        fedtensor = functools.partial(common.timed_roundtrips, worker, t, reps)
        contenders: dict[str, Timed] = {"fedtensor": fedtensor, "local clone + add": local_block}
        us = lambda ns: ns / 1e3  # noqa: E731
        return await _timed_row(row, encode, us, contenders, cfg)


async def bench_chain(cfg: Config, encode: bool) -> Row:
    row = Row("chain", f"pipelined: {CHAIN_LENGTH:,} chained adds + get", "ops/s", True)
    row.target, row.target_text = TARGET_CHAIN_OPS, f">= {TARGET_CHAIN_OPS:,.0f} ops/s"
    t = torch.zeros(5)

    def local() -> torch.Tensor:
        x = t
        for _ in range(CHAIN_LENGTH):
            x = x + 1
        return x

    async with _worker("chain", encode) as worker:
        chain = functools.partial(common.timed_chain, worker, t, CHAIN_LENGTH, include_send=False)
        contenders = {"fedtensor": chain, "local adds": functools.partial(common.repeat, local, 1)}
        ops_per_s = lambda ns: CHAIN_LENGTH / (ns / 1e9)  # noqa: E731
        return await _timed_row(row, encode, ops_per_s, contenders, cfg)


def _send_get(t: torch.Tensor, workers: list[ft.VirtualWorker]) -> Timed:
    return functools.partial(common.repeat, lambda: ft.send(t, *workers).get(), 1)


def _clones(t: torch.Tensor, n: int) -> Timed:
    return functools.partial(common.repeat, lambda: [t.clone() for _ in range(n)], 1)


async def bench_bulk(cfg: Config, encode: bool) -> Row:
    row = Row("bulk", "send + get 64 MiB float32", "GB/s", True)
    row.target, row.target_text = TARGET_BULK_GBPS, f">= {TARGET_BULK_GBPS:g} GB/s"
    t = torch.arange(BULK_BYTES // 4, dtype=torch.float32)
    async with _worker("bulk", encode) as worker:
        check(await ft.send(t, worker).get(), t, worker.id)
        contenders = {"fedtensor": _send_get(t, [worker]), "local clone": _clones(t, 1)}
        gb_per_s = lambda ns: BULK_BYTES / ns  # noqa: E731  (bytes/ns == GB/s)
        return await _timed_row(row, encode, gb_per_s, contenders, cfg)


async def bench_fanout(cfg: Config) -> list[Row]:
    t, rows = torch.arange(FANOUT_BYTES // 4, dtype=torch.float32), []
    async with contextlib.AsyncExitStack() as stack:
        workers = [await stack.enter_async_context(_worker(f"fanout{i}")) for i in range(8)]
        for n in (1, 2, 4, 8):
            values = await ft.send(t, *workers[:n]).get()
            for value in [values] if n == 1 else values:
                check(value, t, f"fan-out to {n}")
            del values
            row = Row("fanout", f"fan-out 16 MiB to {n} worker{'s' * (n > 1)}", "ms")
            contenders = {
                "fedtensor": _send_get(t, workers[:n]),
                f"local {n} x clone": _clones(t, n),
            }
            await common.timed_row(row, lambda ns: ns / 1e6, contenders, cfg)
            row.key = f"fanout_{n}"
            rows.append(row.finish())
    for row in rows:  # how it scales: against fedtensor to one worker
        row.extra["vs_1_worker"] = (row.fedtensor or 0) / (rows[0].fedtensor or 1)
        row.ratio_text += f"; {row.extra['vs_1_worker']:.2f}x of 1 worker"
    return rows


async def _open_close(n: int, prefix: str, *, collector: bool = True) -> int:
    """Nanoseconds to open ``n`` virtual workers, then close them in opening order;
    ``collector=False``: with Python's cycle collector paused meanwhile."""
    workers: list[ft.VirtualWorker] = []
    if not collector:
        gc.disable()
    try:
        start = now()
        for i in range(n):
            workers.append(await ft.VirtualWorker(f"{prefix}-{i}").start())
        for worker in workers:
            await worker.aclose()
        return now() - start
    finally:
        gc.enable()
        for worker in workers:  # after a failure: aclose() is idempotent
            await worker.aclose()


async def bench_virtual_workers(cfg: Config, collector: bool) -> Row:
    suffix = "" if collector else ", cycle collector paused"
    key = "virtual_workers" + ("" if collector else "_nogc")
    row = Row(key, f"open + close {MANY_WORKERS:,} virtual workers{suffix}", "s")
    contenders = {
        "fedtensor": functools.partial(_open_close, MANY_WORKERS, "many", collector=collector),
        f"{FEW_WORKERS:,} virtual workers": functools.partial(
            _open_close, FEW_WORKERS, "few", collector=collector
        ),
    }
    await common.timed_row(row, lambda ns: ns / 1e9, contenders, cfg)
    few = row.baselines[0].value or 1.0
    row.target = TARGET_WORKERS_TIME_FACTOR * few
    row.target_text = f"10x workers in <= {TARGET_WORKERS_TIME_FACTOR:g}x time"
    row.ratio_text = f"{(row.fedtensor or 0) / few:.1f}x the time of {FEW_WORKERS:,}"
    return row


def import_codec(path: Path) -> Any:
    """An older ``codec.py``, imported by path beside the current one (same message classes)."""
    spec = importlib.util.spec_from_file_location("benchmarks_compared_codec", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules["benchmarks_compared_codec"] = module  # where dataclasses look their module up
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _decodes(decode: Callable[[Any], object], frame: Any) -> Timed:
    async def sample() -> int:  # nanoseconds per decode, over a block of them
        start = now()
        for _ in range(DECODES_PER_SAMPLE):
            decode(frame)
        return (now() - start) // DECODES_PER_SAMPLE

    return sample


def _decodes_of(module: Any) -> Timed:
    """Samples of ``module``'s decode of its own frame of the request, once checked."""
    batch = common.request_batch()
    frame = module.frame_bytes(batch)
    decoded = module.decode_frame(frame)
    if [type(m) for m in decoded] != [type(m) for m in batch] or not isinstance(decoded[0], Store):
        raise AssertionError(f"{module.__name__} decoded {decoded!r}")
    check(decoded[0].value, torch.ones(5), module.__name__)
    return _decodes(module.decode_frame, frame)


async def bench_decode(cfg: Config, compare_codec: Path | None) -> Row:
    row = Row("decode", "worker decode of a 4-command request frame", "us")
    frame = bytes(codec.frame_bytes(common.request_batch()))
    loads: Callable[[bytes], object] = cbor2.loads
    try:
        loads(frame)
    except Exception:  # a tag it cannot build: the CBOR item, with its tags left as they are
        loads = functools.partial(cbor2.loads, tag_hook=lambda _decoder, tag: tag)
    contenders = {
        "fedtensor": _decodes_of(codec),
        "cbor2.loads, same bytes": _decodes(loads, frame),
    }
    old = f"previous codec ({compare_codec})"
    if compare_codec is not None:
        try:
            contenders[old] = _decodes_of(import_codec(compare_codec))
        except Exception as exc:
            row.baselines.append(Baseline(old, error=f"{old}: {common.error_text(exc)}"))
    await common.timed_row(row, lambda ns: ns / 1e3, contenders, cfg)
    previous = next((b.value for b in row.baselines if b.name == old and b.value), None)
    row.target = (previous or PREVIOUS_DECODE_US) / TARGET_DECODE_SPEEDUP
    where = f"{previous:.1f} us in this run" if previous else f"{PREVIOUS_DECODE_US} us, README"
    row.target_text = f">= {TARGET_DECODE_SPEEDUP:g}x faster than previous ({where})"
    row.extra["frame_bytes"] = len(frame)
    return row


async def run_memory(cfg: Config, compare_codec: Path | None) -> list[Row]:
    rows: list[Row] = []
    for encode in (False, True):
        for bench in (bench_roundtrip, bench_chain, bench_bulk):
            key = bench.__name__.removeprefix("bench_") + "_encode" * encode
            rows += await common.guarded(key, functools.partial(bench, cfg, encode))
    rows += await common.guarded("fanout", functools.partial(bench_fanout, cfg))
    for collector in (True, False):
        key = "virtual_workers" + ("" if collector else "_nogc")
        rows += await common.guarded(key, functools.partial(bench_virtual_workers, cfg, collector))
    return rows + await common.guarded(
        "decode", functools.partial(bench_decode, cfg, compare_codec)
    )


def run_from_args(args: argparse.Namespace) -> int:
    rounds = {"roundtrip": (2, 10), "chain": (3, 9), "bulk": (3, 15), "fanout": (3, 15)}
    rounds |= {"virtual_workers": (1, 3), "virtual_workers_nogc": (1, 3), "decode": (30, 300)}
    cfg = Config.pick(args.quick, rounds, (150, 500), (3.0, 15.0))
    return common.run_suite(args, "memory", cfg, lambda env: run_memory(cfg, args.compare_codec))


def profile_row(name: str, encode: bool, use_uvloop: bool, top: int) -> str:
    """A cProfile of one row's fedtensor path (see :func:`benchmarks.common.profiled`)."""
    t = torch.arange({"bulk": BULK_BYTES, "fanout": FANOUT_BYTES}.get(name, 20) // 4) * 1.0

    async def run() -> str:
        async with contextlib.AsyncExitStack() as stack:
            count = 8 if name == "fanout" else 1
            workers = [
                await stack.enter_async_context(_worker(f"p{i}", encode)) for i in range(count)
            ]
            return await common.profiled(name, workers, t, top)

    text, label = common.run_async(run(), use_uvloop, [])
    return f"cProfile of {name}{' [encode]' * encode} on {label}\n{text}"
