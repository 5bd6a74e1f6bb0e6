"""PySyft 0.2's plans for :mod:`fedtensor.sync`: ``sy.func2plan`` and ``sy.Plan``.

Theory of operation
-------------------
A PySyft plan is a function (``@sy.func2plan()``) or a small model (a subclass of
``sy.Plan``, which is an ``nn.Module``) recorded once as a graph of operations, then
sent to a worker and run there, on the worker's data, as often as wanted::

    @sy.func2plan()
    def plan_double_abs(x):
        return torch.abs(x + x)

    plan_double_abs.build(torch.tensor([1.0, -2.0]))   # trace on an example
    pointer_plan = plan_double_abs.send(bob)          # graph and state stored on bob
    pointer_plan(x_ptr).get()                         # runs on bob

Here ``build`` traces the plan with the tracer of :func:`fedtensor.trace` (torch.fx,
every module inlined, every call named as the allow-list names it, so a plan that
calls anything a worker refuses fails while building, with
:class:`~fedtensor.ForbiddenOperation`) into the wire format of
:mod:`fedtensor.protocol.plan`, with one example per input (the given shapes, on the
meta device, settle control flow on shapes). Its state, a ``sy.Plan``'s parameters and
buffers or a function plan's ``state=`` tensors, becomes the plan's ``state`` entries.
``send`` stores the graph and a copy of the state on the worker (two stores, no round
trip) and returns a :class:`PointerPlan`; calling that queues one
``fedtensor.run_plan`` (:mod:`fedtensor.worker.plan_run`), which the worker compiles
and checks whole before running, and returns a pointer to the result at once. A plan
sent to several workers runs on each with its own copy of the state.

A plan has at most two inputs (the wire format's limit, which training plans share);
calling a built plan on local tensors runs it locally, as PySyft did.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fedtensor.client.handles import WorkerHandle
from fedtensor.client.pointer import PointerBase, call_on
from fedtensor.errors import LocationError, PlanError
from fedtensor.federated import trace as _trace

__all__ = ["Plan", "PlanNotBuilt", "PlanState", "PointerPlan", "func2plan"]

#: The most inputs a plan takes (the wire format's ``input`` nodes are 0 and 1).
MAX_INPUTS = 2


class PlanNotBuilt(PlanError, RuntimeError):
    """A plan was sent or inspected before ``build``; also a ``RuntimeError``, as in PySyft."""


class PlanState:
    """What a function plan's ``state`` argument is: ``state.read()`` gives its tensors."""

    def __init__(self, owner: torch.nn.Module, count: int) -> None:
        self._owner = owner
        self._count = count

    def read(self) -> tuple[Any, ...]:
        # Read as module attributes, so that tracing records them as state entries.
        return tuple(getattr(self._owner, f"state_{index}") for index in range(self._count))


class Plan(torch.nn.Module):
    """A model whose ``forward`` becomes a plan: subclass it as PySyft's ``sy.Plan``.

    ``build(*examples)`` traces ``forward`` on example tensors; ``send(worker)`` then
    stores the plan and the model's parameters on the worker and returns a
    :class:`PointerPlan`.
    """

    def __init__(self, name: str | None = None) -> None:
        super().__init__()
        self.plan_name = name or type(self).__name__
        self._wire: dict[str, Any] | None = None

    @property
    def is_built(self) -> bool:
        """Whether ``build`` has traced the plan."""
        return self._wire is not None

    def build(self, *examples: torch.Tensor) -> Plan:
        """Trace the plan on ``examples`` (tensors shaped like its inputs); returns it."""
        if not 1 <= len(examples) <= MAX_INPUTS:
            raise PlanError(f"a plan takes 1 to {MAX_INPUTS} inputs, not {len(examples)}")
        if not all(isinstance(example, torch.Tensor) for example in examples):
            raise PlanError("a plan is built on example tensors")
        self._wire = _trace.trace_forward(self._traced(), examples, name=self.plan_name)
        return self

    def _traced(self) -> torch.nn.Module:
        """The module whose ``forward`` is traced (the plan itself for a model)."""
        return self

    @property
    def operations(self) -> int:
        """How many operations one run of the built plan does."""
        return sum(1 for node in self._built()["nodes"] if node[0] == "call")

    def _built(self) -> dict[str, Any]:
        if self._wire is None:
            raise PlanNotBuilt(
                f"plan {self.plan_name!r} is not built: call .build() with example "
                "arguments before sending it to a worker"
            )
        return self._wire

    def send(self, *workers: WorkerHandle) -> Any:
        """Store the plan and a copy of its state on each worker; returns its PointerPlan
        (a list of them for several workers)."""
        wire = self._built()
        if not workers:
            raise TypeError("send() needs a worker")
        state = {key: value.detach().clone() for key, value in self.state_dict().items()}
        pointers = [PointerPlan(self.plan_name, worker, wire, state) for worker in workers]
        return pointers[0] if len(pointers) == 1 else pointers

    def __repr__(self) -> str:
        built = "built" if self.is_built else "not built"
        return f"<Plan {self.plan_name} ({built})>\n{super().__repr__()}"


class _FunctionModule(torch.nn.Module):
    """A function plan as a module: its state tensors are buffers ``state_0``, ..."""

    def __init__(self, function: Callable[..., Any], state: Sequence[torch.Tensor]) -> None:
        super().__init__()
        self.function = function
        self.count = len(state)
        for index, tensor in enumerate(state):
            self.register_buffer(f"state_{index}", tensor.detach().clone())

    def call(self, *inputs: Any) -> Any:
        if self.count:
            return self.function(*inputs, PlanState(self, self.count))
        return self.function(*inputs)


# One class per arity: torch.fx traces a forward's named parameters, not *args.
class _OneInput(_FunctionModule):
    def forward(self, x: Any) -> Any:
        return self.call(x)


class _TwoInputs(_FunctionModule):
    def forward(self, x: Any, y: Any) -> Any:
        return self.call(x, y)


class _FunctionPlan(Plan):
    """What ``@sy.func2plan()`` makes of a function."""

    def __init__(self, function: Callable[..., Any], state: Sequence[torch.Tensor]) -> None:
        super().__init__(getattr(function, "__name__", "plan"))
        # The state as one module per arity; they share the tensors.
        self.one = _OneInput(function, state)
        self.two = _TwoInputs(function, state)
        for name, tensor in self.one.named_buffers():
            setattr(self.two, name, tensor)
        self._arity = 1
        functools.update_wrapper(self, function, updated=())

    def build(self, *examples: torch.Tensor) -> Plan:
        self._arity = len(examples)
        return super().build(*examples)

    def _traced(self) -> torch.nn.Module:
        return self.one if self._arity == 1 else self.two

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        # The state that travels: the traced module's entries, under the names it reads.
        return self._traced().state_dict(*args, **kwargs)

    def forward(self, *inputs: Any) -> Any:
        return self.one.call(*inputs)

    def __repr__(self) -> str:
        built = "built" if self.is_built else "not built"
        return f"<Plan {self.plan_name} ({built})>"


def func2plan(
    args_shape: Sequence[Sequence[int]] | None = None,
    state: Sequence[torch.Tensor] | None = None,
) -> Callable[[Callable[..., Any]], Plan]:
    """Turn a function into a plan (PySyft's ``@sy.func2plan()``).

    With ``args_shape`` (one shape per input; ``-1`` reads as 1) the plan is built at
    once on zeros of those shapes. ``state`` is a tuple of tensors the function reads
    as ``state.read()``, its last argument; they travel with the plan.
    """

    def decorate(function: Callable[..., Any]) -> Plan:
        made = _FunctionPlan(function, tuple(state or ()))
        if args_shape is not None:
            made.build(*(torch.zeros([max(1, size) for size in shape]) for shape in args_shape))
        return made

    return decorate


class PointerPlan:
    """A plan stored on a worker: calling it with pointers there runs it there."""

    def __init__(
        self, name: str, worker: WorkerHandle, wire: dict[str, Any], state: dict[str, Any]
    ) -> None:
        self.name = name
        self.location = worker
        client = worker.client
        self._plan = client.store(wire)
        self._state = client.store(state)

    def __call__(self, *inputs: Any) -> Any:
        """A pointer to the plan's output on ``inputs`` (pointers to this worker, or local
        tensors, which travel with the command); no round trip."""
        for value in inputs:
            if isinstance(value, PointerBase) and value.location is not self.location:
                raise LocationError(
                    f"plan {self.name!r} is on worker {self.location.id!r} but an input is "
                    f"on {value.location.id!r}: move the input or send the plan there"
                )
        return call_on(
            self.location.client, "fedtensor.run_plan", (self._plan, self._state, *inputs), {}
        )

    def __repr__(self) -> str:
        return f"<PointerPlan {self.name} me -> {self.location.id}:{self._plan.id_at_location}>"
