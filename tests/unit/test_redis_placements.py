"""Prefix placements shared by replicas through a real Redis (`--redis-url`): a prompt
one replica placed on a pod is routed to that pod by another, whose own prefix index
never saw it; with Redis gone each replica keeps routing on its own placements; a
message that is not a placement is counted and skipped."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc
from prometheus_client import REGISTRY

from gateway_extproc.redis_placements import CHANNEL, SharedPlacements, encode
from gateway_extproc.routing.prefix import Placements
from gateway_extproc.routing.prefix_capacity import CapacityIndex
from gateway_extproc.server import Gateway, start_gateway, stop_gateway
from tests import frames
from tests.redis_server import running_redis
from tests.settings import loopback_settings
from tests.waiting import eventually

# What four idle engines report: prefix-cache routing scores pods only with metrics.
IDLE = (
    'vllm:num_requests_waiting{model_name="llama"} 0\n'
    'vllm:num_requests_running{model_name="llama"} 0\n'
    'vllm:kv_cache_usage_perc{model_name="llama"} 0.1\n'
)
PODS = 4
# Long enough for many 128-character blocks; distinct from the first block on.
PROMPTS = [f"tenant {i}: " + "the system prompt of this tenant, " * 40 for i in range(8)]


def counted(outcome: str) -> float:
    value = REGISTRY.get_sample_value("gateway_shared_placements_total", {"outcome": outcome})
    return value or 0.0


def rejected() -> float:
    return REGISTRY.get_sample_value("gateway_shared_placement_messages_rejected_total") or 0.0


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    with running_redis(tmp_path / "redis") as url:
        yield url


@pytest.fixture
async def models(tmp_path: Path) -> AsyncIterator[Path]:
    """A models file of four pods, each an idle engine's /metrics endpoint."""

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text=IDLE, content_type="text/plain")

    runners = []
    lines = []
    for i in range(PODS):
        app = web.Application()
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        lines.append(f"      - {{name: llama-{i}, address: 127.0.0.1:{port}}}")
    path = tmp_path / "models.yaml"
    path.write_text("models:\n  - name: llama\n    pods:\n" + "\n".join(lines) + "\n")
    yield path
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def replicas() -> AsyncIterator[list[Gateway]]:
    started: list[Gateway] = []
    yield started
    for gateway in started:
        await stop_gateway(gateway)


async def replica(models: Path, redis_url: str, seed: int) -> Gateway:
    gateway = await start_gateway(
        loopback_settings(
            models_file=str(models),
            default_strategy="prefix-cache",
            redis_url=redis_url,
            routing_seed=seed,
            grace_period=1.0,
            drain_delay=0.0,
            slow_start_window=0.0,  # every engine is idle: none is ramping up
        )
    )
    store = gateway.scraper.store
    await eventually(
        lambda: all(store.latest(pod.key) for pod in gateway.registry.pods()),
        what="every engine scraped",
    )
    return gateway


async def route(gateway: Gateway, prompt: str) -> str:
    """The pod a completion of `prompt` is routed to (one-filter stream)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        stub = ext_grpc.ExternalProcessorStub(channel)
        call = stub.Process()
        await call.write(frames.request_headers(path="/v1/completions"))
        await call.read()
        await call.write(frames.request_body(orjson.dumps({"model": "llama", "prompt": prompt})))
        answer = await call.read()
        call.cancel()
    return frames.set_headers(answer)["target-pod"]


def sharing(gateway: Gateway) -> SharedPlacements:
    assert gateway.shared_placements is not None
    return gateway.shared_placements


async def test_a_prompt_placed_by_one_replica_is_routed_to_its_pod_by_another(
    models: Path, redis_url: str, replicas: list[Gateway]
) -> None:
    first = await replica(models, redis_url, seed=1)
    replicas.append(first)
    second = await replica(models, redis_url, seed=2)
    replicas.append(second)
    for gateway in replicas:
        await eventually(sharing(gateway).subscribed.is_set, what="subscribed")
    applied = counted("applied")
    placed = {prompt: await route(first, prompt) for prompt in PROMPTS}
    assert len(set(placed.values())) > 1  # spread over the pods, not one for all
    await eventually(
        lambda: counted("applied") >= applied + len(PROMPTS), what="placements applied"
    )
    assert {prompt: await route(second, prompt) for prompt in PROMPTS} == placed


async def test_with_redis_gone_each_replica_keeps_routing_on_its_own_placements(
    models: Path, tmp_path: Path, replicas: list[Gateway]
) -> None:
    with running_redis(tmp_path / "gone") as url:
        gateway = await replica(models, url, seed=1)
        replicas.append(gateway)
        await eventually(sharing(gateway).subscribed.is_set, what="subscribed")
    # Redis has stopped: requests are still answered, from this replica's own index.
    dropped = counted("dropped")
    placed = {prompt: await route(gateway, prompt) for prompt in PROMPTS}
    await eventually(lambda: counted("dropped") > dropped, what="placements counted dropped")
    assert {prompt: await route(gateway, prompt) for prompt in PROMPTS} == placed


async def test_messages_that_are_not_placements_are_counted_and_skipped(
    redis_url: str,
) -> None:
    here = Placements(seed=7)
    index = CapacityIndex()
    here.add("capacity", index)
    sharing = SharedPlacements(redis_url, here.apply)
    await sharing.start()
    client = aioredis.Redis.from_url(redis_url)
    try:
        await eventually(sharing.subscribed.is_set, what="subscribed")
        before = rejected()
        hashes = index.hashes("llama", PROMPTS[0])
        garbage = [
            b"not msgpack at all",
            b"\x09" + encode(b"elsewhere", [("capacity", "pod-a", hashes)])[1:],  # version 9
            b"\x01\xc1",  # a version byte, then bytes msgpack never starts with
            b"\x01" + orjson.dumps(["elsewhere", [["capacity", "pod-a", "hashes"]]]),
            encode(b"elsewhere", [("no-such-index", "pod-a", hashes)]),
        ]
        for message in garbage:
            await client.publish(CHANNEL, message)
        # A good message after the bad ones is still applied: the listener lives on.
        await client.publish(CHANNEL, encode(b"elsewhere", [("capacity", "pod-b", hashes)]))
        await eventually(lambda: index.matches(hashes) == {"pod-b": len(hashes)}, what="applied")
        assert rejected() - before == len(garbage)
    finally:
        await client.aclose()
        await sharing.stop()


async def test_a_placement_on_a_pod_this_replica_does_not_know_is_skipped(
    redis_url: str,
) -> None:
    """A pod deleted here (or not discovered yet) gets no index entries back from a
    placement another replica made on it."""
    here = Placements(seed=7)
    index = CapacityIndex()
    here.add("capacity", index)
    sharing = SharedPlacements(redis_url, here.apply, knows_pod=lambda pod: pod != "deleted")
    await sharing.start()
    client = aioredis.Redis.from_url(redis_url)
    try:
        await eventually(sharing.subscribed.is_set, what="subscribed")
        skipped = counted("unknown_pod")
        hashes = index.hashes("llama", PROMPTS[0])
        placements = [("capacity", "deleted", hashes), ("capacity", "pod-b", hashes)]
        await client.publish(CHANNEL, encode(b"elsewhere", placements))
        await eventually(lambda: index.matches(hashes) == {"pod-b": len(hashes)}, what="applied")
        assert index.held("deleted") == 0
        assert counted("unknown_pod") == skipped + 1
    finally:
        await client.aclose()
        await sharing.stop()
