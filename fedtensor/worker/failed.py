"""The marker a worker stores in place of a command's result when the command failed.

A failed command does not stop the worker, nor the commands queued after it: its
result id holds a :class:`Failed` that names the error. A later command reading
that id fails with the same marker, and a fetch of it is answered with a
:class:`~fedtensor.protocol.messages.Failure` carrying its three fields. It lives
apart from the actor because the inline policy (:mod:`fedtensor.worker.inline`),
which the actor imports, must also know it (fetching one is cheap).
"""

from __future__ import annotations

__all__ = ["Failed"]


class Failed:
    """The stored outcome of a command that failed (or read a failed object)."""

    __slots__ = ("error_type", "kind", "message")

    def __init__(self, kind: str, error_type: str, message: str) -> None:
        self.kind = kind
        self.error_type = error_type
        self.message = message

    def __repr__(self) -> str:
        return f"<Failed {self.error_type}: {self.message}>"
