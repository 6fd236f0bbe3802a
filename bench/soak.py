"""Benchmark 9: memory soak. Does the processor's RSS keep growing with requests, and is
it a leak or the allocator?

Real processes (bench.fleet): three simulated engines, and per allocator variant a
processor (started through bench.memory_probe) behind its own front Envoy on the shipped
envoy/envoy.yaml. wrk drives non-streamed chat completions in chunks of about 10,000
requests (timed from the last chunk's rate: wrk stops on time), the variants taking turns
chunk by chunk (so machine noise falls on all of them); after
each chunk the probe reports the processor's RSS, glibc's bytes in use and free bytes
held (mallinfo2, all arenas), the number of arenas, and live Python objects of the gRPC
and protobuf runtimes and of our own package.

Variants (`BENCH_SOAK_VARIANTS`, comma-separated; default glibc, arena2, trim, jemalloc):
- `glibc`: as deployed (glibc malloc, default arenas: up to 8 per core);
- `arena2`: `MALLOC_ARENA_MAX=2`;
- `trim`: glibc with `malloc_trim(0)` every 10 s from a thread;
- `jemalloc`: `LD_PRELOAD` of Debian's libjemalloc2 (if installed);
- `random`: glibc as deployed, with `--default-strategy random`: the default profile's
  measured latencies, predictor and prefix index left out (is it routing state?);
- `baseline`: glibc as deployed, running the code of another checkout
  (`BENCH_SOAK_BASELINE=/path`, e.g. a worktree of main): before and after a change,
  measured in the same run.

Requests per variant: `BENCH_SOAK_REQUESTS` (default 500,000; `--quick`: 20,000), e.g.
`make soak SOAK_REQUESTS=100000`. Reading the result: if glibc's in-use bytes and the
object counts stay flat while RSS grows, the growth is free memory the allocator keeps
(fragmentation across arenas), not a leak; a variant that caps arenas or trims then
holds RSS flat.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from bench.common import RunMode, Section, WrkResult, fmt, run_wrk, table, wrk_script
from bench.fleet import Fleet, Processor, chat_body, start_fleet

NAME = "soak"
TITLE = "9. Memory soak: processor RSS over many requests"
CHUNK = 10_000
CONNECTIONS = 8
MIN_CHUNK_S, MAX_CHUNK_S = 5.0, 120.0
JEMALLOC = Path("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
VARIANTS: dict[str, dict[str, str]] = {
    "glibc": {},
    "arena2": {"MALLOC_ARENA_MAX": "2"},
    "trim": {"BENCH_TRIM_SECONDS": "10"},
    "jemalloc": {"LD_PRELOAD": str(JEMALLOC)},
    # Not an allocator: the routing state of the default profile left out, to see
    # whether it is what keeps growing.
    "random": {"GATEWAY_DEFAULT_STRATEGY": "random"},
    "baseline": (
        {"BENCH_GATEWAY_ROOT": os.environ["BENCH_SOAK_BASELINE"]}
        if os.environ.get("BENCH_SOAK_BASELINE")
        else {}
    ),
}
DESCRIPTIONS = {
    "glibc": "this code, glibc malloc with default arenas (as deployed)",
    "arena2": "this code, glibc, `MALLOC_ARENA_MAX=2`",
    "trim": "this code, glibc, `malloc_trim(0)` every 10 s",
    "jemalloc": "this code, jemalloc 5.3 (`LD_PRELOAD`, Debian libjemalloc2)",
    "random": "glibc, default arenas, `--default-strategy random` (no latency or prefix state)",
    "baseline": "glibc, default arenas, the code of BENCH_SOAK_BASELINE (before a change)",
}
MB = 1024 * 1024


def requests_per_variant(mode: RunMode) -> int:
    raw = os.environ.get("BENCH_SOAK_REQUESTS", "")
    if raw:
        return max(1_000, int(raw.replace("_", "").replace(",", "")))
    return int(mode.pick(500_000, 20_000))


def chosen_variants() -> dict[str, dict[str, str]]:
    raw = os.environ.get("BENCH_SOAK_VARIANTS", "")
    default = [n for n in VARIANTS if n not in ("random", "baseline")]
    names = [n.strip() for n in raw.split(",") if n.strip()] or default
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown soak variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    if "jemalloc" in names and not JEMALLOC.exists():
        names.remove("jemalloc")  # reported as not run
    chosen = {n: VARIANTS[n] for n in names}
    if "baseline" in names and not VARIANTS["baseline"]:
        raise ValueError("the baseline variant needs BENCH_SOAK_BASELINE=<a checkout>")
    return chosen


def chunk_script(path: Path) -> Path:
    """wrk's POST of one chat completion; wrk reports JSON (bench.common.WRK_DONE)."""
    path.write_text(wrk_script(chat_body(), {"content-type": "application/json"}), encoding="utf-8")
    return path


def run_chunk(processor: Processor, script: Path, seconds: float) -> WrkResult:
    """wrk for `seconds` (wrk stops on time, not on a count: the chunk's length is
    chosen from the last chunk's rate to come close to CHUNK requests)."""
    url = f"http://127.0.0.1:{processor.front_port}/v1/chat/completions"
    return run_wrk(url, script, connections=CONNECTIONS, seconds=seconds)


def sample(processor: Processor, requests: int, seconds: float) -> dict[str, Any]:
    probe = processor.probe()
    return {
        "requests": requests,
        "seconds": round(seconds, 1),
        "rss": probe["rss"],
        "rss_split": probe["rss_split"],
        "py_blocks": probe["py_blocks"],
        "malloc": probe["malloc"],
        "arenas": probe["arenas"],
        "objects": probe["objects"],
        "native_threads": probe["native_threads"],
    }


def soak(fleet: Fleet, total: int, work: Path) -> dict[str, Any]:
    script = chunk_script(work / "soak-chunk.lua")
    runs: dict[str, dict[str, Any]] = {
        name: {"samples": [sample(p, 0, 0.0)], "sent": 0, "errors": 0, "busy": 0.0, "rate": 0.0}
        for name, p in fleet.processors.items()
    }
    while any(r["sent"] < total for r in runs.values()):
        for name, processor in fleet.processors.items():
            run = runs[name]
            if run["sent"] >= total:
                continue
            if not processor.process.alive():
                raise RuntimeError(f"processor {name} died: {processor.process.log_tail()}")
            want = min(CHUNK, total - run["sent"])
            seconds = min(MAX_CHUNK_S, max(MIN_CHUNK_S, want / run["rate"])) if run["rate"] else 10
            result = run_chunk(processor, script, seconds)
            run["busy"] += result.seconds
            run["sent"] += result.requests
            run["errors"] += result.errors
            run["rate"] = result.rps
            run["samples"].append(sample(processor, run["sent"], run["busy"]))
            # Raw samples kept as they come, so an interrupted soak keeps what it saw.
            (work / "soak-samples.json").write_text(json.dumps(runs), encoding="utf-8")
            last = run["samples"][-1]
            print(
                f"   {name}: {run['sent']:,} requests, RSS {last['rss'] / MB:.1f} MB, "
                f"in use {last['malloc'].get('in_use_bytes', 0) / MB:.1f} MB, "
                f"free held {last['malloc'].get('free_held_bytes', 0) / MB:.1f} MB, "
                f"arenas {last['arenas']}, split {last['rss_split']}, "
                f"pymalloc blocks {last['py_blocks']:,}",
                flush=True,
            )
    for name, processor in fleet.processors.items():
        runs[name]["final_trim"] = processor.trim()
        runs[name]["after_trim"] = sample(processor, runs[name]["sent"], runs[name]["busy"])
    return runs


def growth_per_100k(samples: list[dict[str, Any]], key: str = "rss") -> float:
    """Least-squares slope of `key` over requests, in MB per 100k requests, from the
    second sample on (the first chunk is warm-up: caches, pools, first allocations)."""
    points = [(s["requests"], _value(s, key)) for s in samples[1:]]
    if len(points) < 2:
        return float("nan")
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    sxy = sum((x - mx) * (y - my) for x, y in points)
    return (sxy / sxx) * 100_000 / MB if sxx else float("nan")


def _value(s: dict[str, Any], key: str) -> float:
    if key == "rss":
        return float(s["rss"])
    if key in ("heap", "anon", "file"):
        return float(s["rss_split"][key])
    return float(s["malloc"].get(key, 0))


def run(mode: RunMode) -> Section:
    total = requests_per_variant(mode)
    variants = chosen_variants()
    work = mode.work_dir / NAME
    work.mkdir(parents=True, exist_ok=True)
    fleet = start_fleet(work, variants)
    try:
        runs = soak(fleet, total, work)
    finally:
        fleet.stop()
    data = {"requests_per_variant": total, "chunk": CHUNK, "connections": CONNECTIONS}
    data["runs"] = runs
    data["not_run"] = [n for n in VARIANTS if n not in variants]
    data["baseline"] = os.environ.get("BENCH_SOAK_BASELINE", "")
    return section_from(data)


def _mb(value: float) -> str:
    return fmt(value / MB, 1)


def section_from(data: dict[str, Any]) -> Section:
    runs: dict[str, dict[str, Any]] = data["runs"]
    total = data["requests_per_variant"]
    rows = []
    for name, r in runs.items():
        samples = r["samples"]
        first, warm, last = samples[0], samples[min(1, len(samples) - 1)], samples[-1]
        rows.append(
            [
                DESCRIPTIONS[name],
                f"{r['sent']:,}",
                _mb(first["rss"]),
                _mb(warm["rss"]),
                _mb(last["rss"]),
                f"**{fmt(growth_per_100k(samples), 2)}**",
                " / ".join(fmt(growth_per_100k(samples, k), 2) for k in ("heap", "anon", "file")),
                fmt(growth_per_100k(samples, "in_use_bytes"), 2) if last["malloc"] else "n/a",
                _mb(last["malloc"].get("free_held_bytes", 0)) if last["malloc"] else "n/a",
                str(last["arenas"] or "n/a"),
                _mb(r["after_trim"]["rss"]) if "after_trim" in r else "n/a",
                f"{r['errors']:,}",
                fmt(r["sent"] / r["busy"], 0) if r["busy"] else "n/a",
            ]
        )
    header = [
        "allocator",
        "requests",
        "RSS start MB",
        "RSS after the first chunk MB",
        "RSS end MB",
        "RSS growth MB/100k (after warm-up)",
        "of it in [heap] / other anonymous / file mappings",
        "glibc in-use growth MB/100k",
        "glibc free held at end MB",
        "glibc arenas",
        "RSS after a final malloc_trim MB",
        "non-2xx or socket errors",
        "req/s",
    ]
    per_100k = []
    for name, r in runs.items():
        samples = r["samples"]
        points, mark = [], 100_000
        for s in samples[1:]:
            if s["requests"] >= mark:
                points.append(s)
                mark = (s["requests"] // 100_000 + 1) * 100_000
        if len(samples) > 1 and (not points or points[-1] is not samples[-1]):
            points.append(samples[-1])
        per_100k.append([name] + [f"{s['requests'] // 1000}k: {_mb(s['rss'])}" for s in points])
    objects = []
    for name, r in runs.items():
        first_objects = r["samples"][1]["objects"] if len(r["samples"]) > 1 else {}
        last_objects = r["samples"][-1]["objects"]
        keys = sorted(set(first_objects) | set(last_objects))
        changes = [
            f"{k}: {first_objects.get(k, 0):,} -> {last_objects.get(k, 0):,}"
            for k in keys
            if k in ("all_gc_tracked", "gateway_extproc")
            or (
                k.startswith(("grpc", "google"))
                and first_objects.get(k, 0) != last_objects.get(k, 0)
            )
        ]
        objects.append([name, "; ".join(changes) or "unchanged"])
    reading = verdict(runs)
    stopped = (
        " **This soak was stopped early** (time): each variant got the requests shown, "
        "not the number asked for; no final malloc_trim was made."
        if data.get("interrupted")
        else ""
    )
    body = "\n\n".join(
        [
            f"{total:,} non-streamed chat completions per variant through the shipped "
            f"envoy/envoy.yaml (one front Envoy per variant, `--concurrency 1`), three "
            f"simulated engines shared by all, wrk with {data['connections']} connections "
            f"in chunks of about {data['chunk']:,} requests (wrk runs for a time chosen "
            "from the last chunk's rate), the variants taking turns chunk by chunk. "
            "Memory is sampled by bench/memory_probe.py inside the processor after every "
            "chunk. Growth is the least-squares slope from the first chunk "
            "on (the first chunk is warm-up)." + stopped,
            table(header, rows),
            "RSS (MB) at every 100k requests:",
            table(["variant", "samples"], per_100k) if per_100k else "",
            "Live Python objects (gc-tracked) after the first chunk -> at the end, by "
            "package (grpc and protobuf types shown only when they changed):",
            table(["variant", "objects"], objects),
            reading,
            (
                f"Not run: {', '.join(data['not_run'])}. "
                if data.get("not_run")
                else "Selected with BENCH_SOAK_VARIANTS (default all). "
            )
            + "Run: `make soak` (500k per variant) or "
            "`make soak SOAK_REQUESTS=20000` (a quick look).",
        ]
    )
    return Section(NAME, TITLE, body=body, data=data)


def verdict(runs: dict[str, dict[str, Any]]) -> str:
    """What the figures say: growth in use (a leak or a cache that keeps growing) or
    growth the allocator holds free (fragmentation), and what each variant changed."""
    glibc = runs.get("glibc")
    if not glibc or len(glibc["samples"]) < 3:
        return "Too few samples for a reading (the glibc variant needs at least two chunks)."
    rss = growth_per_100k(glibc["samples"])
    in_use = growth_per_100k(glibc["samples"], "in_use_bytes")
    final = glibc.get("final_trim")
    trimmed = (final["rss_before"] - final["rss_after"]) / MB if final else float("nan")
    kind = (
        "memory in use (allocated and not freed, outside the Python heap's objects): "
        "no allocator setting gives it back, so this is not fragmentation"
        if in_use >= 0.5 * rss
        else "not memory in use: free memory the allocator keeps, or pages touched for "
        "the first time (the final malloc_trim column says how much can be given back)"
    )
    others = ", ".join(
        f"{name} {fmt(growth_per_100k(r['samples']), 2)}"
        for name, r in runs.items()
        if name != "glibc"
    )
    baseline = runs.get("baseline")
    compared = ""
    if baseline and len(baseline["samples"]) >= 3:
        before_rss = growth_per_100k(baseline["samples"])
        before_in_use = growth_per_100k(baseline["samples"], "in_use_bytes")
        compared = (
            f" The baseline code (before the change) grew {fmt(before_rss, 2)} MB of RSS "
            f"and {fmt(before_in_use, 2)} MB of glibc in-use memory per 100k in the same run."
        )
    return (
        f"**Reading.** This code (glibc) grew {fmt(rss, 2)} MB of RSS per 100k requests "
        f"({fmt(rss * MB / 100_000, 0)} bytes per request) after warm-up, and glibc's "
        f"bytes in use grew {fmt(in_use, 2)} MB per 100k: most of the growth is {kind}. "
        f"A final malloc_trim gave back {fmt(trimmed, 1)} MB. RSS growth per 100k with "
        f"the other variants: {others or 'not run'}." + compared
    )


def saved_section(samples: Path, requests_per_variant: int) -> Section:
    """The section from the raw samples an interrupted soak left (soak-samples.json)."""
    runs = json.loads(samples.read_text(encoding="utf-8"))
    data = {"requests_per_variant": requests_per_variant, "chunk": CHUNK}
    data |= {"connections": CONNECTIONS, "runs": runs, "interrupted": True}
    data["not_run"] = [n for n in VARIANTS if n not in runs]
    return section_from(data)
