"""Domain models shared by the API, SDK, workflows, activities and gateway.

These pydantic models are the contract between processes: the REST API validates them,
Temporal carries them (pydantic data converter), the store persists them.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from turnout import engine_args as catalogue
from turnout.config import ENV_NAME_PATTERN, ENV_PREFIX
from turnout.endpoints import EndpointError, parse_endpoint
from turnout.limits import (
    ACTOR_MAX,
    MAX_REPLICAS,
    MODEL_ID_MAX,
    REASON_MAX,
    SERVED_NAME_MAX,
    bounded_json,
)
from turnout.telemetry.verdicts import GuardedMetric, HealthThresholds, Verdict, unique_metrics

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$"
# Aliases may look like hub ids ("org/name") since clients often send those as `model`.
ALIAS_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/\-]{0,255}$"
# A model id is `{model_arch}_{model_stage}` (two names); the column holds 300.
MODEL_ID_PATTERN = rf"^[A-Za-z0-9][A-Za-z0-9._\-]{{0,{MODEL_ID_MAX - 1}}}$"
# What a served model name may be: it goes on the engine's command line and into the
# OpenAI `model` field, so it never starts with '-' and holds no spaces.
SERVED_NAME_PATTERN = rf"^[A-Za-z0-9][A-Za-z0-9._:/@+\-]{{0,{SERVED_NAME_MAX - 1}}}$"
MAX_ALIASES = 32


class OmniModelConfig(BaseModel):
    """What to serve for one version: the guide's `OmniModelConfig`.

    `model` is a local model directory (or a hub id already in the local cache).
    `endpoint` instead points at an OpenAI-compatible server someone else runs:
    then turnout only routes to it and never starts an engine; `api_key_env` names the
    environment variable whose value the gateway and the health probe send to it as a
    bearer token (the value itself is never stored).

    This model also reads what the store holds, registrations of every release, so its
    own checks are the loose ones every release enforced; what a registration must
    satisfy today is checked by `RegisterModelRequest` (and, with the settings, by
    `turnout.registration`).
    """

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=1024)
    model_arch: str = Field(pattern=NAME_PATTERN)
    model_stage: str = Field("default", pattern=NAME_PATTERN)
    engine_args: dict[str, Any] = Field(default_factory=dict)
    endpoint: str | None = Field(None, pattern=r"^https?://")
    served_model_name: str | None = None
    api_key_env: str | None = Field(None, pattern=ENV_NAME_PATTERN)
    # Engines of this version a switch loads, one per engine host (overridable per switch).
    replicas: int = Field(1, ge=1, le=MAX_REPLICAS)

    @property
    def model_id(self) -> str:
        return model_id_for(self.model_arch, self.model_stage)

    @field_validator("engine_args")
    @classmethod
    def _engine_args_are_flags(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if not key.replace("-", "_").replace("_", "").isalnum():
                raise ValueError(f"engine argument {key!r} is not a vLLM option name")
        return value


def model_id_for(model_arch: str, model_stage: str) -> str:
    """The guide's model id: `{model_arch}_{model_stage}`."""
    return f"{model_arch}_{model_stage}"


BoundedJSON = Annotated[dict[str, Any], AfterValidator(bounded_json)]


class RegisterModelRequest(OmniModelConfig):
    """Body of `POST /models`: a model config plus the version it becomes.

    Everything that can be checked without the deployment's settings is checked here:
    `engine_args` against the catalogue of vLLM options (`turnout.engine_args`), the
    shape of `model` (an absolute directory or a hub id), the endpoint's URL and literal
    address, the credential variable's name, and the size of every field. What depends on
    the settings (model roots, private endpoints, allowed hosts and credential names,
    trust_remote_code) is `turnout.registration.check_registration`'s.
    """

    version: str = Field(pattern=NAME_PATTERN)
    served_model_name: str | None = Field(None, pattern=SERVED_NAME_PATTERN)
    engine_args: BoundedJSON = Field(
        default_factory=dict,
        description="vLLM server options by name (`max_model_len`, `dtype`, ...): only "
                    "the options turnout knows, each with a typed value")
    endpoint: str | None = Field(
        None, max_length=512,
        description="An OpenAI-compatible server to route to instead of starting an "
                    "engine: http(s)://host[:port][/base-path], nothing more")
    api_key_env: str | None = Field(
        None, pattern=ENV_NAME_PATTERN,
        description="Name of the environment variable (of the gateways and the control "
                    "worker) whose value is sent to `endpoint` as a bearer token")
    metadata: BoundedJSON = Field(default_factory=dict)
    aliases: list[Annotated[str, Field(pattern=ALIAS_PATTERN)]] = Field(
        default_factory=list, max_length=MAX_ALIASES)

    @field_validator("engine_args")
    @classmethod
    def _engine_args_are_flags(cls, value: dict[str, Any]) -> dict[str, Any]:
        """(Replaces the stored model's loose check of the same name.)"""
        try:
            return catalogue.validate_engine_args(value)
        except catalogue.EngineArgsError as exc:
            raise _located(exc.errors) from None

    @field_validator("endpoint")
    @classmethod
    def _endpoint_is_safe(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_endpoint(value)
            except EndpointError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("api_key_env")
    @classmethod
    def _not_a_turnout_setting(cls, value: str | None) -> str | None:
        if value is not None and value.startswith(ENV_PREFIX):
            raise ValueError(f"names one of turnout's own settings ({ENV_PREFIX}*)")
        return value

    @model_validator(mode="after")
    def _fits_its_kind(self) -> RegisterModelRequest:
        if self.endpoint is None:
            problem = catalogue.model_source_problem(self.model)
            if problem:
                raise _located([{"loc": ("model",), "type": "model_source", "msg": problem,
                                 "input": self.model}])
            if self.api_key_env is not None:
                raise _located([{"loc": ("api_key_env",), "type": "needs_endpoint",
                                 "msg": "only for a version with an `endpoint`",
                                 "input": self.api_key_env}])
        else:
            if self.engine_args:
                raise _located([{"loc": ("engine_args",), "type": "needs_engine",
                                 "msg": "no engine is started for an external endpoint: "
                                        "engine_args would have no effect",
                                 "input": self.engine_args}])
            served = self.served_model_name or self.model
            if len(served) > SERVED_NAME_MAX:
                raise _located([{"loc": ("served_model_name",), "type": "too_long",
                                 "msg": f"the name sent upstream (served_model_name, else "
                                        f"model) may have at most {SERVED_NAME_MAX} "
                                        f"characters", "input": served}])
        return self


def _located(errors: list[dict[str, Any]]) -> ValidationError:
    """A pydantic ValidationError with each error at its own `loc`. Raised from a field
    validator the loc is inside that field, so a 422 names `engine_args.<key>`, not the
    whole dictionary; from a model validator it names the field."""
    return ValidationError.from_exception_data("RegisterModelRequest", [InitErrorDetails(
        type=PydanticCustomError(e["type"], "{message}", {"message": e["msg"]}),
        loc=tuple(e["loc"]), input=e.get("input")) for e in errors])


class VersionInfo(BaseModel):
    model_id: str
    version: str
    config: OmniModelConfig
    metadata: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime | None = None


class ModelInfo(BaseModel):
    model_id: str
    model_arch: str
    model_stage: str
    live_version: str | None = None
    previous_version: str | None = None
    aliases: list[str] = Field(default_factory=list)
    versions: list[VersionInfo] = Field(default_factory=list)
    created_at: datetime | None = None

    def version(self, version: str) -> VersionInfo | None:
        return next((v for v in self.versions if v.version == version), None)


class Replica(BaseModel):
    """One engine of a version a route sends requests to: where it answers, on which host.

    `host` is the engine host's id (`"external"` for an endpoint someone else runs); empty
    when the route was written without one, and then nothing is known to judge it by.
    """

    url: str
    host: str = ""


class Backend(BaseModel):
    """One version's share of a model's traffic and where to send it.

    `replicas` are the version's engines: the gateway spreads the version's share over
    them (least requests in flight). Routes written before replicas existed have none;
    then `url` is the one engine. `url` is always the first replica's, for older readers.

    A backend with `weight` 0 and a `mirror_percent` is a shadow: that share of the
    model's requests is copied to it, its answers are measured like any version's and
    never returned to a client.
    """

    version: str
    weight: float = Field(ge=0, le=100)
    url: str
    served_model_name: str
    mirror_percent: float = Field(0, ge=0, le=100)
    # An external endpoint's credential: the name of the environment variable whose
    # value the gateway sends as `Authorization: Bearer` (never the value itself).
    api_key_env: str | None = None
    replicas: list[Replica] = Field(default_factory=list)

    @property
    def is_shadow(self) -> bool:
        return self.weight == 0 and self.mirror_percent > 0

    def endpoints(self) -> list[Replica]:
        """Every replica of the version: `replicas`, or the one `url` of an older route."""
        return self.replicas or [Replica(url=self.url)]


class Route(BaseModel):
    """Desired traffic split of a model; `generation` only ever rises."""

    model_id: str
    generation: int = 0
    backends: list[Backend] = Field(default_factory=list)
    change_key: str | None = None
    updated_at: datetime | None = None

    def weights(self) -> dict[str, float]:
        """Share of served traffic per version (a shadow is not served: it is left out)."""
        return {b.version: b.weight for b in self.backends if not b.is_shadow}

    def shadow(self) -> Backend | None:
        """The backend requests are copied to, if any (at most one per route)."""
        return next((b for b in self.backends if b.is_shadow), None)


class EngineState(StrEnum):
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


class EngineInfo(BaseModel):
    """A loaded engine: a vLLM server (or an external endpoint) serving one version."""

    model_id: str
    version: str
    host: str
    url: str
    served_model_name: str
    port: int | None = None
    pid: int | None = None
    state: EngineState = EngineState.STARTING
    external: bool = False
    started_at: datetime | None = None
    log_path: str | None = None
    # What the engine needs, as its host estimated when it loaded (weights, KV cache,
    # runtime); when it last served a request's share; whether it sleeps (vLLM sleep mode).
    memory_bytes: int | None = None
    last_used_at: datetime | None = None
    sleeping: bool = False


class SwitchingStrategyType(StrEnum):
    IMMEDIATE = "immediate"
    GRADUAL = "gradual"
    AB_TEST = "ab_test"
    CANARY = "canary"


class OperationStatus(StrEnum):
    """The guide's loop ends on `completed` or `failed`; nothing else is terminal."""

    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in (OperationStatus.COMPLETED, OperationStatus.FAILED)


class Outcome(StrEnum):
    """How a finished switch ended."""

    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"
    LOAD_FAILED = "load_failed"
    ERROR = "error"


class SwitchRequest(BaseModel):
    """Body of `POST /switch`."""

    model_config = ConfigDict(extra="forbid")

    model_id: str = Field(pattern=MODEL_ID_PATTERN)
    target_version: str = Field(pattern=NAME_PATTERN)
    strategy: SwitchingStrategyType = SwitchingStrategyType.IMMEDIATE
    strategy_config: BoundedJSON = Field(default_factory=dict)
    requested_by: str | None = Field(None, max_length=ACTOR_MAX)
    reason: str | None = Field(None, max_length=REASON_MAX)
    # How this switch's steps are judged, over the settings' defaults (None: defaults).
    analysis: SwitchAnalysis | None = None
    # Engines of the target, one per engine host (None: as many as it was registered with).
    replicas: int | None = Field(None, ge=1, le=MAX_REPLICAS)


class SwitchAnalysis(BaseModel):
    """Per-switch overrides of how steps are judged (`SwitchRequest.analysis`)."""

    model_config = ConfigDict(extra="forbid")

    # One entry per metric (checked below), so at most one per metric name.
    guarded_metrics: list[GuardedMetric] | None = Field(None, max_length=16)
    confidence: float | None = Field(None, gt=0.5, lt=1)
    min_requests: int | None = Field(None, ge=1)
    latency_tolerance: float | None = Field(None, ge=0)
    latency_tolerance_ms: float | None = Field(None, ge=0, le=60_000)
    error_rate_tolerance: float | None = Field(None, ge=0, le=1)
    # A fresh target engine's first requests (at each gateway) and seconds left out of its
    # first judged window (`HealthThresholds.warmup_requests`, `warmup_seconds`).
    warmup_requests: int | None = Field(None, ge=0, le=100_000)
    warmup_seconds: float | None = Field(None, ge=0, le=3600)

    _check_metrics = field_validator("guarded_metrics")(unique_metrics)

    def apply(self, thresholds: HealthThresholds) -> HealthThresholds:
        """`thresholds` with every field this request sets (validated on both sides)."""
        update = self.model_dump(exclude_none=True)
        return HealthThresholds.model_validate({**thresholds.model_dump(), **update})


class SwitchInput(BaseModel):
    """Input of `SwitchWorkflow`; every field has a default so fields can be added later."""

    operation_id: str = ""
    model_id: str = ""
    target_version: str = ""
    strategy: SwitchingStrategyType = SwitchingStrategyType.IMMEDIATE
    strategy_config: dict[str, Any] = Field(default_factory=dict)
    engine_task_queue: str = ""
    requested_by: str | None = None
    reason: str | None = None
    thresholds: HealthThresholds = Field(default_factory=HealthThresholds)
    # Engines of the target (None: as many as the version was registered with).
    replicas: int | None = None


# How many verdicts a switch's status carries (see `SwitchStatus.verdicts`).
VERDICTS_KEPT = 10


class SwitchStatus(BaseModel):
    """What `GET /switch/operations/{id}` and `get_switch_status` return."""

    operation_id: str
    model_id: str
    target_version: str
    from_version: str | None = None
    strategy: SwitchingStrategyType
    status: OperationStatus = OperationStatus.PENDING
    phase: str = "pending"
    progress: float = Field(0.0, ge=0, le=1)
    weights: dict[str, float] = Field(default_factory=dict)
    step: int = 0
    total_steps: int = 0
    outcome: Outcome | None = None
    reason: str | None = None
    message: str | None = None
    next_check_at: datetime | None = None
    last_verdict: Verdict | None = None
    # The latest `VERDICTS_KEPT` verdicts, oldest first; `verdict_count` counts them all.
    # Bounded because this status is the result of every control and of the workflow,
    # each kept in its history: 396 looks of a 100-step canary made a 1.5 MB result.
    verdicts: list[Verdict] = Field(default_factory=list)
    verdict_count: int = 0
    # Whether the target's engines were already loaded (a standby or preloaded version),
    # so the switch needed no cold start; None until it is known.
    warm_start: bool | None = None
    started_at: datetime | None = None
    updated_at: datetime | None = None
    finished_at: datetime | None = None


class OperationRecord(BaseModel):
    """A switching operation as the store knows it (the workflow holds the live progress)."""

    operation_id: str
    workflow_id: str
    run_id: str | None = None
    model_id: str
    target_version: str
    strategy: SwitchingStrategyType
    strategy_config: dict[str, Any] = Field(default_factory=dict)
    status: OperationStatus = OperationStatus.PENDING
    outcome: Outcome | None = None
    reason: str | None = None
    requested_by: str | None = None
    created_at: datetime | None = None
    finished_at: datetime | None = None


class AuditEntry(BaseModel):
    id: int | None = None
    at: datetime | None = None
    actor: str | None = None
    action: str
    model_id: str | None = None
    operation_id: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)


class GatewayInfo(BaseModel):
    gateway_id: str
    admin_url: str
    last_seen: datetime | None = None


class AlertSeverity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


class AlertState(StrEnum):
    FIRING = "firing"
    RESOLVED = "resolved"


class Alert(BaseModel):
    """Something an operator should know about a model version.

    Repeats of the same (model, version, type) while firing update one alert instead of
    adding another, so a flapping version does not flood the list.
    """

    id: int | None = None
    model_id: str
    version: str | None = None
    type: str = Field(description="error_rate, latency, resource or rollout")
    severity: AlertSeverity = AlertSeverity.WARNING
    title: str
    message: str = ""
    figures: dict[str, Any] = Field(default_factory=dict)
    operation_id: str | None = None
    state: AlertState = AlertState.FIRING
    count: int = 1
    acknowledged_by: str | None = None
    first_seen: datetime | None = None
    last_seen: datetime | None = None
