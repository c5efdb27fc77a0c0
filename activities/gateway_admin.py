"""Client of the gateways' admin endpoints, shared by the traffic and health activities.

Answers are parsed into the admin surface's models (`turnout.gateway_protocol`), the same
the gateway builds them from.
"""

from __future__ import annotations

import logging

import httpx

from turnout import tracing
from turnout.domain import GatewayInfo
from turnout.gateway_protocol import AdminState, StatsResponse, VersionStats

log = logging.getLogger("turnout.gateway_admin")


class GatewayAdmin:
    def __init__(self, token: str | None, timeout_s: float = 5.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # With tracing on, each call carries the activity's trace to the gateway.
        hooks = {"request": [_traced]} if tracing.tracer() is not None else {}
        self._client = httpx.AsyncClient(headers=headers, timeout=timeout_s,
                                         event_hooks=hooks)

    async def close(self) -> None:
        await self._client.aclose()

    async def refresh(self, gateway: GatewayInfo, model_id: str | None = None
                      ) -> AdminState:
        """Push: ask a gateway to reload its routes (or one model's) from the store now."""
        params = {"model_id": model_id} if model_id is not None else None
        response = await self._client.post(f"{gateway.admin_url}/admin/routes/refresh",
                                           params=params)
        response.raise_for_status()
        return AdminState.model_validate_json(response.content)

    async def state(self, gateway: GatewayInfo) -> AdminState:
        response = await self._client.get(f"{gateway.admin_url}/admin/state")
        response.raise_for_status()
        return AdminState.model_validate_json(response.content)

    async def stats(self, gateway: GatewayInfo, since: float | None = None,
                    until: float | None = None, *, model_id: str | None = None,
                    warmup: tuple[str, int] | None = None) -> StatsResponse:
        """Per-version counters; with `since`/`until` (unix seconds) each version's `window`.
        With `model_id`, that model only (a gateway serving hundreds of models would
        otherwise send every model's raw window to judge one)."""
        params = {k: repr(float(v)) for k, v in (("since", since), ("until", until))
                  if v is not None}
        if model_id is not None:
            params["model_id"] = model_id
        if warmup is not None:  # (version, requests): see GatewayMetrics.stats_by_model
            params["warmup_version"], params["warmup_requests"] = warmup[0], str(warmup[1])
        response = await self._client.get(f"{gateway.admin_url}/admin/stats", params=params)
        response.raise_for_status()
        return StatsResponse.model_validate_json(response.content)

    async def model_stats(self, gateways: list[GatewayInfo], model_id: str, since: float,
                          until: float, *, warmup: tuple[str, int] | None = None
                          ) -> tuple[list[dict[str, VersionStats]], list[str]]:
        """Each answering gateway's per-version stats of one model with their windows over
        [since, until], and the ids of the gateways that did not answer (skipped with a
        warning: their share of the traffic is missing, which can make a judgment less
        sure, never healthier)."""
        answered: list[dict[str, VersionStats]] = []
        skipped: list[str] = []
        for gateway in gateways:
            try:
                body = await self.stats(gateway, since, until, model_id=model_id,
                                        warmup=warmup)
            except Exception as exc:
                log.warning("gateway %s unreachable for the stats of %s, skipped: %r",
                            gateway.gateway_id, model_id, exc)
                skipped.append(gateway.gateway_id)
                continue
            answered.append(body.stats.get(model_id, {}))
        return answered, skipped


async def _traced(request: httpx.Request) -> None:
    tracing.inject(request.headers)
