"""The worker's side of PySyft-style plans: ``fedtensor.run_plan``.

Theory of operation
-------------------
A PySyft plan (``sy.func2plan``, ``sy.Plan``; :mod:`fedtensor.sync.plans`) is a
function or a small model traced once on the client into the same wire format as
a training plan (:mod:`fedtensor.protocol.plan`), then stored on a worker with its
state (the model's parameters, or a function's state tensors). Running it there is
``fedtensor.run_plan``, a worker operation like ``fedtensor.evaluate``: named by a
string in a command, allow-listed (:data:`fedtensor.protocol.ops.WORKER_OPERATIONS`),
written here rather than sent. It compiles the plan with
:func:`fedtensor.worker.compiler.compile_plan`, which refuses it whole before
anything runs if any operation is off the allow-list, checks the state against the
keys the plan reads, and runs the plan's graph once on the inputs: the result is
stored under the command's id like any operation's, so the client's pointer to it is
usable at once (pipelined).

The stored state is read, never replaced: a plan that changes a state entry in
place changes the worker's copy, as a PySyft plan changed its own state.
"""

from __future__ import annotations

from typing import Any

from fedtensor.errors import PlanError
from fedtensor.worker.compiler import compile_plan, state_entries

__all__ = ["run_plan"]


def run_plan(plan: Any, state: Any, *inputs: Any) -> Any:
    """The output of ``plan`` on ``inputs``, reading ``state`` (a dict of tensors)."""
    compiled = compile_plan(plan)
    entries = state_entries(compiled, state)
    # compile_plan checked every node's shape and that input targets are 0 or 1.
    wanted = 1 + max((node[1] for node in plan["nodes"] if node[0] == "input"), default=-1)
    if len(inputs) != wanted:
        raise PlanError(f"the plan takes {wanted} input(s), not {len(inputs)}")
    return compiled.run(entries, *inputs)
