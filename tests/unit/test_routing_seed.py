"""--routing-seed makes the random choices of a run repeatable."""

from __future__ import annotations

from gateway_extproc.routing.base import RoutingRequest
from gateway_extproc.server import start_gateway, stop_gateway
from tests.settings import loopback_settings

MODELS = "models:\n  - name: m\n    pods:\n" + "".join(
    f"      - {{name: p{i}, address: '127.0.0.1:{18100 + i}'}}\n" for i in range(8)
)


async def picks(tmp_path, seed: int | None) -> list[str]:
    path = tmp_path / "models.yaml"
    path.write_text(MODELS)
    gateway = await start_gateway(
        loopback_settings(
            models_file=str(path),
            routing_seed=seed,
        )
    )
    try:
        router = gateway.router
        chosen = []
        for _ in range(30):
            decision = router.route(RoutingRequest("m"), router.strategy("random"))
            chosen.append(decision.pod.name)
            router.release(decision)
        return chosen
    finally:
        await stop_gateway(gateway)


async def test_the_same_seed_gives_the_same_picks(tmp_path):
    first = await picks(tmp_path, 7)
    assert await picks(tmp_path, 7) == first
    assert len(set(first)) > 1
    assert await picks(tmp_path, 8) != first
