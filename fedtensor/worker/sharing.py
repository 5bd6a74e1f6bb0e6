"""The crypto provider's side of additive secret sharing: Beaver triples.

Theory of operation
-------------------
Shared tensors (:mod:`fedtensor.client.sharing`) are int64 tensors on the parties,
one share each, whose sum modulo 2^64 is the secret. Adding them needs nothing but
torch on each share; multiplying two of them needs a Beaver triple, made by a third
worker, the crypto provider: random ``a`` and ``b`` and ``c = a * b`` (or ``a @ b``),
each split into one share per party. Comparisons need binary triples (``c = a & b``,
shared by XOR) and random bits shared both by XOR and additively (``"and"``, ``"bit"``).
``fedtensor.beaver_triple(op, shape_x, shape_y, parties)`` makes one and returns a
tuple of ``parties`` flat int64 tensors, the concatenated shares ``(a_i, b_i, c_i)``
of party ``i``. The client takes each element out (``fedtensor.element``) and *moves*
it to its party (worker to worker, with a one-time capability between worker
processes: :mod:`fedtensor.client.transfer`), so the provider's shares never pass
through the client when the workers are processes.

Randomness comes from the operating system's CSPRNG (:mod:`fedtensor.protocol.ring`):
uniform over the whole ring, as the security of the shares needs. The provider
learns nothing about the secrets: it never receives a share of them.

**Sharing a tensor the worker holds** (PySyft's ``ptr.fix_precision().share(bob,
alice, crypto_provider=james)``, Part 10's secure aggregation): the data owner is this
worker, so the shares are drawn here. ``fedtensor.split_shares(tensor, parties,
precision)`` encodes the tensor as fixed precision (``precision`` an int; ``None``
for an integer tensor shared as it is) and returns ``parties`` int64 shares of it,
all but one uniform over the ring. The client keeps the element for this worker
here and *moves* each other element to its party, as it moves a triple's shares:
a share never passes through the client between worker processes, and no party but
this one (which holds the secret anyway) ever holds two shares.
:func:`split_bytes` sizes it for the worker's memory budget before it runs.

The arguments are checked before anything is allocated (the shapes through meta
tensors) and the triple's size is bounded by :data:`MAX_TRIPLE_ELEMENTS`, so a bad
request is refused with a clear error and the worker keeps serving.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fedtensor.protocol.ring import encode_fixed, random_ring, split, split_xor

__all__ = [
    "MAX_PARTIES",
    "MAX_TRIPLE_ELEMENTS",
    "beaver_triple",
    "split_bytes",
    "split_shares",
    "triple_bytes",
]

#: The most elements ``a``, ``b`` and ``c`` of one triple may have together.
MAX_TRIPLE_ELEMENTS = 1 << 24

#: The most parties one triple is split for.
MAX_PARTIES = 16

_OPS = {"mul": torch.mul, "matmul": torch.matmul}


def _shape(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, list | tuple) or not all(
        type(size) is int and size >= 0 for size in value
    ):
        raise TypeError(f"{what} is a list of non-negative ints")
    return tuple(value)


def beaver_triple(op: Any, shape_x: Any, shape_y: Any, parties: Any) -> tuple[torch.Tensor, ...]:
    """Shares of a Beaver triple for ``op`` of tensors of the shapes given: per party, one
    flat int64 tensor holding its shares of ``a``, ``b``, ``c``.

    ``"mul"`` and ``"matmul"``: ``c = a * b`` (``a @ b``), shared additively. ``"and"``:
    ``c = a & b`` bitwise, shared by XOR (the AND gates of a comparison). ``"bit"``: one
    random bit ``r`` per element of ``shape_x``, shared by XOR (as 0/1 shares) and
    additively: its ``a`` and ``b`` (no ``c``), for turning a shared bit arithmetic.
    """
    size_x, size_y, _ = _triple_shapes(op, shape_x, shape_y, parties)
    function = _OPS.get(op, torch.bitwise_and)
    if op == "bit":
        bit = random_ring(size_x) & 1
        shared: tuple[list[torch.Tensor], ...] = (
            split_xor(bit, parties, bits=1),
            split(bit, parties),
        )
    elif op == "and":
        a, b = random_ring(size_x), random_ring(size_y)
        shared = tuple(split_xor(value, parties) for value in (a, b, a & b))
    else:
        a, b = random_ring(size_x), random_ring(size_y)
        c = function(a, b)  # wraps around modulo 2^64, as the shares do
        shared = (split(a, parties), split(b, parties), split(c, parties))
    per_party = zip(*shared, strict=True)
    return tuple(torch.cat([part.reshape(-1) for part in parts]) for parts in per_party)


def _triple_shapes(
    op: Any, shape_x: Any, shape_y: Any, parties: Any
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """The shapes of ``a``, ``b`` and ``c`` of a triple, checked (ValueError)."""
    if op not in _OPS and op not in ("and", "bit"):
        raise ValueError(f"a Beaver triple is for 'mul', 'matmul', 'and' or 'bit', not {op!r}")
    if type(parties) is not int or not 2 <= parties <= MAX_PARTIES:
        raise ValueError(f"a Beaver triple is split for 2 to {MAX_PARTIES} parties")
    size_x, size_y = _shape(shape_x, "shape_x"), _shape(shape_y, "shape_y")
    if op == "bit":
        size_y = size_x
    function = _OPS.get(op, torch.bitwise_and)
    meta = torch.empty(size_x, device="meta"), torch.empty(size_y, device="meta")
    try:
        size_c = tuple(function(*meta).shape) if op != "bit" else (0,)
    except RuntimeError as error:
        raise ValueError(f"shapes {size_x} and {size_y} do not fit {op}: {error}") from None
    total = math.prod(size_x) + math.prod(size_y) + math.prod(size_c)
    if total * parties > MAX_TRIPLE_ELEMENTS:
        raise ValueError(
            f"a triple of {total} elements for {parties} parties is over the limit "
            f"of {MAX_TRIPLE_ELEMENTS} elements"
        )
    return tuple(size_x), tuple(size_y), size_c


def triple_bytes(op: Any, shape_x: Any, shape_y: Any, parties: Any) -> int:
    """What :func:`beaver_triple` allocates at its peak, at most: ``a``, ``b``, ``c`` and
    each party's shares of them, 8 bytes an element (ValueError for bad arguments)."""
    shapes = _triple_shapes(op, shape_x, shape_y, parties)
    return 8 * sum(math.prod(shape) for shape in shapes) * (int(parties) + 1)


def _split_arguments(value: Any, parties: Any, precision: Any) -> None:
    """Check :func:`split_shares`'s arguments (TypeError, ValueError)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"split_shares takes a tensor, not {type(value).__name__}")
    if type(parties) is not int or not 2 <= parties <= MAX_PARTIES:
        raise ValueError(f"a tensor is split into 2 to {MAX_PARTIES} shares")
    if precision is None:
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(
                "only integer tensors are shared as they are: fix_precision() first "
                "(ptr.fix_precision().share(bob, alice, crypto_provider=charlie))"
            )
    elif type(precision) is not int:
        raise TypeError("precision is an int or None")
    if value.numel() * parties > MAX_TRIPLE_ELEMENTS:
        raise ValueError(
            f"{value.numel()} elements in {parties} shares are over the limit of "
            f"{MAX_TRIPLE_ELEMENTS} elements"
        )


def split_shares(value: Any, parties: Any, precision: Any = None) -> tuple[torch.Tensor, ...]:
    """``parties`` additive int64 shares of ``value`` (fixed precision ``precision``, or an
    integer tensor as it is for ``None``); see the module's header."""
    _split_arguments(value, parties, precision)
    # encode_fixed: ValueError for a bad precision or a value too large for the ring
    ring = value.detach().to(torch.int64) if precision is None else encode_fixed(value, precision)
    return tuple(split(ring, parties))


def split_bytes(value: Any, parties: Any, precision: Any = None) -> int:
    """What :func:`split_shares` allocates at its peak, at most: the float64 scaling, the
    ring values and the shares, 8 bytes an element (TypeError, ValueError for bad
    arguments)."""
    _split_arguments(value, parties, precision)
    return 8 * int(value.numel()) * (int(parties) + 3)
