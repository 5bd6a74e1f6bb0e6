"""The worker operations for tags, search and moving tensors between workers.

Theory of operation
-------------------
Five allow-listed operations (:data:`fedtensor.protocol.ops.WORKER_OPERATIONS`),
bound to one actor by an :class:`Exchange`:

- ``fedtensor.describe(object_id, tags, description)`` and
  ``fedtensor.search(terms)``: see :mod:`fedtensor.worker.catalog`. They read the
  session the command came from (the actor sets :attr:`Exchange.session` before it
  runs a batch), so a client only ever sees its own objects.
- ``fedtensor.alias(x)``: ``x`` itself, under the command's result id (the pointer a
  search returns to one of the client's own objects).
- ``fedtensor.capability(object_id, binding)`` on the target and
  ``fedtensor.deliver(x, token, secret)`` on the source: see
  :mod:`fedtensor.worker.capabilities`. Only a worker served over the network can
  deliver or issue: :class:`~fedtensor.worker.server.WorkerServer` gives its
  exchange a federation key, an issuer and a ``send`` hook that runs the delivery on
  its event loop. ``deliver`` runs on the actor's thread and waits there for the
  target's acknowledgement (bounded by a timeout): the commands queued behind it,
  such as the release of a moved tensor, run after the tensor left. The target
  acknowledges once it queued the value, without waiting for its own actor, so two
  workers delivering to each other at once do not wait on each other.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from fedtensor.errors import FedTensorError
from fedtensor.protocol.codec import encode_frame
from fedtensor.protocol.messages import Reply, Store
from fedtensor.worker.budget import metadata_bytes
from fedtensor.worker.capabilities import (
    CAPABILITY_HEADER,
    PROOF_HEADER,
    CapabilityIssuer,
    CapabilityRefused,
    check_delivery,
)
from fedtensor.worker.catalog import describe, search

__all__ = ["DELIVERY_TIMEOUT", "Exchange", "SendHook"]

#: Seconds a delivery may take, connection and acknowledgement included.
DELIVERY_TIMEOUT = 60.0

#: ``send(url, headers, chunks, max_message, timeout)``: the target's answer (blocking).
SendHook = Callable[[str, list[tuple[str, str]], list[Any], int, float], list[Any]]


class Exchange:
    """One actor's tags, search and delivery state."""

    def __init__(
        self,
        worker: str,
        datasets: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    ) -> None:
        self.worker = worker
        self.datasets = datasets
        #: Extra tags of each held data set, by name (``--dataset-tags``).
        self.dataset_tags: dict[str, tuple[str, ...]] = {}
        # The session whose batch the actor is running on this thread (set by the actor):
        # per thread, since clients' lanes run on several threads at once (scheduler.py).
        self._running = threading.local()
        #: Set by a network server: the federation key, the issuer, the delivery hook.
        self.federation_key: bytes | None = None
        self.issuer: CapabilityIssuer | None = None
        self.send: SendHook | None = None
        self.delivery_timeout = DELIVERY_TIMEOUT

    @property
    def session(self) -> Any:
        """The session whose batch the actor is running on this thread."""
        return getattr(self._running, "session", None)

    @session.setter
    def session(self, session: Any) -> None:
        self._running.session = session

    def operations(self) -> dict[str, Callable[..., Any]]:
        return {
            "fedtensor.alias": _alias,
            "fedtensor.capability": self._capability,
            "fedtensor.deliver": self._deliver,
            "fedtensor.describe": self._describe,
            "fedtensor.search": self._search,
        }

    def set_dataset_tags(self, tags: Mapping[str, Sequence[str]] | None) -> None:
        for name, extra in (tags or {}).items():
            if name not in self.datasets:
                raise ValueError(f"tags given for {name!r}, which is not a data set it holds")
            self.dataset_tags[name] = tuple(extra)

    # -- tags and search -------------------------------------------------------------------------

    def _describe(self, object_id: object, tags: object, description: object = None) -> Any:
        session = self.session
        metadata = session.metadata
        old = metadata.get(object_id)
        describe(metadata, session.objects, object_id, tags, description)
        ledger = session.ledger
        if ledger is None:
            return None
        # Tags and descriptions count against the client's budget as stored values do:
        # else many cheap objects carrying 1 MiB of tags each hold memory charged nothing.
        assert type(object_id) is int  # describe checked it
        refused = ledger.charge_extra(
            object_id, metadata_bytes(*metadata[object_id]), "fedtensor.describe would hold"
        )
        if refused is not None:
            if old is None:
                del metadata[object_id]
            else:
                metadata[object_id] = old
        self._release_dropped(session)
        return refused

    def _search(self, terms: object) -> list[dict[str, Any]]:
        session = self.session
        found = search(session.metadata, session.objects, self.datasets, self.dataset_tags, terms)
        self._release_dropped(session)
        return found

    @staticmethod
    def _release_dropped(session: Any) -> None:
        """Return what metadata dropped since (released objects') was charged."""
        ledger, metadata = session.ledger, session.metadata
        if ledger is not None and ledger.extra_count() > len(metadata):
            for id_ in ledger.extra_ids():
                if id_ not in metadata:
                    ledger.release_extra(id_)

    # -- moving tensors --------------------------------------------------------------------------

    def _capability(self, object_id: object, binding: object) -> str:
        if self.issuer is None:
            raise CapabilityRefused(
                f"worker {self.worker!r} runs in the client's process: tensors move to it "
                "through the client, not by a capability"
            )
        return self.issuer.issue(self.session, object_id, binding)

    def _deliver(self, value: object, token: object, secret: object) -> bool:
        send = self.send
        if send is None:
            raise CapabilityRefused(
                f"worker {self.worker!r} runs in the client's process and cannot deliver to "
                "another worker: its tensors move through the client"
            )
        delivery = check_delivery(self.federation_key, self.worker, token, secret)
        headers = [(CAPABILITY_HEADER, delivery.token), (PROOF_HEADER, delivery.proof)]
        chunks = encode_frame([Store(0, value)])
        answer = send(delivery.url, headers, chunks, delivery.max_message, self.delivery_timeout)
        if len(answer) != 1 or type(answer[0]) is not Reply or answer[0].value is not True:
            raise FedTensorError(f"the target worker did not acknowledge the delivery: {answer!r}")
        return True


def _alias(value: Any) -> Any:
    return value
