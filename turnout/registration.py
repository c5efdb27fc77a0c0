"""What a registration must satisfy in this deployment: the checks that need the settings.

`RegisterModelRequest` checks all that holds everywhere (shapes, the engine-args
catalogue, sizes). `check_registration` adds, with the API's settings:

- a local model directory (and a `tokenizer` directory) lies under the model roots
  (`MODEL_ROOTS`, default `<state_dir>/models`), checked lexically: the API host may not
  have the files. The engine worker checks again before it starts an engine
  (`model_dir_problem` with `resolve=True`: symlinks resolved, roots re-checked, the
  directory must exist);
- a gated engine argument (`trust_remote_code`) is allowed by its setting;
- an external endpoint is allowed where it points (private addresses, host allowlist,
  what its name resolves to: `turnout.endpoints`);
- a credential variable (`api_key_env`) is one the operator listed (`ENDPOINT_CREDENTIAL_ENVS`).

Every problem comes back at once, located like pydantic's (`loc` = ("body", field, ...)),
so the API answers one 422 naming each field and writes nothing.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from turnout import engine_args as catalogue
from turnout.config import ModelSwitchingConfig
from turnout.domain import RegisterModelRequest
from turnout.endpoints import EndpointError, endpoint_problems, parse_endpoint, resolve_host

Resolver = Callable[[str, int, float], Awaitable[list[str] | None]]

ROOTS_SETTING = ModelSwitchingConfig.env_name("model_roots")


def is_hub_id(model: str) -> bool:
    return bool(catalogue.HUB_ID.fullmatch(model)) and ".." not in model


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def model_dir_problem(model: str, roots: Iterable[str], *, resolve: bool = False
                      ) -> str | None:
    """Why `model` may not be served from this host's files (None: it may).

    A hub id is always fine here (the engine resolves it from the local cache). A path
    must be absolute, without `..`, and under one of `roots` (absolute, normalised). With
    `resolve` (the engine worker, which has the files) symlinks are resolved on both
    sides first, so a link under a root that points elsewhere is refused; without it
    (the API) the check is lexical, except that a path this host does have may also
    match a root once both are resolved (a root reached through a symlinked directory).
    """
    if is_hub_id(model):
        return None
    problem = catalogue.model_source_problem(model)
    if problem:
        return problem
    roots = [os.path.normpath(root) for root in roots]
    shown = ", ".join(roots) or "(none)"
    outside = (f"{model} is not under the model roots ({shown}; setting {ROOTS_SETTING})")
    if resolve:
        real = os.path.realpath(model)
        return None if any(_within(real, os.path.realpath(r)) for r in roots) else outside
    lexical = os.path.normpath(model)
    if any(_within(lexical, root) for root in roots):
        return None
    if os.path.exists(lexical):
        real = os.path.realpath(lexical)
        if any(_within(real, os.path.realpath(root)) for root in roots):
            return None
    return outside


def stored_endpoint_problem(url: str, settings: ModelSwitchingConfig) -> str | None:
    """Why a stored endpoint may not be routed to under `settings` (None: it may), for the
    engine worker before it records an external version: the shape and literal-address
    rules, private addresses and the host allowlist. Names are not resolved here (that is
    the registration's check); a registration stored by an older release that points at
    a metadata address or carries a query fails its load instead of being routed to."""
    try:
        endpoint = parse_endpoint(url)
    except EndpointError as exc:
        return str(exc)
    problems = endpoint_problems(endpoint, allow_private=settings.allow_private_endpoints,
                                 allowed_hosts=settings.endpoint_hosts,
                                 resolved=None if endpoint.address is not None else [])
    return "; ".join(problems) or None


async def check_registration(request: RegisterModelRequest, settings: ModelSwitchingConfig,
                             *, resolve: Resolver = resolve_host) -> list[dict[str, Any]]:
    """Every way `request` breaks this deployment's rules; empty when it may be stored."""
    errors: list[dict[str, Any]] = []

    def refuse(loc: tuple[str, ...], kind: str, message: str) -> None:
        errors.append({"loc": ["body", *loc], "type": kind, "msg": message})

    if request.endpoint is None:
        roots = settings.resolved_model_roots
        problem = model_dir_problem(request.model, roots)
        if problem:
            refuse(("model",), "model_root", problem)
        tokenizer = request.engine_args.get("tokenizer")
        if isinstance(tokenizer, str):
            problem = model_dir_problem(tokenizer, roots)
            if problem:
                refuse(("engine_args", "tokenizer"), "model_root", problem)
        allowed = {gate: bool(getattr(settings, gate)) for gate in catalogue.GATED.values()}
        for key, gate in catalogue.gated_options(request.engine_args, allowed):
            refuse(("engine_args", key), "engine_arg_gated",
                   f"{catalogue.CATALOGUE[catalogue.canonical(key)].help}: refused unless "
                   f"{ModelSwitchingConfig.env_name(gate)}=true")
        return errors

    endpoint = parse_endpoint(request.endpoint)  # its shape was checked by the model
    resolved = None
    if endpoint.address is None:
        resolved = await resolve(endpoint.host, endpoint.port,
                                 settings.endpoint_resolve_timeout_s)
    for problem in endpoint_problems(endpoint, allow_private=settings.allow_private_endpoints,
                                     allowed_hosts=settings.endpoint_hosts,
                                     resolved=resolved):
        refuse(("endpoint",), "endpoint_refused", problem)
    if request.api_key_env is not None and \
            request.api_key_env not in settings.endpoint_credential_envs:
        refuse(("api_key_env",), "key_env_not_allowed",
               f"{request.api_key_env} is not in "
               f"{ModelSwitchingConfig.env_name('endpoint_credential_envs')} (the variables the "
               f"gateways may send as an endpoint's credential)")
    return errors
