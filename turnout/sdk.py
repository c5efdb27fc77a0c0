"""The guide's Python API (`DynamicModelRegistry`, `ModelSwitcher`) as a client of the REST API.

The guide calls `register_model`, `get_switch_status` and `validate_switch_request`
synchronously, even from inside coroutines, and awaits `switch_model`. Going through the
REST API keeps those call shapes possible without a second event loop, and keeps one
place (the API) where input is validated and switches are started.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, Field

from turnout.config import ModelSwitchingConfig
from turnout.domain import (
    ModelInfo,
    OmniModelConfig,
    OperationStatus,
    SwitchingStrategyType,
    model_id_for,
)
from turnout.rules import ModelRules, RoutingRules

log = logging.getLogger(__name__)


class TurnoutAPIError(RuntimeError):
    """The API refused a call; `detail` is its JSON error body's detail."""

    def __init__(self, status_code: int, detail: Any) -> None:
        self.status_code = status_code
        self.detail = detail
        hint = _HINTS.get(status_code)
        super().__init__(f"HTTP {status_code}: {detail}" + (f" ({hint})" if hint else ""))


# What to do about a refused key, said once with the error.
_HINTS = {
    401: f"set {ModelSwitchingConfig.env_name('api_key')} to a key the API knows",
    403: "ask an admin for a key with that role",
}


class SwitchResult(BaseModel):
    """What `switch_model` returns: `success` and `operation_id` as in the guide."""

    success: bool
    operation_id: str | None = None
    status: OperationStatus | None = None
    message: str = ""
    errors: list[str] = Field(default_factory=list)


class _Client:
    """Shared HTTP plumbing: base URL and API key from the settings."""

    def __init__(self, api_url: str | None, api_key: str | None,
                 settings: dict[str, Any]) -> None:
        known = {k: v for k, v in settings.items() if k in ModelSwitchingConfig.model_fields}
        self.settings = ModelSwitchingConfig.from_env(**known)
        self.api_url = (api_url or self.settings.resolved_api_url).rstrip("/")
        key = api_key or self.settings.api_key
        if key is not None and not (key.isascii() and key.isprintable() and " " not in key):
            raise ValueError(f"the API key ({ModelSwitchingConfig.env_name('api_key')}) must "
                             f"be printable ASCII without spaces")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        with httpx.Client(base_url=self.api_url, headers=self.headers, timeout=30) as client:
            return _json(client.request(method, path, **kwargs))

    async def arequest(self, method: str, path: str, **kwargs: Any) -> Any:
        async with httpx.AsyncClient(base_url=self.api_url, headers=self.headers,
                                     timeout=30) as client:
            return _json(await client.request(method, path, **kwargs))

    # The same, for answers that are a JSON object or a list of objects (checked).
    def obj(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        return _shaped(self.request(method, path, **kwargs), dict, path)

    async def aobj(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        return _shaped(await self.arequest(method, path, **kwargs), dict, path)

    def items(self, method: str, path: str, **kwargs: Any) -> list[dict[str, Any]]:
        return _shaped(self.request(method, path, **kwargs), list, path)


def local_model_path(model: str) -> str:
    """`model` as an absolute path when it names a directory here (`./models/v1`,
    `~/models/v1`); anything else (a hub id, a path only the engine host has) as given."""
    path = os.path.expanduser(model)
    if not os.path.isabs(path) and os.path.isdir(path):
        return os.path.abspath(path)
    return path if path != model and os.path.isdir(path) else model


_Shape = TypeVar("_Shape", dict[str, Any], list[dict[str, Any]])


def _shaped(body: Any, kind: type[_Shape], path: str) -> _Shape:
    """`body` if it is of `kind` (an object, a list); the API never answers otherwise."""
    if not isinstance(body, kind):
        raise TurnoutAPIError(502, f"{path} answered {type(body).__name__}, not "
                                   f"{kind.__name__}")
    return body


def _json(response: httpx.Response) -> Any:
    try:
        body = response.json()
    except ValueError:
        body = {"detail": response.text}
    if response.status_code >= 400:
        raise TurnoutAPIError(response.status_code, body.get("detail", body))
    return body


class DynamicModelRegistry:
    """Registers model versions; the guide's registry.

    `base_registry` and the guide's other keyword settings are accepted so that
    `DynamicModelRegistry(base_registry, **config.__dict__)` works as written.
    """

    def __init__(self, base_registry: Any = None, *, api_url: str | None = None,
                 api_key: str | None = None, **settings: Any) -> None:
        self.base_registry = base_registry
        self._client = _Client(api_url, api_key, settings)
        self._cleanup: asyncio.Task[None] | None = None
        # None until the first check; then whether the API answered the last one.
        self.api_reachable: bool | None = None

    async def start_cleanup_task(self, interval_s: float | None = None) -> None:
        """The guide's background task of the registry (idempotent).

        Unused engines are cleaned up by the engine worker on each serving host (it owns
        them and the store records them), not by a client. What a client can usefully do
        in the background is watch its connection: this checks the API every interval
        (`monitoring_interval_s` by default) and logs once when it stops answering and once
        when it is back, so a broken deployment shows in the caller's log before a
        `register_model` or `switch_model` fails. `api_reachable` holds the last answer.
        """
        if self._cleanup is None or self._cleanup.done():
            every = interval_s or self._client.settings.monitoring_interval_s
            self._cleanup = asyncio.create_task(self._watch_api(every),
                                                name="turnout-registry-watch")

    async def stop_cleanup_task(self) -> None:
        task, self._cleanup = self._cleanup, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def check_api(self) -> bool:
        """Whether the API answers `GET /healthz` now; logs a change of answer once."""
        try:
            await self._client.arequest("GET", "/healthz", timeout=10)
            reachable, problem = True, ""
        except (httpx.TransportError, TurnoutAPIError) as exc:
            reachable = False
            problem = f"HTTP {exc.status_code}" if isinstance(exc, TurnoutAPIError) \
                else type(exc).__name__
        if not reachable and self.api_reachable is not False:
            log.warning("the turnout API at %s does not answer (%s)", self._client.api_url,
                        problem)
        elif reachable and self.api_reachable is False:
            log.info("the turnout API at %s answers again", self._client.api_url)
        self.api_reachable = reachable
        return reachable

    async def _watch_api(self, interval_s: float) -> None:
        while True:
            await self.check_api()
            await asyncio.sleep(interval_s)

    def register_model(self, config: OmniModelConfig, version: str,
                       metadata: dict[str, Any] | None = None, *,
                       aliases: list[str] | None = None) -> str:
        """Register `version` of the model `config` describes; returns the model id.

        A `model` that is a directory on this machine is sent as its absolute path (the
        API accepts only absolute directories under its model roots, or hub ids).
        """
        body = {**config.model_dump(exclude_none=True), "version": version,
                "metadata": metadata or {}, "aliases": aliases or []}
        if config.endpoint is None:
            body["model"] = local_model_path(config.model)
        created = self._client.request("POST", "/models", json=body)
        return str(created["model_id"])

    def get_model(self, model_id: str) -> ModelInfo:
        return ModelInfo.model_validate(self._client.request("GET", f"/models/{model_id}"))

    def list_models(self) -> list[ModelInfo]:
        return [ModelInfo.model_validate(m) for m in self._client.request("GET", "/models")]

    def set_routing_rules(self, model_id: str,
                          rules: RoutingRules | list[dict[str, Any]], *,
                          requested_by: str | None = None) -> ModelRules:
        """Replace the model's routing rules (`[]` removes them); see `turnout.rules`."""
        parsed = rules if isinstance(rules, RoutingRules) \
            else RoutingRules.model_validate({"rules": rules})
        body = {**parsed.model_dump(mode="json", exclude_none=True),
                "requested_by": requested_by}
        return ModelRules.model_validate(
            self._client.request("PUT", f"/models/{model_id}/rules", json=body))

    def get_routing_rules(self, model_id: str) -> ModelRules:
        return ModelRules.model_validate(
            self._client.request("GET", f"/models/{model_id}/rules"))

    @staticmethod
    def model_id(model_arch: str, model_stage: str) -> str:
        return model_id_for(model_arch, model_stage)


class ModelSwitcher:
    """Starts and watches switches; the guide's switcher."""

    def __init__(self, registry: DynamicModelRegistry | None = None, cache: Any = None,
                 transition_manager: Any = None, *, api_url: str | None = None,
                 api_key: str | None = None, **settings: Any) -> None:
        self.registry = registry
        self.cache = cache
        self.transition_manager = transition_manager
        if registry is not None and api_url is None and api_key is None and not settings:
            self._client = registry._client
        else:
            self._client = _Client(api_url, api_key, settings)

    async def switch_model(
        self, model_id: str, target_version: str,
        strategy_type: SwitchingStrategyType | str = SwitchingStrategyType.IMMEDIATE,
        strategy_config: dict[str, Any] | None = None, *, wait: bool | None = None,
        timeout: float = 1800, requested_by: str | None = None,
    ) -> SwitchResult:
        """Start a switch. An immediate switch is awaited to its end (it takes seconds once
        the target is loaded), so `result.success` says whether it happened; other
        strategies return once accepted: poll `get_switch_status(result.operation_id)`."""
        strategy = SwitchingStrategyType(strategy_type)
        body = {"model_id": model_id, "target_version": target_version,
                "strategy": strategy.value, "strategy_config": strategy_config or {},
                "requested_by": requested_by}
        try:
            accepted = await self._client.arequest("POST", "/switch", json=body)
        except TurnoutAPIError as exc:
            return SwitchResult(success=False, message=str(exc), errors=_messages(exc.detail))
        operation_id = accepted["operation_id"]
        if wait is None:
            wait = strategy is SwitchingStrategyType.IMMEDIATE
        if not wait:
            return SwitchResult(success=True, operation_id=operation_id,
                                status=OperationStatus(accepted["status"]),
                                message=accepted["message"])
        status = await self.wait_for(operation_id, timeout=timeout)
        return SwitchResult(success=status["status"] == OperationStatus.COMPLETED,
                            operation_id=operation_id, status=OperationStatus(status["status"]),
                            message=status.get("reason") or status.get("phase") or "")

    def get_switch_status(self, operation_id: str) -> dict[str, Any]:
        """`status` (pending/running/paused/completed/failed), `progress` 0..1, and more."""
        return self._client.obj("GET", f"/switch/operations/{operation_id}")

    async def aget_switch_status(self, operation_id: str) -> dict[str, Any]:
        return await self._client.aobj("GET", f"/switch/operations/{operation_id}")

    async def wait_for(self, operation_id: str, *, timeout: float = 1800,
                       interval: float = 0.5) -> dict[str, Any]:
        """Poll until the operation is `completed` or `failed`."""
        deadline = time.monotonic() + timeout
        while True:
            status = await self.aget_switch_status(operation_id)
            if OperationStatus(status["status"]).terminal:
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"operation {operation_id} still {status['status']} "
                                   f"after {timeout:g}s")
            await asyncio.sleep(interval)

    # ------------------------------------------------------------------ operator controls

    def rollback(self, operation_id: str, reason: str | None = None, *,
                 requested_by: str | None = None) -> dict[str, Any]:
        """Send all traffic back to the stable version and end the switch (`rolled_back`).

        Returns the status once traffic is back; raises `TurnoutAPIError` (409) if the
        switch refuses, e.g. because it has already ended."""
        return self._control(operation_id, "rollback", reason, requested_by)

    def pause(self, operation_id: str, reason: str | None = None, *,
              requested_by: str | None = None) -> dict[str, Any]:
        """Freeze the switch's weights and evaluation timer (status `paused`)."""
        return self._control(operation_id, "pause", reason, requested_by)

    def resume(self, operation_id: str, reason: str | None = None, *,
               requested_by: str | None = None) -> dict[str, Any]:
        """Continue a paused switch where it stopped."""
        return self._control(operation_id, "resume", reason, requested_by)

    def promote(self, operation_id: str, reason: str | None = None, *,
                requested_by: str | None = None) -> dict[str, Any]:
        """Jump to 100% on the target now; the switch then finishes as `promoted`."""
        return self._control(operation_id, "promote", reason, requested_by)

    def abort(self, operation_id: str, reason: str | None = None, *,
              requested_by: str | None = None) -> dict[str, Any]:
        """Stop the switch and return traffic to the stable version (`aborted`)."""
        return self._control(operation_id, "abort", reason, requested_by)

    def emergency_rollback(self, model_id: str, reason: str | None = None, *,
                           requested_by: str | None = None) -> dict[str, Any]:
        """Roll back the model's active switch, or switch it straight back to its previous
        version. Returns the rolled-back switch's status, or the new operation's
        acceptance (`operation_id`, `message`); raises `TurnoutAPIError` (409 when there is
        no previous version)."""
        return self._client.obj("POST", f"/models/{model_id}/rollback",
                                json=_control_body(reason, requested_by))

    def list_operations(self, model_id: str | None = None,
                        status: OperationStatus | str | None = None) -> list[dict[str, Any]]:
        """Switching operations, newest first, optionally of one model and in one status."""
        params = {"model_id": model_id,
                  "status": OperationStatus(status).value if status is not None else None}
        return self._client.items("GET", "/switch/operations",
                                  params={k: v for k, v in params.items() if v is not None})

    def list_audit(self, *, model_id: str | None = None, actor: str | None = None,
                   action: str | None = None, since: str | None = None,
                   before: int | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Audit entries, newest first (`GET /audit`); pass the last entry's `id` as
        `before` for the page after it."""
        params = {"model_id": model_id, "actor": actor, "action": action, "since": since,
                  "before": before, "limit": limit}
        return self._client.items("GET", "/audit",
                                  params={k: v for k, v in params.items() if v is not None})

    def whoami(self) -> dict[str, Any]:
        """The name (the actor in the audit log) and role of the key this client sends."""
        return self._client.obj("GET", "/auth/whoami")

    def _control(self, operation_id: str, action: str, reason: str | None,
                 requested_by: str | None) -> dict[str, Any]:
        return self._client.obj("POST", f"/switch/operations/{operation_id}/{action}",
                                json=_control_body(reason, requested_by))

    def start_shadow(self, model_id: str, version: str, percentage: float = 100.0, *,
                     duration_minutes: float | None = None,
                     requested_by: str | None = None) -> dict[str, Any]:
        """Copy `percentage` of the model's requests to `version` (answers measured, never
        returned); see `POST /models/{model_id}/shadow`."""
        body = {"version": version, "percentage": percentage,
                "duration_minutes": duration_minutes, "requested_by": requested_by}
        return self._client.obj("POST", f"/models/{model_id}/shadow", json=body)

    def get_shadow(self, model_id: str) -> dict[str, Any]:
        return self._client.obj("GET", f"/models/{model_id}/shadow")

    def stop_shadow(self, model_id: str, reason: str | None = None, *,
                    requested_by: str | None = None) -> dict[str, Any]:
        return self._client.obj("DELETE", f"/models/{model_id}/shadow",
                                json=_control_body(reason, requested_by))

    def validate_switch_request(
        self, model_id: str, target_version: str,
        strategy_type: SwitchingStrategyType | str = SwitchingStrategyType.IMMEDIATE,
        strategy_config: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """`{"valid": bool, "errors": [...]}`: what a switch would be refused for."""
        body = {"model_id": model_id, "target_version": target_version,
                "strategy": SwitchingStrategyType(strategy_type).value,
                "strategy_config": strategy_config or {}}
        try:
            return self._client.obj("POST", "/switch/validate", json=body)
        except TurnoutAPIError as exc:
            return {"valid": False, "errors": _messages(exc.detail)}


def _control_body(reason: str | None, requested_by: str | None) -> dict[str, Any]:
    return {"reason": reason, "requested_by": requested_by}


def _messages(detail: Any) -> list[str]:
    if isinstance(detail, list):
        return [f"{'.'.join(str(p) for p in d.get('loc', ()) if p != 'body')}: {d.get('msg')}"
                if isinstance(d, dict) else str(d) for d in detail]
    return [str(detail)]
