"""Settings: the guide's fields and `VLLM_MODEL_SWITCHING_*` variables."""

from __future__ import annotations

import pytest

from turnout import ModelSwitchingConfig, get_model_switching_config
from turnout.config import ConfigError


def test_guide_constructor_fields() -> None:
    config = ModelSwitchingConfig(enable_dynamic_registry=True, max_cached_models=5,
                                  enable_health_monitoring=True, enable_management_api=True,
                                  api_port=8001)
    assert config.max_cache_size == 5
    assert config.__dict__["api_port"] == 8001


def test_guide_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "ENABLE_REGISTRY": "true", "MAX_CACHED_MODELS": "7", "ENABLE_API": "false",
        "API_PORT": "9001", "ENABLE_MONITORING": "false", "ERROR_RATE_WARNING": "0.03",
        "LATENCY_WARNING": "3000",
    }.items():
        monkeypatch.setenv(f"VLLM_MODEL_SWITCHING_{name}", value)
    config = get_model_switching_config()
    assert config.enable_dynamic_registry is True
    assert config.max_cached_models == 7
    assert config.enable_management_api is False
    assert config.api_port == 9001
    assert config.enable_health_monitoring is False
    assert config.error_rate_warning == 0.03
    assert config.latency_warning_ms == 3000


def test_bad_variable_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="VLLM_MODEL_SWITCHING_MAX_CACHED_MODELS"):
        ModelSwitchingConfig.from_env({"VLLM_MODEL_SWITCHING_MAX_CACHED_MODELS": "many"})


def test_servers_bind_to_localhost_by_default() -> None:
    config = ModelSwitchingConfig.from_env({})
    assert config.api_host == "127.0.0.1"
    assert config.gateway_host == "127.0.0.1"
    assert config.engine_bind_host == "127.0.0.1"


def test_api_key_is_not_in_repr() -> None:
    assert "s3cret" not in repr(ModelSwitchingConfig(api_key="s3cret"))


def test_settings_pass_to_child_processes_unchanged() -> None:
    """The stack hands its settings to each process as variables: lists survive too."""
    from workers.stack import settings_env

    settings = ModelSwitchingConfig(alert_webhook_urls=["http://a/x", "http://b/y"],
                                    monitoring_interval_s=5, enable_authentication=True,
                                    api_key="k")
    assert ModelSwitchingConfig.from_env(settings_env(settings)) == settings
    assert ModelSwitchingConfig.from_env(settings_env(ModelSwitchingConfig())) == \
        ModelSwitchingConfig()


def test_webhook_urls_are_not_in_repr() -> None:
    settings = ModelSwitchingConfig(alert_webhook_urls=["https://hooks.slack.com/s3cr3t"])
    assert "s3cr3t" not in repr(settings)


POSTGRES = "postgresql+asyncpg://turnout:pg-pass-8c1e@store-db:5432/turnout"


def test_database_password_is_masked_in_repr_and_str() -> None:
    settings = ModelSwitchingConfig(database_url=POSTGRES, gateway_admin_token="tok-2f4e")
    for text in (repr(settings), str(settings)):
        assert "pg-pass-8c1e" not in text and "tok-2f4e" not in text
        assert "postgresql+asyncpg://turnout:***@store-db:5432/turnout" in text


@pytest.mark.parametrize(("url", "shown"), [
    (POSTGRES, "postgresql+asyncpg://turnout:***@store-db:5432/turnout"),
    ("postgresql://u:p%40ss@[::1]:5432/db?sslmode=require",
     "postgresql://u:***@[::1]:5432/db?sslmode=require"),
    # libpq also takes the password as a query parameter.
    ("postgresql://u@db/x?sslmode=require&password=pw9",
     "postgresql://u@db/x?sslmode=require&password=***"),
    ("postgresql://u@db/x", "postgresql://u@db/x"),
    ("sqlite+aiosqlite:///.turnout/turnout.db", "sqlite+aiosqlite:///.turnout/turnout.db"),
    ("http://[not-a-url", "***"),
])
def test_redact_url(url: str, shown: str) -> None:
    from turnout.config import redact_url

    assert redact_url(url) == shown


def test_secret_variable_lists_are_names() -> None:
    settings = ModelSwitchingConfig.from_env({
        "VLLM_MODEL_SWITCHING_ENDPOINT_CREDENTIAL_ENVS": "OPENAI_API_KEY, PARTNER_TOKEN",
        "VLLM_MODEL_SWITCHING_ENGINE_ENV_PASSTHROUGH": "RAY_*,MY_FLAG"})
    assert settings.endpoint_credential_envs == ["OPENAI_API_KEY", "PARTNER_TOKEN"]
    assert settings.engine_env_passthrough == ["RAY_*", "MY_FLAG"]


@pytest.mark.parametrize(("name", "value"), [
    ("ENDPOINT_CREDENTIAL_ENVS", "OPENAI_API_KEY,not a name"),
    ("ENDPOINT_CREDENTIAL_ENVS", "PREFIX_*"),  # names, not patterns
    ("ENDPOINT_CREDENTIAL_ENVS", "VLLM_MODEL_SWITCHING_API_KEY"),
    ("ENGINE_ENV_PASSTHROUGH", "VLLM_MODEL_SWITCHING_*"),
    ("ENGINE_ENV_PASSTHROUGH", "VLLM_MODEL_SWITCHING_DATABASE_URL"),
    ("ENGINE_ENV_PASSTHROUGH", ",".join(f"V{i}" for i in range(65))),
])
def test_bad_secret_variable_lists_name_the_setting(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"VLLM_MODEL_SWITCHING_{name}"):
        ModelSwitchingConfig.from_env({f"VLLM_MODEL_SWITCHING_{name}": value})


def test_gateway_client_keys_are_comma_separated_secret_and_strong() -> None:
    keys = ["k3y-0123456789abcdef", "second_key-ABCDEFGHIJ"]
    settings = ModelSwitchingConfig.from_env(
        {"VLLM_MODEL_SWITCHING_GATEWAY_API_KEYS": f" {keys[0]}, {keys[1]},"})
    assert settings.gateway_api_keys == keys
    assert keys[0] not in repr(settings) and keys[1] not in str(settings)
    assert ModelSwitchingConfig.from_env({}).gateway_api_keys == []
    from workers.stack import settings_env

    assert ModelSwitchingConfig.from_env(settings_env(settings)) == settings
    for bad in ("short-s3cret", "has space in it 0123", "non-ascii-ключ-0123456789"):
        with pytest.raises(ConfigError, match="VLLM_MODEL_SWITCHING_GATEWAY_API_KEYS") as err:
            ModelSwitchingConfig.from_env(
                {"VLLM_MODEL_SWITCHING_GATEWAY_API_KEYS": f"{keys[0]},{bad}"})
        assert "key 2 of 2" in str(err.value) and bad not in str(err.value)
        with pytest.raises(ValueError) as direct:  # pydantic's own message hides it too
            ModelSwitchingConfig(gateway_api_keys=[bad])
        assert bad not in str(direct.value)
