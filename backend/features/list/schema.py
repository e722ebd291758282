"""List: the `status` filter. The response is a bare array of the shared `TaskRead`."""

from enum import StrEnum


class StatusFilter(StrEnum):
    all = "all"
    pending = "pending"
    completed = "completed"
