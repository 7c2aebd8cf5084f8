"""Fixtures of the fault-injection suite, its marker, and the summary table.

Every scenario records one row (`fault_results.record`); at the end of the run the
table is printed and the rows are written as JSON under pytest's temporary
directory (the path is printed with the table).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import fault_results
from tests.support.fault_stack import Stack
from tests.support.servers import rabbitmq_reachable


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "faults: fault-injection scenarios (real processes killed, servers restarted)",
    )


@pytest.fixture(scope="session", autouse=True)
def _fault_report(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    fault_results.REPORT["path"] = tmp_path_factory.mktemp("faults-report") / "last_run.json"
    yield


@pytest.fixture
def stacks(tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    """Build systems under test; every process of every one is stopped afterwards."""
    built: list[Stack] = []

    def make(**kwargs: Any) -> Stack:
        if shutil.which("redis-server") is None:
            pytest.skip("the fault scenarios need a redis-server binary")
        stack = Stack(tmp_path / f"stack{len(built)}", **kwargs)
        built.append(stack)
        return stack

    yield make
    for stack in built:
        stack.close()


def _rabbitmqctl(*args: str) -> bool:
    if shutil.which("rabbitmqctl") is None:
        return False
    try:
        done = subprocess.run(["rabbitmqctl", *args], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    """RabbitMQ on 127.0.0.1:5672 (guest/guest), in a private vhost when rabbitmqctl can make one.

    The server is shared with the machine (other test runs use the same queue
    names on the default vhost): a vhost of our own keeps them apart.
    """
    if not rabbitmq_reachable():
        pytest.skip("no RabbitMQ on 127.0.0.1:5672 (guest/guest) for the AMQP fault scenario")
    vhost = f"eventbuffer-faults-{uuid.uuid4().hex[:8]}"
    if _rabbitmqctl("add_vhost", vhost) and _rabbitmqctl(
        "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"
    ):
        try:
            yield f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
        finally:
            with contextlib.suppress(Exception):
                _rabbitmqctl("delete_vhost", vhost)
        return
    # No rabbitmqctl: the default vhost, emptied by the Stack before use.
    yield "amqp://guest:guest@127.0.0.1:5672//"


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if not fault_results.RESULTS:
        return
    head = ("scenario", "sent", "landed", "missing", "dup", "wrong dur", "recovery s",
            "faults", "asserted")  # fmt: skip
    rows = [
        (
            r.scenario,
            str(r.sent),
            str(r.landed),
            str(r.missing),
            str(r.duplicated),
            str(r.wrong_durations),
            "-" if r.recovery_s is None else f"{r.recovery_s:.1f}",
            r.faults,
            r.asserted,
        )
        for r in fault_results.RESULTS
    ]
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(
            cell.ljust(w) if i in (0, 7, 8) else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
        )

    terminalreporter.write_sep("=", "fault-injection scenarios")
    terminalreporter.write_line(line(head))
    terminalreporter.write_line("  ".join("-" * w for w in widths))
    for row in rows:
        terminalreporter.write_line(line(row))
    notes = [(r.scenario, r.note) for r in fault_results.RESULTS if r.note]
    if notes:
        terminalreporter.write_line("")
        for scenario, note in notes:
            terminalreporter.write_line(f"{scenario}: {note}")
    terminalreporter.write_line("")
    terminalreporter.write_line(
        "recovery s: from the end of the fault (last kill, server back, lock or directory "
        "released) until every handed-over event was acknowledged out of the buffer"
    )
    if fault_results.REPORT["path"] is not None:
        terminalreporter.write_line(f"JSON report: {fault_results.REPORT['path']}")
