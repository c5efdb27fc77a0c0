"""Settings: the guide's `ModelSwitchingConfig`, read from `VLLM_MODEL_SWITCHING_*` variables.

Every process (API, gateway, workers, SDK, CLI) reads the same settings so that a single
environment describes a deployment. Constructing the class never reads the environment;
`from_env()` does, so that the guide's explicit `ModelSwitchingConfig(...)` means exactly
what it says.
"""

from __future__ import annotations

import os
import re
import socket
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

ENV_PREFIX = "VLLM_MODEL_SWITCHING_"
# What a credential's environment variable may be called (`api_key_env`).
ENV_NAME_PATTERN = r"^[A-Z_][A-Z0-9_]{0,127}$"

# Fields whose environment name is not simply the upper-cased field name (the guide's names).
_ENV_NAMES: dict[str, str] = {
    "enable_dynamic_registry": "ENABLE_REGISTRY",
    "enable_management_api": "ENABLE_API",
    "enable_health_monitoring": "ENABLE_MONITORING",
    "latency_warning_ms": "LATENCY_WARNING",
    "latency_critical_ms": "LATENCY_CRITICAL",
}


# Bounds of a client key of the gateway (`gateway_api_keys`).
MIN_KEY_CHARS = 16
MAX_KEY_CHARS = 256


class ConfigError(ValueError):
    """An environment variable holds a value its setting cannot take."""


class ModelSwitchingConfig(BaseModel):
    """Settings of a turnout deployment; field names follow the user guide."""

    # hide_input_in_errors: a refused value may be a secret (a key, a token, a URL).
    model_config = ConfigDict(extra="forbid", validate_assignment=True,
                              hide_input_in_errors=True)

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
    # ...and by how many milliseconds at least (the target fails a latency guard only when
    # it is worse by more than both). Two identical CPU engines on a 2-core host running
    # the whole stack differed here at p95 by 5-11 ms (22 vs 30 ms once: +37%, p = 0.006,
    # an A/A canary rolled back); an LLM answer's p95 is rarely under 200 ms, where 20 ms
    # is within the 10% anyway.
    latency_tolerance_ms: float = Field(20, ge=0, le=60_000)
    # Fewer requests than this in an evaluation window make a verdict inconclusive.
    min_requests: int = Field(20, ge=1)
    # A fresh engine's warm-up, left out of a rollout target's first judged window (both
    # sides, so they still cover one span): its first requests at each gateway, and its
    # first seconds. Measured here on CPU engines of the same weights, interleaved: a fresh
    # engine's first 25 requests had p95 up to 2x the warm one's (single answers of 460
    # and 550 ms against ~150), the next ones none (p95 ratio 0.95-1.0).
    warmup_requests: int = Field(25, ge=0, le=100_000)
    warmup_seconds: float = Field(0, ge=0, le=3600)
    # Continuous monitoring of every live and candidate version (critical levels and
    # resource limits beyond the guide's two warnings; per model overrides through
    # `PUT /health/thresholds`).
    error_rate_critical: float = Field(0.25, ge=0, le=1)
    latency_critical_ms: float = Field(15000, gt=0)
    memory_warning_percent: float = Field(85, gt=0, le=100)
    memory_critical_percent: float = Field(95, gt=0, le=100)
    cpu_warning_percent: float = Field(90, gt=0, le=100)
    cpu_critical_percent: float = Field(98, gt=0, le=100)
    # Whether busy CPUs raise alerts: `off` (a CPU engine busy with its work is not
    # unhealthy: an A/A run at default settings raised a critical "cpu 100%" on a version
    # serving at p95 15 ms), `with_latency` (only while p95 latency is over its warning),
    # or `on` (the CPU levels alone).
    cpu_alerts: Literal["off", "with_latency", "on"] = "off"
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
    # How long an API call waits for a store or Temporal that does not answer (connecting,
    # a pool connection, a statement, SQLite's lock, Temporal's retries of an unreachable
    # server) before answering 503 with the part at fault: a client learns of an outage in
    # seconds instead of hanging until its own timeout. Long enough for a busy store.
    api_backend_timeout_s: float = Field(5, ge=0.5, le=60)

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
    # How long a gateway keeps the stats (windows, Prometheus series) of a version that is
    # in no route and has nothing in flight; then they are dropped, so memory stays bounded
    # over any number of rollouts. Verdicts and monitor looks read windows ending about
    # when they ask, but a window can start before a version leaves (the stable version
    # during a canary's last step, at 0%), so a version is kept for the longest window
    # anyone asks for: a canary's evaluation period is at most a day.
    gateway_stats_retention_s: float = Field(24 * 3600, ge=1, le=30 * 24 * 3600)
    # Most connections one gateway opens to one upstream (an engine's host:port); more
    # requests wait for a free one (and count as in flight). A bound on what one gateway
    # can pile onto an engine; high enough not to limit a 256-stream benchmark.
    gateway_upstream_max_connections: int = Field(1024, ge=1, le=65536)
    # Keys clients must send as `Authorization: Bearer <key>` to every gateway path but
    # `/health` (comma-separated in the environment; empty: no key needed, as before).
    # Secret: never logged, never forwarded to engines.
    gateway_api_keys: list[str] = Field(default_factory=list, repr=False, max_length=1000)
    # Serve `/metrics` on the client listener too (it is always on the admin listener,
    # behind the admin token). With client keys set, it needs a client key there.
    gateway_metrics_on_client: bool = True
    # Share of client requests the gateway traces (0..1) when tracing is on (an OTLP
    # endpoint is set, see `turnout.tracing`); a request that arrives with a W3C
    # `traceparent` is traced too. 0, the default: the request path runs no tracing code.
    # A share, not all: every traced request costs a span and its export.
    gateway_trace_sample: float = Field(0.0, ge=0, le=1)
    # Gateway processes sharing the client port (SO_REUSEPORT), one per core to use; each
    # is a gateway replica of its own with the admin port GATEWAY_ADMIN_PORT + i. 1: one
    # process, as `make run` runs it. Bounded by the cores a host plausibly has.
    gateway_workers: int = Field(1, ge=1, le=64)
    # Where a process serves the Temporal SDK's Prometheus metrics (workflow and activity
    # task latencies, failures, poller counts): host and port; 0, the default, serves
    # none. Loopback unless set: a deployment scrapes it (docker-compose does, on 9000).
    temporal_metrics_host: str = "127.0.0.1"
    temporal_metrics_port: int = Field(0, ge=0, le=65535)
    temporal_address: str = "localhost:7233"
    temporal_namespace: str = "default"
    control_task_queue: str = "turnout-control"
    # The monitors' task queue; unset, the control worker runs them. Set it and run
    # `python -m workers.monitor` to give monitoring a worker of its own, so that the looks
    # of a large fleet never queue ahead of a rollout's steps on the control worker.
    monitor_task_queue: str | None = None
    # A PostgreSQL URL may carry a password: hidden from the default repr, shown masked
    # (`redact_url`) in the settings' repr and str.
    database_url: str = Field("sqlite+aiosqlite:///.turnout/turnout.db", repr=False)
    state_dir: str = ".turnout"

    # Engines on this host.
    # At most the store's column for host ids (PostgreSQL refuses longer ones).
    engine_host: str = Field(default_factory=socket.gethostname, min_length=1,
                             max_length=256)
    engine_bind_host: str = "127.0.0.1"
    # The address gateways use to reach this host's engines (a DNS name in a cluster).
    engine_advertise_host: str = "127.0.0.1"
    engine_port_start: int = Field(8100, ge=1024, le=65000)
    engine_port_end: int = Field(8199, ge=1024, le=65535)
    engine_startup_timeout_s: float = Field(900, gt=0)
    # A starting engine that writes no new log line and does not answer /health for this
    # long is failed (`EngineStalled`, with its log's last lines) instead of waiting out
    # `engine_startup_timeout_s`. vLLM logs every phase of a start (config, engine core,
    # each weight shard, KV cache, warm-up); its longest silent phases are reading one
    # large shard from slow storage and compiling a big model's graphs, a minute or two:
    # 5 minutes leaves room for both.
    engine_stall_timeout_s: float = Field(300, gt=0, le=86_400)
    # Cores per engine on a CPU host: each engine's processes (API server, engine core,
    # worker threads) run on cores of their own, so a new engine never waits behind a busy
    # one (`turnout/cpu_cores.py`). 0: half the host's cores (at least one), so the two
    # engines of a switch never share. Ignored on GPU hosts, and where the worker's
    # environment sets VLLM_CPU_OMP_THREADS_BIND (the operator binds engines then).
    engine_cpu_cores: int = Field(0, ge=0, le=4096)
    engine_python: str | None = None
    engine_kv_cache_gib: float = Field(1, gt=0)
    # Engines get an allowlisted environment (`turnout.environments.engine_environment`):
    # what Python, torch and vLLM read, never turnout's settings nor the worker's other
    # variables. Extra names to pass on (a trailing `*` passes every name with that
    # prefix), e.g. `RAY_*` for a setup that needs them (comma-separated).
    engine_env_passthrough: list[str] = Field(default_factory=list, max_length=64)

    # Secrets beyond turnout's own settings: names of environment variables that hold the
    # credentials of external endpoints (what versions name in `api_key_env`). The local
    # stack (`make run`) hands these variables to the gateway and the control worker only,
    # the two processes that call external endpoints (comma-separated). A registration's
    # `api_key_env` must be one of them: the gateway sends that variable's value to the
    # version's endpoint, so naming any variable would let a registration send any secret
    # of those processes to a host of its choice.
    endpoint_credential_envs: list[str] = Field(default_factory=list, max_length=64)

    # The engine fleet. Each engine worker claims its `engine_host` id in the store and
    # heartbeats; a host silent for `engine_host_live_after_s` is left out of placement,
    # and its engines out of routes (the gateways judge it every reconcile).
    engine_host_live_after_s: float = Field(20, ge=2, le=3600)
    # Memory engines may fill on this host; unset: `engine_memory_fraction` of the host's
    # memory (GPU memory on CUDA hosts).
    engine_memory_gib: float | None = Field(None, gt=0)
    engine_memory_fraction: float = Field(0.8, gt=0, le=1)
    # What one engine needs beside its weights and KV cache: Python, torch and the API
    # server (measured here: a tiny model's CPU engine holds 1.9 GiB besides a 1 GiB cache).
    engine_overhead_gib: float = Field(2, ge=0)
    # On CUDA hosts, put cached engines (standby, preloaded) to sleep (vLLM's sleep mode,
    # level 1: weights moved to CPU memory) and wake them before they take traffic. Off
    # by default: vLLM serves /sleep and /wake_up only in its development mode, which
    # also opens its other development endpoints on each engine's port.
    engine_sleep_mode: bool = False
    # After a switch the previous live version stays loaded this long, so a rollback is a
    # route change, not a cold start (0: stop it as soon as it is drained).
    standby_minutes: float = Field(30, ge=0, le=7 * 24 * 60)

    # How switches behave.
    gateway_live_after_s: float = Field(15, gt=0)
    route_sync_timeout_s: float = Field(60, gt=0)
    drain_timeout_s: float = Field(120, gt=0)

    # What a registration may point at (checked by the API, and again by the engine worker
    # and the control worker when they load or route to a version).
    # Directories local model versions must lie under (comma-separated in the
    # environment); empty: `<state_dir>/models`, where `make run` puts its tiny models.
    # A relative root is taken from the process's working directory.
    model_roots: list[str] = Field(default_factory=list, max_length=32)
    # vLLM's `trust_remote_code` runs Python code shipped with a model: refused in
    # `engine_args` unless an operator turns this on (on the API and the engine workers).
    allow_trust_remote_code: bool = False
    # External endpoints on loopback or private addresses (127/8, 10/8, 192.168/16, ...,
    # `localhost`) are refused unless this is on: from inside a network those reach
    # services no prompt should go to. Link-local and metadata addresses are always refused.
    allow_private_endpoints: bool = False
    # If set, external endpoints may only name these hosts (comma-separated; `*.domain`
    # for any name under a domain). The only guard against DNS rebinding: recommended
    # wherever versions route to external endpoints.
    endpoint_hosts: list[str] = Field(default_factory=list, max_length=256)
    # How long the API waits for an endpoint's host name to resolve at registration.
    endpoint_resolve_timeout_s: float = Field(2, gt=0, le=30)

    @field_validator("alert_webhook_urls", "engine_env_passthrough",
                     "endpoint_credential_envs", "gateway_api_keys", "model_roots",
                     "endpoint_hosts", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("model_roots")
    @classmethod
    def _roots_are_paths(cls, value: list[str]) -> list[str]:
        for root in value:
            if len(root) > 1024 or "\x00" in root:
                raise ValueError(f"not a directory path: {root[:80]!r}")
        return value

    @property
    def resolved_model_roots(self) -> list[str]:
        """The model roots as absolute, normalised paths (symlinks kept)."""
        roots = self.model_roots or [os.path.join(self.state_dir, "models")]
        return [os.path.normpath(os.path.abspath(os.path.expanduser(r))) for r in roots]

    @field_validator("engine_env_passthrough", "endpoint_credential_envs")
    @classmethod
    def _variable_names(cls, names: list[str], info: Any) -> list[str]:
        prefix_ok = info.field_name == "engine_env_passthrough"
        for name in names:
            pattern = _ENV_PATTERN if prefix_ok else _ENV_NAME
            if not pattern.fullmatch(name):
                raise ValueError(f"{name[:80]!r} is not an environment variable name")
            if name.rstrip("*").startswith(ENV_PREFIX):
                # turnout's settings hold its own secrets: they go where turnout sends them.
                raise ValueError(f"{name!r} names turnout's own settings")
        return names

    def __repr_args__(self) -> Any:
        """The repr and str: secrets left out, the database URL shown with its password
        masked (where the store is is worth seeing; its password never is)."""
        yield from super().__repr_args__()
        yield "database_url", redact_url(self.database_url)

    @field_validator("gateway_api_keys")
    @classmethod
    def _strong_keys(cls, keys: list[str]) -> list[str]:
        """Keys are printable ASCII (they travel in a header) and long enough not to be
        guessed. The message names the key by position, never by value."""
        for index, key in enumerate(keys):
            if not (MIN_KEY_CHARS <= len(key) <= MAX_KEY_CHARS) or \
                    not all("!" <= char <= "~" and char != "," for char in key):
                raise ValueError(
                    f"key {index + 1} of {len(keys)} is not {MIN_KEY_CHARS} to "
                    f"{MAX_KEY_CHARS} printable ASCII characters without spaces or commas "
                    f"(make one with: python -c 'import secrets; "
                    f"print(secrets.token_urlsafe(32))')")
        return keys

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


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_ENV_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}\*?")
_SECRET_QUERY_KEY = re.compile(r"pass|secret|token|key", re.IGNORECASE)
REDACTED = "***"


def redact_url(url: str) -> str:
    """`url` with its password, and the values of password-like query parameters, masked.

    `postgresql+asyncpg://turnout:pw@db/turnout` → `postgresql+asyncpg://turnout:***@db/turnout`;
    libpq also takes `?password=...`. Anything that does not parse is masked whole.
    """
    try:
        parts = urlsplit(url)
        password = parts.password
        query = parse_qsl(parts.query, keep_blank_values=True)
    except ValueError:
        return REDACTED
    masked = [(k, REDACTED if _SECRET_QUERY_KEY.search(k) else v) for k, v in query]
    if password is None and masked == query:
        return url
    netloc = parts.netloc
    if password is not None:
        userinfo, _, hostport = netloc.rpartition("@")
        netloc = f"{userinfo.split(':', 1)[0]}:{REDACTED}@{hostport}"
    query_text = urlencode(masked, safe="*") if masked != query else parts.query
    return (f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query_text}" if query_text else "")
            + (f"#{parts.fragment}" if parts.fragment else ""))


def engine_task_queue(host: str) -> str:
    return f"turnout-engines-{host}"


def _client_host(bind_host: str) -> str:
    return "127.0.0.1" if bind_host in ("0.0.0.0", "::", "") else bind_host


def get_model_switching_config() -> ModelSwitchingConfig:
    """The guide's accessor: settings from the environment."""
    return ModelSwitchingConfig.from_env()
