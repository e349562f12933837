"""Waiting in tests: poll a condition until a deadline instead of sleeping a fixed time.

CI runs on a busy 2-core machine, where "half a second is enough for the next report" stops being true;
a polled condition waits as long as the machine needs (up to a deadline that only a real failure reaches)
and no longer than it must on an idle one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

_UNSEEN = object()


def _timed_out(message: str | Callable[[], str], timeout: float, last: Any) -> AssertionError:
    seen = "predicate never returned" if last is _UNSEEN else f"last value: {last!r}"
    what = message() if callable(message) else message
    return AssertionError(f"timed out after {timeout:g} s waiting for {what}; {seen}")


def _poll_once(predicate: Callable[[], Any], retry_on: tuple[type[BaseException], ...]) -> tuple[bool, Any]:
    """(done, value): an exception in retry_on counts as a not-yet, with the exception as the value."""
    try:
        value = predicate()
    except retry_on as e:
        return False, e
    return bool(value), value


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05,
               message: str | Callable[[], str] = "the condition",
               retry_on: tuple[type[BaseException], ...] = ()) -> Any:
    """Call predicate() every `interval` s until it returns something truthy, and return that. After
    `timeout` s raise AssertionError naming `message` (a string, or a function called then, to describe the
    state) and the last value predicate returned (or the last exception of a type in `retry_on`; any other
    exception propagates at once)."""
    deadline = time.monotonic() + timeout
    last = _UNSEEN
    while True:
        done, last = _poll_once(predicate, retry_on)
        if done:
            return last
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _timed_out(message, timeout, last)
        time.sleep(min(interval, remaining))


async def wait_until_async(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.01,
                           message: str | Callable[[], str] = "the condition",
                           retry_on: tuple[type[BaseException], ...] = ()) -> Any:
    """wait_until for a coroutine: the event loop keeps running (its callbacks and tasks) between polls."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = _UNSEEN
    while True:
        done, last = _poll_once(predicate, retry_on)
        if done:
            return last
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise _timed_out(message, timeout, last)
        await asyncio.sleep(min(interval, remaining))
