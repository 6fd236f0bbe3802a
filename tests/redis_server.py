"""A real redis-server (Debian's package; `make test` installs it) on a free loopback
port, for the tests of rate limits shared across replicas."""

from __future__ import annotations

import contextlib
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway_extproc.devtools import localstack
from gateway_extproc.devtools.localstack import LOCALHOST

START_TIMEOUT = 10.0


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection((LOCALHOST, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextlib.contextmanager
def running_redis(log_dir: Path) -> Iterator[str]:
    """Start redis-server, yield its URL, stop it at the end."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: `make test` installs it (apt-get)")
    port = localstack.free_port()
    data = log_dir / f"redis-{port}"
    data.mkdir(parents=True, exist_ok=True)
    argv = [
        binary,
        "--port", str(port),
        "--bind", LOCALHOST,
        "--save", "",
        "--appendonly", "no",
        "--dir", str(data),
    ]  # fmt: skip
    process = localstack.spawn(f"redis-{port}", argv, log_dir)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not _answers_ping(port):
            if not process.alive() or time.monotonic() > deadline:
                pytest.fail(f"redis-server did not start:\n{process.log_tail()}")
            time.sleep(0.05)
        yield f"redis://{LOCALHOST}:{port}/0"
    finally:
        process.stop()
