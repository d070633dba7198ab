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
