"""`serve --discovery inferencepool` as a gateway's endpoint picker: ext_proc over TLS
(self-signed, or the key pair in --cert-path), gRPC health on its own plaintext port,
and a dictionary that follows the pool."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway_extproc import server, tls
from gateway_extproc.config import Settings
from gateway_extproc.devtools import localstack
from gateway_extproc.devtools.localstack import free_port
from gateway_extproc.server import Gateway, start_gateway, stop_gateway
from tests.answers import eventually_status, status_for
from tests.fakes.kube_apiserver import FakeKubeApiServer, write_kubeconfig
from tests.settings import loopback_settings
from tests.waiting import eventually

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
APP = {"app": "llama"}


def settings(kubeconfig: Path, **changes) -> Settings:
    base = loopback_settings(
        grpc_health_port=0,
        discovery="inferencepool",
        pool_name="llama-pool",
        kubeconfig=str(kubeconfig),
    )
    return replace(base, **changes)


@pytest.fixture
def fake() -> Iterator[FakeKubeApiServer]:
    with FakeKubeApiServer() as server_:
        yield server_


@pytest.fixture
def kubeconfig(tmp_path: Path, fake: FakeKubeApiServer) -> Path:
    return write_kubeconfig(tmp_path / "kubeconfig", fake.url)


def tls_channel(port: int, certificate: bytes) -> grpc.aio.Channel:
    """A client that trusts exactly `certificate` and checks the name in it."""
    name = (
        x509.load_pem_x509_certificate(certificate)
        .subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0]
        .value
    )
    return grpc.aio.secure_channel(
        f"127.0.0.1:{port}",
        grpc.ssl_channel_credentials(root_certificates=certificate),
        options=[("grpc.ssl_target_name_override", str(name))],
    )


async def health(gateway: Gateway, service: str) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.health_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return reply.status


async def test_self_signed_tls_routes_the_pool_and_follows_it(fake, kubeconfig):
    fake.create_pool("llama-pool", selector=APP, target_ports=[free_port(), free_port()])
    ports = [p["number"] for p in fake.get_pool("llama-pool")["spec"]["targetPorts"]]
    # Loopback: the gateway scrapes routable endpoints, which must never leave this host.
    fake.create_pod(
        "llama-0",
        labels={**APP, "model.aibrix.ai/name": "llama"},
        ip="127.0.0.1",
        phase="Running",
        ready=True,
    )
    gateway = await start_gateway(settings(kubeconfig))
    try:
        await eventually(gateway.ready, what="the gateway synced")
        certificate = ssl.get_server_certificate(("127.0.0.1", gateway.grpc_port)).encode()
        async with tls_channel(gateway.grpc_port, certificate) as channel:
            stub = ext_grpc.ExternalProcessorStub(channel)
            seen = set()
            for _ in range(40):
                seen.add(await status_for(stub, "llama"))
                if len(seen) == 2:
                    break
            assert seen == {(200, f"127.0.0.1:{port}") for port in ports}
            fake.delete_pool("llama-pool")
            await eventually_status(stub, "llama", (404, "model_not_found"))
        # A plaintext client gets nowhere on the TLS port.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as plain:
            with pytest.raises(grpc.aio.AioRpcError):
                await status_for(ext_grpc.ExternalProcessorStub(plain), "llama")
    finally:
        await stop_gateway(gateway)


async def test_cert_path_serves_the_given_key_pair(fake, kubeconfig, tmp_path):
    pair = tls.self_signed_key_pair()
    (tmp_path / "tls.crt").write_bytes(pair.certificate_pem)
    (tmp_path / "tls.key").write_bytes(pair.private_key_pem)
    gateway = await start_gateway(settings(kubeconfig, cert_path=str(tmp_path)))
    try:
        served = ssl.get_server_certificate(("127.0.0.1", gateway.grpc_port)).encode()
        assert x509.load_pem_x509_certificate(served) == x509.load_pem_x509_certificate(
            pair.certificate_pem
        )
        async with tls_channel(gateway.grpc_port, pair.certificate_pem) as channel:
            await eventually_status(
                ext_grpc.ExternalProcessorStub(channel), "x", (404, "model_not_found")
            )
    finally:
        await stop_gateway(gateway)


async def test_secure_serving_false_is_plaintext(fake, kubeconfig):
    gateway = await start_gateway(settings(kubeconfig, secure_serving=False))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
            stub = ext_grpc.ExternalProcessorStub(channel)
            await eventually_status(stub, "llama", (404, "model_not_found"))
    finally:
        await stop_gateway(gateway)


async def test_health_port_answers_liveness_and_readiness(fake, kubeconfig):
    fake.go_down("503")  # the pool cannot be listed: alive, not ready
    gateway = await start_gateway(settings(kubeconfig))
    try:
        assert gateway.health_port not in (0, gateway.grpc_port)
        assert await health(gateway, "liveness") == SERVING
        for service in ("readiness", "envoy.service.ext_proc.v3.ExternalProcessor"):
            assert await health(gateway, service) == NOT_SERVING
        fake.come_back()
        for _ in range(200):
            await server._set_serving(gateway)  # what `serve` does every 0.2 s
            if await health(gateway, "readiness") == SERVING:
                break
            await asyncio.sleep(0.05)
        for service in ("readiness", "envoy.service.ext_proc.v3.ExternalProcessor"):
            assert await health(gateway, service) == SERVING
        # The upstream conformance manifests probe this one.
        assert await health(gateway, "inference-extension") == SERVING
    finally:
        await stop_gateway(gateway)


@pytest.mark.parametrize(
    ("flags", "problem"),
    [
        ([], "--pool-name"),
        (["--pool-name", "p", "--cert-path", "/nonexistent/certs"], "/nonexistent/certs/tls.crt"),
    ],
)
def test_bad_picker_settings_stop_start_up_with_a_clear_message(kubeconfig, flags, problem):
    command = localstack.gateway_command(
        "serve", "--discovery", "inferencepool", "--kubeconfig", str(kubeconfig), *flags
    )
    command += ["--listen-host", "127.0.0.1", "--admin-port", "0", "--grpc-port", "0"]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=60,
        env=localstack.environment_without_gateway_settings(),
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "gateway_failed_to_start" in output and problem in output
    assert "Traceback" not in output


def test_a_key_that_does_not_match_the_certificate_is_refused(tmp_path):
    (tmp_path / "tls.crt").write_bytes(tls.self_signed_key_pair().certificate_pem)
    (tmp_path / "tls.key").write_bytes(tls.self_signed_key_pair().private_key_pem)
    with pytest.raises(tls.TLSConfigError, match=r"not the key of tls\.crt"):
        tls.load_key_pair(tmp_path)
    (tmp_path / "tls.crt").write_text("not a certificate")
    with pytest.raises(tls.TLSConfigError, match="not a PEM certificate"):
        tls.load_key_pair(tmp_path)
