"""Delete: `DELETE /api/{user_id}/tasks/{task_id}`."""

from starlette.concurrency import run_in_threadpool

from backend.features.delete.handler import delete_task
from backend.features.delete.schema import TaskRead
from backend.features.task_model import TaskId, tasks_router
from backend.platform.auth import CurrentUser
from backend.platform.db import SessionDep

router = tasks_router()


@router.delete("/{task_id}", response_model=TaskRead, summary="Delete a task")
async def delete(task_id: TaskId, user: CurrentUser, session: SessionDep) -> TaskRead:
    """Delete one of the signed-in user's tasks; the response is the task as it was."""
    return await run_in_threadpool(delete_task, session, user_id=user.id, task_id=task_id)
