"""The InferencePool source against the fake API server, through the real `kubernetes`
client: the dictionary is the pool's pods times its target ports, follows edits of the
pool and of its pods, and empties when the pool goes away."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from structlog.testing import capture_logs

from gateway_extproc.models.adapters import served_models
from gateway_extproc.models.inferencepool import (
    InferencePoolSource,
    PoolOptions,
    PoolSpecError,
    parse_pool,
    pool_namespace_from,
)
from gateway_extproc.models.informer import WatchTiming
from gateway_extproc.models.registry import ModelRegistry, ModelState
from tests.fakes.kube_apiserver import (
    POOLS,
    FakeKubeApiServer,
    pool_object,
    write_kubeconfig,
)
from tests.waiting import eventually

POOL = "vllm-llama"
APP = {"app": "vllm-llama"}
FAST = WatchTiming(backoff_base=0.05, backoff_max=0.3, request_timeout=5.0, watch_timeout=30.0)

MakeSource = Callable[..., Awaitable[tuple[InferencePoolSource, ModelRegistry]]]


def addresses(registry: ModelRegistry, model: str) -> set[str]:
    return {p.address for p in registry.lookup(model).routable}


@pytest.fixture
def fake() -> Iterator[FakeKubeApiServer]:
    with FakeKubeApiServer() as server:
        yield server


@pytest.fixture
async def make_source(tmp_path: Path, fake: FakeKubeApiServer) -> AsyncIterator[MakeSource]:
    """Starts a source over the fake API server and returns once it has synced."""
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", fake.url)
    started: list[InferencePoolSource] = []

    async def make(**overrides: Any) -> tuple[InferencePoolSource, ModelRegistry]:
        registry = ModelRegistry()
        options = PoolOptions(
            **{"name": POOL, "kubeconfig": str(kubeconfig), "timing": FAST, **overrides}
        )
        source = InferencePoolSource(registry, options)
        await source.start()
        started.append(source)
        # The first test pays the informer's cold start; a loaded CI box is slow.
        assert await source.wait_synced(30)
        return source, registry

    yield make
    for source in started:
        await source.stop()


def running_pod(fake: FakeKubeApiServer, name: str, ip: str, **labels: str) -> None:
    fake.create_pod(name, labels={**APP, **labels}, ip=ip, phase="Running", ready=True)


# -- the pool's endpoints ---------------------------------------------------------------------


async def test_every_pod_times_every_target_port_is_an_endpoint(
    fake: FakeKubeApiServer, make_source: MakeSource
) -> None:
    fake.create_pool(POOL, selector=APP, target_ports=[8000, 8001])
    running_pod(fake, "llama-0", "10.0.0.1", **{"model.aibrix.ai/name": "llama"})
    running_pod(fake, "llama-1", "10.0.0.2", **{"model.aibrix.ai/name": "llama"})
    fake.create_pod("other", labels={"app": "other", "model.aibrix.ai/name": "llama"})
    _, registry = await make_source()

    assert addresses(registry, "llama") == {
        "10.0.0.1:8000",
        "10.0.0.1:8001",
        "10.0.0.2:8000",
        "10.0.0.2:8001",
    }
    # The data-parallel ranks of one pod, named as the reference picker names them.
    assert {p.key for p in registry.pods()} == {
        "default/llama-0-rank-0",
        "default/llama-0-rank-1",
        "default/llama-1-rank-0",
        "default/llama-1-rank-1",
    }
    # The pool's pods are listed and watched in its namespace only, the pool by name.
    pool_requests = fake.requests(resource=POOLS)
    assert pool_requests and all(
        r.query.get("fieldSelector") == f"metadata.name={POOL}"
        and r.path.endswith("/namespaces/default/inferencepools")
        for r in pool_requests
    )


async def test_pod_changes_move_the_endpoints(
    fake: FakeKubeApiServer, make_source: MakeSource
) -> None:
    fake.create_pool(POOL, selector=APP, target_ports=[8000])
    _, registry = await make_source()
    assert registry.lookup("llama").state is ModelState.ABSENT

    fake.create_pod("llama-0", labels={**APP, "model.aibrix.ai/name": "llama"})
    await eventually(lambda: registry.lookup("llama").state is ModelState.UNAVAILABLE)
    fake.update_pod("llama-0", ip="10.0.0.9", phase="Running", ready=True)
    await eventually(lambda: addresses(registry, "llama") == {"10.0.0.9:8000"})

    fake.mark_terminating("llama-0")
    await eventually(lambda: registry.lookup("llama").state is ModelState.TERMINATING)
    # Relabelled out of the pool: gone, although the pod still exists.
    fake.update_pod("llama-0", labels={"app": "elsewhere", "model.aibrix.ai/name": "llama"})
    await eventually(lambda: registry.lookup("llama").state is ModelState.ABSENT)
    assert registry.pods() == []


async def test_a_pool_edit_takes_effect_without_a_restart(
    fake: FakeKubeApiServer, make_source: MakeSource
) -> None:
    fake.create_pool(POOL, selector=APP, target_ports=[8000])
    running_pod(fake, "blue-0", "10.0.1.1", track="blue", **{"model.aibrix.ai/name": "llama"})
    running_pod(fake, "green-0", "10.0.2.1", track="green", **{"model.aibrix.ai/name": "llama"})
    _, registry = await make_source()
    assert addresses(registry, "llama") == {"10.0.1.1:8000", "10.0.2.1:8000"}

    fake.update_pool(POOL, target_ports=[9000, 9001])
    await eventually(
        lambda: (
            addresses(registry, "llama")
            == {"10.0.1.1:9000", "10.0.1.1:9001", "10.0.2.1:9000", "10.0.2.1:9001"}
        ),
        what="new ports",
    )
    fake.update_pool(POOL, selector={**APP, "track": "green"})
    await eventually(
        lambda: addresses(registry, "llama") == {"10.0.2.1:9000", "10.0.2.1:9001"},
        what="narrower selector",
    )
    assert {p.name for p in registry.pods()} == {"green-0-rank-0", "green-0-rank-1"}


async def test_deleting_the_pool_empties_the_dictionary_and_recreating_refills_it(
    fake: FakeKubeApiServer, make_source: MakeSource
) -> None:
    fake.create_pool(POOL, selector=APP, target_ports=[8000])
    running_pod(fake, "llama-0", "10.0.0.1", **{"model.aibrix.ai/name": "llama"})
    _, registry = await make_source()
    assert registry.lookup("llama").state is ModelState.READY

    fake.delete_pool(POOL)
    await eventually(lambda: registry.models() == {}, what="empty dictionary")
    assert registry.pods() == []

    fake.create_pool(POOL, selector=APP, target_ports=[8080])
    await eventually(lambda: addresses(registry, "llama") == {"10.0.0.1:8080"})


async def test_a_missing_pool_is_an_empty_synced_dictionary_until_it_appears(
    fake: FakeKubeApiServer, make_source: MakeSource
) -> None:
    running_pod(fake, "llama-0", "10.0.0.1", **{"model.aibrix.ai/name": "llama"})
    fake.create_pool("another-pool", selector=APP, target_ports=[7000])
    _, registry = await make_source()
    assert registry.synced and registry.models() == {}

    fake.create_pool(POOL, selector=APP, target_ports=[8000])
    await eventually(lambda: addresses(registry, "llama") == {"10.0.0.1:8000"})


async def test_the_pool_namespace_is_the_one_watched(
    fake: FakeKubeApiServer, make_source: MakeSource
) -> None:
    fake.create_pool(POOL, "models", selector=APP, target_ports=[8000])
    fake.create_pool(POOL, "default", selector=APP, target_ports=[7000])
    fake.create_pod("in-models", "models", labels={**APP, "model.aibrix.ai/name": "llama"})
    fake.update_pod("in-models", "models", ip="10.0.3.1", phase="Running", ready=True)
    running_pod(fake, "in-default", "10.0.4.1", **{"model.aibrix.ai/name": "llama"})
    _, registry = await make_source(namespace="models")
    assert addresses(registry, "llama") == {"10.0.3.1:8000"}
    assert [p.key for p in registry.pods()] == ["models/in-models-rank-0"]


async def test_an_invalid_pool_edit_keeps_the_last_good_endpoints(
    fake: FakeKubeApiServer, make_source: MakeSource
) -> None:
    fake.create_pool(POOL, selector=APP, target_ports=[8000])
    running_pod(fake, "llama-0", "10.0.0.1", **{"model.aibrix.ai/name": "llama"})
    _, registry = await make_source()
    broken = {"selector": {"matchLabels": APP}, "targetPorts": [{"number": "eighty"}]}
    with capture_logs() as logs:
        fake.update_pool(POOL, spec=broken)
        await eventually(lambda: any(e["event"] == "inferencepool_invalid" for e in logs))
    assert addresses(registry, "llama") == {"10.0.0.1:8000"}
    # A good edit after it is followed again.
    fake.update_pool(POOL, spec={"selector": {"matchLabels": APP}, "targetPorts": [{"number": 81}]})
    await eventually(lambda: addresses(registry, "llama") == {"10.0.0.1:81"})


async def test_an_expired_watch_relists_the_pool_and_catches_up(
    fake: FakeKubeApiServer, make_source: MakeSource
) -> None:
    fake.create_pool(POOL, selector=APP, target_ports=[8000])
    running_pod(fake, "llama-0", "10.0.0.1", **{"model.aibrix.ai/name": "llama"})
    _, registry = await make_source()
    await eventually(lambda: fake.active_watches >= 2, what="both watches open")
    lists_before = len(fake.requests(watch=False, resource=POOLS))

    fake.compact(expire_watches=True)
    fake.update_pool(POOL, target_ports=[8100])
    await eventually(lambda: addresses(registry, "llama") == {"10.0.0.1:8100"})
    assert len(fake.requests(watch=False, resource=POOLS)) > lists_before


# -- which model an unlabelled pod serves ------------------------------------------------------


class Engine:
    """An engine's `/v1/models`: fails until `up`, then lists a base model and an adapter."""

    def __init__(self) -> None:
        self.up = False
        self.hits = 0

    async def models(self, request: web.Request) -> web.Response:
        self.hits += 1
        if not self.up:
            return web.json_response({"error": "starting"}, status=503)
        data = [
            {"id": "qwen", "object": "model", "root": "Qwen/Qwen3-8B", "parent": None},
            {"id": "qwen-sql", "object": "model", "root": "/lora/sql", "parent": "qwen"},
        ]
        return web.json_response({"object": "list", "data": data})


@pytest.fixture
async def engine() -> AsyncIterator[tuple[Engine, int]]:
    state = Engine()
    app = web.Application()
    app.router.add_get("/v1/models", state.models)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield state, runner.addresses[0][1]
    await runner.cleanup()


async def test_an_unlabelled_pod_serves_what_its_engine_lists(
    fake: FakeKubeApiServer, make_source: MakeSource, engine: tuple[Engine, int]
) -> None:
    state, port = engine
    fake.create_pool(POOL, selector=APP, target_ports=[port])
    running_pod(fake, "qwen-0", "127.0.0.1")  # no model label
    source, registry = await make_source(model_probe_retry=0.05)
    # Not in the dictionary while the engine does not answer, and asked again.
    await eventually(lambda: state.hits >= 2, what="retries")
    assert registry.models() == {}

    state.up = True
    await eventually(lambda: registry.lookup("qwen").state is ModelState.READY)
    assert registry.lookup("qwen-sql").state is ModelState.READY
    assert registry.pods()[0].models == ("qwen", "qwen-sql")
    hits = state.hits
    # Asked once per address: pod updates reuse the answer.
    fake.update_pod("qwen-0", labels={**APP, "extra": "x"})
    await eventually(lambda: dict(source._pods["default/qwen-0"].labels).get("extra") == "x")
    assert state.hits == hits and registry.lookup("qwen").state is ModelState.READY


# -- pure parts ---------------------------------------------------------------------------------


def test_parse_pool_reads_selector_and_ports() -> None:
    spec = parse_pool(pool_object("p", selector={"b": "2", "a": "1"}, target_ports=[8000, 8001]))
    assert spec.match_labels == (("a", "1"), ("b", "2"))
    assert spec.target_ports == (8000, 8001)
    assert spec.selects({"a": "1", "b": "2", "c": "3"})
    assert not spec.selects({"a": "1"})


@pytest.mark.parametrize(
    "spec",
    [
        None,
        {"targetPorts": [{"number": 8000}]},
        {"selector": {"matchLabels": {}}, "targetPorts": [{"number": 8000}]},
        {"selector": {"matchLabels": {"a": 1}}, "targetPorts": [{"number": 8000}]},
        {"selector": {"matchLabels": {"a": "1"}}, "targetPorts": []},
        {"selector": {"matchLabels": {"a": "1"}}, "targetPorts": [{"number": 0}]},
        {"selector": {"matchLabels": {"a": "1"}}, "targetPorts": [{"number": True}]},
        {"selector": {"matchLabels": {"a": "1"}}, "targetPorts": [{"number": 1}, {"number": 1}]},
    ],
)
def test_parse_pool_refuses_unusable_specs(spec: Any) -> None:
    with pytest.raises(PoolSpecError):
        parse_pool({"spec": spec})


def test_served_models_lists_bases_then_adapters() -> None:
    listing = {
        "data": [
            {"id": "sql", "parent": "base"},
            {"id": "base", "parent": None},
            {"id": "stray", "parent": "missing"},
            "junk",
        ]
    }
    assert served_models(listing) == ("base", "sql")
    assert served_models({"data": "nope"}) == ()
    assert served_models(None) == ()


def test_pool_options_and_namespace_default(tmp_path: Path, monkeypatch: Any) -> None:
    with pytest.raises(ValueError, match="pool-name"):
        PoolOptions(name="")
    assert pool_namespace_from("given") == "given"
    account = tmp_path / "namespace"
    account.write_text("inference\n")
    monkeypatch.setattr("gateway_extproc.models.inferencepool.SERVICE_ACCOUNT_NAMESPACE", account)
    assert pool_namespace_from("") == "inference"
    monkeypatch.setattr(
        "gateway_extproc.models.inferencepool.SERVICE_ACCOUNT_NAMESPACE", tmp_path / "absent"
    )
    assert pool_namespace_from("") == "default"
