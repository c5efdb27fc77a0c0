"""Short, safe summaries of what an upstream answered, for failure reasons.

A failure reason travels far: into the workflow's history, the operation's record, the
status the API returns, alerts, webhooks and logs. The body of an external server's
answer has no business there in full: it may echo the request's credential, carry
another service's tokens or simply be large. `answer_summary` keeps what an operator
needs (status code, content type, the start of the message) and removes anything that
looks like a secret.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

SNIPPET_CHARS = 120
REDACTED = "[redacted]"

_SECRET_PATTERNS = [
    # credentials in URLs: scheme://user:password@host
    re.compile(r"(?<=://)[^/\s:@]+:[^/\s@]+(?=@)"),
    # Authorization header values
    re.compile(r"(?i)(?<=\bbearer )[^\s\"',;]+"),
    re.compile(r"(?i)(?<=\bbasic )[A-Za-z0-9+/=]{8,}"),
    # key = value, "key": "value" for keys that name secrets
    re.compile(r"(?i)(\b[\w-]*(?:api[_-]?key|access[_-]?key|secret|token|password|passwd"
               r"|credentials?|session[_-]?id)[\"']?\s*[:=]\s*[\"']?)"
               r"[^\s\"',;}&]+"),
    # well-known token shapes
    re.compile(r"\b(?:sk|pk|rk)[-_](?:live[-_]|test[-_]|proj[-_]|ant[-_])?[A-Za-z0-9_-]{12,}"),
    re.compile(r"\b(?:ghp|gho|ghu|ghs|ghr|github_pat|glpat|hf)_[A-Za-z0-9_-]{10,}"),
    re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}"),
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),  # JWT
    # any long run of token characters mixing letters and digits
    re.compile(r"\b(?=[A-Za-z0-9+/_=-]*[0-9])(?=[A-Za-z0-9+/_=-]*[A-Za-z])"
               r"[A-Za-z0-9+/_=-]{32,}"),
]


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with everything that looks like a key, token or password replaced, and
    every occurrence of the given `secrets` (the credential a probe sent, say)."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, REDACTED)
    for pattern in _SECRET_PATTERNS:
        if pattern.groups:
            text = pattern.sub(lambda m: m.group(1) + REDACTED, text)
        else:
            text = pattern.sub(REDACTED, text)
    return text


def snippet(text: str, limit: int = SNIPPET_CHARS, secrets: Iterable[str] = ()) -> str:
    """The start of `text` on one line, printable only, redacted, at most `limit` chars."""
    # Redact more than is shown, so a secret cut by the limit is still recognised.
    head = redact(text[: limit * 4], secrets)
    head = " ".join(head.split())
    head = "".join(c if c.isprintable() else "?" for c in head)
    head = redact(head)
    return head if len(head) <= limit else head[: limit - 1] + "…"


def answer_summary(status: int, content_type: str | None, body: str | bytes | None, *,
                   secrets: Iterable[str] = ()) -> str:
    """`HTTP 500 (application/json): {"error": ...}` with the body cut and redacted."""
    if isinstance(body, bytes):
        body = body[: SNIPPET_CHARS * 4].decode("utf-8", "replace")
    kind = snippet((content_type or "no content type").split(";", 1)[0], 60)
    text = snippet(body or "", secrets=secrets)
    return f"HTTP {status} ({kind}): {text}" if text else f"HTTP {status} ({kind}), empty body"
