"""The README's quick start on a clean virtualenv, as a new user runs it.

`.ci/run` installs `.[test]`, whose packages can hide a runtime dependency
the project forgot to declare (pytest brings `packaging`, which kombu's Redis
transport imports). Here a copy of the working tree is installed WITHOUT
extras into a new venv (no system site-packages), and only that venv's
`eventbuffer` and `python` are used: `eventbuffer run` in an empty directory
with nothing listening at REDIS_URL (so it starts its private redis-server),
`eventbuffer demo`, the README's producer example, `status`, `query`; then
Ctrl-C (SIGINT to `run`'s process group, as a terminal sends it) must stop
everything and leave no process behind.

pip uses its normal cache, so after the first run the install takes its
wheels from there (~25 s on a 2-core machine).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import pytest

from tests.support.cli import stack_up, wait_for
from tests.support.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
# Build output and local state: never part of what a user installs.
NOT_INSTALLED = shutil.ignore_patterns(
    ".git", "build", "dist", "*.egg-info", "__pycache__", "data", ".*_cache", ".hypothesis"
)

PRODUCER = """
from worker.producer import EventProducer

with EventProducer() as producer:
    producer.send({"project_id": "quickstart", "name": "signup", "created_at": %d})
"""


def processes_under(directory: Path) -> list[str]:
    """Live processes whose working directory or command line is inside `directory`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(entry / "cwd")
        except OSError:  # gone, or not ours to read
            continue
        if str(directory) in cmdline or Path(cwd).is_relative_to(directory):
            found.append(f"{entry.name}: {cmdline.strip()}")
    return found


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    for line in processes_under(tmp_path):  # only processes of this test's directory
        pid = int(line.split(":", 1)[0])
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.timeout(900)  # a cold pip cache downloads chDB (~100 MB)
def test_quick_start_on_a_clean_venv(sandbox: Path) -> None:
    timings: dict[str, float] = {}
    started = time.monotonic()
    source = sandbox / "src"
    shutil.copytree(ROOT, source, ignore=NOT_INSTALLED)
    venv = sandbox / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python, eventbuffer = venv / "bin" / "python", venv / "bin" / "eventbuffer"
    install = subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", source],
        capture_output=True,
        text=True,
        timeout=800,
        env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_USER")},
    )
    assert install.returncode == 0, install.stdout + install.stderr
    timings["venv + pip install"] = time.monotonic() - started

    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("EVENT_BUFFER_", "CELERY_", "PYTHON", "VIRTUAL_ENV"))
        and k not in ("REDIS_URL", "CLICKHOUSE_URL")
    }
    env.update(
        PATH=os.pathsep.join([str(venv / "bin"), env.get("PATH", "")]),
        REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",  # nothing listens there
        COLUMNS="200",
    )
    work = sandbox / "work"
    work.mkdir()

    def cli(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [eventbuffer, *args], cwd=work, env=env, capture_output=True, text=True, timeout=timeout
        )

    log = sandbox / "run.out"
    mark = time.monotonic()
    with log.open("wb") as out:
        run = subprocess.Popen(
            [eventbuffer, "run"],
            cwd=work,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, as in a terminal
        )
    try:
        stack_up(run, log, 120)
        assert "private redis-server" in log.read_text()
        timings["eventbuffer run: until everything is up"] = time.monotonic() - mark

        mark = time.monotonic()
        demo = cli("demo", "--sessions", "10", "--seed", "3")
        assert demo.returncode == 0, demo.stdout + demo.stderr + log.read_text()
        assert "events in 10 sessions landed in ClickHouse" in demo.stdout
        assert "screen_view" in demo.stdout and "session_end" in demo.stdout
        timings["eventbuffer demo"] = time.monotonic() - mark

        at = int(time.time() * 1000)
        producer = subprocess.run(
            [python, "-c", PRODUCER % at], cwd=work, env=env, capture_output=True, text=True
        )
        assert producer.returncode == 0, producer.stderr
        status = cli("status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert "Traceback" not in status.stderr

        def landed() -> bool:
            sql = "SELECT count() FROM events WHERE project_id = 'quickstart'"
            query = cli("query", sql, "--format", "tsv")
            assert query.returncode == 0, query.stdout + query.stderr
            return query.stdout.splitlines()[1:] == ["1"]

        wait_for(landed, 60, "the producer's event in ClickHouse", log)
        assert processes_under(sandbox), "the stack's processes should be found while it runs"
    finally:
        mark = time.monotonic()
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGINT)  # Ctrl-C
        code = run.wait(60)
        timings["Ctrl-C until stopped"] = time.monotonic() - mark
    assert code == 0, log.read_text()
    assert log.read_text().rstrip().endswith("Stopped.")
    # Pool processes killed with their worker's group may take a moment to be reaped.
    deadline = time.monotonic() + 5
    while (left := processes_under(sandbox)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == [], "processes left behind:\n" + "\n".join(left)
    timings["total"] = time.monotonic() - started
    print("quick start timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
