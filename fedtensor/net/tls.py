"""TLS driven through memory buffers: the worker's ``wss://`` with small buffers before
authentication.

Theory of operation
-------------------
asyncio's own TLS (``ssl=`` on a server) gives every connection a 256 KiB read
buffer the moment TCP is accepted, before a byte is read: a silent ``wss://``
connection cost a worker 270 KiB, against 5 KiB on ``ws://``. A :class:`TLSLayer`
does the same work with :meth:`ssl.SSLContext.wrap_bio`, and its buffers grow only
once the application says the connection is authenticated:

- It is the :class:`asyncio.BufferedProtocol` of the raw TCP transport, and the
  transport the application protocol (a :class:`~fedtensor.net.peer.WebSocketPeer`)
  sees: ``connection_made`` reaches the application at the TCP accept, so the
  application's handshake timer covers the TLS handshake too.
- Until then received ciphertext is read :data:`HANDSHAKE_READ` bytes at a time
  into a buffer shared by every connection of the thread (asyncio fills it and
  calls :meth:`buffer_updated` in one callback, which copies it out at once) and
  written to the ``ssl.MemoryBIO`` that the ``ssl.SSLObject`` reads. Small pieces,
  since a memory BIO keeps the capacity it once needed. The ``SSLObject`` itself
  (OpenSSL's connection state, 9 KiB when made, 16 KiB after a TLS 1.3 handshake,
  its BIOs included) and its BIOs are made at the first byte received, so a silent
  connection holds the layer's own fields and nothing of OpenSSL's.
- Plaintext is decrypted straight into the application's own buffer
  (``SSLObject.read(n, buffer)`` into what ``get_buffer`` gave): into the peer's
  1 KiB head buffer (shared too) before the websocket handshake, into the frame parser's buffer, or
  the tensor being received, afterwards; one ``buffer_updated`` per buffer filled,
  not per TLS record.
- :meth:`opened` (called by the peer once the handshake is accepted) gives the
  connection a ciphertext read buffer of its own of :data:`OPEN_READ` bytes, so
  that a large transfer takes few reads.
- Written plaintext is encrypted into the outgoing BIO at most :data:`WRITE_CHUNK`
  bytes at a time and handed to the raw transport, whose flow control
  (``pause_writing``/``resume_writing``) is passed to the application unchanged.
  ``pause_reading`` stops decrypting as well as reading; ``resume_reading`` first
  delivers what OpenSSL already holds.
- Closing sends TLS's ``close_notify`` and then closes TCP; the peer's
  ``close_notify`` or TCP's end reach the application as ``eof_received``; TLS has
  no half-close (``can_write_eof`` is false), as on asyncio's TLS transport.
- A TLS error (a failed handshake, a client that refuses the certificate, a
  corrupt record) closes TCP after the alert OpenSSL wrote (aborts it if the peer
  does not read what is written), and reaches the
  application as ``connection_lost`` with a :class:`~fedtensor.errors.ProtocolError`
  saying what failed; a websocket closed that way gets the close code 1006
  (abnormal closure), there being no channel left to send one on.

Protocol versions are the context's: the worker's contexts keep Python's default
minimum (TLS 1.2). Renegotiation is not supported: TLS 1.3 has none, and the worker
sets ``OP_NO_RENEGOTIATION`` on its context for TLS 1.2 clients (a write while a
renegotiation waits for the client's answer would end the connection here).

When TCP is gone the layer drops OpenSSL's state and its buffers, and its
reference to the application: the peer, which holds the layer as its transport,
holds no cycle through it.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
from contextlib import suppress
from typing import Any, cast

from fedtensor.errors import ProtocolError

__all__ = ["HANDSHAKE_READ", "OPEN_READ", "WRITE_CHUNK", "TLSLayer"]

_log = logging.getLogger("fedtensor.tls")

#: Bytes of ciphertext read at a time until the application is open.
HANDSHAKE_READ = 1 << 10

#: Bytes of ciphertext read at a time once it is.
OPEN_READ = 256 << 10

#: Bytes of plaintext encrypted at a time before the ciphertext is handed to TCP.
WRITE_CHUNK = 256 << 10


class _Gone(asyncio.BufferedProtocol):
    """The application once TCP is gone: nothing more reaches it."""

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(bytearray(HANDSHAKE_READ))

    def buffer_updated(self, nbytes: int) -> None:
        pass


_GONE = _Gone()

_per_thread = threading.local()


def _handshake_scratch() -> memoryview:
    """This thread's buffer that ciphertext is read into, for every connection not open."""
    buffer: memoryview | None = getattr(_per_thread, "received", None)
    if buffer is None:
        buffer = _per_thread.received = memoryview(bytearray(HANDSHAKE_READ))
    return buffer


class TLSLayer(asyncio.BufferedProtocol, asyncio.Transport):
    """The server end of TLS between a raw TCP transport and an application protocol."""

    __slots__ = (
        "__weakref__",
        "_app",
        "_closing",
        "_context",
        "_early",
        "_eof",
        "_error",
        "_handshaken",
        "_incoming",
        "_outgoing",
        "_raw",
        "_reading",
        "_received",
        "_tls",
    )

    def __init__(self, context: ssl.SSLContext, app: asyncio.BufferedProtocol) -> None:
        asyncio.Transport.__init__(self)
        self._context = context
        self._app: asyncio.BufferedProtocol = app
        self._raw: asyncio.Transport | None = None
        #: OpenSSL's connection and its two memory BIOs: made at the first byte received.
        self._tls: ssl.SSLObject | None = None
        self._incoming: ssl.MemoryBIO | None = None
        self._outgoing: ssl.MemoryBIO | None = None
        #: The connection's own ciphertext read buffer, once open (before: the thread's).
        self._received: memoryview | None = None
        self._handshaken = False
        #: Plaintext written before the TLS handshake completed.
        self._early: list[bytes] = []
        self._reading = True
        self._closing = False
        self._eof = False
        #: What ended the connection, for the application's connection_lost.
        self._error: Exception | None = None

    # -- for the application ---------------------------------------------------------------------

    def opened(self) -> None:
        """The application is authenticated: read ciphertext in large pieces from now on."""
        if self._received is None:
            self._received = memoryview(bytearray(OPEN_READ))

    @property
    def handshaken(self) -> bool:
        """True once the TLS handshake is complete."""
        return self._handshaken

    # -- asyncio.Transport, as the application sees it -------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        tls = self._tls
        if name == "ssl_object":
            return tls
        if name == "sslcontext":
            return self._context
        if name in ("peercert", "cipher", "compression") and tls is not None and self._handshaken:
            return getattr(tls, "getpeercert" if name == "peercert" else name)()
        if self._raw is None:
            return default
        return self._raw.get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self._closing or self._raw is None or self._raw.is_closing()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.BufferedProtocol)
        self._app = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._app

    def is_reading(self) -> bool:
        return self._reading and not self.is_closing()

    def pause_reading(self) -> None:
        self._reading = False
        if self._raw is not None and not self._raw.is_closing():
            self._raw.pause_reading()

    def resume_reading(self) -> None:
        if self._reading:
            return
        self._reading = True
        raw = self._raw
        if raw is not None and not raw.is_closing():
            raw.resume_reading()
            # Records already received and not yet decrypted wait in the BIO.
            asyncio.get_running_loop().call_soon(self._deliver)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._raw is not None:
            self._raw.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._raw.get_write_buffer_size() if self._raw is not None else 0

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._raw.get_write_buffer_limits() if self._raw is not None else (0, 0)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.is_closing():
            return
        tls = self._tls
        if tls is None or not self._handshaken:
            self._early.append(bytes(data))
            return
        view = memoryview(data).cast("B")
        try:
            for start in range(0, view.nbytes, WRITE_CHUNK):
                tls.write(view[start : start + WRITE_CHUNK])
                self._flush()
        except ssl.SSLError as exc:
            self._fail(exc, "sending")

    def can_write_eof(self) -> bool:
        return False  # TLS has no half-close

    def write_eof(self) -> None:
        raise NotImplementedError("TLS has no half-close: close() sends close_notify")

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        tls = self._tls
        if tls is not None and self._handshaken:
            # unwrap writes close_notify, then raises SSLWantReadError: the peer's close_notify
            # is not waited for.
            with suppress(ssl.SSLError):
                tls.unwrap()
            self._flush()
        if self._raw is not None:
            self._raw.close()

    def abort(self) -> None:
        self._closing = True
        if self._raw is not None:
            self._raw.abort()

    # -- asyncio.BufferedProtocol, as the raw transport sees it ----------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: uvloop's transports are not asyncio.Transport subclasses.
        self._raw = transport  # type: ignore[assignment]
        self._app.connection_made(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        received = self._received
        return received if received is not None else _handshake_scratch()

    def buffer_updated(self, nbytes: int) -> None:
        if self._closing:
            return
        if self._tls is None:
            self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            self._tls = self._context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        assert self._incoming is not None
        received = self._received
        self._incoming.write((received if received is not None else _handshake_scratch())[:nbytes])
        if self._handshaken or self._handshake():
            self._deliver()

    def eof_received(self) -> bool | None:
        if self._incoming is not None and self._handshaken and not self._closing:
            self._incoming.write_eof()
            self._deliver()  # what came before the end, then the end itself
        if not self._eof:
            self._eof = True
            self._app.eof_received()
        return False  # the raw transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        app = self._app
        self._app = _GONE
        # OpenSSL's state and the buffers go now, not with the last reference to the layer.
        self._tls = self._incoming = self._outgoing = None
        self._received = None
        self._early.clear()
        app.connection_lost(self._error or exc)

    def pause_writing(self) -> None:
        self._app.pause_writing()

    def resume_writing(self) -> None:
        self._app.resume_writing()

    # -- TLS --------------------------------------------------------------------------------------

    def _handshake(self) -> bool:
        """Take the handshake as far as what was received allows; True once it is done."""
        tls = self._tls
        assert tls is not None
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return False
        except (ssl.SSLError, ssl.CertificateError) as exc:
            self._fail(exc, "the TLS handshake")
            return False
        self._handshaken = True
        self._flush()  # the server's last flight, and TLS 1.3's session tickets
        early, self._early = self._early, []
        for data in early:
            self.write(data)
        return True

    def _deliver(self) -> None:
        """Decrypt what was received into the application's buffers, while it reads."""
        tls = self._tls
        while tls is not None and self._reading and not self._closing:
            app = self._app
            # A memoryview of bytes, as every fedtensor protocol's buffer is.
            buffer = cast(memoryview, app.get_buffer(-1))
            size = buffer.nbytes
            filled = 0
            ended = drained = False
            try:
                while filled < size:
                    count = cast(int, tls.read(size - filled, buffer[filled:]))
                    if not count:  # the peer's close_notify
                        ended = True
                        break
                    filled += count
            except ssl.SSLWantReadError:
                drained = True
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                ended = True
            except ssl.SSLError as exc:
                if filled:
                    app.buffer_updated(filled)
                self._fail(exc, "receiving")
                return
            if filled:
                app.buffer_updated(filled)
            if ended:
                self._flush()
                if not self._eof:
                    self._eof = True
                    if not app.eof_received():
                        self.close()
                return
            if drained:
                break
        self._flush()  # what reading made OpenSSL write (alerts, key updates)

    def _flush(self) -> None:
        """Hand the ciphertext OpenSSL wrote to TCP."""
        outgoing, raw = self._outgoing, self._raw
        if outgoing is not None and outgoing.pending and raw is not None and not raw.is_closing():
            raw.write(outgoing.read())

    def _fail(self, exc: Exception, during: str) -> None:
        """End the connection for a TLS error: the alert OpenSSL wrote, then TCP dropped."""
        reason = getattr(exc, "reason", None) or str(exc)
        self._error = ProtocolError(f"TLS failed during {during}: {reason}")
        log = _log.warning if self._handshaken else _log.debug  # scanners fail handshakes
        log("TLS with %s failed during %s: %s", self.get_extra_info("peername"), during, reason)
        self._flush()
        self._closing = True
        raw = self._raw
        if raw is not None:
            if raw.get_write_buffer_size():
                raw.abort()  # a peer that does not read would hold it open
            else:
                raw.close()  # after the alert, which TCP has taken
