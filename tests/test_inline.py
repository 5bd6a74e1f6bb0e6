"""Inline execution on a threaded worker: :meth:`WorkerActor.run_inline` and :func:`is_cheap`.

A threaded :class:`WorkerActor` runs the provably cheap prefix of a batch on the caller's
thread while its actor is idle, and queues the rest (from the first command that is not
cheap on) to its mailbox, keeping the order of commands. These tests drive the actor
directly: most of them never start its thread, so whatever ``run_inline`` queued stays
visible in ``session.pending`` until a test starts the thread to run it.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import torch

from fedtensor.protocol.messages import (
    Call,
    Failure,
    Fetch,
    ListObjects,
    Message,
    Ref,
    Release,
    Reply,
    Store,
)
from fedtensor.worker.actor import Failed, Session, WorkerActor
from fedtensor.worker.budget import TENSOR_OVERHEAD as O
from fedtensor.worker.inline import is_cheap

WAIT = 30.0  # seconds: a generous bound on every wait, never a pause


class Replies:
    """A session's ``deliver``: records replies, the thread that delivered them, and wakes
    a waiter once the number of replies it asked for has arrived."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.replies: list[Message] = []
        self.batches: list[list[Message]] = []
        self.threads: list[threading.Thread] = []
        self.lost: list[BaseException] = []
        self._wanted = 0
        self._arrived = threading.Event()

    def deliver(self, replies: list[Message]) -> None:
        with self._lock:
            self.replies += replies
            self.batches.append(list(replies))
            self.threads.append(threading.current_thread())
            if len(self.replies) >= self._wanted:
                self._arrived.set()

    def on_lost(self, error: BaseException) -> None:
        self.lost.append(error)

    def wait_for(self, count: int) -> list[Message]:
        """Wait (at most WAIT seconds) until ``count`` replies arrived in all; return them."""
        with self._lock:
            self._wanted = count
            if len(self.replies) >= count:
                self._arrived.set()
            else:
                self._arrived.clear()
        assert self._arrived.wait(WAIT), f"{len(self.replies)} replies of {count} arrived"
        with self._lock:
            return list(self.replies)


class Harness:
    """A threaded actor whose thread starts only when a test says so, and one session."""

    def __init__(self) -> None:
        self.actor = WorkerActor("w", threaded=True)
        self.replies = Replies()
        self.session: Session = self.actor.open_session(
            self.replies.deliver, self.replies.on_lost, aliases_values=True
        )
        self.thread: threading.Thread | None = None

    def start(self) -> threading.Thread:
        """Start the actor's thread: it runs what is queued, then waits for more."""
        assert self.thread is None
        self.thread = threading.Thread(target=self.actor.serve_in_thread, daemon=True)
        self.thread.start()
        return self.thread

    def settle(self) -> None:
        """Wait until the actor ran everything queued so far and is idle again."""
        done = threading.Event()
        # The barrier's callback runs once every lane before it is idle (the scheduler).
        self.actor.barrier(done.set)
        assert done.wait(WAIT)

    def close(self) -> None:
        self.actor.close()
        if self.thread is not None:
            self.thread.join(WAIT)
            assert not self.thread.is_alive()


@pytest.fixture
def harness() -> Iterator[Harness]:
    made = Harness()
    try:
        yield made
    finally:
        made.close()


def same(actual: Any, expected: Any) -> bool:
    if isinstance(expected, torch.Tensor):
        return (
            isinstance(actual, torch.Tensor)
            and actual.dtype == expected.dtype
            and torch.equal(actual, expected)
        )
    return bool(actual == expected)


def assert_replies(replies: Sequence[Message], expected: Sequence[tuple[int, Any]]) -> None:
    """``replies`` are :class:`Reply` objects answering ``expected``'s (request, value)s."""
    assert [type(reply) for reply in replies] == [Reply] * len(expected), replies
    for reply, (request, value) in zip(replies, expected, strict=True):
        assert isinstance(reply, Reply)
        assert reply.request == request
        assert same(reply.value, value), (request, reply.value, value)


def add(id_: int, left: Any, right: Any) -> Call:
    return Call(id_, "Tensor.__add__", (left, right), {})


# -- cheap batches run at once --------------------------------------------------------------------


def test_a_cheap_batch_runs_at_once_without_the_actor_thread(harness: Harness) -> None:
    session = harness.session
    harness.actor.run_inline(
        session,
        [Store(1, torch.arange(4.0)), add(2, Ref(1), 1), Fetch(10, 2, True)],
    )
    # No thread ever ran the mailbox: the reply can only have come from run_inline.
    assert_replies(harness.replies.replies, [(10, torch.arange(4.0) + 1)])
    assert harness.replies.threads == [threading.current_thread()]
    assert session.pending == 0
    assert session.submitted == 0
    assert sorted(session.objects) == [1]  # 2 was fetched with free=True
    assert torch.equal(session.objects[1], torch.arange(4.0))


def test_replies_of_an_inline_prefix_arrive_together_as_copies(harness: Harness) -> None:
    session = harness.session
    stored = torch.arange(6.0).reshape(2, 3)
    harness.actor.run_inline(
        session,
        [
            Store(1, stored),
            Call(2, "Tensor.sum", (Ref(1),), {"dim": 1}),
            Fetch(20, 1, False),
            Fetch(21, 2, False),
            Release((2,)),
            Fetch(22, 2, False),
        ],
    )
    replies = harness.replies
    assert len(replies.batches) == 1  # one deliver call for the whole prefix
    assert_replies(replies.replies[:2], [(20, stored), (21, torch.tensor([3.0, 12.0]))])
    gone = replies.replies[2]
    assert isinstance(gone, Failure)
    assert (gone.request, gone.kind) == (22, "not_found")
    first = replies.replies[0]
    assert isinstance(first, Reply)
    # aliases_values: the reply shares no memory with the store.
    assert first.value.data_ptr() != session.objects[1].data_ptr()
    assert sorted(session.objects) == [1]
    assert session.pending == 0


def test_inline_commands_run_on_the_callers_thread_when_the_actor_is_idle(
    harness: Harness,
) -> None:
    harness.start()
    harness.settle()
    harness.actor.run_inline(harness.session, [Store(1, 5), Fetch(30, 1, False)])
    # Delivered before run_inline returned, and by this thread, not the actor's.
    assert_replies(harness.replies.replies, [(30, 5)])
    assert harness.replies.threads == [threading.current_thread()]
    assert harness.session.pending == 0


def test_failures_of_inline_commands_are_stored_and_fetched_as_failures(
    harness: Harness,
) -> None:
    harness.actor.run_inline(
        harness.session,
        [
            add(2, Ref(1), 1),  # 1 was never stored
            Fetch(40, 2, False),
            Store(3, torch.ones(2)),
            Call(4, "Tensor.__matmul__", (Ref(3), Ref(3)), {}),
            Call(5, "Tensor.__matmul__", (Ref(3), torch.ones(3)), {}),  # a shape error
            Fetch(41, 5, False),
            Fetch(42, 4, False),
        ],
    )
    replies = harness.replies.replies
    assert len(replies) == 3
    first, second, third = replies
    assert isinstance(first, Failure)
    assert (first.request, first.kind, first.error_type) == (40, "not_found", "ObjectNotFound")
    assert isinstance(second, Failure)
    assert (second.request, second.kind, second.error_type) == (41, "remote", "RuntimeError")
    assert_replies([third], [(42, torch.tensor(2.0))])
    assert type(harness.session.objects[2]) is Failed
    assert harness.session.pending == 0


def test_nothing_runs_inline_once_the_actor_is_closed(harness: Harness) -> None:
    session = harness.session
    harness.actor.close()
    assert session.closed
    assert len(harness.replies.lost) == 1
    harness.actor.run_inline(session, [Store(1, 1), Fetch(50, 1, False)])
    assert harness.replies.replies == []
    assert session.objects == {}
    assert session.pending == 0  # a closed session queues nothing either


# -- the first expensive command and all after it go to the mailbox -------------------------------


def run_split(
    harness: Harness,
    batch: Sequence[Message],
    *,
    inline: int,
    inline_replies: Sequence[tuple[int, Any]],
    queued_replies: Sequence[tuple[int, Any]],
) -> None:
    """Run ``batch``: its first ``inline`` commands must run at once, the rest queued."""
    session = harness.session
    harness.actor.run_inline(session, batch)
    assert session.pending == len(batch) - inline
    assert_replies(harness.replies.replies, inline_replies)
    assert harness.replies.threads == ([threading.current_thread()] if inline_replies else [])
    actor_thread = harness.start()
    everything = harness.replies.wait_for(len(inline_replies) + len(queued_replies))
    assert_replies(everything, [*inline_replies, *queued_replies])
    assert harness.replies.threads[-1] is actor_thread
    harness.settle()
    assert session.pending == 0


def test_a_large_matmul_and_what_follows_it_are_queued(harness: Harness) -> None:
    generator = torch.Generator().manual_seed(0)
    # Small integers: every product and sum is exact, whatever order the kernel adds in.
    a = torch.randint(-3, 4, (512, 512), generator=generator).float()
    b = torch.randint(-3, 4, (512, 512), generator=generator).float()
    small = torch.arange(3.0)
    run_split(
        harness,
        [
            Store(1, a),  # a Store is cheap, whatever its size
            Store(2, b),
            Store(3, small),
            Fetch(60, 3, False),
            Call(4, "torch.matmul", (Ref(1), Ref(2)), {}),  # 512**4 elements: not cheap
            add(5, Ref(3), 1),  # cheap, but after the matmul: order is kept
            Fetch(61, 5, False),
            Call(6, "Tensor.__getitem__", (Ref(4), (7, 9)), {}),  # reads the matmul's result
            Fetch(62, 6, True),
            Fetch(63, 4, True),
        ],
        inline=4,
        inline_replies=[(60, small)],
        queued_replies=[(61, small + 1), (62, (a @ b)[7, 9]), (63, a @ b)],
    )


def test_an_operation_outside_the_inline_set_and_what_follows_it_are_queued(
    harness: Harness,
) -> None:
    small = torch.arange(4.0)
    run_split(
        harness,
        [
            Store(1, small),
            Call(2, "Tensor.repeat", (Ref(1), 2), {}),  # its int argument sizes the result
            Store(1, torch.zeros(1)),  # replaces 1 only after the repeat read it
            Fetch(70, 2, False),
            Fetch(71, 1, False),
        ],
        inline=1,
        inline_replies=[],
        queued_replies=[(70, small.repeat(2)), (71, torch.zeros(1))],
    )


def test_a_fetch_of_over_64_kib_and_what_follows_it_are_queued(harness: Harness) -> None:
    large = torch.arange(16385, dtype=torch.float32)  # 65540 bytes
    fits = torch.arange(16384, dtype=torch.float32)  # 65536 bytes: still cheap
    run_split(
        harness,
        [
            Store(1, large),
            Store(2, fits),
            Fetch(80, 2, True),
            Fetch(81, 1, False),
            Release((1,)),
            ListObjects(82),
        ],
        inline=3,
        inline_replies=[(80, fits)],
        queued_replies=[(81, large), (82, [])],
    )


def test_a_broadcast_over_the_bound_is_queued(harness: Harness) -> None:
    column = torch.arange(1024.0).reshape(1024, 1)
    row = torch.arange(1024.0).reshape(1, 1024)
    run_split(
        harness,
        [
            Store(1, column),
            Store(2, row),
            Store(3, column[:256]),
            Store(4, row[:, :256]),
            add(5, Ref(3), Ref(4)),  # 256 * 256 = 65536: at the bound, cheap
            Call(6, "Tensor.sum", (Ref(5),), {}),
            Fetch(90, 6, True),
            add(7, Ref(1), Ref(2)),  # 1024 * 1024: a million-element result
            Call(8, "Tensor.sum", (Ref(7),), {}),
            Fetch(91, 8, True),
        ],
        inline=7,
        inline_replies=[(90, (column[:256] + row[:, :256]).sum())],
        queued_replies=[(91, (column + row).sum())],
    )


def test_nothing_runs_inline_while_a_batch_is_queued(harness: Harness) -> None:
    session = harness.session
    first, second = torch.arange(3.0), torch.arange(3.0) * 10
    session.submit([Store(1, first), Fetch(100, 1, False)])  # no thread: it stays queued
    assert session.pending == 2
    harness.actor.run_inline(session, [Store(1, second), Fetch(101, 1, False)])
    assert harness.replies.replies == []
    assert session.objects == {}
    assert session.pending == 4
    actor_thread = harness.start()
    assert_replies(harness.replies.wait_for(2), [(100, first), (101, second)])
    assert harness.replies.threads == [actor_thread, actor_thread]
    harness.settle()
    assert session.pending == 0
    # Idle again: the next cheap batch runs inline.
    harness.actor.run_inline(session, [Fetch(102, 1, False)])
    assert_replies(harness.replies.replies[2:], [(102, second)])
    assert harness.replies.threads[2] is threading.current_thread()


def test_another_sessions_queued_batch_does_not_block_inline_runs(harness: Harness) -> None:
    # Each client has a lane of its own (worker/scheduler.py): another client's queued
    # work is no reason to send this one's cheap commands to a compute thread.
    other = Replies()
    other_session = harness.actor.open_session(other.deliver, other.on_lost, aliases_values=True)
    other_session.submit([Store(1, 1), Fetch(110, 1, False)])
    harness.actor.run_inline(harness.session, [Store(1, 2), Fetch(111, 1, False)])
    assert_replies(harness.replies.replies, [(111, 2)])
    assert harness.replies.threads == [threading.current_thread()]
    assert harness.session.pending == 0
    assert other.replies == []
    harness.start()
    assert_replies(other.wait_for(1), [(110, 1)])


def test_at_most_64_commands_run_inline_per_batch(harness: Harness) -> None:
    session = harness.session
    batch = [Store(id_, torch.tensor(float(id_))) for id_ in range(100)]
    harness.actor.run_inline(session, [*batch, ListObjects(120)])
    assert session.pending == 37  # 36 stores and the ListObjects
    assert sorted(session.objects) == list(range(64))
    assert harness.replies.replies == []
    harness.start()
    assert_replies(harness.replies.wait_for(1), [(120, list(range(100)))])
    harness.settle()
    assert session.pending == 0


def test_a_batch_of_100_cheap_stores_leaves_36_pending(harness: Harness) -> None:
    session = harness.session
    harness.actor.run_inline(session, [Store(id_, id_) for id_ in range(100)])
    assert session.pending == 36
    assert len(session.objects) == 64
    harness.start()
    harness.settle()
    assert session.pending == 0
    assert session.objects == {id_: id_ for id_ in range(100)}


# -- what counts as cheap -------------------------------------------------------------------------


def big(elements: int = 1 << 20) -> torch.Tensor:
    return torch.zeros(elements)


def with_grad() -> torch.Tensor:
    leaf = torch.ones(4, requires_grad=True)
    leaf.grad = torch.ones(4)
    return leaf


STORE: dict[int, Any] = {
    1: torch.ones(4),
    2: big(),
    3: torch.zeros(16384),  # 65536 bytes
    4: torch.zeros(16385),  # 65540 bytes
    5: [torch.ones(1)],
    6: (1, 2),
    7: 3,
    8: 2.5,
    9: True,
    10: "text",
    11: Failed("remote", "ValueError", "no"),
    12: torch.ones(256, 1),
    13: torch.ones(1, 256),
    14: torch.ones(1, 257),
    15: torch.zeros(0),
    16: torch.ones(65537),
    17: {"a": 1},
}

CHEAP = [
    Store(1, big()),
    Store(2, "anything"),
    Release((1, 2, 99)),
    Fetch(1, 1, False),
    Fetch(1, 3, True),
    Fetch(1, 7, False),
    Fetch(1, 8, False),
    Fetch(1, 9, False),
    Fetch(1, 11, False),
    Fetch(1, 99, False),  # missing: answered with a Failure, at once
    add(20, Ref(1), 1),
    add(20, Ref(12), Ref(13)),  # 65536: at the bound
    add(20, Ref(15), Ref(1)),  # an empty tensor counts as one element
    Call(20, "torch.add", (Ref(1),), {"other": Ref(1), "alpha": 2}),
    Call(20, "torch.matmul", (Ref(12), Ref(13)), {}),
    Call(20, "Tensor.__getitem__", (Ref(1), (0,)), {}),
    Call(20, "Tensor.__getitem__", (Ref(1), [0, 1]), {}),  # a flat list of ints
    Call(20, "Tensor.view", (Ref(1), 2, 2), {}),
    Call(20, "Tensor.sum", (Ref(99),), {}),  # a missing input fails at once
    Call(20, "torch.where", (Ref(1), Ref(1), Ref(1)), {}),  # 4 ** 3
]

NOT_CHEAP = [
    Fetch(1, 2, False),
    Fetch(1, 4, True),
    Fetch(1, 5, False),  # a list
    Fetch(1, 6, False),  # a tuple
    Fetch(1, 10, False),  # a string
    Fetch(1, 17, False),  # a dict
    ListObjects(1),
    Reply(1, 2),
    Failure(1, "remote", "ValueError", "no"),
    add(20, Ref(2), 1),
    add(20, Ref(12), Ref(14)),  # 256 * 257 > 65536
    add(20, Ref(16), 1),  # 65537 elements
    Call(20, "Tensor.repeat", (Ref(1), 2), {}),
    Call(20, "Tensor.expand", (Ref(1), 4, 4), {}),
    Call(20, "torch.cat", ([Ref(1), Ref(1)],), {}),
    Call(20, "os.system", ("true",), {}),
    Call(20, "Tensor.__getitem__", (Ref(1), ([0, 1], [1, 0])), {}),  # nested lists
    Call(20, "torch.add", ([[1.0, 2.0], [3.0, 4.0]], 1), {}),  # a nested list argument
    Call(20, "Tensor.__add__", (Ref(5), 1), {}),  # a stored list
    Call(20, "Tensor.__add__", (Ref(6), 1), {}),  # a stored tuple
    Call(20, "torch.add", (Ref(1),), {"other": Ref(2)}),  # a large keyword argument
    Call(20, "torch.matmul", (Ref(2), Ref(1)), {}),
]


@pytest.mark.parametrize("message", CHEAP, ids=repr)
def test_is_cheap_says_true(message: Message) -> None:
    assert is_cheap(STORE, message) is True


@pytest.mark.parametrize("message", NOT_CHEAP, ids=repr)
def test_is_cheap_says_false(message: Message) -> None:
    assert is_cheap(STORE, message) is False


def test_is_cheap_counts_an_empty_tensor_as_one_element() -> None:
    assert is_cheap(STORE, add(20, Ref(15), Ref(16))) is False  # 1 * 65537
    assert is_cheap({1: torch.zeros(0), 2: torch.ones(65536)}, add(3, Ref(1), Ref(2))) is True


def test_is_cheap_refuses_a_fetch_of_a_tensor_with_a_grad() -> None:
    assert is_cheap({1: with_grad()}, Fetch(1, 1, False)) is False


def test_is_cheap_reads_no_grad_of_a_non_leaf_tensor() -> None:
    """A small non-leaf result is cheap to fetch, and judging it must not warn.

    ``Tensor.grad`` of a non-leaf warns (a UserWarning). :func:`snapshot` and
    :func:`tensor_bytes` check ``is_leaf`` first; so must ``is_cheap``.
    """
    leaf = torch.ones(4, requires_grad=True)
    result = leaf * 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cheap = is_cheap({1: result}, Fetch(1, 1, False))
    assert [str(warning.message) for warning in caught] == []
    assert cheap is True


def test_an_inline_fetch_of_a_non_leaf_result_is_answered(harness: Harness) -> None:
    """Store a leaf that requires grad, compute with it, fetch the result: all inline."""
    leaf = torch.ones(4, requires_grad=True)
    harness.actor.run_inline(
        harness.session,
        [Store(1, leaf), Call(2, "Tensor.__mul__", (Ref(1), 2), {}), Fetch(130, 2, False)],
    )
    replies = harness.replies.replies
    assert len(replies) == 1, "the batch was dropped"
    [reply] = replies
    assert isinstance(reply, Reply)
    assert reply.request == 130
    assert torch.equal(reply.value.detach(), torch.full((4,), 2.0))
    assert harness.session.pending == 0


# -- the memory quota: the one dispatch with its accounting hook ----------------------------------


def quota_session(harness: Harness, quota: int | None) -> tuple[Session, Replies]:
    replies = Replies()
    session = harness.actor.open_session(
        replies.deliver, replies.on_lost, aliases_values=True, memory_quota=quota
    )
    return session, replies


def floats(count: int, value: float = 0.0) -> torch.Tensor:
    return torch.full((count,), value)  # 4 bytes an element


def test_the_memory_quota_counts_every_store_replacement_release_and_freeing_fetch(
    harness: Harness,
) -> None:
    # Each tensor costs its bytes and O for its objects (fedtensor.worker.budget).
    session, replies = quota_session(harness, 100 + 2 * O)
    run = harness.actor.run_inline
    run(session, [Store(1, floats(20)), Store(2, floats(5)), Store(3, floats(1))])
    assert session.memory_used == 100 + 2 * O  # 80 + 20: at the quota, the third refused
    refused = session.objects[3]
    assert type(refused) is Failed
    assert (refused.kind, refused.error_type) == ("limit", "MemoryQuotaExceeded")
    # Replacing an object uncounts what it replaces: 80 bytes for 80, not 160.
    run(session, [Store(1, floats(20, 1.0))])
    assert torch.equal(session.objects[1], floats(20, 1.0))
    assert session.memory_used == 100 + 2 * O
    run(session, [Release((2,)), Call(4, "Tensor.sum", (Ref(1),), {})])
    assert session.memory_used == 84 + 2 * O  # 20 released, the 4-byte sum counted
    run(session, [Fetch(140, 1, False)])  # a copy: nothing is freed
    assert session.memory_used == 84 + 2 * O
    run(session, [Fetch(141, 1, True), Store(5, floats(24))])  # 80 freed, 96 stored
    assert session.memory_used == 100 + 2 * O
    run(session, [add(6, Ref(5), 1), Fetch(142, 6, False)])  # a result over the quota
    assert session.memory_used == 100 + 2 * O
    failure = replies.replies[-1]
    assert isinstance(failure, Failure)
    assert (failure.request, failure.kind, failure.error_type) == (
        142,
        "limit",
        "MemoryQuotaExceeded",
    )
    assert session.pending == 0  # all of it ran inline, through the same dispatch


@pytest.mark.parametrize("quota", [None, 1 << 20], ids=["no quota", "quota"])
def test_a_call_may_replace_the_object_it_reads_with_or_without_a_quota(
    harness: Harness, quota: int | None
) -> None:
    session, replies = quota_session(harness, quota)
    harness.actor.run_inline(
        session, [Store(1, torch.arange(3.0)), add(1, Ref(1), 1), Fetch(150, 1, False)]
    )
    assert_replies(replies.replies, [(150, torch.arange(3.0) + 1)])
    # Without a quota nothing is counted: the hook is not called at all.
    assert session.memory_used == (0 if quota is None else 12 + O)
