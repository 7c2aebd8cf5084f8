"""What the command line shows of itself: its version, help texts, and output at 80 columns."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import redis as redis_lib

from tests.conftest import Result
from tests.support.cli import (
    cli_env,
    run_cli,
    run_main_redis,
)
from worker import cli
from worker.buffer import EventBuffer
from worker.ingestion import ingest
from worker.settings import Settings


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("eventbuffer ")


def test_run_help_names_the_settings_and_where_data_goes() -> None:
    result = run_cli(["run", "--help"], cli_env())
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for needle in ("REDIS_URL", "CLICKHOUSE_URL", "./data/redis", "./data/clickhouse"):
        assert needle in text, text


def test_dlq_reason_help_lists_every_stored_reason() -> None:
    from worker.deadletters import REASONS

    result = run_cli(["dlq", "list", "--help"], cli_env(COLUMNS="200"))
    text = " ".join(result.stdout.split())
    for reason in REASONS:
        assert reason in text, reason


def test_run_banner_fits_80_columns_without_breaking_the_python_example(
    settings: Settings,
) -> None:
    from rich.console import Console

    from worker.cli.run import print_banner

    console = Console(width=80, record=True, color_system=None)
    print_banner(console, settings, None, [])
    lines = console.export_text().splitlines()
    assert all(len(line) <= 80 for line in lines), lines
    example = "\n".join(line for line in lines if line.startswith("          "))
    assert '"name": "signup",' in example and '"created_at": "2026-01-01T12:00:00Z"})' in example


def test_dlq_list_at_80_columns_keeps_each_reason_whole(
    run_main: Callable[..., Result], redis: redis_lib.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:

    buffer = EventBuffer(redis, Settings.from_env({"REDIS_URL": run_main_redis(redis)}))
    ingest(buffer, [{"name": "x" * 300}, {"project_id": "p"}], "b-80")
    monkeypatch.setenv("COLUMNS", "80")
    listing = run_main("dlq", "list")
    assert listing.code == 0, listing.err
    assert listing.out.count("invalid_event") >= 2, listing.out
    assert all(len(line) <= 80 for line in listing.out.splitlines())
