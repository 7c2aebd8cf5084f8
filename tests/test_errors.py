"""Every error eventbuffer defines is an `EventBufferError`; sinks raise typed errors."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import tasks
import worker
from worker.errors import EventBufferError, SettingsError
from worker.sinks import open_sink
from worker.sinks.chdb import path_from_url
from worker.sinks.native import NativeSink


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
