"""The wheel installs `transports/` as `fedtensor.transports`, and no top-level `transports`."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import sysconfig
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

CHECK = textwrap.dedent(
    """
    import importlib.metadata, importlib.util, pathlib, sys
    import fedtensor.transports.memory as memory
    import fedtensor
    site = pathlib.Path(sys.argv[1]).resolve()
    assert pathlib.Path(memory.__file__).resolve().is_relative_to(site), memory.__file__
    assert pathlib.Path(fedtensor.__file__).resolve().is_relative_to(site), fedtensor.__file__
    assert importlib.util.find_spec("transports") is None, "a top-level transports leaked"
    assert (pathlib.Path(fedtensor.__file__).parent / "py.typed").exists()
    transports = importlib.metadata.entry_points(group="fedtensor.transports")
    assert [ep.value for ep in transports if ep.name == "memory"] == [
        "fedtensor.transports.memory:MemoryTransport"
    ]
    from fedtensor.client.registry import transport_for
    assert type(transport_for("memory://x")).__name__ == "MemoryTransport"
    plugins = importlib.metadata.entry_points(group="pytest11")
    assert "fedtensor.testing" in [ep.value for ep in plugins]
    print("wheel ok")
    """
)


@pytest.mark.timeout(300)
def test_wheel_installs_transports_as_a_subpackage(tmp_path: pathlib.Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "-q", "-w", str(wheels), str(ROOT)],
        check=True, cwd=tmp_path,
    )  # fmt: skip
    (wheel,) = wheels.glob("fedtensor-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = pathlib.Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
    )  # fmt: skip
    # Dependencies (torch, cbor2, anyio) come from this environment; fedtensor only
    # from the wheel: this environment's fedtensor is an editable install of ROOT.
    deps = sysconfig.get_path("purelib")
    (site / "deps.pth").write_text(deps + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
         "-q", "--target", str(site), str(wheel)],
        check=True, cwd=tmp_path,
    )  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [str(python), "-I", "-c", CHECK, str(site)],
        check=False, capture_output=True, text=True, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "wheel ok" in result.stdout
