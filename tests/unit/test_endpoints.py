"""Where an external endpoint may point (`turnout.endpoints`): pure code, no servers."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from turnout.endpoints import (
    EndpointError,
    MissingCredential,
    address_problem,
    bearer_header,
    endpoint_problems,
    host_allowed,
    parse_endpoint,
)


def _problems(url: str, *, allow_private: bool = False, hosts: tuple[str, ...] = (),
              resolved: list[str] | None = None) -> list[str]:
    return endpoint_problems(parse_endpoint(url), allow_private=allow_private,
                             allowed_hosts=hosts, resolved=resolved)


@pytest.mark.parametrize("url", [
    "https://api.openai.com", "https://api.openai.com/", "http://vllm.example.com:8000",
    "https://gw.example.com:8443/openai", "http://8.8.8.8:9000/base-path/v_1",
    "http://[2001:4860:4860::8888]:80",
])
def test_public_endpoints_are_accepted(url: str) -> None:
    endpoint = parse_endpoint(url)
    assert _problems(url, resolved=["93.184.216.34"]) == []
    assert endpoint.scheme in ("http", "https") and 1 <= endpoint.port <= 65535


@pytest.mark.parametrize(("url", "why"), [
    ("http://169.254.169.254/latest#", "fragment"),
    ("http://example.com/v1?x=1", "query"),
    ("http://example.com/v1?", "query"),
    ("http://user:pw@example.com", "user or password"),
    ("http://@example.com", "user or password"),
    ("ftp://example.com", "http:// or https://"),
    ("file:///etc/passwd", "http:// or https://"),
    ("http://", "no host"),
    ("http://exa mple.com", "spaces"),
    ("http://example.com\\@evil.com", "backslashes"),
    ("http://example.com/a/../admin", "'..'"),
    ("http://example.com/a/%2e%2e/b", "base path"),
    ("http://example.com:0", "port"),
    ("http://example.com:99999", "valid URL"),
    ("http://[fe80::1%25eth0]:80", "zone"),
    ("http://bücher.example", "ASCII"),
    ("http://exa_mple.com", "DNS name"),
    ("http://1.2.3", "non-standard form"),
    ("http://" + "a" * 600 + ".com", "longer than"),
])
def test_bad_shapes_are_refused(url: str, why: str) -> None:
    with pytest.raises(EndpointError, match=why):
        parse_endpoint(url)


@pytest.mark.parametrize("host", [
    "169.254.169.254", "169.254.0.1", "[fe80::1]", "[::ffff:169.254.169.254]",
    "[fd00:ec2::254]", "100.100.100.200", "0.0.0.0", "[::]", "224.0.0.1",
    "255.255.255.255", "240.0.0.1", "[2002:a9fe:a9fe::1]", "[64:ff9b::a9fe:a9fe]",
    # IPv4 in forms resolvers accept
    "2852039166", "0xa9fea9fe", "0251.0376.0251.0376", "169.254.43518", "0x7f.1",
    "metadata.google.internal", "metadata", "instance-data",
])
def test_metadata_link_local_and_unspecified_are_refused_whatever_the_settings(
        host: str) -> None:
    with pytest.raises(EndpointError):
        endpoint = parse_endpoint(f"http://{host}/latest")
        # (parse refuses these itself; the allowlist could not bring them back either)
        _problems(endpoint.url, allow_private=True, hosts=(host,))


@pytest.mark.parametrize("host", ["127.0.0.1", "10.1.2.3", "172.16.0.9", "192.168.1.1",
                                  "100.64.0.1", "[::1]", "[fc00::1]", "localhost",
                                  "api.localhost", "198.18.0.1"])
def test_private_addresses_need_the_setting(host: str) -> None:
    url = f"http://{host}:8000"
    problems = _problems(url, resolved=["127.0.0.1"])
    assert problems and "ALLOW_PRIVATE_ENDPOINTS" in problems[0]
    assert _problems(url, allow_private=True, resolved=["127.0.0.1"]) == []


def test_names_are_judged_by_what_they_resolve_to() -> None:
    url = "http://models.example.com"
    assert _problems(url, resolved=["93.184.216.34"]) == []
    assert "resolves to 10.0.0.5" in _problems(url, resolved=["93.184.216.34", "10.0.0.5"])[0]
    # Link-local stays refused even where private addresses are allowed.
    assert _problems(url, allow_private=True, resolved=["169.254.169.254"])
    assert "does not resolve" in _problems(url, resolved=None)[0]
    assert _problems(url, allow_private=True, resolved=None) == []


def test_the_host_allowlist() -> None:
    hosts = ("api.openai.com", "*.corp.example")
    assert _problems("https://api.openai.com", hosts=hosts, resolved=None) == []
    assert _problems("http://llm.corp.example", hosts=hosts, resolved=["10.0.0.7"]) == []
    assert "not in VLLM_MODEL_SWITCHING_ENDPOINT_HOSTS" in _problems(
        "http://evil.example", hosts=hosts, resolved=["93.184.216.34"])[0]
    assert _problems("http://corp.example", hosts=hosts, resolved=["93.184.216.34"])
    # An allowlisted name that resolves to a metadata address is still refused.
    assert _problems("http://llm.corp.example", hosts=hosts, resolved=["169.254.169.254"])
    assert host_allowed("API.OpenAI.com.", hosts)


@given(st.integers(0, 2**32 - 1))
def test_any_ipv4_address_is_refused_unless_global(number: int) -> None:
    address = ipaddress.IPv4Address(number)
    problem = address_problem(address, allow_private=False)
    assert (problem is None) == (address.is_global and not address.is_multicast
                                 and not address.is_reserved)
    if address in ipaddress.ip_network("169.254.0.0/16"):
        assert address_problem(address, allow_private=True) is not None


@given(st.integers(0, 2**16 - 1))
def test_any_link_local_address_in_any_spelling_is_refused(low: int) -> None:
    v4 = ipaddress.IPv4Address((169 << 24) | (254 << 16) | low)
    for host in (str(v4), f"[::ffff:{v4}]", str(int(v4)), hex(int(v4))):
        with pytest.raises(EndpointError):
            parse_endpoint(f"http://{host}:80/")


@given(st.sampled_from(["?", "#", "@"]), st.text(min_size=0, max_size=10))
def test_query_fragment_or_userinfo_anywhere_is_refused(mark: str, tail: str) -> None:
    url = f"http://example.com{mark}{tail}" if mark != "@" else f"http://{tail}@example.com"
    with pytest.raises(EndpointError):
        parse_endpoint(url)


def test_bearer_header_reads_the_named_variable_only() -> None:
    assert bearer_header(None) == {}
    assert bearer_header("K", {"K": "v4lue"}) == {"Authorization": "Bearer v4lue"}
    with pytest.raises(MissingCredential) as info:
        bearer_header("K", {"OTHER": "secret-value"})
    assert "K" in str(info.value) and "secret-value" not in str(info.value)
    with pytest.raises(MissingCredential):
        bearer_header("K", {"K": ""})
