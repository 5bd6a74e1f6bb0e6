"""Asynchronous federated training: FedBuff and FedAsync, without rounds.

Theory of operation
-------------------
:func:`fedtensor.fit` hands an :class:`~fedtensor.federated.strategies.AsynchronousStrategy`
(``ft.FedBuff``, ``ft.FedAsync``) to :func:`fit_asynchronously`. There are no
rounds and no one waits for stragglers:

1. ``concurrency`` workers (all of them by default; at most one local update per
   worker) are each sent the current global model and queued one
   ``fedtensor.local_update``, the same worker operation a synchronous round uses;
2. updates are taken as they arrive. Each is weighted by its *staleness*, how
   many versions the global model moved on since its worker was sent the model
   it trained from, and goes into a buffer; every ``buffer_size`` updates the
   strategy aggregates the buffer into the next model *version*
   (``FedBuff``: ``w += server_lr / K * sum s(tau) (w_i - w_base_i)``;
   ``FedAsync``: ``w = (1 - alpha s(tau)) w + alpha s(tau) w_i``, K = 1);
3. the worker whose update arrived is idle again: the free slots are refilled at
   once with the newest model (among the idle workers, sampled reproducibly from
   the seed and the update's number), so fast workers contribute more updates
   and slow ones arrive stale.

A version is what a round is to :func:`fedtensor.fit`'s other strategies: ``rounds``
versions are made, and each gets a :class:`~fedtensor.RoundMetrics` (``round`` its
number) with the updates it aggregated in arrival order (``arrivals``), the
version each started from, its staleness and its arrival time, then the central
and federated evaluations, the progress line and the checkpoint.

Reproducibility. Every local update is numbered in the order it is sent, and
trains with a seed derived from the run's seed and that number
(:func:`update_seed`); which worker is sent which update depends only on the
order in which updates arrived. So a run is determined by its *arrival order*,
which the history records (``history.arrival_order()``), and
``fit(..., arrival_order=[...])`` replays one: updates are then taken in that
order, whatever order the replies come in. A checkpoint is written after every
version with the updates still in flight (worker, number, and the model version
each started from, whose state it keeps); resuming sends them again, so a run
resumed with the same arrival order ends with the same weights as one that
never stopped.

Faults. An update whose worker died fails with :class:`~fedtensor.WorkerUnavailable`:
the worker is dropped (the next version's ``failed`` says why) and the free slot
goes at once to another worker, so the buffer keeps filling from the others. A
worker that can come back (a Ray actor with ``max_restarts``: it has a ``rejoin()``,
and its shard a ``reload``) is asked again after every update taken, without
waiting for its restart (as :func:`fedtensor.fit` asks before each round); once back
its shard is made again on it (loaded again by name, or sent again from the copy
``ft.federate`` kept), in the data set itself, and it is sent updates again, which
``arrivals`` records. A run with a fault is not replayable by its arrival order: when
the worker came back depends on time.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

import anyio
import anyio.abc
import anyio.to_thread
import torch

from fedtensor.client.pointer import PointerBase, call_on
from fedtensor.errors import FedTensorError, RemoteError, WorkerUnavailable
from fedtensor.errors import TimeoutError as FedTimeoutError
from fedtensor.federated import checkpoint as _checkpoint
from fedtensor.federated.datasets import FederatedDataset
from fedtensor.federated.evaluation import FederatedEvaluator, evaluate
from fedtensor.federated.progress import History, ProgressDisplay, RoundMetrics
from fedtensor.federated.strategies import AsynchronousStrategy, StaleUpdate, State
from fedtensor.federated.trace import Plan
from fedtensor.protocol.values import tensor_bytes

__all__ = ["fit_asynchronously", "update_seed"]

# Remote failures that are the plan's or the hyperparameters' fault, not the worker's.
_PLAN_ERRORS = frozenset({"PlanError", "ForbiddenOperation"})


def update_seed(seed: int, update: int) -> int:
    """The seed of local update number ``update`` (numbered as sent, from 0)."""
    return (seed * 1_000_003 + update * 10_007 + 7_919) % (2**63)


def _choice_generator(seed: int, update: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 7_919 + update * 31 + 3) % (2**63))


@dataclass
class _Flight:
    """A local update sent and not yet taken."""

    update: int  # its number, in the order sent
    base: int  # the version of the model it trains from
    sent: float  # perf_counter when sent


@dataclass
class _Arrival:
    """What came back for a flight: the reply or the error, and when."""

    reply: dict[str, Any] | None
    error: Exception | None
    at: float


class _AsynchronousRun:
    """One asynchronous run: the flights, the buffer, the versions (see the module)."""

    def __init__(
        self,
        model: torch.nn.Module,
        data: FederatedDataset,
        plan: Plan,
        strategy: AsynchronousStrategy,
        hyperparameters: dict[str, Any],
        update_timeout: float | None,
        seed: int,
    ) -> None:
        self.model = model
        self.data = data
        self.plan = plan
        self.strategy = strategy
        self.hyperparameters = hyperparameters
        self.update_timeout = update_timeout
        self.seed = seed
        self.names = [shard.name for shard in data.shards]  # a simulated client's own
        self.index_of = {name: index for index, name in enumerate(self.names)}
        self.alive = list(range(len(data.shards)))
        #: Indices of the workers dropped as unavailable that may come back (see rejoin).
        self.dropped: list[int] = []
        #: The plan stored on each worker, by its connection (a worker's simulated clients
        #: share one; a restarted worker, on a new connection, is sent it again).
        self.plans: dict[object, PointerBase] = {}
        self.flights: dict[int, _Flight] = {}  # worker index -> its update in flight
        self.arrived: dict[int, _Arrival] = {}
        self.queue: list[int] = []  # worker indices, in the order their updates arrived
        self.bases: dict[int, State] = {}  # version -> state, for the versions in flight
        self.version = 0
        self.next_update = 0
        self.sent_since = 0  # updates sent since the last version
        self.failed: dict[str, str] = {}
        self.wake = anyio.Event()
        self.group: anyio.abc.TaskGroup | None = None

    # -- sending -------------------------------------------------------------------------------

    def current_state(self) -> State:
        return {key: value.detach().clone() for key, value in self.model.state_dict().items()}

    def send(self, index: int, update: int, base: int) -> None:
        """Queue local update ``update`` (from version ``base``) on worker ``index``."""
        assert self.group is not None
        shard = self.data.shards[index]
        client = shard.worker.client
        if client not in self.plans:
            self.plans[client] = client.store(self.plan.wire)
        stored = client.store(self.bases[base])
        # The reply is asked for at once: in the same frame as the command.
        # update_timeout None: the worker handle's own timeout bounds the wait.
        result = call_on(
            client,
            "fedtensor.local_update",
            (self.plans[client], stored, shard.data, shard.targets),
            {**self.hyperparameters, "seed": update_seed(self.seed, update)},
        ).fetch_soon(free=True, timeout=self.update_timeout)
        del stored  # released on the worker right after the update read it
        self.flights[index] = _Flight(update, base, time.perf_counter())
        self.sent_since += 1
        self.group.start_soon(self.collect, index, result)

    async def collect(self, index: int, result: asyncio.Future[Any]) -> None:
        reply: dict[str, Any] | None = None
        error: Exception | None = None
        try:
            reply = await result
        except Exception as exc:  # sorted out by the main loop, in its order
            error = exc
        del result
        self.arrived[index] = _Arrival(reply, error, time.perf_counter())
        self.queue.append(index)
        self.wake.set()

    def refill(self, concurrency: int | None) -> None:
        """Send the newest model to idle workers until ``concurrency`` updates fly."""
        wanted = min(concurrency or len(self.alive), len(self.alive))
        idle = [index for index in self.alive if index not in self.flights]
        missing = wanted - len(self.flights)
        if missing <= 0 or not idle:
            return
        if missing < len(idle):  # a reproducible choice among the idle workers
            order = torch.randperm(
                len(idle), generator=_choice_generator(self.seed, self.next_update)
            )
            idle = [idle[position] for position in order[:missing].tolist()]
        self.bases.setdefault(self.version, self.current_state())
        for index in sorted(idle):
            self.send(index, self.next_update, self.version)
            self.next_update += 1

    def forget_unused_bases(self) -> None:
        used = {flight.base for flight in self.flights.values()} | {self.version}
        for version in [v for v in self.bases if v not in used]:
            del self.bases[version]

    # -- receiving -----------------------------------------------------------------------------

    async def next_arrival(self, replay: list[str]) -> int:
        """The worker whose update is taken next: ``replay``'s next, else the first come."""
        while True:
            if replay:
                wanted = self.index_of.get(replay[0])
                if wanted is None:
                    raise ValueError(f"arrival_order names {replay[0]!r}, no worker of the data")
                if wanted in self.arrived and self.arrived[wanted].error is None:
                    replay.pop(0)
                    self.queue.remove(wanted)
                    return wanted
                failure = next((i for i in self.queue if self.arrived[i].error is not None), None)
                if failure is not None:  # failures are taken as they come, order or not
                    self.queue.remove(failure)
                    return failure
                if wanted not in self.flights:
                    raise FedTensorError(
                        f"arrival_order wants an update of {replay[0]!r}, which has none in flight"
                    )
            elif self.queue:
                return self.queue.pop(0)
            if not self.flights:
                raise WorkerUnavailable("every worker of the federated data set is gone")
            self.wake = anyio.Event()
            await self.wake.wait()

    def take_failure(self, index: int, error: Exception) -> None:
        """A flight that gave no update: remember why; a dead worker is not sent more."""
        name = self.names[index]
        if isinstance(error, WorkerUnavailable):
            self.failed[name] = f"unavailable: {error}"
            self.alive.remove(index)
            self.dropped.append(index)
            self.plans.pop(self.data.shards[index].worker.client, None)
        elif isinstance(error, FedTimeoutError):
            self.failed[name] = f"{type(error).__name__}: {error}"
        elif isinstance(error, RemoteError):
            if error.remote_type in _PLAN_ERRORS:
                raise error  # the same plan fails on every worker: the run ends
            self.failed[name] = f"{type(error).__name__}: {error}"
        else:
            raise error  # not a worker's failure: the run ends with it

    async def rejoin(self) -> None:
        """Take back the dropped workers that are reachable again, their shard made again
        (:meth:`FederatedDataset.take_back`, as :func:`fedtensor.fit` does before each
        round): idle, so the next :meth:`refill` may send them an update."""
        back, settled = await self.data.take_back(self.dropped)
        if back:
            self.alive = sorted([*self.alive, *back])
        if settled:
            self.dropped = [index for index in self.dropped if index not in settled]

    # -- checkpoints ---------------------------------------------------------------------------

    def extra(self) -> dict[str, Any]:
        """What a checkpoint needs beyond the model: the flights and their models."""
        return {
            "asynchronous": {
                "next_update": self.next_update,
                "in_flight": [
                    [self.names[index], flight.update, flight.base]
                    for index, flight in sorted(self.flights.items(), key=lambda f: f[1].update)
                ],
                "bases": [[version, state] for version, state in sorted(self.bases.items())],
            }
        }

    def restore(self, version: int, extra: dict[str, Any]) -> list[tuple[int, int, int]]:
        """Take a checkpoint's state; the flights to send again (index, update, base)."""
        saved = extra.get("asynchronous")
        self.version = version
        if saved is None:  # no checkpoint yet (or a synchronous one: refused earlier)
            return []
        self.next_update = int(saved["next_update"])
        self.bases = {int(v): dict(state) for v, state in saved["bases"]}
        flights = []
        for name, update, base in saved["in_flight"]:
            if name not in self.index_of:
                raise FedTensorError(
                    f"the checkpoint has an update in flight on {name!r}, "
                    "a worker this data set lacks"
                )
            flights.append((self.index_of[name], int(update), int(base)))
        return flights


async def fit_asynchronously(
    model: torch.nn.Module,
    data: FederatedDataset,
    plan: Plan,
    strategy: AsynchronousStrategy,
    *,
    rounds: int,
    loss: Callable[..., Any],
    hyperparameters: dict[str, Any],
    update_timeout: float | None = None,
    eval_data: tuple[torch.Tensor, torch.Tensor] | None = None,
    evaluator: FederatedEvaluator | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: bool | IO[str] = True,
    seed: int = 0,
    on_round: Callable[[RoundMetrics], object] | None = None,
    arrival_order: Sequence[str] | None = None,
) -> History:
    """:func:`fedtensor.fit` for an asynchronous strategy: ``rounds`` model versions."""
    if not data.shards:
        raise ValueError("the federated data set has no workers")
    history = History()
    run = _AsynchronousRun(model, data, plan, strategy, hyperparameters, update_timeout, seed)
    resent: list[tuple[int, int, int]] = []
    if checkpoint is not None and resume:
        extra: dict[str, Any] = {}
        restored = await anyio.to_thread.run_sync(
            lambda: _checkpoint.load(Path(checkpoint), model, strategy, history, seed, extra)
        )
        resent = run.restore(restored, extra)
    replay = list(arrival_order or ())[len(history.arrival_order()) :]
    shown = ProgressDisplay(rounds, progress)
    parameters = set(plan.trainable)
    path = Path(checkpoint) if checkpoint is not None else None
    buffer: list[tuple[StaleUpdate, dict[str, Any], _Flight, float]] = []
    started = time.perf_counter()

    async def versions() -> None:
        """Take updates as they come until ``rounds`` versions are made."""
        last = started
        run.bases.setdefault(run.version, run.current_state())
        for index, update, base in resent:
            run.send(index, update, base)
        run.refill(strategy.concurrency)
        run.forget_unused_bases()
        while run.version < rounds:
            index = await run.next_arrival(replay)
            flight = run.flights.pop(index)
            arrival = run.arrived.pop(index)
            if arrival.error is not None:
                run.take_failure(index, arrival.error)
            else:
                assert arrival.reply is not None
                reply = arrival.reply
                stale = StaleUpdate(
                    run.names[index],
                    reply["state"],
                    run.bases[flight.base],
                    int(reply["examples"]),
                    run.version - flight.base,
                )
                buffer.append((stale, reply, flight, arrival.at))
                shown.update(run.version + 1, len(buffer), strategy.buffer_size)
            metrics = None
            if len(buffer) >= strategy.buffer_size:
                state = run.current_state()
                updates = [entry[0] for entry in buffer]
                model.load_state_dict(strategy.apply(state, updates, parameters))
                run.version += 1
                now = time.perf_counter()
                metrics = _metrics(run, buffer, now - last, started, state)
                buffer.clear()
                run.failed = {}
                run.sent_since = 0
                last = now
            if run.dropped:  # a restarted worker is idle again, for the refill below
                await run.rejoin()
            # The idle workers get the newest model at once: nobody waits for evaluation.
            run.refill(strategy.concurrency)
            run.forget_unused_bases()
            if metrics is not None:
                await finish(metrics)

    async def finish(metrics: RoundMetrics) -> None:
        """A version is made: evaluate it, show it, record it, save it."""
        if eval_data is not None:
            eval_loss, eval_accuracy = evaluate(model, *eval_data, loss)
            metrics = replace(metrics, eval_loss=eval_loss, eval_accuracy=eval_accuracy)
        if evaluator is not None and evaluator.due(run.version):
            evaluation = await evaluator.evaluate(model, run.version, run.alive)
            metrics = replace(metrics, **evaluation.metrics())
        history.append(metrics)
        shown.finished(metrics)
        if path is not None:
            extra, version = run.extra(), run.version
            # File work runs on a thread: replies keep flowing meanwhile.
            await anyio.to_thread.run_sync(
                lambda: _checkpoint.save(path, version, model, strategy, history, seed, extra)
            )
        if on_round is not None:
            on_round(metrics)

    stopped: list[Exception] = []
    try:
        async with anyio.create_task_group() as group:
            run.group = group
            try:
                await versions()
            except Exception as exc:  # raised below, not wrapped in an exception group
                stopped.append(exc)
            group.cancel_scope.cancel()  # the updates still in flight are not waited for
    finally:
        run.group = None
        run.plans.clear()  # the pointers go: the plans are released on the workers
        if evaluator is not None:
            evaluator.close()
    if stopped:
        raise stopped[0]
    return history


def _metrics(
    run: _AsynchronousRun,
    buffer: list[tuple[StaleUpdate, dict[str, Any], _Flight, float]],
    seconds: float,
    started: float,
    state: State,
) -> RoundMetrics:
    """The :class:`RoundMetrics` of the version just made from ``buffer``."""
    names = tuple(entry[0].worker for entry in buffer)
    examples = sum(entry[0].examples for entry in buffer)
    seen = examples * int(run.hyperparameters["epochs"])
    replies = [entry[1] for entry in buffer]
    return RoundMetrics(
        round=run.version,
        sampled=names,
        completed=names,
        failed=dict(run.failed),
        train_loss=(
            sum(float(r["loss"]) * int(r["examples"]) for r in replies) / examples
            if examples
            else math.nan
        ),
        train_accuracy=sum(int(r["correct"]) for r in replies) / seen if seen else math.nan,
        seconds=seconds,
        compute_seconds=max(float(r["seconds"]) for r in replies),
        transfer_seconds=sum(
            at - flight.sent - float(reply["seconds"]) for _, reply, flight, at in buffer
        )
        / len(buffer),
        bytes_sent=tensor_bytes(state) * run.sent_since,
        bytes_received=sum(tensor_bytes(r["state"]) for r in replies),
        arrivals=names,
        base_versions=tuple(entry[2].base for entry in buffer),
        staleness=tuple(entry[0].staleness for entry in buffer),
        arrival_seconds=tuple(entry[3] - started for entry in buffer),
    )
