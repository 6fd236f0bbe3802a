"""The replay commands docs/CONFORMANCE.md gives a user (start a matching processor,
replay the shipped recordings against it) work as written: every recording passes.

Only the documented ports are swapped for free ones, so that the test never collides
with a running demo or another test; every other word of the two lines is run as is,
from the checkout's root, with no GATEWAY_* variable set (as the doc asks).
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from gateway_extproc.devtools import localstack
from tests.conformance import stack

DOC = localstack.REPO_ROOT / "docs" / "CONFORMANCE.md"


def documented_commands() -> dict[str, list[str]]:
    """The `gateway-extproc serve` and `replay` command lines of the Replaying section,
    backslash continuations joined, by sub-command."""
    text = DOC.read_text(encoding="utf-8")
    start = text.index("\n## Replaying\n")
    section = text[start : text.index("\n## ", start + 1)]
    joined = re.sub(r"\\\n\s*", " ", section)
    commands: dict[str, list[str]] = {}
    for line in joined.splitlines():
        words = shlex.split(line.strip()) if line.startswith("    gateway-extproc ") else []
        if len(words) > 1 and words[1] in ("serve", "replay"):
            assert words[1] not in commands, f"two {words[1]} lines in the Replaying section"
            commands[words[1]] = words
    return commands


def flag_value(words: list[str], flag: str) -> str:
    return words[words.index(flag) + 1]


def test_the_documented_target_and_replay_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commands = documented_commands()
    serve, replay = commands["serve"], commands["replay"]
    grpc_port = flag_value(serve, "--grpc-port")
    admin_port = flag_value(serve, "--admin-port")
    assert flag_value(replay, "--target").endswith(f":{grpc_port}")
    free_grpc, free_admin = str(localstack.free_port()), str(localstack.free_port())

    def with_free_ports(words: list[str]) -> list[str]:
        # The port flags' values, and the port of replay's HOST:PORT target.
        swap = {grpc_port: free_grpc, admin_port: free_admin}
        return [re.sub(r"(?<=:)\d+$", free_grpc, w) if ":" in w else swap.get(w, w) for w in words]

    monkeypatch.chdir(localstack.REPO_ROOT)  # the doc's relative paths
    env = localstack.environment_without_gateway_settings()
    target = localstack.spawn(
        "documented-target",
        localstack.gateway_command(*with_free_ports(serve)[1:]),
        tmp_path,
        ready_url=f"http://{localstack.LOCALHOST}:{free_admin}/readyz",
        env=env,
    )
    try:
        localstack.wait_ready([target])
        result = subprocess.run(
            localstack.gateway_command(*with_free_ports(replay)[1:]),
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        target.stop()

    count = len(list(stack.RECORDINGS.glob("*.json")))
    assert result.returncode == 0, result.stdout + result.stderr + target.log_tail()
    assert result.stdout.splitlines()[-1] == f"{count} passed, 0 failed"
