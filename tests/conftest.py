"""Every API test runs over every transport: in-memory objects, in-memory encoded frames,
and websockets to worker processes. In-process store tests run on both in-memory paths."""

from __future__ import annotations

import os

import pytest


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
