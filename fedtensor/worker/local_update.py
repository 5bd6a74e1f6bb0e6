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

``step_delay`` (for tests and benchmarks only) makes a worker slow on purpose: it
sleeps that many seconds after every local step, so heterogeneous workers (1x,
2x, 10x slow) can be simulated on one machine. It is the worker's own setting
(``fedtensor worker --step-delay``, ``VirtualWorker(step_delay=...)``), bound by
the actor; a client cannot set it.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from fedtensor.errors import ForbiddenOperation, PlanError
from fedtensor.protocol.plan import OPTIMIZERS
from fedtensor.worker import dp as _dp
from fedtensor.worker.compiler import compile_plan, state_entries
from fedtensor.worker.dry_runs import DryRuns, dry_run_key
from fedtensor.worker.optimizers import FunctionalOptimizer
from fedtensor.worker.shape_rules import shape_rules

__all__ = ["OPTIMIZERS", "local_update", "memory_bytes"]


def _optimizer(
    name: str, parameters: list[torch.Tensor], lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    # torch.optim.SGD's and Adam's arithmetic, without their import of torch._dynamo
    # (about 73 MB a worker process): see fedtensor.worker.optimizers.
    if name == "sgd":
        return FunctionalOptimizer(
            "sgd", parameters, lr=lr, momentum=momentum, weight_decay=weight_decay
        )
    if name == "adam":
        return FunctionalOptimizer("adam", parameters, lr=lr, weight_decay=weight_decay)
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
    step_delay: float = 0.0,
    dp_sgd_clip_norm: float | None = None,
    dp_sgd_noise_multiplier: float = 0.0,
    dp_local_clip_norm: float | None = None,
    dp_local_noise_multiplier: float = 0.0,
) -> dict[str, Any]:
    """Train a copy of ``state`` on ``(data, targets)``; return it with the round's statistics.

    ``prox_mu`` > 0 adds FedProx's proximal term ``mu/2 * ||w - w_global||^2``.
    ``dp_sgd_clip_norm`` trains with DP-SGD instead (per-example gradients clipped
    to it, noise of ``dp_sgd_noise_multiplier`` times it; the reply adds
    ``dp_steps`` and ``dp_sampling_rate``); ``dp_local_clip_norm`` clips and
    noises the update before it leaves (local DP). See :mod:`fedtensor.worker.dp`.
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
    if dp_sgd_clip_norm is not None:
        _dp.check_parameters(dp_sgd_clip_norm, dp_sgd_noise_multiplier, "DP-SGD")
    if dp_local_clip_norm is not None:
        _dp.check_parameters(dp_local_clip_norm, dp_local_noise_multiplier, "local DP")
    # A copy: the stored global state stays as it came, whatever the plan does to its own.
    local = {key: value.detach().clone() for key, value in state.items()}
    trainable = [local[key].requires_grad_(True) for key in compiled.trainable]
    anchors = [local[key].detach().clone() for key in compiled.trainable] if prox_mu else []
    chosen = _optimizer(optimizer, trainable, lr, momentum, weight_decay)
    examples = len(data)
    classify = targets.dim() == 1 and not targets.is_floating_point()
    if dp_sgd_clip_norm is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # dropout masks; batches and noise come from a secret seed
            statistics = _dp.train_dp_sgd(
                compiled,
                local,
                chosen,
                data,
                targets,
                epochs=epochs,
                batch_size=batch_size,
                clip_norm=dp_sgd_clip_norm,
                noise_multiplier=dp_sgd_noise_multiplier,
                prox_mu=prox_mu,
                anchors=dict(zip(compiled.trainable, anchors, strict=True)) if prox_mu else None,
            )
        return {
            "state": _outgoing(state, local, dp_local_clip_norm, dp_local_noise_multiplier),
            "examples": examples,
            "loss": statistics["loss"],
            "correct": statistics["correct"],
            "seconds": time.perf_counter() - started,
            "dp_steps": statistics["steps"],
            "dp_sampling_rate": statistics["sampling_rate"],
        }
    order = torch.Generator().manual_seed(seed)
    total_loss = 0.0
    correct = 0
    batches = 0
    with torch.random.fork_rng(devices=[]):
        # The CPU generator only (what fork_rng restores): torch.manual_seed also queues
        # lazy seeds for CUDA, XPU and MTIA, each recording a formatted stack (~1 ms an
        # update on a busy machine, a third of a small simulated client's cost).
        torch.default_generator.manual_seed(seed)
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
                if step_delay > 0:
                    time.sleep(step_delay)  # a simulated slow worker (tests, benchmarks)
                if classify and isinstance(output, torch.Tensor) and output.dim() == 2:
                    correct += int((output.detach().argmax(1) == y).sum())
    return {
        "state": _outgoing(state, local, dp_local_clip_norm, dp_local_noise_multiplier),
        "examples": examples,
        "loss": total_loss / max(batches, 1),
        "correct": correct,
        "seconds": time.perf_counter() - started,
    }


def _outgoing(
    global_state: dict[str, torch.Tensor],
    local: dict[str, torch.Tensor],
    clip_norm: float | None,
    noise_multiplier: float,
) -> dict[str, torch.Tensor]:
    """The state a worker answers with: as trained, or clipped and noised (local DP)."""
    if clip_norm is None:
        return {key: value.detach() for key, value in local.items()}
    return _dp.noise_update(
        global_state,
        {key: value.detach() for key, value in local.items()},
        clip_norm,
        noise_multiplier,
        _dp.secret_generator(),
    )


def memory_bytes(
    plan: Any,
    state: Any,
    data: Any,
    targets: Any,
    *,
    limit: int,
    dry_runs: DryRuns | None = None,
    **options: Any,
) -> int:
    """What :func:`local_update` with these arguments may allocate, checked before it runs.

    The model state's copies (the local state, its grads, the optimizer's buffers,
    FedProx's anchors, the update sent back: two of the state and four of what is
    trained, counted up), plus one step's activations twice (forward, and the
    grads of backward), measured by running the plan once on ``meta`` tensors of
    a batch's shape, node by node (:meth:`CompiledPlan.dry_run`); DP-SGD adds a
    grad per example of a batch. Raises :class:`MemoryError` naming the node or
    the total past ``limit``; arguments that are wrong return 0 so that
    :func:`local_update` reports them as it always has. ``dry_runs`` (the
    client's, :class:`~fedtensor.worker.dry_runs.DryRuns`) remembers the dry
    run's total for this plan on these shapes; the copies are counted every call.
    """
    try:
        compiled = compile_plan(plan)
        state = state_entries(compiled, state)
    except (PlanError, ForbiddenOperation):
        return 0  # local_update says what is wrong
    if not isinstance(data, torch.Tensor) or not isinstance(targets, torch.Tensor):
        return 0
    batch_size = options.get("batch_size", 32)
    if type(batch_size) is not int or batch_size < 1 or data.dim() == 0 or targets.dim() == 0:
        return 0
    batch = min(batch_size, len(data))
    state_bytes = sum(int(value.nbytes) for value in state.values())
    trained_bytes = sum(int(state[key].nbytes) for key in compiled.trainable)
    copies = 2 * state_bytes + 4 * trained_bytes + 8 * len(data)  # and the permutation
    if options.get("dp_sgd_clip_norm") is not None:
        copies += batch * trained_bytes  # a grad per example
    if copies > limit:
        raise MemoryError(f"the model state's copies would take {copies} bytes")
    meta_state = {key: value.to("meta") for key, value in state.items()}
    x = torch.empty((batch, *data.shape[1:]), dtype=data.dtype, device="meta")
    y = torch.empty((batch, *targets.shape[1:]), dtype=targets.dtype, device="meta")
    left = (limit - copies) // 2
    key = dry_run_key(plan, meta_state, x, y) if dry_runs is not None else None
    activations = dry_runs.get(key, left) if dry_runs is not None else None
    if activations is None:
        with shape_rules():  # no Python meta kernels: no torch._dynamo import
            activations = compiled.dry_run(meta_state, x, y, limit=left)
        if dry_runs is not None:
            dry_runs.put(key, activations)
    return copies + 2 * activations
