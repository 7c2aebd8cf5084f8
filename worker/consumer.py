"""Messages for an ingest task that Celery cannot run are kept, not dropped.

Celery refuses some messages before any task runs, and stock Celery logs
and acknowledges them, losing the events in them: a body that does not
decode, content that is not JSON (pickle is never accepted), a task name
that is not registered (the consumer's `on_*` handlers), and a body whose
arguments do not fit the task, such as celery-node's
`client.sendTask(name, args)`, which sends `[args, null, {}]` (the trace
refuses it only in the pool), or whose `batch_id` argument is no batch id
(`worker.bodies.batch_id_problem`: `send_task("eventbuffer.ingest_event",
args=[e1, e2])` makes `e2` the batch id). For messages addressed to eventbuffer's
ingest tasks (and to any unknown `eventbuffer.*` name), the raw body is
stored as one `undeliverable_task` dead letter (`eventbuffer dlq list`;
`eventbuffer dlq replay` once it can be read) and the message is
acknowledged. Other messages keep Celery's handling. If the dead letter
cannot be stored (Redis away), the message stays unacknowledged, in the
broker's keeping (a worker that dies meanwhile gives it back), and the
consumer's timer tries again after 1 s, then every 2, 4 ... up to 30 s:
nothing sleeps on the event loop, and the message is neither lost nor sent
round its queue in a busy loop.

Only a Redis failure is waited for that way (`worker/dead_batches.py`: the
policy the ingest task follows too), and at most RETRY_ATTEMPTS
times (about 10 minutes); after that, or at once when storing fails for any
other reason (a body the dead letter cannot hold), the message is parked
unchanged in the broker (the reliable transport's
`_eventbuffer.broker.unparsable`; on another transport it goes back to its
queue).

No message stops a worker: every message Celery would drop or die on is
kept. The task handler (`Consumer.create_task_handler`) checks protocol 2
headers first (`header_problem`: an id, a task name and time limits Celery
can use) and catches whatever Celery raises on a message: a message for
eventbuffer becomes an `undeliverable_task` dead letter as above, any other
is parked unchanged (or, on another transport, dead-lettered). A message
without a task name (`on_unknown_message`), or with one that is not a
string, is parked too, where Celery would acknowledge and drop it.

ETA and countdown are ignored: every task runs when it arrives. No
eventbuffer task is sent with one (the buffer orders events by
`created_at`), and Celery would hold each such task in the worker's memory
until its time came, however far ahead. An ingest task's `expires` is
ignored too: Celery would acknowledge an expired task and drop its events.

Enabled by the app's `worker_consumer` setting (`Consumer`) and the ingest
tasks' `Strategy` (`ingest_strategy`, which checks the arguments and the
size before the stock strategy takes the message).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from collections.abc import Callable
from typing import Any

from celery.utils.time import maybe_iso8601
from celery.worker.consumer import Consumer as CeleryConsumer
from celery.worker.strategy import default as default_strategy

from worker import runtime
from worker.bodies import call_problem
from worker.dead_batches import keep_batch
from worker.deadletters import REASON_UNDELIVERABLE
from worker.names import TASK_INGEST_EVENT, TASK_INGEST_EVENTS, TASK_PREFIX

log = logging.getLogger(__name__)

#: A message that could not be dead-lettered is tried again after this long, then after
#: twice as long each time, up to RETRY_MAX_S, RETRY_ATTEMPTS times at most (then parked).
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 30.0
RETRY_ATTEMPTS = 25
#: A message rejected without a dead letter has this much of its body logged.
LOGGED_BODY_BYTES = 65536


def addressed_task(message: Any) -> str:
    """The task name in a message's headers (protocol 2) or body (protocol 1), or ""."""
    headers = getattr(message, "headers", None)
    if isinstance(headers, dict) and "task" in headers:
        name = headers.get("task")
        return name if isinstance(name, str) else ""
    try:
        payload = message.decode()  # cached: Celery decoded a protocol 1 body already
    except Exception:
        return ""
    name = payload.get("task") if isinstance(payload, dict) else None
    return name if isinstance(name, str) else ""


def kept_for(name: str, registered: Any) -> bool:
    """Is a refused message for `name` one whose events eventbuffer must keep?"""
    if name in (TASK_INGEST_EVENT, TASK_INGEST_EVENTS):
        return True
    return name.startswith(TASK_PREFIX) and name not in registered


def keep_undeliverable(
    message: Any,
    name: str,
    error: str,
    connection_errors: Any,
    timer: Any = None,
    pause_s: float = RETRY_FIRST_S,
    attempt: int = 1,
) -> None:
    """Store a message's raw body as a dead letter and acknowledge it.

    When the buffer's Redis cannot store it, the message stays
    unacknowledged and `timer` (the consumer's: `call_after` runs on its
    event loop) tries again in `pause_s`, doubling up to RETRY_MAX_S, until
    RETRY_ATTEMPTS; then, or at once on any other failure, it is parked
    (`park`). Without a timer it goes back to its queue at once.
    """
    raw = message_body(message)
    headers = message.headers if isinstance(message.headers, dict) else {}
    task_id = headers.get("id") if isinstance(headers.get("id"), str) else ""
    task_id = task_id or "sha256:" + hashlib.sha256(raw).hexdigest()
    kept = keep_batch(
        runtime.buffer, raw, task_id, reason=REASON_UNDELIVERABLE, error=error, task=name
    )
    if not kept.kept:
        store_exc = kept.retry or kept.failed
        assert store_exc is not None
        if kept.retry is None or attempt >= RETRY_ATTEMPTS:
            why = f"{error}; its dead letter could not be stored: {type(store_exc).__name__}: "
            park(message, why + str(store_exc), connection_errors, requeue=kept.retry is not None)
            return
        if timer is None:
            log.error(
                "%s message %s cannot be run (%s) and could not be dead-lettered (%s): "
                "it goes back to its queue",
                name,
                task_id,
                error,
                store_exc,
            )
            message.reject_log_error(log, connection_errors, requeue=True)
            return
        if attempt == 1:  # once per message, not on every retry
            log.error(
                "%s message %s cannot be run (%s) and could not be dead-lettered (%s): "
                "it stays unacknowledged in the broker and is tried again in %.0f s, "
                "then less often",
                name,
                task_id,
                error,
                store_exc,
                pause_s,
            )
        timer.call_after(
            pause_s,
            _keep_again,
            (
                message,
                name,
                error,
                connection_errors,
                timer,
                min(RETRY_MAX_S, pause_s * 2),
                attempt + 1,
            ),
        )
        return
    log.error(
        "%s message %s cannot be run (%s): kept as a dead letter (eventbuffer dlq list)",
        name,
        task_id,
        " ".join(error.split())[:500],
    )
    message.ack_log_error(log, connection_errors)


def message_body(message: Any) -> bytes:
    """A message's body as bytes, whatever it is (b"" for none)."""
    raw = message.body
    if isinstance(raw, str):
        return raw.encode("utf-8", "surrogatepass")
    if isinstance(raw, bytes | bytearray | memoryview):
        return bytes(raw)
    return b"" if raw is None else repr(raw).encode("utf-8", "backslashreplace")


def park(message: Any, problem: str, connection_errors: Any, *, requeue: bool = False) -> None:
    """Keep a message no task can run, unchanged, out of the way: parked by the reliable
    transport (`_eventbuffer.broker.unparsable`, counted by `status` and the metrics).

    Another transport cannot park: with `requeue` the message goes back to
    its queue (it may be run later), else it is rejected, its body (cut)
    written to the log at CRITICAL.
    """
    if message.acknowledged:
        return
    parker = getattr(message.channel, "park_delivered", None)
    if parker is not None and parker(message.delivery_tag, problem):
        return
    if requeue:
        log.error("this message cannot be run now (%s): it goes back to its queue", problem)
        message.reject_log_error(log, connection_errors, requeue=True)
        return
    log.critical(
        "this message cannot be run (%s) and this transport cannot park it: rejected; "
        "its headers: %r; its body (first %d bytes): %r",
        " ".join(problem.split())[:500],
        message.headers,
        LOGGED_BODY_BYTES,
        message_body(message)[:LOGGED_BODY_BYTES],
    )
    message.reject_log_error(log, connection_errors, requeue=False)


def _keep_again(
    message: Any,
    name: str,
    error: str,
    connection_errors: Any,
    timer: Any,
    pause_s: float,
    attempt: int = 2,
) -> None:
    """keep_undeliverable again, unless the message was settled or its channel closed
    meanwhile (a closing channel gives its unacknowledged messages back to the broker)."""
    if message.acknowledged or getattr(message.channel, "closed", False):
        return
    keep_undeliverable(message, name, error, connection_errors, timer, pause_s, attempt)


def ingest_strategy(task: Any, app: Any, consumer: Any, **options: Any) -> Callable[..., Any]:
    """Celery's default strategy, after a check that the message's arguments fit the task.

    The payload is decoded once (kombu caches it) for both; a message that
    does not fit, or whose body is over EVENT_BUFFER_MAX_MESSAGE_BYTES (the
    reliable transport parks those before; other transports do not), is
    kept as a dead letter instead of failing outside the task. An `expires`
    is ignored: Celery would drop an expired task's events.
    """
    handler = default_strategy(task, app, consumer, **options)
    signature = inspect.signature(task.run)
    connection_errors = consumer.connection_errors
    max_bytes = runtime.settings().message_limit_bytes

    def checked_handler(message: Any, body: Any, *args: Any, **kwargs: Any) -> Any:
        fields = task_fields(message)
        if fields is not None and fields.get("expires") is not None:
            # Celery would revoke an expired task: acknowledge it, events and all.
            log.info(
                "%s message: its expiry %.60s is ignored (events are never dropped)",
                task.name,
                fields["expires"],
            )
            fields["expires"] = None
        size = len(message.body) if isinstance(message.body, bytes | str) else 0
        if size > max_bytes:
            problem: str | None = (
                f"the body is {size} bytes, over EVENT_BUFFER_MAX_MESSAGE_BYTES ({max_bytes})"
            )
        else:
            problem = call_problem(signature, message.payload if body is None else body)
        if problem is not None:
            error = f"InvalidTaskError: {problem}"
            keep_undeliverable(message, task.name, error, connection_errors, consumer.timer)
            return None
        return handler(message, body, *args, **kwargs)

    return checked_handler


# -- Celery's protocol 2 headers ----------------------------------------------------------

#: Headers Celery reads as text (or null) on its way to a task.
TEXT_HEADERS = ("root_id", "parent_id", "group", "shadow", "origin", "lang")


def header_problem(headers: Any, where: str = "headers") -> str | None:
    """Why Celery cannot take a message with these task fields (protocol 2 headers, or
    a protocol 1 body: the names are the same), or None.

    Celery itself fails on them outside any handler (an unhashable id, time
    limits it cannot unpack, a date it cannot parse), which stops a worker.
    """
    if not isinstance(headers, dict):
        return f"the {where} are not an object"
    task_id = headers.get("id")
    if not isinstance(task_id, str) or not task_id:
        return f"{where}.id is {_kind(task_id)}, not a non-empty string"
    for name in TEXT_HEADERS:
        value = headers.get(name)
        if value is not None and not isinstance(value, str):
            return f"{where}.{name} is {_kind(value)}, not a string"
    limits = headers.get("timelimit")
    if limits is not None and not (
        isinstance(limits, list | tuple)
        and len(limits) == 2
        and all(_number(limit) or limit is None for limit in limits)
    ):
        return f"{where}.timelimit {limits!r:.60} is not [hard, soft] seconds (or nulls)"
    retries = headers.get("retries")
    if retries is not None and not (isinstance(retries, int) and not isinstance(retries, bool)):
        return f"{where}.retries is {_kind(retries)}, not an integer"
    for name in ("eta", "expires"):
        value = headers.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            return f"{where}.{name} is {_kind(value)}, not an ISO 8601 date"
        try:
            maybe_iso8601(value)
        except (ValueError, OverflowError, TypeError) as exc:
            return f"{where}.{name} {value!r:.60} is not an ISO 8601 date ({exc})"
    for name in ("argsrepr", "kwargsrepr"):
        value = headers.get(name)
        if value is not None and not isinstance(value, str):
            return f"{where}.{name} is {_kind(value)}, not a string"
    return None


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", type(None): "null"}.get(
        type(value), f"a {type(value).__name__}"
    )


def task_fields(message: Any) -> dict[str, Any] | None:
    """Where a message's task fields are: its headers (protocol 2), or its decoded body
    (protocol 1: the same names); None when it names no task (Celery reports that)."""
    headers = message.headers
    if isinstance(headers, dict) and "task" in headers:
        return headers
    try:
        payload = message.decode()  # protocol 1: decoded once, cached for Celery's use
    except Exception:
        return None  # Celery reports it (on_decode_error)
    return payload if isinstance(payload, dict) and "task" in payload else None


def without_eta(message: Any) -> str | None:
    """Clear a message's ETA (protocol 2 headers, or a protocol 1 body): its task runs now.
    Returns the ETA it had, or None."""
    fields = task_fields(message)
    if fields is None or fields.get("eta") is None:
        return None
    eta = fields["eta"]
    fields["eta"] = None
    return str(eta)


class Consumer(CeleryConsumer):  # type: ignore[misc]
    def create_task_handler(self, *args: Any, **kwargs: Any) -> Callable[[Any], Any]:
        """Celery's handler of each task message, made unable to stop the worker: bad
        protocol 2 headers are refused first, and whatever Celery raises on a message
        keeps the message (dead letter or parked) instead of leaving the event loop."""
        handler = super().create_task_handler(*args, **kwargs)
        connection_errors = self.connection_errors

        def on_task_received(message: Any) -> Any:
            try:
                fields = task_fields(message)
                if fields is not None:
                    protocol2 = fields is message.headers
                    problem = header_problem(fields, "headers" if protocol2 else "body")
                    if problem is not None:
                        return self._refuse(message, f"InvalidTaskError: {problem}")
                eta = without_eta(message)
                if eta is not None:
                    log.info(
                        "task %s: its ETA %.60s is ignored, it runs now (no eventbuffer task "
                        "waits: the buffer orders events by created_at)",
                        addressed_task(message) or "?",
                        eta,
                    )
                return handler(message)
            except Exception as exc:
                # kombu counts KeyError among connection errors (for its poller): from
                # a message's handling it is the message's fault.
                if isinstance(exc, connection_errors) and not isinstance(exc, KeyError):
                    raise
                log.error("a message failed in Celery's task handler", exc_info=True)
                return self._refuse(message, f"{type(exc).__name__}: {exc}")

        return on_task_received

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        error = f"{type(exc).__name__}: {exc}"
        if not self._keep(message, error):
            park(message, error, self.connection_errors)  # Celery would drop it

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        error = f"{type(exc).__name__}: {exc}"
        if not self._keep(message, error):
            park(message, error, self.connection_errors)  # Celery would drop it

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        name = addressed_task(message)
        if not name:  # not a string: Celery would drop it
            park(message, "the task name is not a string", self.connection_errors)
            return
        if not self._keep(message, f"NotRegistered: no task is named {name!r}"):
            super().on_unknown_task(body, message, exc)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        """No task name at all (no headers, and no protocol 1 body naming one): Celery
        would acknowledge and drop it."""
        park(message, "the message names no task", self.connection_errors)

    def _refuse(self, message: Any, error: str) -> None:
        """A message Celery cannot run: eventbuffer's kept as a dead letter, others parked."""
        if message.acknowledged:
            return
        name = addressed_task(message)
        if kept_for(name, self.app.tasks):
            keep_undeliverable(message, name, error, self.connection_errors, self.timer)
        else:
            park(message, error, self.connection_errors)

    def _keep(self, message: Any, error: str) -> bool:
        """Keep the message as a dead letter; False when it is not eventbuffer's to keep."""
        name = addressed_task(message)
        if not kept_for(name, self.app.tasks):
            return False
        keep_undeliverable(message, name, error, self.connection_errors, self.timer)
        return True
