"""The network suite: worker processes over websockets, next to a raw websockets echo and
torch.distributed.rpc (TensorPipe), every party a process of its own on 127.0.0.1.

1. round trip: ``ft.send`` of 5 elements, a remote add, ``get`` (us), against a 32-byte echo
   and ``rpc_sync(torch.add)``.
2. pipelined: 10,000 chained remote adds, then one get (ops/s), against 10,000 ``rpc_async``.
3. bulk: ``ft.send`` + ``get`` of 64 MiB float32 (GB/s), against ``remote(id, t).to_here()``
   and ``rpc_sync(id, t)``.
4. dependent chain: ``ft.send`` + 100 dependent adds + get (ms), against 100 ``rpc.remote``
   each given the previous RRef (resolved by its owner, the peer), then ``to_here()``.
5. fan-out: ``ft.send(t, *workers)`` + ``get`` of 5 elements to 8 worker processes vs 1 (ms),
   and a 32-byte echo to 8 echo processes at once vs 1 (the transport's own scaling here).
6. fairness: another client's round trip (as in 1) while one client runs a ~3 s chain of
   matrix products on the same worker (us), against the same client's round trip on an
   idle worker, measured just before.

Commands: ``profile ROW [--top N]`` (the client's cProfile), ``idle-cost``; helper processes:
``echo``, ``rpc-peer PORT``. rpc's start-up reads bytes through numpy, absent here: both rpc
processes replace that function (``c10d._tensor_to_object``); nothing timed goes through it.
"""

# ruff: noqa: E402  (the echo role runs before the heavy imports, on purpose)
from __future__ import annotations

import asyncio
import os
import sys
import threading

READY = "benchmarks.network ready on"  # what a helper prints, then its address, once it serves


def _exit_when_orphaned() -> None:
    """In a helper: exit as soon as the benchmark closes our stdin (or dies)."""
    threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()


def echo_role() -> None:
    """A websockets echo server on a free port, run without torch: eight start at once."""
    from websockets.asyncio.server import ServerConnection, serve

    async def echo(connection: ServerConnection) -> None:
        async for message in connection:
            await connection.send(message)

    async def run() -> None:
        async with serve(echo, "127.0.0.1", 0, compression=None) as server:
            print(f"{READY} ws://127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
            await server.serve_forever()

    _exit_when_orphaned()
    asyncio.run(run())


if __name__ == "__main__" and sys.argv[1:] == ["echo"]:
    echo_role()
    sys.exit()

import argparse
import contextlib
import functools
import io
import socket
import statistics
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

from benchmarks import common
from benchmarks.common import CHAIN_LENGTH, Baseline, Config, Row, check, now, repeat, timed_row

warnings.filterwarnings("ignore", message="You are using a Backend")  # init_rpc's own Gloo use

import torch
import torch.distributed.distributed_c10d as c10d
import torch.distributed.rpc as rpc
from websockets.asyncio.client import ClientConnection, connect

import fedtensor as ft
from fedtensor.testing import WorkerProcess, start_worker_process

PROCESSES = 8
DEPENDENT_OPS = 100
START_TIMEOUT_S = 90.0
TARGET_ECHO_FACTOR = 1.5
TARGET_PIPELINED_OPS = 20_000.0
TARGET_DEPENDENT_MS = 10.0
TARGET_FANOUT_VS_ECHO = 1.15
TARGET_FAIRNESS_FACTOR = 10.0
FAIRNESS_CHAIN_S = 3.0


def spawn(name: str, *args: str) -> WorkerProcess:
    """A ``python -m benchmarks.network ROLE`` process: it exits when its stdin closes."""
    log = tempfile.TemporaryFile("w+", prefix=f"fedtensor-bench-{name}-")  # noqa: SIM115
    command = [sys.executable, "-m", "benchmarks.network", *args]
    env, pipe = {**os.environ, "PYTHONPATH": str(common.REPO)}, subprocess.PIPE
    process = subprocess.Popen(command, stdin=pipe, stdout=pipe, stderr=log, text=True, env=env)
    return WorkerProcess(name, "", "", process, log)


def wait_ready(helper: WorkerProcess) -> WorkerProcess:
    """Block until the helper's ready line, which gives its ``url`` (run under a timeout)."""
    for line in helper.process.stdout or ():
        if line.startswith(READY):
            helper.url = line[len(READY) :].strip()
            return helper
    raise RuntimeError(f"{helper.id} exited ({helper.process.wait()}): {helper.log()[-400:]}")


async def _threaded(fn: Callable[[], Any], timeout: float, abort: Callable[[], bool] = bool) -> Any:
    """Run blocking ``fn`` on a daemon thread (a hung one cannot block exit) and await it;
    ``abort()`` is polled meanwhile: true ends the wait early."""
    outcome: list[Any] = []

    def target() -> None:
        try:
            outcome.append(fn())
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=target, name=f"bench-{fn}", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while thread.is_alive():
        if time.monotonic() > deadline or abort():
            raise TimeoutError(f"{fn}: not done in {timeout:g} s, or given up")
        await asyncio.sleep(0.02)
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def _tensor_to_object(tensor: torch.Tensor, tensor_size: Any, group: Any) -> Any:
    """``distributed_c10d._tensor_to_object`` without numpy (start-up device maps only)."""
    return c10d._unpickler(io.BytesIO(bytes(tensor[: int(tensor_size)].tolist()))).load()


def _rpc_init(name: str, rank: int, port: int) -> None:
    c10d._tensor_to_object = _tensor_to_object
    url = f"tcp://127.0.0.1:{port}"
    options = rpc.TensorPipeRpcBackendOptions(init_method=url, rpc_timeout=60.0)
    rpc.init_rpc(name, rank=rank, world_size=2, rpc_backend_options=options)  # type: ignore[no-untyped-call]


def rpc_identity(t: torch.Tensor) -> torch.Tensor:
    """Runs on the rpc peer: the tensor itself."""
    return t


def rpc_add_owned(previous: rpc.RRef[torch.Tensor], k: int) -> torch.Tensor:
    """Runs on the rpc peer, which owns ``previous``: resolved locally, no round trip."""
    return previous.local_value() + k  # type: ignore[no-any-return]


class Rpc:
    """This process as torch.distributed.rpc rank 0, with a helper process as rank 1."""

    def __init__(self) -> None:
        self.peer: WorkerProcess | None = None
        self.error: str | None = "torch.distributed.rpc is not running"
        self.joined = False

    async def start(self) -> None:
        """Start the peer and join it; on failure only set ``error``."""
        try:
            with socket.create_server(("127.0.0.1", 0)) as sock:
                port: int = sock.getsockname()[1]
            self.peer = peer = spawn("rpc-peer", "rpc-peer", str(port))
            gone = lambda: peer.process.poll() is not None  # noqa: E731
            await _threaded(lambda: _rpc_init("bench", 0, port), START_TIMEOUT_S, gone)
            self.joined = True
            await _threaded(lambda: wait_ready(peer), START_TIMEOUT_S)
            self.error = None
        except Exception as exc:
            tail = "" if self.peer is None else f" (peer: {self.peer.log()[-300:]})"
            self.error = f"torch.distributed.rpc did not start: {common.error_text(exc)}{tail}"

    def timed(self, row: Row, reps: int, calls: dict[str, Any]) -> dict[str, Any]:
        """Contenders: ``reps`` of each rpc call; none while rpc is down (``row`` says why)."""
        if self.error is None:
            return {name: functools.partial(repeat, call, reps) for name, call in calls.items()}
        row.baselines += [Baseline(name, error=self.error) for name in calls]
        return {}

    async def stop(self) -> None:
        with contextlib.suppress(Exception):  # a failed shutdown must not keep the peer running
            await _threaded(rpc.shutdown if self.joined else lambda: None, 30.0)
        if self.peer is not None:
            await _threaded(self.peer.stop, 90.0)


async def _echo(links: list[ClientConnection]) -> object:
    """32 bytes echoed by each of ``links``, at once."""
    if len(links) > 1:
        return await asyncio.gather(*(_echo([link]) for link in links))
    await links[0].send(b"x" * 32)
    return await links[0].recv()


async def bench_roundtrip(cfg: Config, worker: Any, echo: ClientConnection, rpcs: Rpc) -> Row:
    row = Row("ws_roundtrip", "1 round trip: send 5 elems + add + get", "us")
    t, reps = torch.tensor([1, 2, 3, 4, 5]), cfg.block
    check(await (ft.send(t, worker) + 1).get(), t + 1, "the worker")
    if await _echo([echo]) != b"x" * 32:
        raise AssertionError("the echo server sent something else")
    add = functools.partial(rpc.rpc_sync, "peer", torch.add, args=(t, 1))
    contenders = {
        "fedtensor": functools.partial(common.timed_roundtrips, worker, t, reps),
        "websockets echo, 32 B": functools.partial(repeat, functools.partial(_echo, [echo]), reps),
        **rpcs.timed(row, reps, {"torch.rpc rpc_sync(torch.add)": add}),
    }
    if rpcs.error is None:
        check(add(), t + 1, "torch.rpc")
    await timed_row(row, lambda ns: ns / 1e3, contenders, cfg)
    echo_us, rpc_us = row.baselines[0].value or 1.0, row.baselines[1].value or float("inf")
    row.target = min(TARGET_ECHO_FACTOR * echo_us, rpc_us)
    row.target_text = f"<= {TARGET_ECHO_FACTOR:g}x echo, < rpc: {row.target:,.0f} us"
    row.ratio_text = f"{(row.fedtensor or 0) / echo_us:.2f}x the echo"
    return row


async def bench_pipelined(cfg: Config, worker: Any, rpcs: Rpc) -> Row:
    row = Row("ws_pipelined", f"2 pipelined: {CHAIN_LENGTH:,} chained adds + get", "ops/s", True)
    row.target, row.target_text = TARGET_PIPELINED_OPS, f">= {TARGET_PIPELINED_OPS:,.0f} ops/s"
    t = torch.zeros(5)

    def via_rpc() -> Any:
        futures = [rpc.rpc_async("peer", torch.add, args=(t, 1)) for _ in range(CHAIN_LENGTH)]
        return torch.futures.wait_all(futures)[-1]

    if rpcs.error is None:
        check(via_rpc(), t + 1, "torch.rpc")

    chain = functools.partial(common.timed_chain, worker, t, CHAIN_LENGTH, include_send=False)
    calls = {f"torch.rpc {CHAIN_LENGTH:,} x rpc_async(add)": via_rpc}
    contenders = {"fedtensor": chain, **rpcs.timed(row, 1, calls)}
    ops_per_s = lambda ns: CHAIN_LENGTH / (ns / 1e9)  # noqa: E731
    return await timed_row(row, ops_per_s, contenders, cfg)


async def bench_bulk(cfg: Config, worker: Any, rpcs: Rpc) -> Row:
    row = Row("ws_bulk", "3 send + get 64 MiB float32", "GB/s", True)
    t = torch.arange(common.BULK_BYTES // 4, dtype=torch.float32)
    check(await ft.send(t, worker).get(), t, "the worker")
    calls = {
        "torch.rpc remote(id).to_here()": lambda: rpc.remote("peer", rpc_identity, (t,)).to_here(),
        "torch.rpc rpc_sync(id, t)": lambda: rpc.rpc_sync("peer", rpc_identity, (t,)),
    }
    if rpcs.error is None:
        check(calls["torch.rpc remote(id).to_here()"](), t, "torch.rpc")
    get = functools.partial(repeat, lambda: ft.send(t, worker).get(), 1)
    contenders = {"fedtensor": get, **rpcs.timed(row, 1, calls)}
    gb_per_s = lambda ns: common.BULK_BYTES / ns  # noqa: E731  (bytes/ns == GB/s)
    await timed_row(row, gb_per_s, contenders, cfg)
    row.target = row.baselines[0].value
    row.target_text = ">= rpc remote()" if rpcs.error is None else "n/a (rpc unavailable)"
    return row


async def bench_dependent(cfg: Config, worker: Any, rpcs: Rpc) -> Row:
    row = Row("ws_dependent", f"4 chain: send + {DEPENDENT_OPS} dependent adds + get", "ms")
    row.target, row.target_text = TARGET_DEPENDENT_MS, f"<= {TARGET_DEPENDENT_MS:g} ms"
    t = torch.zeros(5)

    def via_rpc() -> torch.Tensor:
        rref = rpc.remote("peer", rpc_identity, args=(t,))
        for _ in range(DEPENDENT_OPS):
            rref = rpc.remote("peer", rpc_add_owned, args=(rref, 1))
        return rref.to_here()  # type: ignore[no-any-return]

    if rpcs.error is None:
        check(via_rpc(), t + DEPENDENT_OPS, "torch.rpc")
    chain = functools.partial(common.timed_chain, worker, t, DEPENDENT_OPS, include_send=True)
    calls = {f"torch.rpc {DEPENDENT_OPS} dependent remote()": via_rpc}
    contenders = {"fedtensor": chain, **rpcs.timed(row, 1, calls)}
    return await timed_row(row, lambda ns: ns / 1e6, contenders, cfg)


async def bench_fanout(cfg: Config, workers: list[Any], echoes: list[ClientConnection]) -> Row:
    n, t, reps = len(workers), torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), cfg.block
    for value in await ft.send(t, *workers).get():
        check(value, t, "fan-out")
    row = Row("ws_fanout", f"5 fan-out 5 elems to {n} workers (vs 1)", "ms")
    contenders = {
        "fedtensor": functools.partial(repeat, lambda: ft.send(t, *workers).get(), reps),
        "fedtensor, 1 worker process": functools.partial(
            repeat, lambda: ft.send(t, workers[0]).get(), reps
        ),
        f"websockets echo, {n} processes": functools.partial(repeat, lambda: _echo(echoes), reps),
        "websockets echo, 1 process": functools.partial(repeat, lambda: _echo(echoes[:1]), reps),
    }
    await timed_row(row, lambda ns: ns / 1e6, contenders, cfg)
    one, echo_many, echo_one = (b.value or 1.0 for b in row.baselines)
    fed_ratio, echo_ratio = (row.fedtensor or 0) / one, echo_many / echo_one
    row.baselines[0].versus, row.baselines[2].versus = f"{fed_ratio:.2f}x of 1", "-"
    row.baselines[1].versus = f"echo {echo_ratio:.2f}x of 1"
    row.target = TARGET_FANOUT_VS_ECHO * echo_ratio * one
    row.target_text = f"{n}-vs-1 <= {TARGET_FANOUT_VS_ECHO:g}x the echo's {n}-vs-1"
    row.ratio_text = f"{fed_ratio:.2f}x of 1 = {fed_ratio / echo_ratio:.2f}x the echo's"
    row.extra.update(fedtensor_ratio=fed_ratio, echo_ratio=echo_ratio)
    return row


async def bench_fairness(cfg: Config, url: str, token: str) -> Row:
    """Client B's round trips while client A keeps the worker busy with a long chain."""
    row = Row("ws_fairness", "6 another client's round trip during a 3 s chain", "us")
    row.target_text = f"<= {TARGET_FAIRNESS_FACTOR:g}x idle"
    t, local = torch.tensor([1, 2, 3, 4, 5]), torch.randn(600, 600) / 25

    def chain(x: Any, steps: int) -> Any:
        for _ in range(steps):
            x = (x @ x).tanh()
        return x

    async with (
        ft.connect(url, token=token, timeout=120) as a,
        ft.connect(url, token=token, timeout=120) as b,
    ):
        idle = await common.timed_roundtrips(b, t, 20)  # warm-up
        x = ft.send(local, a)
        await chain(x, 10).sum().get()  # warm-up
        started = now()
        await chain(x, 10).sum().get()  # the chain's speed on this worker, as it runs now
        steps = max(10, round(FAIRNESS_CHAIN_S / ((now() - started) / 1e9 / 10)))
        idle = await common.timed_roundtrips(b, t, max(cfg.block, 50))
        busy: list[int] = []
        started = now()
        done = asyncio.ensure_future(chain(x, steps).sum().get())
        while not done.done():
            busy += await common.timed_roundtrips(b, t, 1)
        await done
        chain_s = (now() - started) / 1e9
        del x
    idle_us, busy_us = statistics.median(idle) / 1e3, statistics.median(busy) / 1e3
    row.fedtensor = busy_us
    row.baselines.append(Baseline("the same round trip, worker idle", idle_us))
    row.target = TARGET_FAIRNESS_FACTOR * idle_us
    row.ratio_text = f"{busy_us / idle_us:.1f}x idle"
    row.baselines[0].versus = f"{busy_us / idle_us:.1f}x slower"
    row.extra.update(chain_s=chain_s, round_trips=len(busy), worst_us=max(busy) / 1e3, steps=steps)
    return row


async def run_network(cfg: Config, env: dict[str, Any]) -> list[Row]:
    """Start every process at once (a worker imports torch: seconds), run the rows, stop all."""
    workers: list[WorkerProcess] = []  # appended to by the starting threads: all are stopped
    echoes: list[WorkerProcess] = []
    rpcs, started = Rpc(), time.perf_counter()

    def start(i: int, worker: bool) -> None:
        if worker:
            workers.append(start_worker_process(f"net{i}", timeout=START_TIMEOUT_S))
        else:
            echoes.append(echo := spawn(f"echo{i}", "echo"))
            wait_ready(echo)

    starts = [
        asyncio.ensure_future(_threaded(functools.partial(start, i, kind), START_TIMEOUT_S + 30))
        for i in range(PROCESSES)
        for kind in (True, False)
    ]
    try:
        await rpcs.start()
        failures = [o for o in await asyncio.gather(*starts, return_exceptions=True) if o]
        if failures:
            raise RuntimeError(f"helper processes did not start: {failures[0]!r}")
        workers.sort(key=lambda w: int(w.id[3:]))
        env["startup_s"] = time.perf_counter() - started
        env["pids"] = [os.getpid(), *(p.process.pid for p in workers + echoes)]
        async with contextlib.AsyncExitStack() as stack:
            enter = stack.enter_async_context
            handles = [await enter(ft.connect(w.url, token=w.token, timeout=60)) for w in workers]
            links = [await enter(connect(e.url, compression=None, proxy=None)) for e in echoes]
            bob, guarded = handles[0], common.guarded
            rows = await guarded("ws_roundtrip", lambda: bench_roundtrip(cfg, bob, links[0], rpcs))
            rows += await guarded("ws_pipelined", lambda: bench_pipelined(cfg, bob, rpcs))
            rows += await guarded("ws_bulk", lambda: bench_bulk(cfg, bob, rpcs))
            rows += await guarded("ws_dependent", lambda: bench_dependent(cfg, bob, rpcs))
            rows += await guarded("ws_fanout", lambda: bench_fanout(cfg, handles, links))
            first = workers[0]
            return rows + await guarded(
                "ws_fairness", lambda: bench_fairness(cfg, first.url, first.token)
            )
    finally:
        env["rpc_error"] = rpcs.error
        await rpcs.stop()
        await asyncio.gather(*starts, return_exceptions=True)  # an interrupted start ends first
        stops = [_threaded(p.stop, 90.0) for p in workers + echoes]
        for outcome in await asyncio.gather(*stops, return_exceptions=True):
            if isinstance(outcome, BaseException):
                env["loop_errors"].append(f"stopping a helper: {common.error_text(outcome)}")


def run_from_args(args: argparse.Namespace) -> int:
    rounds = {"ws_roundtrip": (3, 10), "ws_pipelined": (3, 9), "ws_bulk": (3, 11)}
    rounds |= {"ws_dependent": (10, 41), "ws_fanout": (3, 10)}  # rows 1 and 5: in blocks
    cfg = Config.pick(args.quick, rounds, (100, 300), (6.0, 25.0))
    return common.run_suite(args, "network", cfg, lambda env: run_network(cfg, env))


def profile(name: str, top: int) -> None:
    """cProfile one row's fedtensor path on the client, against worker processes."""
    t = torch.arange((common.BULK_BYTES if name == "bulk" else 20) // 4, dtype=torch.float32)
    count = PROCESSES if name == "fanout" else 1
    processes = [start_worker_process(f"prof{i}") for i in range(count)]

    async def client() -> str:
        async with contextlib.AsyncExitStack() as stack:
            connecting = (ft.connect(p.url, token=p.token) for p in processes)
            workers = [await stack.enter_async_context(c) for c in connecting]
            return await common.profiled(name, workers, t, top)

    try:
        print(f"== client side of {name} (worker processes)\n{asyncio.run(client())}")
    finally:
        for p in processes:
            p.stop()


def fairness_alone() -> None:
    """Row 6 on its own (``python -m benchmarks.network fairness``), one worker process."""
    process = start_worker_process("fair", timeout=START_TIMEOUT_S)
    try:
        cfg = Config(quick=False, rounds={}, block=100)
        row = asyncio.run(bench_fairness(cfg, process.url, process.token)).finish()
    finally:
        process.stop()
    idle = row.baselines[0].value or 0.0
    print(f"{row.title}: {row.fedtensor:,.0f} us, idle {idle:,.0f} us: {row.ratio_text}")
    print(f"  target {row.target_text}: {row.status}; {row.extra}")


def idle_cost(reps: int = 2000) -> None:
    """How much slower Python runs after a wait (as a process waiting for the network does)
    than hot: decoding a round trip's request frame back to back, after sleeps, spinning."""
    from fedtensor.protocol.codec import decode_frame, frame_bytes

    frame = frame_bytes(common.request_batch())
    print(f"decoding a round trip's request frame, median of {reps} (us):")
    gaps = [("back to back", 0, False), ("after a 0.3 ms sleep", 3e-4, False)]
    gaps += [("after a 2 ms sleep", 2e-3, False), ("after a 0.3 ms busy wait", 3e-4, True)]
    for label, gap, spin in gaps:
        samples = []
        for _ in range(reps):
            until = time.perf_counter() + gap
            while spin and time.perf_counter() < until:
                pass
            time.sleep(0 if spin else gap)
            start = now()
            decode_frame(frame)
            samples.append(now() - start)
        print(f"  {label:<26} {statistics.median(samples) / 1e3:8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.network", description=__doc__)
    roles = parser.add_subparsers(dest="role", required=True)
    prof = roles.add_parser("profile", help="cProfile one row's fedtensor path")
    prof.add_argument("row", choices=("roundtrip", "pipelined", "bulk", "dependent", "fanout"))
    prof.add_argument("--top", type=int, default=20)
    roles.add_parser("idle-cost", help="how much slower Python runs right after a wait")
    roles.add_parser("fairness", help="row 6 alone, against one worker process")
    roles.add_parser("echo", help="websockets echo server on a free 127.0.0.1 port")
    roles.add_parser("rpc-peer", help="torch.distributed.rpc rank 1").add_argument("port", type=int)
    args = parser.parse_args()
    if args.role == "profile":
        profile(args.row, args.top)
    elif args.role == "idle-cost":
        idle_cost()
    elif args.role == "fairness":
        fairness_alone()
    elif args.role == "echo":
        echo_role()
    else:  # the rpc peer: it serves until rank 0 shuts down too
        _exit_when_orphaned()
        _rpc_init("peer", 1, args.port)
        print(READY, flush=True)
        rpc.shutdown()


if __name__ == "__main__":
    main()
