"""Every API test runs twice: objects passed in memory, and every batch encoded to wire frames."""

from __future__ import annotations

import pytest


@pytest.fixture(params=[False, True], ids=["objects", "encoded"])
def ft_encode(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)
