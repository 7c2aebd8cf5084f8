"""Importing eventbuffer's modules wires nothing: the Celery app's set-up does.

Each check runs in a fresh interpreter, so what another test imported first
cannot hide a module that connects a signal handler, registers a kombu
transport alias, an exit hook, or changes kombu's serializers on import.
"""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
import textwrap

import worker
from tests.support.celery_procs import ROOT

# Imported by the app's set-up itself, or are the app.
APP_MODULES = {"worker.celery", "worker.celeryconfig"}

_PROBE = textwrap.dedent(
    """
    import atexit, importlib, json, sys
    from celery import signals
    from kombu.serialization import registry
    from kombu.transport import TRANSPORT_ALIASES

    def wiring():
        hooks = {
            name: len(getattr(signals, name).receivers or [])
            for name in dir(signals)
            if hasattr(getattr(signals, name), "receivers")
        }
        decoders = {k: f"{v.__module__}.{v.__qualname__}" for k, v in registry._decoders.items()}
        return {
            "hooks": hooks,
            "aliases": sorted(TRANSPORT_ALIASES),
            "exit_hooks": atexit._ncallbacks(),
            "serializers": sorted(registry._encoders),
            "decoders": decoders,
        }

    before = wiring()
    for name in sys.argv[1:]:
        importlib.import_module(name)
    print(json.dumps({"before": before, "after": wiring()}))
    """
)


def _wiring(*modules: str) -> dict[str, dict[str, object]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, *modules],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    result: dict[str, dict[str, object]] = json.loads(out.strip().splitlines()[-1])
    return result


def _library_modules() -> list[str]:
    names = [
        info.name
        for info in pkgutil.walk_packages(worker.__path__, prefix="worker.")
        if not info.name.endswith(".__main__")  # runs the command line
    ]
    return sorted(set(names) - APP_MODULES)


def test_importing_the_library_connects_no_hook_and_no_transport_alias() -> None:
    """Nor an exit hook: the producer's (send what is held at exit) comes with a producer."""
    wiring = _wiring(*_library_modules())
    for part in ("hooks", "aliases", "exit_hooks"):
        assert wiring["after"][part] == wiring["before"][part]


def test_importing_the_library_changes_no_serializer() -> None:
    wiring = _wiring(*_library_modules())
    for part in ("serializers", "decoders"):
        assert wiring["after"][part] == wiring["before"][part]


def test_the_app_set_up_connects_its_hooks() -> None:
    """The other side: importing the app (its set-up) does wire them, so the probe can see it."""
    wiring = _wiring("worker.celery")
    before, after = wiring["before"]["hooks"], wiring["after"]["hooks"]
    assert isinstance(before, dict) and isinstance(after, dict)
    grown = {name for name in after if after[name] > before[name]}
    assert {"celeryd_init", "beat_init", "worker_init", "worker_shutdown"} <= grown
