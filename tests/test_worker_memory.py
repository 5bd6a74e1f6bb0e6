"""A worker's memory: sizing a training command without torch's Python meta kernels
(fedtensor/worker/shape_rules.py), so a worker process never imports torch._dynamo and
sympy for it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedtensor.demo import DigitsCNN
from fedtensor.federated.trace import trace
from fedtensor.worker.compiler import compile_plan
from fedtensor.worker.optimizers import FunctionalOptimizer
from fedtensor.worker.shape_rules import RULES, shape_rules


def m(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


LONG = torch.int64
#: (operation, args, kwargs): each answered by a rule, compared with torch's meta kernel.
ANSWERED: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = [
    (torch.relu, (m(16, 32),), {}),
    (F.relu, (m(16, 32),), {"inplace": False}),
    (F.relu, (m(16, 32),), {"inplace": True}),
    (torch.Tensor.relu, (m(3, 5, 7, dtype=torch.float64),), {}),
    (torch.sigmoid, (m(4, 3),), {}),
    (torch.tanh, (m(4, 3, dtype=torch.bfloat16),), {}),
    (F.silu, (m(4, 3),), {}),
    (F.leaky_relu, (m(4, 3), 0.2), {}),
    (F.dropout, (m(8, 6), 0.5, True), {}),
    (F.dropout, (m(8, 6), 0.5, False), {}),
    (F.dropout, (m(8, 6), 0.0, True), {}),
    (F.dropout, (m(8, 6), 0.3, True, True), {}),
    (F.softmax, (m(8, 10), 1), {}),
    (F.log_softmax, (m(8, 10), -1), {}),
    (torch.Tensor.add, (m(16, 64), m(64)), {}),
    (torch.Tensor.add, (m(16, 1), m(1, 5)), {}),
    (torch.Tensor.mul, (m(4, 1, 3), m(2, 1)), {}),
    (torch.Tensor.mul, (m(4, 3), 2.0), {}),
    (torch.Tensor.sub, (m(4, 3), 2), {}),
    (torch.Tensor.div, (m(4, 3), m(3)), {}),
    (torch.Tensor.__rsub__, (m(4, 3), 1.0), {}),
    (torch.Tensor.__rdiv__, (m(4, 3), 2), {}),
    (torch.add, (m(2, 3), m(2, 3)), {}),
    (torch.mul, (m(), m(2, 3)), {}),
    (F.linear, (m(16, 64), m(32, 64), m(32)), {}),
    (F.linear, (m(16, 64), m(32, 64)), {}),
    (F.linear, (m(4, 5, 64), m(32, 64), m(32)), {}),
    (F.linear, (m(64), m(32, 64), m(32)), {}),
    (torch.conv2d, (m(16, 1, 8, 8), m(16, 1, 3, 3), m(16), (1, 1), (1, 1), (1, 1), 1), {}),
    (torch.conv2d, (m(2, 4, 9, 7), m(6, 2, 3, 2), None, 2, (0, 1), 1, 2), {}),
    (torch.conv2d, (m(2, 3, 10, 10), m(5, 3, 3, 3)), {"dilation": 2, "padding": 2}),
    (torch.conv2d, (m(2, 4, 9, 7), m(6, 4, 3, 3), m(6)), {}),  # 7 by 5
    (torch.conv1d, (m(2, 3, 10), m(5, 3, 4), m(5), 3), {}),
    (F.max_pool2d, (m(16, 32, 8, 8), 2), {}),
    (
        F.max_pool2d,
        (m(2, 3, 9, 7), 3),
        {"stride": 2, "padding": 1, "dilation": 1, "ceil_mode": True, "return_indices": False},
    ),
    (F.max_pool2d, (m(3, 11, 11), (3, 2)), {"stride": (2, 3), "ceil_mode": True}),
    (F.max_pool2d, (m(2, 3, 9, 9), 2), {"dilation": 2}),
    # ceil_mode's last window would start in the padding: torch drops it (3 by 4, not 4 by 4)
    (F.max_pool2d, (m(1, 1, 5, 6), 2), {"stride": 2, "padding": 1, "ceil_mode": True}),
    (F.avg_pool2d, (m(2, 3, 9, 7), 3), {"stride": 2, "padding": 1, "ceil_mode": True}),
    (F.avg_pool2d, (m(2, 3, 8, 8), 2), {}),
    (F.cross_entropy, (m(16, 10), m(16, dtype=LONG)), {}),
    (F.cross_entropy, (m(16, 10), m(16, dtype=LONG)), {"reduction": "none"}),
    (F.cross_entropy, (m(16, 10), m(16, dtype=LONG)), {"reduction": "sum"}),
    (F.cross_entropy, (m(4, 10, 5, 5), m(4, 5, 5, dtype=LONG)), {"reduction": "none"}),
    (F.cross_entropy, (m(10), m(dtype=LONG)), {}),
    (F.cross_entropy, (m(16, 10), m(16, 10)), {"label_smoothing": 0.1}),
    (F.cross_entropy, (m(16, 10), m(16, 10)), {"reduction": "none"}),
    (F.nll_loss, (m(16, 10), m(16, dtype=LONG)), {}),
    (F.nll_loss, (m(16, 10), m(16, dtype=LONG)), {"reduction": "none"}),
    (F.mse_loss, (m(16, 3), m(16, 3)), {}),
    (F.mse_loss, (m(16, 3), m(16, 3)), {"reduction": "none"}),
    (F.l1_loss, (m(16, 3), m(16, 3)), {"reduction": "sum"}),
]
#: Calls no rule models: handed to torch's kernel, which answers or refuses as before.
DEFERRED: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = [
    (torch.relu, (m(4, 6).t(),), {}),  # not contiguous
    (torch.relu, (m(4, 6, dtype=torch.int32),), {}),
    (torch.Tensor.add, (m(4, 3), m(4, 3, dtype=torch.float64)), {}),  # promotion
    (torch.Tensor.add, (m(4, 3), m(4, 3)), {"alpha": 2}),
    (torch.Tensor.mul, (m(4, 3), True), {}),
    (F.linear, (m(16, 64), m(32, 64), m(1)), {}),  # a broadcast bias
    (torch.conv2d, (m(1, 8, 8), m(16, 1, 3, 3)), {}),  # unbatched
    (torch.conv2d, (m(2, 1, 8, 8), m(4, 1, 3, 3)), {"padding": "same"}),
    (F.max_pool2d, (m(2, 3, 8, 8), 2), {"return_indices": True}),
    (F.softmax, (m(8, 10), 1), {"dtype": torch.float64}),
    (F.cross_entropy, (m(16, 10), m(16, dtype=LONG)), {"weight": m(10)}),
    (F.mse_loss, (m(16, 1), m(16)), {}),  # broadcast (torch warns)
]
#: Calls torch refuses: no rule answers them, so torch's kernel refuses them as before.
REFUSED: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = [
    (F.linear, (m(16, 63), m(32, 64)), {}),
    (torch.Tensor.add, (m(4, 3), m(5)), {}),
    (torch.conv2d, (m(2, 3, 8, 8), m(4, 2, 3, 3)), {}),
    (torch.conv2d, (m(2, 1, 2, 2), m(4, 1, 3, 3)), {}),
    (F.max_pool2d, (m(2, 3, 8, 8), 2), {"padding": 2}),
    (F.cross_entropy, (m(16, 10), m(15, dtype=LONG)), {}),
]


def _storage(tensor: torch.Tensor) -> int:
    return int(tensor.untyped_storage()._cdata)


def _call(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    with torch.no_grad():
        return func(*args, **kwargs)


def _name(case: tuple[Any, ...]) -> str:
    func = case[0]
    return str(getattr(func, "__qualname__", func))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", ANSWERED, ids=_name)
def test_each_rule_gives_what_torchs_meta_kernel_gives(case: Any) -> None:
    func, args, kwargs = case
    assert func in RULES
    expected = _call(func, args, kwargs)  # torch's own meta kernel
    inputs = {_storage(arg) for arg in args if isinstance(arg, torch.Tensor)}
    with shape_rules() as mode:
        got = _call(func, args, kwargs)
    assert (mode.answered, mode.deferred) == (1, [])
    assert got.is_meta
    assert (got.shape, got.dtype, got.stride()) == (
        expected.shape,
        expected.dtype,
        expected.stride(),
    )
    # The same storage as torch's: the input itself (allocating nothing), or a new one.
    assert (_storage(got) in inputs) == (_storage(expected) in inputs)
    assert got.untyped_storage().nbytes() == expected.untyped_storage().nbytes()


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", DEFERRED, ids=_name)
def test_calls_a_rule_does_not_model_go_to_torch(case: Any) -> None:
    func, args, kwargs = case
    expected = _call(func, args, kwargs)
    with shape_rules() as mode:
        got = _call(func, args, kwargs)
    assert mode.answered == 0
    assert len(mode.deferred) == 1  # max_pool2d's indices: torch's max_pool2d_with_indices
    pairs = zip(got, expected, strict=True) if isinstance(got, tuple) else [(got, expected)]
    for one, other in pairs:
        assert (one.shape, one.dtype, one.stride()) == (other.shape, other.dtype, other.stride())


@pytest.mark.parametrize("case", REFUSED, ids=_name)
def test_calls_torch_refuses_are_refused_under_the_rules_too(case: Any) -> None:
    func, args, kwargs = case
    with pytest.raises((RuntimeError, ValueError, IndexError)):
        _call(func, args, kwargs)
    with shape_rules() as mode, pytest.raises((RuntimeError, ValueError, IndexError)):
        _call(func, args, kwargs)
    assert mode.answered == 0


class _Mixed(nn.Module):
    """Most of what the rules cover, in one model: dropout, pools, softmax, arithmetic."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 10)
        self.scale = nn.Parameter(torch.ones(10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(torch.tanh(self.conv(x)), 2)
        x = F.dropout(F.leaky_relu(x.flatten(1)), 0.2, True)
        return F.log_softmax(self.fc(x) * self.scale + 1.0, 1)


def _plans() -> list[tuple[Any, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]]:
    from benchmarks.flower_side import MLP

    out = []
    for model, loss, x in (
        (MLP(), F.cross_entropy, torch.zeros(16, 64)),
        (DigitsCNN(), F.cross_entropy, torch.zeros(16, 1, 8, 8)),
        (_Mixed(), F.nll_loss, torch.zeros(16, 1, 8, 8)),
    ):
        y = torch.zeros(16, dtype=torch.long)
        plan = trace(model, loss, (x, y)).wire
        state = {key: value.detach() for key, value in model.state_dict().items()}
        out.append((plan, state, x, y))
    return out


def test_a_plans_dry_run_is_the_same_with_the_rules_and_answered_by_them() -> None:
    for plan, state, x, y in _plans():
        compiled = compile_plan(plan)
        meta_state = {key: value.to("meta") for key, value in state.items()}
        meta_x, meta_y = x.to("meta"), y.to("meta")
        expected = compiled.dry_run(meta_state, meta_x, meta_y, limit=1 << 40)
        with shape_rules() as mode:
            got = compiled.dry_run(meta_state, meta_x, meta_y, limit=1 << 40)
        assert got == expected
        assert mode.answered >= 4
        # What torch is left with: a view (flatten), which has a C++ meta kernel, and the
        # dry run's own look at each result's storage.
        assert torch.Tensor.flatten in mode.deferred
        assert set(mode.deferred) <= {torch.Tensor.flatten, torch.Tensor.untyped_storage}


SIZING = textwrap.dedent(
    """
    import json, sys
    import torch
    import torch.nn.functional as F
    from benchmarks.flower_side import MLP
    from fedtensor.demo import DigitsCNN
    from fedtensor.federated.trace import trace
    from fedtensor.worker.budget import Ledger, check_worker_operation
    from fedtensor.worker.local_updates import local_updates, warm_up

    cases = []
    for model, x in ((MLP(), torch.rand(40, 64)), (DigitsCNN(), torch.rand(40, 1, 8, 8))):
        y = torch.randint(0, 10, (40,))
        plan = trace(model, F.cross_entropy).wire  # no example: no meta run here
        state = {key: value.detach() for key, value in model.state_dict().items()}
        cases.append((plan, state, x, y))
    before = set(sys.modules)
    warm_up()
    refusals = []
    for plan, state, x, y in cases:
        args, options = (plan, state, x, y, [[0, 20, 1], [20, 40, 2]]), {"batch_size": 16}
        for quota in (1 << 30, 1 << 12):
            op = "fedtensor.local_updates"
            refusals.append(check_worker_operation(op, args, options, Ledger(quota), {}))
        for optimizer in ("sgd", "adam"):  # and the training itself
            momentum = 0.5 if optimizer == "sgd" else 0.0
            replies = local_updates(*args, optimizer=optimizer, momentum=momentum, **options)
            assert all("state" in reply for reply in replies), replies
    new = set(sys.modules) - before
    print(json.dumps({
        "dynamo": sorted(name for name in new if name.startswith("torch._dynamo"))[:3],
        "sympy": sorted(name for name in new if name.split(".")[0] in ("sympy", "mpmath"))[:3],
        "refused": [None if r is None else r.kind for r in refusals],
    }))
    """
)


def test_sizing_and_training_a_local_update_imports_neither_dynamo_nor_sympy() -> None:
    # In a fresh process, the warm-up and the sizing of the benchmark's and the demo's
    # plans (under a quota and past it) import neither (a torch whose functions or
    # kernels changed would make a rule defer to a Python meta kernel: this fails).
    done = subprocess.run(
        [sys.executable, "-c", SIZING],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=Path(__file__).resolve().parents[1],  # benchmarks/ importable
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["dynamo"] == []
    assert result["sympy"] == []
    assert result["refused"] == [None, "limit", None, "limit"]


def _train(make: Callable[[list[torch.Tensor]], torch.optim.Optimizer]) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(5, 4, generator=generator).requires_grad_()
    bias = torch.randn(5, generator=generator).requires_grad_()
    optimizer = make([weight, bias])
    for _ in range(6):
        loss = ((torch.randn(3, 4, generator=generator) @ weight.t() + bias) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    state = [
        value for entry in optimizer.state.values() for value in entry.values()
    ]  # momentum buffers; Adam's step, moments
    return [weight.detach(), bias.detach(), *state]


@pytest.mark.parametrize(
    ("kind", "options"),
    [
        ("sgd", {"lr": 0.1}),
        ("sgd", {"lr": 0.1, "momentum": 0.9}),
        ("sgd", {"lr": 0.05, "momentum": 0.5, "weight_decay": 0.01}),
        ("adam", {"lr": 0.01}),
        ("adam", {"lr": 0.01, "weight_decay": 0.1}),
    ],
)
def test_the_functional_optimizer_steps_bit_for_bit_as_torch_optim(
    kind: str, options: dict[str, float]
) -> None:
    ours = _train(lambda params: FunctionalOptimizer(kind, params, **options))
    torch_class = torch.optim.SGD if kind == "sgd" else torch.optim.Adam
    theirs = _train(lambda params: torch_class(params, **options))
    assert (
        len(ours)
        == len(theirs)
        == 2 + (2 * 3 if kind == "adam" else 2 * bool(options.get("momentum")))
    )
    for mine, torchs in zip(ours, theirs, strict=True):
        assert mine.dtype == torchs.dtype
        assert torch.equal(mine, torchs)


def test_the_local_update_trains_with_the_functional_optimizer() -> None:
    from fedtensor.worker import local_update as module

    chosen = module._optimizer("adam", [torch.zeros(2, requires_grad=True)], 0.1, 0.0, 0.0)
    assert isinstance(chosen, FunctionalOptimizer)
    assert chosen.kind == "adam"


def test_the_rules_apply_only_on_the_thread_that_sizes() -> None:
    # A worker's compute threads train other clients while one sizes a command: the
    # mode is torch's thread-local state, and a rule answers meta tensors only.
    entered, computed = threading.Event(), threading.Event()
    seen: dict[str, Any] = {}

    def sizing() -> None:
        with shape_rules() as mode:
            entered.set()
            assert computed.wait(30)
            seen["answered"] = mode.answered

    thread = threading.Thread(target=sizing)
    thread.start()
    assert entered.wait(30)
    seen["relu"] = torch.relu(torch.tensor([-1.0, 2.0]))  # real, on this thread
    computed.set()
    thread.join(30)
    assert not thread.is_alive()
    assert torch.equal(seen["relu"], torch.tensor([0.0, 2.0]))
    assert seen["answered"] == 0
    with shape_rules() as mode:
        real = torch.relu(torch.tensor([-3.0]))  # not meta: torch computes it
    assert torch.equal(real, torch.tensor([0.0]))
    assert mode.answered == 0
