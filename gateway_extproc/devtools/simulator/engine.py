"""The simulated engine: FIFO scheduler, KV admission and token timing.

At most `max_num_seqs` requests run at once; the rest wait in arrival order, and the
head of the queue also waits while the KV cache cannot hold it (as vLLM's FCFS
scheduler does), so waiting grows under memory pressure as well as under concurrency.
Once admitted a request sleeps TTFT + prefill of its uncached prompt tokens, then
emits one token every inter-token latency, all scaled by the fault `slow_factor`. With
`serial_prefill` the prefills of one engine run one after another, in admission order,
so a request's prefill starts when the one before it has finished.
Times are absolute deadlines so a slow consumer never makes later tokens drift.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass

from gateway_extproc.devtools.simulator import text
from gateway_extproc.devtools.simulator.config import SimulatorConfig
from gateway_extproc.devtools.simulator.faults import Faults
from gateway_extproc.devtools.simulator.metrics import EngineMetrics, EngineSnapshot
from gateway_extproc.devtools.simulator.prefix_cache import Allocation, KVCache, block_hashes
from gateway_extproc.kvevents.wire import Event


@dataclass(frozen=True, slots=True)
class EngineRequest:
    adapter: str | None  # LoRA adapter name; None for the base model
    prompt_ids: Sequence[int]
    output: Sequence[str]  # the reply's token texts, one per generated token
    cacheable: bool = True  # pooling (embedding) requests do not use the prefix cache


class _Sequence:
    """One request inside the engine."""

    __slots__ = ("admitted", "allocation", "arrival", "generated", "hashes", "request", "salt")

    def __init__(self, request: EngineRequest, arrival: float, salt: int, block_size: int):
        self.request = request
        self.arrival = arrival
        self.salt = salt
        self.hashes = (
            block_hashes(request.prompt_ids, block_size, salt) if request.cacheable else []
        )
        self.admitted: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.allocation: Allocation | None = None  # set while running
        self.generated = 0


class Engine:
    def __init__(
        self,
        config: SimulatorConfig,
        faults: Faults,
        on_kv_event: Callable[[Event], None] | None = None,
    ) -> None:
        self.config = config
        self.faults = faults
        self.kv = KVCache(config.kv_blocks, config.block_size, on_kv_event)
        # The token ids of a reply's token texts (a real tokenizer replaces this).
        self.reply_ids: Callable[[Sequence[str]], list[int]] = text.reply_ids
        self.metrics = EngineMetrics(config, self.snapshot)
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._running: set[_Sequence] = set()
        self._running_adapters: collections.Counter[str] = collections.Counter()
        self._waiting_adapters: collections.Counter[str] = collections.Counter()
        # Adapters get their own block namespace, as vLLM's LoRA extra hash keys do.
        self._salts = {name: text.token_id(name) for name in config.loras}
        self._prefill_free_at = 0.0  # with serial_prefill: when the last prefill ends

    def snapshot(self) -> EngineSnapshot:
        return EngineSnapshot(
            running=len(self._running),
            waiting=len(self._waiting),
            kv_usage=self.kv.usage,
            running_adapters=tuple(sorted(self._running_adapters)),
            waiting_adapters=tuple(sorted(self._waiting_adapters)),
        )

    def max_new_tokens(self, prompt_len: int) -> int:
        """Room left for a reply after `prompt_len` prompt tokens (may be <= 0)."""
        return self.config.max_model_len - prompt_len

    async def generate(self, request: EngineRequest) -> AsyncGenerator[str, None]:
        """Queue `request`, then yield its output tokens at engine pace.

        Use inside `contextlib.aclosing` so an abandoned request frees its slot and
        blocks at once rather than when the generator is garbage collected.
        """
        loop = asyncio.get_running_loop()
        cfg = self.config
        salt = self._salts.get(request.adapter, 0) if request.adapter else 0
        seq = _Sequence(request, loop.time(), salt, cfg.block_size)
        self._waiting.append(seq)
        _add(self._waiting_adapters, request.adapter)
        self._schedule()
        try:
            cached_tokens = await seq.admitted
            allocation = seq.allocation
            assert allocation is not None
            prompt_len = len(request.prompt_ids)
            slow = self.faults.slow_factor
            prefill_s = slow * (prompt_len - cached_tokens) * cfg.prefill_us_per_token / 1e6
            start = loop.time()
            if cfg.serial_prefill:
                start = max(start, self._prefill_free_at)
                self._prefill_free_at = start + prefill_s
            deadline = start + prefill_s + slow * cfg.ttft_ms / 1e3
            await _sleep_until(loop, deadline)
            # The prompt's blocks are computed now; later requests can hit them even
            # while this one is still generating.
            self.kv.commit(allocation, seq.hashes, request.prompt_ids, request.adapter)
            self.metrics.prompt_tokens.inc(prompt_len)
            last = loop.time()
            for token in request.output:
                if seq.generated == 0:
                    self.metrics.time_to_first_token.observe(last - seq.arrival)
                else:
                    # slow_factor is read per token so a fault switched mid-stream shows.
                    step = self.faults.slow_factor * cfg.itl_ms / 1e3
                    deadline = max(deadline, last) + step
                    await _sleep_until(loop, deadline)
                    now = loop.time()
                    self.metrics.inter_token_latency.observe(now - last)
                    last = now
                seq.generated += 1
                self.kv.ensure(allocation, prompt_len + seq.generated)
                self.metrics.generation_tokens.inc()
                yield token
            self.metrics.e2e_request_latency.observe(loop.time() - seq.arrival)
        finally:
            self._finish(seq)

    def _schedule(self) -> None:
        cfg = self.config
        while self._waiting and len(self._running) < cfg.max_num_seqs:
            seq = self._waiting[0]
            request = seq.request
            if seq.admitted.done():
                # Its caller was cancelled and has not run its cleanup yet; drop it here.
                self._waiting.popleft()
                _remove(self._waiting_adapters, request.adapter)
                continue
            prompt_len = len(request.prompt_ids)
            # At least one prompt token is always computed, so a fully cached prompt
            # still misses its last block (as in vLLM).
            lookup = seq.hashes[: max(prompt_len - 1, 0) // cfg.block_size]
            total_blocks = self.kv.blocks_for(prompt_len + len(request.output))
            allocation = self.kv.admit(lookup, total_blocks)
            if allocation is None:
                return
            self._waiting.popleft()
            _remove(self._waiting_adapters, request.adapter)
            _add(self._running_adapters, request.adapter)
            self._running.add(seq)
            seq.allocation = allocation
            self.kv.ensure(allocation, prompt_len)
            cached_tokens = allocation.hit_blocks * cfg.block_size
            if request.cacheable:
                self.metrics.prefix_cache_queries.inc(prompt_len)
                self.metrics.prefix_cache_hits.inc(cached_tokens)
            seq.admitted.set_result(cached_tokens)

    def _finish(self, seq: _Sequence) -> None:
        request = seq.request
        allocation = seq.allocation
        if allocation is None:
            # Abandoned while waiting (its future was cancelled with the caller).
            try:
                self._waiting.remove(seq)
            except ValueError:
                return
            _remove(self._waiting_adapters, request.adapter)
        else:
            seq.allocation = None
            self._running.discard(seq)
            _remove(self._running_adapters, request.adapter)
            if request.cacheable and seq.generated:
                # Generated blocks are cached too, so the next turn of a conversation
                # (which sends this reply back inside its prompt) hits them.
                ids = [*request.prompt_ids, *self.reply_ids(request.output[: seq.generated])]
                hashes = block_hashes(ids, self.config.block_size, seq.salt)
                self.kv.commit(allocation, hashes, ids, request.adapter)
            self.kv.release(allocation)
        self._schedule()


def _add(counts: collections.Counter[str], adapter: str | None) -> None:
    if adapter:
        counts[adapter] += 1


def _remove(counts: collections.Counter[str], adapter: str | None) -> None:
    if adapter:
        counts[adapter] -= 1
        if counts[adapter] <= 0:
            del counts[adapter]


async def _sleep_until(loop: asyncio.AbstractEventLoop, deadline: float) -> None:
    delay = deadline - loop.time()
    if delay > 0:
        await asyncio.sleep(delay)
