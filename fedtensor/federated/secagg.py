"""Secure aggregation for :func:`fedtensor.fit`: the aggregator's half of SecAgg+.

Theory of operation
-------------------
With ``fit(..., secure_aggregation=SecAggPlus())`` a round learns the sum of
the sampled workers' updates and nothing about any one of them. Each worker
masks its update with random vectors that cancel in the sum (Bell et al., CCS
2020, "SecAgg+"; Flower's ``SecAggPlusWorkflow`` is the reference design). The
worker's side is the ``fedtensor.secagg_*`` worker operations
(:mod:`fedtensor.worker.secagg`); the arithmetic and cryptography are in
:mod:`fedtensor.protocol.secagg_math`. :func:`secure_round` runs one round as
four stages, each one command per worker and one wait (bounded by
``round_timeout``); a worker that fails a stage is dropped from the round:

1. **Setup** (queued with the round's training, no wait before it): each worker
   makes two X25519 key pairs and stores its secrets in the client's session on
   the worker; then it trains (``fedtensor.local_update(..., private=True)``:
   the trained state is kept where no fetch reaches it, see
   :class:`~fedtensor.worker.secagg.PrivateUpdate`), and the aggregator fetches
   the public keys only.
2. **Share keys**: the workers that answered are put on a random ring, each
   joined to its ``k`` nearest (``k = O(log n)``); each worker gets its
   neighbours' public keys and answers with, for each neighbour, a Shamir share
   of its self-mask seed and of its mask private key, sealed with AES-GCM for
   that neighbour. The aggregator cannot open them; it relays them.
3. **Masked input**: each worker opens the shares relayed to it (one that fails
   authentication names its sender, who is then dropped) and answers with its
   weighted, quantized update plus its self mask and pairwise masks, in the ring
   the aggregator chose for the round (below).
   The update itself never leaves the worker; the local update's result is
   never fetched, only the statistics (examples, loss, correct answers, compute
   seconds), which travel in the clear, as Flower's metrics and example counts do.
4. **Unmask**: the survivors (those whose masked input arrived and whose shares
   authenticated) and the dropped are announced; each survivor answers with its
   shares of the survivors' seeds and of the dropped ones' mask keys. With at
   least ``threshold`` shares of each, the aggregator rebuilds the seeds
   (checked against the workers' commitments) and the dropped ones' mask keys
   (checked against their public keys), removes the self masks and the pairwise
   masks shared with dropped workers, and dequantizes the sum.

The strategy then moves the model from the sum (:meth:`Strategy.aggregate_sum`).

**Weights and the ring.** A worker's weight (its example count, or 1 under
differential privacy) is folded in before quantizing as the ratio ``w_i / max_w``
of the round's largest weight (the largest sampled shard: Flower's SecAgg+ does
the same with its ``max_weight``), so each input adds at most ``2**bits - 1`` per
entry and the sum of ``n`` fits ``2**32`` when ``n * (2**bits - 1) < 2**32``
(1,024 workers at 22 bits): the aggregator then masks mod ``2**32`` (``int32``
words, half the keystream and memory traffic of the 48-bit ring), else mod
``2**48`` (:func:`~fedtensor.protocol.secagg_math.choose_modulus_bits`), and tells
the workers in the masking call. The sum unmasked is ``sum(r_i x_i)``; divided
by ``sum(r_i)`` it is the weighted average, with an error per coordinate below
``n * step / sum(r_i)`` (``quantization_bound``; ``step`` when the weights are
equal, ``step * max_w / mean_w`` in general): the price of the ratio against an
integer weight, which kept the bound at ``step`` but needed ``total_weight *
(2**bits - 1)`` to fit the ring.
Fewer than ``threshold`` shares for someone (more than ``neighbours -
threshold`` dropouts around one worker), or fewer survivors than
``max(2, min_workers)``, skips the round with its reason in
:attr:`RoundMetrics.skip_reason`.

What is protected, and from whom: an aggregator that runs this protocol
(honest but curious, or one that tampers with relayed shares) learns the sum
only. The default threshold is a majority of the neighbours, so no split of
the honest workers' answers reveals both the seed and the mask key of one
worker. The trained states never enter the client's reach: the pointer to
each local update names a :class:`~fedtensor.worker.secagg.PrivateUpdate`,
which fails to fetch, and masking empties it. What this does not cover: a
client holding a worker's token can run other allow-listed commands, so one
that deliberately departs from the protocol can read the worker's data
(``fedtensor.dataset``) or train on it without ``private`` and fetch the result;
SecAgg+ protects updates from an aggregator that runs ``fit``, not from a
client the worker trusts with its data (that takes a worker-side access policy).

Integer entries (a batch norm's ``num_batches_tracked``) are summed exactly
under the same masks, unweighted, and each moves by the workers' mean change
(rounded): plain FedAvg's maximum of their values needs each worker's value,
which a sum does not give; the two agree whenever the workers moved the entry
alike (as many local steps). Boolean entries keep their value.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedtensor.client.pointer import PointerBase, call_on
from fedtensor.errors import RemoteError, WorkerUnavailable
from fedtensor.errors import TimeoutError as FedTimeoutError
from fedtensor.federated.progress import RoundMetrics
from fedtensor.federated.strategies import Strategy
from fedtensor.protocol import secagg_math as sm
from fedtensor.protocol.values import tensor_bytes
from fedtensor.worker.secagg import SEALED_BYTES, seed_commitment

__all__ = ["SecAggPlus", "secure_round"]

State = dict[str, torch.Tensor]

# Remote failures that are the plan's fault: they would repeat on every worker.
_PLAN_ERRORS = frozenset({"PlanError", "ForbiddenOperation"})


@dataclass(frozen=True)
class SecAggPlus:
    """Secure aggregation by SecAgg+: the aggregator learns only the sum of the updates.

    ``neighbours`` (k): how many others each worker agrees masks with and
    shares its secrets among; default ``2 * ceil(log2 n)`` (at most ``n - 1``)
    for ``n`` workers in the round. ``threshold`` (t): how many of them must
    answer to unmask it; default a majority, ``k // 2 + 1``. Up to ``k - t``
    workers may drop out after masking around any one worker. Each coordinate
    of an update (its change in the round) is clipped to ``[-clip, clip]`` and
    quantized to ``bits`` bits: the sum's error per coordinate of the average
    is one step ``2 * clip / (2**bits - 1)`` (reported as ``quantization_step``);
    the error of the weighted average per coordinate is below ``n * step /
    sum(w_i / max_w)`` (``quantization_bound``: one step when the weights are
    equal). Rounds whose sums fit are masked mod ``2**32``, others mod ``2**48``.
    """

    neighbours: int | None = None
    threshold: int | None = None
    clip: float = 8.0
    bits: int = 22

    def __post_init__(self) -> None:
        if self.neighbours is not None and (
            type(self.neighbours) is not int or self.neighbours < 1
        ):
            raise ValueError("neighbours must be an integer >= 1")
        if self.threshold is not None and (type(self.threshold) is not int or self.threshold < 1):
            raise ValueError("threshold must be an integer >= 1")
        if (
            self.neighbours is not None
            and self.threshold is not None
            and self.threshold > self.neighbours
        ):
            raise ValueError(
                f"threshold {self.threshold} is above neighbours {self.neighbours}: "
                "the secrets could never be rebuilt"
            )
        if not (isinstance(self.clip, int | float) and math.isfinite(self.clip) and self.clip > 0):
            raise ValueError("clip must be a positive finite number")
        if type(self.bits) is not int or not 8 <= self.bits <= 32:
            raise ValueError(
                f"bits must be between 8 and 32, not {self.bits!r}: fewer leave a "
                "quantization step too coarse to train on, more overflow the 48-bit sums"
            )

    def modulus_bits_for(self, workers: int, entries: int = 0, integers: bool = False) -> int:
        """The ring of a round of ``workers`` inputs (32 or 48 bits; ``ValueError`` if none)."""
        return sm.choose_modulus_bits(workers, self.bits, entries, integers)

    def neighbours_for(self, count: int) -> int:
        """``k`` in a round of ``count`` workers."""
        wanted = self.neighbours if self.neighbours is not None else sm.default_neighbours(count)
        return min(wanted, count - 1)

    def threshold_for(self, neighbours: int) -> int:
        """``t`` for ``neighbours`` neighbours."""
        return self.threshold if self.threshold is not None else sm.default_threshold(neighbours)

    def check(self, workers: int, per_round: int, strategy: Strategy) -> None:
        """``ValueError`` if a run with these figures cannot aggregate securely."""
        if workers < 2 or per_round < 2:
            raise ValueError(
                "secure aggregation needs at least 2 workers per round "
                f"(the data is on {workers}, a round samples {per_round}): "
                "the sum of one update is that update"
            )
        if type(strategy).aggregate_sum is Strategy.aggregate_sum:
            raise ValueError(f"{type(strategy).__name__} cannot aggregate a masked sum")
        self.modulus_bits_for(per_round)  # a round's sums must fit a ring
        neighbours = self.neighbours_for(per_round)
        if self.threshold_for(neighbours) > neighbours:
            raise ValueError(
                f"threshold {self.threshold} is above the {neighbours} neighbours a worker "
                f"has in a round of {per_round}"
            )


@dataclass
class _Recorder:
    """Test hooks: see what the aggregator receives, alter what it relays, act between stages."""

    #: Called with (stage, worker id, reply) for every reply the aggregator receives.
    received: Callable[[str, str, Any], None] | None = None
    #: Called with (round, sender position, receiver position, sealed share); returns
    #: what is relayed instead.
    relay: Callable[[int, int, int, torch.Tensor], torch.Tensor] | None = None
    #: Called with (stage just finished, worker ids still in the round); may be async.
    after_stage: Callable[[str, list[str]], Any] | None = None


#: The hooks tests set (none by default).
hooks = _Recorder()


async def _after(stage: str, names: list[str]) -> None:
    if hooks.after_stage is not None:
        outcome = hooks.after_stage(stage, names)
        if hasattr(outcome, "__await__"):
            await outcome


class _Skip(Exception):
    """The round cannot finish securely; the message says why."""


async def secure_round(
    run: Any,
    round: int,
    sampled: list[int],
    state: State,
    *,
    clip_norm: float | None = None,
    noise_std: float = 0.0,
    weight: int | None = None,
) -> RoundMetrics:
    """One round of :func:`fedtensor.fit` with secure aggregation (``run`` is fit's ``_Run``).

    ``clip_norm`` and ``noise_std`` are handed to every worker's masking step
    (differential privacy: each worker L2-clips its update and adds Gaussian
    noise before masking, so the aggregator never sees an un-noised sum).
    ``weight`` (differential privacy: 1) replaces each worker's example count as
    its weight in the sum.
    """
    config: SecAggPlus = run.secure_aggregation
    started = time.perf_counter()
    shards = run.data.shards
    name = [shard.worker.id for shard in shards]
    position = {index: place for place, index in enumerate(sampled)}
    index_at = dict(enumerate(sampled))
    reasons: dict[int, str] = {}
    received_bytes = 0
    keys = sorted(k for k, v in state.items() if v.is_floating_point())
    integer_keys = sorted(k for k, v in state.items() if _is_integer(v))
    floats = sum(state[key].numel() for key in keys)
    # The round's largest weight: each worker's update is scaled by its weight over it.
    max_weight = weight if weight is not None else max(1, *(shards[i].size for i in sampled))

    # 1. Setup and training, queued at once on every sampled worker.
    setups: dict[int, PointerBase] = {}
    results: dict[int, PointerBase] = {}
    stored: dict[int, PointerBase] = {}
    advertised_calls: dict[int, PointerBase] = {}
    for index in sampled:
        shard = shards[index]
        client = shard.worker.client
        if index not in run.plans:
            run.plans[index] = client.store(run.plan.wire)
        setups[index] = call_on(
            client, "fedtensor.secagg_setup", (), {"round": round, "position": position[index]}
        )
        advertised_calls[index] = call_on(
            client, "fedtensor.secagg_public_keys", (setups[index],), {}
        )
        stored[index] = client.store(state)
        results[index] = call_on(
            client,
            "fedtensor.local_update",
            (run.plans[index], stored[index], shard.data, shard.targets),
            # private: the trained state stays on the worker, out of this client's reach.
            {**run.hyperparameters, "seed": _worker_seed(run.seed, round, index), "private": True},
        )
    submitted = time.perf_counter()
    run.shown.update(round, 0, len(sampled))

    async def gather(stage: str, calls: dict[int, PointerBase]) -> dict[int, Any]:
        """Every worker's reply to ``calls``; who failed, and why, goes in ``reasons``."""
        nonlocal received_bytes
        replies: dict[int, Any] = {}
        stopped: list[Exception] = []

        async def one(index: int, answer: asyncio.Future[Any]) -> None:
            with anyio.move_on_after(run.round_timeout) as waited:
                try:
                    reply = await answer
                except WorkerUnavailable as exc:
                    reasons[index] = f"unavailable: {exc}"
                    if index in run.alive:
                        run.alive.remove(index)
                    run.plans.pop(index, None)
                except FedTimeoutError as exc:
                    reasons[index] = f"{type(exc).__name__}: {exc}"
                except RemoteError as exc:
                    reasons[index] = f"{stage}: {type(exc).__name__}: {exc}"
                    if exc.remote_type in _PLAN_ERRORS:
                        stopped.append(exc)
                else:
                    replies[index] = reply
                    if hooks.received is not None:
                        hooks.received(stage, name[index], reply)
            if waited.cancelled_caught:
                reasons[index] = f"{stage}: no answer within {run.round_timeout} s"

        # Asked for before anything is awaited: each fetch goes in its command's frame.
        answers = {
            index: pointer.fetch_soon(free=True, timeout=run.reply_timeout)
            for index, pointer in calls.items()
        }
        calls.clear()
        async with anyio.create_task_group() as group:
            for index, answer in answers.items():
                group.start_soon(one, index, answer)
        if stopped:
            raise stopped[0]
        received_bytes += sum(tensor_bytes(reply) for reply in replies.values())
        return replies

    def live(indices: Any) -> list[str]:
        return [name[index] for index in sorted(indices)]

    masked: dict[int, dict[str, Any]] = {}
    report: dict[str, float] = {}
    skip_reason = ""
    try:
        # 1. Public keys (the workers train meanwhile).
        advertised = await gather("setup", advertised_calls)
        await _after("setup", live(advertised))
        minimum = max(2, run.min_workers)
        if len(advertised) < minimum:
            raise _Skip(f"{len(advertised)} workers answered the setup, fewer than {minimum}")
        neighbours = config.neighbours_for(len(advertised))
        threshold = config.threshold_for(neighbours)
        report.update(neighbours=float(neighbours), threshold=float(threshold))
        if threshold > neighbours:
            raise _Skip(
                f"{len(advertised)} workers left: {neighbours} neighbours each, "
                f"fewer than the threshold {threshold}"
            )
        graph = sm.neighbour_graph(
            [position[index] for index in sorted(advertised)],
            neighbours,
            (run.seed * 7_919 + round) % (2**63),
        )

        # 2. Sealed shares.
        share_calls: dict[int, PointerBase] = {}
        # One 64-byte row per worker (its two public keys); each worker gets its
        # neighbours' rows as one tensor.
        row = {position[index]: place for place, index in enumerate(sorted(advertised))}
        table = torch.stack(
            [
                torch.cat([advertised[index]["encryption"], advertised[index]["masking"]])
                for index in sorted(advertised)
            ]
        )
        for index in sorted(advertised):
            client = shards[index].worker.client
            peers = sorted(graph[position[index]])
            share_calls[index] = call_on(
                client,
                "fedtensor.secagg_share_keys",
                (setups[index],),
                {
                    "neighbours": peers,
                    "public_keys": table[[row[peer] for peer in peers]],
                    "threshold": threshold,
                },
            )
        shared = await gather("share keys", share_calls)
        for index, reply in list(shared.items()):
            if not _well_formed_shares(reply):
                reasons[index] = "share keys: a malformed reply"
                del shared[index]
        await _after("share keys", live(shared))
        shared_positions = {position[index] for index in shared}
        for index in shared:
            remaining = len(graph[position[index]] & shared_positions)
            if remaining < threshold:
                raise _Skip(
                    f"{name[index]} has {remaining} neighbours left after the key sharing, "
                    f"fewer than the threshold {threshold}"
                )

        # 3. Masked inputs: each worker gets the shares sealed for it, in the narrowest
        # ring the sum of as many inputs as may arrive fits.
        modulus_bits = config.modulus_bits_for(len(shared), floats, bool(integer_keys))
        report["modulus_bits"] = float(modulus_bits)
        mask_calls: dict[int, PointerBase] = {}
        peers_of: dict[int, list[int]] = {}
        sent_to = {
            position[index]: {receiver: place for place, receiver in enumerate(reply["to"])}
            for index, reply in shared.items()
        }
        for index in sorted(shared):
            me = position[index]
            peers_of[index] = sorted(graph[me] & shared_positions)
            senders, sealed = [], []
            for peer in peers_of[index]:
                place = sent_to[peer].get(me)
                if place is None:
                    continue  # it sealed nothing for this worker: one share fewer
                share = shared[index_at[peer]]["shares"][place]
                if hooks.relay is not None:
                    share = hooks.relay(round, peer, me, share)
                senders.append(peer)
                sealed.append(share)
            client = shards[index].worker.client
            mask_calls[index] = call_on(
                client,
                "fedtensor.secagg_mask",
                (setups[index], results.pop(index), stored.pop(index)),
                {
                    "senders": senders,
                    "shares": (
                        torch.stack(sealed)
                        if sealed
                        else torch.zeros(0, SEALED_BYTES, dtype=torch.uint8)
                    ),
                    "peers": peers_of[index],
                    "parameters": keys,
                    "clip": float(config.clip),
                    "bits": config.bits,
                    "max_weight": max_weight,
                    "modulus_bits": modulus_bits,
                    "clip_norm": clip_norm,
                    "noise_std": noise_std,
                    "weight": weight,
                    "integers": integer_keys,
                },
            )
        results.clear()  # the workers that left before masking: their updates are freed
        stored.clear()
        masked = await gather("masked input", mask_calls)
        elapsed = time.perf_counter() - submitted
        for index, reply in list(masked.items()):
            reported = reply.get("weight") if isinstance(reply, dict) else None
            if type(reported) is not int or not 0 <= reported <= max_weight:
                # Its ratio would not be the one it scaled by: it is left out (dropped,
                # its pairwise masks removed), not the round.
                reasons[index] = f"masked input: a weight outside [0, {max_weight}]"
                del masked[index]
        run.shown.update(round, len(masked), len(sampled))
        rejected = {sender for reply in masked.values() for sender in reply["rejected"]}
        for sender in rejected:
            reasons[index_at[sender]] = (
                "a share it sent failed authentication (altered or replayed): dropped"
            )
        survivors = {position[index] for index in masked} - rejected
        dropped = shared_positions - survivors
        for index in list(masked):
            if position[index] not in survivors:
                del masked[index]
        await _after("masked input", live(index_at[p] for p in survivors))
        if len(survivors) < minimum:
            raise _Skip(f"{len(survivors)} masked inputs arrived, fewer than {minimum}")
        if len(survivors) < threshold:
            raise _Skip(f"{len(survivors)} survivors, fewer than the threshold {threshold}")

        # 4. Unmasking shares.
        unmask_calls = {
            index_at[p]: call_on(
                shards[index_at[p]].worker.client,
                "fedtensor.secagg_unmask",
                (setups[index_at[p]],),
                {"survivors": sorted(survivors), "dropped": sorted(dropped)},
            )
            for p in sorted(survivors)
        }
        revealed = await gather("unmask", unmask_calls)
        report["dropped"] = float(len(sampled) - len(survivors))
        total = _unmask(
            {position[index]: reply["masked"] for index, reply in masked.items()},
            {position[index]: reply for index, reply in revealed.items()},
            {position[index]: reply["commitment"] for index, reply in shared.items()},
            {position[index]: reply["masking"] for index, reply in advertised.items()},
            graph,
            survivors,
            dropped,
            threshold,
            round,
            {p: name[index_at[p]] for p in graph},
            modulus_bits=modulus_bits,
        )
    except _Skip as exc:
        skip_reason = f"secure aggregation: {exc}"
        masked = {}
    finally:
        setups.clear()  # the secrets are freed on the workers
        results.clear()
        stored.clear()

    replies = [(index, masked[index]) for index in sampled if index in masked]
    examples = sum(int(reply["examples"]) for _, reply in replies)
    skipped = not replies
    if not skipped:
        weights = [int(reply["weight"]) for _, reply in replies]  # in [0, max_weight]
        total_weight = sum(weights)
        # The same ratios the workers scaled by (the same float division).
        ratio_sum = sum(w / max_weight for w in weights)
        clipped = int(sm.residues(total[floats : floats + 1]))
        # sum(r_i x_i), rescaled so that over total_weight it is the average the ratios give.
        summed = sm.dequantize_sum(total[:floats], float(config.clip), config.bits, len(replies))
        summed.mul_(total_weight / ratio_sum if ratio_sum else 0.0)
        sums: State = {}
        offset = 0
        for key in keys:
            count = state[key].numel()
            sums[key] = summed[offset : offset + count].reshape(state[key].shape)
            offset += count
        new_state = run.strategy.aggregate_sum(state, sums, total_weight, run.parameters)
        new_state.update(_integer_means(state, integer_keys, total[floats + 1 :], len(replies)))
        run.model.load_state_dict(new_state)
        step = sm.quantization_step(float(config.clip), config.bits)
        report.update(
            quantization_step=step,
            # Each input's rounding is off by less than a step: n of them, over sum(r_i).
            quantization_bound=len(replies) * step / ratio_sum if ratio_sum else 0.0,
            clipped=float(clipped),
        )
    seen = examples * run.hyperparameters["epochs"]
    return RoundMetrics(
        round=round,
        sampled=tuple(name[index] for index in sampled),
        completed=tuple(name[index] for index, _ in replies),
        failed={name[index]: reasons[index] for index in sampled if index in reasons},
        skipped=skipped,
        train_loss=(
            sum(float(reply["loss"]) * int(reply["examples"]) for _, reply in replies) / examples
            if examples
            else math.nan
        ),
        train_accuracy=(
            sum(int(reply["correct"]) for _, reply in replies) / seen if seen else math.nan
        ),
        seconds=time.perf_counter() - started,
        compute_seconds=max((float(reply["seconds"]) for _, reply in replies), default=0.0),
        transfer_seconds=(
            sum(elapsed - float(reply["seconds"]) for _, reply in replies) / len(replies)
            if replies
            else 0.0
        ),
        bytes_sent=tensor_bytes(state) * len(sampled),
        bytes_received=received_bytes,
        secure_aggregation=report,
        skip_reason=skip_reason,
    )


def _well_formed_shares(reply: Any) -> bool:
    """Whether a ``secagg_share_keys`` reply has a sealed row for each position it names."""
    if not isinstance(reply, dict):
        return False
    to, shares = reply.get("to"), reply.get("shares")
    return (
        isinstance(to, list)
        and all(type(p) is int for p in to)
        and isinstance(shares, torch.Tensor)
        and shares.dtype == torch.uint8
        and tuple(shares.shape) == (len(to), SEALED_BYTES)
    )


def _is_integer(value: torch.Tensor) -> bool:
    return not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)


def _integer_means(state: State, keys: list[str], sums: torch.Tensor, count: int) -> State:
    """Each integer entry moved by the mean of the ``count`` workers' deltas, rounded.

    ``sums``: their masked-and-unmasked sum in the round's ring, read as signed. Plain
    FedAvg takes the largest of the workers' values; a sum cannot give that, but the
    mean is the same whenever the workers moved an entry alike (a batch norm's
    ``num_batches_tracked`` after as many local steps: shards of equal size).
    """
    modulus_bits = sm.modulus_bits_of(sums)
    if 2 * count * sm.integer_delta_bound(modulus_bits) >= 1 << modulus_bits:
        raise ValueError(f"{count} workers' integer deltas could overflow the ring's sums")
    if modulus_bits == sm.NARROW_MODULUS_BITS:
        signed = sums.to(torch.int64)  # int32 words are the signed residues already
    else:
        half = 1 << (sm.MODULUS_BITS - 1)
        signed = torch.where(sums >= half, sums - (1 << sm.MODULUS_BITS), sums)
    moved = torch.div(2 * signed + count, 2 * count, rounding_mode="floor")  # round half up
    out: State = {}
    offset = 0
    for key in keys:
        value = state[key]
        change = moved[offset : offset + value.numel()].reshape(value.shape)
        out[key] = (value.to(torch.int64) + change).to(value.dtype)
        offset += value.numel()
    return out


def _worker_seed(seed: int, round: int, index: int) -> int:
    # fit.worker_seed, repeated to avoid a circular import (fit imports this module).
    return (seed * 1_000_003 + round * 10_007 + index) % (2**63)


def _revealed_shares(reply: dict[str, Any]) -> dict[str, dict[int, int]]:
    """``secagg_unmask``'s reply as ``{"seeds": {owner: share}, "keys": {owner: share}}``."""
    out: dict[str, dict[int, int]] = {}
    for kind in ("seeds", "keys"):
        owners, shares = reply[kind], reply[f"{kind[:-1]}_shares"]
        if not isinstance(owners, list) or not isinstance(shares, torch.Tensor):
            raise _Skip("a malformed unmasking reply")
        data = sm.from_bytes_tensor(shares.reshape(-1), length=len(owners) * sm.SHARE_BYTES)
        out[kind] = {
            owner: int.from_bytes(data[i * sm.SHARE_BYTES : (i + 1) * sm.SHARE_BYTES], "big")
            for i, owner in enumerate(owners)
        }
    return out


def _combine(shares: dict[int, int]) -> bytes:
    secret = sm.combine_shares(shares)
    if secret >= 1 << (8 * sm.KEY_BYTES):
        raise _Skip("a rebuilt secret is out of range")
    return secret.to_bytes(sm.KEY_BYTES, "big")


def _unmask(
    masked: dict[int, torch.Tensor],
    revealed: dict[int, dict[str, Any]],
    commitments: dict[int, torch.Tensor],
    mask_publics: dict[int, torch.Tensor],
    graph: dict[int, frozenset[int]],
    survivors: set[int],
    dropped: set[int],
    threshold: int,
    round: int,
    names: dict[int, str],
    *,
    modulus_bits: int = sm.MODULUS_BITS,
) -> torch.Tensor:
    """The sum of the survivors' masked inputs with every mask removed, in the ring of
    ``modulus_bits`` (int32 words for 32, int64 residues for 48)."""
    length = next(iter(masked.values())).numel()
    dtype = sm.ring_dtype(modulus_bits)
    if any(vector.numel() != length or vector.dtype != dtype for vector in masked.values()):
        raise _Skip(f"masked inputs of different lengths, or not in the {modulus_bits}-bit ring")
    total = torch.zeros(length, dtype=dtype)
    sm.add_masks(total, ((masked[p], 1) for p in sorted(survivors)))

    held = {holder: _revealed_shares(reply) for holder, reply in revealed.items()}

    def shares_of(owner: int, kind: str) -> dict[int, int]:
        found = {}
        for holder in graph[owner]:
            share = held[holder][kind].get(owner) if holder in held else None
            if share is not None:
                found[holder + 1] = share
        if len(found) < threshold:
            what = "self-mask seed" if kind == "seeds" else "mask key"
            raise _Skip(
                f"{len(found)} of the {threshold} shares needed to rebuild the {what} of "
                f"{names[owner]} arrived: too many workers dropped out"
            )
        return found

    self_masks = []
    for owner in sorted(survivors):
        seed = _combine(shares_of(owner, "seeds"))
        if seed_commitment(seed, round, owner) != sm.from_bytes_tensor(commitments[owner]):
            raise _Skip(f"the rebuilt seed of {names[owner]} does not match its commitment")
        self_masks.append((seed, -1))
    sm.add_seeded_masks(total, self_masks)
    for gone in sorted(dropped):
        private = X25519PrivateKey.from_private_bytes(_combine(shares_of(gone, "keys")))
        if sm.public_bytes(private) != sm.from_bytes_tensor(mask_publics[gone]):
            raise _Skip(f"the rebuilt mask key of {names[gone]} does not match its public key")
        pairwise = []
        for survivor in sorted(graph[gone] & survivors):
            seed = sm.agree(
                private, sm.from_bytes_tensor(mask_publics[survivor]), "pairwise mask", round
            )
            # The survivor added +mask if its position is the smaller: take it off.
            pairwise.append((seed, -1 if survivor < gone else 1))
        sm.add_seeded_masks(total, pairwise)
    return total
