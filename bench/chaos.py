"""Section 10, the fault script: `python -m bench chaos` (`make chaos`).

Real processes (bench.fleet): three simulated engines, the processor with its defaults
(started through bench.memory_probe, for its RSS) and a front Envoy on the shipped
envoy/envoy.yaml with only its ports moved. Faults, one after the other, each under
client traffic:

- `engine-killed`: kill -9 one of the three engines under load (restarted afterwards);
- `engine-500`: one engine answers 500 to every inference request (/admin/faults);
- `engine-hung`: one engine stopped (SIGSTOP) under load, then resumed (SIGCONT);
- `models-garbage`, `models-empty`, `models-partial`, `models-nested`: the models file
  overwritten with bytes that are not YAML, with nothing, by a slow writer (a pod entry
  at a time, 0.2 s apart), and with YAML nested 100,000 deep; each followed by a new good
  file, which must take effect (the watcher is alive);
- `stalled-uploads`: 10,000 connections that send headers and part of a body, then
  stall, while ordinary clients send requests; then all closed at once, and ordinary
  clients again while the processor ends those streams;
- `abandoned-streams`: 3,000 streaming requests closed by the client after the first
  event.

After each engine fault, light traffic runs until passive health has let every pod back
in (at most 60 s, reported as `whole_again_after_s`), so each fault starts from a whole
fleet rather than from the previous one's backoff.

For each: requests sent, status counts, 5xx the configuration did not ask for,
whether the processor's log shows a Traceback, whether the dictionary survived
(/debug/models lists the three engines, /readyz answers 200), RSS before and after.

5xx "asked for" by the configuration: with an engine killed or failing, Envoy's 503
(connect failure, retried once on the same pod) or the engine's own 500 until passive
health ejects the pod (5 failures in a row) and at each re-admission; so 5xx are only
counted as unasked when sent more than GRACE_S after the fault began, and the check
allows 1% of such requests (a re-admitted pod fails its next requests again). With a
hung engine, the shipped route gives up after 120 s (per_try_idle_timeout), longer than
this script waits: a client timeout (10 s) sent after GRACE_S counts like an unasked
5xx. Every other fault allows no 5xx and no client timeout at all.

Every check that fails is listed at the end of the section and makes `python -m bench
chaos` exit 1, so the script is a pass/fail gate a person runs (`make chaos`, a few
minutes); it is not part of `make test`, which must not depend on timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import RunMode, Section, table
from bench.fleet import (
    MODEL,
    Fleet,
    Processor,
    chat_body,
    set_engine_faults,
    start_fleet,
)
from bench.soak import VARIANTS
from bench.stack import write_models_file
from gateway_extproc.devtools import localstack
from gateway_extproc.devtools.localstack import LOCALHOST

NAME = "chaos"
TITLE = "10. Faults: engines, models file, stalled uploads, abandoned streams"
PATH = "/v1/chat/completions"
GRACE_S = 2.0
LATE_5XX_ALLOWED = 0.01
CLIENT_TIMEOUT_S = 10.0
SETTLE_S = 60.0
MB = 1024 * 1024


# -- traffic ----------------------------------------------------------------------------


@dataclass
class Tally:
    """What the clients saw: (seconds since the fault began, outcome) per request, where
    the outcome is an HTTP status or `timeout` / `error`."""

    outcomes: list[tuple[float, str]] = field(default_factory=list)

    def add(self, at: float, outcome: str) -> None:
        self.outcomes.append((at, outcome))

    @property
    def sent(self) -> int:
        return len(self.outcomes)

    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(o for _, o in self.outcomes).items()))

    def bad(self, after: float = float("-inf")) -> int:
        """5xx, client timeouts and connection errors among requests sent after `after`."""
        return sum(1 for at, o in self.outcomes if at >= after and o[0] not in "1234")

    def sent_after(self, after: float) -> int:
        return sum(1 for at, _ in self.outcomes if at >= after)


async def one_request(
    session: aiohttp.ClientSession, port: int, body: bytes, tally: Tally, origin: float
) -> None:
    at = time.monotonic() - origin
    try:
        async with session.post(
            f"http://{LOCALHOST}:{port}{PATH}",
            data=body,
            headers={"content-type": "application/json"},
        ) as response:
            await response.read()
            tally.add(at, str(response.status))
    except TimeoutError:
        tally.add(at, "timeout")
    except aiohttp.ClientError:
        tally.add(at, "error")


async def drive(
    port: int,
    seconds: float,
    concurrency: int,
    tally: Tally,
    origin: float,
    *,
    max_requests: int = 1_000_000,
) -> None:
    """`concurrency` clients sending requests back to back for `seconds` (or until
    `max_requests`), each with a CLIENT_TIMEOUT_S limit."""
    body = chat_body()
    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=0)
    deadline = time.monotonic() + seconds
    sent = 0
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def client() -> None:
            nonlocal sent
            while time.monotonic() < deadline and sent < max_requests:
                sent += 1
                await one_request(session, port, body, tally, origin)

        await asyncio.gather(*(client() for _ in range(concurrency)))


async def during(
    port: int,
    seconds: float,
    concurrency: int,
    fault: Callable[[], Awaitable[None]],
    fault_at: float,
) -> Tally:
    """Traffic for `seconds`; `fault` runs `fault_at` seconds in (times in the tally are
    relative to it)."""
    tally = Tally()
    origin = time.monotonic() + fault_at

    async def inject() -> None:
        await asyncio.sleep(fault_at)
        await fault()

    await asyncio.gather(drive(port, seconds, concurrency, tally, origin), inject())
    return tally


# -- observations ---------------------------------------------------------------------


@dataclass
class Observation:
    name: str
    what: str
    tally: Tally
    unasked_5xx: int
    traceback: bool
    dictionary: str
    dictionary_ok: bool
    rss_before: int
    rss_after: int
    extra: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def row(r: dict[str, Any]) -> list[str]:
    """A fault's table row, from what run() records of it."""
    counts = ", ".join(f"{k}: {v:,}" for k, v in r["counts"].items()) or "none"
    return [
        f"`{r['name']}`",
        r["what"],
        f"{r['sent']:,}",
        counts,
        f"**{r['unasked_5xx']:,}**" if r["unasked_5xx"] else "0",
        "**yes**" if r["traceback"] else "no",
        r["dictionary"] if r["dictionary_ok"] else f"**{r['dictionary']}**",
        f"{r['rss_before'] / MB:.1f} -> {r['rss_after'] / MB:.1f}",
        "pass" if not r["failures"] else "**FAIL**: " + "; ".join(r["failures"]),
    ]


class LogWatch:
    """The processor's log from a point on."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size

    def new_text(self) -> str:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return f.read().decode(errors="replace")


def dictionary_state(processor: Processor, expected_pods: int) -> tuple[str, bool]:
    status, text = processor.readyz()
    pods = processor.routable_pods()
    ok = status == 200 and pods == expected_pods and processor.process.alive()
    said = "" if status == 200 else f" ({text[:80]})"
    alive = "" if processor.process.alive() else ", processor DEAD"
    return f"{pods} of {expected_pods} pods, /readyz {status}{said}{alive}", ok


def observe(
    name: str,
    what: str,
    processor: Processor,
    expected_pods: int,
    tally: Tally,
    watch: LogWatch,
    rss_before: int,
    *,
    engine_fault: bool = False,
    extra: dict[str, Any] | None = None,
    failures: list[str] | None = None,
) -> Observation:
    log = watch.new_text()
    traceback = "Traceback" in log
    dictionary, dictionary_ok = dictionary_state(processor, expected_pods)
    try:
        rss_after = processor.probe()["rss"]
    except OSError:
        rss_after = 0
    failures = list(failures or [])
    if engine_fault:
        late = tally.sent_after(GRACE_S)
        unasked = tally.bad(after=GRACE_S)
        if unasked > LATE_5XX_ALLOWED * max(1, late):
            failures.append(
                f"{unasked:,} of {late:,} requests sent over {GRACE_S:g} s after the fault "
                f"failed (allowed {LATE_5XX_ALLOWED:.0%})"
            )
    else:
        unasked = tally.bad()
        if unasked:
            failures.append(f"{unasked:,} requests failed (5xx, timeout or connection error)")
    if traceback:
        first = next(line for line in log.splitlines() if "Traceback" in line)
        failures.append(f"Traceback in the processor's log ({first.strip()[:120]})")
    if not dictionary_ok:
        failures.append(f"dictionary: {dictionary}")
    return Observation(
        name,
        what,
        tally,
        unasked,
        traceback,
        dictionary,
        dictionary_ok,
        rss_before,
        rss_after,
        extra or {},
        failures,
    )


# -- the faults -----------------------------------------------------------------------


class Script:
    def __init__(self, fleet: Fleet, quick: bool) -> None:
        self.fleet = fleet
        self.quick = quick
        self.processor = fleet.processors["chaos"]
        self.port = self.processor.front_port
        self.pods = len(fleet.engine_ports)
        self.results: list[Observation] = []
        self.models_version = 0

    def scale(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def begin(self) -> tuple[LogWatch, int]:
        return LogWatch(self.processor.process.log_path), self.processor.probe()["rss"]

    def record(
        self, name: str, what: str, tally: Tally, watch: LogWatch, rss: int, **checks: Any
    ) -> None:
        """One fault's observation, against this fleet's processor and pod count."""
        self.results.append(
            observe(name, what, self.processor, self.pods, tally, watch, rss, **checks)
        )

    # engines ---------------------------------------------------------------------------

    async def engine_killed(self) -> None:
        watch, rss = self.begin()
        victim = 2

        async def kill() -> None:
            os.kill(self.fleet.engines[victim].pid, signal.SIGKILL)

        tally = await during(self.port, 20, 16, kill, fault_at=3)
        self.restart_engine(victim)
        self.record(
            "engine-killed",
            "kill -9 one of 3 engines under load (16 clients, 20 s)",
            tally,
            watch,
            rss,
            engine_fault=True,
        )

    def restart_engine(self, index: int) -> None:
        old = self.fleet.engines[index]
        old.stop()
        port = self.fleet.engine_ports[index]
        engine = self.fleet.group.add(
            localstack.start_simulator(
                port,
                [MODEL],
                self.fleet.log_dir,
                extra_args=["--ttft-ms", "2", "--itl-ms", "1", "--max-tokens-default", "8"],
                env=localstack.environment_without_gateway_settings(),
                name=f"engine-{index}-restarted",
            )
        )
        localstack.wait_ready([engine], timeout=60)
        self.fleet.engines[index] = engine

    async def engine_500(self) -> None:
        watch, rss = self.begin()
        victim = self.fleet.engine_ports[1]

        async def fail() -> None:
            await asyncio.to_thread(set_engine_faults, victim, {"fail_requests": 1.0})

        try:
            tally = await during(self.port, 20, 16, fail, fault_at=3)
        finally:
            set_engine_faults(victim, {})
        self.record(
            "engine-500",
            "one of 3 engines answers 500 to every request (16 clients, 20 s)",
            tally,
            watch,
            rss,
            engine_fault=True,
        )

    async def engine_hung(self) -> None:
        watch, rss = self.begin()
        victim = self.fleet.engines[0]

        async def stop() -> None:
            os.kill(victim.pid, signal.SIGSTOP)

        try:
            tally = await during(self.port, 20, 16, stop, fault_at=3)
        finally:
            os.kill(victim.pid, signal.SIGCONT)
        self.record(
            "engine-hung",
            "SIGSTOP one of 3 engines under load (16 clients, 20 s, client timeout "
            f"{CLIENT_TIMEOUT_S:g} s), then SIGCONT",
            tally,
            watch,
            rss,
            engine_fault=True,
        )

    async def settle(self) -> float:
        """After an engine fault: light traffic (one client) until passive health has let
        every pod back in (a half-open pod needs a request to prove itself), at most
        SETTLE_S. Each fault then starts from a whole fleet, not from the last one's
        backoff. Returns the seconds it took (SETTLE_S + 1 if it never did)."""
        started = time.monotonic()
        while time.monotonic() - started < SETTLE_S:
            view = await asyncio.to_thread(self.processor.debug_models)
            pods = view.get("models", {}).get(MODEL, {}).get("pods", [])
            if pods and all(p.get("health", {}).get("state") == "healthy" for p in pods):
                return round(time.monotonic() - started, 1)
            await drive(self.port, 1.0, 1, Tally(), time.monotonic())
        return SETTLE_S + 1

    # the models file -------------------------------------------------------------------

    def next_good_models(self) -> list[str]:
        """Write a good file whose pod names are new, so its taking effect is visible."""
        self.models_version += 1
        names = [f"engine-{i}-v{self.models_version}" for i in range(self.pods)]
        write_models_file(
            self.fleet.models_file,
            {
                MODEL: [
                    (name, f"{LOCALHOST}:{port}")
                    for name, port in zip(names, self.fleet.engine_ports, strict=True)
                ]
            },
        )
        return names

    def pod_names(self) -> list[str] | None:
        """The pods of the model in /debug/models; None when the admin endpoint does not
        answer (within 10 s)."""
        try:
            view = self.processor.debug_models()
        except OSError:
            return None
        return [p["name"] for p in view.get("models", {}).get(MODEL, {}).get("pods", [])]

    async def models_fault(
        self, name: str, what: str, write_bad: Callable[[], Awaitable[None]]
    ) -> None:
        """Traffic while `write_bad` runs and 3 s after; the dictionary polled every
        50 ms; then a new good file, which must take effect within 5 s."""
        watch, rss = self.begin()
        smallest = [self.pods]
        unanswered = [0]
        done = asyncio.Event()

        async def poll() -> None:
            while not done.is_set():
                names = await asyncio.to_thread(self.pod_names)
                if names is None:
                    unanswered[0] += 1
                else:
                    smallest[0] = min(smallest[0], len(names))
                await asyncio.sleep(0.05)

        async def fault() -> None:
            await write_bad()
            await asyncio.sleep(3.0)

        tally = Tally()
        origin = time.monotonic()
        poller = asyncio.create_task(poll())
        traffic = asyncio.create_task(drive(self.port, 3600, 4, tally, origin))
        try:
            await fault()
        finally:
            done.set()
            await poller
        # Traffic goes on until the good file is back in force.
        expected = self.next_good_models()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and sorted(self.pod_names() or []) != sorted(expected):
            await asyncio.sleep(0.1)
        took_effect = sorted(self.pod_names() or []) == sorted(expected)
        traffic.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await traffic
        failures = []
        if smallest[0] < self.pods:
            failures.append(
                f"the dictionary shrank to {smallest[0]} of {self.pods} pods during the fault"
            )
        if unanswered[0]:
            failures.append(
                f"GET /debug/models went unanswered (10 s) {unanswered[0]} time(s) during "
                "the fault: the processor's event loop was blocked"
            )
        if not took_effect:
            failures.append("a good file written afterwards did not take effect within 5 s")
        self.record(
            name,
            what,
            tally,
            watch,
            rss,
            extra={
                "smallest_dictionary": smallest[0],
                "admin_unanswered": unanswered[0],
                "good_file_after": took_effect,
            },
            failures=failures,
        )

    async def models_garbage(self) -> None:
        async def write() -> None:
            self.fleet.models_file.write_bytes(b"models: [{{{ \xff\xfe not yaml ::: \x00\n")

        await self.models_fault("models-garbage", "models file overwritten with garbage", write)

    async def models_empty(self) -> None:
        async def write() -> None:
            self.fleet.models_file.write_bytes(b"")

        await self.models_fault("models-empty", "models file emptied (held 3 s)", write)

    async def models_partial(self) -> None:
        """A slow writer: the file rewritten in place a pod entry at a time, 0.2 s apart
        (each intermediate state is valid YAML listing fewer pods), several times."""

        async def write() -> None:
            for _ in range(self.scale(5, 2)):
                self.models_version += 1
                lines = [f"models:\n  - name: {MODEL}\n    pods:\n"]
                lines += [
                    f"      - name: engine-{i}-p{self.models_version}\n"
                    f"        address: {LOCALHOST}:{port}\n"
                    for i, port in enumerate(self.fleet.engine_ports)
                ]
                with open(self.fleet.models_file, "w", encoding="utf-8") as f:
                    for piece in lines:
                        f.write(piece)
                        f.flush()
                        await asyncio.sleep(0.2)

        await self.models_fault(
            "models-partial",
            "models file rewritten in place by a slow writer (a pod entry per 0.2 s)",
            write,
        )

    async def models_nested(self) -> None:
        async def write() -> None:
            depth = 100_000
            self.fleet.models_file.write_text(
                "models: " + "[" * depth + "]" * depth + "\n", encoding="utf-8"
            )

        await self.models_fault("models-nested", "models file of YAML nested 100,000 deep", write)

    # connections -----------------------------------------------------------------------

    async def stalled_uploads(self) -> None:
        watch, rss = self.begin()
        count = self.scale(10_000, 2_000)
        held: list[asyncio.StreamWriter] = []
        readers: list[asyncio.Task[None]] = []
        closed_by_peer = 0
        refused = 0
        head = (
            (
                f"POST {PATH} HTTP/1.1\r\nhost: {LOCALHOST}\r\ncontent-type: application/json\r\n"
                f"content-length: 100000\r\n\r\n"
            ).encode()
            + b'{"model": "'
            + MODEL.encode()
            + b'", "messages": [{"role": "user", '
        )

        async def until_closed(reader: asyncio.StreamReader) -> None:
            nonlocal closed_by_peer
            with contextlib.suppress(OSError):
                while await reader.read(65536):
                    pass
                closed_by_peer += 1

        async def stall() -> None:
            nonlocal refused
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(LOCALHOST, self.port), timeout=10
                )
                writer.write(head)
                await writer.drain()
                held.append(writer)
                readers.append(asyncio.create_task(until_closed(reader)))
            except (OSError, TimeoutError):
                refused += 1

        started = time.monotonic()
        for batch in range(0, count, 500):
            await asyncio.gather(*(stall() for _ in range(min(500, count - batch))))
        opened_in = time.monotonic() - started
        await asyncio.sleep(1.0)
        # Ordinary clients while the stalled uploads are held.
        tally = Tally()
        await drive(self.port, 15, 8, tally, time.monotonic(), max_requests=self.scale(400, 100))
        closed = closed_by_peer  # by Envoy, while held
        peak = await asyncio.to_thread(self.processor.probe)
        for writer in held:
            writer.transport.abort()
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        # The aftermath: ordinary clients while the processor ends the stalled streams.
        after = Tally()
        await drive(self.port, 10, 4, after, time.monotonic(), max_requests=200)
        for at, outcome in after.outcomes:
            tally.add(at + 1e6, outcome)
        # Where the memory the stalled streams used went once they ended: still in use,
        # held free by glibc (malloc_trim gives it back), or in Python's object arenas.
        settled = await asyncio.to_thread(self.processor.probe)
        # An allocator that returns memory over time (jemalloc's decay, a periodic trim)
        # gets 30 s, then a trim is asked for.
        await asyncio.sleep(30)
        later = await asyncio.to_thread(self.processor.probe)
        trimmed = await asyncio.to_thread(self.processor.trim)
        self.record(
            "stalled-uploads",
            f"{count:,} connections send headers and part of a body, then stall; "
            f"meanwhile 8 ordinary clients (at most {self.scale(400, 100)} requests, "
            f"client timeout {CLIENT_TIMEOUT_S:g} s); then all closed at once and 4 "
            "ordinary clients for 10 s (at most 200 requests)",
            tally,
            watch,
            rss,
            extra={
                "stalled_opened": len(held),
                "stalled_refused": refused,
                "opened_in_s": round(opened_in, 1),
                "closed_by_envoy_while_held": closed,
                "ordinary_while_held": dict(Counter(o for at, o in tally.outcomes if at < 1e6)),
                "ordinary_after": after.counts(),
                "processor_rss_mb_while_held": round(peak["rss"] / MB, 1),
                "processor_objects_while_held": peak["objects"].get("all_gc_tracked", 0),
                "processor_objects_after": settled["objects"].get("all_gc_tracked", 0),
                "after_glibc_in_use_mb": _mb(settled["malloc"].get("in_use_bytes", 0)),
                "after_glibc_free_held_mb": _mb(settled["malloc"].get("free_held_bytes", 0)),
                "after_rss_mb_heap_anon_file": [
                    _mb(settled["rss_split"][k]) for k in ("heap", "anon", "file")
                ],
                "after_pymalloc_blocks": settled["py_blocks"],
                "rss_mb_streams_ended": _mb(settled["rss"]),
                "rss_mb_30s_later": _mb(later["rss"]),
                "rss_mb_before_after_malloc_trim": [
                    _mb(trimmed["rss_before"]),
                    _mb(trimmed["rss_after"]),
                ],
            },
        )

    async def abandoned_streams(self) -> None:
        watch, rss = self.begin()
        count = self.scale(3_000, 600)
        observer_missing_before = self.metric("gateway_observer_missing_total")
        body = chat_body(stream=True, max_tokens=200)
        abandoned = Tally()
        origin = time.monotonic()
        timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)
        queue = iter(range(count))

        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True), timeout=timeout
        ) as session:

            async def client() -> None:
                for _ in queue:
                    at = time.monotonic() - origin
                    try:
                        async with session.post(
                            f"http://{LOCALHOST}:{self.port}{PATH}",
                            data=body,
                            headers={"content-type": "application/json"},
                        ) as response:
                            await response.content.readany()
                            abandoned.add(at, str(response.status))
                            response.close()  # drops the connection midway
                    except TimeoutError:
                        abandoned.add(at, "timeout")
                    except aiohttp.ClientError:
                        abandoned.add(at, "error")

            await asyncio.gather(*(client() for _ in range(100)))
        in_flight_after_1s = await self.in_flight_after(1.0)
        in_flight_after_12s = await self.in_flight_after(11.0)
        after = Tally()
        await drive(self.port, 10, 4, after, time.monotonic(), max_requests=100)
        failures = []
        if in_flight_after_12s:
            failures.append(f"{in_flight_after_12s} requests still counted in flight after 12 s")
        for at, outcome in after.outcomes:
            abandoned.add(at + 1e6, outcome)  # ordinary requests afterwards, same tally
        streams_only = Counter(o for at, o in abandoned.outcomes if at < 1e6)
        self.record(
            "abandoned-streams",
            f"{count:,} streaming requests (100 at a time) closed by the client after "
            "the first event; then 100 ordinary requests",
            abandoned,
            watch,
            rss,
            extra={
                "streams": dict(streams_only),
                "ordinary_after": after.counts(),
                "in_flight_after_1s": in_flight_after_1s,
                "in_flight_after_12s": in_flight_after_12s,
                "observer_missing_delta": self.metric("gateway_observer_missing_total")
                - observer_missing_before,
            },
            failures=failures,
        )

    async def in_flight_after(self, seconds: float) -> int:
        await asyncio.sleep(seconds)
        view = await asyncio.to_thread(self.processor.debug_models)
        return sum(
            int(p.get("in_flight", 0))
            for model in view.get("models", {}).values()
            for p in model.get("pods", [])
        )

    def metric(self, name: str) -> float:
        import urllib.request

        url = f"http://{LOCALHOST}:{self.processor.admin_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        total = 0.0
        for match in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE):
            total += float(match.group(1))
        return total


FAULTS = (
    "engine_killed",
    "engine_500",
    "engine_hung",
    "models_garbage",
    "models_empty",
    "models_partial",
    "models_nested",
    "stalled_uploads",
    "abandoned_streams",
)


def _mb(value: float) -> float:
    return round(value / MB, 1)


def raise_open_files_limit() -> tuple[int, int]:
    """The soft limit on open files raised to the hard one, in this process and so in
    the Envoy and processor it starts: 10,000 stalled connections need 10,000 sockets
    on each side."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


async def run_script(script: Script, only: list[str]) -> None:
    for fault in FAULTS:
        if only and fault.replace("_", "-") not in only:
            continue
        print(f"   fault {fault}", flush=True)
        await getattr(script, fault)()
        result = script.results[-1]
        if fault.startswith("engine_"):
            result.extra["whole_again_after_s"] = await script.settle()
        print(f"     {result.tally.counts()} -> {result.failures or 'pass'}", flush=True)


def run(mode: RunMode) -> Section:
    limit = raise_open_files_limit()
    work = mode.work_dir / NAME
    work.mkdir(parents=True, exist_ok=True)
    only = [n.strip() for n in os.environ.get("BENCH_CHAOS_FAULTS", "").split(",") if n.strip()]
    # The processor's allocator (a soak variant's environment: glibc as shipped,
    # arena2, trim, jemalloc), to compare what a burst of streams leaves behind.
    allocator = os.environ.get("BENCH_CHAOS_ALLOCATOR", "") or "glibc"
    fleet = start_fleet(work, {"chaos": VARIANTS[allocator]})
    started = time.monotonic()
    try:
        script = Script(fleet, mode.quick)
        asyncio.run(run_script(script, only))
    finally:
        fleet.stop()
    data = {
        "allocator": allocator,
        "open_files_limit": list(limit),
        "seconds": round(time.monotonic() - started),
        "results": [
            {
                "name": r.name,
                "what": r.what,
                "sent": r.tally.sent,
                "counts": r.tally.counts(),
                "unasked_5xx": r.unasked_5xx,
                "traceback": r.traceback,
                "dictionary": r.dictionary,
                "dictionary_ok": r.dictionary_ok,
                "rss_before": r.rss_before,
                "rss_after": r.rss_after,
                "extra": r.extra,
                "failures": r.failures,
            }
            for r in script.results
        ],
    }
    return section_from(data)


STALLED_NOTE = (
    "`stalled-uploads` depends on how fast the processor answers: each stalled upload "
    "opens two ext_proc streams, and Envoy gives the processor 5 s (`message_timeout`) "
    "to answer each request's headers. On a loaded machine it answers some too late, "
    "Envoy closes those uploads itself with a 504 (`closed_by_envoy_while_held`), and "
    "the ordinary clients find free connections; when it keeps up, all 10,000 stay open "
    "against the shipped `max_active_downstream_connections: 10000` and ordinary "
    "clients are refused (seen on this machine in a run of the same fault with "
    "`BENCH_CHAOS_ALLOCATOR=arena2`: 400 of 400 connection errors)."
)


def section_from(data: dict[str, Any]) -> Section:
    results = data["results"]
    header = [
        "fault",
        "what",
        "requests",
        "status counts",
        "unasked 5xx / timeouts",
        "Traceback in log",
        "dictionary after",
        "RSS MB before -> after",
        "checks",
    ]
    details = [
        f"- `{r['name']}`: " + ", ".join(f"{k} {v}" for k, v in r["extra"].items())
        for r in results
        if r["extra"]
    ]
    failed = [f"{r['name']}: {f}" for r in results for f in r["failures"]]
    body = "\n\n".join(
        [
            "The shipped envoy/envoy.yaml (ports moved), the processor with its defaults, "
            "three simulated engines; every fault under client traffic "
            f"(aiohttp, client timeout {CLIENT_TIMEOUT_S:g} s). 5xx from a failing engine "
            f"count as unasked only for requests sent more than {GRACE_S:g} s after the "
            f"fault began, with {LATE_5XX_ALLOWED:.0%} allowed (passive health needs 5 "
            "failures to eject a pod and retries it later); every other fault allows none. "
            f"Open files limit (soft, hard): {tuple(data['open_files_limit'])}. "
            f"Took {data['seconds']} s. Re-run: `make chaos` (`BENCH_CHAOS_FAULTS=engine-500,"
            "models-empty` for some faults only; `--quick` scales the connection counts "
            "down to 2,000 stalled uploads and 600 abandoned streams); it exits 1 when a "
            "check fails.",
            table(header, [row(r) for r in results]),
            "\n".join(details),
            STALLED_NOTE,
            ("**Checks failed in this run:**\n\n" + "\n".join(f"- {f}" for f in failed))
            if failed
            else "Every check passed.",
        ]
    )
    return Section(NAME, TITLE, body=body, data=data, failed_checks=failed)
