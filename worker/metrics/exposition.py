"""Prometheus exposition: one registry of the Redis gauges and every process's counters.

A worker's HTTP endpoint (`worker/observability.py`) and `eventbuffer metrics`
build theirs with `build_registry`; `exposed_names` lists every sample name
the endpoint can show (the README's list and the alert rules are held to it).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from redis import Redis

from worker.metrics.counters import Metrics, metrics, multiprocess_dir
from worker.metrics.gauges import RedisCollector
from worker.settings import Settings
from worker.topology import Client, connect


def redis_client(settings: Settings) -> Client:
    """A Redis client of the exporter's own (scrapes run in the HTTP server's thread)."""
    return connect(settings, socket_connect_timeout=5, socket_timeout=10)


def build_registry(
    settings: Settings,
    redis_factory: Callable[[], Client] | None = None,
    *,
    this_process: bool = True,
    collector: RedisCollector | None = None,
) -> CollectorRegistry:
    """A registry for one exposition: Redis gauges, plus the counters of every process.

    With `PROMETHEUS_MULTIPROC_DIR` set, the counters come from its files
    (every process that counted there); otherwise from this process, unless
    `this_process` is False (a one-shot command has counted nothing).
    """
    registry = CollectorRegistry()
    if collector is None:
        collector = RedisCollector(settings, redis_factory or (lambda: redis_client(settings)))
    registry.register(collector)
    path = multiprocess_dir()
    if path is not None:
        if os.path.isdir(path):
            MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    elif this_process:
        for counter in metrics().collectors():
            registry.register(counter)
    return registry


def exposed_names(settings: Settings | None = None) -> set[str]:
    """Every sample name the endpoint can expose (counters with `_total`, histogram series)."""
    names: set[str] = set()
    families: list[Metric] = []
    for collector in Metrics(CollectorRegistry()).collectors():
        families.extend(collector.describe())
    families.extend(RedisCollector(settings or Settings(), lambda: Redis()).describe())
    for family in families:
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names.update(f"{family.name}_{s}" for s in ("bucket", "sum", "count"))
        else:
            names.add(family.name)
    return names
