"""Many simulated clients on a few executors: :func:`simulate_clients`.

::

    async with ft.local_workers(2) as executors:
        clients = ft.simulate_clients((x, y), clients=10_000, executors=executors)
        history = await ft.fit(model, clients, rounds=10, fraction=0.01)

Theory of operation
-------------------
In simulation a client is a part of a data set and a seed, not a worker: 10,000
clients must not mean 10,000 actors, connections or copies of the data. So the
data set is cut into clients (IID, Dirichlet or shards, by
:func:`~fedtensor.federated.datasets.split_indices`, or by a given per-example
client id: a natural partition, as LEAF's FEMNIST splits by writer), the clients
are pinned to executors in contiguous runs (any worker handles: virtual workers,
``ft.local_workers`` processes, Ray workers), and each executor is sent, once,
one *block*: the examples of its clients, client after client. A client is then
an executor, a block and a row range ``start:stop`` (a :class:`ClientShard`).

Its ``data`` and ``targets`` are made when read: ``block[start:stop]``, one slice
command queued on the executor (no round trip), whose result is a view of the
block, not a copy. :func:`~fedtensor.federated.fit.fit` reads them only for the
clients a round samples and drops them after the round, so an executor holds
the block plus the views of the clients of the round in progress: its memory
grows with the clients per round, not with the clients that exist. Here each
client costs one small Python object; opening and closing N clients is linear
in N and sends nothing per client.

A :class:`SimulatedClients` is a :class:`~fedtensor.FederatedDataset`: ``fit``
samples its clients (``fraction``) with the usual seeded sampling, stores the
plan once per executor, and sends each executor one command per round,
``fedtensor.local_updates`` (:mod:`fedtensor.worker.local_updates`, queued by
:class:`ClientUpdates`), naming the rows and seed of each of its sampled clients:
it trains them one after another while the other executors train theirs, and
answers with their updates in one reply; when the strategy reads only the
weighted mean of the updates (``Strategy.partial_sums_ok``, and no central DP), with
their weighted sum instead (``partial_sum=True``), which ``fit`` adds up over the
executors and hands the strategy as one update (:meth:`ClientUpdates.summed`). The
clients of one executor are collected by one task (:func:`by_reply`), which reads
and checks its reply once (a partial sum's per-client figures arrive as one tensor
per figure, :func:`_from_columns`). Sent one
command per client, a client cost a worker process 4-8 ms against ~1 ms in process
(two slices, a command, a fetch and a reply frame each, and a memory check running
the plan on ``meta`` tensors); now that is paid once per executor and round. The client's
position in the data set gives it its seed (``worker_seed``), exactly as a worker's
does: with ``split="iid"`` and the same ``seed``, N simulated clients train exactly
as ``ft.federate`` over N virtual workers would.

Faults. An executor that dies fails the updates of its sampled clients with
:class:`~fedtensor.WorkerUnavailable`, and ``fit`` drops them (the others when a
round samples them). An executor that can come back empty (a Ray actor with
``max_restarts``: it has a ``rejoin()``) keeps its block's local copy in the
:class:`_Block`; each of its clients has a ``reload`` that sends the block again
once the executor is back (once for all its clients, on its new connection), so
``fit``'s rejoin (:func:`~fedtensor.federated.fit._rejoin`) takes the clients back
with the same rows: from then on they are sampled and train as if the executor
had never died. For any other executor nothing is kept and ``reload`` is None.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import torch

from fedtensor.client.engine import error_from_failure
from fedtensor.client.handles import WorkerHandle, send
from fedtensor.client.pointer import PointerBase, call_on
from fedtensor.errors import ProtocolError
from fedtensor.federated.datasets import (
    SPLITS,
    FederatedDataset,
    Shard,
    _as_tensors,
    comes_back_empty,
    holdout_split,
    split_indices,
)
from fedtensor.federated.strategies import Update
from fedtensor.protocol.messages import Failure
from fedtensor.protocol.values import tensor_bytes

__all__ = ["ClientShard", "ClientUpdates", "SimulatedClients", "by_reply", "simulate_clients"]


class _Block:
    """The examples of one executor's clients, client after client, stored there once.

    An executor that can come back empty (it has a ``rejoin()``: a Ray actor that Ray
    restarts) keeps the block's local copy here (``kept``), to be sent again when it
    rejoins a run (:meth:`resend`); for any other executor nothing is kept.
    """

    __slots__ = ("data", "executor", "kept", "sent_to", "targets")

    def __init__(
        self,
        executor: WorkerHandle,
        data: torch.Tensor,
        targets: torch.Tensor,
        *,
        keep: bool = False,
    ) -> None:
        self.executor = executor
        self.data: Any = send(data, executor)
        self.targets: Any = send(targets, executor)
        self.kept = (data, targets) if keep else None
        #: The connection the block went through: a restarted executor has a new one.
        self.sent_to: object = executor.client

    def resend(self) -> None:
        """Send the block again if its executor came back (a new connection) since it was
        sent; once for all its clients, whichever of them rejoins first."""
        client = self.executor.client
        if self.kept is None or client is self.sent_to:
            return
        data, targets = self.kept
        self.data, self.targets = send(data, self.executor), send(targets, self.executor)
        self.sent_to = client


class ClientShard(Shard):
    """One simulated client: rows ``start:stop`` of its executor's block.

    ``data`` and ``targets`` are new pointers to views of those rows each time
    they are read (one slice command each); nothing per client is kept on the
    executor between rounds.
    """

    def __init__(
        self, block: _Block, start: int, stop: int, client: str, held_out: int = 0
    ) -> None:
        # Shard is a frozen dataclass: its fields are set as its own __init__ sets them.
        object.__setattr__(self, "worker", block.executor)
        object.__setattr__(self, "size", stop - start - held_out)
        object.__setattr__(self, "eval_size", held_out)
        object.__setattr__(self, "_block", block)
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "client", client)

    _block: _Block
    #: The client's first row in its executor's block.
    start: int
    #: The client's name (in ``History``: sampled, completed, failed).
    client: str

    @property
    def data(self) -> Any:
        return self._block.data[self.start : self.start + self.size]

    @property
    def targets(self) -> Any:
        return self._block.targets[self.start : self.start + self.size]

    # The held-out part (``holdout``) follows the training rows, also a view.
    @property
    def eval_data(self) -> Any:
        if not self.eval_size:
            return None
        return self._block.data[self.start + self.size : self.start + self.size + self.eval_size]

    @property
    def eval_targets(self) -> Any:
        if not self.eval_size:
            return None
        end = self.start + self.size + self.eval_size
        return self._block.targets[self.start + self.size : end]

    @property
    def name(self) -> str:
        return self.client

    @property
    def reload(self) -> Callable[[], Awaitable[Shard]] | None:
        """The block sent again to the restarted executor (``ft.fit``'s rejoin); None
        when the executor cannot come back (nothing kept)."""
        return self._resent if self._block.kept is not None else None

    async def _resent(self) -> Shard:
        self._block.resend()
        return self  # the same client: its rows are read through the block, anew

    # Identity, not field by field: comparing fields would read (make) the pointers.
    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return (
            f"<ClientShard {self.client}: {self.size} examples, rows {self.start}:"
            f"{self.start + self.size} on {self.worker.id}>"
        )


class SimulatedClients(FederatedDataset):
    """Many clients over a few executors (:func:`simulate_clients`); ``close()`` lets go."""

    def __init__(self, shards: Sequence[ClientShard], blocks: Sequence[_Block]) -> None:
        super().__init__(shards)
        self._blocks = list(blocks)

    @property
    def executors(self) -> list[WorkerHandle]:
        """The worker handles the clients train on (each holds one block)."""
        return [block.executor for block in self._blocks]

    def sizes(self) -> dict[str, int]:
        """Examples per client name."""
        return {shard.name: shard.size for shard in self.shards}

    def close(self) -> None:
        """Drop every client and the blocks' pointers (the blocks are freed on the executors)."""
        self.shards = ()
        self._blocks.clear()

    def __repr__(self) -> str:
        return (
            f"<SimulatedClients {len(self.shards)} clients, {len(self)} examples on "
            f"{len(self._blocks)} executors>"
        )


class ClientUpdates:
    """One round's local updates of simulated clients: one command per executor.

    :func:`~fedtensor.federated.fit.fit` adds each sampled client (:meth:`add`);
    :meth:`submit` queues on each executor one ``fedtensor.local_updates`` that
    trains its sampled clients one after another on the rows of its block
    (:mod:`fedtensor.worker.local_updates`), and gives back, per client, a
    :class:`ClientUpdate` whose ``answer`` is that client's reply: the executor's
    reply is asked for with the command (in its frame) and read once, when its
    first client is awaited.

    With ``partial_sums`` (a strategy that reads only the weighted mean of the
    updates, ``Strategy.partial_sums_ok``, in a run without central DP) each
    executor answers with its clients' weighted sum instead of their states
    (``partial_sum=True``): a client's reply then has no ``state``, and
    :meth:`summed` gives the round's updates, one per executor.
    """

    def __init__(self, *, partial_sums: bool = False) -> None:
        self._by_block: dict[int, tuple[_Block, list[tuple[int, ClientShard, int]]]] = {}
        self.partial_sums = partial_sums
        self._replies: list[tuple[_ExecutorReply, list[int]]] = []

    def __bool__(self) -> bool:
        return bool(self._by_block)

    def add(self, index: int, shard: ClientShard, seed: int) -> None:
        """Client ``index`` (in the data set) trains this round with ``seed``."""
        block = shard._block
        self._by_block.setdefault(id(block), (block, []))[1].append((index, shard, seed))

    def submit(
        self,
        plans: Mapping[int, PointerBase],
        states: Mapping[int, PointerBase],
        hyperparameters: Mapping[str, Any],
        timeout: float | None = None,
    ) -> dict[int, ClientUpdate]:
        """Queue the commands (``plans`` and ``states``: stored on each executor, by ``id``
        of its client) and their replies' fetches (bounded by ``timeout``, the handle's
        when None); each added client's update, by index."""
        updates: dict[int, ClientUpdate] = {}
        for block, members in self._by_block.values():
            client = block.executor.client
            rows = torch.tensor(
                [[shard.start, shard.start + shard.size, seed] for _, shard, seed in members],
                dtype=torch.int64,
            )  # one buffer on the wire, not four items a client
            options = dict(hyperparameters)
            if self.partial_sums:
                options["partial_sum"] = True
            pointer = call_on(
                client,
                "fedtensor.local_updates",
                (plans[id(client)], states[id(client)], block.data, block.targets, rows),
                options,
            )
            reply = _ExecutorReply(
                pointer, block.executor.id, len(members), self.partial_sums, timeout
            )
            for position, (index, _, _) in enumerate(members):
                updates[index] = ClientUpdate(reply, position)
            if self.partial_sums:
                self._replies.append((reply, [index for index, _, _ in members]))
        self._by_block.clear()
        return updates

    def summed(
        self,
        current: Mapping[str, torch.Tensor],
        updates: Mapping[int, tuple[dict[str, Any], float]],
    ) -> tuple[list[Update], set[int], int]:
        """The round's partial sums (``partial_sums``), once ``fit`` collected the clients.

        ``updates``: ``fit``'s, by client index. An executor's sum counts when its
        reply arrived (its clients are collected together, all of them or none). The
        sums add up in float64 and are divided once by their examples: one
        :class:`Update` holding the mean of every summed client (none if none came),
        the indices of the clients it holds, and the bytes of the sums received.
        """
        total: dict[str, torch.Tensor] = {}
        held: set[int] = set()
        examples = received = 0
        for reply, indices in self._replies:
            arrived = [index for index in indices if index in updates]
            if not arrived:
                continue  # the executor failed, or nothing came within the round
            summed, reported = reply.partial(current)
            weight = sum(int(updates[index][0]["examples"]) for index in arrived)
            if weight != reported or (weight and set(summed) != set(current)):
                raise ProtocolError(
                    f"worker {reply._worker!r} summed other updates than its clients report"
                )
            held.update(arrived)
            examples += weight
            received += tensor_bytes(summed)
            for key, value in summed.items():
                held_value = total.get(key)
                if held_value is None:
                    total[key] = value
                elif value.is_floating_point() or value.is_complex():
                    total[key] = held_value + value
                else:
                    total[key] = torch.maximum(held_value, value)
        self._replies.clear()
        if not examples:
            return [], held, received
        mean = {
            key: value / examples if value.is_floating_point() or value.is_complex() else value
            for key, value in total.items()
        }
        return [Update(f"({len(held)} clients, summed)", mean, examples)], held, received


class _ExecutorReply:
    """An executor's ``fedtensor.local_updates`` reply, fetched once for all its clients."""

    __slots__ = ("_checked", "_clients", "_summed", "_task", "_worker")

    def __init__(
        self,
        pointer: PointerBase,
        worker: str,
        clients: int,
        summed: bool = False,
        timeout: float | None = None,
    ) -> None:
        self._worker = worker
        self._clients = clients
        self._summed = summed
        # Asked now: the fetch travels in the command's frame (one frame each way).
        self._task = pointer.fetch_soon(free=True, timeout=timeout)
        # The replies once read and checked: every client of the executor reads them.
        self._checked: list[Any] | None = None

    async def replies(self) -> list[Any]:
        if self._checked is not None:
            return self._checked
        # Shielded: one client's wait that is cancelled must not cancel the others'.
        replies = await asyncio.shield(self._task)
        if self._summed:
            if not (isinstance(replies, dict) and isinstance(replies.get("sum"), dict)):
                raise ProtocolError(
                    f"worker {self._worker!r} answered fedtensor.local_updates(partial_sum=True) "
                    f"with {type(replies).__name__}, not a sum"
                )
            replies = replies.get("clients")
            if isinstance(replies, dict):
                replies = _from_columns(replies, self._clients, self._worker)
        if not isinstance(replies, list) or len(replies) != self._clients:
            raise ProtocolError(
                f"worker {self._worker!r} answered fedtensor.local_updates for "
                f"{self._clients} clients with {type(replies).__name__}"
            )
        self._checked = replies
        return replies

    def partial(self, current: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Any]:
        """The arrived reply's sum (its entries checked against the ``current`` state's)
        and the examples it says the sum weighs."""
        assert self._task is not None
        assert self._task.done()
        reply = self._task.result()
        summed = reply["sum"]
        for key, value in summed.items():
            like = current.get(key)
            if (
                like is None
                or not isinstance(value, torch.Tensor)
                or value.shape != like.shape
                or (like.is_floating_point() or like.is_complex())
                != (value.is_floating_point() or value.is_complex())
            ):
                raise ProtocolError(
                    f"worker {self._worker!r} summed an entry {key!r} unlike the model's"
                )
        return summed, reply.get("examples")


def _from_columns(clients: dict[str, Any], count: int, worker: str) -> list[dict[str, Any]]:
    """A partial-sum reply's clients, sent as one tensor per figure
    (``fedtensor.worker.local_updates``): one dict per client, as ``local_update``
    answers without its state, or ``{"failed": [kind, type, message]}``."""
    columns, failed = clients.get("columns"), clients.get("failed")
    if not (isinstance(columns, dict) and isinstance(failed, list)) or len(clients) != 2:
        raise ProtocolError(f"worker {worker!r} sent its clients' figures malformed")
    values: dict[str, list[Any]] = {}
    for name, column in columns.items():
        if not (
            isinstance(column, torch.Tensor)
            and column.dtype in (torch.int64, torch.float64)
            and column.shape == (count,)
        ):
            raise ProtocolError(f"worker {worker!r} sent a figure {name!r} not of {count} clients")
        values[name] = column.tolist()
    replies: list[dict[str, Any]] = [
        {name: column[position] for name, column in values.items()} for position in range(count)
    ]
    for entry in failed:
        if not (
            isinstance(entry, list)
            and len(entry) == 4
            and type(entry[0]) is int
            and 0 <= entry[0] < count
            and "failed" not in replies[entry[0]]
        ):
            raise ProtocolError(f"worker {worker!r} sent a malformed failure")
        replies[entry[0]] = {"failed": entry[1:]}
    if not all(replies):
        raise ProtocolError(f"worker {worker!r} sent no figures for a client that trained")
    return replies


def by_reply(sampled: Sequence[int], results: Mapping[int, Any]) -> list[list[tuple[int, Any]]]:
    """The round's ``results`` (by index, in ``sampled`` order) grouped by the reply that
    brings them: a simulated client's :class:`ClientUpdate` with the others of its
    executor, in their order; anything else (a worker's reply) alone."""
    groups: dict[int, list[tuple[int, Any]]] = {}
    for index in sampled:
        result = results[index]
        key = id(result._reply) if isinstance(result, ClientUpdate) else id(result)
        groups.setdefault(key, []).append((index, result))
    return list(groups.values())


class ClientUpdate:
    """One simulated client's part of its executor's reply (:meth:`ClientUpdates.submit`)."""

    __slots__ = ("_position", "_reply")

    def __init__(self, reply: _ExecutorReply, position: int) -> None:
        self._reply = reply
        self._position = position

    async def answer(self) -> Any:
        """The client's reply, as ``fedtensor.local_update`` gives it (its error raised)."""
        reply = (await self._reply.replies())[self._position]
        if isinstance(reply, dict) and "failed" in reply:
            failed = reply["failed"]
            if not (isinstance(failed, list) and len(failed) == 3):
                raise ProtocolError(f"worker {self._reply._worker!r}: a malformed failure")
            kind, error_type, message = (str(item) for item in failed)
            raise error_from_failure(Failure(0, kind, error_type, message), self._reply._worker)
        return reply


def simulate_clients(
    dataset: Any,
    *,
    clients: int | None = None,
    executors: Sequence[WorkerHandle],
    split: str = "iid",
    client_ids: torch.Tensor | None = None,
    alpha: float = 0.5,
    shards_per_worker: int = 2,
    seed: int = 0,
    min_size: int = 1,
    holdout: float = 0.0,
) -> SimulatedClients:
    """Cut ``dataset`` into ``clients`` simulated clients trained on ``executors``.

    ``dataset`` is a ``(data, targets)`` pair or a map-style torch ``Dataset``
    (as for :func:`~fedtensor.federate`). ``split`` is ``"iid"``, ``"dirichlet"``
    or ``"shards"`` (:func:`~fedtensor.federated.datasets.split_indices`, with
    ``alpha``, ``shards_per_worker``, ``seed``, ``min_size``); or ``client_ids``,
    one integer per example, makes one client per distinct id (named
    ``client-ID``, in increasing order of id), and then ``clients`` may be left
    out. Clients are pinned to the executors in contiguous runs of near-equal
    count; each executor is sent its clients' examples once (the sends run
    concurrently, the local tensors may change right away). ``holdout`` > 0 keeps
    that fraction of each client's examples out of training for federated
    evaluation (``ft.fit(evaluate_fraction=...)``), chosen as ``ft.federate``
    chooses a worker's (:func:`~fedtensor.federated.datasets.holdout_split`, from
    ``seed`` and the client's position).
    """
    if not 0 <= holdout < 1:
        raise ValueError("holdout must be in [0, 1)")
    data, targets = _as_tensors(dataset)
    if not executors:
        raise ValueError("simulate_clients needs at least one executor")
    if client_ids is not None:
        order, counts, names = _by_client_id(client_ids, len(targets))
        if clients is not None and clients != len(counts):
            raise ValueError(f"clients={clients} but client_ids name {len(counts)} clients")
    else:
        if clients is None:
            raise ValueError("give the number of clients (or client_ids, one per example)")
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
        parts = split_indices(
            targets,
            clients,
            split=split,
            alpha=alpha,
            shards_per_worker=shards_per_worker,
            seed=seed,
            min_size=min_size,
        )
        order = torch.cat(parts)
        counts = torch.tensor([len(part) for part in parts])
        names = None
    held_out = None
    if holdout:
        order, held_out = _hold_out(order, counts, holdout, seed)
    return _place(data, targets, order, counts, names, executors, held_out)


def _hold_out(
    order: torch.Tensor, counts: torch.Tensor, holdout: float, seed: int
) -> tuple[torch.Tensor, list[int]]:
    """Each client's examples reordered, training ones first, then its held-out ones
    (:func:`holdout_split`, as ``ft.federate`` splits a worker's); how many each holds out."""
    reordered: list[torch.Tensor] = []
    held_out: list[int] = []
    for index, part in enumerate(torch.split(order, counts.tolist())):
        train, held = holdout_split(len(part), holdout, seed=seed, index=index)
        reordered += [part[train], part[held]]
        held_out.append(len(held))
    return torch.cat(reordered), held_out


def _by_client_id(
    client_ids: torch.Tensor, examples: int
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Examples grouped by client id (stable: each client's in data set order), sizes, names."""
    if not isinstance(client_ids, torch.Tensor) or client_ids.dim() != 1:
        raise TypeError("client_ids must be a 1-D tensor, one id per example")
    if client_ids.dtype.is_floating_point or client_ids.dtype.is_complex:
        raise TypeError("client_ids must be integers")
    if len(client_ids) != examples:
        raise ValueError(f"{examples} examples but {len(client_ids)} client ids")
    order = torch.argsort(client_ids, stable=True)
    ids, counts = torch.unique_consecutive(client_ids[order], return_counts=True)
    return order, counts, [f"client-{int(value)}" for value in ids.tolist()]


def _place(
    data: torch.Tensor,
    targets: torch.Tensor,
    order: torch.Tensor,
    counts: torch.Tensor,
    names: list[str] | None,
    executors: Sequence[WorkerHandle],
    held_out: list[int] | None = None,
) -> SimulatedClients:
    """Send each executor one block of its clients' examples; make the clients."""
    starts = torch.cumsum(counts, 0) - counts  # each client's first position in ``order``
    bounds = torch.tensor_split(torch.arange(len(counts)), len(executors))
    shards: list[ClientShard] = []
    blocks: list[_Block] = []
    start_list, count_list = starts.tolist(), counts.tolist()
    for executor, pinned in zip(executors, bounds, strict=False):
        if not len(pinned):
            continue  # more executors than clients
        first, last = int(pinned[0]), int(pinned[-1])
        low, high = start_list[first], start_list[last] + count_list[last]
        rows = order[low:high]
        block = _Block(executor, data[rows], targets[rows], keep=comes_back_empty(executor))
        blocks.append(block)
        for client in range(first, last + 1):
            name = names[client] if names is not None else f"client-{client}"
            shards.append(
                ClientShard(
                    block,
                    start_list[client] - low,
                    start_list[client] + count_list[client] - low,
                    name,
                    held_out[client] if held_out is not None else 0,
                )
            )
    return SimulatedClients(shards, blocks)
