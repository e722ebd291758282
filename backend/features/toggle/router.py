"""Toggle: `PATCH /api/{user_id}/tasks/{task_id}/complete`."""

from starlette.concurrency import run_in_threadpool

from backend.features.task_model import TaskId, tasks_router
from backend.features.toggle.handler import toggle_task
from backend.features.toggle.schema import TaskRead
from backend.platform.auth import CurrentUser
from backend.platform.db import SessionDep

router = tasks_router()


@router.patch("/{task_id}/complete", response_model=TaskRead, summary="Toggle completion")
async def toggle(task_id: TaskId, user: CurrentUser, session: SessionDep) -> TaskRead:
    """Flip the task between pending and completed; no body needed."""
    return await run_in_threadpool(toggle_task, session, user_id=user.id, task_id=task_id)
