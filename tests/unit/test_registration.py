"""What a registration must satisfy: the request model's own checks, the model roots, and
the settings-dependent checks of `turnout.registration` (DNS replaced by a fake)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from turnout.config import ModelSwitchingConfig
from turnout.domain import OmniModelConfig, RegisterModelRequest, SwitchRequest
from turnout.limits import MAX_JSON_BYTES
from turnout.registration import check_registration, model_dir_problem
from turnout.sdk import local_model_path

ROOT = "/srv/models"


def _request(**fields: Any) -> RegisterModelRequest:
    return RegisterModelRequest(**{"model": f"{ROOT}/tiny", "model_arch": "Tiny",
                                   "version": "v1", **fields})


def _locs(**fields: Any) -> dict[tuple, str]:
    with pytest.raises(ValidationError) as info:
        _request(**fields)
    return {tuple(e["loc"]): e["msg"] for e in info.value.errors()}


@pytest.mark.parametrize(("model", "ok"), [
    (f"{ROOT}/tiny", True), (f"{ROOT}/a/b/c", True), (f"{ROOT}//tiny/", True),
    ("org/name", True), ("Qwen/Qwen2.5-0.5B", True),
    ("/srv/models-evil/x", False), ("/srv/other", False), (f"{ROOT}/../etc", False),
    ("relative/dir/x", False), ("./tiny", False), ("~/tiny", False), ("..", False),
])
def test_model_roots_are_checked_lexically(model: str, ok: bool) -> None:
    problem = model_dir_problem(model, [ROOT])
    assert (problem is None) == ok, problem
    if not ok and model.startswith("/srv"):
        assert "VLLM_MODEL_SWITCHING_MODEL_ROOTS" in problem or "'..'" in problem


def test_resolving_follows_symlinks_out_of_the_roots(tmp_path: Path) -> None:
    root, outside = tmp_path / "models", tmp_path / "elsewhere"
    (root / "real").mkdir(parents=True)
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    linked_root = tmp_path / "link-to-models"
    linked_root.symlink_to(root)
    assert model_dir_problem(str(root / "real"), [str(root)], resolve=True) is None
    # Lexically under the root, but the engine worker resolves it: refused.
    assert model_dir_problem(str(root / "escape"), [str(root)]) is None
    assert model_dir_problem(str(root / "escape"), [str(root)], resolve=True)
    # A root reached through a symlink matches its real directory on both sides.
    assert model_dir_problem(str(root / "real"), [str(linked_root)], resolve=True) is None
    assert model_dir_problem(str(linked_root / "real"), [str(root)]) is None


def test_the_default_root_is_the_state_dirs_models(tmp_path: Path) -> None:
    settings = ModelSwitchingConfig(state_dir=str(tmp_path))
    assert settings.resolved_model_roots == [str(tmp_path / "models")]
    relative = ModelSwitchingConfig(state_dir=".turnout")
    assert relative.resolved_model_roots == [os.path.join(os.getcwd(), ".turnout", "models")]
    env = ModelSwitchingConfig.from_env({"VLLM_MODEL_SWITCHING_MODEL_ROOTS": "/a, /b/"})
    assert env.resolved_model_roots == ["/a", "/b"]


def test_the_request_model_names_each_field_at_fault() -> None:
    locs = _locs(engine_args={"max_model_len": ["256", "--host", "0.0.0.0"], "port": 1,
                              "max_num_seqs": 8},
                 endpoint=None, model="relative/dir/x")
    assert ("engine_args", "max_model_len") in locs and ("engine_args", "port") in locs
    assert ("engine_args", "max_num_seqs") not in locs
    assert "max_num_seqs" not in str(locs)
    assert ("endpoint",) in _locs(model="org/m", endpoint="http://169.254.169.254/latest#")
    assert ("api_key_env",) in _locs(model="org/m", endpoint="https://api.example.com",
                                     api_key_env="VLLM_MODEL_SWITCHING_API_KEY")
    assert ("api_key_env",) in _locs(api_key_env="lower-case")
    assert ("api_key_env",) in _locs(api_key_env="OPENAI_KEY")  # no endpoint to send it to
    assert ("engine_args",) in _locs(model="org/m", endpoint="https://api.example.com",
                                     engine_args={"max_model_len": 512})
    assert ("served_model_name",) in _locs(served_model_name="--trust-remote-code")
    assert ("metadata",) in _locs(metadata={"blob": "x" * MAX_JSON_BYTES})
    assert ("metadata",) in _locs(metadata={"a": {"b": {"c": {"d": {"e": {"f": {"g": {
        "h": {"i": 1}}}}}}}}})
    assert ("aliases",) in _locs(aliases=[f"a{i}" for i in range(33)])


def test_the_stored_model_still_reads_what_older_releases_stored() -> None:
    """`GET /models` must list a version registered before the catalogue existed."""
    old = OmniModelConfig.model_validate({"model": "~/models/x", "model_arch": "Old",
                                          "engine_args": {"max_model_len": ["1", "--x"]}})
    assert old.engine_args == {"max_model_len": ["1", "--x"]}


def test_a_good_request_is_normalised() -> None:
    request = _request(engine_args={"--max-model-len": "512", "enforce-eager": False})
    assert request.engine_args == {"max_model_len": 512, "enforce_eager": False}


def test_switch_requests_follow_the_name_patterns_and_bounds() -> None:
    with pytest.raises(ValidationError) as info:
        SwitchRequest(model_id="a b", target_version="v1;", requested_by="x" * 257,
                      reason="r" * 2001, strategy_config={"k": "v" * MAX_JSON_BYTES})
    assert {e["loc"][0] for e in info.value.errors()} == {
        "model_id", "target_version", "requested_by", "reason", "strategy_config"}


async def _no_dns(host: str, port: int, timeout: float) -> list[str] | None:
    return None


def _resolver(addresses: list[str]):
    async def resolve(host: str, port: int, timeout: float) -> list[str] | None:
        return addresses
    return resolve


async def _errors(request: RegisterModelRequest, resolve=_no_dns, **settings: Any
                  ) -> dict[tuple, str]:
    config = ModelSwitchingConfig(model_roots=[ROOT], **settings)
    return {tuple(e["loc"]): e["msg"]
            for e in await check_registration(request, config, resolve=resolve)}


async def test_a_model_outside_the_roots_is_refused_naming_the_setting() -> None:
    errors = await _errors(_request(model="/etc/models/x"))
    assert "VLLM_MODEL_SWITCHING_MODEL_ROOTS" in errors[("body", "model")]
    assert await _errors(_request()) == {}
    assert await _errors(_request(model="org/hub-model")) == {}
    tokenizer = await _errors(_request(engine_args={"tokenizer": "/tmp/tok"}))
    assert ("body", "engine_args", "tokenizer") in tokenizer


async def test_trust_remote_code_needs_the_operator_setting() -> None:
    request = _request(engine_args={"trust_remote_code": True})
    errors = await _errors(request)
    assert "VLLM_MODEL_SWITCHING_ALLOW_TRUST_REMOTE_CODE=true" in \
        errors[("body", "engine_args", "trust_remote_code")]
    assert await _errors(request, allow_trust_remote_code=True) == {}
    assert await _errors(_request(engine_args={"trust_remote_code": False})) == {}


async def test_endpoints_follow_the_deployment_settings() -> None:
    private = _request(model="m", endpoint="http://10.0.0.3:8000")
    assert ("body", "endpoint") in await _errors(private)
    assert await _errors(private, allow_private_endpoints=True) == {}
    named = _request(model="m", endpoint="https://llm.example.com")
    assert await _errors(named, resolve=_resolver(["93.184.216.34"])) == {}
    assert "resolves to 127.0.0.1" in (await _errors(
        named, resolve=_resolver(["127.0.0.1"])))[("body", "endpoint")]
    assert ("body", "endpoint") in await _errors(named, endpoint_hosts=["other.example.com"])


async def test_credential_variables_must_be_listed() -> None:
    request = _request(model="m", endpoint="https://api.example.com",
                       api_key_env="OPENAI_KEY")
    resolve = _resolver(["93.184.216.34"])
    errors = await _errors(request, resolve=resolve)
    assert "VLLM_MODEL_SWITCHING_ENDPOINT_CREDENTIAL_ENVS" in errors[("body", "api_key_env")]
    assert await _errors(request, resolve=resolve, endpoint_credential_envs=["OPENAI_KEY"]) == {}


def test_the_sdk_sends_a_local_directory_as_its_absolute_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert local_model_path("models/tiny") == str(tmp_path / "models" / "tiny")
    assert local_model_path("./models/tiny") == str(tmp_path / "models" / "tiny")
    assert local_model_path("org/not-here") == "org/not-here"  # a hub id stays one
    assert local_model_path("/srv/models/x") == "/srv/models/x"  # only the engine host has it
