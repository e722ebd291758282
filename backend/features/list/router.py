"""List: `GET /api/{user_id}/tasks?status=all|pending|completed`."""

from typing import Annotated

from fastapi import Query, Request, Response

from backend.features.list.handler import chunk_key, list_chunk, list_tag
from backend.features.list.schema import StatusFilter
from backend.features.task_model import TaskRead, tasks_json, tasks_router
from backend.platform.auth import CurrentUser
from backend.platform.db import database_of
from backend.platform.guarded import accepts
from backend.platform.streaming import KeysetList, keyset_list_response

router = tasks_router()

# However long the list: read and sent LIST_CHUNK_ROWS tasks at a time (see the handler).
TASK_LIST = KeysetList(chunk=list_chunk, key=chunk_key, tag=list_tag, encode=tasks_json)


@router.get("", response_model=list[TaskRead], summary="List tasks")
@accepts(if_none_match=True)
async def list_(
    user: CurrentUser,
    request: Request,
    status: Annotated[
        StatusFilter, Query(description="Which tasks: all (default), pending or completed.")
    ] = StatusFilter.all,
) -> Response:
    """The signed-in user's tasks, newest first; `[]` when there are none."""
    return await keyset_list_response(
        database_of(request),
        TASK_LIST,
        chunk_rows=request.app.state.settings.LIST_CHUNK_ROWS,
        user_id=user.id,
        status=status,
    )
