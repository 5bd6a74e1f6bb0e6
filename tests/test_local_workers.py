"""ft.local_workers: worker processes that fedtensor starts, uses and stops, never orphaned."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import time

import anyio
import pytest
import torch

import fedtensor as ft
import fedtensor.sync as sy
from fedtensor.local import available_cores, pin_cores, share_cores

pytestmark = pytest.mark.anyio


def _gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (a zombie nobody reaped yet counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            state = file.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Poll until every pid has exited or ``timeout`` passes; the pids still alive."""
    deadline = time.monotonic() + timeout
    alive = [pid for pid in pids if not _gone(pid)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [pid for pid in alive if not _gone(pid)]
    return alive


def test_cores_are_shared_out() -> None:
    assert share_cores(2, 2) == [1, 1]
    assert share_cores(3, 8) == [3, 3, 2]
    assert share_cores(4, 2) == [1, 1, 1, 1]  # never fewer than one thread


def test_pinned_workers_get_cores_of_their_own() -> None:
    assert pin_cores([1, 1], [0, 1]) == [[0], [1]]
    assert pin_cores([1, 1, 1, 1], [0, 1]) == [[0], [1], [0], [1]]  # wrapping around
    assert pin_cores([2, 1], [0, 2, 5]) == [[0, 2], [5]]
    assert pin_cores([3], [4, 7]) == [[4, 7]]  # no more than there are
    with pytest.raises(ValueError, match="not both"):
        ft.local_workers(2, pin=True, cpus=["0", "1"])
    group = ft.local_workers(2, threads=1, pin=True)
    assert group.cpus == pin_cores([1, 1])
    for arguments, cpus in zip(group._arguments, group.cpus, strict=True):
        assert arguments[arguments.index("--cpus") + 1] == ",".join(map(str, cpus))
    assert ft.local_workers(2, threads=1).cpus is None  # not pinned by default


def _threads(pid: int) -> list[int]:
    return [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]


@pytest.mark.skipif(
    not hasattr(os, "SCHED_BATCH"), reason="CPU affinity and SCHED_BATCH are Linux's"
)
async def test_every_thread_of_a_pinned_worker_runs_on_its_cores_without_preempting() -> None:
    async with ft.local_workers(2, threads=1, pin=True) as workers:
        assert workers.cpus is not None
        # Commands on both, so that their compute threads exist: started after the
        # pinning, they inherit it.
        for worker in workers:
            doubled = ft.send(torch.ones(3), worker) * 2
            assert torch.equal(await doubled, torch.full((3,), 2.0))
        for pid, cpus in zip(workers.pids, workers.cpus, strict=True):
            threads = _threads(pid)
            assert len(threads) > 2  # the loop, compute threads, the stdin watcher
            for thread in threads:
                assert os.sched_getaffinity(thread) == set(cpus)
                assert os.sched_getscheduler(thread) == os.SCHED_BATCH
    async with ft.local_workers(1, threads=1, batch_scheduling=False) as unpinned:
        [pid] = unpinned.pids
        for thread in _threads(pid):
            assert os.sched_getscheduler(thread) == os.SCHED_OTHER
            assert os.sched_getaffinity(thread) == os.sched_getaffinity(0)


async def test_local_workers_compute_federate_and_fit() -> None:
    async with (
        ft.local_workers(2, threads=1, log_level="INFO") as workers,
        ft.VirtualWorker("carol") as carol,
    ):
        assert len(workers) == 2
        # Each warmed up (--warm-up) before it reported ready.
        assert all("warmed up in" in workers.log(index) for index in range(2))
        assert workers.threads == [1, 1]
        assert [w.id for w in workers] == ["local-0", "local-1"]
        assert len(set(workers.pids)) == 2
        assert all(url.startswith("ws://127.0.0.1:") for url in workers.urls)
        # pointers and multi-pointers mixing processes with a virtual worker
        x = ft.send(torch.arange(4.0), workers[0], workers[1], carol)
        assert torch.equal(await (x * 2).get(sum_results=True), torch.arange(4.0) * 6)
        # federate and fit on them
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(64, 5, generator=generator)
        labels = (images[:, 0] > 0).long()
        data = ft.federate((images, labels), workers, split="iid", seed=0)
        model = torch.nn.Linear(5, 2)
        before = model.weight.detach().clone()
        history = await ft.fit(model, data, rounds=1, batch_size=8, lr=0.5, progress=False)
        assert history[0].completed == ("local-0", "local-1")
        assert not torch.equal(model.weight, before)
        processes = workers.processes
        assert all(process.poll() is None for process in processes)
    assert [process.returncode for process in processes] == [0, 0]  # a clean SIGTERM shutdown


async def test_leaving_by_an_exception_or_a_cancel_stops_them_all() -> None:
    workers = ft.local_workers(2, threads=1)
    with pytest.raises(RuntimeError, match="boom"):
        async with workers:
            raise RuntimeError("boom")
    pids = workers.pids
    assert all(process.returncode is not None for process in workers.processes)
    assert _wait_gone(pids, 0) == []

    with anyio.CancelScope() as scope:
        async with ft.local_workers(1, threads=1) as workers:
            pids = workers.pids
            scope.cancel()
            await anyio.sleep_forever()
    assert scope.cancelled_caught
    assert all(process.returncode is not None for process in workers.processes)
    assert _wait_gone(pids, 0) == []


async def test_a_worker_that_fails_to_start_is_reported_with_its_stderr() -> None:
    group = ft.local_workers(2, threads=1, memory_quota=["1G", "lots"])
    with pytest.raises(ft.WorkerUnavailable, match=r"(?s)local-1 exited with status 2.*not a size"):
        await group.start()
    # the one that did start was stopped too
    assert all(process.returncode is not None for process in group.processes)


def test_options_become_worker_arguments() -> None:
    with pytest.raises(ValueError, match="sets 'port' itself"):
        ft.local_workers(1, port=8765)
    with pytest.raises(ValueError, match="2 values for 3 workers"):
        ft.local_workers(3, memory_quota=["1G", "2G"])
    group = ft.local_workers(2, datasets={"digits": "/data/d.pt"}, max_pending=10)
    assert group._arguments[1][2:] == [
        "--dataset", "digits=/data/d.pt", "--max-pending", "10", "--warm-up",
        "--batch-scheduling",
    ]  # fmt: skip
    assert "--warm-up" not in ft.local_workers(1, warm_up=False)._arguments[0]
    assert "--batch-scheduling" not in ft.local_workers(1, batch_scheduling=False)._arguments[0]


def test_the_blocking_twin() -> None:
    with sy.local_workers(1, threads=1) as workers:
        x = sy.send(torch.tensor([1.0, 2.0]), workers[0])
        assert torch.equal((x + 1).get(), torch.tensor([2.0, 3.0]))
        processes = workers.processes
    assert [process.returncode for process in processes] == [0]


PARENT = textwrap.dedent(
    """
    import anyio, sys, fedtensor as ft

    async def main():
        async with ft.local_workers(2, threads=1) as workers:
            print(*workers.pids, flush=True)
            await anyio.sleep_forever()

    anyio.run(main, backend="asyncio")
    """
)


def test_no_orphans_when_the_parent_is_killed() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    pids: list[int] = []
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()  # bounded: the workers' start_timeout, then it exits
        pids = [int(pid) for pid in line.split()]
        assert len(pids) == 2, parent.stderr.read() if parent.stderr else line
        assert not any(_gone(pid) for pid in pids)
        parent.send_signal(signal.SIGKILL)  # no clean-up code runs in the parent
        parent.wait(30)
        # the workers notice their pipe from the parent ended, and exit
        assert _wait_gone(pids, 30) == []
    finally:
        for pid in pids:  # whatever survived a failed test must not outlive it
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()
            parent.wait(30)
        for stream in (parent.stdout, parent.stderr):
            if stream is not None:
                stream.close()


def test_demo_parallel_trains_on_local_worker_processes() -> None:
    from fedtensor.demo import main

    out = io.StringIO()
    assert main(["--parallel", "--rounds", "1", "--epochs", "1", "--no-central"], out=out) == 0
    text = out.getvalue()
    assert "local worker processes (one per core)" in text
    assert f"local-{available_cores() - 1}:" in text
    assert "held-out accuracy after 1 rounds" in text


async def test_local_workers_form_a_federation_so_tensors_move_between_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Without a shared federation key, a move between two processes is refused
    # (CapabilityRefused): the group draws one for its workers.
    monkeypatch.delenv("FEDTENSOR_FEDERATION_KEY", raising=False)
    async with ft.local_workers(2, threads=1) as (bob, alice):
        x = ft.send(torch.arange(6.0), bob)
        moved = await x.move(alice)
        assert moved.location is alice
        assert torch.equal(await moved.get(), torch.arange(6.0))
