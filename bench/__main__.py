"""`python -m bench [NAME...] [--quick]`: run benchmarks and rewrite docs/BENCHMARKS.md.

With no NAME every benchmark of MODULES runs, in that order; the soak and the fault
script (ON_DEMAND) run only when named. A benchmark that fails gets a section saying so
(the others still run) and the command exits 1; so does a section whose checks failed
(the fault script's), after writing its results.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from bench import (
    burst,
    chaos,
    kube_scale,
    long_prompt,
    notes,
    overhead,
    profiling,
    quality,
    report,
    routing_cost,
    soak,
    streaming,
    workers,
)
from bench.common import (
    REPO_ROOT,
    RunMode,
    Section,
    command_line,
    cpu_jiffies,
    machine,
    utc_now,
)
from gateway_extproc import telemetry

# Run (and document) order; the profile comes last, after the figures it explains.
MODULES: tuple[ModuleType, ...] = (
    overhead,
    streaming,
    routing_cost,
    quality,
    kube_scale,
    profiling,
    long_prompt,
    workers,
)
# Run only when named (`make soak`, `make chaos`): the soak takes an hour at its default
# size, and the fault script is a pass/fail check rather than a figure to track.
ON_DEMAND: tuple[ModuleType, ...] = (soak, chaos, burst)
BENCHMARKS: dict[str, Callable[[RunMode], Section]] = {
    m.NAME: m.run for m in (*MODULES, *ON_DEMAND)
}
TITLES = {m.NAME: m.TITLE for m in (*MODULES, *ON_DEMAND)}
DEFAULT_RUN = [m.NAME for m in MODULES]
DEFAULT_OUTPUT = REPO_ROOT / "docs" / "BENCHMARKS.md"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help=f"benchmarks to run: {', '.join(BENCHMARKS)}"
    )
    parser.add_argument("--quick", action="store_true", help="short smoke run (noisier figures)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="the report to rewrite")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=Path("/tmp/gateway-extproc-bench"),
        help="logs, rendered configs and profiles of the processes started",
    )
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    return args


def provenance(
    argv: list[str], mode: RunMode, started: str, load: float, seconds: float, steal: float
) -> str:
    m = machine()
    return (
        f"Command: `{command_line(argv)}` · mode: {mode.name} · {started} · "
        f"{m['cores']} cores (os.cpu_count), {m['cpu']}, Linux {m['kernel']}, "
        f"Python {m['python']}, Envoy {m['envoy']} · load average at start "
        f"{load} · CPU steal during the run {steal * 100:.1f}% · took {seconds:.0f} s"
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    names = args.names or DEFAULT_RUN
    mode = RunMode(quick=args.quick, work_dir=args.work_dir)
    # Product code run in this process (routing, scraper) logs warnings only, to stderr.
    telemetry.configure_logging("warning", "console")
    if mode.work_dir.exists():
        shutil.rmtree(mode.work_dir)
    mode.work_dir.mkdir(parents=True)
    failed = []
    sections: dict[str, tuple[Section, str]] = {}
    for name in names:
        print(f"== {name} ({mode.name})", flush=True)
        started_at = utc_now()
        load = machine()["load_avg"]
        steal0, total0 = cpu_jiffies()
        started = time.monotonic()
        try:
            section = BENCHMARKS[name](mode)
        except Exception:
            failed.append(name)
            detail = traceback.format_exc()
            print(detail, file=sys.stderr, flush=True)
            section = Section(
                name,
                TITLES[name],
                body="**This benchmark failed in this run:**\n\n```\n"
                + detail.strip()[-3000:]
                + "\n```",
            )
        elapsed = time.monotonic() - started
        steal1, total1 = cpu_jiffies()
        steal = (steal1 - steal0) / max(1, total1 - total0)
        sections[name] = (section, provenance(argv, mode, started_at, load, elapsed, steal))
        if section.failed_checks and name not in failed:
            failed.append(name)
            for check in section.failed_checks:
                print(f"   CHECK FAILED: {check}", flush=True)
        for target in section.targets:
            verdict = "met" if target.met else "NOT MET"
            print(f"   {target.name} {target.goal}: {target.figure} -> {verdict}", flush=True)
        print(f"   done in {elapsed:.0f} s", flush=True)
        # Written after every benchmark so an interrupted run keeps what it measured.
        report.write(args.output, sections, list(BENCHMARKS), notes.NOTES)
    print(f"wrote {args.output}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
