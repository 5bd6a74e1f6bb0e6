"""The worker's half of SecAgg+: the ``fedtensor.secagg_*`` worker operations.

Theory of operation
-------------------
Secure aggregation runs as four stages per round, each one worker operation
that the aggregator (:mod:`fedtensor.federated.secagg`) queues like any other
command. Workers never talk to each other: what one worker has for another (its
public keys, its encrypted shares) goes to the aggregator, which relays it.

``fedtensor.secagg_setup(round=, position=)``
    Makes this round's secrets: two X25519 key pairs (one to encrypt shares,
    one to agree pairwise masks) and, later, a self-mask seed. It returns a
    :class:`SecAggSecrets` object, stored in the client's session on the worker
    like any result, so the next stages find it by its pointer. The codec has no
    encoding for it: fetching it over the wire fails, the secrets stay on the
    worker. ``fedtensor.secagg_public_keys(secrets)`` gives the two public keys.
``fedtensor.secagg_share_keys(secrets, neighbours=, public_keys=, threshold=)``
    Given its neighbours' public keys, the worker draws its self-mask seed,
    splits the seed and its mask private key into Shamir shares (any
    ``threshold`` of them rebuild the secret), and seals each neighbour's pair
    of shares with AES-GCM under the key it agrees with that neighbour, bound to
    (round, sender, receiver, stage). It returns the sealed shares and a
    SHA-256 commitment to the seed (so a wrong reconstruction is detected).
    What goes to and from a worker per neighbour (public keys, sealed shares,
    unmasking shares) travels as one uint8 tensor per stage, a row per
    neighbour, with a list of the positions the rows belong to: a round's
    cost in handling small tensors is then one per worker and stage, not one
    per neighbour.
``fedtensor.local_update(..., private=True)``
    Trains as always, but its result is a :class:`PrivateUpdate`: the update
    (the trained state) stays on the worker as an object the codec has no
    encoding for, so the client that queued the training cannot fetch it (or
    send it to another worker) by its pointer; only ``secagg_mask`` reads it,
    and empties it once masked.
``fedtensor.secagg_mask(secrets, update, global_state, senders=, shares=, peers=, ...)``
    Opens the shares its neighbours sealed for it (one that fails authentication
    is rejected and its sender named in the reply), then masks its update: the
    delta ``update["state"] - global_state`` of the floating-point entries
    (optionally L2-clipped to ``clip_norm`` and noised with ``noise_std``, the
    differential-privacy interface), clipped, scaled by its weight ratio
    ``weight / max_weight`` (its example count over the round's largest, at most 1:
    Flower's ``max_weight``) and quantized, plus one integer slot counting its
    clipped entries, plus the exact, unweighted delta of each integer entry named
    in ``integers`` (a batch norm's ``num_batches_tracked``), plus its self mask
    and, for each peer, the pairwise mask (added if its position is the smaller,
    subtracted otherwise), mod ``2**modulus_bits``: the ring the aggregator chose
    for the round (32 bits, ``int32`` words, when the round's sums fit; else 48,
    see :func:`~fedtensor.protocol.secagg_math.choose_modulus_bits`). The update
    itself is never returned: only the masked vector and the statistics
    (examples, loss, correct, seconds), which travel in the clear as Flower's do.
``fedtensor.secagg_unmask(secrets, survivors=, dropped=)``
    Once, after masking: for each neighbour that survived, its share of that
    neighbour's seed; for each that dropped, its share of that neighbour's mask
    key; never both for one neighbour (which would unmask it).

Every check an honest worker can make is made here: stages run in order and
once each, the neighbours' public keys are distinct, the threshold is met.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import threading
import time
from collections.abc import Mapping
from typing import Any

import torch

from fedtensor.protocol import secagg_math as sm

__all__ = [
    "SEALED_BYTES",
    "PrivateUpdate",
    "SecAggSecrets",
    "secagg_mask",
    "secagg_public_keys",
    "secagg_setup",
    "secagg_share_keys",
    "secagg_unmask",
]

_STAGE_SHARES = "share-keys"
#: A sealed pair of shares: AES-GCM's nonce, the two shares, its tag.
SEALED_BYTES = 12 + 2 * sm.SHARE_BYTES + 16
_INTEGRAL = frozenset({torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64})


class PrivateUpdate:
    """``fedtensor.local_update``'s result kept on the worker (``private=True``).

    The client's session stores this instead of the update: the codec has no
    encoding for it, so a fetch (or a delivery to another worker) of its pointer
    fails, and no allow-listed operation but ``fedtensor.secagg_mask`` reads it.
    Its ``__sizeof__`` is the update's, so the worker's memory quota charges it.
    """

    __slots__ = ("_kept",)

    def __init__(self, update: dict[str, Any]) -> None:
        self._kept: dict[str, Any] | None = update

    def take(self) -> dict[str, Any]:
        """The update, once: it is freed here (masking needs it once)."""
        kept, self._kept = self._kept, None
        if kept is None:
            raise ValueError("this update was already masked")
        return kept

    def __sizeof__(self) -> int:
        state = self._kept.get("state") if self._kept is not None else None
        tensors = state.values() if isinstance(state, dict) else ()
        return 64 + sum(256 + value.nbytes for value in tensors if isinstance(value, torch.Tensor))

    def __repr__(self) -> str:  # never the values
        return "<PrivateUpdate>" if self._kept is not None else "<PrivateUpdate (masked)>"


def private_update(update: dict[str, Any]) -> PrivateUpdate:
    """``fedtensor.local_update``'s result kept private (see :class:`PrivateUpdate`)."""
    return PrivateUpdate(update)


class SecAggSecrets:
    """One worker's secrets for one round of secure aggregation (never leaves it)."""

    __slots__ = (
        "accepted",
        "channel_keys",
        "encryption_key",
        "mask_key",
        "neighbours",
        "position",
        "round",
        "seed",
        "stage",
        "threshold",
    )

    def __init__(self, round: int, position: int) -> None:
        self.round = round
        self.position = position
        self.encryption_key = sm.generate_key()
        self.mask_key = sm.generate_key()
        self.seed = b""
        self.threshold = 0
        #: Neighbour position -> (encryption public key, mask public key).
        self.neighbours: dict[int, tuple[bytes, bytes]] = {}
        #: Neighbour position -> (its seed share, its mask key share) held for it.
        self.accepted: dict[int, tuple[int, int]] = {}
        #: Neighbour position -> the AES-GCM key of the shares exchanged with it.
        self.channel_keys: dict[int, bytes] = {}
        self.stage = "setup"

    def __repr__(self) -> str:  # never the keys
        return f"<SecAggSecrets round {self.round} position {self.position} stage {self.stage}>"


def _secrets(value: Any, stage: str) -> SecAggSecrets:
    if not isinstance(value, SecAggSecrets):
        raise TypeError("the first argument must be the object fedtensor.secagg_setup returned")
    if value.stage != stage:
        raise ValueError(f"secure aggregation is at stage {value.stage!r}, not {stage!r}")
    return value


def _int(value: Any, name: str, minimum: int = 0) -> int:
    if type(value) is not int or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}")
    return value


def secagg_setup(*, round: int, position: int) -> SecAggSecrets:
    """New key pairs for ``round``, where this worker is at ``position``."""
    return SecAggSecrets(_int(round, "round"), _int(position, "position"))


def secagg_public_keys(state: Any) -> dict[str, torch.Tensor]:
    """The two public keys (32 bytes each, as uint8 tensors)."""
    held = _secrets(state, "setup")
    return {
        "encryption": sm.to_bytes_tensor(sm.public_bytes(held.encryption_key)),
        "masking": sm.to_bytes_tensor(sm.public_bytes(held.mask_key)),
    }


def secagg_share_keys(
    state: Any, *, neighbours: Any, public_keys: Any, threshold: Any
) -> dict[str, Any]:
    """Seal a Shamir share of the seed and of the mask key for every neighbour.

    ``neighbours``: their positions; ``public_keys``: a uint8 tensor with a row of
    64 bytes per neighbour, in that order (its encryption key, then its mask key).
    Returns ``{"to": neighbours, "shares": a uint8 tensor with the sealed pair of
    shares for each, in that order, "commitment": sha256(seed)}``: one tensor per
    stage, not one per neighbour (each tensor costs a round its handling twice).
    """
    held = _secrets(state, "setup")
    if (
        not isinstance(neighbours, list)
        or not neighbours
        or not all(type(p) is int and p >= 0 and p != held.position for p in neighbours)
        or len(set(neighbours)) != len(neighbours)
    ):
        raise ValueError("neighbours must be a non-empty list of other positions, each once")
    if (
        not isinstance(public_keys, torch.Tensor)
        or public_keys.dtype != torch.uint8
        or tuple(public_keys.shape) != (len(neighbours), 2 * sm.KEY_BYTES)
    ):
        raise ValueError("public_keys must be a uint8 tensor of 64 bytes per neighbour")
    table = sm.from_bytes_tensor(public_keys.reshape(-1))
    parsed: dict[int, tuple[bytes, bytes]] = {}
    for row, position in enumerate(neighbours):
        pair = table[2 * sm.KEY_BYTES * row : 2 * sm.KEY_BYTES * (row + 1)]
        parsed[position] = (pair[: sm.KEY_BYTES], pair[sm.KEY_BYTES :])
    own = {sm.public_bytes(held.encryption_key), sm.public_bytes(held.mask_key)}
    every = [key for pair in parsed.values() for key in pair]
    if len(set(every)) != len(every) or own & set(every):
        # Bell et al.: a relay handing out repeated keys could make shares open to it.
        raise ValueError("the neighbours' public keys are not all distinct")
    held.threshold = _int(threshold, "threshold", 1)
    if held.threshold > len(parsed):
        raise ValueError(f"threshold {held.threshold} above the {len(parsed)} neighbours")
    held.neighbours = parsed
    held.seed = secrets.token_bytes(sm.KEY_BYTES)
    xs = [position + 1 for position in neighbours]
    seed_shares, key_shares = sm.split_secrets(
        [int.from_bytes(held.seed, "big"), int.from_bytes(sm.private_bytes(held.mask_key), "big")],
        xs,
        held.threshold,
    )
    sealed = bytearray()
    for position, seed_share, key_share in zip(neighbours, seed_shares, key_shares, strict=True):
        plaintext = seed_share.to_bytes(sm.SHARE_BYTES, "big") + key_share.to_bytes(
            sm.SHARE_BYTES, "big"
        )
        key = sm.agree(held.encryption_key, parsed[position][0], "share encryption", held.round)
        held.channel_keys[position] = key
        aad = sm.associated_data(held.round, held.position, position, _STAGE_SHARES)
        sealed += sm.seal(key, plaintext, aad)
    held.stage = "shared"
    return {
        "to": list(neighbours),
        "shares": sm.to_bytes_tensor(bytes(sealed)).view(len(neighbours), SEALED_BYTES),
        "commitment": sm.to_bytes_tensor(seed_commitment(held.seed, held.round, held.position)),
    }


def seed_commitment(seed: bytes, round: int, position: int) -> bytes:
    """SHA-256 of the seed in its context: checks a reconstructed seed, reveals nothing."""
    return hashlib.sha256(b"fedtensor-secagg+ seed|%d|%d|" % (round, position) + seed).digest()


def _flat_delta(update: Any, global_state: Any, parameters: Any) -> torch.Tensor:
    if not isinstance(update, dict) or not isinstance(update.get("state"), dict):
        raise ValueError("update must be what fedtensor.local_update returned")
    if not isinstance(global_state, dict) or not isinstance(parameters, list):
        raise ValueError("global_state must be a state dict and parameters a list of its keys")
    pairs = []
    for key in parameters:
        new, old = update["state"].get(key), global_state.get(key)
        if not isinstance(new, torch.Tensor) or not isinstance(old, torch.Tensor):
            raise ValueError(f"no tensor {key!r} in the update and the global state")
        if new.shape != old.shape:
            raise ValueError(f"{key!r} has shape {tuple(new.shape)}, not {tuple(old.shape)}")
        pairs.append((new.detach().reshape(-1), old.detach().reshape(-1)))
    delta = _scratch_delta(sum(new.numel() for new, _ in pairs))
    offset = 0
    for new, old in pairs:
        for part in sm.chunks(new.numel()):  # passes on the calling thread (see sm.chunks)
            piece = delta[offset + part.start : offset + part.stop]
            if new.dtype == old.dtype:
                # One pass, in the entries' own precision (float32: correctly rounded, an
                # error below 2**-24 of the delta, far under a quantization step), widened
                # as it is written.
                torch.sub(new[part], old[part], out=piece)
            else:
                piece.copy_(new[part]).sub_(old[part])
        offset += new.numel()
    return delta


def _scratch_delta(count: int) -> torch.Tensor:
    """This thread's float64 scratch of ``count`` entries, which quantizing then overwrites.

    A fresh 800 kB tensor per round is 800 kB of pages mapped and zeroed anew (0.2 ms of
    a worker's 4 ms masking at 100,000 parameters); it is kept per thread instead.
    """
    held: torch.Tensor | None = getattr(_delta, "tensor", None)
    if held is None or held.numel() < count:
        held = torch.empty(count, dtype=torch.float64)
        if count <= _SCRATCH_KEPT:
            # Larger ones are not kept: a thread would hold one client's largest masking
            # for good, outside every client's memory budget.
            _delta.tensor = held
    return held[:count]


#: Entries of the largest scratch a thread keeps (8 MiB: a model of 1 M parameters).
_SCRATCH_KEPT = 1 << 20


_delta = threading.local()


def _integer_deltas(
    update: dict[str, Any], global_state: Any, integers: Any, floats: set[Any], bound: int
) -> torch.Tensor:
    """The int64 deltas of the integer entries ``integers``, flattened in that order."""
    if not isinstance(integers, list | tuple) or len(set(integers)) != len(integers):
        raise ValueError("integers must be a list of distinct keys")
    if not integers:
        return torch.zeros(0, dtype=torch.int64)
    if floats & set(integers):
        raise ValueError("a key cannot be both among parameters and integers")
    pieces = []
    for key in integers:
        new, old = update["state"].get(key), global_state.get(key)
        if not isinstance(new, torch.Tensor) or not isinstance(old, torch.Tensor):
            raise ValueError(f"no tensor {key!r} in the update and the global state")
        if new.dtype not in _INTEGRAL or old.dtype not in _INTEGRAL:
            raise ValueError(f"{key!r} is not an integer entry")
        if new.shape != old.shape:
            raise ValueError(f"{key!r} has shape {tuple(new.shape)}, not {tuple(old.shape)}")
        pieces.append(new.reshape(-1).to(torch.int64) - old.reshape(-1).to(torch.int64))
    deltas = torch.cat(pieces)
    if deltas.numel() and int(deltas.abs().max()) > bound:
        # The ring's sums of them, read as signed, would wrap (see choose_modulus_bits).
        raise ValueError(f"an integer entry changed by more than {bound}")
    return deltas


def secagg_mask(
    state: Any,
    update: Any,
    global_state: Any,
    *,
    senders: Any,
    shares: Any,
    peers: Any,
    parameters: Any,
    clip: float,
    bits: int,
    max_weight: Any,
    modulus_bits: Any,
    weight: int | None = None,
    clip_norm: float | None = None,
    noise_std: float = 0.0,
    integers: Any = (),
) -> dict[str, Any]:
    """Open the neighbours' shares, then mask this worker's weighted, quantized delta.

    ``peers``: the neighbours that shared keys (masks are agreed with each);
    ``shares``: a uint8 tensor of what ``senders`` (some of them) sealed for this
    worker, a row each (:data:`SEALED_BYTES`), in that order. ``clip_norm`` and
    ``noise_std`` are the differential-privacy interface: the delta is L2-clipped,
    then Gaussian noise from a generator seeded by :mod:`secrets` is added, before
    quantization. ``weight`` (default: the example count) over ``max_weight``
    (the round's largest weight, from the aggregator; a weight above it is
    refused) scales the update before quantizing. ``modulus_bits``: the round's
    ring, 32 (``int32`` words) or 48 (``int64``). ``update``: a
    :class:`PrivateUpdate` (emptied here) or ``local_update``'s plain reply.
    ``integers``: integer entries whose exact deltas follow the float ones. Reply:
    ``{"masked", "examples", "weight", "loss", "correct", "seconds", "rejected"}``.
    """
    started = time.perf_counter()
    held = _secrets(state, "shared")
    bits = _int(bits, "bits", 2)
    if bits > 32 or not (isinstance(clip, float | int) and math.isfinite(clip) and clip > 0):
        raise ValueError("bits must be in 2..32 and clip a positive number")
    if not isinstance(peers, list) or not set(peers) <= set(held.neighbours):
        raise ValueError("peers must be a list of this worker's neighbours")
    if (
        not isinstance(senders, list)
        or not all(type(sender) is int and sender in peers for sender in senders)
        or len(set(senders)) != len(senders)
    ):
        raise ValueError("shares must come from peers, each once")
    if (
        not isinstance(shares, torch.Tensor)
        or shares.dtype != torch.uint8
        or tuple(shares.shape) != (len(senders), SEALED_BYTES)
    ):
        raise ValueError(f"shares must be a uint8 tensor of {SEALED_BYTES} bytes per sender")
    if type(modulus_bits) is not int or modulus_bits not in (
        sm.NARROW_MODULUS_BITS,
        sm.MODULUS_BITS,
    ):
        raise ValueError(f"modulus_bits must be {sm.NARROW_MODULUS_BITS} or {sm.MODULUS_BITS}")
    if modulus_bits == sm.NARROW_MODULUS_BITS and bits > 31:
        raise ValueError("the 32-bit ring takes at most 31-bit quantization")
    max_weight = _int(max_weight, "max_weight", 1)
    if noise_std < 0 or not math.isfinite(noise_std):
        raise ValueError("noise_std must be >= 0")
    if not isinstance(parameters, list) or len(set(parameters)) != len(parameters):
        # Repeated keys would make the vectors longer than the update it was charged for.
        raise ValueError("parameters must be a list of distinct keys")
    if isinstance(update, PrivateUpdate):
        update = update.take()
    delta = _flat_delta(update, global_state, parameters)
    integer_deltas = _integer_deltas(
        update, global_state, integers, set(parameters), sm.integer_delta_bound(modulus_bits)
    )
    examples = _int(update.get("examples"), "examples")
    weight = examples if weight is None else _int(weight, "weight")
    if weight > max_weight:
        # A ratio above 1 could carry the sum past the ring the aggregator sized.
        raise ValueError(f"weight {weight} is above the round's max_weight {max_weight}")

    rejected: list[int] = []
    received = sm.from_bytes_tensor(shares.reshape(-1)) if senders else b""
    for row, sender in enumerate(senders):
        sealed = received[row * SEALED_BYTES : (row + 1) * SEALED_BYTES]
        aad = sm.associated_data(held.round, sender, held.position, _STAGE_SHARES)
        try:
            plaintext = sm.open_sealed(held.channel_keys[sender], sealed, aad)
            if len(plaintext) != 2 * sm.SHARE_BYTES:
                raise sm.ShareRejected("a share of the wrong length")
        except (sm.ShareRejected, ValueError):
            rejected.append(sender)
            continue
        held.accepted[sender] = (
            int.from_bytes(plaintext[: sm.SHARE_BYTES], "big"),
            int.from_bytes(plaintext[sm.SHARE_BYTES :], "big"),
        )

    entropy = torch.Generator().manual_seed(secrets.randbits(63))
    if clip_norm is not None:
        if not clip_norm > 0:
            raise ValueError("clip_norm must be positive")
        norm = float(delta.norm())
        if norm > clip_norm:
            delta = delta * (clip_norm / norm)
    if noise_std:
        delta = delta + torch.randn(delta.shape, dtype=torch.float64, generator=entropy) * noise_std
    count = delta.numel()
    vector = torch.empty(count + 1 + integer_deltas.numel(), dtype=sm.ring_dtype(modulus_bits))
    levels = vector[:count]  # quantized in place: no second vector to allocate and fill
    # The weight folded in before quantizing (Flower's max_weight ratio): each input adds
    # at most 2**bits - 1 per entry, whatever its example count.
    _, clipped = sm.quantize(
        delta, float(clip), bits, ratio=weight / max_weight, out=levels, overwrite=True
    )
    vector[count] = clipped
    # Residues (a negative delta wraps: int32 words wrap by themselves), summed exactly
    # under the masks.
    vector[count + 1 :] = (
        integer_deltas
        if modulus_bits == sm.NARROW_MODULUS_BITS
        else integer_deltas.bitwise_and(sm.MODULUS_MASK)
    )
    seeds = [(held.seed, 1)]
    for peer in peers:
        _, mask_public = held.neighbours[peer]
        seed = sm.agree(held.mask_key, mask_public, "pairwise mask", held.round)
        seeds.append((seed, 1 if held.position < peer else -1))
    sm.add_seeded_masks(vector, seeds)
    held.stage = "masked"
    return {
        "masked": vector,
        "examples": examples,
        "weight": weight,
        "loss": float(update.get("loss", math.nan)),
        "correct": int(update.get("correct", 0)),
        "seconds": float(update.get("seconds", 0.0)) + time.perf_counter() - started,
        "rejected": sorted(rejected),
    }


def secagg_unmask(state: Any, *, survivors: Any, dropped: Any) -> dict[str, Any]:
    """The shares the aggregator needs to unmask the sum, once.

    For each neighbour in ``survivors``, this worker's share of its seed; for
    each in ``dropped``, its share of its mask key. Refused if the two lists
    overlap, if this worker is not among the survivors, or if fewer survivors
    remain than the threshold. Reply: ``{"seeds": [owner], "seed_shares": a uint8
    tensor of a share per owner, "keys": [owner], "key_shares": ...}``.
    """
    held = _secrets(state, "masked")
    if not isinstance(survivors, list) or not isinstance(dropped, list):
        raise ValueError("survivors and dropped must be lists of positions")
    alive, gone = set(survivors), set(dropped)
    if alive & gone:
        raise ValueError("a worker cannot be both a survivor and dropped")
    if held.position not in alive:
        raise ValueError("this worker is not among the survivors")
    if len(alive) < held.threshold:
        raise ValueError(f"{len(alive)} survivors, fewer than the threshold {held.threshold}")
    held.stage = "unmasked"
    seeds, keys = [], []
    seed_shares, key_shares = bytearray(), bytearray()
    for peer, (seed_share, key_share) in sorted(held.accepted.items()):
        if peer in alive:
            seeds.append(peer)
            seed_shares += seed_share.to_bytes(sm.SHARE_BYTES, "big")
        elif peer in gone:
            keys.append(peer)
            key_shares += key_share.to_bytes(sm.SHARE_BYTES, "big")
    held.accepted.clear()
    held.channel_keys.clear()
    return {
        "seeds": seeds,
        "seed_shares": sm.to_bytes_tensor(bytes(seed_shares)).view(len(seeds), sm.SHARE_BYTES),
        "keys": keys,
        "key_shares": sm.to_bytes_tensor(bytes(key_shares)).view(len(keys), sm.SHARE_BYTES),
    }


def worker_operations() -> Mapping[str, Any]:
    """The operations of this module by their allow-listed names."""
    return {
        "fedtensor.secagg_setup": secagg_setup,
        "fedtensor.secagg_public_keys": secagg_public_keys,
        "fedtensor.secagg_share_keys": secagg_share_keys,
        "fedtensor.secagg_mask": secagg_mask,
        "fedtensor.secagg_unmask": secagg_unmask,
    }
