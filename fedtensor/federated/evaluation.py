"""Evaluation: a model on held-out data here (:func:`evaluate`), or on the workers' own.

Theory of operation
-------------------
Central evaluation (``ft.fit(eval_data=...)``) needs held-out data on the client,
which in real federated learning it does not have, and which says nothing of how
the model does for each client of a non-IID population. Federated evaluation
(``ft.fit(evaluate_fraction=..., evaluate_every=...)``) asks the clients instead:

1. each worker's shard has a held-out part that never trains (``ft.federate(...,
   holdout=0.1)`` or ``ft.load_dataset(..., holdout=0.1)``, chosen reproducibly
   by :func:`fedtensor.federated.datasets.holdout_split`); a simulated client's
   (``ft.simulate_clients(..., holdout=0.1)``) is a row range of its executor's
   block, right after its training rows, split off the same way;
2. :class:`FederatedEvaluator` traces the model once more, in evaluation mode
   (dropout off, batch norms on running statistics), and stores that plan on each
   worker it asks, once (once per executor for simulated clients): no code
   travels, only the plan, which the worker checks against its allow-list as it
   does a training plan;
3. every ``evaluate_every`` rounds it samples ``evaluate_fraction`` of the live
   workers (or clients) that have a held-out part (from a generator seeded with
   the run's seed and the round, apart from the training sample's), stores the
   global state once on each worker and queues one ``fedtensor.evaluate`` per
   client (:mod:`fedtensor.worker.evaluate`), all at once; each answers a loss
   sum, a count of correct predictions and its example count;
4. the :class:`FederatedEvaluation` of the round is the example-weighted mean
   loss and accuracy over the clients that answered, every client's own figures,
   and the distribution over clients: the 10th, 50th and 90th percentiles of
   per-client loss and accuracy (``torch.quantile``, linear interpolation).

A worker that fails or times out is left out of that evaluation (and named in
``failed``); evaluation never stops a run, except when the plan itself is
refused, which would repeat on every worker.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional

from fedtensor.client.pointer import PointerBase, call_on
from fedtensor.errors import RemoteError, WorkerUnavailable
from fedtensor.errors import TimeoutError as FedTimeoutError
from fedtensor.federated.datasets import FederatedDataset, Shard
from fedtensor.federated.trace import trace

__all__ = ["QUANTILES", "FederatedEvaluation", "FederatedEvaluator", "evaluate"]

#: The percentiles of per-client figures recorded: 10th, 50th (median), 90th.
QUANTILES = (0.1, 0.5, 0.9)


def evaluate(
    model: torch.nn.Module,
    data: torch.Tensor,
    targets: torch.Tensor,
    loss: Callable[..., Any] = torch.nn.functional.cross_entropy,
    *,
    batch_size: int = 1024,
) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` (in eval mode) on local held-out data."""
    was_training = model.training
    model.eval()
    total_loss = 0.0
    correct = 0
    try:
        with torch.no_grad():
            for start in range(0, len(data), batch_size):
                x, y = data[start : start + batch_size], targets[start : start + batch_size]
                output = model(x)
                total_loss += float(loss(output, y)) * len(x)
                if output.dim() == 2 and y.dim() == 1 and not y.is_floating_point():
                    correct += int((output.argmax(1) == y).sum())
    finally:
        model.train(was_training)
    count = max(len(data), 1)
    return total_loss / count, correct / count


def quantiles(values: Sequence[float]) -> tuple[float, ...]:
    """The :data:`QUANTILES` of ``values`` (``torch.quantile``); empty without values."""
    if not values:
        return ()
    found = torch.quantile(
        torch.tensor(values, dtype=torch.float64), torch.tensor(QUANTILES, dtype=torch.float64)
    )
    return tuple(float(value) for value in found)


@dataclass(frozen=True)
class FederatedEvaluation:
    """The global model on the held-out parts of a sample of workers, after one round."""

    #: Worker id -> (mean loss, accuracy, examples) on its own held-out part.
    clients: dict[str, tuple[float, float, int]]
    #: Worker id -> why it gave no figures.
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def examples(self) -> int:
        return sum(examples for _, _, examples in self.clients.values())

    @property
    def loss(self) -> float:
        """Mean loss over every held-out example of the clients (example-weighted)."""
        total = self.examples
        summed = sum(loss * examples for loss, _, examples in self.clients.values())
        return summed / total if total else math.nan

    @property
    def accuracy(self) -> float:
        """Accuracy over every held-out example of the clients (example-weighted)."""
        total = self.examples
        correct = sum(accuracy * examples for _, accuracy, examples in self.clients.values())
        return correct / total if total else math.nan

    def metrics(self) -> dict[str, Any]:
        """The :class:`~fedtensor.RoundMetrics` fields that record it."""
        return {
            "client_eval": dict(self.clients),
            "client_eval_loss": self.loss,
            "client_eval_accuracy": self.accuracy,
            "client_eval_loss_quantiles": quantiles([v[0] for v in self.clients.values()]),
            "client_eval_accuracy_quantiles": quantiles([v[1] for v in self.clients.values()]),
        }


# Remote failures that are the plan's fault, not the worker's: they stop the run.
_PLAN_ERRORS = frozenset({"PlanError", "ForbiddenOperation"})


class FederatedEvaluator:
    """Evaluates the global model on the workers' held-out parts (see the module)."""

    def __init__(
        self,
        model: torch.nn.Module,
        loss: Callable[..., Any],
        data: FederatedDataset,
        example: tuple[torch.Tensor, torch.Tensor] | None,
        *,
        fraction: float,
        every: int = 1,
        seed: int = 0,
        timeout: float | None = None,
    ) -> None:
        if not 0 < fraction <= 1:
            raise ValueError("evaluate_fraction must be in (0, 1]")
        if every < 1:
            raise ValueError("evaluate_every must be at least 1")
        # eval_size, not eval_data: a simulated client's eval_data is made when read.
        self.candidates = [index for index, shard in enumerate(data.shards) if _held_out(shard)]
        if not self.candidates:
            raise ValueError(
                "federated evaluation needs held-out parts on the workers: "
                "ft.federate(..., holdout=0.1), ft.load_dataset(..., holdout=0.1) "
                "or ft.simulate_clients(..., holdout=0.1)"
            )
        self.data = data
        self.fraction = fraction
        self.every = every
        self.seed = seed
        self.timeout = timeout
        self.plan = trace(model, loss, example, training=False)
        #: The evaluation plan stored on each worker that has it, by its client
        #: connection: the simulated clients of one executor share one.
        self.plans: dict[Any, PointerBase] = {}

    def due(self, round: int) -> bool:
        """Whether round ``round`` is one to evaluate after."""
        return round % self.every == 0

    def sample(self, round: int, alive: Sequence[int] | None = None) -> list[int]:
        """Indices of the workers asked after ``round``: reproducible from seed and round."""
        live = set(alive) if alive is not None else None
        pool = [index for index in self.candidates if live is None or index in live]
        if not pool:
            return []
        count = min(len(pool), max(1, math.ceil(self.fraction * len(pool))))
        generator = torch.Generator().manual_seed((self.seed * 104_729 + round * 13 + 5) % (2**63))
        order = torch.randperm(len(pool), generator=generator).tolist()
        return sorted(pool[position] for position in order[:count])

    async def evaluate(
        self, model: torch.nn.Module, round: int, alive: Sequence[int] | None = None
    ) -> FederatedEvaluation:
        """Evaluate ``model``'s state on the workers sampled for ``round``."""
        sampled = self.sample(round, alive)
        state = {key: value.detach() for key, value in model.state_dict().items()}
        shards = self.data.shards
        # Replies asked for with the commands, in their frame.
        results: dict[int, asyncio.Future[Any]] = {}
        # The global state goes once to each worker: its simulated clients share it.
        stored: dict[Any, PointerBase] = {}
        for index in sampled:  # queued everywhere before any reply is awaited
            shard = shards[index]
            client = shard.worker.client
            if client not in self.plans:
                self.plans[client] = client.store(self.plan.wire)
            if client not in stored:
                stored[client] = client.store(state)
            results[index] = call_on(
                client,
                "fedtensor.evaluate",
                (self.plans[client], stored[client], shard.eval_data, shard.eval_targets),
                {},
            ).fetch_soon(free=True, timeout=self.timeout)
        del stored  # released on the workers right after their last evaluation read it
        clients: dict[str, tuple[float, float, int]] = {}
        failed: dict[str, str] = {}
        for index in sampled:
            name = shards[index].name
            try:
                reply = await results.pop(index)
            except WorkerUnavailable as exc:
                failed[name] = f"unavailable: {exc}"
                self.plans.pop(shards[index].worker.client, None)
            except FedTimeoutError as exc:
                failed[name] = f"{type(exc).__name__}: {exc}"
            except RemoteError as exc:
                if exc.remote_type in _PLAN_ERRORS:
                    raise
                failed[name] = f"{type(exc).__name__}: {exc}"
            else:
                examples = int(reply["examples"])
                if examples:
                    clients[name] = (
                        float(reply["loss_sum"]) / examples,
                        int(reply["correct"]) / examples,
                        examples,
                    )
        return FederatedEvaluation(clients, failed)

    def close(self) -> None:
        """Let the stored plans go (they are released on the workers)."""
        self.plans.clear()


def _held_out(shard: Shard) -> bool:
    """Whether ``shard`` has a held-out part (without making pointers to it)."""
    return shard.eval_size > 0 or (type(shard) is Shard and shard.eval_data is not None)
