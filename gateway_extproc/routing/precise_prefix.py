"""PrecisePrefixScorer: share of the prompt's blocks each pod's engine reports holding.

A pod whose KV-event index is trusted (kvevents/subscriber.py) scores the number of
leading prompt blocks its engine holds over the prompt's blocks, exactly as the engine's
own prefix lookup would count them. Any other pod (no event endpoint, stream dead or
behind, index not rebuilt after lost events) and every pod of a request without blocks
(no tokenizer, not tokenized) gets the approximate prefix score (routing/prefix.py), so
losing events never routes worse than approximate mode. Both scores are shares of the
prompt, so they compare. As with the approximate scorer, a pod busier than the least busy
candidate by more than `max_load_gap` requests gets no credit for its cache.
"""

from __future__ import annotations

from gateway_extproc.kvevents.index import KVBlockIndex
from gateway_extproc.routing.fastpath import Sparse
from gateway_extproc.routing.plugins import Scorer, Scores, ScoringContext


class PrecisePrefixScorer(Scorer):
    name = "precise-prefix-cache"
    # Asks the router to render and tokenize the prompt before ranking (prompt_blocks.py).
    uses_tokens = True

    def __init__(self, index: KVBlockIndex, approximate: Scorer, *, max_load_gap: int = 8) -> None:
        self.index = index
        self.approximate = approximate  # the prefix-cache scorer, as registered
        self.max_load_gap = max_load_gap

    def score(self, ctx: ScoringContext) -> Scores:
        keys = ctx.candidates.keys
        blocks = ctx.request.blocks
        index = self.index
        out: Scores = [0.0] * len(keys)
        fallback: list[int] = []
        by_size: dict[int, list[int]] = {}
        for i, pod_key in enumerate(keys):
            if blocks is None or not index.trusted(pod_key):
                fallback.append(i)
                continue
            size = index.block_size(pod_key)
            if size in blocks.keys:
                by_size.setdefault(size, []).append(i)
            # else: trusted, and nothing stored yet (or a size keyed for no one): 0.0
        if fallback:
            approximate = self.approximate
            if isinstance(approximate, Sparse):  # the few pods it scores above 0
                found = approximate.sparse(ctx)
                for i in fallback:
                    out[i] = found.get(i, 0.0)
            else:
                column = approximate.score(ctx)
                for i in fallback:
                    out[i] = column[i]
        if by_size:
            assert blocks is not None
            loads = ctx.loads()
            limit = ctx.spread()[0] + self.max_load_gap
            for size, positions in by_size.items():
                total = blocks.totals[size]
                if total <= 0:
                    continue
                depths = index.longest_prefixes(blocks.keys[size], (keys[i] for i in positions))
                for i in positions:
                    depth = depths.get(keys[i], 0)
                    if depth and loads[i] <= limit:
                        out[i] = depth / total
        return out

    def picked(self, position: int, ctx: ScoringContext) -> None:
        # The approximate index learns from every pick, ready for when events fail.
        self.approximate.picked(position, ctx)
