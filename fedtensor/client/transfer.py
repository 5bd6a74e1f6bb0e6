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

**Pointers to pointers** (PySyft's ``x.send(bob).send(alice)``) are resolved by the
client, which knows the whole chain: ``send`` of a pointer stores on alice only a
record of where it points (``{"pointer_to": "bob", "id_at_location": ...}``, so
``alice._objects`` shows it) and gives a pointer to that record whose ``_origin`` is
the pointer to bob. An operation on such pointers is sent straight to bob, where the
data is, and its result is wrapped in the same chain (a new record on alice per
result), so ``y = p2p2x + p2p2x`` leaves ``y`` on bob and a pointer to it on alice, as
in PySyft. ``get()`` frees alice's record and gives the pointer to bob; a second
``get()`` the value. ``remote_get()`` moves bob's tensor to alice (by :func:`transfer`,
worker to worker), ``move`` moves the data at the chain's end. Why the client and not
alice forwards: a worker never holds a client's token or a standing right to act on
bob for it, so alice has nothing to forward with; the records are descriptions, not
capabilities. No byte of bob's tensor passes through alice or the client before a
``get()`` (or a ``remote_get()``/``move``, which go worker to worker).

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
    "chain_of",
    "chain_result",
    "describe",
    "hand_back",
    "metadata",
    "pointer_record",
    "remote_get",
    "search",
    "search_terms",
    "send_pointer",
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


# -- pointers to pointers (PySyft's x.send(bob).send(alice)) ---------------------------------------


def pointer_record(pointer: PointerBase) -> dict[str, Any]:
    """What a worker holds for a pointer sent to it: where the pointer points, nothing more."""
    return {"pointer_to": pointer.location.id, "id_at_location": pointer.id_at_location}


def _link(client: Client, inner: PointerBase) -> PointerBase:
    """A pointer on ``client``'s worker to the pointer ``inner``: a record stored there."""
    link = client.store(pointer_record(inner))
    link._origin = inner
    link._shape, link._dtype = inner._shape, inner._dtype
    return link


def send_pointer(pointer: PointerBase, destination: WorkerHandle) -> PointerBase:
    """``pointer.send(destination)``: a pointer on ``destination`` to ``pointer`` (PySyft's).

    Nothing of the tensor moves and nothing waits: ``destination`` gets a record of where
    ``pointer`` points (one pipelined store), and the client keeps the chain.
    """
    if pointer._error is not None:
        raise type(pointer._error)(*pointer._error.args)
    if pointer._client is None:
        raise PointerReleased(f"{pointer!r} was already consumed by get()")
    return _link(destination.client, pointer)


def chain_of(pointer: PointerBase) -> tuple[PointerBase, tuple[PointerBase, ...]]:
    """The pointer to the data at the end of ``pointer``'s chain, and the links before it
    (outermost first; none for a plain pointer)."""
    links = []
    while (inner := pointer._origin) is not None:
        links.append(pointer)
        pointer = inner
    return pointer, tuple(links)


def chain_result(result: Any, links: tuple[Client, ...]) -> Any:
    """An operation's ``result`` (a pointer where the data is, or a tuple of them), wrapped
    in the same chain of links as its operands (``links``: their clients, outermost first)."""
    if isinstance(result, tuple | list):
        return type(result)([chain_result(item, links) for item in result])
    for client in reversed(links):
        result = _link(client, result)
    return result


def hand_back(pointer: PointerBase, *, free: bool) -> PointerBase:
    """``get()`` (``free``) or a copy of a pointer to a pointer: the inner pointer.

    PySyft's ``x.send(bob).send(alice)`` made alice hold a pointer to bob's tensor, so a
    first ``get()`` gave that pointer and a second the value. ``get()`` frees the record
    on the intermediate worker; the tensor stays where it is.
    """
    inner = pointer._origin
    assert inner is not None
    if free:
        client = pointer._client
        pointer._origin = None
        if client is not None:
            pointer._client = None
            client.release(pointer.id_at_location)
    return inner


def _take_over(pointer: PointerBase, data: PointerBase) -> None:
    """Make the link ``pointer`` the pointer ``data`` is (its record freed), ``data`` released."""
    client = pointer._client
    if client is not None:
        client.release(pointer.id_at_location)
    pointer._origin = None
    pointer._client, data._client = data._client, None
    pointer.location = data.location
    pointer.id_at_location = data.id_at_location
    pointer._shape, pointer._dtype = data._shape, data._dtype
    meta = getattr(data, "_meta", None)
    if meta is not None:
        pointer._meta = meta


def _release_link(link: PointerBase) -> None:
    client, link._client = link._client, None
    link._origin = None
    if client is not None:
        client.release(link.id_at_location)


async def remote_get(pointer: PointerBase, timeout: float | None) -> PointerBase:
    """PySyft's ``remote_get()`` of a pointer to a pointer: the worker holding the link gets
    what it points to. A pointer to data moves that data there (worker to worker, as
    :func:`transfer` moves); a pointer to a further link takes that link's target (the
    chain gets shorter by one). A plain pointer is left as it is. Returns ``pointer``."""
    if pointer._error is not None:
        raise type(pointer._error)(*pointer._error.args)
    inner = pointer._origin
    if inner is None:
        return pointer
    if pointer._client is None:
        raise PointerReleased(f"{pointer!r} was already consumed by get()")
    if inner._origin is not None:
        client = pointer._client
        target = pointer._origin = inner._origin
        _release_link(inner)
        # The record is replaced by one that names the link's target.
        client.release(pointer.id_at_location)
        record = client.store(pointer_record(target))
        record._client = None  # its id goes to ``pointer``
        pointer.id_at_location = record.id_at_location
        return pointer
    await transfer(inner, pointer.location, keep=False, timeout=timeout)
    _take_over(pointer, inner)
    return pointer


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
    if pointer._origin is not None:
        return await _transfer_chain(pointer, destination, keep=keep, timeout=timeout)
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


async def _transfer_chain(
    pointer: PointerBase, destination: WorkerHandle, *, keep: bool, timeout: float | None
) -> PointerBase:
    """:func:`transfer` of a pointer to a pointer: the data at the chain's end moves (or is
    copied) to ``destination``; a move leaves ``pointer`` a plain pointer to it there and
    frees the chain's records."""
    data, links = chain_of(pointer)
    for link in links:
        if link._client is None:
            raise PointerReleased(f"{link!r} was already consumed by get()")
    if keep:
        return await transfer(data, destination, keep=True, timeout=timeout)
    await transfer(data, destination, keep=False, timeout=timeout)
    for link in links[1:]:
        _release_link(link)
    _take_over(pointer, data)
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
