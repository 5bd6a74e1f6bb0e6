"""The fedtensor pytest plugin: ready workers for your own tests, with leak checks.

Installed with fedtensor (entry point ``pytest11``), it needs no set-up beyond
marking async tests for anyio (``pytestmark = pytest.mark.anyio``)::

    async def test_mean(ft_worker):
        x = ft.send(torch.tensor([1.0, 3.0]), ft_worker)
        assert await x.mean().get() == 2.0

Fixtures
--------
``ft_worker``
    An open :class:`~fedtensor.VirtualWorker` named ``"bob"``.
``ft_workers``
    A factory: ``await ft_workers("alice", timeout=5)`` opens one more worker.
``ft_encode``
    Whether the workers encode every batch to wire frames (default: the
    ``FEDTENSOR_MEMORY_ENCODE`` variable). Override it, e.g. parametrized over
    ``[False, True]``, to run tests against both paths.

Every worker these fixtures open is closed after the test, and the test fails
if objects are left on a worker (pointers still alive, or released without
effect), unless it is marked ``@pytest.mark.ft_keep_objects``.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest

from ._workers import VirtualWorker

__all__ = ["WorkerFactory", "ft_encode", "ft_worker", "ft_workers", "leftover_objects"]

WorkerFactory = Callable[..., Awaitable[VirtualWorker]]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "ft_keep_objects: do not fail the test for objects left on its workers"
    )


@pytest.fixture
def anyio_backend() -> str:
    """fedtensor's runtime is asyncio-based."""
    return "asyncio"


@pytest.fixture
def ft_encode() -> bool | None:
    """Whether fixture workers encode batches to wire frames (``None``: environment)."""
    return None


def leftover_objects(workers: list[VirtualWorker]) -> dict[str, dict[int, Any]]:
    """Objects still stored on ``workers`` once unreachable pointers are collected."""
    gc.collect()
    leftovers = {worker.id: dict(worker.objects) for worker in workers}
    return {worker: objects for worker, objects in leftovers.items() if objects}


@pytest.fixture
async def ft_workers(
    request: pytest.FixtureRequest, ft_encode: bool | None
) -> AsyncIterator[WorkerFactory]:
    """A factory of open virtual workers, closed (and leak-checked) after the test."""
    opened: list[VirtualWorker] = []
    async with AsyncExitStack() as stack:

        async def open_worker(id: str = "bob", **options: Any) -> VirtualWorker:
            options.setdefault("encode", ft_encode)
            worker = await stack.enter_async_context(VirtualWorker(id, **options))
            opened.append(worker)
            return worker

        yield open_worker
        if request.node.get_closest_marker("ft_keep_objects") is None:
            leftovers = leftover_objects(opened)
            if leftovers:
                pytest.fail(f"objects left on workers after the test: {leftovers}")


@pytest.fixture
async def ft_worker(ft_workers: WorkerFactory) -> VirtualWorker:
    """An open virtual worker named ``bob``."""
    return await ft_workers("bob")
