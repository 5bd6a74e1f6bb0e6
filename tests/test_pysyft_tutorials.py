"""PySyft 0.2.9's tutorials Parts 1 to 10, run as scripts (examples/pysyft/).

Each script is the notebook's code with ``import syft as sy`` changed to ``import
fedtensor.sync as sy`` (downloads replaced by tensors of the same shapes, long training
loops shortened; each script's header says what). Each runs in its own Python process,
as a user runs it, and the tests check what it prints: values, not that it ran.
"""

from __future__ import annotations

import math
import os
import pathlib
import re
import subprocess
import sys

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples" / "pysyft"

#: Seconds one script may take (they take a few; the machine may be loaded).
SCRIPT_TIMEOUT = 50


def run_part(name: str) -> str:
    """Run ``examples/pysyft/<name>`` and return its output; fail on a non-zero exit."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore::UserWarning"}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT,
        env=env,
        check=False,
    )
    assert done.returncode == 0, f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def tensor_values(output: str, prefix: str = "") -> list[float]:
    """The numbers of lines ``<prefix>tensor(<number>)``, in order."""
    pattern = re.compile(rf"^{re.escape(prefix)}tensor\(([-0-9.e]+)\)$", re.M)
    return [float(value) for value in pattern.findall(output)]


def test_every_part_has_a_script() -> None:
    names = sorted(path.name for path in EXAMPLES.glob("part*.py"))
    assert [name[:6] for name in names] == [f"part{n:02d}" for n in range(1, 11)]
    for path in EXAMPLES.glob("part*.py"):
        source = path.read_text()
        assert not re.search(r"^\s*(import|from) syft\b", source, re.M)  # only the import...
        assert "import fedtensor.sync as sy" in source  # ...changed, to this


def test_part01_basic_tools() -> None:
    output = run_part("part01_basic_tools.py")
    lines = output.splitlines()
    assert "tensor([ 2,  4,  6,  8, 10])" in lines
    assert "location is bob: True" in lines
    assert "<LocalWorker id:me>" in lines
    assert "owner is me: True" in lines
    assert "x: tensor([1, 2, 3, 4, 5])" in lines
    assert "y: tensor([1, 1, 1, 1, 1])" in lines
    assert "z: tensor([ 2,  4,  6,  8, 10])" in lines
    assert "objects after get: 0" in lines
    assert "x + y: tensor([2, 3, 4, 5, 6])" in lines
    assert "torch.add: tensor([2, 3, 4, 5, 6])" in lines
    assert "grad: tensor([1., 1., 1., 1., 1.])" in lines
    assert re.search(r"^<SyncPointerTensor me:\d+ -> bob:\d+>$", output, re.M)


def test_part02_intro_to_federated_learning() -> None:
    losses = tensor_values(run_part("part02_intro_to_federated_learning.py"))
    assert len(losses) == 20 + 20  # the local loop, then 10 rounds over bob and alice
    local, federated = losses[:20], losses[20:]
    assert all(math.isfinite(loss) for loss in losses)
    assert local[-1] < local[0]
    assert local[-1] < 0.1
    # Adam over both workers: the last round's losses well below the first round's.
    assert sum(federated[-2:]) < 0.5 * sum(federated[:2])


def test_part03_advanced_remote_execution() -> None:
    output = run_part("part03_advanced_remote_execution.py")
    lines = output.splitlines()
    assert "x: tensor([1, 2, 3, 4])" in lines
    # Alice holds a pointer to bob's tensor, not the tensor; the pointer shows its chain.
    assert re.search(r"^<SyncPointerTensor me:\d+ -> alice:\d+ -> bob:\d+>$", output, re.M)
    bob_id = re.findall(r"^bob: \{(\d+): tensor\(\[1, 2, 3, 4\]\)\}$", output, re.M)
    assert len(bob_id) == 1
    assert re.search(
        rf"^alice: \{{\d+: \{{'pointer_to': 'bob', 'id_at_location': {bob_id[0]}\}}\}}$",
        output,
        re.M,
    )
    assert "y: tensor([ 2,  4,  6,  8, 10])" in lines
    # y = p2p2x + p2p2x ran on bob: two tensors there, two pointers to them on alice.
    after_add = lines[lines.index("y: tensor([ 2,  4,  6,  8, 10])") - 2 :][:2]
    assert after_add[0].count("tensor(") == 2
    assert after_add[1].startswith("alice: {")
    assert "tensor(" not in after_add[1]
    assert after_add[1].count("'pointer_to': 'bob'") == 2
    assert "p2p2x: tensor([1, 2, 3, 4, 5])" in lines
    assert lines[lines.index("p2p2x: tensor([1, 2, 3, 4, 5])") + 1 :][:2] == [
        "bob: {}",
        "alice: {}",
    ]
    assert lines[-3:-1] == ["  bob: {}", "alice: {" + lines[-2].split("{", 1)[1]]
    assert "tensor([1, 2, 3, 4, 5])" in lines[-2]
    assert re.fullmatch(r"<SyncPointerTensor me:\d+ -> alice:\d+>", lines[-1])


def test_part04_trusted_aggregator() -> None:
    output = run_part("part04_trusted_aggregator.py")
    rounds = re.findall(r"^Bob:tensor\(([-0-9.e]+)\) Alice:tensor\(([-0-9.e]+)\)$", output, re.M)
    assert len(rounds) == 10 + 10
    bob = [float(b) for b, _ in rounds]
    alice = [float(a) for _, a in rounds]
    assert bob[-1] < bob[0]
    assert alice[-1] < alice[0]
    # The averaged model, evaluated locally on all four examples at the end.
    final = tensor_values(output)
    assert len(final) == 1
    assert final[0] < 0.5
    predictions = [float(v) for v in re.findall(r"\[\s*([-0-9.e]+)\]", output.split("Alice:")[-1])]
    assert len(predictions) >= 4
    first, second, third, fourth = predictions[:4]
    assert max(first, second) < min(third, fourth)  # targets 0, 0, 1, 1


def test_part05_sandbox() -> None:
    output = run_part("part05_sandbox.py")
    lines = output.splitlines()
    assert lines[0] == "Setting up Sandbox..."
    assert "Done!" in lines
    names = re.findall(r"<VirtualWorker id:(\w+) ", lines[lines.index("Done!") + 1])
    assert names == ["bob", "theo", "jason", "alice", "andy", "jon"]
    # Seven data sets, data and target, on each worker.
    assert "bob holds 14 objects" in lines
    assert "The input datapoints to the hospital1 dataset." in lines
    radio = lines[lines.index("The input datapoints to the hospital1 dataset.") - 1]
    assert len(re.findall(r"-> bob:\d+>", radio)) == 2  # x and y are tagged #radio
    workers = ["bob", "theo", "jason", "alice", "andy", "jon"]
    assert lines[-3] == str({worker: 2 for worker in workers})  # data and target each
    # 506 examples cut in order: 84 each, the last worker the rest (PySyft's cut).
    shapes = {worker: (84, 13) for worker in workers} | {"jon": (86, 13)}
    assert lines[-2] == str(shapes)
    assert lines[-1] == str({worker: shape[:1] for worker, shape in shapes.items()})


def test_part06_mnist_cnn() -> None:
    output = run_part("part06_mnist_cnn.py")
    train = [float(v) for v in re.findall(r"^Train Epoch: \d .*Loss: ([0-9.]+)$", output, re.M)]
    tests = re.findall(r"Average loss: ([0-9.]+), Accuracy: (\d+)/200", output)
    assert len(train) == 2
    assert len(tests) == 2
    assert "[0/640 (0%)]" in output  # len(loader) x batch size: 10 batches of 64
    losses = [float(loss) for loss, _ in tests]
    accuracy = [int(correct) for _, correct in tests]
    # Learning, from the chance level (log 10 = 2.303, 20 of 200 right).
    assert losses[1] < losses[0] < math.log(10)
    assert accuracy[1] > 40


def test_part07_federated_dataset() -> None:
    output = run_part("part07_federated_dataset.py")
    assert "['bob', 'theo', 'jason', 'alice', 'andy', 'jon']" in output.splitlines()
    totals = [float(v) for v in re.findall(r"^Total loss ([0-9.]+)$", output, re.M)]
    assert len(totals) == 3
    assert totals[2] < totals[1] < totals[0]
    # ceil(506 / 32) = 16 batches by PySyft's count; 18 are run (3 per worker).
    assert re.findall(r"\[(\d+)/16 ", output) == ["0", "8", "16"] * 3


def test_part08_plans() -> None:
    output = run_part("part08_plans.py")
    lines = output.splitlines()
    assert lines[0] == "<Plan plan_double_abs (not built)>"
    assert [line for line in lines if line.startswith("is_built")] == [
        "is_built: False",
        "is_built: True",
        "is_built: True",
        "is_built: True",
    ]
    assert any("is not built" in line for line in lines)  # the RuntimeError, caught
    assert re.search(r"^<PointerPlan plan_double_abs me -> device_1:\d+>$", output, re.M)
    assert "double abs: tensor([2., 4.])" in lines  # |x11 + x11|, x11 = [-1, 2]
    # The second net, sent to both devices, equals the same net run locally.
    on_1 = next(line for line in reversed(lines) if line.startswith("net on device_1"))
    on_2 = next(line for line in lines if line.startswith("net on device_2"))
    local = next(line for line in lines if line.startswith("net locally"))
    values = re.findall(r"tensor\(\[([^\]]+)\]", on_2)[0]
    assert values == re.findall(r"tensor\(\[([^\]]+)\]", on_1)[0]
    assert values == re.findall(r"tensor\(\[([^\]]+)\]", local)[0]
    assert "abs plus state: tensor([2, 1])" in lines  # |[-1, 0]| + state [1]


def test_part09_intro_to_encrypted_programs() -> None:
    output = run_part("part09_intro_to_encrypted_programs.py")
    lines = output.splitlines()
    # Steps 1 and 2, plain Python over a prime: three shares decrypt, two do not.
    shares = [int(v) for v in re.fullmatch(r"\((-?\d+), (-?\d+), (-?\d+)\)", lines[0]).groups()]
    assert sum(shares) % 1234567891011 == 25
    assert "decrypt(a, b, c): 25" in lines
    assert "decrypt(a, b): 25" not in lines
    assert "decrypt(*add(x,y)): 30" in lines
    # Step 3 on fedtensor: shares over bob, alice and bill.
    assert "encrypted_x.get(): tensor([25])" in lines
    assert "bob._objects: {}" in lines  # get() freed the shares
    held = {
        name: int(re.search(rf"^{name}'s share: tensor\(\[(-?\d+)\]\)$", output, re.M).group(1))
        for name in ("Bob", "Alice", "Bill")
    }
    assert all(value != 25 for value in held.values())  # no worker holds the secret...
    total = sum(held.values())
    assert (total + 2**63) % 2**64 - 2**63 == 25  # ...their sum modulo 2^64 is the secret
    assert "sum of the shares: tensor([25])" in lines
    assert "x + y: tensor([30])" in lines
    assert "x - y: tensor([20])" in lines
    assert "x * y: tensor([125])" in lines
    assert "x.mm(y): tensor([[2, 4]," in lines
    assert "        [6, 8]])" in lines
    assert "x > y: tensor([1])" in lines
    assert "x <= y: tensor([0])" in lines
    assert "x == y: tensor([0])" in lines
    assert "x == y + 20: tensor([1])" in lines
    assert "x.max(): tensor(4)" in lines
    assert "max_values: tensor([4, 3])" in lines


def test_part10_federated_learning_with_secure_aggregation() -> None:
    output = run_part("part10_federated_learning_with_secure_aggregation.py")
    lines = output.splitlines()
    # Section 1: plain federated learning, 2 epochs of 8 batches (one logged each).
    train = [float(v) for v in re.findall(r"^Train Epoch: \d .*Loss: ([0-9.]+)$", output, re.M)]
    assert len(train) == 2
    assert "[0/8 (0%)]" in output
    assert train[1] < train[0]
    # Section 2: the encrypted average equals the plain average of the two models,
    # within the fixed-precision error (each parameter encoded to 0.0005, then halved).
    difference = re.search(r"^largest difference from the plain average: (\S+)$", output, re.M)
    assert difference is not None
    assert 0 <= float(difference.group(1)) <= 5e-4 + 1e-6
    tests = [float(v) for v in re.findall(r"^Test set: Average loss: ([0-9.]+)$", output, re.M)]
    assert len(tests) == 1 + 2  # after section 1, then after each encrypted epoch
    assert all(math.isfinite(loss) for loss in tests)
    assert tests[2] < tests[1]  # the securely aggregated model learns
    assert [line for line in lines if line.startswith("Epoch ")] == ["Epoch 1", "Epoch 2"]
    assert "models agree: True" in lines  # both hold the average after every round
    assert "objects left on james: 0" in lines  # the crypto provider keeps nothing
