"""`serve` listens on loopback outside Kubernetes unless told otherwise: its ext_proc
port has no authentication. Read from the kernel's socket table, not from settings."""

from __future__ import annotations

from pathlib import Path

from gateway_extproc.devtools import localstack

# 127.0.0.1 as /proc/net/tcp writes it, the same mapped into IPv6 (gRPC's sockets are
# dual-stack), and ::1.
LOOPBACK = {
    "0100007F",
    "0000000000000000FFFF00000100007F",
    "00000000000000000000000001000000",
}
LISTEN = "0A"


def listening_addresses(port: int) -> set[str]:
    """The local addresses (hex, as the kernel writes them) of listening TCP sockets on
    `port`, IPv4 and IPv6."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if fields[3] == LISTEN and int(hex_port, 16) == port:
                found.add(address)
    return found


def test_serve_outside_kubernetes_listens_on_loopback_only(tmp_path: Path) -> None:
    models = tmp_path / "models.yaml"
    models.write_text("models: []\n")
    grpc_port, admin_port = localstack.free_port(), localstack.free_port()
    env = localstack.environment_without_gateway_settings()
    env.pop("KUBERNETES_SERVICE_HOST", None)
    argv = localstack.gateway_command(
        "serve",
        "--models-file",
        str(models),
        "--grpc-port",
        str(grpc_port),
        "--admin-port",
        str(admin_port),
    )
    ready = f"http://127.0.0.1:{admin_port}/readyz"
    process = localstack.spawn("serve", argv, tmp_path, ready_url=ready, env=env)
    try:
        localstack.wait_ready([process])
        for port in (grpc_port, admin_port):
            addresses = listening_addresses(port)
            assert addresses, port
            assert addresses <= LOOPBACK, (port, addresses)
    finally:
        assert process.stop(10) == 0, process.log_tail()
