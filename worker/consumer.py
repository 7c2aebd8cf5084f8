"""Messages for an ingest task that Celery cannot run are kept, not dropped.

Celery refuses some messages before any task runs, and stock Celery logs
and acknowledges them, losing the events in them: a body that does not
decode, content that is not JSON (pickle is never accepted), a task name
that is not registered (the consumer's `on_*` handlers), and a body whose
arguments do not fit the task, such as celery-node's
`client.sendTask(name, args)`, which sends `[args, null, {}]` (the trace
refuses it only in the pool), or whose `batch_id` argument is no batch id
(`worker.ingest.batch_id_problem`: `send_task("eventbuffer.ingest_event",
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

Enabled by the app's `worker_consumer` setting (`Consumer`) and the ingest
tasks' `Strategy` (`ingest_strategy`, which checks the arguments before the
stock strategy takes the message).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from collections.abc import Callable
from typing import Any

import msgspec
from celery.worker.consumer import Consumer as CeleryConsumer
from celery.worker.strategy import default as default_strategy

from worker import metrics, runtime
from worker.deadletters import REASON_UNDELIVERABLE
from worker.ingest import batch_id_problem, dead_letter_batch
from worker.names import TASK_INGEST_EVENT, TASK_INGEST_EVENTS, TASK_PREFIX

log = logging.getLogger(__name__)

#: A message that could not be dead-lettered is tried again after this long, then after
#: twice as long each time, up to RETRY_MAX_S.
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 30.0


def addressed_task(message: Any) -> str:
    """The task name in a (protocol 2) message's headers, or ""."""
    headers = getattr(message, "headers", None)
    if not isinstance(headers, dict):
        return ""
    name = headers.get("task")
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
) -> None:
    """Store a message's raw body as a dead letter and acknowledge it.

    When it cannot be stored, the message stays unacknowledged and `timer`
    (the consumer's: `call_after` runs on its event loop) tries again in
    `pause_s`, doubling up to RETRY_MAX_S. Without a timer it goes back to
    its queue at once.
    """
    raw = message.body
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    headers = message.headers
    task_id = headers.get("id") if isinstance(headers.get("id"), str) else ""
    task_id = task_id or "sha256:" + hashlib.sha256(raw).hexdigest()
    try:
        stored = dead_letter_batch(
            runtime.buffer(), raw, task_id, reason=REASON_UNDELIVERABLE, error=error, task=name
        )
    except Exception as store_exc:
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
        if pause_s <= RETRY_FIRST_S:  # once per message, not on every retry
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
            (message, name, error, connection_errors, timer, min(RETRY_MAX_S, pause_s * 2)),
        )
        return
    if stored:
        metrics.record_batch_dead_lettered(REASON_UNDELIVERABLE)
    log.error(
        "%s message %s cannot be run (%s): kept as a dead letter (eventbuffer dlq list)",
        name,
        task_id,
        " ".join(error.split())[:500],
    )
    message.ack_log_error(log, connection_errors)


def _keep_again(
    message: Any, name: str, error: str, connection_errors: Any, timer: Any, pause_s: float
) -> None:
    """keep_undeliverable again, unless the message was settled or its channel closed
    meanwhile (a closing channel gives its unacknowledged messages back to the broker)."""
    if message.acknowledged or getattr(message.channel, "closed", False):
        return
    keep_undeliverable(message, name, error, connection_errors, timer, pause_s)


def call_problem(signature: inspect.Signature, payload: Any) -> str | None:
    """Why a decoded task body cannot call a task of this signature, or None when it can.

    Protocol 2 bodies are `[args, kwargs, embed]`; protocol 1 bodies a dict
    with `args` and `kwargs` (missing ones are empty). A `batch_id` argument
    must be a short string of printable characters (or absent): anything
    else would become the id of the batch, and be none.
    """
    if isinstance(payload, list | tuple) and len(payload) == 3:
        args, kwargs = payload[0], payload[1]
    elif isinstance(payload, dict):
        args, kwargs = payload.get("args", ()), payload.get("kwargs", {})
    else:
        return "the body is neither a protocol 1 nor a protocol 2 task body"
    if not isinstance(args, list | tuple):
        return f"the task's arguments are not a list (got {type(args).__name__})"
    if not isinstance(kwargs, dict):
        return f"the task's keyword arguments are not a mapping (got {type(kwargs).__name__})"
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:
        return f"the arguments do not fit the task: {exc}"
    batch_id = bound.arguments.get("batch_id")
    if isinstance(batch_id, msgspec.Raw):  # a positional argument, left undecoded
        try:
            batch_id = msgspec.json.decode(batch_id)
        except msgspec.DecodeError as exc:
            return f"the batch_id argument is not JSON: {exc}"
    return batch_id_problem(batch_id)


def ingest_strategy(task: Any, app: Any, consumer: Any, **options: Any) -> Callable[..., Any]:
    """Celery's default strategy, after a check that the message's arguments fit the task.

    The payload is decoded once (kombu caches it) for both; a message that
    does not fit is kept as a dead letter instead of failing outside the task.
    """
    handler = default_strategy(task, app, consumer, **options)
    signature = inspect.signature(task.run)
    connection_errors = consumer.connection_errors

    def checked_handler(message: Any, body: Any, *args: Any, **kwargs: Any) -> Any:
        problem = call_problem(signature, message.payload if body is None else body)
        if problem is not None:
            error = f"InvalidTaskError: {problem}"
            keep_undeliverable(message, task.name, error, connection_errors, consumer.timer)
            return None
        return handler(message, body, *args, **kwargs)

    return checked_handler


class Consumer(CeleryConsumer):  # type: ignore[misc]
    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        if not self._keep(message, f"{type(exc).__name__}: {exc}"):
            super().on_invalid_task(body, message, exc)

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        if not self._keep(message, f"{type(exc).__name__}: {exc}"):
            super().on_decode_error(message, exc)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        name = addressed_task(message)
        if not self._keep(message, f"NotRegistered: no task is named {name!r}"):
            super().on_unknown_task(body, message, exc)

    def _keep(self, message: Any, error: str) -> bool:
        """Keep the message as a dead letter; False when it is not eventbuffer's to keep."""
        name = addressed_task(message)
        if not kept_for(name, self.app.tasks):
            return False
        keep_undeliverable(message, name, error, self.connection_errors, self.timer)
        return True
