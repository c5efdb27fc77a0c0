"""Routing math of the gateway: which version serves a request, and the in-memory route table.

Pure code (no I/O) so that it can be unit-tested and reasoned about on its own:

* `pick_backend` chooses a backend by cumulative-weight bucketing over a point in [0, 100).
  With a user key the point is a stable hash of (model id, key), so a user keeps seeing the
  same version while weights stay put, and when weights change only the users in the moved
  share switch version (the A/B test's sticky assignment). Without a key the point is random.
* `RouteTable` holds the routes a gateway serves and applies a route only when its
  generation is newer than the one it holds, so a stale read never undoes a newer switch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

from turnout.domain import Backend, Route

_HASH_SPACE = float(1 << 64)


def stable_point(model_id: str, user_key: str) -> float:
    """A point in [0, 100) that depends only on the model and the user key.

    blake2b rather than `hash()` because Python salts `hash()` per process, and every
    gateway must put a given user in the same bucket.
    """
    digest = hashlib.blake2b(f"{model_id}\x00{user_key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _HASH_SPACE * 100.0


def live_backends(route: Route) -> list[Backend]:
    """Backends that can take traffic, in a stable order (by version) so buckets don't move."""
    return sorted((b for b in route.backends if b.weight > 0), key=lambda b: b.version)


def pick_backend(route: Route, user_key: str | None, rand: float) -> Backend | None:
    """The backend that serves one request, or None when the route has no live backend.

    `rand` is a uniform number in [0, 1) (e.g. `random.random()`), used only without a user
    key. Weights are percents; they are normalised by their sum so that a route whose weights
    do not add up to exactly 100 still splits proportionally.
    """
    return pick_from(route.model_id, live_backends(route), user_key, rand)


def pick_from(model_id: str, backends: list[Backend], user_key: str | None,
              rand: float) -> Backend | None:
    """`pick_backend` over a route's live backends already in `live_backends` order."""
    if not backends:
        return None
    if len(backends) == 1:
        return backends[0]
    point = stable_point(model_id, user_key) if user_key else rand * 100.0
    total = sum(b.weight for b in backends)
    target = point / 100.0 * total
    cumulative = 0.0
    for backend in backends:
        cumulative += backend.weight
        if target < cumulative:
            return backend
    return backends[-1]  # float rounding at the very top of the range


class RouteTable:
    """The routes one gateway serves, keyed by model id, plus the alias map.

    Mutated only by the reconcile loop (a single task); read on every request with plain
    dict lookups, so the request path never waits for the store.
    """

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        # Each route's `live_backends`, worked out once per applied route, not per request.
        self.live: dict[str, list[Backend]] = {}
        # Each route's shadow (traffic mirror target), only for routes that have one: the
        # request path pays a single dict miss when a model is not mirrored.
        self.shadows: dict[str, Backend] = {}
        self.aliases: dict[str, str] = {}
        self.known_models: set[str] = set()

    def apply(self, route: Route) -> bool:
        """Take `route` if it is newer than the one held; return whether it was applied."""
        held = self.routes.get(route.model_id)
        if held is not None and route.generation <= held.generation:
            return False
        self.routes[route.model_id] = route
        self.live[route.model_id] = live_backends(route)
        shadow = route.shadow()
        if shadow is None:
            self.shadows.pop(route.model_id, None)
        else:
            self.shadows[route.model_id] = shadow
        return True

    def apply_all(self, routes: Iterable[Route]) -> list[Route]:
        """Apply each route; return the ones that were newer than what was held."""
        return [route for route in routes if self.apply(route)]

    def set_aliases(self, aliases: Mapping[str, str]) -> None:
        self.aliases = dict(aliases)

    def set_known_models(self, model_ids: Iterable[str]) -> None:
        """Registered model ids, so a model without a route is 'unavailable', not 'unknown'."""
        self.known_models = set(model_ids)

    def resolve(self, name: str) -> str | None:
        """The model id a client means by `model`: the id itself or an alias; None if unknown."""
        if name in self.routes or name in self.known_models:
            return name
        return self.aliases.get(name)

    def route(self, model_id: str) -> Route | None:
        return self.routes.get(model_id)

    def routed_versions(self) -> set[tuple[str, str]]:
        """(model id, version) of every version that takes traffic: a share of a split or
        mirrored copies. A version outside it gets no new request from this gateway."""
        routed = {(model_id, b.version) for model_id, live in self.live.items() for b in live}
        routed.update((model_id, b.version) for model_id, b in self.shadows.items())
        return routed

    def generations(self) -> dict[str, int]:
        return {model_id: route.generation for model_id, route in sorted(self.routes.items())}

    def served_names(self) -> list[str]:
        """Model ids with at least one live backend, then the aliases that point at them."""
        served = sorted(m for m, live in self.live.items() if live)
        served_set = set(served)
        aliases = sorted(a for a, m in self.aliases.items()
                         if m in served_set and a not in served_set)
        return served + aliases
