"""Prometheus metrics: what the workers did (counters) and what the buffer holds (gauges).

Two sources, one `eventbuffer_` namespace, three modules:

- `counters`: counters and histograms, recorded by the tasks and the flusher
  (`record_*`), per process (multiprocess files under the prefork pool);
- `gauges`: read from Redis at every scrape (`RedisCollector`), so every
  process reports the same truth;
- `exposition`: the registry a worker's endpoint and `eventbuffer metrics`
  serve (`build_registry`), and every name it can expose.

The README's Observability section lists every series; each one's help text
is where it is declared. Names are re-exported here, as they always were.
"""

from worker.metrics.counters import (
    APPLY_BUCKETS,
    CHUNK_BUCKETS,
    DEAD_LETTER_REASONS,
    FLUSH_BACKOFF,
    FLUSH_ERROR,
    FLUSH_LOCKED,
    FLUSH_SUCCESS,
    INGEST_OUTCOMES,
    MULTIPROC_ENV,
    PHASE_BUCKETS,
    PHASES,
    PREFIX,
    Metrics,
    enable_multiprocess,
    metrics,
    multiprocess_dir,
    record_batch_dead_lettered,
    record_flush,
    record_flush_error,
    record_flush_stall,
    record_ingest,
    record_ingest_failure,
    record_ingest_pause,
    record_ingest_paused_seconds,
    record_late,
)
from worker.metrics.exposition import build_registry, exposed_names, redis_client
from worker.metrics.gauges import OTHER_PROJECTS, RedisCollector, top_projects

__all__ = [
    "APPLY_BUCKETS",
    "CHUNK_BUCKETS",
    "DEAD_LETTER_REASONS",
    "FLUSH_BACKOFF",
    "FLUSH_ERROR",
    "FLUSH_LOCKED",
    "FLUSH_SUCCESS",
    "INGEST_OUTCOMES",
    "MULTIPROC_ENV",
    "OTHER_PROJECTS",
    "PHASES",
    "PHASE_BUCKETS",
    "PREFIX",
    "Metrics",
    "RedisCollector",
    "build_registry",
    "enable_multiprocess",
    "exposed_names",
    "metrics",
    "multiprocess_dir",
    "record_batch_dead_lettered",
    "record_flush",
    "record_flush_error",
    "record_flush_stall",
    "record_ingest",
    "record_ingest_failure",
    "record_ingest_pause",
    "record_ingest_paused_seconds",
    "record_late",
    "redis_client",
    "top_projects",
]
