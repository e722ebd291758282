"""Delete: `DELETE /api/{user_id}/tasks/{task_id}`."""

from fastapi import Request, Response

from backend.features.delete.handler import delete_task
from backend.features.delete.schema import TaskRead
from backend.features.task_model import TaskId, task_response, tasks_router
from backend.platform.auth import CurrentUser
from backend.platform.db import database_of
from backend.platform.guarded import accepts

router = tasks_router()


@router.delete("/{task_id}", response_model=TaskRead, summary="Delete a task")
@accepts(idempotency_key=True, if_match=True)
async def delete(task_id: TaskId, user: CurrentUser, request: Request) -> Response:
    """Delete one of the signed-in user's tasks; the response is the task as it was."""
    db = database_of(request)
    return task_response(await db.run(delete_task, user_id=user.id, task_id=task_id))
