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


def test_reorder_lateness_is_measured_against_later_created_events() -> None:
    from benchmarks.bench_reorder import lateness

    # Session a: created 1, 2, 3 arriving at 10, 30, 20: the first arrived before every
    # later-created event (0); the second 10 ms after the third (10); the third is last (0).
    held = [("a", 1, 10), ("a", 2, 30), ("a", 3, 20), ("b", 5, 100), ("b", 4, 150)]
    assert sorted(lateness(held)) == [0, 0, 0, 10, 50]


def test_memory_benchmark_measures_at_least_the_rows_it_stores() -> None:
    from benchmarks.bench_memory import apply_all, measure, row_bytes, send_tasks, stream

    events = stream(1000)
    row = row_bytes(events)
    buffer, fresh = measure(apply_all(events, 0), len(events))
    assert fresh > 0
    assert row < buffer < 3 * row  # every row, plus what Redis keeps beside it
    broker, _ = measure(send_tasks(events), len(events))
    assert 4 / 3 * row < broker < 3 * row  # kombu's body is base64


def test_outage_benchmark_counts_announced_and_brief_ingest_pauses() -> None:
    from benchmarks.bench_outage import count_pauses

    tail = ". Tasks wait unacknowledged in the broker and are retried in place; nothing is lost."
    text = "\n".join(
        [
            "ingest paused: Redis refuses writes (OutOfMemoryError: command not allowed when "
            f"used memory > 'maxmemory'.){tail}",
            "ingest resumed: Redis takes writes again, after 12 s paused",
            "ingest paused: Redis refuses writes (OutOfMemoryError: ...) "
            f"(3 brief pause(s) before this one){tail}",
        ]
    )
    assert count_pauses(text) == 1 + (1 + 3)
    assert count_pauses("ingest resumed: ...") == 0


def test_outage_benchmark_sizes_maxmemory_from_the_growth_rate() -> None:
    from benchmarks.bench_outage import maxmemory_for

    # Growing 300 kB/s, 15 s before the outage's half: full then.
    assert maxmemory_for(5_000_000, 300_000.0, 15.0) == 5_000_000 + 4_500_000
    # Never at what Redis already uses (it would refuse every write at once).
    assert maxmemory_for(5_000_000, 10.0, 1.0) == 5_000_000 + (1 << 20)


def test_outage_benchmark_reports_a_run_that_never_caught_up() -> None:
    from benchmarks.bench_outage import Outcome, results

    outcome = Outcome(
        variant="full", outage_s=60.0, arrival_rate=1000.0, normal_flush_rate=1000.0,
        backlog=60_000, buffer_rows=30_000, producer_held=29_960, elsewhere=40, broker_tasks=0,
        restart_s=0.5, first_flush_s=1.0, drain_s=21.0, caught_up_s=None, drained_rows=50_000,
        maxmemory=12 << 20, full_after_s=30.0, pauses=2, buffer_full=0, sent=120_000,
        missing=0, duplicated=0, wrong_durations=0,
        extra={"producer_held_at_give_up": 70_000, "drain_timeline": [(0.0, 60_000)]},
    )  # fmt: skip
    assert outcome.drain_rate == 2500.0 and outcome.ratio == 2.5
    rows = {r.name.split(": ")[1]: r for r in results(outcome)}
    assert "NOT caught up" in rows["drain rate"].note
    assert rows["time to catch up"].eventbuffer is None
    assert rows["missing / duplicated"].passed is True
    assert rows["time to drain"].extra["drain_timeline"] == [(0.0, 60_000)]

    stuck = Outcome(**{**vars(outcome), "missing": None, "duplicated": None})
    stuck.extra = {**outcome.extra, "stuck": "300 s after the stream stopped"}
    tally = {r.name.split(": ")[1]: r for r in results(stuck)}["missing / duplicated"]
    assert tally.passed is None and tally.eventbuffer is None
    assert "not tallied: STUCK: 300 s after the stream stopped" in tally.note


def test_e2e_fraction_offers_that_share_of_the_standard_interfaces_rate() -> None:
    from benchmarks.bench_e2e import offered_rate

    args = build_parser().parse_args(["--only", "standard,e2e", "--e2e-fraction", "0.5"])
    configure(args)
    assert args.e2e_fraction == 0.5 and args.duration == 60.0
    args.standard_rate = 40_000.0  # as the standard benchmark leaves it
    rate, why = offered_rate(args)
    assert rate == 20_000.0
    assert "0.5x the standard interface's 40,000 ev/s" in why
    args.rate = 7_000.0  # --rate wins
    assert offered_rate(args)[0] == 7_000.0


def test_e2e_duration_option_sets_the_window() -> None:
    args = build_parser().parse_args(["--quick", "--duration", "300"])
    configure(args)
    assert args.duration == 300.0 and args.e2e_fraction is None


def test_scale_sizing_follows_the_measured_costs_per_event() -> None:
    from benchmarks.bench_scale import CLICKHOUSE_CORES, UTILISATION, Drain, costs, sizing

    producer = Drain(1000, 0.1, {"producer": 0.010, "redis": 0.001})
    ingest = Drain(1000, 0.1, {"ingest": 0.020, "redis": 0.002})
    flush = Drain(1000, 0.1, {"flush": 0.010, "redis": 0.001, "clickhouse": 0.008})
    us = costs(producer, ingest, flush)
    assert us == {
        "producer": 10.0,
        "ingest": 20.0,
        "flush": 10.0,
        "redis": 4.0,
        "clickhouse": 8.0,
    }
    small, _, large = sizing(us)
    assert small["rate"] == 10_000 and small["redis_nodes"] == 1
    # 1M ev/s: 20 s of ingest CPU per second at 50% -> 40 processes; Redis 4 s -> 8 nodes.
    assert large["ingest_processes"] == round(1_000_000 * 20e-6 / UTILISATION)
    assert large["flush_processes"] == 20 and large["redis_nodes"] == 8
    assert large["clickhouse_shards"] == -(-16 // CLICKHOUSE_CORES)


def test_e2e_cpu_shares_weigh_each_interval_by_its_length() -> None:
    from benchmarks.bench_e2e import cpu_shares

    rows = [{"t": 0.0}, {"t": 5.0, "ingest_cpu": 1.0}, {"t": 6.0, "ingest_cpu": 0.4}]
    assert cpu_shares(rows, ["ingest", "flush"]) == {"ingest": (5 * 1.0 + 1 * 0.4) / 6}


def test_e2e_flush_workers_apply_to_the_server_run_only() -> None:
    from benchmarks.bench_e2e import Embedded, Server, flush_workers

    args = build_parser().parse_args(["--e2e-flush-workers", "2"])
    assert flush_workers(args, Server("clickhouse://default@127.0.0.1:1/default")) == 2
    assert flush_workers(args, Embedded(ROOT / "unused")) == 1
    assert flush_workers(build_parser().parse_args([]), Server("clickhouse://x")) == 1


def test_e2e_latency_breakdown_splits_held_kinds_and_finds_insert_gaps() -> None:
    from benchmarks.bench_e2e import latency_breakdown, worst_seconds

    latency = {"v1": 1.5, "v2": 1.7, "c1": 0.4, "c2": 0.6}
    handover = {"v1": 100.2, "v2": 101.5, "c1": 100.1, "c2": 101.9}
    # Rows became visible at three instants; the window is 100-110.
    landed = [101.0, 101.0, 102.0, 105.5, 120.0]
    out = latency_breakdown(latency, {"v1", "v2"}, landed, (100.0, 110.0))
    assert out["held"] == {"events": 2, "p50": 1.5, "p99": 1.7}
    assert out["other"] == {"events": 2, "p50": 0.4, "p99": 0.6}
    assert out["insert_instants"] == 3
    assert out["insert_gap_s"] == {"p50": 1.0, "p99": 3.5, "max": 3.5}
    assert worst_seconds(latency, handover, 100.0) == [(1, 1.7), (0, 1.5)]
