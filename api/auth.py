"""Authentication and roles for the REST API.

Authentication is ASGI middleware: it checks the key headers of every HTTP request before
routing, so an unauthenticated request never has its body read and unknown paths reveal
nothing. `/healthz` and `/readyz` are the only open paths (probes send no key). The key's
`Principal` is put on the request; each route then declares the role it needs as a
dependency, visible in its signature:

    @router.post("/switch")
    async def switch(body: SwitchRequest, principal: Operator, ...) -> ...:

`principal.name` is the actor the route writes to the audit log and passes to workflows.
A failed authentication (401) and a refused role (403) are audited, within the budget of
`turnout.auth.FailureBudget`, with method, path, client address and reason: never the
presented key nor its hash.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, status
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from turnout.auth import (
    ANONYMOUS_PRINCIPAL,
    AuthFailure,
    FailureBudget,
    KeyRing,
    Principal,
    Role,
)
from turnout.domain import AuditEntry

log = logging.getLogger("turnout.api.auth")

# Paths anyone may call: liveness and readiness probes carry no key.
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
# The overall cap of audited failures per minute, as a multiple of the per-client one.
_TOTAL_PER_CLIENT = 20


class FailureAudit:
    """Writes failed authentications and refused roles to the audit log, within budget."""

    def __init__(self, per_client_per_minute: int) -> None:
        self.budget = FailureBudget(per_client=per_client_per_minute,
                                    total=per_client_per_minute * _TOTAL_PER_CLIENT)

    async def record(self, app: Any, action: str, actor: str | None, method: str, path: str,
                     client: str, details: dict[str, Any]) -> None:
        admission = self.budget.admit(client, time.monotonic())
        for who, count in admission.ended.items():
            log.warning("%d more failed authentications from %s in the last minute were "
                        "counted, not audited", count, who)
        if admission.first_suppressed:
            log.warning("failed authentications from %s: over %d this minute, the rest of "
                        "this minute's are counted, not audited", admission.client,
                        self.budget.per_client)
        if not admission.audit:
            return
        log.warning("%s: %s %s from %s (%s)", action, method, path, client,
                    ", ".join(f"{k}={v}" for k, v in details.items()))
        try:
            await app.state.store.audit(AuditEntry(
                actor=actor, action=action,
                details={"method": method, "path": path[:512], "client": client, **details}))
        except Exception:  # the refusal stands; a store outage must not turn it into a 500
            log.exception("could not audit %s from %s", action, client)


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


class AuthenticationMiddleware:
    """Sets `request.state.principal`, or answers 401 (JSON, `WWW-Authenticate: Bearer`)."""

    def __init__(self, app: ASGIApp, *, keyring: KeyRing | None, audit: FailureAudit) -> None:
        self.app = app
        self.keyring = keyring
        self.audit = audit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        if self.keyring is None:
            state["principal"] = ANONYMOUS_PRINCIPAL
        elif scope["path"] not in OPEN_PATHS:
            headers = Headers(scope=scope)
            result = self.keyring.authenticate(headers.getlist("authorization"),
                                               headers.getlist("x-api-key"))
            if isinstance(result, AuthFailure):
                await self.audit.record(scope["app"], "auth_failed", None, scope["method"],
                                        scope["path"], _client(scope),
                                        {"reason": result.reason.value})
                response = JSONResponse({"detail": result.message},
                                        status.HTTP_401_UNAUTHORIZED,
                                        headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
            state["principal"] = result
        await self.app(scope, receive, send)


def current_principal(request: Request) -> Principal:
    """The caller, as the middleware authenticated it."""
    principal = getattr(request.state, "principal", None)
    if not isinstance(principal, Principal):  # an open path: no route there needs a role
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "an API key is required",
                            headers={"WWW-Authenticate": "Bearer"})
    return principal


async def check_role(request: Request, principal: Principal, needed: Role) -> None:
    """403 (audited) unless `principal` may make a call that needs `needed`."""
    if principal.role.allows(needed):
        return
    await request.app.state.auth_audit.record(
        request.app, "access_denied", principal.name, request.method, request.url.path,
        _client(request.scope), {"role": principal.role.value, "needed": needed.value})
    raise HTTPException(status.HTTP_403_FORBIDDEN,
                        f"key {principal.name!r} has role {principal.role.value}; this call "
                        f"needs role {needed.value}")


def require(role: Role) -> Callable[..., Any]:
    """A dependency: the caller's `Principal`, if its role allows `role` (else 403)."""

    async def dependency(request: Request) -> Principal:
        principal = current_principal(request)
        await check_role(request, principal, role)
        return principal

    dependency.required_role = role  # type: ignore[attr-defined]  # read by `route_role`
    dependency.__name__ = f"require_{role.value}"
    return dependency


Viewer = Annotated[Principal, Depends(require(Role.VIEWER))]
Operator = Annotated[Principal, Depends(require(Role.OPERATOR))]
Admin = Annotated[Principal, Depends(require(Role.ADMIN))]


def route_role(route: Any) -> Role | None:
    """The role a route's dependencies require (None: the route declares none)."""
    dependant = getattr(route, "dependant", None)
    pending = [dependant] if dependant is not None else []
    roles: list[Role] = []
    while pending:
        node = pending.pop()
        role = getattr(node.call, "required_role", None)
        if role is not None:
            roles.append(role)
        pending.extend(node.dependencies)
    return max(roles, key=lambda r: r.rank) if roles else None
