"""The training commands' dry runs remembered per client (fedtensor/worker/dry_runs.py):
a round that repeats the last one's shapes is sized without one, and still charged."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedtensor.federated.trace import trace
from fedtensor.worker.budget import Ledger, check_worker_operation
from fedtensor.worker.dry_runs import ENTRIES, DryRuns, dry_run_key
from fedtensor.worker.local_update import memory_bytes
from fedtensor.worker.local_updates import memory_bytes as batch_memory_bytes


class _Scale(nn.Module):
    """Activations as wide as the examples, whatever the state: a shape the state does not tell."""

    def __init__(self, size: int = 1) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x * self.weight)


def _loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (output.sum(1) - target).pow(2).mean()


def _setup(width: int, rows: int = 40, size: int = 1) -> tuple[Any, Any, Any, Any]:
    model = _Scale(size)
    x, y = torch.rand(rows, width), torch.rand(rows)
    plan = trace(model, _loss, (x[:4], y[:4])).wire
    state = {key: value.detach() for key, value in model.state_dict().items()}
    return plan, state, x, y


def test_the_same_shapes_are_sized_once_and_charged_the_same() -> None:
    plan, state, x, y = _setup(64)
    expected = memory_bytes(plan, state, x, y, limit=1 << 30, batch_size=8)
    dry_runs = DryRuns()
    first = memory_bytes(plan, state, x, y, limit=1 << 30, dry_runs=dry_runs, batch_size=8)
    again = memory_bytes(plan, state, x, y, limit=1 << 30, dry_runs=dry_runs, batch_size=8)
    assert first == again == expected
    assert (dry_runs.runs, dry_runs.hits) == (1, 1)
    # The state's copies are counted on every call: Adam's buffers, not in the key, add.
    adam = memory_bytes(
        plan, state, x, y, limit=1 << 30, dry_runs=dry_runs, batch_size=8, optimizer="adam"
    )
    assert (dry_runs.runs, dry_runs.hits) == (1, 2)
    assert adam == memory_bytes(plan, state, x, y, limit=1 << 30, batch_size=8, optimizer="adam")


def test_a_cached_size_is_still_charged_against_what_the_client_has_left() -> None:
    plan, state, x, y = _setup(64)
    args, options = (plan, state, x, y), {"batch_size": 8}
    size = memory_bytes(*args, limit=1 << 30, **options)
    ledger = Ledger(size + 4096)
    assert check_worker_operation("fedtensor.local_update", args, options, ledger, {}) is None
    assert check_worker_operation("fedtensor.local_update", args, options, ledger, {}) is None
    assert (ledger.dry_runs.runs, ledger.dry_runs.hits) == (1, 1)
    # The client now holds 8 KiB more: the remembered size no longer fits.
    assert ledger.store(1, torch.zeros(2048)) is not None
    assert ledger.remaining < size
    refused = check_worker_operation("fedtensor.local_update", args, options, ledger, {})
    assert refused is not None
    assert refused.kind == "limit"
    assert "plan node" in refused.message  # the dry run ran again and named the node
    ledger.release(1)
    assert check_worker_operation("fedtensor.local_update", args, options, ledger, {}) is None


def test_a_changed_example_shape_is_sized_again() -> None:
    plan, state, narrow, y = _setup(4)
    _, _, wide, _ = _setup(4096)
    small = memory_bytes(plan, state, narrow, y, limit=1 << 30, batch_size=8)
    large = memory_bytes(plan, state, wide, y, limit=1 << 30, batch_size=8)
    assert large > small + 8 * 4096 * 4  # a batch of wide rows, at least once more
    ledger = Ledger(small + 4096)
    args, options = (plan, state, narrow, y), {"batch_size": 8}
    assert check_worker_operation("fedtensor.local_update", args, options, ledger, {}) is None
    # The same plan and state on wider examples: refused, not answered from the cache.
    wider = (plan, state, wide, y)
    refused = check_worker_operation("fedtensor.local_update", wider, options, ledger, {})
    assert refused is not None
    assert refused.kind == "limit"
    assert (ledger.dry_runs.runs, ledger.dry_runs.hits) == (1, 0)


def test_a_changed_batch_state_or_plan_is_sized_again() -> None:
    plan, state, x, y = _setup(16, size=16)
    dry_runs = DryRuns()
    sizes = [memory_bytes(plan, state, x, y, limit=1 << 30, dry_runs=dry_runs, batch_size=8)]
    sizes.append(memory_bytes(plan, state, x, y, limit=1 << 30, dry_runs=dry_runs, batch_size=16))
    # A state entry of another shape (broadcast: [16] against a [1] weight).
    _, narrow_state, _, _ = _setup(16, size=1)
    sizes.append(
        memory_bytes(plan, narrow_state, x, y, limit=1 << 30, dry_runs=dry_runs, batch_size=8)
    )
    other = trace(nn.Sequential(_Scale(16), nn.ReLU(), nn.ReLU()), _loss, (x[:4], y[:4])).wire
    other_state = {"0.weight": state["weight"]}
    sizes.append(
        memory_bytes(other, other_state, x, y, limit=1 << 30, dry_runs=dry_runs, batch_size=8)
    )
    assert (dry_runs.runs, dry_runs.hits) == (4, 0)
    assert sizes[1] > sizes[0]
    assert sizes[3] > sizes[0]
    assert len(set(sizes)) == 4


def test_local_updates_of_a_repeated_round_are_sized_once() -> None:
    plan, state, x, y = _setup(8, rows=100)
    clients = [[i * 10, i * 10 + 10, i] for i in range(10)]
    args, options = (plan, state, x, y, clients), {"batch_size": 16}
    size = batch_memory_bytes(*args, limit=1 << 30, **options)
    ledger = Ledger(size)
    for _ in range(3):  # three rounds of the same clients' shapes
        assert check_worker_operation("fedtensor.local_updates", args, options, ledger, {}) is None
    assert (ledger.dry_runs.runs, ledger.dry_runs.hits) == (1, 2)
    refused = check_worker_operation("fedtensor.local_updates", args, options, Ledger(size - 1), {})
    assert refused is not None
    assert refused.kind == "limit"


def test_the_cache_keeps_only_its_last_entries() -> None:
    plan, state, x, y = _setup(8, rows=200)
    dry_runs = DryRuns()
    for batch_size in range(1, ENTRIES + 3):
        memory_bytes(plan, state, x, y, limit=1 << 30, dry_runs=dry_runs, batch_size=batch_size)
    assert len(dry_runs) == ENTRIES
    memory_bytes(plan, state, x, y, limit=1 << 30, dry_runs=dry_runs, batch_size=ENTRIES + 2)
    assert dry_runs.hits == 1  # the newest is kept
    memory_bytes(plan, state, x, y, limit=1 << 30, dry_runs=dry_runs, batch_size=1)
    assert dry_runs.hits == 1  # the oldest was dropped: run again
    assert dry_runs.runs == ENTRIES + 3


def test_the_key_tells_types_and_values_apart() -> None:
    meta = torch.empty(2, 3, device="meta")
    base = {"nodes": [["call", "torch.sum", [1], {"keepdim": True}]]}
    keys = {
        dry_run_key(base, {}, meta),
        dry_run_key({"nodes": [["call", "torch.sum", [1], {"keepdim": 1}]]}, {}, meta),
        dry_run_key({"nodes": [["call", "torch.sum", [1.0], {"keepdim": True}]]}, {}, meta),
        dry_run_key({"nodes": [["call", "torch.sum", [(1,)], {"keepdim": True}]]}, {}, meta),
        dry_run_key(base, {}, torch.empty(3, 2, device="meta")),
        dry_run_key(base, {}, torch.empty(2, 3, dtype=torch.float64, device="meta")),
        dry_run_key(base, {"w": torch.empty(1)}, meta),
        dry_run_key(base, {"w": torch.empty(2)}, meta),
    }
    assert len(keys) == 8
    assert dry_run_key(base, {}, meta) in keys  # the same values give the same key
    assert dry_run_key({"nodes": [object()]}, {}, meta) is None  # undescribed: no cache
