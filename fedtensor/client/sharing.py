"""Fixed precision and additive secret sharing, PySyft 0.2 style: the client's side.

Theory of operation
-------------------
**Fixed precision.** :class:`FixedPrecisionTensor` holds a float tensor as int64 ring
values ``round(x * 10**p)`` (base 10 and ``precision_fractional=3`` by default, as
PySyft's ``fix_precision()``). ``+`` and ``-`` act on the ring values; ``*`` and ``@``
multiply them and divide the product by ``10**p`` (truncation, flooring); results are
exact up to that rounding, ``10**-p`` per operation. Ring values wrap modulo 2^64, so
magnitudes must stay below about ``2**63 / 10**(2p)`` through a product.

**Sharing.** ``share(bob, alice, crypto_provider=charlie)`` splits the ring values into
one share per worker (:mod:`fedtensor.protocol.ring`: all but one uniformly random over
Z/2^64 from ``os.urandom``, drawn here by the client, which owns the secret) and sends
each to its worker: an :class:`AdditiveSharingTensor` (a :class:`SyncAdditiveSharingTensor`
for :mod:`fedtensor.sync`'s blocking workers) holding one pointer per worker. Each
worker holds an int64 tensor that alone says nothing about the secret.

- ``+``, ``-``, negation, ``sum`` and products with public values are torch operations
  on each share, queued at once (pipelined, no round trip); a public addend goes to the
  first share only.
- ``*`` and ``@`` of two shared tensors use a Beaver triple (``a``, ``b``, ``c = a*b``)
  from the crypto provider (:mod:`fedtensor.worker.sharing`): its shares are *moved*
  from the provider to the parties (:func:`fedtensor.client.transfer.transfer`: worker
  to worker with a one-time capability between worker processes; between in-process
  workers through this process, where everything is anyway). Each party computes
  ``e_i = x_i - a_i`` and ``f_i = y_i - b_i``; the client opens ``e`` and ``f`` (they
  are masked by the random ``a`` and ``b``, so they say nothing of ``x`` and ``y``:
  PySyft 0.2 opened them through its local worker too) and sends them back with the
  command that makes each party's share ``c_i + e*b_i + a_i*f`` (plus ``e*f`` for the
  first). One round trip per multiplication.
- A product of fixed-precision values carries ``10**(2p)``: it is truncated on the
  shares without interaction, SecureML's two-party trick (party 0 floors
  ``z_0 / 10**p``, party 1 takes ``-floor(-z_1 / 10**p)``). The result is off by at most
  one unit in the last place, and wrong with probability about ``|z| / 2**63`` (tiny for
  values far below the ring's size): accepted, as SecureML and PySyft did. So products
  of fixed-precision shared tensors need exactly two parties; integer products any number.
- ``get()`` fetches every share, adds them modulo 2^64 and drops the pointers (each share
  is freed on its worker once no other shared tensor uses it): a
  :class:`FixedPrecisionTensor` (``.float_precision()`` gives floats) or, for a shared
  integer tensor, the integers.

**Comparisons** (``x < y``, ``>``, ``<=``, ``>=``, ``==``, ``!=`` with a shared or public
``y``; ``lt`` ... ``ne`` awaited in the async API) are the sign bit of ``x - y`` (``==``:
neither sign), computed on the two parties' shares with the crypto provider's help
(:func:`_negative`): the shares are added as bits by a Kogge-Stone adder whose AND gates
use binary Beaver triples, then the top bit, XOR-shared, is made additive with a random
bit the provider shares both ways.
Exact (no error probability), two share holders, eight openings (each of values masked
by fresh randomness) and eight triples. PySyft 0.2 used SecureNN's protocols instead;
what a party sees is the same: masked values only. ``max()`` is a tournament of
comparisons and selections (``b + (a > b) * (a - b)``), log2(n) rounds.

Sharing a model's parameters, ``argmax``, division and ``share()`` of a pointer are not
implemented.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from fedtensor.client.pointer import call_on
from fedtensor.client.transfer import transfer
from fedtensor.errors import FedTensorError, LocationError
from fedtensor.protocol.ring import split

if TYPE_CHECKING:
    from fedtensor.client.handles import WorkerHandle

__all__ = [
    "AdditiveSharingTensor",
    "FixedPrecisionTensor",
    "SyncAdditiveSharingTensor",
    "fix_precision",
    "share",
]

#: A share: a pointer (:class:`fedtensor.client.pointer.PointerBase`) to an int64 tensor,
#: used through torch's own functions (``torch.add(x, y)``), which pointers take through
#: ``__torch_function__``, invisibly to the type checker: hence ``Any``.
Share = Any

#: PySyft's default number of decimal digits kept after the point.
DEFAULT_PRECISION = 3


def fix_precision(
    tensor: torch.Tensor, precision_fractional: int = DEFAULT_PRECISION
) -> FixedPrecisionTensor:
    """``tensor`` as fixed-precision ring values ``round(x * 10**precision_fractional)``."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"fix_precision takes a torch.Tensor, not {type(tensor).__name__}")
    if type(precision_fractional) is not int or not 0 <= precision_fractional <= 9:
        raise ValueError("precision_fractional is an int from 0 to 9")
    dtype = tensor.dtype if tensor.dtype.is_floating_point else torch.get_default_dtype()
    ring = _encode(tensor, precision_fractional)
    return FixedPrecisionTensor(ring, precision_fractional, dtype)


def _encode(value: Any, precision: int) -> torch.Tensor:
    """A public value (number, tensor) as ring values at ``precision``."""
    if isinstance(value, FixedPrecisionTensor):
        if value.precision_fractional != precision:
            raise ValueError(
                f"fixed-precision tensors of precision {value.precision_fractional} and "
                f"{precision} do not mix"
            )
        return value.ring
    if isinstance(value, int | float):
        value = torch.tensor(value)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"a {type(value).__name__} is not a number or tensor")
    if value.is_complex():
        raise TypeError("complex tensors have no fixed-precision form")
    scaled = value.to(torch.float64) * _scale(precision)
    if not bool(torch.isfinite(scaled).all()) or bool((scaled.abs() >= 2.0**62).any()):
        raise ValueError("a value too large (or not finite) for the fixed-precision ring")
    return scaled.round().to(torch.int64)


def _scale(precision: int) -> int:
    return int(10**precision)


def _truncate(ring: torch.Tensor, precision: int) -> torch.Tensor:
    return torch.div(ring, _scale(precision), rounding_mode="floor")


class FixedPrecisionTensor:
    """A tensor held as int64 ring values ``round(x * 10**precision_fractional)``."""

    __slots__ = ("dtype", "precision_fractional", "ring")

    base = 10

    def __init__(
        self, ring: torch.Tensor, precision_fractional: int, dtype: torch.dtype = torch.float32
    ) -> None:
        if ring.dtype != torch.int64:
            raise TypeError(f"ring values are int64, not {ring.dtype}")
        self.ring = ring
        self.precision_fractional = precision_fractional
        self.dtype = dtype

    @property
    def shape(self) -> torch.Size:
        return self.ring.shape

    def float_precision(self) -> torch.Tensor:
        """The values as floats again (PySyft's ``float_precision()``)."""
        return (self.ring.to(torch.float64) / _scale(self.precision_fractional)).to(self.dtype)

    float_prec = float_precision  # PySyft's short name

    def _new(self, ring: torch.Tensor) -> FixedPrecisionTensor:
        return FixedPrecisionTensor(ring, self.precision_fractional, self.dtype)

    def __add__(self, other: Any) -> FixedPrecisionTensor:
        return self._new(self.ring + _encode(other, self.precision_fractional))

    __radd__ = __add__

    def __sub__(self, other: Any) -> FixedPrecisionTensor:
        return self._new(self.ring - _encode(other, self.precision_fractional))

    def __rsub__(self, other: Any) -> FixedPrecisionTensor:
        return self._new(_encode(other, self.precision_fractional) - self.ring)

    def __neg__(self) -> FixedPrecisionTensor:
        return self._new(-self.ring)

    def __mul__(self, other: Any) -> FixedPrecisionTensor:
        product = self.ring * _encode(other, self.precision_fractional)
        return self._new(_truncate(product, self.precision_fractional))

    __rmul__ = __mul__

    def __matmul__(self, other: Any) -> FixedPrecisionTensor:
        product = torch.matmul(self.ring, _encode(other, self.precision_fractional))
        return self._new(_truncate(product, self.precision_fractional))

    def __rmatmul__(self, other: Any) -> FixedPrecisionTensor:
        product = torch.matmul(_encode(other, self.precision_fractional), self.ring)
        return self._new(_truncate(product, self.precision_fractional))

    mul = __mul__
    matmul = mm = __matmul__
    add = __add__
    sub = __sub__

    def sum(self, *args: Any, **kwargs: Any) -> FixedPrecisionTensor:
        return self._new(self.ring.sum(*args, **kwargs))

    def share(
        self, *workers: WorkerHandle, crypto_provider: WorkerHandle | None = None
    ) -> AdditiveSharingTensor | SyncAdditiveSharingTensor:
        """Split into one random share per worker (see the module's header)."""
        return _share(self.ring, workers, crypto_provider, self.precision_fractional, self.dtype)

    def __repr__(self) -> str:
        return (
            f"FixedPrecisionTensor(precision_fractional={self.precision_fractional}, "
            f"{self.float_precision()!r})"
        )


def share(
    tensor: torch.Tensor | FixedPrecisionTensor,
    *workers: WorkerHandle,
    crypto_provider: WorkerHandle | None = None,
) -> AdditiveSharingTensor | SyncAdditiveSharingTensor:
    """Secret-share an integer tensor (or a :class:`FixedPrecisionTensor`) over ``workers``."""
    if isinstance(tensor, FixedPrecisionTensor):
        return tensor.share(*workers, crypto_provider=crypto_provider)
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"share takes a torch.Tensor, not {type(tensor).__name__}")
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(
            "only integer tensors are shared as they are: call fix_precision() first "
            "(x.fix_precision().share(bob, alice, crypto_provider=charlie))"
        )
    return _share(tensor.to(torch.int64), workers, crypto_provider, None, torch.int64)


def _share(
    ring: torch.Tensor,
    workers: Sequence[WorkerHandle],
    crypto_provider: WorkerHandle | None,
    precision: int | None,
    dtype: torch.dtype,
) -> AdditiveSharingTensor | SyncAdditiveSharingTensor:
    if len(workers) < 2:
        raise ValueError("secret sharing needs at least two workers")
    if len({id(worker) for worker in workers}) != len(workers):
        raise ValueError("each worker may hold only one share")
    if crypto_provider is not None and any(worker is crypto_provider for worker in workers):
        raise ValueError("the crypto provider must not be one of the share holders")
    blocking = {bool(getattr(worker, "_blocking", False)) for worker in workers}
    if len(blocking) != 1:
        raise TypeError("share over workers of one API: all blocking (fedtensor.sync) or none")
    pointers = [
        worker.client.store(part)
        for worker, part in zip(workers, split(ring, len(workers)), strict=True)
    ]
    cls = SyncAdditiveSharingTensor if blocking.pop() else AdditiveSharingTensor
    return cls(pointers, crypto_provider, precision, dtype)


class SharedBase:
    """What both APIs' shared tensors have; see :class:`AdditiveSharingTensor`."""

    __slots__ = ("crypto_provider", "dtype", "precision_fractional", "shares")

    def __init__(
        self,
        shares: Sequence[Share],
        crypto_provider: WorkerHandle | None,
        precision_fractional: int | None,
        dtype: torch.dtype,
    ) -> None:
        #: One pointer per party, to that party's int64 share.
        self.shares: tuple[Share, ...] = tuple(shares)
        self.crypto_provider = crypto_provider
        self.precision_fractional = precision_fractional
        self.dtype = dtype

    @property
    def locations(self) -> list[WorkerHandle]:
        return [pointer.location for pointer in self.shares]

    @property
    def shape(self) -> torch.Size | None:
        return self.shares[0].shape if self.shares else None

    def __repr__(self) -> str:
        where = ", ".join(str(getattr(location, "id", "?")) for location in self.locations)
        precision = (
            "" if self.precision_fractional is None else f" fixed p={self.precision_fractional}"
        )
        return f"<{type(self).__name__}{precision} shares on {where}>"

    def __bool__(self) -> bool:
        raise TypeError("the truth value of a shared tensor needs it reconstructed: get() it")

    def _new(self, shares: Sequence[Share]) -> Any:
        return type(self)(shares, self.crypto_provider, self.precision_fractional, self.dtype)

    def _live(self) -> tuple[Share, ...]:
        if not self.shares:
            raise FedTensorError("this shared tensor was already consumed by get()")
        return self.shares

    def _public(self, value: Any) -> torch.Tensor:
        """A public operand as ring values of this tensor's kind."""
        if self.precision_fractional is not None:
            return _encode(value, self.precision_fractional)
        if isinstance(value, FixedPrecisionTensor):
            raise TypeError("a shared integer tensor and a fixed-precision tensor do not mix")
        tensor = torch.as_tensor(value)
        if tensor.is_floating_point() or tensor.is_complex():
            raise TypeError("a shared integer tensor takes integer operands only")
        return tensor.to(torch.int64)

    def _paired(self, other: SharedBase) -> list[tuple[Share, Share]]:
        mine, theirs = self._live(), other._live()
        if [id(x.location) for x in mine] != [id(y.location) for y in theirs]:
            raise LocationError(
                "shared tensors in one operation must be shared over the same workers"
            )
        if self.precision_fractional != other.precision_fractional:
            raise ValueError("shared tensors of different fixed precisions do not mix")
        return list(zip(mine, theirs, strict=True))

    # -- local operations: one torch operation per share, queued at once --------------------

    def __add__(self, other: Any) -> Any:
        if isinstance(other, SharedBase):
            return self._new([torch.add(x, y) for x, y in self._paired(other)])
        first, *rest = self._live()
        # A public addend is added once, to the first share; the others are kept (shared
        # by both tensors: each pointer frees its share when the last user drops it).
        return self._new([torch.add(first, self._public(other)), *rest])

    __radd__ = __add__

    def __sub__(self, other: Any) -> Any:
        if isinstance(other, SharedBase):
            return self._new([torch.sub(x, y) for x, y in self._paired(other)])
        first, *rest = self._live()
        return self._new([torch.sub(first, self._public(other)), *rest])

    def __rsub__(self, other: Any) -> Any:
        return (-self) + other

    def __neg__(self) -> Any:
        return self._new([torch.neg(x) for x in self._live()])

    add = __add__
    sub = __sub__

    def sum(self, *args: Any, **kwargs: Any) -> Any:
        """The sum (``dim`` and ``keepdim`` as torch's), shared the same way."""
        return self._new([torch.sum(x, *args, **kwargs) for x in self._live()])

    def _scale_by_public(self, other: Any) -> Any:
        """A product with a public value: each share times it, truncated if fixed point."""
        if isinstance(other, int) and not isinstance(other, bool):
            return self._new([torch.mul(x, other) for x in self._live()])
        ring = self._public(other)
        return self._truncated([torch.mul(x, ring) for x in self._live()])

    def _truncated(self, shares: list[Share]) -> Any:
        precision = self.precision_fractional
        if precision is None or precision == 0:
            return self._new(shares)
        if len(shares) != 2:
            raise FedTensorError(
                "a product of fixed-precision shared tensors is truncated with the two-party "
                f"trick: it needs exactly two share holders, not {len(shares)}"
            )
        scale = 10**precision
        first = torch.div(shares[0], scale, rounding_mode="floor")
        second = torch.neg(torch.div(torch.neg(shares[1]), scale, rounding_mode="floor"))
        return self._new([first, second])

    # -- products of two shared tensors: Beaver triples (one round trip) ---------------------

    def _provider(self, other: SharedBase | None = None) -> WorkerHandle:
        provider = self.crypto_provider or (other.crypto_provider if other is not None else None)
        if provider is None:
            raise FedTensorError(
                "a product or comparison of shared tensors needs a crypto provider: "
                "share(..., crypto_provider=worker)"
            )
        if any(location is provider for location in self.locations):
            raise ValueError("the crypto provider must not be one of the share holders")
        return provider

    async def _beaver(self, other: SharedBase, op: str, timeout: float | None) -> Any:
        pairs = self._paired(other)
        provider = self._provider(other)
        shape_x, shape_y = pairs[0][0].shape, pairs[0][1].shape
        if shape_x is None or shape_y is None:
            raise FedTensorError("the shapes of shared tensors must be known to multiply them")
        function = torch.mul if op == "mul" else torch.matmul
        shape_z = tuple(
            function(torch.empty(shape_x, device="meta"), torch.empty(shape_y, device="meta")).shape
        )
        moved = await _dealt(provider, op, tuple(shape_x), tuple(shape_y), self.locations, timeout)
        triples = [_unpack(flat, tuple(shape_x), tuple(shape_y), shape_z) for flat in moved]
        # Open e = x - a and f = y - b: masked by the random a and b, they are safe to see.
        e, f = await asyncio.gather(
            _open(
                [torch.sub(x, a) for (x, _), (a, _, _) in zip(pairs, triples, strict=True)], timeout
            ),
            _open(
                [torch.sub(y, b) for (_, y), (_, b, _) in zip(pairs, triples, strict=True)], timeout
            ),
        )
        shares = []
        for index, (a, b, c) in enumerate(triples):
            z = torch.add(torch.add(c, function(e, b)), function(a, f))
            if index == 0:
                z = torch.add(z, function(e, f))
            shares.append(z)
        return self._truncated(shares)

    # -- comparisons: the sign bit, with the crypto provider's help ---------------------------

    async def _sign_bit(self, timeout: float | None) -> Any:
        """Shares of ``1`` where this tensor is negative, else ``0``, of this tensor's kind."""
        shares = self._live()
        if len(shares) != 2:
            raise FedTensorError(
                f"comparisons of shared tensors need exactly two share holders, not {len(shares)}"
            )
        shape = shares[0].shape
        if shape is None:
            raise FedTensorError("the shapes of shared tensors must be known to compare them")
        bits = await _negative(shares, tuple(shape), self._provider(), self.locations, timeout)
        if self.precision_fractional:  # a fixed-precision 0/1
            bits = [torch.mul(bit, _scale(self.precision_fractional)) for bit in bits]
        return self._new(bits)

    async def _compare(self, other: Any, op: str, timeout: float | None) -> Any:
        difference = self - other
        if op in ("gt", "le"):
            difference = -difference
        if op in ("eq", "ne"):
            # x == y exactly when neither x < y nor x > y: two sign bits, no product.
            below, above = await asyncio.gather(
                difference._sign_bit(timeout), (-difference)._sign_bit(timeout)
            )
            unequal = below + above
            return 1 - unequal if op == "eq" else unequal
        negative = await difference._sign_bit(timeout)  # lt: x - y < 0; gt: y - x < 0
        return negative if op in ("lt", "gt") else 1 - negative

    async def _max(self, timeout: float | None) -> Any:
        """The largest element: a tournament of comparisons, log2(n) rounds."""
        current = self._new([torch.reshape(share, (-1,)) for share in self._live()])
        count = math.prod(self.shape or ())
        if count == 0:
            raise ValueError("max() of an empty shared tensor")
        while count > 1:
            half = count // 2
            left = current._new([share[0:half] for share in current.shares])
            right = current._new([share[half : 2 * half] for share in current.shares])
            rest = [share[2 * half : count] for share in current.shares]
            bigger = await left._compare(right, "gt", timeout)
            winners = right + await bigger._beaver(left - right, "mul", timeout)
            current = current._new(
                [
                    torch.cat([won, left_over])
                    for won, left_over in zip(winners.shares, rest, strict=True)
                ]
            )
            count = half + count % 2
        return current._new([torch.reshape(share, ()) for share in current.shares])

    async def _reconstruct(self, timeout: float | None) -> Any:
        shares, self.shares = self._live(), ()
        values = await asyncio.gather(
            *(pointer._fetch(free=False, timeout=timeout) for pointer in shares)
        )
        del shares  # each share is freed on its worker once no other shared tensor uses it
        total = values[0].clone()
        for value in values[1:]:
            total += value  # modulo 2^64
        if self.precision_fractional is None:
            return total
        return FixedPrecisionTensor(total, self.precision_fractional, self.dtype)


async def _dealt(
    provider: WorkerHandle,
    op: str,
    shape_x: tuple[int, ...],
    shape_y: tuple[int, ...],
    locations: Sequence[WorkerHandle],
    timeout: float | None,
) -> list[Share]:
    """A triple (:func:`fedtensor.worker.sharing.beaver_triple`) made on ``provider``, one
    flat tensor of shares moved to each of ``locations``."""
    triple = call_on(
        provider.client,
        "fedtensor.beaver_triple",
        (op, list(shape_x), list(shape_y), len(locations)),
        {},
    )
    parts = [
        call_on(provider.client, "fedtensor.element", (triple, i), {})
        for i in range(len(locations))
    ]
    del triple  # released behind the element commands
    # Each party's shares go from the provider to that party, never here when both are
    # worker processes (fedtensor.client.transfer).
    moved: list[Share] = await asyncio.gather(
        *(
            transfer(part, location, keep=False, timeout=timeout)
            for part, location in zip(parts, locations, strict=True)
        )
    )
    return moved


def _unpack(
    flat: Share, shape_a: tuple[int, ...], shape_b: tuple[int, ...], shape_c: tuple[int, ...]
) -> tuple[Share, Share, Share]:
    """A party's ``a``, ``b``, ``c`` out of its flat share of a triple (on the worker)."""
    size_a, size_b = math.prod(shape_a), math.prod(shape_b)
    return (
        flat[0:size_a].reshape(shape_a),
        flat[size_a : size_a + size_b].reshape(shape_b),
        flat[size_a + size_b :].reshape(shape_c),
    )


async def _open(parts: Sequence[Share], timeout: float | None, *, xor: bool = False) -> Any:
    """The value of masked shares (freed): their sum modulo 2^64, or their XOR."""
    values = await asyncio.gather(*(part._fetch(free=True, timeout=timeout) for part in parts))
    total = values[0].clone()
    for value in values[1:]:
        if xor:
            total ^= value
        else:
            total += value
    return total


async def _and(
    xs: Sequence[Share],
    ys: Sequence[Share],
    flats: Sequence[Share],
    shape: tuple[int, ...],
    timeout: float | None,
) -> list[Share]:
    """XOR shares of ``x & y`` (bitwise) from XOR shares of ``x`` and ``y``: Beaver's
    trick over GF(2), with an ``"and"`` triple."""
    triples = [_unpack(flat, shape, shape, shape) for flat in flats]
    e, f = await asyncio.gather(
        _open([x ^ a for x, (a, _, _) in zip(xs, triples, strict=True)], timeout, xor=True),
        _open([y ^ b for y, (_, b, _) in zip(ys, triples, strict=True)], timeout, xor=True),
    )
    shares = []
    for index, (a, b, c) in enumerate(triples):
        z = torch.bitwise_xor(
            torch.bitwise_xor(c, torch.bitwise_and(e, b)), torch.bitwise_and(a, f)
        )
        if index == 0:
            z = torch.bitwise_xor(z, e & f)
        shares.append(z)
    return shares


#: The Kogge-Stone adder's strides over 64 bits.
_STRIDES = (1, 2, 4, 8, 16, 32)


async def _negative(
    shares: Sequence[Share],
    shape: tuple[int, ...],
    provider: WorkerHandle,
    locations: Sequence[WorkerHandle],
    timeout: float | None,
) -> list[Share]:
    """Additive shares of the sign bit of the two-party shared ``x0 + x1`` (1 if negative).

    The sign bit is the top bit of ``x0 + x1``: the parties add their shares as bits, each
    holding its own share as XOR shares ``(x0, 0)`` and ``(0, x1)``, with a Kogge-Stone
    adder (generate ``g = x0 & x1``, propagate ``p = x0 ^ x1``, six rounds of prefix
    combination, each one batched AND of two words). Then the bit, XOR-shared, becomes
    additively shared with a random bit ``r`` the provider shares both ways: ``c = b ^ r``
    is opened (masked by ``r``) and ``b = c + r - 2cr``. Every triple is dealt up front,
    concurrently. Eight openings in all, each masked by fresh randomness.
    """
    pair = (2, *shape)
    dealt = await asyncio.gather(
        _dealt(provider, "and", shape, shape, locations, timeout),
        *(_dealt(provider, "and", pair, pair, locations, timeout) for _ in _STRIDES),
        _dealt(provider, "bit", shape, (), locations, timeout),
    )
    x0, x1 = shares
    generate = await _and(
        [x0, torch.zeros_like(x1)], [torch.zeros_like(x0), x1], dealt[0], shape, timeout
    )
    propagate = list(shares)  # XOR shares of x0 ^ x1
    for stride, flats in zip(_STRIDES, dealt[1:-1], strict=True):
        left = [torch.stack([p, p]) for p in propagate]
        right = [
            torch.stack([g << stride, p << stride])
            for g, p in zip(generate, propagate, strict=True)
        ]
        both = await _and(left, right, flats, pair, timeout)
        generate = [g ^ z[0] for g, z in zip(generate, both, strict=True)]
        propagate = [z[1] for z in both]
    total = [p ^ (g << 1) for p, g in zip(shares, generate, strict=True)]  # XOR shares of x0 + x1
    bits = [(t >> 63) & 1 for t in total]
    size = math.prod(shape)
    random_bits = [(flat[0:size].reshape(shape), flat[size:].reshape(shape)) for flat in dealt[-1]]
    c = await _open([b ^ r for b, (r, _) in zip(bits, random_bits, strict=True)], timeout, xor=True)
    result = []
    for index, (_, r) in enumerate(random_bits):
        z = torch.sub(r, torch.mul(r, 2 * c))
        if index == 0:
            z = torch.add(z, c)
        result.append(z)
    return result


class AdditiveSharingTensor(SharedBase):
    """A tensor secret-shared over workers (async API); see the module's header.

    ``+``, ``-``, ``sum`` and products with public values need no ``await``;
    ``await x.mul(y)`` and ``await x.matmul(y)`` multiply two shared tensors;
    ``await x.get()`` reconstructs.
    """

    __slots__ = ()

    def __mul__(self, other: Any) -> Any:
        if isinstance(other, SharedBase):
            raise TypeError("multiplying two shared tensors is a round trip: await x.mul(y)")
        return self._scale_by_public(other)

    __rmul__ = __mul__

    def __matmul__(self, other: Any) -> Any:
        raise TypeError("a matmul of shared tensors is a round trip: await x.matmul(y)")

    async def mul(self, other: Any, *, timeout: float | None = None) -> Any:
        if isinstance(other, SharedBase):
            return await self._beaver(other, "mul", timeout)
        return self._scale_by_public(other)

    async def matmul(self, other: SharedBase, *, timeout: float | None = None) -> Any:
        return await self._beaver(other, "matmul", timeout)

    async def get(self, *, timeout: float | None = None) -> Any:
        """Reconstruct the secret: a :class:`FixedPrecisionTensor` or integers."""
        return await self._reconstruct(timeout)

    # Comparisons give shared 0/1 (of this tensor's kind); two share holders.

    async def lt(self, other: Any, *, timeout: float | None = None) -> Any:
        return await self._compare(other, "lt", timeout)

    async def gt(self, other: Any, *, timeout: float | None = None) -> Any:
        return await self._compare(other, "gt", timeout)

    async def le(self, other: Any, *, timeout: float | None = None) -> Any:
        return await self._compare(other, "le", timeout)

    async def ge(self, other: Any, *, timeout: float | None = None) -> Any:
        return await self._compare(other, "ge", timeout)

    async def eq(self, other: Any, *, timeout: float | None = None) -> Any:
        return await self._compare(other, "eq", timeout)

    async def ne(self, other: Any, *, timeout: float | None = None) -> Any:
        return await self._compare(other, "ne", timeout)

    async def max(self, *, timeout: float | None = None) -> Any:
        """The largest element, shared (a 0-d shared tensor)."""
        return await self._max(timeout)


class SyncAdditiveSharingTensor(SharedBase):
    """A tensor secret-shared over workers (blocking API of :mod:`fedtensor.sync`)."""

    __slots__ = ()

    def _block(self, coro: Any, timeout: float | None) -> Any:
        client = next((pointer._client for pointer in self.shares if pointer._client), None)
        if client is None:
            coro.close()
            raise FedTensorError("this shared tensor was already consumed by get()")
        return client.run_threadsafe(coro, timeout)

    def mul(self, other: Any, *, timeout: float | None = None) -> Any:
        if isinstance(other, SharedBase):
            return self._block(self._beaver(other, "mul", timeout), timeout)
        return self._scale_by_public(other)

    def matmul(self, other: SharedBase, *, timeout: float | None = None) -> Any:
        return self._block(self._beaver(other, "matmul", timeout), timeout)

    def __mul__(self, other: Any) -> Any:
        return self.mul(other)

    __rmul__ = __mul__

    def __matmul__(self, other: SharedBase) -> Any:
        return self.matmul(other)

    mm = matmul

    def get(self, *, timeout: float | None = None) -> Any:
        """Reconstruct the secret (blocks): a :class:`FixedPrecisionTensor` or integers."""
        return self._block(self._reconstruct(timeout), timeout)

    # Comparisons give shared 0/1 (of this tensor's kind); two share holders.

    def lt(self, other: Any, *, timeout: float | None = None) -> Any:
        return self._block(self._compare(other, "lt", timeout), timeout)

    def gt(self, other: Any, *, timeout: float | None = None) -> Any:
        return self._block(self._compare(other, "gt", timeout), timeout)

    def le(self, other: Any, *, timeout: float | None = None) -> Any:
        return self._block(self._compare(other, "le", timeout), timeout)

    def ge(self, other: Any, *, timeout: float | None = None) -> Any:
        return self._block(self._compare(other, "ge", timeout), timeout)

    def __lt__(self, other: Any) -> Any:
        return self.lt(other)

    def __gt__(self, other: Any) -> Any:
        return self.gt(other)

    def __le__(self, other: Any) -> Any:
        return self.le(other)

    def __ge__(self, other: Any) -> Any:
        return self.ge(other)

    def eq(self, other: Any, *, timeout: float | None = None) -> Any:
        return self._block(self._compare(other, "eq", timeout), timeout)

    def ne(self, other: Any, *, timeout: float | None = None) -> Any:
        return self._block(self._compare(other, "ne", timeout), timeout)

    def __eq__(self, other: object) -> Any:
        return self.eq(other)

    def __ne__(self, other: object) -> Any:
        return self.ne(other)

    __hash__ = SharedBase.__hash__

    def max(self, *, timeout: float | None = None) -> Any:
        """The largest element, shared (a 0-d shared tensor)."""
        return self._block(self._max(timeout), timeout)
