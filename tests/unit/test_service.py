"""The ext_proc servicer over real gRPC: a stream in, responses out, and clean ends."""

from __future__ import annotations

import asyncio

import grpc
import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway_extproc.config import Settings
from gateway_extproc.server import start_gateway, stop_gateway
from tests import frames

MODELS = """
models:
  - name: llama
    pods:
      - {name: llama-0, address: 127.0.0.1:18001}
"""


@pytest.fixture
async def gateway(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text(MODELS)
    gateway = await start_gateway(
        Settings(
            listen_host="127.0.0.1",
            grpc_port=0,
            admin_port=0,
            models_file=str(path),
            grace_period=1.0,
        )
    )
    yield gateway
    await stop_gateway(gateway)


@pytest.fixture
async def channel(gateway):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        yield channel


async def test_a_whole_exchange_over_grpc(gateway, channel):
    stub = ext_grpc.ExternalProcessorStub(channel)
    sent = [
        frames.request_headers(),
        frames.request_body(orjson.dumps({"model": "llama", "prompt": "hi"})),
        frames.response_headers(200),
        frames.response_body(b"{}", end_of_stream=True),
        frames.response_body(b"", end_of_stream=True),  # after EndOfStream: a no-op
    ]
    got = [r async for r in stub.Process(iter(sent))]
    assert [r.WhichOneof("response") for r in got] == [
        "request_headers",
        "request_body",
        "response_headers",
        "response_body",
        "response_body",
    ]
    assert frames.set_headers(got[1])["target-pod"] == "127.0.0.1:18001"
    assert gateway.inflight.total() == 0


async def test_cancelled_stream_releases_the_pod(gateway, channel):
    stub = ext_grpc.ExternalProcessorStub(channel)
    call = stub.Process()
    await call.write(frames.request_headers())
    await call.read()
    await call.write(frames.request_body(orjson.dumps({"model": "llama"})))
    await call.read()
    assert gateway.inflight.total() == 1
    call.cancel()  # what Envoy does when the client goes away mid-request
    for _ in range(100):
        if gateway.inflight.total() == 0:
            break
        await asyncio.sleep(0.02)
    assert gateway.inflight.total() == 0


async def test_health_reports_serving_once_the_dictionary_is_loaded(gateway, channel):
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "envoy.service.ext_proc.v3.ExternalProcessor"):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
