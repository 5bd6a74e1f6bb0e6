"""Plans: a model's training step as data, so that a worker runs it without its code.

A worker never receives Python code, so a user's ``torch.nn.Module`` cannot
travel as itself. Instead the client traces it once, here, into a *plan*: the
straight-line graph of tensor operations its forward pass and loss perform,
written as plain wire values (lists, strings, numbers, tensors). The worker
checks every operation in it against the same allow-list that guards single
commands (:mod:`fedtensor.protocol.ops`) and then runs it once per batch, with autograd,
on its own copy of the model's state. PySyft 0.2 had the same idea under the
same name; here the graph comes from :mod:`torch.fx`.

Tracing inlines every module, user-defined or built in, down to torch
functions and tensor methods: ``nn.Conv2d`` becomes ``torch.conv2d`` on the
``"conv.weight"`` entry of the state dict, ``nn.CrossEntropyLoss`` becomes
``torch.nn.functional.cross_entropy``. Parameters and buffers are named by their
``state_dict`` keys, so the state that travels is exactly ``model.state_dict()``.
Given an example batch (:func:`fedtensor.fit` takes the shapes of the data on the
workers), every traced value also has example values, computed on shape-only
("meta") tensors for two batch sizes: an ``if`` on a rank or a shape, as in
``nn.LSTM`` or attention layers, is then settled while tracing, and the
straight line taken is the plan. A branch on tensor values, or on anything that
differs between the two batch sizes, cannot be settled and raises
:class:`PlanError`. Normalisation layers, whose only branch checks the rank of
their input, are traced with that check skipped even without an example;
``assert`` statements on traced values are dropped (they held for the examples).
Plans may also call a few factories (``torch.zeros`` and friends, for a
recurrent layer's initial state) that single commands cannot.

The wire form of a plan is a dict::

    {"format": 1, "nodes": [node, ...], "trainable": [key, ...]}
    node := ["input", position, (), {}]          # x is input 0, y is input 1
          | ["state", key, (), {}]               # an entry of the state dict
          | ["value", None, (tensor,), {}]       # a constant tensor of the model
          | ["call", operation, args, kwargs]    # an allow-listed operation
          | ["output", None, (outputs,), {}]     # (loss, model output)

where ``Ref(i)`` inside ``args`` and ``kwargs`` stands for the value of node ``i``.
"""

from __future__ import annotations

import builtins
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from fedtensor.errors import ForbiddenOperation, PlanError
from fedtensor.protocol import ops as _ops
from fedtensor.protocol.messages import Ref

__all__ = ["CompiledPlan", "Plan", "compile_plan", "state_entries", "trace"]

FORMAT = 1
#: More nodes than this is not a model a worker agreed to run.
MAX_NODES = 100_000

#: Python ints, and tuples or lists, that a plan's operators make stay this small: on
#: plain Python objects, ``2 ** 10**9`` or a list doubled at every node would hold the
#: worker's interpreter (and every client's event loop with it) for minutes.
MAX_INT_BITS = 4096
MAX_SEQUENCE = 4096


def _bounded(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` on Python operands only when neither operands nor result are huge.

    Tensors pass through untouched (their operations are bounded by their sizes).
    """

    def checked(*operands: Any) -> Any:
        for operand in operands:
            if type(operand) is int and operand.bit_length() > MAX_INT_BITS:
                raise PlanError(f"a plan's Python ints stay within {MAX_INT_BITS} bits")
            if isinstance(operand, (str, bytes)):
                raise PlanError("a plan's operators take tensors and numbers, not strings")
        if (
            function is operator.pow
            and all(type(o) is int for o in operands)
            and not 0 <= operands[1] <= 64
        ):
            raise PlanError("a plan raises Python ints to powers from 0 to 64 only")
        if function is operator.mul and any(isinstance(o, (tuple, list)) for o in operands):
            count = next((o for o in operands if type(o) is int), 0)
            sequence = next(o for o in operands if isinstance(o, (tuple, list)))
            if count * len(sequence) > MAX_SEQUENCE:
                raise PlanError(f"a plan's sequences stay within {MAX_SEQUENCE} items")
        result = function(*operands)
        if type(result) is int and result.bit_length() > MAX_INT_BITS:
            raise PlanError(f"a plan's Python ints stay within {MAX_INT_BITS} bits")
        if isinstance(result, (tuple, list)) and len(result) > MAX_SEQUENCE:
            raise PlanError(f"a plan's sequences stay within {MAX_SEQUENCE} items")
        return result

    return checked


# Python operators fx records between tensors and sizes (``x.size(0) * 2``). Comparisons
# and getitem cannot grow anything; arithmetic is bounded on Python operands.
_OPERATORS: dict[str, Callable[..., Any]] = {
    **{
        f"operator.{name}": getattr(operator, name)
        for name in ("eq", "ne", "lt", "le", "gt", "ge", "getitem", "not_", "neg", "pos", "abs")
    },
    **{
        f"operator.{name}": _bounded(getattr(operator, name))
        for name in (
            "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and_", "or_",
        )
    },
}  # fmt: skip
# Attributes a plan may read with ``getattr`` (fx records ``x.shape`` that way).
_PLAN_ATTRIBUTES = frozenset(
    {"shape", "dtype", "device", "ndim", "T", "mT", "is_cuda", "is_nested", "requires_grad"}
)
# Factories a plan may call (a recurrent layer's zero state), though a single command
# cannot: they take no tensor, so there is no pointer to send them with. Their
# memory is initialised.
_PLAN_FACTORIES: dict[str, Callable[..., Any]] = {
    f"torch.{name}": getattr(torch, name) for name in ("zeros", "ones", "full", "arange", "eye")
}


def _plan_getattr(value: Any, name: str) -> Any:
    return getattr(value, name)


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
        if attribute in _PLAN_ATTRIBUTES:
            return "getattr"
        raise ForbiddenOperation(
            "ForbiddenOperation", f"a plan may not read the attribute {attribute!r}", "(plan)"
        )
    else:
        found = _ops.FUNCTION_NAMES.get(target)
        if found is None and getattr(target, "__module__", None) in {"_operator", "operator"}:
            found = f"operator.{getattr(target, '__name__', '')}"
        if found is None:
            found = next((name for name, f in _PLAN_FACTORIES.items() if f is target), None)
        if found is not None and (
            found in _ops.OPERATIONS or found in _OPERATORS or found in _PLAN_FACTORIES
        ):
            return found
    shown = target if isinstance(target, str) else getattr(target, "__qualname__", repr(target))
    raise ForbiddenOperation(
        "ForbiddenOperation", f"operation {shown!r} is not allowed on a worker", "(plan)"
    )


_EXAMPLES = "fedtensor_examples"
#: The two batch sizes a traced model runs on, on the meta device, to settle control flow.
EXAMPLE_BATCHES = (2, 3)


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


@dataclass(frozen=True)
class Plan:
    """A traced training step: what :func:`trace` returns and a worker runs."""

    #: The plan as wire values (see the module docstring).
    wire: dict[str, Any]
    #: The state-dict keys of the parameters training updates.
    trainable: tuple[str, ...]
    #: How many operations one step runs.
    operations: int


def trace(
    model: torch.nn.Module,
    loss: Callable[..., Any],
    example: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Plan:
    """Trace ``loss(model(x), y)`` (in training mode) into a :class:`Plan`.

    ``example`` is an ``(x, y)`` batch, or tensors shaped like one (only their
    shapes past the first dimension and their dtypes are used): with it, control
    flow on shapes and ranks (the checks in ``nn.LSTM``, attention layers) is
    settled while tracing. Raises :class:`ForbiddenOperation` if the model
    calls anything a worker would refuse, and :class:`PlanError` if its control
    flow depends on tensor values (or, with an example, on the batch size).
    """
    was_training = model.training
    model.train()
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
    finally:
        model.train(was_training)
    # Parameters and buffers are found by identity, under their state-dict names.
    state_names = {id(value): name for name, value in model.state_dict(keep_vars=True).items()}
    qualified: dict[str, torch.Tensor] = dict(step.named_parameters(remove_duplicate=False))
    qualified.update(step.named_buffers(remove_duplicate=False))
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
        raise PlanError(
            f"cannot trace {type(model).__name__}: a {type(value).__name__} constant "
            "cannot travel in a plan"
        )

    inputs = 0
    for node in graph.nodes:
        if node.op == "placeholder":
            entry: list[Any] = ["input", inputs, (), {}]
            inputs += 1
        elif node.op == "get_attr":
            assert isinstance(node.target, str)
            tensor = qualified.get(node.target)
            if tensor is None:
                tensor = _fetch_attribute(step, node.target)
            name = state_names.get(id(tensor))
            if name is not None:
                entry = ["state", name, (), {}]
            elif isinstance(tensor, torch.Tensor):
                entry = ["value", None, (tensor.detach().clone(),), {}]
            else:
                raise PlanError(f"cannot trace {type(model).__name__}: {node.target} is no tensor")
        elif node.op == "call_function" and node.target is torch._assert:
            continue  # an `assert` on traced values, true for the examples: validation only
        elif node.op in ("call_function", "call_method"):
            entry = ["call", _operation_name(node), wire_arg(node.args), wire_arg(node.kwargs)]
        elif node.op == "output":
            entry = ["output", None, (wire_arg(node.args[0]),), {}]
        else:  # call_module: is_leaf_module says never
            raise PlanError(f"cannot trace {type(model).__name__}: unexpected {node.op} node")
        index[node] = len(nodes)
        nodes.append(entry)
    trainable = tuple(
        name
        for name, value in model.state_dict(keep_vars=True).items()
        if isinstance(value, torch.nn.Parameter) and value.requires_grad
    )
    wire = {"format": FORMAT, "nodes": nodes, "trainable": list(trainable)}
    return Plan(wire, trainable, sum(1 for entry in nodes if entry[0] == "call"))


def _fetch_attribute(root: torch.nn.Module, path: str) -> Any:
    value: Any = root
    for part in path.split("."):
        value = getattr(value, part)
    return value


# -- the worker's side -----------------------------------------------------------------------------


class CompiledPlan:
    """A checked plan, ready to run one step on a batch."""

    __slots__ = ("_output", "_steps", "state_keys", "trainable")

    def __init__(
        self,
        steps: list[tuple[int, Any, Any, Any]],
        output: Any,
        trainable: tuple[str, ...],
        state_keys: frozenset[str],
    ) -> None:
        self._steps = steps
        self._output = output
        self.trainable = trainable
        self.state_keys = state_keys

    def run(self, state: Mapping[str, torch.Tensor], *inputs: Any) -> Any:
        """One step: the plan's outputs for ``inputs``, reading (and updating) ``state``."""
        values: list[Any] = []
        append = values.append
        for kind, target, args, kwargs in self._steps:
            if kind == 0:  # call
                append(target(*_bind(values, args), **_bind(values, kwargs)))
            elif kind == 1:
                append(inputs[target])
            elif kind == 2:
                append(state[target])
            else:
                append(target)
        return _bind(values, self._output)


def _bind(values: list[Any], template: Any) -> Any:
    kind = type(template)
    if kind is Ref:
        return values[template]
    if kind is tuple:
        return tuple([_bind(values, item) for item in template])
    if kind is list:
        return [_bind(values, item) for item in template]
    if kind is dict:
        return {key: _bind(values, item) for key, item in template.items()}
    return template


def compile_plan(wire: Any) -> CompiledPlan:
    """Check a plan received from a client and make it runnable.

    Every operation must be on the allow-list (else :class:`ForbiddenOperation`);
    every ``Ref`` must name an earlier node (else :class:`PlanError`).
    """
    if not isinstance(wire, dict) or wire.get("format") != FORMAT:
        raise PlanError(f"not a plan of format {FORMAT}")
    nodes, trainable = wire.get("nodes"), wire.get("trainable")
    if not isinstance(nodes, list) or not isinstance(trainable, list):
        raise PlanError("a plan needs a list of nodes and a list of trainable keys")
    if len(nodes) > MAX_NODES:
        raise PlanError(f"a plan of {len(nodes)} nodes is over the limit of {MAX_NODES}")
    steps: list[tuple[int, Any, Any, Any]] = []
    state_keys: set[str] = set()
    output: Any = None
    for position, node in enumerate(nodes):
        if not isinstance(node, (list, tuple)) or len(node) != 4:
            raise PlanError(f"node {position} is not [kind, target, args, kwargs]")
        kind, target, args, kwargs = node
        if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict):
            raise PlanError(f"node {position}: args must be a list and kwargs a dict")
        _check_refs(args, position)
        _check_refs(kwargs, position)
        if output is not None:
            raise PlanError("the output node must be the last")
        if kind == "call":
            func = (
                _OPERATORS.get(target) or _PLAN_FACTORIES.get(target)
                if isinstance(target, str)
                else None
            )
            if target == "getattr":
                if len(args) != 2 or not (isinstance(args[1], str) and args[1] in _PLAN_ATTRIBUTES):
                    raise ForbiddenOperation(
                        "ForbiddenOperation",
                        f"a plan may not read the attribute {args[1:2]!r}",
                        "(plan)",
                    )
                func = _plan_getattr
            elif func is None:
                func = _ops.OPERATIONS.get(target) if isinstance(target, str) else None
                if func is None:
                    raise ForbiddenOperation(
                        "ForbiddenOperation", f"operation {target!r} is not allowed", "(plan)"
                    )
            steps.append((0, func, tuple(args), kwargs))
        elif kind == "input":
            if target not in (0, 1):
                raise PlanError(f"node {position}: a plan has inputs 0 and 1 only")
            steps.append((1, target, (), {}))
        elif kind == "state":
            if not isinstance(target, str):
                raise PlanError(f"node {position}: a state key is a string")
            state_keys.add(target)
            steps.append((2, target, (), {}))
        elif kind == "value":
            if len(args) != 1 or not isinstance(args[0], torch.Tensor):
                raise PlanError(f"node {position}: a value node holds one tensor")
            steps.append((3, args[0], (), {}))
        elif kind == "output":
            if len(args) != 1:
                raise PlanError("the output node holds one value")
            output = args[0]
        else:
            raise PlanError(f"node {position}: unknown kind {kind!r}")
    if output is None:
        raise PlanError("a plan ends with an output node")
    if not all(isinstance(key, str) and key in state_keys for key in trainable):
        raise PlanError("every trainable key must be a state entry the plan reads")
    return CompiledPlan(steps, output, tuple(trainable), frozenset(state_keys))


def _check_refs(value: Any, position: int) -> None:
    kind = type(value)
    if kind is Ref:
        if not 0 <= value < position:
            raise PlanError(f"node {position} refers to node {int(value)}, which is not before it")
    elif kind is tuple or kind is list:
        for item in value:
            _check_refs(item, position)
    elif kind is dict:
        for item in value.values():
            _check_refs(item, position)


def state_entries(plan: CompiledPlan, state: Any) -> dict[str, torch.Tensor]:
    """``state`` checked against what ``plan`` reads: a dict of tensors with every key."""
    if not isinstance(state, dict) or not all(
        isinstance(value, torch.Tensor) for value in state.values()
    ):
        raise PlanError("a model state is a dict of tensors")
    missing = plan.state_keys - state.keys()
    if missing:
        raise PlanError(f"the model state lacks {sorted(missing)}")
    return state
