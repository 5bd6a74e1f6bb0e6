"""Aggregation strategies: how the updates of a round become the next global model.

Every strategy starts from the FedAvg average of the workers' states, weighted
by how many examples each trained on (McMahan et al., 2017), and may then move
the global model with a server-side optimizer, treating ``average - global`` as
a pseudo-gradient step (Reddi et al., 2021, "Adaptive Federated Optimization"):

``FedAvg``
    The weighted average.
``FedProx``
    FedAvg whose workers add ``mu/2 * ||w - w_global||^2`` to their loss (Li et
    al., 2020), which keeps heterogeneous workers near the global model.
``FedAvgM``
    Server momentum (Hsu et al., 2019): ``v = beta * v + delta``;
    ``w = w + server_lr * v``.
``FedAdam``
    Adam on the server without bias correction, as in Reddi et al.:
    ``m = b1*m + (1-b1)*delta``; ``v = b2*v + (1-b2)*delta^2``;
    ``w = w + server_lr * m / (sqrt(v) + tau)``.

Only floating-point entries are averaged and moved; integer buffers (such as a
batch norm's ``num_batches_tracked``) take the largest value reported. The
server optimizers move the model's parameters only; buffers (running
statistics) take the plain average.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["FedAdam", "FedAvg", "FedAvgM", "FedProx", "Strategy", "Update"]

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Update:
    """What one worker sent back in a round."""

    worker: str
    state: State
    examples: int


class Strategy:
    """Base of the strategies: override :meth:`aggregate` (and ``prox_mu`` for workers)."""

    #: FedProx's proximal coefficient, sent to the workers with every round.
    prox_mu: float = 0.0

    def aggregate(self, current: State, updates: Sequence[Update], parameters: set[str]) -> State:
        """The next global state from the ``current`` one and a round's ``updates``.

        ``parameters`` are the keys of trainable parameters (the rest are buffers).
        """
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the strategy (server optimizer moments)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` gave."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{key}={value!r}" for key, value in vars(self).items() if key[0] != "_")
        return f"{type(self).__name__}({fields})"


def weighted_average(current: State, updates: Sequence[Update]) -> State:
    """FedAvg: the average of the updates' states, weighted by examples."""
    if not updates:
        raise ValueError("no updates to average")
    total = sum(update.examples for update in updates)
    if total <= 0:
        raise ValueError("the updates trained on no examples")
    averaged: State = {}
    for key, value in current.items():
        if value.is_floating_point() or value.is_complex():
            # Accumulate in float64: the order of workers must not change the result much.
            accumulated = torch.zeros(value.shape, dtype=torch.float64)
            for update in updates:
                accumulated += update.state[key].to(torch.float64) * (update.examples / total)
            averaged[key] = accumulated.to(value.dtype)
        else:
            averaged[key] = torch.stack([update.state[key] for update in updates]).amax(0)
    return averaged


class FedAvg(Strategy):
    """The examples-weighted average of the workers' models."""

    def aggregate(self, current: State, updates: Sequence[Update], parameters: set[str]) -> State:
        return weighted_average(current, updates)


class FedProx(FedAvg):
    """FedAvg whose workers train with a proximal term of weight ``mu``."""

    def __init__(self, mu: float = 0.01) -> None:
        if mu < 0:
            raise ValueError("FedProx needs mu >= 0")
        self.prox_mu = mu


class _ServerOptimizer(FedAvg):
    """FedAvg followed by a step of an optimizer on the server's parameters."""

    def aggregate(self, current: State, updates: Sequence[Update], parameters: set[str]) -> State:
        averaged = weighted_average(current, updates)
        for key in parameters:
            value = current[key]
            if value.is_floating_point():
                delta = averaged[key].to(torch.float64) - value.to(torch.float64)
                averaged[key] = (value.to(torch.float64) + self._step(key, delta)).to(value.dtype)
        return averaged

    def _step(self, key: str, delta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class FedAvgM(_ServerOptimizer):
    """FedAvg with server momentum ``beta`` and server learning rate ``server_lr``."""

    def __init__(self, server_lr: float = 1.0, beta: float = 0.9) -> None:
        self.server_lr = server_lr
        self.beta = beta
        self._velocity: State = {}

    def _step(self, key: str, delta: torch.Tensor) -> torch.Tensor:
        previous = self._velocity.get(key)
        velocity = delta if previous is None else self.beta * previous + delta
        self._velocity[key] = velocity
        return self.server_lr * velocity

    def state_dict(self) -> dict[str, Any]:
        return {"velocity": dict(self._velocity)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._velocity = dict(state.get("velocity", {}))


class FedAdam(_ServerOptimizer):
    """FedAvg followed by an Adam step on the server (Reddi et al., 2021)."""

    def __init__(
        self,
        server_lr: float = 0.01,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        self.server_lr = server_lr
        self.beta1 = beta1
        self.beta2 = beta2
        self.tau = tau
        self._first: State = {}
        self._second: State = {}

    def _step(self, key: str, delta: torch.Tensor) -> torch.Tensor:
        first = self._first.get(key, torch.zeros_like(delta))
        second = self._second.get(key, torch.zeros_like(delta))
        first = self.beta1 * first + (1 - self.beta1) * delta
        second = self.beta2 * second + (1 - self.beta2) * delta * delta
        self._first[key], self._second[key] = first, second
        return self.server_lr * first / (second.sqrt() + self.tau)

    def state_dict(self) -> dict[str, Any]:
        return {"first": dict(self._first), "second": dict(self._second)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._first = dict(state.get("first", {}))
        self._second = dict(state.get("second", {}))
