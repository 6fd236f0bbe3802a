"""Benchmark 6: where the processor's time goes under the overhead load.

While wrk drives the through route of the overhead set-up (bench.stack), three looks at
the processor:

1. CPU per thread from /proc/<pid>/task/*/stat over the load (exact, no sampling);
2. py-spy (non-blocking, Python frames) on every thread: samples grouped into
   components by the innermost frame that names one (logging, Prometheus, routing,
   accounting, ...; `service.py` lines are split into gRPC receive / send by their
   source text), plus the top functions by own time;
3. py-spy --native (briefly, blocking: it pauses the process to unwind C stacks): the
   busiest native leaf functions, idle waits left out, which shows the share of system
   calls.

Raw collapsed stacks are left in the work directory for flame graphs.
"""

from __future__ import annotations

import linecache
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench import payloads
from bench.common import (
    CLOCK_TICKS,
    REPO_ROOT,
    RunMode,
    Section,
    fmt,
    table,
    wrk_script,
)
from bench.stack import route_headers, start_stack
from gateway_extproc.config import Settings

NAME = "profile"
TITLE = "6. Profile: where the processor's time goes under the overhead load"
PATH = "/v1/chat/completions"
CONNECTIONS = 4

# Innermost frame whose file matches decides a sample's component.
NO_PYTHON_FRAME = "event loop + grpc.aio Cython/C-core, no Python frame (incl. protobuf C)"
_COMPONENTS: tuple[tuple[str, str], ...] = (
    (r"asyncio/runners\.py|uvloop/", NO_PYTHON_FRAME),
    (r"structlog/|/logging/|^json/|/json/", "logging (structlog + JSON rendering)"),
    (r"prometheus_client/", "Prometheus client (counters, histograms)"),
    (r"google/protobuf/", "protobuf, Python side"),
    (r"gateway_extproc/(routing|models|metrics)/", "routing decision (router, strategy)"),
    (
        r"gateway_extproc/extproc/accounting\.py|gateway_extproc/openai/(usage|sse)\.py",
        "response accounting (usage, SSE)",
    ),
    (r"gateway_extproc/openai/requests\.py", "request body parsing (orjson)"),
    (r"gateway_extproc/extproc/responses\.py", "building ProcessingResponses"),
    (
        r"gateway_extproc/extproc/(session|envoy_names)\.py",
        "session state machine (own code)",
    ),
    (r"gateway_extproc/", "other product code"),
    (r"^asyncio/|/asyncio/", "asyncio (tasks, futures, locks)"),
    (r"^grpc/|/grpc/", "grpc Python layer"),
)
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]+)(?::(?P<line>\d+))?\)$")
_IDLE_NATIVE = frozenset(
    {
        "epoll_wait",
        "epoll_pwait",
        "epoll_pwait2",
        "poll",
        "ppoll",
        "select",
        "pselect",
        "futex_wait",
        "pthread_cond_wait",
        "pthread_cond_timedwait",
        "__futex_abstimed_wait_common",
        "sem_wait",
        "sem_timedwait",
        "nanosleep",
        "clock_nanosleep",
        "accept",
        "accept4",
    }
)
_SYSCALLS = frozenset(
    {
        "sendmsg",
        "recvmsg",
        "write",
        "read",
        "writev",
        "readv",
        "send",
        "recv",
        "syscall",
        "epoll_ctl",
        "getpid",
    }
)


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """tid -> (name, CPU seconds) for every thread of a process."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", encoding="ascii") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / CLOCK_TICKS)
    return out


def _py_spy() -> str:
    beside = Path(sys.executable).parent / "py-spy"
    if beside.exists():
        return str(beside)
    raise RuntimeError("py-spy is not installed: .venv/bin/pip install py-spy")


def record(pid: int, out: Path, seconds: float, *, native: bool) -> None:
    argv = [_py_spy(), "record", "--pid", str(pid), "--format", "raw", "-o", str(out)]
    argv += ["-d", str(max(1, round(seconds))), "--threads"]
    argv += ["--native", "-r", "100"] if native else ["--nonblocking", "-r", "200"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"py-spy failed: {done.stderr.strip()[-1000:]}")


def read_raw(path: Path) -> list[tuple[str, list[str], int]]:
    """(thread label, frames root first, count) per collapsed stack line."""
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        thread, *frames = stack.split(";")
        out.append((thread, frames, int(count)))
    return out


def _parse(frame: str) -> tuple[str, str, int]:
    match = _FRAME.match(frame)
    if match is None:
        return frame, "", 0
    return match.group("func"), match.group("file"), int(match.group("line") or 0)


def _source_line(file: str, line: int) -> str:
    for base in (REPO_ROOT, *map(Path, sys.path)):
        candidate = Path(base) / file
        if candidate.is_file():
            return linecache.getline(str(candidate), line).strip()
    return ""


def component(frames: list[str]) -> str:
    for frame in reversed(frames):
        _, file, line = _parse(frame)
        if file.endswith("gateway_extproc/extproc/service.py"):
            text = _source_line(file, line)
            if text.startswith("async for"):
                return "gRPC receive: awaiting + decoding the next frame (grpc.aio)"
            if text.startswith("yield"):
                return "gRPC send: encoding + writing a response (grpc.aio)"
        for pattern, name in _COMPONENTS:
            if re.search(pattern, file):
                return name
    return NO_PYTHON_FRAME


def analyse(stacks: list[tuple[str, list[str], int]], main_tid: int) -> dict[str, Any]:
    """Components and top functions of the main (event loop) thread's samples. Other
    threads are counted only: py-spy's idea of when a thread blocked in C is busy is
    rough, and /proc gives their CPU exactly."""
    by_thread: Counter[str] = Counter()
    components: Counter[str] = Counter()
    own: Counter[str] = Counter()
    for thread, frames, count in stacks:
        is_main = f"({main_tid})" in thread
        by_thread["main" if is_main else thread] += count
        if is_main:
            components[component(frames)] += count
            if frames:
                own[frames[-1]] += count
    main = by_thread["main"] or 1
    return {
        "samples": sum(by_thread.values()),
        "main_samples": by_thread["main"],
        "threads": dict(by_thread),
        "components": [(name, n / main) for name, n in components.most_common()],
        "top_own": [(name, n / main) for name, n in own.most_common(20)],
    }


def _library(func: str, file: str) -> str:
    name = Path(file).name
    if func in _SYSCALLS and name.startswith("libc"):
        return "system calls (libc)"
    if name.startswith("libc") or name.startswith("ld-"):
        return "libc, other"
    if "cygrpc" in name or "grpc" in name:
        return "grpc Cython + C-core (cygrpc)"
    if "_message" in name or "upb" in name:
        return "protobuf (upb C extension)"
    if "uvloop" in file or name in ("loop.c", "async.c", "core.c", "epoll.c", "stream.c"):
        return "uvloop / libuv"
    if name.startswith("libpython") or name.endswith((".c", ".h")):
        return "CPython interpreter and C modules"
    if name.endswith(".py"):
        return "Python code (leaf is a Python frame)"
    return f"other ({name})" if name else "other"


def analyse_native(stacks: list[tuple[str, list[str], int]]) -> dict[str, Any]:
    busy: Counter[str] = Counter()
    libraries: Counter[str] = Counter()
    idle = 0
    for _, frames, count in stacks:
        leaf = frames[-1] if frames else "?"
        func, file, _ = _parse(leaf)
        if func in _IDLE_NATIVE:
            idle += count
            continue
        busy[f"{func} ({Path(file).name})" if file else func] += count
        libraries[_library(func, file)] += count
    total = sum(busy.values())
    syscalls = libraries["system calls (libc)"]
    return {
        "busy_samples": total,
        "idle_samples": idle,
        "syscall_share": syscalls / total if total else float("nan"),
        "libraries": [(name, n / total) for name, n in libraries.most_common()] if total else [],
        "top": [(name, n / total) for name, n in busy.most_common(15)] if total else [],
    }


def run(mode: RunMode) -> Section:
    work = mode.work_dir / NAME
    stack = start_stack(work)
    load_s = mode.pick(24.0, 10.0)
    python_s = mode.pick(12.0, 4.0)
    native_s = mode.pick(4.0, 2.0)
    try:
        headers = route_headers(False, stack.pod_address)
        script = work / "wrk-through.lua"
        script.write_text(wrk_script(payloads.chat_request(), headers), encoding="utf-8")
        url = f"http://127.0.0.1:{stack.front_port}{PATH}"
        wrk = subprocess.Popen(
            ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{round(load_s)}s", "-s", str(script), url],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            time.sleep(1.5)  # past connection set-up and warm-up
            pid = stack.processor.pid
            threads0, wall0 = thread_cpu(pid), time.monotonic()
            record(pid, work / "pyspy-python.txt", python_s, native=False)
            threads1, wall1 = thread_cpu(pid), time.monotonic()
            record(pid, work / "pyspy-native.txt", native_s, native=True)
            out, _ = wrk.communicate(timeout=load_s + 60)
        finally:
            if wrk.poll() is None:
                wrk.kill()
                wrk.wait()
        rps_match = re.search(r"Requests/sec:\s*([\d.]+)", out)
        rps = float(rps_match.group(1)) if rps_match else float("nan")
    finally:
        stack.stop()

    wall = wall1 - wall0
    per_thread: dict[str, float] = {}
    for tid, (name, cpu) in threads1.items():
        before = threads0.get(tid, (name, 0.0))[1]
        label = "main thread (event loop)" if tid == pid else name
        if label == "python":
            label = "python (grpc.aio poller thread)"
        per_thread[label] = per_thread.get(label, 0.0) + cpu - before
    cpu_total = sum(per_thread.values())
    python = analyse(read_raw(work / "pyspy-python.txt"), pid)
    native = analyse_native(read_raw(work / "pyspy-native.txt"))

    section = Section(
        NAME,
        TITLE,
        data={
            "rps_during_profile": rps,
            "cpu_per_thread_s": dict(per_thread),
            "wall_s": wall,
            "python": python,
            "native": native,
        },
    )
    main_share = per_thread["main thread (event loop)"] / cpu_total if cpu_total else 0.0
    machinery = {NO_PYTHON_FRAME, "asyncio (tasks, futures, locks)", "grpc Python layer"}
    own_code = sum(
        share
        for name, share in python["components"]
        if name not in machinery and not name.startswith("gRPC ")
    )
    section.data["product_code_share_of_main"] = own_code
    section.data["product_code_share_of_cpu"] = own_code * main_share
    thread_rows = [
        [name, fmt(cpu / wall * 100, 1), f"{cpu / cpu_total * 100:.1f}%"]
        for name, cpu in sorted(per_thread.items(), key=lambda item: -item[1])
        if cpu > 0
    ]
    component_rows = [[name, f"{share * 100:.1f}%"] for name, share in python["components"]]
    own_rows = [[f"`{name}`", f"{share * 100:.1f}%"] for name, share in python["top_own"][:15]]
    native_rows = [[f"`{name}`", f"{share * 100:.1f}%"] for name, share in native["top"][:12]]
    library_rows = [[name, f"{share * 100:.1f}%"] for name, share in native["libraries"]]
    section.body = "\n\n".join(
        [
            f"Load: wrk, {CONNECTIONS} connections, through route, the overhead set-up "
            f"(processor defaults: {Settings().default_strategy} strategy, JSON access log "
            f"on). {fmt(rps, 0)} req/s "
            "while profiling (py-spy costs some). Raw stacks: "
            f"`{work}/pyspy-*.txt`.",
            f"CPU per thread over {wall:.1f} s of load (from /proc; % of one core, and "
            f"share of the processor's {cpu_total / wall * 100:.0f}% of a core):",
            table(["thread", "% of a core", "share"], thread_rows),
            f"py-spy, Python frames, 200 Hz, non-blocking: {python['main_samples']} busy "
            "samples of the main (event loop) thread (idle waits are not sampled), "
            "grouped by the innermost frame that names a component. A sample with no "
            "Python frame above the event loop is time in uvloop and grpc.aio's Cython "
            "and C-core code (protobuf encoding/decoding and the socket writes happen "
            "there).",
            table(["component", "share of main-thread samples"], component_rows),
            f"So the product's own Python code (everything above except the event loop / "
            f"grpc.aio rows and asyncio) is {own_code * 100:.0f}% of the main thread's "
            f"samples, about {own_code * main_share * 100:.0f}% of the processor's CPU; "
            "the rest is gRPC, protobuf and the event loop.",
            "Top functions by own time (the line shown is where the time is spent; a "
            "Python frame's own time includes C code it called):",
            table(["function (file:line)", "share of main-thread samples"], own_rows),
            f"py-spy --native, all threads, {native['busy_samples']} busy samples "
            f"({native['idle_samples']} idle-wait samples left out): where the sampled "
            "stacks end, by library and by function. System calls "
            "(sendmsg, write, read, recvmsg, syscall, ...) are "
            f"{native['syscall_share'] * 100:.0f}% of busy samples.",
            table(["where the leaf is", "share of busy samples"], library_rows),
            table(["native leaf", "share of busy samples"], native_rows),
        ]
    )
    return section
