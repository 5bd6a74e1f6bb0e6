"""Differential privacy on the worker: per-example clipping (DP-SGD) and noised updates.

Theory of operation
-------------------
Two of fedtensor's three ways to train privately run here, inside
``fedtensor.local_update`` (:mod:`fedtensor.worker.local_update`), so that what
leaves the worker is already private; the client only chooses their parameters
and accounts for them (:mod:`fedtensor.federated.privacy`).

*DP-SGD* (example-level; Abadi et al., 2016, as Opacus does it). Each step
samples a batch by Poisson sampling (every example independently with
probability ``q = batch_size / examples``: the sampling the privacy accountant's
amplification assumes), computes one gradient per example with ``torch.func``
(``vmap`` over ``grad`` of the plan run on a single example: a compiled plan is
already a function of the state it is given, so no ``functional_call`` is
needed), clips each example's gradient to ``clip_norm`` (its norm over every
trainable tensor together), sums them, adds Gaussian noise of standard deviation
``noise_multiplier * clip_norm`` and divides by the expected batch size. The
worker's optimizer then steps on that gradient. A model whose forward pass mixes
examples (batch norm) has no per-example gradient and is refused.

*Local DP* (user-level against everyone after the worker, the aggregator
included): after its local epochs the worker clips its whole update (the
difference between its trained state and the global state, every
floating-point entry together) to ``clip_norm`` and adds Gaussian noise of
standard deviation ``noise_multiplier * clip_norm`` to each coordinate.
Integer entries (a batch norm's counter) come back as the global model had them.

Noise and Poisson sampling draw from a generator seeded from the operating
system's randomness (:mod:`secrets`), never from the round's seed, which the
client knows: a client that could replay the noise could subtract it. So a
private run is not bit-for-bit reproducible. (torch's generator is a Mersenne
twister, as in Opacus outside its "secure mode"; floating-point noise is not
hardened against the attacks of Mironov, 2012.)
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from typing import Any

import torch
import torch.func

from fedtensor.errors import PlanError
from fedtensor.worker.compiler import CompiledPlan

__all__ = [
    "check_parameters",
    "clip_to_norm",
    "noise_update",
    "per_example_gradients",
    "private_gradient",
    "secret_generator",
    "update_norm",
]

#: Added to a norm before dividing by it (as Opacus does): a zero gradient stays zero.
_EPSILON = 1e-6


def check_parameters(clip_norm: object, noise_multiplier: object, what: str) -> None:
    """A worker's check of the DP arguments a client sent: :class:`PlanError` if wrong."""
    for name, value in (("clip_norm", clip_norm), ("noise_multiplier", noise_multiplier)):
        if type(value) not in (int, float) or not math.isfinite(value):  # type: ignore[arg-type]
            raise PlanError(f"{what}: {name} must be a finite number")
    if not clip_norm > 0:  # type: ignore[operator]
        raise PlanError(f"{what}: clip_norm must be > 0")
    if noise_multiplier < 0:  # type: ignore[operator]
        raise PlanError(f"{what}: noise_multiplier must be >= 0")


def secret_generator() -> torch.Generator:
    """A generator the client cannot predict: seeded from the OS's randomness."""
    return torch.Generator().manual_seed(secrets.randbits(63))


def update_norm(delta: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of an update, all its tensors together (in float64)."""
    total = sum(
        (value.double().pow(2).sum() for value in delta.values()),
        torch.zeros((), dtype=torch.float64),
    )
    return float(total.sqrt())


def clip_to_norm(
    delta: Mapping[str, torch.Tensor], clip_norm: float
) -> tuple[dict[str, torch.Tensor], float]:
    """``delta`` scaled down to norm ``clip_norm`` if it is longer (in float64), and its norm."""
    norm = update_norm(delta)
    factor = min(1.0, clip_norm / (norm + _EPSILON))
    return {key: value.double() * factor for key, value in delta.items()}, norm


def noise_update(
    global_state: Mapping[str, torch.Tensor],
    trained: Mapping[str, torch.Tensor],
    clip_norm: float,
    noise_multiplier: float,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Local DP: ``trained`` with its update from ``global_state`` clipped and noised."""
    keys = [key for key, value in global_state.items() if value.is_floating_point()]
    clipped, _ = clip_to_norm({key: trained[key] - global_state[key] for key in keys}, clip_norm)
    std = noise_multiplier * clip_norm
    result = {key: value.detach().clone() for key, value in global_state.items()}
    for key in keys:
        noise = torch.normal(0.0, std, clipped[key].shape, generator=generator, dtype=torch.float64)
        result[key] = (global_state[key].double() + clipped[key] + noise).to(
            global_state[key].dtype
        )
    return result


def per_example_gradients(
    plan: CompiledPlan,
    state: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, Any]:
    """The gradient of the plan's loss on each example alone, for every trainable entry.

    Returns ``(gradients, losses, outputs)``: ``gradients[key]`` has the batch as
    its first dimension; ``losses`` is each example's loss; ``outputs`` the
    model's output for each (batch first, as for the whole batch).
    """
    trainable = {key: state[key].detach() for key in plan.trainable}
    rest = {key: value.detach() for key, value in state.items() if key not in trainable}

    def loss_of(
        weights: dict[str, torch.Tensor], example: torch.Tensor, label: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, Any]]:
        loss, output = plan.run({**rest, **weights}, example.unsqueeze(0), label.unsqueeze(0))
        return loss, (loss.detach(), output)

    per_example = torch.func.vmap(
        torch.func.grad(loss_of, has_aux=True), in_dims=(None, 0, 0), randomness="different"
    )
    try:
        gradients, (losses, outputs) = per_example(trainable, x, y)
    except RuntimeError as exc:
        raise PlanError(
            "DP-SGD needs a gradient per example and this model's plan cannot run on one "
            f"example at a time (batch norm mixes the examples of a batch: use a group or "
            f"layer norm): {exc}"
        ) from exc
    if isinstance(outputs, torch.Tensor) and outputs.dim() >= 2 and outputs.shape[1] == 1:
        outputs = outputs.squeeze(1)  # each example ran as a batch of one
    return gradients, losses, outputs


def private_gradient(
    gradients: Mapping[str, torch.Tensor],
    clip_norm: float,
    noise_multiplier: float,
    expected_batch: float,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """DP-SGD's gradient: per-example ``gradients`` clipped, summed, noised, averaged.

    Each example's gradient (all entries together) is scaled to norm at most
    ``clip_norm``; Gaussian noise of standard deviation ``noise_multiplier *
    clip_norm`` goes on the sum, which is divided by ``expected_batch`` (Poisson
    sampling's expected batch size, not the batch's actual size, which is private).
    """
    first = next(iter(gradients.values()))
    squared = torch.zeros(first.shape[0], dtype=torch.float64)
    for value in gradients.values():
        squared += value.double().flatten(1).pow(2).sum(1)
    factors = (clip_norm / (squared.sqrt() + _EPSILON)).clamp(max=1.0)
    std = noise_multiplier * clip_norm
    result = {}
    for key, value in gradients.items():
        summed = torch.tensordot(factors, value.double(), dims=1)
        noise = torch.normal(0.0, std, summed.shape, generator=generator, dtype=torch.float64)
        result[key] = ((summed + noise) / expected_batch).to(value.dtype)
    return result


def train_dp_sgd(
    plan: CompiledPlan,
    local: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    data: torch.Tensor,
    targets: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    clip_norm: float,
    noise_multiplier: float,
    prox_mu: float = 0.0,
    anchors: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """DP-SGD's local epochs on ``local`` (trained in place); the run's statistics.

    Each epoch has ``round(examples / batch_size)`` steps (at least one), each on
    a Poisson-sampled batch. FedProx's proximal term, which reads no example, is
    added to the private gradient as it is. The statistics: ``loss`` (mean over
    the sampled examples), ``correct``, ``steps`` and ``sampling_rate`` (what the
    client's accountant needs).
    """
    examples = len(data)
    rate = min(1.0, batch_size / examples) if examples else 1.0
    steps_per_epoch = max(1, round(examples / batch_size))
    expected_batch = rate * examples if examples else 1.0
    generator = secret_generator()
    classify = targets.dim() == 1 and not targets.is_floating_point()
    total_loss, seen, correct, steps = 0.0, 0, 0, 0
    for _step in range(epochs * steps_per_epoch):
        chosen = (torch.rand(examples, generator=generator) < rate).nonzero().squeeze(1)
        if len(chosen):
            gradients, losses, outputs = per_example_gradients(
                plan, local, data[chosen], targets[chosen]
            )
            total_loss += float(losses.sum())
            seen += len(chosen)
            if classify and isinstance(outputs, torch.Tensor) and outputs.dim() == 2:
                correct += int((outputs.argmax(1) == targets[chosen]).sum())
        else:  # an empty batch still takes a (pure noise) step: its size is private
            gradients = {
                key: local[key].new_zeros((0, *local[key].shape)) for key in plan.trainable
            }
        private = private_gradient(
            gradients, clip_norm, noise_multiplier, expected_batch, generator
        )
        for key in plan.trainable:
            gradient = private[key]
            if prox_mu and anchors is not None:
                gradient = gradient + prox_mu * (local[key].detach() - anchors[key])
            local[key].grad = gradient
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps += 1
    return {
        "loss": total_loss / max(seen, 1),
        "correct": correct,
        "steps": steps,
        "sampling_rate": rate,
    }
