"""LoRA adapter discovery on top of the Kubernetes informer.

A real HTTP server stands in for the engine's `/v1/models`; the pod that points at it comes
from the fake API server through the informer, so the adapters must survive the
informer's own updates of the same pod.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from gateway_extproc.models.adapters import adapters_in
from gateway_extproc.models.kubernetes import KubernetesOptions, KubernetesSource
from gateway_extproc.models.registry import ModelRegistry, ModelState
from tests.fakes.kube_apiserver import FakeKubeApiServer, write_kubeconfig
from tests.waiting import eventually

BASE = {"id": "llama", "object": "model", "root": "meta-llama/Llama-3.1-8B", "parent": None}
SQL = {"id": "sql-lora", "object": "model", "root": "/adapters/sql", "parent": "llama"}
CHAT = {"id": "chat-lora", "object": "model", "root": "/adapters/chat", "parent": "llama"}


class Engine:
    """Just enough of an engine: `/v1/models` with a settable listing, or a 500."""

    def __init__(self) -> None:
        self.models: list[dict[str, Any]] = [BASE, SQL]
        self.failing = False
        self.hits = 0

    async def models_handler(self, request: web.Request) -> web.Response:
        self.hits += 1
        if self.failing:
            return web.json_response({"error": "boom"}, status=500)
        return web.json_response({"object": "list", "data": self.models})


@pytest.fixture
async def engine() -> AsyncIterator[tuple[Engine, int]]:
    state = Engine()
    app = web.Application()
    app.router.add_get("/v1/models", state.models_handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield state, port
    await runner.cleanup()


@pytest.fixture
def fake() -> Iterator[FakeKubeApiServer]:
    with FakeKubeApiServer() as server:
        yield server


async def test_adapters_join_the_pod_and_survive_informer_updates(
    fake: FakeKubeApiServer, engine: tuple[Engine, int], tmp_path: Path
) -> None:
    state, port = engine
    fake.create_pod(
        "llama-0",
        model="llama",
        labels={"model.aibrix.ai/port": str(port)},
        ip="127.0.0.1",
        phase="Running",
        ready=True,
    )
    registry = ModelRegistry()
    options = KubernetesOptions(
        kubeconfig=str(write_kubeconfig(tmp_path / "kubeconfig", fake.url)),
        backoff_base=0.05,
        backoff_max=0.3,
        adapter_discovery_interval=0.05,
    )
    source = KubernetesSource(registry, asyncio.get_running_loop(), options)
    await source.start()
    try:
        await eventually(lambda: registry.lookup("sql-lora").state is ModelState.READY)
        [pod] = registry.pods()
        assert pod.models == ("llama", "sql-lora")

        # The informer rewrites the pod; the adapters it does not know about must stay.
        labels = {"model.aibrix.ai/name": "llama", "model.aibrix.ai/port": str(port), "rev": "2"}
        fake.update_pod("llama-0", labels=labels)
        target = str(fake.resource_version)
        await eventually(lambda: source.resource_version() == target)
        await asyncio.sleep(0.05)  # let the loop apply the event
        assert registry.pods()[0].models == ("llama", "sql-lora")

        # A failing engine keeps the last list it gave.
        state.failing = True
        hits = state.hits
        await eventually(lambda: state.hits >= hits + 2)
        assert registry.lookup("sql-lora").state is ModelState.READY

        state.failing = False
        state.models = [BASE, CHAT]
        await eventually(lambda: registry.lookup("chat-lora").state is ModelState.READY)
        assert registry.lookup("sql-lora").state is ModelState.ABSENT

        fake.delete_pod("llama-0")
        await eventually(lambda: registry.models() == {})
    finally:
        await source.stop(5.0)
        assert not source.running


def test_adapters_in_reads_parent_then_root() -> None:
    listing = {
        "object": "list",
        "data": [
            BASE,
            SQL,
            {"id": "other-lora", "root": "/x", "parent": "mistral"},  # another base's
            {"id": "alias", "root": "llama"},  # no parent: root names the base
            {"id": "llama", "root": "llama"},  # the base itself
            {"id": 7},
            "junk",
        ],
    }
    assert adapters_in(listing, "llama") == ("sql-lora", "alias")
    assert adapters_in({"data": "nope"}, "llama") == ()
    assert adapters_in(None, "llama") == ()
