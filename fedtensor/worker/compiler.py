"""The worker's side of plans: a plan received as data, checked and made runnable.

Theory of operation
-------------------
A plan (:mod:`fedtensor.protocol.plan`) arrives as plain wire values from a client
the worker does not trust. :func:`compile_plan` reads it once, before any of it
runs, and refuses it whole if any part is wrong: a malformed node or a ``Ref``
that does not name an earlier node (:class:`~fedtensor.PlanError`), an operation
off the allow-list or an attribute a plan may not read
(:class:`~fedtensor.ForbiddenOperation`), more than
:data:`~fedtensor.protocol.plan.MAX_NODES` nodes. What it builds,
:class:`CompiledPlan`, is a flat list of steps with every operation already
resolved to its callable, so that running a step per batch looks nothing up by
name and needs no :mod:`torch.fx`.

What compiling cannot see, the plan's Python arithmetic on sizes, is bounded as it
runs: the operators come from :data:`fedtensor.protocol.plan.OPERATORS`, which raise
:class:`~fedtensor.PlanError` rather than build huge ints or sequences.
:func:`state_entries` checks the model state a client sends with the plan.
What a step allocates is measured before training starts by
:meth:`CompiledPlan.dry_run`, one run on ``meta`` tensors that checks each node's
output against the client's memory budget (:mod:`fedtensor.worker.budget`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fedtensor.errors import ForbiddenOperation, PlanError
from fedtensor.protocol import plan as _plan
from fedtensor.protocol.messages import Ref

__all__ = ["CompiledPlan", "compile_plan", "state_entries"]

# What a step does, the first item of each of CompiledPlan's steps.
_CALL, _INPUT, _STATE, _VALUE = range(4)


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
            if kind == _CALL:
                append(target(*_bind(values, args), **_bind(values, kwargs)))
            elif kind == _INPUT:
                append(inputs[target])
            elif kind == _STATE:
                append(state[target])
            else:
                append(target)
        return _bind(values, self._output)

    def dry_run(self, state: Mapping[str, torch.Tensor], *inputs: Any, limit: int) -> int:
        """Bytes one step allocates, node by node, from a run on ``meta`` tensors.

        ``state`` and ``inputs`` are meta tensors (shapes, no memory). Every node's
        output stays alive until the step ends (``run`` keeps them), so their sum
        is the step's peak before backward. Raises :class:`MemoryError` naming the
        node once one node, or the sum, passes ``limit``, or when a node has no
        meta kernel (its output size depends on the data): then nothing bounds
        what the nodes after it allocate, and the plan is not run.
        """
        values: list[Any] = []
        append = values.append
        known = {value.untyped_storage()._cdata for value in state.values()}
        known.update(
            value.untyped_storage()._cdata for value in inputs if isinstance(value, torch.Tensor)
        )  # run_plan's inputs may be other values (numbers): passed as they are
        total = 0
        with torch.no_grad():
            for position, (kind, target, args, kwargs) in enumerate(self._steps):
                if kind == _CALL:
                    try:
                        value = target(*_bind(values, args), **_bind(values, kwargs))
                    except PlanError:
                        raise
                    except Exception as exc:
                        raise MemoryError(
                            f"the memory of plan node {position} ({_name(target)}) cannot be "
                            "bounded before it runs (its output size depends on the data)"
                        ) from exc
                    size = _meta_bytes(value, known)
                    total += size
                    if size > limit or total > limit:
                        raise MemoryError(
                            f"plan node {position} ({_name(target)}) would allocate {size} "
                            f"bytes, {total} with the nodes before it"
                        )
                    append(value)
                elif kind == _INPUT:
                    append(inputs[target])
                elif kind == _STATE:
                    append(state[target])
                else:
                    append(target.to("meta") if isinstance(target, torch.Tensor) else target)
        return total


def _name(target: Any) -> str:
    return str(getattr(target, "__qualname__", None) or getattr(target, "__name__", target))


def _meta_bytes(value: Any, known: set[int]) -> int:
    """Bytes of the storages in ``value`` not in ``known`` (which it then joins)."""
    if isinstance(value, torch.Tensor):
        storage = value.untyped_storage()
        if storage._cdata in known:
            return 0
        known.add(storage._cdata)
        return storage.nbytes()
    if isinstance(value, list | tuple):
        return sum(_meta_bytes(item, known) for item in value)
    if isinstance(value, dict):
        return sum(_meta_bytes(item, known) for item in value.values())
    return 0


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
    if not isinstance(wire, dict) or wire.get("format") != _plan.FORMAT:
        raise PlanError(f"not a plan of format {_plan.FORMAT}")
    nodes, trainable = wire.get("nodes"), wire.get("trainable")
    if not isinstance(nodes, list) or not isinstance(trainable, list):
        raise PlanError("a plan needs a list of nodes and a list of trainable keys")
    if len(nodes) > _plan.MAX_NODES:
        raise PlanError(f"a plan of {len(nodes)} nodes is over the limit of {_plan.MAX_NODES}")
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
            if target == "getattr":
                if len(args) != 2 or not (isinstance(args[1], str) and args[1] in _plan.ATTRIBUTES):
                    raise ForbiddenOperation(
                        "ForbiddenOperation",
                        f"a plan may not read the attribute {args[1:2]!r}",
                        "(plan)",
                    )
                func = _plan.plan_getattr
            else:
                found = _plan.operation(target)
                if found is None:
                    raise ForbiddenOperation(
                        "ForbiddenOperation", f"operation {target!r} is not allowed", "(plan)"
                    )
                func = found
            steps.append((_CALL, func, tuple(args), kwargs))
        elif kind == "input":
            if target not in (0, 1):
                raise PlanError(f"node {position}: a plan has inputs 0 and 1 only")
            steps.append((_INPUT, target, (), {}))
        elif kind == "state":
            if not isinstance(target, str):
                raise PlanError(f"node {position}: a state key is a string")
            state_keys.add(target)
            steps.append((_STATE, target, (), {}))
        elif kind == "value":
            if len(args) != 1 or not isinstance(args[0], torch.Tensor):
                raise PlanError(f"node {position}: a value node holds one tensor")
            steps.append((_VALUE, args[0], (), {}))
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
