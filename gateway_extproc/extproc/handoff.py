"""Sessions handed from the routing stream to the observer stream.

envoy/envoy.yaml runs two ext_proc filters against the processor. The routing filter
sends the request phases and waits for the answers; it sends no response phase, so the
client's response is never held for a round trip. The observer filter runs in
observability mode (Envoy sends and does not wait): it opens its stream once the request
is routed and sends the response, which the session still needs for accounting, the
in-flight count and the access log.

The two streams are tied by a key: the routing answer writes it as dynamic metadata
(namespace `gateway_extproc`), Envoy forwards that namespace to the observer, and the
observer's first frame claims the parked session. Each filter says which stream it opens
in the gRPC initial metadata `x-gateway-extproc-role` (`route` or `observe`); a stream
without it is the single-filter shape (Envoy Gateway, envoy-full-duplex.yaml), where the
response comes on the routing stream as before.

The processor ends the routing stream itself right after its routing answer (so that no
response depends on it), and Envoy opens the observer stream as soon as it has that
answer. Envoy balances each gRPC stream on its own, though: with several processors
(replicas behind one cluster, or `serve --workers N` over several connections) the
observer stream may reach another process than the one that routed. So the routing
answer also writes what accounting needs (model, pod, strategy, request id, start
time), and a process whose table has no such key observes the response from that
context (`Session.observing`) and counts it.

A key is this process's instance id and 128 random bits: seeing the keys of one's own
requests (any peer that reaches the gRPC port can route some) tells nothing of the
next. A claim with a key of this instance that holds no session (guessed, replayed,
or after its claim window) is refused and counted in
`gateway_handoff_claims_refused_total`; that stream then accounts for nothing. A key
of another instance is another process's request (see above). The port itself is no
place for strangers: it listens on loopback outside Kubernetes, and the chart's
NetworkPolicy lets only the gateway in (docs/deploy.md).

A parked session nobody claims is resolved by its timer, ORPHAN_GRACE_S after its
routing stream was cut (the client left while the answer was on its way), else
CLAIM_WINDOW_S after it was parked:

- on a processor that no observer stream has claimed anything on for a while
  (OBSERVERS_SEEN_S), the observer filter, or the forwarding of its metadata, is
  probably missing: the session is closed as aborted, counted in
  `gateway_observer_missing_total`, with a warning;
- on a processor that is one of several (observer streams of other processes' requests
  reach it), a session whose routing stream ended normally was most likely observed by
  another process, which counts it: its in-flight count is released and nothing more
  (`Session.hand_over`);
- otherwise the client left before Envoy opened its observer stream: it is closed as
  cancelled.
"""

from __future__ import annotations

import asyncio
import base64
import heapq
import secrets

import structlog

from gateway_extproc import telemetry
from gateway_extproc.extproc.envoy_names import HANDOFF_NAMESPACE, OBSERVE_ROLE, ROLE_METADATA
from gateway_extproc.extproc.session import Outcome, Session

log = structlog.get_logger("gateway_extproc.handoff")

# Envoy opens the observer stream right after the routing answer arrives, so a parked
# session still unclaimed after this long is observed by another process (or nowhere):
# its in-flight count goes. Short, because with several workers or replicas that is a
# common case; an observer that arrives later still accounts the response from the
# context the routing answer wrote (`Session.observing`).
CLAIM_WINDOW_S = 2.0
# The observer's first frame normally comes within milliseconds of the routing stream's
# end (it usually comes first); a processor that lags further than this behind has lost
# the observer stream anyway (Envoy resets it after its deferred_close_timeout).
ORPHAN_GRACE_S = 1.0
# A claim this recent shows the observer filter works: an unclaimed session is then a
# client that left, not a configuration problem.
OBSERVERS_SEEN_S = 60.0
_WARN_EVERY_S = 60.0
KEY_BYTES = 16  # random bytes in a handoff key: 128 bits
# Unclaimed sessions expire in sweeps at most this often (so up to this late).
SWEEP_EVERY_S = 0.05
# Keys' random bytes are read from the OS this many keys at a time (a system call per
# request otherwise).
KEYS_PER_READ = 256


class _KeySource:
    """Handoff keys, each KEY_BYTES of the OS's randomness (`secrets`), read in batches:
    unguessable as one read per key would be, since each key's bytes are its own and
    none is handed out twice."""

    def __init__(self) -> None:
        self._pool = b""
        self._at = 0

    def next(self) -> str:
        if self._at >= len(self._pool):
            self._pool, self._at = secrets.token_bytes(KEY_BYTES * KEYS_PER_READ), 0
        raw = self._pool[self._at : self._at + KEY_BYTES]
        self._at += KEY_BYTES
        # As secrets.token_urlsafe writes it.
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


class Handoff:
    def __init__(
        self, claim_window_s: float = CLAIM_WINDOW_S, orphan_grace_s: float = ORPHAN_GRACE_S
    ) -> None:
        self._window = claim_window_s
        self._grace = orphan_grace_s
        self._claimed_at = float("-inf")
        self._foreign_at = float("-inf")
        # key -> (session, when it expires, whether its routing stream was cut first).
        self._parked: dict[str, tuple[Session, float, bool]] = {}
        # Expiry times, with keys, as a heap; an entry whose key was claimed (or parked
        # again) is skipped when its time comes. One timer sweeps them all: a timer per
        # request, armed and cancelled, was a few us of each request (section 6).
        self._deadlines: list[tuple[float, str]] = []
        self._sweep: asyncio.TimerHandle | None = None
        self._sweep_at = float("inf")
        self._keys = _KeySource()
        # Tells this process's keys from other replicas' and workers' (and from those of
        # this process before a restart); public: every key begins with it.
        self._instance = secrets.token_hex(8) + "."
        self._warned_at = float("-inf")
        self._refused_warned_at = float("-inf")

    def __len__(self) -> int:
        return len(self._parked)

    def new_key(self) -> str:
        """Unguessable: 128 random bits after the instance id."""
        return self._instance + self._keys.next()

    def park(self, key: str, session: Session) -> None:
        """Hold `session` for the observer stream (call before the routing answer goes
        out, so that the observer cannot look for it first)."""
        self._hold(key, session, self._window, routing_ended=False)

    def claim(self, key: str) -> Session | None:
        """The session parked under `key`, taken out of the table; None when none is (see
        `refuses` for whether the stream may then observe from its context)."""
        entry = self._parked.pop(key, None)
        if entry is None:
            return None
        self._claimed_at = asyncio.get_running_loop().time()
        return entry[0]

    def refuses(self, key: str) -> bool:
        """Whether a claim of `key` that found no session is refused: the key is one of
        this process's, so no other process routed that request and its context is not
        to be believed (a guessed or replayed key, or an observer too late to count).
        Counted and logged (at most once a minute)."""
        if not key.startswith(self._instance):
            return False
        telemetry.HANDOFF_REFUSED.inc()
        now = asyncio.get_running_loop().time()
        if now - self._refused_warned_at >= _WARN_EVERY_S:
            self._refused_warned_at = now
            log.warning(
                "handoff_claim_refused",
                hint="an observer stream claimed a session this processor never parked or "
                "no longer holds: a late observer, or a peer guessing keys; check who can "
                "reach the gRPC port",
            )
        return True

    def observed_foreign(self) -> None:
        """An observer stream here carried a request another process routed: this
        processor is one of several (replicas or workers), and an unclaimed session of
        its own may just as well be observed by another."""
        self._foreign_at = asyncio.get_running_loop().time()

    def routing_ended(self, key: str) -> None:
        """The routing stream of `key` ended: its observer comes at once or never."""
        entry = self._parked.get(key)
        if entry is None:
            return  # claimed already (the usual order), or expired
        self._hold(key, entry[0], self._grace, routing_ended=True)

    def _hold(self, key: str, session: Session, for_s: float, *, routing_ended: bool) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + for_s
        self._parked[key] = (session, due, routing_ended)
        heapq.heappush(self._deadlines, (due, key))
        if due < self._sweep_at:
            if self._sweep is not None:
                self._sweep.cancel()
            # Never sooner than SWEEP_EVERY_S after now: expiries due together are swept
            # together (and under load a sweep does not run for every request).
            self._sweep_at = max(due, loop.time() + SWEEP_EVERY_S)
            self._sweep = loop.call_at(self._sweep_at, self._expire_due)

    def _expire_due(self) -> None:
        loop = asyncio.get_running_loop()
        self._sweep, self._sweep_at = None, float("inf")
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= loop.time():
            due, key = heapq.heappop(deadlines)
            entry = self._parked.get(key)
            if entry is not None and entry[1] == due:  # not claimed, nor held anew since
                del self._parked[key]
                self._expire(entry[0], entry[2])
        if deadlines:
            self._sweep_at = max(deadlines[0][0], loop.time() + SWEEP_EVERY_S)
            self._sweep = loop.call_at(self._sweep_at, self._expire_due)

    def _expire(self, session: Session, routing_ended: bool) -> None:
        now = asyncio.get_running_loop().time()
        if now - self._claimed_at <= OBSERVERS_SEEN_S:
            if not routing_ended and now - self._foreign_at <= OBSERVERS_SEEN_S:
                session.hand_over()  # observed, and counted, by another replica or worker
            else:
                session.close(Outcome.CANCELLED)  # the client left before its observer
            return
        telemetry.HANDOFF_EXPIRED.inc()
        session.close(Outcome.ABORTED)
        if now - self._warned_at >= _WARN_EVERY_S:
            self._warned_at = now
            log.warning(
                "observer_stream_missing",
                hint="a routed request's response stream never reached the processor; "
                "if this keeps happening, check that Envoy runs the observer filter "
                f"(gRPC initial metadata {ROLE_METADATA}: {OBSERVE_ROLE}) and forwards the "
                f"{HANDOFF_NAMESPACE} metadata namespace to it",
                claim_window_s=self._window,
            )
