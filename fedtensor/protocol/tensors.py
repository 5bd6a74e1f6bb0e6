"""Tensors and raw memory, without copies: the helpers the codec and the buffer pool share.

:func:`memory_of` exposes a tensor's bytes as a ``memoryview`` (what a transport
writes, or what a received frame is copied into); :func:`shaped` puts a shape on a
flat tensor's memory (what a decoded payload or a pooled buffer becomes). Neither
copies a byte.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch

__all__ = ["memory_of", "shaped", "strides"]

# ctypes array types keyed by a power-of-two size. Creating an array type costs
# ~16 us while a cached one is free, so a view is cut from an array of the next
# power of two instead of making a type for every size.
_RAW_TYPES: dict[int, type[ctypes.Array[ctypes.c_char]]] = {}


def memory_of(tensor: torch.Tensor, owner: object = None) -> memoryview:
    """A read-write view of a contiguous CPU tensor's bytes, without a copy.

    The view keeps the tensor alive: it holds the ctypes array that holds the
    tensor (or ``owner``, which must hold the tensor).
    """
    nbytes = tensor.nbytes
    size = 1 << (nbytes - 1).bit_length()
    raw_type = _RAW_TYPES.get(size)
    if raw_type is None:
        raw_type = _RAW_TYPES[size] = ctypes.c_char * size
    raw = raw_type.from_address(tensor.data_ptr())
    raw._fedtensor_tensor = tensor if owner is None else owner  # type: ignore[attr-defined]
    # Only the first nbytes are ever read: the slice is the whole exported view.
    return memoryview(raw).cast("B")[:nbytes]


def strides(shape: Sequence[int]) -> list[int]:
    """Row-major (contiguous) strides of ``shape``, as torch computes them."""
    result = [1] * len(shape)
    step = 1
    for dim in range(len(shape) - 1, -1, -1):
        result[dim] = step
        step *= max(shape[dim], 1)
    return result


def shaped(flat: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """A contiguous tensor of ``shape`` over ``flat``'s memory, from its storage offset.

    Not ``flat.view(shape)``: a view would keep ``flat`` as its ``_base``, and a
    worker treats a tensor with a ``_base`` as sharing memory (it copies it before
    handing it over). ``set_`` gives a tensor of its own over the same storage.
    """
    result = torch.empty(0, dtype=flat.dtype)
    result.set_(flat.untyped_storage(), flat.storage_offset(), shape, strides(shape))
    return result
