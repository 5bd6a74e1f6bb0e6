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
per client, rows ``start:stop`` of the block ``(data, targets)`` trained with
``seed``; the reply is the list of what :func:`~fedtensor.worker.local_update.local_update`
answers for each, in that order. Each client's update is exactly the one
``fedtensor.local_update`` would give on the view ``data[start:stop]`` with that
seed (it is that function, called on that view). A client whose training fails
(a label out of range in its rows) gets ``{"failed": [kind, error type, message]}``
in its place, as the command alone would have failed, and the others still train;
a plan that is refused fails the whole command (it would fail every client).

Its memory check (:func:`memory_bytes`, used by :mod:`fedtensor.worker.budget`) is
one plan dry run for the largest client plus the updates the reply holds: one per
client. Returning the updates rather than their weighted sum keeps every strategy's
aggregation as it is (FedAvg, FedProx, the robust ones, central DP's clipping all
read single updates), and the updates of a round of small clients are small.
"""

from __future__ import annotations

from typing import Any

import torch

from fedtensor.errors import ForbiddenOperation, PlanError
from fedtensor.worker.compiler import compile_plan, state_entries
from fedtensor.worker.local_update import local_update
from fedtensor.worker.local_update import memory_bytes as _update_bytes

__all__ = ["local_updates", "memory_bytes", "warm_up"]


def _client_rows(clients: Any, examples: int) -> list[tuple[int, int, int]]:
    """``clients`` checked: ``[start, stop, seed]`` triples of ints within the block."""
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
    step_delay: float = 0.0,
    **hyperparameters: Any,
) -> list[dict[str, Any]]:
    """One :func:`~fedtensor.worker.local_update.local_update` per client, one after another.

    ``clients``: ``[start, stop, seed]`` per client (rows of ``data`` and ``targets``);
    ``hyperparameters`` are ``local_update``'s, except ``seed`` (each client's own).
    """
    if "seed" in hyperparameters:
        raise TypeError("each client's seed is in clients, not a keyword")
    state_entries(compile_plan(plan), state)  # a refused plan fails the command, once
    if not isinstance(data, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise PlanError("local_updates trains on tensors of examples and labels")
    if len(data) != len(targets):
        raise PlanError(f"{len(data)} examples but {len(targets)} labels")
    replies: list[dict[str, Any]] = []
    for start, stop, seed in _client_rows(clients, len(data)):
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
        except Exception as exc:  # this client's failure, as its own command would report it
            replies.append({"failed": ["remote", type(exc).__name__, str(exc)]})
    return replies


def memory_bytes(
    plan: Any, state: Any, data: Any, targets: Any, clients: Any, *, limit: int, **options: Any
) -> int:
    """What :func:`local_updates` may allocate: the largest client's update, and the rest's states.

    Clients train one after another, so the peak is one client's training (what
    :func:`fedtensor.worker.local_update.memory_bytes` reckons for the largest) plus
    the updates already made, one model state each. Arguments that are wrong return
    0 so that :func:`local_updates` reports them.
    """
    if not isinstance(data, torch.Tensor) or not isinstance(targets, torch.Tensor):
        return 0
    try:
        rows = _client_rows(clients, min(len(data), len(targets)))
        compiled = compile_plan(plan)
        state = state_entries(compiled, state)
    except (PlanError, ForbiddenOperation):
        return 0
    largest = max(rows, key=lambda row: row[1] - row[0])
    state_bytes = sum(int(value.nbytes) for value in state.values())
    held = state_bytes * (len(rows) - 1)
    if held > limit:
        raise MemoryError(f"the {len(rows)} clients' updates would take {held} bytes")
    options.pop("seed", None)
    start, stop, _ = largest
    return held + _update_bytes(
        plan, state, data[start:stop], targets[start:stop], limit=limit - held, **options
    )


def warm_up() -> None:
    """Run a few operations on ``meta`` tensors now, as a worker's first check would.

    The first meta run in a process imports torch's compiler stack (``torch._dynamo``:
    1-5 s and about 70 MB here), which every training command's memory check
    (:func:`fedtensor.worker.local_update.memory_bytes`) needs. ``fedtensor worker
    --warm-up`` pays it before reporting ready, so that it is not paid by a client's
    first round.
    """
    x = torch.empty(2, 4, device="meta")
    weight, bias = torch.empty(3, 4, device="meta"), torch.empty(3, device="meta")
    labels = torch.empty(2, dtype=torch.long, device="meta")
    with torch.no_grad():
        torch.nn.functional.cross_entropy(
            torch.nn.functional.linear(torch.relu(x), weight, bias), labels
        )
