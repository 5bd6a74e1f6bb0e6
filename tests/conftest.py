"""Every API test runs over every transport: in-memory objects, in-memory encoded frames,
and websockets to worker processes. In-process store tests run on both in-memory paths."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["objects", "encoded", "ws"])
def ft_transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=[False, True], ids=["objects", "encoded"])
def ft_encode(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)
