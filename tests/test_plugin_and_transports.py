"""The pytest plugin's fixtures and leak check, and third-party transports."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import pytest
import torch

import fedtensor as ft
from fedtensor.abc import Connection, ReplySink, Transport
from fedtensor.testing import WorkerFactory
from fedtensor.transports.memory import MemoryTransport

pytest_plugins = ["pytester"]

USER_TESTS = """
import pytest, torch
import fedtensor as ft

pytestmark = pytest.mark.anyio

async def test_clean(ft_worker):
    x = ft.send(torch.ones(2), ft_worker)
    assert torch.equal(await (x * 2).get(), torch.full((2,), 2.0))

LEAKED = []

async def test_leaky(ft_worker):
    LEAKED.append(ft.send(torch.ones(2), ft_worker))

@pytest.mark.ft_keep_objects
async def test_leaky_on_purpose(ft_worker):
    LEAKED.append(ft.send(torch.ones(2), ft_worker))

async def test_two_workers(ft_workers):
    bob, alice = await ft_workers("bob"), await ft_workers("alice", timeout=5)
    m = ft.send(torch.arange(3), bob, alice)
    assert torch.equal(await m.get(sum_results=True), torch.arange(3) * 2)
"""


def test_plugin_gives_workers_and_catches_leaks(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest_subprocess("-p", "anyio", "-W", "ignore::UserWarning")
    result.assert_outcomes(passed=4, errors=1)
    result.stdout.fnmatch_lines(["*test_leaky*objects left on workers*"])


class _CountingConnection(Connection):
    """Wraps another connection and records the size of every batch it sends."""

    in_process: ClassVar[bool] = True

    def __init__(self, inner: Connection, batches: list[int]) -> None:
        self._inner = inner
        self._batches = batches

    def send(self, batch: Sequence[Any]) -> None:
        self._batches.append(len(batch))
        self._inner.send(batch)

    def drain(self) -> None:
        self._inner.drain()

    async def aclose(self) -> None:
        await self._inner.aclose()


class _Recording(Transport):
    """A third-party transport: in-memory under its own scheme, counting batches."""

    schemes: ClassVar[tuple[str, ...]] = ("recording",)
    batches: ClassVar[list[int]] = []

    async def connect(
        self, url: str, sink: ReplySink, *, timeout: float, **options: Any
    ) -> Connection:
        memory_url = url.replace("recording://", "memory://")
        inner = await MemoryTransport().connect(memory_url, sink, timeout=timeout, **options)
        return _CountingConnection(inner, self.batches)


@pytest.mark.anyio
async def test_registered_transport_serves_its_scheme(ft_virtual_workers: WorkerFactory) -> None:
    await ft_virtual_workers("bob")
    assert issubclass(_Recording, Transport)
    ft.register_transport(_Recording)
    async with ft.connect("recording://bob") as bob:
        x = ft.send(torch.zeros(3), bob)
        for _ in range(50):
            x = x + 1
        assert torch.equal(await x.get(), torch.full((3,), 50.0))
    # 50 pipelined operations (and the releases between them) travelled in one batch.
    assert _Recording.batches[0] > 50
