"""The package's layers: imports go only downward, and nothing imports in a circle.

The layers, lowest first (the README's Design section draws them):

0. ``errors``
1. ``protocol/``: messages, codec, allow-list names, plans as data, buffers, framing (sans I/O)
2. ``abc`` (the transport interface) and ``net/`` (the websocket connection on asyncio)
3. ``worker/`` and ``client/``: side by side, neither imports the other
4. ``transports/`` (installed as ``fedtensor.transports``)
5. ``federated/``, ``virtual`` (a worker actor and its handle in one process), ``local``
   (worker processes on this machine) and ``ray`` (workers as Ray actors)
6. the faces: ``fedtensor`` itself, ``sync``, ``testing``, ``cli``, ``demo``, ``__main__``

A module may import from a lower layer, or from its own folder. Imports under
``if TYPE_CHECKING:`` are for annotations only and are not counted.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCES = {"fedtensor": ROOT / "fedtensor", "fedtensor.transports": ROOT / "transports"}

RANKS = {
    "fedtensor.errors": 0,
    "fedtensor.protocol": 1,
    "fedtensor.abc": 2,
    "fedtensor.net": 2,
    "fedtensor.worker": 3,
    "fedtensor.client": 3,
    "fedtensor.transports": 4,
    "fedtensor.federated": 5,
    "fedtensor.virtual": 5,
    "fedtensor.local": 5,
    "fedtensor.sync": 6,
    "fedtensor.testing": 6,
    "fedtensor.cli": 6,
    "fedtensor.demo": 6,
    "fedtensor.ray": 6,
    "fedtensor.__main__": 6,
    "fedtensor": 6,
}


def modules() -> dict[str, tuple[pathlib.Path, bool]]:
    found = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            found[".".join([package, *parts])] = (path, path.name == "__init__.py")
    return found


MODULES = modules()


def layer_of(module: str) -> str:
    """The entry of RANKS a module belongs to: the longest matching prefix."""
    best = max((key for key in RANKS if module == key or module.startswith(key + ".")), key=len)
    return best


def runtime_imports(module: str, path: pathlib.Path, is_package: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    annotation_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            annotation_only.update(id(inner) for stmt in node.body for inner in ast.walk(stmt))
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in annotation_only:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # `from package import module` imports the module; `from module import name`
            # imports the module itself.
            names = [prefix, *(f"{prefix}.{alias.name}" for alias in node.names)]
        else:
            continue
        for name in names:
            # the innermost fedtensor module the name denotes
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    # a package importing its own children, or a child its package, is not a dependency
    return {
        name
        for name in found
        if not name.startswith(module + ".") and not module.startswith(name + ".")
    }


GRAPH = {name: runtime_imports(name, *where) for name, where in MODULES.items()}


def test_every_module_has_a_layer() -> None:
    assert all(layer_of(name) for name in MODULES)
    assert {"fedtensor.protocol.codec", "fedtensor.worker.actor", "fedtensor.client.engine"} <= (
        MODULES.keys()
    )


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_only_go_down(module: str) -> None:
    mine = layer_of(module)
    upward = [
        name
        for name in sorted(GRAPH[module])
        if layer_of(name) != mine and RANKS[layer_of(name)] >= RANKS[mine]
    ]
    # the faces (layer 6) may use one another, e.g. the CLI runs the demo
    if RANKS[mine] == 6:
        upward = [name for name in upward if RANKS[layer_of(name)] > 6 or name == "fedtensor"]
    assert upward == [], f"{module} (layer {mine}) imports upward or sideways: {upward}"


def test_the_client_never_imports_worker_code() -> None:
    client = [name for name in MODULES if layer_of(name) == "fedtensor.client"]
    reached: set[str] = set()
    todo = list(client)
    while todo:
        name = todo.pop()
        for dep in GRAPH[name] - reached:
            reached.add(dep)
            todo.append(dep)
    assert not [name for name in reached if layer_of(name) == "fedtensor.worker"]


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle in ``graph`` (as the list of its modules), or None."""
    colour: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if colour.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if dep not in colour and (circle := visit(dep)):
                return circle
        stack.pop()
        colour[node] = 2
        return None

    for node in sorted(graph):
        if node not in colour and (circle := visit(node)):
            return circle
    return None


def test_no_import_circle() -> None:
    assert find_circle(GRAPH) is None


def test_the_circle_finder_finds_circles() -> None:
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set()}) is None


def test_an_upward_import_is_caught(tmp_path: pathlib.Path) -> None:
    # the walker reads relative, absolute and from-package imports alike
    source = tmp_path / "m.py"
    source.write_text(
        "from fedtensor.client import engine\nfrom ..worker.actor import WorkerActor\n"
        "if TYPE_CHECKING:\n    from fedtensor import sync\n"
    )
    found = runtime_imports("fedtensor.protocol.m", source, False)
    assert found == {"fedtensor.client", "fedtensor.client.engine", "fedtensor.worker.actor"}
