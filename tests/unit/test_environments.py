"""Child environments: engines get an allowlist, each stack process only its own secrets."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from activities.engines import EngineActivities
from turnout.config import ModelSwitchingConfig
from turnout.environments import (
    ENDPOINT_CREDENTIAL_HOLDERS,
    ROLES,
    SECRET_HOLDERS,
    TEMPORAL,
    engine_environment,
    process_environment,
    role_of,
    secret_settings,
)
from workers.stack import Stack

SECRETS = {
    "api_key": "api-key-3f9a",
    "gateway_admin_token": "admin-token-77c1",
    "alert_webhook_urls": ["https://hooks.example.com/services/hook-token-5e2b"],
    "database_url": "postgresql+asyncpg://turnout:db-pass-91d0@db:5432/turnout",
}
CREDENTIAL = "endpoint-cred-0b4d"
# The policy, spelled out (README "Secrets"): which process holds which secret.
HOLDS = {
    "api": {"api_key", "database_url"},
    "gateway": {"gateway_admin_token", "database_url", "endpoint credentials"},
    "control-worker": {"gateway_admin_token", "alert_webhook_urls", "database_url",
                       "endpoint credentials"},
    "monitor-worker": {"gateway_admin_token", "alert_webhook_urls", "database_url"},
    "engine-worker": {"database_url"},
    "temporal": set(),
}

# What a worker's environment typically holds besides turnout's settings.
PARENT = {
    "PATH": "/usr/bin:/bin", "HOME": "/home/op", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
    "TMPDIR": "/tmp", "PYTHONPATH": "/opt/lib", "LD_LIBRARY_PATH": "/opt/cuda/lib64",
    "VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_LOGGING_LEVEL": "DEBUG", "HF_HOME": "/models/hf",
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "0,1",
    "NCCL_DEBUG": "WARN", "OMP_NUM_THREADS": "2", "KMP_AFFINITY": "granularity=fine",
    "MKL_NUM_THREADS": "2", "TORCHINDUCTOR_CACHE_DIR": "/cache/inductor",
    # Not for engines:
    "VLLM_MODEL_SWITCHING_API_KEY": "stale-env-key-6a6a",
    "VLLM_MODEL_SWITCHING_DATABASE_URL": "postgresql://u:stale-db-pass@db/x",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-1111", "OPENAI_API_KEY": "openai-2222",
    "HF_TOKEN": "hf-token-3333", "VLLM_API_KEY": "vllm-key-4444",
    "HTTPS_PROXY": "http://user:proxy-pass@proxy:3128", "EP_KEY": CREDENTIAL,
}


def test_engines_get_what_python_torch_and_vllm_read() -> None:
    env = engine_environment(PARENT)
    for name in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "PYTHONPATH", "LD_LIBRARY_PATH",
                 "VLLM_CPU_KVCACHE_SPACE", "VLLM_LOGGING_LEVEL", "HF_HOME", "HF_HUB_OFFLINE",
                 "TRANSFORMERS_OFFLINE", "CUDA_VISIBLE_DEVICES", "NCCL_DEBUG",
                 "OMP_NUM_THREADS", "KMP_AFFINITY", "MKL_NUM_THREADS",
                 "TORCHINDUCTOR_CACHE_DIR"):
        assert env[name] == PARENT[name], name


def test_engines_get_no_setting_and_no_credential() -> None:
    env = engine_environment(PARENT, denied=["EP_KEY"])
    for name in ("VLLM_MODEL_SWITCHING_API_KEY", "VLLM_MODEL_SWITCHING_DATABASE_URL",
                 "AWS_SECRET_ACCESS_KEY", "OPENAI_API_KEY", "HF_TOKEN", "VLLM_API_KEY",
                 "HTTPS_PROXY", "EP_KEY"):
        assert name not in env, name


def test_denied_names_win_over_allowed_prefixes() -> None:
    parent = {"VLLM_ENDPOINT_SECRET": "x", "HF_HOME": "/hf"}
    assert engine_environment(parent, denied=["VLLM_ENDPOINT_SECRET"]) == {"HF_HOME": "/hf"}


def test_turnouts_values_fill_in_and_the_operators_win() -> None:
    env = engine_environment(PARENT, {"VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONUNBUFFERED": "1"})
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "4"  # the operator's
    assert env["PYTHONUNBUFFERED"] == "1"  # turnout's


def test_passthrough_adds_names_and_prefixes_but_never_settings() -> None:
    parent = {"RAY_ADDRESS": "auto", "RAY_DEDUP_LOGS": "0", "MY_FLAG": "1",
              "VLLM_MODEL_SWITCHING_API_KEY": "k"}
    env = engine_environment(parent, passthrough=["RAY_*", "MY_FLAG", "VLLM_*"])
    assert env == {"RAY_ADDRESS": "auto", "RAY_DEDUP_LOGS": "0", "MY_FLAG": "1"}
    assert engine_environment(parent) == {}


def test_the_engine_worker_builds_engine_environments_from_its_own(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """What `_spawn` hands to vLLM, from a worker that holds every setting and more."""
    monkeypatch.setattr("os.environ", dict(PARENT))
    settings = ModelSwitchingConfig(engine_kv_cache_gib=2, endpoint_credential_envs=["EP_KEY"],
                                    engine_env_passthrough=["AWS_SECRET_ACCESS_KEY"],
                                    **SECRETS)
    env = EngineActivities(settings, store=None)._engine_env("1")  # type: ignore[arg-type]
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "4" and env["PYTHONUNBUFFERED"] == "1"
    assert env["AWS_SECRET_ACCESS_KEY"] == "aws-secret-1111"  # the operator asked for it
    assert "EP_KEY" not in env
    assert not any(name.startswith("VLLM_MODEL_SWITCHING_") for name in env)


def _settings() -> ModelSwitchingConfig:
    return ModelSwitchingConfig(enable_authentication=True, endpoint_credential_envs=["EP_KEY"],
                                **SECRETS)


def _values(env: dict[str, str]) -> str:
    return "\n".join(env.values())


@pytest.mark.parametrize("role", ROLES)
def test_each_process_holds_exactly_its_secrets(role: str) -> None:
    env = process_environment(role, PARENT, _settings())
    values = {**{k: v[0] if isinstance(v, list) else v for k, v in SECRETS.items()},
              "endpoint credentials": CREDENTIAL}
    held = {secret for secret, value in values.items() if value in _values(env)}
    assert held == HOLDS[role]
    assert (CREDENTIAL in _values(env)) == (role in ENDPOINT_CREDENTIAL_HOLDERS), role
    # The launcher's stale settings never reach a child; the stack's replace them.
    assert "stale-env-key-6a6a" not in _values(env)
    assert "stale-db-pass" not in _values(env)
    # Not an allowlist: the rest of the operator's environment passes.
    assert env["PATH"] == PARENT["PATH"] and env["OPENAI_API_KEY"] == "openai-2222"


@pytest.mark.parametrize("role", [r for r in ROLES if r != TEMPORAL])
def test_each_process_reads_the_settings_back(role: str) -> None:
    """Non-secret settings reach every turnout process unchanged; secrets only holders."""
    settings = _settings()
    got = ModelSwitchingConfig.from_env(process_environment(role, PARENT, settings))
    expected = settings.model_copy(update={
        name: ModelSwitchingConfig.model_fields[name].get_default(call_default_factory=True)
        for name, holders in SECRET_HOLDERS.items() if role not in holders})
    assert got == expected


def test_the_temporal_server_gets_none_of_turnouts_settings() -> None:
    env = process_environment(TEMPORAL, PARENT, _settings())
    assert not any(name.startswith("VLLM_MODEL_SWITCHING_") for name in env)


def test_an_unknown_process_gets_no_secret() -> None:
    env = process_environment("something-else", PARENT, _settings())
    assert "VLLM_MODEL_SWITCHING_TEMPORAL_ADDRESS" in env
    for setting in SECRET_HOLDERS:
        assert ModelSwitchingConfig.env_name(setting) not in env


def test_every_secret_setting_has_its_holders() -> None:
    """A new secret setting (a field with repr=False) must be placed in SECRET_HOLDERS,
    or no process gets it."""
    assert secret_settings() == set(SECRET_HOLDERS)
    assert all(holders <= set(ROLES) - {TEMPORAL} for holders in SECRET_HOLDERS.values())


def test_role_of_a_command_line() -> None:
    assert role_of([sys.executable, "-m", "gateway", "--port", "1"]) == "gateway"
    assert role_of(["python", "-m", "workers.control"]) == "control-worker"
    assert role_of(["python", "script.py"]) is None


def test_the_stack_starts_each_process_with_its_environment(tmp_path: Path) -> None:
    settings = _settings().model_copy(update={"state_dir": str(tmp_path),
                                              "monitor_task_queue": "monitors"})
    stack = Stack(settings=settings, temporal_db=tmp_path / "t.db", log_dir=tmp_path / "logs",
                  base_env=PARENT, extra_env={"EXTRA": "1"})
    stack.add_process("gateway-replica", [sys.executable, "-m", "gateway", "--port", "9"])
    stack.add_process("tool", [sys.executable, "tool.py"])
    assert set(stack.processes) >= {"temporal", "api", "gateway", "control-worker",
                                    "monitor-worker", "engine-worker"}
    token = SECRETS["gateway_admin_token"]
    holds_token = {name for name in stack.processes
                   if token in _values(stack.environment(name))}
    assert holds_token == {"gateway", "gateway-replica", "control-worker", "monitor-worker"}
    assert all(stack.environment(name)["EXTRA"] == "1" for name in stack.processes)


def test_a_generated_admin_token_reaches_only_its_holders(tmp_path: Path) -> None:
    stack = Stack(settings=ModelSwitchingConfig(state_dir=str(tmp_path)),
                  temporal_db=tmp_path / "t.db", log_dir=tmp_path / "logs", base_env=PARENT)
    assert not stack.admin_token_path.exists()  # written once the stack holds its directory
    stack.claim()
    token = stack.admin_token_path.read_text().strip()
    stack.release()
    assert oct(stack.admin_token_path.stat().st_mode & 0o777) == "0o600"
    holds = {name for name in stack.processes if token in _values(stack.environment(name))}
    assert holds == {"gateway", "control-worker"}  # monitors run on the control worker


def test_the_stacks_repr_shows_no_secret(tmp_path: Path) -> None:
    stack = Stack(settings=_settings().model_copy(update={"state_dir": str(tmp_path)}),
                  temporal_db=tmp_path / "t.db", log_dir=tmp_path / "logs", base_env=PARENT,
                  extra_env={"X_TOKEN": "extra-secret-9f9f"})
    text = repr(stack)
    for value in (*[v for v in SECRETS.values() if isinstance(v, str)],
                  SECRETS["alert_webhook_urls"][0], CREDENTIAL, "extra-secret-9f9f"):
        assert value not in text
    assert "postgresql+asyncpg://turnout:***@db:5432/turnout" in text
