"""Routing rules: send requests with given features to a named version.

This is the guide's "runtime model switching based on input characteristics". A model's
rules are an ordered list; the first rule whose every condition holds names the version
that serves the request. Conditions look only at the request itself: prompt length (in
characters or estimated tokens), image or audio content parts, the requested `max_tokens`,
a header value, or a `metadata` key.

How rules meet a rollout: a rollout decides *which versions are served* (the route), rules
decide *which of those* serves a given request. A rule whose version has no share in the
current route is skipped, and the request falls through to the next rule and finally to the
weighted split. So a rollback always wins at once (the rolled-back version leaves the route
and its rules stop matching), and during a canary a rule can, say, keep every image request
on the stable version while text requests are split. Requests sent by a rule are counted in
the chosen version's metrics like any other, so they take part in health judgments.

Pure code: parsed and validated here (the API refuses a bad rule with a 422 naming the
field), evaluated by the gateway and by `TransitionManager` on every request.

Rules run in the gateway's event loop on every request of their model, against values the
client chooses, so a rule must never cost more than a bounded, small time. Regexes are
compiled with RE2 (`google-re2`), which matches in time linear in the value; patterns that
need backtracking (backreferences, lookaround) are refused. Linear is not yet small: an
RE2 search costs up to (program size x value length), so the compiled program size of each
regex and of all of a model's regexes is capped, and a value longer than
`MAX_MATCHED_VALUE_CHARS` matches no rule.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import re2
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

log = logging.getLogger(__name__)

# A rough, model-independent estimate (OpenAI's rule of thumb for English text); prompts
# sent as token ids are counted exactly.
CHARS_PER_TOKEN = 4
MAX_RULES = 100
# Longest pattern text of one regex.
MAX_REGEX_CHARS = 1000
# Longest header or metadata value a rule looks at. A longer value matches no rule (neither
# `equals`, whose text is at most 1000 characters anyway, nor `regex`): it is not cut, since
# a cut value would let `suffix$` match a value that does not end so. The request then
# falls through to the next rule and finally to the weighted split. OpenAI caps metadata
# values at 512 characters; header values worth routing on (tenant, team, flags, user
# agents) are shorter than this.
MAX_MATCHED_VALUE_CHARS = 1024
# RE2 program size (compiled instructions) of one regex, and of all the regexes of one
# model's rules together. A search costs up to program size x value length: measured here,
# a regex at 2,000 instructions searched a hostile 1 KiB value in 2-7 ms, ordinary ones
# (`^ml-`, `(?i)^(beta|canary)$`, 4-40 instructions) in 2 us. `\pL` alone is 1,200.
MAX_REGEX_PROGRAM = 2000
MAX_RULES_PROGRAM = 4000
# Memory one compiled regex may use (its program and its DFA cache, which a hostile value
# could otherwise fill to RE2's default 8 MiB per regex, 100 rules x 2 regexes per model).
# A search that outgrows it falls back to RE2's NFA: slower by a constant, still linear.
REGEX_MAX_MEM = 128 * 1024
# Compiled regexes kept: gateways re-read every model's rules each second, and compiling
# on every read would cost more than matching.
REGEX_CACHE = 1024
# Validation context of rules read back from the store (see `STORED`).
_STORED_KEY = "turnout_stored_rules"
STORED: dict[str, Any] = {_STORED_KEY: True}
_IMAGE_PARTS = {"image_url", "image", "input_image"}
_AUDIO_PARTS = {"input_audio", "audio_url", "audio"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Range(_Strict):
    """Inclusive bounds; either may be left out, not both."""

    min: float | None = Field(None, ge=0)
    max: float | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _possible(self) -> Range:
        if self.min is None and self.max is None:
            raise ValueError("give min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"impossible range: min {self.min:g} > max {self.max:g}")
        return self

    def holds(self, value: float | None) -> bool:
        if value is None:
            return False
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)


class RegexRefused(ValueError):
    """A rule regex the gateway will not run; the message says why."""


def _re2_options() -> re2.Options:
    options = re2.Options()
    options.log_errors = False  # refusals are reported to the caller, not to stderr
    options.max_mem = REGEX_MAX_MEM
    return options


_OPTIONS = _re2_options()
# RE2's messages for the features it leaves out on purpose (they need backtracking).
_UNSUPPORTED = {
    "invalid perl operator: (?=": "lookahead",
    "invalid perl operator: (?!": "lookahead",
    "invalid perl operator: (?<=": "lookbehind",
    "invalid perl operator: (?<!": "lookbehind",
}


def compile_regex(pattern: str) -> Any:
    """`pattern` compiled with RE2 within the caps, or `RegexRefused` saying why.

    Never raises anything else, whatever the string (a property test holds it to that).
    Compiled regexes are cached: the same pattern compiles once per process.
    """
    if len(pattern) > MAX_REGEX_CHARS:
        raise RegexRefused(f"the regex is {len(pattern)} characters long, over the limit "
                           f"of {MAX_REGEX_CHARS}")
    try:
        return _compile(pattern)
    except RegexRefused:
        raise
    except Exception as exc:  # a bug in the binding must be a refusal, not a 500
        log.warning("RE2 failed on a regex unexpectedly: %r", exc)
        raise RegexRefused(f"the regex could not be compiled: {exc}") from None


@functools.lru_cache(maxsize=REGEX_CACHE)
def _compile(pattern: str) -> Any:
    try:
        pattern.encode("utf-8")  # RE2 takes UTF-8: a lone surrogate ("\ud800") has none
    except UnicodeEncodeError:
        raise RegexRefused("the regex is not valid Unicode text (it holds a lone "
                           "surrogate)") from None
    try:
        compiled = re2.compile(pattern, _OPTIONS)
    except re2.error as exc:
        raise RegexRefused(_refusal(pattern, exc)) from None
    if compiled.programsize > MAX_REGEX_PROGRAM:
        raise RegexRefused(_too_complex(compiled.programsize))
    return compiled


def _refusal(pattern: str, exc: Exception) -> str:
    raw = exc.args[0] if exc.args else ""
    why = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    if why.startswith("pattern too large"):
        return _too_complex(None)
    feature = next((name for prefix, name in _UNSUPPORTED.items() if why.startswith(prefix)),
                   None)
    if feature is None and (
            (why.startswith("invalid escape sequence: \\")
             and why[len("invalid escape sequence: \\"):][:1].isdigit())
            or (why == "invalid perl operator: (?P" and "(?P=" in pattern)):
        feature = "a backreference"
    if feature is not None:
        return (f"the regex uses {feature} ({why}), which needs backtracking: rules are "
                f"matched with RE2, in time linear in the value, which has none")
    return f"the regex is not valid RE2 syntax: {why}"


def _too_complex(size: int | None) -> str:
    size_text = f"{size} RE2 instructions" if size is not None else "too large a program"
    return (f"the regex is too complex: it compiles to {size_text}, over the limit of "
            f"{MAX_REGEX_PROGRAM} per regex (a search costs up to program size x value "
            f"length); use a simpler pattern or several rules")


def _stored(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get(_STORED_KEY))


_warned: set[str] = set()


def _warn_disabled(pattern: str, why: str) -> None:
    """Say once per pattern (gateways re-read rules every second) that a stored regex is
    not run."""
    if pattern in _warned or len(_warned) >= REGEX_CACHE:
        return
    _warned.add(pattern)
    log.warning("a stored routing rule's regex %r is not run, so its rule never matches "
                "(replace the rules to fix it): %s", pattern[:100], why)


class _ValueMatch(_Strict):
    """Exactly one of `equals` (exact string) or `regex` (searched, RE2 syntax).

    A value longer than `MAX_MATCHED_VALUE_CHARS` matches neither. Rules read back from
    the store (validated with the `STORED` context) are never refused: a regex stored
    before RE2 was used that RE2 refuses is kept as written, reported once in the log and
    never matches, so one old rule cannot stop a gateway from loading every model's rules.
    """

    equals: str | None = Field(None, max_length=1000)
    regex: str | None = Field(None, max_length=MAX_REGEX_CHARS)
    _pattern: Any = PrivateAttr(None)

    @field_validator("regex")
    @classmethod
    def _linear_time(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and not _stored(info):
            compile_regex(value)  # a RegexRefused is a ValueError: a 422 naming `regex`
        return value

    @model_validator(mode="after")
    def _one_test(self, info: ValidationInfo) -> _ValueMatch:
        if (self.equals is None) == (self.regex is None):
            raise ValueError("give exactly one of equals or regex")
        if self.regex is not None:
            try:
                self._pattern = compile_regex(self.regex)  # cached by `_linear_time`
            except RegexRefused as exc:  # only rules from the store get here
                _warn_disabled(self.regex, str(exc))
        return self

    @property
    def program_size(self) -> int:
        return self._pattern.programsize if self._pattern is not None else 0

    def disable(self, why: str) -> None:
        """Never match from now on (a stored rule over the per-model budget)."""
        if self.regex is not None and self._pattern is not None:
            _warn_disabled(self.regex, why)
        self._pattern = None

    def holds(self, value: str | None) -> bool:
        if value is None or len(value) > MAX_MATCHED_VALUE_CHARS:
            return False
        if self.regex is not None:
            # Bytes, so that a value holding lone surrogates (JSON "\udc80") is searched
            # rather than failing to encode.
            return self._pattern is not None and \
                self._pattern.search(value.encode("utf-8", "surrogatepass")) is not None
        return value == self.equals


class HeaderMatch(_ValueMatch):
    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")


class MetadataMatch(_ValueMatch):
    key: str = Field(min_length=1, max_length=200)


class RuleMatch(_Strict):
    """Conditions of one rule; all that are given must hold."""

    prompt_chars: Range | None = None
    prompt_tokens: Range | None = None
    has_image: bool | None = None
    has_audio: bool | None = None
    max_tokens: Range | None = None
    header: HeaderMatch | None = None
    metadata: MetadataMatch | None = None

    @model_validator(mode="after")
    def _something(self) -> RuleMatch:
        if all(getattr(self, name) is None for name in type(self).model_fields):
            raise ValueError("a rule needs at least one condition")
        return self

    def holds(self, f: RequestFeatures) -> bool:
        return ((self.prompt_chars is None or self.prompt_chars.holds(f.prompt_chars))
                and (self.prompt_tokens is None or self.prompt_tokens.holds(f.prompt_tokens))
                and (self.has_image is None or self.has_image == f.has_image)
                and (self.has_audio is None or self.has_audio == f.has_audio)
                and (self.max_tokens is None or self.max_tokens.holds(f.max_tokens))
                and (self.header is None
                     or self.header.holds(f.headers.get(self.header.name.lower())))
                and (self.metadata is None
                     or self.metadata.holds(f.metadata.get(self.metadata.key))))


class RoutingRule(_Strict):
    name: str | None = Field(None, max_length=100)
    match: RuleMatch
    version: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")


class RoutingRules(_Strict):
    """A model's rules, evaluated in order; the first that holds (and whose version is
    served by the current route) wins."""

    rules: list[RoutingRule] = Field(default_factory=list, max_length=MAX_RULES)

    @field_validator("rules")
    @classmethod
    def _within_budget(cls, rules: list[RoutingRule], info: ValidationInfo
                       ) -> list[RoutingRule]:
        """All of a model's regexes together stay within `MAX_RULES_PROGRAM`: a request is
        matched against each of them in turn. Stored rules over it (never accepted since
        the cap exists) keep the regexes that fit, in order, and disable the rest."""
        total = 0
        for index, rule in enumerate(rules):
            for value_match in (rule.match.header, rule.match.metadata):
                if value_match is None or not value_match.program_size:
                    continue
                size = value_match.program_size
                total += size
                if total <= MAX_RULES_PROGRAM:
                    continue
                why = (f"the regexes of rules 0 to {index} compile to {total} RE2 "
                       f"instructions together, over the limit of {MAX_RULES_PROGRAM} per "
                       f"model (a request is searched by each of them); simplify or drop "
                       f"some")
                if not _stored(info):
                    raise ValueError(why)
                value_match.disable(why)
                total -= size
        return rules

    def versions(self) -> set[str]:
        return {rule.version for rule in self.rules}

    def first_match(self, features: RequestFeatures,
                    served: Iterable[str]) -> RoutingRule | None:
        served = set(served)
        for rule in self.rules:
            if rule.version in served and rule.match.holds(features):
                return rule
        return None


class ModelRules(RoutingRules):
    """A model's rules as stored: what `GET /models/{model_id}/rules` returns."""

    model_config = ConfigDict(extra="ignore")

    model_id: str
    updated_by: str | None = None
    updated_at: datetime | None = None


@dataclass(frozen=True)
class RequestFeatures:
    """What rules can look at, read once from an OpenAI request."""

    prompt_chars: int = 0
    prompt_tokens: int = 0
    has_image: bool = False
    has_audio: bool = False
    max_tokens: int | None = None
    headers: Mapping[str, str] = field(default_factory=dict)  # names lower-cased
    metadata: Mapping[str, str] = field(default_factory=dict)


def request_features(body: Mapping[str, Any],
                     headers: Mapping[str, str] | None = None) -> RequestFeatures:
    """Features of a `/v1/completions` or `/v1/chat/completions` body (and its headers).

    Tolerant: a field of an unexpected shape counts as absent, since the engine, not the
    router, is the judge of a request's validity.
    """
    chars = token_ids = 0
    image = audio = False
    prompt = body.get("prompt")
    for item in prompt if isinstance(prompt, list) else [prompt]:
        if isinstance(item, str):
            chars += len(item)
        elif isinstance(item, int):
            token_ids += 1
        elif isinstance(item, list):  # a batch of token-id prompts
            token_ids += sum(isinstance(t, int) for t in item)
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            chars += len(content)
            continue
        for part in content if isinstance(content, list) else []:
            if not isinstance(part, dict):
                continue
            kind = part.get("type")
            if kind == "text" and isinstance(part.get("text"), str):
                chars += len(part["text"])
            image = image or kind in _IMAGE_PARTS
            audio = audio or kind in _AUDIO_PARTS
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    metadata = body.get("metadata")
    return RequestFeatures(
        prompt_chars=chars,
        prompt_tokens=token_ids + math.ceil(chars / CHARS_PER_TOKEN),
        has_image=image, has_audio=audio,
        max_tokens=max_tokens if isinstance(max_tokens, int) and not isinstance(
            max_tokens, bool) else None,
        headers={k.lower(): v for k, v in (headers or {}).items()},
        metadata={str(k): str(v) for k, v in metadata.items()}
        if isinstance(metadata, dict) else {})
