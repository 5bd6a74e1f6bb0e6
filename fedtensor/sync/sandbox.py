"""PySyft 0.2's sandbox and grid search for :mod:`fedtensor.sync`.

Theory of operation
-------------------
``sy.create_sandbox(globals())`` is PySyft's notebook boilerplate (tutorials Parts 5
and 7): it hooks torch, makes six virtual workers (bob, theo, jason, alice, andy, jon),
deals the scikit-learn toy data sets out to them, each cut in order into six parts,
and puts ``hook``, the workers, ``workers`` and ``grid`` (a
:class:`PrivateGridNetwork` of them) into the given namespace.

Nothing is downloaded here, whatever ``download_data`` says: the data sets are small
seeded stand-ins with the shapes of scikit-learn's (Boston housing 506 x 13 with a
linear target plus noise, diabetes 442 x 10, breast cancer 569 x 30, digits
1797 x 64, iris 150 x 4, wine 178 x 13, Linnerud 20 x 3), tagged as PySyft tagged
them (``#boston``, ``#housing``, ``#boston_housing``, ``#diabetes``, and ``#data`` or
``#target``) and described as stand-ins. They are sent by this client, so
``worker.search`` finds them as the client's own objects; the sandbox keeps their
pointers so that they stay on the workers.

:class:`PrivateGridNetwork` searches every worker (one round trip each) and answers
as PySyft's did: a dict from worker id to the pointers found there, for the workers
where something was.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import torch

from fedtensor.client.handles import WorkerHandle, send

__all__ = ["SANDBOX_WORKERS", "PrivateGridNetwork", "create_sandbox", "sandbox_datasets"]

#: The workers the sandbox makes, in PySyft's order.
SANDBOX_WORKERS = ("bob", "theo", "jason", "alice", "andy", "jon")

# name: (examples, features, target columns or 0 for one label column, classes or 0
# for a regression target, PySyft's tags)
_SHAPES: dict[str, tuple[int, int, int, int, tuple[str, ...]]] = {
    "boston": (506, 13, 0, 0, ("#boston", "#housing", "#boston_housing")),
    "diabetes": (442, 10, 0, 0, ("#diabetes",)),
    "breast_cancer": (569, 30, 0, 2, ()),
    "digits": (1797, 64, 0, 10, ()),
    "iris": (150, 4, 0, 3, ()),
    "wine": (178, 13, 0, 3, ()),
    "linnerud": (20, 3, 3, 0, ()),
}


def sandbox_datasets(
    seed: int = 0,
) -> dict[str, tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]]:
    """The stand-in data sets: name -> (data, targets, tags), float tensors as PySyft's."""
    generator = torch.Generator().manual_seed(seed)
    made = {}
    for name, (count, features, columns, classes, tags) in _SHAPES.items():
        data = torch.randn(count, features, generator=generator)
        weights = torch.randn(features, max(columns, 1), generator=generator)
        signal = data @ weights + 0.1 * torch.randn(count, max(columns, 1), generator=generator)
        if classes:
            # Labels from the signal's quantiles: learnable, every class present.
            edges = torch.quantile(signal[:, 0], torch.linspace(0, 1, classes + 1)[1:-1])
            targets = torch.bucketize(signal[:, 0], edges).float()
        else:
            targets = signal if columns else signal[:, 0]
        made[name] = (data, targets, tags)
    return made


def create_sandbox(
    gbs: MutableMapping[str, Any], verbose: bool = True, download_data: bool = True
) -> None:
    """PySyft's ``sy.create_sandbox(globals())``: hook, six workers with data, a grid.

    ``download_data`` is accepted for PySyft's sake; nothing is ever downloaded (see
    the module's header for the stand-in data sets).
    """
    from fedtensor import sync  # the face this serves (a package's child may import it)

    torch_module = gbs.get("torch", gbs.get("th", torch))
    print("Setting up Sandbox...")
    if verbose:
        print("\t- Hooking PyTorch")
    hook = sync.TorchHook(torch_module)
    if verbose:
        print("\t- Creating Virtual Workers:")
    workers = []
    for name in SANDBOX_WORKERS:
        if verbose:
            print(f"\t\t- {name}")
        workers.append(sync.VirtualWorker(hook, id=name))
    if verbose:
        print("\tStoring hook and workers as global variables...")
    gbs["hook"] = hook
    for worker in workers:
        gbs[worker.id] = worker
    gbs["workers"] = list(workers)
    if verbose:
        print("\tLoading stand-in datasets (nothing is downloaded)...")
    for name, (data, targets, tags) in sandbox_datasets().items():
        description = f"{name}: a seeded stand-in with the shape of scikit-learn's data set"
        for tensor, part in ((data, "#data"), (targets, "#target")):
            _distribute(tensor, workers, (*tags, f"#{name}", part), description)
    if verbose:
        print("\tCollecting workers into a VirtualGrid...")
    gbs["grid"] = PrivateGridNetwork(*workers)
    print("Done!")


def _distribute(
    tensor: torch.Tensor, workers: list[Any], tags: tuple[str, ...], description: str
) -> None:
    # PySyft's cut: len // workers examples each, the rest to the last worker.
    size = len(tensor) // len(workers)
    for index, worker in enumerate(workers):
        stop = None if index == len(workers) - 1 else (index + 1) * size
        pointer = send(
            tensor[index * size : stop], worker, tags=list(tags), description=description
        )
        _keep(worker, pointer)


def _keep(worker: Any, pointer: Any) -> None:
    """Hold ``pointer`` as long as the worker handle lives (the data then stays there)."""
    held = getattr(worker, "_sandbox_pointers", None)
    if held is None:
        held = []
        setattr(worker, "_sandbox_pointers", held)  # noqa: B010 (not an attribute of the class)
    held.append(pointer)


class PrivateGridNetwork:
    """Workers searched together (PySyft's ``sy.PrivateGridNetwork``)."""

    def __init__(self, *workers: WorkerHandle) -> None:
        self.workers = list(workers)

    def search(self, *query: Any) -> dict[str, list[Any]]:
        """Worker id -> pointers to what matches every term there (workers with matches)."""
        results = {}
        for worker in self.workers:
            found = worker.search(*query)
            if found:
                results[worker.id] = found
        return results

    def __repr__(self) -> str:
        return f"<PrivateGridNetwork of {', '.join(worker.id for worker in self.workers)}>"
