"""Flower 1.42's simulation engine doing the simulation suite's work, measured in its own process.

::

    python -m benchmarks.flower_side --clients 1000 --rounds 10   # prints one JSON line

Theory of operation
-------------------
benchmarks/simulation.py runs fedtensor's simulated clients and then, one system at a time,
this module in a subprocess: Flower's Ray instance, its actors and their memory then neither
mix with fedtensor's measurement nor outlive the run (the subprocess ends, and Flower shuts
Ray down). The work is the same: the same training set (:func:`benchmark_data`, built
deterministically here again, nothing downloaded), the same partition (:func:`client_parts`:
the ``split_indices(..., split="iid", seed=0)`` call that ``ft.simulate_clients`` makes, client
``i`` of fedtensor is Flower's ``partition-id`` ``i``), the same MLP 64-32-10 with the same
initial weights (``torch.manual_seed(0)``), FedAvg weighted by examples, 100 clients sampled
per round, SGD lr 0.1, batches of 16, 1 local epoch, torch at 1 thread in each client, and
central evaluation of the final model on the digits' held-out fifth. The subprocess reports a
digest of its data and partition (:func:`digest`) so that the parent can check it trained on
what fedtensor trained on.

Flower's side is written with its current Message API (1.42): a ``ClientApp`` whose
``@train`` function trains one partition, a ``ServerApp`` whose ``@main`` runs
``flwr.serverapp.strategy.FedAvg.start``, and ``flwr.simulation.run_simulation`` with the Ray
backend, 1 CPU per client (``client_resources``), and as many actors as the CPUs this process
may run on (Ray's ``num_cpus``: 2 actors on 2 cores). The clients read the training set as a
memory-mapped ``.npy`` file that this process writes once (as Flower's data sets are
memory-mapped Arrow files): an actor's pages of it are shared, not copied per client.

Figures: the first round from calling ``run_simulation`` (Ray's start-up, the actors and
their imports included: it is Flower's setup) to the end of round 1, the same from the
strategy's start (``evaluate_fn`` at round 0) as ``round1_only_s``, the mean of later rounds
(between calls of ``evaluate_fn``, which Flower makes after each round), the peak PSS and RSS
summed over this process and all its descendants (Ray's head processes and actors; from
``/proc/<pid>/smaps_rollup``, the tree found in ``/proc``), sampled every 0.5 s by a thread
and at each round's end, the most processes seen in that tree, and the final accuracy.

Everything that does not need flwr (the data, the partition, the digest, the memory sampler)
is importable without it, for the suite and tests/test_flower_side.py.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import itertools
import json
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fedtensor as ft
from fedtensor.demo import load_digits

SEED = 0
SYNTHETIC_EXAMPLES = 100_000
SAMPLE_EVERY_S = 0.5
Data = tuple[torch.Tensor, torch.Tensor]


class MLP(nn.Module):
    """64-32-10 on flattened 8x8 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(64, 32)
        self.out = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x.flatten(1))))  # type: ignore[no-any-return]


def digits_like(data: Data, count: int, seed: int = SEED) -> Data:
    """``count`` examples: the digits repeated, each copy with a little noise, in [0, 1]."""
    images, labels = data
    generator = torch.Generator().manual_seed(seed)
    picks = torch.arange(count) % len(images)
    noise = 0.05 * torch.randn((count, *images.shape[1:]), generator=generator)
    return (images[picks] + noise).clamp_(0, 1), labels[picks]


def benchmark_data(clients: int) -> tuple[Data, Data]:
    """The training set for ``clients`` clients and the test set: 1,000 clients split the
    digits' 1,437 training examples, more clients 100,000 digit-shaped ones."""
    train, test = load_digits(SEED)
    if clients > 1_000:
        train = digits_like(train, SYNTHETIC_EXAMPLES)
    return train, test


def client_parts(targets: torch.Tensor, clients: int) -> list[torch.Tensor]:
    """Client ``i``'s example indices: what ``ft.simulate_clients(..., seed=SEED)`` gives
    ``client-i`` (its default IID split), so Flower's ``partition-id`` ``i`` trains on them."""
    return ft.split_indices(targets, clients, split="iid", seed=SEED)


def digest(data: Data, parts: Sequence[torch.Tensor]) -> str:
    """A short hash of the examples, the labels and the partition."""
    hasher = hashlib.sha256()
    for tensor in (*data, *parts):
        hasher.update(str(tuple(tensor.shape)).encode())
        hasher.update(tensor.contiguous().numpy().tobytes())
    return hasher.hexdigest()[:16]


def tree_memory(root: int) -> tuple[int, int, int]:
    """PSS and RSS in bytes summed over ``root`` and all its descendants, and their count."""
    pids = [root, *_descendants(root)]
    pss = rss = counted = 0
    for pid in pids:
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:  # ended meanwhile, or not ours to read
            continue
        counted += 1
        for line in rollup.splitlines():
            if line.startswith("Pss:"):
                pss += int(line.split()[1]) * 1024
            elif line.startswith("Rss:"):
                rss += int(line.split()[1]) * 1024
    return pss, rss, counted


def _descendants(root: int) -> list[int]:
    """Descendants of ``root``, from /proc (Linux; no psutil needed)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            # The fields after the command name (which may hold spaces): state, then ppid.
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    found, stack = [], list(children.get(root, []))
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


class PeakMemory:
    """The peak of :func:`tree_memory` over this process's tree: a thread samples it every
    ``every`` seconds, and :meth:`sample` samples it at a moment of the caller's choosing."""

    def __init__(self, every: float = SAMPLE_EVERY_S) -> None:
        self.pss = self.rss = self.processes = 0
        self._every = every
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-memory", daemon=True)

    def sample(self) -> None:
        pss, rss, processes = tree_memory(os.getpid())
        with self._lock:
            self.pss, self.rss = max(self.pss, pss), max(self.rss, rss)
            self.processes = max(self.processes, processes)

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            self.sample()

    def __enter__(self) -> PeakMemory:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


@contextlib.contextmanager
def _shared_files(train: Data, parts: Sequence[torch.Tensor]) -> Iterator[str]:
    """A folder with the training set and the partition as ``.npy`` files, for the actors."""
    import numpy as np

    with tempfile.TemporaryDirectory(prefix="fedtensor-flower-") as folder:
        sizes = torch.tensor([0] + [len(part) for part in parts])
        arrays = {
            "x": train[0].flatten(1).numpy(),
            "y": train[1].numpy(),
            "order": torch.cat(list(parts)).numpy(),
            "offsets": torch.cumsum(sizes, 0).numpy(),
        }
        for name, array in arrays.items():
            np.save(Path(folder, f"{name}.npy"), np.ascontiguousarray(array), allow_pickle=False)
        yield folder


_ACTOR_DATA: dict[str, dict[str, Any]] = {}  # per actor process: folder -> memory-mapped arrays


def _actor_data(folder: str) -> dict[str, Any]:
    import numpy as np

    if folder not in _ACTOR_DATA:
        _ACTOR_DATA[folder] = {
            name: np.load(Path(folder, f"{name}.npy"), mmap_mode="r", allow_pickle=False)
            for name in ("x", "y", "order", "offsets")
        }
    return _ACTOR_DATA[folder]


def _local_epoch(model: nn.Module, data: Data, seed: int, lr: float, batch_size: int) -> None:
    """One epoch of SGD over ``data`` in an order drawn from ``seed``."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    x, y = data
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    for start in range(0, len(y), batch_size):
        batch = order[start : start + batch_size]
        optimizer.zero_grad()
        loss: torch.Tensor = nn.functional.cross_entropy(model(x[batch]), y[batch])
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()


def _flower_apps(
    clients: int, rounds: int, per_round: int, lr: float, batch_size: int, folder: str,
    test: Data, memory: PeakMemory, record: dict[str, Any],
) -> tuple[Any, Any]:  # fmt: skip
    """Flower's ``ServerApp`` and ``ClientApp`` for this work (Message API, flwr 1.42)."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    client_app = ClientApp()

    @client_app.train()  # type: ignore[untyped-decorator]
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)  # one core per client, as fedtensor's executors
        config = msg.content["config"]
        arrays = _actor_data(str(config["data-dir"]))
        partition = int(context.node_config["partition-id"])
        low, high = int(arrays["offsets"][partition]), int(arrays["offsets"][partition + 1])
        rows = arrays["order"][low:high]
        data = (torch.from_numpy(arrays["x"][rows]), torch.from_numpy(arrays["y"][rows]))
        model = MLP()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        seed = (SEED * 1_000_003 + int(config["server-round"])) * 1_000_003 + partition
        _local_epoch(model, data, seed, float(config["lr"]), int(config["batch-size"]))
        content = RecordDict(
            {
                "arrays": ArrayRecord(model.state_dict()),
                "metrics": MetricRecord({"num-examples": len(rows)}),
            }
        )
        return Message(content=content, reply_to=msg)

    server_app = ServerApp()

    @server_app.main()  # type: ignore[untyped-decorator]
    def main(grid: Grid, context: Context) -> None:
        torch.manual_seed(SEED)
        model = MLP()

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            record["round_ends"].append(time.perf_counter())
            memory.sample()
            if server_round < rounds:
                return None
            model.load_state_dict(arrays.to_torch_state_dict())
            record["accuracy"] = ft.evaluate(model, *test)[1]
            return MetricRecord({"accuracy": record["accuracy"]})

        strategy = FedAvg(
            fraction_train=per_round / clients,
            fraction_evaluate=0.0,  # central evaluation only, as fedtensor's side
            min_train_nodes=per_round,
            min_available_nodes=clients,
        )
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=rounds,
            train_config=ConfigRecord({"data-dir": folder, "lr": lr, "batch-size": batch_size}),
            evaluate_fn=evaluate,
        )

    return server_app, client_app


def run_flower(
    clients: int, rounds: int, per_round: int = 100, lr: float = 0.1, batch_size: int = 16
) -> dict[str, Any]:
    """Flower's simulation of the work; the figures (see the module's header)."""
    from flwr.simulation import run_simulation

    train, test = benchmark_data(clients)
    parts = client_parts(train[1], clients)
    record: dict[str, Any] = {"round_ends": []}
    with _shared_files(train, parts) as folder, PeakMemory() as memory:
        server_app, client_app = _flower_apps(
            clients, rounds, per_round, lr, batch_size, folder, test, memory, record
        )
        started = time.perf_counter()
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=clients,
            backend_name="ray",
            backend_config={
                # 1 CPU per client; Ray counts the CPUs this process may run on (taskset)
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {"num_cpus": len(os.sched_getaffinity(0))},
            },
        )
        ended = time.perf_counter()
    ends = record["round_ends"]  # round 0 (the strategy starts), then each round's end
    if len(ends) != rounds + 1 or "accuracy" not in record:
        raise RuntimeError(f"Flower's run ended after {len(ends) - 1} of {rounds} rounds")
    later = statistics.fmean(b - a for a, b in itertools.pairwise(ends[1:])) if rounds > 1 else None
    return {
        "flwr": importlib.metadata.version("flwr"),
        "ray": importlib.metadata.version("ray"),
        "clients": clients,
        "rounds": rounds,
        "per_round": per_round,
        "digest": digest(train, parts),
        "startup_s": ends[0] - started,
        "first_round_s": ends[1] - started,
        "round1_only_s": ends[1] - ends[0],
        "later_round_s": later,
        "shutdown_s": ended - ends[-1],
        "peak_pss": memory.pss,
        "peak_rss": memory.rss,
        "processes": memory.processes,
        "accuracy": record["accuracy"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.flower_side", description=__doc__)
    parser.add_argument("--clients", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--per-round", type=int, default=100)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the server's aggregation and evaluation: one core
    result = run_flower(args.clients, args.rounds, args.per_round)
    print(json.dumps(result), flush=True)  # the one line the suite reads (the last one)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
