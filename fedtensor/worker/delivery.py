"""The network half of moving tensors between worker processes (see :mod:`.capabilities`).

Theory of operation
-------------------
For :class:`~fedtensor.worker.server.WorkerServer`, three pieces:

- :func:`admit_delivery`: a handshake that carries a capability instead of a bearer
  token is accepted only if :meth:`CapabilityIssuer.redeem` accepts the capability
  and its proof (403 with the reason otherwise). The connection then has no session
  of its own; it holds the grant (``peer.delivery``).
- :func:`delivery_received`: its one frame must be one ``Store``; the value is queued
  into the granted session under the granted id (behind that client's commands
  already queued, ahead of any it sends later), acknowledged with ``Reply(0, True)``
  and the connection closed. The client's memory quota applies as to its own stores.
  Anything else closes the connection as a policy violation.
- :func:`send_blocking`: the source's side, called by ``fedtensor.deliver`` on the
  actor's thread: runs :func:`fedtensor.net.dial.deliver_frame` on the server's event
  loop and waits for it, never on that loop itself (it would wait on itself).
"""

from __future__ import annotations

import asyncio
import builtins
import logging
from http import HTTPStatus
from typing import Any

from websockets.http11 import Request, Response
from websockets.server import ServerProtocol

from fedtensor.errors import LimitExceeded, ProtocolError, WorkerUnavailable
from fedtensor.net.dial import deliver_frame
from fedtensor.protocol.codec import decode_frame, encode_frame
from fedtensor.protocol.messages import Message, Reply, Store
from fedtensor.protocol.wsframes import CloseCode
from fedtensor.worker.capabilities import (
    CAPABILITY_HEADER,
    PROOF_HEADER,
    CapabilityIssuer,
    CapabilityRefused,
)

__all__ = ["admit_delivery", "delivery_received", "send_blocking"]

_log = logging.getLogger("fedtensor.server")


def admit_delivery(
    issuer: CapabilityIssuer | None, peer: Any, protocol: ServerProtocol, request: Request
) -> Response | None:
    """Refuse the handshake (403 and why) unless its capability is good; else grant it."""
    try:
        if issuer is None:
            raise CapabilityRefused("this worker takes no deliveries")
        peer.delivery = issuer.redeem(
            request.headers.get(CAPABILITY_HEADER), request.headers.get(PROOF_HEADER)
        )
    except CapabilityRefused as exc:
        _log.warning("refused a delivery from %s: %s", peer.remote_address, exc)
        return protocol.reject(HTTPStatus.FORBIDDEN, f"{exc}\n")
    return None


def delivery_received(peer: Any, frame: memoryview) -> None:
    """Queue the delivered value into the granted session, acknowledge, close."""
    grant, peer.delivery = peer.delivery, None  # one frame per grant
    if grant is None:
        return
    try:
        batch = decode_frame(frame)
    except (LimitExceeded, ProtocolError) as exc:
        peer.reject(exc)
        return
    if len(batch) != 1 or type(batch[0]) is not Store:
        peer.fail(CloseCode.POLICY_VIOLATION, "a delivery carries exactly one Store")
        return
    grant.session.submit([Store(grant.object_id, batch[0].value)])
    peer.send_frame(encode_frame([Reply(0, True)]))
    peer.close(CloseCode.NORMAL_CLOSURE, "delivered")


def send_blocking(
    loop: asyncio.AbstractEventLoop | None,
    url: str,
    headers: list[tuple[str, str]],
    chunks: list[Any],
    max_message: int,
    timeout: float,
) -> list[Message]:
    """Deliver on ``loop`` (the server's) from the actor's thread; the target's answer."""
    if loop is None or loop.is_closed():
        raise WorkerUnavailable("the worker is not serving, so it cannot deliver")
    if _running_loop() is loop:
        raise RuntimeError("a delivery must not wait on the event loop it runs on")
    future = asyncio.run_coroutine_threadsafe(
        deliver_frame(url, headers, chunks, max_message=max_message, timeout=timeout), loop
    )
    try:
        return future.result(timeout + 5.0)  # deliver_frame bounds itself by `timeout`
    except builtins.TimeoutError:
        future.cancel()
        raise WorkerUnavailable(f"the delivery to {url} did not finish in {timeout} s") from None


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
