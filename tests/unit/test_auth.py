"""Named keys with roles (`turnout.auth`): lookup, header parsing, the key file, the
settings that must refuse to start, and the budget of audited failures."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from turnout.auth import (
    ANONYMOUS,
    ApiKey,
    AuthConfigError,
    AuthFailure,
    FailureBudget,
    FailureReason,
    KeyRing,
    Principal,
    Role,
    hash_key,
    keyring_from_settings,
    load_key_file,
    make_key,
    thresholds_role,
)
from turnout.config import ModelSwitchingConfig

VIEWER_KEY, OPERATOR_KEY = "viewer-key-0123456789", "operator-key-0123456789"
RING = KeyRing([ApiKey(name="dash", role=Role.VIEWER, key_sha256=hash_key(VIEWER_KEY)),
                ApiKey(name="ci", role=Role.OPERATOR, key_sha256=hash_key(OPERATOR_KEY))])


def test_roles_include_the_ones_below() -> None:
    assert Role.ADMIN.allows(Role.OPERATOR) and Role.ADMIN.allows(Role.VIEWER)
    assert Role.OPERATOR.allows(Role.VIEWER) and not Role.OPERATOR.allows(Role.ADMIN)
    assert not Role.VIEWER.allows(Role.OPERATOR)
    assert thresholds_role("m") is Role.OPERATOR and thresholds_role(None) is Role.ADMIN


@pytest.mark.parametrize(("authorization", "x_api_key", "expected"), [
    ([f"Bearer {VIEWER_KEY}"], [], Principal("dash", Role.VIEWER)),
    ([f"bearer   {OPERATOR_KEY} "], [], Principal("ci", Role.OPERATOR)),
    ([], [OPERATOR_KEY], Principal("ci", Role.OPERATOR)),
    ([], [], AuthFailure(FailureReason.MISSING)),
    (["Bearer nope-not-a-key"], [], AuthFailure(FailureReason.UNKNOWN)),
    ([f"Basic {VIEWER_KEY}"], [], AuthFailure(FailureReason.MALFORMED)),
    (["Bearer"], [], AuthFailure(FailureReason.MALFORMED)),
    (["Bearer ключ"], [], AuthFailure(FailureReason.MALFORMED)),
    ([], ["Ã©tÃ©"], AuthFailure(FailureReason.MALFORMED)),  # UTF-8 bytes read as latin-1
    ([f"Bearer {VIEWER_KEY} extra"], [], AuthFailure(FailureReason.MALFORMED)),
    ([f"Bearer {'k' * 600}"], [], AuthFailure(FailureReason.MALFORMED)),
    # A proxy's Basic credentials beside the key are left alone.
    (["Basic dXNlcjpwYXNz"], [VIEWER_KEY], Principal("dash", Role.VIEWER)),
    # Two keys at once leave it open who acts: refused, even if both are known.
    ([f"Bearer {VIEWER_KEY}"], [OPERATOR_KEY], AuthFailure(FailureReason.MALFORMED)),
    ([f"Bearer {VIEWER_KEY}", f"Bearer {OPERATOR_KEY}"], [],
     AuthFailure(FailureReason.MALFORMED)),
])
def test_authenticate(authorization: list[str], x_api_key: list[str],
                      expected: Principal | AuthFailure) -> None:
    assert RING.authenticate(authorization, x_api_key) == expected


# Any text, and now and then a known key in one of its forms.
HEADER_VALUES = st.one_of(st.text(max_size=80), st.sampled_from(
    [f"Bearer {VIEWER_KEY}", f"bearer {OPERATOR_KEY}", VIEWER_KEY, "Basic dXNlcjpwYXNz"]))


@given(st.lists(HEADER_VALUES, max_size=2), st.lists(HEADER_VALUES, max_size=2))
def test_any_header_values_give_a_principal_or_a_failure(authorization: list[str],
                                                         x_api_key: list[str]) -> None:
    result = RING.authenticate(authorization, x_api_key)
    assert isinstance(result, Principal | AuthFailure)
    if isinstance(result, Principal):
        assert any(value.split() and value.split()[-1] in (VIEWER_KEY, OPERATOR_KEY)
                   for value in authorization + x_api_key)


@given(st.text(max_size=600))
def test_lookup_never_raises_and_finds_only_configured_keys(presented: str) -> None:
    found = RING.lookup(presented)
    assert found is None or presented in (VIEWER_KEY, OPERATOR_KEY)


def test_made_keys_are_unique_and_hash_to_a_valid_entry() -> None:
    keys = {make_key() for _ in range(50)}
    assert len(keys) == 50
    key = keys.pop()
    entry = ApiKey(name="new", role=Role.ADMIN, key_sha256=hash_key(key))
    assert KeyRing([entry]).lookup(key) == entry
    assert "key_sha256" not in repr(entry) and hash_key(key) not in repr(entry)


def test_key_names_and_hashes_must_be_unique() -> None:
    one = ApiKey(name="a", role=Role.VIEWER, key_sha256=hash_key("x" * 20))
    with pytest.raises(AuthConfigError, match="a appear more than once"):
        KeyRing([one, one.model_copy(update={"key_sha256": hash_key("y" * 20)})])
    with pytest.raises(AuthConfigError, match="same key_sha256"):
        KeyRing([one, one.model_copy(update={"name": "b"})])


def _write(path: Path, data: object, mode: int = 0o600) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    os.chmod(path, mode)
    return path


def test_key_file_in_yaml_or_json(tmp_path: Path) -> None:
    yaml_file = _write(tmp_path / "keys.yaml", f"""
- name: dash
  role: viewer
  key_sha256: {hash_key(VIEWER_KEY)}
- name: ci
  role: operator
  key_sha256: {hash_key(OPERATOR_KEY).upper()}
""")
    json_file = _write(tmp_path / "keys.json",
                       [{"name": "dash", "role": "viewer", "key_sha256": hash_key(VIEWER_KEY)}])
    ring = KeyRing(load_key_file(yaml_file))
    assert ring.authenticate([], [OPERATOR_KEY]) == Principal("ci", Role.OPERATOR)
    assert [k.name for k in load_key_file(json_file)] == ["dash"]


@pytest.mark.parametrize(("content", "mode", "message"), [
    ("[]", 0o600, "non-empty list"),
    ("{name: a}", 0o600, "non-empty list"),
    ("- [unclosed", 0o600, "not valid YAML"),
    ([{"name": "a", "role": "root", "key_sha256": "0" * 64}], 0o600, "entry 0: role"),
    ([{"name": "a b", "role": "viewer", "key_sha256": "0" * 64}], 0o600, "entry 0: name"),
    ([{"name": ANONYMOUS, "role": "viewer", "key_sha256": "0" * 64}], 0o600,
     "name the key otherwise"),
    ([{"name": "a", "role": "viewer", "key_sha256": "abc"}], 0o600, "key_sha256"),
    # A plain key is refused: the file holds hashes only.
    ([{"name": "a", "role": "viewer", "key": "plain-text-key-12345"}], 0o600, "key_sha256"),
    ([{"name": "a", "role": "viewer", "key_sha256": "0" * 64}], 0o666, "chmod go-w"),
])
def test_bad_key_files_are_refused_naming_the_setting(tmp_path: Path, content: object,
                                                     mode: int, message: str) -> None:
    path = _write(tmp_path / "keys.yaml", content, mode)
    with pytest.raises(AuthConfigError, match="VLLM_MODEL_SWITCHING_API_KEYS_FILE") as error:
        load_key_file(path)
    assert message in str(error.value)
    assert "plain-text-key" not in str(error.value)


def test_missing_key_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(AuthConfigError, match="cannot read"):
        load_key_file(tmp_path / "absent.yaml")


def test_authentication_off_needs_no_key() -> None:
    assert keyring_from_settings(ModelSwitchingConfig()) is None


@pytest.mark.parametrize("empty", [None, ""])
def test_authentication_on_without_a_key_refuses_naming_the_variables(empty: str | None
                                                                      ) -> None:
    with pytest.raises(AuthConfigError) as error:
        keyring_from_settings(ModelSwitchingConfig(enable_authentication=True,
                                                   api_key=empty, api_keys_file=empty))
    for name in ("ENABLE_AUTHENTICATION", "API_KEYS_FILE", "API_KEY"):
        assert f"VLLM_MODEL_SWITCHING_{name}" in str(error.value)
    assert "no API key is configured" in str(error.value)


def test_the_guides_api_key_is_the_admin_key_named_default(tmp_path: Path) -> None:
    ring = keyring_from_settings(ModelSwitchingConfig(enable_authentication=True,
                                                      api_key="your-secure-api-key"))
    assert ring is not None
    assert ring.authenticate(["Bearer your-secure-api-key"]) == Principal("default", Role.ADMIN)
    keys = _write(tmp_path / "keys.json",
                  [{"name": "dash", "role": "viewer", "key_sha256": hash_key(VIEWER_KEY)}])
    both = keyring_from_settings(ModelSwitchingConfig(
        enable_authentication=True, api_key="your-secure-api-key", api_keys_file=str(keys)))
    assert both is not None and [k.name for k in both.keys] == ["dash", "default"]


@pytest.mark.parametrize(("key", "message"), [("s3cret", "at least 16"),
                                              ("with a space in it!", "printable ASCII"),
                                              ("ключ-ключ-ключ-ключ", "printable ASCII")])
def test_a_weak_or_unusable_api_key_refuses_to_start(key: str, message: str) -> None:
    with pytest.raises(AuthConfigError, match="VLLM_MODEL_SWITCHING_API_KEY") as error:
        keyring_from_settings(ModelSwitchingConfig(enable_authentication=True, api_key=key))
    assert message in str(error.value) and key not in str(error.value)


def test_failure_budget_audits_a_few_per_client_and_minute_and_counts_the_rest() -> None:
    budget = FailureBudget(per_client=3, total=5)
    first = [budget.admit("a", 0.0 + i) for i in range(10)]
    assert [a.audit for a in first] == [True] * 3 + [False] * 7
    assert [a.first_suppressed for a in first] == [False] * 3 + [True] + [False] * 6
    # Another client has its own allowance, within the overall cap (5 - 3 = 2 left).
    assert [budget.admit("b", 20.0).audit for _ in range(3)] == [True, True, False]
    # The next minute starts afresh and reports what the last one only counted.
    later = budget.admit("a", 61.0)
    assert later.audit and later.ended == {"a": 7, "b": 1}


def test_failure_budget_memory_is_bounded_under_many_clients() -> None:
    budget = FailureBudget(per_client=1, total=10_000, max_clients=100)
    admitted = sum(budget.admit(f"10.0.{i // 256}.{i % 256}", 1.0).audit for i in range(5000))
    assert admitted == 101  # 100 distinct clients, then one shared allowance
    assert len(budget._counts) <= 101
