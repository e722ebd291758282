"""`greenlet_bridge`: blocking code on the event loop behaves as plain code would.

Results and exceptions come back out, an awaited failure is raised at the line that waited,
a cancellation unwinds the blocking code's `finally`, and contextvars are shared with the task
(request-scoped log fields depend on that).
"""

import asyncio
import contextvars

import pytest

from backend.platform.db.greenlet_bridge import await_from_greenlet, in_greenlet, run_in_greenlet

REQUEST = contextvars.ContextVar("request", default="none")


async def answer(value):
    await asyncio.sleep(0)
    return value


async def fail():
    await asyncio.sleep(0)
    raise LookupError("from the loop")


def test_results_and_awaited_values_come_back():
    def blocking(a, *, b):
        assert in_greenlet()
        return await_from_greenlet(answer(a)) + await_from_greenlet(answer(b))

    assert asyncio.run(run_in_greenlet(blocking, 2, b=3)) == 5
    assert not in_greenlet()


def test_an_exception_raised_by_the_blocking_code_propagates():
    def blocking():
        await_from_greenlet(answer(1))
        raise ValueError("from the handler")

    with pytest.raises(ValueError, match="from the handler"):
        asyncio.run(run_in_greenlet(blocking))


def test_an_awaited_failure_is_raised_where_the_blocking_code_waited():
    def blocking():
        try:
            await_from_greenlet(fail())
        except LookupError as exc:
            return f"caught: {exc}"
        return "not raised"

    assert asyncio.run(run_in_greenlet(blocking)) == "caught: from the loop"


def test_a_cancellation_unwinds_the_blocking_code():
    unwound = []

    def blocking():
        try:
            await_from_greenlet(asyncio.sleep(10))
        finally:
            unwound.append(True)

    async def scenario():
        task = asyncio.create_task(run_in_greenlet(blocking))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert unwound == [True]


def test_contextvars_are_the_tasks_both_ways():
    def blocking():
        seen = REQUEST.get()
        REQUEST.set("bound in the handler")
        return seen

    async def scenario():
        REQUEST.set("req-42")
        seen = await run_in_greenlet(blocking)
        return seen, REQUEST.get()

    assert asyncio.run(scenario()) == ("req-42", "bound in the handler")


def test_waiting_outside_the_bridge_is_refused_and_closes_the_coroutine():
    coroutine = answer(1)
    with pytest.raises(RuntimeError, match=r"outside run_in_greenlet\(\)"):
        await_from_greenlet(coroutine)
    assert coroutine.cr_frame is None  # closed: no "never awaited" warning later


def test_handler_greenlets_are_reused_and_keep_nothing_of_a_finished_run():
    # A new greenlet per run costs each request an mmap and munmap of frame memory (the module
    # docstring); a reused one must not keep the last run's arguments, result or error alive.
    import gc
    import weakref

    from greenlet import getcurrent

    class Payload:
        pass

    greenlets, payloads = [], []

    def blocking(payload, fail):
        greenlets.append(getcurrent())
        payloads.append(weakref.ref(payload))
        await_from_greenlet(answer(1))
        if fail:
            raise ValueError(payload)
        return payload

    async def scenario():
        assert isinstance(await run_in_greenlet(blocking, Payload(), fail=False), Payload)
        with pytest.raises(ValueError):
            await run_in_greenlet(blocking, Payload(), fail=True)
        gc.collect()
        return [ref() for ref in payloads]

    assert asyncio.run(scenario()) == [None, None]
    assert greenlets[0] is greenlets[1]
