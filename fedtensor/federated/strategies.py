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
``FedBuff``, ``FedAsync``
    Asynchronous strategies (:class:`AsynchronousStrategy`): no rounds, updates
    aggregated as they arrive, each weighted by its :class:`Staleness` (how many
    versions the model moved on since the update started); see their classes and
    :mod:`fedtensor.federated.asynchronous`.

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

__all__ = [
    "AsynchronousStrategy",
    "FedAdam",
    "FedAsync",
    "FedAvg",
    "FedAvgM",
    "FedBuff",
    "FedProx",
    "StaleUpdate",
    "Staleness",
    "Strategy",
    "Update",
]

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

    #: True when :meth:`aggregate` reads only the examples-weighted mean of the updates'
    #: floating-point entries (and the largest of the others), as FedAvg and the server
    #: optimizers do: ``ft.fit`` may then have each executor of simulated clients answer
    #: with its clients' weighted sum, and hands :meth:`aggregate` one update holding
    #: the mean of the summed clients. False (single updates) for a strategy that
    #: reads each update (robust aggregation); a subclass that overrides ``aggregate``
    #: is False unless it says otherwise in its own class body.
    partial_sums_ok: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "aggregate" in vars(cls) and "partial_sums_ok" not in vars(cls):
            cls.partial_sums_ok = False  # a new aggregate may read single updates

    def aggregate(self, current: State, updates: Sequence[Update], parameters: set[str]) -> State:
        """The next global state from the ``current`` one and a round's ``updates``.

        ``parameters`` are the keys of trainable parameters (the rest are buffers).
        """
        raise NotImplementedError

    def aggregate_sum(
        self,
        current: State,
        weighted_delta_sum: State,
        total_weight: float,
        parameters: set[str],
    ) -> State:
        """The next global state from the sum of the workers' weighted updates alone.

        What secure aggregation gives (:class:`fedtensor.SecAggPlus`): for each
        floating-point key of ``weighted_delta_sum``, ``sum_i w_i * (state_i -
        current)`` (float64), and ``total_weight = sum_i w_i`` (the examples);
        never one worker's update. Keys it lacks (integer buffers) stay as they are.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot aggregate a masked sum")

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


def average_of_sum(current: State, weighted_delta_sum: State, total_weight: float) -> State:
    """FedAvg from a sum: ``current + weighted_delta_sum / total_weight`` per key summed."""
    if total_weight <= 0:
        raise ValueError("the updates trained on no examples")
    averaged = dict(current)
    for key, summed in weighted_delta_sum.items():
        value = current[key]
        averaged[key] = (value.to(torch.float64) + summed / total_weight).to(value.dtype)
    return averaged


class FedAvg(Strategy):
    """The examples-weighted average of the workers' models."""

    partial_sums_ok = True

    def aggregate(self, current: State, updates: Sequence[Update], parameters: set[str]) -> State:
        return weighted_average(current, updates)

    def aggregate_sum(
        self,
        current: State,
        weighted_delta_sum: State,
        total_weight: float,
        parameters: set[str],
    ) -> State:
        return average_of_sum(current, weighted_delta_sum, total_weight)


class FedProx(FedAvg):
    """FedAvg whose workers train with a proximal term of weight ``mu``."""

    def __init__(self, mu: float = 0.01) -> None:
        if mu < 0:
            raise ValueError("FedProx needs mu >= 0")
        self.prox_mu = mu


class _ServerOptimizer(FedAvg):
    """FedAvg followed by a step of an optimizer on the server's parameters."""

    partial_sums_ok = True  # the step reads the weighted average only

    def aggregate(self, current: State, updates: Sequence[Update], parameters: set[str]) -> State:
        return self._move(current, weighted_average(current, updates), parameters)

    def aggregate_sum(
        self,
        current: State,
        weighted_delta_sum: State,
        total_weight: float,
        parameters: set[str],
    ) -> State:
        averaged = average_of_sum(current, weighted_delta_sum, total_weight)
        return self._move(current, averaged, parameters)

    def _move(self, current: State, averaged: State, parameters: set[str]) -> State:
        """A server optimizer's step on the parameters, ``average - current`` its delta."""
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


# -- asynchronous strategies (run by fedtensor.federated.asynchronous) -----------------------------


class Staleness:
    """How much an update counts when the model moved on ``s`` versions since it started.

    ``"constant"``: 1. ``"polynomial"`` (the default, ``a`` = 0.5): ``(1 + s) ** -a``.
    ``"hinge"`` (``a`` = 10, ``b`` = 4): 1 while ``s <= b``, then ``1 / (a * (s - b) + 1)``
    (Xie et al., 2019).
    """

    KINDS = ("constant", "polynomial", "hinge")

    def __init__(self, kind: str = "polynomial", a: float | None = None, b: int = 4) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"staleness must be one of {', '.join(self.KINDS)}, not {kind!r}")
        self.kind = kind
        self.a = float(a if a is not None else (10.0 if kind == "hinge" else 0.5))
        self.b = b
        if self.a < 0 or b < 0:
            raise ValueError("staleness needs a >= 0 and b >= 0")

    def __call__(self, staleness: int) -> float:
        if staleness < 0:
            raise ValueError("staleness is never negative")
        if self.kind == "polynomial":
            return float((1 + staleness) ** -self.a)
        if self.kind == "hinge" and staleness > self.b:
            return 1.0 / (self.a * (staleness - self.b) + 1.0)
        return 1.0

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Staleness) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash((self.kind, self.a, self.b))

    def __repr__(self) -> str:
        return f"Staleness({self.kind!r}, a={self.a:g}, b={self.b})"


@dataclass(frozen=True)
class StaleUpdate:
    """One asynchronous update: the worker's new state, the state it started from, and
    how many versions the global model moved on meanwhile."""

    worker: str
    state: State
    base: State
    examples: int
    staleness: int


class AsynchronousStrategy(Strategy):
    """Base of the asynchronous strategies: ``ft.fit`` runs them without rounds
    (:mod:`fedtensor.federated.asynchronous`), aggregating every ``buffer_size``
    updates as they arrive, with ``concurrency`` local updates in flight."""

    buffer_size: int = 1
    #: Local updates in flight at once (at most one per worker); None: one per worker.
    concurrency: int | None = None
    staleness: Staleness = Staleness()

    def aggregate(self, current: State, updates: Sequence[Update], parameters: set[str]) -> State:
        raise TypeError(f"{type(self).__name__} aggregates StaleUpdates: use apply()")

    def apply(self, current: State, updates: Sequence[StaleUpdate], parameters: set[str]) -> State:
        """The next global state from the ``current`` one and a full buffer of ``updates``."""
        raise NotImplementedError

    def _check(self, buffer_size: int, concurrency: int | None, staleness: Any) -> None:
        if buffer_size < 1:
            raise ValueError("buffer_size must be at least 1")
        if concurrency is not None and concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.buffer_size = buffer_size
        self.concurrency = concurrency
        self.staleness = staleness if isinstance(staleness, Staleness) else Staleness(staleness)


def _largest(current: torch.Tensor, updates: Sequence[StaleUpdate], key: str) -> torch.Tensor:
    """Integer entries (a batch norm's counter) take the largest value seen."""
    return torch.stack([current, *(update.state[key] for update in updates)]).amax(0)


class FedBuff(AsynchronousStrategy):
    """Buffered asynchronous aggregation (Nguyen et al., 2022).

    Every ``buffer_size`` (K) updates: ``w = w + server_lr / K * sum_i s(tau_i) *
    (w_i - w_base_i)``, where ``w_i`` is what update i trained from ``w_base_i``,
    the model it was sent, and ``s(tau_i)`` its staleness weight.
    """

    def __init__(
        self,
        buffer_size: int = 10,
        concurrency: int | None = None,
        staleness: str | Staleness = "polynomial",
        server_lr: float = 1.0,
    ) -> None:
        self._check(buffer_size, concurrency, staleness)
        if not server_lr > 0:
            raise ValueError("server_lr must be positive")
        self.server_lr = server_lr

    def apply(self, current: State, updates: Sequence[StaleUpdate], parameters: set[str]) -> State:
        if not updates:
            raise ValueError("no updates to aggregate")
        weights = [self.staleness(update.staleness) for update in updates]
        scale = self.server_lr / len(updates)
        result: State = {}
        for key, value in current.items():
            if not (value.is_floating_point() or value.is_complex()):
                result[key] = _largest(value, updates, key)
                continue
            moved = value.to(torch.float64).clone()
            for weight, update in zip(weights, updates, strict=True):
                delta = update.state[key].to(torch.float64) - update.base[key].to(torch.float64)
                moved += scale * weight * delta
            result[key] = moved.to(value.dtype)
        return result


class FedAsync(AsynchronousStrategy):
    """Asynchronous federated optimization (Xie et al., 2019): every update is mixed in
    as it arrives, ``w = (1 - a_t) * w + a_t * w_i`` with ``a_t = alpha * s(tau_i)``."""

    def __init__(
        self,
        alpha: float = 0.6,
        concurrency: int | None = None,
        staleness: str | Staleness = "polynomial",
    ) -> None:
        self._check(1, concurrency, staleness)
        if not 0 < alpha <= 1:
            raise ValueError("alpha must be in (0, 1]")
        self.alpha = alpha

    def apply(self, current: State, updates: Sequence[StaleUpdate], parameters: set[str]) -> State:
        result = dict(current)
        for update in updates:
            mix = self.alpha * self.staleness(update.staleness)
            for key, value in result.items():
                if value.is_floating_point() or value.is_complex():
                    mixed = (1 - mix) * value.to(torch.float64) + mix * update.state[key].to(
                        torch.float64
                    )
                    result[key] = mixed.to(value.dtype)
                else:
                    result[key] = _largest(value, [update], key)
        return result
