"""The audit log: every switching operation, every mutating call, every refused key.

Newest first, a page at a time: the body is the guide-style list of entries; when more
entries match, the `Link` header names the next page (`rel="next"`, RFC 8288), which is
the same query with `before=<the last id of this page>`.
"""

from __future__ import annotations

from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request, Response

from api.auth import Viewer
from api.deps import StoreDep
from api.errors import ERROR_RESPONSES
from api.params import MAX_ROW_ID, DateTimeQuery
from turnout.domain import AuditEntry

router = APIRouter(prefix="/audit", tags=["audit"], responses=ERROR_RESPONSES)


@router.get("", response_model=list[AuditEntry], responses={200: {
    "description": "Entries, newest first",
    "headers": {"Link": {"description": 'The next page, `<...>; rel="next"`, when more '
                                        "entries match",
                         "schema": {"type": "string"}}}}})
async def list_audit(request: Request, response: Response, principal: Viewer,
                     store: StoreDep,
                     model_id: str | None = Query(None, max_length=300),
                     operation_id: str | None = Query(None, max_length=64),
                     actor: str | None = Query(None, max_length=256,
                                               description="A key name, or `anonymous`"),
                     action: str | None = Query(None, max_length=64,
                                                description="e.g. `switch_requested`, "
                                                            "`auth_failed`"),
                     since: DateTimeQuery | None = Query(None, description="At or after "
                                                                           "this time"),
                     before: int | None = Query(None, ge=1, le=MAX_ROW_ID,
                                                description="Only entries older than this "
                                                            "id (the next page's cursor)"),
                     limit: int = Query(500, ge=1, le=5000)) -> list[AuditEntry]:
    entries = await store.list_audit(model_id=model_id, operation_id=operation_id,
                                     actor=actor, action=action, since=since, before=before,
                                     limit=limit + 1)
    if len(entries) > limit:
        entries = entries[:limit]
        params = [(k, v) for k, v in request.query_params.multi_items() if k != "before"]
        query = urlencode([*params, ("before", str(entries[-1].id))])
        response.headers["Link"] = f'<{request.url.path}?{query}>; rel="next"'
    return entries
