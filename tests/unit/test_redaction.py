"""Failure reasons quote external answers only as short, redacted summaries."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from turnout.redaction import REDACTED, SNIPPET_CHARS, answer_summary, redact


@pytest.mark.parametrize("secret", [
    "sk-proj-abcdefghijklmnop1234", "sk_live_0123456789abcdef", "ghp_abcdefghijklmnop1234",
    "xoxb-1234567890-abcdefghij", "AKIAABCDEFGHIJKLMNOP", "hf_abcdefghijklmnopqrst",
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9",
    "Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MGFiY2RlZmdo",
])
def test_things_that_look_like_keys_are_removed(secret: str) -> None:
    body = f'{{"error": {{"message": "Incorrect API key provided: {secret}."}}}}'
    summary = answer_summary(401, "application/json", body)
    assert secret not in summary and REDACTED in summary
    assert summary.startswith("HTTP 401 (application/json): ")


@pytest.mark.parametrize(("text", "kept", "gone"), [
    ("Authorization: Bearer abc.def-123 was refused", "Authorization: Bearer", "abc.def-123"),
    ('{"api_key": "hunter2", "token_count": 5}', "token_count", "hunter2"),
    ("password=letmein&user=bob", "user=bob", "letmein"),
    ("see http://admin:pa55@internal.example/x", "internal.example", "pa55"),
])
def test_secret_values_go_their_names_stay(text: str, kept: str, gone: str) -> None:
    assert kept in redact(text) and gone not in redact(text)


def test_the_credential_sent_is_removed_whatever_its_shape() -> None:
    summary = answer_summary(403, "text/plain", "your key simple-pass is wrong",
                             secrets=["simple-pass"])
    assert "simple-pass" not in summary


def test_summary_is_short_and_on_one_line() -> None:
    summary = answer_summary(500, "text/html; charset=utf-8", "<html>\n" + "x" * 10_000)
    assert "\n" not in summary and len(summary) < SNIPPET_CHARS + 40
    assert summary.startswith("HTTP 500 (text/html): <html> x")
    assert answer_summary(502, None, "") == "HTTP 502 (no content type), empty body"
    assert answer_summary(500, "application/json", b"\xff\xfe binary") .startswith("HTTP 500")


@given(prefix=st.text(max_size=300), suffix=st.text(max_size=300),
       token=st.from_regex(r"sk-[A-Za-z0-9]{20,40}", fullmatch=True))
def test_no_summary_carries_an_openai_style_key(prefix: str, suffix: str, token: str) -> None:
    summary = answer_summary(400, "application/json", f"{prefix} {token} {suffix}")
    assert token not in summary
    assert len(summary) <= SNIPPET_CHARS + 40
