"""Who may call the control plane: named API keys with roles, and how a request proves one.

Pure code (no web framework): the API's middleware and route dependencies (`api/auth.py`)
call it. A key is configured by its SHA-256, never stored in the clear (the guide's single
`api_key` setting is the one exception: it becomes the admin key named `default`). A
presented key is looked up by hashing it and comparing the digest with every configured
digest in constant time, so neither the comparison nor the number of keys tells an
attacker how close a guess was. Any header value, however odd, ends in a `Principal` or an
`AuthFailure` with a reason: never an exception (a non-ASCII header used to raise in
`secrets.compare_digest` and answer 500).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from turnout.config import ModelSwitchingConfig

# Key names are actors in the audit log and in workflow histories: short, plain words.
KEY_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$"
# The actor of every call when authentication is off: nobody was verified.
ANONYMOUS = "anonymous"
# The name of the key the guide's `api_key` setting configures (role admin).
DEFAULT_KEY_NAME = "default"
# A presented key longer than this is malformed (no configured key is that long); it
# bounds the work of hashing whatever a client sends.
MAX_PRESENTED_KEY_CHARS = 512
# The guide's `api_key` must be at least this long: a short key can be guessed.
MIN_KEY_CHARS = 16
# A key file larger than this is refused (a list of names and hashes is a few KiB).
MAX_KEY_FILE_BYTES = 1024 * 1024


class Role(StrEnum):
    """What a key may do; each role includes the ones before it.

    viewer: every read (GET) and `POST /switch/validate`, which changes nothing.
    operator: switches and their controls, emergency rollback, routing rules, shadows,
    one model's monitoring thresholds, registrations, alert acknowledgement.
    admin: everything, including the thresholds of every model at once.
    """

    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return _RANKS[self]

    def allows(self, needed: Role) -> bool:
        """Whether a key of this role may make a call that needs `needed`."""
        return self.rank >= needed.rank


_RANKS = {Role.VIEWER: 0, Role.OPERATOR: 1, Role.ADMIN: 2}


def thresholds_role(model_id: str | None) -> Role:
    """`PUT /health/thresholds` changes one model's levels (operator) or, without a
    `model_id`, every model's at once (admin)."""
    return Role.OPERATOR if model_id is not None else Role.ADMIN


class AuthConfigError(ValueError):
    """Authentication is configured in a way the API cannot start with; names the setting."""


class ApiKey(BaseModel):
    """One entry of the key file: a name (the actor in the audit log), a role, the key's
    SHA-256 in hex. Make one with `turnout make-key NAME --role ROLE`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=KEY_NAME_PATTERN)
    role: Role
    key_sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$", repr=False)

    @field_validator("name")
    @classmethod
    def _not_anonymous(cls, value: str) -> str:
        if value == ANONYMOUS:
            raise ValueError(f"{ANONYMOUS!r} is the actor of calls without authentication; "
                             f"name the key otherwise")
        return value

    @property
    def digest(self) -> bytes:
        return bytes.fromhex(self.key_sha256)


@dataclass(frozen=True)
class Principal:
    """Who makes a call: a configured key, or `anonymous` when authentication is off
    (then every call is allowed, and `authenticated` is False)."""

    name: str
    role: Role
    authenticated: bool = True


ANONYMOUS_PRINCIPAL = Principal(ANONYMOUS, Role.ADMIN, authenticated=False)


class FailureReason(StrEnum):
    MISSING = "missing"      # no key header at all
    MALFORMED = "malformed"  # not a Bearer token, non-ASCII, too long, several headers
    UNKNOWN = "unknown"      # well formed, but no configured key has its hash


_FAILURE_MESSAGES = {
    FailureReason.MISSING: "an API key is required: send `Authorization: Bearer <key>` or "
                           "`X-API-Key: <key>`",
    FailureReason.MALFORMED: "malformed API key header: one `Authorization: Bearer <key>` or "
                             "`X-API-Key: <key>`, the key printable ASCII without spaces",
    FailureReason.UNKNOWN: "unknown API key",
}


@dataclass(frozen=True)
class AuthFailure:
    reason: FailureReason

    @property
    def message(self) -> str:
        return _FAILURE_MESSAGES[self.reason]


def hash_key(key: str) -> str:
    """The hex SHA-256 of a key, as the key file stores it."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def make_key() -> str:
    """A new random key (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def _well_formed(key: str) -> bool:
    return 0 < len(key) <= MAX_PRESENTED_KEY_CHARS and all(0x21 <= ord(ch) <= 0x7E for ch in key)


class KeyRing:
    """The configured keys, looked up by the hash of a presented key."""

    def __init__(self, keys: Sequence[ApiKey]) -> None:
        names = [k.name for k in keys]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise AuthConfigError(f"API key names must be unique: {', '.join(repeated)} "
                                  f"appear more than once")
        digests = [k.key_sha256.lower() for k in keys]
        if len(set(digests)) != len(digests):
            raise AuthConfigError("two API keys have the same key_sha256: each key must "
                                  "be different")
        self.keys: tuple[ApiKey, ...] = tuple(keys)

    def __len__(self) -> int:
        return len(self.keys)

    def lookup(self, presented: str) -> ApiKey | None:
        """The key whose hash matches `presented`, comparing with every key (no early exit)."""
        if not _well_formed(presented):
            return None
        digest = hashlib.sha256(presented.encode("ascii")).digest()
        found: ApiKey | None = None
        for key in self.keys:
            if hmac.compare_digest(digest, key.digest):
                found = key
        return found

    def authenticate(self, authorization: Sequence[str] = (),
                     x_api_key: Sequence[str] = ()) -> Principal | AuthFailure:
        """Check a request's key headers (all values of each, as received).

        Exactly one key must be presented: one `Authorization: Bearer <key>` or one
        `X-API-Key`, not both (two different keys would leave it open which one acts).
        """
        presented = presented_key(authorization, x_api_key)
        if isinstance(presented, AuthFailure):
            return presented
        key = self.lookup(presented)
        if key is None:
            return AuthFailure(FailureReason.UNKNOWN)
        return Principal(key.name, key.role)


def presented_key(authorization: Sequence[str], x_api_key: Sequence[str]
                  ) -> str | AuthFailure:
    """The key a request presents, or why it presents none that could be checked.

    An `Authorization` header of another scheme (a proxy's Basic credentials, say) is left
    alone when an `X-API-Key` is given; without one it is malformed.
    """
    bearer = [value for value in authorization if _scheme(value) == "bearer"]
    if not authorization and not x_api_key:
        return AuthFailure(FailureReason.MISSING)
    if len(bearer) + len(x_api_key) > 1 or (not x_api_key and len(authorization) > 1):
        return AuthFailure(FailureReason.MALFORMED)
    if bearer:
        key = bearer[0].strip()[len("bearer"):].strip()
    elif x_api_key:
        key = x_api_key[0].strip()
    else:
        return AuthFailure(FailureReason.MALFORMED)  # only another scheme
    if not _well_formed(key):
        return AuthFailure(FailureReason.MALFORMED)
    return key


def _scheme(value: str) -> str:
    return value.strip().partition(" ")[0].lower()


def load_key_file(path: str | Path) -> list[ApiKey]:
    """Read a key file: a YAML (or JSON) list of `{name, role, key_sha256}`.

    Refused when anyone but its owner may write it (whoever can write it can give
    themselves admin), when it is not a list of valid entries, or when it is empty.
    """
    env = ModelSwitchingConfig.env_name("api_keys_file")
    file = Path(path)
    try:
        info = file.stat()
        if not stat.S_ISREG(info.st_mode):
            raise AuthConfigError(f"{env}: {file} is not a regular file")
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise AuthConfigError(f"{env}: {file} may be written by others than its owner "
                                  f"(mode {stat.S_IMODE(info.st_mode):o}); chmod go-w it")
        if info.st_size > MAX_KEY_FILE_BYTES:
            raise AuthConfigError(f"{env}: {file} is larger than {MAX_KEY_FILE_BYTES} bytes")
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise AuthConfigError(f"{env}: cannot read {file}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise AuthConfigError(f"{env}: {file} is not UTF-8 text") from None
    try:
        data: Any = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise AuthConfigError(f"{env}: {file} is not valid "
                              f"{'JSON' if file.suffix == '.json' else 'YAML'}: "
                              f"{str(exc).splitlines()[0]}") from None
    if not isinstance(data, list) or not data:
        raise AuthConfigError(f"{env}: {file} must hold a non-empty list of "
                              f"{{name, role, key_sha256}} entries")
    keys = []
    for i, entry in enumerate(data):
        try:
            keys.append(ApiKey.model_validate(entry))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'entry'}: {e['msg']}"
                                 for e in exc.errors(include_input=False))
            raise AuthConfigError(f"{env}: {file}: entry {i}: {problems}") from None
    return keys


def keyring_from_settings(settings: ModelSwitchingConfig) -> KeyRing | None:
    """The API's keys, or None when authentication is off.

    Keys come from `api_keys_file` and from the guide's `api_key` (the admin key named
    `default`). With authentication on and neither set, the API must not start.
    """
    if not settings.enable_authentication:
        return None
    keys: list[ApiKey] = []
    if settings.api_keys_file:
        keys += load_key_file(os.path.expanduser(settings.api_keys_file))
    if settings.api_key:  # an empty variable (compose's `${VAR:-}`) is no key
        env = ModelSwitchingConfig.env_name("api_key")
        if not _well_formed(settings.api_key):
            raise AuthConfigError(f"{env} must be printable ASCII without spaces, at most "
                                  f"{MAX_PRESENTED_KEY_CHARS} characters")
        if len(settings.api_key) < MIN_KEY_CHARS:
            raise AuthConfigError(f"{env} is {len(settings.api_key)} characters long; use at "
                                  f"least {MIN_KEY_CHARS} (`turnout make-key` makes one)")
        keys.append(ApiKey(name=DEFAULT_KEY_NAME, role=Role.ADMIN,
                           key_sha256=hash_key(settings.api_key)))
    if not keys:
        raise AuthConfigError(
            f"{ModelSwitchingConfig.env_name('enable_authentication')} is on but no API key "
            f"is configured: set {ModelSwitchingConfig.env_name('api_keys_file')} (a file of "
            f"named keys with roles) or {ModelSwitchingConfig.env_name('api_key')}")
    return KeyRing(keys)


@dataclass
class FailureBudget:
    """How many failed authentications are written to the audit log: at most `per_client`
    per client address and `total` overall per window; the rest are only counted, so a
    flood of bad keys cannot fill the table. Time is passed in (pure, testable)."""

    per_client: int
    total: int
    window_s: float = 60.0
    # Distinct clients tracked per window; beyond, new clients share one overflow count.
    max_clients: int = 1024
    _window: int | None = None
    _counts: dict[str, int] = field(default_factory=dict)
    _admitted: int = 0
    _suppressed: dict[str, int] = field(default_factory=dict)

    def admit(self, client: str, now: float) -> Admission:
        """Whether to audit this failure (see `Admission`)."""
        window = int(now // self.window_s)
        ended: dict[str, int] = {}
        if window != self._window:
            ended, self._suppressed = self._suppressed, {}
            self._window, self._counts, self._admitted = window, {}, 0
        if client not in self._counts and len(self._counts) >= self.max_clients:
            client = OTHER_CLIENTS
        seen = self._counts.get(client, 0)
        self._counts[client] = seen + 1
        if seen < self.per_client and self._admitted < self.total:
            self._admitted += 1
            return Admission(True, client, False, ended)
        first = client not in self._suppressed
        self._suppressed[client] = self._suppressed.get(client, 0) + 1
        return Admission(False, client, first, ended)


OTHER_CLIENTS = "(other clients)"


@dataclass(frozen=True)
class Admission:
    """`audit`: write this failure to the audit log. `client`: the address it is counted
    under. `first_suppressed`: the first failure of this client in this window that is not
    audited (log it once). `ended`: per client, the failures a window that just ended
    counted without auditing (`{}` if none), for one summary log line."""

    audit: bool
    client: str
    first_suppressed: bool
    ended: dict[str, int]
