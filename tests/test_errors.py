"""Every error eventbuffer defines is an `EventBufferError`; sinks raise typed errors."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import tasks
import worker
from worker.errors import EventBufferError, IdentifierError, SettingsError
from worker.sinks import open_sink
from worker.sinks.chdb import ChdbSink, path_from_url
from worker.sinks.native import NativeSink
from worker.sinks.schema import identifier


def _modules() -> list[str]:
    names = []
    for package in (worker, tasks):
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{package.__name__}."):
            if not info.name.endswith(".__main__"):  # runs the command line
                names.append(info.name)
    return sorted(names)


def test_every_exception_class_derives_from_event_buffer_error() -> None:
    defined = {
        f"{name}.{cls.__qualname__}": cls
        for name in _modules()
        for cls in vars(importlib.import_module(name)).values()
        if inspect.isclass(cls) and issubclass(cls, BaseException) and cls.__module__ == name
    }
    assert "worker.errors.EventBufferError" in defined  # the walk sees the package
    outside = sorted(name for name, cls in defined.items() if not issubclass(cls, EventBufferError))
    assert outside == []


@pytest.mark.parametrize(
    "url", ["mysql://h/db", "clickhouse+http://h/db", "chdb:/data", "redis://h:6379/0"]
)
def test_a_sink_refuses_a_url_it_cannot_open_as_a_settings_error(url: str) -> None:
    with pytest.raises(SettingsError):
        open_sink(url)


def test_the_sinks_refuse_a_url_of_another_scheme_as_a_settings_error() -> None:
    with pytest.raises(SettingsError, match="chdb:// URL needs a path"):
        path_from_url("chdb://")
    with pytest.raises(SettingsError, match="starts with clickhouse://"):
        NativeSink("chdb://data")


@pytest.mark.parametrize("name", ["events; DROP TABLE x", "1events", "", "ev-ents", "`events`"])
def test_a_name_clickhouse_cannot_take_is_an_identifier_error(name: str) -> None:
    with pytest.raises(IdentifierError) as raised:
        identifier(name)
    assert raised.value.name == name
    assert isinstance(raised.value, EventBufferError) and isinstance(raised.value, ValueError)
    assert str(raised.value) == f"not a valid ClickHouse identifier: {name!r}"
    assert identifier("events_2") == "`events_2`"


def test_the_sinks_refuse_a_table_name_as_an_identifier_error(tmp_path: Path) -> None:
    with pytest.raises(IdentifierError, match="not a valid ClickHouse identifier"):
        NativeSink("clickhouse://127.0.0.1:1/default", table="events; DROP")
    with pytest.raises(IdentifierError, match="not a valid ClickHouse identifier"):
        ChdbSink(str(tmp_path / "clickhouse"), table="events; DROP")
