"""Running a stage's loop beside its worker (the draft stage's, ``stages.draft.DraftLoop``), off the event loop.

``host_loop(runner, fn)`` runs ``fn(call)`` on a thread and returns a concurrent future of its result; ``call(method,
*args)`` makes one worker call and returns its result, blocking that thread. Where the runner hosts loops itself
(``ThreadRunner.host_loop``: the worker's own thread, each call a plain function call timed like a runner call), the
loop runs there. Elsewhere (a worker in another process or a Ray actor) it runs on a thread of its own that makes
blocking runner calls (``submit(...).result()``, bounded a little past the runner's own deadline where it has one):
the same round trip per call as from the event loop, without the loop in it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from .base import Runner

R = TypeVar("R")
CallFn = Callable[..., Any]  # call(method, *args, **kwargs) -> the worker method's result

__all__ = ["CallFn", "host_loop"]

DEADLINE_GRACE = 5.0  # seconds past a runner's own deadline before a hosted loop stops waiting for a call


def host_loop(runner: Runner, fn: Callable[[CallFn], R]) -> Future[R]:
    """Run ``fn(call)`` off the event loop, on the runner's own thread where it has one (see the module)."""
    hosted = getattr(runner, "host_loop", None)  # a TracedRunner passes its inner runner's through
    if hosted is not None:
        return hosted(fn)  # type: ignore[no-any-return]
    done: Future[R] = Future()
    # a runner with a deadline fails the call itself then, naming its stage and host; this is only the backstop
    deadline = getattr(runner, "deadline", None)
    timeout = None if deadline is None else deadline + DEADLINE_GRACE

    def call(method: str, *args: Any, **kwargs: Any) -> Any:
        return runner.submit(method, *args, **kwargs).result(timeout)

    def body() -> None:
        if not done.set_running_or_notify_cancel():
            return
        try:
            done.set_result(fn(call))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever awaits the future
            done.set_exception(exc)

    threading.Thread(target=body, name=f"pipespec-{runner.name}-loop", daemon=True).start()
    return done
