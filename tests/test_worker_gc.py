"""eventbuffer's workers tune the garbage collector; other apps' workers in the process do not.

Run in a fresh interpreter each (the collector's state is process-wide), by sending
the signals Celery sends when a worker starts.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.support.celery_procs import ROOT

PROBE = textwrap.dedent(
    """
    import gc, json, sys
    from celery import Celery, signals
    from worker.celery import GC_YOUNG_THRESHOLD, app

    which = sys.argv[1]
    runs = app if which == "eventbuffer" else Celery("host", set_as_current=False)
    worker = type("Worker", (), {"app": runs})()
    before = gc.get_threshold()
    signals.worker_init.send(sender=worker)
    signals.worker_ready.send(sender=worker)
    print(json.dumps({"before": before, "after": gc.get_threshold(),
                      "frozen": gc.get_freeze_count(), "young": GC_YOUNG_THRESHOLD}))
    """
)


def _probe(which: str) -> dict[str, list[int] | int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, which],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    result: dict[str, list[int] | int] = json.loads(out.strip().splitlines()[-1])
    return result


def test_an_eventbuffer_worker_collects_young_objects_less_often_and_freezes_start_up() -> None:
    probe = _probe("eventbuffer")
    assert probe["before"] == [700, 10, 10]  # Python's default, before the worker starts
    assert probe["after"] == [probe["young"], 10, 10]
    assert isinstance(probe["frozen"], int) and probe["frozen"] > 1000


def test_another_apps_worker_keeps_the_collectors_defaults() -> None:
    probe = _probe("host")
    assert probe["after"] == probe["before"] == [700, 10, 10]
    assert probe["frozen"] == 0
