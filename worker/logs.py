"""Logs: one JSON object per line (or Celery's console lines), never a password.

`EVENT_BUFFER_LOG_FORMAT=json` makes every record one line of JSON with
`ts`, `level`, `logger`, `message`, `process`, `process_name`, `task_id`
and `task_name` when a task is running, `exc` for an exception, and every
field passed with `extra=` (the flush line's `shard`, `rows`, ...).
`console` (the default) keeps Celery's text format.

Either way `RedactSecrets` masks the password of any URL
(`scheme://user:password@host` becomes `scheme://user:***@host`) and
`password=` query parameters in the message, its arguments, string extra
fields and exception text, before any handler writes the record.

`configure_handlers()` is what the Celery logging signals call (see
`worker/observability.py`); it works on any `logging.Logger`, so tests and
tools can use it too.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime
from typing import Any

FORMATS = ("console", "json")

# The password runs to the LAST "@" before a space: clients split user info from
# the host at its last "@" (urlsplit does), so an unencoded "@" in a password is
# part of it. Masking too much (a later "@" on the same word) is the safe error.
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^:@/\s]*:)\S*@")
_QUERY_PASSWORD = re.compile(r"((?:password|passwd|pwd)=)[^&\s]*", re.IGNORECASE)

# Attributes every LogRecord has: anything else on a record came from `extra=`.
_STANDARD = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys()
    | {"message", "asctime", "taskName"}
    # Celery's task formatter sets these on records; they are reported as task_id/task_name.
    | {"task_id", "task_name"}
)


def redact(text: str) -> str:
    """`text` with the password of every URL (and `password=` parameters) replaced by ***."""
    return _QUERY_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1***@", text))


def one_line(error: object, limit: int = 300) -> str:
    """An error's text on one line, cut to `limit` characters, passwords masked.

    Its text may quote hostile input at length, or span lines (a Redis reply, a
    traceback's last words); an exception without text is named by its type.
    """
    text = " ".join(str(error).split())
    if not text and isinstance(error, BaseException):
        text = type(error).__name__
    return redact(text if len(text) <= limit else text[: limit - 1] + "…")


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, bytes):
        return redact(value.decode("utf-8", "backslashreplace"))
    return value


class RedactSecrets(logging.Filter):
    """Masks URL passwords in a record's message, arguments, extra fields and exception.

    The message is rendered once (`msg % args`) and replaced by its masked
    text, so a password passed as an argument is caught as well. Attach it
    to handlers: a logger's filters do not see records propagated from
    child loggers.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: let the handler report it, masked
            message = f"{record.msg!r} % {record.args!r}"
        record.msg = redact(message)
        record.args = None
        for name, value in list(record.__dict__.items()):
            if name not in _STANDARD and isinstance(value, str | bytes):
                setattr(record, name, _redact_value(value))
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


# Libraries that log a warning with a traceback for a failure that the caller
# turns into a typed, logged error anyway (clickhouse-driver's "Failed to connect").
QUIET_LIBRARIES = ("clickhouse_driver",)


class OneLineLibraryWarnings(logging.Filter):
    """A quiet library's warning keeps its message and the exception's one line, not the trace."""

    def filter(self, record: logging.LogRecord) -> bool:
        if (
            record.exc_info
            and record.levelno < logging.ERROR
            and record.name.split(".", 1)[0] in QUIET_LIBRARIES
        ):
            exc = record.exc_info[1]
            try:
                message = record.getMessage()
            except Exception:
                message = str(record.msg)
            record.msg = f"{message}: {type(exc).__name__}: {' '.join(str(exc).split())}"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


def _current_task() -> tuple[str, str] | None:
    try:
        from celery._state import get_current_task
    except ImportError:  # pragma: no cover - celery is a dependency
        return None
    task = get_current_task()
    if task is None or task.request is None or task.request.id is None:
        return None
    return str(task.request.id), str(task.name)


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    return redact(str(value))


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": message,
            "process": record.process,
            "process_name": record.processName,
        }
        task = _current_task()
        if task is not None:
            out["task_id"], out["task_name"] = task
        # Celery passes its formatting context as `extra={"data": ...}`: keep the task's
        # id, name and runtime, never its arguments or return value (event payloads).
        data = getattr(record, "data", None)
        if isinstance(data, dict):
            for key, field in (("id", "task_id"), ("name", "task_name"), ("runtime", "runtime")):
                if data.get(key) is not None and field not in out:
                    out[field] = _jsonable(data[key])
        for name, value in record.__dict__.items():
            if name in _STANDARD or name.startswith("_") or name in out or name == "data":
                continue
            out[name] = _jsonable(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def configure_handlers(logger: logging.Logger, log_format: str) -> None:
    """Give every handler of `logger` the redaction filter, and the JSON formatter if asked.

    Idempotent: a handler is never given the filter twice. Quiet libraries'
    warnings lose their traceback first (`OneLineLibraryWarnings`).
    """
    if log_format not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {log_format!r}")
    for handler in logger.handlers:
        if not any(isinstance(f, OneLineLibraryWarnings) for f in handler.filters):
            handler.filters.insert(0, OneLineLibraryWarnings())
        if not any(isinstance(f, RedactSecrets) for f in handler.filters):
            handler.addFilter(RedactSecrets())
        if log_format == "json" and not isinstance(handler.formatter, JsonFormatter):
            handler.setFormatter(JsonFormatter())
