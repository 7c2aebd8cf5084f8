"""A ClickHouse server over the native TCP protocol, through clickhouse-driver.

URL: `clickhouse://user:password@host:9000/database` (`clickhouses://` for
TLS, default port 9440, certificates verified unless `?verify=false`; other
query parameters such as `ca_certs`, `connect_timeout` or `compression` are
passed to clickhouse-driver as it documents).

Rows are decoded and sent as one columnar block. The table is described once
per sink so that only the columns it has are sent, each converted to what its
type needs: the same code writes the full `events` schema and older, narrower
tables.

Writing to a `Distributed` table (the engine is read from system.tables when
the table is described) adds `insert_distributed_sync=1` (an alias of
`distributed_foreground_insert` since 23.x): the INSERT returns only once
every shard has stored its rows, each shard receiving the chunk's token with
its part of the chunk, so a failure on any shard fails the write and the
re-drive repeats it with the same token. `migrate(cluster=NAME)` applies the
migrations `ON CLUSTER` (Replicated local tables under the Distributed table).

Deduplication of re-driven flushes rests on `insert_deduplication_token`
(ClickHouse 22.2+). clickhouse-driver drops settings an old server does not
know with only a log warning, so the sink checks the server version itself and
refuses to write to an older server unless `require_dedup=False`.
"""

from __future__ import annotations

import os
import re
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from operator import attrgetter
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import msgspec
from clickhouse_driver import Client, errors
from clickhouse_driver.util.helpers import parse_url

from worker.errors import SettingsError
from worker.events import Row, datetime_ms
from worker.sinks import migrations
from worker.sinks.base import (
    INTERRUPTS,
    PermanentSinkError,
    RetryableSinkError,
    RowRejectedError,
    SinkError,
    classify,
)
from worker.sinks.migrations import Report
from worker.sinks.schema import COLUMNS, create_database, identifier

DEDUP_MIN_VERSION = (22, 2)

_events_decoder = msgspec.json.Decoder(list[Row])
_EVENT_FIELDS = frozenset(Row.__struct_fields__)

# What each Row field holds after decoding; any field not listed is a str.
_FIELD_KINDS = {
    "id": "uuid",
    "properties": "map",
    "created_at": "datetime",
    "imported_at": "datetime",
    "longitude": "float",
    "latitude": "float",
    "duration": "int",
}
_OPTIONAL_FIELDS = frozenset({"longitude", "latitude", "imported_at"})

_STRING = re.compile(r"^(?:String|FixedString\(\d+\))$")
_DATETIME = re.compile(r"^DateTime(?:\(\s*'[^']*'\s*\))?$")
_DATETIME64 = re.compile(r"^DateTime64\(\s*(\d+)\s*(?:,\s*'[^']*'\s*)?\)$")
_MAP = re.compile(r"^Map\((.*)\)$")
_INT = re.compile(r"^U?Int(?:8|16|32|64|128|256)$")
_FLOAT = re.compile(r"^Float(?:32|64)$")

Convert = Callable[[Any], Any]
# A column's conversion: its values in, what the driver takes out.
ConvertColumn = Callable[[list[Any]], list[Any]]


def _unwrap(ch_type: str) -> tuple[str, bool]:
    """Strip LowCardinality(...) and Nullable(...): (base type, nullable)."""
    nullable = False
    while True:
        if ch_type.startswith("LowCardinality(") and ch_type.endswith(")"):
            ch_type = ch_type[len("LowCardinality(") : -1]
        elif ch_type.startswith("Nullable(") and ch_type.endswith(")"):
            ch_type = ch_type[len("Nullable(") : -1]
            nullable = True
        else:
            return ch_type, nullable


def _is_string(ch_type: str) -> bool:
    return bool(_STRING.match(_unwrap(ch_type)[0]))


def _is_string_map(base: str) -> bool:
    match = _MAP.match(base)
    # String-ish key and value types contain no commas, so a plain split is enough.
    parts = match.group(1).split(",") if match else []
    return len(parts) == 2 and all(_is_string(part.strip()) for part in parts)


def _ticks(scale: int) -> Convert:
    # Raw epoch integers are exact, and clickhouse-driver passes them through
    # instead of running its per-value pytz conversion of datetime objects.
    factor: int = 10**scale

    def convert(text: str) -> int:
        return datetime_ms(text) * factor // 1000

    return convert


def _uuids(values: list[Any]) -> list[Any]:
    """Ids as uuid.UUID objects, parsed by msgspec in C: the driver then takes each
    one's 128 bits as they are instead of parsing every text in Python."""
    try:
        converted: list[Any] = msgspec.convert(values, list[uuid.UUID])
    except msgspec.ValidationError as exc:
        raise RowRejectedError(f"a row's id cannot be stored: {exc}", 376) from exc
    return converted


def _each(convert: Convert) -> ConvertColumn:
    return lambda values: [convert(value) for value in values]


def _converter(field: str, ch_type: str) -> ConvertColumn | None:
    """How to turn the Row values of `field` into what a `ch_type` column takes
    (None: as they are)."""
    if field == "id" and _unwrap(ch_type) == ("UUID", False):
        return _uuids
    convert = _value_converter(field, ch_type)
    return None if convert is None else _each(convert)


def _value_converter(field: str, ch_type: str) -> Convert | None:
    """How to turn the Row value of `field` into what a `ch_type` column takes.

    None means "as is". A type that cannot hold the field is a schema problem,
    not the rows' fault, so it fails the whole sink rather than each row.
    """
    base, nullable = _unwrap(ch_type)
    kind = _FIELD_KINDS.get(field, "str")
    convert: Convert | None
    if _STRING.match(base) and kind in ("str", "uuid", "datetime"):
        convert = None
    elif base == "UUID" and kind == "uuid":
        convert = None  # the driver parses UUID strings itself
    elif kind == "datetime" and (scale := _DATETIME64.match(base)):
        convert = _ticks(int(scale.group(1)))
    elif kind == "datetime" and _DATETIME.match(base):
        convert = _ticks(0)
    elif (
        (kind == "map" and _is_string_map(base))
        or (kind == "float" and _FLOAT.match(base))
        or (kind == "int" and _INT.match(base))
    ):
        convert = None
    else:
        raise PermanentSinkError(
            f"column {field} has type {ch_type}, which cannot hold Row.{field}"
        )

    if field not in _OPTIONAL_FIELDS:
        return convert
    # A null into a non-Nullable column stores the type's default, as
    # ClickHouse itself does for JSONEachRow input.
    null: Any = None if nullable else "" if _STRING.match(base) else 0
    if convert is None:
        return lambda value: null if value is None else value
    inner = convert
    return lambda value: null if value is None else inner(value)


class NativeSink:
    """Writes JSON rows to a ClickHouse server as columnar native-protocol blocks."""

    def __init__(
        self,
        url: str,
        table: str = "events",
        *,
        async_insert: bool = False,
        require_dedup: bool = True,
        connect_timeout_s: float | None = None,
        insert_timeout_s: float | None = None,
    ) -> None:
        """`async_insert=True` makes the server buffer the insert (waiting for it
        to be flushed, deduplicated by token). `require_dedup=False` allows a
        server older than 22.2: re-driven batches may then duplicate rows. For
        legacy servers and tests only.

        `connect_timeout_s` bounds opening the connection; `insert_timeout_s`
        bounds each wait for the server (clickhouse-driver's
        `send_receive_timeout`, 300 s unless told) and is the server's
        `max_execution_time` for an INSERT, so a frozen or hung server fails
        the write as retryable instead of holding the flush. The URL's own
        `connect_timeout` or `send_receive_timeout` wins over them; None keeps
        clickhouse-driver's defaults.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("clickhouse", "clickhouses"):
            raise SettingsError("a native sink URL starts with clickhouse:// or clickhouses://")
        self.table = table
        self.database = unquote(parts.path[1:]) or "default"
        self.async_insert = async_insert
        self.require_dedup = require_dedup
        self._target = f"{identifier(self.database)}.{identifier(table)}"
        secure = parts.scheme == "clickhouses"
        self._where = f"{parts.hostname}:{parts.port or (9440 if secure else 9000)}"
        raw_password = parts.password or ""
        self._secrets = sorted(
            {raw_password, unquote(raw_password), quote(unquote(raw_password), safe="")} - {""},
            key=len,
            reverse=True,
        )
        self._host, self._options = parse_url(url)
        for option, value in (
            ("connect_timeout", connect_timeout_s),
            ("send_receive_timeout", insert_timeout_s),
            # The ping before a query on an idle connection (5 s unless told).
            ("sync_request_timeout", insert_timeout_s and min(5, insert_timeout_s)),
        ):
            if value is not None:
                self._options.setdefault(option, value)
        self.insert_timeout_s = insert_timeout_s
        self._client: Any = None
        self._pid = 0
        self._version: tuple[int, int] | None = None
        self._columns: list[tuple[str, ConvertColumn | None]] | None = None
        self._distributed = False  # read with the columns
        # clickhouse-driver's Client is not thread-safe.
        self._lock = threading.RLock()

    def write(self, rows: Sequence[bytes], token: str) -> None:
        if not rows:
            return
        events = self._decode(rows)
        with self._lock:
            try:
                with self._errors():
                    client = self._connected()
                    columns = self._table_columns(client)
                    settings = self._insert_settings(token)
                data = self._column_data(columns, events)
                names = ", ".join(identifier(name) for name, _ in columns)
                with self._errors():
                    client.execute(
                        f"INSERT INTO {self._target} ({names}) VALUES",
                        data,
                        columnar=True,
                        settings=settings,
                    )
            except PermanentSinkError as exc:
                if not isinstance(exc, RowRejectedError):
                    self._columns = None  # the table may have changed: describe it again
                raise

    def query(
        self, sql: str, params: dict[str, Any] | None = None, *, readonly: bool = False
    ) -> list[tuple[Any, ...]]:
        """Run `sql`; `%(name)s` placeholders are filled from `params`.

        The native protocol has no bind parameters in clickhouse-driver: it
        escapes and quotes each value into the SQL text on the client.
        `readonly`: the server runs it with `readonly = 1` and refuses any write.
        """
        return self.query_with_columns(sql, params, readonly=readonly)[1]

    def query_with_columns(
        self, sql: str, params: dict[str, Any] | None = None, *, readonly: bool = False
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Like `query`, also returning the result's column names (for the CLI)."""
        settings = {"readonly": 1} if readonly else None
        with self._lock, self._errors():
            rows, types = self._connected().execute(
                sql, params, with_column_types=True, settings=settings
            )
        return [name for name, _ in types], [tuple(row) for row in rows]

    def format_query(self, sql: str) -> str:
        [(text,)] = self.query("SELECT formatQuerySingleLine(%(sql)s)", {"sql": sql}, readonly=True)
        return str(text)

    def migrate(
        self,
        cluster: str | None = None,
        *,
        retention_days: int | None = None,
        columns: Sequence[tuple[str, str]] = COLUMNS,
        on_wait: Callable[[str], None] | None = None,
    ) -> Report:
        """Create the database, then apply the pending migrations
        (worker/sinks/migrations.py); with `cluster`, `ON CLUSTER` on every host of it."""
        # The handshake names a database and fails if it does not exist yet,
        # so create it from a session on the user's default database.
        with self._lock, self._errors():
            bootstrap = Client(self._host, **{**self._options, "database": ""})
            try:
                bootstrap.execute(
                    create_database(self.database)
                    + ("" if cluster is None else f" ON CLUSTER {identifier(cluster)}")
                )
            finally:
                bootstrap.disconnect()
        try:
            return migrations.migrate(
                self.query,
                table=self.table,
                database=self.database,
                cluster=cluster,
                retention_days=retention_days,
                columns=columns,
                on_wait=on_wait,
            )
        finally:
            self._columns = None

    @property
    def distributed(self) -> bool:
        """Whether the table is a Distributed table (known once it was described)."""
        return self._distributed

    def close(self) -> None:
        with self._lock:
            if self._client is not None and self._pid == os.getpid():
                self._client.disconnect()
            self._client = None

    def _decode(self, rows: Sequence[bytes]) -> list[Row]:
        try:
            events = _events_decoder.decode(b"[" + b",".join(rows) + b"]")
        except msgspec.DecodeError as exc:  # also msgspec.ValidationError
            raise RowRejectedError(f"row cannot be decoded as an event: {exc}") from exc
        if len(events) != len(rows):  # a malformed row holding a comma-separated pair
            raise RowRejectedError(f"{len(rows)} rows decoded as {len(events)} events")
        return events

    def _connected(self) -> Any:
        if self._client is None or self._pid != os.getpid():
            # A client inherited over fork shares the parent's socket: leave it
            # alone (disconnecting would shut the parent's connection down).
            self._client = Client(self._host, **self._options)
            self._pid = os.getpid()
        connection = self._client.connection
        if not connection.connected:
            # connect(), not force_connect(): the latter marks a query as
            # running and expects the client to run one right after it.
            connection.connect()
        if self._version is None:
            info = connection.server_info
            self._version = (info.version_major, info.version_minor)
        return self._client

    def _insert_settings(self, token: str) -> dict[str, Any]:
        assert self._version is not None
        # Every version knows these: the INSERT waits for every shard; the server
        # itself gives up on an INSERT that runs past the timeout.
        base: dict[str, Any] = {"insert_distributed_sync": 1} if self._distributed else {}
        if self.insert_timeout_s is not None:
            base["max_execution_time"] = self.insert_timeout_s
        if self._version < DEDUP_MIN_VERSION:
            if self.require_dedup:
                major, minor = self._version
                raise PermanentSinkError(
                    f"ClickHouse {major}.{minor} at {self._where} is too old for "
                    f"insert_deduplication_token; need {'.'.join(map(str, DEDUP_MIN_VERSION))}+"
                )
            # Such a server knows neither setting (and never inserts
            # asynchronously); the driver would only log "Unknown setting".
            return base
        # async_insert is always sent: from 26.2 the server turns it on by default.
        if self.async_insert:
            return {
                **base,
                "insert_deduplication_token": token,
                "async_insert": 1,
                "wait_for_async_insert": 1,
                "async_insert_deduplicate": 1,
            }
        return {**base, "insert_deduplication_token": token, "async_insert": 0}

    def _table_columns(self, client: Any) -> list[tuple[str, ConvertColumn | None]]:
        if self._columns is None:
            columns = []
            for name, ch_type, default_kind, *_ in client.execute(f"DESCRIBE TABLE {self._target}"):
                # MATERIALIZED and ALIAS columns cannot be inserted into.
                if name in _EVENT_FIELDS and default_kind not in ("MATERIALIZED", "ALIAS"):
                    columns.append((name, _converter(name, ch_type)))
            if not columns:
                raise PermanentSinkError(f"table {self._target} has no event columns")
            engine = client.execute(
                "SELECT engine FROM system.tables WHERE database = %(db)s AND name = %(table)s",
                {"db": self.database, "table": self.table},
            )
            self._distributed = bool(engine) and engine[0][0] == "Distributed"
            self._columns = columns
        return self._columns

    @staticmethod
    def _column_data(
        columns: list[tuple[str, ConvertColumn | None]], events: list[Row]
    ) -> list[list[Any]]:
        data = []
        try:
            for name, convert in columns:
                values = list(map(attrgetter(name), events))
                data.append(values if convert is None else convert(values))
        except ValueError as exc:
            # Decoding checked the types; a value that still does not convert is
            # a date that does not parse: the row's fault (the flush isolates it).
            raise RowRejectedError(f"a row's {name} cannot be stored: {exc}") from exc
        except TypeError as exc:
            # A type decoding let through: a bug in the conversion, not a bad
            # row. Stop rather than dead-letter them all.
            raise PermanentSinkError(f"cannot convert an event for {name}: {exc!r}") from exc
        return data

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Turn clickhouse-driver and socket errors into the typed sink errors."""
        try:
            yield
        except SinkError:
            raise
        except INTERRUPTS:
            self._disconnect()  # interrupted mid-answer: the socket is out of step
            raise
        except (errors.NetworkError, errors.SocketTimeoutError, EOFError, OSError) as exc:
            self._disconnect()
            raise RetryableSinkError(self._message(exc), getattr(exc, "code", None)) from exc
        except errors.Error as exc:
            # ServerException carries the server's code; the driver's own
            # checks (TypeMismatchError, TooLargeStringSize...) a fixed one.
            raise classify(self._message(exc), exc.code) from exc
        except Exception as exc:
            self._disconnect()
            raise PermanentSinkError(self._message(exc)) from exc

    def _disconnect(self) -> None:
        # The next call reconnects; a broken socket must not be reused.
        if self._client is not None and self._pid == os.getpid():
            with suppress(Exception):  # already broken: nothing left to release
                self._client.disconnect()

    def _timeout_hint(self, exc: BaseException) -> str:
        """What a timeout meant, in words and with the setting that bounds it: the driver
        says only "Code: 209" for a server that accepts and never answers."""
        text = str(exc).lower()
        if isinstance(exc, errors.SocketTimeoutError) or getattr(exc, "code", None) == 209:
            wait = self._options.get("send_receive_timeout")
            within = f" within {float(wait):g} s" if wait is not None else ""
            return (
                f": no answer from {self._where}{within} "
                "(EVENT_BUFFER_CLICKHOUSE_INSERT_TIMEOUT_S; is it ClickHouse's native port, "
                "9000/9440, and is the server alive?)"
            )
        if "unexpected packet from server" in text:
            return (
                ": is this ClickHouse's HTTP port (8123)? CLICKHOUSE_URL needs the native "
                "protocol's port: 9000, or 9440 with clickhouses://"
            )
        if "timed out" in text or isinstance(exc, TimeoutError):
            wait = self._options.get("connect_timeout")
            within = f" within {float(wait):g} s" if wait is not None else ""
            return (
                f": could not connect to {self._where}{within} "
                "(EVENT_BUFFER_CLICKHOUSE_CONNECT_TIMEOUT_S)"
            )
        return ""

    def _message(self, exc: BaseException) -> str:
        if isinstance(exc, errors.ServerException):
            # Old servers append a long stack trace to the message.
            detail = f"Code: {exc.code}. {exc.message}".split("Stack trace:", 1)[0].strip()
        elif isinstance(exc, errors.Error) and not exc.message:
            detail = f"Code: {exc.code}. {type(exc).__name__}"  # e.g. TooLargeStringSize
        else:
            detail = str(exc) or type(exc).__name__
        detail += self._timeout_hint(exc)
        message = f"ClickHouse at {self._where}: {detail}"
        for secret in self._secrets:
            message = message.replace(secret, "***")
        return message
