"""Routing rules of a model: `PUT /models/{model_id}/rules` replaces them, `GET` reads them.

Rules send requests with given features to a named version (see `turnout.rules` for how
they meet a running rollout). Every gateway picks up a change within its reconcile
interval (one second).
"""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import Field

from api.auth import Operator, Viewer
from api.deps import StoreDep
from api.errors import ERROR_RESPONSES, FieldErrors
from api.params import ModelIdPath
from turnout.domain import AuditEntry
from turnout.limits import ACTOR_MAX
from turnout.rules import ModelRules, RoutingRules

router = APIRouter(prefix="/models", tags=["routing rules"], responses=ERROR_RESPONSES)


class RulesUpdate(RoutingRules):
    """The new rules (replacing the old ones; `[]` removes them). Who set them is the
    caller's key; `requested_by` is a free note kept in the audit log."""

    requested_by: str | None = Field(None, max_length=ACTOR_MAX)


@router.get("/{model_id}/rules", response_model=ModelRules)
async def get_rules(model_id: ModelIdPath, principal: Viewer, store: StoreDep) -> ModelRules:
    """The model's rules in evaluation order (an empty list when none are set)."""
    return await store.get_rules(model_id)


@router.put("/{model_id}/rules", response_model=ModelRules)
async def put_rules(model_id: ModelIdPath, body: RulesUpdate, principal: Operator,
                    store: StoreDep) -> ModelRules:
    """Replace the model's rules. Each rule's version must be registered for the model:
    an unknown one is a 422 naming `rules.<i>.version`, and nothing is changed."""
    model = await store.get_model(model_id)
    known = {v.version for v in model.versions}
    unknown = [{"loc": ["body", "rules", i, "version"], "type": "unknown_version",
                "msg": f"version {rule.version!r} of {model_id} is not registered "
                       f"(registered: {', '.join(sorted(known)) or 'none'})"}
               for i, rule in enumerate(body.rules) if rule.version not in known]
    if unknown:
        raise FieldErrors(unknown)
    saved = await store.set_rules(model_id, RoutingRules(rules=body.rules), principal.name)
    await store.audit(AuditEntry(actor=principal.name, action="rules_updated",
                                 model_id=model_id,
                                 details={**saved.model_dump(mode="json", include={"rules"},
                                                             exclude_none=True),
                                          "requested_by": body.requested_by}))
    return saved
