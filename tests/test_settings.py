"""Settings: parsed once, malformed values named."""

from __future__ import annotations

import pytest

from worker.celery import create_app
from worker.names import TASK_PROCESS_BUFFER
from worker.settings import Settings, SettingsError


def test_defaults_match_openpanel() -> None:
    s = Settings.from_env({})
    # The claim and chunk sizes are chosen from measurement (README, "The flush
    # against the best raw insert"), not OpenPanel's 4,000 x 1,000.
    assert (s.batch_size, s.chunk_size) == (20_000, 20_000)
    assert (s.micro_batch_ms, s.micro_batch_size) == (10, 100)
    assert (s.publish_throttle_ms, s.lock_ttl_s, s.screen_view_ttl_s) == (1000, 15, 3600)
    assert (s.active_visitor_window_s, s.shards) == (300, 1)
    assert s.clickhouse_url == "chdb://data/clickhouse"
    assert s.effective_broker_url == s.redis_url


def test_values_are_read_from_the_environment() -> None:
    s = Settings.from_env(
        {
            "EVENT_BUFFER_BATCH_SIZE": " 10 ",
            "EVENT_BUFFER_SHARDS": "4",
            "REDIS_URL": "rediss://:pw@cache:6380/1",
            "CELERY_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//",
            "CLICKHOUSE_URL": "clickhouse://u:p@ch:9000/analytics",
            "EVENT_BUFFER_SCREEN_VIEW_TTL_S": "",
        }
    )
    assert (s.batch_size, s.shards, s.screen_view_ttl_s) == (10, 4, 3600)
    assert s.effective_broker_url.startswith("amqp://")


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("EVENT_BUFFER_BATCH_SIZE", "lots", "EVENT_BUFFER_BATCH_SIZE must be an integer"),
        ("EVENT_BUFFER_CHUNK_SIZE", "0", "EVENT_BUFFER_CHUNK_SIZE must be >= 1"),
        ("EVENT_BUFFER_SHARDS", "1.5", "EVENT_BUFFER_SHARDS must be an integer"),
        ("REDIS_URL", "localhost:6379", "REDIS_URL must start with one of"),
        ("CLICKHOUSE_URL", "http://ch:8123", "CLICKHOUSE_URL must start with one of"),
        (
            "EVENT_BUFFER_BROKER_TRANSPORT",
            "fast",
            "EVENT_BUFFER_BROKER_TRANSPORT must be one of reliable, kombu",
        ),
        ("EVENT_BUFFER_CONSUMER_TIMEOUT_S", "0", "EVENT_BUFFER_CONSUMER_TIMEOUT_S must be >= 1"),
        # URLs are checked whole: a worker would otherwise die on them later.
        ("REDIS_URL", "redis://127.0.0.1:6380/abc", "REDIS_URL's database must be a number"),
        ("REDIS_URL", "redis://127.0.0.1:99999/0", "REDIS_URL has a bad port"),
        ("REDIS_URL", "unix:///tmp/r.sock?db=x", "REDIS_URL cannot be used: Invalid value"),
        ("CELERY_BROKER_URL", "amqp://guest@rabbit:56x2//", "CELERY_BROKER_URL has a bad port"),
        ("CLICKHOUSE_URL", "clickhouse://ch:nine/default", "CLICKHOUSE_URL has a bad port"),
        ("CELERY_RESULT_BACKEND", "redis://h:6379/results", "database must be a number"),
        # What a worker's first flush (or only the CLI) used to find out.
        ("CLICKHOUSE_URL", "clickhouse://ch:0/default", "CLICKHOUSE_URL has a bad port"),
        ("CLICKHOUSE_URL", "clickhouse://[::1/default", "CLICKHOUSE_URL cannot be read as a URL"),
        (
            "CLICKHOUSE_URL",
            "clickhouse://ch:9000/default?connect_timeout=soon",
            "CLICKHOUSE_URL cannot be used: could not convert",
        ),
        ("CLICKHOUSE_URL", "clickhouses://ch/default?secure=maybe", "CLICKHOUSE_URL cannot be"),
        ("CLICKHOUSE_URL", "clickhouse://ch/my-db", "database must be a ClickHouse"),
        ("CLICKHOUSE_URL", "chdb://", "CLICKHOUSE_URL: a chdb:// URL needs a path"),
        ("EVENT_BUFFER_TABLE", "events; DROP", "must be a ClickHouse identifier"),
    ],
)
def test_malformed_values_name_the_variable(name: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings.from_env({name: value})


def test_settings_are_frozen() -> None:
    s = Settings.from_env({})
    with pytest.raises(AttributeError):
        s.batch_size = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"EVENT_BUFFER_SCREEN_VIEW_TTL_S": "600"}, "must be below EVENT_BUFFER_SCREEN_VIEW_TTL_S"),
        ({"EVENT_BUFFER_KEY_PREFIX": "app{1}"}, "EVENT_BUFFER_KEY_PREFIX must not contain"),
        (
            {"EVENT_BUFFER_BATCH_MARKER_TTL_S": "60"},
            r"EVENT_BUFFER_BATCH_MARKER_TTL_S \(60\) must exceed EVENT_BUFFER_VISIBILITY_TIMEOUT",
        ),
        (
            {"EVENT_BUFFER_BATCH_MARKER_TTL_S": "400", "EVENT_BUFFER_CONSUMER_TIMEOUT_S": "350"},
            r"\(400\) must exceed 1.2 x EVENT_BUFFER_CONSUMER_TIMEOUT_S \(350\)",
        ),
        (
            {"EVENT_BUFFER_FLUSH_STALL_S": "130"},
            r"EVENT_BUFFER_FLUSH_STALL_S \(130\) must exceed EVENT_BUFFER_CLICKHOUSE_CONNECT_"
            r"TIMEOUT_S \+ EVENT_BUFFER_CLICKHOUSE_INSERT_TIMEOUT_S \(10 \+ 120\)",
        ),
    ],
)
def test_settings_that_contradict_each_other_are_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(env)


def test_a_cluster_buffer_wants_a_replica_a_broker_of_its_own_and_no_cluster_results() -> None:
    cluster = {"EVENT_BUFFER_REDIS_CLUSTER": "true", "REDIS_URL": "redis://:pw@node-1:7000"}
    s = Settings.from_env({**cluster, "CELERY_BROKER_URL": "amqp://guest@rabbit//"})
    assert s.redis_cluster and s.effective_min_replicas == 1
    assert s.effective_result_backend == ""  # results off, not on the cluster
    assert Settings.from_env({}).effective_min_replicas == 0  # one Redis: no WAIT
    explicit = Settings.from_env(
        {**cluster, "CELERY_BROKER_URL": "redis://broker:6379/0", "EVENT_BUFFER_MIN_REPLICAS": "0"}
    )
    assert explicit.effective_min_replicas == 0
    for env, named in (
        ({"CELERY_BROKER_URL": ""}, "CELERY_BROKER_URL is empty"),
        ({"CELERY_BROKER_URL": "redis://:pw@node-1:7000/1"}, "CELERY_BROKER_URL names"),
        (
            {"CELERY_BROKER_URL": "amqp://r//", "CELERY_RESULT_BACKEND": "redis://node-1:7000"},
            "CELERY_RESULT_BACKEND names",
        ),
        ({"CELERY_BROKER_URL": "amqp://r//", "REDIS_URL": "unix:///tmp/r.sock"}, "REDIS_URL"),
        ({"CELERY_BROKER_URL": "amqp://r//", "REDIS_URL": "redis://node-1:7000/3"}, "database 0"),
    ):
        with pytest.raises(SettingsError) as refused:
            Settings.from_env({**cluster, **env})
        assert named in str(refused.value)
        assert "CELERY_BROKER_URL" in str(refused.value) or "REDIS_URL" in str(refused.value)
    with pytest.raises(SettingsError, match="EVENT_BUFFER_REDIS_CLUSTER must be true or false"):
        Settings.from_env({"EVENT_BUFFER_REDIS_CLUSTER": "maybe"})


def test_clickhouse_timeouts_bound_a_flush_and_its_task() -> None:
    """A hung ClickHouse fails an INSERT after its timeouts; a flush without progress for
    longer gives its lock up; a process_buffer run stuck past every INSERT's timeouts is
    interrupted (soft limit), then killed (hard limit)."""
    s = Settings.from_env({})
    assert (s.clickhouse_connect_timeout_s, s.clickhouse_insert_timeout_s) == (10, 120)
    assert s.flush_stall_s == 180
    # 1 chunk of 20,000 in a claim of 20,000, 1 batch, 1 shard: 1 INSERT of up to 130 s.
    assert s.flush_time_limit_s == (130 + 15, 130 + 15 + 30)
    wide = Settings.from_env(
        {
            "EVENT_BUFFER_SHARDS": "2",
            "EVENT_BUFFER_MAX_BATCHES_PER_FLUSH": "3",
            "EVENT_BUFFER_BATCH_SIZE": "2500",
            "EVENT_BUFFER_CHUNK_SIZE": "1000",
            "EVENT_BUFFER_CLICKHOUSE_CONNECT_TIMEOUT_S": "1",
            "EVENT_BUFFER_CLICKHOUSE_INSERT_TIMEOUT_S": "4",
            "EVENT_BUFFER_FLUSH_STALL_S": "6",
        }
    )
    assert wide.flush_time_limit_s == (2 * 3 * 3 * 5 + 15, 2 * 3 * 3 * 5 + 15 + 30)

    app = create_app(wide)
    app.loader.import_default_modules()
    task = app.tasks[TASK_PROCESS_BUFFER]
    assert (task.soft_time_limit, task.time_limit) == wide.flush_time_limit_s


def test_a_bad_url_is_refused_without_its_password() -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({"REDIS_URL": "redis://:s3cr@t@127.0.0.1:port/0"})
    assert "s3cr" not in str(raised.value) and "t@127" not in str(raised.value)
    assert "127.0.0.1:port" in str(raised.value)
