"""The messages a client and a worker exchange.

Theory of operation
-------------------
A client drives a worker with *commands* and the worker answers some of them
with *replies*. Commands are never answered one by one: the client names the
id of every result itself, so it can send ``Call(id=7, op="torch.add",
args=(Ref(5), Ref(6)))`` and, in the same breath, ``Call(id=8, op="Tensor.sum",
args=(Ref(7),))`` without waiting. This is promise pipelining: a chain of any
length costs no round trip until the client asks for a value with ``Fetch``.

A worker handles the commands of one client in the order they were sent, one
at a time. A command that fails stores its error under its result id, so every
later command that reads that id fails with the same error, and a ``Fetch`` of
it answers with a ``Failure``. Only ``Fetch`` and ``ListObjects`` are answered.

Messages travel in batches ("frames"); see :mod:`fedtensor.protocol.codec` for the
bytes. Values inside messages are drawn from a closed grammar:

    value := None | bool | int | float | complex | str | torch.Tensor
           | list[value] | tuple[value, ...] | dict[str, value]
           | slice | Ellipsis | torch.dtype | Ref

There is deliberately no way to name a Python object, a class or a callable:
the only code a worker runs is an allow-listed operation named by a string.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "Call",
    "Command",
    "Failure",
    "Fetch",
    "ListObjects",
    "Message",
    "Ref",
    "Release",
    "Reply",
    "Store",
]


class Ref(int):
    """A reference to the object stored under ``id`` on the receiving worker.

    An ``int`` subclass rather than a dataclass: pipelined code makes one per
    argument, and an immutable int is cheap and never tracked by the cycle
    collector. Its type, not its value, tells it apart from a plain int.
    """

    __slots__ = ()

    @property
    def id(self) -> int:
        return int(self)

    def __repr__(self) -> str:
        return f"Ref({int(self)})"


@dataclass(frozen=True, slots=True)
class Store:
    """Store ``value`` under ``id``; it replaces any object stored there."""

    id: int
    value: Any


@dataclass(frozen=True, slots=True)
class Call:
    """Run the allow-listed operation ``op`` and store its result under ``id``.

    ``op`` is a qualified name: ``"torch.add"``, ``"Tensor.sum"`` (a method, the
    first argument is ``self``), ``"Tensor.grad"`` (an attribute read),
    ``"torch.nn.functional.relu"``. ``Ref`` values in ``args`` and ``kwargs``
    stand for stored objects.
    """

    id: int
    op: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Fetch:
    """Ask for a copy of the object under ``id``; ``free`` also deletes it.

    The worker answers with a ``Reply`` or a ``Failure`` carrying ``request``.
    """

    request: int
    id: int
    free: bool


@dataclass(frozen=True, slots=True)
class Release:
    """Delete the objects under ``ids``; unknown ids are ignored."""

    ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ListObjects:
    """Ask for the ids of every object this client has on the worker.

    Answered with a ``Reply`` whose value is the sorted list of ids.
    """

    request: int


@dataclass(frozen=True, slots=True)
class Reply:
    """The answer to ``Fetch`` number ``request``."""

    request: int
    value: Any


@dataclass(frozen=True, slots=True)
class Failure:
    """``Fetch`` number ``request`` failed.

    ``kind`` says which fedtensor error the client raises: ``"remote"`` (the op
    raised ``error_type``), ``"forbidden"``, ``"not_found"``, ``"protocol"`` or
    ``"limit"``.
    """

    request: int
    kind: str
    error_type: str
    message: str


Command = Store | Call | Fetch | Release | ListObjects
Message = Store | Call | Fetch | Release | ListObjects | Reply | Failure
