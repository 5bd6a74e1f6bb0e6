"""The frame fuzzes at scale: at least 100,000 hypothesis examples each (issue 12).

Slow (minutes), so marked ``slow`` and skipped unless ``FEDTENSOR_SLOW=1`` (``./dev test
--slow`` sets it); the quick runs of the same fuzzes, with their small example counts, stay
in the default suite. ``FEDTENSOR_FUZZ_EXAMPLES=N`` sets the count (for a shorter check).

- The codec: mutated valid frames and random bytes are decoded or rejected with
  ``ProtocolError``, nothing else. The very test bodies of ``tests/test_codec.py``, run
  with more examples.
- The websocket parser: any split of valid traffic gives the same messages, and arbitrary
  bytes give events or a ``Violation``, never an allocation past the limit. The test
  bodies of ``tests/test_wsframes.py``.
- A worker process: mutated and truncated frames over websockets are answered (if still
  valid) or close the connection with 1007, 1008 or 1009 and a reason; the worker keeps
  serving a well-formed client. Built on ``tests/test_codec.py``'s valid frames and
  ``tests/test_websocket.py``'s worker with small limits.
"""

from __future__ import annotations

import asyncio
import os
import types
from collections.abc import Callable
from typing import Any

import pytest
import test_codec
import test_websocket
import test_wsframes
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_websocket import strict_worker  # noqa: F401  (a fixture, used by name)
from websockets.asyncio.client import connect as raw_connect
from websockets.exceptions import ConnectionClosed

import fedtensor as ft
from fedtensor.protocol.chunks import START, WHOLE
from fedtensor.protocol.codec import decode_frame
from fedtensor.protocol.messages import Failure, Fetch, Reply
from fedtensor.testing import WorkerProcess

EXAMPLES = int(os.environ.get("FEDTENSOR_FUZZ_EXAMPLES", "100000"))

pytestmark = [pytest.mark.slow, pytest.mark.timeout(4 * 3600)]

_MANY = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,  # 100,000 examples in the example database would be clutter
)


def _with_many_examples(test: Any) -> Callable[[], None]:
    """A hypothesis test of another module, again: its body and its strategies, with
    :data:`EXAMPLES` examples."""
    inner = test.hypothesis.inner_test
    # The same code as a new function: the original carries its own settings.
    body = types.FunctionType(
        inner.__code__, inner.__globals__, inner.__name__, inner.__defaults__, inner.__closure__
    )
    return _MANY(given(**test.hypothesis._given_kwargs)(body))  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "test",
    [
        test_codec.test_random_mutations_are_decoded_or_rejected,
        test_codec.test_random_bytes_are_decoded_or_rejected,
        test_wsframes.test_any_split_of_the_traffic_gives_the_same_payloads,
        test_wsframes.test_arbitrary_bytes_give_events_or_a_violation_and_nothing_else,
    ],
    ids=lambda test: test.__name__,
)
def test_a_quick_fuzz_holds_for_many_examples(test: Any) -> None:
    # The test's own body and strategies; only the number of examples changes.
    _with_many_examples(test)()


def test_a_worker_survives_many_fuzzed_frames(strict_worker: WorkerProcess) -> None:  # noqa: F811
    loop = asyncio.new_event_loop()
    headers = test_websocket._headers(strict_worker)
    valid = [bytes(frame) for frame in test_codec.valid_frames()]
    outcomes = {"answered": 0, "closed": 0}

    async def exchange(message: bytes) -> bytes | str | ConnectionClosed:
        async with asyncio.timeout(30):
            async with raw_connect(strict_worker.url, additional_headers=headers) as ws:
                await ws.send(message)
                await ws.send(test_websocket._frame_message(Fetch(99, 1, False)))
                try:
                    return await ws.recv()
                except ConnectionClosed as closed:
                    return closed

    @_MANY
    @given(
        st.sampled_from(valid),
        st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=6),
        st.integers(0, 400),
    )
    def fuzz(frame: bytes, flips: list[tuple[int, int]], cut: int) -> None:
        data = bytearray(bytes([WHOLE]) + frame)
        for position, value in flips:
            if position < len(data):
                data[position] = value
        data = data[: max(1, len(data) - cut)]
        if data[0] == START and len(data) == 9:
            return  # a split frame's header: the worker rightly waits for the rest
        outcome = loop.run_until_complete(exchange(bytes(data)))
        if isinstance(outcome, ConnectionClosed):
            outcomes["closed"] += 1
            assert outcome.rcvd is not None, f"{bytes(data)!r}: no close frame"
            assert outcome.rcvd.code in (1007, 1008, 1009), (bytes(data), outcome.rcvd)
            assert outcome.rcvd.reason, bytes(data)
        else:
            outcomes["answered"] += 1
            assert isinstance(outcome, bytes), (bytes(data), outcome)
            assert outcome[0] == WHOLE, (bytes(data), outcome)
            replies = decode_frame(outcome[1:])
            assert replies, bytes(data)
            assert all(isinstance(reply, Reply | Failure) for reply in replies), replies

    async def still_serves() -> None:
        async with ft.connect(strict_worker.url, token=strict_worker.token, timeout=30) as client:
            x = ft.send(torch.arange(4.0), client)
            assert torch.equal(await (x * 2).get(), torch.arange(4.0) * 2)

    try:
        fuzz()
        loop.run_until_complete(still_serves())
    finally:
        loop.close()
    assert outcomes["answered"], outcomes
    assert outcomes["closed"], outcomes
