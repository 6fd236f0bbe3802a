"""Session affinity shared by replicas through a real Redis (`--redis-url`): a session
placed by one replica is routed to the same pod by another, whether it learns it while
running or when it starts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc

from gateway_extproc.server import Gateway, start_gateway, stop_gateway
from tests import frames
from tests.redis_server import running_redis
from tests.settings import loopback_settings

MODELS = """
models:
  - name: llama
    pods:
      - {name: llama-0, address: 127.0.0.1:18001}
      - {name: llama-1, address: 127.0.0.1:18002}
      - {name: llama-2, address: 127.0.0.1:18003}
"""
SESSIONS = [f"conversation-{i}" for i in range(12)]


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    with running_redis(tmp_path / "redis") as url:
        yield url


@pytest.fixture
def models(tmp_path: Path) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(MODELS)
    return path


async def replica(models: Path, redis_url: str) -> Gateway:
    return await start_gateway(
        loopback_settings(
            models_file=str(models),
            default_strategy="session-affinity",
            redis_url=redis_url,
            grace_period=1.0,
            drain_delay=0.0,
        )
    )


@pytest.fixture
async def replicas(models: Path, redis_url: str) -> AsyncIterator[list[Gateway]]:
    started: list[Gateway] = []
    yield started
    for gateway in started:
        await stop_gateway(gateway)


async def route(gateway: Gateway, session: str) -> str:
    """The pod a request of `session` is routed to (one-filter stream)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        stub = ext_grpc.ExternalProcessorStub(channel)
        call = stub.Process()
        await call.write(frames.request_headers(headers={"x-session-id": session}))
        await call.read()
        await call.write(frames.request_body(orjson.dumps({"model": "llama"})))
        answer = await call.read()
        call.cancel()
    return frames.set_headers(answer)["target-pod"]


async def knows(gateway: Gateway, session: str) -> None:
    affinity = gateway.router.strategy("session-affinity").sessions  # type: ignore[attr-defined]
    for _ in range(250):
        if affinity.pod_of(session) is not None:
            return
        await asyncio.sleep(0.02)
    pytest.fail(f"{session} never reached the other replica")


async def test_a_session_placed_by_one_replica_stays_on_its_pod_through_another(
    models: Path, redis_url: str, replicas: list[Gateway]
) -> None:
    first = await replica(models, redis_url)
    replicas.append(first)
    second = await replica(models, redis_url)
    replicas.append(second)
    await asyncio.wait_for(second.shared_sessions.subscribed.wait(), 5)  # type: ignore[union-attr]
    placed = {session: await route(first, session) for session in SESSIONS}
    assert len(set(placed.values())) > 1  # spread over the pods, not one for all
    for session in SESSIONS:
        await knows(second, session)
    assert {session: await route(second, session) for session in SESSIONS} == placed


async def test_a_replica_that_starts_later_loads_the_sessions_already_placed(
    models: Path, redis_url: str, replicas: list[Gateway]
) -> None:
    first = await replica(models, redis_url)
    replicas.append(first)
    placed = {session: await route(first, session) for session in SESSIONS}
    # Written by a background task: wait until Redis has them all.
    for _ in range(250):
        if len(await first.shared_sessions._client.keys("gateway-extproc:session:*")) == 12:  # type: ignore[union-attr]
            break
        await asyncio.sleep(0.02)
    late = await replica(models, redis_url)
    replicas.append(late)
    assert {session: await route(late, session) for session in SESSIONS} == placed


async def test_without_redis_answering_sessions_stay_per_replica(
    models: Path, replicas: list[Gateway]
) -> None:
    # Nothing listens on this port: routing still works, from the replica's own map.
    gateway = await replica(models, "redis://127.0.0.1:1/0")
    replicas.append(gateway)
    pod = await route(gateway, "lonely")
    assert await route(gateway, "lonely") == pod
