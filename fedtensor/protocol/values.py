"""Values as both sides see them: copies that share no memory, and their size in bytes.

Value semantics cross every worker boundary, in memory as on the wire: what a client
sends and what a worker replies with are copies (taken into recycled memory, see
:mod:`fedtensor.protocol.pool`), so neither side sees the other's later changes.
"""

from __future__ import annotations

from typing import Any

import torch

from fedtensor.protocol.pool import pooled_copy

__all__ = ["snapshot", "tensor_bytes"]


def snapshot(value: Any) -> Any:
    """A copy of ``value`` that shares no tensor memory with it.

    Tensors come back as leaves that keep ``requires_grad`` and a copy of
    ``grad``: an autograd graph does not cross a worker boundary.
    """
    if isinstance(value, torch.Tensor):
        copy = pooled_copy(value)
        if value.requires_grad:
            copy.requires_grad_(True)
        if (value.is_leaf or value.retains_grad) and value.grad is not None:
            copy.grad = value.grad.detach().clone()
        return copy
    if type(value) is list:
        return [snapshot(item) for item in value]
    if type(value) is tuple:
        return tuple(snapshot(item) for item in value)
    if type(value) is dict:
        return {key: snapshot(item) for key, item in value.items()}
    return value


def tensor_bytes(value: Any) -> int:
    """The bytes of tensor data in ``value`` (grads included; views count in full).

    What a federated round reports it moved. (A worker's memory quota counts more:
    every stored value, tensors once per storage; see :mod:`fedtensor.worker.budget`.)
    """
    if isinstance(value, torch.Tensor):
        size = value.numel() * value.element_size()
        if value.is_leaf and value.grad is not None:
            size += value.grad.numel() * value.grad.element_size()
        return size
    if type(value) is list or type(value) is tuple:
        return sum(tensor_bytes(item) for item in value)
    if type(value) is dict:
        return sum(tensor_bytes(item) for item in value.values())
    return 0
