"""The configuration module of the `worker` Celery app, imported by Celery on first use.

It holds `celery_config(settings)` for the process's settings (from the
environment, or whatever `runtime.configure()` was given before).
"""

from worker import runtime
from worker.celery import celery_config

globals().update(celery_config(runtime.settings()))
