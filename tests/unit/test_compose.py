"""docker-compose.yml cannot run here (no Docker engine), so check what can be checked."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from turnout.cli import build_parser
from turnout.config import ENV_PREFIX, ModelSwitchingConfig

ROOT = Path(__file__).resolve().parents[2]
TURNOUT_SERVICES = ("migrate", "api", "control-worker", "monitor-worker", "engine-worker",
                    "gateway")


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def _interpolate(value: str) -> str:
    """Compose's `${NAME:-default}` with nothing set: the default."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(value))


def _settings(service: dict[str, Any]) -> ModelSwitchingConfig:
    env = {k: _interpolate(v) for k, v in service["environment"].items()}
    env = {k: v for k, v in env.items() if v != ""}
    return ModelSwitchingConfig.from_env(env)


def test_the_deployment_has_every_part(services: dict[str, Any]) -> None:
    for name in ("temporal", "temporal-db", "temporal-ui", "store-db", *TURNOUT_SERVICES):
        assert name in services, name


@pytest.mark.parametrize("name", TURNOUT_SERVICES)
def test_every_command_exists_in_the_project(services: dict[str, Any], name: str) -> None:
    command = services[name]["command"]
    if command[:2] == ["python", "-m"]:
        spec = importlib.util.find_spec(command[2])
        assert spec is not None, f"{name}: module {command[2]} does not exist"
        is_package = spec.submodule_search_locations is not None
        main = importlib.util.find_spec(f"{command[2]}.__main__") if is_package else spec
        assert main is not None, f"{name}: {command[2]} cannot be run with -m"
    else:
        assert command[0] == "turnout"
        pyproject = (ROOT / "pyproject.toml").read_text()
        assert 'turnout = "turnout.cli:main"' in pyproject
        build_parser().parse_args(command[1:])


@pytest.mark.parametrize("name", TURNOUT_SERVICES)
def test_environment_is_valid_settings(services: dict[str, Any], name: str) -> None:
    env = services[name]["environment"]
    known = {ModelSwitchingConfig.env_name(f) for f in ModelSwitchingConfig.model_fields}
    for key in env:
        if key.startswith(ENV_PREFIX):
            assert key in known, f"{name}: {key} is not a turnout setting"
    settings = _settings(services[name])
    store = urlparse(settings.database_url.replace("+asyncpg", ""))
    assert store.scheme == "postgresql" and store.hostname in services
    assert settings.temporal_address.split(":")[0] in services


def _published(service: dict[str, Any]) -> dict[int, int]:
    return {int(c): int(h) for h, c in (p.split(":") for p in service.get("ports", []))}


def test_ports_agree_with_settings(services: dict[str, Any]) -> None:
    api = _settings(services["api"])
    assert api.api_host == "0.0.0.0"
    assert _published(services["api"]) == {api.api_port: api.api_port}
    gateway = _settings(services["gateway"])
    assert gateway.gateway_host == "0.0.0.0"
    assert _published(services["gateway"]) == {gateway.gateway_port: gateway.gateway_port}
    temporal_port = int(api.temporal_address.split(":")[1])
    assert temporal_port in _published(services["temporal"])
    assert 8080 in _published(services["temporal-ui"])


def test_engines_are_reachable_from_the_gateway(services: dict[str, Any]) -> None:
    engine = _settings(services["engine-worker"])
    assert engine.engine_bind_host == "0.0.0.0"
    assert engine.engine_advertise_host == "engine-worker"
