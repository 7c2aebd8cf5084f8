"""The README's configuration table is generated from the settings object."""

from __future__ import annotations

from pathlib import Path

from worker.settings import Settings

README = Path(__file__).resolve().parent.parent / "README.md"


def test_configuration_table_matches_the_settings_object() -> None:
    text = README.read_text()
    start = text.index("<!-- settings:start -->\n") + len("<!-- settings:start -->\n")
    end = text.index("<!-- settings:end -->")
    assert text[start:end].strip() == Settings.markdown_table(), (
        "README table is stale: paste Settings.markdown_table() between the settings markers"
    )
