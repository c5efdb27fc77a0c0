"""Client keys of the data plane: `Authorization: Bearer <key>`, as vLLM's `--api-key`.

With `GATEWAY_API_KEYS` set, every path of the client listener but `/health` needs one of
the keys; without it nothing changes and no middleware runs. Keys are held as
BLAKE2s-256 digests and a presented key is hashed and looked up in that set: the cost is
one hash of the header, whatever the number of keys, and the lookup's timing depends only
on digests, which tell nothing about any key (a timing attack would need preimages of a
cryptographic hash). BLAKE2s rather than SHA-256: both are such hashes, and measured
inside the gateway between requests (cold caches) OpenSSL's SHA-256 cost 4.5 us per
check, Python's built-in BLAKE2s 1.5 us. The key is never logged and never forwarded to
an engine (see `proxy._FORWARDED_HEADERS`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from gateway.errors import error_response
from gateway.http import AnyResponse, Handler, Middleware, Request
from gateway.metrics import GatewayMetrics
from turnout.config import MAX_KEY_CHARS

# Paths a client may call without a key: liveness probes carry no credentials.
OPEN_PATHS = frozenset({"/health"})


def _digest(key: str) -> bytes:
    # surrogatepass: any str encodes, so a header holding odd bytes is a wrong key, not a 500
    return hashlib.blake2s(key.encode("utf-8", "surrogatepass")).digest()


class ClientKeys:
    """The keys a gateway accepts, as digests."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = frozenset(_digest(key) for key in keys)

    def __bool__(self) -> bool:
        return bool(self._digests)

    def accepts(self, authorization: str | None) -> bool:
        """Whether an `Authorization` header value carries one of the keys. Anything
        malformed (no header, another scheme, an empty or oversized token) is a no."""
        if not authorization:
            return False
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or len(token) > MAX_KEY_CHARS:
            return False
        return _digest(token) in self._digests


def client_key_auth(keys: ClientKeys, metrics: GatewayMetrics) -> Middleware:
    """A middleware answering 401 in OpenAI's shape (what OpenAI SDKs raise as
    `AuthenticationError`) to requests without a valid key; counted in
    `turnout_gateway_rejected_total{reason="unauthorized"}`, never logged per request."""

    async def middleware(request: Request, handler: Handler) -> AnyResponse:
        if request.path in OPEN_PATHS:
            return await handler(request)
        authorization = request.headers.get("Authorization")
        if not keys.accepts(authorization):
            metrics.reject("unauthorized")
            message = ("an API key is required: send it as 'Authorization: Bearer <key>'"
                       if not authorization else "the API key given is not valid")
            return error_response(401, message, type="invalid_request_error",
                                  code="invalid_api_key",
                                  headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    return middleware
