"""precise-prefix-cache: requests go to the pod whose engine reports holding their prefix,
rendered and tokenized as the engine does; pods whose events cannot be trusted, and
requests that cannot be tokenized, get the approximate prefix score instead."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from prometheus_client import REGISTRY

from gateway_extproc.kvevents.index import KVBlockIndex
from gateway_extproc.kvevents.wire import AllBlocksCleared, BlockStored
from gateway_extproc.models.registry import ModelRegistry, Pod
from gateway_extproc.routing.base import RoutingRequest
from gateway_extproc.routing.catalog import build_catalog
from gateway_extproc.routing.inflight import InFlightCounter
from gateway_extproc.routing.prompt_blocks import PromptPreparer
from gateway_extproc.routing.router import Router
from gateway_extproc.tokenize.catalog import TokenizerCatalog
from gateway_extproc.tokenize.tokenizer import ModelTokenizer

TINY = Path(__file__).resolve().parents[1] / "data" / "tiny-tokenizer"
CHAT = "/v1/chat/completions"
SIZE = 16
SYSTEM = "You are a helpful assistant for the policy document below.\n" + (
    "the quick brown fox jumps over the lazy dog policy customer support\n" * 30
)
STRATEGY = "precise-prefix-cache"


def chat(question: str, model: str = "m", system: str = SYSTEM) -> dict[str, object]:
    return {
        "model": model,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
    }


def flat(doc: dict[str, object]) -> str:
    messages = doc["messages"]
    assert isinstance(messages, list)
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


class Fleet:
    """Four pods of model `m` (and adapter `m-lora`) behind a router with precise prefix
    routing; the index is fed the events the engines would publish."""

    def __init__(self, tokenizers: dict[str, str] | None = None) -> None:
        self.registry = ModelRegistry()
        self.pods = [
            Pod(f"p{i}", f"10.3.0.{i}:8000", ("m", "m-lora"), kv_events=f"tcp://10.3.0.{i}:5557")
            for i in range(4)
        ]
        self.registry.replace_all(self.pods)
        self.index = KVBlockIndex()
        self.tokenizers = TokenizerCatalog({"m": str(TINY)} if tokenizers is None else tokenizers)
        self.preparer = PromptPreparer(self.tokenizers, self.index)
        inflight = InFlightCounter()
        catalog = build_catalog(
            None,
            inflight,
            rng=random.Random(5),
            registry=self.registry,
            shared={KVBlockIndex: self.index},
        )
        self.router = Router(self.registry, catalog, "random", inflight, preparer=self.preparer)
        self.tokenizer = ModelTokenizer.load(TINY)
        self._hash = 0
        for pod in self.pods:
            self.index.set_trusted(pod.key, True)
            self.index.apply(pod.key, [BlockStored((999_999,), None, tuple(range(SIZE)), SIZE)])

    def engine_caches(self, pod: str, doc: dict[str, object], lora: str | None = None) -> int:
        """What the engine publishes after serving `doc`: its full blocks, stored."""
        ids = self.tokenizer.prompt_ids(CHAT, doc)
        assert ids is not None
        blocks = len(ids) // SIZE
        hashes = tuple(range(self._hash, self._hash + blocks))
        self._hash += blocks
        event = BlockStored(hashes, None, tuple(ids[: blocks * SIZE]), SIZE, lora_name=lora)
        self.index.apply(pod, [event])
        return blocks

    async def route(self, doc: dict[str, object], model: str = "m", only: str = "") -> str:
        strategy = self.router.strategy(STRATEGY)
        request = RoutingRequest(model=model, prompt=flat(doc), document=doc, endpoint=CHAT)
        prepared = self.router.prepare(request, strategy)
        if isinstance(prepared, asyncio.Future):
            prepared = await prepared
        subset = frozenset({f"10.3.0.{only[1:]}:8000"}) if only else None
        decision = self.router.route(prepared, strategy, subset)
        self.router.release(decision)
        return decision.pod.key


async def test_requests_go_to_the_pod_whose_engine_holds_their_prefix() -> None:
    fleet = Fleet()
    fleet.engine_caches("p2", chat("first question"))
    picks = {await fleet.route(chat(f"another question {i}")) for i in range(8)}
    assert picks == {"p2"}


async def test_the_deepest_holder_wins() -> None:
    fleet = Fleet()
    fleet.engine_caches("p1", chat("q", system="You are a helpful assistant.\n"))
    fleet.engine_caches("p3", chat("q"))
    assert await fleet.route(chat("something else")) == "p3"


async def test_once_the_engine_reports_the_blocks_gone_requests_spread_again() -> None:
    fleet = Fleet()
    fleet.engine_caches("p2", chat("first question"))
    assert await fleet.route(chat("second")) == "p2"
    fleet.index.apply("p2", [AllBlocksCleared()])
    picks = {await fleet.route(chat(f"question {i}")) for i in range(24)}
    assert len(picks) > 1


async def test_an_untrusted_pod_gets_the_approximate_score_instead() -> None:
    fleet = Fleet()
    fleet.engine_caches("p2", chat("first question"))
    # The approximate index saw this prompt go to p0 (routed while p0 was the only choice).
    assert await fleet.route(chat("routed question"), only="p0") == "p0"
    for pod in ("p0", "p2"):  # their event streams were lost
        fleet.index.set_trusted(pod, False)
    # p2's reported blocks no longer count; p0's approximate credit does.
    assert [await fleet.route(chat(f"question {i}")) for i in range(5)] == ["p0"] * 5


async def test_a_model_without_a_tokenizer_is_routed_approximately() -> None:
    fleet = Fleet(tokenizers={})
    fleet.engine_caches("p2", chat("first question"))
    first = await fleet.route(chat("q0"))
    later = [await fleet.route(chat(f"q{i}")) for i in range(1, 6)]
    assert later == [first] * 5  # approximate stickiness, wherever it started


async def test_a_lora_request_uses_the_base_tokenizer_and_the_adapter_blocks() -> None:
    fleet = Fleet()
    fleet.engine_caches("p1", chat("base model question"))  # base-model blocks
    fleet.engine_caches("p3", chat("adapter question"), lora="m-lora")
    assert await fleet.route(chat("x", model="m-lora"), model="m-lora") == "p3"
    assert await fleet.route(chat("x")) == "p1"


async def test_a_long_prompt_is_prepared_off_the_loop_and_only_as_far_as_someone_holds_it() -> None:
    fleet = Fleet()
    long_doc = chat("q", system=SYSTEM * 40)  # about 90 KB
    done = REGISTRY.get_sample_value("gateway_prompt_tokenizations_total", {"outcome": "done"})
    strategy = fleet.router.strategy(STRATEGY)
    request = RoutingRequest(model="m", prompt=flat(long_doc), document=long_doc, endpoint=CHAT)
    prepared = fleet.router.prepare(request, strategy)
    assert isinstance(prepared, asyncio.Future)  # the loop is free meanwhile
    blocks = (await prepared).blocks
    assert blocks is not None
    # Nobody holds it: keying stopped after the first pieces, the total is an estimate.
    assert len(blocks.keys[SIZE]) < blocks.totals[SIZE] // 4
    after = REGISTRY.get_sample_value("gateway_prompt_tokenizations_total", {"outcome": "done"})
    assert after == (done or 0) + 1
    fleet.engine_caches("p0", long_doc)
    assert await fleet.route(chat("q2", system=SYSTEM * 40)) == "p0"


async def test_a_request_the_template_refuses_is_routed_without_blocks() -> None:
    fleet = Fleet()
    bad = {"model": "m", "messages": [{"role": "wizard", "content": "hi"}]}
    failed = REGISTRY.get_sample_value("gateway_prompt_tokenizations_total", {"outcome": "failed"})
    assert await fleet.route(bad) in {"p0", "p1", "p2", "p3"}
    after = REGISTRY.get_sample_value("gateway_prompt_tokenizations_total", {"outcome": "failed"})
    assert after == (failed or 0) + 1


async def test_no_tokenization_when_no_pod_has_trusted_events() -> None:
    fleet = Fleet()
    for pod in fleet.pods:
        fleet.index.set_trusted(pod.key, False)
    strategy = fleet.router.strategy(STRATEGY)
    doc = chat("q")
    request = RoutingRequest(model="m", prompt=flat(doc), document=doc, endpoint=CHAT)
    assert fleet.router.prepare(request, strategy) is request


async def test_strategies_that_do_not_use_tokens_are_not_prepared() -> None:
    fleet = Fleet()
    doc = chat("q")
    request = RoutingRequest(model="m", prompt=flat(doc), document=doc, endpoint=CHAT)
    for name in ("random", "least-request", "prefix-cache", "least-request:1,prefix-cache:2"):
        assert fleet.router.prepare(request, fleet.router.strategy(name)) is request
    combined = fleet.router.strategy("precise-prefix-cache:2,least-request:1")
    assert fleet.router.prepare(request, combined) is not request
