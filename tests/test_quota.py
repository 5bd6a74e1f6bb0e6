"""Memory quotas: the bytes of tensors one client may keep on a worker.

Each test fails on its own if the quota is not enforced (test_websocket's test_memory_quota is
a third): one asks a `fedtensor worker --memory-quota` process, so the option is seen to reach
the worker; the others ask a worker served in this process, whose count of a client's bytes is
read as well, to see it go down as objects are freed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import anyio
import pytest
import torch

import fedtensor as ft
from fedtensor.testing import WorkerProcess
from fedtensor.worker.budget import TENSOR_OVERHEAD
from fedtensor.worker.server import Limits, WorkerServer

pytestmark = pytest.mark.anyio

QUOTA = 256 << 10  # 262,144 bytes
FITS = 40_000  # float32 elements: 160,000 bytes, so one fits the quota and two do not
FITS_BYTES = 4 * FITS


async def test_a_worker_process_refuses_stores_past_its_quota_and_serves_on(
    ft_worker_processes: Callable[..., WorkerProcess],
) -> None:
    process = ft_worker_processes("quota", "--memory-quota", "256K")
    async with (
        ft.connect(process.url, token=process.token) as alice,
        ft.connect(process.url, token=process.token) as bob,
    ):
        first = ft.send(torch.ones(FITS), alice)
        assert torch.equal(await first, torch.ones(FITS))
        second = ft.send(torch.ones(FITS), alice)
        with pytest.raises(ft.LimitExceeded, match="memory quota of 262144 bytes"):
            await second
        computed = first * 2  # made on the worker: it counts as well
        with pytest.raises(ft.LimitExceeded, match="memory quota"):
            await computed
        # A quota is per client: bob stores as much while alice holds hers.
        theirs = ft.send(torch.ones(FITS), bob)
        assert torch.equal(await theirs.get(), torch.ones(FITS))
        # Alice is still served, and what she frees she may store again.
        small = ft.send(torch.arange(4.0), alice)
        assert torch.equal(await (small + 1).get(), torch.arange(4.0) + 1)
        assert torch.equal(await first.get(), torch.ones(FITS))
        again = ft.send(torch.ones(FITS), alice)
        assert torch.equal(await again.get(), torch.ones(FITS))
        del second, computed, small


@pytest.fixture
async def quota_server() -> AsyncIterator[WorkerServer]:
    """A worker served in this process with a 256 KiB quota per client."""
    server = WorkerServer("quota", token="t", limits=Limits(memory_quota=QUOTA), grace=5.0)
    async with anyio.create_task_group() as task_group:
        await task_group.start(server.serve, "127.0.0.1", 0)
        yield server
        server.shutdown()


def _stored_bytes(server: WorkerServer) -> int:
    """The bytes the worker counts against its one client's quota."""
    (peer,) = server._peers
    assert peer.session is not None
    return peer.session.memory_used


async def test_the_count_follows_what_is_stored_and_freed(quota_server: WorkerServer) -> None:
    assert quota_server.url is not None
    async with ft.connect(quota_server.url, token="t") as client:
        first = ft.send(torch.ones(FITS), client)
        assert torch.equal(await first, torch.ones(FITS))
        # A tensor costs its elements and the objects that hold them.
        assert _stored_bytes(quota_server) == FITS_BYTES + TENSOR_OVERHEAD
        second = ft.send(torch.ones(FITS), client)
        with pytest.raises(ft.LimitExceeded, match="memory quota"):
            await second
        # What was refused counts nothing.
        assert _stored_bytes(quota_server) == FITS_BYTES + TENSOR_OVERHEAD
        half = first[: FITS // 2]  # a view: its storage is counted once, with first's
        assert torch.equal(await half, torch.ones(FITS // 2))
        assert _stored_bytes(quota_server) == FITS_BYTES + 2 * TENSOR_OVERHEAD
        del half, second
        await client.object_ids(timeout=30)  # after the releases, which were sent first
        assert _stored_bytes(quota_server) == FITS_BYTES + TENSOR_OVERHEAD
        assert torch.equal(await first.get(), torch.ones(FITS))  # get() frees as well
        assert _stored_bytes(quota_server) == 0
        # With the bytes given back, the store refused before fits.
        again = ft.send(torch.ones(FITS), client)
        assert torch.equal(await again, torch.ones(FITS))
        assert _stored_bytes(quota_server) == FITS_BYTES + TENSOR_OVERHEAD
        del again
        await client.object_ids(timeout=30)
        assert _stored_bytes(quota_server) == 0


async def test_a_frame_larger_than_the_whole_quota_closes_that_connection(
    quota_server: WorkerServer,
) -> None:
    assert quota_server.url is not None
    async with ft.connect(quota_server.url, token="t") as client:
        # 1.6 MB: more than the quota and a message together could ever let it store
        too_big = ft.send(torch.ones(400_000), client)
        with pytest.raises(ft.LimitExceeded, match="exceeds the limit"):
            await too_big
        del too_big
    async with ft.connect(quota_server.url, token="t") as client:  # others are served
        x = ft.send(torch.ones(FITS), client)
        assert torch.equal(await x.get(), torch.ones(FITS))
