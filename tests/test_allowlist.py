"""Every operation the allow-list denies is refused: absent from the list, and refused by a worker.

The names are written out here, not read from fedtensor.protocol.ops: a test that took its
list from the code would follow the code, and drop a name the moment the code did. Each is
checked to name something real in torch, so that a misspelt entry cannot pass for a refusal.
The same goes for the families of names (FAMILIES): their patterns are written here, and
each is checked to match something in torch.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
import torch.nn.functional

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
    # found by the audit of the whole list: addresses, packed weights, storage views
    "torch.as_strided_copy",
    "torch.fbgemm_pack_quantized_matrix",
    "torch.fbgemm_pack_gemm_matrix_fp16",
    "torch.fbgemm_linear_int8_weight",
    "torch.fbgemm_linear_fp16_weight",
    "torch.quantized_lstm_cell",
    "torch.quantized_gru_cell",
    "torch.slice_inverse",
    "Tensor.slice_inverse",
    "Tensor.is_set_to",
    "Tensor.resize",
    "Tensor.resize_as",
    "Tensor.sparse_resize_",
    "Tensor.sparse_resize_and_clear_",
    "Tensor.resize_as_sparse_",
    "Tensor.to_mkldnn",
    "torch.miopen_rnn",
    "torch.autocast",
]

# Families no allowed name may belong to, as patterns searched in the bare name (after the
# last dot). Written independently of fedtensor.protocol.ops, and broader where that is
# cheap: a name these catch that the worker needs goes in NOT_OF_THE_FAMILY, with why.
FAMILIES = {
    "addresses": r"data_ptr|_ptr$|address",
    "storage": r"storage",
    "caller-chosen strides": r"as_strided",
    "fbgemm": r"fbgemm",
    "packed weights": r"(^|_)(pre|un)?pack(ed)?(_|$)",
    "quantized cells over packed weights": r"^quantized_.*_cell$",
    "nested internals": r"nested",
    "sparse constructors": r"sparse_(coo|csr|csc|bsr|bsc|compressed)_tensor|sparse_tensor",
    "private internals": r"^_(?!_)",
    "resize": r"resize",
    "uninitialised memory": r"empty",
    "foreign memory protocols": r"dlpack|array_interface|^__array",
    "backend kernels": r"miopen|cudnn|mkldnn",
}
NOT_OF_THE_FAMILY = {
    # Unpacks an LU factorisation: plain tensors, no packed weights; torch checks the pivots
    # (test_lu_unpack_checks_the_pivots_a_client_chooses).
    "torch.lu_unpack",
}

# Where torch keeps the names a family is checked against.
_TORCH_NAMESPACES = (torch, torch.Tensor, torch.nn.functional, torch.linalg, torch.fft)


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


def test_every_family_matches_something_in_torch() -> None:
    """A misspelt pattern would match nothing, and pass the test below for nothing."""
    names = {name for namespace in _TORCH_NAMESPACES for name in dir(namespace)}
    for family, pattern in FAMILIES.items():
        assert any(re.search(pattern, name) for name in names), family


def test_no_allowed_operation_belongs_to_a_denied_family() -> None:
    allowed = ft.allowed_operations()
    assert "torch.add" in allowed  # the list is the real one, not empty
    offenders = {
        name: family
        for name in allowed
        if name not in NOT_OF_THE_FAMILY
        for family, pattern in FAMILIES.items()
        if re.search(pattern, name.rpartition(".")[2])
    }
    assert offenders == {}


async def test_a_worker_refuses_strided_copies_and_packed_weights_through_a_pointer(
    ft_virtual_workers: WorkerFactory,
) -> None:
    bob = await ft_virtual_workers("bob")
    x = ft.send(torch.arange(4.0), bob)
    weights = ft.send(torch.ones(8, 8, dtype=torch.int8), bob)
    # The control: the call is well formed, and locally it reads through caller-chosen strides.
    strided = torch.as_strided_copy(torch.arange(4.0), (2,), (2,), 1)
    assert torch.equal(strided, torch.tensor([1.0, 3.0]))
    # As a torch function on a pointer: the client refuses at once, sending nothing.
    with pytest.raises(ft.ForbiddenOperation, match="as_strided_copy"):
        await torch.as_strided_copy(x, (2,), (2,), 1).get()
    with pytest.raises(ft.ForbiddenOperation, match="fbgemm_pack_quantized_matrix"):
        await torch.fbgemm_pack_quantized_matrix(weights, 8, 8).get()
    # Sent anyway, by name: the worker refuses.
    for name, args in (
        ("torch.as_strided_copy", (x, (2,), (2,), 1)),
        ("torch.fbgemm_pack_quantized_matrix", (weights, 8, 8)),
    ):
        refused = call_on(bob.client, name, args, {})
        with pytest.raises(ft.ForbiddenOperation, match="not allowed"):
            await refused
        del refused
    assert torch.equal(await (x + 1).get(), torch.arange(1.0, 5.0))  # the worker serves on
    del weights


async def test_lu_unpack_checks_the_pivots_a_client_chooses(
    ft_virtual_workers: WorkerFactory,
) -> None:
    """Why lu_unpack may stay, though the packed-weights family would deny it."""
    assert "torch.lu_unpack" in ft.allowed_operations()
    bob = await ft_virtual_workers("bob")
    lu = ft.send(torch.eye(3), bob)
    pivots = ft.send(torch.tensor([100_000, 1, 1], dtype=torch.int32), bob)
    with pytest.raises(ft.RemoteError, match="pivots") as caught:
        await torch.lu_unpack(lu, pivots)[0].get()
    assert not isinstance(caught.value, ft.ForbiddenOperation)  # torch's check, not ours
    good = ft.send(torch.tensor([1, 2, 3], dtype=torch.int32), bob)
    permutation, lower, upper = [await part.get() for part in torch.lu_unpack(lu, good)]
    assert torch.equal(permutation, torch.eye(3))
    assert torch.equal(lower @ upper, torch.eye(3))
