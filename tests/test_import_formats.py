"""Each export format's mapping, on small samples shaped as their public docs describe.

Mixpanel: the raw export (`/api/2.0/export`, NDJSON: `event` and
`properties` with `time` in epoch seconds, `distinct_id`, `$insert_id`...).
Amplitude: the Export API's event lines (`event_type`, `event_time`,
`session_id`, `uuid`...), gzip. Umami: its CSV data export (the columns of
`website_event` with the session's). Times are recent (the event model
refuses dates older than EVENT_BUFFER_MAX_PAST_DAYS).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path
from typing import Any

import pytest

from tests.support.dates import NOON_MS
from tests.support.importing import import_env, migrate, query, run_import_cli, summary_of

T = NOON_MS // 1000  # epoch seconds, as Mixpanel exports them
MIN = 60


@pytest.fixture
def chdb(tmp_path: Path) -> str:
    url = f"chdb://{tmp_path / 'clickhouse'}"
    migrate(url)
    return url


def rows(chdb_url: str, columns: str) -> list[dict[str, Any]]:
    names = [c.split(" AS ")[-1].strip() for c in columns.split(",")]
    result = query(chdb_url, f"SELECT {columns} FROM events ORDER BY created_at, name")
    return [dict(zip(names, row, strict=True)) for row in result]


def mixpanel_line(event: str, time: int, **props: Any) -> str:
    return json.dumps({"event": event, "properties": {"time": time, **props}})


def test_mixpanel_export(tmp_path: Path, chdb: str) -> None:
    user = "91304156-cafc-4673-a237-623d1129c801"
    common = {"distinct_id": user, "$device_id": "dev-1", "$browser": "Chrome", "$os": "Mac OS X"}
    lines = [
        mixpanel_line(
            "$mp_web_page_view",
            T,
            **common,
            **{"$insert_id": "a1", "$current_url": "https://shop.example/cart?x=1"},
            **{"$city": "Berlin", "mp_country_code": "DE", "utm_source": "mail"},
        ),
        mixpanel_line(
            "Signup",
            T + 30,
            **common,
            **{"$insert_id": "29fc2962-6d9c-455d-95ad-95b84f09b9e4", "Referred by": "Friend"},
        ),
        mixpanel_line(
            "$mp_web_page_view",
            T + 60,
            **common,
            **{"$insert_id": "a2", "$current_url": "https://shop.example/pay"},
        ),
        # 40 minutes later: a new session (derived by the 30-minute gap).
        mixpanel_line(
            "$mp_web_page_view",
            T + 100 * MIN,
            **common,
            **{"$insert_id": "a3", "$current_url": "https://shop.example/"},
        ),
        mixpanel_line("Purchase", T + 101 * MIN, **common, Item="Coffee", Amount=5.0),
        mixpanel_line("Broken", "not a time", distinct_id=user),
        "[1, 2]",
    ]
    export = tmp_path / "mixpanel.ndjson"
    export.write_text("\n".join(lines) + "\n")
    env = import_env(chdb)
    refused = run_import_cli(tmp_path, env, "--format", "mixpanel", export)
    assert refused.returncode == 2 and "--project" in refused.stderr
    summary = summary_of(
        run_import_cli(tmp_path, env, "--format", "mixpanel", "--project", "shop", "--json", export)
    )
    assert (summary["imported"], summary["rejected"]) == (5, 2)
    got = rows(
        chdb,
        "name, project_id, profile_id, device_id, session_id, origin, path, duration, "
        "browser, os, city, country, properties, imported_at IS NOT NULL",
    )
    assert [r["name"] for r in got] == [
        "screen_view",
        "Signup",
        "screen_view",
        "screen_view",
        "Purchase",
    ]
    assert {r["project_id"] for r in got} == {"shop"}
    assert {r["profile_id"] for r in got} == {user}
    assert {r["device_id"] for r in got} == {"dev-1"}
    assert [(r["origin"], r["path"]) for r in got if r["name"] == "screen_view"] == [
        ("https://shop.example", "/cart"),
        ("https://shop.example", "/pay"),
        ("https://shop.example", "/"),
    ]
    assert [r["duration"] for r in got] == [60_000, 0, 0, 0, 0]
    sessions = [r["session_id"] for r in got]
    assert sessions[0] == sessions[1] == sessions[2] != sessions[3] == sessions[4] != ""
    first = got[0]
    assert (first["browser"], first["os"], first["city"], first["country"]) == (
        "Chrome",
        "Mac OS X",
        "Berlin",
        "DE",
    )
    assert first["properties"] == {"utm_source": "mail"}
    assert got[1]["properties"] == {"Referred by": "Friend"}
    assert got[4]["properties"] == {"Item": "Coffee", "Amount": "5.0"}
    assert all(r["imported_at IS NOT NULL"] for r in got)
    # Ids are derived from $insert_id (or the line): a re-import finds them all.
    again = summary_of(
        run_import_cli(
            tmp_path,
            {**env, "EVENT_BUFFER_IMPORT_CHUNK_ROWS": "2"},
            "--format",
            "mixpanel",
            "--project",
            "shop",
            "--json",
            export,
        )
    )
    assert (again["imported"], again["duplicates"]) == (0, 5)


def amplitude_event(event_type: str, seconds: int, **fields: Any) -> dict[str, Any]:
    from datetime import UTC, datetime

    at = datetime.fromtimestamp(T + seconds, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    return {
        "event_type": event_type,
        "event_time": at,
        "server_received_time": at,
        "user_id": "user@example.com",
        "device_id": "C8F9E604-F01A-4BD9-95C6-8E5357DF265D",
        "platform": "Web",
        "os_name": "Chrome",
        "os_version": "120",
        "device_type": "Mac",
        "country": "United States",
        "city": "San Francisco",
        "region": "California",
        "location_lat": 37.77,
        "location_lng": -122.42,
        "library": "amplitude-ts/2.0.0",
        "user_properties": {"plan": "pro"},
        **fields,
    }


def test_amplitude_export(tmp_path: Path, chdb: str) -> None:
    session = (T - 10) * 1000
    page = "[Amplitude] Page Viewed"
    events = [
        amplitude_event(
            page,
            0,
            session_id=session,
            uuid="0b4b2ad4-4d3c-11ee-be56-0242ac120002",
            event_properties={"[Amplitude] Page URL": "https://app.example/a", "ref": "x"},
        ),
        amplitude_event(
            page,
            45,
            session_id=session,
            uuid="0b4b2ad4-4d3c-11ee-be56-0242ac120003",
            event_properties={"[Amplitude] Page URL": "https://app.example/b"},
        ),
        amplitude_event(
            "Button Clicked",
            50,
            session_id=-1,
            uuid="0b4b2ad4-4d3c-11ee-be56-0242ac120004",
            event_properties={"button": "buy"},
        ),
    ]
    export = tmp_path / "amplitude-2026_1#0.json.gz"
    with gzip.open(export, "wt") as out:
        for event in events:
            out.write(json.dumps(event) + "\n")
        out.write("{broken\n")
    summary = summary_of(
        run_import_cli(
            tmp_path,
            import_env(chdb),
            "--format",
            "amplitude",
            "--project",
            "app",
            "--json",
            export,
        )
    )
    assert (summary["imported"], summary["rejected"]) == (3, 1)
    got = rows(
        chdb,
        "toString(id) AS id, name, project_id, profile_id, device_id, session_id, origin, "
        "path, duration, os, os_version, device, city, region, country, latitude, "
        "sdk_name, properties",
    )
    assert [r["id"] for r in got] == [e["uuid"] for e in events]
    assert [r["name"] for r in got] == ["screen_view", "screen_view", "Button Clicked"]
    assert [(r["origin"], r["path"]) for r in got[:2]] == [
        ("https://app.example", "/a"),
        ("https://app.example", "/b"),
    ]
    assert [r["duration"] for r in got] == [45_000, 0, 0]
    assert got[0]["session_id"] == got[1]["session_id"] != ""
    assert got[2]["session_id"] not in ("", got[0]["session_id"])  # derived (session_id -1)
    first = got[0]
    assert (first["profile_id"], first["device_id"]) == (
        "user@example.com",
        "C8F9E604-F01A-4BD9-95C6-8E5357DF265D",
    )
    assert (first["os"], first["os_version"], first["device"]) == ("Chrome", "120", "Mac")
    assert (first["city"], first["region"], first["sdk_name"]) == (
        "San Francisco",
        "California",
        "amplitude-ts/2.0.0",
    )
    assert first["country"].strip("\x00") == ""  # a name, not a code: kept as a property
    assert first["latitude"] == pytest.approx(37.77, abs=1e-3)
    assert first["properties"]["country"] == "United States"
    assert first["properties"]["user.plan"] == "pro"
    assert first["properties"]["ref"] == "x"


UMAMI_HEADER = [
    "website_id",
    "session_id",
    "visit_id",
    "event_id",
    "hostname",
    "browser",
    "os",
    "device",
    "screen",
    "language",
    "country",
    "region",
    "city",
    "url_path",
    "url_query",
    "utm_source",
    "referrer_path",
    "referrer_query",
    "referrer_domain",
    "page_title",
    "event_type",
    "event_name",
    "tag",
    "distinct_id",
    "created_at",
]


def umami_row(seconds: int, event_type: int, **values: str) -> list[str]:
    from datetime import UTC, datetime

    row = {
        "website_id": "b8d2c1a0-0000-4000-8000-000000000001",
        "session_id": "5a1e7c2b-0000-4000-8000-00000000000a",
        "visit_id": "6b2f8d3c-0000-4000-8000-00000000000b",
        "hostname": "blog.example",
        "browser": "firefox",
        "os": "Linux",
        "device": "desktop",
        "screen": "1920x1080",
        "language": "en-US",
        "country": "FR",
        "region": "FR-IDF",
        "city": "Paris",
        "event_type": str(event_type),
        "created_at": datetime.fromtimestamp(T + seconds, UTC).strftime("%Y-%m-%d %H:%M:%S"),
        **values,
    }
    return [row.get(name, "") for name in UMAMI_HEADER]


def test_umami_csv_export(tmp_path: Path, chdb: str) -> None:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(UMAMI_HEADER)
    writer.writerow(
        umami_row(
            0,
            1,
            event_id="7c3a9e4d-0000-4000-8000-000000000001",
            url_path="/posts/hello",
            url_query="utm_source=news",
            page_title="Hello, world",
            referrer_domain="news.example",
            referrer_path="/top",
        )
    )
    writer.writerow(
        umami_row(
            20,
            2,
            event_id="7c3a9e4d-0000-4000-8000-000000000002",
            url_path="/posts/hello",
            event_name="signup-click",
        )
    )
    writer.writerow(
        umami_row(90, 1, event_id="7c3a9e4d-0000-4000-8000-000000000003", url_path="/about")
    )
    writer.writerow(["too", "few"])
    export = tmp_path / "umami.csv"
    export.write_text(out.getvalue())
    summary = summary_of(
        run_import_cli(tmp_path, import_env(chdb), "--format", "umami", "--json", export)
    )
    assert (summary["imported"], summary["rejected"]) == (3, 1)
    got = rows(
        chdb,
        "toString(id) AS id, name, project_id, session_id, origin, path, referrer, "
        "referrer_name, duration, browser, os, device, country, city, properties",
    )
    assert [r["name"] for r in got] == ["screen_view", "signup-click", "screen_view"]
    assert {r["project_id"] for r in got} == {"b8d2c1a0-0000-4000-8000-000000000001"}
    assert {r["session_id"] for r in got} == {"5a1e7c2b-0000-4000-8000-00000000000a"}
    assert [r["duration"] for r in got] == [90_000, 0, 0]
    assert got[0]["id"] == "7c3a9e4d-0000-4000-8000-000000000001"
    assert (got[0]["origin"], got[0]["path"]) == ("https://blog.example", "/posts/hello")
    assert (got[0]["referrer"], got[0]["referrer_name"]) == (
        "https://news.example/top",
        "news.example",
    )
    assert (got[0]["browser"], got[0]["os"], got[0]["device"]) == ("firefox", "Linux", "desktop")
    assert (got[0]["country"], got[0]["city"]) == ("FR", "Paris")
    assert got[0]["properties"]["page_title"] == "Hello, world"
    assert got[0]["properties"]["url_query"] == "utm_source=news"
    # --project overrides website_id.
    other = tmp_path / "umami-2.csv"
    other.write_text(
        out.getvalue().replace(
            "7c3a9e4d-0000-4000-8000-00000000000", "7c3a9e4d-0000-4000-8000-00000000001"
        )
    )
    summary = summary_of(
        run_import_cli(
            tmp_path, import_env(chdb), "--format", "umami", "--project", "blog", "--json", other
        )
    )
    assert summary["imported"] == 3
    assert query(chdb, "SELECT count() FROM events WHERE project_id = 'blog'") == [(3,)]
