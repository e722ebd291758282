"""Delete: no request body; the response is the deleted task as the shared `TaskRead`."""

from backend.features.task_model import TaskRead

__all__ = ["TaskRead"]
