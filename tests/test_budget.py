"""The memory budget per client (issue 12, "memory the limits do not bound").

- Stored values of every kind count against a client's quota, not only tensor bytes:
  Python containers, numbers and strings by an estimate never below what they take,
  tensors once per storage (a small view of a large tensor costs the large tensor).
- An operation is refused before it allocates past the quota: its output size comes
  from a run on meta tensors (``repeat``), or, for operations whose output size
  depends on the data (``tolist``, ``nonzero``), from a bound on their inputs; plans
  (``fedtensor.local_update``) node by node.
- Replies a client does not read are bounded: past ``READ_AHEAD`` bytes of them, the
  client's commands wait (its session is parked) until it reads; other clients are
  served on. Checked against a ``fedtensor worker`` process with default options,
  whose resident memory is read from ``/proc``.
- A worker started with default options has a budget (a quarter of the machine's
  memory), and a client killed mid-upload leaves nothing behind.
- fedtensor's own operations whose allocation is not bounded by their inputs are
  sized before they run: ``run_plan`` and ``evaluate`` by a dry run of their plan,
  ``search`` by the objects it may list; tags and descriptions count.
- A worker at rest gives back what traffic made it keep: the buffer pool is emptied
  once the last client has left, and it keeps one allocator arena for its threads.

The in-process tests drive a :class:`WorkerActor` and its sessions directly.
"""

from __future__ import annotations

import asyncio
import gc
import os
import platform
import resource
import socket
import struct
import subprocess
import sys
import threading
import tracemalloc
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import anyio
import pytest
import torch

import fedtensor as ft
from fedtensor.protocol import plan as wire_plan
from fedtensor.protocol.chunks import START, split_frame
from fedtensor.protocol.codec import decode_frame, decoded_bound, encode_frame, frame_bytes
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
from fedtensor.protocol.pool import POOL
from fedtensor.protocol.wsframes import Opcode, header
from fedtensor.testing import WorkerProcess
from fedtensor.worker import budget
from fedtensor.worker.actor import Session, WorkerActor
from fedtensor.worker.budget import (
    TENSOR_OVERHEAD,
    Replies,
    default_budget,
    python_bytes,
)
from fedtensor.worker.server import READ_AHEAD, Limits, WorkerServer, _ServerPeer

pytestmark = pytest.mark.anyio

MIB = 1 << 20
QUOTA = 10 * MIB


def _session(actor: WorkerActor, quota: int | None = QUOTA) -> Session:
    return actor.open_session(_ignore, _ignore, aliases_values=True, memory_quota=quota)


def _ignore(*_: Any) -> None:
    pass


def _run(actor: WorkerActor, session: Session, *batch: Message) -> list[Message]:
    return actor.execute(session, batch)


def _failure(reply: Message) -> Failure:
    assert isinstance(reply, Failure), reply
    return reply


def _peak_rss() -> int:
    """This process's peak resident memory so far, in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- stored values of every kind -------------------------------------------------------------------


def test_python_values_are_estimated_at_no_less_than_they_take() -> None:
    cases = {
        "empty lists": lambda: [[] for _ in range(20_000)],
        "floats": lambda: [float(i) + 0.5 for i in range(20_000)],
        "ints": lambda: list(range(10**6, 10**6 + 20_000)),
        "strings": lambda: {f"key {i}": "x" * (i % 50) for i in range(5_000)},
        "nested": lambda: [(i, [i + 0.5], {"a": str(i)}) for i in range(5_000)],
        "bytes": lambda: [bytes(i % 300) for i in range(5_000)],
    }
    for name, make in cases.items():
        tracemalloc.start()
        try:
            value = make()
            taken, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        estimate = python_bytes(value)
        assert taken <= estimate <= 3 * taken, (name, taken, estimate)


def test_stored_python_values_count_against_the_quota_and_are_refused_past_it() -> None:
    actor = WorkerActor("w")
    session = _session(actor, quota=4 * MIB)
    # 50,000 empty lists: 8 bytes each on the wire, 64 bytes each in memory.
    _run(actor, session, Store(1, [[] for _ in range(50_000)]))
    assert 50_000 * 64 <= session.memory_used <= 50_000 * 80
    # Another 20,000 fit no more: refused, and counted for nothing.
    used = session.memory_used
    _run(actor, session, Store(2, [[] for _ in range(20_000)]))
    reply = _failure(_run(actor, session, Fetch(9, 2, free=False))[0])
    assert reply.kind == "limit"
    assert "memory quota of 4194304 bytes" in reply.message
    assert session.memory_used == used
    _run(actor, session, Release((1, 2)))
    assert session.memory_used == 0


def test_tolist_of_a_large_tensor_is_refused_before_it_runs() -> None:
    actor = WorkerActor("w")
    session = _session(actor)
    _run(actor, session, Store(1, torch.ones(2 * MIB)))  # 8 MiB of float32
    used = session.memory_used
    assert used == 8 * MIB + TENSOR_OVERHEAD
    tracemalloc.start()
    try:
        _run(actor, session, Call(2, "Tensor.tolist", (Ref(1),), {}))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    reply = _failure(_run(actor, session, Fetch(9, 2, free=False))[0])
    assert reply.kind == "limit"
    assert "depends on the data" in reply.message
    assert peak < MIB  # no list of 2 million floats was ever built
    assert session.memory_used == used
    # A small one runs, and its list counts at what it takes.
    _run(actor, session, Store(3, torch.arange(1000.0)), Call(4, "Tensor.tolist", (Ref(3),), {}))
    assert session.objects[4] == [float(i) for i in range(1000)]
    assert session.memory_used >= used + 4000 + TENSOR_OVERHEAD + 1000 * 24


def test_a_small_view_costs_the_storage_it_keeps_alive() -> None:
    actor = WorkerActor("w")
    session = _session(actor)
    _run(actor, session, Store(1, torch.ones(MIB)))  # 4 MiB
    _run(actor, session, Call(2, "Tensor.__getitem__", (Ref(1), slice(0, 1)), {}))
    assert session.memory_used == 4 * MIB + 2 * TENSOR_OVERHEAD  # the storage once
    _run(actor, session, Release((1,)))
    # The view alone keeps the 4 MiB alive: they are still counted.
    assert session.memory_used == 4 * MIB + TENSOR_OVERHEAD
    _run(actor, session, Release((2,)))
    assert session.memory_used == 0
    assert not session.ledger._storages  # type: ignore[union-attr]


def test_a_tensor_that_requires_grad_reserves_its_grad() -> None:
    actor = WorkerActor("w")
    session = _session(actor)
    _run(actor, session, Store(1, torch.ones(1000, requires_grad=True)))
    assert session.memory_used == 2 * 4000 + TENSOR_OVERHEAD


def _pinned_by_graph(tensor: torch.Tensor) -> int:
    """Bytes of the storages ``tensor``'s autograd graph keeps alive: the tensors its
    nodes saved for backward, and the leaves it accumulates grads into (each once)."""
    storages: dict[int, int] = {}
    seen: set[Any] = set()
    stack = [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        held = [getattr(node, name) for name in dir(node) if name.startswith("_saved_")]
        held.append(getattr(node, "variable", None))
        for value in held:
            for item in value if isinstance(value, tuple) else (value,):
                if isinstance(item, torch.Tensor):
                    storage = item.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
        stack.extend(function for function, _ in node.next_functions)
    return sum(storages.values())


def _grad_chain(actor: WorkerActor, session: Session, length: int) -> list[Message]:
    """``sin`` applied ``length`` times to a stored 1 MiB tensor that requires grad,
    each intermediate result freed by the client once the next is made (the last
    one stays, under id ``length + 1``). Returns the replies of fetching each step's
    result, as a client would see a failure."""
    _run(actor, session, Store(1, torch.ones(MIB // 4, requires_grad=True)))
    failures: list[Message] = []
    for step in range(1, length + 1):
        _run(actor, session, Call(step + 1, "Tensor.sin", (Ref(step),), {}))
        if not isinstance(session.objects[step + 1], torch.Tensor):
            failures += _run(actor, session, Fetch(step, step + 1, free=False))
        if step > 1:
            _run(actor, session, Release((step,)))
    return failures


def test_memory_an_autograd_graph_keeps_for_backward_is_charged() -> None:
    # Each sin saves its input for backward: the last result's graph keeps all 20
    # intermediate results alive after the client freed them (20 MiB). Before graphs
    # were charged the ledger counted 4 MiB here (a chain of 200 held 75 MiB).
    actor = WorkerActor("w")
    session = _session(actor, quota=64 * MIB)
    assert _grad_chain(actor, session, 20) == []
    pinned = _pinned_by_graph(session.objects[21])
    assert pinned >= 20 * MIB
    # What the graph pins, plus the last result, the leaf's and its grads, objects.
    assert pinned <= session.memory_used <= pinned + 3 * MIB + 4 * TENSOR_OVERHEAD
    _run(actor, session, Release((1, 21)))
    assert session.memory_used == 0


def test_a_long_grad_chain_past_the_quota_is_refused_and_all_is_returned() -> None:
    actor = WorkerActor("w")
    session = _session(actor)  # 10 MiB
    failures = _grad_chain(actor, session, 200)
    # Refused once what the graph keeps reaches the quota (before, all 200 steps ran):
    # the client sees LimitExceeded, at the step and at every step after it.
    assert len(failures) >= 190
    first = _failure(failures[0])
    assert first.kind == "limit"
    assert "memory quota of 10485760 bytes" in first.message
    assert session.memory_used <= QUOTA
    _run(actor, session, Release(tuple(range(1, 202))))
    assert session.memory_used == 0


def test_a_tensor_saved_for_backward_past_the_quota_is_refused() -> None:
    # cross_entropy returns one number, and saves its log_softmax (1 MiB) for backward:
    # the check before it runs sees 4 bytes, the saved-tensor hook sees the rest.
    actor = WorkerActor("w")
    logits = torch.ones(256, 1024, requires_grad=True)
    targets = torch.zeros(256, dtype=torch.long)
    session = _session(actor, quota=python_bytes(logits) + python_bytes(targets) + MIB // 2)
    _run(actor, session, Store(1, logits), Store(2, targets))
    used = session.memory_used
    call = Call(3, "torch.nn.functional.cross_entropy", (Ref(1), Ref(2)), {})
    reply = _failure(_run(actor, session, call, Fetch(4, 3, free=False))[0])
    assert reply.kind == "limit"
    assert reply.message.startswith("keeping a tensor for backward: 1048576 bytes")
    assert session.memory_used == used
    # Without grad nothing is saved: the same loss fits.
    _run(actor, session, Call(5, "Tensor.detach", (Ref(1),), {}))
    _run(actor, session, Call(6, "torch.nn.functional.cross_entropy", (Ref(5), Ref(2)), {}))
    assert isinstance(session.objects[6], torch.Tensor)
    _run(actor, session, Release((1, 2, 3, 5, 6)))
    assert session.memory_used == 0


def test_fetching_a_result_away_returns_what_its_graph_was_charged() -> None:
    actor = WorkerActor("w")
    session = _session(actor, quota=64 * MIB)
    _grad_chain(actor, session, 4)
    _run(actor, session, Release((1,)))
    assert session.memory_used >= 4 * MIB  # the graph keeps the leaf and 3 results
    (reply,) = _run(actor, session, Fetch(40, 5, free=True))
    assert isinstance(reply, Reply)
    assert reply.value.grad_fn is None  # no graph leaves the worker
    assert session.memory_used == 0


def test_backward_returns_what_the_graph_was_charged() -> None:
    actor = WorkerActor("w")
    session = _session(actor, quota=64 * MIB)
    _grad_chain(actor, session, 8)
    held = session.memory_used
    assert held >= 8 * MIB
    _run(actor, session, Call(30, "Tensor.sum", (Ref(9),), {}))
    _run(actor, session, Call(31, "Tensor.backward", (Ref(30),), {}))
    grad = session.objects[1].grad
    assert grad is not None
    assert grad.shape == (MIB // 4,)
    # The graph is gone: left are the leaf and its grad, the last result and the grad
    # reserved for it, and its sum.
    assert session.memory_used <= 4 * MIB + 8 * TENSOR_OVERHEAD + 64
    _run(actor, session, Release((1, 9, 30, 31)))
    assert session.memory_used == 0


def test_operations_without_an_input_that_requires_grad_run_without_the_hooks() -> None:
    plain, grad = torch.ones(2), torch.ones(2, requires_grad=True)
    assert not budget.requires_grad((plain, 2, [plain, (plain,)]), {"out": plain})
    assert budget.requires_grad((plain, grad), {})
    assert budget.requires_grad(([plain, (grad,)],), {})
    assert budget.requires_grad((plain,), {"weight": {"w": [grad]}})


def test_a_graph_dropped_on_another_thread_is_returned_to_the_ledger() -> None:
    ledger = budget.Ledger(64 * MIB)
    leaf = torch.ones(MIB // 4, requires_grad=True)
    with ledger.saved_tensors():
        result = leaf.sin().sin()
    assert ledger.used == 2 * MIB  # the leaf, and the first sin, saved by the nodes
    dropper = threading.Thread(target=lambda: results.clear())
    results = [result]
    del result
    dropper.start()
    dropper.join(timeout=10)
    assert not dropper.is_alive()
    ledger.settle()
    assert ledger.used == 0


# -- allocations checked before they happen --------------------------------------------------------


def test_repeat_past_the_quota_is_refused_before_it_allocates() -> None:
    actor = WorkerActor("w")
    session = _session(actor)
    _run(actor, session, Store(1, torch.ones(4)))
    before = _peak_rss()
    # 16384 x 16384 x 4 elements of 4 bytes: 4 GiB, against a 10 MiB quota.
    _run(actor, session, Call(2, "Tensor.repeat", (Ref(1), 16384, 16384), {}))
    reply = _failure(_run(actor, session, Fetch(9, 2, free=False))[0])
    assert reply.kind == "limit"
    assert reply.message.startswith("Tensor.repeat would allocate 4294967808 bytes")
    assert "memory quota of 10485760 bytes" in reply.message
    assert _peak_rss() - before < 256 * MIB
    assert session.memory_used == 4 * 4 + TENSOR_OVERHEAD


def test_an_operation_that_fits_is_run_and_counted() -> None:
    actor = WorkerActor("w")
    session = _session(actor)
    _run(actor, session, Store(1, torch.ones(4)), Call(2, "Tensor.repeat", (Ref(1), 100, 10), {}))
    assert session.objects[2].shape == (100, 40)
    assert session.memory_used == 16 + 16_000 + 2 * TENSOR_OVERHEAD


@pytest.mark.parametrize(
    ("op", "size"),
    [("torch.nonzero", MIB), ("torch.unique", MIB), ("Tensor.item", 1)],
)
def test_data_dependent_operations_run_under_a_bound_from_their_inputs(op: str, size: int) -> None:
    actor = WorkerActor("w")
    session = _session(actor, quota=8 * MIB)
    _run(actor, session, Store(1, torch.arange(float(size))))
    _run(actor, session, Call(2, op, (Ref(1),), {}))
    if size > 1:  # 1 Mi elements: a bound of 56 bytes each is past the quota
        reply = _failure(_run(actor, session, Fetch(9, 2, free=False))[0])
        assert reply.kind == "limit"
        assert "depends on the data" in reply.message
    else:
        assert session.objects[2] == 0.0
    small = torch.arange(float(min(size, 100)))
    _run(actor, session, Store(3, small), Call(4, op, (Ref(3),), {}))
    assert not isinstance(session.objects[4], budget.Failed)


def test_elementwise_operations_skip_the_meta_run_when_their_inputs_bound_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    meta_bytes = budget.meta_bytes

    def counted(func: Callable[..., Any], args: Any, kwargs: Any) -> int:
        calls.append(func.__name__)
        return meta_bytes(func, args, kwargs)

    monkeypatch.setattr(budget, "meta_bytes", counted)
    actor = WorkerActor("w")
    session = _session(actor)
    _run(actor, session, Store(1, torch.ones(1000)), Store(2, torch.ones(1000)))
    _run(actor, session, Call(3, "torch.add", (Ref(1), Ref(2)), {}))
    _run(actor, session, Call(4, "Tensor.sum", (Ref(3),), {}))
    assert calls == []
    assert torch.equal(session.objects[3], torch.full((1000,), 2.0))
    # A broadcast past what is left is measured, then refused.
    _run(actor, session, Store(5, torch.ones(3000, 1)))  # times 1000: 12 MB
    _run(actor, session, Call(6, "torch.mul", (Ref(5), Ref(1)), {}))
    assert calls == ["mul"]
    assert _failure(_run(actor, session, Fetch(9, 6, free=False))[0]).kind == "limit"


def _local_update_plan(*calls: list[Any]) -> dict[str, Any]:
    """A plan of input 0, input 1, state "w", then ``calls``, the loss being the last."""
    nodes: list[list[Any]] = [["input", 0, (), {}], ["input", 1, (), {}], ["state", "w", (), {}]]
    nodes += calls
    nodes.append(["output", None, ((Ref(len(nodes) - 1), Ref(len(nodes) - 1)),), {}])
    return {"format": wire_plan.FORMAT, "nodes": nodes, "trainable": ["w"]}


def test_a_plan_is_checked_node_by_node_before_it_runs() -> None:
    actor = WorkerActor("w")
    session = _session(actor)
    data, targets = torch.ones(64, 4), torch.zeros(64)
    fine = _local_update_plan(
        ["call", "torch.matmul", (Ref(0), Ref(2)), {}],
        ["call", "Tensor.sum", (Ref(3),), {}],
    )
    # Node 4 repeats a batch's products to 4 GiB: refused before anything runs.
    huge = _local_update_plan(
        ["call", "torch.matmul", (Ref(0), Ref(2)), {}],
        ["call", "Tensor.repeat", (Ref(3), 32768, 1024), {}],
        ["call", "Tensor.sum", (Ref(4),), {}],
    )
    state = {"w": torch.ones(4)}
    _run(actor, session, Store(1, data), Store(2, targets), Store(3, state))
    used = session.memory_used
    before = _peak_rss()
    args = (Ref(3), Ref(1), Ref(2))
    _run(actor, session, Store(4, huge), Call(5, "fedtensor.local_update", (Ref(4), *args), {}))
    reply = _failure(_run(actor, session, Fetch(9, 5, free=False))[0])
    assert reply.kind == "limit"
    assert "plan node 4 (" in reply.message
    assert "repeat" in reply.message
    assert _peak_rss() - before < 256 * MIB
    _run(actor, session, Store(6, fine), Call(7, "fedtensor.local_update", (Ref(6), *args), {}))
    result = session.objects[7]
    assert isinstance(result, dict), result
    assert result["examples"] == 64
    _run(actor, session, Release((4, 5, 6, 7)))
    assert session.memory_used == used


def test_the_count_returns_to_zero_when_everything_is_freed() -> None:
    actor = WorkerActor("w")
    session = _session(actor)
    x = torch.arange(10_000.0)
    _run(
        actor,
        session,
        Store(1, x),
        Store(2, {"a": [1, 2.5, "three"], "b": (x, x[:10])}),
        Call(3, "Tensor.__getitem__", (Ref(1), slice(5, 50)), {}),
        Call(4, "torch.add", (Ref(1), 1), {}),
        Call(5, "Tensor.tolist", (Ref(3),), {}),
        Store(6, [b"bytes", None, True]),
        Store(1, torch.ones(3)),  # replaces the first: its storage stays (3 views it)
    )
    assert session.memory_used > 80_000
    replies = _run(actor, session, Fetch(10, 4, free=True), Release((1, 2, 3, 5, 6)))
    assert isinstance(replies[0], Reply)
    assert session.memory_used == 0
    assert not session.ledger._storages  # type: ignore[union-attr]


def test_a_default_worker_has_a_budget_of_a_quarter_of_the_memory() -> None:
    assert Limits().memory_quota == default_budget() > 0
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert default_budget() == max(pages // 4, 256 * MIB)
    server = WorkerServer("w", token="t")
    assert server.limits.memory_quota == default_budget()


# -- replies a client does not read ----------------------------------------------------------------


class _Unsent:
    def __init__(self) -> None:
        self.bytes = 0

    def __call__(self) -> int:
        return self.bytes


async def test_fetches_past_the_reply_bound_wait_until_the_client_has_read() -> None:
    actor = WorkerActor("w")
    delivered: list[list[Message]] = []
    unsent = _Unsent()
    session = actor.open_session(delivered.append, _ignore, aliases_values=True, memory_quota=QUOTA)
    gate = session.replies = Replies(4 * MIB, unsent)

    def deliver(replies: list[Message]) -> None:
        # As the server does: handed on, passed to the connection, not yet written.
        delivered.append(replies)
        size = sum(budget.reply_bytes(reply.value) for reply in replies)  # type: ignore[attr-defined]
        gate.hand_on(replies, size)
        gate.arrived += size
        unsent.bytes += size

    session.deliver = deliver
    session.submit([Store(1, torch.ones(MIB // 4))])  # 1 MiB
    session.submit([Fetch(100 + i, 1, free=False) for i in range(10)])
    session.submit([Call(2, "torch.neg", (Ref(1),), {}), Fetch(200, 2, free=False)])
    actor.drain()
    # Three fetches of 1 MiB (and their tensor objects) fit 4 MiB; the rest wait,
    # and so does everything the client sent after them.
    assert [len(batch) for batch in delivered] == [3]
    assert session.parked is not None
    assert len(session.parked) == 7 + 2
    assert 2 not in session.objects
    assert not session.resume_if_drained()  # nothing was read
    unsent.bytes = 0  # the client read it all
    assert session.resume_if_drained()
    actor.drain()
    assert [len(batch) for batch in delivered] == [3, 3]
    unsent.bytes = 0
    session.resume_if_drained()
    actor.drain()
    unsent.bytes = 0
    session.resume_if_drained()
    actor.drain()
    requests = [reply.request for batch in delivered for reply in batch]  # type: ignore[attr-defined]
    assert requests == [*range(100, 110), 200]  # all of them, in order
    assert session.parked is None
    assert gate.held() == unsent.bytes > 0
    assert gate.admitted == 0


def test_a_fetch_alone_is_never_held_whatever_its_size() -> None:
    actor = WorkerActor("w")
    session = _session(actor, quota=None)
    session.replies = Replies(MIB, lambda: 0)
    replies = _run(actor, session, Store(1, torch.ones(MIB)), Fetch(9, 1, free=True))
    assert isinstance(replies[0], Reply)
    assert session.parked is None


# -- against a worker process ----------------------------------------------------------------------

ZERO_KEY = b"\0\0\0\0"


def _rss(process: WorkerProcess) -> int:
    with open(f"/proc/{process.process.pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _messages(batch: Sequence[Message]) -> bytes:
    """``batch`` as the websocket frames a client sends (masked with a key of zeros)."""
    out = bytearray()
    for message in split_frame(encode_frame(list(batch)), 1 << 20):
        payload = bytes(message)
        out += header(Opcode.BINARY, len(payload), ZERO_KEY) + payload
    return bytes(out)


class _Raw:
    """A client on a raw socket that reads only when told to."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def read_message(self) -> int:
        """Read one websocket message the worker sent; its payload's length."""
        head = await self.reader.readexactly(2)
        length = head[1] & 0x7F
        if length == 126:
            length = struct.unpack(">H", await self.reader.readexactly(2))[0]
        elif length == 127:
            length = struct.unpack(">Q", await self.reader.readexactly(8))[0]
        await self.reader.readexactly(length)
        return length


@pytest.fixture
async def hostile(
    ft_worker_processes: Callable[..., WorkerProcess],
) -> AsyncIterator[tuple[WorkerProcess, Callable[..., Any]]]:
    """A worker process with default options, and a way to open raw connections to it."""
    process = ft_worker_processes("budget")
    opened: list[asyncio.StreamWriter] = []

    async def connect(receive_buffer: int | None = None) -> _Raw:
        host, port = process.url.removeprefix("ws://").split(":")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.setblocking(False)
        with anyio.fail_after(10):
            await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
            reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
            opened.append(writer)
            writer.write(
                "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "Sec-WebSocket-Version: 13\r\n"
                f"Authorization: Bearer {process.token}\r\n\r\n".encode()
            )
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        return _Raw(reader, writer)

    yield process, connect
    for writer in opened:
        writer.transport.abort()


async def _round_trip(process: WorkerProcess) -> None:
    async with ft.connect(process.url, token=process.token, timeout=30) as client:
        x = ft.send(torch.arange(7.0), client)
        assert torch.equal(await (x + 1).get(), torch.arange(7.0) + 1)
        del x


async def test_unread_replies_of_a_worker_process_stay_bounded(
    hostile: tuple[WorkerProcess, Callable[..., Any]],
) -> None:
    process, connect = hostile
    raw = await connect(receive_buffer=4096)
    tensor = torch.ones(2 * MIB)  # 8 MiB
    raw.writer.write(_messages([Store(1, tensor), ListObjects(1)]))
    with anyio.fail_after(30):
        await raw.read_message()  # stored
    await _round_trip(process)
    before = _rss(process)
    fetches = _messages([Fetch(100 + i, 1, free=False) for i in range(60)])
    assert len(fetches) < 400  # the 341-byte frame
    raw.writer.write(fetches)
    with anyio.fail_after(30):
        total = await raw.read_message()  # replies are on their way: the batch ran
        await _round_trip(process)  # another client is served meanwhile
    grown = _rss(process) - before
    print(f"worker grew by {grown / MIB:.1f} MiB with 60 fetches of 8 MiB unread")
    # 60 x 8 MiB = 480 MiB unbounded; READ_AHEAD (64 MiB) of replies, and what the
    # kernel's socket buffers and the allocator keep, bounded.
    assert grown < READ_AHEAD + 48 * MIB, grown
    # A client that reads gets every reply.
    with anyio.fail_after(120):
        while total < 60 * tensor.nbytes:
            total += await raw.read_message()
            assert _rss(process) - before < READ_AHEAD + 48 * MIB
    await _round_trip(process)


async def test_a_default_worker_process_refuses_what_its_budget_cannot_hold(
    hostile: tuple[WorkerProcess, Callable[..., Any]],
) -> None:
    process, _ = hostile
    async with ft.connect(process.url, token=process.token, timeout=30) as client:
        x = ft.send(torch.ones(4), client)
        y = x.repeat(1 << 17, 1 << 17)  # 256 GiB
        with pytest.raises(ft.LimitExceeded, match="would allocate 274877907456 bytes"):
            await y
        assert torch.equal(await (x * 2).get(), torch.full((4,), 2.0))
        del y


# -- a client killed mid-upload --------------------------------------------------------------------


@pytest.fixture
async def served() -> AsyncIterator[WorkerServer]:
    server = WorkerServer("local", token="t", grace=5.0)
    async with anyio.create_task_group() as task_group:
        await task_group.start(server.serve, "127.0.0.1", 0)
        yield server
        server.shutdown()


async def test_a_client_killed_mid_upload_leaves_nothing_behind(
    served: WorkerServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert served.url is not None
    host, port = served.url.removeprefix("ws://").split(":")
    size = 24 * MIB + 4096 * 7  # a size no other test uses: its pool entry is ours
    received = asyncio.Event()
    updated = _ServerPeer.buffer_updated

    def spy(peer: _ServerPeer, nbytes: int) -> None:
        updated(peer, nbytes)
        frame = peer._reassembler._buffer
        if frame is not None and len(frame) == size and peer._reassembler.pending <= size - 2 * MIB:
            received.set()

    monkeypatch.setattr(_ServerPeer, "buffer_updated", spy)
    loop = asyncio.get_running_loop()
    peers: list[weakref.ref[_ServerPeer]] = []
    memories: list[weakref.ref[torch.Tensor]] = []
    gc.disable()
    try:
        for _ in range(3):
            received.clear()
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(
                b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                b"Authorization: Bearer t\r\n\r\n"
            )
            with anyio.fail_after(10):
                await reader.readuntil(b"\r\n\r\n")
            # It stores 1 MiB, then starts a frame of 24 MiB and is killed 3 MiB in.
            writer.write(_messages([Store(1, torch.ones(MIB // 4)), ListObjects(1)]))
            with anyio.fail_after(10):
                await _Raw(reader, writer).read_message()
            [peer] = [p for p in served._peers if p.session is not None and p.session.objects]
            session = peer.session
            assert session is not None
            # The tensor aliases its frame's buffer: the whole frame (the tensor and a
            # few dozen bytes of commands) is what it pins, and what it is charged.
            assert MIB + TENSOR_OVERHEAD < session.memory_used < MIB + TENSOR_OVERHEAD + 256
            head = struct.pack(">BQ", START, size)
            frames = header(Opcode.BINARY, len(head), ZERO_KEY) + head
            frames += (header(Opcode.BINARY, MIB, ZERO_KEY) + bytes(MIB)) * 3
            writer.write(frames)
            with anyio.fail_after(10):
                await received.wait()
            peers.append(weakref.ref(peer))
            closed = peer.closed
            # The frame's buffer: pool memory, held by the view the frame is received in.
            buffer = peer._reassembler._buffer
            assert buffer is not None
            memory = weakref.ref(buffer.obj._fedtensor_tensor.tensor)  # type: ignore[attr-defined]
            del peer, buffer
            sock = writer.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()  # killed: a reset mid-frame
            ran = asyncio.Event()
            with anyio.fail_after(10):
                await closed
                served.actor.barrier(lambda ran=ran: loop.call_soon_threadsafe(ran.set))
                await ran.wait()  # the session's end has run on the actor
            # Its objects are freed and its count is back to 0; the frame's buffer
            # is freed or back in the pool: one buffer at most, however many clients.
            assert session.closed
            assert not session.objects
            assert session.memory_used == 0
            assert session not in served.actor._sessions
            memories.append(memory)
            del session
        await asyncio.sleep(0)  # the callback in which asyncio lets go of the last peer
        assert all(ref() is None for ref in peers)
        # Each frame's buffer is freed or back in the pool (its lease returns it when the
        # last view of it goes, with its peer): one buffer at most, however many clients.
        kept = POOL._free.get(size, [])
        assert len(kept) <= 1
        for memory in memories:
            assert memory() is None or any(tensor is memory() for tensor in kept)
    finally:
        gc.enable()


def test_a_small_tensor_received_beside_a_large_one_is_charged_the_frame_it_pins() -> None:
    # A received tensor aliases its frame's buffer and keeps all of it alive: storing a
    # small tensor beside a large one, then releasing the large one, must not leave the
    # large one's memory held yet uncounted (a client could pin memory past its budget).
    frame = frame_bytes([Store(1, torch.ones(2 * MIB // 4)), Store(2, torch.ones(512))])
    big, small = (message.value for message in decode_frame(frame))
    assert small.untyped_storage().data_ptr() == big.untyped_storage().data_ptr()
    ledger = budget.Ledger(64 * MIB)
    ledger.store(1, big)
    ledger.store(2, small)
    ledger.release(1)
    assert ledger.used >= len(frame)  # the whole frame, still pinned by the small tensor
    ledger.release(2)
    assert ledger.used == 0


# -- decoding is bounded before it allocates ---------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        [[] for _ in range(20_000)],
        [{} for _ in range(20_000)],
        [1.5 for _ in range(20_000)],
        [torch.empty(0) for _ in range(2_000)],
        [torch.ones(3) for _ in range(2_000)],
    ],
    ids=["lists", "maps", "floats", "empty-tensors", "small-tensors"],
)
def test_decoded_bound_bounds_what_decoding_allocates(value: list[Any]) -> None:
    frame = frame_bytes([Store(1, value)])
    tracemalloc.start()
    try:
        decoded = decode_frame(frame)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert decoded[0].value is not None
    assert peak <= decoded_bound(frame)


async def test_a_frame_that_could_decode_past_the_budget_is_refused_before_decoding() -> None:
    # 500,000 empty lists: 500 KB on the wire, about 32 MB once decoded (bounded at 40 MB),
    # past a 10 MiB budget and the 16 MiB slack. Without the bound the worker decodes it
    # all, then refuses the store.
    server = WorkerServer("local", token="t", limits=Limits(memory_quota=QUOTA), grace=5.0)
    async with anyio.create_task_group() as task_group:
        await task_group.start(server.serve, "127.0.0.1", 0)
        assert server.url is not None
        try:
            async with (
                ft.connect(server.url, token="t") as hostile,
                ft.connect(server.url, token="t") as other,
            ):
                with pytest.raises(ft.FedTensorError, match="decoding this frame could take"):
                    await hostile.client.store([[] for _ in range(500_000)]).fetch()
                x = ft.send(torch.arange(3.0), other)  # other clients are served on
                assert torch.equal(await x.get(), torch.arange(3.0))
        finally:
            server.shutdown()


def test_a_beaver_triple_is_sized_by_its_arguments_before_it_is_made() -> None:
    # Its output size comes from the shapes it is given, not from its inputs: a
    # 1,400 x 1,400 triple for 2 parties would take about 141 MB under a 10 MiB quota.
    actor = WorkerActor("w")
    session = _session(actor)
    _run(
        actor,
        session,
        Call(1, "fedtensor.beaver_triple", ("mul", [1400, 1400], [1400, 1400], 2), {}),
    )
    reply = _failure(_run(actor, session, Fetch(9, 1, free=False))[0])
    assert reply.kind == "limit"
    assert reply.message.startswith("fedtensor.beaver_triple would allocate 141120000 bytes")
    assert session.memory_used == 0
    _run(actor, session, Call(2, "fedtensor.beaver_triple", ("mul", [3], [3], 2), {}))
    assert len(session.objects[2]) == 2  # a small one is made: one share tensor per party


# -- worker operations sized by their inputs (run_plan, evaluate, secagg_mask, search) ---------


def _plan(*calls: list[Any], inputs: int = 1) -> dict[str, Any]:
    """A plan of ``inputs`` inputs and state "w", then ``calls``; it outputs the last twice."""
    nodes: list[list[Any]] = [["input", n, (), {}] for n in range(inputs)]
    nodes.append(["state", "w", (), {}])
    nodes += calls
    last = Ref(len(nodes) - 1)
    nodes.append(["output", None, ((last, last),), {}])
    return {"format": wire_plan.FORMAT, "nodes": nodes, "trainable": []}


def test_a_plan_run_is_sized_node_by_node_before_it_runs() -> None:
    # Node 2 repeats a 4-element input to 8000 x 32000 elements: 1 GB, from 16 bytes.
    actor = WorkerActor("w")
    session = _session(actor)
    huge = _plan(
        ["call", "Tensor.repeat", (Ref(0), 8000, 8000), {}], ["call", "Tensor.sum", (Ref(2),), {}]
    )
    fine = _plan(["call", "torch.mul", (Ref(0), Ref(1)), {}], ["call", "Tensor.sum", (Ref(2),), {}])
    _run(actor, session, Store(1, torch.ones(4)), Store(2, {"w": torch.ones(4)}), Store(3, huge))
    before = _peak_rss()
    _run(actor, session, Call(4, "fedtensor.run_plan", (Ref(3), Ref(2), Ref(1)), {}))
    reply = _failure(_run(actor, session, Fetch(9, 4, free=False))[0])
    assert reply.kind == "limit"
    assert reply.message.startswith("fedtensor.run_plan: plan node 2 (")
    assert "would allocate 1024000000 bytes" in reply.message
    assert _peak_rss() - before < 256 * MIB
    _run(
        actor, session, Store(5, fine), Call(6, "fedtensor.run_plan", (Ref(5), Ref(2), Ref(1)), {})
    )
    assert session.objects[6] == (torch.tensor(4.0), torch.tensor(4.0))


def test_an_evaluation_is_sized_by_one_batch_of_its_plan_before_it_runs() -> None:
    actor = WorkerActor("w")
    session = _session(actor)
    data, targets = torch.ones(64, 4), torch.zeros(64, dtype=torch.long)
    # Node 4 repeats a batch's products (64 x 1) to 64 x 4096 x 1024: 1 GiB.
    huge = _plan(
        ["call", "torch.matmul", (Ref(0), Ref(2)), {}],
        ["call", "Tensor.repeat", (Ref(3), 4096, 1024), {}],
        ["call", "Tensor.sum", (Ref(4),), {}],
        inputs=2,
    )
    fine = _plan(
        ["call", "torch.matmul", (Ref(0), Ref(2)), {}],
        ["call", "Tensor.sum", (Ref(3),), {}],
        inputs=2,
    )
    state = {"w": torch.ones(4, 1)}
    _run(actor, session, Store(1, data), Store(2, targets), Store(3, state), Store(4, huge))
    before = _peak_rss()
    args = (Ref(3), Ref(1), Ref(2))
    _run(actor, session, Call(5, "fedtensor.evaluate", (Ref(4), *args), {"batch_size": 64}))
    reply = _failure(_run(actor, session, Fetch(9, 5, free=False))[0])
    assert reply.kind == "limit"
    assert reply.message.startswith("fedtensor.evaluate: plan node 4 (")
    assert _peak_rss() - before < 256 * MIB
    _run(actor, session, Store(6, fine), Call(7, "fedtensor.evaluate", (Ref(6), *args), {}))
    result = session.objects[7]
    assert isinstance(result, dict), result
    assert result["examples"] == 64
    assert result["loss_sum"] == 64 * 256.0  # one batch: its 64 products of 4 summed


def test_a_search_is_sized_by_the_objects_it_may_list_before_it_runs() -> None:
    # 2,500 stored numbers described "d" (about 400 bytes each with their metadata): a
    # search for "d" lists them all, 1,000 bytes an entry, past a 1 MiB quota.
    actor = WorkerActor("w")
    session = _session(actor, quota=MIB)
    stores = [Store(n, n) for n in range(1, 2501)]
    described = [Call(10_000 + n, "fedtensor.describe", (n, [], "d"), {}) for n in range(1, 2501)]
    _run(actor, session, *stores, *described)
    assert len(session.metadata) == 2500
    assert session.memory_used < MIB
    _run(actor, session, Call(20_000, "fedtensor.search", ("d",), {}))
    reply = _failure(_run(actor, session, Fetch(9, 20_000, free=False))[0])
    assert reply.kind == "limit"
    assert reply.message.startswith("fedtensor.search may allocate ")
    # Fewer described objects (the released ones' metadata not counted): it runs.
    _run(
        actor, session, Release(tuple(range(1, 2481))), Call(20_001, "fedtensor.search", ("d",), {})
    )
    found = session.objects[20_001]
    assert isinstance(found, list), found
    assert sorted(entry["id"] for entry in found) == list(range(2481, 2501))


async def test_the_pool_gives_its_buffers_back_once_the_last_client_has_left(
    served: WorkerServer,
) -> None:
    # Recycled buffers are a high-water mark of the transfers that overlapped; a worker
    # with no client left keeps none of them (nor the allocator's free pages).
    assert served.url is not None
    loop = asyncio.get_running_loop()
    t = torch.arange(float(3 * MIB))  # 12 MiB: a frame received in a pooled buffer
    async with ft.connect(served.url, token="t", timeout=30) as client:
        x = ft.send(t, client)
        assert torch.equal(await x.get(), t)
        del x
        await ft.send(torch.ones(1), client)  # the release has run: the buffer is back
        assert POOL.held >= t.nbytes
        [peer] = [p for p in served._peers if p.session is not None]
        closed = peer.closed
        del peer
    ran = asyncio.Event()
    with anyio.fail_after(10):
        await closed
        served.actor.barrier(lambda: loop.call_soon_threadsafe(ran.set))
        await ran.wait()  # what the disconnection queued has run on the actor
    assert POOL.held == 0


def test_tags_and_descriptions_count_against_the_quota() -> None:
    # A stored number costs 32 bytes; its tags may be 256 strings of 4,096 characters:
    # 1 MiB held beside it, which counts, and is refused past the quota.
    actor = WorkerActor("w")
    session = _session(actor, quota=4 * MIB)
    _run(actor, session, *(Store(n, n) for n in range(1, 11)))
    replies = []
    for n in range(1, 11):
        tags = [f"#{n}-{k}-" + "x" * 4000 for k in range(256)]  # fresh strings each time
        _run(actor, session, Call(100 + n, "fedtensor.describe", (n, tags, "long " * 800), {}))
        replies.append(session.objects[100 + n])
    assert replies[:3] == [None] * 3
    refused = replies[3]
    assert isinstance(refused, budget.Failed), refused
    assert refused.kind == "limit"
    assert refused.message.startswith("fedtensor.describe would hold ")
    assert len(session.metadata) == 3  # the refused ones were not kept
    assert 3 * MIB < session.memory_used <= 4 * MIB
    # Released objects' tags are returned once the search (or a describe) drops them.
    _run(actor, session, Release((1, 2, 3)), Call(200, "fedtensor.search", ("#1",), {}))
    assert session.objects[200] == []
    assert session.memory_used < MIB


_ARENAS = """
import ctypes, sys, threading
import torch
from fedtensor.protocol.pool import steady_allocator
if sys.argv[1] == "steady":
    steady_allocator()
def work():
    for _ in range(20):
        torch.empty(3 << 20, dtype=torch.uint8).fill_(1)
threads = [threading.Thread(target=work) for _ in range(4)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
libc = ctypes.CDLL("libc.so.6")
libc.open_memstream.restype = ctypes.c_void_p
libc.open_memstream.argtypes = [ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(ctypes.c_size_t)]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
text, size = ctypes.c_char_p(), ctypes.c_size_t()
stream = libc.open_memstream(ctypes.byref(text), ctypes.byref(size))
libc.malloc_info(0, stream)
libc.fclose(stream)
print(text.value.decode().count("<heap nr="))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_a_worker_keeps_one_allocator_arena_for_its_threads() -> None:
    # Threads that allocate each get a glibc arena of their own, where large blocks
    # freed stay pinned by small ones: a worker keeps one (protocol/pool.py).
    def arenas(mode: str) -> int:
        done = subprocess.run(
            [sys.executable, "-c", _ARENAS, mode], capture_output=True, text=True, timeout=50
        )
        assert done.returncode == 0, done.stderr
        return int(done.stdout)

    assert arenas("steady") == 1
    assert arenas("default") > 1  # what it prevents


def test_a_plan_run_on_tensors_that_require_grad_charges_what_its_graph_keeps() -> None:
    # fedtensor.run_plan makes a graph as torch operations do: a chain of plan runs, each
    # intermediate result freed by the client, keeps every input alive for backward.
    actor = WorkerActor("w")
    session = _session(actor, quota=64 * MIB)
    plan = _plan(["call", "Tensor.sin", (Ref(0),), {}])
    _run(actor, session, Store(1, {"w": torch.ones(1)}), Store(2, plan))
    _run(actor, session, Store(10, torch.ones(MIB // 4, requires_grad=True)))
    for step in range(10, 20):
        _run(
            actor, session, Call(100 + step, "fedtensor.run_plan", (Ref(2), Ref(1), Ref(step)), {})
        )
        _run(actor, session, Call(step + 1, "fedtensor.element", (Ref(100 + step), 0), {}))
        _run(actor, session, Release((100 + step,) if step == 10 else (100 + step, step)))
    last = session.objects[20]
    assert isinstance(last, torch.Tensor)
    assert last.grad_fn is not None
    pinned = _pinned_by_graph(last)
    assert pinned >= 10 * MIB
    assert session.memory_used >= pinned
    del last  # the test's own reference would keep the graph
    _run(actor, session, Release((1, 2, 10, 20)))
    assert session.memory_used == 0
