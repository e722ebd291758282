"""Blocking code on the event loop: a greenlet that hands awaitables to the loop and resumes.

`Database.run` runs each handler with `run_in_greenlet`; while the handler's statement waits
for PostgreSQL, psycopg2's wait callback calls `await_from_greenlet` with a future for the
socket, so the loop serves other requests meanwhile (see `deadline` and `engine`). Built on the
`greenlet` package's public API alone: the same mechanism as SQLAlchemy's asyncio layer, whose
helpers live in a private module that changes between its releases.
"""

import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from greenlet import getcurrent, greenlet

T = TypeVar("T")


class _HandlerGreenlet(greenlet):
    """A handler's greenlet; its parent is the greenlet of the asyncio task that awaits it."""

    def __init__(self, fn: Callable[..., Any], parent: greenlet) -> None:
        super().__init__(fn, parent)
        # A new greenlet starts in an empty contextvars context. Sharing the task's (the same
        # Context object, not a copy) keeps what the request bound, structlog's `request_id`
        # and `user_id`, in the handler's log lines, and what a handler binds visible after.
        self.gr_context = parent.gr_context


def in_greenlet() -> bool:
    """True inside `run_in_greenlet`, where `await_from_greenlet` may be called."""
    return isinstance(getcurrent(), _HandlerGreenlet)


def await_from_greenlet(awaitable: Awaitable[T]) -> T:
    """Wait for `awaitable` on the event loop from blocking code run by `run_in_greenlet`, and
    return its result or raise its exception. Other tasks run on the loop meanwhile."""
    current = getcurrent()
    if not isinstance(current, _HandlerGreenlet):
        close = getattr(awaitable, "close", None)
        if close is not None:
            close()  # a coroutine never awaited would warn at garbage collection
        raise RuntimeError("await_from_greenlet() called outside run_in_greenlet()")
    return current.parent.switch(awaitable)  # type: ignore[no-any-return]


async def run_in_greenlet(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run the blocking `fn(*args, **kwargs)` in a greenlet of its own, awaiting on its behalf
    whatever it hands over with `await_from_greenlet`; return its result or raise what it
    raised. An exception (a cancellation too) raised while awaiting is thrown into `fn` at the
    point that waited, so its `finally` blocks and error handling run as in plain code."""
    handler = _HandlerGreenlet(fn, getcurrent())
    result: Any = handler.switch(*args, **kwargs)
    while not handler.dead:
        try:
            value = await result
        except BaseException:  # noqa: BLE001 - thrown into the handler, which decides
            result = handler.throw(*sys.exc_info())
        else:
            result = handler.switch(value)
    return result  # type: ignore[no-any-return]
