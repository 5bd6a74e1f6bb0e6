"""PySyft 0.2's ``Optims``: one optimizer per worker, of the same kind and settings.

PySyft's tutorials keep one optimizer per worker when a model visits several workers in
turn (an optimizer's state, Adam's moments, belongs to the worker it was built on)::

    from fedtensor.sync.federated.floptimizer import Optims

    optims = Optims(["bob", "alice"], optim=optim.Adam(params=model.parameters(), lr=0.01))
    opt = optims.get_optim(data.location.id)   # the one for the worker the batch is on

Each is a plain ``torch.optim`` optimizer over the same parameters (a remote model's while
it is on a worker, see :mod:`fedtensor.client.modules`) with ``optim``'s class and
``defaults``, as PySyft made them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["Optims"]


class Optims:
    """One optimizer per worker id, each like ``optim`` (its class and its ``defaults``)."""

    def __init__(self, workers: Iterable[Any], optim: torch.optim.Optimizer) -> None:
        self.optim = optim
        # Worker ids, as PySyft's tutorials pass them; a worker handle stands for its id.
        self.workers = [getattr(worker, "id", worker) for worker in workers]
        params = optim.param_groups[0]["params"]
        self.optimizers: dict[Any, torch.optim.Optimizer] = {
            worker: type(optim)(params, **optim.defaults) for worker in self.workers
        }

    def get_optim(self, worker: Any) -> torch.optim.Optimizer:
        """The optimizer of ``worker`` (a worker id, or a worker handle)."""
        return self.optimizers[getattr(worker, "id", worker)]

    def count(self) -> int:
        """How many optimizers there are: one per worker."""
        return len(self.optimizers)
