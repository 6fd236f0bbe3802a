"""`gateway-extproc <command> --help` says what each flag is set to when it is not
given, so a user need not read config.py or docs to know the defaults."""

from __future__ import annotations

import os
import re

import pytest

from gateway_extproc import cli


def help_lines(monkeypatch: pytest.MonkeyPatch, command: str, capsys) -> dict[str, str]:
    """Each flag of `command` -> its invocation and help as `--help` prints them, on one
    line."""
    monkeypatch.setenv("COLUMNS", "4000")  # no wrapping inside a help text
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    options = capsys.readouterr().out.split("\noptions:\n", 1)[1]
    lines: dict[str, str] = {}
    for block in re.split(r"\n(?=  -)", options):
        text = " ".join(block.split())
        flag = re.search(r"--[a-z-]+", text)
        if flag and flag.group(0) != "--help":
            lines[flag.group(0)] = text
    return lines


@pytest.fixture(autouse=True)
def no_gateway_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("GATEWAY_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize("command", ["serve", "demo", "simulate", "replay"])
def test_every_flag_states_its_default(monkeypatch, capsys, command):
    lines = help_lines(monkeypatch, command, capsys)

    assert len(lines) >= 2, lines
    required = {"--model", "--target"}  # simulate's and replay's: no default to state
    silent = [flag for flag, text in lines.items() if "default" not in text]
    assert set(silent) <= required


def test_serve_help_shows_the_values_in_force(monkeypatch, capsys):
    lines = help_lines(monkeypatch, "serve", capsys)

    assert "(default: 9002) [env GATEWAY_GRPC_PORT]" in lines["--grpc-port"]
    assert "(default: 0.2)" in lines["--metrics-interval"]
    assert "(default: true)" in lines["--access-log"]
    assert "(default: false)" in lines["--inject-include-usage"]
    assert "else predicted-latency" in lines["--default-strategy"]
    assert "(default: every header trusted)" in lines["--header-policy"]


def test_a_gateway_variable_shows_as_the_default(monkeypatch, capsys):
    monkeypatch.setenv("GATEWAY_GRPC_PORT", "9100")

    assert "(default: 9100)" in help_lines(monkeypatch, "serve", capsys)["--grpc-port"]
