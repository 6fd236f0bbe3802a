"""The KV cache as a pool of fixed-size token blocks with automatic prefix caching.

Modelled on vLLM's block pool: a full block is identified by a hash that chains the
hash of the block before it, so equal hashes mean equal prefixes. Blocks referenced by
running requests are in use and never evicted; a cached block nobody references waits
in an LRU queue and is reused on a hit or evicted when a new block is needed. KV usage
is blocks in use / total blocks, the same quantity as `vllm:kv_cache_usage_perc`.

Admission reserves every block a request can ever need (prompt + max_tokens) so a
running request never has to be preempted; blocks are only *in use* once their tokens
exist, so usage grows while a reply is generated.

With `on_event` set, the cache reports what it holds as vLLM's KV-cache events do:
BlockStored when blocks become cached (with their tokens), BlockRemoved when cached blocks
are evicted, AllBlocksCleared on `reset`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from gateway_extproc.kvevents.wire import AllBlocksCleared, BlockRemoved, BlockStored, Event

_UINT64 = (1 << 64) - 1


def block_hashes(token_ids: Sequence[int], block_size: int, salt: int = 0) -> list[int]:
    """Chained hashes of the full blocks of `token_ids` (a partial tail has none).

    `salt` separates caches that must not share blocks, such as different adapters.
    Tuple hashes of ints are not randomised per process, so ids agree across processes.
    """
    hashes: list[int] = []
    parent = salt
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash((parent, *token_ids[start : start + block_size]))
        hashes.append(parent)
    return hashes


@dataclass(slots=True, eq=False)
class Allocation:
    """The blocks one request holds. Owned by the KVCache that made it."""

    held: list[int] = field(default_factory=list)  # cached blocks referenced, in order
    private: int = 0  # blocks in use whose content is not (yet) a cached block
    reserved: int = 0  # blocks promised at admission, not yet in use
    hit_blocks: int = 0  # prompt blocks found in the cache at admission


class KVCache:
    def __init__(
        self, num_blocks: int, block_size: int, on_event: Callable[[Event], None] | None = None
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.on_event = on_event
        self._refs: dict[int, int] = {}  # cached block hash -> requests referencing it
        self._idle: OrderedDict[int, None] = OrderedDict()  # refs == 0, oldest first
        self._referenced = 0  # cached blocks with refs > 0
        self._private = 0
        self._reserved = 0

    @property
    def blocks_in_use(self) -> int:
        return self._referenced + self._private

    @property
    def usage(self) -> float:
        return self.blocks_in_use / self.num_blocks

    @property
    def cached_blocks(self) -> int:
        return len(self._refs)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def admit(self, prefix_hashes: Sequence[int], total_blocks: int) -> Allocation | None:
        """Take the cached prefix of `prefix_hashes` and reserve the rest of
        `total_blocks`; None when that does not fit now (the caller keeps waiting)."""
        hits = 0
        idle_hits = 0
        for block_hash in prefix_hashes:
            refs = self._refs.get(block_hash)
            if refs is None:
                break
            hits += 1
            if refs == 0:
                idle_hits += 1
        # Idle hits stop being evictable once referenced, so they count against room.
        committed = self._referenced + self._private + self._reserved + idle_hits
        if committed + total_blocks - hits > self.num_blocks:
            return None
        allocation = Allocation(reserved=total_blocks - hits, hit_blocks=hits)
        for block_hash in prefix_hashes[:hits]:
            self._ref(block_hash)
            allocation.held.append(block_hash)
        self._reserved += allocation.reserved
        return allocation

    def ensure(self, allocation: Allocation, num_tokens: int) -> None:
        """Put enough blocks in use to hold `num_tokens` (within the reservation)."""
        missing = self.blocks_for(num_tokens) - len(allocation.held) - allocation.private
        grow = min(missing, allocation.reserved)
        for _ in range(grow):
            if self._referenced + self._private + len(self._idle) >= self.num_blocks:
                evicted, _ = self._idle.popitem(last=False)
                del self._refs[evicted]
                if self.on_event is not None:
                    self.on_event(BlockRemoved(block_hashes=(evicted & _UINT64,), medium="GPU"))
            allocation.reserved -= 1
            self._reserved -= 1
            allocation.private += 1
            self._private += 1

    def commit(
        self,
        allocation: Allocation,
        hashes: Sequence[int],
        token_ids: Sequence[int] = (),
        adapter: str | None = None,
    ) -> None:
        """Turn private blocks into cached ones for `hashes` beyond those already held
        (`hashes` are the request's full-block hashes from its first block, `token_ids`
        its tokens, for the BlockStored event)."""
        first_new: int | None = None
        end = len(allocation.held)
        for position in range(len(allocation.held), len(hashes)):
            if allocation.private == 0:
                break
            block_hash = hashes[position]
            allocation.private -= 1
            self._private -= 1
            # If another request cached the same block meanwhile, share it; our copy
            # simply goes back to the free pool.
            if block_hash not in self._refs and first_new is None:
                first_new = position
            self._ref(block_hash)
            allocation.held.append(block_hash)
            end = position + 1
        if first_new is not None and self.on_event is not None:
            self._stored(hashes, token_ids, first_new, end, adapter)

    def reset(self) -> bool:
        """Drop every cached block, as vLLM's /reset_prefix_cache; False (nothing done)
        while requests hold blocks."""
        if self._referenced or self._private or self._reserved:
            return False
        self._refs.clear()
        self._idle.clear()
        if self.on_event is not None:
            self.on_event(AllBlocksCleared())
        return True

    def _stored(
        self,
        hashes: Sequence[int],
        token_ids: Sequence[int],
        start: int,
        end: int,
        adapter: str | None,
    ) -> None:
        size = self.block_size
        if len(token_ids) < end * size:
            return  # no tokens to tell (a caller that does not publish)
        self.on_event(  # type: ignore[misc]
            BlockStored(
                block_hashes=tuple(h & _UINT64 for h in hashes[start:end]),
                parent_hash=hashes[start - 1] & _UINT64 if start else None,
                token_ids=tuple(token_ids[start * size : end * size]),
                block_size=size,
                lora_name=adapter,
                medium="GPU",
            )
        )

    def release(self, allocation: Allocation) -> None:
        # The tail goes into the LRU queue first so it is evicted before the prefix
        # blocks that more future requests are likely to share (vLLM does the same).
        for block_hash in reversed(allocation.held):
            refs = self._refs[block_hash] - 1
            self._refs[block_hash] = refs
            if refs == 0:
                self._referenced -= 1
                self._idle[block_hash] = None
        allocation.held.clear()
        self._private -= allocation.private
        self._reserved -= allocation.reserved
        allocation.private = 0
        allocation.reserved = 0

    def _ref(self, block_hash: int) -> None:
        refs = self._refs.get(block_hash, 0)
        if refs == 0:
            self._referenced += 1
            self._idle.pop(block_hash, None)
        self._refs[block_hash] = refs + 1
