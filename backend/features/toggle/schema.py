"""Toggle: no request body; the response is the flipped task as the shared `TaskRead`."""

from backend.features.task_model import TaskRead

__all__ = ["TaskRead"]
