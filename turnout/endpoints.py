"""Which external endpoints a version may route to: the URL's shape and where it points.

A version with an `endpoint` sends every prompt routed to it to that URL, and the gateway
builds its upstream requests as `endpoint + "/v1/..."`. So an endpoint is only a scheme
(http or https), a host, a port and a base path: a userinfo part would carry a
credential in the route table, a query or fragment would turn the appended path into
anything.

Where it may point:

- never at link-local addresses (169.254.0.0/16, fe80::/10: cloud metadata services live
  there), the metadata addresses and names of the big clouds (169.254.169.254,
  fd00:ec2::254, 100.100.100.200, metadata.google.internal, ...), unspecified
  (0.0.0.0, ::), multicast or reserved addresses, nor an IPv4 address written in a
  non-standard form (`2852039166`, `0xa9.0xfe.0xa9.0xfe`) that resolvers would accept;
- at loopback and private addresses (127/8, 10/8, 172.16/12, 192.168/16, 100.64/10,
  fc00::/7, ..., and `localhost`) only when the setting `ALLOW_PRIVATE_ENDPOINTS` is on;
- with a host allowlist (`ENDPOINT_HOSTS`), only at the hosts listed there.

Host names are resolved when the version is registered (`resolve_host`, bounded by
`ENDPOINT_RESOLVE_TIMEOUT_S`), and refused if any address they resolve to is refused by
the rules above, or if they do not resolve at all (unless the host is on the allowlist,
which states the operator's trust in it: the API host may use other DNS than the gateway).
This catches mistakes and names that simply point inside. It does not stop DNS rebinding:
a name under someone else's control can resolve to a public address at registration and
to an internal one later, when the gateway connects. Only the allowlist closes that gap,
so production deployments that route to external endpoints should set `ENDPOINT_HOSTS`.

The checks on a URL's shape and on literal addresses are pure (`parse_endpoint`,
`address_problem`, `endpoint_problems`); only `resolve_host` does I/O.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from turnout.limits import ENGINE_URL_MAX

SCHEMES = ("http", "https")

# Cloud metadata services outside 169.254.0.0/16 (which is refused as a whole).
METADATA_ADDRESSES = frozenset({
    ipaddress.ip_address("fd00:ec2::254"),  # AWS (IPv6)
    ipaddress.ip_address("100.100.100.200"),  # Alibaba Cloud
})
METADATA_NAMES = frozenset({
    "metadata.google.internal", "metadata.goog", "metadata", "instance-data",
    "instance-data.ec2.internal", "metadata.tencentyun.com", "metadata.platformequinix.com",
})
LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost",
                         "ip6-loopback"})

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_PATH = re.compile(r"^(/[A-Za-z0-9._~-]+)*/?$")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class EndpointError(ValueError):
    """An endpoint turnout will not route to; the message says why."""


@dataclass(frozen=True)
class Endpoint:
    """A parsed endpoint: `address` is set when the host is an IP literal."""

    url: str
    scheme: str
    host: str
    port: int
    path: str
    address: IPAddress | None


def parse_endpoint(url: str) -> Endpoint:
    """Check the URL's shape and, for an IP literal or a known name, where it points
    (the rules that hold whatever the settings say). Raises `EndpointError`."""
    if not isinstance(url, str) or not url:
        raise EndpointError("must be a URL")
    if len(url) > ENGINE_URL_MAX:
        raise EndpointError(f"longer than {ENGINE_URL_MAX} characters")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url) or "\\" in url:
        raise EndpointError("must not contain spaces, control characters or backslashes")
    if not url.isascii():
        raise EndpointError("must be ASCII (write an international host name in punycode)")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise EndpointError(f"is not a valid URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise EndpointError("must start with http:// or https://")
    if "@" in parts.netloc:
        raise EndpointError("must not contain a user or password (user@host): give a "
                            "credential with `api_key_env`")
    if "?" in url or parts.query:
        raise EndpointError("must not have a query (?...)")
    if "#" in url or parts.fragment:
        raise EndpointError("must not have a fragment (#...)")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise EndpointError("has no host")
    if not _PATH.fullmatch(parts.path) or any(
            seg in (".", "..") for seg in parts.path.split("/")):
        raise EndpointError("base path may hold only letters, digits and . _ ~ - between "
                            "slashes, without '.' or '..' segments")
    if port is None:
        port = 443 if scheme == "https" else 80
    if port == 0:
        raise EndpointError("port must be between 1 and 65535")
    address = _literal_address(host)
    if address is None:
        _check_name(host)
    else:
        problem = address_problem(address, allow_private=True)
        if problem:
            raise EndpointError(problem)
    return Endpoint(url=url, scheme=scheme, host=host, port=port, path=parts.path,
                    address=address)


def _literal_address(host: str) -> IPAddress | None:
    if "%" in host:
        raise EndpointError("must not name an IPv6 zone (%...)")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    # What a resolver would still read as IPv4: 2852039166, 0x7f.1, 0177.0.0.1, 127.1.
    try:
        socket.inet_aton(host)
    except OSError:
        return None
    raise EndpointError("IPv4 address in a non-standard form: write it as a.b.c.d")


def _check_name(host: str) -> None:
    labels = host.split(".")
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise EndpointError("host is not a valid DNS name")
    if labels[-1].isdigit():
        raise EndpointError("host is not a valid DNS name (a numeric last label)")
    if host in METADATA_NAMES or host.endswith(".metadata.google.internal"):
        raise EndpointError(f"{host} is a cloud metadata service: never routed to")


def address_problem(address: IPAddress, *, allow_private: bool) -> str | None:
    """Why turnout will not send prompts to `address` (None: it will).

    An IPv6 address that embeds an IPv4 one (mapped, 6to4, Teredo, NAT64) is judged by
    both, so `::ffff:169.254.169.254` is the metadata service it spells.
    """
    for candidate in _with_embedded(address):
        if candidate in METADATA_ADDRESSES:
            return f"{address} is a cloud metadata service: never routed to"
        if candidate.is_link_local:
            return (f"{address} is link-local (169.254.0.0/16, fe80::/10, where metadata "
                    f"services live): never routed to")
        if candidate.is_unspecified:
            return f"{address} is unspecified: never routed to"
        if candidate.is_multicast or (candidate.is_reserved and not candidate.is_loopback) or (
                isinstance(candidate, ipaddress.IPv4Address)
                and candidate == ipaddress.IPv4Address("255.255.255.255")):
            return f"{address} is a multicast, broadcast or reserved address: never routed to"
    if allow_private:
        return None
    for candidate in _with_embedded(address):
        if candidate.is_loopback or not candidate.is_global:
            return (f"{address} is a loopback or private address: refused unless "
                    f"VLLM_MODEL_SWITCHING_ALLOW_PRIVATE_ENDPOINTS=true")
    return None


def _with_embedded(address: IPAddress) -> list[IPAddress]:
    found: list[IPAddress] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        embedded = [address.ipv4_mapped, address.sixtofour,
                    address.teredo[1] if address.teredo else None]
        if address in ipaddress.ip_network("64:ff9b::/96"):
            embedded.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        found += [a for a in embedded if a is not None]
    return found


def host_allowed(host: str, allowed_hosts: Iterable[str]) -> bool:
    """Whether `host` is on the allowlist: exact names (or addresses), or `*.domain` for
    any name under a domain (not the domain itself)."""
    host = host.lower().rstrip(".")
    for entry in allowed_hosts:
        entry = entry.strip().lower().rstrip(".")
        if entry.startswith("*."):
            if host.endswith(entry[1:]) and host != entry[2:]:
                return True
        elif entry and host == entry.strip("[]"):
            return True
    return False


def endpoint_problems(endpoint: Endpoint, *, allow_private: bool,
                      allowed_hosts: Iterable[str],
                      resolved: Iterable[str] | None) -> list[str]:
    """What the deployment's settings refuse about an endpoint `parse_endpoint` accepted.

    `resolved`: the addresses its host name resolved to (None for an IP literal, or for a
    name that did not resolve).
    """
    allowed_hosts = list(allowed_hosts)
    listed = host_allowed(endpoint.host, allowed_hosts)
    if allowed_hosts and not listed:
        return [f"host {endpoint.host} is not in VLLM_MODEL_SWITCHING_ENDPOINT_HOSTS"]
    if endpoint.address is not None:
        problem = address_problem(endpoint.address, allow_private=allow_private or listed)
        return [problem] if problem else []
    if endpoint.host in LOCAL_NAMES or endpoint.host.endswith(".localhost"):
        if not (allow_private or listed):
            return [f"{endpoint.host} is a loopback name: refused unless "
                    f"VLLM_MODEL_SWITCHING_ALLOW_PRIVATE_ENDPOINTS=true"]
    if resolved is None:
        return [] if listed or allow_private else [
            f"host {endpoint.host} does not resolve from the API host; add it to "
            f"VLLM_MODEL_SWITCHING_ENDPOINT_HOSTS if only the gateways can resolve it"]
    problems = []
    for text in sorted(set(resolved)):
        try:
            address = ipaddress.ip_address(text.split("%", 1)[0])
        except ValueError:
            continue
        problem = address_problem(address, allow_private=allow_private or listed)
        if problem:
            problems.append(f"host {endpoint.host} resolves to {problem}")
    return problems


async def resolve_host(host: str, port: int, timeout_s: float) -> list[str] | None:
    """The addresses `host` resolves to, or None when it does not resolve in time."""
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout_s)
    except (OSError, TimeoutError, UnicodeError):
        return None
    return [str(info[4][0]) for info in infos]


class MissingCredential(LookupError):
    """The environment variable named as an endpoint's credential is not set here."""


def bearer_header(api_key_env: str | None,
                  environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """`{"Authorization": "Bearer <value>"}` from the variable `api_key_env` names in this
    process's environment (empty without one); `MissingCredential` (naming the variable,
    never a value) when it is unset or empty."""
    if not api_key_env:
        return {}
    value = (os.environ if environ is None else environ).get(api_key_env)
    if not value:
        raise MissingCredential(f"environment variable {api_key_env} is not set")
    return {"Authorization": f"Bearer {value}"}
