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
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redis as redis_lib  # noqa: E402

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


def wait_until(
    condition: Callable[[], bool],
    timeout: float,
    what: str,
    interval: float = 0.05,
    alive: Callable[[], bool] | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if alive is not None and not alive():
            raise RuntimeError(f"a process died while waiting for {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


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
    """User + system CPU time a process has used so far (0.0 if unknown)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # Fields 14 and 15 of stat (utime, stime), counted after the ")" of the name.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- servers -------------------------------------------------------------------


class RedisServer:
    """A private redis-server on a free port, no persistence, removed on exit."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = PROCESSES.spawn(
            [
                binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", str(self.directory),
                "--save", "",
                "--appendonly", "no",
            ],
            log_path=self.directory / "redis.log",
        )  # fmt: skip
        client = redis_lib.Redis(port=self.port)
        try:
            wait_until(
                lambda: _pings(client), 10, f"redis-server on port {self.port}", interval=0.02
            )
        finally:
            client.close()
        return self

    def client(self, db: int = 0) -> redis_lib.Redis:
        return redis_lib.Redis(port=self.port, db=db)

    def stop(self) -> None:
        if self.process is not None:
            PROCESSES.stop(self.process)


def _pings(client: redis_lib.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis_lib.ConnectionError:
        return False


@contextlib.contextmanager
def private_redis(prefix: str) -> Iterator[RedisServer]:
    with tempfile.TemporaryDirectory(prefix=f"bench-{prefix}-redis-") as tmp:
        server = RedisServer(Path(tmp)).start()
        try:
            yield server
        finally:
            server.stop()


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
                lambda: marker in self.text(), timeout, f"{self.name} to start", 0.1, self.alive
            )
        except (RuntimeError, TimeoutError) as exc:
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


def celery_beat(env: Mapping[str, str], logs: Path) -> CeleryChild:
    args = ["beat", "--loglevel=INFO", "--schedule", str(logs / "celerybeat-schedule")]
    child = CeleryChild("beat", args, env, logs)
    child.wait_ready("beat: Starting")
    return child


# -- traffic ---------------------------------------------------------------------

# A session: 12 screen_views, 7 custom events, then session_end (60% / 35% / 5%).
VIEWS_PER_SESSION = 12
CUSTOM_PER_SESSION = 7
PROJECTS = ["shop", "blog", "docs", "app", "status"]
PATHS = ["/", "/pricing", "/docs", "/blog/launch", "/checkout", "/cart", "/product/42", "/about"]
CUSTOM = ["button_click", "add_to_cart", "search", "signup", "share", "video_play"]
DEVICES = [
    ("desktop", "Mac OS", "14.4", "Chrome", "123.0", "Apple", "Macintosh"),
    ("mobile", "iOS", "17.4", "Safari", "17.4", "Apple", "iPhone"),
    ("mobile", "Android", "14", "Chrome", "122.0", "Samsung", "SM-S918B"),
    ("desktop", "Windows", "11", "Edge", "123.0", "", ""),
]
PLACES = [("SE", "Stockholm", "Stockholm"), ("DE", "Berlin", "Berlin"), ("US", "Austin", "Texas")]
DEVICE_FIELDS = ("device", "os", "os_version", "browser", "browser_version", "brand", "model")
T0_MS = 1_772_366_400_000  # 2026-03-01 12:00:00 UTC


def iso(ms: int) -> str:
    return (
        dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="milliseconds")[:-6] + "Z"
    )


@dataclass
class _Session:
    base: dict[str, Any]
    plan: list[str]  # event names, in order
    at_ms: int
    position: int = 0
    views_sent: int = 0


class Traffic:
    """Realistic events: many interleaved sessions of views, custom events and session_end.

    `events(n)` returns event dicts (no `id`: the producer assigns one) in a
    stream where `concurrent` sessions are open at once. `waiting` is how
    many screen_views stay in the buffer as their session's last view after
    applying them (sessions still open at the end), so the buffer's queue
    holds exactly `n - waiting` rows once everything is applied.
    """

    def __init__(self, seed: int = 7, concurrent: int = 400) -> None:
        self.rng = random.Random(seed)
        self.concurrent = concurrent
        self.open: list[_Session] = []
        self.sessions = 0

    def _new_session(self) -> _Session:
        rng = self.rng
        self.sessions += 1
        project = rng.choice(PROJECTS)
        profile = f"u-{rng.randrange(50_000):05d}" if rng.random() < 0.8 else ""
        device = rng.choice(DEVICES)
        country, city, region = rng.choice(PLACES)
        base: dict[str, Any] = {
            "project_id": project,
            "session_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            "device_id": f"d-{rng.getrandbits(48):012x}",
            "origin": f"https://{project}.example.com",
            "referrer": "https://www.google.com/",
            "referrer_name": "Google",
            "referrer_type": "search",
            "country": country,
            "city": city,
            "region": region,
            "sdk_name": "web",
            "sdk_version": "1.0.3",
            **dict(zip(DEVICE_FIELDS, device, strict=True)),
        }
        if profile:
            base["profile_id"] = profile
        plan = ["screen_view"] * VIEWS_PER_SESSION + ["custom"] * CUSTOM_PER_SESSION
        rng.shuffle(plan)
        if plan[0] != "screen_view":  # a visit starts with a view
            first = plan.index("screen_view")
            plan[0], plan[first] = plan[first], plan[0]
        plan.append("session_end")
        return _Session(base, plan, T0_MS + rng.randrange(3_600_000))

    def _event(self, session: _Session) -> dict[str, Any]:
        rng = self.rng
        kind = session.plan[session.position]
        session.position += 1
        session.at_ms += rng.randrange(500, 30_000)
        path = rng.choice(PATHS)
        event: dict[str, Any] = {**session.base, "created_at": iso(session.at_ms), "path": path}
        if kind == "screen_view":
            session.views_sent += 1
            event["name"] = "screen_view"
            event["properties"] = {"title": path.strip("/") or "home", "__hash": ""}
        elif kind == "custom":
            event["name"] = rng.choice(CUSTOM)
            event["properties"] = {
                "button": rng.choice(["buy", "next", "close"]),
                "value": rng.randrange(1, 500),
                "utm": {"source": "newsletter", "medium": "email", "campaign": "spring"},
            }
        else:
            event["name"] = "session_end"
        return event

    def next_event(self) -> tuple[dict[str, Any], str, bool]:
        """The next event of the stream, its session id, and whether it ends the session."""
        while len(self.open) < self.concurrent:
            self.open.append(self._new_session())
        index = self.rng.randrange(len(self.open))
        session = self.open[index]
        event = self._event(session)
        ended = session.position == len(session.plan)
        if ended:
            self.open[index] = self.open[-1]
            self.open.pop()
        return event, session.base["session_id"], ended

    def events(self, n: int) -> list[dict[str, Any]]:
        return [self.next_event()[0] for _ in range(n)]

    @property
    def waiting(self) -> int:
        """Open sessions holding a last view (each keeps exactly one in the buffer)."""
        return sum(1 for s in self.open if s.views_sent)


def traffic(n: int, seed: int = 7) -> tuple[list[dict[str, Any]], int]:
    """`n` events of a fresh stream, and how many views they leave waiting."""
    stream = Traffic(seed)
    return stream.events(n), stream.waiting


def mix(events: Sequence[Mapping[str, Any]]) -> str:
    total = len(events) or 1
    views = sum(1 for e in events if e["name"] == "screen_view")
    ends = sum(1 for e in events if e["name"] == "session_end")
    sessions = len({e["session_id"] for e in events})
    return (
        f"{len(events):,} events over {sessions:,} sessions: "
        f"{100 * views / total:.0f}% screen_view, "
        f"{100 * (total - views - ends) / total:.0f}% custom, {100 * ends / total:.0f}% session_end"
    )
