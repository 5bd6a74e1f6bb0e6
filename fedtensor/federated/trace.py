"""Tracing: a model's training step turned into a plan (:mod:`fedtensor.protocol.plan`).

Theory of operation
-------------------
:func:`trace` runs :mod:`torch.fx`'s symbolic tracer over ``loss(model(x), y)``
and writes the graph it records as a plan's wire nodes. This is the client's
side of plans, and the only part of fedtensor that imports :mod:`torch.fx`:
a worker checks and runs plans (:mod:`fedtensor.worker.compiler`) without it.

Tracing inlines every module, user-defined or built in, down to torch
functions and tensor methods: ``nn.Conv2d`` becomes ``torch.conv2d`` on the
``"conv.weight"`` entry of the state dict, ``nn.CrossEntropyLoss`` becomes
``torch.nn.functional.cross_entropy``. Parameters and buffers are named by their
``state_dict`` keys, so the state that travels is exactly ``model.state_dict()``.
Every call is named as the allow-list names it (:func:`fedtensor.protocol.plan.operation`),
so a model that calls anything a worker would refuse fails here, with
:class:`~fedtensor.ForbiddenOperation`, not on the workers.

Given an example batch (:func:`fedtensor.fit` takes the shapes of the data on the
workers), every traced value also has example values, computed on shape-only
("meta") tensors for two batch sizes: an ``if`` on a rank or a shape, as in
``nn.LSTM`` or attention layers, is then settled while tracing, and the
straight line taken is the plan. A branch on tensor values, or on anything that
differs between the two batch sizes, cannot be settled and raises
:class:`~fedtensor.PlanError`. Normalisation layers, whose only branch checks the rank of
their input, are traced with that check skipped even without an example;
``assert`` statements on traced values are dropped (they held for the examples).
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from fedtensor.errors import ForbiddenOperation, PlanError
from fedtensor.protocol import ops as _ops
from fedtensor.protocol import plan as _plan
from fedtensor.protocol.messages import Ref

__all__ = ["EXAMPLE_BATCHES", "Plan", "trace", "trace_forward"]

#: The two batch sizes a traced model runs on, on the meta device, to settle control flow.
EXAMPLE_BATCHES = (2, 3)

_EXAMPLES = "fedtensor_examples"


@dataclass(frozen=True)
class Plan:
    """A traced training step: what :func:`trace` returns and a worker runs."""

    #: The plan as wire values (see :mod:`fedtensor.protocol.plan`).
    wire: dict[str, Any]
    #: The state-dict keys of the parameters training updates.
    trainable: tuple[str, ...]
    #: How many operations one step runs.
    operations: int


def _operation_name(node: torch.fx.Node) -> str:
    """The allow-list name for what ``node`` calls; ForbiddenOperation if there is none."""
    target = node.target
    if node.op == "call_method":
        assert isinstance(target, str)
        name = f"Tensor.{target}"
        if name in _ops.OPERATIONS and target not in _ops.ATTRIBUTES:
            return name
    elif target is builtins.getattr:
        attribute = node.args[1] if len(node.args) > 1 else None
        if attribute in _plan.ATTRIBUTES:
            return "getattr"
        raise ForbiddenOperation(
            "ForbiddenOperation", f"a plan may not read the attribute {attribute!r}", "(plan)"
        )
    else:
        found = _ops.FUNCTION_NAMES.get(target)
        if found is None and getattr(target, "__module__", None) in {"_operator", "operator"}:
            found = f"operator.{getattr(target, '__name__', '')}"
        if found is None:
            found = next((name for name, f in _plan.FACTORIES.items() if f is target), None)
        if found is not None and _plan.operation(found) is not None:
            return found
    shown = target if isinstance(target, str) else getattr(target, "__qualname__", repr(target))
    raise ForbiddenOperation(
        "ForbiddenOperation", f"operation {shown!r} is not allowed on a worker", "(plan)"
    )


class _Unknown(Exception):
    """A node whose example values cannot be computed."""


class _PlanTracer(torch.fx.Tracer):
    """Inlines every module (the worker has none of their code) and proxies buffers too.

    Given example inputs, every node also gets example values: the node run on
    shape-only ("meta") tensors twice, once per batch size of
    :data:`EXAMPLE_BATCHES`. An ``if`` on a traced value (``x.dim() == 3``, a
    shape check) is then settled at trace time when both examples agree and the
    value is not a tensor's data; otherwise tracing fails as without examples.
    """

    proxy_buffer_attributes = True

    def __init__(self, examples: tuple[tuple[torch.Tensor, ...], ...] | None) -> None:
        super().__init__()
        self._examples = examples  # per batch size: the meta inputs
        self._placeholders = 0
        self._tensors: dict[str, torch.Tensor] | None = None

    def create_node(
        self, kind: Any, target: Any, args: Any, kwargs: Any, *rest: Any, **options: Any
    ) -> Any:
        node = super().create_node(kind, target, args, kwargs, *rest, **options)
        if kind == "placeholder":
            node.meta["position"] = self._placeholders
            self._placeholders += 1
        if self._examples is not None:
            # No example (an op without a meta kernel, an unknown input): an `if` on
            # this node fails as it would without examples.
            try:
                node.meta[_EXAMPLES] = tuple(
                    self._example(node, variant) for variant in range(len(self._examples))
                )
            except Exception as exc:
                node.meta["why_no_example"] = f"{type(exc).__name__}: {exc}"
        return node

    def _example(self, node: torch.fx.Node, variant: int) -> Any:
        assert self._examples is not None
        kind, target, args, kwargs = node.op, node.target, node.args, node.kwargs
        if kind == "placeholder":
            return self._examples[variant][node.meta["position"]]
        if kind == "get_attr":
            # Not getattr: while tracing, a module's attributes are proxies.
            if self._tensors is None:
                self._tensors = dict(self.root.named_parameters(remove_duplicate=False))
                self._tensors.update(self.root.named_buffers(remove_duplicate=False))
            return _to_meta(self._tensors[str(target)])

        def example_of(value: Any) -> Any:
            if isinstance(value, torch.fx.Node):
                found = value.meta.get(_EXAMPLES)
                if found is None:
                    raise _Unknown(value.name)
                return found[variant]
            if isinstance(value, (tuple, list)):
                return type(value)(example_of(item) for item in value)
            if isinstance(value, dict):
                return {key: example_of(item) for key, item in value.items()}
            return _to_meta(value)

        # Outside tracing's own hooks: the examples are plain meta tensors.
        with torch.no_grad(), torch._C.DisableTorchFunction():
            if kind == "call_function":
                assert callable(target)
                return target(*example_of(args), **example_of(kwargs))
            if kind == "call_method":
                receiver, *rest = example_of(args)
                return getattr(receiver, str(target))(*rest, **example_of(kwargs))
        raise _Unknown(kind)  # the output node: nothing to compute

    def to_bool(self, obj: torch.fx.Proxy) -> bool:
        found = obj.node.meta.get(_EXAMPLES)
        if found is None:
            return super().to_bool(obj)
        if any(isinstance(value, torch.Tensor) for value in found):
            raise torch.fx.proxy.TraceError(
                "control flow depends on the values in a tensor, which a plan cannot follow"
            )
        if any(value != found[0] for value in found):
            raise torch.fx.proxy.TraceError("control flow depends on the batch size")
        return bool(found[0])

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return False

    def call_module(
        self,
        m: torch.nn.Module,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        if not hasattr(type(m), "_check_input_dim"):
            return super().call_module(m, forward, args, kwargs)
        # Batch and instance norms check their input's rank with an `if` on it,
        # which symbolic tracing cannot follow; the check is validation only.
        m.__dict__["_check_input_dim"] = _skip_check
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            del m.__dict__["_check_input_dim"]


def _skip_check(_input: Any) -> None:
    pass


def _to_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.empty_like(value, device="meta")
    return value


class _TrainingStep(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, loss: Callable[..., Any]) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, x: Any, y: Any) -> Any:
        output = self.model(x)
        return self.loss(output, y), output


def trace(
    model: torch.nn.Module,
    loss: Callable[..., Any],
    example: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    training: bool = True,
) -> Plan:
    """Trace ``loss(model(x), y)`` (in training mode) into a :class:`Plan`.

    ``training=False`` traces the model in evaluation mode instead (dropout off,
    batch norms on their running statistics): the plan federated evaluation runs.

    ``example`` is an ``(x, y)`` batch, or tensors shaped like one (only their
    shapes past the first dimension and their dtypes are used): with it, control
    flow on shapes and ranks (the checks in ``nn.LSTM``, attention layers) is
    settled while tracing. Raises :class:`ForbiddenOperation` if the model
    calls anything a worker would refuse, and :class:`PlanError` if its control
    flow, or a Python number it computes (``int(x.sum())``), depends on tensor
    values (or, with an example, on the batch size).
    """
    was_training = model.training
    model.train(training)
    step = _TrainingStep(model, loss)
    examples = None
    if example is not None:
        examples = tuple(
            tuple(
                torch.empty((batch, *value.shape[1:]), dtype=value.dtype, device="meta")
                for value in example
            )
            for batch in EXAMPLE_BATCHES
        )
    try:
        graph = _PlanTracer(examples).trace(step)
    except torch.fx.proxy.TraceError as exc:
        raise PlanError(
            f"cannot trace {type(model).__name__}: {exc} (a plan is a straight-line graph; "
            "control flow may depend on the model's settings, not on tensor values)"
        ) from exc
    except (TypeError, RuntimeError) as exc:
        # What fx raises for int(), float(), len(), range() or a list index taken of a
        # traced value: a Python number computed from a tensor, which no plan can hold.
        raise PlanError(
            f"cannot trace {type(model).__name__}: {exc} (a plan is a straight-line graph; "
            "Python numbers may come from the model's settings and shapes, not from tensors)"
        ) from exc
    finally:
        model.train(was_training)
    nodes = _wire_nodes(graph, step, model, f"cannot trace {type(model).__name__}")
    trainable = tuple(
        name
        for name, value in model.state_dict(keep_vars=True).items()
        if isinstance(value, torch.nn.Parameter) and value.requires_grad
    )
    wire = {"format": _plan.FORMAT, "nodes": nodes, "trainable": list(trainable)}
    return Plan(wire, trainable, sum(1 for entry in nodes if entry[0] == "call"))


def _fetch_attribute(root: torch.nn.Module, path: str) -> Any:
    value: Any = root
    for part in path.split("."):
        value = getattr(value, part)
    return value


def trace_forward(
    module: torch.nn.Module, examples: Sequence[torch.Tensor], *, name: str
) -> dict[str, Any]:
    """``module.forward`` on ``examples`` as a plan's wire values: a forward-only plan
    (PySyft's ``sy.Plan``, run by ``fedtensor.run_plan``), where :func:`trace` makes a
    training step. ``name`` names the plan in errors."""
    metas = (tuple(torch.empty_like(example, device="meta") for example in examples),)
    tracer = _PlanTracer(metas)
    try:
        graph = tracer.trace(module)
    except torch.fx.proxy.TraceError as exc:
        raise PlanError(
            f"cannot build plan {name!r}: {exc} (a plan is a straight-line graph)"
        ) from exc
    except (TypeError, RuntimeError) as exc:
        raise PlanError(
            f"cannot build plan {name!r}: {exc} (Python numbers in a plan may "
            "come from shapes and settings, not from tensor values)"
        ) from exc
    nodes = _wire_nodes(graph, module, module, f"cannot build plan {name!r}")
    return {"format": _plan.FORMAT, "nodes": nodes, "trainable": []}


def _wire_nodes(
    graph: torch.fx.Graph, root: torch.nn.Module, model: torch.nn.Module, failure: str
) -> list[list[Any]]:
    """``graph`` (traced from ``root``) as a plan's wire nodes; ``model``'s parameters and
    buffers, found by identity, become ``state`` nodes under their state-dict names.
    ``failure`` opens the message of a :class:`PlanError`."""
    state_names = {id(value): name for name, value in model.state_dict(keep_vars=True).items()}
    qualified: dict[str, torch.Tensor] = dict(root.named_parameters(remove_duplicate=False))
    qualified.update(root.named_buffers(remove_duplicate=False))
    index: dict[torch.fx.Node, int] = {}
    nodes: list[list[Any]] = []

    def wire_arg(value: Any) -> Any:
        if isinstance(value, torch.fx.Node):
            return Ref(index[value])
        # Plain containers: fx's own (immutable_list, immutable_dict) do not travel.
        if isinstance(value, tuple):
            return tuple(wire_arg(item) for item in value)
        if isinstance(value, list):
            return [wire_arg(item) for item in value]
        if isinstance(value, dict):
            return {str(key): wire_arg(item) for key, item in value.items()}
        if isinstance(value, torch.device):
            return str(value)
        if (
            value is None
            or isinstance(value, (bool, int, float, complex, str, slice, torch.dtype, torch.Tensor))
            or value is Ellipsis
        ):
            return value
        raise PlanError(f"{failure}: a {type(value).__name__} constant cannot travel in a plan")

    inputs = 0
    for node in graph.nodes:
        if node.op == "placeholder":
            entry: list[Any] = ["input", inputs, (), {}]
            inputs += 1
        elif node.op == "get_attr":
            assert isinstance(node.target, str)
            tensor = qualified.get(node.target)
            if tensor is None:
                tensor = _fetch_attribute(root, node.target)
            state_name = state_names.get(id(tensor))
            if state_name is not None:
                entry = ["state", state_name, (), {}]
            elif isinstance(tensor, torch.Tensor):
                entry = ["value", None, (tensor.detach().clone(),), {}]
            else:
                raise PlanError(f"{failure}: {node.target} is no tensor")
        elif node.op == "call_function" and node.target is torch._assert:
            continue  # an `assert` on traced values, true for the examples: validation only
        elif node.op in ("call_function", "call_method"):
            entry = ["call", _operation_name(node), wire_arg(node.args), wire_arg(node.kwargs)]
        elif node.op == "output":
            entry = ["output", None, (wire_arg(node.args[0]),), {}]
        else:  # call_module: is_leaf_module says never
            raise PlanError(f"{failure}: unexpected {node.op} node")
        index[node] = len(nodes)
        nodes.append(entry)
    return nodes
