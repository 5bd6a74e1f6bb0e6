"""Many local updates in one command: ``fedtensor.local_updates``, for simulated clients.

Theory of operation
-------------------
In simulation (:mod:`fedtensor.federated.simulation`) an executor holds one block of
examples, its clients' rows one after another, and trains the clients a round samples
one after another. Sent as one ``fedtensor.local_update`` per client, each client cost
the executor two slice commands, a command handed to a compute thread, a fetch and a
reply frame of its own, and a memory check that runs the plan once on ``meta`` tensors
(about 5 ms, five times the training of a small client): a client cost 4-8 ms on a
worker process against about 1 ms in process.

``fedtensor.local_updates(plan, state, data, targets, clients, **hyperparameters)``
trains them all in one command: ``clients`` is a list of ``[start, stop, seed]``, one
per client (or an ``int64`` tensor of shape ``(clients, 3)``, what ``ft.fit`` sends:
one buffer to encode, decode and count rather than four items a client), rows
``start:stop`` of the block ``(data, targets)`` trained with
``seed``; the reply is the list of what :func:`~fedtensor.worker.local_update.local_update`
answers for each, in that order. Each client's update is exactly the one
``fedtensor.local_update`` would give on the view ``data[start:stop]`` with that
seed (it is that function, called on that view). A client whose training fails
(a label out of range in its rows) gets ``{"failed": [kind, error type, message]}``
in its place, as the command alone would have failed, and the others still train;
a plan that is refused fails the whole command (it would fail every client).

**Partial sums.** With ``partial_sum=True`` the reply is ``{"sum": ..., "examples":
n, "clients": [...]}``: each client's update is added, as soon as it is made, to a
running ``sum_i examples_i * state_i`` (float64; integer entries such as a batch
norm's counter take the largest value, as FedAvg takes them), and ``clients`` holds
each client's reply without its state (examples, loss, correct, seconds; or its
failure), so the reply is one state whatever the number of clients. Those figures
travel as one tensor per figure, ``{"columns": {"examples": int64 tensor, "loss":
float64 tensor, ...}, "failed": [[position, kind, type, message], ...]}``
(:func:`_columns`): as a list of a dict per client they took a worker process
about 0.6 ms per reply of 50 clients to count against the budget and encode,
between its last client's training and the reply, a fifth of its fixed cost
per round. ``ft.fit`` asks
for it when the strategy reads only the weighted mean of the updates
(``Strategy.partial_sums_ok``: FedAvg, FedProx, FedAvgM, FedAdam) and central DP is
off; robust strategies and central DP's clipping, which read single updates, get
the list as before.

Its memory check (:func:`memory_bytes`, used by :mod:`fedtensor.worker.budget`) is
one plan dry run for the largest client plus what the reply holds: one update per
client, or the one float64 sum.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fedtensor.errors import ForbiddenOperation, PlanError
from fedtensor.protocol.messages import Ref
from fedtensor.protocol.plan import FORMAT as PLAN_FORMAT
from fedtensor.worker.compiler import compile_plan, state_entries
from fedtensor.worker.dry_runs import DryRuns
from fedtensor.worker.local_update import local_update
from fedtensor.worker.local_update import memory_bytes as _update_bytes

__all__ = ["local_updates", "memory_bytes", "warm_up"]


def _client_rows(clients: Any, examples: int) -> list[tuple[int, int, int]] | torch.Tensor:
    """``clients`` checked: ``[start, stop, seed]`` triples of ints within the block.

    Also an ``int64`` tensor of shape ``(clients, 3)`` (what ``ft.fit`` sends): one
    buffer on the wire rather than four items a client to encode, decode and count
    against the budget; checked as a whole and returned as it is (made into Python
    ints a row at a time, so that its size is what the budget counted).
    """
    if isinstance(clients, torch.Tensor):
        if clients.dtype != torch.int64 or clients.dim() != 2 or clients.shape[1] != 3:
            raise PlanError("clients as a tensor must be int64 of shape (clients, 3)")
        if not len(clients):
            raise PlanError("clients must name at least one [start, stop, seed]")
        starts, stops = clients[:, 0], clients[:, 1]
        wrong = ((starts < 0) | (starts >= stops) | (stops > examples)).nonzero()
        if len(wrong):
            position = int(wrong[0, 0])
            start, stop, _ = clients[position].tolist()
            raise PlanError(
                f"client {position}: rows {start}:{stop} are not within the {examples} examples"
            )
        return clients
    if not isinstance(clients, list | tuple) or not clients:
        raise PlanError("clients must be a non-empty list of [start, stop, seed]")
    rows: list[tuple[int, int, int]] = []
    for position, client in enumerate(clients):
        if (
            not isinstance(client, list | tuple)
            or len(client) != 3
            or not all(type(value) is int for value in client)
        ):
            raise PlanError(f"client {position} is not [start, stop, seed] (three ints)")
        start, stop, seed = client
        if not 0 <= start < stop <= examples:
            raise PlanError(
                f"client {position}: rows {start}:{stop} are not within the {examples} examples"
            )
        rows.append((start, stop, seed))
    return rows


def local_updates(
    plan: Any,
    state: Any,
    data: Any,
    targets: Any,
    clients: Any,
    *,
    partial_sum: bool = False,
    step_delay: float = 0.0,
    **hyperparameters: Any,
) -> list[dict[str, Any]] | dict[str, Any]:
    """One :func:`~fedtensor.worker.local_update.local_update` per client, one after another.

    ``clients``: ``[start, stop, seed]`` per client (rows of ``data`` and ``targets``);
    ``hyperparameters`` are ``local_update``'s, except ``seed`` (each client's own).
    ``partial_sum=True``: the updates' weighted sum instead of the updates
    (:class:`_Sum`; the module header says what the reply holds).
    """
    if "seed" in hyperparameters:
        raise TypeError("each client's seed is in clients, not a keyword")
    if type(partial_sum) is not bool:
        raise PlanError("partial_sum must be true or false")
    state_entries(compile_plan(plan), state)  # a refused plan fails the command, once
    if not isinstance(data, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise PlanError("local_updates trains on tensors of examples and labels")
    if len(data) != len(targets):
        raise PlanError(f"{len(data)} examples but {len(targets)} labels")
    replies: list[dict[str, Any]] = []
    summed = _Sum() if partial_sum else None
    for row in _client_rows(clients, len(data)):
        start, stop, seed = row.tolist() if isinstance(row, torch.Tensor) else row
        try:
            replies.append(
                local_update(
                    plan,
                    state,
                    data[start:stop],
                    targets[start:stop],
                    seed=seed,
                    step_delay=step_delay,
                    **hyperparameters,
                )
            )
        except ForbiddenOperation as exc:
            replies.append({"failed": ["forbidden", "ForbiddenOperation", exc.remote_message]})
            continue
        except Exception as exc:  # this client's failure, as its own command would report it
            replies.append({"failed": ["remote", type(exc).__name__, str(exc)]})
            continue
        if summed is not None:  # the state goes into the sum as soon as it is made
            replies[-1] = summed.add(replies[-1])
    if summed is not None:
        return {"sum": summed.state, "examples": summed.examples, "clients": _columns(replies)}
    return replies


def _columns(replies: list[dict[str, Any]]) -> dict[str, Any] | list[dict[str, Any]]:
    """The clients' figures of a partial-sum reply as one tensor per figure.

    ``{"columns": {name: tensor}, "failed": [[position, kind, type, message], ...]}``:
    a column is ``int64`` where every client's figure is an ``int`` and ``float64``
    where every one is a ``float`` (both exact); a failed client's row is 0. The
    budget counts them, the codec encodes and the client decodes them as a few
    buffers rather than four items a client: as a list of 50 dicts they cost an
    executor about 0.6 ms after its last client trained (the budget's walk of the
    result, twice, and the encoding), on the round's critical path. Figures of any
    other kind, or clients that report different figures, keep the list.
    """
    failed = [
        [position, *reply["failed"]] for position, reply in enumerate(replies) if "failed" in reply
    ]
    trained = [reply for reply in replies if "failed" not in reply]
    names = list(trained[0]) if trained else []
    if any(len(reply) != len(names) for reply in trained):
        return replies
    places = [position for position, reply in enumerate(replies) if "failed" not in reply]
    columns: dict[str, torch.Tensor] = {}
    for name in names:
        values = [reply.get(name) for reply in trained]
        if all(type(value) is int for value in values):
            dtype = torch.int64
        elif all(type(value) is float for value in values):
            dtype = torch.float64
        else:
            return replies
        try:
            column = torch.tensor(values, dtype=dtype)
        except (OverflowError, RuntimeError):  # an int beyond int64
            return replies
        if failed:
            column = torch.zeros(len(replies), dtype=dtype).index_copy_(
                0, torch.tensor(places, dtype=torch.int64), column
            )
        columns[name] = column
    return {"columns": columns, "failed": failed}


class _Sum:
    """The running weighted sum of a round's updates (``partial_sum=True``).

    Floating-point entries: ``sum_i examples_i * state_i`` in float64 (each product
    exact, as a float32 entry times a count is; the sum rounds as FedAvg's float64
    accumulation does, in another order); other entries (a batch norm's counter):
    the largest value, as FedAvg takes. So the executor answers with one state
    whatever the number of its clients, and the client divides by the examples.
    """

    __slots__ = ("examples", "state")

    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] = {}
        self.examples = 0

    def add(self, reply: dict[str, Any]) -> dict[str, Any]:
        """Add one client's update; its reply without the state."""
        examples = int(reply["examples"])
        for key, value in reply["state"].items():
            held = self.state.get(key)
            if not (value.is_floating_point() or value.is_complex()):
                self.state[key] = value.clone() if held is None else torch.maximum(held, value)
            elif held is None:
                wide = torch.complex128 if value.is_complex() else torch.float64
                self.state[key] = value.to(wide) * examples
            else:
                held.add_(value, alpha=examples)
        self.examples += examples
        return {key: item for key, item in reply.items() if key != "state"}


def memory_bytes(
    plan: Any,
    state: Any,
    data: Any,
    targets: Any,
    clients: Any,
    *,
    limit: int,
    dry_runs: DryRuns | None = None,
    **options: Any,
) -> int:
    """What :func:`local_updates` may allocate: the largest client's update, and the rest's states.

    Clients train one after another, so the peak is one client's training (what
    :func:`fedtensor.worker.local_update.memory_bytes` reckons for the largest) plus
    the updates already made, one model state each (with ``partial_sum``: their
    float64 sum). Arguments that are wrong return
    0 so that :func:`local_updates` reports them. ``dry_runs``: the client's
    remembered dry runs (a round that repeats the last one's shapes runs none).
    """
    if not isinstance(data, torch.Tensor) or not isinstance(targets, torch.Tensor):
        return 0
    try:
        rows = _client_rows(clients, min(len(data), len(targets)))
        compiled = compile_plan(plan)
        state = state_entries(compiled, state)
    except (PlanError, ForbiddenOperation):
        return 0
    largest: Sequence[int]
    if isinstance(rows, torch.Tensor):
        largest = rows[int((rows[:, 1] - rows[:, 0]).argmax())].tolist()
    else:
        largest = max(rows, key=lambda row: row[1] - row[0])
    state_bytes = sum(int(value.nbytes) for value in state.values())
    held = state_bytes * (len(rows) - 1)
    if options.pop("partial_sum", False) is True:
        # One running sum, float64 (twice a float32 entry), whatever the clients.
        held = sum(_summed_bytes(value) for value in state.values())
    if held > limit:
        raise MemoryError(f"the {len(rows)} clients' updates would take {held} bytes")
    options.pop("seed", None)
    start, stop, _ = largest
    return held + _update_bytes(
        plan,
        state,
        data[start:stop],
        targets[start:stop],
        limit=limit - held,
        dry_runs=dry_runs,
        **options,
    )


def _summed_bytes(value: torch.Tensor) -> int:
    """What :class:`_Sum` holds for an entry like ``value``."""
    if value.is_complex():
        return value.numel() * 16
    return value.numel() * 8 if value.is_floating_point() else int(value.nbytes)


def warm_up() -> None:
    """Size and train one tiny local update now, as a worker's first training command would.

    A worker's first training command used to pay the import of torch's compiler
    stack (``torch._dynamo``, ``sympy``: 1-5 s and about 73 MB), for its dry run's
    meta kernels and for ``torch.optim``; neither imports it any more
    (:mod:`fedtensor.worker.shape_rules`, :mod:`fedtensor.worker.optimizers`).
    What is left to pay once is small (the first autograd pass, the first run of
    each kernel); ``fedtensor worker --warm-up`` pays it before reporting ready, on
    the same path a client's command takes: a plan of a linear layer, a ReLU and
    a cross-entropy, sized by :func:`memory_bytes` and trained by
    :func:`local_updates` on four examples.
    """
    nodes = [
        ["input", 0, [], {}],
        ["input", 1, [], {}],
        ["state", "weight", [], {}],
        ["state", "bias", [], {}],
        ["call", "torch.nn.functional.linear", [Ref(0), Ref(2), Ref(3)], {}],
        ["call", "torch.relu", [Ref(4)], {}],
        ["call", "torch.nn.functional.cross_entropy", [Ref(5), Ref(1)], {}],
        ["output", None, [(Ref(6), Ref(5))], {}],
    ]
    plan = {"format": PLAN_FORMAT, "nodes": nodes, "trainable": ["weight", "bias"]}
    state = {"weight": torch.zeros(3, 4), "bias": torch.zeros(3)}
    data, targets = torch.zeros(4, 4), torch.tensor([0, 1, 2, 0])
    clients = [[0, 2, 0], [2, 4, 1]]
    memory_bytes(plan, state, data, targets, clients, limit=1 << 30, batch_size=2)
    replies = local_updates(plan, state, data, targets, clients, batch_size=2, lr=0.1)
    failed = (
        [reply["failed"] for reply in replies if "failed" in reply]
        if isinstance(replies, list)
        else ["not a list of updates"]
    )
    if failed:
        raise RuntimeError(f"the warm-up's local update failed: {failed[0]}")
