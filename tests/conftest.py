"""Every API test runs over every transport: in-memory objects, in-memory encoded frames,
and websockets to worker processes. In-process store tests run on both in-memory paths."""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
import torch
import trustme


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``slow`` run only with ``FEDTENSOR_SLOW=1`` (``./dev test --slow``)."""
    if os.environ.get("FEDTENSOR_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with ./dev test --slow (or FEDTENSOR_SLOW=1)")
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(skip)


@pytest.fixture(params=["objects", "encoded", "ws"])
def ft_transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=[False, True], ids=["objects", "encoded"])
def ft_encode(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


# -- TLS and raw sockets (tests/test_preauth.py, tests/test_tls_layer.py) --------------------------


@pytest.fixture(scope="module")
def authority() -> trustme.CA:
    """A certificate authority for the module's wss:// workers."""
    return trustme.CA()


@pytest.fixture
def client_tls(authority: trustme.CA) -> ssl.SSLContext:
    """A client context that trusts :func:`authority`."""
    context = ssl.create_default_context()
    authority.configure_trust(context)
    return context


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    """Raw sockets a test opens, closed after it."""
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


@pytest.fixture
def torch_threads() -> Iterator[Callable[[int], None]]:
    """Set torch's intra-op threads for the test: the setting before it is restored after."""
    threads = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(threads)


@pytest.fixture
def one_torch_thread(torch_threads: Callable[[int], None]) -> None:
    """Train on one torch thread (the setting is restored after).

    Small models gain nothing from a second thread, and while other processes share the
    cores, torch's threads spin waiting on one another: two epochs of the digits CNN
    (`train_centrally`, timed with `time.perf_counter`) took 12.9 s on two threads and
    3.8 s on one, to the same accuracy, at a load average of 10 on this 2-core machine.
    """
    torch_threads(1)


@pytest.fixture
def frames_sent() -> Callable[[Sequence[Any]], dict[str, list[list[str]]]]:
    """Spy on worker handles' connections: the kinds of messages (``"Call"``, ``"Fetch"``,
    ...) of every frame each sends, by worker id (a list the test may clear)."""

    def spy_on(workers: Sequence[Any]) -> dict[str, list[list[str]]]:
        frames: dict[str, list[list[str]]] = {}
        for worker in workers:
            connection = worker.client._connection
            assert connection is not None
            send = connection.send
            seen = frames[worker.id] = []

            def spy(batch: Any, send: Any = send, seen: list[list[str]] = seen) -> None:
                seen.append([type(message).__name__ for message in batch])
                send(batch)

            connection.send = spy
        return frames

    return spy_on
