"""List: `GET /api/{user_id}/tasks?status=all|pending|completed`."""

from typing import Annotated

from fastapi import Query
from starlette.concurrency import run_in_threadpool

from backend.features.list.handler import list_tasks
from backend.features.list.schema import StatusFilter
from backend.features.task_model import TaskRead, tasks_router
from backend.platform.auth import CurrentUser
from backend.platform.db import SessionDep

router = tasks_router()


@router.get("", response_model=list[TaskRead], summary="List tasks")
async def list_(
    user: CurrentUser,
    session: SessionDep,
    status: Annotated[
        StatusFilter, Query(description="Which tasks: all (default), pending or completed.")
    ] = StatusFilter.all,
) -> list[TaskRead]:
    """The signed-in user's tasks, newest first; `[]` when there are none."""
    return await run_in_threadpool(list_tasks, session, user_id=user.id, status=status)
