"""Recycled memory for large tensors, so that big transfers skip the page faults.

A fresh buffer of 64 MiB costs its page faults, which on this project's test
machine take three times as long as the copy into it (the allocator returns
large blocks to the system on free, and takes new ones on the next
allocation). The buffers that a large transfer needs have the same sizes
each time (a model's state, round after round), so :class:`BufferPool`
keeps freed ones, up to a bound, and hands them out again:

* frames being received (:class:`fedtensor.protocol.chunks.Reassembler`), which the
  decoded tensors then live in;
* the copies a client takes of what it sends, and a worker of what it
  replies with (:func:`pooled_copy`, used by ``snapshot``).

A buffer comes back when the last thing using it dies: the view, and every
tensor built over it. Its old bytes are never read: each use overwrites it
whole first.

What the pool keeps is a high-water mark: the most buffers of each size that
were in use at once, up to ``max_bytes``. Under a long run of mixed traffic
that mark creeps up as rarer overlaps of transfers happen (a worker's memory
after a gc grew 10% over its first minutes of a soak, most of it here, and
then stayed). :func:`release_idle` gives it all back when nothing needs it
(a worker calls it once its last client has left): the free buffers, and then
the C allocator's free pages (``malloc_trim``, glibc only), since large blocks
freed into the allocator's arenas stay resident otherwise.

What else stayed was the C allocator's: glibc gives each thread that contends
for it an arena of its own (up to 8 per core), and after a large block is freed
it raises its mmap threshold to that size (up to 32 MiB), so that later blocks
of a few MiB (tensors, frames) are carved from those arenas, where the small
allocations made meanwhile pin them: 30 to 40 MiB that ``malloc_trim`` could
not give back after a soak, spread over the compute threads' arenas.
:func:`steady_allocator` (a worker calls it as it starts) keeps one arena for
the process: the worker's threads hold the GIL for their Python work and take
the arena's lock once per tensor they allocate (small blocks come from each
thread's own cache without it), and the holes one thread's blocks leave are
filled by the next thread's. Fixing the mmap threshold instead did as well for
memory but made every large result a fresh mapping, page faults included: an
elementwise operation on 8 MiB took 2 to 10 times as long.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading
from collections.abc import Callable
from typing import Any

import torch

from fedtensor.protocol.tensors import memory_of, shaped

__all__ = ["POOL", "BufferPool", "pooled_copy", "release_idle", "steady_allocator"]


class BufferPool:
    """Frame buffers of at least ``min_size`` bytes, recycled up to ``max_bytes`` held.

    :meth:`take` gives a writable view; once the view and everything built over
    it (tensors from :func:`torch.frombuffer`) are gone, the memory comes back
    here, whichever thread drops the last reference.
    """

    def __init__(self, *, min_size: int = 1 << 20, max_bytes: int = 256 << 20) -> None:
        self.min_size = min_size
        self.max_bytes = max_bytes
        self._free: dict[int, list[torch.Tensor]] = {}
        self._held = 0
        self._lock = threading.Lock()

    @property
    def held(self) -> int:
        """Bytes of free buffers the pool keeps."""
        return self._held

    def take(self, size: int) -> memoryview:
        """A view of ``size`` bytes of memory that may hold an earlier frame's bytes."""
        if size < self.min_size:
            return memory_of(torch.empty(size, dtype=torch.uint8))
        tensor = None
        with self._lock:
            stack = self._free.get(size)
            if stack:
                tensor = stack.pop()
                self._held -= size
        if tensor is None:
            # torch.empty: unlike bytearray(size), the memory is not zeroed first.
            tensor = torch.empty(size, dtype=torch.uint8)
        return memory_of(tensor, _Lease(self, tensor))

    def _give_back(self, tensor: torch.Tensor) -> None:
        size = tensor.numel()
        with self._lock:
            if self._held + size <= self.max_bytes:
                self._free.setdefault(size, []).append(tensor)
                self._held += size

    def clear(self) -> int:
        """Drop every free buffer the pool keeps; the bytes dropped."""
        with self._lock:
            free, self._free = self._free, {}
            held, self._held = self._held, 0
        del free  # outside the lock: freeing 256 MiB takes a while
        return held


class _Lease:
    """Returns its tensor's memory to the pool when the last view of it is gone."""

    __slots__ = ("pool", "tensor")

    def __init__(self, pool: BufferPool, tensor: torch.Tensor) -> None:
        self.pool = pool
        self.tensor = tensor

    def __del__(self) -> None:
        self.pool._give_back(self.tensor)


#: The process's pool: frames received, and copies of tensors sent or fetched.
POOL = BufferPool()


def _libc_function(name: str, *argtypes: Any) -> Callable[..., int] | None:
    """glibc's function ``name``, or None (another C library, another system)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        function: Callable[..., int] = getattr(libc, name)
    except (OSError, AttributeError):  # musl and others: no malloc_trim, no mallopt
        return None
    function.argtypes = list(argtypes)  # type: ignore[attr-defined]
    function.restype = ctypes.c_int  # type: ignore[attr-defined]
    return function


_TRIM = _libc_function("malloc_trim", ctypes.c_size_t)
_MALLOPT = _libc_function("mallopt", ctypes.c_int, ctypes.c_int)
_M_ARENA_MAX = -8  # glibc's malloc.h


def steady_allocator() -> None:
    """One C allocator arena for the process (glibc only): see the module header.
    Before the threads that compute start (arenas made before it stay in use)."""
    if _MALLOPT is not None:
        _MALLOPT(_M_ARENA_MAX, 1)


def release_idle() -> None:
    """Give memory back to the system when no transfer needs it: the pool's free
    buffers, then the C allocator's free pages.

    Safe at any time (buffers in use come back to the pool later as usual); it
    costs the next large transfers their page faults, and ``malloc_trim`` a walk of
    the allocator's arenas (milliseconds), so it is for idle moments only.
    """
    POOL.clear()
    if _TRIM is not None:
        _TRIM(0)


def pooled_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``tensor`` (detached), in recycled memory when it is large."""
    if (
        tensor.nbytes < POOL.min_size
        or tensor.device.type != "cpu"
        or tensor.layout is not torch.strided
        or tensor.is_quantized
    ):
        return tensor.detach().clone()
    view = POOL.take(tensor.nbytes)
    copy = shaped(torch.frombuffer(view, dtype=tensor.dtype), tensor.shape)
    copy.copy_(tensor.detach())
    return copy
