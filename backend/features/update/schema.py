"""Update: the PUT (title required) and PATCH (any subset) bodies.

A field left out keeps its value; `description: null` clears it; `title` and `completed` may
not be null. `id`, `user_id` and timestamps in the body are ignored.
"""

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from backend.features.task_model import Description, Title


class TaskReplace(BaseModel):
    model_config = ConfigDict(extra="ignore")

    title: Title
    description: Description = None
    completed: StrictBool = Field(default=None, description="Done or not; omitted keeps it.")  # type: ignore[assignment]

    def changes(self) -> dict[str, Any]:
        return self.model_dump(exclude_unset=True)


class TaskPatch(TaskReplace):
    title: Title = None  # type: ignore[assignment]
