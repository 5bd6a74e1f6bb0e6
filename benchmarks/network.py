"""fedtensor over the network, next to raw websockets and torch.distributed.rpc.

Run from the repository root::

    python -m benchmarks --network            # full run (~1-2 minutes on 2 cores)
    python -m benchmarks --network --quick    # smoke run (~30 s)
    python -m benchmarks.network profile roundtrip [--server] [--top 25]
    python -m benchmarks.network idle-cost    # Python right after a wait, vs hot

Every party is a separate process on 127.0.0.1, started and stopped by the benchmark:
eight ``fedtensor worker`` processes (:func:`fedtensor.testing.start_worker_process`), eight
websockets echo servers (``python -m benchmarks.network echo``) and a torch.distributed.rpc
peer (``python -m benchmarks.network rpc-peer PORT``; this process is rpc rank 0, TensorPipe
backend, world size 2). Each row is measured in one run, fedtensor interleaved with its
baselines, ``gc.collect()`` before every timed block, after a warm-up; figures are medians.

Rows:

1. round trip: ``ft.send`` of a 5-element tensor, a remote add, ``await get()`` (median us);
   baselines: a 32-byte websockets echo (compression=None) and ``rpc_sync(torch.add)``.
   Target: <= 1.3 x the echo and below torch.rpc.
2. pipelined: 10,000 chained remote adds, then one get (ops/s); baseline: 10,000
   ``rpc_async(torch.add)`` then waiting for all (calls/s). Target: >= 20,000 ops/s.
3. bulk: ``ft.send`` + ``await get()`` of 64 MiB float32; GB/s = 64 MiB / round trip
   (GB = 1e9 bytes). Baselines: ``rpc.remote(identity, t).to_here()`` and
   ``rpc_sync(identity, t)``. Target: at least the ``remote()`` + ``to_here()`` figure.
4. dependent chain: ``ft.send`` + 100 dependent adds + get (ms); baseline: ``rpc.remote``
   of the tensor, 100 dependent ``remote()`` calls each given the previous RRef (the owner
   resolves it with ``local_value()``), then ``to_here()``. Target: <= 10 ms.
5. fan-out: ``ft.send(t, *workers)`` + ``await m.get()`` of 5 elements to 8 worker
   processes vs to 1 (median ms). Target: 8 workers <= 2 x 1 worker. For scale, the same
   for a 32-byte websockets echo to 8 echo processes vs 1 (a bare websocket's own ratio here).

torch.distributed's start-up exchanges device maps with ``all_gather_object``, which
reads bytes through numpy; numpy is not installed here, so both rpc processes replace that
one helper (``distributed_c10d._tensor_to_object``) with a numpy-free equivalent. Nothing
timed goes through it. If rpc still cannot start, its baselines are reported unavailable,
with the reason, and the rows run on.
"""

# ruff: noqa: E402  (the imports follow the sys.path set-up on purpose)
from __future__ import annotations

import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

#: What a helper process prints (then its address, if any) once it serves.
READY = "benchmarks.network ready"


def _exit_when_orphaned() -> None:
    """In a helper: exit as soon as the benchmark closes our stdin (or dies)."""
    import os
    import threading

    def watch() -> None:
        sys.stdin.read()
        os._exit(0)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


def echo_role() -> None:
    """``python -m benchmarks.network echo``: a websockets echo server on a free port.

    Defined ahead of the heavy imports and run without them: eight of these start at
    once next to eight workers, and none needs torch.
    """
    import asyncio
    import signal

    from websockets.asyncio.server import ServerConnection, serve

    async def echo(connection: ServerConnection) -> None:
        async for message in connection:
            await connection.send(message)

    async def run() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        async with serve(echo, "127.0.0.1", 0, compression=None) as server:
            port = server.sockets[0].getsockname()[1]
            print(f"{READY} ws://127.0.0.1:{port}", flush=True)
            await stop.wait()

    _exit_when_orphaned()
    asyncio.run(run())


if __name__ == "__main__" and sys.argv[1:] == ["echo"]:
    echo_role()
    sys.exit(0)

import argparse
import asyncio
import contextlib
import cProfile
import functools
import gc
import importlib.metadata
import io
import os
import pstats
import queue
import selectors
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass
from typing import IO, Any, TypeVar

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
# torch.distributed warns about its own use of Gloo while init_rpc exchanges device maps.
warnings.filterwarnings("ignore", message="You are using a Backend")

import torch
import torch.distributed.distributed_c10d as c10d
import torch.distributed.rpc as rpc
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect

import fedtensor as ft
from benchmarks.run import (
    BULK_BYTES,
    CHAIN_LENGTH,
    Row,
    Stats,
    _error_text,
    _fmt,
    _fmt_load,
    _guarded,
    _now,
    _run,
    machine_facts,
    report,
    timed_chain,
    timed_roundtrips,
)
from fedtensor.testing import WorkerProcess, start_worker_process

__all__ = ["NetConfig", "main", "run_from_args"]

T = TypeVar("T")

_WEBSOCKETS_VERSION = importlib.metadata.version("websockets")

FANOUT_PROCESSES = 8
DEPENDENT_OPS = 100
ECHO_BYTES = 32

TARGET_ECHO_FACTOR = 1.3
TARGET_PIPELINED_OPS = 20_000.0
TARGET_DEPENDENT_MS = 10.0
TARGET_FANOUT_FACTOR = 2.0

START_TIMEOUT_S = 90.0
RPC_TIMEOUT_S = 60.0


# -- configuration ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class NetConfig:
    """Repetitions per row; a row stops repeating past ``row_budget_s`` (after 3 reps)."""

    quick: bool
    warmup: int  # rows 1 and 5: untimed round trips per contender first
    blocks: int  # rows 1 and 5: blocks per contender, interleaved
    block_reps: int  # rows 1 and 5: round trips per block
    pipelined_runs: int  # row 2
    bulk_reps: int  # row 3
    dependent_reps: int  # row 4
    row_budget_s: float

    @staticmethod
    def make(quick: bool) -> NetConfig:
        if quick:
            return NetConfig(True, 100, 3, 100, 3, 3, 10, 6.0)
        return NetConfig(False, 300, 10, 300, 9, 11, 41, 25.0)


@dataclass
class Baseline:
    """One baseline figure of a row, in the row's unit, or why there is none."""

    name: str
    value: float | None = None
    stats: Stats | None = None
    error: str | None = None
    versus: str = ""  # how fedtensor compares with it


def _versus(fed: float | None, base: float | None, higher_is_better: bool) -> str:
    """``'2.1x slower'`` / ``'1.4x faster'``: fedtensor against a baseline."""
    if fed is None or base is None or fed <= 0 or base <= 0:
        return ""
    slowdown = base / fed if higher_is_better else fed / base
    return f"{slowdown:.2f}x slower" if slowdown >= 1 else f"{1 / slowdown:.2f}x faster"


def _finish(row: Row, baselines: list[Baseline]) -> None:
    """Set the row's baseline (the first one), ratios, texts and status."""
    for baseline in baselines:
        baseline.versus = _versus(row.fedtensor, baseline.value, row.higher_is_better)
    row.extra["baselines"] = baselines
    if baselines:
        row.local, row.local_stats = baselines[0].value, baselines[0].stats
    row.finish()
    row.ratio_text = baselines[0].versus if baselines else ""


# -- helper processes ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Helper:
    """A ``python -m benchmarks.network ROLE`` process; it exits when our stdin pipe closes."""

    def __init__(self, name: str, process: subprocess.Popen[str], log: IO[str]) -> None:
        self.name = name
        self.process = process
        self._log = log
        self.address = ""

    @staticmethod
    def spawn(name: str, *args: str) -> Helper:
        log = tempfile.TemporaryFile("w+", prefix=f"fedtensor-bench-{name}-")  # noqa: SIM115
        process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.network", *args],
            cwd=_REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env={**os.environ, "PYTHONPATH": str(_REPO)},
        )
        return Helper(name, process, log)

    def wait_ready(self, timeout: float) -> str:
        """Block until the ready line; the address it names (may be empty)."""
        stdout = self.process.stdout
        assert stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(stdout, selectors.EVENT_READ)
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    raise TimeoutError(f"{self.name} not ready in {timeout:g} s: {self.log()}")
                line = stdout.readline()
                if not line:
                    self.process.wait(10)
                    raise RuntimeError(
                        f"{self.name} exited with {self.process.returncode}: {self.log()}"
                    )
                if line.startswith(READY):
                    self.address = line[len(READY) :].strip()
                    return self.address

    def log(self, tail: int = 600) -> str:
        if self._log.closed:
            return ""
        self._log.seek(0)
        return self._log.read()[-tail:].strip() or "(no output)"

    def stop(self, timeout: float = 15.0) -> None:
        """Close its stdin (it exits), then SIGTERM, then SIGKILL."""
        process = self.process
        with contextlib.suppress(OSError):
            if process.stdin is not None:
                process.stdin.close()
        for action in (None, process.terminate, process.kill):
            if action is not None and process.poll() is None:
                action()
            try:
                process.wait(timeout if action is not process.kill else 30)
                break
            except subprocess.TimeoutExpired:
                continue
        if process.stdout is not None:
            process.stdout.close()
        self._log.close()


async def _threaded(
    fn: Callable[[], T], timeout: float, what: str, abort: Callable[[], str | None] | None = None
) -> T:
    """Run blocking ``fn`` on a daemon thread (a hung one cannot block exit); await it.

    ``abort`` is polled meanwhile: a reason it returns ends the wait early.
    """
    results: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            results.append(fn())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name=f"bench-{what}", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while thread.is_alive():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not done after {timeout:g} s")
        reason = abort() if abort is not None else None
        if reason is not None:
            raise RuntimeError(f"{what}: {reason}")
        await asyncio.sleep(0.02)
    if errors:
        raise errors[0]
    return results[0]


def _last_cpu(pid: int) -> int | None:
    """The CPU ``pid`` last ran on (Linux ``/proc``), for the record."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[36])
    except (OSError, IndexError, ValueError):
        return None


# -- helper roles: websockets echo server and torch.rpc peer ---------------------------------------


def _tensor_to_object(tensor: torch.Tensor, tensor_size: Any, group: Any) -> Any:
    """``distributed_c10d._tensor_to_object`` without numpy (start-up device maps only)."""
    data = bytes(tensor.cpu()[: int(tensor_size)].tolist())
    return c10d._unpickler(io.BytesIO(data)).load()


def _rpc_init(name: str, rank: int, port: int) -> None:
    c10d._tensor_to_object = _tensor_to_object
    options = rpc.TensorPipeRpcBackendOptions(
        init_method=f"tcp://127.0.0.1:{port}", rpc_timeout=RPC_TIMEOUT_S
    )
    rpc.init_rpc(name, rank=rank, world_size=2, rpc_backend_options=options)  # type: ignore[no-untyped-call]


def _rpc_peer(port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    _exit_when_orphaned()
    _rpc_init("peer", 1, port)
    print(READY, flush=True)
    rpc.shutdown()  # waits for rank 0 to shut down too


def rpc_identity(t: torch.Tensor) -> torch.Tensor:
    """Runs on the rpc peer: the tensor itself."""
    return t


def rpc_add_owned(previous: rpc.RRef[torch.Tensor], k: int) -> torch.Tensor:
    """Runs on the rpc peer, which owns ``previous``: resolved locally, no round trip."""
    value: torch.Tensor = previous.local_value()
    return value + k


class RpcBaseline:
    """This process as torch.distributed.rpc rank 0, with the peer as rank 1."""

    def __init__(self) -> None:
        self.peer: Helper | None = None
        self.error: str | None = None
        self._initialized = False

    async def start(self) -> None:
        """Start the peer and join it; on failure set ``error`` (never raises)."""
        try:
            port = _free_port()
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            self.peer = Helper.spawn("rpc-peer", "rpc-peer", str(port))
            await _threaded(
                lambda: _rpc_init("bench", 0, port), START_TIMEOUT_S, "init_rpc", self._peer_gone
            )
            self._initialized = True
            await _threaded(lambda: self._ready(), 30.0, "rpc peer ready")
        except Exception as exc:
            log = self.peer.log() if self.peer is not None else ""
            self.error = f"torch.distributed.rpc did not start: {_error_text(exc)}"
            if log and log != "(no output)":
                self.error += f" (peer: {log[-300:]})"

    def _peer_gone(self) -> str | None:
        if self.peer is None or self.peer.process.poll() is None:
            return None
        return f"the rpc peer exited with status {self.peer.process.returncode}"

    def _ready(self) -> str:
        assert self.peer is not None
        return self.peer.wait_ready(30.0)

    @property
    def available(self) -> bool:
        return self._initialized and self.error is None

    async def stop(self) -> None:
        if self._initialized:
            self._initialized = False
            try:
                await _threaded(rpc.shutdown, 30.0, "rpc.shutdown")
            except Exception as exc:
                self.error = self.error or f"rpc.shutdown failed: {_error_text(exc)}"
        if self.peer is not None:
            await _threaded(self.peer.stop, 90.0, "stop rpc peer")

    def unavailable(self, name: str) -> Baseline:
        return Baseline(name, error=self.error or "torch.distributed.rpc is not running")


# -- timing helpers --------------------------------------------------------------------------------


async def _interleaved(
    contenders: Sequence[Callable[[], Awaitable[int]]], reps: int, budget_s: float
) -> list[list[int]]:
    """Time each contender in turn, ``gc.collect()`` before each call, ``reps`` rounds."""
    samples: list[list[int]] = [[] for _ in contenders]
    started = _now()
    rounds = 0
    while rounds < reps and (rounds < 3 or _now() - started < budget_s * 1e9):
        for contender, sink in zip(contenders, samples, strict=True):
            gc.collect()
            sink.append(await contender())
        rounds += 1
    return samples


def _sync(fn: Callable[[], int]) -> Callable[[], Awaitable[int]]:
    async def run() -> int:
        return fn()

    return run


# -- row 1: small-op round trip --------------------------------------------------------------------


async def _echo_roundtrips(ws: ClientConnection, payload: bytes, reps: int) -> list[int]:
    samples: list[int] = []
    now = _now
    for _ in range(reps):
        start = now()
        await ws.send(payload)
        await ws.recv()
        samples.append(now() - start)
    return samples


def _rpc_roundtrips(t: torch.Tensor, reps: int) -> list[int]:
    samples: list[int] = []
    now = _now
    for _ in range(reps):
        start = now()
        rpc.rpc_sync("peer", torch.add, args=(t, 1))
        samples.append(now() - start)
    return samples


async def bench_roundtrip(
    cfg: NetConfig, worker: Any, echo: ClientConnection, rpcb: RpcBaseline, env: dict[str, Any]
) -> Row:
    row = Row(
        key="ws_roundtrip",
        title="1 round trip: send 5 elems + add + get",
        unit="us",
        higher_is_better=False,
    )
    t = torch.tensor([1, 2, 3, 4, 5])
    payload = b"x" * ECHO_BYTES
    if not torch.equal(await (ft.send(t, worker) + 1).get(), t + 1):
        raise AssertionError("wrong result from the worker")
    await echo.send(payload)
    if await echo.recv() != payload:
        raise AssertionError("the echo server sent something else")
    use_rpc = rpcb.available
    if use_rpc and not torch.equal(rpc.rpc_sync("peer", torch.add, args=(t, 1)), t + 1):
        raise AssertionError("wrong result from torch.rpc")
    await timed_roundtrips(worker, t, cfg.warmup)
    await _echo_roundtrips(echo, payload, cfg.warmup)
    if use_rpc:
        _rpc_roundtrips(t, cfg.warmup)
    fed: list[int] = []
    raw: list[int] = []
    via_rpc: list[int] = []
    started = _now()
    for block in range(cfg.blocks):
        if block and _now() - started > cfg.row_budget_s * 1e9:
            break
        gc.collect()
        fed += await timed_roundtrips(worker, t, cfg.block_reps)
        gc.collect()
        raw += await _echo_roundtrips(echo, payload, cfg.block_reps)
        if use_rpc:
            gc.collect()
            via_rpc += _rpc_roundtrips(t, cfg.block_reps)
    row.fedtensor_stats = Stats.of(fed)
    row.fedtensor = row.fedtensor_stats.median_ns / 1e3
    echo_stats = Stats.of(raw)
    baselines = [
        Baseline("websockets echo, 32 B", echo_stats.median_ns / 1e3, echo_stats),
    ]
    echo_target = TARGET_ECHO_FACTOR * echo_stats.median_ns / 1e3
    if via_rpc:
        rpc_stats = Stats.of(via_rpc)
        rpc_us = rpc_stats.median_ns / 1e3
        baselines.append(Baseline("torch.rpc rpc_sync(torch.add)", rpc_us, rpc_stats))
        row.target = min(echo_target, rpc_us)
        row.target_text = f"<= {row.target:,.0f} us (1.3x echo, < rpc)"
    else:
        baselines.append(rpcb.unavailable("torch.rpc rpc_sync(torch.add)"))
        row.target = echo_target
        row.target_text = f"<= {echo_target:,.0f} us (1.3x echo; rpc n/a)"
    row.extra["definition"] = (
        "median us of (ft.send(5 elems) + x + 1 + await get()) to a worker process; "
        f"echo: send {ECHO_BYTES} bytes + recv on one websockets connection "
        "(compression=None) to an echo process; rpc: rpc_sync('peer', torch.add, (t, 1))"
    )
    row.extra["last_cpu"] = {name: _last_cpu(pid) for name, pid in env["pids"].items()}
    _finish(row, baselines)
    return row


# -- row 2: pipelined throughput -------------------------------------------------------------------


async def bench_pipelined(cfg: NetConfig, worker: Any, rpcb: RpcBaseline) -> Row:
    row = Row(
        key="ws_pipelined",
        title=f"2 pipelined: {CHAIN_LENGTH:,} chained adds + get",
        unit="ops/s",
        higher_is_better=True,
        target=TARGET_PIPELINED_OPS,
        target_text=f">= {TARGET_PIPELINED_OPS:,.0f} ops/s",
    )
    t = torch.zeros(5)

    async def fed() -> int:
        return await timed_chain(worker, t, CHAIN_LENGTH, include_send=False)

    def via_rpc() -> int:
        start = _now()
        futures = [rpc.rpc_async("peer", torch.add, args=(t, 1)) for _ in range(CHAIN_LENGTH)]
        torch.futures.wait_all(futures)
        elapsed = _now() - start
        if not torch.equal(futures[-1].value(), t + 1):
            raise AssertionError("wrong result from torch.rpc")
        return elapsed

    contenders = [fed, _sync(via_rpc)] if rpcb.available else [fed]
    for contender in contenders:  # warm-up
        await contender()
    samples = await _interleaved(contenders, cfg.pipelined_runs, cfg.row_budget_s)
    row.fedtensor_stats = Stats.of(samples[0])
    row.fedtensor = CHAIN_LENGTH / (row.fedtensor_stats.median_ns / 1e9)
    name = f"torch.rpc {CHAIN_LENGTH:,} x rpc_async(add)"
    if rpcb.available:
        stats = Stats.of(samples[1])
        baseline = Baseline(name, CHAIN_LENGTH / (stats.median_ns / 1e9), stats)
    else:
        baseline = rpcb.unavailable(name)
    row.extra["definition"] = (
        f"{CHAIN_LENGTH} / median time of (x = x + 1, {CHAIN_LENGTH} times, + await get()); "
        f"rpc: {CHAIN_LENGTH} / median time of ({CHAIN_LENGTH} rpc_async(torch.add) + wait_all)"
    )
    _finish(row, [baseline])
    return row


# -- row 3: bulk round trip ------------------------------------------------------------------------


async def bench_bulk(cfg: NetConfig, worker: Any, rpcb: RpcBaseline) -> Row:
    row = Row(
        key="ws_bulk",
        title="3 send + get 64 MiB float32",
        unit="GB/s",
        higher_is_better=True,
    )
    t = torch.arange(BULK_BYTES // 4, dtype=torch.float32)

    async def fed() -> int:
        start = _now()
        value = await ft.send(t, worker).get()
        elapsed = _now() - start
        del value
        return elapsed

    def remote_to_here() -> int:
        start = _now()
        value = rpc.remote("peer", rpc_identity, args=(t,)).to_here()
        elapsed = _now() - start
        del value
        return elapsed

    def rpc_sync_identity() -> int:
        start = _now()
        value = rpc.rpc_sync("peer", rpc_identity, args=(t,))
        elapsed = _now() - start
        del value
        return elapsed

    if not torch.equal(await ft.send(t, worker).get(), t):
        raise AssertionError("64 MiB came back different from the worker")
    contenders: list[Callable[[], Awaitable[int]]] = [fed]
    if rpcb.available:
        if not torch.equal(rpc.remote("peer", rpc_identity, args=(t,)).to_here(), t):
            raise AssertionError("64 MiB came back different from torch.rpc")
        contenders += [_sync(remote_to_here), _sync(rpc_sync_identity)]
    samples = await _interleaved(contenders, cfg.bulk_reps, cfg.row_budget_s)
    row.fedtensor_stats = Stats.of(samples[0])
    row.fedtensor = BULK_BYTES / row.fedtensor_stats.median_ns  # bytes/ns == GB/s
    names = ("torch.rpc remote(id).to_here()", "torch.rpc rpc_sync(id, t)")
    if rpcb.available:
        baselines = []
        for name, sample in zip(names, samples[1:], strict=True):
            stats = Stats.of(sample)
            baselines.append(Baseline(name, BULK_BYTES / stats.median_ns, stats))
        row.target = baselines[0].value
        row.target_text = f">= {row.target:.2f} GB/s (rpc remote)"
    else:
        baselines = [rpcb.unavailable(name) for name in names]
        row.target_text = "n/a (rpc unavailable)"
    row.extra["definition"] = (
        "GB/s = 67,108,864 bytes / median round trip, GB = 1e9 bytes; fedtensor: ft.send + "
        "await get(); rpc: remote(identity, (t,)).to_here() and rpc_sync(identity, (t,))"
    )
    row.extra["median_ms"] = {"fedtensor": row.fedtensor_stats.median_ns / 1e6} | {
        b.name: b.stats.median_ns / 1e6 for b in baselines if b.stats is not None
    }
    _finish(row, baselines)
    return row


# -- row 4: dependent chain ------------------------------------------------------------------------


async def bench_dependent(cfg: NetConfig, worker: Any, rpcb: RpcBaseline) -> Row:
    row = Row(
        key="ws_dependent",
        title=f"4 chain: send + {DEPENDENT_OPS} dependent adds + get",
        unit="ms",
        higher_is_better=False,
        target=TARGET_DEPENDENT_MS,
        target_text=f"<= {TARGET_DEPENDENT_MS:g} ms",
    )
    t = torch.zeros(5)
    expected = t + DEPENDENT_OPS

    async def fed() -> int:
        return await timed_chain(worker, t, DEPENDENT_OPS, include_send=True)

    def via_rpc() -> int:
        start = _now()
        rref = rpc.remote("peer", rpc_identity, args=(t,))
        for _ in range(DEPENDENT_OPS):
            rref = rpc.remote("peer", rpc_add_owned, args=(rref, 1))
        value = rref.to_here()
        elapsed = _now() - start
        if not torch.equal(value, expected):
            raise AssertionError(f"wrong result from torch.rpc {value}")
        return elapsed

    contenders = [fed, _sync(via_rpc)] if rpcb.available else [fed]
    for contender in contenders:
        await contender()
    samples = await _interleaved(contenders, cfg.dependent_reps, cfg.row_budget_s)
    row.fedtensor_stats = Stats.of(samples[0])
    row.fedtensor = row.fedtensor_stats.median_ns / 1e6
    name = f"torch.rpc {DEPENDENT_OPS} dependent remote()"
    if rpcb.available:
        stats = Stats.of(samples[1])
        baseline = Baseline(name, stats.median_ns / 1e6, stats)
    else:
        baseline = rpcb.unavailable(name)
    row.extra["definition"] = (
        f"median ms of (ft.send + {DEPENDENT_OPS} x (x = x + 1) + await get()); rpc: "
        f"remote(identity, (t,)), {DEPENDENT_OPS} remote(add_owned, (previous RRef, 1)), "
        "to_here()"
    )
    _finish(row, [baseline])
    return row


# -- row 5: fan-out --------------------------------------------------------------------------------


async def _fanout_roundtrips(workers: Sequence[Any], t: torch.Tensor, reps: int) -> list[int]:
    samples: list[int] = []
    now = _now
    for _ in range(reps):
        start = now()
        await ft.send(t, *workers).get()
        samples.append(now() - start)
    return samples


async def _echo_fanout(links: Sequence[ClientConnection], payload: bytes, reps: int) -> list[int]:
    async def one(link: ClientConnection) -> None:
        await link.send(payload)
        await link.recv()

    samples: list[int] = []
    now = _now
    for _ in range(reps):
        start = now()
        await asyncio.gather(*(one(link) for link in links))
        samples.append(now() - start)
    return samples


async def bench_fanout(
    cfg: NetConfig, workers: Sequence[Any], echoes: Sequence[ClientConnection]
) -> Row:
    n = len(workers)
    row = Row(
        key="ws_fanout",
        title=f"5 fan-out 5 elems to {n} workers (vs 1)",
        unit="ms",
        higher_is_better=False,
    )
    t = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    payload = b"x" * ECHO_BYTES
    values = await ft.send(t, *workers).get()
    if len(values) != n or not all(torch.equal(v, t) for v in values):
        raise AssertionError(f"fan-out to {n} workers came back wrong")
    contenders: list[Callable[[int], Awaitable[list[int]]]] = [
        functools.partial(_fanout_roundtrips, workers[:1], t),
        functools.partial(_fanout_roundtrips, workers, t),
        functools.partial(_echo_fanout, echoes[:1], payload),
        functools.partial(_echo_fanout, echoes, payload),
    ]
    samples: list[list[int]] = [[] for _ in contenders]
    for contender in contenders:
        await contender(cfg.warmup)
    started = _now()
    for block in range(cfg.blocks):
        if block and _now() - started > cfg.row_budget_s * 1e9:
            break
        for contender, sink in zip(contenders, samples, strict=True):
            gc.collect()
            sink += await contender(cfg.block_reps)
    one, many, echo_one, echo_many = (Stats.of(sample) for sample in samples)
    row.fedtensor_stats = many
    row.fedtensor = many.median_ns / 1e6
    fed_one = Baseline("fedtensor, 1 worker process", one.median_ns / 1e6, one)
    raw = Baseline(f"websockets echo to {n} processes", echo_many.median_ns / 1e6, echo_many)
    row.target = TARGET_FANOUT_FACTOR * one.median_ns / 1e6
    row.target_text = f"<= {row.target:.2f} ms (2x 1 worker)"
    row.extra["definition"] = (
        f"median ms of ft.send(t, *workers) + await m.get(), t of 5 float32, {n} worker "
        "processes vs 1 (one connection each); ratio = n workers / 1 worker. Floor of the "
        f"transport on this machine: {ECHO_BYTES}-byte websockets echo to {n} echo processes "
        "at once (asyncio.gather) vs to 1"
    )
    row.extra["echo_1_ms"] = echo_one.median_ns / 1e6
    row.extra["echo_ratio"] = echo_many.median_ns / echo_one.median_ns
    row.extra["echo_1_stats"] = echo_one
    _finish(row, [fed_one, raw])
    row.ratio_text = fed_one.versus = f"{many.median_ns / one.median_ns:.2f}x of 1"
    raw.versus = f"echo {row.extra['echo_ratio']:.2f}x of 1"
    return row


# -- running ---------------------------------------------------------------------------------------


async def run_network(cfg: NetConfig, env: dict[str, Any]) -> list[Row]:
    """Start every process, run the rows, stop every process (also on errors)."""
    loop = asyncio.get_running_loop()
    loop_errors: list[str] = env.setdefault("loop_errors", [])

    def handler(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        loop_errors.append(
            str(context.get("message")) + (f" ({_error_text(exc)})" if exc is not None else "")
        )

    loop.set_exception_handler(handler)
    # Appended to by the starter threads, so that whatever started is stopped, whatever failed.
    workers: list[WorkerProcess] = []
    starters_done: list[str] = []
    all_started = threading.Event()  # every starter thread has returned
    echoes: list[Helper] = []
    rpcb = RpcBaseline()
    started = time.perf_counter()

    def start_worker(name: str) -> WorkerProcess:
        try:
            worker = start_worker_process(name, timeout=START_TIMEOUT_S)
            workers.append(worker)
            return worker
        finally:
            starters_done.append(name)
            if len(starters_done) == FANOUT_PROCESSES:
                all_started.set()

    try:
        # Everything starts at once: a worker imports torch, which takes seconds.
        waits: list[Awaitable[object]] = []
        for i in range(FANOUT_PROCESSES):
            name = f"net{i}"
            waits.append(
                _threaded(functools.partial(start_worker, name), START_TIMEOUT_S + 30, name)
            )
            echo = Helper.spawn(f"echo{i}", "echo")
            echoes.append(echo)
            waits.append(
                _threaded(functools.partial(echo.wait_ready, START_TIMEOUT_S), START_TIMEOUT_S, "")
            )
        tasks = [asyncio.ensure_future(wait) for wait in waits]
        await rpcb.start()
        failures = [
            o
            for o in await asyncio.gather(*tasks, return_exceptions=True)
            if isinstance(o, Exception)
        ]
        if failures:
            raise RuntimeError(f"helper processes did not start: {_error_text(failures[0])}")
        workers.sort(key=lambda w: int(w.id[3:]))
        env["startup_s"] = time.perf_counter() - started
        env["pids"] = {
            "benchmark": os.getpid(),
            "worker": workers[0].process.pid,
            "echo": echoes[0].process.pid,
        }
        if rpcb.peer is not None:
            env["pids"]["rpc_peer"] = rpcb.peer.process.pid
        async with contextlib.AsyncExitStack() as stack:
            handles = [
                await stack.enter_async_context(ft.connect(w.url, token=w.token, timeout=60.0))
                for w in workers
            ]
            echo_links = [
                await stack.enter_async_context(ws_connect(e.address, compression=None, proxy=None))
                for e in echoes
            ]
            bob, echo_ws = handles[0], echo_links[0]
            benches: list[tuple[str, str, Callable[[], Coroutine[Any, Any, Row]]]] = [
                (
                    "ws_roundtrip",
                    "1 round trip",
                    lambda: bench_roundtrip(cfg, bob, echo_ws, rpcb, env),
                ),
                ("ws_pipelined", "2 pipelined", lambda: bench_pipelined(cfg, bob, rpcb)),
                ("ws_bulk", "3 bulk", lambda: bench_bulk(cfg, bob, rpcb)),
                ("ws_dependent", "4 dependent chain", lambda: bench_dependent(cfg, bob, rpcb)),
                ("ws_fanout", "5 fan-out", lambda: bench_fanout(cfg, handles, echo_links)),
            ]
            rows: list[Row] = []
            for key, title, bench in benches:
                rows.append(await _guarded(bench, key, title))
                gc.collect()
        return rows
    finally:
        await rpcb.stop()
        env["rpc"] = {"available": rpcb.error is None, "error": rpcb.error}
        # A starter thread still running (on an interrupted start) adds its worker soon.
        with contextlib.suppress(Exception):
            await _threaded(
                functools.partial(all_started.wait, START_TIMEOUT_S), START_TIMEOUT_S + 5, "starts"
            )
        stoppers: list[Awaitable[object]] = [
            _threaded(w.stop, 90.0, f"stop {w.id}") for w in list(workers)
        ]
        stoppers += [_threaded(e.stop, 90.0, f"stop {e.name}") for e in echoes]
        for outcome in await asyncio.gather(*stoppers, return_exceptions=True):
            if isinstance(outcome, BaseException):
                loop_errors.append(f"stopping a helper: {_error_text(outcome)}")


# -- reporting -------------------------------------------------------------------------------------


def render(rows: Sequence[Row], label: str, facts: dict[str, Any], env: dict[str, Any]) -> str:
    out = io.StringIO()
    mode = "quick" if env["quick"] else "full"
    out.write(
        f"fedtensor network benchmarks ({mode} run) - event loop: {label}\n"
        f"python {facts['python']}, torch {facts['torch']} ({facts['torch_threads']} threads), "
        f"websockets {_WEBSOCKETS_VERSION}, {facts['cpus_usable']} CPUs, "
        f"{facts['platform']}\n"
        f"load average at start: {_fmt_load(facts['loadavg_at_start'])}; every party is a "
        "separate process on 127.0.0.1; baselines run in this run, interleaved\n\n"
    )
    header = (
        f"{'benchmark':<41} {'fedtensor':>14}   {'baseline':<32} {'value':>14} "
        f"{'fedtensor is':>16}  {'target':<32} status"
    )
    out.write(header + "\n" + "-" * len(header) + "\n")
    for r in rows:
        if r.error is not None:
            out.write(f"{r.title:<41} ERROR: {r.error}\n")
            continue
        baselines: list[Baseline] = r.extra.get("baselines", [])
        first = baselines[0] if baselines else Baseline("")
        out.write(
            f"{r.title:<41} {_fmt(r.fedtensor, r.unit):>14}   {first.name:<32} "
            f"{_baseline_value(first, r.unit):>14} {first.versus:>16}  {r.target_text:<32} "
            f"{r.status}\n"
        )
        for b in baselines[1:]:
            out.write(
                f"{'':<41} {'':>14}   {b.name:<32} {_baseline_value(b, r.unit):>14} "
                f"{b.versus:>16}\n"
            )
    out.write(
        "\nrow 3: GB/s = 64 MiB (67,108,864 bytes) / median round trip (GB = 1e9 bytes); "
        "row 5: ratio = 8 workers / 1 worker;\n       the echo line is 32 B to 8 echo "
        "processes at once, and its ratio 8/1, the transport's own on this machine\n"
    )
    unavailable = sorted({b.error for r in rows for b in r.extra.get("baselines", []) if b.error})
    for reason in unavailable:
        out.write(f"baseline unavailable: {reason}\n")
    rpc_state = env.get("rpc", {})
    if rpc_state.get("available"):
        out.write(
            "torch.rpc: TensorPipe, world size 2, both processes on 127.0.0.1 (TensorPipe may "
            "use shared memory on one host); numpy-free start-up shim (see module docstring)\n"
        )
    roundtrip = next((r for r in rows if r.key == "ws_roundtrip" and r.error is None), None)
    if roundtrip is not None:
        cpus = ", ".join(f"{k} {v}" for k, v in roundtrip.extra.get("last_cpu", {}).items())
        out.write(f"last CPU of each process after row 1: {cpus}\n")
    out.write(f"start-up of the helper processes: {env.get('startup_s', float('nan')):.1f} s\n")
    missed = [r.title for r in rows if r.status in ("MISS", "ERROR")]
    out.write("\nmissed targets / errors: " + ("; ".join(missed) if missed else "none") + "\n")
    return out.getvalue()


def _baseline_value(baseline: Baseline, unit: str) -> str:
    if baseline.value is None:
        return "unavailable" if baseline.error else ""
    return _fmt(baseline.value, unit)


def run_from_args(args: argparse.Namespace) -> int:
    """``python -m benchmarks --network [--quick] [--uvloop] [--json PATH]``."""
    cfg = NetConfig.make(bool(args.quick))
    facts = machine_facts()
    env: dict[str, Any] = {"quick": cfg.quick}
    started = time.perf_counter()
    try:
        rows, label = _run(run_network(cfg, env), bool(args.uvloop))
    except Exception as exc:  # the processes could not start: report it, as rows do
        label = "n/a"
        row = Row("network", "network benchmark", "", False, error=_error_text(exc))
        row.extra["traceback"] = traceback.format_exc(limit=6)
        row.finish()
        rows = [row]
    elapsed = time.perf_counter() - started
    print(render(rows, label, facts, env), end="")
    report(
        args.json,
        "network",
        quick=cfg.quick,
        loop_label=label,
        facts=facts,
        config=asdict(cfg),
        rows=rows,
        elapsed=elapsed,
        loop_errors=env.get("loop_errors", []),
        extra={
            "websockets": _WEBSOCKETS_VERSION,
            "startup_s": env.get("startup_s"),
            "rpc": env.get("rpc"),
            "ratio_convention": "ratio = fedtensor / first baseline in each row's unit",
        },
    )
    return 0


# -- profiling -------------------------------------------------------------------------------------

PROFILES = ("roundtrip", "pipelined", "bulk", "dependent", "fanout")


async def _profiled_workload(name: str, workers: Sequence[Any], profiler: cProfile.Profile) -> None:
    small = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    big = torch.arange(BULK_BYTES // 4, dtype=torch.float32) if name == "bulk" else small
    bob = workers[0]

    async def once() -> None:
        if name == "roundtrip":
            await timed_roundtrips(bob, small, 2000)
        elif name == "pipelined":
            x = ft.send(small, bob)
            for _ in range(CHAIN_LENGTH):
                x = x + 1
            await x.get()
        elif name == "bulk":
            await ft.send(big, bob).get()
        elif name == "dependent":
            for _ in range(20):
                x = ft.send(small, bob)
                for _ in range(DEPENDENT_OPS):
                    x = x + 1
                await x.get()
        else:
            await _fanout_roundtrips(workers, small, 300)

    await once()  # warm-up
    for _ in range(3):
        gc.collect()
        profiler.enable()
        await once()
        profiler.disable()


def _print_profile(title: str, profiler: cProfile.Profile, top: int) -> None:
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(top)
    print(f"== {title}\n{stream.getvalue()}")


def profile(name: str, server_side: bool, top: int) -> None:
    """cProfile the fedtensor path of one row: client, and with ``server_side`` the server."""
    client = cProfile.Profile()
    count = FANOUT_PROCESSES if name == "fanout" else 1
    if not server_side:
        processes: list[WorkerProcess] = []
        try:
            processes = [start_worker_process(f"prof{i}") for i in range(count)]

            async def go() -> None:
                async with contextlib.AsyncExitStack() as stack:
                    workers = [
                        await stack.enter_async_context(ft.connect(p.url, token=p.token))
                        for p in processes
                    ]
                    await _profiled_workload(name, workers, client)

            asyncio.run(go())
        finally:
            for p in processes:
                p.stop()
        _print_profile(f"client side of {name} (worker processes)", client, top)
        return
    # The server in this process: its event loop on a thread of its own (profiled whole,
    # warm-up included), its actor on another (profiled whole), the client here.
    from fedtensor.worker.server import WorkerServer

    loop_profiler, actor_profiler = cProfile.Profile(), cProfile.Profile()
    started: queue.SimpleQueue[tuple[str, asyncio.AbstractEventLoop, WorkerServer]]
    started = queue.SimpleQueue()

    def serve() -> None:
        async def main() -> None:
            server = WorkerServer("profiled", token="t")
            actor_run = server.actor.serve_in_thread

            def profiled_actor() -> None:
                actor_profiler.enable()
                try:
                    actor_run()
                finally:
                    actor_profiler.disable()

            server.actor.serve_in_thread = profiled_actor  # type: ignore[method-assign]
            import anyio

            async with anyio.create_task_group() as group:
                url = await group.start(server.serve, "127.0.0.1", 0)
                started.put((url, asyncio.get_running_loop(), server))

        loop_profiler.enable()
        asyncio.run(main())
        loop_profiler.disable()

    thread = threading.Thread(target=serve, name="profiled-server", daemon=True)
    thread.start()
    url, loop, server = started.get(timeout=60)
    try:

        async def go() -> None:
            async with ft.connect(url, token="t") as bob:
                await _profiled_workload(name, [bob] * count, client)

        asyncio.run(go())
    finally:
        loop.call_soon_threadsafe(server.shutdown)
        thread.join(60)
    _print_profile(f"client side of {name} (server in this process)", client, top)
    _print_profile("server event loop thread (whole session)", loop_profiler, top)
    _print_profile("server actor thread (whole session)", actor_profiler, top)


# -- entry point for helper roles and profiles -----------------------------------------------------


def idle_cost(reps: int = 2000) -> None:
    """How much slower Python runs right after a wait (what a round trip's every step pays).

    Times decoding one round trip's request frame (a store, an add, a release and a
    fetch) back to back, then after each of a sleep and a busy wait: the sleep is what
    a process waiting for the network does.
    """
    from fedtensor.protocol.codec import decode_frame, frame_bytes
    from fedtensor.protocol.messages import Call, Fetch, Ref, Release, Store

    frame = memoryview(
        frame_bytes(
            [
                Store(1, torch.ones(5)),
                Call(2, "Tensor.__add__", (Ref(1), 1), {}),
                Release((1,)),
                Fetch(1, 2, True),
            ]
        )
    )
    print(f"decoding a round trip's request frame, median of {reps} (us):")
    for label, gap, spin in (
        ("back to back", 0.0, False),
        ("after a 0.3 ms sleep", 0.0003, False),
        ("after a 2 ms sleep", 0.002, False),
        ("after a 0.3 ms busy wait", 0.0003, True),
    ):
        samples = []
        for _ in range(reps):
            if spin:
                until = time.perf_counter() + gap
                while time.perf_counter() < until:
                    pass
            elif gap:
                time.sleep(gap)
            start = _now()
            decode_frame(frame)
            samples.append(_now() - start)
        print(f"  {label:<26} {statistics.median(samples) / 1e3:8.1f}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.network",
        description="helper processes and profiles of the network benchmark "
        "(run the benchmark itself with python -m benchmarks --network)",
    )
    roles = parser.add_subparsers(dest="role", required=True)
    roles.add_parser("echo", help="websockets echo server on a free 127.0.0.1 port")
    peer = roles.add_parser("rpc-peer", help="torch.distributed.rpc rank 1")
    peer.add_argument("port", type=int)
    prof = roles.add_parser("profile", help="cProfile one row's fedtensor path")
    prof.add_argument("row", choices=PROFILES)
    prof.add_argument("--server", action="store_true", help="an in-process WorkerServer too")
    prof.add_argument("--top", type=int, default=20)
    roles.add_parser("idle-cost", help="how much slower Python runs right after a wait")
    args = parser.parse_args(argv)
    if args.role == "idle-cost":
        idle_cost()
    elif args.role == "echo":
        echo_role()
    elif args.role == "rpc-peer":
        _rpc_peer(args.port)
    else:
        profile(args.row, args.server, args.top)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(1)
