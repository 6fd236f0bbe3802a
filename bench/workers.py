"""Benchmark 8: `serve --workers 1` vs `--workers 2`, the processor's capacity.

The overhead set-up (bench.stack: front Envoy, a pod answering from memory) with the
front Envoy on two worker threads, so that it opens two connections to the processor
for the kernel to spread over the workers. Both set-ups run side by side; saturation
rounds alternate between them (wrk, through route only, plus a direct round each for
the front Envoy's own ceiling). With two workers and at least two CPUs, each worker is
pinned to its own CPU (the rest of the stack is not pinned: the machine has what it has).

Reported per set-up: through req/s, the processor's CPU per request (all its processes:
the supervisor and the workers), how many cores it used, and how the CPU split over the
workers (the kernel hashes connections to workers, so two connections may both land on
one).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import payloads
from bench.common import RunMode, Section, cpu_times, fmt, median, run_wrk, table
from bench.overhead import PATH, Route, check_routes, routes
from bench.stack import BenchStack, start_stack

NAME = "workers"
TITLE = "8. Workers: serve --workers 1 vs 2"
CONNECTIONS = 16
WRK_THREADS = 2
FRONT_THREADS = 2


def processes_of(pid: int) -> list[int]:
    """`pid` and its descendants (a supervisor's workers and helpers)."""
    found = [pid]
    for parent in found:
        with contextlib.suppress(OSError):
            found += [
                int(c) for c in Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
            ]
    return found


def workers_of(pid: int) -> list[int]:
    """The serving processes: the workers of a supervisor, or the process itself."""
    workers = []
    for child in processes_of(pid)[1:]:
        with contextlib.suppress(OSError):
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                workers.append(child)
    return workers or [pid]


def cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            user, system = cpu_times(pid)
            total += user + system
    return total


@dataclass
class Setup:
    workers: int
    stack: BenchStack
    direct: Route
    through: Route
    pinned: bool = False
    runs: list[dict[str, Any]] = field(default_factory=list)
    direct_rps: list[float] = field(default_factory=list)


def start_setup(workers: int, mode: RunMode) -> Setup:
    work = mode.work_dir / f"workers-{workers}"
    stack = start_stack(
        work, processor_args=["--workers", str(workers)], front_concurrency=FRONT_THREADS
    )
    try:
        direct, through = routes(stack, work, payloads.chat_request(), stack.pod_address)
        check_routes(stack, direct, through)
    except BaseException:
        stack.stop()
        raise
    setup = Setup(workers, stack, direct, through)
    cpus = sorted(os.sched_getaffinity(0))
    serving = workers_of(stack.processor.pid)
    if workers > 1 and len(cpus) >= workers and len(serving) == workers:
        for i, pid in enumerate(serving):
            os.sched_setaffinity(pid, {cpus[i % len(cpus)]})
        setup.pinned = True
    return setup


def saturate(setup: Setup, seconds: float) -> None:
    stack = setup.stack
    url = f"http://127.0.0.1:{stack.front_port}{PATH}"
    everything = processes_of(stack.processor.pid)
    serving = workers_of(stack.processor.pid)
    before, each_before = cpu(everything), [cpu([p]) for p in serving]
    result = run_wrk(
        url, setup.through.script, connections=CONNECTIONS, seconds=seconds, threads=WRK_THREADS
    )
    after, each_after = cpu(everything), [cpu([p]) for p in serving]
    if result.errors:
        raise RuntimeError(f"--workers {setup.workers}: wrk saw {result.errors} errors")
    setup.runs.append(
        {
            "rps": result.rps,
            "requests": result.requests,
            "seconds": result.seconds,
            "cpu_s": after - before,
            "worker_cpu_s": [a - b for a, b in zip(each_after, each_before, strict=True)],
            "p99_ms": result.p99_ms,
        }
    )


def direct_ceiling(setup: Setup, seconds: float) -> None:
    url = f"http://127.0.0.1:{setup.stack.front_port}{PATH}"
    result = run_wrk(
        url, setup.direct.script, connections=CONNECTIONS, seconds=seconds, threads=WRK_THREADS
    )
    setup.direct_rps.append(result.rps)


def summarise(setup: Setup) -> dict[str, Any]:
    runs = setup.runs
    requests = sum(r["requests"] for r in runs)
    cpu_s = sum(r["cpu_s"] for r in runs)
    wall = sum(r["seconds"] for r in runs)
    per_worker = [
        sum(r["worker_cpu_s"][i] for r in runs) for i in range(len(runs[0]["worker_cpu_s"]))
    ]
    return {
        "workers": setup.workers,
        "pinned": setup.pinned,
        "through_rps": median([r["rps"] for r in runs]),
        "through_rps_all": [round(r["rps"]) for r in runs],
        "p99_ms": median([r["p99_ms"] for r in runs]),
        "direct_rps": median(setup.direct_rps),
        "cpu_us_per_req": cpu_s / requests * 1e6 if requests else float("nan"),
        "cores_used": cpu_s / wall if wall else float("nan"),
        "worker_cpu_share": [w / sum(per_worker) for w in per_worker] if sum(per_worker) else [],
    }


def run(mode: RunMode) -> Section:
    setups: list[Setup] = []
    try:
        for workers in (1, 2):
            setups.append(start_setup(workers, mode))
        rounds = mode.pick(3, 1)
        seconds = mode.pick(5.0, 2.0)
        for setup in setups:
            direct_ceiling(setup, seconds)
        for r in range(rounds):
            for setup in setups if r % 2 == 0 else setups[::-1]:
                saturate(setup, seconds)
        results = [summarise(s) for s in setups]
    finally:
        for setup in setups:
            setup.stack.stop()
    one, two = results
    rows = [
        [
            f"--workers {r['workers']}" + (" (pinned, one CPU each)" if r["pinned"] else ""),
            fmt(r["through_rps"], 0),
            fmt(r["direct_rps"], 0),
            fmt(r["p99_ms"]),
            fmt(r["cpu_us_per_req"], 0),
            f"{r['cores_used']:.2f}",
            " / ".join(f"{share * 100:.0f}%" for share in r["worker_cpu_share"]),
        ]
        for r in results
    ]
    gain = two["through_rps"] / one["through_rps"] if one["through_rps"] else float("nan")
    section = Section(NAME, TITLE, data={"results": results})
    section.body = "\n\n".join(
        [
            f"wrk, {WRK_THREADS} threads, {CONNECTIONS} connections, through route only, "
            f"{rounds} round(s) of {seconds:.0f} s per set-up, alternating; the front Envoy "
            f"on {FRONT_THREADS} worker threads (so {FRONT_THREADS} connections to the "
            "processor); direct req/s is the same front Envoy without the processor, its "
            "own ceiling on this machine. Processor CPU counts the supervisor and every "
            "worker.",
            table(
                [
                    "processor",
                    "through req/s",
                    "direct req/s",
                    "through p99 ms",
                    "processor CPU µs/req",
                    "cores used",
                    "CPU split over workers",
                ],
                rows,
            ),
            f"Two workers carried {gain:.2f}x the requests of one. Per-round req/s: "
            f"--workers 1 {one['through_rps_all']}, --workers 2 {two['through_rps_all']}. "
            "On a machine whose cores also run wrk and both Envoys, a second worker can add "
            "only what those leave free; the CPU per request shows what a worker costs.",
        ]
    )
    return section
