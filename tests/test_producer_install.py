"""A producer app installs only what sending needs (README "Installing only the producer").

`pip install .` brings the whole stack (chDB alone brings pandas, pyarrow and
numpy: ~1 GB). A web app that only sends events installs celery and msgspec,
then eventbuffer without its dependencies; `EventProducer` must send from
there and import nothing heavy, and the `eventbuffer` command must say what
it is missing instead of a traceback.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib

from tests.test_quickstart import NOT_INSTALLED, ROOT

# What the README tells a producer app to install before eventbuffer itself.
PRODUCER_REQUIREMENTS = ["celery[redis]>=5.4", "msgspec>=0.18"]
HEAVY = ("chdb", "clickhouse_driver", "rich", "prometheus_client", "pandas", "pyarrow", "numpy")

SEND = """
import json, sys
from worker.producer import EventProducer
with EventProducer(batch_size=10, batch_ms=0) as producer:
    for n in range(10):
        producer.send({"project_id": "light", "name": "signup", "created_at": 1794009600000 + n})
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[1].split(",")))
print(json.dumps(heavy))
"""


def queued_events(redis: redis_lib.Redis) -> list[dict[str, Any]]:
    """Every event in the ingest tasks waiting in the broker."""
    found = []
    for raw in redis.lrange("ingest", 0, -1):
        message = json.loads(raw)
        body = message["body"]
        if message["properties"].get("body_encoding") == "base64":
            body = base64.b64decode(body)
        events = json.loads(body)[0][0]
        found += events
    return found


def venv_bytes(venv: Path) -> int:
    return sum(f.stat().st_size for f in venv.rglob("*") if f.is_file() and not f.is_symlink())


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_producer_only_install_sends_and_imports_nothing_heavy(
    tmp_path: Path, redis_url: str, redis: redis_lib.Redis
) -> None:
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=NOT_INSTALLED)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_USER")}
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    for args in (PRODUCER_REQUIREMENTS, ["--no-deps", str(source)]):
        done = subprocess.run([*pip, *args], capture_output=True, text=True, timeout=500, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
    size_mb = venv_bytes(venv) / 1e6
    assert size_mb < 150, f"a producer-only venv takes {size_mb:.0f} MB"

    run_env = {**env, "REDIS_URL": redis_url}
    sent = subprocess.run(
        [str(python), "-c", SEND, ",".join(HEAVY)],
        capture_output=True,
        text=True,
        timeout=60,
        env=run_env,
        cwd=tmp_path,
    )
    assert sent.returncode == 0, sent.stderr
    assert sent.stdout.strip().splitlines()[-1] == "[]"  # nothing heavy imported
    events = queued_events(redis)
    assert len(events) == 10 and {e["project_id"] for e in events} == {"light"}

    cli = subprocess.run(
        [str(venv / "bin" / "eventbuffer"), "status"],
        capture_output=True,
        text=True,
        timeout=60,
        env=run_env,
        cwd=tmp_path,
    )
    assert cli.returncode == 2
    [line] = cli.stderr.strip().splitlines()
    assert "the command line needs the full install" in line and "Traceback" not in cli.stderr
