"""Plans: the client's tracer (:mod:`fedtensor.federated.trace`), the worker's compiler
(:mod:`fedtensor.worker.compiler`), and the plan as data between them
(:mod:`fedtensor.protocol.plan`).

The tracer's tests trace small models and read the plan's wire nodes; the compiler's
build wire plans by hand, as a hostile client could, and check what the worker refuses
and with which of fedtensor's error types.
"""

from __future__ import annotations

import ast
import pathlib
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fedtensor as ft
from fedtensor.federated.trace import Plan, trace
from fedtensor.protocol import plan as wire_plan
from fedtensor.protocol.codec import decode_value, encode_value
from fedtensor.protocol.messages import Ref
from fedtensor.worker.compiler import CompiledPlan, compile_plan, state_entries

ROOT = pathlib.Path(__file__).resolve().parent.parent


class Block(nn.Module):
    """A user-defined module with everything that has state: a batch norm (running
    statistics, a counter), dropout, a registered buffer and a frozen parameter."""

    def __init__(self, dropout: float = 0.25) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(dropout)
        self.register_buffer("scale", torch.tensor(0.5))
        self.frozen = nn.Parameter(torch.linspace(-1, 1, 4), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop(F.relu(self.norm(self.conv(x))))
        return y * self.scale + self.frozen.view(1, 4, 1, 1)  # type: ignore[no-any-return]


class Net(nn.Module):
    """Modules inside modules: a user module and a built-in container."""

    def __init__(self, dropout: float = 0.25) -> None:
        super().__init__()
        self.block = Block(dropout)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 8 * 8, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x))  # type: ignore[no-any-return]


def _model(kind: Callable[[], nn.Module] = Net, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return kind()


def _batch(count: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(count, 1, 8, 8, generator=generator)
    return x, torch.randint(0, 10, (count,), generator=generator)


def _nodes(plan: Plan, kind: str) -> list[Any]:
    """The targets of the plan's nodes of one kind (operation names, state keys)."""
    return [node[1] for node in plan.wire["nodes"] if node[0] == kind]


def _of(forward: Callable[[torch.Tensor], Any]) -> nn.Module:
    """A module whose forward is ``forward``."""

    class Module(nn.Module):
        def forward(self, x: torch.Tensor) -> Any:
            return forward(x)

    return Module()


VECTORS = (torch.ones(2, 3), torch.ones(2, 3))


# -- the tracer ----------------------------------------------------------------------------------


def test_state_is_named_by_state_dict_keys_and_only_trainable_parameters_train() -> None:
    model = _model()
    plan = trace(model, nn.CrossEntropyLoss())
    keys = set(model.state_dict())
    # Buffers (the running statistics, their counter, "scale") and the frozen parameter
    # travel as state like the parameters; nothing is read under another name.
    assert set(_nodes(plan, "state")) == keys
    assert set(plan.trainable) == {
        name for name, parameter in model.named_parameters() if parameter.requires_grad
    }
    assert "block.frozen" not in plan.trainable
    assert "block.norm.running_mean" not in plan.trainable
    calls = _nodes(plan, "call")
    assert "torch.nn.functional.batch_norm" in calls
    assert "torch.nn.functional.dropout" in calls
    assert "Tensor.add_" in calls  # the batch norm counts its batches in its state
    assert plan.operations == len(calls)
    assert not _nodes(plan, "value")  # every tensor of the model is state


def test_tracing_inlines_every_module_and_leaves_the_model_as_it_was() -> None:
    model = _model()
    model.eval()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    plan = trace(model, nn.CrossEntropyLoss())
    kinds = {node[0] for node in plan.wire["nodes"]}
    assert kinds == {"input", "state", "call", "output"}  # no module survives as a node
    calls = _nodes(plan, "call")
    # nn.Conv2d, nn.Linear and nn.CrossEntropyLoss become the functions they call
    assert {"torch.conv2d", "torch.nn.functional.linear"} <= set(calls)
    assert calls[-1] == "torch.nn.functional.cross_entropy"
    assert not model.training  # traced in training mode, and put back
    after = model.state_dict()
    assert all(torch.equal(after[key], before[key]) for key in before)  # nothing ran


class ShapeBranch(nn.Module):
    """Flattens images but not vectors: an `if` on the input's rank."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1) if x.dim() == 4 else x.abs()
        return self.linear(x)  # type: ignore[no-any-return]


def test_an_if_on_a_shape_is_settled_at_trace_time_given_an_example() -> None:
    model = _model(ShapeBranch)
    with pytest.raises(ft.PlanError, match="control flow"):
        trace(model, F.cross_entropy)  # without an example, the rank is unknown
    plan = trace(model, F.cross_entropy, _batch(1))
    calls = _nodes(plan, "call")
    assert "Tensor.flatten" in calls  # the branch taken for images
    assert "Tensor.abs" not in calls  # the other branch is not in the plan
    x, y = _batch(5)  # a batch size the tracer never saw
    state = {key: value.clone() for key, value in model.state_dict().items()}
    loss, output = compile_plan(plan.wire).run(state, x, y)
    assert torch.allclose(output, model(x), atol=1e-6)
    assert torch.allclose(loss, F.cross_entropy(model(x), y), atol=1e-6)


@pytest.mark.parametrize(
    "forward",
    [
        lambda x: x if x.sum() > 0 else -x,  # an `if` on a tensor's values
        lambda x: x * float(x.sum()),  # a Python number made of a tensor's values
        lambda x: x * int(x.max()),
        lambda x: [x, -x][x.argmax()],  # a list index taken from a tensor
        lambda x: x if x.size(0) > 2 else -x,  # differs between batch sizes
    ],
    ids=["if-on-values", "float", "int", "index", "if-on-batch-size"],
)
def test_control_flow_on_tensor_values_raises_a_plan_error(
    forward: Callable[[torch.Tensor], torch.Tensor],
) -> None:
    for example in (None, VECTORS):
        with pytest.raises(ft.PlanError, match="cannot trace"):
            trace(_of(forward), F.mse_loss, example)


@pytest.mark.parametrize(
    ("forward", "named"),
    [
        (lambda x: x * x.grad, "'grad'"),  # an attribute a plan may not read
        (lambda x: x + x.new_empty(3), "new_empty"),  # uninitialised memory
        (lambda x: x.as_strided((2,), (1,)), "as_strided"),  # raw memory layout
        (lambda x: x.data_ptr() + x, "data_ptr"),
    ],
    ids=["grad", "new_empty", "as_strided", "data_ptr"],
)
def test_a_model_calling_a_forbidden_operation_is_refused_while_tracing(
    forward: Callable[[torch.Tensor], torch.Tensor], named: str
) -> None:
    with pytest.raises(ft.ForbiddenOperation, match=named):
        trace(_of(forward), F.mse_loss)


def test_a_constant_that_cannot_travel_is_refused() -> None:
    model = _of(lambda x: x.to(memory_format=torch.contiguous_format))
    with pytest.raises(ft.PlanError, match="memory_format constant cannot travel"):
        trace(model, F.mse_loss)


def _wire_types(value: Any) -> set[type]:
    """Every type a wire value is built of, containers included."""
    found: set[type] = {type(value)}
    if isinstance(value, (list, tuple)):
        for item in value:
            found |= _wire_types(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            found |= _wire_types(key) | _wire_types(item)
    return found


def test_a_plan_is_plain_data_that_survives_the_codec() -> None:
    model = _model(lambda: Net(dropout=0.0))
    plan = trace(model, F.cross_entropy, _batch(1))
    assert _wire_types(plan.wire) <= {
        dict, list, tuple, str, int, float, bool, type(None), Ref, slice, torch.dtype,
    }  # fmt: skip
    decoded = decode_value(encode_value(plan.wire))
    x, y = _batch()
    state = model.state_dict()
    loss, output = compile_plan(decoded).run(
        {key: value.clone() for key, value in state.items()}, x, y
    )
    expected_loss, expected = compile_plan(plan.wire).run(
        {key: value.clone() for key, value in state.items()}, x, y
    )
    assert torch.equal(output, expected)
    assert torch.equal(loss, expected_loss)


# -- the compiler ----------------------------------------------------------------------------------


def test_a_compiled_plan_gives_the_eager_loss_gradients_and_statistics() -> None:
    model = _model(lambda: Net(dropout=0.0))
    compiled = compile_plan(trace(model, nn.CrossEntropyLoss()).wire)
    assert isinstance(compiled, CompiledPlan)
    x, y = _batch(8)
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    trainable = [state[key].requires_grad_(True) for key in compiled.trainable]
    loss, output = compiled.run(state, x, y)
    loss.backward()

    model.train()
    expected_output = model(x)
    expected_loss = F.cross_entropy(expected_output, y)
    torch.autograd.backward(expected_loss)
    parameters = dict(model.named_parameters())

    assert torch.allclose(output, expected_output, atol=1e-6, rtol=0)
    assert abs(loss.item() - expected_loss.item()) <= 1e-6
    for key, tensor in zip(compiled.trainable, trainable, strict=True):
        expected_grad = parameters[key].grad
        assert tensor.grad is not None, key
        assert expected_grad is not None, key
        assert torch.allclose(tensor.grad, expected_grad, atol=1e-6, rtol=0), key
    # the batch norm's running statistics moved in the plan's state as in the module
    for key in ("block.norm.running_mean", "block.norm.running_var"):
        assert torch.allclose(state[key], model.state_dict()[key], atol=1e-6, rtol=0), key
    assert int(state["block.norm.num_batches_tracked"]) == 1


def _plan(*calls: list[Any], trainable: tuple[str, ...] = ()) -> dict[str, Any]:
    """A wire plan: inputs 0 and 1, state "w" (node 2), then ``calls`` from node 3 on,
    whose last value is the output."""
    nodes: list[list[Any]] = [["input", 0, (), {}], ["input", 1, (), {}], ["state", "w", (), {}]]
    nodes += calls
    nodes.append(["output", None, ((Ref(len(nodes) - 1), Ref(0)),), {}])
    return {"format": wire_plan.FORMAT, "nodes": nodes, "trainable": list(trainable)}


def test_a_hand_written_plan_compiles_and_runs() -> None:
    compiled = compile_plan(
        _plan(
            ["call", "torch.mul", (Ref(0), Ref(2)), {}],
            ["call", "Tensor.sum", (Ref(3),), {"dim": 0}],
            trainable=("w",),
        )
    )
    assert compiled.state_keys == frozenset({"w"})
    assert compiled.trainable == ("w",)
    total, _ = compiled.run({"w": torch.tensor([2.0, 3.0])}, torch.ones(4, 2), None)
    assert torch.equal(total, torch.tensor([8.0, 12.0]))


def _with_nodes(*nodes: Any) -> dict[str, Any]:
    return {"format": wire_plan.FORMAT, "nodes": list(nodes), "trainable": []}


OUTPUT: list[Any] = ["output", None, (Ref(0),), {}]

MALFORMED = [
    pytest.param(_plan(["call", "torch.neg", (Ref(3),), {}]), ft.PlanError, "not before",
                 id="a ref to itself"),
    pytest.param(_plan(["call", "torch.neg", (Ref(4),), {}]), ft.PlanError, "not before",
                 id="a ref to a later node"),
    pytest.param(_plan(["call", "torch.add", (Ref(0),), {"other": [Ref(9)]}]), ft.PlanError,
                 "refers to node 9", id="a ref nested in kwargs"),
    pytest.param(_plan(["call", "torch.neg", (Ref(-1),), {}]), ft.PlanError, "not before",
                 id="a negative ref"),
    pytest.param(_plan(["call", "os.system", ("true",), {}]), ft.ForbiddenOperation,
                 "os.system", id="an unknown operation"),
    pytest.param(_plan(["call", "Tensor.set_", (Ref(0),), {}]), ft.ForbiddenOperation, "set_",
                 id="a denied operation"),
    pytest.param(_plan(["call", 7, (Ref(0),), {}]), ft.ForbiddenOperation, "7",
                 id="an operation that is no string"),
    pytest.param(_plan(["call", "getattr", (Ref(0), "__dict__"), {}]), ft.ForbiddenOperation,
                 "__dict__", id="a private attribute"),
    pytest.param(_plan(["call", "getattr", (Ref(0), "grad"), {}]), ft.ForbiddenOperation,
                 "grad", id="the grad attribute"),
    pytest.param({**_plan(), "format": 2}, ft.PlanError, "format 1", id="another format"),
    pytest.param([["input", 0, (), {}]], ft.PlanError, "format", id="not a dict"),
    pytest.param({**_plan(), "nodes": "nope"}, ft.PlanError, "list of nodes",
                 id="nodes that are no list"),
    pytest.param(_with_nodes(["input", 0, ()], OUTPUT), ft.PlanError, "node 0 is not",
                 id="a node of 3 items"),
    pytest.param(_with_nodes(["input", 0, (), []], OUTPUT), ft.PlanError, "kwargs a dict",
                 id="kwargs that are no dict"),
    pytest.param(_with_nodes(["input", 2, (), {}], OUTPUT), ft.PlanError, "inputs 0 and 1",
                 id="a third input"),
    pytest.param(_with_nodes(["state", 3, (), {}], OUTPUT), ft.PlanError, "state key",
                 id="a state key that is no string"),
    pytest.param(_with_nodes(["value", None, (3,), {}], OUTPUT), ft.PlanError, "one tensor",
                 id="a value that is no tensor"),
    pytest.param(_with_nodes(["module", "fc", (), {}], OUTPUT), ft.PlanError, "unknown kind",
                 id="an unknown kind"),
    pytest.param(_with_nodes(["input", 0, (), {}]), ft.PlanError, "ends with an output",
                 id="no output"),
    pytest.param(_with_nodes(["input", 0, (), {}], OUTPUT, ["input", 1, (), {}]), ft.PlanError,
                 "must be the last", id="a node after the output"),
    pytest.param(_plan(trainable=("v",)), ft.PlanError, "trainable key",
                 id="a trainable key no node reads"),
]  # fmt: skip


@pytest.mark.parametrize(("wire", "error", "says"), MALFORMED)
def test_compile_refuses_a_malformed_plan_with_the_right_error(
    wire: Any, error: type[Exception], says: str
) -> None:
    with pytest.raises(error, match=says) as caught:
        compile_plan(wire)
    assert type(caught.value) is error  # a PlanError is not a ForbiddenOperation, nor back


def test_compile_refuses_a_plan_of_more_nodes_than_the_limit() -> None:
    node = ["input", 0, (), {}]
    at_limit = _with_nodes(*[node] * (wire_plan.MAX_NODES - 1), OUTPUT)
    assert len(compile_plan(at_limit)._steps) == wire_plan.MAX_NODES - 1
    over = _with_nodes(*[node] * wire_plan.MAX_NODES, OUTPUT)
    with pytest.raises(ft.PlanError, match="over the limit of 100000"):
        compile_plan(over)


def _run_operator(operation: str, left: Any, right: Any) -> Any:
    compiled = compile_plan(_plan(["call", operation, (left, right), {}]))
    result, _ = compiled.run({"w": torch.ones(1)}, torch.ones(1), torch.ones(1))
    return result


BITS = wire_plan.MAX_INT_BITS
ITEMS = wire_plan.MAX_SEQUENCE


@pytest.mark.parametrize(
    ("operation", "left", "right", "expected"),
    [
        ("operator.add", (1 << (BITS - 1)), 0, 1 << (BITS - 1)),  # an operand of BITS bits
        ("operator.pow", 2, 64, 1 << 64),
        ("operator.mul", [0], ITEMS, [0] * ITEMS),
        ("operator.add", (1,) * (ITEMS - 1), (2,), (1,) * (ITEMS - 1) + (2,)),
    ],
    ids=["int-of-max-bits", "pow-64", "list-of-max-items", "tuple-of-max-items"],
)
def test_plan_arithmetic_up_to_the_limits_runs(
    operation: str, left: Any, right: Any, expected: Any
) -> None:
    assert _run_operator(operation, left, right) == expected


@pytest.mark.parametrize(
    ("operation", "left", "right", "says"),
    [
        ("operator.floordiv", 1 << BITS, 1 << BITS, f"{BITS} bits"),  # operands of BITS + 1
        ("operator.add", 1 << (BITS - 1), 1 << (BITS - 1), f"{BITS} bits"),  # the result's
        ("operator.mul", 1 << 3000, 1 << 3000, f"{BITS} bits"),
        ("operator.pow", 2, 65, "powers from 0 to 64"),
        ("operator.pow", 2, -1, "powers from 0 to 64"),
        ("operator.mul", [0], ITEMS + 1, f"{ITEMS} items"),
        ("operator.add", (1,) * ITEMS, (2,), f"{ITEMS} items"),  # the result's length
        ("operator.mul", "ab", 3, "not strings"),
    ],
    ids=[
        "operand-bits", "sum-bits", "product-bits", "pow-65", "pow-negative",
        "list-repeat", "tuple-concat", "string",
    ],
)  # fmt: skip
def test_plan_arithmetic_past_the_limits_raises_a_plan_error(
    operation: str, left: Any, right: Any, says: str
) -> None:
    with pytest.raises(ft.PlanError, match=says):
        _run_operator(operation, left, right)


class Counted(list[int]):
    """A list that counts how often it is repeated with ``*`` (and, should a broken check
    let a huge repetition through, makes two copies at most)."""

    repeated = 0

    def __mul__(self, count: Any) -> Any:
        Counted.repeated += 1
        return list(self) * min(count, 2)


def test_a_sequence_is_not_repeated_past_the_limit_before_it_is_refused() -> None:
    # Refusing only the result would first build it: a billion items here.
    Counted.repeated = 0
    with pytest.raises(ft.PlanError, match=f"{ITEMS} items"):
        _run_operator("operator.mul", Counted([0]), 10**9)
    assert Counted.repeated == 0
    assert _run_operator("operator.mul", Counted([0]), 2) == [0, 0]
    assert Counted.repeated == 1


# -- the state a plan reads ------------------------------------------------------------------------


def test_state_entries_checks_the_state_against_what_the_plan_reads() -> None:
    compiled = compile_plan(_plan(["call", "torch.mul", (Ref(0), Ref(2)), {}]))
    state = {"w": torch.ones(2), "unused": torch.zeros(1)}  # more entries than read: fine
    assert state_entries(compiled, state) is state
    with pytest.raises(ft.PlanError, match=r"lacks \['w'\]"):
        state_entries(compiled, {"v": torch.ones(2)})
    with pytest.raises(ft.PlanError, match="dict of tensors"):
        state_entries(compiled, {"w": [1.0, 2.0]})  # a list where a tensor belongs
    with pytest.raises(ft.PlanError, match="dict of tensors"):
        state_entries(compiled, [("w", torch.ones(2))])


# -- the layers ------------------------------------------------------------------------------------


def _imports_of(path: pathlib.Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_only_the_tracer_imports_torch_fx() -> None:
    """The worker compiles plans and the client sends them without torch.fx (``import
    torch`` loads it anyway, so this reads the sources rather than ``sys.modules``)."""
    sources = [
        *ROOT.joinpath("fedtensor").rglob("*.py"),
        *ROOT.joinpath("transports").rglob("*.py"),
    ]
    users = sorted(
        str(path.relative_to(ROOT))
        for path in sources
        if any(name == "torch.fx" or name.startswith("torch.fx.") for name in _imports_of(path))
    )
    assert users == ["fedtensor/federated/trace.py"]
