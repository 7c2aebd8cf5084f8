"""The Beat healthcheck (compose's `beat` service) against a real Beat process.

Beat runs on the test's Redis with a 1 s flush interval (so the check allows
2 x 1 s + 5 s); it is then stopped with SIGSTOP (stuck: alive, sending
nothing), resumed, and killed. The check is run as Docker runs it: a fresh
`python -m worker.beat_health FILE` with Beat's environment.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis as redis_lib

from tests.support.celery_procs import ROOT, beat, project_env
from tests.support.polling import wait_until


@pytest.mark.slow
def test_beat_healthcheck_follows_a_running_a_stuck_and_a_dead_beat(
    redis: redis_lib.Redis, redis_url: str, tmp_path: Path
) -> None:
    env = project_env(REDIS_URL=redis_url, EVENT_BUFFER_FLUSH_INTERVAL_S="1")
    schedule = tmp_path / "celerybeat-schedule"

    def health() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "worker.beat_health", str(schedule)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )

    def healthy() -> bool:
        result = health()
        assert result.returncode == 0 or len(result.stderr.strip().splitlines()) == 1
        return result.returncode == 0

    missing = health()
    assert missing.returncode == 1
    assert "no schedule file" in missing.stderr

    process = beat(env, tmp_path / "beat.log", schedule)
    try:
        process.wait_for("Sending due task process-buffer")
        wait_until(healthy, 10, "a healthy Beat", interval=0.5)
        # Healthy over more than the allowed age (7 s): Beat keeps rewriting the file.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert healthy(), process.text()
            time.sleep(1)

        assert process.process is not None
        os.killpg(process.process.pid, signal.SIGSTOP)  # stuck: alive, sending nothing
        wait_until(lambda: not healthy(), 20, "the stuck Beat to be unhealthy", interval=0.5)
        stuck = health()
        assert stuck.returncode == 1
        assert "stuck or dead" in stuck.stderr and "Traceback" not in stuck.stderr

        os.killpg(process.process.pid, signal.SIGCONT)
        wait_until(healthy, 10, "the resumed Beat to be healthy", interval=0.5)

        process.kill()
        wait_until(lambda: not healthy(), 20, "the dead Beat to be unhealthy", interval=0.5)
    finally:
        if process.alive():
            os.killpg(process.process.pid, signal.SIGCONT)  # type: ignore[union-attr]
        process.kill()
