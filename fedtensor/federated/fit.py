"""Federated training rounds: :func:`fit` and the :class:`History` it returns.

Theory of operation. :func:`fit` traces the model once into a plan
(:mod:`fedtensor.protocol.plan`) and stores the plan once on every worker. Each round
then:

1. samples workers among those still reachable (``fraction`` of them, at least
   ``min_workers``), from a generator seeded with ``(seed, round)``;
2. for each sampled worker, without waiting: stores the global state there and
   queues one ``fedtensor.local_update`` on the worker's shard (a few commands,
   one frame, no round trip); all the workers of the round train concurrently;
3. collects the updates as they come, until every worker answered or the round's
   ``round_timeout`` ran out; a worker that died is dropped from later rounds, a
   straggler only from this one;
4. aggregates the updates with the strategy (FedAvg by default), if at least
   ``min_workers`` answered (otherwise the round is recorded as skipped and the
   global model stays as it was), evaluates the model on held-out data, shows
   progress, and saves a checkpoint.

Everything random derives from ``seed`` and the round number (which workers are
sampled, the order of each worker's batches, dropout masks), never from a
generator's running state. So a run resumed from the checkpoint of round ``k``
gives the same weights as a run that never stopped.
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO, Any

import anyio
import anyio.to_thread
import torch
import torch.nn.functional

from fedtensor.client.pointer import PointerBase, call_on
from fedtensor.errors import FedTensorError, RemoteError, WorkerUnavailable
from fedtensor.errors import TimeoutError as FedTimeoutError
from fedtensor.federated.datasets import FederatedDataset
from fedtensor.federated.strategies import FedAvg, Strategy, Update
from fedtensor.protocol.plan import Plan, trace
from fedtensor.protocol.values import tensor_bytes
from fedtensor.worker.local_update import OPTIMIZERS

__all__ = ["History", "RoundMetrics", "evaluate", "fit", "worker_seed"]

CHECKPOINT_FORMAT = 1


@dataclass(frozen=True)
class RoundMetrics:
    """What happened in one round."""

    round: int
    #: Worker ids sampled, and those whose update was aggregated.
    sampled: tuple[str, ...]
    completed: tuple[str, ...]
    #: Worker id -> why it gave no update (died, timed out, failed).
    failed: dict[str, str] = field(default_factory=dict)
    #: True when fewer than ``min_workers`` answered: the model was left unchanged.
    skipped: bool = False
    train_loss: float = math.nan
    train_accuracy: float = math.nan
    eval_loss: float = math.nan
    eval_accuracy: float = math.nan
    #: Wall-clock seconds of the round, and the longest local training in it.
    seconds: float = 0.0
    compute_seconds: float = 0.0
    #: Mean over workers of (time to the update - the worker's training time):
    #: sending the model, queueing, bringing the update back.
    transfer_seconds: float = 0.0
    #: Tensor bytes of model state sent to, and received from, the workers.
    bytes_sent: int = 0
    bytes_received: int = 0


class History(Sequence[RoundMetrics]):
    """The metrics of every round so far, in order."""

    def __init__(self, rounds: Sequence[RoundMetrics] = ()) -> None:
        self._rounds = list(rounds)

    def __len__(self) -> int:
        return len(self._rounds)

    def __getitem__(self, index: Any) -> Any:
        return self._rounds[index]

    def __iter__(self) -> Iterator[RoundMetrics]:
        return iter(self._rounds)

    def append(self, metrics: RoundMetrics) -> None:
        self._rounds.append(metrics)

    def __repr__(self) -> str:
        return f"<History of {len(self)} rounds>"

    def table(self) -> str:
        """The rounds as a plain-text table."""
        lines = [
            "round  workers  train loss  train acc  eval loss  eval acc  seconds",
        ]
        for m in self._rounds:
            workers = f"{len(m.completed)}/{len(m.sampled)}" + ("*" if m.skipped else "")
            train_accuracy, eval_accuracy = _percent(m.train_accuracy), _percent(m.eval_accuracy)
            lines.append(
                f"{m.round:>5}  {workers:>7}  {m.train_loss:>10.4f}  {train_accuracy:>9}"
                f"  {m.eval_loss:>9.4f}  {eval_accuracy:>8}  {m.seconds:>7.2f}"
            )
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """Write the loss and accuracy curves to a PNG at ``path`` (needs matplotlib)."""
        try:
            import matplotlib

            matplotlib.use("Agg", force=True)
            import matplotlib.pyplot as plt
        except ImportError as exc:
            raise ImportError(
                "History.plot needs matplotlib: pip install 'fedtensor[plot]'"
            ) from exc
        rounds = [m.round for m in self._rounds]
        figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(10, 4))
        loss_axes.plot(rounds, [m.train_loss for m in self._rounds], label="train (workers)")
        loss_axes.plot(rounds, [m.eval_loss for m in self._rounds], label="held-out")
        loss_axes.set_xlabel("round")
        loss_axes.set_ylabel("loss")
        loss_axes.legend()
        accuracy_axes.plot(
            rounds, [m.train_accuracy for m in self._rounds], label="train (workers)"
        )
        accuracy_axes.plot(rounds, [m.eval_accuracy for m in self._rounds], label="held-out")
        accuracy_axes.set_xlabel("round")
        accuracy_axes.set_ylabel("accuracy")
        accuracy_axes.legend()
        figure.tight_layout()
        target = Path(path)
        figure.savefig(target, format="png")
        plt.close(figure)
        return target


def _percent(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:.1f}%"


def worker_seed(seed: int, round: int, index: int) -> int:
    """The seed of the local update of worker ``index`` (in the data set) in ``round``."""
    return (seed * 1_000_003 + round * 10_007 + index) % (2**63)


def _sampling_generator(seed: int, round: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 7_919 + round) % (2**63))


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


class _Progress:
    """A bar per round on a terminal; a plain line per round elsewhere."""

    WIDTH = 20

    def __init__(self, rounds: int, stream: IO[str] | None) -> None:
        self.rounds = rounds
        self.stream = stream
        self.tty = stream is not None and stream.isatty()

    def update(self, round: int, done: int, sampled: int) -> None:
        if self.stream is None or not self.tty:
            return
        filled = self.WIDTH * done // max(sampled, 1)
        bar = "#" * filled + "." * (self.WIDTH - filled)
        self.stream.write(f"\rround {round:>3}/{self.rounds} [{bar}] {done}/{sampled} workers")
        self.stream.flush()

    def finished(self, m: RoundMetrics) -> None:
        if self.stream is None:
            return
        parts = [f"{len(m.completed)}/{len(m.sampled)} workers"]
        if m.skipped:
            parts.append("skipped (too few updates)")
        if not math.isnan(m.train_loss):
            parts.append(f"train loss {m.train_loss:.4f}")
        if not math.isnan(m.eval_loss):
            parts.append(f"eval loss {m.eval_loss:.4f}, eval acc {_percent(m.eval_accuracy)}")
        parts.append(f"{m.seconds:.2f} s")
        if self.tty:
            bar = "#" * self.WIDTH
            line = f"\rround {m.round:>3}/{self.rounds} [{bar}] " + " · ".join(parts)
        else:
            line = f"round {m.round}/{self.rounds}: " + ", ".join(parts)
        self.stream.write(line + "\n")
        self.stream.flush()


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
    round_timeout: float | None = None,
    eval_data: tuple[torch.Tensor, torch.Tensor] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: bool | IO[str] = True,
    seed: int = 0,
    on_round: Callable[[RoundMetrics], object] | None = None,
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
    """
    if rounds < 0 or epochs < 1 or batch_size < 1:
        raise ValueError("rounds must be >= 0, epochs and batch_size >= 1")
    if not 0 < fraction <= 1:
        raise ValueError("fraction must be in (0, 1]")
    if min_workers < 1:
        raise ValueError("min_workers must be at least 1")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}")
    strategy = strategy if strategy is not None else FedAvg()
    plan = trace(model, loss, await _example_batch(data))
    parameters = set(plan.trainable)
    history = History()
    first_round = 1
    if checkpoint is not None and resume:
        # File work runs on a thread: other clients' replies keep flowing meanwhile.
        restored = await anyio.to_thread.run_sync(
            _restore, Path(checkpoint), model, strategy, history, seed
        )
        first_round = restored + 1
    if len(data.shards) < min_workers:
        raise ValueError(f"min_workers={min_workers} but the data is on {len(data.shards)} workers")
    stream: IO[str] | None = sys.stderr if progress is True else (progress or None)
    shown = _Progress(rounds, stream)
    hyperparameters: dict[str, Any] = {
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "optimizer": optimizer,
        "momentum": momentum,
        "weight_decay": weight_decay,
        "prox_mu": strategy.prox_mu,
    }
    alive = list(range(len(data.shards)))
    plans: dict[int, PointerBase] = {}
    try:
        for round in range(first_round, rounds + 1):
            if not alive:
                raise WorkerUnavailable("every worker of the federated data set is gone")
            metrics = await _round(
                round,
                model,
                data,
                plan,
                plans,
                alive,
                strategy=strategy,
                parameters=parameters,
                hyperparameters=hyperparameters,
                fraction=fraction,
                min_workers=min_workers,
                round_timeout=round_timeout,
                seed=seed,
                shown=shown,
            )
            if eval_data is not None:
                eval_loss, eval_accuracy = evaluate(model, *eval_data, loss)
                metrics = replace(metrics, eval_loss=eval_loss, eval_accuracy=eval_accuracy)
            history.append(metrics)
            shown.finished(metrics)
            if checkpoint is not None:
                await anyio.to_thread.run_sync(
                    _save, Path(checkpoint), round, model, strategy, history, seed
                )
            if on_round is not None:
                on_round(metrics)
    finally:
        plans.clear()  # the pointers go: the plans are released on the workers
    return history


async def _round(
    round: int,
    model: torch.nn.Module,
    data: FederatedDataset,
    plan: Plan,
    plans: dict[int, PointerBase],
    alive: list[int],
    *,
    strategy: Strategy,
    parameters: set[str],
    hyperparameters: dict[str, Any],
    fraction: float,
    min_workers: int,
    round_timeout: float | None,
    seed: int,
    shown: _Progress,
) -> RoundMetrics:
    started = time.perf_counter()
    count = min(len(alive), max(min_workers, math.ceil(fraction * len(alive))))
    order = torch.randperm(len(alive), generator=_sampling_generator(seed, round)).tolist()
    sampled = sorted(alive[position] for position in order[:count])
    state = {key: value.detach() for key, value in model.state_dict().items()}
    state_bytes = tensor_bytes(state)
    shards = data.shards
    results: dict[int, PointerBase] = {}
    for index in sampled:
        shard = shards[index]
        client = shard.worker.client
        if index not in plans:
            plans[index] = client.store(plan.wire)
        stored = client.store(state)
        results[index] = call_on(
            client,
            "fedtensor.local_update",
            (plans[index], stored, shard.data, shard.targets),
            {**hyperparameters, "seed": worker_seed(seed, round, index)},
        )
        del stored  # released on the worker right after the update read it

    submitted = time.perf_counter()

    async def collect(index: int) -> tuple[int, dict[str, Any], float]:
        # round_timeout None: each worker handle's own timeout bounds the wait.
        reply = await results.pop(index)._fetch(free=True, timeout=round_timeout)
        return index, reply, time.perf_counter() - submitted

    tasks = {asyncio.ensure_future(collect(index)): index for index in sampled}
    updates: list[tuple[int, dict[str, Any], float]] = []
    failed: dict[str, str] = {}
    remote_errors: list[RemoteError] = []
    deadline = None if round_timeout is None else submitted + round_timeout
    pending = set(tasks)
    shown.update(round, 0, len(sampled))
    try:
        while pending:
            remaining = None if deadline is None else max(0.0, deadline - time.perf_counter())
            done, pending = await asyncio.wait(
                pending, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                break  # the round's time is up
            for task in done:
                index = tasks[task]
                try:
                    updates.append(task.result())
                except WorkerUnavailable as exc:
                    failed[shards[index].worker.id] = f"unavailable: {exc}"
                    alive.remove(index)
                    plans.pop(index, None)
                except FedTimeoutError as exc:
                    failed[shards[index].worker.id] = f"{type(exc).__name__}: {exc}"
                except RemoteError as exc:
                    failed[shards[index].worker.id] = f"{type(exc).__name__}: {exc}"
                    if exc.remote_type in _PLAN_ERRORS:
                        raise  # the same plan fails on every worker: stop, do not skip
                    remote_errors.append(exc)
            shown.update(round, len(updates), len(sampled))
    finally:
        for task in pending:
            task.cancel()
            failed[shards[tasks[task]].worker.id] = f"no update within {round_timeout} s"
        if pending:
            await asyncio.wait(pending)
    if not updates and remote_errors:
        # Training itself failed everywhere (a shape mismatch, a bad label): say so
        # rather than skip round after round.
        raise remote_errors[0]
    updates.sort(key=lambda item: item[0])
    completed = tuple(shards[index].worker.id for index, _, _ in updates)
    sampled_ids = tuple(shards[index].worker.id for index in sampled)
    examples = sum(int(reply["examples"]) for _, reply, _ in updates)
    seen = sum(int(reply["examples"]) * hyperparameters["epochs"] for _, reply, _ in updates)
    skipped = len(updates) < min_workers
    if not skipped:
        new_state = strategy.aggregate(
            state,
            [
                Update(shards[i].worker.id, reply["state"], int(reply["examples"]))
                for i, reply, _ in updates
            ],
            parameters,
        )
        model.load_state_dict(new_state)
    train_loss = (
        sum(float(reply["loss"]) * int(reply["examples"]) for _, reply, _ in updates) / examples
        if examples
        else math.nan
    )
    return RoundMetrics(
        round=round,
        sampled=sampled_ids,
        completed=completed,
        failed=failed,
        skipped=skipped,
        train_loss=train_loss,
        train_accuracy=(sum(int(reply["correct"]) for _, reply, _ in updates) / seen)
        if seen
        else math.nan,
        seconds=time.perf_counter() - started,
        compute_seconds=max((float(reply["seconds"]) for _, reply, _ in updates), default=0.0),
        transfer_seconds=(
            sum(elapsed - float(reply["seconds"]) for _, reply, elapsed in updates) / len(updates)
            if updates
            else 0.0
        ),
        bytes_sent=state_bytes * len(sampled),
        bytes_received=sum(tensor_bytes(reply["state"]) for _, reply, _ in updates),
    )


async def _example_batch(data: FederatedDataset) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Tensors shaped like a batch of ``data`` (for tracing): known locally, or one example."""
    if not data.shards:
        return None
    shard = data.shards[0]
    parts = []
    for pointer in (shard.data, shard.targets):
        if pointer.shape is not None and pointer.dtype is not None:
            parts.append(torch.empty(pointer.shape, dtype=pointer.dtype, device="meta"))
        else:  # a data set the worker held: bring one example to learn its shape
            parts.append(await pointer[:1]._fetch(free=True, timeout=None))
    return parts[0], parts[1]


# Remote failures that are the plan's or the hyperparameters' fault, not the worker's.
_PLAN_ERRORS = frozenset({"PlanError", "ForbiddenOperation"})


# -- checkpoints -----------------------------------------------------------------------------------


def _save(
    path: Path,
    round: int,
    model: torch.nn.Module,
    strategy: Strategy,
    history: History,
    seed: int,
) -> None:
    payload = {
        "format": CHECKPOINT_FORMAT,
        "round": round,
        "seed": seed,
        "strategy": type(strategy).__name__,
        "model": model.state_dict(),
        "strategy_state": strategy.state_dict(),
        "history": [_plain(asdict(m)) for m in history],
    }
    # Written beside and renamed: a run stopped mid-write leaves the last good checkpoint.
    partial = path.with_name(path.name + ".partial")
    torch.save(payload, partial)
    os.replace(partial, path)


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    return {
        key: list(value) if isinstance(value, tuple) else value for key, value in values.items()
    }


def _restore(
    path: Path, model: torch.nn.Module, strategy: Strategy, history: History, seed: int
) -> int:
    """Load a checkpoint into ``model``, ``strategy`` and ``history``; the round it holds.

    No file: nothing is loaded, and the round is 0.
    """
    if not path.exists():
        return 0
    # weights_only: a checkpoint is data, and loading it must not run code.
    payload = torch.load(path, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise FedTensorError(f"{path} is not a fedtensor checkpoint")
    if payload["seed"] != seed or payload["strategy"] != type(strategy).__name__:
        raise FedTensorError(
            f"{path} was saved by a run with seed {payload['seed']} and "
            f"{payload['strategy']}; this run has seed {seed} and {type(strategy).__name__}"
        )
    model.load_state_dict(payload["model"])
    strategy.load_state_dict(payload["strategy_state"])
    for values in payload["history"]:
        values["sampled"], values["completed"] = (
            tuple(values["sampled"]),
            tuple(values["completed"]),
        )
        history.append(RoundMetrics(**values))
    return int(payload["round"])
