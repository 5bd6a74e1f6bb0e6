"""Every operation the allow-list denies is refused: absent from the list, and refused by a worker.

The names are written out here, not read from fedtensor.protocol.ops: a test that took its
list from the code would follow the code, and drop a name the moment the code did. Each is
checked to name something real in torch, so that a misspelt entry cannot pass for a refusal.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import fedtensor as ft
from fedtensor.client.pointer import call_on
from fedtensor.testing import WorkerFactory

pytestmark = pytest.mark.anyio

DENIED = [
    # storage, raw memory, other processes, foreign memory protocols
    "Tensor.storage",
    "Tensor.untyped_storage",
    "Tensor.storage_offset",
    "Tensor.storage_type",
    "Tensor.data_ptr",
    "Tensor.const_data_ptr",
    "Tensor.set_",
    "Tensor.share_memory_",
    "Tensor.is_shared",
    "Tensor.pin_memory",
    "Tensor.is_pinned",
    "Tensor.record_stream",
    "Tensor.as_strided",
    "torch.as_strided",
    "Tensor.as_strided_",
    "torch.as_strided_",
    "Tensor.as_strided_scatter",
    "torch.as_strided_scatter",
    "Tensor.numpy",
    "Tensor.__dlpack__",
    "Tensor.__dlpack_device__",
    "Tensor.__array__",
    "Tensor.__array_wrap__",
    "torch.to_dlpack",
    "torch.from_dlpack",
    "Tensor.module_load",
    # pickling and copying protocol
    "Tensor.__reduce_ex__",
    "Tensor.__reduce__",
    "Tensor.__setstate__",
    "Tensor.__getstate__",
    "Tensor.__deepcopy__",
    # uninitialised memory: it may hold the bytes of another client's freed tensor
    "Tensor.new_empty",
    "Tensor.new_empty_strided",
    "Tensor.resize_",
    "Tensor.resize_as_",
    "torch.resize_as_",
    "torch.empty_like",
    "torch.empty",
    "torch.empty_strided",
    # callables and hooks
    "Tensor.apply_",
    "Tensor.map_",
    "Tensor.map2_",
    "Tensor.register_hook",
    "Tensor.register_post_accumulate_grad_hook",
    # formatting and host-side conversions to Python objects of other kinds
    "Tensor.__repr__",
    "Tensor.__format__",
    "Tensor.__reversed__",
]


def _resolve(name: str) -> Any:
    namespace, _, attribute = name.partition(".")
    return getattr(torch.Tensor if namespace == "Tensor" else torch, attribute)


def test_every_name_on_the_list_is_real() -> None:
    assert len(set(DENIED)) == len(DENIED)
    for name in DENIED:
        assert callable(_resolve(name)), name  # AttributeError for a misspelt one


@pytest.mark.parametrize("name", DENIED)
async def test_a_denied_operation_is_not_listed_and_a_worker_refuses_it(
    ft_virtual_workers: WorkerFactory, name: str
) -> None:
    assert name not in ft.allowed_operations()
    bob = await ft_virtual_workers("bob")
    x = ft.send(torch.ones(4), bob)
    refused = call_on(bob.client, name, (x,), {})
    with pytest.raises(ft.ForbiddenOperation, match="not allowed"):
        await refused
    assert torch.equal(await (x + 1).get(), torch.full((4,), 2.0))  # the worker serves on
    del refused


async def test_the_same_call_runs_an_allowed_operation(ft_virtual_workers: WorkerFactory) -> None:
    """The control: the refusals above are the allow-list's, not the way the call is made."""
    assert "Tensor.clone" in ft.allowed_operations()
    bob = await ft_virtual_workers("bob")
    x = ft.send(torch.ones(4), bob)
    assert torch.equal(await call_on(bob.client, "Tensor.clone", (x,), {}).get(), torch.ones(4))
    del x
