"""The default profile (predicted-latency) reads what the engines report holding: where a
pod's KV-cache events are trusted, the TTFT predictor expects the prefix the engine
holds, not the one this processor's routing history guesses. So two processor replicas
subscribed to the same engines expect the same, and a prefix the engine evicted stops
attracting requests however recently it was routed there."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from gateway_extproc.kvevents.index import KVBlockIndex
from gateway_extproc.kvevents.wire import AllBlocksCleared, BlockStored
from gateway_extproc.models.registry import ModelRegistry, Pod
from gateway_extproc.routing.base import RoutingRequest
from gateway_extproc.routing.catalog import build_catalog
from gateway_extproc.routing.inflight import InFlightCounter
from gateway_extproc.routing.prompt_blocks import PromptPreparer
from gateway_extproc.routing.registry import PREDICTED_LATENCY
from gateway_extproc.routing.router import Router
from gateway_extproc.tokenize.catalog import TokenizerCatalog
from gateway_extproc.tokenize.tokenizer import ModelTokenizer

TINY = Path(__file__).resolve().parents[1] / "data" / "tiny-tokenizer"
CHAT = "/v1/chat/completions"
SIZE = 16
# Long enough that a pod holding it is predicted far sooner than one that does not.
SYSTEM = "You are the assistant of the travel desk. " + (
    "booking flight hotel insurance claim policy refund invoice payment card\n" * 40
)


def chat(question: str, system: str = SYSTEM) -> dict[str, object]:
    return {
        "model": "m",
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
    }


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Engines:
    """Four engines' KV-cache event streams, as every replica subscribed to them sees
    them: each replica has its own index, fed the same events."""

    def __init__(self, n: int = 4) -> None:
        self.pods = [
            Pod(f"p{i}", f"10.4.0.{i}:8000", ("m",), kv_events=f"tcp://10.4.0.{i}:5557")
            for i in range(n)
        ]
        self.tokenizer = ModelTokenizer.load(TINY)
        self.indexes: list[KVBlockIndex] = []
        self._hash = 0

    def subscriber(self) -> KVBlockIndex:
        index = KVBlockIndex()
        for pod in self.pods:
            index.set_trusted(pod.key, True)
            # Every engine has stored something: its block size is known.
            stored = BlockStored((10**6 + len(self.indexes),), None, (1,) * SIZE, SIZE)
            index.apply(pod.key, [stored])
        self.indexes.append(index)
        return index

    def publish(self, pod: str, *events: object) -> None:
        for index in self.indexes:
            index.apply(pod, events)  # type: ignore[arg-type]

    def cached(self, pod: str, doc: dict[str, object]) -> None:
        """The engine served `doc` (through the gateway or not) and stored its blocks."""
        ids = self.tokenizer.prompt_ids(CHAT, doc)
        assert ids is not None
        blocks = len(ids) // SIZE
        hashes = tuple(range(self._hash, self._hash + blocks))
        self._hash += blocks
        self.publish(pod, BlockStored(hashes, None, tuple(ids[: blocks * SIZE]), SIZE))


class Replica:
    """One processor: the real catalog and router with its default profile."""

    def __init__(self, engines: Engines, clock: Clock, seed: int) -> None:
        self.registry = ModelRegistry()
        self.registry.replace_all(engines.pods)
        index = engines.subscriber()
        inflight = InFlightCounter()
        catalog = build_catalog(
            None,
            inflight,
            rng=random.Random(seed),
            registry=self.registry,
            clock=clock,
            shared={KVBlockIndex: index},
        )
        preparer = PromptPreparer(TokenizerCatalog({"m": str(TINY)}), index)
        self.router = Router(self.registry, catalog, PREDICTED_LATENCY, inflight, preparer=preparer)

    async def route(self, doc: dict[str, object], only: str = "") -> str:
        strategy = self.router.strategy(PREDICTED_LATENCY)
        prompt = str(doc["messages"])
        request = RoutingRequest(model="m", prompt=prompt, document=doc, endpoint=CHAT)
        prepared = self.router.prepare(request, strategy)
        if isinstance(prepared, asyncio.Future):
            prepared = await prepared
        assert prepared.blocks is not None  # the default profile asked for the prompt's blocks
        subset = frozenset({f"10.4.0.{only[1:]}:8000"}) if only else None
        decision = self.router.route(prepared, strategy, subset)
        self.router.release(decision)
        return decision.pod.key


async def test_the_default_sends_requests_where_the_engine_reports_their_prefix() -> None:
    """The engines' caches were filled by traffic this processor never routed."""
    clock = Clock()
    engines = Engines()
    replica = Replica(engines, clock, seed=1)
    systems = {pod: f"Tenant {pod}. " + SYSTEM for pod in ("p1", "p2", "p3")}
    for pod, system in systems.items():
        engines.cached(pod, chat("earlier question", system))
    for i in range(4):
        for pod, system in systems.items():
            assert await replica.route(chat(f"question {i}", system)) == pod
            clock.now += 0.5


async def test_two_replicas_on_the_same_engines_agree() -> None:
    """Replica A routed the prompt to p0 (its history says p0 holds it); the engine of p0
    has since evicted it and p3's engine holds it (replica B's traffic). Both route to p3,
    as one processor would."""
    clock = Clock()
    engines = Engines()
    a, b = Replica(engines, clock, seed=2), Replica(engines, clock, seed=3)
    assert await a.route(chat("first"), only="p0") == "p0"
    engines.cached("p0", chat("first"))
    clock.now += 5.0
    engines.publish("p0", AllBlocksCleared())
    engines.cached("p3", chat("from elsewhere"))
    for i in range(4):
        assert [await a.route(chat(f"q{i}")), await b.route(chat(f"q{i}"))] == ["p3", "p3"]
        clock.now += 0.5


async def test_a_prefix_just_sent_counts_until_the_engine_reports_it() -> None:
    """A burst of one new prompt: the engine reports its blocks only once it has computed
    them, so the requests right behind the first still follow it."""
    clock = Clock()
    engines = Engines()
    replica = Replica(engines, clock, seed=4)
    picks = []
    for i in range(6):
        picks.append(await replica.route(chat(f"burst {i}")))
        clock.now += 0.2  # the engine is still prefilling the first
    assert picks == [picks[0]] * 6


async def test_on_a_large_fleet_the_pod_whose_engine_holds_the_prefix_is_always_sampled() -> None:
    """Over 16 candidates the default scores a sample: the engine-reported holder is in
    it every time, though this processor never sent it the prompt."""
    clock = Clock()
    engines = Engines(200)
    replica = Replica(engines, clock, seed=6)
    engines.cached("p137", chat("earlier question"))
    for i in range(10):
        assert await replica.route(chat(f"question {i}")) == "p137"
        clock.now += 0.5
