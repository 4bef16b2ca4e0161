"""Work that runs the model: one bounded line, served first come first served, and cancelled when its
client is gone.

1. Admit. At most `Limits.max_queued_jobs` pieces of model work (QK, sweep, compare and explain requests,
   graph and explain jobs) are queued or running; one more is answered 429 with Retry-After at once.
   Each admitted piece gets a thread of its own (`Work`), never one of the event loop's pool, so the
   cheap routes (info, listings, job status, the page's files) answer at once however busy the model is.
2. Check. The piece runs its own checks (prompt, token limit, request) straight away: bad input is
   refused without waiting for the model.
3. Wait. It then waits for its turn (`Turns`: the longest waiting goes next), then for the model's lock.
4. Run. While it holds the model, every HF decoder block checks the piece's `Token` before it runs
   (`checkpoints`): a cancelled piece stops at the next layer, and one cancelled while waiting never runs.
   The server's `Guard` cancels a request's token when its client disconnects; a job's token is its own.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any, TypeVar

from ..errors import Cancelled
from .store import ApiError

log = logging.getLogger(__name__)
T = TypeVar("T")
SCOPE_KEY = "qktrace.cancel"  # the request's Token, in its ASGI scope (set by app.Guard)
POLL_S = 0.1  # how often a waiting piece looks at its token


class Token:
    """A cancellation flag one piece of work checks at its checkpoints; set from any thread."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def cancel(self, reason: str) -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self, where: str) -> None:
        """Raise `Cancelled` (naming `where` it stopped) if the work was cancelled."""
        if self._event.is_set():
            raise Cancelled(f"cancelled {where}: {self.reason}")


_current: contextvars.ContextVar[Token | None] = contextvars.ContextVar("qktrace_cancel", default=None)


def current() -> Token:
    """The running piece's token (a fresh, never cancelled one outside `Work`)."""
    return _current.get() or Token()


def checkpoint(where: str) -> None:
    token = _current.get()
    if token is not None:
        token.check(where)


@contextmanager
def checkpoints(blocks: Iterable[Any]) -> Iterator[None]:
    """Every block checks the running piece's token before its forward pass, while inside (hooks removed on exit)."""
    handles = []
    for i, block in enumerate(blocks):

        def before(module: Any, args: Any, layer: int = i) -> None:
            checkpoint(f"before layer {layer}")

        handles.append(block.register_forward_pre_hook(before))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class Turns:
    """First come, first served: the piece that has waited longest goes next; a cancelled one leaves the line."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._line: deque[object] = deque()
        self._busy = False

    @property
    def waiting(self) -> int:
        return len(self._line)

    @contextmanager
    def turn(self, token: Token, wait_s: float, retry_after_s: int) -> Iterator[None]:
        me, deadline = object(), time.monotonic() + wait_s
        with self._cond:
            self._line.append(me)
            try:
                while self._busy or self._line[0] is not me:
                    token.check("before it ran")
                    if time.monotonic() > deadline:
                        raise ApiError(
                            503,
                            f"the model has been busy for {wait_s:.0f} s: try again",
                            {"Retry-After": str(retry_after_s)},
                        )
                    self._cond.wait(POLL_S)
                token.check("before it ran")
                self._busy = True
            finally:
                self._line.remove(me)
                self._cond.notify_all()
        try:
            yield
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()


class Work:
    """The bound on model work (`submit`): each admitted piece runs on a daemon thread of its own (a server
    stopped with Ctrl-C does not wait for it); counts what is active and what was cancelled."""

    def __init__(self, bound: int, retry_after_s: int):
        self.bound, self.retry_after_s = bound, retry_after_s
        self._lock = threading.Lock()
        self.active = 0  # admitted and not finished: queued or running
        self.cancelled = 0  # pieces stopped because their token was cancelled

    def submit(self, fn: Callable[[], T], token: Token, what: str) -> Future[T]:
        """Run `fn` on a thread with `token` as its current token; ApiError 429 when `bound` are active."""
        with self._lock:
            if self.active >= self.bound:
                raise ApiError(
                    429,
                    f"{self.active} requests that run the model are queued or running, the most this server takes "
                    f"(qktrace serve --queue {self.bound}): try again in {self.retry_after_s} s",
                    {"Retry-After": str(self.retry_after_s)},
                )
            self.active += 1
        future: Future[T] = Future()
        threading.Thread(target=self._run, args=(future, fn, token, what), name="qktrace-model", daemon=True).start()
        return future

    def _run(self, future: Future[T], fn: Callable[[], T], token: Token, what: str) -> None:
        started = time.monotonic()
        reset = _current.set(token)
        try:
            future.set_running_or_notify_cancel()
            token.check("before it ran")
            future.set_result(fn())
        except Cancelled as e:
            with self._lock:
                self.cancelled += 1
            log.info("%s: %s (after %.1f s)", what, e, time.monotonic() - started)
            future.set_exception(e)
        except BaseException as e:  # the route or job reports it
            future.set_exception(e)
        finally:
            _current.reset(reset)
            with self._lock:
                self.active -= 1

    def load(self) -> dict[str, int]:
        with self._lock:
            return {"active": self.active, "limit": self.bound, "cancelled": self.cancelled}
