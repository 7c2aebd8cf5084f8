"""Celery signal handlers: structured logs, and the Prometheus endpoint of a worker.

`worker/celery_app.py` imports this module, so the handlers are connected
in every process that runs the app (worker, Beat). This module imports
only the logging helpers at import time; the metrics machinery is loaded
by the handlers, in worker processes.

Logs (`after_setup_logger`, `after_setup_task_logger`): Celery sets up its
handlers as usual, then each gets `worker.logs.RedactSecrets`, and with
`EVENT_BUFFER_LOG_FORMAT=json` the JSON formatter.

Metrics (`worker_init`, in the worker's main process before the pool forks):

- With `PROMETHEUS_MULTIPROC_DIR` set, that directory is used as it is
  (prometheus-client wants it empty when the first worker using it starts).
- Else, with `EVENT_BUFFER_METRICS_PORT` set, a private temporary directory
  is created, exported to the pool processes, and removed at shutdown.
- With a port, an HTTP server in the main process serves `/metrics`: the
  counters of every pool process (`MultiProcessCollector`) and the Redis
  gauges. A port in use is logged as an error; the worker runs on without it.
- A pool process that exits (`worker_process_shutdown`) is marked dead, so
  its live gauges leave the directory (its counters stay, as they must).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Any

from celery import signals

from worker.logs import configure_handlers

log = logging.getLogger(__name__)


class _State:
    server: Any = None
    thread: Any = None
    created_dir: str | None = None
    notice: tuple[int, str] | None = None


_state = _State()


def _log_format() -> str:
    from worker import runtime

    return runtime.settings().log_format


def _setup_logger(logger: logging.Logger, **_: Any) -> None:
    configure_handlers(logger, _log_format())


def _setup_task_logger(logger: logging.Logger, **_: Any) -> None:
    configure_handlers(logger, _log_format())


def _worker_init(**_: Any) -> None:
    from worker import metrics, runtime

    settings = runtime.settings()

    path = metrics.multiprocess_dir()
    if path is None and settings.metrics_port:
        path = tempfile.mkdtemp(prefix="eventbuffer-metrics-")
        _state.created_dir = path
    if path is not None:
        os.makedirs(path, exist_ok=True)
        metrics.enable_multiprocess(path)
        metrics.metrics()  # every series exists, at 0, from the first scrape
    if settings.metrics_port:
        start_http_server(settings.metrics_port)


def start_http_server(port: int, addr: str = "") -> None:
    """Serve /metrics on `port` (all interfaces) from a thread of this process."""
    from prometheus_client import start_http_server as serve

    from worker import metrics, runtime

    registry = metrics.build_registry(runtime.settings())
    try:
        _state.server, _state.thread = serve(port, addr=addr or "0.0.0.0", registry=registry)
    except OSError as exc:
        _state.notice = (logging.ERROR, f"metrics: cannot serve on port {port} ({exc})")
        return
    _state.notice = (logging.INFO, f"metrics: serving Prometheus metrics on port {port}")


def _worker_ready(**_: Any) -> None:
    # worker_init runs before Celery's logging is set up: say it now.
    if _state.notice is not None:
        log.log(*_state.notice)
        _state.notice = None


def _worker_process_shutdown(pid: int | None = None, **_: Any) -> None:
    from worker import metrics

    if metrics.multiprocess_dir() is None:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid or os.getpid())  # type: ignore[no-untyped-call]


def _worker_shutdown(**_: Any) -> None:
    if _state.server is not None:
        _state.server.shutdown()
        _state.server.server_close()
        _state.server = _state.thread = None
    if _state.created_dir is not None:
        shutil.rmtree(_state.created_dir, ignore_errors=True)
        _state.created_dir = None


signals.after_setup_logger.connect(_setup_logger, weak=False)
signals.after_setup_task_logger.connect(_setup_task_logger, weak=False)
signals.worker_init.connect(_worker_init, weak=False)
signals.worker_ready.connect(_worker_ready, weak=False)
signals.worker_process_shutdown.connect(_worker_process_shutdown, weak=False)
signals.worker_shutdown.connect(_worker_shutdown, weak=False)
