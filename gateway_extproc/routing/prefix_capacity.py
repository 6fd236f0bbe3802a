"""Approximate prefix-cache routing that knows how much each engine's cache holds.

Without KV-cache events the gateway can only guess what an engine holds from what it
sent there. `prefix.PrefixIndex` guesses "everything recent", up to a fixed number of
blocks per pod, so on tight caches it keeps sending a prompt to a pod that evicted it
long ago, and it places a new prompt wherever in-flight counts are lowest, so one pod can
be given more prompts than its cache holds and thrash while the others idle.

Here each pod's index is an LRU as large as the pod's cache, in the index's character
blocks, and it remembers when each block was last sent:

- capacity: `vllm:cache_config_info` (num_gpu_blocks x block_size tokens) times the
  characters per token (`CharsPerToken`: learned from what this processor routed and
  the prompt tokens the engines counted). Without cache info the index keeps
  `blocks_per_pod`, as `PrefixIndex` does;
- aging: a pod's blocks beyond its capacity, least recently sent first (a prompt's tail
  before its head, as engines evict), are dropped: what the engine has likely evicted
  no longer attracts requests;
- placement (`CacheFitScorer`): a prompt's blocks the pod does not hold must fit. A pod
  with room for them scores 1; a full one scores by how long the blocks it would evict
  for them have gone unused, relative to the other candidates: the new prompt evicts
  what is least likely to be asked for again, not another prompt still in use. A pod
  whose engine reports a prefix-cache hit rate well below what the index expected of
  the requests sent there (vllm:prefix_cache_hits / queries: it holds less than the
  index thinks, it thrashes) scores less for new prompts, and of several pods holding
  one prompt the one sent it last is preferred, so copies age out.

`CachePressure` is shared by the scorers that use it (this one and the TTFT predictor):
it computes a decision's matches once and records the pick once.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from itertools import compress, islice, repeat
from operator import ge, not_

from gateway_extproc.metrics.store import PodMetrics
from gateway_extproc.routing.base import RoutingRequest
from gateway_extproc.routing.plugins import Scorer, Scores, ScoringContext
from gateway_extproc.routing.prefix import PrefixIndex

# Characters per token before any estimate (English text with BPE tokenizers), and the
# range an estimate is kept in.
DEFAULT_CHARS_PER_TOKEN = 4.0
CHARS_PER_TOKEN_RANGE = (1.0, 16.0)
# Capacities are resized when the characters-per-token estimate has moved by more than
# this share since they were last sized.
RESIZE_STEP = 0.05
# Requests (routed, and finished by the engines) a per-request estimate needs.
MIN_REQUESTS = 5
# Below this expected hit rate (the share of prompt characters the index expected
# cached) a pod's reported hit rate says too little about whether it thrashes.
MIN_EXPECTED_HITS = 0.3
# A pod whose engine hits at least this share of what the index expected is not
# thrashing; below it, its cache-fit score shrinks in proportion.
HIT_TOLERANCE = 0.9
# The cache-fit score of a pod holding the whole matched prefix when another holder was
# sent it more recently: copies of one prompt on several pods would otherwise share its
# traffic, stay warm together and crowd other prompts out of the fleet's caches.
STALER_COPY = 0.5


class CapacityIndex(PrefixIndex):
    """A PrefixIndex whose per-pod LRU is bounded by each pod's own capacity (blocks,
    set by `set_capacity`) and stamps each block with when it was last sent."""

    def __init__(
        self, *, block_chars: int = 128, max_blocks: int = 512, blocks_per_pod: int = 8192
    ) -> None:
        super().__init__(
            block_chars=block_chars, max_blocks=max_blocks, blocks_per_pod=blocks_per_pod
        )
        self._capacity: dict[str, int] = {}
        self._stamped: dict[str, OrderedDict[int, float]] = {}
        # pod -> capacity - blocks held (pods never recorded nor sized: blocks_per_pod),
        # kept with every change so a decision reads all candidates' in one pass.
        self.room: dict[str, int] = {}

    def capacity(self, pod_key: str) -> int:
        return self._capacity.get(pod_key, self.blocks_per_pod)

    def rooms(self, pod_keys: Sequence[str]) -> list[int]:
        """Free blocks per pod (in C: one lookup per pod)."""
        return list(map(self.room.get, pod_keys, repeat(self.blocks_per_pod)))  # type: ignore[arg-type]

    def set_capacity(self, pod_key: str, blocks: int) -> bool:
        """The pod's cache holds about `blocks` index blocks: drop what lies beyond.
        True when the capacity changed."""
        blocks = max(1, blocks)
        if self._capacity.get(pod_key) == blocks:
            return False
        self._capacity[pod_key] = blocks
        self._trim(pod_key)
        return True

    def record(self, pod_key: str, hashes: list[int], now: float | None = None) -> None:
        if not hashes:
            return
        now = time.monotonic() if now is None else now
        lru = self._stamped.get(pod_key)
        if lru is None:
            lru = self._stamped[pod_key] = OrderedDict()
        # Last block first, so a prompt's first blocks are the most recent: its tail is
        # evicted before its head, as engines do, and a partly evicted prompt still
        # matches from its start.
        for h in reversed(hashes):
            if h in lru:
                lru.move_to_end(h)
            else:
                self._link(h, pod_key)
            lru[h] = now
        self._trim(pod_key)
        if self.on_record is not None:
            self.on_record(pod_key, hashes)

    def held(self, pod_key: str) -> int:
        lru = self._stamped.get(pod_key)
        return len(lru) if lru is not None else 0

    def blocks(self, pod_key: str) -> int:
        return self.held(pod_key)

    def sent_at(self, pod_key: str, block_hash: int) -> float | None:
        """When the pod was last sent this block (None: not held)."""
        lru = self._stamped.get(pod_key)
        return lru.get(block_hash) if lru is not None else None

    def evicted_at(self, pod_key: str, blocks: int) -> float | None:
        """When the last of the `blocks` least recently sent blocks of the pod was sent:
        what making room for `blocks` more would evict (None: nothing would be)."""
        lru = self._stamped.get(pod_key)
        if not lru or blocks <= 0:
            return None
        # In C: no Python step per block skipped.
        return next(islice(lru.values(), min(blocks, len(lru)) - 1, None))

    def forget(self, pod_key: str) -> None:
        self._capacity.pop(pod_key, None)
        self.room.pop(pod_key, None)
        for h in self._stamped.pop(pod_key, ()):
            self._unlink(h, pod_key)

    def _trim(self, pod_key: str) -> None:
        limit = self.capacity(pod_key)
        lru = self._stamped.get(pod_key)
        if lru is not None:
            while len(lru) > limit:
                old, _ = lru.popitem(last=False)
                self._unlink(old, pod_key)
        self.room[pod_key] = limit - (len(lru) if lru is not None else 0)


class CharsPerToken:
    """Prompt characters this processor routes per prompt token the engines count.

    Per pod, each scrape's cumulative counters (prompt tokens, and requests finished,
    from the e2e latency histogram's count) are paired with what was routed to the pod
    by then (characters and requests); the estimate compares their growth over the last
    `window` seconds, summed over the pods, and is smoothed from one estimate to the
    next. Per request where the engine counts requests: characters per routed request
    over tokens per engine request, so traffic this processor does not route (another
    replica's, a direct client's) does not look like longer tokens; else characters
    over tokens. A counter that went backwards (an engine restart) starts the pod's
    pairs afresh. The engine counts a prompt a fraction of a second after it was routed
    (a request when it ends): small against the window.
    """

    def __init__(self, *, window: float = 10.0, every: float = 1.0) -> None:
        self.value = DEFAULT_CHARS_PER_TOKEN
        self._window = window
        self._every = every
        self._sent: dict[str, tuple[int, int]] = {}  # pod -> (characters, requests) so far
        # pod -> (scraped_at, characters and requests routed by then, engine prompt
        # tokens, engine requests), oldest first
        self._pairs: dict[str, deque[tuple[float, int, int, float, float | None]]] = {}
        self._updated_at = -math.inf
        self._estimated = False

    def sent(self, pod_key: str, chars: int) -> None:
        chars_so_far, requests = self._sent.get(pod_key, (0, 0))
        self._sent[pod_key] = (chars_so_far + max(chars, 0), requests + 1)

    def update(
        self, keys: Sequence[str], metrics: Sequence[PodMetrics | None], now: float
    ) -> float:
        """Take the candidates' latest counters and re-estimate (at most every `every`
        seconds); returns the current estimate."""
        if now - self._updated_at < self._every:
            return self.value
        self._updated_at = now
        # Sums over every pod, and over the pods whose engine counts requests.
        chars = tokens = 0.0
        per_request = [0.0, 0.0, 0.0, 0.0]  # characters, our requests, tokens, engine's
        for key, m in zip(keys, metrics, strict=True):
            if m is None or m.prompt_tokens_total is None:
                continue
            first, last = self._pair(key, m)
            if first is last:
                continue
            d_chars, d_tokens = last[1] - first[1], last[3] - first[3]
            chars += d_chars
            tokens += d_tokens
            if first[4] is not None and last[4] is not None:
                per_request[0] += d_chars
                per_request[1] += last[2] - first[2]
                per_request[2] += d_tokens
                per_request[3] += last[4] - first[4]
        c, ours, t, theirs = per_request
        if c > 0 and t > 0 and ours >= MIN_REQUESTS and theirs >= MIN_REQUESTS:
            estimate = (c / ours) / (t / theirs)
        elif chars > 0 and tokens > 0:
            estimate = chars / tokens
        else:
            return self.value
        low, high = CHARS_PER_TOKEN_RANGE
        estimate = min(max(estimate, low), high)
        # The first estimate replaces the default outright; later ones are smoothed.
        self.value = 0.5 * self.value + 0.5 * estimate if self._estimated else estimate
        self._estimated = True
        return self.value

    def _pair(
        self, key: str, m: PodMetrics
    ) -> tuple[tuple[float, int, int, float, float | None], ...]:
        """The pod's oldest pair within the window and its newest (this scrape's)."""
        pairs = self._pairs.get(key)
        if pairs is None:
            pairs = self._pairs[key] = deque()
        tokens = m.prompt_tokens_total or 0.0
        requests = m.requests_total
        if pairs and (
            tokens < pairs[-1][3] or (requests is not None and (pairs[-1][4] or 0.0) > requests)
        ):
            pairs.clear()
        if not pairs or m.scraped_at > pairs[-1][0]:
            chars, sent = self._sent.get(key, (0, 0))
            pairs.append((m.scraped_at, chars, sent, tokens, requests))
        while len(pairs) > 2 and pairs[1][0] <= m.scraped_at - self._window:
            pairs.popleft()
        return pairs[0], pairs[-1]

    def forget(self, pod_key: str) -> None:
        self._sent.pop(pod_key, None)
        self._pairs.pop(pod_key, None)


class _Expected:
    """Per pod: the prompt characters the index expected cached on the requests it sent
    there, and all their characters, decayed per request."""

    __slots__ = ("cached", "sent")

    def __init__(self) -> None:
        self.cached = 0.0
        self.sent = 0.0


class CachePressure:
    """The shared state of cache-pressure-aware prefix routing: the index, each pod's
    capacity, and per decision the candidates' matches (computed once)."""

    def __init__(
        self,
        index: CapacityIndex,
        *,
        keep: float = 0.9,
    ) -> None:
        self.index = index
        self.chars_per_token: dict[str, CharsPerToken] = {}
        # model -> the characters per token the capacities were last sized with
        self._sizing: dict[str, float] = {}
        # The last request hashed, its hashes and which pods hold them (a sampled
        # decision asks before its candidates are scored); dropped when a pick is recorded.
        self._hashed: tuple[RoutingRequest, list[int]] | None = None
        self._held: tuple[RoutingRequest, dict[str, int]] | None = None
        self._keep = keep
        self._expected: dict[str, _Expected] = {}
        # pod -> `hit_shortfall` below 1.0, judged when the pod is picked or scraped
        self.shortfalls: dict[str, float] = {}
        # The decision the cached matches and the recorded pick belong to.
        self._matched_ctx: ScoringContext | None = None
        self._matched: dict[int, int] = {}
        self._recorded_ctx: ScoringContext | None = None

    def hashes(self, ctx: ScoringContext) -> list[int]:
        if ctx.prefix_hashes is None:
            ctx.prefix_hashes = self.hashes_of(ctx.request)
        return ctx.prefix_hashes

    def hashes_of(self, request: RoutingRequest) -> list[int]:
        """The request's block hashes, computed once however many steps ask."""
        hashed = self._hashed
        if hashed is not None and hashed[0] is request:
            return hashed[1]
        found = self.index.hashes(request.model, request.prompt)
        self._hashed = (request, found)
        return found

    def held_by(self, request: RoutingRequest) -> dict[str, int]:
        """Pod key -> leading blocks of the request's prompt the pod holds."""
        held = self._held
        if held is not None and held[0] is request:
            return held[1]
        hashes = self.hashes_of(request)
        found = self.index.matches(hashes) if hashes else {}
        self._held = (request, found)
        return found

    def matched_blocks(self, ctx: ScoringContext) -> dict[int, int]:
        """Position -> leading blocks of the prompt the pod holds (pods with none left
        out), after bringing each candidate's capacity up to date."""
        if self._matched_ctx is ctx:
            return self._matched
        if self._refresh_capacities(ctx):
            self._held = None  # capacities shrank: some blocks may have gone
        index = ctx.candidates.index
        found: dict[int, int] = {}
        for key, depth in self.held_by(ctx.request).items():
            i = index.get(key)
            if i is not None:
                found[i] = depth
        self._matched_ctx, self._matched = ctx, found
        return found

    def record(self, position: int, ctx: ScoringContext) -> None:
        """The pick: its blocks are now the pod's most recently sent (once per decision,
        however many scorers report it)."""
        if self._recorded_ctx is ctx:
            return
        self._recorded_ctx = ctx
        self._held = None  # the index changes
        key = ctx.candidates.keys[position]
        prompt_chars = len(ctx.request.prompt)
        expected = self.matched_blocks(ctx).get(position, 0) * self.index.block_chars
        self._counter(ctx.request.model).sent(key, prompt_chars)
        seen = self._expected.get(key)
        if seen is None:
            seen = self._expected[key] = _Expected()
        seen.cached = seen.cached * self._keep + min(expected, prompt_chars)
        seen.sent = seen.sent * self._keep + prompt_chars
        self._judge(key, ctx.metrics()[position])
        self.index.record(key, self.hashes(ctx), ctx.now)

    def hit_shortfall(self, pod_key: str, m: PodMetrics | None) -> float:
        """1.0, or less when the engine's reported prefix-cache hit rate falls short of
        what the index expected of the requests sent there: the pod holds less than the
        index thinks (its cache is thrashing, or traffic we do not see fills it)."""
        seen = self._expected.get(pod_key)
        if seen is None or not seen.sent or m is None:
            return 1.0
        engine = m.prefix_cache_hit_rate
        expected = seen.cached / seen.sent
        if engine is None or expected < MIN_EXPECTED_HITS:
            return 1.0
        return min(1.0, engine / (HIT_TOLERANCE * expected))

    def _judge(self, pod_key: str, m: PodMetrics | None) -> None:
        factor = self.hit_shortfall(pod_key, m)
        if factor < 1.0:
            self.shortfalls[pod_key] = factor
        else:
            self.shortfalls.pop(pod_key, None)

    def forget(self, pod_key: str) -> None:
        self._expected.pop(pod_key, None)
        self.shortfalls.pop(pod_key, None)
        for counter in self.chars_per_token.values():
            counter.forget(pod_key)

    def _counter(self, model: str) -> CharsPerToken:
        found = self.chars_per_token.get(model)
        if found is None:
            found = self.chars_per_token[model] = CharsPerToken()
        return found

    def _refresh_capacities(self, ctx: ScoringContext) -> bool:
        """Each candidate's capacity from its metrics: set again only at the pods a
        scrape changed, or at every pod when the characters per token moved. True when
        any capacity was set (the index may have dropped blocks)."""
        keys = ctx.candidates.keys
        model = ctx.request.model
        estimate = self._counter(model).update(keys, ctx.metrics(), ctx.now)
        # Capacities follow the estimate in steps, not its every wobble: resizing every
        # pod is a pass over the fleet.
        sizing = self._sizing.get(model)
        if sizing is None or abs(estimate - sizing) > RESIZE_STEP * sizing:
            sizing = self._sizing[model] = estimate

        changed = False

        def build(metrics: list[PodMetrics | None]) -> list[float]:
            nonlocal changed
            changed = self._set_capacities(keys, metrics, range(len(keys)), sizing)
            return [sizing]

        def update(used: list[float], metrics: list[PodMetrics | None], at: list[int]) -> bool:
            nonlocal changed
            if used[0] != sizing:
                return False
            changed = self._set_capacities(keys, metrics, at, sizing)
            return True

        used = ctx.per_scrape(self, build, update)
        if used[0] != sizing:  # resized since the last scrape: every pod again
            changed = self._set_capacities(keys, ctx.metrics(), range(len(keys)), sizing)
            used[0] = sizing
        return changed

    def _set_capacities(
        self,
        keys: Sequence[str],
        metrics: Sequence[PodMetrics | None],
        positions: Iterable[int],
        chars_per_token: float,
    ) -> bool:
        """True when some pod's capacity was set (and it may have dropped blocks)."""
        block_chars = self.index.block_chars
        expected = self._expected
        changed = False
        for i in positions:
            m = metrics[i]
            if m is not None and m.kv_capacity_tokens:
                blocks = int(m.kv_capacity_tokens * chars_per_token / block_chars)
                changed = self.index.set_capacity(keys[i], blocks) or changed
            if keys[i] in expected:
                self._judge(keys[i], m)
        return changed


class CacheFitScorer(Scorer):
    """Where the prompt's uncached blocks fit: 1.0 where the pod has room for them, else
    its eviction age relative to the oldest among the candidates (see the module
    docstring). Always has data."""

    name = "cache-fit"

    def __init__(self, pressure: CachePressure) -> None:
        self.pressure = pressure

    def score(self, ctx: ScoringContext) -> Scores:
        pressure = self.pressure
        index = pressure.index
        matched = pressure.matched_blocks(ctx)
        total = len(pressure.hashes(ctx))
        keys = ctx.candidates.keys
        rooms = index.rooms(keys)
        # Whether the prompt's blocks fit without evicting anything, in one C-level pass
        # for the pods that hold none of it; then the few that hold some of it.
        fits = list(map(ge, rooms, repeat(total)))
        for i, depth in matched.items():
            fits[i] = rooms[i] >= total - depth
        now = ctx.now
        ages = [math.inf] * len(keys)
        for i in compress(range(len(keys)), map(not_, fits)):
            evicted = index.evicted_at(keys[i], total - matched.get(i, 0) - rooms[i])
            if evicted is not None:
                ages[i] = max(now - evicted, 0.0)
        best = max(ages, default=math.inf)
        if best == math.inf:
            scores = [1.0 if fit else 0.0 for fit in fits]
        elif best <= 0.0:
            scores = [1.0] * len(ages)
        else:
            scores = [age / best for age in ages]
        self._prefer_one_copy(ctx, matched, scores)
        # A new prompt for a pod whose cache does not keep up scores less there.
        positions = ctx.candidates.index
        for key, factor in pressure.shortfalls.items():
            at = positions.get(key)
            if at is not None and at not in matched:
                scores[at] *= factor
        return list(scores)

    def _prefer_one_copy(
        self, ctx: ScoringContext, matched: dict[int, int], scores: list[float]
    ) -> None:
        """Of the pods holding the deepest match, all but the most recently sent one
        score STALER_COPY of their fit: the copy in use stays, the others age out,
        unless load sends requests to them (a load term outweighs this one)."""
        depth = max(matched.values(), default=0)
        holders = [i for i, d in matched.items() if d == depth]
        if len(holders) < 2:
            return
        block = self.pressure.hashes(ctx)[depth - 1]
        keys = ctx.candidates.keys
        index = self.pressure.index
        newest = max(holders, key=lambda i: index.sent_at(keys[i], block) or -math.inf)
        for i in holders:
            if i != newest:
                scores[i] *= STALER_COPY

    def picked(self, position: int, ctx: ScoringContext) -> None:
        self.pressure.record(position, ctx)
