"""The one exception hierarchy of fedtensor.

Every error the public API raises on purpose is an instance of
:class:`FedTensorError`. Errors from the libraries underneath
(websockets, asyncio, ssl) are mapped at the edge with ``raise ... from exc``, so a
caller never needs to import them to handle a failure. A torch error raised by
a remote command is not re-raised as itself: it arrives as a
:class:`RemoteError` that names the remote exception type and message.

    FedTensorError
    ├── AuthenticationFailed         the worker refused the handshake (missing or wrong token)
    ├── RemoteError                  a command failed on the worker
    │   ├── ForbiddenOperation       the op is not on the worker's allow-list
    │   └── ObjectNotFound           the id is unknown to the worker (freed, never stored,
    │                                or another client's)
    ├── LimitExceeded                a limit was crossed: message size, memory quota,
    │                                pending commands (the message names it)
    ├── LocationError                pointers on different workers mixed in one op
    ├── PlanError                    a model cannot be traced into a plan, or a plan or
    │                                its training settings are malformed
    ├── PointerReleased              a pointer used after get() consumed it
    ├── ProtocolError                bytes that are not a valid fedtensor frame
    ├── WorkerUnavailable            the worker closed, died or cannot be reached
    ├── TransportNotFound            no transport registered for a URL scheme
    └── TimeoutError                 a wait on a worker ran past its timeout
                                     (also a subclass of the built-in TimeoutError)
"""

from __future__ import annotations

import builtins

__all__ = [
    "AuthenticationFailed",
    "FedTensorError",
    "ForbiddenOperation",
    "LimitExceeded",
    "LocationError",
    "ObjectNotFound",
    "PlanError",
    "PointerReleased",
    "ProtocolError",
    "RemoteError",
    "TimeoutError",
    "TransportNotFound",
    "WorkerUnavailable",
]


class FedTensorError(Exception):
    """Base class of every error fedtensor raises."""


class AuthenticationFailed(FedTensorError):
    """The worker refused the handshake: the token is missing or wrong."""


class RemoteError(FedTensorError):
    """A command failed on the worker.

    ``remote_type`` is the name of the exception type raised there (for example
    ``"RuntimeError"``) and ``remote_message`` its message; ``worker`` is the id
    of the worker that ran the command.
    """

    def __init__(self, remote_type: str, remote_message: str, worker: str = "?") -> None:
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.worker = worker
        super().__init__(f"{remote_type} on worker {worker!r}: {remote_message}")

    def __reduce__(self) -> tuple[object, ...]:
        # Keeps the exception copyable (pytest and tracebacks copy exceptions).
        return (type(self), (self.remote_type, self.remote_message, self.worker))


class ForbiddenOperation(RemoteError):
    """The operation is not on the allow-list of operations a worker runs."""


class ObjectNotFound(RemoteError):
    """The worker holds no object with that id in this client's namespace."""


class LimitExceeded(FedTensorError):
    """A limit of a worker or a connection was crossed; the message names it."""


class LocationError(FedTensorError):
    """One operation mixed pointers that live on different workers.

    ``await ptr.move(worker)`` (or ``ptr.copy(worker)``, keeping the original) brings
    them onto one worker first.
    """


class PlanError(FedTensorError):
    """A model cannot be traced into a plan, or a plan (or its settings) is malformed."""


class PointerReleased(FedTensorError):
    """The pointer's remote object was already consumed by ``get()``."""


class ProtocolError(FedTensorError):
    """Bytes received are not a valid fedtensor frame."""


class WorkerUnavailable(FedTensorError):
    """The worker is closed, died, or cannot be reached."""


class TransportNotFound(FedTensorError):
    """No transport is registered for the scheme of a worker URL."""


class TimeoutError(FedTensorError, builtins.TimeoutError):
    """A wait on a worker ran past its timeout."""
