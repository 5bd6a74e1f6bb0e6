"""The `fedtensor` command: bad worker configurations, and the help of each command.

A bad configuration must stop the worker before it serves anything, with status 2 and one
line that says what is wrong. Most cases run `fedtensor.cli.main` in this process (a
subprocess per case would import torch each time); test_websocket and test_training run
the real command for a few, and the `--help` test here does too.
"""

from __future__ import annotations

import logging
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fedtensor.cli import main


@pytest.fixture(autouse=True)
def _environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDTENSOR_TOKEN", "a-token")
    # main() configures logging for the process it runs in: not for the test session.
    monkeypatch.setattr(logging, "basicConfig", lambda **_: None)


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _mismatched_data_set(path: Path) -> str:
    torch.save({"data": torch.zeros(3, 2), "targets": torch.zeros(2)}, path)
    return str(path)


# name: (the arguments after `worker --id x --port 0`, given a temporary folder; the reason)
BAD: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    "empty token variable": (
        lambda _: ["--token-env", "EMPTY_TOKEN"],
        "no token: set EMPTY_TOKEN or pass --token-file (or --no-auth, on a network you trust)",
    ),
    "missing token file": (
        lambda tmp: ["--token-file", str(tmp / "missing")],
        "cannot read the token file: [Errno 2] No such file or directory",
    ),
    "empty token file": (
        lambda tmp: ["--token-file", _write(tmp / "token", "  \n")],
        "the token file {tmp}/token is empty",
    ),
    "certificate that is not one": (
        lambda tmp: ["--certfile", _write(tmp / "cert.pem", "not a certificate\n")],
        "cannot load the TLS certificate or key: ",
    ),
    "key without certificate": (
        lambda tmp: ["--keyfile", _write(tmp / "key.pem", "not a key\n")],
        "--keyfile needs --certfile",
    ),
    "data set without a name": (
        lambda tmp: ["--dataset", f"={tmp}/d.pt"],
        "--dataset takes NAME=FILE, not '={tmp}/d.pt'",
    ),
    "data set without a file": (lambda _: ["--dataset", "digits="], "--dataset takes NAME=FILE"),
    "data set without =": (lambda _: ["--dataset", "digits"], "--dataset takes NAME=FILE"),
    "data set of unequal lengths": (
        lambda tmp: ["--dataset", f"d={_mismatched_data_set(tmp / 'd.pt')}"],
        "{tmp}/d.pt: 3 examples but 2 labels",
    ),
    "CPUs that are not a list": (
        lambda _: ["--cpus", "first"],
        "--cpus takes CPU numbers and ranges such as 0,2,4-7, not 'first'",
    ),
    "CPUs in a reversed range": (lambda _: ["--cpus", "3-1"], "--cpus: '3-1' is not a range"),
    "CPUs this process may not use": (
        lambda _: ["--cpus", "0,4096"],
        "--cpus: CPU 4096 is not among those this process may run on",
    ),
    "tiny messages": (
        lambda _: ["--max-message-size", "32"],
        "--max-message-size must be at least 64 bytes",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_configuration_exits_2_with_a_one_line_reason(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    arguments, reason = BAD[name]
    monkeypatch.setenv("EMPTY_TOKEN", "")
    assert main(["worker", "--id", "x", "--port", "0", *arguments(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # never the ready line
    (line,) = err.splitlines()
    assert line.startswith("fedtensor worker: " + reason.format(tmp=tmp_path)), line


def test_no_token_at_all_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("FEDTENSOR_TOKEN")
    assert main(["worker", "--id", "x", "--port", "0"]) == 2
    assert capsys.readouterr().err == (
        "fedtensor worker: no token: set FEDTENSOR_TOKEN or pass --token-file "
        "(or --no-auth, on a network you trust)\n"
    )


def test_a_port_in_use_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["worker", "--id", "x", "--port", str(port)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    (line,) = err.splitlines()
    assert re.fullmatch(rf"fedtensor worker: cannot listen on 127\.0\.0\.1:{port}: .*in use", line)


def test_a_malformed_value_is_refused_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["worker", "--id", "x", "--memory-quota", "12X"])
    assert stopped.value.code == 2
    assert "argument --memory-quota: not a size: '12X'" in capsys.readouterr().err


def _options(help_text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", help_text))


def test_worker_help_lists_its_options_and_takes_no_token_on_the_command_line() -> None:
    # The real command, once: `python -m fedtensor` reaches the same parser as `fedtensor`.
    result = subprocess.run(
        [sys.executable, "-m", "fedtensor", "worker", "--help"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: fedtensor worker ")
    assert _options(result.stdout) == {
        "--help", "--id", "--host", "--port", "--token-env", "--token-file", "--no-auth",
        "--certfile", "--keyfile", "--memory-quota", "--max-message-size", "--max-frame-size",
        "--max-pending", "--session-ttl", "--dataset", "--threads", "--ping-interval",
        "--ping-timeout", "--log-level",
        # moving tensors between workers, tags for held data sets (test_move_search.py)
        "--dataset-tags", "--federation-key-env", "--advertise-url", "--capability-ttl",
        # ft.local_workers: no orphans when the parent dies (test_local_workers.py)
        "--stop-on-stdin-eof",
        # before authentication (test_preauth.py), fair service (test_fairness.py)
        "--handshake-timeout", "--max-unauthenticated", "--compute-threads",
        # slow workers for tests and benchmarks of asynchronous training (test_fedbuff.py)
        "--step-delay",
        # ft.local_workers: the first training's imports before ready, a core each and
        # no wake-up preemption (test_local_workers.py)
        "--warm-up", "--cpus", "--batch-scheduling",
    }  # fmt: skip
    assert "--token" not in _options(result.stdout)  # a token on the command line is visible


def test_demo_help_lists_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["demo", "--help"])
    assert stopped.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: fedtensor demo ")
    assert {
        "--workers", "--virtual", "--token-env", "--rounds", "--epochs", "--split",
        "--strategy", "--fraction", "--checkpoint", "--resume", "--plot", "--no-central",
    } <= _options(text)  # fmt: skip
    assert "{fedadam,fedavg,fedavgm,fedprox}" in text


def test_the_command_lists_its_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["--help"])
    assert stopped.value.code == 0
    assert re.search(r"\{demo,worker\}", capsys.readouterr().out)
