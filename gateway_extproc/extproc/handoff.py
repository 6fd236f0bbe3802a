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

A parked session nobody claims (the client left before Envoy reached the observer, or
the observer filter is missing) is closed as aborted after CLAIM_WINDOW_S, so its pod's
in-flight count does not stay up.
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
_WARN_EVERY_S = 60.0


class Handoff:
    def __init__(self, claim_window_s: float = CLAIM_WINDOW_S) -> None:
        self._window = claim_window_s
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
        return session

    def _expire(self, key: str) -> None:
        entry = self._parked.pop(key, None)
        if entry is None:
            return
        entry[0].close(Outcome.ABORTED)
        telemetry.HANDOFF_EXPIRED.inc()
        now = asyncio.get_running_loop().time()
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
