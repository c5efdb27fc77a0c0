"""Settings: the guide's `ModelSwitchingConfig`, read from `VLLM_MODEL_SWITCHING_*` variables.

Every process (API, gateway, workers, SDK, CLI) reads the same settings so that a single
environment describes a deployment. Constructing the class never reads the environment;
`from_env()` does, so that the guide's explicit `ModelSwitchingConfig(...)` means exactly
what it says.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

ENV_PREFIX = "VLLM_MODEL_SWITCHING_"

# Fields whose environment name is not simply the upper-cased field name (the guide's names).
_ENV_NAMES: dict[str, str] = {
    "enable_dynamic_registry": "ENABLE_REGISTRY",
    "enable_management_api": "ENABLE_API",
    "enable_health_monitoring": "ENABLE_MONITORING",
    "latency_warning_ms": "LATENCY_WARNING",
    "latency_critical_ms": "LATENCY_CRITICAL",
}


class ConfigError(ValueError):
    """An environment variable holds a value its setting cannot take."""


class ModelSwitchingConfig(BaseModel):
    """Settings of a turnout deployment; field names follow the user guide."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # The guide's fields.
    enable_dynamic_registry: bool = True
    max_cached_models: int = Field(5, ge=1, le=1000)
    enable_health_monitoring: bool = True
    enable_management_api: bool = True
    api_port: int = Field(8001, ge=1, le=65535)
    error_rate_warning: float = Field(0.05, ge=0, le=1)
    latency_warning_ms: float = Field(5000, gt=0)
    # How much slower (p95) than the stable version a rollout target may be, as a fraction.
    latency_tolerance: float = Field(0.1, ge=0)
    # Fewer requests than this in an evaluation window make a verdict inconclusive.
    min_requests: int = Field(20, ge=1)
    # Continuous monitoring of every live and candidate version (critical levels and
    # resource limits beyond the guide's two warnings; per model overrides through
    # `PUT /health/thresholds`).
    error_rate_critical: float = Field(0.25, ge=0, le=1)
    latency_critical_ms: float = Field(15000, gt=0)
    memory_warning_percent: float = Field(85, gt=0, le=100)
    memory_critical_percent: float = Field(95, gt=0, le=100)
    cpu_warning_percent: float = Field(90, gt=0, le=100)
    cpu_critical_percent: float = Field(98, gt=0, le=100)
    monitoring_interval_s: float = Field(30, ge=1)
    # Alerts are POSTed as JSON to these URLs (comma-separated in the environment). The
    # body has a `text` line, so a Slack incoming webhook works as is. URLs often embed a
    # secret: they are never logged.
    alert_webhook_urls: list[str] = Field(default_factory=list, repr=False)
    alert_webhook_timeout_s: float = Field(5, gt=0)
    alert_webhook_retries: int = Field(3, ge=0, le=10)
    enable_authentication: bool = False
    # The guide's single key: with authentication on it is the admin key named `default`
    # (clients, SDK and CLI send it as their key). At least 16 characters.
    api_key: str | None = Field(None, repr=False)

    # Named keys with roles (`turnout.auth`): a YAML or JSON list of {name, role,
    # key_sha256}. Holds hashes, not keys; read when the API starts.
    api_keys_file: str | None = Field(None, max_length=4096)
    # Largest request body the API reads (the largest legitimate ones, a registration or
    # a rules list, are a few KiB); larger ones are a 413 before they are read into memory.
    api_max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024)
    # Failed authentications written to the audit log per client address and minute; the
    # rest are counted in one log line, so a flood of bad keys cannot fill the table.
    # Overall at most 20 times as many per minute.
    api_auth_failures_audited_per_minute: int = Field(10, ge=0, le=10_000)
    # How long `/readyz` waits for each of the store and Temporal before calling it down.
    api_ready_timeout_s: float = Field(2, gt=0, le=60)

    # Where the parts of the stack listen and find each other.
    api_host: str = "127.0.0.1"
    api_url: str | None = None
    gateway_host: str = "127.0.0.1"
    gateway_port: int = Field(8000, ge=1, le=65535)
    # Admin endpoints (route refresh, state, stats) listen apart from client traffic. Without
    # a token they are open to anyone who can reach them, so the gateway then refuses to
    # bind them to anything but a loopback address.
    gateway_admin_host: str = "127.0.0.1"
    gateway_admin_port: int = Field(8002, ge=1, le=65535)
    # How workers reach this gateway's admin listener (e.g. its container name); by default
    # the admin bind address, or 127.0.0.1 for a wildcard bind.
    gateway_advertise_host: str | None = None
    gateway_admin_token: str | None = Field(None, repr=False)
    # Largest request body the gateway accepts (base64 images and audio make chat bodies
    # big); larger ones are refused with a 413 before reaching any engine.
    gateway_max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    # Per-request metrics (Prometheus series and the windows health verdicts read). Off
    # only to measure what recording costs: switches cannot judge health without them.
    gateway_request_metrics: bool = True
    # Most mirrored (shadow) copies one gateway keeps in flight at once. A copy is a second
    # upstream request the client never waits for; a slow or stuck shadow would otherwise
    # pile up tasks and sockets without bound. Beyond the cap a copy is skipped and counted
    # (`turnout_gateway_mirror_skipped_total`), never queued.
    gateway_mirror_max_inflight: int = Field(64, ge=1)
    temporal_address: str = "localhost:7233"
    temporal_namespace: str = "default"
    control_task_queue: str = "turnout-control"
    # The monitors' task queue; unset, the control worker runs them. Set it and run
    # `python -m workers.monitor` to give monitoring a worker of its own, so that the looks
    # of a large fleet never queue ahead of a rollout's steps on the control worker.
    monitor_task_queue: str | None = None
    database_url: str = "sqlite+aiosqlite:///.turnout/turnout.db"
    state_dir: str = ".turnout"

    # Engines on this host.
    engine_host: str = Field(default_factory=socket.gethostname)
    engine_bind_host: str = "127.0.0.1"
    # The address gateways use to reach this host's engines (a DNS name in a cluster).
    engine_advertise_host: str = "127.0.0.1"
    engine_port_start: int = Field(8100, ge=1024, le=65000)
    engine_port_end: int = Field(8199, ge=1024, le=65535)
    engine_startup_timeout_s: float = Field(900, gt=0)
    engine_python: str | None = None
    engine_kv_cache_gib: float = Field(1, gt=0)

    # How switches behave.
    gateway_live_after_s: float = Field(15, gt=0)
    route_sync_timeout_s: float = Field(60, gt=0)
    drain_timeout_s: float = Field(120, gt=0)

    @field_validator("alert_webhook_urls", mode="before")
    @classmethod
    def _split_urls(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [url.strip() for url in value.split(",") if url.strip()]
        return value

    @property
    def max_cache_size(self) -> int:
        """The guide's Quick Start reads `config.max_cache_size`."""
        return self.max_cached_models

    @property
    def engine_task_queue(self) -> str:
        return engine_task_queue(self.engine_host)

    @property
    def resolved_monitor_task_queue(self) -> str:
        return self.monitor_task_queue or self.control_task_queue

    @property
    def monitors_on_control_worker(self) -> bool:
        return self.resolved_monitor_task_queue == self.control_task_queue

    @property
    def resolved_api_url(self) -> str:
        return self.api_url or f"http://{_client_host(self.api_host)}:{self.api_port}"

    @classmethod
    def env_name(cls, field: str) -> str:
        return ENV_PREFIX + _ENV_NAMES.get(field, field.upper())

    @classmethod
    def from_env(
        cls, environ: dict[str, str] | None = None, **overrides: Any
    ) -> ModelSwitchingConfig:
        """Build settings from `VLLM_MODEL_SWITCHING_*` variables; explicit overrides win."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in cls.model_fields:
            name = cls.env_name(field)
            if name in env:
                values[field] = env[name]
        values.update(overrides)
        try:
            return cls(**values)
        except ValidationError as exc:
            problems = "; ".join(
                f"{cls.env_name(str(err['loc'][0]))}: {err['msg']}" for err in exc.errors()
            )
            raise ConfigError(f"invalid turnout settings: {problems}") from None


def engine_task_queue(host: str) -> str:
    return f"turnout-engines-{host}"


def _client_host(bind_host: str) -> str:
    return "127.0.0.1" if bind_host in ("0.0.0.0", "::", "") else bind_host


def get_model_switching_config() -> ModelSwitchingConfig:
    """The guide's accessor: settings from the environment."""
    return ModelSwitchingConfig.from_env()
