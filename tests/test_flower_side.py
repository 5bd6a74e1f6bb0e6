"""The simulation benchmark's Flower side (benchmarks/flower_side.py), checked cheaply: Flower
trains on exactly fedtensor's clients, the memory of a process tree counts its children, and
without flwr the suite shows the recorded figures marked as such. Flower itself (Ray, its
actors) runs only in the benchmark; what needs flwr here skips when it is not installed (CI
does not install it)."""

from __future__ import annotations

import importlib.util
import os
import select
import subprocess
import sys

import pytest
import torch

import fedtensor as ft
from benchmarks import flower_side, simulation
from benchmarks.common import Baseline, Config, Row

NO_FLOWER = "flwr is not installed (the fedtensor[flower] extra; CI does not install it)"
needs_flower = pytest.mark.skipif(importlib.util.find_spec("flwr") is None, reason=NO_FLOWER)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.anyio
async def test_flower_gets_fedtensors_clients() -> None:
    """Flower's partition-id i is fedtensor's client-i: same names, sizes and examples."""
    clients = 1_000
    train, _ = flower_side.benchmark_data(clients)
    parts = flower_side.client_parts(train[1], clients)
    async with ft.VirtualWorker("flower-side-executor") as executor:
        simulated = ft.simulate_clients(
            train, clients=clients, executors=[executor], seed=flower_side.SEED
        )
        assert simulated.sizes() == {f"client-{i}": len(part) for i, part in enumerate(parts)}
        assert [shard.name for shard in simulated.shards] == [f"client-{i}" for i in range(clients)]
        for i in (0, 1, 437, clients - 1):  # the examples themselves, not just the counts
            shard = simulated.shards[i]
            data = await shard.data.fetch(timeout=30)
            targets = await shard.targets.fetch(timeout=30)
            assert torch.equal(data, train[0][parts[i]])
            assert torch.equal(targets, train[1][parts[i]])
        simulated.close()
    assert sorted(torch.cat(parts).tolist()) == list(range(len(train[1])))  # each example once


def test_the_digest_tells_partitions_apart() -> None:
    """The suite checks Flower's digest against its own: moving one example changes it."""
    x, y = torch.arange(20.0).reshape(10, 2), torch.arange(10) % 3
    parts = [torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5, 6, 7, 8, 9])]
    moved = [torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5, 6, 7, 8, 9])]
    assert flower_side.digest((x, y), parts) == flower_side.digest((x.clone(), y.clone()), parts)
    assert flower_side.digest((x, y), parts) != flower_side.digest((x, y), moved)
    assert flower_side.digest((x, y), parts) != flower_side.digest((x, y + 1), parts)


def test_tree_memory_counts_the_children() -> None:
    """Ray's processes are children (and grandchildren) of Flower's: they must be summed."""
    _, _, alone = flower_side.tree_memory(os.getpid())
    parent_of_one = (
        "import subprocess, sys\n"
        "child = subprocess.Popen([sys.executable, '-c', 'input()'], stdin=subprocess.PIPE)\n"
        "print(child.pid, flush=True)\n"
        "sys.stdin.readline()\n"
        "child.kill(); child.wait()\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", parent_of_one], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    ) as child:
        try:
            assert child.stdout is not None
            assert child.stdin is not None
            ready, _, _ = select.select([child.stdout], [], [], 30)
            assert ready, "the child did not start its own child within 30 s"
            grandchild = int(child.stdout.readline())
            assert {child.pid, grandchild} <= set(flower_side._descendants(os.getpid()))
            _, _, counted = flower_side.tree_memory(os.getpid())
            assert counted >= alone + 2
            # Compared within the child's own tree: this process's PSS moves by more than
            # a child's between two readings (garbage collection, other tests' memory).
            tree_pss, tree_rss, in_tree = flower_side.tree_memory(child.pid)
            grandchild_pss, _, just_one = flower_side.tree_memory(grandchild)
            assert (in_tree, just_one) == (2, 1)
            assert tree_pss > grandchild_pss > 0
            assert tree_rss >= tree_pss
            child.stdin.close()  # the child kills the grandchild and ends
            assert child.wait(timeout=30) == 0
        finally:  # an assertion failed: no orphan (the grandchild ends on EOF too)
            child.kill()
            child.wait(timeout=30)


@pytest.mark.anyio
async def test_without_flower_the_suite_shows_recorded_figures(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not run: the baseline says why, the recorded figures are marked as not measured."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "flwr" else real_find_spec(name, *a),
    )
    assert simulation.flower_missing() == simulation.FLOWER_ABSENT
    monkeypatch.undo()
    env = {"flower_skipped": simulation.FLOWER_ABSENT, "rounds": 3}
    baselines = await simulation._flower(1_000, 3, env)
    assert baselines[0].error == simulation.FLOWER_ABSENT
    assert baselines[0].value is None
    assert baselines[1].name == "Flower 1.42 (recorded, not measured)"
    assert baselines[1].value == simulation.FLOWER[1_000][1]
    assert [b.error for b in await simulation._flower(10_000, 3, env)] == [
        simulation.FLOWER_ABSENT
    ]  # nothing recorded for 10,000 clients: nothing shown
    text = simulation.notes([Row("simulation1000_virtual1", "1,000 clients", "s")], env)
    assert "Flower 1.42 simulation (recorded, not measured)" in text
    assert f"not measured: {simulation.FLOWER_ABSENT}" in text


@needs_flower
@pytest.mark.filterwarnings("ignore:'click\\.utils\\.:DeprecationWarning")
def test_flower_apps_are_built_with_flowers_api() -> None:
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    _train, test = flower_side.benchmark_data(1_000)
    with flower_side.PeakMemory(every=60) as memory:
        server_app, client_app = flower_side._flower_apps(
            1_000, 1, 100, 0.1, 16, "unused", test, memory, {"round_ends": []}
        )
    assert isinstance(server_app, ServerApp)
    assert isinstance(client_app, ClientApp)


@pytest.mark.anyio
async def test_each_pool_is_compared_with_flower_on_its_own_figure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every fedtensor row gets its own ratio against Flower's measured later rounds, from
    its pool's fastest turn (the pools take turns), with the most memory any turn took."""
    later = {
        "workers": 0.5, "virtual1": 0.25, "process1": 2.0, "process2": 1.0,
        "process2_stratified": 0.8,
    }  # fmt: skip
    turns: dict[str, int] = {}
    order: list[str] = []

    async def fake_run(key: str, clients: int, *_: object) -> dict[str, float]:
        turn = turns[f"{clients}{key}"] = turns.get(f"{clients}{key}", -1) + 1
        order.append(key)
        slower = 2.0 if turn == 0 else 1.0  # the first turn of each pool is the slow one
        return {
            "later_round_s": slower * later[key] * clients / 1_000,
            "peak_pss": 100.0 - turn,
            "peak_rss": 200.0 + turn,
        }

    async def fake_flower(clients: int, rounds: int, env: dict[str, object]) -> list[Baseline]:
        return [Baseline("Flower 1.42 (measured, same run)", 4.0 * clients / 1_000)]

    monkeypatch.setattr(simulation, "_run", fake_run)
    monkeypatch.setattr(simulation, "_flower", fake_flower)
    config = Config(quick=True, rounds={"rounds": 3, "repeats": 2})
    rows = await simulation.run_simulation(config, {})
    pools = ["workers", "virtual1", "process1", "process2", "process2_stratified"]
    assert order[:10] == pools + pools  # turns in rotation, not one pool's all at once
    versus = {
        row.key: [b.versus for b in row.baselines if b.name.startswith("Flower")] for row in rows
    }
    assert versus == {
        "simulation1000_workers": ["8.00x faster"],
        "simulation1000_virtual1": ["16.00x faster"],
        "simulation1000_process1": ["2.00x faster"],
        "simulation1000_process2": ["4.00x faster"],
        "simulation1000_process2_stratified": ["5.00x faster"],
        "simulation10000_virtual1": ["16.00x faster"],
        "simulation10000_process1": ["2.00x faster"],
        "simulation10000_process2": ["4.00x faster"],
        "simulation10000_process2_stratified": ["5.00x faster"],
    }
    for row in rows:
        assert row.extra["peak_pss"] == 100.0  # the first turn's, the most
        assert row.extra["peak_rss"] == 201.0  # the second turn's, the most
