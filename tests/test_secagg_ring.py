"""SecAgg+'s ring: weights folded in before quantizing, sums mod 2**32 when they fit.

Each worker scales its update by ``w_i / max_w`` (the round's largest weight) before
quantizing, as Flower's SecAgg+ does with its ``max_weight``, so a round of ``n``
inputs sums below ``n * (2**bits - 1)`` and is masked mod ``2**32`` in ``int32``
words when that fits (else mod ``2**48`` in ``int64``). Tested here: torch's
``int32`` arithmetic wraps as the ring needs (against Python integers), the ring
chosen at its boundaries, unequal weights averaged within the new error bound
``n * step / sum(w_i / max_w)`` (and not ignored), masked words that look uniform,
and ``ft.fit`` in both rings.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from test_secagg import (  # the protocol driven as the aggregator drives it
    _assert_within,
    _average_and_bound,
    _correlation,
    _data,
    _deltas,
    _expected,
    _fedavg,
    _model,
    _run_protocol,
    _sealed_for,
    _share_keys,
    _true_updates,
    _virtual,
)

import fedtensor as ft
from fedtensor.federated import secagg as client_secagg
from fedtensor.protocol import secagg_math as sm
from fedtensor.worker import secagg as worker_secagg

pytestmark = pytest.mark.anyio

WORD = 1 << 32


def _words(values: Sequence[int]) -> torch.Tensor:
    """Python integers as the int32 words of their residues mod 2**32."""
    return torch.tensor(
        [v % WORD - WORD if v % WORD >= WORD // 2 else v % WORD for v in values],
        dtype=torch.int32,
    )


def _residues(vector: torch.Tensor) -> list[int]:
    return [v % WORD for v in vector.tolist()]


# -- torch's int32 arithmetic is the ring's -------------------------------------------------------


@pytest.mark.parametrize("size", [7, 70_001])  # a scalar tail, and torch's vectorized loops
def test_int32_add_sub_and_sum_wrap_like_python_integers_mod_2_32(size: int) -> None:
    rng = random.Random(size)
    extremes = [-(1 << 31), (1 << 31) - 1, -1, 0, 1]
    rows = [
        [rng.choice(extremes) if rng.random() < 0.3 else rng.randrange(WORD) for _ in range(size)]
        for _ in range(5)
    ]
    words = [_words(row) for row in rows]
    expected_sum = [sum(column) % WORD for column in zip(*rows, strict=True)]
    assert _residues(torch.sum(torch.stack(words), 0, dtype=torch.int32)) == expected_sum
    out = torch.empty(size, dtype=torch.int32)
    torch.sum(torch.stack(words), 0, dtype=torch.int32, out=out)
    assert _residues(out) == expected_sum
    accumulated = words[0].clone()
    for word in words[1:3]:
        accumulated.add_(word)
    for word in words[3:]:
        accumulated.sub_(word)
    assert _residues(accumulated) == [
        (a + b + c - d - e) % WORD for a, b, c, d, e in zip(*rows, strict=True)
    ]
    assert _residues(torch.add(words[0], 3)) == [(a + 3) % WORD for a in rows[0]]
    assert _residues(torch.bitwise_not(words[1])) == [(-b - 1) % WORD for b in rows[1]]
    assert sm.residues(words[2]).tolist() == [c % WORD for c in rows[2]]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("scratch", [16 << 20, 4 * 17 * 50])
def test_narrow_ring_masks_equal_one_mask_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
    torch_threads: Callable[[int], None],
    threads: int,
    scratch: int,
) -> None:
    # 20 seeds (two batches), mixed signs, in one block or column blocks of 50 words.
    monkeypatch.setattr(sm, "_SCRATCH_BYTES", scratch)
    torch_threads(threads)
    seeds = [(bytes([i]) * 32, 1 if i % 3 else -1) for i in range(20)]
    start = [random.Random(1).randrange(WORD) for _ in range(333)]
    expected = list(start)
    for seed, sign in seeds:
        mask = sm.expand_mask(seed, 333, sm.NARROW_MODULUS_BITS).tolist()
        expected = [(t + sign * m) % WORD for t, m in zip(expected, mask, strict=True)]
    got = sm.add_seeded_masks(_words(start), seeds)
    assert got.dtype == torch.int32
    assert _residues(got) == expected
    # A mask word is 4 keystream bytes as they are (AES-128-CTR of zeros), no shift.
    keystream = sm._encryptor(seeds[0][0]).update(bytes(40))
    words = torch.frombuffer(bytearray(keystream), dtype=torch.int32)
    assert torch.equal(sm.expand_mask(seeds[0][0], 10, sm.NARROW_MODULUS_BITS), words)


def test_narrow_masks_are_uniform_words() -> None:
    mask = sm.expand_mask(bytes(range(32)), 200_000, sm.NARROW_MODULUS_BITS)
    assert mask.dtype == torch.int32
    assert torch.equal(mask, sm.expand_mask(bytes(range(32)), 200_000, sm.NARROW_MODULUS_BITS))
    residues = sm.residues(mask).double()
    assert abs(residues.mean().item() / (WORD / 2) - 1) < 0.01
    for bit in (0, 15, 31):
        assert abs(((sm.residues(mask) >> bit) & 1).double().mean().item() - 0.5) < 0.01


def test_quantizing_into_int32_words_with_a_ratio_clips_before_scaling() -> None:
    values = torch.tensor([0.8, -3.0, 3.0, -0.4, 1.0], dtype=torch.float64)
    out = torch.empty(5, dtype=torch.int32)
    generator = torch.Generator().manual_seed(0)
    levels, clipped = sm.quantize(values, 1.0, 20, generator, ratio=0.5, out=out)
    assert levels is out
    assert clipped == 2  # |-3| and |3| beyond clip: counted on the update, not the scaled one
    back = sm.dequantize_sum(levels, 1.0, 20, 1)
    expected = torch.tensor([0.4, -0.5, 0.5, -0.2, 0.5], dtype=torch.float64)
    assert (back - expected).abs().max() < sm.quantization_step(1.0, 20)
    with pytest.raises(ValueError, match="ratio must be in"):
        sm.quantize(values, 1.0, 20, ratio=1.5)
    with pytest.raises(ValueError, match="at most 31 bits"):
        sm.quantize(values, 1.0, 32, out=torch.empty(5, dtype=torch.int32))


# -- the ring chosen ------------------------------------------------------------------------------


def test_the_ring_is_the_narrowest_the_sums_fit_at_its_boundaries() -> None:
    # 1024 * (2**22 - 1) = 2**32 - 1024 fits; one more worker does not.
    assert sm.choose_modulus_bits(1024, 22) == 32
    assert sm.choose_modulus_bits(1025, 22) == 48
    assert ft.SecAggPlus().modulus_bits_for(1024) == 32
    assert ft.SecAggPlus().modulus_bits_for(1025) == 48
    # 31 bits: two workers' levels (2 * (2**31 - 1)) fit 32 bits, three do not.
    assert sm.choose_modulus_bits(2, 31) == 32
    assert sm.choose_modulus_bits(3, 31) == 48
    assert sm.choose_modulus_bits(2, 32) == 48  # 32-bit levels never fit an int32 word
    # The clipped count (at most one per entry per worker) must fit as well.
    assert sm.choose_modulus_bits(2, 8, entries=(1 << 31) - 1) == 32
    assert sm.choose_modulus_bits(2, 8, entries=1 << 31) == 48
    # Integer deltas (at most 2**20 each in the narrow ring), summed signed.
    assert sm.choose_modulus_bits(2047, 8, integers=True) == 32
    assert sm.choose_modulus_bits(2048, 8, integers=True) == 48
    # Beyond 48 bits too: refused, before any round.
    assert sm.choose_modulus_bits((1 << 16) + 1, 32 - 1) == 48
    with pytest.raises(ValueError, match="overflow even the 48-bit ring"):
        sm.choose_modulus_bits((1 << 16) + 1, 32)
    with pytest.raises(ValueError, match="overflow even the 48-bit ring"):
        ft.SecAggPlus(bits=32).check((1 << 16) + 1, (1 << 16) + 1, ft.FedAvg())


def test_a_worker_refuses_a_weight_above_max_weight_or_an_unknown_ring() -> None:
    held = [worker_secagg.secagg_setup(round=1, position=p) for p in range(3)]
    public = [worker_secagg.secagg_public_keys(h) for h in held]
    shared = {p: _share_keys(held[p], public, [q for q in range(3) if q != p], 2) for p in range(3)}
    update = {"state": {"w": torch.ones(4)}, "examples": 5}
    arguments = {
        **_sealed_for(0, shared, [1, 2]),
        "peers": [1, 2],
        "parameters": ["w"],
        "clip": 1.0,
        "bits": 8,
    }
    base = {"w": torch.zeros(4)}
    with pytest.raises(ValueError, match="above the round's max_weight 4"):
        worker_secagg.secagg_mask(held[0], update, base, **arguments, max_weight=4, modulus_bits=32)
    with pytest.raises(ValueError, match="modulus_bits must be 32 or 48"):
        worker_secagg.secagg_mask(held[0], update, base, **arguments, max_weight=5, modulus_bits=64)
    with pytest.raises(ValueError, match="at most 31-bit"):
        worker_secagg.secagg_mask(
            held[0], update, base, **{**arguments, "bits": 32}, max_weight=5, modulus_bits=32
        )
    big = {"state": {"w": torch.ones(4), "n": torch.tensor((1 << 20) + 1)}, "examples": 5}
    with pytest.raises(ValueError, match="changed by more than 1048576"):
        worker_secagg.secagg_mask(
            held[0],
            big,
            {**base, "n": torch.tensor(0)},
            **arguments,
            max_weight=5,
            modulus_bits=32,
            integers=["n"],
        )
    reply = worker_secagg.secagg_mask(
        held[0], update, base, **arguments, max_weight=5, modulus_bits=32
    )
    assert reply["masked"].dtype == torch.int32
    assert reply["weight"] == 5


# -- unequal weights ------------------------------------------------------------------------------


@pytest.mark.parametrize("modulus_bits", [32, 48])
def test_unequal_weights_give_the_weighted_average_within_the_ratio_bound(
    modulus_bits: int,
) -> None:
    deltas, weights = _deltas(6, size=2000), [1, 10, 3, 7, 2, 10]
    total, survivors, replies = _run_protocol(
        deltas, weights, neighbours=4, threshold=3, modulus_bits=modulus_bits
    )
    assert total.dtype == sm.ring_dtype(modulus_bits)
    assert all(reply["masked"].dtype == total.dtype for reply in replies)
    average, bound = _average_and_bound(total, weights, survivors)
    step = sm.quantization_step(1.0, 20)
    # n * step / sum(w_i / max_w) = 6 * 10 / 33 steps: looser than one step, as it must be.
    assert bound == pytest.approx(6 * 10 / 33 * step)
    weighted = _expected(deltas, weights, survivors) / sum(weights)
    assert (average - weighted).abs().max() < bound
    # The weights were not ignored: the plain mean of the updates is far off.
    unweighted = _expected(deltas, [1] * 6, survivors) / 6
    assert (average - unweighted).abs().max() > 1000 * bound


def test_masked_words_look_uniform_and_unrelated_to_the_update() -> None:
    deltas, weights = _deltas(5, size=20_000, scale=0.5), [4, 1, 2, 3, 4]
    _, _, replies = _run_protocol(deltas, weights, neighbours=4, threshold=3, modulus_bits=32)
    step = sm.quantization_step(1.0, 20)
    for p, reply in enumerate(replies):
        masked = reply["masked"][:-1]
        assert masked.dtype == torch.int32
        residues = sm.residues(masked).double()
        assert abs(residues.mean().item() / (WORD / 2) - 1) < 0.02  # uniform mod 2**32
        assert abs(_correlation(residues, deltas[p].double())) < 0.05
        assert abs(_correlation(masked.double(), deltas[p].double())) < 0.05
        seen = sm.dequantize_sum(masked, 1.0, 20, 1)
        assert (seen - deltas[p].double()).abs().mean() > 1e6 * step


# -- ft.fit ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [20, 31], ids=["ring32", "ring48"])
async def test_secure_fedavg_with_unequal_shards_is_plain_fedavg_within_the_bound(
    bits: int,
) -> None:
    async with _virtual(4) as workers:
        data = ft.federate(_data(240), workers, split="dirichlet", alpha=0.5, seed=1)
        sizes = [shard.size for shard in data.shards]
        assert len(set(sizes)) > 1, sizes  # unequal weights
        start, true = await _true_updates(data, lr=0.1)
        model = _model()
        history = await ft.fit(
            model,
            data,
            rounds=1,
            lr=0.1,
            progress=False,
            secure_aggregation=ft.SecAggPlus(clip=1.0, bits=bits),
        )
        m = history[0]
        assert not m.skipped
        assert len(m.completed) == 4
        report = m.secure_aggregation
        # 4 inputs of at most 2**20 - 1 fit 32 bits; of 2**31 - 1 they need 48.
        assert report["modulus_bits"] == (32 if bits == 20 else 48)
        step = sm.quantization_step(1.0, bits)
        ratios = [size / max(sizes) for size in sizes]
        assert report["quantization_bound"] == pytest.approx(4 * step / sum(ratios))
        assert report["quantization_bound"] > step
        expected = _fedavg(start, list(true.values()))
        state = model.state_dict()
        for key in expected:
            error = (state[key].double() - expected[key]).abs().max().item()
            # float32 parameters: their rounding (below 1e-6 here) on top of the bound.
            assert error < report["quantization_bound"] + 1e-6, (key, error)
        # Weighted by examples, not equally: the unweighted mean is another model.
        unweighted = {
            key: sum((u.state[key].double() for u in true.values()), torch.zeros(1).double()) / 4
            for key in expected
        }
        assert max(
            (state[key].double() - unweighted[key]).abs().max().item() for key in expected
        ) > 100 * (report["quantization_bound"] + 1e-6)
        del data


async def test_a_weight_above_max_weight_drops_its_worker_not_the_round(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def lie(stage: str, worker: str, reply: Any) -> None:
        if stage == "masked input" and worker == "w1":
            reply["weight"] = 10**6  # not the ratio it scaled by: its input cannot be read

    async with _virtual(5) as workers:
        data = ft.federate(_data(250), workers, seed=0)
        start, true = await _true_updates(data, lr=0.1)
        monkeypatch.setattr(client_secagg.hooks, "received", lie)
        model = _model()
        history = await ft.fit(
            model, data, rounds=1, lr=0.1, progress=False,
            secure_aggregation=ft.SecAggPlus(neighbours=4, threshold=3, clip=1.0, bits=20),
        )  # fmt: skip
        m = history[0]
        assert m.completed == ("w0", "w2", "w3", "w4"), m.skip_reason
        assert "a weight outside [0, 50]" in m.failed["w1"]
        expected = _fedavg(start, [u for name, u in true.items() if name != "w1"])
        _assert_within(model.state_dict(), expected, m.secure_aggregation["quantization_bound"])
        del data
