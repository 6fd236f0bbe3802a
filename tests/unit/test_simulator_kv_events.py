"""The simulator publishes vLLM's KV-cache events from its prefix cache: stored blocks with
the tokens the tokenizer gave, evictions, resets, and replays of what a subscriber missed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import zmq
import zmq.asyncio

from gateway_extproc.devtools.localstack import free_port
from gateway_extproc.devtools.simulator import SimulatorConfig, running_simulator
from gateway_extproc.kvevents.replay import request_replay
from gateway_extproc.kvevents.wire import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    Event,
    decode_batch,
    split_message,
)
from gateway_extproc.tokenize.tokenizer import ModelTokenizer

TINY = Path(__file__).resolve().parents[1] / "data" / "tiny-tokenizer"
SIZE = 16


class Engine:
    def __init__(self, port: int, events: int, replay: int, sub: zmq.asyncio.Socket) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.events_port = events
        self.replay_port = replay
        self.sub = sub
        self.seen: list[tuple[int, Event]] = []

    async def post(self, path: str, doc: object | None = None) -> int:
        async with (
            aiohttp.ClientSession() as session,
            session.post(self.url + path, json=doc) as response,
        ):
            await response.read()
            return response.status

    async def events(self, until: type, timeout: float = 10.0) -> list[Event]:
        """Events received up to and including the first of type `until`."""
        out: list[Event] = []
        async with asyncio.timeout(timeout):
            while True:
                _, seq, payload = split_message(await self.sub.recv_multipart())
                for event in decode_batch(payload).events:
                    self.seen.append((seq, event))
                    out.append(event)
                    if isinstance(event, until):
                        return out


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    events, replay = free_port(), free_port()
    config = SimulatorConfig(
        models=("m",),
        loras=("m-lora",),
        port=0,
        ttft_ms=1,
        itl_ms=1,
        kv_blocks=12,
        block_size=SIZE,
        tokenizer=str(TINY),
        kv_events_port=events,
        kv_events_replay_port=replay,
    )
    context = zmq.asyncio.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"tcp://127.0.0.1:{events}")
    try:
        async with running_simulator(config) as port:
            yield Engine(port, events, replay, sub)
    finally:
        context.destroy(linger=0)


def chat(content: str, model: str = "m") -> dict[str, object]:
    return {"model": model, "max_tokens": 2, "messages": [{"role": "user", "content": content}]}


async def subscribed(engine: Engine) -> None:
    """Until a batch arrives the subscription may still be on its way: reset (an empty
    cache publishes AllBlocksCleared) until one does."""
    for _ in range(100):
        assert await engine.post("/reset_prefix_cache") == 200
        try:
            await engine.events(AllBlocksCleared, timeout=0.1)
            return
        except TimeoutError:
            continue
    raise AssertionError("no event ever arrived")


async def test_stored_blocks_carry_the_tokens_the_engine_computed(engine: Engine) -> None:
    await subscribed(engine)
    text = "the quick brown fox jumps over the lazy dog " * 8
    assert await engine.post("/v1/chat/completions", chat(text)) == 200
    events = await engine.events(BlockStored)
    stored = [e for e in events if isinstance(e, BlockStored)]
    ids = ModelTokenizer.load(TINY).prompt_ids("/v1/chat/completions", chat(text))
    assert ids is not None
    first = stored[0]
    assert first.parent_hash is None and first.block_size == SIZE and first.lora_name is None
    blocks = len(first.block_hashes)
    assert blocks >= 2
    assert list(first.token_ids) == ids[: blocks * SIZE]


async def test_an_adapter_request_names_its_adapter(engine: Engine) -> None:
    await subscribed(engine)
    assert await engine.post("/v1/chat/completions", chat("policy " * 40, "m-lora")) == 200
    stored = [e for e in await engine.events(BlockStored) if isinstance(e, BlockStored)]
    assert stored[0].lora_name == "m-lora"


async def test_eviction_and_reset_are_published(engine: Engine) -> None:
    await subscribed(engine)
    # Twelve blocks of cache: the second long prompt evicts the first one's blocks.
    assert await engine.post("/v1/chat/completions", chat("fox " * 150)) == 200
    await engine.events(BlockStored)
    assert await engine.post("/v1/chat/completions", chat("dog " * 150)) == 200
    removed = [e for e in await engine.events(BlockRemoved) if isinstance(e, BlockRemoved)]
    stored = {h for _, e in engine.seen if isinstance(e, BlockStored) for h in e.block_hashes}
    assert removed and set(removed[0].block_hashes) <= stored
    assert await engine.post("/reset_prefix_cache") == 200
    assert isinstance((await engine.events(AllBlocksCleared))[-1], AllBlocksCleared)


async def test_the_replay_socket_serves_batches_from_a_sequence_number(engine: Engine) -> None:
    await subscribed(engine)
    assert await engine.post("/v1/chat/completions", chat("customer support " * 30)) == 200
    await engine.events(BlockStored)
    context = zmq.asyncio.Context()
    try:
        replayed = await request_replay(
            context, f"tcp://127.0.0.1:{engine.replay_port}", 1, timeout=5.0
        )
    finally:
        context.destroy(linger=0)
    seqs = [seq for seq, _ in replayed]
    assert seqs and seqs[0] == 1 and seqs == sorted(seqs)
    live = {seq for seq, _ in engine.seen}
    assert live <= set(seqs) | {0}
