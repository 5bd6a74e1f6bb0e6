"""Output shapes of a training plan's common operations, without torch's meta kernels.

Theory of operation
-------------------
A worker sizes a training command before it runs by running its plan once on
``meta`` tensors (:meth:`~fedtensor.worker.compiler.CompiledPlan.dry_run`). Most of
torch's meta kernels are Python (``torch._meta_registrations``, ``torch._refs``),
and the first call of one in a process imports what they are written with: a
``linear``, ``mm`` or ``conv2d`` imports ``sympy`` and ``torch.fx`` (487 modules),
a ``relu``, ``add`` or ``cross_entropy`` also ``torch._dynamo`` (823 modules in
all, about 73 MB of memory for the life of the process), because the Python
kernels are wrapped by ``torch._compile._disable_dynamo``, whose first call
imports ``torch._dynamo`` (torch 2.13). Every worker process paid it on its first
training command, or at start with ``--warm-up``: for 10,000 simulated clients on
two worker processes, the difference between 0.9 and 1.05 GB.

:func:`shape_rules` is a ``TorchFunctionMode`` (torch's public hook for
intercepting torch functions, :mod:`torch.overrides`) under which the operations
of :data:`RULES` answer with an empty ``meta`` tensor of the shape and dtype their
kernel would give, computed here from the arguments with torch's own formulas;
it changes nothing in torch and is active only around a dry run. A rule answers
only when the call is plain: meta tensors that are contiguous and strided, of one
floating dtype (labels: ``int64``), the default values of the options it does not
model, shapes that agree. Anything else (another option, a broadcast it does not
model, a shape torch would refuse) is handed to torch's own meta kernel as before,
which decides, imports and all. So a rule never makes a plan pass that torch would
refuse, and what rules cover only has to be exact where they answer.

Exact means: the same shape, dtype and strides as the meta kernel's result, and
the same storage (an in-place ``relu`` or an inactive dropout returns its input,
which allocates nothing). ``tests/test_worker_memory.py`` checks each rule
against torch's meta kernel over a table of cases, checks that a dry run of the
demo's CNN and the benchmark's MLP gives the same size with and without the
rules, and, in a fresh process, that sizing them imports neither ``torch._dynamo``
nor ``sympy``: if a torch upgrade changes a kernel's output or calls its
operations by other functions, those tests fail.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["RULES", "shape_rules"]

_FLOATING = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
_REDUCTIONS = frozenset({"mean", "sum", "none"})


class _Defer(Exception):
    """Not a call a rule answers: torch's meta kernel runs instead."""


def _plain(value: Any, dtypes: frozenset[torch.dtype] = _FLOATING) -> torch.Tensor:
    """``value`` if it is a contiguous strided meta tensor of one of ``dtypes``."""
    if (
        type(value) is not torch.Tensor
        or not value.is_meta
        or value.layout is not torch.strided
        or value.dtype not in dtypes
        or not value.is_contiguous()
    ):
        raise _Defer
    return value


def _empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(tuple(shape), dtype=dtype, device="meta")


def _same_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    if any(tensor.dtype != dtype for tensor in tensors):
        raise _Defer
    return dtype


def _int(value: Any, low: int = 0) -> int:
    if type(value) is not int or value < low:
        raise _Defer
    return value


def _ints(value: Any, count: int, low: int = 0) -> tuple[int, ...]:
    """An int, or ``count`` ints, as torch takes a conv's or a pool's stride and padding."""
    if type(value) is int:
        return (_int(value, low),) * count
    if type(value) in (list, tuple) and len(value) == count:
        return tuple(_int(item, low) for item in value)
    raise _Defer


def _probability(value: Any) -> float:
    if type(value) not in (int, float) or not 0 <= value <= 1:
        raise _Defer
    return float(value)


# -- elementwise ------------------------------------------------------------------------------


def _unary(input: Any, inplace: bool = False) -> torch.Tensor:
    tensor = _plain(input)
    if type(inplace) is not bool:
        raise _Defer
    return tensor if inplace else _empty(tensor.shape, tensor.dtype)


def _leaky_relu(input: Any, negative_slope: Any = 0.01, inplace: bool = False) -> torch.Tensor:
    if type(negative_slope) not in (int, float):
        raise _Defer
    return _unary(input, inplace)


def _dropout(input: Any, p: Any = 0.5, training: Any = True, inplace: Any = False) -> torch.Tensor:
    tensor = _plain(input)
    probability = _probability(p)
    if type(training) is not bool or type(inplace) is not bool:
        raise _Defer
    if inplace or not training or probability == 0 or tensor.numel() == 0:
        return tensor  # torch's dropout returns its input then
    return _empty(tensor.shape, tensor.dtype)


def _softmax(input: Any, dim: Any = None, _stacklevel: Any = 3, dtype: Any = None) -> torch.Tensor:
    tensor = _plain(input)
    if (
        dtype is not None
        or type(dim) is not int
        or not -max(tensor.dim(), 1) <= dim < max(tensor.dim(), 1)
    ):
        raise _Defer
    return _empty(tensor.shape, tensor.dtype)


def _broadcast(shapes: list[torch.Size]) -> tuple[int, ...]:
    dims = max(len(shape) for shape in shapes)
    out = [1] * dims
    for shape in shapes:
        offset = dims - len(shape)
        for position, size in enumerate(shape):
            have = out[offset + position]
            if size != have:
                if have == 1:
                    out[offset + position] = size
                elif size != 1:
                    raise _Defer  # torch says which shapes do not broadcast
    return tuple(out)


def _binary(a: Any, b: Any) -> torch.Tensor:
    """``a (+ - * /) b`` of tensors of one floating dtype, or of such a tensor and a number."""
    tensors = []
    for operand in (a, b):
        if isinstance(operand, torch.Tensor):
            tensors.append(_plain(operand))
        elif type(operand) not in (int, float):
            raise _Defer  # bool, complex, other values: torch's promotion decides
    if not tensors:
        raise _Defer
    dtype = _same_dtype(*tensors)
    return _empty(_broadcast([tensor.shape for tensor in tensors]), dtype)


# -- layers -----------------------------------------------------------------------------------


def _linear(input: Any, weight: Any, bias: Any = None) -> torch.Tensor:
    x, w = _plain(input), _plain(weight)
    if x.dim() < 1 or w.dim() != 2 or w.shape[1] != x.shape[-1]:
        raise _Defer
    tensors = [x, w]
    if bias is not None:
        b = _plain(bias)
        if b.shape != (w.shape[0],):
            raise _Defer
        tensors.append(b)
    return _empty((*x.shape[:-1], w.shape[0]), _same_dtype(*tensors))


def _conv(spatial: int) -> Callable[..., torch.Tensor]:
    def conv(
        input: Any,
        weight: Any,
        bias: Any = None,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        groups: Any = 1,
    ) -> torch.Tensor:
        x, w = _plain(input), _plain(weight)
        groups = _int(groups, 1)
        if x.dim() != spatial + 2 or w.dim() != spatial + 2 or x.shape[0] == 0:
            raise _Defer  # unbatched inputs, empty batches: torch's kernel
        out_channels = w.shape[0]
        if x.shape[1] != w.shape[1] * groups or out_channels % groups or not out_channels:
            raise _Defer
        tensors = [x, w]
        if bias is not None:
            b = _plain(bias)
            if b.shape != (out_channels,):
                raise _Defer
            tensors.append(b)
        dtype = _same_dtype(*tensors)
        strides = _ints(stride, spatial, 1)
        paddings = _ints(padding, spatial, 0)
        dilations = _ints(dilation, spatial, 1)
        sizes = []
        for length, kernel, step, pad, spread in zip(
            x.shape[2:], w.shape[2:], strides, paddings, dilations, strict=True
        ):
            span = length + 2 * pad - spread * (kernel - 1) - 1
            if span < 0 or kernel < 1:
                raise _Defer
            sizes.append(span // step + 1)
        return _empty((x.shape[0], out_channels, *sizes), dtype)

    return conv


def _pool_size(length: int, kernel: int, pad: int, step: int, spread: int, ceil: bool) -> int:
    """torch's ``pooling_output_shape``."""
    if pad > kernel // 2:
        raise _Defer  # torch refuses padding past half the kernel
    numerator = length + 2 * pad - spread * (kernel - 1) - 1 + (step - 1 if ceil else 0)
    size = math.floor(numerator / step) + 1
    if ceil and (size - 1) * step >= length + pad:
        size -= 1
    if size < 1:
        raise _Defer
    return size


def _pool2d(
    input: Any, kernel_size: Any, stride: Any, padding: Any, dilation: Any, ceil_mode: Any
) -> torch.Tensor:
    x = _plain(input)
    if x.dim() not in (3, 4) or 0 in x.shape[:-2] or type(ceil_mode) is not bool:
        raise _Defer
    kernels = _ints(kernel_size, 2, 1)
    strides = kernels if stride is None or stride == [] or stride == () else _ints(stride, 2, 1)
    paddings = _ints(padding, 2, 0)
    dilations = _ints(dilation, 2, 1)
    sizes = [
        _pool_size(length, kernel, pad, step, spread, ceil_mode)
        for length, kernel, pad, step, spread in zip(
            x.shape[-2:], kernels, paddings, strides, dilations, strict=True
        )
    ]
    return _empty((*x.shape[:-2], *sizes), x.dtype)


def _max_pool2d(
    input: Any,
    kernel_size: Any,
    stride: Any = None,
    padding: Any = 0,
    dilation: Any = 1,
    ceil_mode: Any = False,
    return_indices: Any = False,
) -> torch.Tensor:
    if return_indices is not False:
        raise _Defer
    return _pool2d(input, kernel_size, stride, padding, dilation, ceil_mode)


def _avg_pool2d(
    input: Any,
    kernel_size: Any,
    stride: Any = None,
    padding: Any = 0,
    ceil_mode: Any = False,
    count_include_pad: Any = True,
    divisor_override: Any = None,
) -> torch.Tensor:
    if type(count_include_pad) is not bool or divisor_override is not None:
        raise _Defer
    return _pool2d(input, kernel_size, stride, padding, 1, ceil_mode)


# -- losses -----------------------------------------------------------------------------------


def _reduced(reduction: Any, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    if reduction not in _REDUCTIONS:
        raise _Defer
    return _empty(shape if reduction == "none" else (), dtype)


def _class_targets(x: torch.Tensor, target: Any) -> tuple[int, ...]:
    """The per-example shape of a loss on ``x`` with class-index ``target``s."""
    labels = _plain(target, frozenset({torch.int64}))
    expected = () if x.dim() == 1 else (x.shape[0], *x.shape[2:])
    if x.dim() < 1 or tuple(labels.shape) != expected:
        raise _Defer
    return expected


def _cross_entropy(
    input: Any,
    target: Any,
    weight: Any = None,
    size_average: Any = None,
    ignore_index: Any = -100,
    reduce: Any = None,
    reduction: Any = "mean",
    label_smoothing: Any = 0.0,
) -> torch.Tensor:
    x = _plain(input)
    if weight is not None or size_average is not None or reduce is not None:
        raise _Defer
    if type(ignore_index) is not int:
        raise _Defer
    _probability(label_smoothing)
    if isinstance(target, torch.Tensor) and target.dtype in _FLOATING:  # class probabilities
        if x.dim() < 1 or _plain(target).shape != x.shape:
            raise _Defer
        _same_dtype(x, target)
        shape: tuple[int, ...] = () if x.dim() == 1 else (x.shape[0], *x.shape[2:])
    else:
        shape = _class_targets(x, target)
    return _reduced(reduction, shape, x.dtype)


def _nll_loss(
    input: Any,
    target: Any,
    weight: Any = None,
    size_average: Any = None,
    ignore_index: Any = -100,
    reduce: Any = None,
    reduction: Any = "mean",
) -> torch.Tensor:
    x = _plain(input)
    if weight is not None or size_average is not None or reduce is not None:
        raise _Defer
    if type(ignore_index) is not int or x.dim() > 2:
        raise _Defer
    return _reduced(reduction, _class_targets(x, target), x.dtype)


def _pointwise_loss(
    input: Any,
    target: Any,
    size_average: Any = None,
    reduce: Any = None,
    reduction: Any = "mean",
    weight: Any = None,
) -> torch.Tensor:
    x, y = _plain(input), _plain(target)
    if size_average is not None or reduce is not None or weight is not None:
        raise _Defer
    if x.shape != y.shape:
        raise _Defer  # torch broadcasts, and warns
    return _reduced(reduction, x.shape, _same_dtype(x, y))


#: The rules, by the function torch passes to ``__torch_function__``.
RULES: dict[Callable[..., Any], Callable[..., torch.Tensor]] = {
    torch.relu: _unary,
    F.relu: _unary,
    torch.Tensor.relu: _unary,
    torch.sigmoid: _unary,
    torch.Tensor.sigmoid: _unary,
    torch.tanh: _unary,
    torch.Tensor.tanh: _unary,
    F.silu: _unary,
    F.leaky_relu: _leaky_relu,
    F.dropout: _dropout,
    F.softmax: _softmax,
    F.log_softmax: _softmax,
    # ``x + y``, ``2 * x``, ``operator.add(x, y)`` arrive as Tensor.add, Tensor.mul...
    torch.Tensor.add: _binary,
    torch.Tensor.sub: _binary,
    torch.Tensor.mul: _binary,
    torch.Tensor.div: _binary,
    torch.Tensor.__rsub__: _binary,
    torch.Tensor.__rdiv__: _binary,
    torch.add: _binary,
    torch.sub: _binary,
    torch.mul: _binary,
    torch.div: _binary,
    F.linear: _linear,
    torch.conv1d: _conv(1),
    torch.conv2d: _conv(2),
    F.max_pool2d: _max_pool2d,
    F.avg_pool2d: _avg_pool2d,
    F.cross_entropy: _cross_entropy,
    F.nll_loss: _nll_loss,
    F.mse_loss: _pointwise_loss,
    F.l1_loss: _pointwise_loss,
}


class _ShapeRules(TorchFunctionMode):
    """Answers the calls :data:`RULES` covers; hands every other call to torch."""

    def __init__(self) -> None:
        super().__init__()
        #: Calls answered by a rule, and the functions of those handed to torch (for tests).
        self.answered = 0
        self.deferred: list[Callable[..., Any]] = []

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        try:
            rule = RULES.get(func)
        except TypeError:  # an unhashable callable: no rule names it
            rule = None
        if rule is not None:
            try:
                result = rule(*args, **kwargs)
            except (_Defer, TypeError, ValueError, IndexError):
                pass  # not a call the rule models (TypeError: arguments it does not take)
            else:
                self.answered += 1
                return result
        if func is not torch._C._set_grad_enabled:  # no_grad() entered inside the mode
            self.deferred.append(func)
        return func(*args, **kwargs)  # the mode is off inside its own handler


def shape_rules() -> _ShapeRules:
    """A context in which :data:`RULES` answer their calls on meta tensors (see the header)."""
    return _ShapeRules()
