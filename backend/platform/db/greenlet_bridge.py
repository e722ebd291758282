"""Blocking code on the event loop: a greenlet that hands awaitables to the loop and resumes.

`Database.run` runs each handler with `run_in_greenlet`; while the handler's statement waits
for PostgreSQL, psycopg2's wait callback calls `await_from_greenlet` with a future for the
socket, so the loop serves other requests meanwhile (see `deadline` and `engine`). Built on the
`greenlet` package's public API alone: the same mechanism as SQLAlchemy's asyncio layer, whose
helpers live in a private module that changes between its releases.

The greenlets are kept and reused, one per handler running at once (as many as the pool has
connections). A new greenlet's first Python frame needs a new chunk of frame memory, which
CPython 3.11 maps from the kernel and unmaps when the greenlet ends: a greenlet per request cost
each request an mmap, a munmap and the page faults between (seen with strace under load).
"""

import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from greenlet import GreenletExit, getcurrent, greenlet

T = TypeVar("T")


class _Finished:
    """What a handler greenlet hands back when the function it ran has returned or raised."""

    __slots__ = ("value", "error")

    def __init__(self, value: Any, error: BaseException | None) -> None:
        self.value, self.error = value, error


class _HandlerGreenlet(greenlet):
    """A greenlet that runs one blocking function after another for the tasks of one thread.

    Each run's parent is the greenlet of the asyncio task that awaits it, and its contextvars
    context is that task's (the same Context object, not a copy), so what the request bound,
    structlog's `request_id` and `user_id`, is in the handler's log lines, and what a handler
    binds is visible after.
    """

    def __init__(self) -> None:
        super().__init__(self._serve)

    def _serve(self, fn: Callable[..., Any] | None, args: Any, kwargs: Any) -> None:
        while True:
            assert fn is not None
            finished = _run(fn, args, kwargs)
            fn = args = kwargs = None  # idle, it keeps nothing of the run it finished
            fn, args, kwargs = self.parent.switch(finished)


def _run(fn: Callable[..., Any], args: Any, kwargs: Any) -> _Finished:
    try:
        return _Finished(fn(*args, **kwargs), None)
    except GreenletExit:
        raise  # the greenlet itself is being discarded (its thread or loop is gone)
    except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task to raise
        return _Finished(None, exc)


_idle = threading.local()  # per thread: a greenlet may only be switched to from its own thread


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
    """Run the blocking `fn(*args, **kwargs)` in a handler greenlet, awaiting on its behalf
    whatever it hands over with `await_from_greenlet`; return its result or raise what it
    raised. An exception (a cancellation too) raised while awaiting is thrown into `fn` at the
    point that waited, so its `finally` blocks and error handling run as in plain code."""
    try:
        idle: list[_HandlerGreenlet] = _idle.greenlets
    except AttributeError:
        idle = _idle.greenlets = []
    current = getcurrent()
    handler = idle.pop() if idle else _HandlerGreenlet()
    handler.parent = current
    handler.gr_context = current.gr_context
    result: Any = handler.switch(fn, args, kwargs)
    while result.__class__ is not _Finished:
        try:
            value = await result
        except BaseException:  # noqa: BLE001 - thrown into the handler, which decides
            result = handler.throw(*sys.exc_info())
        else:
            result = handler.switch(value)
    # Idle, the greenlet keeps nothing of this run: not the task's context (the request's log
    # fields), not the result, not the exception (the suspended greenlet still holds `result`).
    handler.gr_context = None
    idle.append(handler)
    value, error = result.value, result.error
    result.value = result.error = None
    if error is not None:
        raise error
    return value  # type: ignore[no-any-return]
