"""Waiting for a condition, with a bound: the one polling loop of the tests and benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(
    condition: Callable[[], object],
    timeout: float,
    what: str = "the condition",
    *,
    alive: Callable[[], bool] | None = None,
    interval: float = 0.05,
    detail: Callable[[], str] | None = None,
) -> None:
    """Poll `condition` until it is true; AssertionError after `timeout` seconds.

    `alive` is checked too (a process that died makes waiting pointless);
    `detail` adds context (a log) to the failure message.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if alive is not None and not alive():
            raise AssertionError(f"process died while waiting for {what}")
        if time.monotonic() > deadline:
            extra = f"\n{detail()}" if detail is not None else ""
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}{extra}")
        time.sleep(interval)
