"""`python -m bench.memory_probe ARGS...`: `gateway-extproc ARGS` with a memory probe.

The soak and the fault script start the processor through this module so they can ask
it, from outside, what its memory is made of: a daemon thread answers one line on a
loopback TCP port (`BENCH_PROBE_PORT`) per connection:

- `probe`: RSS, glibc's allocator totals (mallinfo2: bytes in use vs free bytes the
  allocator holds, summed over all arenas), the number of arenas, Python's live object
  counts by package (grpc, protobuf, our own) and the gc generation counts, as JSON;
- `trim`: glibc `malloc_trim(0)` (give free memory back to the OS), RSS before/after.

With `BENCH_TRIM_SECONDS` set the thread also trims on that period (the "periodic
malloc_trim" variant). Nothing here changes what the processor does; under jemalloc
(`LD_PRELOAD`) glibc's counters read zero and trimming does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import os
import socketserver
import sys
import threading
import time
from collections import Counter
from typing import Any

PROBE_PORT_ENV = "BENCH_PROBE_PORT"
TRIM_SECONDS_ENV = "BENCH_TRIM_SECONDS"
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# Packages whose live objects are counted: the gRPC and protobuf runtimes, ours.
COUNTED_PACKAGES = ("grpc", "google", "gateway_extproc", "aiohttp", "structlog")


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",  # non-mmapped space allocated from the OS (all arenas)
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",  # space in mmapped regions
            "usmblks",
            "fsmblks",
            "uordblks",  # total allocated (in use) space
            "fordblks",  # total free space held by the allocator
            "keepcost",
        )
    ]


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name or "libc.so.6")
    except OSError:
        return None


# Under another allocator (jemalloc through LD_PRELOAD) glibc's malloc introspection
# reads an unused heap, and malloc_info's stream is freed across allocators (a crash):
# leave glibc alone then.
GLIBC_MALLOC = "jemalloc" not in os.environ.get("LD_PRELOAD", "")
LIBC = _libc() if GLIBC_MALLOC else None


def rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * PAGE_SIZE


def mallinfo() -> dict[str, int]:
    if LIBC is None or not hasattr(LIBC, "mallinfo2"):
        return {}
    LIBC.mallinfo2.restype = _MallInfo2
    info = LIBC.mallinfo2()
    return {
        "heap_bytes": info.arena,
        "mmap_bytes": info.hblkhd,
        "in_use_bytes": info.uordblks + info.hblkhd,
        "free_held_bytes": info.fordblks,
    }


def arenas() -> int:
    """How many glibc arenas exist: malloc_info's XML lists one <heap> per arena."""
    if LIBC is None or not hasattr(LIBC, "malloc_info"):
        return 0
    LIBC.open_memstream.restype = ctypes.c_void_p
    buf = ctypes.c_char_p()
    size = ctypes.c_size_t()
    stream = LIBC.open_memstream(ctypes.byref(buf), ctypes.byref(size))
    if not stream:
        return 0
    LIBC.malloc_info(0, ctypes.c_void_p(stream))
    LIBC.fclose(ctypes.c_void_p(stream))
    text = ctypes.string_at(buf, size.value).decode(errors="replace")
    LIBC.free(buf)
    return text.count("<heap nr=")


def trim() -> dict[str, int]:
    before = rss_bytes()
    if LIBC is not None:
        LIBC.malloc_trim(0)
    return {"rss_before": before, "rss_after": rss_bytes()}


def object_counts() -> dict[str, int]:
    counts: Counter[str] = Counter()
    for obj in gc.get_objects():
        module = type(obj).__module__ or ""
        top = module.split(".", 1)[0]
        if top in COUNTED_PACKAGES:
            counts[module if top in ("grpc", "google") else top] += 1
    counts["all_gc_tracked"] = len(gc.get_objects())
    return dict(counts.most_common(25))


def rss_split() -> dict[str, int]:
    """Resident bytes by kind of mapping (/proc/self/smaps): `heap` (the main arena's
    brk heap), `anon` (other anonymous mappings: glibc's thread arenas, Python's
    obmalloc arenas, gRPC's own), `file` (code and data of binaries and libraries)."""
    split = {"heap": 0, "anon": 0, "file": 0, "other": 0}
    kind = "other"
    with open("/proc/self/smaps", encoding="ascii", errors="replace") as f:
        for line in f:
            first = line.split(maxsplit=6)
            if not first:
                continue
            if "-" in first[0] and len(first) >= 5 and ":" in first[3]:
                path = first[5].strip() if len(first) > 5 else ""
                if path == "[heap]":
                    kind = "heap"
                elif not path:
                    kind = "anon"
                elif path.startswith("/"):
                    kind = "file"
                else:
                    kind = "other"
            elif first[0] == "Rss:":
                split[kind] += int(first[1]) * 1024
    return split


def probe() -> dict[str, Any]:
    return {
        "rss": rss_bytes(),
        "rss_split": rss_split(),
        "py_blocks": sys.getallocatedblocks(),
        "malloc": mallinfo(),
        "arenas": arenas(),
        "objects": object_counts(),
        "gc_counts": gc.get_count(),
        "threads": threading.active_count(),
        "native_threads": len(os.listdir("/proc/self/task")),
    }


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        command = self.rfile.readline().decode().strip()
        answer: dict[str, Any]
        if command == "trim":
            answer = trim()
        elif command == "probe":
            answer = probe()
        else:
            answer = {"error": f"unknown command {command!r}"}
        self.wfile.write(json.dumps(answer).encode() + b"\n")


def _periodic_trim(seconds: float) -> None:
    while True:
        time.sleep(seconds)
        if LIBC is not None:
            LIBC.malloc_trim(0)


def start_probe() -> None:
    port = int(os.environ.get(PROBE_PORT_ENV, "0") or 0)
    if port:
        server = socketserver.TCPServer(("127.0.0.1", port), _Handler)
        threading.Thread(target=server.serve_forever, name="memory-probe", daemon=True).start()
    seconds = float(os.environ.get(TRIM_SECONDS_ENV, "0") or 0)
    if seconds > 0:
        threading.Thread(
            target=_periodic_trim, args=(seconds,), name="malloc-trim", daemon=True
        ).start()


def ask(port: int, command: str, timeout: float = 60.0) -> dict[str, Any]:
    """The probe's answer to `command` (used by the bench, in its own process)."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(command.encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    loaded: dict[str, Any] = json.loads(data)
    return loaded


# A checkout whose gateway_extproc runs instead of this one (the soak's `baseline`
# variant: the code before a change, measured in the same run as the change).
CODE_ROOT_ENV = "BENCH_GATEWAY_ROOT"

if __name__ == "__main__":
    start_probe()
    if os.environ.get(CODE_ROOT_ENV):
        sys.path.insert(0, os.environ[CODE_ROOT_ENV])
    from gateway_extproc import cli

    sys.exit(cli.main(sys.argv[1:]))
