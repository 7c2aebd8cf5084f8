"""Which transport eventbuffer's own workers consume a Redis broker with.

`celery -A worker worker` (and so `eventbuffer run`, compose.yaml and the
README's commands) consumes with the reliable transport
(`worker.broker.transport`) unless EVENT_BUFFER_BROKER_TRANSPORT=kombu.
Only eventbuffer's workers switch (hooks connected by `install(app, settings)`, which
the app's set-up calls), at `celeryd_init`, before they connect
(a host app's workers are left alone), and eventbuffer's Beat, at
`beat_init`, before its first tick (for its flush ticks, published even
into a full broker). The CLI, `EventProducer` and every other sender keep
kombu's stock transport, whose messages the reliable one consumes as they
are.

On a kombu version the transport was not tested with, the worker stops at
start-up with one line saying so; so does a worker whose buffer is a Redis
Cluster and whose broker or result backend is a cluster node too, and one
whose buffer or broker Redis has a `maxmemory-policy` that evicts keys
(`worker.redis_memory.check_eviction`; EVENT_BUFFER_ALLOW_EVICTION=true lets
it start).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial
from typing import Any

from celery import signals

from worker.settings import Settings

RELIABLE_SCHEMES = ("redis", "rediss")


def worker_transport(settings: Settings) -> str | None:
    """The transport a worker with `settings` consumes with; None: kombu's choice (the URL's)."""
    from worker.broker.transport import TRANSPORT_ALIAS

    scheme = settings.effective_broker_url.split("://", 1)[0]
    if settings.broker_transport == "reliable" and scheme in RELIABLE_SCHEMES:
        return TRANSPORT_ALIAS
    return None


def install(app: Any, settings: Callable[[], Settings]) -> None:
    """Connect the hooks that switch `app`'s workers and Beat to the reliable transport.

    `settings` gives the process's settings when a hook runs (the app's set-up
    passes `worker.runtime.settings`). Called once by the app's set-up
    (`worker.celery`); importing this module connects nothing.
    """
    signals.celeryd_init.connect(
        partial(_celeryd_init, app, settings),
        weak=False,
        dispatch_uid=f"eventbuffer-celeryd-{id(app)}",
    )
    signals.beat_init.connect(
        partial(_beat_init, app, settings), weak=False, dispatch_uid=f"eventbuffer-beat-{id(app)}"
    )


def _celeryd_init(
    app: Any,
    settings: Callable[[], Settings],
    instance: Any = None,
    conf: Any = None,
    **_: Any,
) -> None:
    from worker.broker.transport import UntestedKombu, check_kombu, install_alias
    from worker.errors import EvictionPolicyError, SettingsError
    from worker.redis_memory import check_eviction
    from worker.topology import check_celery_apart

    if getattr(instance, "app", None) is not app or conf is None:
        return  # another app's worker: its transport is its own business
    try:
        check_celery_apart(settings())
    except SettingsError as exc:
        print(f"eventbuffer: bad setting: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    try:
        for warning in check_eviction(settings()):
            print(warning, file=sys.stderr, flush=True)
    except EvictionPolicyError as exc:
        print(exc, file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    path = worker_transport(settings())
    if path is None:
        return
    try:
        check_kombu()
    except UntestedKombu as exc:
        print(exc, file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    install_alias()
    conf.broker_transport = path


def _beat_init(app: Any, settings: Callable[[], Settings], sender: Any = None, **_: Any) -> None:
    """Beat publishes with the reliable transport too, before its first tick: its flush
    ticks then reach a broker at maxmemory (`Channel._put`), where a flush is the one
    thing that frees memory. Its other messages, and its consuming, are kombu's."""
    from worker.broker.transport import UntestedKombu, check_kombu, install_alias

    conf = app.conf
    if getattr(sender, "app", None) is not app:
        return
    path = worker_transport(settings())
    if path is None:
        return
    try:
        check_kombu()
    except UntestedKombu:
        return  # stock kombu publishes as it always did
    install_alias()
    conf.broker_transport = path
