"""List: `GET /api/{user_id}/tasks?status=all|pending|completed`."""

from typing import Annotated

from fastapi import Query, Request, Response

from backend.features.list.handler import list_tasks
from backend.features.list.schema import StatusFilter
from backend.features.task_model import TaskRead, tasks_response, tasks_router
from backend.platform.auth import CurrentUser
from backend.platform.db import database_of
from backend.platform.guarded import accepts

router = tasks_router()


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
    db = database_of(request)
    return tasks_response(await db.run(list_tasks, user_id=user.id, status=status))
