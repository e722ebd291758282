"""Get: `GET /api/{user_id}/tasks/{task_id}`."""

from fastapi import Request, Response

from backend.features.get.handler import get_task
from backend.features.get.schema import TaskRead
from backend.features.task_model import TaskId, task_response, tasks_router
from backend.platform.auth import CurrentUser
from backend.platform.db import database_of
from backend.platform.guarded import accepts

router = tasks_router()


@router.get("/{task_id}", response_model=TaskRead, summary="Get a task")
@accepts(if_none_match=True)
async def get(task_id: TaskId, user: CurrentUser, request: Request) -> Response:
    """One of the signed-in user's tasks; 404 if it is missing or someone else's."""
    db = database_of(request)
    return task_response(await db.run(get_task, user_id=user.id, task_id=task_id))
