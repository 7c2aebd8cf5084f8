"""How eventbuffer's Celery apps reach the broker: URL, TLS, serialization, transport options.

Shared by the worker's app (`worker/celery.py`) and the producer client's
own app (`worker/producer.py`), which must not load the worker's app.
"""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import parse_qs, urlsplit

from worker.settings import Settings


def redis_transport_options(
    visibility_timeout_s: int, consumer_timeout_s: int, max_message_bytes: int | None = None
) -> dict[str, int]:
    """Redis broker: when an unacknowledged task (its worker died) is delivered again.

    The reliable transport (eventbuffer's workers, `worker/broker/`) puts a
    dead worker's tasks back once its heartbeat is `consumer_timeout` old.
    kombu's stock transport sweeps for tasks unacknowledged longer than the
    visibility timeout, every `interval x throttle` seconds (100 s by
    default); sweep ten times per visibility timeout so a lost task comes
    back within ~1.1 timeouts. A worker killed during a sweep leaves the
    sweep's mutex behind: let it expire with the timeout instead of kombu's
    fixed 300 s. AMQP brokers ignore these options: they redeliver as soon
    as the dead worker's connection closes. The reliable transport parks a
    message larger than `max_message_bytes` without decoding it.
    """
    options = {
        "consumer_timeout": consumer_timeout_s,
        "visibility_timeout": visibility_timeout_s,
        "unacked_restore_interval": max(1, visibility_timeout_s // 10),
        "unacked_restore_throttle": 1,
        "unacked_mutex_expire": min(300, visibility_timeout_s),
    }
    if max_message_bytes is not None:
        options["max_message_bytes"] = max_message_bytes
    return options


def redis_tls_options(url: str) -> dict[str, Any] | None:
    """TLS options for a `rediss://` URL that does not say how to verify the server.

    With `ssl_cert_reqs` in the URL (`?ssl_cert_reqs=required&ssl_ca_certs=/ca.pem`,
    as redis-py, kombu and Celery all read it), the URL says it all: None.
    Without it, kombu would connect without verifying the certificate and
    Celery's result backend refuses the URL: verify against the system's CAs,
    as redis-py does for the buffer's own connection.
    """
    parts = urlsplit(url)
    if parts.scheme != "rediss" or "ssl_cert_reqs" in parse_qs(parts.query):
        return None
    return {"ssl_cert_reqs": ssl.CERT_REQUIRED}


def broker_config(settings: Settings) -> dict[str, Any]:
    """The Celery settings for sending and receiving tasks: JSON only, never pickle."""
    config: dict[str, Any] = dict(
        broker_url=settings.effective_broker_url,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        broker_transport_options=redis_transport_options(
            settings.visibility_timeout_s, settings.consumer_timeout_s, settings.message_limit_bytes
        ),
    )
    if (tls := redis_tls_options(settings.effective_broker_url)) is not None:
        config["broker_use_ssl"] = tls
    return config
