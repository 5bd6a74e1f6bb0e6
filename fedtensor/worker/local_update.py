"""The worker's half of federated training: a local update on data it holds.

``fedtensor.local_update`` is a worker operation like ``torch.add``, named by a
string in a command, but written here rather than taken from torch. It takes a
plan (:mod:`fedtensor.protocol.plan`, checked by :mod:`fedtensor.worker.compiler`),
the global model's state, the worker's examples and labels, and the
hyperparameters of a round; it trains a copy of the state for some epochs of
minibatch SGD (or Adam) and returns the new state with the round's statistics.
One command per worker per round, whatever the number of batches: no round
trip per tensor operation.

The order of the batches comes from ``seed`` alone (``torch.randperm`` on a
generator seeded with it), and random operations in the plan (dropout) draw
from torch's generator seeded with it inside ``torch.random.fork_rng``, so that
a round is reproducible and the worker's own random state is left as it was.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from fedtensor.errors import PlanError
from fedtensor.protocol.plan import OPTIMIZERS
from fedtensor.worker.compiler import compile_plan, state_entries

__all__ = ["OPTIMIZERS", "local_update"]


def _optimizer(
    name: str, parameters: list[torch.Tensor], lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)
    raise PlanError(f"unknown optimizer {name!r}; a worker has {', '.join(OPTIMIZERS)}")


def local_update(
    plan: Any,
    state: Any,
    data: Any,
    targets: Any,
    *,
    epochs: int = 1,
    batch_size: int = 32,
    lr: float = 0.01,
    optimizer: str = "sgd",
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    prox_mu: float = 0.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Train a copy of ``state`` on ``(data, targets)``; return it with the round's statistics.

    ``prox_mu`` > 0 adds FedProx's proximal term ``mu/2 * ||w - w_global||^2``.
    The reply: ``{"state": ..., "examples": n, "loss": mean loss over the
    batches, "correct": n right (for class labels), "seconds": compute time}``.
    """
    started = time.perf_counter()
    compiled = compile_plan(plan)
    state = state_entries(compiled, state)
    if not isinstance(data, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise PlanError("local_update trains on tensors of examples and labels")
    if len(data) != len(targets):
        raise PlanError(f"{len(data)} examples but {len(targets)} labels")
    if epochs < 1 or batch_size < 1 or not math.isfinite(lr):
        raise PlanError("epochs and batch_size must be at least 1, lr finite")
    # A copy: the stored global state stays as it came, whatever the plan does to its own.
    local = {key: value.detach().clone() for key, value in state.items()}
    trainable = [local[key].requires_grad_(True) for key in compiled.trainable]
    anchors = [local[key].detach().clone() for key in compiled.trainable] if prox_mu else []
    chosen = _optimizer(optimizer, trainable, lr, momentum, weight_decay)
    examples = len(data)
    classify = targets.dim() == 1 and not targets.is_floating_point()
    order = torch.Generator().manual_seed(seed)
    total_loss = 0.0
    correct = 0
    batches = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _epoch in range(epochs):
            permutation = torch.randperm(examples, generator=order)
            for start in range(0, examples, batch_size):
                indices = permutation[start : start + batch_size]
                x, y = data[indices], targets[indices]
                loss, output = compiled.run(local, x, y)
                if prox_mu:
                    loss = loss + prox_mu / 2 * sum(
                        (weight - anchor).pow(2).sum()
                        for weight, anchor in zip(trainable, anchors, strict=True)
                    )
                chosen.zero_grad(set_to_none=True)
                loss.backward()
                chosen.step()
                total_loss += loss.detach().item()
                batches += 1
                if classify and isinstance(output, torch.Tensor) and output.dim() == 2:
                    correct += int((output.detach().argmax(1) == y).sum())
    return {
        "state": {key: value.detach() for key, value in local.items()},
        "examples": examples,
        "loss": total_loss / max(batches, 1),
        "correct": correct,
        "seconds": time.perf_counter() - started,
    }
