"""Secure aggregation (SecAgg+): the sum is right, and no single update can be seen.

Three levels: the arithmetic and cryptography alone (fedtensor.protocol.secagg_math),
the worker operations driven directly as a whole protocol in this process, and
``ft.fit(..., secure_aggregation=ft.SecAggPlus())`` on virtual workers and on worker
processes over websockets.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import math
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import anyio
import pytest
import torch
from torch import nn

import fedtensor as ft
from fedtensor.federated import secagg as client_secagg
from fedtensor.federated.strategies import Update
from fedtensor.protocol import secagg_math as sm
from fedtensor.testing import WorkerProcess
from fedtensor.worker import secagg as worker_secagg

pytestmark = pytest.mark.anyio

State = dict[str, torch.Tensor]


# -- Shamir secret sharing ------------------------------------------------------------------------


def test_shamir_known_vectors() -> None:
    # Wikipedia's "Shamir's secret sharing" example: f(x) = 1234 + 166 x + 94 x^2 mod 1613.
    shares = {1: 1494, 2: 329, 3: 965, 4: 176, 5: 1188, 6: 775}
    for chosen in ((2, 4, 5), (1, 3, 6), (1, 2, 3, 4, 5, 6)):
        assert sm.combine_shares({x: shares[x] for x in chosen}, prime=1613) == 1234
    # Two shares of a degree-2 polynomial are not enough.
    assert sm.combine_shares({2: shares[2], 4: shares[4]}, prime=1613) != 1234
    # And over the real field: coefficients given, so the shares are known.
    prime = sm.FIELD_PRIME
    secret, a1, a2 = 2**255 + 12345, 987654321, 2**400 + 7
    known = {x: (secret + a1 * x + a2 * x * x) % prime for x in (3, 7, 11)}
    assert sm.combine_shares(known) == secret


def test_shamir_split_and_combine() -> None:
    secret = int.from_bytes(bytes(range(32)), "big")
    shares = sm.split_secret(secret, [1, 2, 3, 4, 5], 3)
    assert sm.combine_shares({x: shares[x] for x in (1, 3, 5)}) == secret
    assert sm.combine_shares({x: shares[x] for x in (2, 4)}) != secret
    assert len(set(shares.values())) == 5
    with pytest.raises(ValueError, match="threshold"):
        sm.split_secret(secret, [1, 2], 3)
    with pytest.raises(ValueError, match="distinct"):
        sm.split_secret(secret, [1, 1, 2], 2)


# -- keys, sealing, masks, quantization -----------------------------------------------------------


def test_a_sealed_share_opens_only_in_its_context() -> None:
    alice, bob = sm.generate_key(), sm.generate_key()
    key = sm.agree(alice, sm.public_bytes(bob), "share encryption", 3)
    assert key == sm.agree(bob, sm.public_bytes(alice), "share encryption", 3)
    assert key != sm.agree(bob, sm.public_bytes(alice), "pairwise mask", 3)
    assert key != sm.agree(bob, sm.public_bytes(alice), "share encryption", 4)
    aad = sm.associated_data(3, 0, 1, "share-keys")
    sealed = sm.seal(key, b"secret share", aad)
    assert sm.open_sealed(key, sealed, aad) == b"secret share"
    for other in (
        sm.associated_data(4, 0, 1, "share-keys"),  # another round: a replay
        sm.associated_data(3, 2, 1, "share-keys"),  # another sender
        sm.associated_data(3, 0, 2, "share-keys"),  # another receiver
        sm.associated_data(3, 0, 1, "unmask"),  # another stage
    ):
        with pytest.raises(sm.ShareRejected):
            sm.open_sealed(key, sealed, other)
    tampered = bytearray(sealed)
    tampered[20] ^= 1
    with pytest.raises(sm.ShareRejected):
        sm.open_sealed(key, bytes(tampered), aad)


def test_masks_are_uniform_and_reproducible() -> None:
    seed = bytes(range(32))
    mask = sm.expand_mask(seed, 100_000)
    assert torch.equal(mask, sm.expand_mask(seed, 100_000))
    assert not torch.equal(mask, sm.expand_mask(bytes(32), 100_000))
    half = 1 << (sm.MODULUS_BITS - 1)
    assert -half <= int(mask.min())
    assert int(mask.max()) < half
    # Uniform mod 2**48: the residues' mean and their top bit are fair.
    residues = mask & sm.MODULUS_MASK
    assert abs(residues.double().mean().item() / half - 1) < 0.01
    assert abs(((residues >> (sm.MODULUS_BITS - 1)) & 1).double().mean().item() - 0.5) < 0.01


def test_quantization_error_is_below_one_step() -> None:
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(10_000, generator=generator, dtype=torch.float64) * 0.1
    levels, clipped = sm.quantize(values, 1.0, 16, generator)
    assert clipped == 0
    step = sm.quantization_step(1.0, 16)
    back = sm.dequantize_sum(levels, 1.0, 16, 1)
    assert (back - values).abs().max() < step
    assert abs(float((back - values).mean())) < step / 20  # stochastic rounding: unbiased
    big = torch.tensor([5.0, -5.0, 0.5], dtype=torch.float64)
    levels, clipped = sm.quantize(big, 1.0, 16, generator)
    assert clipped == 2
    assert torch.allclose(
        sm.dequantize_sum(levels, 1.0, 16, 1)[:2], torch.tensor([1.0, -1.0]).double()
    )


def _reference_masked(vector: torch.Tensor, seeds: Sequence[tuple[bytes, int]]) -> torch.Tensor:
    """vector + sum(sign * mask) mod 2**48, one mask at a time, in Python's integers."""
    total = [int(v) for v in vector.tolist()]
    for seed, sign in seeds:
        mask = sm.expand_mask(seed, len(total)).tolist()
        total = [(t + sign * m) & sm.MODULUS_MASK for t, m in zip(total, mask, strict=True)]
    return torch.tensor(total, dtype=torch.int64)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("scratch", [16 << 20, 8 * 17 * 50])
def test_batched_seeded_masks_equal_one_mask_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
    torch_threads: Callable[[int], None],
    threads: int,
    scratch: int,
) -> None:
    # 20 seeds (two batches of rows), mixed signs, in one block or in column blocks of
    # 50 (the cipher's counter must run on across blocks), on one torch thread or more.
    monkeypatch.setattr(sm, "_SCRATCH_BYTES", scratch)
    torch_threads(threads)
    seeds = [(bytes([i]) * 32, 1 if i % 3 else -1) for i in range(20)]
    vector = torch.randint(0, 1 << sm.MODULUS_BITS, (333,), dtype=torch.int64)
    expected = _reference_masked(vector, seeds)
    assert torch.equal(sm.add_seeded_masks(vector.clone(), seeds), expected)
    subtracted_only = [(seed, -1) for seed, _ in seeds[:3]]
    assert torch.equal(
        sm.add_seeded_masks(vector.clone(), subtracted_only),
        _reference_masked(vector, subtracted_only),
    )


def test_quantizing_into_a_given_buffer_in_place() -> None:
    values = torch.tensor([0.25, -3.0, 3.0, -0.5], dtype=torch.float64)
    kept = values.clone()
    out = torch.full((4,), -1, dtype=torch.int64)
    levels, clipped = sm.quantize(values, 1.0, 8, out=out)
    assert levels is out
    assert clipped == 2
    assert torch.equal(values, kept)  # not overwritten
    assert out.tolist()[1:3] == [0, 255]
    assert out.tolist()[0] in (159, 160)  # (0.25 + 1) * 255 / 2 = 159.375
    assert out.tolist()[3] in (63, 64)  # (-0.5 + 1) * 255 / 2 = 63.75
    scratch = values.clone()
    sm.quantize(scratch, 1.0, 8, out=out, overwrite=True)
    assert not torch.equal(scratch, kept)  # the scratch given up was used
    assert out.tolist()[1:3] == [0, 255]
    with pytest.raises(ValueError, match="out must be"):
        sm.quantize(values, 1.0, 8, out=torch.empty(3, dtype=torch.int64))


def test_default_rounding_noise_is_unbiased_and_fresh() -> None:
    values = torch.full((200_000,), 0.3, dtype=torch.float64)
    first, _ = sm.quantize(values, 1.0, 2)  # levels -1, -1/3, 1/3, 1: 0.3 is 0.95 of a step up
    second, _ = sm.quantize(values, 1.0, 2)
    assert set(first.unique().tolist()) == {1, 2}
    assert abs(float(first.double().mean()) - 1.95) < 0.01  # (0.3 + 1) * 3 / 2 levels
    assert not torch.equal(first, second)  # a fresh key each call


def test_rounding_never_passes_the_top_level(monkeypatch: pytest.MonkeyPatch) -> None:
    # At 32 bits float64 rounds top + the largest uniform up to 2**32: clamped.
    top = torch.full((10,), 1.0, dtype=torch.float64)
    monkeypatch.setattr(sm, "_rounding_noise", lambda count, _: torch.full((count,), (1 << 23) - 1))
    assert int(sm.quantize(top, 1.0, 32)[0].max()) == (1 << 32) - 1


@pytest.mark.parametrize(("count", "k"), [(10, 4), (10, 5), (11, 5), (7, 6), (5, 9), (100, 14)])
def test_the_neighbour_graph_is_symmetric_and_seeded(count: int, k: int) -> None:
    positions = list(range(count))
    graph = sm.neighbour_graph(positions, k, seed=1)
    assert graph == sm.neighbour_graph(positions, k, seed=1)
    expected = min(count - 1, k + (k % 2 and count % 2))
    for p, peers in graph.items():
        assert p not in peers
        assert len(peers) == expected
        assert all(p in graph[q] for q in peers)
    if k < count - 1:
        assert graph != sm.neighbour_graph(positions, k, seed=2)
    assert sm.default_neighbours(100) == 14
    assert sm.default_neighbours(2) == 1


# -- the worker operations as one protocol, in this process ---------------------------------------


def _share_keys(
    held: Any, public: Sequence[dict[str, torch.Tensor]], peers: list[int], threshold: int
) -> dict[str, Any]:
    """``secagg_share_keys`` with the public keys of ``peers`` (a 64-byte row each)."""
    rows = [torch.cat([public[q]["encryption"], public[q]["masking"]]) for q in peers]
    return worker_secagg.secagg_share_keys(
        held, neighbours=peers, public_keys=torch.stack(rows), threshold=threshold
    )


def _sealed_for(
    me: int,
    shared: dict[int, dict[str, Any]],
    senders: Sequence[int],
    relay: Callable[[int, int, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """``secagg_mask``'s ``senders`` and ``shares``: what each sealed for ``me``, relayed."""
    rows = []
    for q in senders:
        share = shared[q]["shares"][shared[q]["to"].index(me)]
        rows.append(relay(q, me, share) if relay is not None else share)
    return {"senders": list(senders), "shares": torch.stack(rows)}


def _run_protocol(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[int],
    *,
    neighbours: int,
    threshold: int,
    clip: float = 1.0,
    bits: int = 20,
    relay: Callable[[int, int, torch.Tensor], torch.Tensor] | None = None,
    gone_before_masking: Sequence[int] = (),
    gone_after_masking: Sequence[int] = (),
    modulus_bits: int | None = None,
    **dp: Any,
) -> tuple[torch.Tensor, set[int], list[dict[str, Any]]]:
    """Drive the worker operations as the aggregator does; the unmasked integer sum
    (in the ring the aggregator would choose, unless ``modulus_bits`` is given)."""
    count = len(deltas)
    if modulus_bits is None:
        modulus_bits = sm.choose_modulus_bits(count, bits, deltas[0].numel())
    base = {"w": torch.zeros_like(deltas[0])}
    held = [worker_secagg.secagg_setup(round=1, position=p) for p in range(count)]
    public = [worker_secagg.secagg_public_keys(h) for h in held]
    graph = sm.neighbour_graph(list(range(count)), neighbours, seed=0)
    shared = {
        p: _share_keys(held[p], public, sorted(graph[p]), threshold)
        for p in range(count)
        if p not in gone_before_masking
    }
    masked = {}
    for p in shared:
        peers = sorted(graph[p] & set(shared))
        update = {"state": {"w": deltas[p]}, "examples": weights[p], "loss": 0.0}
        masked[p] = worker_secagg.secagg_mask(
            held[p],
            update,
            base,
            **_sealed_for(p, shared, peers, relay),
            peers=peers,
            parameters=["w"],
            clip=clip,
            bits=bits,
            max_weight=max(weights),
            modulus_bits=modulus_bits,
            **dp,
        )
    rejected = {q for reply in masked.values() for q in reply["rejected"]}
    survivors = set(masked) - rejected
    dropped = set(shared) - survivors
    revealed = {
        p: worker_secagg.secagg_unmask(
            held[p], survivors=sorted(survivors), dropped=sorted(dropped)
        )
        for p in sorted(survivors)
        if p not in gone_after_masking
    }
    total = client_secagg._unmask(
        {p: masked[p]["masked"] for p in survivors},
        revealed,
        {p: reply["commitment"] for p, reply in shared.items()},
        {p: reply["masking"] for p, reply in enumerate(public)},
        graph,
        survivors,
        dropped,
        threshold,
        1,
        {p: f"w{p}" for p in range(count)},
        modulus_bits=modulus_bits,
    )
    return total, survivors, list(masked.values())


def _deltas(count: int, size: int = 1000, scale: float = 0.1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randn(size, generator=generator) * scale for _ in range(count)]


def _expected(deltas: Sequence[torch.Tensor], weights: Sequence[int], members: Any) -> torch.Tensor:
    return sum((deltas[p].double() * weights[p] for p in members), torch.zeros(1).double())


def _average_and_bound(
    total: torch.Tensor, weights: Sequence[int], members: Any, clip: float = 1.0, bits: int = 20
) -> tuple[torch.Tensor, float]:
    """The weighted average an unmasked sum of ratio-scaled inputs gives, and its error
    bound per coordinate: ``n * step / sum(w_i / max_w)`` (``max_w`` over all ``weights``,
    as the masking was told)."""
    ratios = [weights[p] / max(weights) for p in members]
    summed = sm.dequantize_sum(total[:-1], clip, bits, len(ratios))
    return summed / sum(ratios), len(ratios) * sm.quantization_step(clip, bits) / sum(ratios)


def test_the_protocol_gives_the_weighted_sum_within_the_quantization_step() -> None:
    deltas, weights = _deltas(8), [3, 1, 4, 1, 5, 9, 2, 6]
    total, survivors, replies = _run_protocol(deltas, weights, neighbours=4, threshold=3)
    assert survivors == set(range(8))
    average, bound = _average_and_bound(total, weights, range(8))
    error = average - _expected(deltas, weights, range(8)) / sum(weights)
    # The ratios' bound (the weights folded in before quantizing): 8 steps over
    # sum(w / 9) = 31 / 9, where integer weights kept it at one step.
    assert bound == pytest.approx(8 * 9 / 31 * sm.quantization_step(1.0, 20))
    assert error.abs().max() < bound
    assert int(total[-1]) == 0  # nothing clipped
    # What the aggregator received of each worker is nothing like its update.
    step = sm.quantization_step(1.0, 20)
    for p, reply in enumerate(replies):
        seen = sm.dequantize_sum(reply["masked"][:-1], 1.0, 20, 1)
        assert (seen - deltas[p].double()).abs().mean() > 1e6 * step
        assert abs(_correlation(reply["masked"][:-1].double(), deltas[p].double())) < 0.15


def test_up_to_neighbours_minus_threshold_dropouts_give_the_sum() -> None:
    deltas, weights = _deltas(7), [1] * 7
    k, t = 4, 2
    for gone in ([3], [3, 5]):
        total, survivors, _ = _run_protocol(
            deltas, weights, neighbours=k, threshold=t, gone_after_masking=gone
        )
        assert survivors == set(range(7))  # they masked: their inputs count
        summed = sm.dequantize_sum(total[:-1], 1.0, 20, 7)
        assert (
            summed - _expected(deltas, weights, range(7))
        ).abs().max() < 7 * sm.quantization_step(1.0, 20)
    # Before masking: their inputs are left out, their pairwise masks removed.
    total, survivors, _ = _run_protocol(
        deltas, weights, neighbours=k, threshold=t, gone_before_masking=[2]
    )
    assert survivors == set(range(7)) - {2}
    summed = sm.dequantize_sum(total[:-1], 1.0, 20, 6)
    assert (summed - _expected(deltas, weights, survivors)).abs().max() < 6 * sm.quantization_step(
        1.0, 20
    )


def test_more_dropouts_than_the_threshold_allows_cannot_unmask() -> None:
    deltas, weights = _deltas(5), [1] * 5
    # Complete graph (k = 4), t = 3: a third of the shares gone around every worker.
    with pytest.raises(client_secagg._Skip, match="too many workers dropped out"):
        _run_protocol(deltas, weights, neighbours=4, threshold=3, gone_after_masking=[0, 1])


def test_a_tampered_share_drops_its_sender_and_the_sum_of_the_rest_is_right() -> None:
    deltas, weights = _deltas(6), [2, 3, 1, 1, 2, 5]

    def tamper(sender: int, receiver: int, share: torch.Tensor) -> torch.Tensor:
        if (sender, receiver) == (4, 1):
            share = share.clone()
            share[-1] ^= 1
        return share

    total, survivors, replies = _run_protocol(
        deltas, weights, neighbours=5, threshold=3, relay=tamper
    )
    assert survivors == {0, 1, 2, 3, 5}
    assert replies[1]["rejected"] == [4]
    weight = sum(weights[p] for p in survivors)
    average, bound = _average_and_bound(total, weights, survivors)
    assert (average - _expected(deltas, weights, survivors) / weight).abs().max() < bound


def test_the_differential_privacy_interface_clips_and_noises_before_masking() -> None:
    deltas = [torch.full((20_000,), 0.05) for _ in range(4)]  # norm 7.07 each
    total, _, _ = _run_protocol(deltas, [1] * 4, neighbours=3, threshold=2, clip=4.0, clip_norm=1.0)
    summed = sm.dequantize_sum(total[:-1], 4.0, 20, 4)
    clipped = 0.05 / math.sqrt(20_000 * 0.05**2)
    assert torch.allclose(
        summed, torch.full_like(summed, 4 * clipped), atol=4 * sm.quantization_step(4.0, 20)
    )
    zeros = [torch.zeros(20_000) for _ in range(4)]
    total, _, _ = _run_protocol(zeros, [1] * 4, neighbours=3, threshold=2, clip=4.0, noise_std=0.5)
    noise = sm.dequantize_sum(total[:-1], 4.0, 20, 4)
    assert abs(float(noise.std()) / (0.5 * 2) - 1) < 0.05  # four workers: std 0.5 * sqrt(4)
    assert abs(float(noise.mean())) < 0.05


def test_a_worker_refuses_what_would_unmask_one_input() -> None:
    held = [worker_secagg.secagg_setup(round=1, position=p) for p in range(3)]
    public = [worker_secagg.secagg_public_keys(h) for h in held]
    keys = torch.cat([public[1]["encryption"], public[1]["masking"]])
    with pytest.raises(ValueError, match="distinct"):
        worker_secagg.secagg_share_keys(
            held[0], neighbours=[1, 2], public_keys=torch.stack([keys, keys]), threshold=1
        )
    with pytest.raises(ValueError, match="threshold"):
        worker_secagg.secagg_share_keys(
            held[0], neighbours=[1], public_keys=keys.view(1, -1), threshold=2
        )
    with pytest.raises(ValueError, match="64 bytes per neighbour"):
        worker_secagg.secagg_share_keys(
            held[0], neighbours=[1, 2], public_keys=keys.view(1, -1), threshold=1
        )
    with pytest.raises(ValueError, match="stage"):  # no unmasking before masking
        worker_secagg.secagg_unmask(held[0], survivors=[0, 1], dropped=[2])
    deltas = _deltas(3)
    # A full run, then: both lists naming one worker, or a second request, are refused.
    _total, _survivors, _ = _run_protocol(deltas, [1, 1, 1], neighbours=2, threshold=2)
    fresh = [worker_secagg.secagg_setup(round=1, position=p) for p in range(3)]
    with pytest.raises(TypeError):
        worker_secagg.secagg_mask(
            {"not": "secrets"},
            {},
            {},
            senders=[],
            shares=None,
            peers=[],
            parameters=[],
            clip=1.0,
            bits=8,
            max_weight=1,
            modulus_bits=32,
        )
    assert repr(fresh[0]).startswith("<SecAggSecrets round 1 position 0")


def test_overlapping_or_repeated_unmask_requests_are_refused() -> None:
    count = 3
    held = [worker_secagg.secagg_setup(round=1, position=p) for p in range(count)]
    public = [worker_secagg.secagg_public_keys(h) for h in held]
    shared = {
        p: _share_keys(held[p], public, [q for q in range(count) if q != p], 2)
        for p in range(count)
    }
    update = {"state": {"w": torch.ones(4)}, "examples": 1}
    worker_secagg.secagg_mask(
        held[0],
        update,
        {"w": torch.zeros(4)},
        **_sealed_for(0, shared, [1, 2]),
        peers=[1, 2],
        parameters=["w"],
        clip=1.0,
        bits=8,
        max_weight=1,
        modulus_bits=32,
    )
    with pytest.raises(ValueError, match="both a survivor and dropped"):
        worker_secagg.secagg_unmask(held[0], survivors=[0, 1, 2], dropped=[1])
    worker_secagg.secagg_unmask(held[0], survivors=[0, 1], dropped=[2])
    with pytest.raises(ValueError, match="stage"):
        worker_secagg.secagg_unmask(held[0], survivors=[0, 1, 2], dropped=[])


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm() + 1e-30))


# -- ft.fit with secure aggregation ---------------------------------------------------------------


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x.flatten(1))))  # type: ignore[no-any-return]


def _data(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(count, 1, 8, 8, generator=generator), torch.randint(
        0, 10, (count,), generator=generator
    )


def _model() -> nn.Module:
    torch.manual_seed(0)
    return Tiny()


class _Recording(ft.FedAvg):
    """FedAvg that keeps the updates it was given (the plain run's true updates)."""

    def __init__(self) -> None:
        self.updates: list[Update] = []

    def aggregate(self, current: State, updates: Sequence[Update], parameters: set[str]) -> State:
        self.updates = list(updates)
        return super().aggregate(current, updates, parameters)


async def _true_updates(
    data: Any, model: nn.Module | None = None, **options: Any
) -> tuple[State, dict[str, Update]]:
    """One plain round from ``model`` (a copy; default the test model): the starting
    state and each worker's update."""
    model = copy.deepcopy(model) if model is not None else _model()
    start = copy.deepcopy(model.state_dict())
    recording = _Recording()
    await ft.fit(model, data, rounds=1, strategy=recording, progress=False, **options)
    return start, {update.worker: update for update in recording.updates}


def _fedavg(start: State, updates: Sequence[Update]) -> State:
    total = sum(update.examples for update in updates)
    return {
        key: sum(
            (u.state[key].double() * (u.examples / total) for u in updates),
            torch.zeros(1).double(),
        )
        for key in start
    }


def _assert_within(state: State, expected: State, step: float) -> None:
    for key in expected:
        error = (state[key].double() - expected[key]).abs().max().item()
        assert error < step + 1e-6, (key, error, step)


@contextlib.asynccontextmanager
async def _virtual(count: int, *, encode: bool = False) -> AsyncIterator[list[ft.VirtualWorker]]:
    async with contextlib.AsyncExitStack() as stack:
        workers = [
            await stack.enter_async_context(ft.VirtualWorker(f"w{i}", encode=encode))
            for i in range(count)
        ]
        yield workers


def _kill_virtual(workers: list[ft.VirtualWorker], names: Sequence[str]) -> None:
    for worker in workers:
        if worker.id in names:
            assert worker._actor is not None
            worker._actor.close()  # the worker dies: its sessions see it go


@pytest.mark.parametrize("encode", [False, True], ids=["objects", "encoded"])
async def test_secure_fedavg_equals_plain_fedavg_on_virtual_workers(encode: bool) -> None:
    async with _virtual(4, encode=encode) as workers:
        data = ft.federate(_data(200), workers, seed=0)
        start, true = await _true_updates(data, lr=0.1)
        model = _model()
        config = ft.SecAggPlus(clip=1.0, bits=20)
        history = await ft.fit(
            model, data, rounds=1, lr=0.1, progress=False, secure_aggregation=config
        )
        m = history[0]
        assert m.completed == ("w0", "w1", "w2", "w3")
        assert not m.skipped
        step = sm.quantization_step(1.0, 20)
        assert m.secure_aggregation["quantization_step"] == step
        # Equal shards (50 each): every ratio is 1, the bound one step; 4 inputs fit 2**32.
        assert m.secure_aggregation["quantization_bound"] == pytest.approx(step)
        assert m.secure_aggregation["modulus_bits"] == 32
        assert m.secure_aggregation["clipped"] == 0
        assert m.secure_aggregation["neighbours"] == 3  # default 2*ceil(log2 4) = 4, at most n-1
        _assert_within(model.state_dict(), _fedavg(start, list(true.values())), step)
        # Not the plain average by accident: quantization moved it, by less than a step.
        assert any(
            not torch.equal(model.state_dict()[k], v.float())
            for k, v in _fedavg(start, list(true.values())).items()
        )
        del data
        assert all(not worker.objects for worker in workers)  # the secrets are freed


async def test_each_stage_sends_a_worker_one_frame_its_commands_and_their_fetch(
    frames_sent: Callable[..., dict[str, list[list[str]]]],
) -> None:
    async with _virtual(4) as workers:
        frames = frames_sent(workers)
        data = ft.federate(_data(200), workers, seed=0)
        history = await ft.fit(
            _model(), data, rounds=1, progress=False, secure_aggregation=ft.SecAggPlus()
        )
        assert not history[0].skipped
        for seen in frames.values():
            asked = [kinds for kinds in seen if "Call" in kinds or "Fetch" in kinds]
            # setup (with the training), sealed shares, masked input, unmasking
            assert len(asked) == 4, seen
            for kinds in asked:
                assert kinds.index("Call") < kinds.index("Fetch")
        del data


@pytest.mark.parametrize(
    "make_strategy",
    [
        lambda: ft.FedProx(mu=0.1),
        lambda: ft.FedAvgM(server_lr=1.0, beta=0.9),
        lambda: ft.FedAdam(server_lr=0.05),
    ],
    ids=["FedProx", "FedAvgM", "FedAdam"],
)
def test_every_strategy_aggregates_a_sum_as_it_aggregates_updates(
    make_strategy: Callable[[], ft.Strategy],
) -> None:
    generator = torch.Generator().manual_seed(0)
    current = {"w": torch.randn(5, generator=generator), "n": torch.tensor(3)}
    updates = [
        Update(f"u{i}", {"w": torch.randn(5, generator=generator), "n": torch.tensor(3)}, e)
        for i, e in enumerate((3, 1, 6))
    ]
    plain, masked = make_strategy(), make_strategy()
    for _ in range(2):  # twice: the server optimizers' state moves alike
        expected = plain.aggregate(current, updates, {"w"})
        total = sum(u.examples for u in updates)
        summed = {
            "w": sum(
                (u.examples * (u.state["w"].double() - current["w"].double()) for u in updates),
                torch.zeros(5).double(),
            )
        }
        got = masked.aggregate_sum(current, summed, total, {"w"})
        assert torch.allclose(got["w"], expected["w"], atol=1e-6)
        assert torch.equal(got["n"], current["n"])
        current = got


async def test_secure_fedadam_trains_like_plain_fedadam() -> None:
    async with _virtual(3) as workers:
        data = ft.federate(_data(150), workers, seed=0)
        plain, secure = _model(), _model()
        await ft.fit(
            plain, data, rounds=2, lr=0.1, strategy=ft.FedAdam(server_lr=0.05), progress=False
        )
        await ft.fit(
            secure,
            data,
            rounds=2,
            lr=0.1,
            strategy=ft.FedAdam(server_lr=0.05),
            progress=False,
            secure_aggregation=ft.SecAggPlus(clip=1.0, bits=24),
        )
        for key, value in plain.state_dict().items():
            # Adam's step is about server_lr wherever the moments agree in sign.
            assert torch.allclose(secure.state_dict()[key], value, atol=1e-3), key
        del data


class Normed(nn.Module):
    """A model with a batch norm: float running statistics and an integer step count."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 16)
        self.norm = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.norm(self.fc1(x.flatten(1)))))  # type: ignore[no-any-return]


async def test_integer_buffers_move_as_in_plain_fedavg() -> None:
    async with _virtual(4, encode=True) as workers:
        data = ft.federate(_data(200), workers, seed=0)  # 50 each: as many local steps
        torch.manual_seed(0)
        plain = Normed()
        secure = copy.deepcopy(plain)
        options: dict[str, Any] = {"lr": 0.1, "batch_size": 16, "progress": False}
        await ft.fit(plain, data, rounds=2, **options)
        history = await ft.fit(
            secure, data, rounds=2, secure_aggregation=ft.SecAggPlus(clip=1.0, bits=24), **options
        )
        del data
    assert not any(m.skipped for m in history)
    ours, theirs = secure.state_dict(), plain.state_dict()
    # Two rounds of 4 local steps (50 examples in batches of 16): plain FedAvg's 8.
    assert int(theirs["norm.num_batches_tracked"]) == 8
    assert torch.equal(ours["norm.num_batches_tracked"], theirs["norm.num_batches_tracked"])
    assert ours["norm.num_batches_tracked"].dtype == torch.int64
    for key, value in theirs.items():
        if value.is_floating_point():  # the running statistics too
            assert torch.allclose(ours[key], value, atol=1e-4), key


def test_integer_deltas_are_summed_exactly_under_the_masks() -> None:
    state = {
        "w": torch.zeros(3),
        "n": torch.tensor(5),
        "m": torch.tensor([7, 7], dtype=torch.int32),
    }
    got = client_secagg._integer_means(
        state, ["m", "n"], torch.tensor([6, 9, (1 << 48) - 3]), 3
    )  # m moved by 2 and 3 in all; n by -1 (a residue)
    assert got["m"].tolist() == [9, 10]
    assert got["m"].dtype == torch.int32
    assert int(got["n"]) == 4


async def test_the_aggregator_receives_no_single_update(monkeypatch: pytest.MonkeyPatch) -> None:
    received: list[tuple[str, str, Any]] = []
    monkeypatch.setattr(
        client_secagg.hooks,
        "received",
        lambda stage, worker, reply: received.append((stage, worker, reply)),
    )
    async with _virtual(5, encode=True) as workers:
        data = ft.federate(_data(250), workers, seed=0)
        start, true = await _true_updates(data, lr=0.1)
        await ft.fit(
            _model(),
            data,
            rounds=1,
            lr=0.1,
            progress=False,
            secure_aggregation=ft.SecAggPlus(clip=1.0, bits=20),
        )
        del data
    keys = sorted(start)
    step = sm.quantization_step(1.0, 20)
    deltas = {
        worker: torch.cat([(u.state[k].double() - start[k].double()).reshape(-1) for k in keys])
        for worker, u in true.items()
    }
    assert len({stage for stage, _, _ in received}) == 4
    assert len(received) == 20
    tensors = [t for _, _, reply in received for t in _tensors(reply)]
    seen_masked = 0
    for stage, worker, reply in received:
        if stage != "masked input":
            continue
        seen_masked += 1
        vector = reply["masked"][:-1]
        weight = reply["weight"]
        as_update = sm.dequantize_sum(vector, 1.0, 20, weight) / weight
        for delta in deltas.values():
            assert abs(_correlation(vector.double(), delta)) < 0.1
        # Far from the worker's own update, by many quantization steps.
        assert (as_update - deltas[worker]).abs().mean() > 1e6 * step
    assert seen_masked == 5
    # No tensor the aggregator received is close to any worker's update.
    for tensor in tensors:
        if tensor.numel() == next(iter(deltas.values())).numel() and tensor.is_floating_point():
            for delta in deltas.values():
                assert not torch.allclose(tensor.double(), delta, atol=10 * step)


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    if isinstance(value, list | tuple):
        return [t for item in value for t in _tensors(item)]
    return []


@pytest.mark.parametrize("dying", [["w2"], ["w1", "w3"]], ids=["one", "two"])
async def test_workers_dying_after_masking_still_give_the_sum(
    monkeypatch: pytest.MonkeyPatch, dying: list[str]
) -> None:
    async with _virtual(5) as workers:

        def after(stage: str, alive: list[str]) -> None:
            if stage == "masked input":
                _kill_virtual(workers, dying)

        monkeypatch.setattr(client_secagg.hooks, "after_stage", after)
        data = ft.federate(_data(250), workers, seed=0)
        start, true = await _true_updates(data, lr=0.1)
        model = _model()
        # k = 4 (complete), t = 2: up to k - t = 2 may die after masking.
        history = await ft.fit(
            model, data, rounds=1, lr=0.1, progress=False,
            secure_aggregation=ft.SecAggPlus(neighbours=4, threshold=2, clip=1.0, bits=20),
        )  # fmt: skip
        m = history[0]
        assert not m.skipped, m.skip_reason
        assert len(m.completed) == 5  # their masked inputs count
        _assert_within(
            model.state_dict(), _fedavg(start, list(true.values())), sm.quantization_step(1.0, 20)
        )
        assert all(name in m.failed and "unavailable" in m.failed[name] for name in dying)
        del data


async def test_a_worker_dying_before_masking_is_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    async with _virtual(5) as workers:

        def after(stage: str, alive: list[str]) -> None:
            if stage == "share keys":
                _kill_virtual(workers, ["w0"])

        data = ft.federate(_data(250), workers, seed=0)
        start, true = await _true_updates(data, lr=0.1)
        monkeypatch.setattr(client_secagg.hooks, "after_stage", after)
        model = _model()
        history = await ft.fit(
            model, data, rounds=1, lr=0.1, progress=False,
            secure_aggregation=ft.SecAggPlus(neighbours=4, threshold=3, clip=1.0, bits=20),
        )  # fmt: skip
        m = history[0]
        assert m.completed == ("w1", "w2", "w3", "w4"), m.skip_reason
        expected = _fedavg(start, [u for name, u in true.items() if name != "w0"])
        _assert_within(model.state_dict(), expected, sm.quantization_step(1.0, 20))
        del data


async def test_more_dropouts_than_neighbours_minus_threshold_skip_the_round(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with _virtual(5) as workers:

        def after(stage: str, alive: list[str]) -> None:
            if stage == "masked input":
                _kill_virtual(workers, ["w0", "w1", "w2"])

        monkeypatch.setattr(client_secagg.hooks, "after_stage", after)
        data = ft.federate(_data(250), workers, seed=0)
        model = _model()
        before = copy.deepcopy(model.state_dict())
        history = await ft.fit(
            model, data, rounds=1, lr=0.1, progress=False,
            secure_aggregation=ft.SecAggPlus(neighbours=4, threshold=2),
        )  # fmt: skip
        m = history[0]
        assert m.skipped
        assert "too many workers dropped out" in m.skip_reason
        assert m.completed == ()
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[key])
        del data


@pytest.mark.parametrize("attack", ["tampered", "replayed", "misdirected"])
async def test_an_altered_share_drops_its_sender_not_the_round(
    monkeypatch: pytest.MonkeyPatch, attack: str
) -> None:
    recorded: dict[tuple[int, int, int], torch.Tensor] = {}

    def relay(round: int, sender: int, receiver: int, share: torch.Tensor) -> torch.Tensor:
        recorded[(round, sender, receiver)] = share
        if round == 2 and attack == "tampered" and (sender, receiver) == (3, 0):
            share = share.clone()
            share[30] ^= 0x40
        elif round == 2 and attack == "replayed" and (sender, receiver) == (3, 0):
            share = recorded[(1, 3, 0)]  # the same pair's share from the round before
        elif round == 2 and attack == "misdirected" and (sender, receiver) == (3, 1):
            share = recorded[(2, 3, 0)]  # the share 3 sealed for 0, handed to 1
        return share

    monkeypatch.setattr(client_secagg.hooks, "relay", relay)
    async with _virtual(5) as workers:
        data = ft.federate(_data(250), workers, seed=0)
        config = ft.SecAggPlus(neighbours=4, threshold=3, clip=1.0, bits=20)
        history = await ft.fit(
            _model(), data, rounds=2, lr=0.1, progress=False, secure_aggregation=config
        )
        del data
    assert history[0].completed == ("w0", "w1", "w2", "w3", "w4")
    m = history[1]
    assert not m.skipped, m.skip_reason
    assert m.completed == ("w0", "w1", "w2", "w4")
    assert "failed authentication" in m.failed["w3"]


async def test_round_two_after_a_dropped_sender_is_the_average_of_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def relay(round: int, sender: int, receiver: int, share: torch.Tensor) -> torch.Tensor:
        if (sender, receiver) == (2, 4):
            share = share.clone()
            share[-1] ^= 1
        return share

    async with _virtual(5) as workers:
        data = ft.federate(_data(250), workers, seed=0)
        start, true = await _true_updates(data, lr=0.1)
        monkeypatch.setattr(client_secagg.hooks, "relay", relay)
        model = _model()
        history = await ft.fit(
            model, data, rounds=1, lr=0.1, progress=False,
            secure_aggregation=ft.SecAggPlus(neighbours=4, threshold=3, clip=1.0, bits=20),
        )  # fmt: skip
        assert "failed authentication" in history[0].failed["w2"]
        expected = _fedavg(start, [u for name, u in true.items() if name != "w2"])
        _assert_within(model.state_dict(), expected, sm.quantization_step(1.0, 20))
        del data


async def test_the_secrets_cannot_be_fetched_over_the_wire() -> None:
    async with ft.VirtualWorker("bob", encode=True) as bob:
        from fedtensor.client.pointer import call_on

        secrets = call_on(bob.client, "fedtensor.secagg_setup", (), {"round": 1, "position": 0})
        with pytest.raises(ft.RemoteError, match=r"ProtocolError|encode"):
            await secrets.fetch(timeout=30)
        del secrets


async def test_the_client_cannot_fetch_a_workers_trained_update(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every pointer the secure round holds between training and masking is tried: the
    local updates' fail to fetch, and nothing that can be fetched is a trained state."""
    made: list[tuple[str, Any]] = []
    real_call_on = client_secagg.call_on

    def recording_call_on(client: Any, op: str, *args: Any) -> Any:
        pointer = real_call_on(client, op, *args)
        made.append((op, pointer))
        return pointer

    fetched: list[Any] = []
    refused: list[str] = []

    async def try_every_pointer(stage: str, names: list[str]) -> None:
        if stage != "share keys":  # trained (commands run in order), not yet masked
            return
        for op, pointer in made:
            if pointer._client is None:  # fetched and freed by the round already
                continue
            try:
                fetched.append(await pointer.fetch(timeout=30))
            except ft.RemoteError as exc:
                refused.append(f"{op}: {exc}")

    async with _virtual(4, encode=True) as workers:
        data = ft.federate(_data(200), workers, seed=0)
        _, true = await _true_updates(data, lr=0.1)
        monkeypatch.setattr(client_secagg, "call_on", recording_call_on)
        monkeypatch.setattr(client_secagg.hooks, "after_stage", try_every_pointer)
        history = await ft.fit(
            _model(), data, rounds=1, lr=0.1, progress=False,
            secure_aggregation=ft.SecAggPlus(clip=1.0, bits=20),
        )  # fmt: skip
        del data
    assert not history[0].skipped
    unencodable = [r for r in refused if "ProtocolError" in r or "encode" in r]
    assert len(unencodable) == len(refused)
    assert sum(r.startswith("fedtensor.local_update:") for r in refused) == 4
    trained = [t for update in true.values() for t in update.state.values() if t.numel() > 1]
    for tensor in (t for value in fetched for t in _tensors(value)):
        assert not any(
            t.shape == tensor.shape and torch.allclose(t, tensor.to(t.dtype)) for t in trained
        )


def test_a_malformed_share_keys_reply_is_told_apart() -> None:
    row = torch.zeros(1, worker_secagg.SEALED_BYTES, dtype=torch.uint8)
    assert client_secagg._well_formed_shares({"to": [3], "shares": row})
    assert not client_secagg._well_formed_shares({"to": [3, 4], "shares": row})
    assert not client_secagg._well_formed_shares({"to": ["3"], "shares": row})
    assert not client_secagg._well_formed_shares({"to": [3], "shares": row[:, :-1]})
    assert not client_secagg._well_formed_shares({"shares": row})
    assert not client_secagg._well_formed_shares(None)


def test_a_private_update_is_masked_once_then_freed() -> None:
    held = worker_secagg.PrivateUpdate({"state": {"w": torch.ones(1000)}, "examples": 1})
    assert sys.getsizeof(held) > 4000  # the memory quota charges its tensors
    assert "1." not in repr(held)
    assert held.take()["examples"] == 1
    with pytest.raises(ValueError, match="already masked"):
        held.take()


async def test_bad_configurations_raise_before_any_round() -> None:
    with pytest.raises(ValueError, match="threshold 5 is above neighbours 4"):
        ft.SecAggPlus(neighbours=4, threshold=5)
    with pytest.raises(ValueError, match="bits must be between 8 and 32"):
        ft.SecAggPlus(bits=4)
    with pytest.raises(ValueError, match="bits"):
        ft.SecAggPlus(bits=40)
    with pytest.raises(ValueError, match="clip"):
        ft.SecAggPlus(clip=0.0)
    with pytest.raises(ValueError, match="neighbours"):
        ft.SecAggPlus(neighbours=0)
    async with _virtual(3) as workers:
        one = ft.federate(_data(30), workers[:1], seed=0)
        with pytest.raises(ValueError, match="at least 2 workers"):
            await ft.fit(
                _model(), one, rounds=1, progress=False, secure_aggregation=ft.SecAggPlus()
            )
        data = ft.federate(_data(90), workers, seed=0)
        stored = [len(worker.objects) for worker in workers]
        with pytest.raises(ValueError, match="at least 2 workers"):
            await ft.fit(
                _model(), data, rounds=1, fraction=0.3, progress=False,
                secure_aggregation=ft.SecAggPlus(),
            )  # fmt: skip
        with pytest.raises(ValueError, match="threshold 3 is above the 2 neighbours"):
            await ft.fit(
                _model(),
                data,
                rounds=1,
                progress=False,
                secure_aggregation=ft.SecAggPlus(threshold=3),
            )
        with pytest.raises(ValueError, match="cannot aggregate a masked sum"):
            await ft.fit(
                _model(), data, rounds=1, progress=False, strategy=ft.FedBuff(buffer_size=2),
                secure_aggregation=ft.SecAggPlus(),
            )  # fmt: skip
        assert [len(worker.objects) for worker in workers] == stored  # nothing was sent
        del one, data


async def test_secure_fedavg_on_worker_processes(
    ft_worker_processes: Callable[..., WorkerProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    processes = [ft_worker_processes(name, "--threads", "1") for name in ("p0", "p1", "p2")]
    async with contextlib.AsyncExitStack() as stack:
        workers = [
            await stack.enter_async_context(ft.connect(p.url, token=p.token, timeout=60))
            for p in processes
        ]
        data = ft.federate(_data(150), workers, seed=0)
        with anyio.fail_after(50):
            start, true = await _true_updates(data, lr=0.1)
            model = _model()
            # Three workers: each has the other two as neighbours; one may die after masking.
            config = ft.SecAggPlus(neighbours=2, threshold=1, clip=1.0, bits=20)
            history = await ft.fit(
                model, data, rounds=1, lr=0.1, progress=False, secure_aggregation=config
            )
            assert history[0].completed == ("p0", "p1", "p2"), history[0].failed
            _assert_within(
                model.state_dict(),
                _fedavg(start, list(true.values())),
                sm.quantization_step(1.0, 20),
            )

            # A process killed after masking: still the sum of all three.
            def after(stage: str, alive: list[str]) -> None:
                if stage == "masked input":
                    processes[1].kill()

            start, true = await _true_updates(data, model, lr=0.1)
            monkeypatch.setattr(client_secagg.hooks, "after_stage", after)
            history = await ft.fit(
                model, data, rounds=1, lr=0.1, progress=False, secure_aggregation=config
            )
            assert not history[0].skipped, history[0].skip_reason
            assert len(history[0].completed) == 3
            assert "unavailable" in history[0].failed["p1"]
            _assert_within(
                model.state_dict(),
                _fedavg(start, list(true.values())),
                sm.quantization_step(1.0, 20),
            )
        del data


def test_commitments_bind_round_and_position() -> None:
    seed = bytes(32)
    assert worker_secagg.seed_commitment(seed, 1, 0) != worker_secagg.seed_commitment(seed, 1, 1)
    assert (
        worker_secagg.seed_commitment(seed, 1, 0)
        == hashlib.sha256(b"fedtensor-secagg+ seed|1|0|" + seed).digest()
    )


def test_the_demo_runs_with_secure_aggregation() -> None:
    from fedtensor.demo import main

    out = io.StringIO()
    args = ["--secure-aggregation", "--rounds", "1", "--epochs", "1", "--no-central"]
    assert main([*args, "--virtual", "2"], out) == 0
    assert "2/2 workers" in out.getvalue()
