"""Admin HTTP: readiness follows the dictionary; /debug/models and /metrics show it."""

from __future__ import annotations

import aiohttp

from gateway_extproc.config import Settings
from gateway_extproc.server import start_gateway, stop_gateway


async def test_admin_endpoints(tmp_path):
    models = tmp_path / "models.yaml"
    models.write_text(
        "models:\n  - {name: m, pods: [{name: p0, address: '127.0.0.1:18001', state: not-ready}]}\n"
    )
    gateway = await start_gateway(
        Settings(listen_host="127.0.0.1", grpc_port=0, admin_port=0, models_file=str(models))
    )
    base = f"http://127.0.0.1:{gateway.admin_port}"
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(base + "/healthz") as reply:
                assert reply.status == 200
            async with http.get(base + "/readyz") as reply:
                assert reply.status == 200
            async with http.get(base + "/debug/models") as reply:
                view = await reply.json()
            assert view["models"]["m"]["state"] == "unavailable"
            assert view["models"]["m"]["pods"][0]["address"] == "127.0.0.1:18001"
            async with http.get(base + "/metrics") as reply:
                text = await reply.text()
            assert 'gateway_models{state="unavailable"}' in text
            assert "gateway_routing_decision_seconds" in text
    finally:
        await stop_gateway(gateway)


async def test_not_ready_until_the_models_file_loads(tmp_path):
    gateway = await start_gateway(
        Settings(
            listen_host="127.0.0.1",
            grpc_port=0,
            admin_port=0,
            models_file=str(tmp_path / "missing.yaml"),
        )
    )
    try:
        url = f"http://127.0.0.1:{gateway.admin_port}/readyz"
        async with aiohttp.ClientSession() as http, http.get(url) as reply:
            assert reply.status == 503
    finally:
        await stop_gateway(gateway)
