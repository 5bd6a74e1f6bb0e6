"""A worker's training command: its dry run's time, and the memory of what it no longer imports.

Run: ``python -m benchmarks.worker_dry_run``. Two parts, each against a baseline of
the same run:

- **Time of the dry run** that sizes a training command before it runs
  (:func:`fedtensor.worker.local_update.memory_bytes`), for the simulation benchmark's
  MLP 64-32-10 and the demo's CNN on a batch of 16: the plan run on torch's own
  meta kernels (before), under :func:`fedtensor.worker.shape_rules.shape_rules`
  (now), and the whole sizing when the client's remembered dry run answers
  (:class:`fedtensor.worker.dry_runs.DryRuns`, a round repeating the last one's
  shapes). Medians of ``ROUNDS`` of ``REPS`` calls, CPU time (``process_time``).
- **Memory of a worker process**: a fresh process imports what ``fedtensor
  worker`` imports, warms up (``--warm-up``) and trains a round of 10 simulated
  clients of the MLP with SGD and with Adam, and reads its anonymous memory
  (``Pss_Anon`` of ``/proc/self/smaps_rollup``) and its module count; then it
  imports ``torch._dynamo``, as every worker did before (torch's Python meta
  kernels and ``torch.optim`` import it), and reads them again. The difference is
  what each worker process no longer holds.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.flower_side import MLP
from fedtensor.demo import DigitsCNN
from fedtensor.federated.trace import trace
from fedtensor.protocol.messages import Ref
from fedtensor.worker.compiler import compile_plan
from fedtensor.worker.dry_runs import DryRuns
from fedtensor.worker.local_update import memory_bytes
from fedtensor.worker.shape_rules import shape_rules

REPS = 200
ROUNDS = 7

WORKER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    import fedtensor.cli  # what a worker process imports
    from fedtensor.worker.local_updates import local_updates, warm_up

    def anon():
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss_Anon:"):
                return int(line.split()[1]) * 1024
        return 0

    from fedtensor.protocol.messages import Ref

    def refs(value):  # the plan's Refs, written as {"ref": n}
        if isinstance(value, dict) and set(value) == {"ref"}:
            return Ref(value["ref"])
        if isinstance(value, dict):
            return {key: refs(item) for key, item in value.items()}
        if isinstance(value, list):
            return [refs(item) for item in value]
        return value

    plan = refs(json.loads(sys.stdin.read()))
    warm_up()
    torch.manual_seed(0)
    state = {"hidden.weight": torch.rand(32, 64), "hidden.bias": torch.rand(32),
             "out.weight": torch.rand(10, 32), "out.bias": torch.rand(10)}
    x, y = torch.rand(100, 64), torch.randint(0, 10, (100,))
    clients = [[i * 10, i * 10 + 10, i] for i in range(10)]
    for optimizer in ("sgd", "adam"):
        replies = local_updates(plan, state, x, y, clients, batch_size=16, optimizer=optimizer)
        assert all("state" in reply for reply in replies), replies
    without = (anon(), len(sys.modules), "torch._dynamo" in sys.modules)
    import torch._dynamo  # what torch.optim and the meta kernels imported before
    with_dynamo = (anon(), len(sys.modules))
    print(json.dumps({"without": without, "with": with_dynamo}))
    """
)


def _median(function: Callable[[], Any]) -> float:
    samples = []
    for _ in range(ROUNDS):
        started = time.process_time()
        for _ in range(REPS):
            function()
        samples.append((time.process_time() - started) / REPS)
    return statistics.median(samples)


def _time_row(title: str, model: torch.nn.Module, x: torch.Tensor) -> None:
    y = torch.randint(0, 10, (16,))
    plan = trace(model, F.cross_entropy, (x, y)).wire
    state = {key: value.detach() for key, value in model.state_dict().items()}
    compiled = compile_plan(plan)
    meta_state = {key: value.to("meta") for key, value in state.items()}
    meta_x, meta_y = x.to("meta"), y.to("meta")

    def kernels() -> None:
        compiled.dry_run(meta_state, meta_x, meta_y, limit=1 << 40)

    def rules() -> None:
        with shape_rules():
            compiled.dry_run(meta_state, meta_x, meta_y, limit=1 << 40)

    remembered = DryRuns()

    def hit() -> None:
        memory_bytes(plan, state, x, y, limit=1 << 40, dry_runs=remembered, batch_size=16)

    before, now, cached = _median(kernels), _median(rules), _median(hit)
    print(
        f"{title}, dry run of a batch of 16: torch's meta kernels {before * 1e6:.0f} us, "
        f"shape rules {now * 1e6:.0f} us ({before / now:.0f}x less); the whole sizing "
        f"answered by the remembered dry run {cached * 1e6:.0f} us "
        f"({before / cached:.0f}x less than the kernels' dry run alone)"
    )


def _refs_written(value: Any) -> Any:
    """A plan as JSON values: each ``Ref`` as ``{"ref": n}`` (tuples become lists)."""
    if type(value) is Ref:
        return {"ref": int(value)}
    if isinstance(value, dict):
        return {key: _refs_written(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_refs_written(item) for item in value]
    return value


def _memory_row() -> None:
    plan = trace(MLP(), F.cross_entropy).wire
    assert not any(isinstance(value, torch.Tensor) for node in plan["nodes"] for value in node[2])
    done = subprocess.run(
        [sys.executable, "-c", WORKER],
        input=json.dumps(_refs_written(plan)),
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    (anon, modules, had_dynamo), (anon_with, modules_with) = result["without"], result["with"]
    print(
        f"a worker process after --warm-up and a round of 10 clients (SGD, Adam): "
        f"{anon / 2**20:.0f} MiB anonymous memory, {modules} modules, torch._dynamo "
        f"{'imported' if had_dynamo else 'not imported'}; with torch._dynamo imported, as "
        f"before: {anon_with / 2**20:.0f} MiB, {modules_with} modules "
        f"(+{(anon_with - anon) / 2**20:.0f} MiB a worker process, {anon_with / anon:.2f}x)"
    )


def main() -> None:
    _time_row("MLP 64-32-10", MLP(), torch.rand(16, 64))
    _time_row("digits CNN", DigitsCNN(), torch.rand(16, 1, 8, 8))
    _memory_row()


if __name__ == "__main__":
    main()
