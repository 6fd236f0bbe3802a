"""A freshly started processor for the conformance replay: the real `gateway-extproc
serve` subprocess on the conformance dictionary, ephemeral ports, nothing behind it
(replay speaks ext_proc to it directly; no engine or Envoy is involved)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway_extproc.devtools import localstack
from gateway_extproc.devtools.localstack import ManagedProcess
from tests.conformance import stack


@dataclass(frozen=True)
class Target:
    process: ManagedProcess
    grpc_port: int

    @property
    def address(self) -> str:
        return f"{localstack.LOCALHOST}:{self.grpc_port}"


@pytest.fixture(scope="session")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    log_dir: Path = tmp_path_factory.mktemp("conformance")
    grpc_port, admin_port = localstack.free_port(), localstack.free_port()
    process = stack.start_processor(log_dir, grpc_port, admin_port)
    try:
        localstack.wait_ready([process])
        yield Target(process, grpc_port)
    finally:
        process.stop()
