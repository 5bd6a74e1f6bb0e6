"""What charging autograd's saved tensors costs a command (issue 12).

Run: ``python -m benchmarks.budget_saved_tensors``. A session with a memory quota
runs each operation under ``saved_tensors_hooks`` that charge every tensor saved
for backward (:meth:`fedtensor.worker.budget.Ledger.saved_tensors`). Each row runs
the same command on one in-process actor through a session with a quota, with the
hooks (as a worker runs) and without them (the baseline: the ledger's
``saved_tensors`` replaced by a ``nullcontext``), interleaved in the same run; it
prints the median time per command of each and their ratio. The rows: ``sin`` of a
stored 1,000-element tensor that requires grad (one tensor saved, one charge and
one release per command), and of one that does not (the hooks are not entered
then: what it costs is the check that no input requires grad).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator

import torch

from fedtensor.protocol.messages import Call, Ref, Release, Store
from fedtensor.worker import budget
from fedtensor.worker.actor import Session, WorkerActor

REPS = 2000
ROUNDS = 7
QUOTA = 256 << 20


def _ignore(*_: object) -> None:
    pass


@contextlib.contextmanager
def _without_hooks() -> Iterator[None]:
    hooked = budget.Ledger.saved_tensors
    budget.Ledger.saved_tensors = lambda self: contextlib.nullcontext()  # type: ignore[method-assign,assignment,return-value]
    try:
        yield
    finally:
        budget.Ledger.saved_tensors = hooked  # type: ignore[method-assign]


def _per_command(actor: WorkerActor, session: Session) -> float:
    command = [Call(10, "Tensor.sin", (Ref(1),), {})]
    execute = actor.execute
    start = time.perf_counter()
    for _ in range(REPS):
        execute(session, command)  # replacing id 10 frees the previous graph
    elapsed = time.perf_counter() - start
    actor.execute(session, [Release((10,))])
    return elapsed / REPS


def main() -> None:
    actor = WorkerActor("bench")
    for requires_grad in (True, False):
        session = actor.open_session(_ignore, _ignore, aliases_values=True, memory_quota=QUOTA)
        actor.execute(session, [Store(1, torch.rand(1000, requires_grad=requires_grad))])
        hooked: list[float] = []
        plain: list[float] = []
        for _ in range(ROUNDS):
            hooked.append(_per_command(actor, session))
            with _without_hooks():
                plain.append(_per_command(actor, session))
        assert session.memory_used == session.ledger.used  # type: ignore[union-attr]
        with_hooks, without = statistics.median(hooked), statistics.median(plain)
        row = f"Tensor.sin, 1,000 elements, requires_grad={requires_grad}"
        print(
            f"{row}: {with_hooks * 1e6:.1f} us with saved-tensor charges, "
            f"{without * 1e6:.1f} us without, ratio {with_hooks / without:.2f}"
        )
        actor.execute(session, [Release((1,))])


if __name__ == "__main__":
    main()
