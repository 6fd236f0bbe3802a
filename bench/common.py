"""What every benchmark shares: run mode and bounds, statistics, /proc readings, the
machine description, wrk, and the result types the report is written from."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway_extproc.devtools import localstack

REPO_ROOT = localstack.REPO_ROOT
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True, slots=True)
class RunMode:
    """Full or quick. Quick scales counts and durations down for a smoke run; its
    figures are noisy and the report says which mode produced them."""

    quick: bool = False
    work_dir: Path = Path("/tmp/gateway-extproc-bench")

    @property
    def name(self) -> str:
        return "quick" if self.quick else "full"

    def pick(self, full: Any, quick: Any) -> Any:
        return quick if self.quick else full


# -- bounds -------------------------------------------------------------------------------


def bounded(max_count: int, max_seconds: float, min_count: int = 1) -> Iterator[int]:
    """0, 1, 2, ... until `max_count` iterations or `max_seconds` have passed (but at
    least `min_count`), so that no loop can run away on a slow or stuck machine."""
    deadline = time.perf_counter() + max_seconds
    for i in range(max_count):
        if i >= min_count and time.perf_counter() > deadline:
            return
        yield i


# -- statistics ---------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    if len(ordered) == 1:
        return float(ordered[0])
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


# -- /proc ----------------------------------------------------------------------------------


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process, all its threads, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        stat = f.read()
    # The command name (field 2) may hold spaces; fields after its ')' are fixed.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads."""
    return sum(cpu_times(pid))


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of a process (this one by default)."""
    with open(f"/proc/{pid or 'self'}/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * PAGE_SIZE


# -- the machine -------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return platform.processor() or "unknown"
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else "unknown"


def tool_version(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else "unavailable"


def envoy_version() -> str:
    raw = tool_version([localstack.find_envoy(), "--version"])
    match = re.search(r"/(\d+\.\d+\.\d+)/", raw)
    return match.group(1) if match else raw


def machine() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "cpu": cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "envoy": envoy_version(),
        "load_avg": round(os.getloadavg()[0], 2),
    }


def cpu_jiffies() -> tuple[int, int]:
    """(steal, total) jiffies of all CPUs since boot, from /proc/stat. Steal is time the
    hypervisor gave this VM's virtual CPUs to someone else: noise we cannot see otherwise."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    steal = fields[7] if len(fields) > 7 else 0
    # guest and guest_nice (fields 8, 9) are already counted in user and nice.
    return steal, sum(fields[:8])


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def command_line(argv: Sequence[str]) -> str:
    """The command that produced a table, as one would type it in the repository."""
    exe = Path(sys.executable)
    try:
        shown = str(exe.relative_to(REPO_ROOT))
    except ValueError:
        shown = str(exe)
    return " ".join([shown, "-m", "bench", *argv])


# -- results ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """One target the project set, with the figure that decides it."""

    name: str
    goal: str
    figure: str
    met: bool


@dataclass
class Section:
    """One benchmark's part of docs/BENCHMARKS.md: markdown plus targets and raw data."""

    name: str
    title: str
    body: str = ""
    targets: list[Target] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    # Checks that ran and failed (the fault script's): the section is still written,
    # and `python -m bench` exits 1.
    failed_checks: list[str] = field(default_factory=list)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats are expected to be formatted by the caller."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: float, digits: int = 2) -> str:
    if value != value:  # NaN
        return "n/a"
    return f"{value:,.{digits}f}"


def met_mark(met: bool) -> str:
    return "met" if met else "**not met**"


# -- wrk ----------------------------------------------------------------------------------

# Printed by the script's done() so that results are read from JSON, not wrk's prose.
WRK_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\\nWRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f}\\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean))
end
"""


def wrk_script(body: bytes, headers: dict[str, str]) -> str:
    """A wrk Lua script that POSTs `body` with `headers` and reports JSON."""
    text = body.decode()
    if "]==]" in text:
        raise ValueError("body cannot be embedded in a Lua long string")
    lines = ['wrk.method = "POST"', f"wrk.body = [==[{text}]==]"]
    for name, value in headers.items():
        lines.append(f'wrk.headers["{name}"] = "{value}"')
    return "\n".join(lines) + "\n" + WRK_DONE


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int
    seconds: float
    errors: int  # socket errors and non-2xx/3xx answers
    p50_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


def find_wrk() -> str:
    found = shutil.which("wrk")
    if not found:
        raise RuntimeError("wrk is not installed: apt-get install -y wrk (make bench does it)")
    return found


def run_wrk(
    url: str, script: Path, *, connections: int, seconds: float, threads: int = 1
) -> WrkResult:
    argv = [
        find_wrk(),
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        url,
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    match = re.search(r"WRK_JSON (\{.*\})", done.stdout)
    if done.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout}\n{done.stderr}")
    raw = json.loads(match.group(1))
    errors = sum(raw[k] for k in ("connect", "read", "write", "status", "timeout"))
    return WrkResult(
        requests=raw["requests"],
        seconds=raw["duration_us"] / 1e6,
        errors=errors,
        p50_ms=raw["p50_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
    )
