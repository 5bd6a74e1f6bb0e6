"""What the memory budget costs a command: a worker's execute with a quota, against without.

Run: ``python -m benchmarks.budget``. Each row runs the same commands on one
in-process actor through two sessions, one without a quota (the baseline, the
in-memory hot path) and one with a quota (as every client of a ``fedtensor worker``
has one by default), interleaved in the same run; it prints the median time per
command of each and their ratio. The rows: an elementwise add of two stored
1,000-element tensors (bounded by its inputs: no meta run), a ``repeat`` (checked by
a run on meta tensors), a store and a release, and a fetch.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch

from fedtensor.protocol.messages import Call, Fetch, Message, Ref, Release, Store
from fedtensor.worker.actor import Session, WorkerActor

REPS = 2000
ROUNDS = 7


def _session(actor: WorkerActor, quota: int | None) -> Session:
    session = actor.open_session(_ignore, _ignore, aliases_values=True, memory_quota=quota)
    actor.execute(session, [Store(1, torch.arange(1000.0)), Store(2, torch.ones(4))])
    return session


def _ignore(*_: object) -> None:
    pass


ROWS: dict[str, Callable[[int], Sequence[Message]]] = {
    "torch.add of two 1,000-element tensors": lambda i: [
        Call(10, "torch.add", (Ref(1), Ref(1)), {})
    ],
    "Tensor.repeat(4, 4) of 4 elements": lambda i: [Call(10, "Tensor.repeat", (Ref(2), 4, 4), {})],
    "store + release of 4 elements": lambda i: [Store(11, torch.ones(4)), Release((11,))],
    "fetch of 1,000 elements": lambda i: [Fetch(i, 1, free=False)],
}


def _per_command(
    actor: WorkerActor, session: Session, make: Callable[[int], Sequence[Message]]
) -> float:
    batches = [make(i) for i in range(REPS)]
    started = time.perf_counter()
    for batch in batches:
        actor.execute(session, batch)
    return (time.perf_counter() - started) / REPS * 1e6


def main() -> None:
    actor = WorkerActor("bench")
    free, budgeted = _session(actor, None), _session(actor, 1 << 30)
    print("| command | no quota | with a quota | ratio |")
    print("| --- | --- | --- | --- |")
    for name, make in ROWS.items():
        base, with_quota = [], []
        for _ in range(ROUNDS):
            base.append(_per_command(actor, free, make))
            with_quota.append(_per_command(actor, budgeted, make))
        b, q = statistics.median(base), statistics.median(with_quota)
        print(f"| {name} | {b:.1f} µs | {q:.1f} µs | {q / b:.2f}x (+{q - b:.1f} µs) |")


if __name__ == "__main__":
    main()
