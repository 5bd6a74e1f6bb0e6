"""PySyft 0.2.9's tutorials Parts 9 and 10, encrypted programs and secure aggregation,
run as scripts (examples/pysyft/).

Each script is the notebook's code with ``import syft as sy`` changed to ``import
fedtensor.sync as sy`` (Part 10's data set download replaced by arrays of its shapes,
its training shortened; the header says what). Each runs in its own Python process, as
a user runs it, and the tests check what it prints: values, not that it ran.
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
