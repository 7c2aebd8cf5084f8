"""compose.yaml: valid for Docker Compose, and wired the way the README says."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def _compose_command() -> list[str] | None:
    """`docker compose` (v2 plugin) or Debian's `docker-compose`; either validates offline."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_compose_config_is_valid() -> None:
    command = _compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed to validate it")
    result = subprocess.run(
        [*command, "-f", str(ROOT / "compose.yaml"), "config", "-q"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr


def _services() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services: dict[str, Any] = data["services"]
    return services


def test_services_are_wired_for_the_native_backend() -> None:
    services = _services()
    assert {"redis", "clickhouse", "migrate", "worker-ingest", "worker-flush", "beat"} <= set(
        services
    )
    assert "--appendonly" in services["redis"]["command"]
    image = services["clickhouse"]["image"]
    assert image.startswith("clickhouse/clickhouse-server:") and not image.endswith(":latest")
    for name in ("worker-ingest", "worker-flush", "beat", "migrate"):
        env = services[name]["environment"]
        assert env["CLICKHOUSE_URL"].startswith("clickhouse://")
        assert env["REDIS_URL"] == "redis://redis:6379/0"
        depends = services[name]["depends_on"]
        assert depends["redis"]["condition"] == "service_healthy"
        assert depends["clickhouse"]["condition"] == "service_healthy"
    for name in ("worker-ingest", "worker-flush", "beat"):
        assert services[name]["depends_on"]["migrate"]["condition"] == (
            "service_completed_successfully"
        )
    assert "ingest" in services["worker-ingest"]["command"]
    assert "flush" in services["worker-flush"]["command"]
    for name in ("worker-ingest", "worker-flush"):  # `celery -A worker worker`: reliable fetch
        assert services[name]["command"][:4] == ["celery", "-A", "worker", "worker"]
        env = services[name]["environment"]
        assert env.get("EVENT_BUFFER_BROKER_TRANSPORT", "reliable") == "reliable"
        assert env.get("CELERY_BROKER_URL", env["REDIS_URL"]).startswith("redis://")
    for name in ("redis", "clickhouse"):
        assert "healthcheck" in services[name]
