"""`gateway-extproc serve` refuses what it cannot run in one line and a non-zero exit:
a strategy it does not know (flag or variable, one process or workers), a port that
something else holds (admin or gRPC, even a socket that allows sharing). Running, it
answers malformed calls without a traceback or a line per call."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from gateway_extproc import cli
from gateway_extproc.config import Settings
from gateway_extproc.devtools import localstack
from gateway_extproc.devtools.localstack import LOCALHOST, free_port, gateway_command

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


def test_malformed_calls_from_any_peer_are_one_line_each_kind_never_a_traceback(tmp_path: Path):
    models = tmp_path / "models.yaml"
    models.write_text("models: []\n")
    grpc_port, admin_port = free_port(), free_port()
    process = localstack.start_processor(
        models,
        tmp_path,
        grpc_port=grpc_port,
        admin_port=admin_port,
        extra_args=["--log-level", "warning", "--drain-delay", "0"],
        env=localstack.environment_without_gateway_settings(),
        name="gateway-extproc",
    )
    try:
        localstack.wait_ready([process], timeout=START_TIMEOUT_S)
        with grpc.insecure_channel(f"{LOCALHOST}:{grpc_port}") as channel:
            raw = {"request_serializer": bytes, "response_deserializer": bytes}
            check = channel.unary_unary("/grpc.health.v1.Health/Check", **raw)
            process_call = channel.stream_stream(PROCESS, **raw)
            for _ in range(3):
                with pytest.raises(grpc.RpcError):
                    check(NOT_A_MESSAGE, timeout=30)
                with pytest.raises(grpc.RpcError) as refused:
                    list(process_call(iter([NOT_A_MESSAGE]), timeout=30))
                assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
                with pytest.raises(grpc.RpcError) as too_large:
                    list(process_call(iter([b"\0" * (9 * 1024 * 1024 + 1)]), timeout=30))
                assert too_large.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        assert process.stop() == 0
    log = process.log_path.read_text()
    assert "Traceback" not in log, log
    lines = log.splitlines()
    assert len([line for line in lines if "malformed_message" in line]) == 2, log  # two kinds
    assert not [line for line in lines if "request_" in line], log  # no access-log lines


PROCESS = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
NOT_A_MESSAGE = b"\xff\xff\xff\xff\x0f"  # a varint that never ends
