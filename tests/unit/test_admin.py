"""Admin HTTP: readiness follows the dictionary; /debug/models and /metrics show it."""

from __future__ import annotations

import aiohttp

from gateway_extproc.config import Settings
from gateway_extproc.server import start_gateway, stop_gateway
from tests.settings import loopback_settings
from tests.waiting import eventually


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
        loopback_settings(
            models_file=str(tmp_path / "missing.yaml"),
        )
    )
    try:
        url = f"http://127.0.0.1:{gateway.admin_port}/readyz"
        async with aiohttp.ClientSession() as http, http.get(url) as reply:
            assert reply.status == 503
            text = await reply.text()
        assert "missing.yaml has not loaded" in text
        assert "no dictionary is in force yet" in text
    finally:
        await stop_gateway(gateway)


async def test_readyz_says_a_reload_failed_while_the_last_good_dictionary_serves(tmp_path):
    models = tmp_path / "models.yaml"
    good = "models:\n  - {name: m, pods: [{name: p0, address: '127.0.0.1:18001'}]}\n"
    models.write_text(good)
    gateway = await start_gateway(
        loopback_settings(
            models_file=str(models),
            models_reload_interval=0.05,
        )
    )
    base = f"http://127.0.0.1:{gateway.admin_port}"
    try:
        async with aiohttp.ClientSession() as http:
            models.write_text("models: " + "[" * 20_000)  # RecursionError in the parser
            await eventually(lambda: gateway.registry.problem, what="the reload rejected")
            async with http.get(base + "/readyz") as reply:
                assert reply.status == 200  # the last good dictionary still routes
                text = await reply.text()
            assert text.startswith("ready\n")
            assert "the last reload of" in text and "nested too deeply" in text
            assert "stays in force" in text
            async with http.get(base + "/metrics") as reply:
                metrics = await reply.text()
            assert "gateway_models_reload_failing 1.0" in metrics
            assert "gateway_models_reload_failures_total" in metrics

            models.write_text(good.replace("p0", "p1"))  # the watcher is still alive
            await eventually(lambda: gateway.registry.pod("p1"), what="the next good file")
            async with http.get(base + "/readyz") as reply:
                assert (reply.status, await reply.text()) == (200, "ready\n")
    finally:
        await stop_gateway(gateway)
