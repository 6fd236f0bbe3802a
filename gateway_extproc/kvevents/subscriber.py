"""KVEventSubscriber: one ZMQ SUB socket per pod that publishes KV-cache events, feeding
the KVBlockIndex, and the judgement of when a pod's index can be trusted.

Pods come from the ModelRegistry: every pod with an event endpoint (`Pod.kv_events`) that
is not terminating gets a stream, kept across readiness flaps (an engine that fails a
probe still publishes, and its index stays whole); a deleted or terminating pod, or one
whose endpoint changed, loses its stream and its blocks.

A pod's index is *trusted* (used for routing) while nothing can be missing from it that
makes it claim blocks the engine dropped:

- connected (ZMTP handshake done) for the first time: trusted. Joining a running engine
  late only means not knowing blocks cached before; those are never claimed. With a replay
  endpoint the subscriber first asks for the batches from sequence 0 it missed.
- a sequence gap (batches lost): replayed from the replay endpoint when the pod has one;
  when it has none, or the publisher no longer holds them, untrusted until rebuilt: an
  AllBlocksCleared event, or the publisher starting again (its sequence going back, so its
  cache is new) clears the index and trusts it again.
- disconnected: untrusted at once (events may be lost). On reconnection a replay from the
  last batch seen proves nothing was lost; without a replay endpoint the next batch must
  follow the last one.
- not connected for `dead_after` seconds (the endpoint refuses, nothing listens, or the
  peer vanished: ZMTP heartbeats notice a silent one): the stream is dead, warned about
  once and counted; it keeps reconnecting. Silence on a connected socket is normal, an
  idle engine publishes nothing.

An untrusted pod is scored by approximate prefix matching (routing/precise_prefix.py).
Nothing read from a socket can raise out of here: bad frames, payloads and events are
counted (`gateway_kv_events_malformed_total`) and skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from gateway_extproc import telemetry
from gateway_extproc.kvevents.index import KVBlockIndex
from gateway_extproc.kvevents.replay import request_replay
from gateway_extproc.kvevents.wire import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    WireError,
    decode_batch,
    split_message,
)
from gateway_extproc.models.registry import ModelRegistry, Pod

log = structlog.get_logger("gateway_extproc.kvevents")

# Messages read in one go before the loop gets a turn.
_DRAIN = 256
_RECEIVE_HWM = 10_000
_MAX_MESSAGE = 64 * 1024 * 1024
# ZMTP heartbeats: a peer that vanished without closing shows as a disconnect.
_HEARTBEAT_MS = 2_000
_HEARTBEAT_TIMEOUT_MS = 6_000
_RECONNECT_MAX_MS = 2_000
# A pod's malformed input is warned about at most this often (it is always counted).
_WARN_EVERY = 60.0
_MONITORED = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED

_EVENT_TYPES = ((BlockStored, "BlockStored"), (BlockRemoved, "BlockRemoved"))


@dataclass(frozen=True, slots=True)
class Endpoints:
    events: str
    replay: str = ""


def endpoints_of(pod: Pod) -> Endpoints | None:
    """Where the pod publishes, or None when it does not (or is terminating)."""
    if not pod.kv_events or pod.terminating:
        return None
    return Endpoints(pod.kv_events, pod.kv_events_replay)


class KVEventSubscriber:
    def __init__(
        self,
        registry: ModelRegistry,
        index: KVBlockIndex,
        *,
        dead_after: float = 10.0,
        replay_timeout: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if dead_after <= 0 or replay_timeout <= 0:
            raise ValueError("dead_after and replay_timeout must be positive")
        self.registry = registry
        self.index = index
        self.dead_after = dead_after
        self.replay_timeout = replay_timeout
        self.clock = clock
        self.context = zmq.asyncio.Context()
        self._streams: dict[str, _Stream] = {}
        self._started = False
        registry.on_pod_stored(self._pod_stored)
        registry.on_pod_removed(self._pod_removed)

    def start(self) -> None:
        """Subscribe to the pods the registry already has; call on the loop."""
        self._started = True
        for pod in self.registry.pods():
            self._pod_stored(pod)

    async def stop(self) -> None:
        self._started = False
        streams = list(self._streams.values())
        self._streams.clear()
        for stream in streams:
            stream.cancel()
        for stream in streams:
            await stream.wait()
        self.context.destroy(linger=0)

    def streams(self) -> dict[str, dict[str, object]]:
        """Per pod: the stream's state, for /debug/kv-events."""
        out: dict[str, dict[str, object]] = {}
        for key, stream in sorted(self._streams.items()):
            blocks = self.index.pod(key)
            out[key] = {
                "endpoint": stream.endpoints.events,
                "replay": stream.endpoints.replay,
                "connected": stream.connected,
                "dead": stream.dead,
                "trusted": self.index.trusted(key),
                "last_seq": stream.last_seq,
                "blocks": blocks.size if blocks else 0,
                "block_size": blocks.block_size if blocks else 0,
                "unkeyed_blocks": blocks.unkeyed if blocks else 0,
            }
        return out

    # -- following the registry ---------------------------------------------------------

    def _pod_stored(self, pod: Pod) -> None:
        if not self._started:
            return
        wanted = endpoints_of(pod)
        current = self._streams.get(pod.key)
        if current is not None and current.endpoints == wanted:
            return
        if current is not None:
            self._drop(pod.key)
        if wanted is not None:
            stream = _Stream(self, pod.key, wanted)
            self._streams[pod.key] = stream
            self.index.track(pod.key, model=pod.models[0] if pod.models else "")
            stream.start()
        self._count_untrusted()

    def _pod_removed(self, pod: Pod) -> None:
        self._drop(pod.key)
        self.index.forget(pod.key)  # also for a pod that never had a stream
        self._count_untrusted()

    def _drop(self, pod_key: str) -> None:
        stream = self._streams.pop(pod_key, None)
        if stream is not None:
            stream.cancel()
            self.index.forget(pod_key)
            telemetry.KV_TEXT_BLOCKS.set(len(self.index.texts))

    def _count_untrusted(self) -> None:
        telemetry.KV_EVENT_UNRELIABLE_PODS.set(
            sum(1 for key in self._streams if not self.index.trusted(key))
        )

    def set_trusted(self, pod_key: str, trusted: bool) -> None:
        if pod_key in self._streams and self.index.trusted(pod_key) != trusted:
            self.index.set_trusted(pod_key, trusted)
            self._count_untrusted()


class _Stream:
    """One pod's event stream: its socket, its sequence and its connection state."""

    def __init__(self, owner: KVEventSubscriber, pod_key: str, endpoints: Endpoints) -> None:
        self.owner = owner
        self.pod_key = pod_key
        self.endpoints = endpoints
        self.connected = False
        self.dead = False
        self.last_seq: int | None = None
        self._lost_since = owner.clock()
        self._replayed: tuple[int, int] | None = None  # seqs a replay brought ahead of live
        self._gap_open = False  # batches lost and not replayed: the index may claim too much
        self._unsure = False  # reconnected: whether batches were lost is not known yet
        self._warned_at = -_WARN_EVERY
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"kv-events:{self.pod_key}"
        )

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def wait(self) -> None:
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # -- socket loop --------------------------------------------------------------------

    async def _run(self) -> None:
        context = self.owner.context
        sub = context.socket(zmq.SUB)
        monitor: zmq.asyncio.Socket | None = None
        try:
            for option, value in (
                (zmq.LINGER, 0),
                (zmq.RCVHWM, _RECEIVE_HWM),
                (zmq.MAXMSGSIZE, _MAX_MESSAGE),
                (zmq.HEARTBEAT_IVL, _HEARTBEAT_MS),
                (zmq.HEARTBEAT_TIMEOUT, _HEARTBEAT_TIMEOUT_MS),
                (zmq.RECONNECT_IVL_MAX, _RECONNECT_MAX_MS),
            ):
                sub.setsockopt(option, value)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            monitor = sub.get_monitor_socket(_MONITORED)
            try:
                sub.connect(self.endpoints.events)
            except zmq.ZMQError as exc:
                self._declare_dead(f"cannot connect: {exc}")
                await asyncio.Event().wait()  # a bad endpoint stays bad until the pod changes
            poller = zmq.asyncio.Poller()
            poller.register(sub, zmq.POLLIN)
            poller.register(monitor, zmq.POLLIN)
            check_ms = int(min(self.owner.dead_after / 2, 1.0) * 1000) or 1
            while True:
                ready = dict(await poller.poll(check_ms))
                if monitor in ready:
                    await self._read_monitor(monitor)
                if sub in ready:
                    await self._read_messages(sub)
                self._check_dead()
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug here must cost this pod its precise routing, nothing more
            log.exception("kv_events_stream_failed", pod=self.pod_key)
            self.owner.set_trusted(self.pod_key, False)
        finally:
            for socket in (monitor, sub):
                if socket is not None:
                    with contextlib.suppress(zmq.ZMQError):
                        socket.close(linger=0)

    async def _read_monitor(self, monitor: zmq.asyncio.Socket) -> None:
        while True:
            try:
                frames = await monitor.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            event = parse_monitor_message(frames)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                await self._on_connected()
            elif event in (zmq.EVENT_DISCONNECTED, zmq.EVENT_CLOSED) and self.connected:
                self._on_disconnected()

    async def _read_messages(self, sub: zmq.asyncio.Socket) -> None:
        for _ in range(_DRAIN):
            try:
                frames = await sub.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            if not self.connected:
                await self._on_connected()  # the data came before the monitor's word
            try:
                _, seq, payload = split_message(frames)
            except WireError as exc:
                self._malformed("message", str(exc))
                continue
            await self._receive(seq, payload)
        await asyncio.sleep(0)

    # -- connection state ---------------------------------------------------------------

    def _refresh_trust(self) -> None:
        trusted = self.connected and not self._gap_open and not self._unsure
        self.owner.set_trusted(self.pod_key, trusted)

    async def _on_connected(self) -> None:
        self.connected = True
        if self.dead:
            self.dead = False
            log.info("kv_events_stream_recovered", pod=self.pod_key, endpoint=self.endpoints.events)
        last = self.last_seq
        if self._unsure and last is not None and self.endpoints.replay:
            # Reconnected: were batches lost meanwhile? A replay asked from the last batch
            # seen says (that batch must still be there); without one the next batch will.
            if await self._catch_up(last, last + 1, probe=True):
                self._unsure = False
            else:
                self._gap_open = True  # lost, or the publisher restarted: not knowable
                self._unsure = False
        self._refresh_trust()

    def _on_disconnected(self) -> None:
        self.connected = False
        self._lost_since = self.owner.clock()
        if self.last_seq is not None:
            self._unsure = True
        self._refresh_trust()

    def _check_dead(self) -> None:
        if self.connected or self.dead:
            return
        if self.owner.clock() - self._lost_since >= self.owner.dead_after:
            self._declare_dead(f"not connected for {self.owner.dead_after:g} s")

    def _declare_dead(self, why: str) -> None:
        self.dead = True
        telemetry.KV_EVENT_DEAD_STREAMS.inc()
        self._refresh_trust()
        log.warning(
            "kv_events_stream_dead",
            pod=self.pod_key,
            endpoint=self.endpoints.events,
            problem=why,
            fallback="approximate prefix routing for this pod until the stream is back",
        )

    # -- sequence -----------------------------------------------------------------------

    async def _receive(self, seq: int, payload: bytes) -> None:
        replayed = self._replayed
        if replayed is not None:
            if replayed[0] <= seq <= replayed[1]:
                return  # already applied from a replay
            if seq > replayed[1]:
                self._replayed = None
        last = self.last_seq
        if last is None:
            if seq > 0 and self.endpoints.replay:
                await self._catch_up(0, seq)  # joined late: fetch what can still be had
        elif seq <= last:
            # The publisher started again: its cache is new, and so is our view of it.
            log.info("kv_events_publisher_restarted", pod=self.pod_key, seq=seq, last=last)
            self.owner.index.clear(self.pod_key)
            self.last_seq = None
            self._gap_open = False
            if seq > 0 and self.endpoints.replay:
                await self._catch_up(0, seq)
        elif seq > last + 1:
            telemetry.KV_EVENT_GAPS.inc()
            filled = bool(self.endpoints.replay) and await self._catch_up(last + 1, seq)
            if not filled:
                self._gap_open = True
                log.warning(
                    "kv_events_lost",
                    pod=self.pod_key,
                    missing=f"{last + 1}..{seq - 1}",
                    replay=self.endpoints.replay or "none configured",
                    fallback="approximate prefix routing for this pod until its cache is "
                    "cleared or its engine restarts",
                )
        self._unsure = False  # this batch shows where the stream stands
        if self.last_seq is None or seq > self.last_seq:
            self._apply(seq, payload)  # (a replay may have brought it already)
        self._refresh_trust()

    async def _catch_up(self, start: int, until: int, *, probe: bool = False) -> bool:
        """Apply the replayed batches from `start` on; True when none before `until` is
        missing. As a `probe` (after reconnecting) batch `start` was applied already: its
        presence proves the publisher still holds the stream where we left it."""
        try:
            batches = await request_replay(
                self.owner.context,
                self.endpoints.replay,
                start,
                timeout=self.owner.replay_timeout,
            )
        except (TimeoutError, WireError, zmq.ZMQError) as exc:
            telemetry.KV_EVENT_REPLAYS.labels("failed").inc()
            self._warn("kv_events_replay_failed", problem=f"{type(exc).__name__}: {exc}")
            return False
        expected = start
        complete = True
        applied: list[int] = []
        for seq, payload in batches:
            if seq < expected:
                continue
            if seq > expected:
                complete = False  # the publisher no longer holds what came between
            if not (probe and seq == start) and (self.last_seq is None or seq > self.last_seq):
                self._apply(seq, payload)
                applied.append(seq)
            expected = seq + 1
        complete = complete and expected >= until
        if applied:
            self._replayed = (applied[0], applied[-1])
        telemetry.KV_EVENT_REPLAYS.labels("filled" if complete else "incomplete").inc()
        return complete

    def _apply(self, seq: int, payload: bytes) -> None:
        try:
            batch = decode_batch(payload)
        except WireError as exc:
            self._malformed("payload", str(exc))
            self.last_seq = max(seq, self.last_seq if self.last_seq is not None else seq)
            return
        self.last_seq = seq
        self._count(batch)
        index = self.owner.index
        index.apply(self.pod_key, batch.events)
        telemetry.KV_TEXT_BLOCKS.set(len(index.texts))
        if any(isinstance(e, AllBlocksCleared) for e in batch.events):
            self._gap_open = False  # rebuilt: the engine dropped everything, as did the index

    def _count(self, batch: EventBatch) -> None:
        for kind, label in _EVENT_TYPES:
            n = sum(1 for e in batch.events if isinstance(e, kind))
            if n:
                telemetry.KV_EVENTS.labels(label).inc(n)
        cleared = sum(1 for e in batch.events if isinstance(e, AllBlocksCleared))
        if cleared:
            telemetry.KV_EVENTS.labels("AllBlocksCleared").inc(cleared)
        if batch.unknown:
            telemetry.KV_EVENTS.labels("unknown").inc(batch.unknown)
        if batch.malformed:
            self._malformed(
                "event", f"{batch.malformed} unreadable event(s) skipped", batch.malformed
            )

    def _malformed(self, what: str, problem: str, count: int = 1) -> None:
        telemetry.KV_EVENTS_MALFORMED.labels(what).inc(count)
        self._warn("kv_events_malformed", what=what, problem=problem)

    def _warn(self, event: str, **fields: object) -> None:
        now = self.owner.clock()
        if now - self._warned_at >= _WARN_EVERY:
            self._warned_at = now
            log.warning(event, pod=self.pod_key, endpoint=self.endpoints.events, **fields)
