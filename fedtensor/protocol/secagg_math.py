"""The arithmetic and cryptography of SecAgg+, without I/O: shared by both sides.

Theory of operation
-------------------
Secure aggregation (Bell et al., "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", CCS 2020, "SecAgg+") lets an aggregator learn the
sum of the workers' vectors and nothing else. This module holds the pieces that
the worker's operations (:mod:`fedtensor.worker.secagg`) and the aggregator
(:mod:`fedtensor.federated.secagg`) both need, as pure functions:

* **The neighbour graph** (:func:`neighbour_graph`): the round's workers on a
  ring in a seeded random order, each joined to the ``k`` nearest on the ring
  (a Harary graph). ``k = O(log n)`` instead of ``n - 1`` is what makes SecAgg+
  cheaper than SecAgg: a worker agrees keys, masks and shares secrets only with
  its neighbours.
* **Key agreement** (:func:`agree`): X25519 Diffie-Hellman and HKDF-SHA256
  (the ``cryptography`` package), with the round in the HKDF ``info`` so that a
  key never serves two rounds or two purposes (share encryption, masks).
* **Share encryption** (:func:`seal`, :func:`open_sealed`): AES-256-GCM with
  the associated data binding the round, the sender, the receiver and the
  stage (:func:`associated_data`). A share the relay altered, replayed from
  another round or pair, or delivered under the wrong sender fails
  authentication (:class:`ShareRejected`).
* **Shamir secret sharing** (:func:`split_secret`, :func:`combine_shares`)
  over the prime field of the Mersenne prime ``2**521 - 1``: a 32-byte secret
  (a mask seed, an X25519 private key) is one field element; share ``i`` is
  the polynomial at ``x = position + 1``; any ``threshold`` shares give the
  secret back by Lagrange interpolation at 0, fewer give nothing.
* **The pseudo-random generator** (:func:`expand_mask`): a 32-byte seed
  expanded by AES-128 in counter mode, keyed by its first 16 bytes (the
  keystream; AES-NI makes AES faster than ChaCha20 here, 0.10 against 0.16 ms
  for 800 kB, and AES-128 about 12% faster than AES-256; 128 bits is the
  security X25519 gives the protocol anyway) into ``count`` integers uniform
  mod the round's modulus. Never ``torch.Generator``, whose state can be
  recovered from its output.
* **Quantization** (:func:`quantize`, :func:`dequantize_sum`): a float
  clipped to ``[-clip, clip]``, scaled by the worker's weight ratio ``w / max_w``
  (at most 1, see below) and mapped to an integer in ``[0, 2**bits - 1]``
  with stochastic rounding (unbiased, error below one step
  ``2 * clip / (2**bits - 1)``), its uniforms from AES-128-CTR under a fresh key
  unless a ``torch.Generator`` is given. A sum of ``n`` quantized vectors is exact
  in the integers; :func:`dequantize_sum` maps it back knowing ``n``.

The ring (:func:`choose_modulus_bits`)
--------------------------------------
Each worker adds at most ``2**bits - 1`` per entry: its weight is folded in
*before* quantizing, as the float ratio ``w_i / max_w`` of the round's largest
weight (Flower's SecAgg+ does the same with its ``max_weight``), never as an
integer multiplier, so the sum of ``n`` inputs stays below ``n * (2**bits - 1)``
whatever the example counts. The aggregator then picks the ring per round:

* **mod 2**32** (:data:`NARROW_MODULUS_BITS`, Flower's ``modulus_range``) when
  the survivors' sums fit (``n * (2**bits - 1) < 2**32``: 1,024 workers at the
  default 22 bits; see :func:`choose_modulus_bits` for the clipped count and the
  integer entries). A residue is an ``int32`` word (two's complement: the word
  ``x`` stands for ``x mod 2**32``), and torch's ``int32`` ``add``/``sub``/``sum``
  wrap mod ``2**32``, so no reduction is ever needed, and a mask is 4 keystream
  bytes taken as they are: half the keystream and half the memory traffic of the
  48-bit ring. (C++ leaves signed overflow undefined; torch's kernels wrap, in
  their vectorized loops and their scalar tails, and ``tests/test_secagg_ring.py``
  checks it against Python integers on the installed build, so a build that did
  not would fail there rather than sum wrongly.)
* **mod 2**48** (:data:`MODULUS_BITS`) in ``int64`` otherwise, so that nothing
  overflows and a reduction is rare: a mask is a 64-bit keystream word shifted
  right by 16 bits (arithmetically), a value in ``[-2**47, 2**47)`` and uniform
  mod ``2**48``; thousands of them add to a reduced value (in ``[0, 2**48)``)
  within ``int64``, and one bitwise and at the end maps the sum, negative or
  not, to its residue.

A vector's dtype says its ring (``int32``: 32 bits, ``int64``: 48).
:func:`add_seeded_masks` expands up to 15 masks at a time into the rows of one
scratch matrix and sums them in one pass over the rows (see there).
"""

from __future__ import annotations

import math
import random
import secrets
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "FIELD_PRIME",
    "KEY_BYTES",
    "MODULUS_BITS",
    "MODULUS_MASK",
    "NARROW_MODULUS_BITS",
    "SHARE_BYTES",
    "ShareRejected",
    "add_masks",
    "add_seeded_masks",
    "agree",
    "associated_data",
    "choose_modulus_bits",
    "chunks",
    "combine_shares",
    "default_neighbours",
    "default_threshold",
    "dequantize_sum",
    "expand_mask",
    "from_bytes_tensor",
    "generate_key",
    "integer_delta_bound",
    "modulus_bits_of",
    "neighbour_graph",
    "open_sealed",
    "private_bytes",
    "public_bytes",
    "quantization_step",
    "quantize",
    "reduce",
    "residues",
    "ring_dtype",
    "seal",
    "split_secret",
    "split_secrets",
    "to_bytes_tensor",
]

#: The wide ring: masked vectors in the integers mod 2**MODULUS_BITS (int64 without overflow).
MODULUS_BITS = 48
MODULUS_MASK = (1 << MODULUS_BITS) - 1
#: The narrow ring (Flower's default modulus): residues as int32 words, wrapping.
NARROW_MODULUS_BITS = 32
#: The largest change of an integer entry (a batch norm's num_batches_tracked) a worker
#: masks, per ring: 2 * workers * bound must stay within the ring (signed sums).
_INTEGER_DELTA_BOUNDS = {NARROW_MODULUS_BITS: 1 << 20, MODULUS_BITS: 1 << 32}
#: The Mersenne prime 2**521 - 1: Shamir's field, larger than any 32-byte secret.
FIELD_PRIME = (1 << 521) - 1
#: Bytes of a field element (a share's y value), of a key or seed.
SHARE_BYTES = 66
KEY_BYTES = 32
_NONCE_BYTES = 12
#: Bytes of the AES key a mask's keystream is made with (AES-128; see _encryptor).
_PRG_KEY_BYTES = 16
#: Elements per slice of the elementwise passes (below torch's parallel grain, 32,768).
CHUNK = 32_000
#: Masks added to a reduced value before it must be reduced again (int64 headroom:
#: each is below 2**48 in magnitude).
_MASKS_PER_REDUCTION = 4096
#: Masks expanded together by add_seeded_masks (rows of its scratch matrix, below the vector).
_MASKS_PER_BATCH = 15
#: The most memory that scratch matrix takes (per thread); longer vectors go in column blocks.
_SCRATCH_BYTES = 16 << 20
_PROTOCOL = b"fedtensor-secagg+ v1"


class ShareRejected(ValueError):
    """An encrypted share failed authentication: altered, replayed or misdirected."""


# -- bytes on the wire ----------------------------------------------------------------------------


def to_bytes_tensor(data: bytes) -> torch.Tensor:
    """``data`` as a uint8 tensor (the wire carries tensors, not byte strings)."""
    return (
        torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if data
        else torch.empty(0, dtype=torch.uint8)
    )


def from_bytes_tensor(value: object, *, length: int | None = None) -> bytes:
    """The bytes a uint8 tensor carries; ``ValueError`` if it is not one (of ``length``)."""
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.dim() != 1:
        raise ValueError("expected a 1-D uint8 tensor of bytes")
    if length is not None and value.numel() != length:
        raise ValueError(f"expected {length} bytes, got {value.numel()}")
    return bytes(value.tolist())  # numpy is not a dependency; these are short


# -- the neighbour graph --------------------------------------------------------------------------


def default_neighbours(count: int) -> int:
    """``k = O(log n)``: ``2 * ceil(log2 n)`` neighbours, at most ``n - 1``."""
    if count < 2:
        return 0
    return min(count - 1, 2 * math.ceil(math.log2(count)))


def default_threshold(neighbours: int) -> int:
    """A strict majority of the neighbours: no two disjoint sets of honest workers
    can each reveal enough shares, so an aggregator cannot learn both the seed and
    the mask key of one worker (Bell et al., section 4)."""
    return neighbours // 2 + 1


def neighbour_graph(
    positions: Sequence[int], neighbours: int, seed: int
) -> dict[int, frozenset[int]]:
    """Each position's neighbours: a Harary graph on a seeded random ring.

    ``neighbours`` even: the ``neighbours / 2`` nearest on each side. Odd with an
    even number of positions: those of ``neighbours - 1`` and the one opposite.
    Odd with an odd number: rounded up to the next even. ``neighbours >= n - 1``:
    everyone. The relation is symmetric.
    """
    count = len(positions)
    ring = list(positions)
    random.Random(seed).shuffle(ring)
    if neighbours >= count - 1:
        return {p: frozenset(q for q in positions if q != p) for p in positions}
    offsets = set(range(1, neighbours // 2 + 1))
    if neighbours % 2:
        if count % 2 == 0:
            offsets.add(count // 2)
        else:
            offsets.add(neighbours // 2 + 1)
    graph: dict[int, set[int]] = {p: set() for p in positions}
    for place, position in enumerate(ring):
        for offset in offsets:
            for other in (ring[(place + offset) % count], ring[(place - offset) % count]):
                if other != position:
                    graph[position].add(other)
                    graph[other].add(position)
    return {position: frozenset(peers) for position, peers in graph.items()}


# -- keys -----------------------------------------------------------------------------------------


def generate_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


def agree(private: X25519PrivateKey, peer_public: bytes, purpose: str, round: int) -> bytes:
    """A 32-byte key both ends of a pair derive alike: X25519 then HKDF-SHA256.

    ``purpose`` (``"share encryption"`` or ``"pairwise mask"``) and ``round`` go in
    HKDF's ``info``: one Diffie-Hellman secret never keys two things.
    """
    shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    info = b"%s %s round %d" % (_PROTOCOL, purpose.encode(), round)
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


# -- authenticated encryption of shares -----------------------------------------------------------


def associated_data(round: int, sender: int, receiver: int, stage: str) -> bytes:
    """What a sealed share is bound to: a share moved to another context fails to open."""
    return b"%s|round=%d|from=%d|to=%d|stage=%s" % (
        _PROTOCOL,
        round,
        sender,
        receiver,
        stage.encode(),
    )


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """AES-256-GCM: a fresh random nonce, then the ciphertext and its tag."""
    nonce = secrets.token_bytes(_NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def open_sealed(key: bytes, sealed: bytes, associated: bytes) -> bytes:
    """The plaintext of :func:`seal`'s output; :class:`ShareRejected` if it is not authentic."""
    if len(sealed) < _NONCE_BYTES + 16:
        raise ShareRejected("a sealed share too short to hold a nonce and a tag")
    try:
        return AESGCM(key).decrypt(sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], associated)
    except InvalidTag:
        raise ShareRejected(
            "a share failed authentication (altered, replayed or misdirected)"
        ) from None


# -- Shamir secret sharing ------------------------------------------------------------------------


def split_secret(
    secret: int, xs: Sequence[int], threshold: int, *, prime: int = FIELD_PRIME
) -> dict[int, int]:
    """Shares of ``secret`` at the points ``xs`` (distinct, nonzero): ``{x: f(x)}``.

    ``f`` has degree ``threshold - 1``, constant term ``secret`` and coefficients
    drawn uniformly from the field by :mod:`secrets`.
    """
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} needs between 1 and {len(xs)} shares")
    if not 0 <= secret < prime:
        raise ValueError("the secret must be an element of the field")
    if len(set(xs)) != len(xs) or any(not 0 < x < prime for x in xs):
        raise ValueError("share points must be distinct nonzero field elements")
    coefficients = [secret] + [secrets.randbelow(prime) for _ in range(threshold - 1)]
    return {x: _evaluate(coefficients, x, prime) for x in xs}


def split_secrets(
    values: Sequence[int], xs: Sequence[int], threshold: int, *, prime: int = FIELD_PRIME
) -> list[list[int]]:
    """:func:`split_secret` of each of ``values`` at the same points: ``[[f(x) for x in xs]]``."""
    shares = [split_secret(value, xs, threshold, prime=prime) for value in values]
    return [[found[x] for x in xs] for found in shares]


def _evaluate(coefficients: Sequence[int], x: int, prime: int) -> int:
    value = 0
    for coefficient in reversed(coefficients):  # Horner
        value = (value * x + coefficient) % prime
    return value


def combine_shares(shares: Mapping[int, int], *, prime: int = FIELD_PRIME) -> int:
    """The secret (the polynomial at 0) from ``{x: y}`` shares, by Lagrange interpolation.

    Correct when at least the threshold's number of genuine shares are given;
    fewer give an unrelated field element (Shamir reveals nothing below it).
    """
    if not shares:
        raise ValueError("no shares to combine")
    secret = 0
    points = list(shares.items())
    for j, (x_j, y_j) in enumerate(points):
        numerator, denominator = 1, 1
        for m, (x_m, _) in enumerate(points):
            if m != j:
                numerator = numerator * x_m % prime
                denominator = denominator * (x_m - x_j) % prime
        secret = (secret + y_j * numerator * pow(denominator, -1, prime)) % prime
    return secret


# -- the ring -------------------------------------------------------------------------------------


def ring_dtype(modulus_bits: int) -> torch.dtype:
    """The dtype of a vector mod ``2**modulus_bits``: ``int32`` words or ``int64`` residues."""
    if modulus_bits == NARROW_MODULUS_BITS:
        return torch.int32
    if modulus_bits == MODULUS_BITS:
        return torch.int64
    raise ValueError(f"the ring is mod 2**{NARROW_MODULUS_BITS} or 2**{MODULUS_BITS}")


def modulus_bits_of(vector: torch.Tensor) -> int:
    """The ring a masked vector lives in, by its dtype (see the module)."""
    if vector.dtype == torch.int32:
        return NARROW_MODULUS_BITS
    if vector.dtype == torch.int64:
        return MODULUS_BITS
    raise ValueError(f"a masked vector is int32 or int64, not {vector.dtype}")


def integer_delta_bound(modulus_bits: int) -> int:
    """The largest change of an integer entry a worker may mask in this ring."""
    ring_dtype(modulus_bits)
    return _INTEGER_DELTA_BOUNDS[modulus_bits]


def choose_modulus_bits(workers: int, bits: int, entries: int = 0, integers: bool = False) -> int:
    """The narrowest ring in which the sums of ``workers`` inputs cannot wrap.

    Each input adds at most ``2**bits - 1`` per quantized entry, at most ``entries``
    to its clipped count, and (``integers``) an integer delta of at most
    :func:`integer_delta_bound` in magnitude (summed signed). 32 bits when all of
    those fit, else 48; ``ValueError`` when not even 48 do.
    """
    for modulus_bits in (NARROW_MODULUS_BITS, MODULUS_BITS):
        ring = 1 << modulus_bits
        if (
            workers * ((1 << bits) - 1) < ring
            and workers * entries < ring
            and (not integers or 2 * workers * _INTEGER_DELTA_BOUNDS[modulus_bits] < ring)
        ):
            return modulus_bits
    raise ValueError(
        f"the sums of {workers} workers' {bits}-bit updates overflow even the "
        f"{MODULUS_BITS}-bit ring: lower SecAggPlus(bits=...) or sample fewer workers"
    )


def residues(vector: torch.Tensor) -> torch.Tensor:
    """A masked vector's entries as their residues (``int64``, in ``[0, 2**modulus_bits)``)."""
    if modulus_bits_of(vector) == NARROW_MODULUS_BITS:
        return vector.to(torch.int64).bitwise_and_((1 << NARROW_MODULUS_BITS) - 1)
    return vector.bitwise_and(MODULUS_MASK)


# -- masks ----------------------------------------------------------------------------------------


def expand_mask(seed: bytes, count: int, modulus_bits: int = MODULUS_BITS) -> torch.Tensor:
    """``count`` integers uniform mod ``2**modulus_bits`` from a 32-byte seed (AES-128-CTR).

    32 bits: each is a 4-byte keystream word, an ``int32`` (uniform mod ``2**32``).
    48 bits: each is an 8-byte keystream word shifted right by ``64 - MODULUS_BITS``
    bits: in ``[-2**(MODULUS_BITS - 1), 2**(MODULUS_BITS - 1))``, ready to add (see
    the module).
    """
    dtype = ring_dtype(modulus_bits)
    if len(seed) != KEY_BYTES:
        raise ValueError("a mask seed has 32 bytes")
    if not count:
        return torch.zeros(0, dtype=dtype)
    width = count * dtype.itemsize
    stream = bytearray(width)
    _encryptor(seed).update_into(bytes(width), stream)
    mask = torch.frombuffer(stream, dtype=dtype, count=count)
    if modulus_bits == MODULUS_BITS:
        for part in chunks(count):
            mask[part].bitwise_right_shift_(64 - MODULUS_BITS)
    return mask


def _encryptor(seed: bytes) -> Any:
    # The key is used for this one stream only (fresh per round and pair): a zero nonce is safe.
    # AES-128 keyed by the seed's first 16 bytes (uniform, as the seed is): 128-bit security,
    # the level X25519 gives the whole protocol anyway, at 4 rounds fewer per block than
    # AES-256 (the keystreams are most of a worker's masking).
    return Cipher(algorithms.AES(seed[:_PRG_KEY_BYTES]), modes.CTR(bytes(16))).encryptor()


_scratch = threading.local()


def add_masks(vector: torch.Tensor, masks: Iterable[tuple[torch.Tensor, int]]) -> torch.Tensor:
    """``vector + sum(sign * mask)`` mod the ring of ``vector`` (its dtype), in place.

    48 bits: ``vector`` holds residues (``[0, 2**MODULUS_BITS)``); ``masks`` values
    of at most ``2**MODULUS_BITS`` in magnitude (:func:`expand_mask`'s, or residues).
    32 bits: ``int32`` words throughout, whose additions wrap.
    """
    modulus_bits_of(vector)
    for added, (mask, sign) in enumerate(masks, 1):
        _accumulate(vector, mask, sign)
        if added % _MASKS_PER_REDUCTION == 0:
            reduce(vector)
    return reduce(vector)


def add_seeded_masks(vector: torch.Tensor, seeds: Iterable[tuple[bytes, int]]) -> torch.Tensor:
    """:func:`add_masks` of ``expand_mask(seed, len(vector))`` for each ``(seed, sign)``,
    without keeping the masks.

    Up to :data:`_MASKS_PER_BATCH` masks at a time are expanded into the rows of one
    scratch matrix (per thread, at most :data:`_SCRATCH_BYTES`; longer vectors go in
    column blocks, each cipher's counter running on), under a copy of ``vector`` in row
    0 (subtracted masks come negated from the cipher itself, see :func:`_add_batch`);
    one shift and one sum over the rows then give the new ``vector``. A sum over rows
    runs faster than int64 ``add_`` (whose ``alpha`` multiply has no 64-bit vector
    instruction): 2.3 against 3.1 ms for 15 masks
    of 101,037 entries on one thread, the SecAgg+ masking of one worker at 100.
    """
    count = vector.numel()
    pending = [(seed, sign) for seed, sign in seeds]
    if any(len(seed) != KEY_BYTES for seed, _ in pending):
        raise ValueError("a mask seed has 32 bytes")
    modulus_bits_of(vector)
    for first in range(0, len(pending), _MASKS_PER_BATCH):
        # Each batch adds at most 15 values below 2**47 to residues: no int64 overflow
        # (int32 words wrap, which is their ring's arithmetic).
        batch = sorted(pending[first : first + _MASKS_PER_BATCH], key=lambda pair: pair[1] < 0)
        if count:
            _add_batch(vector, batch)
        reduce(vector)
    return vector if pending else reduce(vector)


def _add_batch(vector: torch.Tensor, batch: Sequence[tuple[bytes, int]]) -> None:
    """``vector`` plus the masks of ``batch`` (added seeds first, then subtracted ones)."""
    count = vector.numel()
    itemsize = vector.element_size()  # 4: the 32-bit ring's words; 8: the 48-bit ring's
    rows = len(batch) + 1
    block = min(count, max(1, _SCRATCH_BYTES // (itemsize * rows)))
    if torch.get_num_threads() != 1:
        block = min(block, CHUNK)  # off torch's thread pool (see chunks)
    zeros, ones, stream = _buffers(itemsize * block, itemsize * block * rows)
    written = memoryview(stream)
    encryptors = [_encryptor(seed) for seed, _ in batch]
    added = 1 + sum(1 for _, sign in batch if sign > 0)
    subtracted = rows - added
    for start in range(0, count, block):
        size = min(block, count - start)
        width = itemsize * size
        matrix = torch.frombuffer(stream, dtype=vector.dtype, count=rows * size).view(rows, size)
        piece = vector[start : start + size]
        # A subtracted mask's row is the keystream xor all ones, ~word. In int32, ~word =
        # -word - 1; in int64 its shift is ~(word >> 16) = -(word >> 16) - 1: negated for
        # free (the cipher xors its input) but for the 1 each, which row 0 adds back.
        torch.add(piece, subtracted, out=matrix[0])
        for row, encryptor in enumerate(encryptors, 1):
            source = zeros if row < added else ones
            encryptor.update_into(source[:width], written[row * width : (row + 1) * width])
        if itemsize == 8:
            matrix[1:].bitwise_right_shift_(64 - MODULUS_BITS)
        # int32: the sum wraps mod 2**32 (dtype given, or torch would widen it to int64).
        torch.sum(matrix, 0, dtype=vector.dtype, out=piece)


def _buffers(source_bytes: int, stream_bytes: int) -> tuple[memoryview, memoryview, bytearray]:
    """This thread's scratch: zero bytes, 0xff bytes (cipher inputs) and a stream buffer.

    A fresh buffer per call cost more than the cipher (its pages mapped and zeroed anew
    each time): they are kept per thread, grown when too small.
    """
    zeros: bytearray | None = getattr(_scratch, "zeros", None)
    if zeros is None or len(zeros) < source_bytes:
        zeros = _scratch.zeros = bytearray(source_bytes)
        _scratch.ones = bytearray(b"\xff" * source_bytes)
    stream: bytearray | None = getattr(_scratch, "stream", None)
    if stream is None or len(stream) < stream_bytes:
        stream = _scratch.stream = bytearray(stream_bytes)
    return memoryview(zeros), memoryview(_scratch.ones), stream


def _accumulate(vector: torch.Tensor, mask: torch.Tensor, sign: int) -> None:
    for part in chunks(vector.numel()):
        if sign > 0:
            vector[part].add_(mask[part])
        else:
            vector[part].sub_(mask[part])


def reduce(vector: torch.Tensor) -> torch.Tensor:
    """Every entry of ``vector`` mod ``2**MODULUS_BITS`` (in place); int32 words are
    residues mod ``2**32`` already."""
    if modulus_bits_of(vector) == NARROW_MODULUS_BITS:
        return vector
    for part in chunks(vector.numel()):
        vector[part].bitwise_and_(MODULUS_MASK)
    return vector


def chunks(count: int) -> Iterator[slice]:
    """Slices of at most :data:`CHUNK` elements covering ``range(count)``.

    Elementwise torch operations on fewer elements than torch's parallel grain run
    on the calling thread: a worker's many passes over an update then never wait
    on torch's thread pool, which on a machine busier than its cores stalls each
    pass for milliseconds (measured: 7 ms instead of 0.15 ms for 100,000 elements
    at a load of 8 on 2 cores). With one torch thread there is no pool to wait on, and
    the slices only add dispatch overhead (16% of the masking at rest): one slice then.
    """
    if torch.get_num_threads() == 1:
        return iter((slice(0, count),))
    return (slice(start, min(start + CHUNK, count)) for start in range(0, count, CHUNK))


# -- quantization ---------------------------------------------------------------------------------


def quantization_step(clip: float, bits: int) -> float:
    """The distance between two neighbouring quantized values."""
    return 2 * clip / ((1 << bits) - 1)


def quantize(
    vector: torch.Tensor,
    clip: float,
    bits: int,
    generator: torch.Generator | None = None,
    *,
    ratio: float = 1.0,
    out: torch.Tensor | None = None,
    overwrite: bool = False,
) -> tuple[torch.Tensor, int]:
    """``vector`` clipped to ``[-clip, clip]``, times ``ratio``, stochastically rounded to
    ``[0, 2**bits - 1]``.

    Returns the levels (in ``out`` if given: a 1-D ``int64`` tensor of ``vector``'s
    size, or ``int32`` for the 32-bit ring with ``bits <= 31``; else ``int64``) and how
    many entries were clipped (before the scaling: ``clip`` bounds the worker's own
    update). ``ratio`` in ``[0, 1]``: the worker's weight over the round's largest
    (see the module); a scaled entry stays in ``[-clip, clip]``. ``generator``: where
    the rounding's randomness comes from (reproducible); by default AES-128-CTR under
    a fresh key from :mod:`secrets`. ``overwrite``: ``vector`` is a contiguous float64
    scratch the caller gives up, used in place of a copy. Each 800 kB buffer spared is
    page faults spared (0.2 ms for 100,000 entries).
    """
    levels = (1 << bits) - 1
    count = vector.numel()
    if not (math.isfinite(ratio) and 0 <= ratio <= 1):
        raise ValueError(f"ratio must be in [0, 1], not {ratio!r}")
    if out is None:
        out = torch.empty(count, dtype=torch.int64)
    elif out.dtype not in (torch.int64, torch.int32) or out.shape != (count,):
        raise ValueError(f"out must be a 1-D int64 or int32 tensor of {count} entries")
    if out.dtype == torch.int32 and bits > 31:
        raise ValueError("int32 levels hold at most 31 bits")
    clipped = 0
    # Uniforms in [-1/2, 1/2) on a grid of 2**-24 (as torch.rand's float32 ones): a
    # rounding's probability off by at most 2**-24 of a level.
    noise = _rounding_noise(count, generator)
    in_place = overwrite and vector.dtype == torch.float64 and vector.is_contiguous()
    flat = vector.reshape(-1)
    scale = levels / (2 * clip)
    for part in chunks(count):
        # The caller's values only if it gave them up.
        values = flat[part] if in_place else flat[part].to(torch.float64, copy=True)
        low, high = torch.aminmax(values)
        if not (float(low) >= -clip and float(high) <= clip):
            # Some beyond the range (the rare case: one pass when none is, three more when
            # some are). |values| > clip, counted in out's memory (not yet written) as
            # float64 scratch where it is int64, then clamped.
            magnitude = (
                torch.abs(values, out=out[part].view(torch.float64))
                if out.dtype == torch.int64
                else values.abs()
            )
            clipped += int(magnitude.gt_(clip).sum())
            values.clamp_(-clip, clip)
        # floor(scaled + u), u uniform in [0, 1), is floor(scaled) + 1 with the probability
        # of scaled's fraction: unbiased, an error below one level, in two passes (adding,
        # truncating: scaled >= 0) where rounding and comparing took four.
        # (ratio * values + clip) * scale + 1/2: at -clip exactly 1/2, so never below 0
        # with noise; the weight costs no pass of its own (it joins the scale).
        values.mul_(scale * ratio).add_(clip * scale + 0.5)
        values.add_(noise[part], alpha=2.0**-24)
        if bits > 24:
            # float64 rounding of scaled + u could pass `levels` above 2**27 levels (its
            # error, a few levels * 2**-53, then nears the noise's margin of 2**-24).
            values.clamp_max_(levels)
        out[part].copy_(values)
    return out, clipped


def _rounding_noise(count: int, generator: torch.Generator | None) -> torch.Tensor:
    """``count`` integers uniform in ``[-2**23, 2**23)``: from ``generator`` if given, else
    from AES-128-CTR under a fresh key from :mod:`secrets` (3x faster than torch.rand's
    Mersenne twister, 0.1 against 0.3 ms for 100,000, and unpredictable)."""
    if generator is not None:
        return torch.randint(-(1 << 23), 1 << 23, (count,), generator=generator, dtype=torch.int32)
    zeros, _, stream = _buffers(4 * count, 4 * count)
    if not count:
        return torch.zeros(0, dtype=torch.int32)
    _encryptor(secrets.token_bytes(KEY_BYTES)).update_into(zeros[: 4 * count], stream)
    noise = torch.frombuffer(stream, dtype=torch.int32, count=count)
    for part in chunks(count):
        noise[part].bitwise_right_shift_(8)
    return noise


def dequantize_sum(total: torch.Tensor, clip: float, bits: int, count: int) -> torch.Tensor:
    """The float64 sum of ``count`` inputs from the integer sum of their quantized vectors.

    Each level ``q`` stands for ``q * step - clip``; a sum of ``count`` of them for
    ``sum * step - clip * count``. ``total``: residues (``int64``) or the 32-bit ring's
    ``int32`` words (read as residues). With ratios, what comes back is
    ``sum(ratio_i * x_i)``: divide by ``sum(ratio_i)`` for the weighted average.
    """
    if total.dtype == torch.int32:
        total = residues(total)
    return total.to(torch.float64) * quantization_step(clip, bits) - clip * count
