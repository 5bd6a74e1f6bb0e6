"""Moving pointers between workers, tags and search: the client's side.

Theory of operation
-------------------
``move``, ``copy``, ``send`` and ``remote_get`` of a pointer (PySyft 0.2's names) all
come down to :func:`transfer`: a tensor on one worker becomes a tensor on another,
and the source keeps its copy or not. How the bytes travel depends on the workers:

- **Two worker processes** (neither runs in this process): straight from one to the
  other, never through the client (:mod:`fedtensor.worker.capabilities` has the
  protocol). The client draws a secret, asks the target for a capability bound to
  its session there, to the id the tensor will have there and to the secret's hash
  (a round trip), and hands capability and secret to the source with
  ``fedtensor.deliver`` (a second round trip, to learn the outcome). The workers
  need a shared federation key; without it the worker's refusal says so.
- **Anything else** (two virtual workers, or one virtual worker and one process):
  through the client, in this process: a fetch (which frees the source for a move)
  and a store. Between virtual workers nothing is encoded or sent anywhere.

A move re-points the very pointer moved (``ptr.move(alice)`` returns ``ptr``, now on
alice, as PySyft's did); a copy gives a new pointer. Tags and a description travel
with a tensor: the client knows them (they were given when it was sent, or found by a
search) and re-describes the copy on the target.

Tags live in the worker's session beside the objects (:mod:`fedtensor.worker.catalog`);
the pointer keeps a local copy in its ``_meta`` slot. :func:`search` asks a worker
for what matches (a round trip) and makes one pointer per match at once, pipelined:
to the same object for the client's own (``fedtensor.alias``), to a copy for a data
set's part (``fedtensor.dataset``).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from fedtensor.errors import FedTensorError, PointerReleased
from fedtensor.protocol.messages import Call, Ref

if TYPE_CHECKING:
    from fedtensor.client.engine import Client
    from fedtensor.client.handles import WorkerHandle
    from fedtensor.client.pointer import PointerBase

__all__ = [
    "describe",
    "hand_back",
    "metadata",
    "search",
    "search_terms",
    "set_metadata",
    "transfer",
]

Metadata = tuple[frozenset[str], "str | None"]


def metadata(pointer: PointerBase) -> tuple[frozenset[str], str | None]:
    """The tags and description the client knows for ``pointer``."""
    meta: Metadata | None = getattr(pointer, "_meta", None)
    return meta if meta is not None else (frozenset(), None)


def set_metadata(pointer: PointerBase, tags: Iterable[str], description: str | None) -> None:
    pointer._meta = (frozenset(tags), description)


def _texts(items: Iterable[Any], what: str) -> list[str]:
    texts = []
    for item in items:
        if isinstance(item, list | tuple | set | frozenset):
            texts += _texts(item, what)
        elif isinstance(item, str):
            texts.append(item)
        else:
            raise TypeError(f"{what} are strings, not {type(item).__name__}")
    return texts


def search_terms(query: Iterable[Any]) -> list[str]:
    """``search("#a", "#b")``, ``search(["#a", "#b"])``: the terms, flattened."""
    return _texts(query, "search terms")


def _queue_describe(
    client: Client, object_id: int, tags: Iterable[str], description: str | None
) -> None:
    # The command's result (None) is released right behind it: nothing waits on it. A
    # failure (an id that is gone) is the pointer's to report when it is used.
    result = client.new_id()
    client.submit(Call(result, "fedtensor.describe", (object_id, list(tags), description), {}))
    client.release(result)


def describe(pointer: PointerBase, tags: Iterable[Any], description: str | None) -> None:
    """Add ``tags`` (and set ``description``, unless ``None``) on the worker and locally."""
    new_tags = _texts(tags, "tags")
    if description is not None and not isinstance(description, str):
        raise TypeError("a description is a string")
    client = pointer._client
    if client is None:
        raise PointerReleased(f"{pointer!r} was already consumed by get()")
    _queue_describe(client, pointer.id_at_location, new_tags, description)
    old_tags, old_description = metadata(pointer)
    set_metadata(
        pointer, old_tags | set(new_tags), old_description if description is None else description
    )


def hand_back(pointer: PointerBase) -> Any:
    """``get()`` of a pointer made by a pointer's ``send``: the pointer it was sent from.

    PySyft's ``x.send(bob).send(alice)`` made alice hold a pointer to bob's tensor, so a
    first ``get()`` gave that pointer and a second the value. Here alice holds a copy;
    ``get()`` frees it and gives back the pointer to bob, so the PySyft sequence gives
    the same results. ``None`` once that pointer was consumed: ``get()`` then gives the
    value.
    """
    origin, pointer._origin = pointer._origin, None
    client = pointer._client
    if origin is None or origin._client is None or client is None:
        return None
    pointer._client = None
    client.release(pointer.id_at_location)
    return origin


def _call(client: Client, op: str, args: tuple[Any, ...]) -> PointerBase:
    """Queue ``op(*args)`` on ``client``'s worker; a pointer to its result. (Not
    :func:`fedtensor.client.pointer.call_on`: the pointer module imports this one.)"""
    id_ = client.new_id()
    client.submit(Call(id_, op, args, {}))
    return client.pointer_class(client, id_)


def _binding(secret: str) -> str:
    # What the target binds a capability to (fedtensor.worker.capabilities.binding_of).
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


async def transfer(
    pointer: PointerBase, destination: WorkerHandle, *, keep: bool, timeout: float | None
) -> PointerBase:
    """The tensor of ``pointer`` on ``destination``: a new pointer (``keep``), or ``pointer``
    itself re-pointed there with the source's copy freed (a move)."""
    if pointer._error is not None:
        raise type(pointer._error)(*pointer._error.args)
    if not keep:
        pointer._origin = None  # a moved pointer is the tensor itself, not a pointer's copy
    source = pointer._client
    if source is None:
        raise PointerReleased(f"{pointer!r} was already consumed by get()")
    target = destination.client
    if target is source:  # already there
        if not keep:
            return pointer
        clone = _call(source, "Tensor.clone", (Ref(pointer.id_at_location),))
        clone._shape, clone._dtype = pointer._shape, pointer._dtype
        return clone
    if not source._in_process and not target._in_process:
        new_id = await _deliver(pointer, source, target, timeout)
        if not keep:
            pointer._client = None
            source.release(pointer.id_at_location)  # runs after the delivery, behind it
        shape, dtype = pointer._shape, pointer._dtype
    else:
        value = await pointer._fetch(free=not keep, timeout=timeout)
        stored = target.store(value)
        new_id = stored.id_at_location
        stored._client = None  # its id goes to the pointer made below (or re-pointed)
        shape, dtype = stored._shape, stored._dtype
    tags, description = metadata(pointer)
    if tags or description is not None:
        _queue_describe(target, new_id, tags, description)
    if keep:
        new = target.pointer_class(target, new_id, shape, dtype)
        if tags or description is not None:
            set_metadata(new, tags, description)
        return new
    pointer._client = target
    pointer.location = destination
    pointer.id_at_location = new_id
    pointer._shape, pointer._dtype = shape, dtype
    return pointer


async def _deliver(
    pointer: PointerBase, source: Client, target: Client, timeout: float | None
) -> int:
    """Have ``source`` deliver ``pointer``'s tensor to ``target``; its id there."""
    secret = secrets.token_hex(32)
    new_id = target.new_id()
    capability = _call(target, "fedtensor.capability", (new_id, _binding(secret)))
    token = await capability._fetch(free=True, timeout=timeout)
    delivered = _call(source, "fedtensor.deliver", (Ref(pointer.id_at_location), token, secret))
    if await delivered._fetch(free=True, timeout=timeout) is not True:
        raise FedTensorError(f"worker {source.worker.id!r} did not confirm the delivery")
    return new_id


async def search(worker: WorkerHandle, terms: list[str], timeout: float | None) -> list[Any]:
    """Pointers to what on ``worker`` matches every term (see the module's header)."""
    client = worker.client
    found = _call(client, "fedtensor.search", (terms,))
    entries = await found._fetch(free=True, timeout=timeout)
    pointers = []
    for entry in entries:
        id_ = client.new_id()
        if entry["kind"] == "object":
            client.submit(Call(id_, "fedtensor.alias", (Ref(entry["id"]),), {}))
        else:
            client.submit(Call(id_, "fedtensor.dataset", (entry["name"], entry["part"]), {}))
        shape = entry["shape"]
        pointer = client.pointer_class(
            client, id_, None if shape is None else tuple(shape), entry["dtype"]
        )
        set_metadata(pointer, entry["tags"], entry["description"])
        pointers.append(pointer)
    return pointers
