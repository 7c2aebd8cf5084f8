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


def test_the_flower_the_readme_runs_is_an_extra_it_names() -> None:
    """`celery -A worker flower` needs Flower, which `pip install .` does not bring."""
    import tomllib

    with (README.parent / "pyproject.toml").open("rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    assert any(dep.startswith("flower") for dep in extras["flower"])
    text = README.read_text()
    assert "celery -A worker flower" in text and "pip install '.[flower]'" in text
