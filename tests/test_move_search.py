"""Moving tensors between workers (move, copy, send, remote_get), pointers to pointers,
capabilities, tags, search.

Worker processes here are real `fedtensor worker` processes on 127.0.0.1 sharing a
federation key; the capability checks are also tested on their own with a fake clock.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from websockets.asyncio.client import connect as raw_connect
from websockets.exceptions import InvalidStatus

import fedtensor as ft
import fedtensor.sync as sy
from fedtensor.client.pointer import call_on
from fedtensor.net import peer as peer_module
from fedtensor.testing import WorkerProcess, start_worker_process
from fedtensor.worker.capabilities import (
    CAPABILITY_HEADER,
    MAX_GRANTS_PER_SESSION,
    PROOF_HEADER,
    CapabilityIssuer,
    CapabilityRefused,
    binding_of,
    check_delivery,
)

pytestmark = pytest.mark.anyio

KEY = "a shared federation key for these tests only"
BIG = 2 << 20  # float32 elements: 8 MiB


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "digits.pt"
    torch.save({"data": torch.arange(12.0).reshape(6, 2), "targets": torch.arange(6)}, path)
    return path


@pytest.fixture(scope="module")
def processes(data_file: Path) -> Iterator[tuple[WorkerProcess, WorkerProcess]]:
    """bob (holding the data set "digits", also tagged #mnist) and alice, one federation."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDTENSOR_FEDERATION_KEY", KEY)
        bob = start_worker_process(
            "bob", "--dataset", f"digits={data_file}", "--dataset-tags", "digits=#mnist"
        )
        try:
            alice = start_worker_process("alice", "--max-message-size", "64K")
        except BaseException:
            bob.stop()
            raise
    yield bob, alice
    bob.stop()
    alice.stop()


@pytest.fixture
async def pair(
    processes: tuple[WorkerProcess, WorkerProcess],
) -> AsyncIterator[tuple[ft.RemoteWorker, ft.RemoteWorker]]:
    """One client's connections to bob and alice."""
    bob, alice = processes
    async with (
        ft.connect(bob.url, token=bob.token, timeout=30) as to_bob,
        ft.connect(alice.url, token=alice.token, timeout=30) as to_alice,
    ):
        yield to_bob, to_alice


async def _capability(worker: ft.WorkerHandle, object_id: int, secret: str) -> Any:
    return await call_on(
        worker.client, "fedtensor.capability", (object_id, binding_of(secret)), {}
    ).get()


async def _deliver(worker: ft.WorkerHandle, pointer: Any, token: Any, secret: str) -> Any:
    return await call_on(worker.client, "fedtensor.deliver", (pointer, token, secret), {}).get()


async def _still_serves(*workers: ft.WorkerHandle) -> None:
    for worker in workers:
        x = ft.send(torch.arange(3.0), worker)
        assert torch.equal(await (x * 2).get(timeout=30), torch.arange(3.0) * 2)


# -- moving between worker processes --------------------------------------------------------------


async def test_move_between_processes_sends_no_bytes_through_the_client(
    pair: tuple[ft.RemoteWorker, ft.RemoteWorker], monkeypatch: pytest.MonkeyPatch
) -> None:
    bob, alice = pair
    received = [0]
    buffer_updated = peer_module.WebSocketPeer.buffer_updated

    def counting(self: peer_module.WebSocketPeer, nbytes: int) -> None:
        received[0] += nbytes
        buffer_updated(self, nbytes)

    # Every byte the client's websocket connections receive passes here.
    monkeypatch.setattr(peer_module.WebSocketPeer, "buffer_updated", counting)
    tensor = torch.randn(BIG)
    x = ft.send(tensor, bob)
    source_id = x.id_at_location
    assert source_id in await bob.object_ids()
    before = received[0]
    moved = await x.move(alice, timeout=30)
    during = received[0] - before
    assert moved is x
    assert x.location is alice
    assert during < 64 << 10, f"the move brought {during} bytes to the client"
    assert await bob.object_ids() == []  # the source is freed
    assert await alice.object_ids() == [x.id_at_location]
    assert torch.equal(await x.get(timeout=30), tensor)  # the value arrived, whole
    # The sanity check of the counter: fetching the tensor did bring its bytes.
    assert received[0] - before > tensor.nbytes


async def test_copy_and_send_keep_the_source(pair: tuple[ft.RemoteWorker, ft.RemoteWorker]) -> None:
    bob, alice = pair
    x = ft.send(torch.arange(6.0), bob)
    y = await x.copy(alice, timeout=30)
    assert y.location is alice
    assert x.location is bob
    assert torch.equal(await y, torch.arange(6.0))
    assert torch.equal(await x, torch.arange(6.0))
    z = await x.send(alice, timeout=30)  # PySyft's pointer.send: a pointer there to x
    assert sorted(await alice.object_ids()) == sorted([y.id_at_location, z.id_at_location])
    assert await bob.object_ids() == [x.id_at_location]
    assert await z.remote_get() is z  # only alice holds it now
    assert await bob.object_ids() == []
    assert torch.equal(await z.get(), torch.arange(6.0))
    del x, y


def _count_received(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A counter of every byte the client's websocket connections receive from now on."""
    received = [0]
    buffer_updated = peer_module.WebSocketPeer.buffer_updated

    def counting(self: peer_module.WebSocketPeer, nbytes: int) -> None:
        received[0] += nbytes
        buffer_updated(self, nbytes)

    monkeypatch.setattr(peer_module.WebSocketPeer, "buffer_updated", counting)
    return received


async def _values(worker: ft.WorkerHandle) -> list[Any]:
    """Copies of this client's objects on ``worker`` (small ones only: they come back)."""
    return [
        await worker.client.fetch(id_, free=False, timeout=30) for id_ in await worker.object_ids()
    ]


async def test_pointers_to_pointers_between_processes(
    pair: tuple[ft.RemoteWorker, ft.RemoteWorker], monkeypatch: pytest.MonkeyPatch
) -> None:
    """PySyft Part 3: alice holds a pointer to bob's tensor; operations run on bob; the
    tensor's bytes go nowhere until the second get()."""
    bob, alice = pair
    received = _count_received(monkeypatch)
    tensor = torch.randn(BIG)
    on_bob = ft.send(tensor, bob)
    p2p2x = await on_bob.send(alice, timeout=30)
    assert p2p2x.location is alice
    assert p2p2x.shape == tensor.shape
    before = received[0]
    y = p2p2x + p2p2x
    assert y.location is alice
    assert repr(y).endswith(f"-> alice:{y.id_at_location} -> {bob.id}:{y._origin.id_at_location}>")
    assert len(await bob.object_ids()) == 2  # x and y: the data
    records = await _values(alice)  # alice: two pointers to them, no tensor
    assert sorted(record["id_at_location"] for record in records) == sorted(await bob.object_ids())
    assert {record["pointer_to"] for record in records} == {bob.id}
    assert received[0] - before < 64 << 10, "tensor bytes came to the client before a get()"
    y_on_bob = await y.get(timeout=30)  # the pointer alice held: to bob's y
    assert y_on_bob.location is bob
    assert len(await alice.object_ids()) == 1  # only p2p2x's record is left
    assert received[0] - before < 64 << 10
    assert torch.equal(await y_on_bob.get(timeout=30), tensor + tensor)
    assert received[0] - before > tensor.nbytes  # the counter counts: the value came
    assert await p2p2x.get(timeout=30) is on_bob
    assert await alice.object_ids() == []
    assert torch.equal(await on_bob.get(timeout=30), tensor)
    assert await bob.object_ids() == []


async def test_remote_get_and_move_of_a_pointer_to_a_pointer(
    pair: tuple[ft.RemoteWorker, ft.RemoteWorker], monkeypatch: pytest.MonkeyPatch
) -> None:
    bob, alice = pair
    received = _count_received(monkeypatch)
    tensor = torch.randn(BIG)
    p2p2x = await ft.send(tensor, bob).send(alice, timeout=30)
    before = received[0]
    assert await p2p2x.remote_get(timeout=30) is p2p2x  # bob's tensor moves to alice
    assert received[0] - before < 64 << 10, "remote_get() routed the tensor through the client"
    assert await bob.object_ids() == []
    assert await alice.object_ids() == [p2p2x.id_at_location]
    assert p2p2x.location is alice
    back = await p2p2x.send(bob, timeout=30)  # now a pointer on bob to alice's tensor
    before = received[0]
    assert await back.move(bob, timeout=30) is back  # the data moves to bob; back is plain
    assert received[0] - before < 64 << 10
    assert await alice.object_ids() == []
    assert await bob.object_ids() == [back.id_at_location]
    assert torch.equal(await back.get(timeout=30), tensor)
    del p2p2x


async def test_pointers_to_pointers_on_virtual_workers(ft_virtual_workers: Any) -> None:
    bob, alice, carol = [await ft_virtual_workers(name) for name in ("bob", "alice", "carol")]
    x = ft.send(torch.arange(4.0), bob)
    p2x = await x.send(alice)
    p3x = await p2x.send(carol)  # carol -> alice -> bob
    first, second = torch.split(p3x * 2, 2)  # multi-output results keep the chain
    assert (first.location, first._origin.location, first._origin._origin.location) == (
        carol,
        alice,
        bob,
    )
    assert torch.equal(await (await (await second.get()).get()).get(), torch.tensor([4.0, 6.0]))
    del first
    plain = ft.send(torch.ones(4), bob)
    with pytest.raises(ft.LocationError, match="pointers to pointers"):
        await (p2x + plain)  # PySyft: alice's pointer and bob's tensor are not together
    with pytest.raises(ft.LocationError, match="pointers to pointers"):
        await (p2x + p3x)
    del plain
    assert await p3x.remote_get() is p3x  # carol takes alice's pointer: carol -> bob
    assert p3x._origin is x
    assert await alice.object_ids() == []  # alice gave her pointer away...
    with pytest.raises(ft.PointerReleased):
        await p2x.get()  # ...so the client's pointer to it is spent
    assert await p3x.remote_get() is p3x  # now bob's tensor moves to carol
    assert p3x.location is carol
    assert p3x._origin is None
    assert await bob.object_ids() == []
    assert torch.equal(await p3x.get(), torch.arange(4.0))
    released = await ft.send(torch.ones(1), bob).send(alice)
    inner = await released.get()
    with pytest.raises(ft.PointerReleased):
        await (released + 1)
    del p2x, inner


async def test_moved_tensor_keeps_its_tags(pair: tuple[ft.RemoteWorker, ft.RemoteWorker]) -> None:
    bob, alice = pair
    x = ft.send(torch.ones(2), bob, tags=["#weights"], description="model weights")
    await x.move(alice)
    found = await alice.search("#weights")
    assert [p.description for p in found] == ["model weights"]
    assert await bob.search("#weights") == []
    del x, found


async def test_a_process_worker_offers_its_data_set_by_its_tags(
    pair: tuple[ft.RemoteWorker, ft.RemoteWorker],
) -> None:
    bob, alice = pair
    (targets,) = await bob.search("#mnist", "#target")  # --dataset-tags digits=#mnist
    assert targets.shape == (6,)
    assert targets.dtype == torch.int64
    assert torch.equal(await targets.get(), torch.arange(6))
    (data,) = await bob.search("digits", "#data")
    assert torch.equal(await data.get(), torch.arange(12.0).reshape(6, 2))
    assert await alice.search("#mnist") == []


# -- capabilities ---------------------------------------------------------------------------------


async def test_a_capability_is_used_once(pair: tuple[ft.RemoteWorker, ft.RemoteWorker]) -> None:
    bob, alice = pair
    x = ft.send(torch.arange(4.0), bob)
    object_id = alice.client.new_id()
    token = await _capability(alice, object_id, "secret-1")
    assert await _deliver(bob, x, token, "secret-1") is True
    with pytest.raises(ft.RemoteError, match="already used") as refused:
        await _deliver(bob, x, token, "secret-1")
    assert refused.value.remote_type == "WorkerUnavailable"
    assert "403" in str(refused.value)
    alice.client.release(object_id)
    del x
    await _still_serves(bob, alice)


async def test_a_forged_capability_is_refused(
    pair: tuple[ft.RemoteWorker, ft.RemoteWorker],
) -> None:
    bob, alice = pair
    x = ft.send(torch.arange(4.0), bob)
    token = await _capability(alice, alice.client.new_id(), "secret-2")
    payload, mac = token.split(".")
    fields = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    fields["url"] = "ws://127.0.0.1:9"  # somewhere else: the worker must not connect there
    forged = base64.urlsafe_b64encode(json.dumps(fields).encode()).rstrip(b"=").decode()
    with pytest.raises(ft.RemoteError, match="signature is wrong") as refused:
        await _deliver(bob, x, f"{forged}.{mac}", "secret-2")
    assert refused.value.remote_type == "CapabilityRefused"
    with pytest.raises(ft.RemoteError, match="not a capability token"):
        await _deliver(bob, x, "garbage", "secret-2")
    del x
    await _still_serves(bob, alice)


async def test_another_clients_capability_is_refused(
    processes: tuple[WorkerProcess, WorkerProcess],
    pair: tuple[ft.RemoteWorker, ft.RemoteWorker],
) -> None:
    bob, alice = pair
    victim_id = alice.client.new_id()
    token = await _capability(alice, victim_id, "the victim's secret")
    bob_process = processes[0]
    async with ft.connect(bob_process.url, token=bob_process.token, timeout=30) as thief:
        planted = ft.send(torch.full((3,), 666.0), thief)
        with pytest.raises(ft.RemoteError, match="issued to another client"):
            await _deliver(thief, planted, token, "the thief's secret")
        del planted
    assert victim_id not in await alice.object_ids()  # nothing was planted
    await _still_serves(bob, alice)


async def test_only_a_worker_can_redeem_a_capability(
    processes: tuple[WorkerProcess, WorkerProcess],
    pair: tuple[ft.RemoteWorker, ft.RemoteWorker],
) -> None:
    """A client holding a capability cannot redeem it itself: it lacks the federation key."""
    bob, alice = pair
    token = await _capability(alice, alice.client.new_id(), "secret-3")
    alice_url = processes[1].url
    for headers in ({CAPABILITY_HEADER: token}, {CAPABILITY_HEADER: token, PROOF_HEADER: "x"}):
        with pytest.raises(InvalidStatus) as refused:
            async with raw_connect(alice_url, additional_headers=headers, proxy=None):
                pass
        assert refused.value.response.status_code == 403
        assert b"no valid proof" in refused.value.response.body
    await _still_serves(bob, alice)


def test_capability_checks_on_their_own() -> None:
    now = [100.0]
    issuer = CapabilityIssuer(
        "alice", b"key", lambda: "ws://127.0.0.1:1", ttl=5.0, clock=lambda: now[0]
    )
    session = object()
    token = issuer.issue(session, 7, binding_of("s"))
    delivery = check_delivery(b"key", "bob", token, "s")
    assert delivery.url == "ws://127.0.0.1:1"
    grant = issuer.redeem(token, delivery.proof)
    assert grant.session is session
    assert grant.object_id == 7
    with pytest.raises(CapabilityRefused, match="already used"):
        issuer.redeem(token, delivery.proof)
    # Expired: the issuer's own clock decides (the source may be on another machine).
    late = issuer.issue(session, 8, binding_of("s"))
    now[0] += 5.0
    with pytest.raises(CapabilityRefused, match="expired"):
        issuer.redeem(late, check_delivery(b"key", "bob", late, "s").proof)
    # Another federation's key, a worker without one, a URL that is not a worker's.
    with pytest.raises(CapabilityRefused, match="signature is wrong"):
        check_delivery(b"other key", "bob", token, "s")
    with pytest.raises(CapabilityRefused, match="no federation key"):
        check_delivery(None, "bob", token, "s")
    http = CapabilityIssuer("alice", b"key", lambda: "http://127.0.0.1:1")
    with pytest.raises(CapabilityRefused, match="only to ws://"):
        check_delivery(b"key", "bob", http.issue(session, 9, binding_of("s")), "s")
    with pytest.raises(CapabilityRefused, match="no federation key"):
        CapabilityIssuer("alice", None, lambda: "ws://x").issue(session, 1, binding_of("s"))


def test_one_client_cannot_hoard_capabilities() -> None:
    issuer = CapabilityIssuer("alice", b"key", lambda: "ws://127.0.0.1:1")
    greedy, other = object(), object()
    for object_id in range(MAX_GRANTS_PER_SESSION):
        issuer.issue(greedy, object_id, binding_of("s"))
    with pytest.raises(CapabilityRefused, match="outstanding"):
        issuer.issue(greedy, 10**6, binding_of("s"))
    assert issuer.issue(other, 1, binding_of("s"))  # everyone else still moves


async def test_virtual_workers_cannot_deliver(ft_virtual_workers: Any) -> None:
    bob, alice = await ft_virtual_workers("bob"), await ft_virtual_workers("alice")
    x = ft.send(torch.ones(2), bob)
    with pytest.raises(ft.RemoteError, match="through the client"):
        await _capability(alice, 1, "s")
    with pytest.raises(ft.RemoteError, match="cannot deliver"):
        await _deliver(bob, x, "token", "s")
    del x


# -- virtual and mixed workers --------------------------------------------------------------------


async def test_virtual_workers_move_in_process(ft_virtual_workers: Any) -> None:
    bob, alice = await ft_virtual_workers("bob"), await ft_virtual_workers("alice")
    x = ft.send(torch.arange(5.0, requires_grad=True), bob)
    y = await x.copy(alice)
    assert await y.location.object_ids() == [y.id_at_location]
    await x.move(alice)
    assert x.location is alice
    assert await bob.object_ids() == []
    value = await x.get()
    assert torch.equal(value, torch.arange(5.0))
    assert value.requires_grad
    same = await y.copy()  # a copy on the same worker
    assert same.location is alice
    assert same.id_at_location != y.id_at_location
    assert await y.move(alice) is y  # already there: nothing moves
    sent = await y.send(bob)  # a pointer's send, then get(): the pointer it was sent from
    assert await sent.get() is y
    assert await bob.object_ids() == []
    del y, same


async def test_mixed_virtual_and_process_route_through_the_client(
    ft_virtual_workers: Any, pair: tuple[ft.RemoteWorker, ft.RemoteWorker]
) -> None:
    carol = await ft_virtual_workers("carol")
    bob, _ = pair
    x = ft.send(torch.arange(3.0), carol)
    await x.move(bob)
    assert x.location is bob
    assert await carol.object_ids() == []
    await x.move(carol)
    assert x.location is carol
    assert await bob.object_ids() == []
    assert torch.equal(await x.get(), torch.arange(3.0))


async def test_location_error_names_move() -> None:
    async with ft.VirtualWorker("bob") as bob, ft.VirtualWorker("alice") as alice:
        x, y = ft.send(torch.ones(1), bob), ft.send(torch.ones(1), alice)
        with pytest.raises(ft.LocationError, match=r"ptr\.move\(") as mixed:
            await (x + y)
        assert "copy(" in str(mixed.value)
        await y.move(bob)
        assert torch.equal(await (x + y).get(), torch.full((1,), 2.0))


# -- tags, description, search --------------------------------------------------------------------


@pytest.mark.parametrize("encode", [False, True], ids=["objects", "encoded"])
async def test_tags_and_search_on_virtual_workers(encode: bool) -> None:
    data = torch.arange(8.0).reshape(4, 2)
    async with ft.VirtualWorker(
        "bob",
        datasets={"digits": (data, torch.arange(4))},
        dataset_tags={"digits": ["#mnist"]},
        encode=encode,
    ) as bob:
        x = ft.send(torch.ones(2), bob, tags=["#a", "#b"], description="two ones")
        y = ft.send(torch.zeros(2), bob).tag("#a").describe("two zeros")
        assert x.tags == {"#a", "#b"}
        assert y.tags == {"#a"}
        assert y.description == "two zeros"
        assert len(await bob.search("#a")) == 2
        (only,) = await bob.search("#a", "#b")  # every term must match
        assert torch.equal(await only, torch.ones(2))
        assert only.tags == {"#a", "#b"}
        assert only.id_at_location != x.id_at_location  # its own id: each pointer frees its own
        (zeros,) = await bob.search(["zeros"])  # words of the description match too
        assert torch.equal(await zeros, torch.zeros(2))
        assert await bob.search("#nothing") == []
        by_tag = await bob.search("#mnist", "#data")
        assert [(p.shape, p.dtype) for p in by_tag] == [(torch.Size([4, 2]), torch.float32)]
        assert torch.equal(await by_tag[0], data)
        parts = await bob.search("#digits")
        assert {frozenset(p.tags) & {"#data", "#target"} for p in parts} == {
            frozenset({"#data"}),
            frozenset({"#target"}),
        }
        # A search's pointer to one's own object is the same object: in place shows.
        only.add_(1)
        assert torch.equal(await x, torch.full((2,), 2.0))
        del x, y, only, zeros, by_tag, parts
        # Released objects are no longer found.
        assert await bob.search("#a") == []


@pytest.mark.parametrize("kind", ["virtual", "process"])
async def test_search_never_finds_another_clients_objects(
    kind: str, processes: tuple[WorkerProcess, WorkerProcess]
) -> None:
    async with ft.VirtualWorker("dora", datasets={"digits": (torch.ones(2, 1), torch.ones(2))}):
        process = processes[0]
        url = "memory://dora" if kind == "virtual" else process.url
        options = {} if kind == "virtual" else {"token": process.token}
        async with (
            ft.connect(url, timeout=30, **options) as one,
            ft.connect(url, timeout=30, **options) as other,
        ):
            mine = ft.send(torch.ones(1), one, tags=["#secret"])
            assert len(await one.search("#secret")) == 1
            assert await other.search("#secret") == []
            # Both find the worker's data set.
            assert len(await other.search("#digits", "#data")) == 1
            with pytest.raises(ft.RemoteError):  # nor can it tag one by guessing its id
                await call_on(
                    other.client, "fedtensor.describe", (mine.id_at_location, ["#x"], None), {}
                )
            del mine


def test_blocking_api_tags_search_and_moves() -> None:
    hook = sy.TorchHook(torch)
    try:
        bob = sy.VirtualWorker(hook, id="bob")
        alice = sy.VirtualWorker(hook, id="alice")
        x = torch.tensor([1.0, 2, 3]).tag("#x", "#toy").describe("a toy").send(bob)
        assert x.tags == {"#x", "#toy"}
        assert x.description == "a toy"
        (found,) = bob.search("#x")
        assert torch.equal(found.get(), torch.tensor([1.0, 2, 3]))
        y = x.send(alice)  # PySyft's pointer send: a copy on alice
        assert len(bob._objects) == 1
        assert len(alice._objects) == 1
        y.remote_get()
        assert len(bob._objects) == 0
        assert torch.equal(y.get(), torch.tensor([1.0, 2, 3]))
        # PySyft's pointer to a pointer: the first get() gives the pointer to bob.
        chained = torch.tensor([4, 5]).send(bob).send(alice)
        assert len(bob._objects) == 1
        assert len(alice._objects) == 1
        on_bob = chained.get()
        assert on_bob.location is bob
        assert len(alice._objects) == 0
        assert torch.equal(on_bob.get(), torch.tensor([4, 5]))
        assert len(bob._objects) == 0
        z = torch.ones(2).send(bob)
        assert z.move(alice) is z
        assert z.location is alice
        assert torch.equal(z.copy().get(), torch.ones(2))
        del x, z
    finally:
        hook.unhook()
    assert not hasattr(torch.Tensor, "tag")


def test_blocking_pointers_to_pointers_between_processes(
    processes: tuple[WorkerProcess, WorkerProcess],
) -> None:
    """PySyft Part 3's cells as written, over worker processes (fedtensor.sync)."""
    bob = sy.connect(processes[0].url, token=processes[0].token, timeout=30)
    alice = sy.connect(processes[1].url, token=processes[1].token, timeout=30)
    try:
        hook = sy.TorchHook(torch)
        try:
            p2p2x = torch.tensor([1, 2, 3, 4, 5]).send(bob).send(alice)
            y = p2p2x + p2p2x
            assert len(bob._objects) == 2
            assert [record["pointer_to"] for record in alice._objects.values()] == [bob.id] * 2
            assert torch.equal(y.get().get(), torch.tensor([2, 4, 6, 8, 10]))
            assert len(bob._objects) == 1
            assert len(alice._objects) == 1
            assert torch.equal(p2p2x.get().get(), torch.tensor([1, 2, 3, 4, 5]))
            assert len(bob._objects) == 0
            assert len(alice._objects) == 0
            x = torch.tensor([1, 2, 3, 4, 5]).send(bob).send(alice)
            assert x.remote_get() is x
            assert len(bob._objects) == 0
            assert next(iter(alice._objects.values())).tolist() == [1, 2, 3, 4, 5]
            x = x.move(bob)
            assert x.location is bob
            assert torch.equal(x.get(), torch.tensor([1, 2, 3, 4, 5]))
        finally:
            hook.unhook()
    finally:
        for worker in (bob, alice):
            worker.client.run_threadsafe(worker.aclose(), 30)


def test_worker_options_for_moves_and_tags_are_checked(
    capsys: pytest.CaptureFixture[str], data_file: Path
) -> None:
    from fedtensor.cli import main

    base = ["worker", "--id", "x", "--no-auth", "--dataset", f"digits={data_file}"]
    assert main([*base, "--dataset-tags", "nope=#a"]) == 2
    assert "--dataset-tags" in capsys.readouterr().err
    assert main([*base, "--advertise-url", "http://example.org"]) == 2
    assert "--advertise-url" in capsys.readouterr().err
    assert main([*base, "--capability-ttl", "0"]) == 2
    assert "--capability-ttl" in capsys.readouterr().err
