"""Every route of the API declares the role it needs (`api.auth`), and the roles are the
documented ones: a route added without a role would be callable by any key."""

from __future__ import annotations

from fastapi.routing import APIRoute

from api.app import create_app
from api.auth import OPEN_PATHS, route_role
from turnout.auth import Role
from turnout.config import ModelSwitchingConfig

KEY = "a-key-for-the-role-table"

# What README.md's REST API section promises.
EXPECTED = {
    ("POST", "/models"): Role.OPERATOR,
    ("POST", "/models/{model_id}/rollback"): Role.OPERATOR,
    ("PUT", "/models/{model_id}/rules"): Role.OPERATOR,
    ("POST", "/models/{model_id}/shadow"): Role.OPERATOR,
    ("DELETE", "/models/{model_id}/shadow"): Role.OPERATOR,
    ("POST", "/switch"): Role.OPERATOR,
    ("POST", "/switch/operations/{operation_id}/{action}"): Role.OPERATOR,
    ("POST", "/alerts/{alert_id}/acknowledge"): Role.OPERATOR,
    ("POST", "/models/{model_id}/versions/{version}/preload"): Role.OPERATOR,
    ("DELETE", "/models/{model_id}/versions/{version}/preload"): Role.OPERATOR,
    # Operator for one model's levels; the route asks for admin without `model_id`.
    ("PUT", "/health/thresholds"): Role.OPERATOR,
    ("POST", "/switch/validate"): Role.VIEWER,  # changes nothing
}


def routes() -> dict[tuple[str, str], APIRoute]:
    app = create_app(ModelSwitchingConfig(enable_authentication=True, api_key=KEY))
    return {(method, route.path): route for route in app.routes
            if isinstance(route, APIRoute) for method in route.methods}


def test_every_route_but_the_probes_declares_a_role() -> None:
    undeclared = [key for key, route in routes().items()
                  if route_role(route) is None and key[1] not in OPEN_PATHS]
    assert undeclared == []
    assert {path for (_, path), route in routes().items() if route_role(route) is None} \
        == OPEN_PATHS


def test_reads_need_viewer_and_changes_need_operator() -> None:
    for (method, path), route in routes().items():
        if path in OPEN_PATHS:
            continue
        expected = EXPECTED.get((method, path), Role.VIEWER if method == "GET" else None)
        assert route_role(route) is expected, (method, path)


def test_the_docs_need_a_key() -> None:
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert route_role(routes()[("GET", path)]) is Role.VIEWER


def test_the_schema_names_the_role_of_each_operation() -> None:
    app = create_app(ModelSwitchingConfig(enable_authentication=True, api_key=KEY))
    spec = app.openapi()
    assert spec["paths"]["/switch"]["post"]["x-turnout-role"] == "operator"
    assert "admin without" in spec["paths"]["/health/thresholds"]["put"]["x-turnout-role"]
    assert spec["security"] == [{"bearer": []}, {"apiKey": []}]
    assert spec["paths"]["/readyz"]["get"]["security"] == []
    unauthenticated = create_app(ModelSwitchingConfig()).openapi()
    assert "security" not in unauthenticated
    assert "securitySchemes" not in unauthenticated.get("components", {})
