"""Which transport serves which URL scheme.

Built-in transports and those of third-party packages (entry point group
``fedtensor.transports``, the name being the scheme) are found the same way;
entry points are read once, on the first lookup of a scheme not yet known.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from urllib.parse import urlsplit

from fedtensor.abc import Transport
from fedtensor.errors import TransportNotFound

__all__ = ["register_transport", "transport_for"]

ENTRY_POINT_GROUP = "fedtensor.transports"

_transports: dict[str, type[Transport]] = {}
_entry_points_loaded = False


def register_transport(transport: type[Transport]) -> None:
    """Serve the URL schemes of ``transport`` with it (replacing earlier ones)."""
    for scheme in transport.schemes:
        _transports[scheme] = transport


def _load_entry_points() -> None:
    global _entry_points_loaded
    _entry_points_loaded = True
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry_point.name in _transports:
            continue
        try:
            transport = entry_point.load()
        except Exception:  # a broken plugin must not break the other transports
            continue
        if isinstance(transport, type) and issubclass(transport, Transport):
            _transports.setdefault(entry_point.name, transport)


def transport_for(url: str) -> Transport:
    """A transport instance for the scheme of ``url``."""
    scheme = urlsplit(url).scheme
    if scheme not in _transports:
        _builtin(scheme)
    if scheme not in _transports and not _entry_points_loaded:
        _load_entry_points()
    try:
        return _transports[scheme]()
    except KeyError:
        known = ", ".join(sorted(_transports)) or "none"
        raise TransportNotFound(
            f"no transport for {scheme or 'a URL without a scheme'}:// (known: {known})"
        ) from None


def _builtin(scheme: str) -> None:
    # Imported lazily so the core does not import its transports at start-up, and by
    # name because `transports/` becomes `fedtensor.transports` only when installed.
    if scheme == "memory":
        module = importlib.import_module("fedtensor.transports.memory")
        register_transport(module.MemoryTransport)
    elif scheme in ("ws", "wss"):
        module = importlib.import_module("fedtensor.transports.websocket")
        register_transport(module.WebSocketTransport)
