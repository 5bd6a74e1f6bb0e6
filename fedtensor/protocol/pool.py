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
"""

from __future__ import annotations

import threading

import torch

from fedtensor.protocol.tensors import memory_of, shaped

__all__ = ["POOL", "BufferPool", "pooled_copy"]


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

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self._held = 0


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
