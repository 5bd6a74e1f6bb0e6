"""The ring of additive secret sharing, without I/O: shared by client and workers.

Theory of operation
-------------------
Secret-shared tensors (:mod:`fedtensor.client.sharing`) live in the ring of integers
modulo 2^64, held as torch int64 tensors: torch's int64 addition, subtraction,
multiplication and matmul wrap around (two's complement), which is exactly arithmetic
modulo 2^64. A secret is split into ``n`` shares that sum to it: ``n - 1`` of them
uniformly random over the whole ring, the last the secret minus their sum. Any ``n - 1``
shares are then uniform and independent of the secret: a party holding one learns
nothing. Comparisons also use binary shares (:func:`split_xor`): words whose XOR is
the secret, again all but one uniformly random.

The randomness is the operating system's CSPRNG (``os.urandom``) read as raw int64
words: uniform over all 2^64 values. torch's generators are not cryptographic and
``torch.randint`` cannot cover the whole int64 range, so neither is used.

Fixed precision (:func:`encode_fixed`) is here too, because both sides encode: the
client a tensor it owns, a worker one it holds (sharing a remote tensor's data,
:func:`fedtensor.worker.sharing.split_shares`). Values are ``round(x * 10**p)``;
magnitudes at or past 2^62 after scaling are refused, so that a sum of two stays
inside the ring.
"""

from __future__ import annotations

import math
import os

import torch

__all__ = ["MAX_PRECISION", "encode_fixed", "random_ring", "split", "split_xor"]

#: The most decimal digits a fixed-precision value keeps after the point.
MAX_PRECISION = 9


def random_ring(shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor of ``shape`` whose elements are uniform over the int64 ring (os.urandom)."""
    count = math.prod(shape)
    if count == 0:
        return torch.zeros(shape, dtype=torch.int64)
    words = torch.frombuffer(bytearray(os.urandom(8 * count)), dtype=torch.int64)
    return words.reshape(shape)


def split(value: torch.Tensor, parties: int) -> list[torch.Tensor]:
    """``parties`` shares of the int64 tensor ``value``: all but the last uniformly random,
    all summing to ``value`` modulo 2^64."""
    if value.dtype != torch.int64:
        raise TypeError(f"ring values are int64 tensors, not {value.dtype}")
    shares = [random_ring(tuple(value.shape)) for _ in range(parties - 1)]
    last = value.clone()
    for share in shares:
        last -= share  # int64 arithmetic wraps around: the ring Z/2^64
    return [*shares, last]


def split_xor(value: torch.Tensor, parties: int, *, bits: int = -1) -> list[torch.Tensor]:
    """``parties`` binary (XOR) shares of the int64 tensor ``value``: all but the last
    uniformly random in the bits of ``bits`` (all 64 by default; ``1`` for shares of
    0/1 values), all XORed together giving ``value``."""
    if value.dtype != torch.int64:
        raise TypeError(f"ring values are int64 tensors, not {value.dtype}")
    shares = [random_ring(tuple(value.shape)) & bits for _ in range(parties - 1)]
    last = value.clone()
    for share in shares:
        last ^= share
    return [*shares, last]


def encode_fixed(value: torch.Tensor, precision: int) -> torch.Tensor:
    """``value`` as fixed-precision ring values ``round(value * 10**precision)`` (int64).

    TypeError for a complex or non-tensor value, ValueError for a precision outside
    0..:data:`MAX_PRECISION` or a value too large (or not finite) for the ring.
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"a {type(value).__name__} is not a tensor")
    if value.is_complex():
        raise TypeError("complex tensors have no fixed-precision form")
    if type(precision) is not int or not 0 <= precision <= MAX_PRECISION:
        raise ValueError(f"precision_fractional is an int from 0 to {MAX_PRECISION}")
    scaled = value.detach().to(torch.float64) * float(10**precision)
    if not bool(torch.isfinite(scaled).all()) or bool((scaled.abs() >= 2.0**62).any()):
        raise ValueError("a value too large (or not finite) for the fixed-precision ring")
    return scaled.round().to(torch.int64)
