"""Predicted time to first token: the scorer that prefers the pod where this request
should see its first token soonest.

    predicted = queue wait + backlog wait + slowness x line(uncached prompt characters)

- uncached: the prompt's length minus the prefix the pod is expected to hold. For a pod
  whose KV-cache events are trusted (kvevents/: subscribed, nothing lost) and a request
  cut into the engines' blocks (prompt_blocks.py, the same blocks the precise prefix
  scorer reads), that is the longest prefix the engine reports holding, plus what this
  processor sent the pod in the last PENDING_S seconds (the engine reports blocks once
  it has computed them: without this, a burst of one new prompt would be spread before
  the first of them is stored). Every processor reading the same engines then expects
  the same. Otherwise (no events, stream dead or behind, no tokenizer) it is the
  gateway's guess from its own routing history (`prefix_capacity.CachePressure`: its
  index ages out what the engine has likely evicted);
- slowness x line: the pod's measured speed (`measured.MeasuredLatency`, from the
  responses the gateway saw; a pod without samples counts as typical);
- queue wait: requests ahead x how often a slot frees up (the pod's measured response
  duration / the requests it runs). Requests ahead are the engine's waiting queue and,
  while the engine reports one (it is full), the requests on the pod
  (`signals.LoadBook`: ours, corrected by the engine's counts) beyond what it runs and
  queues, added. An engine that queues nothing runs what we send at once, so in-flight
  counts alone add no wait; the profile's load term spreads those;
- backlog wait: the prefill this processor sent the pod that should not be done yet
  (each pick's predicted prefill, queued behind the pod's earlier ones), times the share
  of it that the fleet's measured TTFTs show to delay a new request
  (`MeasuredLatency.backlog_weight`: engines whose prefills share the GPU delay the
  next request by about all of it; the simulator without --serial-prefill by none).

Scores are best / predicted, so a pod predicted twice as slow as the best scores 0.5. It
always has data: with no metrics the queue term is 0, with no samples the speed is the
fleet's (or a default line), so it never sends a pod to probation by itself.

When a pick is made the scorer notes what it expected of the request (the pod and the
uncached length), keyed by request id, so that the response's measured TTFT teaches the
line and the pod's slowness (`observed`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from itertools import compress

from gateway_extproc.kvevents.index import KVBlockIndex
from gateway_extproc.routing.base import PromptBlocks
from gateway_extproc.routing.measured import MeasuredLatency, ResponseTiming
from gateway_extproc.routing.plugins import Scorer, Scores, ScoringContext
from gateway_extproc.routing.prefix_capacity import CachePressure

# Keeps tiny predictions from turning small absolute differences into large ratios.
FLOOR_SECONDS = 0.001
# Predictions within this fraction of the best one score as the best: measured speeds
# are this noisy, and a pod a few percent "faster" by chance must not draw every new
# prompt (where a prompt fits, and load, decide between them).
MARGIN = 0.15
# Picks remembered until their response ends (older ones are dropped first).
MAX_NOTES = 65536
# A prefix this processor sent a pod this recently counts as held even where the pod's
# KV events do not show it yet: the engine reports blocks once it has prefilled them
# (a long prompt's prefill plus the event's trip takes well under this).
PENDING_S = 2.0


class PredictedTTFTScorer(Scorer):
    name = "predicted-ttft"

    # Reads the prompt's KV blocks when the router has them (precise prefix, below).
    uses_tokens = True

    def __init__(
        self,
        measured: MeasuredLatency,
        pressure: CachePressure,
        *,
        events: KVBlockIndex | None = None,
        max_notes: int = MAX_NOTES,
    ) -> None:
        self.measured = measured
        self.pressure = pressure
        self.events = events
        self._max_notes = max_notes
        # request id -> (pod key, expected uncached characters, prompt characters,
        # the pod's prefill backlog then)
        self._notes: OrderedDict[str, tuple[str, float, float, float]] = OrderedDict()
        # pod key -> when the prefill routing expects the pod to have done
        self._prefill_done_at: dict[str, float] = {}
        self._last: tuple[ScoringContext, list[float]] | None = None
        self._cached: tuple[ScoringContext, dict[int, float]] | None = None

    def score(self, ctx: ScoringContext) -> Scores:
        predicted = self.predict(ctx)
        top = min(predicted, default=0.0) * (1.0 + MARGIN)
        return [min(top / value, 1.0) for value in predicted]

    def predict(self, ctx: ScoringContext) -> list[float]:
        """Predicted TTFT (seconds) per candidate. Per pod, a multiplication and an
        addition in one pass; the few pods that hold part of the prompt, have prefill
        backlog or a waiting queue are adjusted one by one."""
        last = self._last
        if last is not None and last[0] is ctx:
            return last[1]
        measured = self.measured
        now = ctx.now
        keys = ctx.candidates.keys
        prompt_chars = len(ctx.request.prompt)
        base, per_char = measured.line()
        slowness = measured.slowness_of(keys, now)
        uncached_all = base + per_char * prompt_chars
        out = [s * uncached_all + FLOOR_SECONDS for s in slowness]
        for i, cached in self.cached_chars(ctx).items():
            uncached = max(prompt_chars - cached, 0.0)
            out[i] = slowness[i] * (base + per_char * uncached) + FLOOR_SECONDS
        self._add_backlog(ctx, out, now)
        waiting_seen = ctx.view().waiting
        if any(waiting_seen):
            metrics = ctx.metrics()
            loads = ctx.loads()
            for i in compress(range(len(keys)), waiting_seen):
                m = metrics[i]
                if m is None or not m.waiting:
                    continue
                running = m.running or 0
                # The requests on the pod (ours and other replicas') are its load less
                # the waiting queue the load counts.
                inflight = loads[i] - waiting_seen[i]
                ahead = m.waiting + max(inflight - running - m.waiting, 0)
                per_request = measured.duration(keys[i]) or m.e2e_mean_recent or 0.0
                if 0.0 < per_request < math.inf:
                    out[i] += ahead * per_request / max(running, 1)
        self._last = (ctx, out)
        return out

    def _add_backlog(self, ctx: ScoringContext, out: list[float], now: float) -> None:
        """Add the weighted prefill backlog of the candidates that have one (and drop
        the pods whose backlog is done)."""
        done_at = self._prefill_done_at
        if not done_at:
            return
        weight = self.measured.backlog_weight()
        index = ctx.candidates.index
        done = []
        for key, at in done_at.items():
            if at <= now:
                done.append(key)
                continue
            i = index.get(key)
            if i is not None:
                out[i] += weight * (at - now)
        for key in done:
            del done_at[key]

    def picked(self, position: int, ctx: ScoringContext) -> None:
        self.pressure.record(position, ctx)
        request_id = ctx.request.request_id
        if not request_id:
            return
        prompt_chars = len(ctx.request.prompt)
        uncached = max(prompt_chars - self.cached_chars(ctx).get(position, 0.0), 0.0)
        key = ctx.candidates.keys[position]
        # This request's prefill queues behind what the pod has not done yet.
        now = ctx.now
        start = max(self._prefill_done_at.get(key, now), now)
        self._prefill_done_at[key] = start + self.measured.prefill_seconds(key, uncached, now)
        notes = self._notes
        notes.pop(request_id, None)
        notes[request_id] = (key, float(uncached), float(prompt_chars), start - now)
        if len(notes) > self._max_notes:
            notes.popitem(last=False)

    def cached_chars(self, ctx: ScoringContext) -> dict[int, float]:
        """Position -> prompt characters the pod is expected to hold cached (pods expected
        to hold none left out), computed once per decision."""
        last = self._cached
        if last is not None and last[0] is ctx:
            return last[1]
        pressure = self.pressure
        block_chars = pressure.index.block_chars
        guessed = pressure.matched_blocks(ctx)
        found = {i: float(depth * block_chars) for i, depth in guessed.items()}
        blocks = ctx.request.blocks
        events = self.events
        if blocks is not None and events is not None:
            self._read_events(ctx, blocks, events, guessed, found)
        self._cached = (ctx, found)
        return found

    def _read_events(
        self,
        ctx: ScoringContext,
        blocks: PromptBlocks,
        events: KVBlockIndex,
        guessed: dict[int, int],
        found: dict[int, float],
    ) -> None:
        """Replace the guess by what the engine reports, at the pods whose events are
        trusted: the longest prefix held (as a share of the prompt's blocks, so in the
        prompt's characters), or a prefix this processor sent there in the last
        PENDING_S seconds (not reported yet), whichever is longer."""
        keys = ctx.candidates.keys
        prompt_chars = len(ctx.request.prompt)
        by_size: dict[int, list[int]] = {}
        for i, pod_key in enumerate(keys):
            if events.trusted(pod_key):
                by_size.setdefault(events.block_size(pod_key), []).append(i)
        if not by_size:
            return
        pressure = self.pressure
        index = pressure.index
        hashes = pressure.hashes(ctx)
        block_chars = index.block_chars
        recent = ctx.now - PENDING_S
        for size, positions in by_size.items():
            chain = blocks.keys.get(size)
            total = blocks.totals.get(size, 0)
            depths = (
                events.longest_prefixes(chain, (keys[i] for i in positions))
                if chain and total > 0
                else {}
            )
            for i in positions:
                depth = depths.get(keys[i], 0)
                held = prompt_chars * min(depth / total, 1.0) if depth else 0.0
                sent = guessed.get(i, 0)
                if sent:
                    at = index.sent_at(keys[i], hashes[sent - 1])
                    if at is not None and at >= recent:
                        held = max(held, float(sent * block_chars))
                if held > 0.0:
                    found[i] = held
                else:
                    found.pop(i, None)

    def observed(self, timing: ResponseTiming) -> None:
        """A response ended: teach the measured latencies what it showed."""
        note = self._notes.pop(timing.request_id, None)
        if note is None or note[0] != timing.pod_key:
            # Not picked by this scorer, or served by another pod (Envoy's fallback):
            # its expectations are unknown, only the pod's plain means learn.
            self.measured.observe(
                timing.pod_key, ttft=timing.ttft, tpot=timing.tpot, duration=timing.duration
            )
            return
        _, uncached, prompt_chars, backlog = note
        self.measured.observe(
            timing.pod_key,
            ttft=timing.ttft,
            tpot=timing.tpot,
            duration=timing.duration,
            uncached_chars=uncached,
            prompt_chars=prompt_chars,
            backlog=backlog,
        )

    def forget(self, pod_key: str) -> None:
        self.measured.forget(pod_key)
        self._prefill_done_at.pop(pod_key, None)
