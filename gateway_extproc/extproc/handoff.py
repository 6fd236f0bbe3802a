"""Sessions handed from the routing stream to the observer stream.

envoy/envoy.yaml runs two ext_proc filters against the processor. The routing filter
sends the request phases and waits for the answers; it sends no response phase, so
Envoy ends its stream as soon as the request is routed and the client's response is
never held for a round trip. The observer filter runs in observability mode (Envoy sends
and does not wait): it opens its stream once the request is routed and sends the
response, which the session still needs for accounting, the in-flight count and the
access log.

The two streams are tied by a key: the routing answer writes it as dynamic metadata
(namespace `gateway_extproc`), Envoy forwards that namespace to the observer, and the
observer's first frame claims the parked session. Each filter says which stream it opens
in the gRPC initial metadata `x-gateway-extproc-role` (`route` or `observe`); a stream
without it is the single-filter shape (Envoy Gateway, envoy-full-duplex.yaml), where the
response comes on the routing stream as before.

Envoy opens the observer stream as soon as it has the routing answer, right after it
ends the routing stream. So a parked session still unclaimed ORPHAN_GRACE_S after its
routing stream ended never will be: the client left before Envoy got to the observer (or
the observer stream was reset before the processor read it, which a client that leaves
also causes). It is closed as cancelled then, and its pod's in-flight count released,
rather than counted as a missing observer. The exception is a processor on which no
observer stream has claimed anything for a while (OBSERVERS_SEEN_S): there the observer
filter, or the forwarding of its metadata, is probably missing, and the session counts
as such (`gateway_observer_missing_total`, with a warning). A session whose routing stream
never ends is closed as aborted after CLAIM_WINDOW_S, counted the same way.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets

import structlog

from gateway_extproc import telemetry
from gateway_extproc.extproc.envoy_names import HANDOFF_NAMESPACE, OBSERVE_ROLE, ROLE_METADATA
from gateway_extproc.extproc.session import Outcome, Session

log = structlog.get_logger("gateway_extproc.handoff")

# Envoy opens the observer stream right after the routing answer arrives; only a
# processor that is far behind takes seconds to read it.
CLAIM_WINDOW_S = 10.0
# The observer's first frame normally comes within milliseconds of the routing stream's
# end (it usually comes first); a processor that lags further than this behind has lost
# the observer stream anyway (Envoy resets it after its deferred_close_timeout).
ORPHAN_GRACE_S = 1.0
# A claim this recent shows the observer filter works: an unclaimed session is then a
# client that left, not a configuration problem.
OBSERVERS_SEEN_S = 60.0
_WARN_EVERY_S = 60.0


class Handoff:
    def __init__(
        self, claim_window_s: float = CLAIM_WINDOW_S, orphan_grace_s: float = ORPHAN_GRACE_S
    ) -> None:
        self._window = claim_window_s
        self._grace = orphan_grace_s
        self._claimed_at = float("-inf")
        self._parked: dict[str, tuple[Session, asyncio.TimerHandle]] = {}
        # Unique across processor restarts and replicas sharing one Envoy.
        self._prefix = f"{os.getpid():x}-{secrets.token_hex(4)}-"
        self._numbers = itertools.count(1)
        self._warned_at = float("-inf")

    def __len__(self) -> int:
        return len(self._parked)

    def new_key(self) -> str:
        return f"{self._prefix}{next(self._numbers)}"

    def park(self, key: str, session: Session) -> None:
        """Hold `session` for the observer stream (call before the routing answer goes
        out, so that the observer cannot look for it first)."""
        timer = asyncio.get_running_loop().call_later(self._window, self._expire, key)
        self._parked[key] = (session, timer)

    def claim(self, key: str) -> Session | None:
        entry = self._parked.pop(key, None)
        if entry is None:
            return None
        session, timer = entry
        timer.cancel()
        self._claimed_at = asyncio.get_running_loop().time()
        return session

    def routing_ended(self, key: str) -> None:
        """The routing stream of `key` ended: its observer comes at once or never."""
        entry = self._parked.get(key)
        if entry is None:
            return  # claimed already (the usual order), or expired
        session, timer = entry
        timer.cancel()
        loop = asyncio.get_running_loop()
        self._parked[key] = (session, loop.call_later(self._grace, self._expire, key, True))

    def _expire(self, key: str, routing_ended: bool = False) -> None:
        entry = self._parked.pop(key, None)
        if entry is None:
            return
        now = asyncio.get_running_loop().time()
        if routing_ended and now - self._claimed_at <= OBSERVERS_SEEN_S:
            entry[0].close(Outcome.CANCELLED)
            return
        entry[0].close(Outcome.ABORTED)
        telemetry.HANDOFF_EXPIRED.inc()
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
