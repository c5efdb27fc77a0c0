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
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

# A rough, model-independent estimate (OpenAI's rule of thumb for English text); prompts
# sent as token ids are counted exactly.
CHARS_PER_TOKEN = 4
MAX_RULES = 100
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


class _ValueMatch(_Strict):
    """Exactly one of `equals` (exact string) or `regex` (searched, Python syntax)."""

    equals: str | None = Field(None, max_length=1000)
    regex: str | None = Field(None, max_length=1000)
    _pattern: re.Pattern[str] | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _one_test(self) -> _ValueMatch:
        if (self.equals is None) == (self.regex is None):
            raise ValueError("give exactly one of equals or regex")
        if self.regex is not None:
            try:
                self._pattern = re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"bad regex {self.regex!r}: {exc}") from None
        return self

    def holds(self, value: str | None) -> bool:
        if value is None:
            return False
        if self._pattern is not None:
            return self._pattern.search(value) is not None
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
