"""Waiting for a condition with a bound: the one poll loop the demo, the chaos runner and
the tests share."""

from __future__ import annotations

import time
from typing import Any, Callable


def wait_for(pred: Callable[[], Any], timeout_s: float, poll_s: float = 0.05) -> Any:
    """Call ``pred`` every ``poll_s`` until it returns something truthy, and return that;
    ``None`` once ``timeout_s`` has passed (the caller raises its own error).

    Example: ``commit = wait_for(lambda: read_commit(), 60) or fail("no commit")``.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(poll_s)
    return None


def wait_until(pred: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 0.05) -> Any:
    """:func:`wait_for`, raising ``TimeoutError`` that names ``what`` when ``pred`` stayed
    falsy for ``timeout_s``. Example: ``c = wait_until(read_commit, 60, "the commit")``."""
    v = wait_for(pred, timeout_s, poll_s)
    if not v:
        raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
    return v
