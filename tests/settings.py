"""Settings for a gateway started inside a test: loopback only, on ports the kernel
picks (read them back from the started gateway)."""

from __future__ import annotations

from typing import Any

from gateway_extproc.config import Settings


def loopback_settings(**fields: Any) -> Settings:
    return Settings(listen_host="127.0.0.1", grpc_port=0, admin_port=0, **fields)
