"""Blocking work (SQLite, files, aggregation, evaluation) off the event loop.

``asyncio.to_thread`` alone leaves the thread running when the awaiting task is
cancelled, so a stopping service could close the store under it. Here a
cancellation waits for the thread's current call to end (each call is one
bounded unit of work), then propagates.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


async def off_loop(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """Run ``fn`` in a worker thread; on cancellation, let it finish, then re-raise."""
    future = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        if not future.cancelled() and future.exception() is not None:
            future.exception()  # retrieved: the cancellation is what the caller sees
        raise
