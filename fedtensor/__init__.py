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

from fedtensor.client.handles import (
    LocalWorker,
    RemoteWorker,
    WorkerHandle,
    connect,
    local_worker,
    send,
)
from fedtensor.client.pointer import MultiPointerTensor, PointerTensor
from fedtensor.client.registry import register_transport
from fedtensor.errors import (
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
from fedtensor.federated.datasets import (
    FederatedDataset,
    Shard,
    federate,
    load_dataset,
    split_indices,
)
from fedtensor.federated.fit import evaluate, fit
from fedtensor.federated.progress import History, RoundMetrics
from fedtensor.federated.strategies import FedAdam, FedAvg, FedAvgM, FedProx, Strategy, Update
from fedtensor.federated.trace import Plan, trace
from fedtensor.protocol.ops import allowed_operations
from fedtensor.virtual import VirtualWorker

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
