"""Prefix-cache affinity: which pods have recently been sent which prompt prefixes.

The prompt is cut into fixed-size character blocks and each block's hash covers every
block before it (and the model), so one hash stands for a whole prefix and a match on
block i means the pod saw blocks 0..i. Each pod keeps an LRU of the block hashes routed to
it (roughly what its engine's prefix cache still holds); a reverse map finds the pods
holding a hash in one lookup. Entries of a deleted pod are dropped with it.

The reverse map holds tuples, not sets: a tuple of strings is untracked by the garbage
collector after its first pass, while every set is walked by every full collection (a
pause on the event loop, seen as a 50 ms worst case in the long-prompt bench). A capacity
index holding 200k hashes over 8 pods: one full collection 58 ms with sets, 14 ms with
tuples (the rest is the per-pod LRUs). A hash is rarely held by more than a few pods, so
rebuilding its tuple is cheap.

Block hashes are xxh3-64, each block's seeded with the hash before it and the first
with the model's, which is seeded with the index's `seed`: the same prompt hashes alike
in every process given the same seed (Python's `hash()` is salted per process), so
replicas can share placements (`Placements`, redis_placements.py). The seed is secret
per deployment: a public one would let a client craft prompts whose hashes collide and
slow the index's dicts down (hash flooding).
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from collections.abc import Callable

from xxhash import xxh3_64_intdigest

from gateway_extproc.routing.fastpath import Sparse
from gateway_extproc.routing.plugins import Scorer, Scores, ScoringContext

# The seed of every index in this process unless one is set (`Placements.add`): scorers
# of one decision share its hashes (`ScoringContext.prefix_hashes`), whatever index made
# them, as with `hash()`, salted once per process.
PROCESS_SEED = secrets.randbits(64)


class PrefixIndex:
    def __init__(
        self, *, block_chars: int = 128, max_blocks: int = 512, blocks_per_pod: int = 8192
    ) -> None:
        if block_chars <= 0 or max_blocks <= 0 or blocks_per_pod <= 0:
            raise ValueError("block_chars, max_blocks and blocks_per_pod must be positive")
        self.block_chars = block_chars
        self.max_blocks = max_blocks
        self.blocks_per_pod = blocks_per_pod
        self._by_pod: dict[str, OrderedDict[int, None]] = {}
        self._pods_by_hash: dict[int, tuple[str, ...]] = {}
        self.seed = PROCESS_SEED
        # Told each placement `record` makes (set by `Placements.add`).
        self.on_record: Callable[[str, list[int]], None] | None = None

    def hashes(self, model: str, prompt: str) -> list[int]:
        """Cumulative hashes of the prompt's full blocks (a partial tail block is not
        cached by engines either); at most `max_blocks`, since only a prefix matters."""
        size = self.block_chars
        end = min(len(prompt) - len(prompt) % size, size * self.max_blocks)
        h = xxh3_64_intdigest(model.encode("utf-8", "surrogatepass"), self.seed)
        out: list[int] = []
        if prompt.isascii():  # one encode, then byte slices (the common case)
            data = prompt.encode("ascii")
            for start in range(0, end, size):
                h = xxh3_64_intdigest(data[start : start + size], h)
                out.append(h)
        else:
            for start in range(0, end, size):
                block = prompt[start : start + size].encode("utf-8", "surrogatepass")
                h = xxh3_64_intdigest(block, h)
                out.append(h)
        return out

    def matches(self, hashes: list[int]) -> dict[str, int]:
        """Pod key -> number of leading blocks that pod was sent (pods with none omitted)."""
        found: dict[str, int] = {}
        pods_by_hash = self._pods_by_hash
        for depth, h in enumerate(hashes, start=1):
            pods = pods_by_hash.get(h)
            if not pods:
                break
            found.update(dict.fromkeys(pods, depth))  # in C: popular prefixes reach many pods
        return found

    def record(self, pod_key: str, hashes: list[int]) -> None:
        if not hashes:
            return
        lru = self._by_pod.get(pod_key)
        if lru is None:
            lru = self._by_pod[pod_key] = OrderedDict()
        for h in hashes:
            if h in lru:
                lru.move_to_end(h)
            else:
                lru[h] = None
                self._link(h, pod_key)
        while len(lru) > self.blocks_per_pod:
            old, _ = lru.popitem(last=False)
            self._unlink(old, pod_key)
        if self.on_record is not None:
            self.on_record(pod_key, hashes)

    def learn(self, pod_key: str, hashes: list[int]) -> None:
        """Record a placement another replica made (not told to `on_record` again)."""
        told, self.on_record = self.on_record, None
        try:
            self.record(pod_key, hashes)
        finally:
            self.on_record = told

    def forget(self, pod_key: str) -> None:
        for h in self._by_pod.pop(pod_key, ()):
            self._unlink(h, pod_key)

    def blocks(self, pod_key: str) -> int:
        lru = self._by_pod.get(pod_key)
        return len(lru) if lru is not None else 0

    def _link(self, h: int, pod_key: str) -> None:
        """Add the pod to the hash's holders (the caller knows it is not one yet)."""
        self._pods_by_hash[h] = (*self._pods_by_hash.get(h, ()), pod_key)

    def _unlink(self, h: int, pod_key: str) -> None:
        pods = self._pods_by_hash.get(h)
        if pods is not None:
            left = tuple(p for p in pods if p != pod_key)
            if left:
                self._pods_by_hash[h] = left
            else:
                del self._pods_by_hash[h]


class Placements:
    """The prefix indexes of this process by name, one hash seed for all, and where
    their placements go: `publish` (set by redis_placements.py) is told every
    placement recorded here; `apply` records one another replica made."""

    def __init__(self, seed: int | None = None) -> None:
        self.seed = PROCESS_SEED if seed is None else seed
        self.indexes: dict[str, PrefixIndex] = {}
        self.publish: Callable[[str, str, list[int]], None] | None = None

    def add(self, name: str, index: PrefixIndex) -> None:
        index.seed = self.seed

        def recorded(pod_key: str, hashes: list[int]) -> None:
            if self.publish is not None:
                self.publish(name, pod_key, hashes)

        index.on_record = recorded
        self.indexes[name] = index

    def apply(self, name: str, pod_key: str, hashes: list[int]) -> bool:
        """Record another replica's placement; False when no index has that name."""
        index = self.indexes.get(name)
        if index is None:
            return False
        index.learn(pod_key, hashes)
        return True


class PrefixCacheScorer(Scorer, Sparse):
    """Share of the prompt's blocks a pod was already sent, guarded by load: a pod busier
    than the least busy candidate by more than `max_load_gap` requests gets no credit for
    its cache, so a popular prefix cannot pile every request onto one pod."""

    name = "prefix-cache"

    def __init__(self, index: PrefixIndex, *, max_load_gap: int = 8) -> None:
        self.index = index
        self.max_load_gap = max_load_gap

    def score(self, ctx: ScoringContext) -> Scores:
        out: Scores = [0.0] * len(ctx.candidates.keys)
        for i, score in self.sparse(ctx).items():
            out[i] = score
        return out

    def sparse(self, ctx: ScoringContext) -> dict[int, float]:
        """Position -> score of the candidates that score above 0 (those it matched)."""
        hashes = self._hashes(ctx)
        matches = self.index.matches(hashes) if hashes else None
        if not matches:
            return {}
        loads = ctx.loads()
        limit = ctx.spread()[0] + self.max_load_gap
        total = len(hashes)
        index = ctx.candidates.index
        out: dict[int, float] = {}
        for key, depth in matches.items():
            i = index.get(key)
            if i is not None and loads[i] <= limit:
                out[i] = depth / total
        return out

    def picked(self, position: int, ctx: ScoringContext) -> None:
        self.index.record(ctx.candidates.keys[position], self._hashes(ctx))

    def _hashes(self, ctx: ScoringContext) -> list[int]:
        if ctx.prefix_hashes is None:
            ctx.prefix_hashes = self.index.hashes(ctx.request.model, ctx.request.prompt)
        return ctx.prefix_hashes
