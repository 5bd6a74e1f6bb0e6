"""fedtensor: tensors that live on other workers, computed on as if they were local.

Async API (the primary one)::

    import torch, fedtensor as ft

    async with ft.VirtualWorker("bob") as bob:
        x = ft.send(torch.tensor([1, 2, 3]), bob)   # a PointerTensor, at once
        y = (x + 1).sum()                          # pipelined: no round trip
        print(await y.get())                       # tensor(9)

The blocking twin for scripts and notebooks is :mod:`fedtensor.sync`; user tests get
ready workers from the pytest plugin :mod:`fedtensor.testing`.
"""

from ._exceptions import (
    AuthenticationFailed,
    FedTensorError,
    ForbiddenOperation,
    LimitExceeded,
    LocationError,
    ObjectNotFound,
    PlanError,
    PointerReleased,
    ProtocolError,
    RemoteError,
    TimeoutError,
    TransportNotFound,
    WorkerUnavailable,
)
from ._federate import FederatedDataset, Shard, federate, load_dataset, split_indices
from ._fit import History, RoundMetrics, evaluate, fit
from ._ops import allowed_operations
from ._plan import Plan, trace
from ._pointer import MultiPointerTensor, PointerTensor
from ._registry import register_transport
from ._strategies import FedAdam, FedAvg, FedAvgM, FedProx, Strategy, Update
from ._workers import (
    LocalWorker,
    RemoteWorker,
    VirtualWorker,
    WorkerHandle,
    connect,
    local_worker,
    send,
)

__version__ = "0.1.0"

__all__ = [
    "AuthenticationFailed",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedProx",
    "FedTensorError",
    "FederatedDataset",
    "ForbiddenOperation",
    "History",
    "LimitExceeded",
    "LocalWorker",
    "LocationError",
    "MultiPointerTensor",
    "ObjectNotFound",
    "Plan",
    "PlanError",
    "PointerReleased",
    "PointerTensor",
    "ProtocolError",
    "RemoteError",
    "RemoteWorker",
    "RoundMetrics",
    "Shard",
    "Strategy",
    "TimeoutError",
    "TransportNotFound",
    "Update",
    "VirtualWorker",
    "WorkerHandle",
    "WorkerUnavailable",
    "allowed_operations",
    "connect",
    "evaluate",
    "federate",
    "fit",
    "load_dataset",
    "local_worker",
    "register_transport",
    "send",
    "split_indices",
    "trace",
]
