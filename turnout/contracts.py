"""Inputs and results of activities, the names they are registered under, the error
types they raise.

Each activity is declared once, at the end of this module, as an `ActivityRef`: its
registered name with its input and result types. A reference *is* its name (a `str`), so
workers register implementations with `@activity.defn(name=c.SET_TRAFFIC)` and old call
sites keep working, while workflows call through `workflows.calls.execute(c.SET_TRAFFIC,
input)`, which passes the result type to Temporal and gives the caller that type (checked
by mypy). Every model has defaults so fields can be added without breaking replay.
Registered names never change: recorded histories carry them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, Field

from turnout.domain import Alert, EngineInfo, OperationStatus, Outcome
from turnout.fleet import Holder, HolderKind
from turnout.telemetry.verdicts import HealthThresholds, Verdict

InputT = TypeVar("InputT")
ResultT = TypeVar("ResultT")


class ActivityRef(str, Generic[InputT, ResultT]):
    """An activity's registered name, carrying its input and result types.

    `result_type` is what the workflow asks Temporal to decode the result as (None for
    activities that return nothing).
    """

    input_type: type[InputT]
    result_type: type[ResultT] | None

    def __new__(cls, name: str, input_type: type[InputT],
                result_type: type[ResultT] | None) -> ActivityRef[InputT, ResultT]:
        ref = super().__new__(cls, name)
        ref.input_type = input_type
        ref.result_type = result_type
        return ref


# ApplicationError types activities raise, as workflows and retry policies name them.
MODEL_LOAD_ERROR = "ModelLoadError"  # model dir missing / no or unreadable config.json
VERSION_NOT_FOUND = "VersionNotFound"  # version not registered in the store
NOT_FOUND = "NotFound"  # model or version not in the store (registry activities)
ENGINE_EXITED = "EngineExitedError"  # vLLM exited before it became ready
ENGINE_START_TIMEOUT = "EngineStartTimeout"  # not ready within engine_startup_timeout_s
ENGINE_STALLED = "EngineStalled"  # no log line, no /health answer for engine_stall_timeout_s
ENGINE_WARMUP_FAILED = "EngineWarmupError"  # /health OK but the first completion failed
NO_FREE_PORT = "NoFreePort"  # every port of [engine_port_start, engine_port_end] is taken
INSUFFICIENT_MEMORY = "InsufficientMemory"  # the engine would not fit in this host's memory
ENGINE_SLEEP_FAILED = "EngineSleepError"  # vLLM refused /sleep or /wake_up (retried)
INVALID_ROUTE = "InvalidRoute"  # weights that do not add up, nothing to mirror
NO_READY_ENGINE = "NoReadyEngine"  # a route names a version none of whose engines is ready
GATEWAY_SYNC_TIMEOUT = "GatewaySyncTimeout"  # gateways did not apply a route in time
STORE_UNAVAILABLE = "StoreUnavailable"  # the database did not answer (a switch waits it out)
PLACEMENT_FAILED = "PlacementFailed"  # a load that fits on no host
NO_LIVE_HOST = "NoLiveEngineHost"  # no engine host heartbeats (retried)

SWITCH_WORKFLOW = "SwitchWorkflow"

# Operator controls: workflow updates of SwitchWorkflow (and REST `POST
# /switch/operations/{id}/<action>`). Each takes a `ControlRequest`, returns the status.
ROLLBACK = "rollback"
PAUSE = "pause"
RESUME = "resume"
PROMOTE = "promote"
ABORT = "abort"
CONTROL_ACTIONS = (ROLLBACK, PAUSE, RESUME, PROMOTE, ABORT)
STATUS_QUERY = "status"


class ControlRequest(BaseModel):
    """Why and by whom a switch is rolled back, paused, resumed, promoted or aborted."""

    reason: str | None = Field(None, max_length=2000)
    requested_by: str | None = Field(None, max_length=256)


class LoadVersionInput(BaseModel):
    """Start (or find already running) the engine that serves one version on this host."""

    model_id: str = ""
    version: str = ""


class LoadVersionResult(BaseModel):
    engine: EngineInfo
    already_running: bool = False


class UnloadVersionInput(BaseModel):
    """Stop the engine of one version on this host; stopping a stopped engine is a no-op.

    `when` guards the stop against what happened since it was decided: `unheld` stops
    only an engine nothing holds any more (another switch, a shadow or a preload may have
    taken it meanwhile), `cached` only one that still serves nothing (an eviction).
    `always` is what switches started before holders were recorded ask for.
    """

    model_id: str = ""
    version: str = ""
    when: Literal["always", "unheld", "cached"] = "always"


class SetTrafficInput(BaseModel):
    """Desired split of a model's traffic, in percent per version.

    `change_key` makes the write idempotent: a retry with the same key does not create a
    second generation. The workflow derives it from its id and step.
    """

    model_id: str = ""
    weights: dict[str, float] = Field(default_factory=dict)
    change_key: str = ""


class SetTrafficResult(BaseModel):
    generation: int = 0
    gateways: list[str] = Field(default_factory=list)


class DrainVersionInput(BaseModel):
    """Wait until no live gateway has a request in flight to a version.

    With `replica` (a replica's URL, or the id of the host its engine runs on), wait for
    that replica only, while the version's other replicas keep serving: until no live
    gateway sends it requests (its engine is no longer ready, or the route no longer
    names it) and none has a request in flight to it. Empty: the whole version.
    """

    model_id: str = ""
    version: str = ""
    timeout_s: float = 120
    replica: str = ""


class DrainVersionResult(BaseModel):
    drained: bool = True
    inflight_left: int = 0
    waited_s: float = 0
    # Draining one replica: the gateways that still sent it requests at the end.
    routed_at: list[str] = Field(default_factory=list)


class CheckHealthInput(BaseModel):
    """Ask a version's engine for a short completion: does it answer at all?"""

    model_id: str = ""
    version: str = ""


class HealthVerdict(BaseModel):
    healthy: bool = False
    reason: str = ""
    latency_ms: float | None = None
    details: dict[str, Any] = Field(default_factory=dict)


class DescribeModelInput(BaseModel):
    model_id: str = ""
    target_version: str = ""


class ModelSnapshot(BaseModel):
    """What a switch needs to know about a model when it starts."""

    model_id: str = ""
    live_version: str | None = None
    target_exists: bool = False
    target_external: bool = False
    # Versions the current route serves (weight > 0): a shadow keeps such an engine.
    serving_versions: list[str] = Field(default_factory=list)


class MarkLiveInput(BaseModel):
    model_id: str = ""
    version: str = ""
    operation_id: str = ""


class RecordOperationInput(BaseModel):
    """Write a switch's state and an audit entry; keyed by (operation, event): retries are safe."""

    operation_id: str = ""
    workflow_id: str = ""
    model_id: str = ""
    target_version: str = ""
    strategy: str = "immediate"
    strategy_config: dict[str, Any] = Field(default_factory=dict)
    event: str = ""
    status: OperationStatus = OperationStatus.RUNNING
    outcome: Outcome | None = None
    reason: str | None = None
    actor: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)
    # Status-only updates (pause, resume) are audited by the API, not here.
    audit: bool = True


# ---------------------------------------------------------------------- health judgment



class JudgeHealthInput(BaseModel):
    """Judge the target over [window_start, window_end] (epoch seconds), against thresholds
    and against the stable version over the same window."""

    model_id: str = ""
    target_version: str = ""
    stable_version: str | None = None
    window_start: float = 0
    window_end: float = 0
    thresholds: HealthThresholds = Field(default_factory=HealthThresholds)
    # A/B tests: publish the full two-sample analysis (error rate and latency tests).
    compare: bool = False
    # The target's first judged window: leave its warm-up out (the thresholds'
    # `warmup_requests` and `warmup_seconds`).
    warmup: bool = False


# ---------------------------------------------------------------------- monitoring

MONITOR_WORKFLOW = "MonitorWorkflow"
# Signal: stop monitoring the model (e.g. the model was retired).
STOP_MONITOR = "stop"


# How often the monitor keeper makes sure every registered model's monitor runs (starting
# those of new models, restarting those that ended); a new monitor looks at once.
MONITOR_KEEPER_PERIOD_S = 10.0


def monitor_workflow_id(model_id: str) -> str:
    return f"monitor-{model_id}"


class MonitorInput(BaseModel):
    """Input of `MonitorWorkflow`; carried over unchanged by continue-as-new."""

    model_id: str = ""
    # Looks before continuing as new, so the history stays small however long it runs.
    looks_per_run: int = 240
    # How long a look waits for one host's engine measurements (a dead host's queue has
    # no poller, so this bounds the time in queue too); its engines are then left out.
    measure_timeout_s: float = 20
    # Carried over by continue-as-new: the window the next run's first look judges (0: the
    # monitoring interval of the settings) and the looks that failed so far.
    window_s: float = 0
    failed_looks: int = 0
    # The monitoring interval of the settings, for the pauses before the first good look
    # (which then reports it); 0: 30 s.
    interval_s: float = 0


class ModelHostsInput(BaseModel):
    model_id: str = ""


# Seconds over which an engine's CPU use is sampled (each host's measurement and the old
# monitors' `measure_engines`).
CPU_SAMPLE_S = 0.5


class MeasureEnginesInput(BaseModel):
    model_id: str = ""
    cpu_sample_s: float = CPU_SAMPLE_S


class MeasureEnginesResult(BaseModel):
    # version -> resources of each of its engines on this host (EngineResources as JSON).
    engines: dict[str, list[dict[str, Any]]] = Field(default_factory=dict)


class AssessHealthInput(BaseModel):
    model_id: str = ""
    # The window judged ends now and lasts this long (the previous interval); 0: the
    # monitoring interval of the settings.
    window_s: float = 30
    resources: list[MeasureEnginesResult] = Field(default_factory=list)
    # True: the engine figures are read from the store, where every engine host records
    # them each interval; `resources` is then empty.
    measured_by_hosts: bool = False
    # Looks of this monitor that failed so far, and the last failure (unix time): kept
    # with the look for `GET /health/models`.
    failed_looks: int = 0
    last_failure: str | None = None
    last_failure_at: float | None = None


class FailedLookInput(BaseModel):
    """A look that failed: recorded with the model's latest look when the store takes it."""

    model_id: str = ""
    reason: str = ""
    at: float = 0
    failed_looks: int = 0
    interval_s: float = 30


class AssessHealthResult(BaseModel):
    """What the monitor needs to carry on: a sentence for the Web UI and the next pause."""

    summary: str = ""
    interval_s: float = 30
    # False when monitoring is switched off in the settings or the model is gone.
    keep_monitoring: bool = True
    states: dict[str, str] = Field(default_factory=dict)


# ---------------------------------------------------------------------- shadow (mirroring)

SHADOW_WORKFLOW = "ShadowWorkflow"
# Signal: stop mirroring (the workflow then removes the shadow and releases its engine).
STOP_SHADOW = "stop"


def shadow_workflow_id(model_id: str) -> str:
    return f"shadow-{model_id}"


class ShadowInput(BaseModel):
    """Input of `ShadowWorkflow`: copy `percent` of the model's requests to `version`."""

    model_id: str = ""
    version: str = ""
    percent: float = 100.0
    # How long to mirror; 0 = until stopped.
    duration_s: float = 0.0
    engine_task_queue: str = ""
    requested_by: str | None = None
    replicas: int | None = None


class ShadowStatus(BaseModel):
    """What `GET /models/{model_id}/shadow` returns."""

    model_id: str = ""
    version: str = ""
    percent: float = 0.0
    # loading, mirroring, stopping, completed, failed
    phase: str = "loading"
    reason: str | None = None
    started_at: datetime | None = None
    ends_at: datetime | None = None
    finished_at: datetime | None = None


class SetMirrorInput(BaseModel):
    """Copy `percent` of the model's requests to `version` (0: remove the shadow).

    Idempotent by `change_key`, like `SetTrafficInput`; the served weights are kept."""

    model_id: str = ""
    version: str = ""
    percent: float = 0.0
    change_key: str = ""


# ---------------------------------------------------------------------- the engine fleet

STANDBY_WORKFLOW = "StandbyWorkflow"


class EngineSlot(BaseModel):
    """One host's engine of a version: where to load or stop it."""

    model_id: str = ""
    version: str = ""
    host_id: str = ""
    task_queue: str = ""


class PlaceVersionInput(BaseModel):
    """Hold a version for `holder`, then choose where its engines go.

    `replicas` None takes the version's registered number. A `holder` with a priority
    (a preload) only evicts cached engines of a lower priority.
    """

    model_id: str = ""
    version: str = ""
    replicas: int | None = None
    holder: Holder | None = None


class PlaceVersionResult(BaseModel):
    # Where the version's engines are to be (a host that has one already is among them:
    # loading there is immediate).
    replicas: list[EngineSlot] = Field(default_factory=list)
    # Cached engines to stop first to make room.
    evict: list[EngineSlot] = Field(default_factory=list)
    # Every replica is an engine already loaded: the switch needs no cold start.
    warm: bool = False
    external: bool = False


class ReleaseVersionInput(BaseModel):
    """Let go of a version's engines for one holder."""

    model_id: str = ""
    version: str = ""
    kind: HolderKind = HolderKind.SWITCH
    holder_id: str = ""


class ReleaseVersionResult(BaseModel):
    # The engines nothing holds any more: stop each with `when="unheld"`.
    stop: list[EngineSlot] = Field(default_factory=list)


class RetireVersionInput(BaseModel):
    """The previous live version after a switch: keep it as a standby, or let it go."""

    model_id: str = ""
    version: str = ""
    operation_id: str = ""


class RetireVersionResult(BaseModel):
    standby_until: datetime | None = None
    stop: list[EngineSlot] = Field(default_factory=list)
    # Cached engines beyond a host's `max_cached_models` (or memory) once it stands by.
    evict: list[EngineSlot] = Field(default_factory=list)


class StandbyInput(BaseModel):
    """Keep `version` loaded until `until`, then release it (`StandbyWorkflow`)."""

    model_id: str = ""
    version: str = ""
    holder_id: str = ""
    until: datetime | None = None


# ---------------------------------------------------------------------- preloads

PRELOAD_WORKFLOW = "PreloadWorkflow"
# Signal: let go of the preloaded engines (they stop unless something else holds them).
RELEASE_PRELOAD = "release"
# Signal: a load of a higher priority evicted the preloaded engine; the preload ends.
EVICTED_PRELOAD = "evicted"
# Highest preload priority: eviction compares priorities, so they are bounded and small.
MAX_PRELOAD_PRIORITY = 1000


def preload_workflow_id(model_id: str, version: str) -> str:
    return f"preload-{model_id}-{version}"


class PreloadInput(BaseModel):
    """Load `version` without traffic and keep it loaded until released (or evicted by a
    load of a higher priority)."""

    model_id: str = ""
    version: str = ""
    priority: int = Field(0, ge=0, le=MAX_PRELOAD_PRIORITY)
    replicas: int | None = None
    requested_by: str | None = None


class PreloadStatus(BaseModel):
    """What `GET /models/{model_id}/versions/{version}/preload` returns."""

    model_id: str = ""
    version: str = ""
    priority: int = 0
    # loading, ready, released, evicted, failed
    phase: str = "loading"
    reason: str | None = None
    hosts: list[str] = Field(default_factory=list)
    warm: bool = False  # the version was loaded already when the preload began
    started_at: datetime | None = None
    ready_at: datetime | None = None
    finished_at: datetime | None = None


# ---------------------------------------------------------------------- engine crashes

REPLACE_ENGINE_WORKFLOW = "ReplaceEngineWorkflow"


def replace_engine_workflow_id(model_id: str, version: str, host_id: str) -> str:
    return f"replace-engine-{model_id}-{version}-{host_id}"


class ReplaceEngineInput(BaseModel):
    """An engine process died on its host: replace it (serving, candidate, shadow) or drop
    it from the cache (standby, preloaded, idle)."""

    slot: EngineSlot = Field(default_factory=EngineSlot)
    role: str = "idle"
    pid: int | None = None
    exit: str = ""  # how it ended, as the host saw it (exit code or signal)


class RefreshRouteInput(BaseModel):
    """Write the model's route again with the same weights, from the engines as they are
    now (a replaced engine's new address); idempotent by `change_key`."""

    model_id: str = ""
    change_key: str = ""


class ResolveAlertInput(BaseModel):
    model_id: str = ""
    version: str | None = None
    type: str = ""


# ---------------------------------------------------------------------- activity references

LOAD_VERSION = ActivityRef("load_version", LoadVersionInput, LoadVersionResult)
UNLOAD_VERSION: ActivityRef[UnloadVersionInput, None] = \
    ActivityRef("unload_version", UnloadVersionInput, None)
SET_TRAFFIC = ActivityRef("set_traffic", SetTrafficInput, SetTrafficResult)
SET_MIRROR = ActivityRef("set_mirror", SetMirrorInput, SetTrafficResult)
REFRESH_ROUTE = ActivityRef("refresh_route", RefreshRouteInput, SetTrafficResult)
DRAIN_VERSION = ActivityRef("drain_version", DrainVersionInput, DrainVersionResult)
CHECK_HEALTH = ActivityRef("check_health", CheckHealthInput, HealthVerdict)
JUDGE_HEALTH = ActivityRef("judge_health", JudgeHealthInput, Verdict)
DESCRIBE_MODEL = ActivityRef("describe_model", DescribeModelInput, ModelSnapshot)
MARK_LIVE: ActivityRef[MarkLiveInput, None] = \
    ActivityRef("mark_live", MarkLiveInput, None)
RECORD_OPERATION: ActivityRef[RecordOperationInput, None] = \
    ActivityRef("record_operation", RecordOperationInput, None)
RAISE_ALERT = ActivityRef("raise_alert", Alert, Alert)
# The resolved alert, or None when none was firing; workflows do not read it.
RESOLVE_ALERT: ActivityRef[ResolveAlertInput, None] = \
    ActivityRef("resolve_alert", ResolveAlertInput, None)
LIST_ENGINE_HOSTS = ActivityRef("list_engine_hosts", ModelHostsInput, list[str])
MEASURE_ENGINES = ActivityRef("measure_engines", MeasureEnginesInput, MeasureEnginesResult)
ASSESS_HEALTH = ActivityRef("assess_health", AssessHealthInput, AssessHealthResult)
RECORD_FAILED_LOOK: ActivityRef[FailedLookInput, None] = \
    ActivityRef("record_failed_look", FailedLookInput, None)
PLACE_VERSION = ActivityRef("place_version", PlaceVersionInput, PlaceVersionResult)
RELEASE_VERSION = ActivityRef("release_version", ReleaseVersionInput, ReleaseVersionResult)
RETIRE_VERSION = ActivityRef("retire_version", RetireVersionInput, RetireVersionResult)

ACTIVITIES: tuple[ActivityRef[Any, Any], ...] = (
    LOAD_VERSION, UNLOAD_VERSION, SET_TRAFFIC, SET_MIRROR, REFRESH_ROUTE, DRAIN_VERSION,
    CHECK_HEALTH, JUDGE_HEALTH, DESCRIBE_MODEL, MARK_LIVE, RECORD_OPERATION, RAISE_ALERT,
    RESOLVE_ALERT, LIST_ENGINE_HOSTS, MEASURE_ENGINES, ASSESS_HEALTH, RECORD_FAILED_LOOK,
    PLACE_VERSION, RELEASE_VERSION, RETIRE_VERSION)
