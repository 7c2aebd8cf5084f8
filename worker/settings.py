"""Every setting eventbuffer reads, parsed and validated once.

`Settings.from_env()` reads the process environment (or any mapping) and
returns a frozen object. A malformed value raises `SettingsError` naming the
variable, so a bad deploy stops at start-up instead of misbehaving later.

Each field carries its environment variable, a parser and a one-line help
text in its metadata; the README's configuration table is generated from
`Settings.describe()`. This module imports nothing of the project but its
errors (`worker.errors`, itself a leaf).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from worker.errors import SettingsError

__all__ = ["Settings", "SettingsError"]


def _int(minimum: int) -> Callable[[str, str], int]:
    def parse(name: str, raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
        if value < minimum:
            raise SettingsError(f"{name} must be >= {minimum}, got {value}")
        return value

    return parse


def _float(minimum: float, maximum: float) -> Callable[[str, str], float]:
    def parse(name: str, raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise SettingsError(f"{name} must be a number, got {raw!r}") from None
        # `not (a <= v <= b)` also refuses NaN, which compares false with everything.
        if not minimum <= value <= maximum:
            raise SettingsError(f"{name} must be between {minimum:g} and {maximum:g}, got {raw!r}")
        return value

    return parse


def _url(*schemes: str) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        value = raw.strip()
        scheme = value.split("://", 1)[0] if "://" in value else ""
        if scheme not in schemes:
            allowed = ", ".join(f"{s}://" for s in schemes)
            # Without a scheme the value is shown, but never what precedes an "@" (a password).
            shown = scheme or ("***@" + value.rpartition("@")[2] if "@" in value else value)
            raise SettingsError(f"{name} must start with one of {allowed}, got {shown!r}")
        _check_url(name, value, scheme)
        return value

    return parse


# Schemes whose URL names a host: the rest name a path (unix://, chdb://) or nothing (memory://).
_NETWORK_SCHEMES = frozenset(
    {"redis", "rediss", "amqp", "amqps", "pyamqp", "clickhouse", "clickhouses"}
)


def _check_url(name: str, value: str, scheme: str) -> None:
    """Refuse a URL whose port or database cannot be used, now rather than in a worker.

    The message shows the URL without what precedes its "@" (a password).
    """
    try:
        parts = urlsplit(value)
    except ValueError as exc:  # an unclosed IPv6 bracket ...
        shown = f"{scheme}://{value.split('://', 1)[1].rpartition('@')[2]}"
        raise SettingsError(f"{name} cannot be read as a URL ({exc}): {shown!r}") from None
    shown = f"{scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"
    if scheme in _NETWORK_SCHEMES:
        try:
            port = parts.port  # raises for a port that is not a number in range
        except ValueError as exc:
            raise SettingsError(f"{name} has a bad port ({exc}): {shown!r}") from None
        if port == 0:
            raise SettingsError(f"{name} has a bad port (0 names no server): {shown!r}")
    if scheme in ("clickhouse", "clickhouses"):
        _check_clickhouse_url(name, value, parts.path, shown)
    if scheme == "chdb" and not value.split("://", 1)[1].strip("/"):
        raise SettingsError(f"{name}: a chdb:// URL needs a path, e.g. chdb://data/clickhouse")
    if scheme in ("redis", "rediss"):
        db = parts.path.strip("/")
        if db and not db.isdigit():
            raise SettingsError(
                f"{name}'s database must be a number (redis://host:6379/0), got {db!r}: {shown!r}"
            )
    if scheme in ("redis", "rediss", "unix"):
        from redis.connection import parse_url

        try:
            parse_url(value)  # type: ignore[no-untyped-call]
        except ValueError as exc:  # its query parameters: db, timeouts, ssl options ...
            raise SettingsError(f"{name} cannot be used: {exc}: {shown!r}") from None


#: A ClickHouse database or table name eventbuffer accepts (it is back-quoted in SQL).
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _check_clickhouse_url(name: str, value: str, path: str, shown: str) -> None:
    """The database is a name eventbuffer can quote; the query parameters ones
    clickhouse-driver can read (`connect_timeout=x` fails here, not at the first flush)."""
    database = unquote(path[1:])
    if database and not IDENTIFIER.match(database):
        raise SettingsError(
            f"{name}'s database must be a ClickHouse identifier (letters, digits, _), "
            f"got {database!r}: {shown!r}"
        )
    try:
        from clickhouse_driver.util.helpers import parse_url
    except ImportError:  # a producer-only install never opens a sink
        return
    try:
        parse_url(value)
    except ValueError as exc:
        raise SettingsError(f"{name} cannot be used: {exc}: {shown!r}") from None


def _identifier(name: str, raw: str) -> str:
    value = _text(name, raw)
    if not IDENTIFIER.match(value):
        raise SettingsError(
            f"{name} must be a ClickHouse identifier (letters, digits, _), got {value!r}"
        )
    return value


def _text(name: str, raw: str) -> str:
    value = raw.strip()
    if not value:
        raise SettingsError(f"{name} must not be empty")
    return value


def _port(name: str, raw: str) -> int:
    value = _int(0)(name, raw)
    if value > 65535:
        raise SettingsError(f"{name} must be a TCP port (0-65535), got {value}")
    return value


def _ip_address(name: str, raw: str) -> str:
    value = raw.strip()
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise SettingsError(
            f"{name} must be an IP address (127.0.0.1, 0.0.0.0, ::), got {value!r}"
        ) from None


def _choice(*choices: str) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise SettingsError(f"{name} must be one of {', '.join(choices)}, got {raw.strip()!r}")
        return value

    return parse


def _bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name} must be true or false, got {raw.strip()!r}")


def _setting(env: str, default: Any, parse: Callable[[str, str], Any], help: str) -> Any:
    return field(default=default, metadata={"env": env, "parse": parse, "help": help})


# process_buffer's hard time limit follows its soft one by this much: time for the
# soft limit's exception to release the lock and close the sink.
HARD_TIME_LIMIT_MARGIN_S = 30
#: EVENT_BUFFER_MAX_MESSAGE_BYTES when unset, unless producers' batches may be larger.
DEFAULT_MESSAGE_LIMIT_BYTES = 16 << 20

REDIS_SCHEMES = ("redis", "rediss", "unix")
BROKER_SCHEMES = ("redis", "rediss", "amqp", "amqps", "pyamqp", "memory")
CLICKHOUSE_SCHEMES = ("chdb", "clickhouse", "clickhouses")


@dataclass(frozen=True)
class Settings:
    redis_url: str = _setting(
        "REDIS_URL",
        "redis://127.0.0.1:6379/0",
        _url(*REDIS_SCHEMES),
        "Redis holding the buffer (`rediss://` for TLS; password in the URL).",
    )
    redis_cluster: bool = _setting(
        "EVENT_BUFFER_REDIS_CLUSTER",
        False,
        _bool,
        "`true`: `REDIS_URL` names one node of a Redis Cluster and the client discovers the "
        "rest; the broker must then be RabbitMQ or a plain Redis (`CELERY_BROKER_URL`).",
    )
    min_replicas: int | None = _setting(
        "EVENT_BUFFER_MIN_REPLICAS",
        None,
        _int(0),
        "Replicas that must confirm (WAIT) a batch before its ingest task succeeds, and a "
        "claim before its rows are inserted; empty means 1 with `EVENT_BUFFER_REDIS_CLUSTER`, "
        "else 0 (no WAIT).",
    )
    replica_timeout_ms: int = _setting(
        "EVENT_BUFFER_REPLICA_TIMEOUT_MS",
        1000,
        _int(1),
        "How long a WAIT for `EVENT_BUFFER_MIN_REPLICAS` replicas may block; fewer confirmed "
        "by then: the ingest task is retried (the batch stays in the broker).",
    )
    allow_eviction: bool = _setting(
        "EVENT_BUFFER_ALLOW_EVICTION",
        False,
        _bool,
        "`true`: a worker starts although the buffer's or the broker's Redis has a "
        "`maxmemory-policy` other than `noeviction` (it then deletes keys at `maxmemory`: "
        "events lost); by default such a worker stops at start-up with one line.",
    )
    broker_url: str = _setting(
        "CELERY_BROKER_URL",
        "",
        _url(*BROKER_SCHEMES),
        "Celery broker; empty means the same as `REDIS_URL`. `amqp://` for RabbitMQ.",
    )
    clickhouse_url: str = _setting(
        "CLICKHOUSE_URL",
        "chdb://data/clickhouse",
        _url(*CLICKHOUSE_SCHEMES),
        "`chdb:///abs/path` or `chdb://rel/path` (embedded, default), "
        "`clickhouse://user:pw@host:9000/db` or `clickhouses://` (native protocol, TLS).",
    )
    key_prefix: str = _setting(
        "EVENT_BUFFER_KEY_PREFIX",
        "eventbuffer",
        _text,
        "Prefix of every Redis key, so several deployments can share one Redis.",
    )
    batch_size: int = _setting(
        "EVENT_BUFFER_BATCH_SIZE",
        20_000,
        _int(1),
        "Events claimed from a shard's queue per flush batch.",
    )
    chunk_size: int = _setting(
        "EVENT_BUFFER_CHUNK_SIZE",
        20_000,
        _int(1),
        "Rows per ClickHouse INSERT within a batch (each with its own dedup token).",
    )
    max_batches_per_flush: int = _setting(
        "EVENT_BUFFER_MAX_BATCHES_PER_FLUSH",
        1,
        _int(1),
        "Batches one `process_buffer` run may flush per shard (1 = OpenPanel's behaviour).",
    )
    dlq_max_ratio: float = _setting(
        "EVENT_BUFFER_DLQ_MAX_RATIO",
        0.5,
        _float(0.0, 1.0),
        "When ClickHouse rejects more than this share of a batch's rows (10 rows at least), "
        "the flush stops with an error instead of dead-lettering them (schema mismatch?); 1 = off.",
    )
    micro_batch_ms: int = _setting(
        "EVENT_BUFFER_MICRO_BATCH_MS",
        10,
        _int(0),
        "Producer client: send a batch at the latest this long after its first event.",
    )
    micro_batch_size: int = _setting(
        "EVENT_BUFFER_MICRO_BATCH_SIZE",
        100,
        _int(1),
        "Producer client: send a batch as soon as it holds this many events.",
    )
    publish_throttle_ms: int = _setting(
        "EVENT_BUFFER_PUBLISH_THROTTLE_MS",
        1000,
        _int(0),
        "At most one `events:received` publish per process per this many ms.",
    )
    lock_ttl_s: int = _setting(
        "EVENT_BUFFER_LOCK_TTL_S",
        15,
        _int(1),
        "Lifetime of a shard's flush lock: its holder's watchdog extends it every third of "
        "this; unextended for two thirds of it, the next flusher takes it over (at once when "
        "the holder's process is gone from this host).",
    )
    screen_view_ttl_s: int = _setting(
        "EVENT_BUFFER_SCREEN_VIEW_TTL_S",
        3600,
        _int(1),
        "How long a shard keeps its sessions' last screen_views after its last screen_view "
        "(a safety net: the sweep queues every idle session's view well before).",
    )
    active_visitor_window_s: int = _setting(
        "EVENT_BUFFER_ACTIVE_VISITOR_WINDOW_S",
        300,
        _int(1),
        "A profile counts as an active visitor this long after its last event.",
    )
    batch_marker_ttl_s: int = _setting(
        "EVENT_BUFFER_BATCH_MARKER_TTL_S",
        3600,
        _int(1),
        "How long an applied batch id is remembered, so a redelivered batch is skipped "
        "(must exceed the visibility timeout and 1.2 times the consumer timeout).",
    )
    session_timeout_s: int = _setting(
        "EVENT_BUFFER_SESSION_TIMEOUT_S",
        1800,
        _int(1),
        "A session idle this long has its last screen_view queued by the sweep "
        "(must be below the screen_view TTL minus the sweep interval).",
    )
    reorder_window_ms: int = _setting(
        "EVENT_BUFFER_REORDER_WINDOW_MS",
        500,
        _int(0),
        "screen_views and session_ends wait this long after they arrive, so that events of "
        "their session applied out of order by concurrent workers are put in created_at "
        "order first (0: applied at once in arrival order, as OpenPanel's buffer does).",
    )
    closed_session_ttl_s: int = _setting(
        "EVENT_BUFFER_CLOSED_SESSION_TTL_S",
        600,
        _int(1),
        "With a reorder window, how long a session closed by its session_end is remembered, "
        "so a view arriving later still is queued at once instead of waiting for the sweep.",
    )
    sweep_interval_s: int = _setting(
        "EVENT_BUFFER_SWEEP_INTERVAL_S",
        60,
        _int(1),
        "Celery Beat runs `eventbuffer.sweep` (idle sessions, stale visitors) this often.",
    )
    shards: int = _setting(
        "EVENT_BUFFER_SHARDS",
        1,
        _int(1),
        "Buffer shards; events are routed by session_id and each shard flushes under its own lock.",
    )
    flush_interval_s: int = _setting(
        "EVENT_BUFFER_FLUSH_INTERVAL_S",
        10,
        _int(1),
        "Celery Beat runs `process_buffer` this often (OpenPanel's cron interval).",
    )
    retry_backoff_max_s: int = _setting(
        "EVENT_BUFFER_RETRY_BACKOFF_MAX_S",
        300,
        _int(1),
        "After ClickHouse failures a shard's flushes wait 2 s, 4 s, 8 s ... up to this long.",
    )
    high_water: int = _setting(
        "EVENT_BUFFER_HIGH_WATER",
        12000,
        _int(1),
        "When a shard's queue passes this, ingest asks for a flush at once (one pending at most).",
    )
    max_event_bytes: int = _setting(
        "EVENT_BUFFER_MAX_EVENT_BYTES",
        65536,
        _int(256),
        "An event larger than this as a JSON row is refused (dead-lettered at ingest).",
    )
    max_message_bytes: int | None = _setting(
        "EVENT_BUFFER_MAX_MESSAGE_BYTES",
        None,
        _int(65536),
        "A broker message larger than this is not decoded: the reliable transport parks its "
        "first bytes (`_eventbuffer.broker.unparsable`); whole-batch dead letters are cut to it. "
        "Empty: 16 MiB, or what a producer's fullest batch needs if more "
        "(`EVENT_BUFFER_MICRO_BATCH_SIZE` x `EVENT_BUFFER_MAX_EVENT_BYTES`, x 4/3 for base64).",
    )
    max_future_s: int = _setting(
        "EVENT_BUFFER_MAX_FUTURE_S",
        86400,
        _int(0),
        "An event whose `created_at` or `imported_at` is further ahead of now is refused.",
    )
    max_past_days: int = _setting(
        "EVENT_BUFFER_MAX_PAST_DAYS",
        3650,
        _int(1),
        "An event whose `created_at` or `imported_at` is older than this many days is refused.",
    )
    visibility_timeout_s: int = _setting(
        "EVENT_BUFFER_VISIBILITY_TIMEOUT_S",
        300,
        _int(1),
        "Redis broker on kombu's stock transport: an unacknowledged task is redelivered "
        "after this long.",
    )
    broker_transport: str = _setting(
        "EVENT_BUFFER_BROKER_TRANSPORT",
        "reliable",
        _choice("reliable", "kombu"),
        "How eventbuffer's workers consume a Redis broker: `reliable` (a task stays in Redis "
        "until acknowledged; senders are unchanged) or `kombu` (the stock transport, which "
        "can lose the task a killed worker was receiving).",
    )
    consumer_timeout_s: int = _setting(
        "EVENT_BUFFER_CONSUMER_TIMEOUT_S",
        30,
        _int(1),
        "Reliable transport: a worker whose heartbeat is this old is dead, and a live worker "
        "puts its unacknowledged tasks back (within 1.2 times this).",
    )
    result_backend: str = _setting(
        "CELERY_RESULT_BACKEND",
        "",
        _url(*REDIS_SCHEMES),
        "Where `process_buffer` summaries are kept; empty means `REDIS_URL` (with "
        "`EVENT_BUFFER_REDIS_CLUSTER`: no results are kept).",
    )
    clickhouse_table: str = _setting(
        "EVENT_BUFFER_TABLE",
        "events",
        _identifier,
        "ClickHouse table the events are written to.",
    )
    clickhouse_connect_timeout_s: int = _setting(
        "EVENT_BUFFER_CLICKHOUSE_CONNECT_TIMEOUT_S",
        10,
        _int(1),
        "Native protocol: how long opening a connection to ClickHouse may take before the "
        "flush fails and is retried (a `connect_timeout` in `CLICKHOUSE_URL` wins).",
    )
    clickhouse_insert_timeout_s: int = _setting(
        "EVENT_BUFFER_CLICKHOUSE_INSERT_TIMEOUT_S",
        120,
        _int(1),
        "How long one INSERT may run (ClickHouse's `max_execution_time`, both backends) and, "
        "over the native protocol, wait for each answer of the server (a "
        "`send_receive_timeout` in `CLICKHOUSE_URL` wins); then the flush fails and is retried.",
    )
    flush_stall_s: int = _setting(
        "EVENT_BUFFER_FLUSH_STALL_S",
        180,
        _int(1),
        "A flush that made no progress (no chunk inserted, no batch acknowledged) for this "
        "long stops extending its lock, so another flusher takes the shard over (must exceed "
        "the connect and insert timeouts together).",
    )
    metrics_port: int = _setting(
        "EVENT_BUFFER_METRICS_PORT",
        0,
        _port,
        "Workers serve Prometheus metrics over HTTP on this port; 0 = off.",
    )
    metrics_address: str = _setting(
        "EVENT_BUFFER_METRICS_ADDRESS",
        "127.0.0.1",
        _ip_address,
        "Address the metrics endpoint listens on: `127.0.0.1` (this host only), `0.0.0.0` "
        "(every interface: a Prometheus on another host, or a container's published "
        "port) or one interface's IP address.",
    )
    metrics_top_projects: int = _setting(
        "EVENT_BUFFER_METRICS_TOP_PROJECTS",
        20,
        _int(0),
        "Active-visitor gauges: this many projects by visitors get their own series; "
        'the rest are summed as `project="__other__"`.',
    )
    log_format: str = _setting(
        "EVENT_BUFFER_LOG_FORMAT",
        "console",
        _choice("console", "json"),
        "Worker and Beat logs: `console` (Celery's text lines) or `json` (one object per line).",
    )
    retention_days: int = _setting(
        "EVENT_BUFFER_RETENTION_DAYS",
        0,
        _int(0),
        "Rows are deleted this many days after their `created_at` (the table's TTL, set by "
        "`eventbuffer migrate`); ingest dead-letters older events (`past_retention`). "
        "0: kept forever.",
    )
    forget_tombstone_days: int = _setting(
        "EVENT_BUFFER_FORGET_TOMBSTONE_DAYS",
        30,
        _int(1),
        "`eventbuffer forget` leaves a tombstone this many days: events of the forgotten "
        "person created up to the request that arrive meanwhile (from the broker, a "
        "producer's retries, a replay) are dropped at ingest and before every insert.",
    )
    import_chunk_rows: int = _setting(
        "EVENT_BUFFER_IMPORT_CHUNK_ROWS",
        50_000,
        _int(1),
        "`eventbuffer import`: rows per ClickHouse INSERT (each checked for ids already there, "
        "with its own dedup token).",
    )
    import_dir: str = _setting(
        "EVENT_BUFFER_IMPORT_DIR",
        "data/imports",
        _text,
        "`eventbuffer import`: where each import keeps its state, rejected lines and summary "
        "(a directory per set of arguments).",
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from `environ` (default: `os.environ`).

        Unset or empty variables take their defaults.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(f.metadata["env"], "")
            if raw.strip():
                values[f.name] = f.metadata["parse"](f.metadata["env"], raw)
        settings = cls(**values)
        settings._check_together()
        return settings

    def _check_together(self) -> None:
        """Rules that tie settings to each other."""
        if "{" in self.key_prefix or "}" in self.key_prefix:
            raise SettingsError(
                f"EVENT_BUFFER_KEY_PREFIX must not contain '{{' or '}}' (it goes inside the "
                f"Redis Cluster hash tag), got {self.key_prefix!r}"
            )
        if self.session_timeout_s + self.sweep_interval_s >= self.screen_view_ttl_s:
            raise SettingsError(
                "EVENT_BUFFER_SESSION_TIMEOUT_S + EVENT_BUFFER_SWEEP_INTERVAL_S "
                f"({self.session_timeout_s} + {self.sweep_interval_s}) must be below "
                f"EVENT_BUFFER_SCREEN_VIEW_TTL_S ({self.screen_view_ttl_s}), or a quiet "
                "session's last view expires before the sweep queues it"
            )
        if self.batch_marker_ttl_s <= self.consumer_timeout_s * 1.2:
            raise SettingsError(
                f"EVENT_BUFFER_BATCH_MARKER_TTL_S ({self.batch_marker_ttl_s}) must exceed 1.2 x "
                f"EVENT_BUFFER_CONSUMER_TIMEOUT_S ({self.consumer_timeout_s}), or a "
                "redelivered batch could be applied twice"
            )
        if self.batch_marker_ttl_s <= self.visibility_timeout_s:
            raise SettingsError(
                f"EVENT_BUFFER_BATCH_MARKER_TTL_S ({self.batch_marker_ttl_s}) must exceed "
                f"EVENT_BUFFER_VISIBILITY_TIMEOUT_S ({self.visibility_timeout_s}), or a "
                "redelivered batch could be applied twice"
            )
        chunk_bound = self.clickhouse_connect_timeout_s + self.clickhouse_insert_timeout_s
        if self.flush_stall_s <= chunk_bound:
            raise SettingsError(
                f"EVENT_BUFFER_FLUSH_STALL_S ({self.flush_stall_s}) must exceed "
                "EVENT_BUFFER_CLICKHOUSE_CONNECT_TIMEOUT_S + "
                f"EVENT_BUFFER_CLICKHOUSE_INSERT_TIMEOUT_S ({self.clickhouse_connect_timeout_s} + "
                f"{self.clickhouse_insert_timeout_s}), or a flush waiting on an INSERT within its "
                "timeouts loses its shard to another flusher"
            )
        if self.redis_cluster:
            self._check_cluster()

    def _check_cluster(self) -> None:
        """kombu has no Redis Cluster transport, and Celery's Redis result backend speaks to
        one Redis: with the buffer on a cluster, both must be named apart from it."""
        both = (
            "with EVENT_BUFFER_REDIS_CLUSTER=true, CELERY_BROKER_URL must name RabbitMQ "
            "(amqp://) or a plain Redis that is not a cluster node, and CELERY_RESULT_BACKEND "
            "a plain Redis (or stay empty: no results are kept)"
        )
        url = urlsplit(self.redis_url)
        if url.scheme not in ("redis", "rediss"):
            raise SettingsError(
                "REDIS_URL must be redis:// or rediss:// with EVENT_BUFFER_REDIS_CLUSTER=true "
                "(redis-py's cluster client has no unix sockets)"
            )
        if url.path.strip("/") not in ("", "0"):
            raise SettingsError(
                "REDIS_URL must name database 0 (or none) with EVENT_BUFFER_REDIS_CLUSTER=true: "
                "a Redis Cluster has no other database"
            )
        if not self.broker_url:
            raise SettingsError(f"CELERY_BROKER_URL is empty: {both}")
        if _same_server(self.broker_url, self.redis_url):
            raise SettingsError(f"CELERY_BROKER_URL names the cluster of REDIS_URL: {both}")
        if self.result_backend and _same_server(self.result_backend, self.redis_url):
            raise SettingsError(f"CELERY_RESULT_BACKEND names the cluster of REDIS_URL: {both}")

    @property
    def message_limit_bytes(self) -> int:
        """EVENT_BUFFER_MAX_MESSAGE_BYTES, or when unset the larger of 16 MiB and a full batch
        of the largest events a producer may send, as kombu's base64 body, with room to spare."""
        if self.max_message_bytes is not None:
            return self.max_message_bytes
        fullest_batch = self.micro_batch_size * self.max_event_bytes * 4 // 3
        return max(DEFAULT_MESSAGE_LIMIT_BYTES, fullest_batch + (1 << 20))

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or self.redis_url

    @property
    def effective_result_backend(self) -> str:
        """Celery's result backend; "" keeps no results (a cluster buffer without one)."""
        if self.redis_cluster:
            return self.result_backend
        return self.result_backend or self.redis_url

    @property
    def flush_time_limit_s(self) -> tuple[int, int]:
        """(soft, hard) time limit of one `process_buffer` run, in seconds.

        The soft limit is what a run takes when every INSERT it may send (each
        shard's batches, each batch's chunks) waits out its connect and insert
        timeouts, plus one lock TTL for the Redis work: a run past it is stuck,
        not slow. Celery raises `SoftTimeLimitExceeded` into the task then (the
        lock is released, the claim stays open for a re-drive); a process
        stuck where Python cannot interrupt it (inside chDB, a C call) is
        killed at the hard limit, and its lock, naming a dead process, is
        taken over at once.
        """
        chunks = -(-self.batch_size // self.chunk_size)
        inserts = self.shards * self.max_batches_per_flush * chunks
        per_insert = self.clickhouse_connect_timeout_s + self.clickhouse_insert_timeout_s
        soft = inserts * per_insert + self.lock_ttl_s
        return soft, soft + HARD_TIME_LIMIT_MARGIN_S

    @property
    def effective_min_replicas(self) -> int:
        """Replicas a write must reach before it counts (0: no WAIT)."""
        if self.min_replicas is not None:
            return self.min_replicas
        return 1 if self.redis_cluster else 0

    @classmethod
    def markdown_table(cls) -> str:
        """The README's configuration table (a test keeps the two equal)."""
        lines = ["| Variable | Default | Meaning |", "| --- | --- | --- |"]
        for env, default, help_text in cls.describe():
            shown = f"`{default}`" if default else "(empty)"
            lines.append(f"| `{env}` | {shown} | {help_text} |")
        return "\n".join(lines)

    @classmethod
    def describe(cls) -> Iterator[tuple[str, str, str]]:
        """(variable, default, help) for every setting, in declaration order."""
        for f in dataclasses.fields(cls):
            default = "" if f.default is None else str(f.default)
            if isinstance(f.default, bool):
                default = default.lower()
            yield f.metadata["env"], default, f.metadata["help"]


def _same_server(url: str, other: str) -> bool:
    """Do two Redis URLs name the same host and port (whatever the database)?"""
    a, b = urlsplit(url), urlsplit(other)
    if a.scheme not in REDIS_SCHEMES or b.scheme not in REDIS_SCHEMES:
        return False
    return (a.hostname, a.port or 6379) == (b.hostname, b.port or 6379)
