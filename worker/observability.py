"""eventbuffer's logging setup and the Prometheus endpoint of a worker.

Everything here acts for eventbuffer's own Celery app only: a host app that
imports the producer client (and so this package) keeps its logging and its
workers as they are.

Logs (`AppLogging`, the app's `log` class): Celery sets up its handlers as
usual, then each gets `worker.logs.RedactSecrets`, and with
`EVENT_BUFFER_LOG_FORMAT=json` the JSON formatter.

Metrics (`worker_init` of a worker running eventbuffer's app, in its main
process before the pool forks; the hooks are connected by `install(app)`,
which the app's set-up calls):

- With `PROMETHEUS_MULTIPROC_DIR` set, that directory is used as it is
  (prometheus-client wants it empty when the first worker using it starts).
- Else, with `EVENT_BUFFER_METRICS_PORT` set, a private temporary directory
  is created, exported to the pool processes, and removed at shutdown.
- With a port, an HTTP server in the main process serves `/metrics` on
  `EVENT_BUFFER_METRICS_ADDRESS` (127.0.0.1 unless set): the
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
from celery.app.log import Logging

from worker.logs import configure_handlers

log = logging.getLogger(__name__)


class _State:
    server: Any = None
    thread: Any = None
    created_dir: str | None = None
    notice: tuple[int, str] | None = None
    # Set by worker_init when this process runs eventbuffer's app.
    ours: bool = False


_state = _State()


class AppLogging(Logging):  # type: ignore[misc]
    """Celery's logging setup, then redaction (and JSON) on every handler it set up."""

    def setup_handlers(self, logger: logging.Logger, *args: Any, **kwargs: Any) -> Any:
        from worker import runtime

        configured = super().setup_handlers(logger, *args, **kwargs)
        configure_handlers(logger, runtime.settings().log_format)
        return configured


class _App:
    # The app whose workers this module serves: set by `install`.
    app: Any = None


def install(app: Any) -> None:
    """Connect the metrics endpoint's hooks for the workers of `app`.

    Called once by the app's set-up (`worker.celery`); importing this module connects nothing.
    """
    _App.app = app
    signals.worker_init.connect(_worker_init, weak=False, dispatch_uid="eventbuffer-metrics-init")
    signals.worker_ready.connect(
        _worker_ready, weak=False, dispatch_uid="eventbuffer-metrics-ready"
    )
    signals.worker_process_shutdown.connect(
        _worker_process_shutdown, weak=False, dispatch_uid="eventbuffer-metrics-process-shutdown"
    )
    signals.worker_shutdown.connect(
        _worker_shutdown, weak=False, dispatch_uid="eventbuffer-metrics-shutdown"
    )


def _is_ours(sender: Any) -> bool:
    """Does the signal come from a worker (or its consumer) running eventbuffer's app?"""
    return _App.app is not None and getattr(sender, "app", None) is _App.app


def _worker_init(sender: Any = None, **_: Any) -> None:
    if not _is_ours(sender):
        return
    _state.ours = True
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
        start_http_server(settings.metrics_port, settings.metrics_address)


def start_http_server(port: int, addr: str = "127.0.0.1") -> None:
    """Serve /metrics on `addr`:`port` from a thread of this process.

    `addr` is EVENT_BUFFER_METRICS_ADDRESS: loopback unless asked otherwise,
    since the endpoint names projects and the shape of the traffic.
    """
    from prometheus_client import start_http_server as serve

    from worker import metrics, runtime

    registry = metrics.build_registry(runtime.settings())
    try:
        _state.server, _state.thread = serve(port, addr=addr, registry=registry)
    except OSError as exc:
        shared = metrics.multiprocess_dir()
        if shared is not None and _state.created_dir is None:
            # Several worker processes of one host, one directory: whichever serves the
            # port reads every process's counters there, this one's included.
            _state.notice = (
                logging.INFO,
                f"metrics: port {port} is taken, by another worker of this host sharing "
                f"PROMETHEUS_MULTIPROC_DIR={shared} as it seems; it serves this worker's "
                "counters too",
            )
        else:
            message = f"metrics: cannot serve on port {port} of {addr} ({exc})"
            _state.notice = (logging.ERROR, message)
        return
    _state.notice = (logging.INFO, f"metrics: serving Prometheus metrics on port {port} of {addr}")


def _worker_ready(sender: Any = None, **_: Any) -> None:
    # worker_init runs before Celery's logging is set up: say it now.
    if _is_ours(sender) and _state.notice is not None:
        log.log(*_state.notice)
        _state.notice = None


def _worker_process_shutdown(pid: int | None = None, **_: Any) -> None:
    # Sent in a pool process (forked from a main process that ran worker_init).
    if not _state.ours:
        return
    from worker import metrics

    if metrics.multiprocess_dir() is None:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid or os.getpid())  # type: ignore[no-untyped-call]


def _worker_shutdown(sender: Any = None, **_: Any) -> None:
    if not _is_ours(sender):
        return
    if _state.server is not None:
        _state.server.shutdown()
        _state.server.server_close()
        _state.server = _state.thread = None
    if _state.created_dir is not None:
        shutil.rmtree(_state.created_dir, ignore_errors=True)
        _state.created_dir = None
