"""Admin HTTP: /metrics (Prometheus), /healthz, /readyz, /debug/models, /debug/kv-events."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway_extproc.models.registry import ModelRegistry
from gateway_extproc.routing.health import PodHealth
from gateway_extproc.routing.inflight import InFlightCounter


def models_debug_view(
    registry: ModelRegistry, inflight: InFlightCounter, health: PodHealth | None = None
) -> dict[str, object]:
    health = health or PodHealth()
    return {
        "synced": registry.synced,
        "problem": registry.problem,
        "models": {
            name: {
                "state": view.state.value,
                "pods": [
                    {
                        "name": pod.key,
                        "address": pod.address,
                        "ready": pod.ready,
                        "terminating": pod.terminating,
                        "routable": pod.routable,
                        "in_flight": inflight.count(pod.key),
                        "health": health.describe(pod.key),
                    }
                    for pod in view.pods
                ],
            }
            for name, view in sorted(registry.models().items())
        },
    }


def build_admin_app(
    registry: ModelRegistry,
    inflight: InFlightCounter,
    is_ready: Callable[[], bool],
    kv_events: Callable[[], dict[str, Any]] | None = None,
    health: PodHealth | None = None,
    draining: Callable[[], bool] = lambda: False,
) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        if draining():
            return web.Response(status=503, text="not ready: shutting down (draining)\n")
        # The source's latest problem (a rejected models file) is said either way: ready
        # on the last good dictionary, or not ready because there is none.
        problem = registry.problem
        if is_ready():
            return web.Response(text=f"ready\n{problem}\n" if problem else "ready\n")
        reason = problem or "the model dictionary has not synced"
        return web.Response(status=503, text=f"not ready: {reason}\n")

    async def debug_models(_: web.Request) -> web.Response:
        return web.Response(
            body=orjson.dumps(
                models_debug_view(registry, inflight, health), option=orjson.OPT_INDENT_2
            ),
            content_type="application/json",
        )

    async def debug_kv_events(_: web.Request) -> web.Response:
        view = kv_events() if kv_events is not None else {}
        return web.Response(
            body=orjson.dumps({"pods": view}, option=orjson.OPT_INDENT_2),
            content_type="application/json",
        )

    app = web.Application()
    app.router.add_get("/debug/kv-events", debug_kv_events)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/debug/models", debug_models)
    return app
