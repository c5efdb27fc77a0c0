"""The environments of child processes: what each one is given, and what it never gets.

A child process inherits whatever it is handed, and its environment is readable by every
process of the same user (`/proc/<pid>/environ`) and is copied into every grandchild. So
turnout hands each child only what it needs:

- **vLLM engines** get an allowlist (`engine_environment`): what Python, torch and vLLM
  read (paths, locale, caches, threading, device selection, `VLLM_*`), plus what turnout
  sets for them. Never turnout's settings, never the engine worker's other variables (an
  operator's cloud or endpoint credentials, say): an engine runs arbitrary model code and
  needs none of them.
- **The local stack's processes** (`process_environment`) inherit the launcher's
  environment, since operators configure them through it, minus turnout's secrets they do
  not need, plus the settings they need. `SECRET_HOLDERS` says which process holds which
  secret setting; the variables named by `endpoint_credential_envs` reach only
  `ENDPOINT_CREDENTIAL_HOLDERS`. The Temporal server gets none of turnout's settings.

docker-compose.yml follows the same table (tests/unit/test_compose.py checks it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from turnout.config import ENV_PREFIX, ModelSwitchingConfig

# Processes of a turnout deployment, by role (the stack's process names).
API = "api"
GATEWAY = "gateway"
CONTROL_WORKER = "control-worker"
MONITOR_WORKER = "monitor-worker"
ENGINE_WORKER = "engine-worker"
TEMPORAL = "temporal"
ROLES = (API, GATEWAY, CONTROL_WORKER, MONITOR_WORKER, ENGINE_WORKER, TEMPORAL)

# Which turnout processes receive each secret setting; every other setting reaches every
# turnout process (the Temporal server excepted). Read from what each process uses:
# - the API checks the API key; the workers and the gateway never call the API;
# - the gateway checks the admin token on its admin listener, and the control and monitor
#   workers present it there (traffic shifts, stats); the engine worker never calls it;
# - alerts are delivered by the monitors (`MonitorActivities`), which run on the control
#   worker or on a monitor worker of their own;
# - every turnout process reads or writes the store; the Temporal server has a store of
#   its own.
# A secret setting is a field with `repr=False`. One missing here reaches no process (and
# tests/unit/test_environments.py fails until it is placed).
SECRET_HOLDERS: dict[str, frozenset[str]] = {
    "api_key": frozenset({API}),
    "gateway_admin_token": frozenset({GATEWAY, CONTROL_WORKER, MONITOR_WORKER}),
    "alert_webhook_urls": frozenset({CONTROL_WORKER, MONITOR_WORKER}),
    "gateway_api_keys": frozenset({GATEWAY}),
    "database_url": frozenset({API, GATEWAY, CONTROL_WORKER, MONITOR_WORKER, ENGINE_WORKER}),
}
# The processes that call external endpoints: the gateway proxies to them, the control
# worker's health probe checks them.
ENDPOINT_CREDENTIAL_HOLDERS = frozenset({GATEWAY, CONTROL_WORKER})

# What a vLLM engine may inherit: exact names ...
ENGINE_ENV_NAMES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "TERM", "TZ", "LANG", "LANGUAGE",
    "TMPDIR", "TMP", "TEMP", "VIRTUAL_ENV", "CONDA_PREFIX",
    "LD_LIBRARY_PATH", "LD_PRELOAD",
    # TLS trust stores: paths, harmless, and what a cached-model lookup would verify with.
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
    "TRANSFORMERS_CACHE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM",
    "PYTORCH_CUDA_ALLOC_CONF", "MALLOC_ARENA_MAX", "NO_COLOR", "FORCE_COLOR",
})
# ... and prefixes: locale, Python, vLLM, Hugging Face caches, torch/Triton, threading and
# math libraries (OpenMP, Intel, oneDNN, OpenBLAS), CUDA/NCCL/ROCm device selection.
ENGINE_ENV_PREFIXES = (
    "LC_", "XDG_", "PYTHON", "VLLM_", "HF_", "HUGGINGFACE_HUB_", "TRANSFORMERS_", "TORCH",
    "PYTORCH_", "TRITON_", "CUDA_", "NCCL_", "CUBLAS_", "CUDNN_", "HIP_", "ROCR_",
    "HSA_", "OMP_", "GOMP_", "KMP_", "MKL_", "DNNL_", "ONEDNN_", "OPENBLAS_", "TCMALLOC_",
    "NUMBA_", "OUTLINES_",
)
# Never passed, even under an allowed prefix: vLLM's own API key (an engine started with
# it refuses the gateway, which sends none), hub tokens (engines load local models only)
# and vLLM's development mode (it opens endpoints such as collective_rpc on the engine's
# port; turnout sets it itself only for sleep mode, ENGINE_SLEEP_MODE).
# Set in every engine's environment to the host id that started it: a restarted engine
# worker finds the engines of its host that it never recorded (killed between starting
# one and writing its record) and stops them, so no orphan holds memory or a port.
ENGINE_HOST_ENV = "TURNOUT_ENGINE_HOST"
ENGINE_ENV_DENIED = frozenset({"VLLM_API_KEY", "HF_TOKEN", "HF_API_TOKEN",
                               "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_TOKEN",
                               "VLLM_SERVER_DEV_MODE"})


def engine_environment(parent: Mapping[str, str], defaults: Mapping[str, str] | None = None,
                       *, passthrough: Iterable[str] = (),
                       denied: Iterable[str] = ()) -> dict[str, str]:
    """The environment a vLLM engine starts with: the allowed part of `parent`.

    `defaults` are what turnout sets for the engine (KV cache size, core binding, unbuffered
    output): they apply where `parent` has no value of its own, so an operator's
    `VLLM_CPU_KVCACHE_SPACE` wins. `passthrough` adds names (a trailing `*`: a prefix) an
    operator allows beyond the list; `denied` removes names whatever the lists say (the
    endpoint credential variables). turnout's own settings are never passed.
    """
    names = set(ENGINE_ENV_NAMES)
    prefixes = list(ENGINE_ENV_PREFIXES)
    for item in passthrough:
        if item.endswith("*"):
            prefixes.append(item[:-1])
        else:
            names.add(item)
    refused = ENGINE_ENV_DENIED | set(denied)
    env = {name: value for name, value in parent.items()
           if (name in names or name.startswith(tuple(prefixes)))
           and name not in refused and not name.startswith(ENV_PREFIX)}
    for name, value in (defaults or {}).items():
        env.setdefault(name, value)
    return env


def secret_settings() -> frozenset[str]:
    """Settings that hold secrets: the fields kept out of the settings' repr."""
    return frozenset(name for name, field in ModelSwitchingConfig.model_fields.items()
                     if field.repr is False)


def settings_environment(settings: ModelSwitchingConfig,
                         fields: Iterable[str] | None = None) -> dict[str, str]:
    """The variables that give another process these settings (`fields` only, if given).

    Unset optional settings are left out; lists are comma-separated, booleans lower-case.
    """
    wanted = None if fields is None else set(fields)
    env = {}
    for name, value in settings.model_dump().items():
        if value is None or (wanted is not None and name not in wanted):
            continue
        if isinstance(value, bool):
            text = str(value).lower()
        elif isinstance(value, list):
            text = ",".join(str(item) for item in value)
        else:
            text = str(value)
        env[ModelSwitchingConfig.env_name(name)] = text
    return env


def settings_for(role: str) -> frozenset[str]:
    """The settings a process of `role` is given: every non-secret one, plus the secrets
    `SECRET_HOLDERS` gives it. The Temporal server (and an unknown role's secrets): none."""
    if role == TEMPORAL:
        return frozenset()
    secrets = secret_settings()
    return frozenset(name for name in ModelSwitchingConfig.model_fields
                     if name not in secrets or role in SECRET_HOLDERS.get(name, ()))


def process_environment(role: str, parent: Mapping[str, str],
                        settings: ModelSwitchingConfig) -> dict[str, str]:
    """The environment of one process of the local stack.

    `parent`'s variables, minus every `VLLM_MODEL_SWITCHING_*` one (the stack's settings
    replace them) and minus the endpoint credential variables unless `role` calls external
    endpoints; then the settings `settings_for(role)` names.
    """
    credentials = set(settings.endpoint_credential_envs)
    keep_credentials = role in ENDPOINT_CREDENTIAL_HOLDERS
    env = {name: value for name, value in parent.items()
           if not name.startswith(ENV_PREFIX)
           and (keep_credentials or name not in credentials)}
    env.update(settings_environment(settings, settings_for(role)))
    return env


# `python -m <module>` → role, so that a process added to a stack by its command line
# (a second gateway, say) gets what its kind needs.
MODULE_ROLES = {"api": API, "gateway": GATEWAY, "workers.control": CONTROL_WORKER,
                "workers.monitor": MONITOR_WORKER, "workers.engine": ENGINE_WORKER}


def role_of(argv: list[str]) -> str | None:
    """The role of a `python -m <module> ...` command line, if it is one of turnout's."""
    for i, arg in enumerate(argv[:-1]):
        if arg == "-m":
            return MODULE_ROLES.get(argv[i + 1])
    return None
