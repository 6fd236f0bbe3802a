"""Routing plugins from outside the package, over real gRPC: a scorer defined here and
registered with the public `register_scorer` is used through the `routing-strategy`
header, and a routing config file's profile (built on it) is picked by name and as the
default."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc

from gateway_extproc.routing import registry
from gateway_extproc.routing.plugins import PluginEnv, Scorer, Scores, ScoringContext
from gateway_extproc.routing.registry import register_scorer
from gateway_extproc.server import Gateway, start_gateway, stop_gateway
from tests import frames
from tests.settings import loopback_settings

MODELS = """
models:
  - name: llama
    pods:
      - {name: llama-0, address: 127.0.0.1:18001}
      - {name: llama-1, address: 127.0.0.1:18002}
      - {name: llama-2, address: 127.0.0.1:18003}
"""
FAVOURITE = "127.0.0.1:18003"

ROUTING = f"""
default: pinned
profiles:
  - name: pinned
    scorers:
      - {{name: favourite-pod, params: {{address: "{FAVOURITE}"}}}}
"""


class FavouritePod(Scorer):
    """Scores one address 1 and every other pod 0: picks it can only make on purpose."""

    name = "favourite-pod"

    def __init__(self, address: str) -> None:
        self.address = address

    def score(self, ctx: ScoringContext) -> Scores:
        return [1.0 if pod.address == self.address else 0.0 for pod in ctx.candidates.pods]


def favourite_pod(env: PluginEnv, *, address: str = "127.0.0.1:18001") -> FavouritePod:
    return FavouritePod(address)


@pytest.fixture
def outside_scorer(monkeypatch: pytest.MonkeyPatch) -> None:
    """`favourite-pod` registered through the public API, in a registry of this test's
    own (the module functions act on registry.PLUGINS, swapped here for a copy)."""
    monkeypatch.setattr(registry, "PLUGINS", registry.PLUGINS.copy())
    register_scorer("favourite-pod", favourite_pod)


async def started(tmp_path: Path, **settings: str) -> Gateway:
    models = tmp_path / "models.yaml"
    models.write_text(MODELS)
    return await start_gateway(
        loopback_settings(
            models_file=str(models),
            grace_period=1.0,
            # No engine answers at these addresses: without a slow start, pods without
            # metrics compete on score at once rather than take random shares.
            slow_start_window=0.0,
            **settings,  # type: ignore[arg-type]
        )
    )


@pytest.fixture
async def gateway(tmp_path: Path, outside_scorer: None) -> AsyncIterator[Gateway]:
    gateway = await started(tmp_path)
    yield gateway
    await stop_gateway(gateway)


@pytest.fixture
async def configured(tmp_path: Path, outside_scorer: None) -> AsyncIterator[Gateway]:
    path = tmp_path / "routing.yaml"
    path.write_text(ROUTING)
    gateway = await started(tmp_path, routing_config=str(path))
    yield gateway
    await stop_gateway(gateway)


async def route(gateway: Gateway, strategy: str | None) -> tuple[str, str]:
    """One request through the processor's gRPC stream: (status or "ok", the pick)."""
    headers = {"routing-strategy": strategy} if strategy is not None else {}
    sent = [
        frames.request_headers(headers=headers),
        frames.request_body(orjson.dumps({"model": "llama", "prompt": "hi"})),
    ]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        stub = ext_grpc.ExternalProcessorStub(channel)
        got = [r async for r in stub.Process(iter(sent))]
    last = got[-1]
    if last.WhichOneof("response") == "immediate_response":
        return str(last.immediate_response.status.code), ""
    return "ok", frames.set_headers(last)["target-pod"]


async def picks(gateway: Gateway, strategy: str | None, times: int = 12) -> Counter[str]:
    found: Counter[str] = Counter()
    for _ in range(times):
        status, pod = await route(gateway, strategy)
        assert status == "ok", (strategy, status)
        found[pod] += 1
    assert gateway.inflight.total() == 0
    return found


async def test_a_scorer_registered_outside_the_package_routes_by_header(
    gateway: Gateway,
) -> None:
    assert await picks(gateway, "favourite-pod:1") == {"127.0.0.1:18001": 12}
    # Beside a built-in scorer, with more weight: still decides.
    assert await picks(gateway, "favourite-pod:3,least-request:1") == {"127.0.0.1:18001": 12}
    # Without it, the default (random) spreads.
    assert len(await picks(gateway, None, 60)) == 3


async def test_a_routing_config_profile_is_picked_by_name_and_as_the_default(
    configured: Gateway,
) -> None:
    assert await picks(configured, "pinned") == {FAVOURITE: 12}
    assert await picks(configured, None) == {FAVOURITE: 12}
    # The built-in profiles are still there beside it.
    assert len(await picks(configured, "round-robin", 6)) == 3
    status, _ = await route(configured, "no-such-profile")
    assert status == "400", status


async def test_the_default_strategy_flag_wins_over_the_config_default(
    tmp_path: Path, outside_scorer: None
) -> None:
    path = tmp_path / "routing.yaml"
    path.write_text(ROUTING)
    gateway = await started(tmp_path, routing_config=str(path), default_strategy="round-robin")
    try:
        assert len(await picks(gateway, None, 6)) == 3
        assert await picks(gateway, "pinned") == {FAVOURITE: 12}
    finally:
        await stop_gateway(gateway)
