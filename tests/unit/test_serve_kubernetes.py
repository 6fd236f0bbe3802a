"""`serve --discovery kubernetes` wired end to end over gRPC, against the fake API server."""

from __future__ import annotations

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc

from gateway_extproc.devtools.localstack import free_port
from gateway_extproc.server import start_gateway, stop_gateway
from tests.answers import eventually_status
from tests.fakes.kube_apiserver import FakeKubeApiServer, write_kubeconfig
from tests.settings import loopback_settings
from tests.waiting import eventually


async def test_pod_lifecycle_gives_503_200_503_404(tmp_path):
    with FakeKubeApiServer() as fake:
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", fake.url)
        gateway = await start_gateway(
            loopback_settings(
                discovery="kubernetes",
                kubeconfig=str(kubeconfig),
            )
        )
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
                stub = ext_grpc.ExternalProcessorStub(channel)
                await eventually(gateway.ready, what="the gateway synced")
                await eventually_status(stub, "llama", (404, "model_not_found"))
                # Loopback at a closed port: the gateway scrapes routable pods, and its
                # scrapes must never leave this machine.
                port = free_port()
                fake.create_pod(
                    "llama-0",
                    model="llama",
                    ip="127.0.0.1",
                    labels={"model.aibrix.ai/port": str(port)},
                    phase="Running",
                )
                await eventually_status(stub, "llama", (503, "no_ready_pods"))
                fake.update_pod("llama-0", ready=True)
                await eventually_status(stub, "llama", (200, f"127.0.0.1:{port}"))
                fake.mark_terminating("llama-0")
                await eventually_status(stub, "llama", (503, "model_terminating"))
                fake.delete_pod("llama-0")
                await eventually_status(stub, "llama", (404, "model_not_found"))
        finally:
            await stop_gateway(gateway)
