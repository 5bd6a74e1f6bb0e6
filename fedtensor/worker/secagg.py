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
``fedtensor.secagg_share_keys(secrets, neighbours=, threshold=)``
    Given its neighbours' public keys, the worker draws its self-mask seed,
    splits the seed and its mask private key into Shamir shares (any
    ``threshold`` of them rebuild the secret), and seals each neighbour's pair
    of shares with AES-GCM under the key it agrees with that neighbour, bound to
    (round, sender, receiver, stage). It returns the sealed shares and a
    SHA-256 commitment to the seed (so a wrong reconstruction is detected).
``fedtensor.secagg_mask(secrets, update, global_state, shares=, peers=, ...)``
    Opens the shares its neighbours sealed for it (one that fails authentication
    is rejected and its sender named in the reply), then masks its update: the
    delta ``update["state"] - global_state`` of the floating-point entries
    (optionally L2-clipped to ``clip_norm`` and noised with ``noise_std``, the
    differential-privacy interface), quantized, multiplied by its weight (its
    example count), plus one integer slot counting its clipped entries, plus its
    self mask and, for each peer, the pairwise mask (added if its position is the
    smaller, subtracted otherwise), mod ``2**48``. The update itself is never
    returned: only the masked vector and the statistics (examples, loss,
    correct, seconds), which travel in the clear as Flower's do.
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
    "SecAggSecrets",
    "secagg_mask",
    "secagg_public_keys",
    "secagg_setup",
    "secagg_share_keys",
    "secagg_unmask",
]

_STAGE_SHARES = "share-keys"


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


def secagg_share_keys(state: Any, *, neighbours: Any, threshold: Any) -> dict[str, Any]:
    """Seal a Shamir share of the seed and of the mask key for every neighbour.

    ``neighbours``: ``{str(position): [encryption key, mask key]}``. Returns
    ``{"shares": {str(position): sealed}, "commitment": sha256(seed)}``.
    """
    held = _secrets(state, "setup")
    if not isinstance(neighbours, dict) or not neighbours:
        raise ValueError("neighbours must be a non-empty {position: [keys]} map")
    parsed: dict[int, tuple[bytes, bytes]] = {}
    for key, pair in neighbours.items():
        position = int(key) if isinstance(key, str) and key.isdigit() else -1
        if position < 0 or position == held.position:
            raise ValueError(f"bad neighbour position {key!r}")
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise ValueError("each neighbour has two public keys")
        parsed[position] = (
            sm.from_bytes_tensor(pair[0], length=sm.KEY_BYTES),
            sm.from_bytes_tensor(pair[1], length=sm.KEY_BYTES),
        )
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
    xs = [position + 1 for position in parsed]
    seed_shares = sm.split_secret(int.from_bytes(held.seed, "big"), xs, held.threshold)
    key_shares = sm.split_secret(
        int.from_bytes(sm.private_bytes(held.mask_key), "big"), xs, held.threshold
    )
    sealed: dict[str, torch.Tensor] = {}
    for position, (encryption_public, _) in parsed.items():
        x = position + 1
        plaintext = seed_shares[x].to_bytes(sm.SHARE_BYTES, "big") + key_shares[x].to_bytes(
            sm.SHARE_BYTES, "big"
        )
        key = sm.agree(held.encryption_key, encryption_public, "share encryption", held.round)
        held.channel_keys[position] = key
        aad = sm.associated_data(held.round, held.position, position, _STAGE_SHARES)
        sealed[str(position)] = sm.to_bytes_tensor(sm.seal(key, plaintext, aad))
    held.stage = "shared"
    return {
        "shares": sealed,
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
        held = _delta.tensor = torch.empty(count, dtype=torch.float64)
    return held[:count]


_delta = threading.local()


def secagg_mask(
    state: Any,
    update: Any,
    global_state: Any,
    *,
    shares: Any,
    peers: Any,
    parameters: Any,
    clip: float,
    bits: int,
    weight: int | None = None,
    clip_norm: float | None = None,
    noise_std: float = 0.0,
) -> dict[str, Any]:
    """Open the neighbours' shares, then mask this worker's weighted, quantized delta.

    ``peers``: the neighbours that shared keys (masks are agreed with each);
    ``shares``: ``{str(sender): sealed}`` for some of them. ``clip_norm`` and
    ``noise_std`` are the differential-privacy interface: the delta is L2-clipped,
    then Gaussian noise from a generator seeded by :mod:`secrets` is added, before
    quantization. Reply: ``{"masked", "examples", "weight", "loss", "correct",
    "seconds", "rejected"}``.
    """
    started = time.perf_counter()
    held = _secrets(state, "shared")
    bits = _int(bits, "bits", 2)
    if bits > 32 or not (isinstance(clip, float | int) and math.isfinite(clip) and clip > 0):
        raise ValueError("bits must be in 2..32 and clip a positive number")
    if not isinstance(peers, list) or not set(peers) <= set(held.neighbours):
        raise ValueError("peers must be a list of this worker's neighbours")
    if not isinstance(shares, dict) or not all(
        isinstance(key, str) and key.isdigit() and int(key) in peers for key in shares
    ):
        raise ValueError("shares must come from peers")
    if noise_std < 0 or not math.isfinite(noise_std):
        raise ValueError("noise_std must be >= 0")
    delta = _flat_delta(update, global_state, parameters)
    examples = _int(update.get("examples"), "examples")
    weight = examples if weight is None else _int(weight, "weight")
    if weight * ((1 << bits) - 1) >= 1 << sm.MODULUS_BITS:
        raise ValueError(f"weight {weight} too large for {bits}-bit quantization")

    rejected: list[int] = []
    for key, sealed in shares.items():
        sender = int(key)
        aad = sm.associated_data(held.round, sender, held.position, _STAGE_SHARES)
        try:
            plaintext = sm.open_sealed(held.channel_keys[sender], sm.from_bytes_tensor(sealed), aad)
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
    vector = torch.empty(delta.numel() + 1, dtype=torch.int64)
    levels = vector[:-1]  # quantized in place: no second vector to allocate and fill
    _, clipped = sm.quantize(delta, float(clip), bits, out=levels, overwrite=True)
    vector[-1] = clipped
    for part in sm.chunks(levels.numel()):
        levels[part].mul_(weight)
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
    remain than the threshold.
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
    seeds: dict[str, torch.Tensor] = {}
    keys: dict[str, torch.Tensor] = {}
    for peer, (seed_share, key_share) in held.accepted.items():
        if peer in alive:
            seeds[str(peer)] = sm.to_bytes_tensor(seed_share.to_bytes(sm.SHARE_BYTES, "big"))
        elif peer in gone:
            keys[str(peer)] = sm.to_bytes_tensor(key_share.to_bytes(sm.SHARE_BYTES, "big"))
    held.accepted.clear()
    held.channel_keys.clear()
    return {"seeds": seeds, "keys": keys}


def worker_operations() -> Mapping[str, Any]:
    """The operations of this module by their allow-listed names."""
    return {
        "fedtensor.secagg_setup": secagg_setup,
        "fedtensor.secagg_public_keys": secagg_public_keys,
        "fedtensor.secagg_share_keys": secagg_share_keys,
        "fedtensor.secagg_mask": secagg_mask,
        "fedtensor.secagg_unmask": secagg_unmask,
    }
