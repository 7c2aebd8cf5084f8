"""Running `eventbuffer import` in tests, and reading back what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from worker.sinks.chdb import ChdbSink, close_all, path_from_url

ROOT = Path(__file__).resolve().parents[2]


def import_env(chdb_url: str, **overrides: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("EVENT_BUFFER_", "CELERY_"))
        and k not in ("REDIS_URL", "CLICKHOUSE_URL")
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env["CLICKHOUSE_URL"] = chdb_url
    # No Redis answers here: an import must not need one.
    env["REDIS_URL"] = "redis://127.0.0.1:1/0"
    env.update(overrides)
    return env


def import_command(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "worker.cli", "import", *map(str, args)]


def run_import_cli(
    cwd: Path, env: dict[str, str], *args: str | Path, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        import_command(*args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def summary_of(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr[-3000:]
    summary: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return summary


def query(chdb_url: str, sql: str) -> list[tuple[Any, ...]]:
    sink = ChdbSink(path_from_url(chdb_url))
    try:
        return sink.query(sql)
    finally:
        sink.close()
        close_all()


def migrate(chdb_url: str) -> None:
    sink = ChdbSink(path_from_url(chdb_url))
    try:
        sink.migrate()
    finally:
        sink.close()
        close_all()


def landed(chdb_url: str) -> dict[str, tuple[int, int, int]]:
    """properties['n'] -> (copies, duration, rows with imported_at) of every row."""
    rows = query(
        chdb_url,
        "SELECT properties['n'], count(), max(duration), countIf(imported_at IS NOT NULL) "
        "FROM events GROUP BY properties['n']",
    )
    return {str(n): (int(c), int(d), int(i)) for n, c, d, i in rows}
