"""Fixed precision and additive secret sharing (PySyft 0.2's fix_precision and share).

What a party holds is checked statistically: the same secret shared many times gives
shares whose bytes are uniform (chi-square), and two different secrets give share
distributions that cannot be told apart. Results are checked against plain arithmetic
within the fixed-precision error, and the crypto provider's triple shares are checked
to travel by ``move`` (worker to worker between processes: nothing but a confirmation
comes back to the client from the provider).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from scipy import stats

import fedtensor as ft
import fedtensor.sync as sy
from fedtensor.client import engine as engine_module
from fedtensor.client import sharing as sharing_module
from fedtensor.client.pointer import PointerBase, call_on
from fedtensor.protocol.messages import Call, Failure, Fetch, Ref, Reply, Store
from fedtensor.protocol.ring import random_ring, split
from fedtensor.testing import WorkerProcess, start_worker_process
from fedtensor.worker.actor import WorkerActor
from fedtensor.worker.budget import Ledger, check_worker_operation
from fedtensor.worker.sharing import MAX_TRIPLE_ELEMENTS, beaver_triple, split_bytes

KEY = "a shared federation key for these secret-sharing tests only"
SAMPLES = 1 << 14  # shares of one secret, drawn at once (one tensor of that many copies)
P_MIN = 1e-4  # a uniform source fails a test with about this probability


@pytest.fixture
def three() -> Iterator[tuple[Any, Any, Any]]:
    """bob and alice (the parties) and charlie (the crypto provider), blocking API."""
    hook = sy.TorchHook(torch)
    try:
        yield (
            sy.VirtualWorker(hook, id="bob"),
            sy.VirtualWorker(hook, id="alice"),
            sy.VirtualWorker(hook, id="charlie"),
        )
    finally:
        hook.unhook()


def _byte_counts(values: torch.Tensor, byte: int) -> np.ndarray:
    """How often each value 0..255 occurs as byte ``byte`` (0 lowest) of the int64s."""
    unsigned = values.numpy().view(np.uint64)
    digits = (unsigned >> np.uint64(8 * byte)) & np.uint64(0xFF)
    return np.bincount(digits.astype(np.int64), minlength=256)


def _party_shares(shared: Any) -> list[torch.Tensor]:
    """What each worker holds of ``shared``: read on the worker, not reconstructed."""
    return [pointer.value(timeout=30) for pointer in shared.shares]


# -- fixed precision, locally ---------------------------------------------------------------------


def test_fixed_precision_encodes_and_decodes() -> None:
    x = torch.tensor([0.1, -2.5, 3.14159, 0.0004, -0.0006])
    fixed = ft.fix_precision(x)
    assert fixed.ring.dtype == torch.int64
    assert fixed.ring.tolist() == [100, -2500, 3142, 0, -1]
    assert fixed.float_precision().dtype == torch.float32
    torch.testing.assert_close(fixed.float_precision(), x, atol=5e-4, rtol=0)
    assert torch.equal(fixed.float_prec(), fixed.float_precision())
    five = ft.fix_precision(torch.tensor([1.23456]), precision_fractional=5)
    assert five.ring.tolist() == [123456]
    with pytest.raises(ValueError, match="precision_fractional"):
        ft.fix_precision(x, precision_fractional=12)
    with pytest.raises(ValueError, match="too large"):
        ft.fix_precision(torch.tensor([1e18]))
    with pytest.raises(ValueError, match="do not mix"):
        fixed + five


def test_fixed_precision_arithmetic() -> None:
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(4, 5, generator=generator) * 20 - 10
    y = torch.rand(4, 5, generator=generator) * 20 - 10
    w = torch.rand(5, 3, generator=generator) * 2 - 1
    fx, fy, fw = ft.fix_precision(x), ft.fix_precision(y), ft.fix_precision(w)
    ulp = 1e-3
    torch.testing.assert_close((fx + fy).float_precision(), x + y, atol=ulp, rtol=0)
    torch.testing.assert_close((fx - fy).float_precision(), x - y, atol=ulp, rtol=0)
    torch.testing.assert_close((-fx).float_precision(), -x, atol=ulp, rtol=0)
    torch.testing.assert_close(fx.sum().float_precision(), x.sum(), atol=20 * ulp, rtol=0)
    torch.testing.assert_close((fx * fy).float_precision(), x * y, atol=20 * ulp, rtol=0)
    torch.testing.assert_close((fx * 3).float_precision(), x * 3, atol=4 * ulp, rtol=0)
    torch.testing.assert_close((fx + 1.5).float_precision(), x + 1.5, atol=ulp, rtol=0)
    torch.testing.assert_close((fx @ fw).float_precision(), x @ w, atol=30 * ulp, rtol=0)


# -- what one party holds -------------------------------------------------------------------------


def test_ring_split_sums_to_the_secret_modulo_2_64() -> None:
    secret = torch.tensor([0, 1, -1, 2**63 - 1, -(2**63)])
    for parties in (2, 3, 5):
        shares = split(secret, parties)
        total = torch.zeros_like(secret)
        for share in shares:
            total += share
        assert torch.equal(total, secret)
    assert random_ring((0,)).shape == (0,)


@pytest.mark.parametrize("byte", [0, 3, 7])
def test_each_share_alone_is_uniform(three: tuple[Any, Any, Any], byte: int) -> None:
    bob, alice, charlie = three
    # One secret (1.5) shared SAMPLES times, as one tensor of copies.
    secret = torch.full((SAMPLES,), 1.5).fix_precision()
    shared = secret.share(bob, alice, crypto_provider=charlie)
    for held in _party_shares(shared):
        assert not torch.any(held == 1500)  # nothing holds the secret's ring value
        counts = _byte_counts(held, byte)
        assert stats.chisquare(counts).pvalue > P_MIN, f"byte {byte} is not uniform: {counts}"
    assert torch.equal(shared.get().ring, secret.ring)


def test_shares_of_different_secrets_are_indistinguishable(three: tuple[Any, Any, Any]) -> None:
    bob, alice, charlie = three
    small = torch.zeros(SAMPLES, dtype=torch.int64).share(bob, alice, charlie)
    large = torch.full((SAMPLES,), 10**15).share(bob, alice, charlie)
    for one, other in zip(_party_shares(small), _party_shares(large), strict=True):
        for byte in (0, 7):
            table = np.stack([_byte_counts(one, byte), _byte_counts(other, byte)])
            assert stats.chi2_contingency(table).pvalue > P_MIN
    assert torch.equal(small.get(), torch.zeros(SAMPLES, dtype=torch.int64))
    assert torch.equal(large.get(), torch.full((SAMPLES,), 10**15))


def test_worker_objects_hold_shares_not_the_secret(three: tuple[Any, Any, Any]) -> None:
    bob, alice, charlie = three
    x = torch.tensor([1, 2, 3, 4]).share(bob, alice, crypto_provider=charlie)
    (on_bob,) = bob._objects.values()
    (on_alice,) = alice._objects.values()
    assert on_bob.dtype == torch.int64
    assert not torch.equal(on_bob, torch.tensor([1, 2, 3, 4]))
    assert torch.equal(on_bob + on_alice, torch.tensor([1, 2, 3, 4]))
    assert len(charlie._objects) == 0
    assert torch.equal(x.get(), torch.tensor([1, 2, 3, 4]))
    assert len(bob._objects) == len(alice._objects) == 0  # get() freed the shares


# -- arithmetic on shared tensors -----------------------------------------------------------------


def test_shared_arithmetic_equals_plain_arithmetic(three: tuple[Any, Any, Any]) -> None:
    bob, alice, charlie = three
    generator = torch.Generator().manual_seed(2)
    x = torch.rand(3, 4, generator=generator) * 20 - 10
    y = torch.rand(3, 4, generator=generator) * 20 - 10
    w = torch.rand(4, 2, generator=generator) * 2 - 1
    sx, sy_, sw = (t.fix_precision().share(bob, alice, crypto_provider=charlie) for t in (x, y, w))
    ulp = 1e-3

    def check(shared: Any, expected: torch.Tensor, atol: float) -> None:
        value = shared.get()
        assert isinstance(value, ft.FixedPrecisionTensor)
        torch.testing.assert_close(value.float_precision(), expected, atol=atol, rtol=0)

    check(sx + sy_, x + y, 2 * ulp)
    check(sx - sy_, x - y, 2 * ulp)
    check(sx.sum(), x.sum(), 12 * ulp)
    check(sx.sum(dim=0), x.sum(dim=0), 4 * ulp)
    check(sx + 2.5, x + 2.5, 2 * ulp)
    check(1 - sx, 1 - x, 2 * ulp)
    check(sx * 3, x * 3, 4 * ulp)
    check(sx * 0.5, x * 0.5, 3 * ulp)
    check(sx * sy_, x * y, 25 * ulp)
    check(sx.matmul(sw), x @ w, 30 * ulp)
    check(sx @ sw, x @ w, 30 * ulp)
    check((sx * sy_) @ sw + sx.sum(dim=1, keepdim=True), (x * y) @ w + x.sum(1, True), 0.2)
    # Every intermediate is freed once unused: only x, y and w remain, and no triple.
    assert len(bob._objects) == len(alice._objects) == 3
    assert len(charlie._objects) == 0
    del sx, sy_, sw
    assert len(bob._objects) == len(alice._objects) == 0


def test_integer_sharing_over_three_parties(three: tuple[Any, Any, Any]) -> None:
    bob, alice, charlie = three
    dave = sy.VirtualWorker(id="dave")
    x = torch.tensor([[3, -4], [5, 6]]).share(bob, alice, dave, crypto_provider=charlie)
    y = torch.tensor([[7, 8], [-9, 10]]).share(bob, alice, dave, crypto_provider=charlie)
    assert torch.equal((x * y).get(), torch.tensor([[21, -32], [-45, 60]]))
    assert torch.equal((x @ y).get(), torch.tensor([[3 * 7 + 4 * 9, 24 - 40], [35 - 54, 40 + 60]]))
    assert torch.equal((x - y + 1).get(), torch.tensor([[-3, -11], [15, -3]]))
    # A fixed-precision product is truncated with the two-party trick only.
    fx = torch.tensor([1.0]).fix_precision().share(bob, alice, dave, crypto_provider=charlie)
    with pytest.raises(ft.FedTensorError, match="exactly two"):
        fx * fx
    del x, y, fx


def test_bad_uses_are_refused(three: tuple[Any, Any, Any]) -> None:
    bob, alice, charlie = three
    with pytest.raises(TypeError, match="fix_precision"):
        torch.tensor([1.5]).share(bob, alice)
    with pytest.raises(ValueError, match="crypto provider"):
        torch.tensor([1]).share(bob, alice, crypto_provider=alice)
    with pytest.raises(ValueError, match="at least two"):
        torch.tensor([1]).share(bob)
    x = torch.tensor([1]).share(bob, alice)
    with pytest.raises(ft.FedTensorError, match="crypto provider"):
        x * x
    other = torch.tensor([1]).share(alice, bob, crypto_provider=charlie)
    with pytest.raises(ft.LocationError, match="same workers"):
        x + other
    assert torch.equal(x.get(), torch.tensor([1]))
    with pytest.raises(ft.FedTensorError, match="consumed"):
        x.get()
    del other


def test_comparisons_and_max(three: tuple[Any, Any, Any]) -> None:
    bob, alice, charlie = three
    a = torch.tensor([0.5, -1.0, 2.0, 3.0, -0.001, 0.0, 1e6, -1e6])
    b = torch.tensor([1.0, -2.0, 2.0, -3.0, 0.0, 0.0, -1e6, 1e6])
    x = a.fix_precision().share(bob, alice, crypto_provider=charlie)
    y = b.fix_precision().share(bob, alice, crypto_provider=charlie)
    for shared, expected in [
        (x < y, a < b),
        (x > y, a > b),
        (x <= y, a <= b),
        (x >= y, a >= b),
        (x > 0, a > 0),
        (x == y, a == b),
        (x != y, a != b),
        (x == 0, a == 0),
        (x.lt(-0.5), a < -0.5),
    ]:
        assert torch.equal(shared.get().float_precision(), expected.float())
    assert x.max().get().float_precision() == 1e6
    ints = torch.tensor([[5, -7, 100], [2**40, -(2**40), 3]]).share(
        bob, alice, crypto_provider=charlie
    )
    assert torch.equal((ints > 4).get(), torch.tensor([[1, 0, 1], [1, 0, 0]]))
    assert ints.max().get() == 2**40
    # The top bit is exact, whatever the shares: values near the ring's ends compare right.
    extremes = torch.tensor([2**62, -(2**62), 1, -1]).share(bob, alice, crypto_provider=charlie)
    assert torch.equal(extremes.lt(0).get(), torch.tensor([0, 1, 0, 1]))
    assert len(charlie._objects) == 0
    assert len(bob._objects) == len(alice._objects) == 4  # x, y, ints, extremes
    del x, y, ints, extremes
    assert len(bob._objects) == len(alice._objects) == 0


def test_comparisons_and_max_over_three_parties(three: tuple[Any, Any, Any]) -> None:
    bob, alice, charlie = three
    dave = sy.VirtualWorker(id="dave")
    erin = sy.VirtualWorker(id="erin")
    plain = torch.tensor([5, -7, 0, 2**40, -(2**40), 3, 3])
    x = plain.share(bob, alice, dave, crypto_provider=charlie)
    assert torch.equal((x > 0).get(), (plain > 0).long())
    assert torch.equal((x <= 3).get(), (plain <= 3).long())
    assert torch.equal((x == 3).get(), (plain == 3).long())
    assert x.max().get() == 2**40
    assert x.argmax().get() == 3
    # Fixed precision, four holders: comparisons and max need no truncation.
    a = torch.tensor([[0.5, -1.25, 2.0], [-0.001, 7.5, 7.5]])
    fx = a.fix_precision().share(bob, alice, dave, erin, crypto_provider=charlie)
    assert torch.equal((fx < 0.5).get().float_precision(), (a < 0.5).float())
    values, indices = fx.max(dim=1)
    assert torch.equal(values.get().float_precision(), torch.tensor([2.0, 7.5]))
    assert torch.equal(indices.get(), torch.tensor([2, 1]))  # the first of a tie, as torch
    assert len(charlie._objects) == 0
    del x, fx
    assert len(bob._objects) == len(dave._objects) == len(erin._objects) == 0


def test_comparisons_need_a_provider(three: tuple[Any, Any, Any]) -> None:
    bob, alice, _ = three
    y = torch.tensor([1, -1]).share(bob, alice)
    with pytest.raises(ft.FedTensorError, match="crypto provider"):
        y > 0  # noqa: B015
    with pytest.raises(ft.FedTensorError, match="crypto provider"):
        y.max(dim=0)
    del y


def test_max_and_argmax_along_a_dim(three: tuple[Any, Any, Any]) -> None:
    bob, alice, charlie = three
    generator = torch.Generator().manual_seed(4)
    plain = (torch.rand(3, 5, 2, generator=generator) * 20 - 10).round(decimals=3)
    plain[1, 2, 0] = plain[1, 4, 0] = 50.0  # a tie along dim 1: the first index wins
    x = plain.fix_precision().share(bob, alice, crypto_provider=charlie)
    for dim in (0, 1, 2, -1):
        for keepdim in (False, True):
            values, indices = x.max(dim=dim, keepdim=keepdim)
            expected = plain.max(dim=dim, keepdim=keepdim)
            fixed = values.get()
            assert isinstance(fixed, ft.FixedPrecisionTensor)
            torch.testing.assert_close(fixed.float_precision(), expected.values, atol=1e-3, rtol=0)
            got = indices.get()
            assert got.dtype == torch.int64
            assert torch.equal(got, expected.indices), (dim, keepdim)
    assert x.argmax().get() == plain.argmax()
    assert torch.equal(x.argmax(dim=1).get(), plain.argmax(dim=1))
    assert torch.equal(x.argmax(dim=0, keepdim=True).get(), plain.argmax(dim=0, keepdim=True))
    ints = torch.tensor([[2, 3], [4, 1]]).share(bob, alice, crypto_provider=charlie)
    values, indices = ints.max(dim=0)  # PySyft's Part 9
    assert torch.equal(values.get(), torch.tensor([4, 3]))
    assert torch.equal(indices.get(), torch.tensor([1, 0]))
    scalar = torch.tensor(7).share(bob, alice, crypto_provider=charlie)
    assert scalar.max().get() == 7
    assert scalar.argmax().get() == 0
    with pytest.raises(ValueError, match="out of range"):
        x.max(dim=3)
    with pytest.raises(ValueError, match="out of range"):
        x.argmax(dim="rows")
    empty = torch.zeros(0, dtype=torch.int64).share(bob, alice, crypto_provider=charlie)
    with pytest.raises(ValueError, match="empty"):
        empty.max()
    assert len(charlie._objects) == 0
    del x, ints, scalar, empty
    gc.collect()  # the tracebacks pytest.raises kept hold a shared tensor in a cycle
    assert len(bob._objects) == len(alice._objects) == 0


def test_division_by_public_numbers(three: tuple[Any, Any, Any]) -> None:
    bob, alice, charlie = three
    generator = torch.Generator().manual_seed(5)
    plain = torch.rand(200, generator=generator) * 200 - 100
    x = plain.fix_precision().share(bob, alice, crypto_provider=charlie)
    ulp = 1e-3
    # By an int: the two-party truncation by it, exact to one unit (plus the encoding's).
    for divisor in (2, 3, 7, -4, 1000):
        got = (x / divisor).get().float_precision()
        torch.testing.assert_close(got, plain / divisor, atol=2 * ulp, rtol=0)
    # By a float or a tensor: times its reciprocal at the tensor's precision.
    got = (x / 0.25).get().float_precision()
    torch.testing.assert_close(got, plain / 0.25, atol=6 * ulp, rtol=0)
    got = (x / 0.3).get().float_precision()  # 1/0.3 encoded as 3.333: off by |x| * 3.3e-4
    torch.testing.assert_close(got, plain / 0.3, atol=100 * 3.4e-4 + 4 * ulp, rtol=0)
    # Floats and tensors of whole values are divided by exactly, element by element.
    got = x.div(3.0).get().float_precision()
    torch.testing.assert_close(got, plain / 3.0, atol=2 * ulp, rtol=0)
    divisors = torch.tensor([8.0, -3.0]).repeat(100)
    torch.testing.assert_close(
        (x / divisors).get().float_precision(), plain / divisors, atol=2 * ulp, rtol=0
    )
    # Shared integers: by an int, rounded to one of the two nearest integers.
    ints = torch.tensor([7, -7, 100, 0, 1]).share(bob, alice, crypto_provider=charlie)
    quotient = (ints / 2).get()
    exact = torch.tensor([3.5, -3.5, 50.0, 0.0, 0.5])
    assert bool(((quotient - exact).abs() <= 0.5).all()), quotient
    with pytest.raises(TypeError, match="shared tensor is not implemented"):
        x / x
    with pytest.raises(ZeroDivisionError):
        x / 0
    with pytest.raises(ZeroDivisionError):
        x / torch.tensor([1.0, 0.0])
    assert bool((((ints / torch.tensor(2)).get() - exact).abs() <= 0.5).all())
    with pytest.raises(TypeError, match="whole numbers only"):
        ints / 2.5
    with pytest.raises(TypeError, match="no divisor"):
        x / "2"
    three_holders = torch.tensor([9]).share(bob, alice, charlie)
    with pytest.raises(ft.FedTensorError, match="exactly two"):
        three_holders / 3
    del x, ints, three_holders


def test_unshared_operands_are_refused(three: tuple[Any, Any, Any]) -> None:
    bob, alice, charlie = three
    x = torch.tensor([1.0, 2.0]).fix_precision().share(bob, alice, crypto_provider=charlie)
    on_bob = torch.tensor([1.0, 2.0]).send(bob)
    for operand in (on_bob, on_bob.fix_precision()):
        with pytest.raises(TypeError, match="pointer is no public operand"):
            x + operand
    with pytest.raises(TypeError, match="no operand"):
        x - "1"
    with pytest.raises(TypeError, match="no operand"):
        x > [1, 2]  # noqa: B015
    del x, on_bob


# -- sharing a worker's tensor (PySyft's Part 10) -------------------------------------------------


@pytest.fixture
def moves(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, bool]]:
    """Every worker-to-worker transfer the sharing code makes: (from, to, keep)."""
    made: list[tuple[str, str, bool]] = []
    transfer = sharing_module.transfer

    async def spy(pointer: Any, destination: Any, *, keep: bool, timeout: Any) -> Any:
        made.append((pointer.location.id, destination.id, keep))
        return await transfer(pointer, destination, keep=keep, timeout=timeout)

    monkeypatch.setattr(sharing_module, "transfer", spy)
    return made


@pytest.fixture
def fetched(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """Every value this client fetches from a worker: (worker id, value)."""
    values: list[tuple[str, Any]] = []
    fetch = engine_module.Client.fetch

    async def spy(self: Any, id_: int, *, free: bool, timeout: float | None = None) -> Any:
        value = await fetch(self, id_, free=free, timeout=timeout)
        values.append((self.worker.id, value))
        return value

    monkeypatch.setattr(engine_module.Client, "fetch", spy)
    return values


def test_sharing_a_pointers_data(
    three: tuple[Any, Any, Any], moves: list[tuple[str, str, bool]]
) -> None:
    bob, alice, charlie = three
    plain = torch.tensor([[1.5, -2.25], [0.125, 3.0]])
    on_bob = plain.send(bob)
    remote = on_bob.fix_precision()
    assert isinstance(remote, sharing_module.RemoteFixedPrecision)
    pointer = remote.share(bob, alice, crypto_provider=charlie)
    assert isinstance(pointer, sharing_module.SharedTensorPointer)
    assert pointer.location is bob
    shared = pointer.get()
    assert isinstance(shared, sharing_module.SyncAdditiveSharingTensor)
    assert shared.locations == [bob, alice]
    assert shared.shape == (2, 2)
    # bob drew the shares and kept its own; alice's was moved to her, worker to worker.
    assert moves == [("bob", "alice", False)]
    assert len(bob._objects) == 2  # the tensor and bob's share
    assert len(alice._objects) == 1
    assert len(charlie._objects) == 0
    # The shares work as any others: a product, a comparison, the reconstruction.
    factor = torch.tensor([[2.0, 2.0], [-1.0, 0.5]])
    other = factor.fix_precision().share(bob, alice, crypto_provider=charlie)
    torch.testing.assert_close(
        (shared * other).get().float_precision(), plain * factor, atol=5e-3, rtol=0
    )
    assert torch.equal((shared > 0).get().float_precision(), (plain > 0).float())
    fixed = shared.get()
    assert torch.equal(fixed.ring, ft.fix_precision(plain).ring)
    with pytest.raises(ft.FedTensorError, match="already taken"):
        pointer.get()
    # An integer tensor is shared as it is; a float one needs fix_precision().
    ints = torch.tensor([3, -4]).send(alice).share(bob, alice, crypto_provider=charlie).get()
    assert torch.equal(ints.get(), torch.tensor([3, -4]))
    with pytest.raises(TypeError, match="fix_precision"):
        on_bob.share(bob, alice)
    with pytest.raises(ValueError, match="at least two"):
        on_bob.fix_precision().share(bob)
    with pytest.raises(ValueError, match="crypto provider"):
        on_bob.fix_precision().share(bob, alice, crypto_provider=bob)
    # fetched back whole, as fixed precision, by its owner
    assert torch.equal(on_bob.fix_precision().get().ring, ft.fix_precision(plain).ring)
    del shared, other


@pytest.mark.parametrize("holder", [0, 1])
def test_shares_a_worker_draws_are_uniform(three: tuple[Any, Any, Any], holder: int) -> None:
    bob, alice, charlie = three
    secret = torch.full((SAMPLES,), 1.5).send(bob)
    shared = secret.fix_precision().share(bob, alice, crypto_provider=charlie).get()
    held = _party_shares(shared)[holder]
    assert not torch.any(held == 1500)
    for byte in (0, 7):
        counts = _byte_counts(held, byte)
        assert stats.chisquare(counts).pvalue > P_MIN, f"byte {byte} is not uniform: {counts}"
    assert bool((shared.get().ring == 1500).all())
    del secret


def test_secure_aggregation_of_remote_parameters(three: tuple[Any, Any, Any]) -> None:
    bob, alice, james = three
    torch.manual_seed(6)
    models = [torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)]
    expected = [
        (p + q) / 2 for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True)
    ]
    expected = [tensor.detach() for tensor in expected]
    models[0].send(bob)
    models[1].send(alice)
    params = [list(model.parameters()) for model in models]
    for i in range(len(params[0])):
        spdz = [
            params[w][i].copy().fix_precision().share(bob, alice, crypto_provider=james).get()
            for w in range(2)
        ]
        average = (spdz[0] + spdz[1]).get().float_precision() / 2
        torch.testing.assert_close(average, expected[i], atol=1e-3, rtol=0)
    assert len(james._objects) == 0
    for model in models:
        model.get()


def test_a_bad_split_request_is_refused_and_the_worker_serves_on(
    three: tuple[Any, Any, Any],
) -> None:
    bob, _, _ = three
    x = torch.tensor([1.0, float("inf")]).send(bob)
    for args, message in [
        ((x, 2, 3), "too large"),
        ((x, 2, 12), "precision_fractional"),
        ((x, 1, 3), "2 to"),
        ((x, 2, None), "fix_precision"),
        (("x", 2, 3), "takes a tensor"),
    ]:
        bad = call_on(bob.client, "fedtensor.split_shares", args, {})
        with pytest.raises(ft.RemoteError, match=message):
            bad.get(timeout=30)
    y = torch.tensor([2.0]).send(bob)
    assert torch.equal((y * 2).get(timeout=30), torch.tensor([4.0]))
    del x


def test_a_split_over_the_quota_is_refused_before_it_runs() -> None:
    actor = WorkerActor("w")
    session = actor.open_session(
        lambda *_: None, lambda *_: None, aliases_values=True, memory_quota=1 << 20
    )
    value = torch.rand(16384)  # 64 KiB; 16 shares of it would take about 2.4 MiB
    actor.execute(session, [Store(1, value)])
    actor.execute(session, [Call(2, "fedtensor.split_shares", (Ref(1), 16, 3), {})])
    (reply,) = actor.execute(session, [Fetch(9, 2, free=False)])
    assert isinstance(reply, Failure)
    assert reply.kind == "limit"
    assert reply.message.startswith("fedtensor.split_shares would allocate 2490368 bytes")
    actor.execute(session, [Call(3, "fedtensor.split_shares", (Ref(1), 2, 3), {})])
    (reply,) = actor.execute(session, [Fetch(10, 3, free=False)])
    assert isinstance(reply, Reply)
    first, second = reply.value
    assert torch.equal(first + second, ft.fix_precision(value).ring)


def test_split_shares_is_budget_checked() -> None:
    value = torch.zeros(1000)
    assert split_bytes(value, 16, 3) == 8 * 1000 * 19
    ledger = Ledger(100_000)  # more than a data-dependent bound of the input, less than 16 shares
    refused = check_worker_operation("fedtensor.split_shares", (value, 16, 3), {}, ledger, {})
    assert refused is not None
    assert refused.error_type == "MemoryQuotaExceeded"
    assert "fedtensor.split_shares" in refused.message
    assert check_worker_operation("fedtensor.split_shares", (value, 2, 3), {}, ledger, {}) is None


# -- the crypto provider --------------------------------------------------------------------------


def test_beaver_triple_shares_make_a_triple() -> None:
    parts = beaver_triple("matmul", [2, 3], [3, 4], 3)
    assert len(parts) == 3
    whole = parts[0] + parts[1] + parts[2]
    a, b, c = whole[:6].reshape(2, 3), whole[6:18].reshape(3, 4), whole[18:].reshape(2, 4)
    assert torch.equal(a @ b, c)
    parts = beaver_triple("mul", [4], [1], 2)
    whole = parts[0] + parts[1]
    assert torch.equal(whole[:4] * whole[4:5], whole[5:])
    parts = beaver_triple("and", [3], [3], 2)  # shared by XOR
    whole = parts[0] ^ parts[1]
    assert torch.equal(whole[:3] & whole[3:6], whole[6:])
    parts = beaver_triple("bit", [64], [], 2)  # one bit, shared by XOR and additively
    as_xor, as_sum = parts[0][:64] ^ parts[1][:64], parts[0][64:] + parts[1][64:]
    assert torch.equal(as_xor, as_sum)
    assert set(as_xor.tolist()) <= {0, 1}
    assert set(parts[0][:64].tolist()) <= {0, 1}
    for args, message in [
        (("conv", [1], [1], 2), "'mul', 'matmul', 'and' or 'bit'"),
        (("mul", [1], [1], 1), "2 to"),
        (("matmul", [2, 3], [4, 5], 2), "do not fit"),
        (("mul", [-1], [1], 2), "non-negative"),
        (("mul", [MAX_TRIPLE_ELEMENTS], [1], 2), "over the limit"),
    ]:
        with pytest.raises((ValueError, TypeError), match=message):
            beaver_triple(*args)


def test_a_bad_triple_request_is_refused_and_the_worker_serves_on(
    three: tuple[Any, Any, Any],
) -> None:
    _, _, charlie = three
    bad = call_on(charlie.client, "fedtensor.beaver_triple", ("mul", [1 << 40], [1], 2), {})
    with pytest.raises(ft.RemoteError, match="over the limit"):
        bad.get(timeout=30)
    x = torch.tensor([2.0]).send(charlie)
    assert torch.equal((x * 2).get(timeout=30), torch.tensor([4.0]))


def test_triples_are_moved_to_the_parties(
    three: tuple[Any, Any, Any], moves: list[tuple[str, str, bool]]
) -> None:
    bob, alice, charlie = three
    x = torch.tensor([1.5, 2.0]).fix_precision().share(bob, alice, crypto_provider=charlie)
    product = (x * x).get().float_precision()
    torch.testing.assert_close(product, torch.tensor([2.25, 4.0]), atol=3e-3, rtol=0)
    assert sorted(moves) == [("charlie", "alice", False), ("charlie", "bob", False)]
    assert len(charlie._objects) == 0
    del x


@pytest.mark.anyio
async def test_async_api_on_virtual_workers(ft_virtual_workers: Any) -> None:
    bob, alice = await ft_virtual_workers("bob"), await ft_virtual_workers("alice")
    charlie = await ft_virtual_workers("charlie")
    x = torch.tensor([[1.5, -2.0], [0.25, 4.0]])
    sx = ft.fix_precision(x).share(bob, alice, crypto_provider=charlie)
    assert isinstance(sx, ft.AdditiveSharingTensor)
    with pytest.raises(TypeError, match=r"await x\.matmul"):
        sx @ sx
    product = await sx.matmul(sx)
    bigger = await sx.ge(1.5)
    same = await sx.eq(ft.fix_precision(torch.tensor([[1.5, 2.0], [0.0, 4.0]])))
    largest = await sx.max()
    torch.testing.assert_close((await product.get()).float_precision(), x @ x, atol=0.02, rtol=0)
    assert torch.equal((await bigger.get()).float_precision(), (x >= 1.5).float())
    assert (await largest.get()).float_precision() == 4.0
    assert torch.equal((await same.get()).float_precision(), torch.tensor([[1.0, 0], [0, 1]]))
    integers = ft.share(torch.tensor([7, -8]), bob, alice)
    assert torch.equal(await (integers * 3 + 1).get(), torch.tensor([22, -23]))
    del sx, integers  # the fixture checks that nothing is left on the workers


@pytest.mark.anyio
async def test_async_api_shares_a_pointers_data(ft_virtual_workers: Any) -> None:
    bob, alice = await ft_virtual_workers("bob"), await ft_virtual_workers("alice")
    dave, charlie = await ft_virtual_workers("dave"), await ft_virtual_workers("charlie")
    plain = torch.tensor([[4.0, -1.5, 2.5], [0.25, 9.0, -3.0]])
    on_dave = ft.send(plain, dave)  # dave owns it and is no holder: both shares move
    shared = await ft.fix_precision(on_dave).share(bob, alice, crypto_provider=charlie)
    assert isinstance(shared, ft.AdditiveSharingTensor)
    # ft.share of a pointer: its worker shares it (a coroutine in the async API)
    ints = await ft.share(
        ft.send(torch.tensor([5, -6, 7]), bob), bob, alice, crypto_provider=charlie
    )
    values, indices = await shared.max(dim=0)
    largest = await shared.argmax()
    assert torch.equal((await values.get()).float_precision(), torch.tensor([4.0, 9.0, 2.5]))
    assert torch.equal(await indices.get(), torch.tensor([0, 1, 0]))
    assert await largest.get() == 4
    assert torch.equal(await (await ints.gt(0)).get(), torch.tensor([1, 0, 1]))
    torch.testing.assert_close(
        (await (shared / 4).get()).float_precision(), plain / 4, atol=2e-3, rtol=0
    )
    assert await dave.object_ids() != []  # dave keeps its tensor, and no share
    del on_dave, shared, ints  # the fixture checks that nothing is left on the workers


# -- worker processes -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def processes() -> Iterator[list[WorkerProcess]]:
    """bob, alice and charlie as worker processes of one federation."""
    started: list[WorkerProcess] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDTENSOR_FEDERATION_KEY", KEY)
        try:
            for name in ("bob", "alice", "charlie"):
                started.append(start_worker_process(name))
        except BaseException:
            for process in started:
                process.stop()
            raise
    yield started
    for process in started:
        process.stop()


@pytest.mark.anyio
async def test_processes_triples_never_reach_the_client(
    processes: list[WorkerProcess], fetched: list[tuple[str, Any]]
) -> None:
    bob, alice, charlie = processes
    async with (
        ft.connect(bob.url, token=bob.token, timeout=30) as to_bob,
        ft.connect(alice.url, token=alice.token, timeout=30) as to_alice,
        ft.connect(charlie.url, token=charlie.token, timeout=30) as to_charlie,
    ):
        generator = torch.Generator().manual_seed(3)
        x = torch.rand(3, 4, generator=generator) - 0.5
        w = torch.rand(4, 2, generator=generator) - 0.5
        sx = ft.fix_precision(x).share(to_bob, to_alice, crypto_provider=to_charlie)
        sw = ft.fix_precision(w).share(to_bob, to_alice, crypto_provider=to_charlie)
        assert isinstance(sx, ft.AdditiveSharingTensor)
        product = await sx.matmul(sw, timeout=30)
        squared = await sx.mul(sx, timeout=30)
        total = (sx + sx - 1).sum()
        positive = await sx.gt(0, timeout=30)
        assert torch.equal((await positive.get(timeout=30)).float_precision(), (x > 0).float())
        torch.testing.assert_close(
            (await product.get(timeout=30)).float_precision(), x @ w, atol=0.01, rtol=0
        )
        torch.testing.assert_close(
            (await squared.get(timeout=30)).float_precision(), x * x, atol=0.005, rtol=0
        )
        torch.testing.assert_close(
            (await total.get(timeout=30)).float_precision(), (2 * x - 1).sum(), atol=0.03, rtol=0
        )
        # From the crypto provider, only the deliveries' confirmations came back.
        from_charlie = [value for worker, value in fetched if worker == "charlie"]
        # 1 triple a product, 8 a comparison (7 AND triples and a random bit); 2 parties
        assert from_charlie == [True] * (2 * (1 + 1 + 8))
        with pytest.raises(TypeError, match=r"await x\.mul"):
            sx * sx
        del sx, sw
        assert await to_bob.object_ids() == []
        assert await to_charlie.object_ids() == []


@pytest.mark.anyio
async def test_processes_a_workers_shares_never_reach_the_client(
    processes: list[WorkerProcess], fetched: list[tuple[str, Any]]
) -> None:
    bob, alice, charlie = processes
    async with (
        ft.connect(bob.url, token=bob.token, timeout=30) as to_bob,
        ft.connect(alice.url, token=alice.token, timeout=30) as to_alice,
        ft.connect(charlie.url, token=charlie.token, timeout=30) as to_charlie,
    ):
        plain = torch.tensor([[0.5, -1.25, 3.0], [2.0, 2.0, -7.5]])
        on_bob = ft.send(plain, to_bob)
        remote = ft.fix_precision(on_bob)
        assert isinstance(remote, ft.RemoteFixedPrecision)
        shared = await remote.share(to_bob, to_alice, crypto_provider=to_charlie, timeout=30)
        assert isinstance(shared, ft.AdditiveSharingTensor)
        # bob drew the shares; alice's went to her from bob: only the delivery's
        # confirmation came back here from bob, and a capability from alice.
        assert [value for worker, value in fetched if worker == "bob"] == [True]
        assert [type(value) for worker, value in fetched if worker == "alice"] == [str]
        values, indices = await shared.max(dim=1, timeout=30)
        half = shared / 2
        # The provider's triples went to the parties: only confirmations from charlie.
        assert {value for worker, value in fetched if worker == "charlie"} == {True}
        assert torch.equal(
            (await values.get(timeout=30)).float_precision(), torch.tensor([3.0, 2.0])
        )
        assert torch.equal(await indices.get(timeout=30), torch.tensor([2, 0]))
        torch.testing.assert_close(
            (await half.get(timeout=30)).float_precision(), plain / 2, atol=2e-3, rtol=0
        )
        assert torch.equal((await shared.get(timeout=30)).float_precision(), plain)
        del on_bob, remote
        assert await to_bob.object_ids() == []
        assert await to_alice.object_ids() == []
        assert await to_charlie.object_ids() == []


def test_the_hook_adds_and_removes_the_sharing_methods() -> None:
    hook = sy.TorchHook(torch)
    assert callable(torch.Tensor.fix_precision)
    assert torch.Tensor.fix_prec is torch.Tensor.fix_precision
    for name in ("fix_precision", "fix_prec", "share"):  # a pointer's data, shared remotely
        assert getattr(PointerBase, name) is getattr(torch.Tensor, name)
    assert torch.equal(torch.tensor([1.0]).copy(), torch.tensor([1.0]))  # PySyft's t.copy()
    hook.unhook()
    for name in ("fix_precision", "fix_prec", "share", "copy"):
        assert not hasattr(torch.Tensor, name)
    for name in ("fix_precision", "fix_prec", "share"):
        assert not hasattr(PointerBase, name)
