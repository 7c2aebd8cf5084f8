"""The configuration module of the `worker` Celery app, imported by Celery on first use.

It holds `celery_config(settings)` for the process's settings (from the
environment, or whatever `runtime.configure()` was given before).

A malformed setting stops a `celery` command (worker, beat, inspect...) with
one line naming the variable, instead of Celery's traceback of the import;
imported any other way, it raises `SettingsError` as usual.
"""

import os
import sys

from worker import runtime
from worker.celery import celery_config
from worker.errors import SettingsError


def _run_by_celery_command() -> bool:
    program = os.path.basename(sys.argv[0]) if sys.argv else ""
    return program == "celery" or sys.argv[0].endswith(os.path.join("celery", "__main__.py"))


try:
    _settings = runtime.settings()
except SettingsError as exc:
    if not _run_by_celery_command():
        raise
    print(f"eventbuffer: bad setting: {exc}", file=sys.stderr)
    raise SystemExit(2) from None  # as `eventbuffer` does for a bad setting

globals().update(celery_config(_settings))
