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

# ft.ray.workers (Ray itself is imported only when they start)
from fedtensor import ray as ray
from fedtensor.client.handles import (
    LocalWorker,
    RemoteWorker,
    WorkerHandle,
    connect,
    local_worker,
    send,
)
from fedtensor.client.modules import copy_model, get_model, move_model
from fedtensor.client.pointer import MultiPointerTensor, PointerTensor
from fedtensor.client.registry import register_transport
from fedtensor.client.sharing import (
    AdditiveSharingTensor,
    FixedPrecisionTensor,
    RemoteFixedPrecision,
    fix_precision,
    share,
)
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
from fedtensor.federated.privacy import DPSGD, AdaptiveClipping, CentralDP, LocalDP
from fedtensor.federated.progress import History, RoundMetrics
from fedtensor.federated.secagg import SecAggPlus
from fedtensor.federated.simulation import SimulatedClients, simulate_clients
from fedtensor.federated.strategies import (
    FedAdam,
    FedAsync,
    FedAvg,
    FedAvgM,
    FedBuff,
    FedProx,
    Staleness,
    Strategy,
    Update,
)
from fedtensor.federated.trace import Plan, trace
from fedtensor.local import LocalWorkers, local_workers
from fedtensor.protocol.ops import allowed_operations
from fedtensor.virtual import VirtualWorker

__version__ = "0.1.0"

__all__ = [
    "DPSGD",
    "AdaptiveClipping",
    "AdditiveSharingTensor",
    "AuthenticationFailed",
    "CentralDP",
    "FedAdam",
    "FedAsync",
    "FedAvg",
    "FedAvgM",
    "FedBuff",
    "FedProx",
    "FedTensorError",
    "FederatedDataset",
    "FixedPrecisionTensor",
    "ForbiddenOperation",
    "History",
    "LimitExceeded",
    "LocalDP",
    "LocalWorker",
    "LocalWorkers",
    "LocationError",
    "MultiPointerTensor",
    "ObjectNotFound",
    "Plan",
    "PlanError",
    "PointerReleased",
    "PointerTensor",
    "ProtocolError",
    "RemoteError",
    "RemoteFixedPrecision",
    "RemoteWorker",
    "RoundMetrics",
    "SecAggPlus",
    "Shard",
    "SimulatedClients",
    "Staleness",
    "Strategy",
    "TimeoutError",
    "TransportNotFound",
    "Update",
    "VirtualWorker",
    "WorkerHandle",
    "WorkerUnavailable",
    "allowed_operations",
    "connect",
    "copy_model",
    "evaluate",
    "federate",
    "fit",
    "fix_precision",
    "get_model",
    "load_dataset",
    "local_worker",
    "local_workers",
    "move_model",
    "register_transport",
    "send",
    "share",
    "simulate_clients",
    "split_indices",
    "trace",
]
