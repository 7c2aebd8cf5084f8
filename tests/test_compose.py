"""compose.yaml: valid for Docker Compose, and wired the way the README says."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
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


def _compose_config(
    *args: str, file: str = "compose.yaml", **env: str
) -> subprocess.CompletedProcess[str]:
    command = _compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed to validate it")
    return subprocess.run(
        [*command, "-f", str(ROOT / file), "config", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "EVENTBUFFER_REDIS_PORT"} | env,
    )


def test_compose_config_is_valid() -> None:
    result = _compose_config("-q")
    assert result.returncode == 0, result.stderr


def _published(file: str = "compose.yaml", **env: str) -> dict[str, list[tuple[str, str, str]]]:
    """service -> (host ip, host port, container port) of what Compose publishes on the host."""
    result = _compose_config(file=file, **env)
    assert result.returncode == 0, result.stderr
    published: dict[str, list[tuple[str, str, str]]] = {}
    for name, service in yaml.safe_load(result.stdout)["services"].items():
        for port in service.get("ports", []):
            if isinstance(port, dict):  # the v2 plugin's long form
                entry = (port.get("host_ip", ""), str(port["published"]), str(port["target"]))
            else:  # docker-compose 1.x: "127.0.0.1:16379:6379/tcp"
                host_ip, host_port, target = port.split("/")[0].rsplit(":", 2)
                entry = (host_ip, host_port, target)
            published.setdefault(name, []).append(entry)
    return published


def test_only_redis_is_published_on_loopback_on_a_port_of_its_own() -> None:
    # A local Redis (6379) or ClickHouse (9000, 8123) must not clash with the stack.
    assert _published() == {"redis": [("127.0.0.1", "16379", "6379")]}
    moved = _published(EVENTBUFFER_REDIS_PORT="23456")
    assert moved == {"redis": [("127.0.0.1", "23456", "6379")]}


def _services(file: str = "compose.yaml") -> dict[str, Any]:
    data = yaml.safe_load((ROOT / file).read_text())
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
    assert "flush" in services["worker-flush"]["command"]
    for name in ("worker-ingest", "worker-flush"):  # `celery -A worker worker`: reliable fetch
        assert services[name]["command"][:4] == ["celery", "-A", "worker", "worker"]
        env = services[name]["environment"]
        assert env.get("EVENT_BUFFER_BROKER_TRANSPORT", "reliable") == "reliable"
        assert env.get("CELERY_BROKER_URL", env["REDIS_URL"]).startswith("redis://")
    for name in ("redis", "clickhouse", "beat"):
        assert "healthcheck" in services[name]


def test_ingest_worker_also_consumes_the_default_queue() -> None:
    command = _services()["worker-ingest"]["command"]
    assert command[command.index("-Q") + 1] == "ingest,celery"


def test_ingest_workers_run_the_layout_eventbuffer_run_runs() -> None:
    """compose and `eventbuffer run` use the same, measured layout: solo processes."""
    from worker.cli.run import INGEST_LAYOUT

    service = _services()["worker-ingest"]
    command = service["command"]
    options = command[command.index("-P") : command.index("-P") + 2]
    assert all(layout == options for layout in INGEST_LAYOUT), (INGEST_LAYOUT, options)
    assert service["deploy"]["replicas"] == len(INGEST_LAYOUT)


@pytest.mark.parametrize("file", ["compose.yaml", "compose.cluster.yaml"])
def test_flush_workers_run_a_pool_that_enforces_time_limits(file: str) -> None:
    """process_buffer's time limit (A hung ClickHouse) is enforced by Celery's prefork
    pool only: a `-P solo` flush worker would stay in a hung run for ever."""
    command = _services(file)["worker-flush"]["command"]
    assert command[command.index("-P") + 1] == "prefork"
    assert command[command.index("-c") + 1] == "1"


def test_beat_healthcheck_reads_the_schedule_beat_writes() -> None:
    beat = _services()["beat"]
    schedule = beat["command"][beat["command"].index("--schedule") + 1]
    assert beat["healthcheck"]["test"] == ["CMD", "python", "-m", "worker.beat_health", schedule]


# -- compose.cluster.yaml: the scaled-out layout ------------------------------------

CLUSTER_FILE = "compose.cluster.yaml"
EVENTBUFFER_SERVICES = ("migrate", "worker-ingest", "worker-flush", "beat")


def test_cluster_compose_config_is_valid() -> None:
    result = _compose_config("-q", file=CLUSTER_FILE)
    assert result.returncode == 0, result.stderr


def test_cluster_compose_publishes_only_rabbitmq_on_loopback() -> None:
    assert _published(CLUSTER_FILE) == {"rabbitmq": [("127.0.0.1", "35672", "5672")]}
    moved = _published(CLUSTER_FILE, EVENTBUFFER_AMQP_PORT="23456")
    assert moved == {"rabbitmq": [("127.0.0.1", "23456", "5672")]}


def _resolved() -> dict[str, Any]:
    """The services as Compose resolves them (anchors, merges, interpolation)."""
    result = _compose_config(file=CLUSTER_FILE)
    assert result.returncode == 0, result.stderr
    services: dict[str, Any] = yaml.safe_load(result.stdout)["services"]
    return services


def test_cluster_compose_runs_a_redis_cluster_rabbitmq_and_two_clickhouse_shards() -> None:
    from worker.settings import Settings

    services = _resolved()
    nodes = [name for name in services if name.startswith("redis-") and name[6:].isdigit()]
    assert len(nodes) == 6
    for name in nodes:
        command = services[name]["command"]
        assert command[command.index("--cluster-enabled") + 1] == "yes"
        assert command[command.index("--appendonly") + 1] == "yes"
    addresses = {services[n]["networks"]["eventbuffer"]["ipv4_address"] for n in nodes}
    init = " ".join(services["redis-cluster-init"]["command"])
    assert "--cluster-replicas 1" in init and all(f"{a}:6379" in init for a in addresses)
    assert services["rabbitmq"]["image"].startswith("rabbitmq:")
    assert services["keeper"]["image"].startswith("clickhouse/clickhouse-keeper:")
    shards = {services[f"clickhouse-{n}"]["environment"]["CLICKHOUSE_SHARD"] for n in (1, 2)}
    assert shards == {"01", "02"}
    for name in ("keeper", "clickhouse-1", "clickhouse-2"):
        image = services[name]["image"]
        assert not image.endswith(":latest")
        for volume in services[name]["volumes"]:
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            if "/deploy/" in source:  # a config file of this checkout, mounted
                assert Path(source).is_file(), source
    assert services["migrate"]["command"] == ["eventbuffer", "migrate", "--cluster", "eventbuffer"]
    for name in EVENTBUFFER_SERVICES:
        env = services[name]["environment"]
        settings = Settings.from_env(env)  # a cluster buffer's settings, checked as at start-up
        assert settings.redis_cluster and settings.effective_min_replicas == 1
        assert settings.redis_url.split("//")[1].split(":")[0] in addresses
        assert settings.effective_broker_url.startswith("amqp://")
        assert settings.shards >= len(nodes) // 2  # at least one shard per master
    for name in ("worker-ingest", "worker-flush"):
        assert services[name]["deploy"]["replicas"] >= 2
    assert "replicas" not in services["beat"].get("deploy", {})  # exactly one Beat
    depends = services["worker-ingest"]["depends_on"]
    assert depends["redis-cluster-init"]["condition"] == "service_completed_successfully"
    assert depends["migrate"]["condition"] == "service_completed_successfully"


def test_cluster_compose_clickhouse_config_names_both_shards_and_keeper() -> None:
    config = (ROOT / "deploy" / "clickhouse" / "cluster.xml").read_text()
    assert config.count("<shard>") == 2 and "<internal_replication>true" in config
    assert "<host>keeper</host>" in config and 'from_env="CLICKHOUSE_SHARD"' in config
    for host in ("clickhouse-1", "clickhouse-2"):
        assert f"<host>{host}</host>" in config


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of each Dockerfile line, continuations joined."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


def test_dockerfile_pins_the_base_image_and_every_python_package() -> None:
    steps = _dockerfile()
    [base] = [args for op, args in steps if op == "FROM"]
    # An exact release (python:3.11.14-slim-bookworm), or a digest: never a floating tag.
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?", base), base
    copied = [src for op, args in steps if op == "COPY" for src in args.split()[:-1]]
    assert "constraints.txt" in copied
    for source in copied:
        assert (ROOT / source).exists(), f"COPY {source}: no such file"
    installs = [args for op, args in steps if op == "RUN" and "pip install" in args]
    assert installs and all("--constraint constraints.txt" in args for args in installs)


def test_dockerfile_lets_the_app_user_write_its_data_directory() -> None:
    steps = _dockerfile()
    [user] = [i for i, (op, _) in enumerate(steps) if op == "USER"]
    assert steps[user][1] not in ("root", "0")
    owner = steps[user][1]
    before = " ".join(args for op, args in steps[:user] if op == "RUN")
    [workdir] = [args for op, args in steps if op == "WORKDIR"]
    assert f"install -d -o {owner} -g {owner} {workdir}/data" in before
    assert f"chown {owner}:{owner} {workdir}" in before


@pytest.mark.slow
def test_constraints_pin_exactly_what_the_dependencies_resolve_to(tmp_path: Path) -> None:
    """constraints.txt pins every package pyproject.toml's dependencies resolve to, and no other.

    A dependency added or changed without `make constraints` leaves a package
    unpinned (or a pin that conflicts): the image would take whatever is newest.
    """
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    with (ROOT / "pyproject.toml").open("rb") as f:
        dependencies = tomllib.load(f)["project"]["dependencies"]
    report = tmp_path / "report.json"
    pip = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet"]
    options = ["--disable-pip-version-check", "--report", str(report)]
    result = subprocess.run(
        [*pip, *options, "--constraint", str(ROOT / "constraints.txt"), *dependencies],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, (
        "the pins conflict with pyproject.toml's dependencies: run `make constraints`\n"
        + result.stderr
    )
    resolved = {
        re.sub(r"[-_.]+", "-", item["metadata"]["name"]).lower(): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    assert resolved == pins, "constraints.txt is stale: run `make constraints`"
