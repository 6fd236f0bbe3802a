"""`gateway-extproc serve` refuses what it cannot run in one line and a non-zero exit:
a strategy it does not know (flag or variable, one process or workers), a port that
something else holds (admin or gRPC, even a socket that allows sharing)."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway_extproc import cli
from gateway_extproc.config import Settings
from gateway_extproc.devtools.localstack import LOCALHOST, gateway_command

START_TIMEOUT_S = 120  # a start that fails; generous for a loaded machine


def serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `serve` quietly (errors only) on free ports unless `args` name others."""
    command = gateway_command(
        "serve", "--listen-host", LOCALHOST, "--log-level", "error", "--discovery", "static"
    )
    if "--grpc-port" not in args:
        command += ["--grpc-port", "0"]
    if "--admin-port" not in args:
        command += ["--admin-port", "0"]
    environment = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
        env={**environment, **(env or {})},
        check=False,
    )


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (("--default-strategy", "fastest"), {}),
        ((), {"GATEWAY_DEFAULT_STRATEGY": "fastest"}),
        (("--workers", "2"), {"GATEWAY_DEFAULT_STRATEGY": "fastest"}),
    ],
)
def test_an_unknown_default_strategy_is_one_line_before_anything_starts(args, env):
    done = serve(*args, env=env)
    assert done.returncode == 2
    line = one_line(done)
    assert line.startswith("gateway-extproc serve: error: --default-strategy")
    assert "'fastest' is not a routing strategy" in line
    assert "predicted-latency" in line and "least-request" in line  # what it could be


def test_a_bad_flag_is_one_line_not_the_whole_usage():
    done = serve("--workers", "0")
    assert done.returncode == 2
    assert "--workers" in one_line(done)


def test_strategies_the_router_accepts_pass_the_check(tmp_path: Path):
    default_strategy_problem = cli.default_strategy_problem
    routing = tmp_path / "routing.yaml"
    routing.write_text("profiles:\n  - name: mine\n    scorers: [{name: least-request}]\n")
    for name in ("predicted-latency", "Least-Request", "prefix-cache:3,least-request", ""):
        assert default_strategy_problem(Settings(default_strategy=name)) == ""
    assert default_strategy_problem(Settings(default_strategy="mine")) != ""
    mine = Settings(default_strategy="mine", routing_config=str(routing))
    assert default_strategy_problem(mine) == ""


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port a stranger listens on, allowing sharing (as gRPC servers do by default)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as stranger:
        stranger.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        stranger.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        stranger.bind((LOCALHOST, 0))
        stranger.listen()
        yield int(stranger.getsockname()[1])


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("port", ["--grpc-port", "--admin-port"])
def test_a_busy_port_is_one_line_and_a_failed_start(held_port: int, port: str, workers: str):
    done = serve(port, str(held_port), "--workers", workers)
    assert done.returncode == 1
    line = one_line(done)
    what = "gRPC" if port == "--grpc-port" else "admin"
    assert "gateway_failed_to_start" in line
    assert f"cannot listen on {LOCALHOST}:{held_port} ({what}): address already in use" in line
