"""Federated training: plans, local updates, FedAvg and friends, rounds, checkpoints, the demo."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fedtensor as ft
import fedtensor.sync as sy
from fedtensor.demo import DigitsCNN, load_digits, train_centrally
from fedtensor.federated.fit import worker_seed
from fedtensor.protocol.messages import Ref
from fedtensor.testing import WorkerFactory, WorkerProcess
from fedtensor.worker.compiler import compile_plan

pytestmark = pytest.mark.anyio

StartWorker = Callable[..., WorkerProcess]


class Residual(nn.Module):
    """A user-defined module: custom forward, a batch norm, dropout, a skip connection."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.25)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop(F.relu(self.norm(self.conv(x))))
        y = y + x.expand(-1, 4, -1, -1) * self.scale
        return self.head(y.view(y.size(0), 4, 8, 8))  # type: ignore[no-any-return]


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x.flatten(1))))  # type: ignore[no-any-return]


def _data(count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 1, 8, 8, generator=generator), torch.randint(
        0, 10, (count,), generator=generator
    )


def _model(kind: type[nn.Module] = Tiny, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return kind()


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6) -> bool:
    return a.keys() == b.keys() and all(
        torch.allclose(a[key].double(), b[key].double(), atol=atol) for key in a
    )


def _states_equal(a: nn.Module, b: nn.Module) -> bool:
    return _close(a.state_dict(), b.state_dict(), atol=0.0)


# -- plans -----------------------------------------------------------------------------------------


def test_a_user_module_traces_to_a_plan_that_computes_what_the_module_does() -> None:
    model = _model(Residual)
    plan = ft.trace(model, nn.CrossEntropyLoss())
    assert plan.operations > 5
    assert set(plan.trainable) == {name for name, _ in model.named_parameters()}
    assert not model.norm.num_batches_tracked  # tracing ran nothing
    compiled = compile_plan(plan.wire)
    x, y = _data(6)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    with torch.random.fork_rng():
        torch.manual_seed(5)
        loss, output = compiled.run(state, x, y)
    model.train()
    with torch.random.fork_rng():
        torch.manual_seed(5)
        expected = model(x)
    assert torch.allclose(output, expected)
    assert torch.allclose(loss, F.cross_entropy(expected, y))
    # the batch norm's running statistics were updated in the plan's state as in the module
    assert torch.allclose(state["norm.running_mean"], model.norm.running_mean)
    assert int(state["norm.num_batches_tracked"]) == 1


class Recurrent(nn.Module):
    """An LSTM: its forward checks ranks and shapes with `if`s, settled by an example."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 12, batch_first=True)
        self.head = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, (_h, _c) = self.lstm(x)
        return self.head(out[:, -1])  # type: ignore[no-any-return]


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(1))  # type: ignore[no-any-return]


@pytest.mark.parametrize("kind", [Recurrent, Attention])
def test_recurrent_and_attention_layers_trace_given_an_example_batch(
    kind: type[nn.Module],
) -> None:
    model = _model(kind)
    x, y = torch.randn(6, 5, 4), torch.randint(0, 10, (6,))
    with pytest.raises(ft.PlanError, match="control flow"):
        ft.trace(model, F.cross_entropy)  # without an example, the shape checks stop it
    plan = ft.trace(model, F.cross_entropy, (x[:1], y[:1]))
    state = {key: value.clone() for key, value in model.state_dict().items()}
    with torch.random.fork_rng():
        torch.manual_seed(2)
        _, output = compile_plan(plan.wire).run(state, x, y)  # another batch size
    model.train()
    with torch.random.fork_rng():
        torch.manual_seed(2)
        expected = model(x)
    assert torch.allclose(output, expected, atol=1e-6)


def test_control_flow_on_the_batch_size_is_refused() -> None:
    class ByBatch(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2 if x.size(0) > 2 else x

    with pytest.raises(ft.PlanError, match="depends on the batch size"):
        ft.trace(ByBatch(), F.mse_loss, (torch.ones(1, 3), torch.ones(1, 3)))


def test_tracing_refuses_forbidden_operations_and_data_dependent_control_flow() -> None:
    class Peeks(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.as_strided((2,), (1,))

    class Branches(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x if x.sum() > 0 else -x

    with pytest.raises(ft.ForbiddenOperation, match="as_strided"):
        ft.trace(Peeks(), F.mse_loss)
    with pytest.raises(ft.PlanError, match="control flow"):
        ft.trace(Branches(), F.mse_loss)
    with pytest.raises(ft.PlanError, match="values in a tensor"):
        ft.trace(Branches(), F.mse_loss, (torch.ones(1, 3), torch.ones(1, 3)))


def _forbidden_plan(operation: str) -> dict[str, Any]:
    return {
        "format": 1,
        "trainable": [],
        "nodes": [
            ["input", 0, (), {}],
            ["input", 1, (), {}],
            ["call", operation, (Ref(0),), {}],
            ["output", None, ((Ref(2), Ref(2)),), {}],
        ],
    }


def test_compile_checks_every_operation_and_reference() -> None:
    with pytest.raises(ft.ForbiddenOperation, match=r"Tensor\.data_ptr"):
        compile_plan(_forbidden_plan("Tensor.data_ptr"))
    with pytest.raises(ft.ForbiddenOperation, match=r"fedtensor\.local_update"):
        compile_plan(_forbidden_plan("fedtensor.local_update"))  # no recursion into workers' ops
    reads_private = _forbidden_plan("getattr")
    reads_private["nodes"][2] = ["call", "getattr", (Ref(0), "__class__"), {}]
    with pytest.raises(ft.ForbiddenOperation, match="__class__"):
        compile_plan(reads_private)
    forward_ref = _forbidden_plan("torch.neg")
    forward_ref["nodes"][2] = ["call", "torch.neg", (Ref(3),), {}]
    with pytest.raises(ft.PlanError, match="not before it"):
        compile_plan(forward_ref)
    with pytest.raises(ft.PlanError, match="format"):
        compile_plan({"nodes": []})


def _arithmetic_plan(operation: str, left: Any, right: Any) -> dict[str, Any]:
    return {
        "format": 1,
        "trainable": [],
        "nodes": [
            ["input", 0, (), {}],
            ["call", operation, (left, right), {}],
            ["output", None, ((Ref(1), Ref(0)),), {}],
        ],
    }


def test_plan_arithmetic_on_python_objects_is_bounded() -> None:
    x = torch.ones(2)
    run = lambda *plan: compile_plan(_arithmetic_plan(*plan)).run({}, x, x)  # noqa: E731
    assert run("operator.pow", 2, 10)[0] == 1024
    assert run("operator.add", (1, 2), (3,))[0] == (1, 2, 3)
    assert torch.equal(run("operator.mul", Ref(0), 3)[0], torch.full((2,), 3.0))
    with pytest.raises(ft.PlanError, match="powers from 0 to 64"):
        run("operator.pow", 10, 10**9)  # would hold the interpreter for minutes
    with pytest.raises(ft.PlanError, match="4096 items"):
        run("operator.mul", [0], 10**9)
    with pytest.raises(ft.PlanError, match="4096 bits"):
        run("operator.mul", 1 << 4000, 1 << 4000)
    with pytest.raises(ft.PlanError, match="not strings"):
        run("operator.mul", "ab", 3)


async def test_a_worker_refuses_a_forbidden_plan_and_keeps_serving(ft_worker: Any) -> None:
    client = ft_worker.client
    x, y = ft.send(torch.ones(2, 3), ft_worker), ft.send(torch.zeros(2), ft_worker)
    plan = client.store(_forbidden_plan("Tensor.untyped_storage"))
    state = client.store({})
    from fedtensor.client.pointer import call_on

    update = call_on(client, "fedtensor.local_update", (plan, state, x, y), {})
    with pytest.raises(ft.ForbiddenOperation, match="untyped_storage"):
        await update.get()
    broken = client.store({"format": 1, "nodes": "nope", "trainable": []})
    update = call_on(client, "fedtensor.local_update", (broken, state, x, y), {})
    with pytest.raises(ft.RemoteError, match="PlanError"):
        await update.get()
    assert torch.equal(await (x + 1).get(), torch.full((2, 3), 2.0))  # still serving
    del x, y, plan, state, broken, update


# -- local updates and aggregation -----------------------------------------------------------------


async def test_fedavg_on_one_worker_equals_plain_local_training(ft_workers: WorkerFactory) -> None:
    bob = await ft_workers("bob")
    data = _data(100)
    federated = ft.federate(data, [bob], seed=0)
    model = _model()
    history = await ft.fit(
        model, federated, rounds=3, epochs=2, batch_size=16, lr=0.1, seed=7, progress=False
    )
    del federated
    local = _model()
    for round in range(1, 4):
        seed = worker_seed(7, round, 0)
        train_centrally(local, data, seed=seed, epochs=2, lr=0.1, batch_size=16)
    assert _close(model.state_dict(), local.state_dict())
    assert [m.completed for m in history] == [("bob",)] * 3
    assert history[0].bytes_sent == sum(v.numel() * 4 for v in model.state_dict().values())


async def test_an_lstm_trains_federatedly_as_it_does_locally(
    ft_virtual_workers: WorkerFactory,
) -> None:
    bob = await ft_virtual_workers("bob")
    generator = torch.Generator().manual_seed(0)
    data = torch.randn(40, 5, 4, generator=generator), torch.randint(0, 10, (40,))
    federated = ft.federate(data, [bob], seed=0)
    model = _model(Recurrent)
    await ft.fit(model, federated, rounds=2, batch_size=16, lr=0.1, seed=4, progress=False)
    del federated
    local = _model(Recurrent)
    for round in (1, 2):
        train_centrally(local, data, seed=worker_seed(4, round, 0), epochs=1, lr=0.1, batch_size=16)
    assert _close(model.state_dict(), local.state_dict())


async def test_fedavg_weights_updates_by_examples(ft_virtual_workers: WorkerFactory) -> None:
    bob, alice = await ft_virtual_workers("bob"), await ft_virtual_workers("alice")
    x, y = _data(130)
    parts = [(x[:100], y[:100]), (x[100:], y[100:])]  # 100 and 30 examples
    federated = ft.FederatedDataset(
        [
            ft.Shard(worker, ft.send(part[0], worker), ft.send(part[1], worker), len(part[0]))
            for worker, part in zip([bob, alice], parts, strict=True)
        ]
    )
    model = _model()
    await ft.fit(model, federated, rounds=1, batch_size=10, lr=0.1, seed=3, progress=False)
    del federated
    trained = []
    for index, part in enumerate(parts):
        local = _model()
        train_centrally(local, part, seed=worker_seed(3, 1, index), epochs=1, lr=0.1, batch_size=10)
        trained.append(local.state_dict())
    weighted = {key: (100 * trained[0][key] + 30 * trained[1][key]) / 130 for key in trained[0]}
    unweighted = {key: (trained[0][key] + trained[1][key]) / 2 for key in trained[0]}
    assert _close(model.state_dict(), weighted)
    # The check can fail: averaging without the weights gives a model it tells apart.
    assert not _close(model.state_dict(), unweighted)


async def test_fedprox_keeps_workers_near_the_global_model(
    ft_virtual_workers: WorkerFactory,
) -> None:
    bob = await ft_virtual_workers("bob")
    federated = ft.federate(_data(64), [bob], seed=0)
    start = _model().state_dict()
    moved = {}
    for strategy in (ft.FedAvg(), ft.FedProx(mu=50.0)):
        model = _model()
        await ft.fit(
            model, federated, rounds=1, epochs=3, lr=0.01, strategy=strategy, progress=False
        )
        moved[type(strategy).__name__] = sum(
            float((model.state_dict()[key] - start[key]).norm()) for key in start
        )
    del federated
    assert moved["FedProx"] < 0.7 * moved["FedAvg"]


# -- accuracy, sampling, failures ------------------------------------------------------------------


# Once, over encoded frames (the wire format): it checks the training, not the transport.
# 8 epochs' worth of examples each way (2 workers, 4 rounds of 2 local epochs; 8 epochs
# centrally) reach 97.5% and 98.9% on one torch thread. That took 9 s at a load average of 9,
# and 6 s at 2 (on two threads, 110 s at a load average of 7: past the 60 s timeout).
@pytest.mark.parametrize("ft_encode", [True])
@pytest.mark.usefixtures("one_torch_thread")
async def test_federated_digits_reach_centralized_accuracy(
    ft_virtual_workers: WorkerFactory,
) -> None:
    train, test = load_digits(seed=0)
    workers = [await ft_virtual_workers(f"w{i}") for i in range(2)]
    federated = ft.federate(train, workers, split="iid", seed=0)
    model = _model(DigitsCNN)
    history = await ft.fit(
        model, federated, rounds=4, epochs=2, batch_size=16, lr=0.2, eval_data=test,
        progress=False,
    )  # fmt: skip
    del federated
    central = _model(DigitsCNN)
    train_centrally(central, train, epochs=8, lr=0.2, batch_size=16)
    _, central_accuracy = ft.evaluate(central, *test)
    assert central_accuracy > 0.95
    assert history[-1].eval_accuracy >= central_accuracy - 0.02
    assert history[-1].eval_accuracy == ft.evaluate(model, *test)[1]


async def test_sampling_picks_a_fraction_of_workers_reproducibly(
    ft_virtual_workers: WorkerFactory,
) -> None:
    workers = [await ft_virtual_workers(f"w{i}") for i in range(5)]
    federated = ft.federate(_data(100), workers, seed=0)
    runs = []
    for _ in range(2):
        history = await ft.fit(_model(), federated, rounds=4, fraction=0.4, seed=11, progress=False)
        runs.append([m.sampled for m in history])
    del federated
    assert runs[0] == runs[1]
    assert all(len(sampled) == 2 for sampled in runs[0])
    assert len(set(runs[0])) > 1  # different workers in different rounds


async def test_fit_checks_its_arguments(ft_virtual_workers: WorkerFactory) -> None:
    bob = await ft_virtual_workers("bob")
    federated = ft.federate(_data(20), [bob], seed=0)
    for bad, message in [
        ({"fraction": 0.0}, "fraction"),
        ({"min_workers": 2}, "min_workers=2 but the data is on 1 workers"),
        ({"optimizer": "lbfgs"}, "optimizer must be one of sgd, adam"),
        ({"epochs": 0}, "epochs"),
    ]:
        with pytest.raises(ValueError, match=message):
            await ft.fit(_model(), federated, rounds=1, progress=False, **bad)
    # What only the worker checks comes back as the worker's PlanError, not a skipped round.
    with pytest.raises(ft.RemoteError, match=r"PlanError.*lr finite"):
        await ft.fit(_model(), federated, rounds=1, lr=float("nan"), progress=False)
    del federated


async def test_training_that_fails_on_every_worker_raises(
    ft_virtual_workers: WorkerFactory,
) -> None:
    bob = await ft_virtual_workers("bob")
    x, _ = _data(20)
    federated = ft.federate((x, torch.full((20,), 12)), [bob], seed=0)  # no class 12
    with pytest.raises(ft.RemoteError, match="out of bounds"):
        await ft.fit(_model(), federated, rounds=2, progress=False)
    del federated


async def test_a_worker_killed_during_a_round_is_dropped_and_the_run_goes_on(
    ft_worker_processes: StartWorker,
) -> None:
    # Three workers on one machine: each gets one of its cores (--threads 1).
    processes = [
        ft_worker_processes(name, "--threads", "1", "--log-level", "DEBUG")
        for name in ("a", "b", "c")
    ]
    doomed = processes[1]
    async with contextlib.AsyncExitStack() as stack:
        workers = [
            await stack.enter_async_context(ft.connect(p.url, token=p.token)) for p in processes
        ]
        federated = ft.federate(_data(600), workers, seed=0)
        first_round_done = asyncio.Event()
        frames_in_round_one: list[int] = []

        async def kill_during_round_two() -> None:
            await first_round_done.wait()
            # Another process's log offers no event to wait on: poll it, with a deadline.
            while doomed.log().count("received") == frames_in_round_one[0]:  # noqa: ASYNC110
                await anyio.sleep(0.01)
            doomed.kill()  # round 2's update has reached it: it dies mid-round

        def on_round(metrics: ft.RoundMetrics) -> None:
            if metrics.round == 1:
                # Counted before round 2's commands even exist: its frame is the next one.
                frames_in_round_one.append(doomed.log().count("received"))
                first_round_done.set()

        with anyio.fail_after(60):
            killer = asyncio.ensure_future(kill_during_round_two())
            history = await ft.fit(
                _model(),
                federated,
                rounds=3,
                epochs=100,  # a round long enough for the kill to land inside it
                batch_size=8,
                min_workers=1,
                progress=False,
                on_round=on_round,
            )
            await killer
        assert [len(m.completed) for m in history] == [3, 2, 2]
        assert "unavailable" in history[1].failed["b"]
        assert history[2].sampled == ("a", "c")  # the dead worker is not sampled again
        assert not any(m.skipped for m in history)
        del federated


async def test_a_straggler_times_out_and_too_few_updates_skip_the_round(
    ft_worker_processes: StartWorker,
) -> None:
    processes = [ft_worker_processes(name, "--threads", "1") for name in ("fast", "slow")]
    async with contextlib.AsyncExitStack() as stack:
        workers = [
            await stack.enter_async_context(ft.connect(p.url, token=p.token, timeout=120))
            for p in processes
        ]
        federated = ft.federate(_data(40), workers, seed=0)
        model = _model()
        await ft.fit(model, federated, rounds=1, progress=False)  # both answer
        processes[1].process.send_signal(signal.SIGSTOP)  # alive, but answers nothing
        try:
            with anyio.fail_after(60):
                history = await ft.fit(
                    model, federated, rounds=1, round_timeout=2.0, progress=False
                )
                assert history[0].completed == ("fast",)
                assert "no update within 2.0 s" in history[0].failed["slow"]
                before = {key: value.clone() for key, value in model.state_dict().items()}
                history = await ft.fit(
                    model, federated, rounds=1, round_timeout=2.0, min_workers=2, progress=False
                )
                assert history[0].skipped
                assert _close(model.state_dict(), before, atol=0.0)  # left unchanged
        finally:
            processes[1].process.send_signal(signal.SIGCONT)
        with anyio.fail_after(60):  # the straggler catches up and serves again
            history = await ft.fit(model, federated, rounds=1, progress=False)
        assert history[0].completed == ("fast", "slow")
        del federated


# -- checkpoints, progress, plots ------------------------------------------------------------------


# The server optimizers' state (Adam's moments, FedAvgM's velocity) must travel in the
# checkpoint: a resumed run that started them afresh would end with other weights.
@pytest.mark.parametrize(
    "make_strategy",
    [lambda: ft.FedAdam(server_lr=0.05), lambda: ft.FedAvgM(server_lr=1.0, beta=0.9)],
    ids=["FedAdam", "FedAvgM"],
)
async def test_resuming_from_a_checkpoint_gives_the_uninterrupted_weights(
    ft_virtual_workers: WorkerFactory, tmp_path: Path, make_strategy: Callable[[], ft.Strategy]
) -> None:
    workers = [await ft_virtual_workers(f"w{i}") for i in range(3)]
    federated = ft.federate(_data(90), workers, seed=0)
    options: dict[str, Any] = {"fraction": 0.67, "progress": False, "seed": 5}
    straight = _model()
    await ft.fit(straight, federated, rounds=4, strategy=make_strategy(), **options)
    checkpoint = tmp_path / "run.pt"
    stopped = _model()
    await ft.fit(
        stopped, federated, rounds=2, strategy=make_strategy(), checkpoint=checkpoint, **options
    )
    assert checkpoint.exists()
    resumed = _model(seed=99)  # whatever it starts as, the checkpoint sets it
    history = await ft.fit(
        resumed, federated, rounds=4, strategy=make_strategy(), checkpoint=checkpoint,
        resume=True, **options,
    )  # fmt: skip
    del federated
    assert [m.round for m in history] == [1, 2, 3, 4]
    assert _states_equal(resumed, straight)
    name = type(make_strategy()).__name__
    with pytest.raises(ft.FedTensorError, match=f"seed 5 and {name}; this run has seed 6"):
        await ft.fit(
            _model(), ft.FederatedDataset([]), rounds=1, checkpoint=checkpoint, resume=True, seed=6,
            strategy=make_strategy(), progress=False,
        )  # fmt: skip


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere(
    ft_virtual_workers: WorkerFactory, tmp_path: Path
) -> None:
    bob = await ft_virtual_workers("bob")
    federated = ft.federate(_data(40), [bob], seed=0)
    lines = io.StringIO()
    history = await ft.fit(
        _model(), federated, rounds=2, eval_data=_data(20, seed=1), progress=lines
    )
    assert re.fullmatch(
        r"(round \d/2: 1/1 workers, train loss [\d.]+, eval loss [\d.]+, "
        r"eval acc [\d.]+%, [\d.]+ s\n){2}",
        lines.getvalue(),
    )
    terminal = _Terminal()
    await ft.fit(_model(), federated, rounds=1, progress=terminal)
    del federated
    assert terminal.getvalue().startswith("\rround   1/1 [....................] 0/1 workers")
    assert terminal.getvalue().endswith("s\n")
    png = history.plot(tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 5000
    assert "round  workers" in history.table()


# -- data the workers hold -------------------------------------------------------------------------


async def test_workers_serve_data_sets_they_hold(ft_encode: bool) -> None:
    x, y = _data(50)
    async with ft.VirtualWorker("bob", encode=ft_encode, datasets={"local": (x, y)}) as bob:
        federated = await ft.load_dataset([bob], "local")
        assert federated.sizes() == {"bob": 50}
        assert torch.equal(await federated.shards[0].data, x)
        x.add_(1)  # the worker's copy for this client is its own
        history = await ft.fit(_model(), federated, rounds=1, progress=False)
        assert history[0].completed == ("bob",)
        with pytest.raises(ft.RemoteError, match="holds no data set 'missing'"):
            await ft.load_dataset([bob], "missing")
        del federated


async def test_a_worker_process_loads_a_data_set_file(
    ft_worker_processes: StartWorker, tmp_path: Path
) -> None:
    x, y = _data(30)
    path = tmp_path / "mine.pt"
    torch.save({"data": x, "targets": y}, path)
    process = ft_worker_processes(
        "holder", "--dataset", f"mine={path}", "--threads", "1", "--log-level", "INFO"
    )
    assert "(torch threads: 1)" in process.log()
    async with ft.connect(process.url, token=process.token) as holder:
        federated = await ft.load_dataset([holder], "mine")
        assert torch.equal(await federated.shards[0].targets, y)
        history = await ft.fit(_model(), federated, rounds=1, progress=False)
        assert history[0].completed == ("holder",)
        del federated


def _worker_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedtensor", "worker", "--id", "x", *args],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "FEDTENSOR_TOKEN": "t"},
    )  # fmt: skip


def test_a_worker_refuses_to_start_with_an_unreadable_data_set(tmp_path: Path) -> None:
    bad = _worker_command("--dataset", f"m={tmp_path}/no")
    assert bad.returncode == 2
    assert "cannot load the data set 'm'" in bad.stderr
    junk = tmp_path / "junk.pt"
    torch.save([1, 2], junk)
    bad = _worker_command("--dataset", f"m={junk}")
    assert bad.returncode == 2
    assert "must hold a dict of tensors 'data' and 'targets'" in bad.stderr
    bad = _worker_command("--threads", "0")
    assert bad.returncode == 2
    assert "--threads must be at least 1" in bad.stderr


# -- the blocking facade and the demo --------------------------------------------------------------


def test_the_blocking_facade_trains_too() -> None:
    bob = sy.VirtualWorker(id="sync-bob")
    federated = ft.federate(_data(40), [bob], seed=0)
    model = _model()
    history = sy.fit(model, federated, rounds=2, progress=False)
    assert [m.completed for m in history] == [("sync-bob",)] * 2
    del federated
    assert dict(bob.objects) == {}


def _percent(pattern: str, text: str) -> float:
    """The percentage that ``pattern``'s group finds on a line of ``text``."""
    found = re.search(pattern, text, re.M)
    assert found is not None, text
    return float(found.group(1))


@pytest.mark.usefixtures("one_torch_thread")
def test_the_demo_prints_rounds_and_both_accuracies() -> None:
    from fedtensor.demo import main

    out = io.StringIO()
    assert main(["--rounds", "3", "--epochs", "1", "--virtual", "2"], out=out) == 0
    text = out.getvalue()
    assert "federated over 2 in-process virtual workers" in text
    assert re.search(r"^\s+3\s+2/2\s", text, re.M)
    # 86.6% and 96.1% here (chance is 10%): the model learnt, both ways.
    assert _percent(r"^federated: (\d+\.\d)% held-out accuracy after 3 rounds", text) >= 80.0
    assert _percent(r"^centralized: (\d+\.\d)% after the same 3 epochs", text) >= 90.0


def test_the_demo_trains_on_worker_processes(ft_worker_processes: StartWorker) -> None:
    first = ft_worker_processes("d1", "--threads", "1")
    token = first.token
    urls = [first.url, ft_worker_processes("d2", "--threads", "1", token=token).url]
    result = subprocess.run(
        [sys.executable, "-m", "fedtensor", "demo", "--workers", *urls, "--rounds", "2",
         "--no-central"],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "FEDTENSOR_TOKEN": token},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "federated over 2 worker processes" in result.stdout
    accuracy = _percent(r"^federated: (\d+\.\d)% held-out accuracy after 2 rounds", result.stdout)
    assert accuracy >= 85.0  # 94.2% here after 2 rounds of 2 local epochs (chance is 10%)


def test_the_federated_digits_example_runs() -> None:
    example = Path(__file__).parent.parent / "examples" / "federated_digits.py"
    result = subprocess.run(
        [sys.executable, str(example), "--rounds", "4"],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # as one_torch_thread does
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "<FederatedDataset 1437 examples; bob: 360, alice: 359" in result.stdout
    # 71.9% here after 4 rounds of one epoch on 4 workers (chance is 10%)
    assert _percent(r"^held-out accuracy: (\d+\.\d)%$", result.stdout) >= 60.0
    assert "round 4/4: 4/4 workers" in result.stderr  # progress lines, not on a terminal
