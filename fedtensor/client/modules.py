"""Remote models: a ``torch.nn.Module`` whose parameters and buffers live on a worker.

Theory of operation
-------------------
``ft.send(model, bob)`` (``model.send(bob)`` after ``sy.TorchHook``) stores a copy of
every parameter and buffer on the worker and keeps the module object, with the very
same parameter objects: each changes its class, in place, to :class:`RemoteParameter`
(a buffer to :class:`RemoteBuffer`), a tensor subclass that holds the pointer to its
remote copy. That is what PySyft 0.2 did, and it is what lets an optimizer made before
``model.send`` (PySyft's Part 2 tutorial does so) drive the remote parameters, and one
made after it take ``model.parameters()`` as it does for any model.

A remote tensor answers what torch asks about its metadata (``shape``, ``dtype``,
``device``, ``is_leaf``, ``requires_grad``, ``is_sparse``, ``dim()``...) locally, from
the local tensor it was (whose stale values are never read), and sends every other
operation to the worker through ``__torch_function__``, as a pointer does: so
``model(x_ptr)`` runs torch's own ``forward`` code, each operation pipelined to the
worker, and returns a pointer; ``torch.optim``'s own ``step`` code runs the same way, on
its single-tensor path (a tensor subclass turns off its ``foreach`` and ``fused``
kernels), under ``torch.no_grad()``, which each operation carries to the worker.
Nothing waits: a training step costs no round trip.

``p.grad`` is a :class:`RemoteGradient` (a meta tensor with the parameter's shape that
holds a pointer to the remote ``p.grad``) once a ``backward()`` was sent to the worker
since the gradient was last set to ``None``, and ``None`` before, as torch's is before a
backward pass (what ``zero_grad`` and the optimizers test). ``p.grad = None`` and
``p.data = ...`` set the remote tensor's attribute (``fedtensor.set_attribute``).

``await ft.get_model(model)`` (``model.get()``) brings every value back in one round trip,
gradients included, and turns each tensor back into its own class; ``ft.copy_model``
(``model.copy()``) is a new module with copies on the same worker; ``ft.move_model``
(``model.move(alice)``) moves them worker to worker.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from fedtensor.client import pointer as _pointer
from fedtensor.client.pointer import PointerBase, PointerTensor, remote_call
from fedtensor.errors import FedTensorError

if TYPE_CHECKING:
    from fedtensor.client.handles import WorkerHandle

__all__ = [
    "RemoteBuffer",
    "RemoteGradient",
    "RemoteParameter",
    "copy_model",
    "get_model",
    "is_remote",
    "move_model",
    "send_model",
]

# Attributes a remote tensor reads from the worker (each a new pointer); other
# attribute getters (shape, dtype, device, is_leaf, ...) are answered locally.
_REMOTE_ATTRIBUTES = frozenset({"data", "T", "mT", "H", "mH", "real", "imag"})
# Attributes a remote tensor sets on the worker.
_SETTABLE = frozenset({"grad", "data", "requires_grad"})
# Methods and functions that only read metadata: answered locally.
_LOCAL_QUERIES = frozenset(
    {
        torch.Tensor.size, torch.Tensor.dim, torch.Tensor.ndimension, torch.Tensor.numel,
        torch.Tensor.nelement, torch.Tensor.element_size, torch.Tensor.is_floating_point,
        torch.Tensor.is_complex, torch.Tensor.is_contiguous, torch.Tensor.get_device,
        torch.Tensor.is_signed, torch.Tensor.is_inference, torch.Tensor.__len__,
        torch.is_complex, torch.is_floating_point, torch.numel,
        torch.Tensor.is_conj, torch.Tensor.is_neg, torch.is_conj, torch.is_neg,
    }
)  # fmt: skip
# Methods that need the values here: refused with a clear error instead of a pointer.
_NEED_VALUES = frozenset(
    {
        torch.Tensor.__bool__, torch.Tensor.__iter__, torch.Tensor.item,
        torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__array__,
        torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__index__,
        torch.Tensor.__reduce_ex__, torch.Tensor.__deepcopy__,
    }
)  # fmt: skip


def _remote_torch_function(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None) -> Any:
    """What any torch function or tensor method does when a remote tensor takes part."""
    kwargs = kwargs or {}
    name = getattr(func, "__name__", None)
    if name == "__get__":  # an attribute read: p.grad, p.shape, p.data ...
        attribute = func.__self__.__name__
        if attribute == "grad":
            return _gradient_of(args[0])
        if attribute in _REMOTE_ATTRIBUTES:
            return remote_call(f"Tensor.{attribute}", (args[0],), {})
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)
    if name == "__set__":  # p.grad = None, p.data = ..., p.requires_grad = ...
        tensor, value = args
        attribute = func.__self__.__name__
        if attribute not in _SETTABLE:
            raise AttributeError(f"a remote tensor's {attribute!r} cannot be set")
        if attribute == "grad" and value is None:
            tensor.__dict__["_fedtensor_grad_since"] = _location(tensor)._backward_calls
        elif attribute == "requires_grad":
            with torch._C.DisableTorchFunctionSubclass():
                func(tensor, value)
        remote_call("fedtensor.set_attribute", (tensor, attribute, value), {})
        return None
    if func is torch.Tensor.__repr__ or func is torch.Tensor.__format__:
        return _repr(args[0])
    if func in _LOCAL_QUERIES:
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)
    if func in _NEED_VALUES:
        raise TypeError(
            f"{getattr(func, '__qualname__', func)} of a remote tensor needs its value: "
            "get() the model (or the tensor) first"
        )
    if func is torch.Tensor.backward:
        pointer: PointerBase = args[0]._fedtensor_pointer
        return pointer.backward(*args[1:], **kwargs)
    if kwargs.get("memory_format") is torch.preserve_format:
        # The default of every *_like function; torch.optim passes it, the wire has no
        # memory formats.
        kwargs = {key: value for key, value in kwargs.items() if key != "memory_format"}
    result = _pointer._torch_function(func, args, kwargs)
    if name and args and isinstance(args[0], _Remote) and _in_place(name):
        # As in torch, an in-place operation returns its tensor: `p -= lr * p.grad` leaves
        # `p` the model's parameter (the result's pointer goes; the change stays).
        return args[0]
    return result


def _in_place(name: str) -> bool:
    if name.startswith("__"):
        return name.startswith("__i") and name != "__invert__"  # __iadd__, __isub__, ...
    return name.endswith("_")


class _Remote:
    """The behaviour every remote tensor shares (mixed into the tensor subclasses)."""

    @classmethod
    def __torch_function__(
        cls,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        return _remote_torch_function(func, args, kwargs)


class RemoteParameter(_Remote, torch.nn.Parameter):
    """A parameter of a remote model: its value lives on ``location`` (see the module)."""

    @property
    def location(self) -> WorkerHandle:
        return _location(self)

    @property
    def pointer(self) -> PointerBase:
        """The pointer to the remote value."""
        pointer: PointerBase = self.__dict__["_fedtensor_pointer"]
        return pointer


class RemoteBuffer(_Remote, torch.Tensor):
    """A buffer of a remote model (``running_mean``, ...): its value lives on ``location``."""

    location = RemoteParameter.location
    pointer = RemoteParameter.pointer


class RemoteGradient(_Remote, torch.Tensor):
    """The gradient of a remote parameter: a meta tensor of its shape, holding a pointer."""

    location = RemoteParameter.location
    pointer = RemoteParameter.pointer

    @staticmethod
    def __new__(cls, pointer: PointerBase, like: torch.Tensor) -> RemoteGradient:
        with torch._C.DisableTorchFunctionSubclass():
            made = torch.empty(like.shape, dtype=like.dtype, device="meta").as_subclass(cls)
        made.__dict__["_fedtensor_pointer"] = pointer
        return made


def _location(tensor: torch.Tensor) -> WorkerHandle:
    location: WorkerHandle = tensor.__dict__["_fedtensor_pointer"].location
    return location


def _repr(tensor: torch.Tensor) -> str:
    with torch._C.DisableTorchFunctionSubclass():
        shape, dtype = tuple(tensor.shape), tensor.dtype
    pointer = tensor.__dict__["_fedtensor_pointer"]
    where = getattr(pointer.location, "id", "?")
    return (
        f"<{type(tensor).__name__} -> {where}:{pointer.id_at_location} shape={shape} dtype={dtype}>"
    )


def _has_gradient(tensor: torch.Tensor) -> bool:
    """Whether a backward pass was sent (or a gradient came along) since it was last None."""
    with torch._C.DisableTorchFunctionSubclass():
        requires_grad = tensor.requires_grad
    since = tensor.__dict__.get("_fedtensor_grad_since")
    return since is not None and requires_grad and _location(tensor)._backward_calls > since


def _gradient_of(tensor: torch.Tensor) -> RemoteGradient | None:
    """``tensor.grad``: a pointer where :func:`_has_gradient`, else None (as torch's is)."""
    if not _has_gradient(tensor):
        return None
    pointer: PointerBase = remote_call("Tensor.grad", (tensor,), {})
    return RemoteGradient(pointer, tensor)


def is_remote(tensor: Any) -> bool:
    """Whether ``tensor`` is a remote model's parameter, buffer or gradient."""
    return isinstance(tensor, _Remote)


def _tensors(model: torch.nn.Module) -> Iterator[tuple[dict[str, Any], str, torch.Tensor]]:
    """Every parameter and buffer of ``model``, once each, as (its dict, name, tensor)."""
    seen: set[int] = set()
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if tensor is not None and id(tensor) not in seen:
                    seen.add(id(tensor))
                    yield table, name, tensor


def _make_remote(tensor: torch.Tensor, pointer: PointerBase) -> None:
    """Turn ``tensor`` into a remote tensor, in place (see the module)."""
    kind = type(tensor)
    if kind is torch.nn.Parameter:
        remote_class: type = RemoteParameter
    elif kind is torch.Tensor:
        remote_class = RemoteBuffer
    else:
        raise TypeError(f"a model's tensor of type {kind.__qualname__} cannot be sent")
    # A gradient travels with its tensor: then the remote one has a gradient already.
    since = pointer.location._backward_calls - (tensor.grad is not None)
    tensor.__dict__["_fedtensor_class"] = kind
    tensor.__dict__["_fedtensor_pointer"] = pointer
    tensor.__dict__["_fedtensor_grad_since"] = since
    tensor.__class__ = remote_class


def _make_local(tensor: torch.Tensor, value: Any) -> None:
    """Turn a remote tensor back into its own class, holding ``value``."""
    tensor.__class__ = tensor.__dict__.pop("_fedtensor_class")
    del tensor.__dict__["_fedtensor_pointer"]
    tensor.__dict__.pop("_fedtensor_grad_since", None)
    if isinstance(value, torch.Tensor):
        with torch.no_grad():
            tensor.data = value.detach()
        tensor.grad = None if value.grad is None else value.grad.detach()


def _remote_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    return [tensor for _, _, tensor in _tensors(model) if isinstance(tensor, _Remote)]


def send_model(model: torch.nn.Module, *workers: WorkerHandle) -> torch.nn.Module:
    """Store ``model``'s parameters and buffers on one worker; returns ``model`` itself.

    Returns at once (the copies travel pipelined, like ``ft.send`` of a tensor). A model
    that is already remote is moved (:func:`move_model` does it, awaited).
    """
    if len(workers) != 1:
        raise TypeError(f"a model is sent to one worker, not {len(workers)}")
    (worker,) = workers
    tensors = [tensor for _, _, tensor in _tensors(model)]
    if any(isinstance(tensor, _Remote) for tensor in tensors):
        raise FedTensorError(
            "this model is already on a worker: move it (model.move(worker), or "
            "await ft.move_model(model, worker)), or get() it first"
        )
    client = worker.client
    for tensor in tensors:
        _make_remote(tensor, client.store(tensor))
    return model


async def get_model(model: torch.nn.Module, *, timeout: float | None = None) -> torch.nn.Module:
    """Bring a remote model's values (and gradients) back, in one round trip; frees them."""
    remote = _remote_tensors(model)
    outcomes = await asyncio.gather(
        *(
            tensor.__dict__["_fedtensor_pointer"]._fetch(free=True, timeout=timeout)
            for tensor in remote
        ),
        return_exceptions=True,
    )
    failure: BaseException | None = None
    for tensor, outcome in zip(remote, outcomes, strict=True):
        if isinstance(outcome, BaseException):
            failure = failure or outcome
        else:
            _make_local(tensor, outcome)
    if failure is not None:
        raise failure
    return model


async def move_model(
    model: torch.nn.Module, worker: WorkerHandle, *, timeout: float | None = None
) -> torch.nn.Module:
    """Move a remote model's values to ``worker`` (worker to worker, see ``ptr.move``)."""
    remote = _remote_tensors(model)
    if not remote:
        return send_model(model, worker)
    with_grad = [_has_gradient(tensor) for tensor in remote]
    # The async move for pointers of either API: this runs on the client's loop.
    await asyncio.gather(
        *(
            PointerTensor.move(tensor.__dict__["_fedtensor_pointer"], worker, timeout=timeout)
            for tensor in remote
        )
    )
    for tensor, had_grad in zip(remote, with_grad, strict=True):
        tensor.__dict__["_fedtensor_grad_since"] = worker._backward_calls - had_grad
    return model


def copy_model(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model``; a remote model's copy has copies on the same worker (no wait)."""
    memo: dict[int, Any] = {}
    copies: list[tuple[torch.Tensor, PointerBase]] = []
    for tensor in _remote_tensors(model):
        pointer: PointerBase = tensor.__dict__["_fedtensor_pointer"]
        with torch._C.DisableTorchFunctionSubclass():
            requires_grad = tensor.requires_grad
            local = tensor.detach().clone()
        kind = tensor.__dict__["_fedtensor_class"]
        twin = torch.nn.Parameter(local, requires_grad) if kind is torch.nn.Parameter else local
        remote_twin = remote_call("Tensor.detach", (pointer,), {}).clone()
        if requires_grad:
            remote_twin = remote_twin.requires_grad_(True)
        memo[id(tensor)] = twin
        copies.append((twin, remote_twin))
    twin_model = copy.deepcopy(model, memo)
    for twin, remote_twin in copies:
        _make_remote(twin, remote_twin)
    return twin_model


def _client_of(model: torch.nn.Module) -> Any:
    for tensor in _remote_tensors(model):
        client = tensor.__dict__["_fedtensor_pointer"]._client
        if client is not None:
            return client
    return None


def get_model_blocking(model: torch.nn.Module, *, timeout: float | None = None) -> Any:
    """``model.get()`` after ``sy.TorchHook``: blocks for a blocking worker's model."""
    client = _client_of(model)
    if client is None:
        if _remote_tensors(model):
            raise FedTensorError("this model's remote values were already taken")
        return model  # a local model: nothing to bring back
    if not client.worker._blocking:
        return get_model(model, timeout=timeout)  # the async API: a coroutine to await
    return client.run_threadsafe(get_model(model, timeout=timeout), timeout)


def move_model_blocking(
    model: torch.nn.Module, worker: WorkerHandle, *, timeout: float | None = None
) -> Any:
    """``model.move(worker)`` after ``sy.TorchHook`` (a coroutine for an async worker)."""
    client = _client_of(model)
    if client is None:
        return send_model(model, worker)
    if not client.worker._blocking:
        return move_model(model, worker, timeout=timeout)
    return client.run_threadsafe(move_model(model, worker, timeout=timeout), timeout)
