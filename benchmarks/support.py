"""What every benchmark shares: private servers, child processes, traffic, timing, results.

Nothing here asserts on timing. Every process a benchmark starts is
registered with `PROCESSES` and stopped when the benchmark ends, when the
runner exits, on Ctrl-C and on SIGTERM (and, on Linux, killed by the kernel
if the runner itself dies: PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


from tests.support.polling import wait_until  # noqa: E402
from tests.support.servers import RedisServer, start_redis  # noqa: E402
from worker.names import FLUSH_QUEUE  # noqa: E402
from worker.settings import Settings  # noqa: E402

# -- results -------------------------------------------------------------------


@dataclass
class Result:
    """One line of the final table, and one object of results.json."""

    name: str
    unit: str
    eventbuffer: float | None
    baseline: float | None
    baseline_name: str
    rounds: int
    target: str = "-"
    # None: informational (no target); True/False: PASS/MISS.
    passed: bool | None = None
    # "higher" (throughput) or "lower" (latency, memory): how to read the ratio.
    better: str = "higher"
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    date: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))

    @property
    def ratio(self) -> float | None:
        if self.eventbuffer is None or not self.baseline:
            return None
        return self.eventbuffer / self.baseline

    @property
    def verdict(self) -> str:
        if self.passed is None:
            return "info"
        return "PASS" if self.passed else "MISS"

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["eventbuffer_median"] = data.pop("eventbuffer")
        data["baseline_median"] = data.pop("baseline")
        data["ratio"] = self.ratio
        data["verdict"] = self.verdict
        return data


def skipped(name: str, reason: str) -> Result:
    return Result(name, "-", None, None, "-", 0, note=f"skipped: {reason}")


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "hostname": socket.gethostname(),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_kb"] = int(line.split()[1])
                break
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["redis-server", "--version"], capture_output=True, text=True, timeout=5
        ).stdout
        info["redis_server"] = out.strip()
    versions = {}
    for package in ("redis", "celery", "kombu", "msgspec", "chdb", "clickhouse_driver", "hiredis"):
        with contextlib.suppress(Exception):
            module = __import__(package)
            versions[package] = getattr(module, "__version__", "?")
    info["packages"] = versions
    return info


def write_json(path: Path, results: Sequence[Result], args: Mapping[str, Any]) -> None:
    document = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "args": dict(args),
        "benchmarks": [r.as_json() for r in results],
    }
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3f}"


def print_table(results: Sequence[Result]) -> None:
    header = ("benchmark", "eventbuffer", "baseline", "unit", "ratio", "target", "result")
    rows = [
        (
            r.name,
            fmt(r.eventbuffer),
            fmt(r.baseline),
            r.unit,
            "-" if r.ratio is None else f"{r.ratio:.2f}x",
            r.target,
            r.verdict if not r.note.startswith("skipped") else "skip",
        )
        for r in results
    ]
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(f"{cell:<{width}}" for cell, width in zip(cells, widths, strict=True))

    print()
    print(line(header))
    print(line(["-" * w for w in widths]))
    for row in rows:
        print(line(row))
    for r in results:
        if r.note:
            print(f"  {r.name}: {r.note}")
    print()


def alternate(rounds: int, runners: Mapping[str, Callable[[], float]]) -> dict[str, list[float]]:
    """Run every runner once per round, rotating their order; seconds per runner."""
    names = list(runners)
    timings: dict[str, list[float]] = {name: [] for name in names}
    for number in range(rounds):
        shift = number % len(names)
        for name in names[shift:] + names[:shift]:
            timings[name].append(runners[name]())
    return timings


def log(message: str) -> None:
    print(message, flush=True)


# -- processes -------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class Processes:
    """Child processes of this run, each in its own process group."""

    def __init__(self) -> None:
        self._live: list[subprocess.Popen[bytes]] = []

    def spawn(
        self,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        out: Any = subprocess.DEVNULL
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            out = log_path.open("ab")
        try:
            process = subprocess.Popen(
                list(args),
                env=None if env is None else dict(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        finally:
            if log_path is not None:
                out.close()
        self._live.append(process)
        return process

    def stop(self, process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
        """SIGTERM the process group (a warm shutdown for Celery), SIGKILL after `timeout`."""
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        # Anything left in its group (a pool child) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        if process in self._live:
            self._live.remove(process)

    def stop_all(self) -> None:
        for process in reversed(list(self._live)):
            self.stop(process, timeout=10.0)


PROCESSES = Processes()


def install_signal_handlers() -> None:
    """SIGTERM unwinds like Ctrl-C, so every `finally` (and the process cleanup) runs."""

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)


def rss_kb(pid: int) -> int | None:
    """Resident set size of a process and its children (a prefork pool) in KiB."""
    own = _one_rss_kb(pid)
    if own is None:
        return None
    return own + sum(_one_rss_kb(child) or 0 for child in _children(pid))


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(c) for c in task.read_text().split()]
        except OSError:
            continue
    return found


def _one_rss_kb(pid: int) -> int | None:
    try:
        import psutil  # type: ignore[import-untyped]

        return int(psutil.Process(pid).memory_info().rss // 1024)
    except ImportError:
        pass
    except Exception:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process and its children (a prefork pool) have used so far.

    Children still running count their own time; those that exited and were
    reaped count in the parent's cutime/cstime. 0.0 if unknown.
    """
    return _cpu_ticks(pid, reaped=True) + sum(_cpu_ticks(c) for c in _children(pid))


def _cpu_ticks(pid: int, reaped: bool = False) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # Fields 14-17 of stat (utime, stime, cutime, cstime), counted after the ")" of the name.
    ticks = int(fields[11]) + int(fields[12])
    if reaped:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


# -- servers -------------------------------------------------------------------


@contextlib.contextmanager
def private_redis(prefix: str) -> Iterator[RedisServer]:
    with tempfile.TemporaryDirectory(prefix=f"bench-{prefix}-redis-") as tmp:
        server = start_redis(Path(tmp))
        try:
            yield server
        finally:
            server.stop()


def redis_values(server: RedisServer, **overrides: str) -> dict[str, str]:
    """Settings on a private Redis: the buffer in db 0, the broker in db 1, plus `overrides`."""
    return {"REDIS_URL": server.db_url(0), "CELERY_BROKER_URL": server.db_url(1), **overrides}


@dataclass
class BenchStack:
    """A private Redis, a temporary directory, and the settings a benchmark uses on them.

    `values` are the settings' environment values; `env` is the children's
    environment (`project_env` of them); `settings` is what they read.
    """

    server: RedisServer
    tmp: Path
    values: dict[str, str]

    def __post_init__(self) -> None:
        self.settings = Settings.from_env(self.values)
        self.env = project_env(**self.values)

    def with_values(self, **overrides: str) -> BenchStack:
        """The same Redis and directory, with some settings changed."""
        return BenchStack(self.server, self.tmp, {**self.values, **overrides})

    @property
    def logs(self) -> Path:
        return self.tmp / "logs"

    @property
    def redis_pid(self) -> int | None:
        return self.server.process.pid if self.server.process is not None else None


@contextlib.contextmanager
def bench_stack(prefix: str, **overrides: str) -> Iterator[BenchStack]:
    """A private Redis and a temporary directory (`bench-<prefix>-`), removed at the end.

    The settings: buffer and broker on that Redis (`redis_values`), chDB in the
    directory, and no back-pressure from the buffer's high water (no flush
    worker drains it unless the benchmark starts one), then `overrides`.
    """
    with (
        private_redis(prefix) as server,
        tempfile.TemporaryDirectory(prefix=f"bench-{prefix}-") as tmp,
    ):
        values = redis_values(
            server,
            CLICKHOUSE_URL=f"chdb://{tmp}/clickhouse",
            EVENT_BUFFER_HIGH_WATER=str(10**9),
            **overrides,
        )
        yield BenchStack(server, Path(tmp), values)


# -- Celery child processes ---------------------------------------------------


def project_env(**overrides: str) -> dict[str, str]:
    """The runner's environment without eventbuffer/Celery settings, plus `overrides`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EVENT_BUFFER_", "CELERY_"))}
    env.pop("REDIS_URL", None)
    env.pop("CLICKHOUSE_URL", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env.update(overrides)
    return env


class CeleryChild:
    """`celery -A worker <args>` in its own process group, logging to a file."""

    def __init__(self, name: str, args: Sequence[str], env: Mapping[str, str], logs: Path) -> None:
        self.name = name
        self.log_path = logs / f"{name}.log"
        self.process = PROCESSES.spawn(
            [sys.executable, "-m", "celery", "-A", "worker", *args],
            env=env,
            log_path=self.log_path,
            cwd=ROOT,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_ready(self, marker: str, timeout: float = 60) -> None:
        try:
            wait_until(
                lambda: marker in self.text(),
                timeout,
                f"{self.name} to start",
                interval=0.1,
                alive=self.alive,
            )
        except AssertionError as exc:
            tail = "\n".join(self.text().splitlines()[-20:])
            raise RuntimeError(f"{exc}\n--- {self.log_path}:\n{tail}") from None

    def stop(self) -> None:
        PROCESSES.stop(self.process, timeout=20)


def celery_worker(
    name: str, queue: str, env: Mapping[str, str], logs: Path, *pool: str
) -> CeleryChild:
    """A worker on `queue`; `pool` options default to one solo process."""
    args = [
        "worker", "-Q", queue, *(pool or ("-P", "solo")), "-n", f"{name}@%h",
        "--without-mingle", "--without-gossip", "--loglevel=INFO",
    ]  # fmt: skip
    child = CeleryChild(name, args, env, logs)
    child.wait_ready(" ready.")
    return child


@contextlib.contextmanager
def ingest_children(
    name: str, layout: Sequence[Sequence[str]], env: Mapping[str, str], logs: Path
) -> Iterator[list[CeleryChild]]:
    """One `celery worker -Q ingest` per `layout` entry (its options), stopped at the end.

    The children are named `<name>0`, `<name>1`, ... and not waited for: a
    benchmark that drains a full queue starts its clock on the first row.
    """
    common = ["worker", "-Q", "ingest", "--without-mingle", "--without-gossip"]
    workers: list[CeleryChild] = []
    try:
        for i, argv in enumerate(layout):
            args = [*common, *argv, "-n", f"{name}{i}@%h"]
            workers.append(CeleryChild(f"{name}{i}", args, env, logs))
        yield workers
    finally:
        for worker in workers:
            worker.stop()


def wait_applied(
    client: Any, markers: Sequence[str], workers: Sequence[CeleryChild], what: str, interval: float
) -> None:
    """Until every task's batch marker is set (up to 300 s), while `workers` all run.

    Parallel workers may apply a session's tasks in any order: row counts
    vary, the markers do not.
    """
    wait_until(
        lambda: int(client.exists(*markers)) == len(markers),
        300,
        f"{what} to apply every event",
        interval=interval,
        alive=lambda: all(w.alive() for w in workers),
    )


@contextlib.contextmanager
def flush_children(
    name: str, count: int, env: Mapping[str, str], logs: Path
) -> Iterator[list[CeleryChild]]:
    """`count` solo flush workers (`<name>0`, ...), each ready, stopped at the end."""
    workers: list[CeleryChild] = []
    try:
        for i in range(count):
            workers.append(celery_worker(f"{name}{i}", FLUSH_QUEUE, env, logs))
        yield workers
    finally:
        for worker in workers:
            worker.stop()


def celery_beat(env: Mapping[str, str], logs: Path) -> CeleryChild:
    args = ["beat", "--loglevel=INFO", "--schedule", str(logs / "celerybeat-schedule")]
    child = CeleryChild("beat", args, env, logs)
    child.wait_ready("beat: Starting")
    return child
