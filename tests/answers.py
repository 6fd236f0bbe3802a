"""What a client of a started gateway gets for one request, over real gRPC: the status
and error code of an immediate answer, or 200 and the pod it was routed to."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc

from tests import frames


async def status_for(stub: ext_grpc.ExternalProcessorStub, model: str) -> tuple[int, str]:
    """(status, error code) of an immediate answer, or (200, destination) when routed."""
    sent = [frames.request_headers(), frames.request_body(orjson.dumps({"model": model}))]
    last = [a async for a in stub.Process(iter(sent))][-1]
    if last.HasField("immediate_response"):
        error = orjson.loads(last.immediate_response.body)["error"]
        return last.immediate_response.status.code, error["code"]
    return 200, frames.set_headers(last)["x-gateway-destination-endpoint"]


async def eventually_status(
    stub: ext_grpc.ExternalProcessorStub, model: str, want: tuple[int, str]
) -> None:
    """Ask again (at most 200 times, 50 ms apart) until the answer is `want`: discovery
    applies what it sees on its own time."""
    got = None
    for _ in range(200):
        got = await status_for(stub, model)
        if got == want:
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"{model}: expected {want}, still {got}")
