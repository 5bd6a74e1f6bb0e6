"""A worker's one outgoing connection: deliver one frame to another worker.

Theory of operation
-------------------
A worker normally only answers. To move a tensor between two worker processes
without it passing through the client (see :mod:`fedtensor.worker.capabilities`),
the source worker opens a websocket to the target, presents a capability in its
handshake headers, sends one fedtensor frame (split into messages as
:mod:`fedtensor.protocol.chunks` says, so the target's message size limit holds),
reads the one frame the target answers with, and closes.

That is all this module does, and it does it with the ``websockets`` library's
asyncio client (handshake, masking, TLS with certificate verification against the
system's trust store, close handshake) rather than a second copy of the client
transport: the client layer sits above the worker's and must not be imported here.
Every wait is bounded by ``timeout``; failures are :class:`~fedtensor.FedTensorError`
s that say what the target answered.
"""

from __future__ import annotations

import asyncio
import builtins
import ssl as ssl_module
from collections.abc import Sequence

from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus, WebSocketException

from fedtensor.errors import FedTensorError, LimitExceeded, ProtocolError, WorkerUnavailable
from fedtensor.protocol.chunks import Reassembler, split_frame
from fedtensor.protocol.codec import Chunk, decode_frame
from fedtensor.protocol.messages import Message

__all__ = ["MAX_ANSWER", "deliver_frame"]

#: Bytes of the target's answer to a delivery (an acknowledgement, not data).
MAX_ANSWER = 64 << 10


async def deliver_frame(
    url: str,
    headers: Sequence[tuple[str, str]],
    chunks: Sequence[Chunk],
    *,
    max_message: int,
    timeout: float,
    ssl: ssl_module.SSLContext | None = None,
) -> list[Message]:
    """Send one frame to the worker at ``url``; return the messages of its answer."""
    secure = url.startswith("wss://")
    try:
        async with asyncio.timeout(timeout):
            async with connect(
                url,
                additional_headers=list(headers),
                user_agent_header="fedtensor-worker",
                ssl=(ssl or ssl_module.create_default_context()) if secure else None,
                max_size=MAX_ANSWER,
                open_timeout=None,
                close_timeout=min(timeout, 10.0),
                compression=None,
                proxy=None,  # straight to the URL the target signed, never via a proxy
            ) as websocket:
                for message in split_frame(chunks, max_message):
                    await websocket.send(message)
                reassembler = Reassembler(MAX_ANSWER)
                while True:
                    received = await websocket.recv(decode=False)
                    frame = reassembler.feed(received)
                    if frame is not None:
                        return decode_frame(frame)
    except InvalidStatus as exc:
        body = exc.response.body.decode("utf-8", "replace").strip() if exc.response.body else ""
        raise WorkerUnavailable(
            f"the worker at {url} refused the delivery (HTTP {exc.response.status_code}"
            f"{': ' + body if body else ''})"
        ) from None
    except (LimitExceeded, ProtocolError) as exc:
        raise ProtocolError(f"the worker at {url} answered the delivery badly: {exc}") from None
    except builtins.TimeoutError:
        raise WorkerUnavailable(f"no answer from the worker at {url} in {timeout} s") from None
    except (OSError, WebSocketException) as exc:
        raise WorkerUnavailable(f"cannot deliver to the worker at {url}: {exc}") from None
    except FedTensorError:
        raise
