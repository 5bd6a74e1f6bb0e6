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
- **Division** (``x / d``, no round trip) is by a *public* divisor only, as PySyft 0.2's
  was: by whole numbers (an int, or floats and tensors of whole values) it is the same
  two-party truncation, by ``|d|`` instead of ``10**p`` (exact to one unit in the last
  place; for shared integers, one of the two nearest integers), then the sign; by any
  other float (fixed precision only) it is a product with ``1/d`` encoded at the
  tensor's precision, so off by up to ``|x| * 10**-p / 2`` besides. Division by a shared
  tensor is refused (TypeError): it would need a secure reciprocal.
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
With more than two holders the shares are added one after the other, one adder each.
Exact (no error probability), any number ``n`` of share holders, ``7(n - 1) + 1``
openings (each of values masked by fresh randomness) and as many triples. PySyft 0.2
used SecureNN's protocols instead (two parties); what a party sees is the same: masked
values only. ``max()``, ``max(dim=...)`` (torch's ``(values, indices)``) and
``argmax()`` are a tournament of neighbours, log2(n) rounds of one comparison and one
selection ``b + bit * (a - b)`` of values and indices together, by the shared *integer*
bit: no truncation, so exact with any number of holders; the indices are shared
integers, the first of a tie as torch's.

**Sharing a worker's tensor** (PySyft's Part 10: ``param.copy().fix_precision().share(bob,
alice, crypto_provider=james).get()`` on a remote model's parameter): ``fix_precision()``
of a pointer is a :class:`RemoteFixedPrecision`, and its ``share`` has the tensor's own
worker, the data owner, encode it and draw the shares (``fedtensor.split_shares``,
:mod:`fedtensor.worker.sharing`); it keeps its own share (when it is a holder) and each
other share is *moved* from it to its holder like a triple's (worker to worker between
processes). The client, which does not own the data, never holds a share; no holder but
the owner ever holds two. In :mod:`fedtensor.sync` that ``share`` returns a
:class:`SharedTensorPointer`, PySyft's pointer to the shared tensor (``get()`` gives
the :class:`SyncAdditiveSharingTensor`); in the async API ``await rfp.share(...)``
gives the :class:`AdditiveSharingTensor`.

Operands that are not shared the same way are refused with a clear error: shared
tensors over other workers (LocationError), of another precision (ValueError), a
pointer or anything but a number or tensor as a public operand (TypeError).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, overload

import torch

from fedtensor.client.modules import is_remote
from fedtensor.client.pointer import PointerBase, call_on
from fedtensor.client.transfer import transfer
from fedtensor.errors import FedTensorError, LocationError
from fedtensor.protocol.ring import encode_fixed, split

if TYPE_CHECKING:
    from fedtensor.client.handles import WorkerHandle

__all__ = [
    "AdditiveSharingTensor",
    "FixedPrecisionTensor",
    "RemoteFixedPrecision",
    "SharedTensorPointer",
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


@overload
def fix_precision(
    tensor: PointerBase, precision_fractional: int = DEFAULT_PRECISION
) -> RemoteFixedPrecision: ...


@overload
def fix_precision(
    tensor: torch.Tensor, precision_fractional: int = DEFAULT_PRECISION
) -> FixedPrecisionTensor: ...


def fix_precision(
    tensor: Any, precision_fractional: int = DEFAULT_PRECISION
) -> FixedPrecisionTensor | RemoteFixedPrecision:
    """``tensor`` as fixed-precision ring values ``round(x * 10**precision_fractional)``;
    for a pointer (or a remote model's parameter, typed as a tensor), a
    :class:`RemoteFixedPrecision`."""
    pointer = _pointer_of(tensor)
    if pointer is not None:
        if type(precision_fractional) is not int or not 0 <= precision_fractional <= 9:
            raise ValueError("precision_fractional is an int from 0 to 9")
        return RemoteFixedPrecision(pointer, precision_fractional)
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
    return encode_fixed(value, precision)


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
    tensor: Any,
    *workers: WorkerHandle,
    crypto_provider: WorkerHandle | None = None,
) -> Any:
    """Secret-share an integer tensor (or a :class:`FixedPrecisionTensor`) over ``workers``;
    a pointer's (or a :class:`RemoteFixedPrecision`'s) data is shared by its worker (see
    :meth:`RemoteFixedPrecision.share`)."""
    if isinstance(tensor, FixedPrecisionTensor | RemoteFixedPrecision):
        return tensor.share(*workers, crypto_provider=crypto_provider)
    pointer = _pointer_of(tensor)
    if pointer is not None:
        return RemoteFixedPrecision(pointer, None).share(*workers, crypto_provider=crypto_provider)
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"share takes a torch.Tensor, not {type(tensor).__name__}")
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(
            "only integer tensors are shared as they are: call fix_precision() first "
            "(x.fix_precision().share(bob, alice, crypto_provider=charlie))"
        )
    return _share(tensor.to(torch.int64), workers, crypto_provider, None, torch.int64)


def _checked_holders(workers: Sequence[WorkerHandle], crypto_provider: WorkerHandle | None) -> bool:
    """Check the share holders (ValueError, TypeError); whether they are blocking."""
    if len(workers) < 2:
        raise ValueError("secret sharing needs at least two workers")
    if len({id(worker) for worker in workers}) != len(workers):
        raise ValueError("each worker may hold only one share")
    if crypto_provider is not None and any(worker is crypto_provider for worker in workers):
        raise ValueError("the crypto provider must not be one of the share holders")
    blocking = {bool(getattr(worker, "_blocking", False)) for worker in workers}
    if len(blocking) != 1:
        raise TypeError("share over workers of one API: all blocking (fedtensor.sync) or none")
    return blocking.pop()


def _share(
    ring: torch.Tensor,
    workers: Sequence[WorkerHandle],
    crypto_provider: WorkerHandle | None,
    precision: int | None,
    dtype: torch.dtype,
) -> AdditiveSharingTensor | SyncAdditiveSharingTensor:
    blocking = _checked_holders(workers, crypto_provider)
    pointers = [
        worker.client.store(part)
        for worker, part in zip(workers, split(ring, len(workers)), strict=True)
    ]
    cls = SyncAdditiveSharingTensor if blocking else AdditiveSharingTensor
    return cls(pointers, crypto_provider, precision, dtype)


def _integral(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _pointer_of(value: Any) -> PointerBase | None:
    """The pointer behind a pointer or a remote model's parameter (or buffer), else None."""
    if isinstance(value, PointerBase):
        return value
    if is_remote(value):
        pointer: PointerBase = value.pointer
        return pointer
    return None


class RemoteFixedPrecision:
    """PySyft's ``ptr.fix_precision()``: a worker's tensor, to be shared as fixed precision.

    Nothing runs until it is shared or fetched: ``share(bob, alice,
    crypto_provider=james)`` has the tensor's worker, its data owner, encode and split
    it (``fedtensor.split_shares``, :mod:`fedtensor.worker.sharing`), keep its own
    share if it is a holder and *move* every other share to its holder, worker to worker
    (:func:`fedtensor.client.transfer.transfer`): no share passes through the client
    between worker processes. ``precision_fractional`` is ``None`` for an integer tensor
    shared as it is (``ptr.share(...)``).

    In :mod:`fedtensor.sync`, ``share`` blocks and returns a :class:`SharedTensorPointer`
    (PySyft's pointer to the shared tensor, whose ``get()`` gives it); in the async API
    ``await rfp.share(...)`` gives the :class:`AdditiveSharingTensor` itself.
    """

    __slots__ = ("pointer", "precision_fractional")

    def __init__(self, pointer: PointerBase, precision_fractional: int | None) -> None:
        self.pointer = pointer
        self.precision_fractional = precision_fractional

    @property
    def location(self) -> WorkerHandle:
        location: WorkerHandle = self.pointer.location
        return location

    @property
    def shape(self) -> torch.Size | None:
        return self.pointer.shape

    def __repr__(self) -> str:
        return f"<RemoteFixedPrecision p={self.precision_fractional} of {self.pointer!r}>"

    def _blocking(self) -> bool:
        return bool(getattr(self.location, "_blocking", False))

    def share(
        self,
        *workers: WorkerHandle,
        crypto_provider: WorkerHandle | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Share the remote tensor over ``workers`` (see the class)."""
        blocking = _checked_holders(workers, crypto_provider)
        dtype = self.pointer.dtype
        if self.precision_fractional is None and dtype is not None and not _integral(dtype):
            raise TypeError(
                "only integer tensors are shared as they are: call fix_precision() first "
                "(ptr.fix_precision().share(bob, alice, crypto_provider=charlie))"
            )
        if blocking != self._blocking():
            raise TypeError("share over workers of the pointer's API (fedtensor.sync or not)")
        coro = _share_remote(self, workers, crypto_provider, timeout)
        if not blocking:
            return coro
        client = self.pointer._client
        if client is None:
            coro.close()
            raise FedTensorError(f"{self.pointer!r} was already consumed by get()")
        return SharedTensorPointer(client.run_threadsafe(coro, timeout), self.location)

    def get(self, *, timeout: float | None = None) -> Any:
        """The tensor fetched (and freed remotely) as a :class:`FixedPrecisionTensor`
        (blocking API; ``await`` it in the async one)."""

        async def fetch() -> Any:
            value: torch.Tensor = await self.pointer._fetch(free=True, timeout=timeout)
            if self.precision_fractional is None:
                return value
            return fix_precision(value, self.precision_fractional)

        if not self._blocking():
            return fetch()
        client = self.pointer._client
        if client is None:
            raise FedTensorError(f"{self.pointer!r} was already consumed by get()")
        return client.run_threadsafe(fetch(), timeout)

    def float_precision(self) -> Any:
        """The pointer to the remote tensor again (it was never encoded there)."""
        return self.pointer

    float_prec = float_precision


async def _share_remote(
    remote: RemoteFixedPrecision,
    workers: Sequence[WorkerHandle],
    crypto_provider: WorkerHandle | None,
    timeout: float | None,
) -> Any:
    pointer, precision = remote.pointer, remote.precision_fractional
    client = pointer._client
    if client is None:
        raise FedTensorError(f"{pointer!r} was already consumed by get()")
    known = pointer.dtype
    dtype: torch.dtype
    if precision is None:
        dtype = torch.int64
    elif known is not None and known.is_floating_point:
        dtype = known
    else:
        dtype = torch.get_default_dtype()
    split_up = call_on(client, "fedtensor.split_shares", (pointer, len(workers), precision), {})
    parts = [call_on(client, "fedtensor.element", (split_up, i), {}) for i in range(len(workers))]
    del split_up  # released behind the element commands
    if pointer.shape is not None:  # known here: each share has the tensor's shape
        for part in parts:
            part._shape, part._dtype = tuple(pointer.shape), torch.int64
    owner = client.worker

    async def place(part: Share, worker: WorkerHandle) -> Share:
        if getattr(worker, "client", None) is client or worker is owner:
            return part  # the owner's own share stays where it was drawn
        # Every other share goes from the owner to its holder, never here between worker
        # processes (fedtensor.client.transfer).
        return await transfer(part, worker, keep=False, timeout=timeout)

    shares = await asyncio.gather(
        *(place(part, worker) for part, worker in zip(parts, workers, strict=True))
    )
    cls = SyncAdditiveSharingTensor if remote._blocking() else AdditiveSharingTensor
    return cls(shares, crypto_provider, precision, dtype)


class SharedTensorPointer:
    """PySyft's pointer to a shared tensor, made by sharing a remote tensor in
    :mod:`fedtensor.sync`: ``get()`` gives the :class:`SyncAdditiveSharingTensor` (its
    shares stay where they are; ``get()`` of that reconstructs)."""

    __slots__ = ("_shared", "location")

    def __init__(self, shared: Any, location: WorkerHandle) -> None:
        self._shared: Any = shared
        #: The worker whose tensor was shared.
        self.location = location

    def get(self) -> Any:
        shared, self._shared = self._shared, None
        if shared is None:
            raise FedTensorError("this pointer's shared tensor was already taken by get()")
        return shared

    def __repr__(self) -> str:
        return f"<SharedTensorPointer to {self._shared!r} from {getattr(self.location, 'id', '?')}>"


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
        if isinstance(value, PointerBase | RemoteFixedPrecision) or is_remote(value):
            raise TypeError(
                "a pointer is no public operand of a shared tensor: share it over the same "
                "workers first (ptr.fix_precision().share(...))"
            )
        if not isinstance(value, int | float | torch.Tensor | FixedPrecisionTensor):
            raise TypeError(f"a {type(value).__name__} is no operand of a shared tensor")
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
        return self._new(_divided(shares, _scale(precision), "a product of fixed-precision"))

    def __truediv__(self, other: Any) -> Any:
        """Division by a public number or tensor (see the module's header): no round trip.

        By whole numbers (ints, or floats and tensors of whole values): the two-party
        truncation by them, exact to one unit in the last place. By other floats (fixed
        precision only): times the reciprocal, itself encoded at this tensor's precision,
        so off by up to ``|x| * 10**-p / 2`` besides.
        """
        if isinstance(other, SharedBase):
            raise TypeError(
                "division by a shared tensor is not implemented: divide by a public number"
            )
        if isinstance(other, bool) or not isinstance(other, int | float | torch.Tensor):
            raise TypeError(f"a {type(other).__name__} is no divisor of a shared tensor")
        divisor = torch.as_tensor(other)
        if divisor.is_complex() or divisor.dtype == torch.bool:
            raise TypeError(f"a {divisor.dtype} tensor is no divisor of a shared tensor")
        if bool((divisor == 0).any()):
            raise ZeroDivisionError("division of a shared tensor by zero")
        if not divisor.is_floating_point() or bool((divisor == divisor.round()).all()):
            whole = divisor.to(torch.int64)
            magnitude: int | torch.Tensor = whole.abs() if whole.dim() else abs(int(whole))
            quotient = _divided(list(self._live()), magnitude, "a division")
            if bool((whole < 0).any()):
                quotient = [torch.mul(share, torch.sign(whole)) for share in quotient]
            return self._new(quotient)
        if self.precision_fractional is None:
            raise TypeError(
                "a shared integer tensor is divided by whole numbers only "
                "(fractions: fix_precision() first)"
            )
        return self._scale_by_public(1.0 / divisor.to(torch.float64))

    div = __truediv__

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
        shares = await _multiply(
            [x for x, _ in pairs], [y for _, y in pairs], op, provider, self.locations, timeout
        )
        return self._truncated(shares)

    # -- comparisons: the sign bit, with the crypto provider's help ---------------------------

    async def _raw_sign_bit(
        self, timeout: float | None, shape: tuple[int, ...] | None = None
    ) -> list[Share]:
        """Additive shares of the integer ``1`` where this tensor is negative, else ``0``
        (``shape``: this tensor's, where its pointers may not know it)."""
        shares = self._live()
        shape = shape if shape is not None else shares[0].shape
        if shape is None:
            raise FedTensorError("the shapes of shared tensors must be known to compare them")
        return await _negative(shares, tuple(shape), self._provider(), self.locations, timeout)

    async def _sign_bit(self, timeout: float | None) -> Any:
        """Shares of ``1`` where this tensor is negative, else ``0``, of this tensor's kind."""
        bits = await self._raw_sign_bit(timeout)
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

    def _shape_known(self) -> tuple[int, ...]:
        shape = self.shape
        if shape is None:
            raise FedTensorError("the shape of a shared tensor must be known for max/argmax")
        return tuple(shape)

    async def _max(self, timeout: float | None) -> Any:
        """The largest element (a 0-d shared tensor)."""
        self._shape_known()
        flat = self._new([torch.reshape(share, (-1,)) for share in self._live()])
        values, _ = await flat._max_dim(0, False, timeout)
        return values

    async def _max_dim(self, dim: Any, keepdim: bool, timeout: float | None) -> tuple[Any, Any]:
        """The largest values along ``dim`` and their indices (the first, on ties), both
        shared: the values of this tensor's kind, the indices shared integers.

        A tournament of neighbours (``x[0::2]`` against ``x[1::2]``): log2(n) rounds, each
        one comparison (:func:`_negative`) and one Beaver product that selects values and
        indices together, ``right + bit * (left - right)``. The bit is the shared integer
        0/1, so the product needs no truncation: exact, with any number of holders.
        Keeping neighbours together keeps each contender the winner of an interval, and
        ``left >= right`` then keeps the first index of a tie, as torch does.
        """
        shape = self._shape_known()
        if type(dim) is not int or not -len(shape) <= dim < max(len(shape), 1):
            raise ValueError(f"dim {dim!r} is out of range for a shared tensor of shape {shape}")
        dim %= max(len(shape), 1)
        if not shape:  # a 0-d tensor is its own maximum, at index 0
            shape = (1,)
        count = shape[dim]
        if count == 0:
            raise ValueError("max() of an empty shared tensor")
        first = [torch.movedim(torch.reshape(s, shape), dim, 0) for s in self._live()]
        rest_shape = tuple(size for axis, size in enumerate(shape) if axis != dim)
        public = torch.arange(count).reshape(count, *([1] * len(rest_shape)))
        public = public.expand(count, *rest_shape).contiguous()
        indices = [torch.mul(share, 0) for share in first]
        indices[0] = torch.add(indices[0], public)
        values = first
        provider = self._provider()
        while count > 1:
            pairs = count // 2
            left, right = (
                [v[0 : 2 * pairs : 2] for v in values],
                [v[1 : 2 * pairs : 2] for v in values],
            )
            left_i = [i[0 : 2 * pairs : 2] for i in indices]
            right_i = [i[1 : 2 * pairs : 2] for i in indices]
            # left >= right: not (left - right < 0)
            below = await self._new(
                [torch.sub(a, b) for a, b in zip(left, right, strict=True)]
            )._raw_sign_bit(timeout, (pairs, *rest_shape))
            keep_left = [torch.neg(bit) for bit in below]
            keep_left[0] = torch.add(keep_left[0], 1)
            differences = [
                torch.stack([torch.sub(a, b), torch.sub(c, d)])
                for a, b, c, d in zip(left, right, left_i, right_i, strict=True)
            ]
            chosen = await _multiply(
                keep_left,
                differences,
                "mul",
                provider,
                self.locations,
                timeout,
                ((pairs, *rest_shape), (2, pairs, *rest_shape)),
            )
            leftover = count % 2
            values = [
                torch.cat([torch.add(b, z[0]), v[2 * pairs : count]])
                if leftover
                else torch.add(b, z[0])
                for b, z, v in zip(right, chosen, values, strict=True)
            ]
            indices = [
                torch.cat([torch.add(b, z[1]), i[2 * pairs : count]])
                if leftover
                else torch.add(b, z[1])
                for b, z, i in zip(right_i, chosen, indices, strict=True)
            ]
            count = pairs + leftover
        values = [torch.reshape(v, rest_shape) for v in values]
        indices = [torch.reshape(i, rest_shape) for i in indices]
        if keepdim and self.shape:
            values = [torch.unsqueeze(v, dim) for v in values]
            indices = [torch.unsqueeze(i, dim) for i in indices]
        index_tensor = type(self)(indices, self.crypto_provider, None, torch.int64)
        return self._new(values), index_tensor

    async def _argmax(self, dim: Any, keepdim: bool, timeout: float | None) -> Any:
        """The index of the largest element (of the flattened tensor for ``dim=None``)."""
        if dim is None:
            self._shape_known()
            flat = self._new([torch.reshape(share, (-1,)) for share in self._live()])
            _, indices = await flat._max_dim(0, False, timeout)
            return indices
        _, indices = await self._max_dim(dim, keepdim, timeout)
        return indices

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


def _divided(shares: list[Share], divisor: int | torch.Tensor, what: str) -> list[Share]:
    """Shares of the two-party shared ``z`` divided by a public positive ``divisor``,
    without interaction (SecureML's trick): party 0 floors ``z_0 / d``, party 1 takes
    ``-floor(-z_1 / d)``. Off by at most one unit, wrong with probability about
    ``|z| / 2**63``."""
    if len(shares) != 2:
        raise FedTensorError(
            f"{what} of shared tensors is truncated with the two-party trick: it needs "
            f"exactly two share holders, not {len(shares)}"
        )
    first = torch.div(shares[0], divisor, rounding_mode="floor")
    second = torch.neg(torch.div(torch.neg(shares[1]), divisor, rounding_mode="floor"))
    return [first, second]


async def _multiply(
    xs: Sequence[Share],
    ys: Sequence[Share],
    op: str,
    provider: WorkerHandle,
    locations: Sequence[WorkerHandle],
    timeout: float | None,
    shapes: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
) -> list[Share]:
    """Additive shares of ``x * y`` (or ``x @ y``) from shares of ``x`` and ``y``, with a
    Beaver triple from ``provider`` (no truncation: ring values). One round trip.
    ``shapes``: those of ``x`` and ``y`` where the pointers may not know them."""
    shape_x, shape_y = shapes if shapes is not None else (xs[0].shape, ys[0].shape)
    if shape_x is None or shape_y is None:
        raise FedTensorError("the shapes of shared tensors must be known to multiply them")
    function = torch.mul if op == "mul" else torch.matmul
    shape_z = tuple(
        function(torch.empty(shape_x, device="meta"), torch.empty(shape_y, device="meta")).shape
    )
    moved = await _dealt(provider, op, tuple(shape_x), tuple(shape_y), locations, timeout)
    triples = [_unpack(flat, tuple(shape_x), tuple(shape_y), shape_z) for flat in moved]
    # Open e = x - a and f = y - b: masked by the random a and b, they are safe to see.
    e, f = await asyncio.gather(
        _open([torch.sub(x, a) for x, (a, _, _) in zip(xs, triples, strict=True)], timeout),
        _open([torch.sub(y, b) for y, (_, b, _) in zip(ys, triples, strict=True)], timeout),
    )
    shares = []
    for index, (a, b, c) in enumerate(triples):
        z = torch.add(torch.add(c, function(e, b)), function(a, f))
        if index == 0:
            z = torch.add(z, function(e, f))
        shares.append(z)
    return shares


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
    # The flat length is known here; telling the pointers lets every operation on the
    # triple's parts know its shape without asking (worker processes cannot infer it).
    if op == "bit":
        length = 2 * math.prod(shape_x)
    elif op == "and":
        length = 3 * math.prod(shape_x)
    else:
        function = torch.mul if op == "mul" else torch.matmul
        meta = torch.empty(shape_x, device="meta"), torch.empty(shape_y, device="meta")
        length = math.prod(shape_x) + math.prod(shape_y) + function(*meta).numel()
    for part in parts:
        part._shape, part._dtype = (length,), torch.int64
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


async def _add_bits(
    xs: Sequence[Share],
    ys: Sequence[Share],
    dealt: Sequence[list[Share]],
    shape: tuple[int, ...],
    timeout: float | None,
) -> list[Share]:
    """XOR shares of the 64-bit sum ``x + y`` from XOR shares of ``x`` and ``y``: a
    Kogge-Stone adder (generate ``g = x & y``, propagate ``p = x ^ y``, six rounds of
    prefix combination, each one batched AND of two words). ``dealt``: seven ``"and"``
    triples, the first of ``shape``, the others of ``(2, *shape)``."""
    pair = (2, *shape)
    generate = await _and(xs, ys, dealt[0], shape, timeout)
    start = [x ^ y for x, y in zip(xs, ys, strict=True)]  # XOR shares of x ^ y
    propagate = start
    for stride, flats in zip(_STRIDES, dealt[1:], strict=True):
        left = [torch.stack([p, p]) for p in propagate]
        right = [
            torch.stack([g << stride, p << stride])
            for g, p in zip(generate, propagate, strict=True)
        ]
        both = await _and(left, right, flats, pair, timeout)
        generate = [g ^ z[0] for g, z in zip(generate, both, strict=True)]
        propagate = [z[1] for z in both]
    return [p ^ (g << 1) for p, g in zip(start, generate, strict=True)]


async def _negative(
    shares: Sequence[Share],
    shape: tuple[int, ...],
    provider: WorkerHandle,
    locations: Sequence[WorkerHandle],
    timeout: float | None,
) -> list[Share]:
    """Additive shares of the sign bit of the shared ``x_0 + ... + x_{n-1}`` (1 if negative).

    The sign bit is the top bit of the sum: the parties add their shares as bits, each
    share held as XOR shares (``x_k`` by party ``k``, ``0`` by the others), one
    Kogge-Stone adder (:func:`_add_bits`) per share after the first: n - 1 adders, each
    seven batched AND gates. Then the bit, XOR-shared, becomes additively shared with a
    random bit ``r`` the provider shares both ways: ``c = b ^ r`` is opened (masked by
    ``r``) and ``b = c + r - 2cr``. Every triple is dealt up front, concurrently.
    7(n - 1) + 1 openings in all, each masked by fresh randomness.
    """
    parties = len(shares)
    pair = (2, *shape)
    per_adder = 1 + len(_STRIDES)
    dealt = await asyncio.gather(
        *(
            _dealt(
                provider,
                "and",
                shape if gate == 0 else pair,
                shape if gate == 0 else pair,
                locations,
                timeout,
            )
            for _ in range(parties - 1)
            for gate in range(per_adder)
        ),
        _dealt(provider, "bit", shape, (), locations, timeout),
    )
    zeros = [torch.zeros_like(share) for share in shares]
    total: list[Share] = [shares[0], *zeros[1:]]  # XOR shares of x_0
    for k in range(1, parties):
        addend = [shares[k] if party == k else zeros[party] for party in range(parties)]
        gates = dealt[(k - 1) * per_adder : k * per_adder]
        total = await _add_bits(total, addend, gates, shape, timeout)
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

    async def max(
        self, dim: int | None = None, keepdim: bool = False, *, timeout: float | None = None
    ) -> Any:
        """The largest element, shared (a 0-d shared tensor); with ``dim``, torch's
        ``(values, indices)`` along it, the indices shared integers."""
        if dim is None:
            return await self._max(timeout)
        return await self._max_dim(dim, keepdim, timeout)

    async def argmax(
        self, dim: int | None = None, keepdim: bool = False, *, timeout: float | None = None
    ) -> Any:
        """The index of the largest element (shared integers; the first on ties)."""
        return await self._argmax(dim, keepdim, timeout)


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

    def max(
        self, dim: int | None = None, keepdim: bool = False, *, timeout: float | None = None
    ) -> Any:
        """The largest element, shared (a 0-d shared tensor); with ``dim``, torch's
        ``(values, indices)`` along it, the indices shared integers."""
        if dim is None:
            return self._block(self._max(timeout), timeout)
        return self._block(self._max_dim(dim, keepdim, timeout), timeout)

    def argmax(
        self, dim: int | None = None, keepdim: bool = False, *, timeout: float | None = None
    ) -> Any:
        """The index of the largest element (shared integers; the first on ties)."""
        return self._block(self._argmax(dim, keepdim, timeout), timeout)
