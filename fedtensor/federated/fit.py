"""Federated training rounds: :func:`fit` and the :class:`History` it returns.

Theory of operation. :func:`fit` traces the model once into a plan
(:mod:`fedtensor.federated.trace`) and stores the plan once on every worker. Each round
then:

1. samples workers among those still reachable (``fraction`` of them, at least
   ``min_workers``), from a generator seeded with ``(seed, round)``;
2. for each sampled worker, without waiting: stores the global state there and
   queues one ``fedtensor.local_update`` on the worker's shard (a few commands,
   one frame, no round trip); all the workers of the round train concurrently
   (simulated clients: one ``fedtensor.local_updates`` per executor for all its
   sampled clients, :class:`~fedtensor.federated.simulation.ClientUpdates`);
3. collects the updates in a task group, one child per sampled worker (per
   executor for simulated clients, whose updates share one reply), each
   waiting at most ``round_timeout`` for its worker's update; a worker that died
   is dropped from later rounds (until it comes back: a Ray actor that Ray
   restarted is asked before each round, see ``_rejoin``), a straggler only from
   this one. A failure that
   would repeat on every worker (the plan is refused) cancels the whole group
   and ends the run;
4. aggregates the updates with the strategy (FedAvg by default; simulated clients'
   executors answer with their weighted sums when ``strategy.partial_sums_ok``), if at least
   ``min_workers`` answered (otherwise the round is recorded as skipped and the
   global model stays as it was), evaluates the model on held-out data, shows
   progress (:mod:`fedtensor.federated.progress`), and saves a checkpoint
   (:mod:`fedtensor.federated.checkpoint`).

Everything random derives from ``seed`` and the round number (which workers are
sampled, the order of each worker's batches, dropout masks), never from a
generator's running state. So a run resumed from the checkpoint of round ``k``
gives the same weights as a run that never stopped.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

import anyio
import anyio.abc
import anyio.to_thread
import torch
import torch.nn.functional

from fedtensor.client.pointer import PointerBase, call_on
from fedtensor.errors import RemoteError, WorkerUnavailable
from fedtensor.errors import TimeoutError as FedTimeoutError
from fedtensor.federated import checkpoint as _checkpoint
from fedtensor.federated import privacy as _privacy
from fedtensor.federated.asynchronous import fit_asynchronously
from fedtensor.federated.datasets import FederatedDataset, Shard
from fedtensor.federated.evaluation import FederatedEvaluator, evaluate
from fedtensor.federated.progress import History, ProgressDisplay, RoundMetrics
from fedtensor.federated.sampling import SAMPLINGS, Strata, stratified_sample, uniform_sample
from fedtensor.federated.secagg import SecAggPlus, secure_round
from fedtensor.federated.simulation import ClientShard, ClientUpdate, ClientUpdates, by_reply
from fedtensor.federated.strategies import AsynchronousStrategy, FedAvg, Strategy, Update
from fedtensor.federated.trace import Plan, trace
from fedtensor.protocol.plan import OPTIMIZERS
from fedtensor.protocol.values import tensor_bytes

__all__ = ["History", "RoundMetrics", "evaluate", "fit", "worker_seed"]


def worker_seed(seed: int, round: int, index: int) -> int:
    """The seed of the local update of worker ``index`` (in the data set) in ``round``."""
    return (seed * 1_000_003 + round * 10_007 + index) % (2**63)


def _sampling_generator(seed: int, round: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 7_919 + round) % (2**63))


async def fit(
    model: torch.nn.Module,
    data: FederatedDataset,
    *,
    rounds: int,
    loss: Callable[..., Any] = torch.nn.functional.cross_entropy,
    strategy: Strategy | None = None,
    epochs: int = 1,
    batch_size: int = 32,
    lr: float = 0.05,
    optimizer: str = "sgd",
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    fraction: float = 1.0,
    min_workers: int = 1,
    sampling: str = "uniform",
    round_timeout: float | None = None,
    eval_data: tuple[torch.Tensor, torch.Tensor] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: bool | IO[str] = True,
    seed: int = 0,
    on_round: Callable[[RoundMetrics], object] | None = None,
    evaluate_fraction: float = 0.0,
    evaluate_every: int = 1,
    arrival_order: Sequence[str] | None = None,
    dp: _privacy.Mechanism | Sequence[_privacy.Mechanism] | None = None,
    target_epsilon: float | None = None,
    secure_aggregation: SecAggPlus | None = None,
) -> History:
    """Train ``model`` federatedly on the workers holding ``data``; returns the history.

    ``model`` is updated in place to the global model after every round. The
    model's code never leaves this process: it is traced into a plan of
    allow-listed operations (:class:`ForbiddenOperation` if it uses anything
    else). ``progress`` is ``True`` (standard error), ``False``, or a stream.
    With ``checkpoint``, the state after every round is saved there; with
    ``resume`` as well, a run starts after the round the file holds.
    ``round_timeout`` bounds how long a round waits for updates (default: each
    worker handle's own timeout, 60 s unless given to ``connect``).
    ``sampling="stratified"`` spreads each round's sample over the executors in
    proportion to their shards (the same chance for every shard as the default
    ``"uniform"``, but executors in parallel finish together:
    :mod:`fedtensor.federated.sampling`); not with ``dp``, whose accountants assume
    uniform sampling.
    ``evaluate_fraction`` > 0 evaluates the global model every ``evaluate_every``
    rounds on the held-out parts (``holdout``) of that fraction of the workers
    (:mod:`fedtensor.federated.evaluation`). An asynchronous ``strategy``
    (``ft.FedBuff``, ``ft.FedAsync``) trains without rounds, ``rounds`` being model
    versions (:mod:`fedtensor.federated.asynchronous`); ``arrival_order`` replays
    one run's order of updates (``history.arrival_order()``).
    ``dp`` trains with differential privacy (``ft.CentralDP``, ``ft.LocalDP``,
    ``ft.DPSGD``; :mod:`fedtensor.federated.privacy`); with ``target_epsilon`` the
    run stops before a round that would pass that ε.
    ``secure_aggregation`` (``ft.SecAggPlus()``) aggregates by SecAgg+: this
    process learns only the sum of each round's updates
    (:mod:`fedtensor.federated.secagg`).
    """
    if rounds < 0 or epochs < 1 or batch_size < 1:
        raise ValueError("rounds must be >= 0, epochs and batch_size >= 1")
    if not 0 < fraction <= 1:
        raise ValueError("fraction must be in (0, 1]")
    if min_workers < 1:
        raise ValueError("min_workers must be at least 1")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}")
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {', '.join(SAMPLINGS)}, not {sampling!r}")
    if sampling != "uniform" and dp is not None:
        raise ValueError(
            "dp needs sampling='uniform': the privacy accountants assume uniform sampling"
        )
    strategy = strategy if strategy is not None else FedAvg()
    example = await _example_batch(data)
    plan = trace(model, loss, example)
    evaluator = None
    if evaluate_fraction:
        evaluator = FederatedEvaluator(
            model, loss, data, example, fraction=evaluate_fraction, every=evaluate_every,
            seed=seed, timeout=round_timeout,
        )  # fmt: skip
    if secure_aggregation is not None:
        workers = len(data.shards)
        per_round = min(workers, max(min_workers, math.ceil(fraction * workers)))
        secure_aggregation.check(workers, per_round, strategy)
    if isinstance(strategy, AsynchronousStrategy):  # FedBuff, FedAsync: no rounds
        if dp is not None or secure_aggregation is not None:
            raise ValueError("dp and secure_aggregation are for synchronous strategies only")
        if sampling != "uniform":
            raise ValueError("sampling is for synchronous strategies: they sample rounds")
        return await fit_asynchronously(
            model, data, plan, strategy, rounds=rounds, loss=loss,
            hyperparameters={
                "epochs": epochs, "batch_size": batch_size, "lr": lr, "optimizer": optimizer,
                "momentum": momentum, "weight_decay": weight_decay,
            },
            update_timeout=round_timeout, eval_data=eval_data, evaluator=evaluator,
            checkpoint=checkpoint, resume=resume, progress=progress, seed=seed,
            on_round=on_round, arrival_order=arrival_order,
        )  # fmt: skip
    if arrival_order is not None:
        raise ValueError("arrival_order is for asynchronous strategies (ft.FedBuff, ft.FedAsync)")
    history = History()
    first_round = 1
    # A private run's accounting, if it was one; how it sampled, if not uniformly.
    restored_extra: dict[str, Any] = {}
    if checkpoint is not None and resume:
        # File work runs on a thread: other clients' replies keep flowing meanwhile.
        restored = await anyio.to_thread.run_sync(
            _checkpoint.load, Path(checkpoint), model, strategy, history, seed, restored_extra
        )
        first_round = restored + 1
        if restored and (dp is None) != ("privacy" not in restored_extra):
            raise ValueError(
                f"{checkpoint} was saved by a {'private' if dp is None else 'non-private'} "
                f"run; this run is {'not ' if dp is None else ''}private (dp=...): resume "
                "with the same dp as the run that saved it"
            )
        saved_sampling = restored_extra.get("sampling", "uniform")
        if restored and saved_sampling != sampling:
            raise ValueError(
                f"{checkpoint} was saved by a run with sampling={saved_sampling!r}; this run "
                f"has sampling={sampling!r}: it would train other clients than an "
                "uninterrupted run"
            )
    if len(data.shards) < min_workers:
        raise ValueError(f"min_workers={min_workers} but the data is on {len(data.shards)} workers")
    privacy = None
    if dp is not None:
        workers = len(data.shards)
        privacy = _privacy.PrivacyRun(
            dp,
            target_epsilon=target_epsilon,
            workers=workers,
            sampled=min(workers, max(min_workers, math.ceil(fraction * workers))),
            trainable=plan.trainable,
            model=model,
            fraction=fraction,
            secure=secure_aggregation is not None,
        )
        if "privacy" in restored_extra:  # the accounting (and clipping bound) so far
            privacy.load_state_dict(restored_extra["privacy"])
    elif target_epsilon is not None:
        raise ValueError("target_epsilon needs dp (ft.CentralDP, ft.LocalDP or ft.DPSGD)")
    run = _Run(
        model=model,
        data=data,
        plan=plan,
        strategy=strategy,
        parameters=set(plan.trainable),
        hyperparameters={
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "optimizer": optimizer,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "prox_mu": strategy.prox_mu,
            **(privacy.worker_arguments() if privacy is not None else {}),
        },
        fraction=fraction,
        min_workers=min_workers,
        round_timeout=round_timeout,
        seed=seed,
        shown=ProgressDisplay(rounds, progress),
        alive=list(range(len(data.shards))),
        plans={},
        privacy=privacy,
        secure_aggregation=secure_aggregation,
        strata=(
            Strata([id(shard.worker) for shard in data.shards])
            if sampling == "stratified"
            else None
        ),
    )
    try:
        for round in range(first_round, rounds + 1):
            if run.dropped:
                await _rejoin(run)
            if not run.alive:
                raise WorkerUnavailable("every worker of the federated data set is gone")
            if privacy is not None and (reason := _privacy_stop(run, round)) is not None:
                if round == first_round:
                    raise ValueError(f"not even one round fits the privacy budget: {reason}")
                history.stopped = f"stopped before round {round}: {reason}"
                run.shown.note(history.stopped)
                break
            metrics = await _round(run, round)
            if eval_data is not None:
                eval_loss, eval_accuracy = evaluate(model, *eval_data, loss)
                metrics = replace(metrics, eval_loss=eval_loss, eval_accuracy=eval_accuracy)
            if evaluator is not None and evaluator.due(round):
                evaluation = await evaluator.evaluate(model, round, run.alive)
                metrics = replace(metrics, **evaluation.metrics())
            history.append(metrics)
            run.shown.finished(metrics)
            if checkpoint is not None:
                await anyio.to_thread.run_sync(
                    _checkpoint.save, Path(checkpoint), round, model, strategy, history, seed,
                    {
                        **({"privacy": privacy.state_dict()} if privacy is not None else {}),
                        **({"sampling": sampling} if sampling != "uniform" else {}),
                    },
                )  # fmt: skip
            if on_round is not None:
                on_round(metrics)
    finally:
        run.plans.clear()  # the pointers go: the plans are released on the workers
        run.plans_by_client.clear()
        if evaluator is not None:
            evaluator.close()
    return history


@dataclass
class _Run:
    """What every round of one :func:`fit` call shares."""

    model: torch.nn.Module
    data: FederatedDataset
    plan: Plan
    strategy: Strategy
    parameters: set[str]
    hyperparameters: dict[str, Any]
    fraction: float
    min_workers: int
    round_timeout: float | None
    seed: int
    shown: ProgressDisplay
    #: Indices (in ``data.shards``) of the workers not known to be gone.
    alive: list[int]
    #: The plan stored on each worker that has it, by index.
    plans: dict[int, PointerBase]
    #: Differential privacy's state (accountants, clipping bound), if the run is private.
    privacy: _privacy.PrivacyRun | None = None
    #: SecAgg+ (fedtensor.federated.secagg), if the run aggregates securely.
    secure_aggregation: SecAggPlus | None = None
    #: The plan stored on each worker, by ``id`` of its client: the shards of one
    #: worker (simulated clients, fedtensor.federated.simulation) share one.
    plans_by_client: dict[int, PointerBase] = field(default_factory=dict)
    #: Indices of the workers dropped as unavailable that may come back (see _rejoin).
    dropped: list[int] = field(default_factory=list)
    #: The shards by executor, when rounds sample by executor (sampling="stratified").
    strata: Strata | None = None

    @property
    def reply_timeout(self) -> float | None:
        """The timer of a reply's fetch, asked for with its command (``fetch_soon``): the
        round's deadline is the round's own (``round_timeout``, named as the reason); the
        timer runs a little longer, only to free what the round gave up on."""
        return None if self.round_timeout is None else self.round_timeout + _REPLY_GRACE


#: Seconds a reply is awaited past the round's timeout before its fetch is dropped.
_REPLY_GRACE = 1.0

# Remote failures that are the plan's or the hyperparameters' fault, not the worker's.
_PLAN_ERRORS = frozenset({"PlanError", "ForbiddenOperation"})


def _sample(run: _Run, round: int) -> list[int]:
    """The indices of the workers ``round`` samples (a function of the seed and round)."""
    alive = run.alive
    count = min(len(alive), max(run.min_workers, math.ceil(run.fraction * len(alive))))
    generator = _sampling_generator(run.seed, round)
    if run.strata is not None:
        return stratified_sample(run.strata.groups(alive), count, generator)
    return uniform_sample(alive, count, generator)


def _privacy_stop(run: _Run, round: int) -> str | None:
    """Why ``round`` would pass the run's privacy budget, or None."""
    assert run.privacy is not None
    return run.privacy.would_exceed(
        len(run.alive),
        _sample(run, round),
        {index: shard.size for index, shard in enumerate(run.data.shards)},
        run.hyperparameters["epochs"],
        run.hyperparameters["batch_size"],
    )


async def _round(run: _Run, round: int) -> RoundMetrics:
    started = time.perf_counter()
    alive = run.alive
    alive_before = len(alive)
    sampled = _sample(run, round)
    state = {key: value.detach() for key, value in run.model.state_dict().items()}
    shards = run.data.shards
    if run.secure_aggregation is not None:
        if run.privacy is None:
            return await secure_round(run, round, sampled, state)
        # Central DP's noise is added by the workers, before masking.
        metrics = await secure_round(
            run, round, sampled, state, **run.privacy.secure_arguments(len(sampled))
        )
        epsilon, example_epsilon = run.privacy.account(
            alive_before,
            sampled,
            {index: shards[index].size for index in sampled},
            run.hyperparameters["epochs"],
            run.hyperparameters["batch_size"],
            not metrics.skipped,
            {},
            survivors=len(metrics.completed),
        )
        return replace(
            metrics,
            epsilon=epsilon,
            example_epsilon=example_epsilon,
            clip_norm=run.privacy.clip_norm,
        )

    # Every sampled worker's commands are queued before any reply is awaited: the
    # workers train concurrently. Their replies are asked for at once, in the same
    # frame as the commands (fetch_soon): one frame each way per worker and round.
    reply_timeout = run.reply_timeout
    results: dict[int, asyncio.Future[Any] | ClientUpdate] = {}
    # The global state goes once to each worker: its shards (simulated clients) share it.
    stored: dict[int, PointerBase] = {}
    # Simulated clients train in one command per executor (fedtensor.worker.local_updates),
    # which answers with its clients' weighted sum when the strategy reads only the mean
    # (central DP clips each update: it needs them one by one).
    central_dp = run.privacy is not None and run.privacy.central is not None
    batched = ClientUpdates(partial_sums=run.strategy.partial_sums_ok and not central_dp)
    for index in sampled:
        shard = shards[index]
        client = shard.worker.client
        if index not in run.plans:
            shared = run.plans_by_client.get(id(client))
            run.plans[index] = shared if shared is not None else client.store(run.plan.wire)
            run.plans_by_client[id(client)] = run.plans[index]
        if id(client) not in stored:
            stored[id(client)] = client.store(state)
        if isinstance(shard, ClientShard):
            batched.add(index, shard, worker_seed(run.seed, round, index))
            continue
        results[index] = call_on(
            client,
            "fedtensor.local_update",
            (run.plans[index], stored[id(client)], shard.data, shard.targets),
            {**run.hyperparameters, "seed": worker_seed(run.seed, round, index)},
        ).fetch_soon(free=True, timeout=reply_timeout)
    if batched:
        results.update(
            batched.submit(run.plans_by_client, stored, run.hyperparameters, timeout=reply_timeout)
        )
    state_copies = len(stored)
    del stored  # released on the workers right after their last update read it
    submitted = time.perf_counter()

    updates: dict[int, tuple[dict[str, Any], float]] = {}  # index -> (reply, seconds to it)
    reasons: dict[int, str] = {}  # index -> why it gave no update
    remote_errors: dict[int, RemoteError] = {}
    stopped: list[Exception] = []  # what ended the whole run, if anything
    run.shown.update(round, 0, len(sampled))

    async def collect(
        members: list[tuple[int, asyncio.Future[Any] | ClientUpdate]], group: anyio.abc.TaskGroup
    ) -> None:
        # One task per reply: the simulated clients of an executor share one (after the
        # first, their fetches return at once), so a round costs a task per executor.
        answered = 0
        with anyio.move_on_after(run.round_timeout) as waited:
            for index, result in members:
                try:
                    # round_timeout None: each worker handle's own timeout bounds the wait.
                    reply = await (result.answer() if isinstance(result, ClientUpdate) else result)
                except WorkerUnavailable as exc:
                    reasons[index] = f"unavailable: {exc}"
                    alive.remove(index)
                    run.dropped.append(index)
                    run.plans.pop(index, None)
                    dead = run.plans_by_client.pop(id(shards[index].worker.client), None)
                    if dead is not None:  # the worker's other shards (simulated clients) too
                        for other in [i for i, plan in run.plans.items() if plan is dead]:
                            del run.plans[other]
                except FedTimeoutError as exc:
                    reasons[index] = f"{type(exc).__name__}: {exc}"
                except RemoteError as exc:
                    reasons[index] = f"{type(exc).__name__}: {exc}"
                    if exc.remote_type in _PLAN_ERRORS:
                        # The same plan fails on every worker: stop the run, do not skip.
                        stopped.append(exc)
                        group.cancel_scope.cancel()
                    remote_errors[index] = exc
                except Exception as exc:  # not a worker's failure: the run ends with it
                    stopped.append(exc)
                    group.cancel_scope.cancel()
                else:
                    updates[index] = (reply, time.perf_counter() - submitted)
                answered += 1
        if waited.cancelled_caught:
            for index, _ in members[answered:]:
                reasons[index] = f"no update within {run.round_timeout} s"
        run.shown.update(round, len(updates), len(sampled))

    async with anyio.create_task_group() as group:
        for members in by_reply(sampled, results):
            group.start_soon(collect, members, group)
    results.clear()
    if stopped:
        raise stopped[0]
    if not updates and remote_errors:
        # Training itself failed everywhere (a shape mismatch, a bad label): say so
        # rather than skip round after round.
        raise remote_errors[min(remote_errors)]

    # Partial sums (simulated clients): their mean as one update, and which clients it holds.
    summed, in_sums, summed_bytes = batched.summed(state, updates)
    replies = [(index, *updates[index]) for index in sampled if index in updates]
    name = {index: shards[index].name for index in sampled}  # only the sampled: O(round)
    examples = sum(int(reply["examples"]) for _, reply, _ in replies)
    skipped = len(replies) < run.min_workers
    privacy = run.privacy
    clip_norm = privacy.clip_norm if privacy is not None else math.nan
    if not skipped:
        updates_in = [
            Update(name[i], reply["state"], int(reply["examples"]))
            for i, reply, _ in replies
            if i not in in_sums
        ] + summed
        if privacy is not None and privacy.central is not None:
            # Central DP: the strategy sees only the noised mean of the clipped updates.
            noised = privacy.aggregate(state, [update.state for update in updates_in])
            updates_in = [Update("(central DP)", noised, 1)]
        new_state = run.strategy.aggregate(state, updates_in, run.parameters)
        run.model.load_state_dict(new_state)
    epsilon = example_epsilon = math.nan
    if privacy is not None:
        epsilon, example_epsilon = privacy.account(
            alive_before,
            sampled,
            {index: shards[index].size for index in sampled},
            run.hyperparameters["epochs"],
            run.hyperparameters["batch_size"],
            not skipped,
            {index: reply for index, reply, _ in replies},
        )
    seen = examples * run.hyperparameters["epochs"]
    return RoundMetrics(
        round=round,
        sampled=tuple(name[index] for index in sampled),
        completed=tuple(name[index] for index, _, _ in replies),
        failed={name[index]: reasons[index] for index in sampled if index in reasons},
        skipped=skipped,
        train_loss=(
            sum(float(reply["loss"]) * int(reply["examples"]) for _, reply, _ in replies) / examples
            if examples
            else math.nan
        ),
        train_accuracy=(
            sum(int(reply["correct"]) for _, reply, _ in replies) / seen if seen else math.nan
        ),
        seconds=time.perf_counter() - started,
        compute_seconds=max((float(reply["seconds"]) for _, reply, _ in replies), default=0.0),
        transfer_seconds=(
            sum(elapsed - float(reply["seconds"]) for _, reply, elapsed in replies) / len(replies)
            if replies
            else 0.0
        ),
        bytes_sent=tensor_bytes(state) * state_copies,
        bytes_received=summed_bytes
        + sum(tensor_bytes(reply["state"]) for i, reply, _ in replies if i not in in_sums),
        epsilon=epsilon,
        example_epsilon=example_epsilon,
        clip_norm=clip_norm,
    )


async def _rejoin(run: _Run) -> None:
    """Take back the dropped workers that are reachable again, their shards made again
    (:meth:`FederatedDataset.take_back`); the plan and the global state are sent to
    them by their next round, as to any worker."""
    back, settled = await run.data.take_back(run.dropped)
    if back:
        run.alive = sorted([*run.alive, *back])
    if settled:
        run.dropped = [index for index in run.dropped if index not in settled]


async def _example_batch(data: FederatedDataset) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Tensors shaped like a batch of ``data`` (for tracing): known locally, or one example
    from the first worker that answers (a dead one is dropped by the first round)."""
    unavailable: list[WorkerUnavailable] = []
    for shard in data.shards:
        try:
            return await _shard_example(shard)
        except WorkerUnavailable as exc:
            unavailable.append(exc)
    if unavailable:
        raise WorkerUnavailable(
            f"every worker of the federated data set is gone: {unavailable[0]}"
        ) from unavailable[0]
    return None


async def _shard_example(shard: Shard) -> tuple[torch.Tensor, torch.Tensor]:
    parts = []
    for pointer in (shard.data, shard.targets):
        if pointer.shape is not None and pointer.dtype is not None:
            parts.append(torch.empty(pointer.shape, dtype=pointer.dtype, device="meta"))
        else:  # a data set the worker held: bring one example to learn its shape
            parts.append(await pointer[:1].fetch(free=True))
    return parts[0], parts[1]
