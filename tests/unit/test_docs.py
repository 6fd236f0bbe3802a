"""The user docs name every flag the processor takes, so they cannot silently drift."""

from __future__ import annotations

import argparse
from pathlib import Path

from gateway_extproc.config import add_serve_arguments, env_name
from gateway_extproc.models.source import source_names
from gateway_extproc.routing.registry import PLUGINS, PREDICTED_LATENCY

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_configuration_doc_lists_every_serve_flag_and_its_variable():
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser, source_names())
    text = DOC.read_text(encoding="utf-8")
    missing = []
    for action in parser._actions:
        long_flags = [o for o in action.option_strings if o.startswith("--") and o != "--help"]
        if not long_flags:
            continue
        name = long_flags[0]
        if name[2:] not in text or env_name(name) not in text:
            missing.append(name)
    assert missing == []


def section(text: str, heading: str) -> str:
    """The text under `## heading`, up to the next heading of that level."""
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def test_routing_strategies_section_names_every_builtin_profile_and_scorer():
    strategies = section(DOC.read_text(encoding="utf-8"), "Routing strategies")
    table_rows = {
        line.split("|")[1].strip() for line in strategies.splitlines() if line.startswith("| `")
    }
    # One row per profile a request can name, so a new built-in one cannot go undocumented.
    assert {row.split()[0].strip("`") for row in table_rows} == set(PLUGINS.profiles)
    assert f"`{PREDICTED_LATENCY}` (default)" in table_rows
    # The scorers a weighted combination may name.
    assert [name for name in PLUGINS.scorers if f"`{name}`" not in strategies] == []
    for words in ("routing-strategy", "x-session-id", "prefix-cache:3,least-kv-cache:2"):
        assert words in strategies


def test_readme_points_to_the_strategies_and_names_the_default():
    readme = (DOC.parents[1] / "README.md").read_text(encoding="utf-8")
    strategies = section(readme, "Routing strategies")

    assert "configuration.md#routing-strategies" in strategies
    assert f"`{PREDICTED_LATENCY}`" in strategies
    for words in ("routing-strategy:", "x-session-id", "least-request:2"):
        assert words in strategies
