"""The benchmark suite still imports and parses: it is run by hand, so nothing else notices."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from benchmarks.run import BENCHMARKS, build_parser, configure, runners

ROOT = Path(__file__).resolve().parent.parent


def test_every_benchmark_imports_and_is_registered() -> None:
    table = runners()
    assert list(table) == list(BENCHMARKS)
    assert all(callable(run) for run in table.values())


def test_quick_options_are_configured() -> None:
    args = build_parser().parse_args(["--quick"])
    configure(args)
    assert args.quick and args.rounds == 3
    assert args.stage_rates == {}


def test_an_unknown_benchmark_is_refused() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--only", "nonsense"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "unknown benchmark(s): nonsense" in done.stdout


def test_e2e_capacity_adds_each_stage_machine_time_per_event() -> None:
    from benchmarks.bench_e2e import capacity

    assert capacity({"ingest": 100.0, "flush": 100.0}) == 50.0
    assert round(capacity({"producer": 64_000.0, "ingest": 88_000.0, "flush": 57_000.0})) == 22_456


def test_ending_every_session_releases_every_waiting_view() -> None:
    from tests.support.traffic import RealisticTraffic

    stream = RealisticTraffic(seed=3, concurrent=50)
    for _ in range(500):
        stream.next_event()
    ended = stream.end_all()
    assert ended and all(event["name"] == "session_end" for event, _ in ended)
    assert len({session for _, session in ended}) == len(ended)
    assert stream.waiting == 0
