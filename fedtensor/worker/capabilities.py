"""Capabilities: how one worker delivers a client's tensor straight to another.

Theory of operation
-------------------
``await ptr.move(alice)`` with the tensor on worker process ``bob`` sends the tensor's
bytes from bob to alice, never through the client. Three parties, none trusting the
client with more than it already has:

1. The client asks the **target** (alice) for a capability: the worker operation
   ``fedtensor.capability(object_id, binding)``. Alice draws a random 128-bit id,
   remembers it for ``ttl`` seconds (monotonic clock) bound to the asking client's
   *session* and to ``object_id``, the id in that session the tensor will be stored
   under, and answers with a token: her advertised URL, her message size limit and
   ``binding`` (SHA-256 of a secret the client drew), signed with HMAC-SHA256 under
   the **federation key**, a secret shared by the workers of one deployment and
   never by clients.
2. The client hands the token and its secret to the **source** (bob):
   ``fedtensor.deliver(Ref(x), token, secret)``. Bob checks the signature (so the URL
   he will connect to is one a worker of the federation advertised for itself: a
   client cannot make him connect anywhere else), that ``sha256(secret)`` is the
   binding (so a token copied from another client is refused: that client's secret
   never left its own connections), and that the URL is ``ws://`` or ``wss://``.
3. Bob connects to that URL and presents the token with a *proof*, an HMAC of the
   token under the federation key (so only a worker can redeem a token, not the
   client that holds it). Alice accepts the handshake instead of a bearer token only
   if the signature and proof check out and the id is one she issued, not yet used
   and not expired; the id is spent at once (one-time). The connection may carry one
   ``Store``, which alice queues into the bound session under the bound id, and is
   then closed.

Errors are :class:`CapabilityRefused` with a message saying which check failed; a
worker operation turns it into a failed result, so the worker keeps serving. HMAC is
the standard library's :mod:`hmac` (a maintained implementation; nothing here is a
cipher of fedtensor's own), compared with :func:`hmac.compare_digest`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from fedtensor.errors import FedTensorError

__all__ = [
    "CAPABILITY_HEADER",
    "DEFAULT_TTL",
    "MAX_GRANTS",
    "MAX_GRANTS_PER_SESSION",
    "PROOF_HEADER",
    "CapabilityIssuer",
    "CapabilityRefused",
    "Delivery",
    "Grant",
    "binding_of",
    "check_delivery",
]

#: The handshake headers of a delivery connection: the token, and the source's proof.
CAPABILITY_HEADER = "X-Fedtensor-Capability"
PROOF_HEADER = "X-Fedtensor-Proof"

#: Seconds a capability can be redeemed after it was issued, unless the worker says.
DEFAULT_TTL = 60.0

#: Capabilities one worker keeps outstanding at most (all clients together), and one
#: client's session at most (so that one client cannot stop the others from moving).
MAX_GRANTS = 10_000
MAX_GRANTS_PER_SESSION = 256

_TOKEN_DOMAIN = b"fedtensor capability v1\x00"
_PROOF_DOMAIN = b"fedtensor delivery proof v1\x00"
_MAX_TOKEN = 4096


class CapabilityRefused(FedTensorError):
    """A capability was missing, forged, expired, already used or another client's."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: bytes, domain: bytes, data: str) -> str:
    return _b64(hmac.new(key, domain + data.encode("ascii"), hashlib.sha256).digest())


def binding_of(secret: str) -> str:
    """The binding a token carries for the client secret ``secret`` (hex SHA-256)."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _verified_fields(key: bytes, token: object) -> dict[str, Any]:
    """The fields of ``token`` once its signature checks out under ``key``."""
    if not isinstance(token, str) or len(token) > _MAX_TOKEN or token.count(".") != 1:
        raise CapabilityRefused("not a capability token")
    payload, mac = token.split(".")
    if not hmac.compare_digest(
        mac.encode("ascii", "replace"), _mac(key, _TOKEN_DOMAIN, payload).encode()
    ):
        raise CapabilityRefused(
            "the capability's signature is wrong: it was forged or altered, or issued by a "
            "worker with another federation key"
        )
    try:
        fields = json.loads(_unb64(payload))
    except ValueError as exc:  # signed by a worker, so only a bug gets here
        raise CapabilityRefused(f"unreadable capability: {exc}") from None
    if not isinstance(fields, dict):
        raise CapabilityRefused("unreadable capability")
    return fields


@dataclass(frozen=True)
class Grant:
    """What a redeemed capability lets its bearer do: store one value, there."""

    session: Any  # the target's Session (typed loosely: this module knows no actor)
    object_id: int
    worker: str


@dataclass(frozen=True)
class Delivery:
    """Where a source worker delivers, once it checked a token (see :func:`check_delivery`)."""

    url: str
    max_message: int
    token: str
    proof: str


class CapabilityIssuer:
    """The target's side: issues capabilities and redeems them, each once.

    ``issue`` runs on the actor's thread, ``redeem`` on the event loop's: a lock
    guards the table. ``url`` is called when a capability is issued (the server
    knows its address only once it listens).
    """

    def __init__(
        self,
        worker: str,
        key: bytes | None,
        url: Callable[[], str | None],
        *,
        ttl: float = DEFAULT_TTL,
        max_message: int = 1 << 20,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.worker = worker
        self._key = key
        self._url = url
        self.ttl = ttl
        self.max_message = max_message
        self._clock = clock
        self._lock = threading.Lock()
        self._grants: dict[str, tuple[float, Grant]] = {}

    def _require_key(self) -> bytes:
        if self._key is None:
            raise CapabilityRefused(
                f"worker {self.worker!r} has no federation key, so it cannot take part in "
                "moving tensors between workers: start every worker with the same secret "
                "in FEDTENSOR_FEDERATION_KEY (or --federation-key-env NAME)"
            )
        return self._key

    def issue(self, session: Any, object_id: object, binding: object) -> str:
        """A token that lets a worker store one value under ``object_id`` in ``session``."""
        key = self._require_key()
        url = self._url()
        if url is None:
            raise CapabilityRefused(f"worker {self.worker!r} does not know its own URL yet")
        if type(object_id) is not int or not 0 <= object_id < 1 << 63:
            raise CapabilityRefused("the object id must be an int in [0, 2**63)")
        if not isinstance(binding, str) or len(binding) != 64:
            raise CapabilityRefused("the binding must be a hex SHA-256 (64 characters)")
        now = self._clock()
        grant_id = secrets.token_hex(16)
        with self._lock:
            for expired in [g for g, (deadline, _) in self._grants.items() if deadline <= now]:
                del self._grants[expired]
            if len(self._grants) >= MAX_GRANTS:
                raise CapabilityRefused(
                    f"worker {self.worker!r} has {MAX_GRANTS} capabilities outstanding"
                )
            mine = sum(1 for _, grant in self._grants.values() if grant.session is session)
            if mine >= MAX_GRANTS_PER_SESSION:
                raise CapabilityRefused(
                    f"this client has {MAX_GRANTS_PER_SESSION} capabilities outstanding on "
                    f"worker {self.worker!r}; they expire {self.ttl:g} s after they were issued"
                )
            self._grants[grant_id] = (now + self.ttl, Grant(session, object_id, self.worker))
        fields = {
            "v": 1,
            "id": grant_id,
            "url": url,
            "msg": self.max_message,
            "bind": binding.lower(),
            "worker": self.worker,
        }
        payload = _b64(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode())
        return f"{payload}.{_mac(key, _TOKEN_DOMAIN, payload)}"

    def redeem(self, token: str | None, proof: str | None) -> Grant:
        """The grant of ``token``, spent: a second redemption is refused."""
        key = self._require_key()
        fields = _verified_fields(key, token)
        assert isinstance(token, str)
        expected = _mac(key, _PROOF_DOMAIN, token)
        if not isinstance(proof, str) or not hmac.compare_digest(
            proof.encode("ascii", "replace"), expected.encode()
        ):
            raise CapabilityRefused(
                "the delivery carries no valid proof: only a worker of the federation may "
                "redeem a capability"
            )
        with self._lock:
            entry = self._grants.pop(str(fields.get("id")), None)
        if entry is None:
            raise CapabilityRefused("the capability was already used (or never issued here)")
        deadline, grant = entry
        if deadline <= self._clock():
            raise CapabilityRefused(f"the capability expired ({self.ttl:g} s after it was issued)")
        return grant


def check_delivery(key: bytes | None, worker: str, token: object, secret: object) -> Delivery:
    """The source's checks before it connects anywhere (see the module's step 2)."""
    if key is None:
        raise CapabilityRefused(
            f"worker {worker!r} has no federation key, so it cannot deliver to other "
            "workers: start every worker with the same secret in FEDTENSOR_FEDERATION_KEY"
        )
    fields = _verified_fields(key, token)
    assert isinstance(token, str)
    if not isinstance(secret, str) or not hmac.compare_digest(
        binding_of(secret).encode(), str(fields.get("bind")).encode("ascii", "replace")
    ):
        raise CapabilityRefused(
            "the capability was issued to another client (its binding does not match this "
            "client's secret)"
        )
    url = fields.get("url")
    if not isinstance(url, str) or urlsplit(url).scheme not in ("ws", "wss"):
        raise CapabilityRefused(f"a worker delivers only to ws:// or wss:// URLs, not {url!r}")
    max_message = fields.get("msg")
    if type(max_message) is not int or max_message < 64:
        raise CapabilityRefused("the capability names no usable message size")
    return Delivery(url, max_message, token, _mac(key, _PROOF_DOMAIN, token))
