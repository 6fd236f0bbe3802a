"""`serve --discovery kubernetes` wired end to end over gRPC, against the fake API server."""

from __future__ import annotations

import asyncio

import grpc
import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc

from gateway_extproc.config import Settings
from gateway_extproc.devtools.localstack import free_port
from gateway_extproc.server import start_gateway, stop_gateway
from tests import frames
from tests.fakes.kube_apiserver import FakeKubeApiServer, write_kubeconfig


async def status_for(stub: ext_grpc.ExternalProcessorStub, model: str) -> tuple[int, str]:
    """What a client would get: the immediate status and error code, or 200 when routed."""
    sent = [frames.request_headers(), frames.request_body(orjson.dumps({"model": model}))]
    answers = [a async for a in stub.Process(iter(sent))]
    last = answers[-1]
    if last.HasField("immediate_response"):
        error = orjson.loads(last.immediate_response.body)["error"]
        return last.immediate_response.status.code, error["code"]
    return 200, ""


async def eventually_status(stub, model: str, want: tuple[int, str]) -> None:
    got = None
    for _ in range(200):
        got = await status_for(stub, model)
        if got == want:
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"{model}: expected {want}, still {got}")


async def test_pod_lifecycle_gives_503_200_503_404(tmp_path):
    with FakeKubeApiServer() as fake:
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", fake.url)
        gateway = await start_gateway(
            Settings(
                listen_host="127.0.0.1",
                grpc_port=0,
                admin_port=0,
                discovery="kubernetes",
                kubeconfig=str(kubeconfig),
            )
        )
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
                stub = ext_grpc.ExternalProcessorStub(channel)
                for _ in range(200):
                    if gateway.ready():
                        break
                    await asyncio.sleep(0.05)
                assert gateway.ready()
                await eventually_status(stub, "llama", (404, "model_not_found"))
                # Loopback at a closed port: the gateway scrapes routable pods, and its
                # scrapes must never leave this machine.
                fake.create_pod(
                    "llama-0",
                    model="llama",
                    ip="127.0.0.1",
                    labels={"model.aibrix.ai/port": str(free_port())},
                    phase="Running",
                )
                await eventually_status(stub, "llama", (503, "no_ready_pods"))
                fake.update_pod("llama-0", ready=True)
                await eventually_status(stub, "llama", (200, ""))
                fake.mark_terminating("llama-0")
                await eventually_status(stub, "llama", (503, "model_terminating"))
                fake.delete_pod("llama-0")
                await eventually_status(stub, "llama", (404, "model_not_found"))
        finally:
            await stop_gateway(gateway)
