"""docker-compose.yml cannot run here (no Docker engine), so check what can be checked."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from turnout.client.cli import build_parser
from turnout.config import ENV_PREFIX, ModelSwitchingConfig
from turnout.environments import SECRET_HOLDERS

ROOT = Path(__file__).resolve().parents[2]
TURNOUT_SERVICES = ("migrate", "api", "control-worker", "monitor-worker", "engine-worker",
                    "gateway")


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


# What an operator must set before compose starts (`${NAME:?message}`).
REQUIRED = ("TURNOUT_API_KEY", "TURNOUT_GATEWAY_ADMIN_TOKEN", "TURNOUT_DB_PASSWORD",
            "TEMPORAL_DB_PASSWORD", "TURNOUT_GRAFANA_ADMIN_PASSWORD")


def _interpolate(value: str) -> str:
    """Compose's `${NAME:-default}` with nothing set: the default; a required `${NAME:?msg}`
    as if the operator had set it, to `set-NAME`."""
    value = re.sub(r"\$\{([A-Z_]+):\?[^}]*\}", r"set-\1", str(value))
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


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
        assert 'turnout = "turnout.client.cli:main"' in pyproject
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
    """Container port → host port of each `[ip:]host:container` mapping."""
    return {int(p.split(":")[-1]): int(p.split(":")[-2]) for p in service.get("ports", [])}


def _bound_to(service: dict[str, Any]) -> dict[int, str]:
    """Container port → the host address it is published on (compose: all when omitted)."""
    return {int(p.split(":")[-1]): p.split(":")[0] if p.count(":") == 2 else "0.0.0.0"
            for p in service.get("ports", [])}


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


def test_required_secrets_have_no_default(services: dict[str, Any]) -> None:
    """Compose refuses to start until each is set: every use is `${NAME:?message}`."""
    text = (ROOT / "docker-compose.yml").read_text()
    for name in REQUIRED:
        uses = re.findall(r"\$\{" + name + r"([^}]*)\}", text)
        assert uses, f"{name} is not used"
        assert all(use.startswith(":?") and len(use) > 2 for use in uses), (name, uses)


def test_authentication_is_on_with_the_required_key(services: dict[str, Any]) -> None:
    api = _settings(services["api"])
    assert api.enable_authentication is True
    assert api.api_key == "set-TURNOUT_API_KEY"


def test_no_default_database_passwords(services: dict[str, Any]) -> None:
    env = {name: service.get("environment", {}) for name, service in services.items()}
    assert env["store-db"]["POSTGRES_PASSWORD"].startswith("${TURNOUT_DB_PASSWORD:?")
    assert env["temporal-db"]["POSTGRES_PASSWORD"].startswith("${TEMPORAL_DB_PASSWORD:?")
    assert env["temporal"]["POSTGRES_PWD"] == env["temporal-db"]["POSTGRES_PASSWORD"]
    for name in TURNOUT_SERVICES:
        store = urlparse(_settings(services[name]).database_url)
        assert store.password == "set-TURNOUT_DB_PASSWORD", name
    admin = {_settings(services[n]).gateway_admin_token for n in TURNOUT_SERVICES}
    assert admin == {None, "set-TURNOUT_GATEWAY_ADMIN_TOKEN"}  # no `change-me`


def test_temporal_is_published_on_loopback_only(services: dict[str, Any]) -> None:
    """The frontend and the Web UI (no login; signals, terminate) stay off the network."""
    for name in ("temporal", "temporal-ui", "temporal-db", "store-db", "temporal-setup",
                 "prometheus", "grafana"):
        for port, address in _bound_to(services[name]).items():
            assert address in ("127.0.0.1", "[::1]"), (name, port, address)
    for service in services.values():  # nothing else publishes them either
        for port, host_port in _published(service).items():
            if host_port in (7233, 8233) or port == 7233:
                assert _bound_to(service)[port] in ("127.0.0.1", "[::1]")
    gateway = _settings(services["gateway"])
    assert gateway.gateway_admin_port not in _published(services["gateway"])


# Compose services besides the stack's roles that use a secret: the migration job.
_EXTRA_HOLDERS = {"database_url": {"migrate"}}


@pytest.mark.parametrize("secret", sorted(SECRET_HOLDERS))
def test_each_secret_reaches_only_the_services_that_use_it(services: dict[str, Any],
                                                           secret: str) -> None:
    """The same table as the local stack's (turnout.environments.SECRET_HOLDERS)."""
    variable = ModelSwitchingConfig.env_name(secret)
    holders = {name for name in TURNOUT_SERVICES if variable in services[name]["environment"]}
    assert holders == SECRET_HOLDERS[secret] | _EXTRA_HOLDERS.get(secret, set())


@pytest.mark.parametrize("variable", REQUIRED + ("TURNOUT_ALERT_WEBHOOK_URLS",))
def test_compose_secrets_reach_only_their_services(services: dict[str, Any],
                                                   variable: str) -> None:
    """Whatever setting name carries it, a compose secret is in these services only."""
    expected = {
        "TURNOUT_API_KEY": {"api"},
        "TURNOUT_GATEWAY_ADMIN_TOKEN": {"gateway", "control-worker", "monitor-worker"},
        "TURNOUT_ALERT_WEBHOOK_URLS": {"control-worker", "monitor-worker"},
        "TURNOUT_DB_PASSWORD": {"store-db", *TURNOUT_SERVICES},
        "TEMPORAL_DB_PASSWORD": {"temporal-db", "temporal"},
        "TURNOUT_GRAFANA_ADMIN_PASSWORD": {"grafana"},
    }[variable]
    holders = {name for name, service in services.items()
               if "${" + variable in yaml.safe_dump(service)}
    assert holders == expected


# ------------------------------------------------------------------ Prometheus and Grafana

def _mounted(service: dict[str, Any]) -> dict[str, Path]:
    """Container path → host path of each bind mount (`./host:/container[:ro]`)."""
    mounts = {}
    for volume in service.get("volumes", []):
        host, container = volume.split(":")[:2]
        if host.startswith("./"):
            mounts[container] = ROOT / host
    return mounts


def _prometheus(services: dict[str, Any]) -> dict[str, Any]:
    config = _mounted(services["prometheus"])["/etc/prometheus/prometheus.yml"]
    return {job["job_name"]: job for job in yaml.safe_load(config.read_text())["scrape_configs"]}


def _targets(job: dict[str, Any]) -> list[str]:
    return [t for group in job["static_configs"] for t in group["targets"]]


def test_prometheus_and_grafana_mount_files_that_exist(services: dict[str, Any]) -> None:
    for name in ("prometheus", "grafana"):
        mounts = _mounted(services[name])
        assert mounts, name
        for container, host in mounts.items():
            assert host.exists(), (name, container, host)
    dashboards = _mounted(services["grafana"])["/var/lib/grafana/dashboards"]
    assert sorted(p.name for p in dashboards.glob("*.json")) == ["turnout.json"]
    provisioning = _mounted(services["grafana"])["/etc/grafana/provisioning"]
    provider = yaml.safe_load((provisioning / "dashboards" / "turnout.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_prometheus_scrapes_the_gateway_with_the_admin_token(services: dict[str, Any]) -> None:
    gateway = _settings(services["gateway"])
    job = _prometheus(services)["turnout-gateway"]
    assert _targets(job) == [f"{gateway.gateway_advertise_host}:{gateway.gateway_admin_port}"]
    secret = job["authorization"]["credentials_file"].removeprefix("/run/secrets/")
    text = (ROOT / "docker-compose.yml").read_text()
    compose = yaml.safe_load(text)
    assert compose["secrets"][secret] == {"environment": "TURNOUT_GATEWAY_ADMIN_TOKEN"}
    users = {name for name, service in services.items() if secret in service.get("secrets", [])}
    assert users == {"prometheus"}


def test_prometheus_scrapes_every_engine_port_and_the_workers_sdk(
        services: dict[str, Any]) -> None:
    jobs = _prometheus(services)
    engine = _settings(services["engine-worker"])
    assert _targets(jobs["vllm-engines"]) == [
        f"{engine.engine_advertise_host}:{port}"
        for port in range(engine.engine_port_start, engine.engine_port_end + 1)]
    serving = {f"{name}:{_settings(services[name]).temporal_metrics_port}"
               for name in TURNOUT_SERVICES if name != "migrate"
               and _settings(services[name]).temporal_metrics_port}
    assert serving and set(_targets(jobs["temporal-sdk"])) == serving
    for target in serving:
        assert _settings(services[target.split(":")[0]]).temporal_metrics_host == "0.0.0.0"


def test_grafana_reads_the_dashboards_data_source(services: dict[str, Any]) -> None:
    provisioning = _mounted(services["grafana"])["/etc/grafana/provisioning"]
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    source = sources["datasources"][0]
    assert source["url"] == "http://prometheus:9090" and "prometheus" in services
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/turnout.json").read_text())
    uids = {p["datasource"]["uid"] for p in dashboard["panels"]}
    assert uids == {source["uid"]}
