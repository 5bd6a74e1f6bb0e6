"""The worker's half of federated evaluation: a model's loss and accuracy on data it holds.

``fedtensor.evaluate`` is a worker operation like ``fedtensor.local_update``: named
by a string in a command, allow-listed (:data:`fedtensor.protocol.ops.WORKER_OPERATIONS`),
written here rather than sent. It takes a plan traced in evaluation mode (dropout
off, batch norms on their running statistics: ``ft.trace(..., training=False)``),
checked by :mod:`fedtensor.worker.compiler` like any plan, the global model's state,
and the worker's held-out examples and labels; it runs the plan's forward pass and
loss on them in batches, without autograd, and answers with sums, not means, so the
client can weight every worker by its examples:
``{"loss_sum": sum over batches of mean loss x batch size, "correct": n right
(for class labels), "examples": n, "seconds": compute time}``.

This is the same computation as :func:`fedtensor.evaluate` (the client-side
evaluation of a local model), batch for batch, so a worker's figures equal a
local evaluation of the same model on the same data. Nothing is trained and the
stored state is not changed: a plan in evaluation mode updates no running
statistics.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from fedtensor.errors import PlanError
from fedtensor.worker.compiler import compile_plan, state_entries

__all__ = ["EVALUATE_BATCH_SIZE", "evaluate"]

#: The default batch size, the same as :func:`fedtensor.evaluate`'s.
EVALUATE_BATCH_SIZE = 1024


def evaluate(
    plan: Any, state: Any, data: Any, targets: Any, *, batch_size: int = EVALUATE_BATCH_SIZE
) -> dict[str, Any]:
    """Loss sum, correct predictions and example count of ``state`` on ``(data, targets)``."""
    started = time.perf_counter()
    compiled = compile_plan(plan)
    state = state_entries(compiled, state)
    if not isinstance(data, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise PlanError("evaluate runs on tensors of examples and labels")
    if len(data) != len(targets):
        raise PlanError(f"{len(data)} examples but {len(targets)} labels")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise PlanError("batch_size must be an integer of at least 1")
    classify = targets.dim() == 1 and not targets.is_floating_point()
    loss_sum = 0.0
    correct = 0
    # A copy of each entry: whatever the plan does in place stays off the stored state.
    local = {key: value.detach().clone() for key, value in state.items()}
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            x, y = data[start : start + batch_size], targets[start : start + batch_size]
            loss, output = compiled.run(local, x, y)
            loss_sum += float(loss) * len(x)
            if classify and isinstance(output, torch.Tensor) and output.dim() == 2:
                correct += int((output.argmax(1) == y).sum())
    return {
        "loss_sum": loss_sum,
        "correct": correct,
        "examples": len(data),
        "seconds": time.perf_counter() - started,
    }
