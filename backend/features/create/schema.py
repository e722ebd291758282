"""Create: the request body. The response is the shared `TaskRead`."""

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from backend.features.task_model import Description, Title


class TaskCreate(BaseModel):
    """A new task. Ownership comes from the token: `id`, `user_id` and timestamps in the body
    are ignored."""

    model_config = ConfigDict(extra="ignore")

    title: Title
    description: Description = None
    completed: StrictBool = Field(default=False, description="Start as done; default false.")
