"""The vLLM server options a version may set in `engine_args`: an allowlist, not a
pass-through.

A version's `engine_args` become the command line of the vLLM server that serves it, so
every key must name an option listed here (`CATALOGUE`), each with a typed value: an
integer or a number within a range, true/false, one of a fixed set of words, a short
name of a fixed shape, a JSON object where vLLM takes JSON, and a list only where the
option takes several values (each item checked; none may start with `-`). What a value
becomes is decided here, never by the value: a list is never spread into free argv items.

Options turnout decides itself (where the engine listens, what it is called, which model
it loads), and options that load code, read or write files outside the model roots, open
debugging endpoints or carry secrets are `RESERVED`: refused with the reason. Running code
from a model repository (`trust_remote_code`) is refused unless the operator allows it
(`GATED`, setting `VLLM_MODEL_SWITCHING_ALLOW_TRUST_REMOTE_CODE=true`). Anything else is
unknown and refused, with the closest known names.

The names were checked against the argument parser of vLLM 0.32 (`vllm serve`):
tests/unit/test_engine_args.py builds that parser, when vLLM is installed, and checks that
every option here exists with a compatible type and choices.

Checked twice: at registration (the API refuses a bad key with a 422 naming
`engine_args.<key>`) and when an engine starts (`engine_argv`: a registration stored by an
older release with a bad argument fails its load, it is never passed through).
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from turnout.limits import JSONTooLarge, check_json_size

Kind = Literal["int", "float", "bool", "choice", "text", "json", "int_list", "text_list",
               "model"]

# Where a model (or tokenizer) lives: an absolute directory or a hub id (`org/name`).
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")
_PARSER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_MODULE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.]{0,127}$")
_KEY = re.compile(r"^-{0,2}[A-Za-z][A-Za-z0-9_-]{0,63}$")
# A JSON-valued option holds a small object (the whole `engine_args` is bounded too).
JSON_OPTION_MAX_BYTES = 4096
_INT_MAX = 2**53


@dataclass(frozen=True)
class Option:
    """One vLLM option: the kind of value it takes and the bounds of that value.

    `negatable`: vLLM also has `--no-<flag>` (argparse `BooleanOptionalAction`), so false
    is sent as that (for options whose vLLM default is "on" or "auto", dropping the flag
    would not turn them off); a plain store-true flag is dropped when false.
    """

    kind: Kind
    help: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    choices: tuple[Any, ...] = ()
    pattern: re.Pattern[str] | None = None
    negatable: bool = True
    max_items: int = 0
    gate: str | None = None  # a setting that must be true for the option to be used


def _int(help: str, minimum: int, maximum: int) -> Option:
    return Option("int", help, minimum=minimum, maximum=maximum)


def _bool(help: str, *, negatable: bool = True, gate: str | None = None) -> Option:
    return Option("bool", help, negatable=negatable, gate=gate)


def _choice(help: str, *choices: Any) -> Option:
    return Option("choice", help, choices=choices)


_DTYPES = ("auto", "bfloat16", "float", "float16", "float32", "half")
_KV_CACHE_DTYPES = (
    "auto", "bfloat16", "float16", "fp8", "fp8_ds_mla", "fp8_e4m3", "fp8_e5m2", "fp8_inc",
    "fp8_per_token_head", "int4_per_token_head", "int8_per_token_head", "nvfp4",
    "nvfp4_4over6", "nvfp4_ds_mla", "turboquant_3bit_nc", "turboquant_4bit_nc",
    "turboquant_k3v4_nc", "turboquant_k8v4", "ultraquant_4bit")
_QUANTIZATIONS = (
    "awq", "auto_awq", "fp8", "fbgemm_fp8", "fp_quant", "modelopt", "modelopt_fp4",
    "modelopt_mxfp8", "modelopt_mixed", "auto_gptq", "gptq", "gptq_marlin", "awq_marlin",
    "humming", "compressed-tensors", "experts_int8", "quark", "moe_wna16", "torchao", "inc",
    "mxfp4", "gpt_oss_mxfp4", "deepseek_v4_fp8", "online", "fp8_per_tensor",
    "fp8_per_block", "fp8_per_channel", "int8_per_channel_weight_only", "nvfp4_per_token",
    "mxfp8")
_TOKENIZER_MODES = ("auto", "hf", "mistral", "deepseek_v32", "deepseek_v4", "inkling",
                    "kimi_k3", "cohere")
# Weight formats read from the model directory itself (not tensorizer/streamer URIs).
_LOAD_FORMATS = ("auto", "hf", "pt", "safetensors", "npcache", "dummy", "fastsafetensors",
                 "mistral", "sharded_state")

TRUST_REMOTE_CODE_SETTING = "allow_trust_remote_code"

CATALOGUE: dict[str, Option] = {
    # model and weights
    "dtype": _choice("data type of weights and activations", *_DTYPES),
    "quantization": _choice("quantization method of the weights", *_QUANTIZATIONS),
    "load_format": _choice("format of the weights in the model directory", *_LOAD_FORMATS),
    "revision": Option("text", "model revision (branch, tag or commit) of a hub model",
                       pattern=_REVISION),
    "tokenizer": Option("model", "tokenizer directory (under the model roots) or hub id"),
    "tokenizer_revision": Option("text", "tokenizer revision of a hub tokenizer",
                                 pattern=_REVISION),
    "tokenizer_mode": _choice("tokenizer implementation", *_TOKENIZER_MODES),
    "model_impl": _choice("model implementation", "auto", "vllm", "transformers"),
    "hf_overrides": Option("json", "overrides of the model's Hugging Face config"),
    "seed": _int("random seed", 0, 2**32 - 1),
    "generation_config": _choice("where default sampling parameters come from",
                                 "auto", "vllm"),
    "override_generation_config": Option("json", "default sampling parameters"),
    "language_model_only": _bool("serve only the language part of a multimodal model"),
    "trust_remote_code": _bool("run Python code shipped with the model",
                               gate=TRUST_REMOTE_CODE_SETTING),
    "code_revision": Option("text", "revision of the model's remote code",
                            pattern=_REVISION, gate=TRUST_REMOTE_CODE_SETTING),
    # context and memory
    "max_model_len": _int("context length in tokens", 1, 100_000_000),
    "gpu_memory_utilization": Option("float", "share of device memory for the engine",
                                     minimum=0, maximum=1, exclusive_minimum=True),
    "kv_cache_dtype": _choice("data type of the KV cache", *_KV_CACHE_DTYPES),
    "kv_cache_memory_bytes": _int("KV cache size in bytes", 1, 2**50),
    "block_size": _int("tokens per KV cache block", 1, 4096),
    "enable_prefix_caching": _bool("reuse the KV cache of shared prompt prefixes"),
    "prefix_caching_hash_algo": _choice("hash of cached prefixes", "sha256", "sha256_cbor",
                                        "xxhash", "xxhash_cbor"),
    "cpu_offload_gb": Option("float", "GiB of weights offloaded to CPU memory",
                             minimum=0, maximum=100_000),
    "enable_sleep_mode": _bool("allow the engine to sleep (free device memory)"),
    # parallelism
    "tensor_parallel_size": _int("tensor parallel ranks", 1, 1024),
    "pipeline_parallel_size": _int("pipeline parallel stages", 1, 1024),
    "enable_expert_parallel": _bool("expert parallelism for MoE layers"),
    "distributed_executor_backend": _choice("how workers are run", "mp", "uni", "ray"),
    "disable_custom_all_reduce": _bool("use NCCL instead of the custom all-reduce"),
    "max_parallel_loading_workers": _int("workers loading weights at once", 1, 1024),
    # scheduling
    "max_num_seqs": _int("most sequences per iteration", 1, 1_000_000),
    "max_num_batched_tokens": _int("most tokens per iteration", 1, 100_000_000),
    "enable_chunked_prefill": _bool("split long prefills into chunks"),
    "long_prefill_token_threshold": _int("a prefill longer than this is long", 0,
                                         100_000_000),
    "scheduling_policy": _choice("order of requests", "fcfs", "priority"),
    "async_scheduling": _bool("overlap scheduling with execution"),
    "stream_interval": _int("tokens per streamed chunk", 1, 10_000),
    # execution
    "enforce_eager": _bool("run eagerly (no CUDA graphs / compilation)"),
    "optimization_level": _choice("compilation level", 0, 1, 2, 3),
    "cudagraph_capture_sizes": Option("int_list", "batch sizes captured as CUDA graphs",
                                      minimum=1, maximum=65_536, max_items=256),
    "disable_sliding_window": _bool("disable sliding-window attention"),
    "disable_cascade_attn": _bool("disable cascade attention"),
    # LoRA (adapters are not loaded from paths: `lora_modules` is reserved)
    "enable_lora": _bool("serve LoRA adapters"),
    "max_loras": _int("LoRA adapters per batch", 1, 1024),
    "max_lora_rank": _choice("largest LoRA rank", 1, 8, 16, 32, 64, 128, 256, 320, 512),
    "max_cpu_loras": _int("LoRA adapters kept in CPU memory", 1, 1024),
    "lora_dtype": _choice("data type of LoRA weights", "auto", "bfloat16", "float16"),
    "fully_sharded_loras": _bool("shard LoRA computation fully"),
    "lora_target_modules": Option("text_list", "modules LoRA applies to",
                                  pattern=_MODULE_NAME, max_items=64),
    # multimodal
    "limit_mm_per_prompt": Option("json", "most items per modality per prompt"),
    "mm_processor_kwargs": Option("json", "arguments of the multimodal processor"),
    # OpenAI server
    "disable_uvicorn_access_log": _bool("no access-log line per request"),
    "uvicorn_log_level": _choice("log level of the HTTP server", "critical", "debug",
                                 "error", "info", "trace", "warning"),
    "disable_log_stats": _bool("no periodic statistics in the log", negatable=False),
    "enable_log_requests": _bool("log each request"),
    "max_logprobs": _int("most log-probabilities a request may ask for", 0, 1_000_000),
    "response_role": Option("text", "role of chat answers",
                            pattern=re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")),
    "chat_template_content_format": _choice("how message content is rendered", "auto",
                                            "openai", "string"),
    "default_chat_template_kwargs": Option("json", "default arguments of the chat template"),
    "enable_auto_tool_choice": _bool("let the model choose tools"),
    "tool_call_parser": Option("text", "built-in tool call parser", pattern=_PARSER_NAME),
    "reasoning_parser": Option("text", "built-in reasoning parser", pattern=_PARSER_NAME),
    "enable_prompt_tokens_details": _bool("report cached prompt tokens in usage"),
    "enable_force_include_usage": _bool("include usage in every answer"),
    "return_tokens_as_token_ids": _bool("return tokens as `token_id:N`"),
    "enable_request_id_headers": _bool("add X-Request-Id to answers"),
    "disable_fastapi_docs": _bool("no /docs on the engine"),
    "shutdown_timeout": _int("seconds to finish requests when stopping", 0, 86_400),
}

_TURNOUT_SETS = ("turnout sets it: the engine's model, name and address are decided by "
                 "the version and the engine worker")
_LOADS_CODE = "loads Python code named by the value"
_SERVER = ("changes how turnout reaches the engine (keys, TLS, paths, CORS): clients come "
           "in through the gateway")
_DEBUG = "opens debugging or introspection endpoints on the engine"
_FILES = "reads or writes files outside the model roots"
_CONNECTS = "connects the engine to other systems"

RESERVED: dict[str, str] = {
    **{name: _TURNOUT_SETS for name in (
        "model", "model_tag", "served_model_name", "host", "port", "uds", "headless",
        "api_server_count", "grpc", "grpc_port", "data_parallel_size",
        "data_parallel_rank", "data_parallel_start_rank", "data_parallel_size_local",
        "data_parallel_address", "data_parallel_rpc_port", "data_parallel_backend",
        "data_parallel_hybrid_lb", "data_parallel_external_lb", "nnodes", "node_rank",
        "master_addr", "master_port", "data_parallel_supervisor_port")},
    **{name: _LOADS_CODE for name in (
        "middleware", "tool_parser_plugin", "reasoning_parser_plugin", "io_processor_plugin",
        "logits_processors", "worker_cls", "worker_extension_cls", "scheduler_cls",
        "model_class_overrides")},
    **{name: _SERVER for name in (
        "api_key", "ssl_keyfile", "ssl_certfile", "ssl_ca_certs", "ssl_cert_reqs",
        "ssl_ciphers", "enable_ssl_refresh", "root_path", "allowed_origins",
        "allowed_methods", "allowed_headers", "allow_credentials")},
    **{name: _DEBUG for name in (
        "enable_tokenizer_info_endpoint", "profiler_config", "enable_server_load_tracking",
        "enable_offline_docs")},
    **{name: _FILES for name in (
        "config", "download_dir", "allowed_local_media_path", "lora_modules",
        "hf_config_path", "compilation_config", "speculative_config", "mm_encoder_fp8_scale_path",
        "mm_encoder_fp8_scale_save_path")},
    **{name: _CONNECTS for name in (
        "kv_transfer_config", "kv_events_config", "ec_transfer_config",
        "otlp_traces_endpoint", "weight_transfer_config")},
    "hf_token": "a secret on the command line: give the engine worker HF_TOKEN instead",
    "chat_template": ("a file of the engine host or an inline template: put the template "
                      "in the model directory (tokenizer_config.json)"),
    "trust_request_chat_template": "lets clients send their own chat templates",
    "trust_request_mm_kwargs": "lets clients send their own multimodal processor arguments",
    "enable_prompt_embeds": "lets clients send tensors the engine deserializes",
}

# Settings (fields of `ModelSwitchingConfig`) that open gated options, by option.
GATED: dict[str, str] = {name: option.gate for name, option in CATALOGUE.items()
                         if option.gate}


@dataclass
class EngineArgsError(ValueError):
    """Engine arguments that cannot be used; `errors` are pydantic-style, each located at
    the key as given (`loc` = (key,))."""

    errors: list[dict[str, Any]] = field(default_factory=list)

    def __str__(self) -> str:
        return "; ".join(f"engine_args.{e['loc'][0]}: {e['msg']}" for e in self.errors)


def canonical(key: str) -> str:
    """`--max-model-len`, `max-model-len` and `max_model_len` name one option."""
    return key.lstrip("-").replace("-", "_")


def flag_for(name: str) -> str:
    return "--" + name.replace("_", "-")


def validate_engine_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """Check every key and value; returns the arguments with canonical keys and typed
    values (`"512"` → 512). Raises `EngineArgsError` listing every problem.

    Gated options are accepted here (they are typed like the others); whether the
    deployment allows them is `gated_options`' question, asked with the settings.
    """
    errors: list[dict[str, Any]] = []
    clean: dict[str, Any] = {}
    given_as: dict[str, str] = {}

    def refuse(key: str, kind: str, message: str, value: Any) -> None:
        errors.append({"loc": (key,), "type": kind, "msg": message, "input": value})

    for key, value in args.items():
        if not isinstance(key, str) or not _KEY.match(key):
            refuse(str(key)[:80], "engine_arg_name", "not a vLLM option name", value)
            continue
        name = canonical(key)
        if name in given_as:
            refuse(key, "engine_arg_repeated", f"given twice (also as {given_as[name]!r})",
                   value)
            continue
        given_as[name] = key
        if name in RESERVED:
            refuse(key, "engine_arg_reserved", f"reserved: {RESERVED[name]}", value)
            continue
        option = CATALOGUE.get(name)
        if option is None:
            close = difflib.get_close_matches(name, CATALOGUE, n=3, cutoff=0.6)
            hint = f"; close known options: {', '.join(close)}" if close else ""
            refuse(key, "engine_arg_unknown",
                   f"not an engine argument turnout accepts{hint} (see the README's "
                   f"list)", value)
            continue
        try:
            clean[name] = check_value(option, value)
        except ValueError as exc:
            refuse(key, "engine_arg_value", str(exc), value)
    if errors:
        raise EngineArgsError(errors)
    return clean


def gated_options(args: Mapping[str, Any], allowed: Mapping[str, bool]) -> list[
        tuple[str, str]]:
    """(key, setting) of each gated option `args` use (not None/false) whose setting is
    not on in `allowed` (setting name → value)."""
    refused = []
    for key, value in args.items():
        gate = GATED.get(canonical(key))
        if gate and value not in (None, False) and not allowed.get(gate, False):
            refused.append((key, gate))
    return refused


def check_value(option: Option, value: Any) -> Any:
    """The value, typed, if `option` can take it; else ValueError saying what it takes.

    None always passes: it removes the option (also one of turnout's defaults).
    """
    if value is None:
        return None
    kind = option.kind
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError("must be true, false or null")
        return value
    if kind == "int":
        return _bounded(option, _as_int(value))
    if kind == "float":
        return _bounded(option, _as_float(value))
    if kind == "choice":
        for choice in option.choices:
            if isinstance(choice, int):  # a number: 16 or "16", never true/false
                if not isinstance(value, bool) and value in (choice, str(choice)):
                    return choice
            elif value == choice:
                return choice
        raise ValueError(f"must be one of: {', '.join(str(c) for c in option.choices)}")
    if kind in ("text", "model"):
        return _text(option, value)
    if kind == "json":
        if not isinstance(value, dict):
            raise ValueError("must be a JSON object")
        try:
            check_json_size(value, max_bytes=JSON_OPTION_MAX_BYTES)
        except JSONTooLarge as exc:
            raise ValueError(f"too large: {exc}") from None
        return value
    # int_list / text_list
    if not isinstance(value, list | tuple) or not value:
        raise ValueError(f"must be a list of 1 to {option.max_items} items")
    if len(value) > option.max_items:
        raise ValueError(f"at most {option.max_items} items")
    items = []
    for i, item in enumerate(value):
        try:
            items.append(_bounded(option, _as_int(item)) if kind == "int_list"
                         else _text(option, item))
        except ValueError as exc:
            raise ValueError(f"item {i}: {exc}") from None
    return items


def _as_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("must be an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\d{1,16}", value.strip()):
        return int(value)
    raise ValueError("must be an integer")


def _as_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("must be a number")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError("must be a number") from None
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError("must be a finite number")
    return float(value)


def _bounded(option: Option, number: int | float) -> int | float:
    low, high = option.minimum, option.maximum
    if low is not None and (number <= low if option.exclusive_minimum else number < low):
        raise ValueError(f"must be {'>' if option.exclusive_minimum else '>='} {low:g}")
    if high is not None and number > high:
        raise ValueError(f"must be <= {high:g}")
    if abs(number) > _INT_MAX:
        raise ValueError("too large")
    return number


def _text(option: Option, value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    if value.startswith("-"):
        raise ValueError("must not start with '-'")
    if option.kind == "model":
        problem = model_source_problem(value)
        if problem:
            raise ValueError(problem)
        return value
    assert option.pattern is not None
    if not option.pattern.fullmatch(value):
        raise ValueError(f"must match {option.pattern.pattern}")
    return value


def model_source_problem(value: str) -> str | None:
    """Why `value` can name neither a model directory nor a hub model (None: it can).

    Lexical only (the API host may not have the files): an absolute, normalised path
    without `..`, or a hub id `org/name`. Whether a directory lies under the model roots
    is `turnout.registration`'s question (it needs the settings).
    """
    if len(value) > 1024 or "\x00" in value or any(ord(c) < 32 for c in value):
        return "is not a usable path"
    if HUB_ID.fullmatch(value) and ".." not in value:
        return None
    if not value.startswith("/"):
        return ("must be an absolute directory (under the model roots) or a hub id "
                "'org/name'")
    if any(part == ".." for part in value.split("/")):
        return "must not contain '..'"
    return None


def engine_argv(engine_args: Mapping[str, Any], *, defaults: Mapping[str, Any] = {},
                allowed: Mapping[str, bool] = {}) -> list[str]:
    """The vLLM command-line flags for `defaults` plus a version's `engine_args`.

    Both are validated against the catalogue first (`EngineArgsError` otherwise, also for
    a gated option whose setting is off in `allowed`), so the argv holds only catalogued
    flags, each followed by at most one value, or by the checked items of a list option.
    `True` is a bare flag; `False` is `--no-<flag>` for a negatable option and drops a
    plain one; `None` drops the flag (also a default). engine_args win over the defaults
    and never produce a flag twice.
    """
    merged = validate_engine_args(defaults)
    merged.update(validate_engine_args(engine_args))
    refused = gated_options(merged, allowed)
    if refused:
        raise EngineArgsError([{
            "loc": (key,), "type": "engine_arg_gated",
            "msg": f"refused unless the setting {gate} is on on the engine worker"}
            for key, gate in refused])
    flags: list[str] = []
    for name, value in merged.items():
        option = CATALOGUE[name]
        if value is None:
            continue
        if value is False:
            if option.negatable:
                flags.append("--no-" + name.replace("_", "-"))
            continue
        flags.append(flag_for(name))
        if value is True:
            continue
        if option.kind == "json":
            flags.append(json.dumps(value))
        elif option.kind in ("int_list", "text_list"):
            flags.extend(str(item) for item in value)
        else:
            flags.append(str(value))
    return flags
