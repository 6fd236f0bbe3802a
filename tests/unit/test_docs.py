"""The user docs name every flag the processor takes, so they cannot silently drift."""

from __future__ import annotations

import argparse
from pathlib import Path

from gateway_extproc.config import add_serve_arguments, env_name
from gateway_extproc.models.source import source_names

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
