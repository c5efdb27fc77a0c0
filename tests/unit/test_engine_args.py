"""The engine-args allowlist (`turnout.engine_args`): pure code, plus a check of every
catalogued option against the argument parser of the installed vLLM."""

from __future__ import annotations

import argparse
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from turnout.engine_args import (
    CATALOGUE,
    GATED,
    RESERVED,
    EngineArgsError,
    canonical,
    engine_argv,
    flag_for,
    validate_engine_args,
)

DEFAULTS = {"dtype": "float32", "max_model_len": 256, "enforce_eager": True,
            "disable_uvicorn_access_log": True}


def _refused(args: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(EngineArgsError) as info:
        validate_engine_args(args)
    return {e["loc"][0]: e["msg"] for e in info.value.errors}


def test_a_list_cannot_smuggle_flags() -> None:
    """The issue's example: list items became separate argv items, so any flag got in."""
    refused = _refused({"max_model_len": ["256", "--host", "0.0.0.0", "--trust-remote-code"]})
    assert list(refused) == ["max_model_len"] and "integer" in refused["max_model_len"]
    with pytest.raises(EngineArgsError):
        engine_argv({"max_model_len": ["256", "--host", "0.0.0.0"]}, defaults=DEFAULTS)


@pytest.mark.parametrize("key", ["model", "served_model_name", "served-model-name", "host",
                                 "--port", "api_key", "middleware", "chat_template", "config",
                                 "tool_parser_plugin", "allowed_local_media_path",
                                 "ssl_keyfile", "root_path", "hf_token", "lora_modules",
                                 "enable_tokenizer_info_endpoint", "worker_extension_cls"])
def test_reserved_options_are_refused_with_the_reason(key: str) -> None:
    refused = _refused({key: "x"})
    assert refused[key].startswith("reserved: ")


def test_unknown_options_are_refused_naming_close_known_ones() -> None:
    refused = _refused({"max_modle_len": 512, "frobnicate": True})
    assert "close known options: max_model_len" in refused["max_modle_len"]
    assert "not an engine argument turnout accepts" in refused["frobnicate"]


def test_every_problem_is_reported_at_once() -> None:
    refused = _refused({"port": 1, "dtype": "float64", "max_num_seqs": 0, "seed": True,
                        "a b": 1, "enforce_eager": "yes"})
    assert set(refused) == {"port", "dtype", "max_num_seqs", "seed", "a b", "enforce_eager"}
    assert "one of: auto" in refused["dtype"] and ">= 1" in refused["max_num_seqs"]


def test_spellings_of_one_option_are_one_option() -> None:
    assert validate_engine_args({"--max-model-len": "512"}) == {"max_model_len": 512}
    refused = _refused({"max_model_len": 512, "max-model-len": 256})
    assert "given twice" in refused["max-model-len"]


@pytest.mark.parametrize(("key", "value", "typed"), [
    ("max_model_len", "4096", 4096), ("max_model_len", 4096.0, 4096),
    ("gpu_memory_utilization", 0.85, 0.85), ("gpu_memory_utilization", "0.5", 0.5),
    ("max_lora_rank", "16", 16), ("optimization_level", 3, 3),
    ("quantization", "awq", "awq"), ("revision", "refs/pr/3", "refs/pr/3"),
    ("hf_overrides", {"rope_scaling": {"type": "yarn"}}, {"rope_scaling": {"type": "yarn"}}),
    ("cudagraph_capture_sizes", ["1", 2, 4], [1, 2, 4]), ("enable_prefix_caching", False,
                                                          False),
    ("tokenizer", "org/tokenizer", "org/tokenizer"), ("seed", None, None),
])
def test_values_are_typed(key: str, value: Any, typed: Any) -> None:
    assert validate_engine_args({key: value}) == {key: typed}


@pytest.mark.parametrize(("key", "value"), [
    ("gpu_memory_utilization", 0), ("gpu_memory_utilization", 1.5),
    ("gpu_memory_utilization", float("nan")), ("max_model_len", 1.5),
    ("max_model_len", -1), ("max_lora_rank", 7), ("max_lora_rank", True),
    ("tool_call_parser", "--enable-x"), ("revision", "main; rm -rf /"),
    ("hf_overrides", "not an object"), ("hf_overrides", {"x": "y" * 5000}),
    ("cudagraph_capture_sizes", []), ("cudagraph_capture_sizes", [1, "-2"]),
    ("cudagraph_capture_sizes", list(range(1, 300))), ("lora_target_modules", ["-q"]),
    ("tokenizer", "../outside"), ("tokenizer", "relative/dir/x"), ("enforce_eager", 1),
])
def test_bad_values_are_refused(key: str, value: Any) -> None:
    assert key in _refused({key: value})


def test_defaults_none_and_false() -> None:
    assert engine_argv({}, defaults=DEFAULTS) == [
        "--dtype", "float32", "--max-model-len", "256", "--enforce-eager",
        "--disable-uvicorn-access-log"]
    flags = engine_argv({"max_model_len": 512, "enforce_eager": None,
                         "enable_prefix_caching": False, "disable_log_stats": False,
                         "override_generation_config": {"temperature": 0}},
                        defaults=DEFAULTS)
    assert flags.count("--max-model-len") == 1
    assert flags[flags.index("--max-model-len") + 1] == "512"
    assert "--enforce-eager" not in flags and "--no-enforce-eager" not in flags
    # An option vLLM turns on by itself is turned off by false, not merely left out.
    assert "--no-enable-prefix-caching" in flags
    assert not any("log-stats" in f for f in flags)  # a plain flag: false drops it
    assert flags[flags.index("--override-generation-config") + 1] == '{"temperature": 0}'


def test_gated_options_need_their_setting() -> None:
    assert GATED == {"trust_remote_code": "allow_trust_remote_code",
                     "code_revision": "allow_trust_remote_code"}
    with pytest.raises(EngineArgsError, match="allow_trust_remote_code"):
        engine_argv({"trust_remote_code": True})
    assert engine_argv({"trust_remote_code": True},
                       allowed={"allow_trust_remote_code": True}) == ["--trust-remote-code"]
    assert engine_argv({"trust_remote_code": False}) == ["--no-trust-remote-code"]


def test_a_stored_argument_from_before_the_catalogue_is_refused_at_start() -> None:
    """What an older release stored (a pass-through dict) never reaches the argv."""
    with pytest.raises(EngineArgsError) as info:
        engine_argv({"port": 1, "max_model_len": 512}, defaults=DEFAULTS)
    assert [e["loc"] for e in info.value.errors] == [("port",)]


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                     max_leaves=12)
_KEYS = st.sampled_from(sorted(CATALOGUE) + sorted(RESERVED)[:20]) | st.text(max_size=30)


@settings(max_examples=400)
@given(args=st.dictionaries(_KEYS, _JSON, max_size=6))
def test_argv_never_holds_anything_but_catalogued_flags_and_their_values(
        args: dict[str, Any]) -> None:
    """Whatever a registration holds, the argv is accepted flags, each followed by
    values that cannot be read as flags; no flag twice; no reserved flag at all."""
    try:
        argv = engine_argv(args, defaults=DEFAULTS,
                           allowed={"allow_trust_remote_code": True})
    except EngineArgsError as exc:
        assert exc.errors and all(len(e["loc"]) == 1 for e in exc.errors)
        return
    options = {flag_for(name): o for name, o in CATALOGUE.items()}
    negated = {"--no-" + name.replace("_", "-") for name, o in CATALOGUE.items() if o.negatable}
    seen: list[str] = []
    i = 0
    while i < len(argv):  # read it as vLLM's parser would
        flag = argv[i]
        assert flag in options or flag in negated, flag
        assert flag_for(canonical(flag.removeprefix("--no-"))) not in {
            flag_for(name) for name in RESERVED}
        seen.append(flag.removeprefix("--no-").removeprefix("--"))
        i += 1
        option = options.get(flag)
        if option is None or option.kind == "bool":
            continue
        values = 0
        while i < len(argv) and not argv[i].startswith("-"):
            values, i = values + 1, i + 1
        assert values == 1 or (option.kind.endswith("_list") and values >= 1), flag
    assert len(seen) == len(set(seen))


def test_every_catalogued_option_exists_in_the_installed_vllm_parser() -> None:
    """Names, kinds and choices as vLLM's own `vllm serve` parser has them; and an argv
    with a value for every option parses."""
    pytest.importorskip("vllm")
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser())
    actions = {option: action for action in parser._actions
               for option in action.option_strings}
    argv = []
    for name, option in CATALOGUE.items():
        flag = flag_for(name)
        assert flag in actions, f"{flag} is not a vLLM option"
        action = actions[flag]
        if option.kind == "bool":
            negatable = isinstance(action, argparse.BooleanOptionalAction)
            assert negatable == option.negatable, name
            assert negatable or isinstance(action, argparse._StoreTrueAction), name
            argv.append(flag)
            continue
        if action.choices is not None and option.kind == "choice":
            assert set(option.choices) <= set(action.choices), name
        if option.kind in ("int_list", "text_list"):
            assert action.nargs in ("+", "*"), name
        else:
            assert action.nargs in (None, "?"), name
        argv += engine_argv({name: _sample(name)}, allowed={"allow_trust_remote_code": True})
    for name in RESERVED:  # reserved names are real options (no typo hides one)
        if name != "model_tag":
            assert flag_for(name) in actions, name
    parsed = parser.parse_args(["--model", "/m", *argv])
    assert parsed.max_model_len == 1024 and parsed.hf_overrides == {"a": 1}


def _sample(name: str) -> Any:
    option = CATALOGUE[name]
    return {"int": option.minimum if option.minimum and option.minimum > 0 else 1,
            "float": 0.5, "choice": option.choices[-1] if option.choices else None,
            "text": "main", "model": "org/name", "json": {"a": 1},
            "int_list": [1, 2], "text_list": ["q_proj"]}[option.kind] \
        if name != "max_model_len" else 1024


def test_canonical_names() -> None:
    assert canonical("--max-model-len") == canonical("max_model_len") == "max_model_len"
    assert json.dumps(sorted(CATALOGUE)) == json.dumps(sorted(set(CATALOGUE)))
    assert not set(CATALOGUE) & set(RESERVED)
