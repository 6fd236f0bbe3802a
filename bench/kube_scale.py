"""Benchmark 5: Kubernetes discovery at scale, against the tests' fake API server.

The fake (tests/fakes/kube_apiserver.py, speaking the real list/watch wire protocol) runs
in one process holding the pods (bench.kube_fake); the product's informer runs in
another (bench.kube_probe), so the resident-memory delta is the informer's and registry's
alone. Measured per layout (all pods serving one model, or spread over 100 models):

- initial sync: from `KubernetesSource.start()` to the first list applied to the
  registry (paged list of 500, JSON decoding, mapping, `ModelRegistry.replace_all`), and
  the RSS delta of the informer's process (after a GC);
- watch events: the fake flips the readiness of K pods as fast as it can commit them;
  events per second from the first flip to the last change applied in the registry. The
  fake's own commit time is shown too: when the two are close, the fake set the pace and
  the informer's true rate is at least the figure.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT, RunMode, Section, fmt, table
from tests.fakes.kube_apiserver import write_kubeconfig

NAME = "kube"
TITLE = "5. Kubernetes scale: initial sync and watch events"
PROBE_TIMEOUT = 300.0


def _spawn(argv: list[str], log: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", *argv],
        cwd=REPO_ROOT,  # the fake is imported from tests/
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
    )


def _read(process: subprocess.Popen[str], what: str) -> str:
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        raise RuntimeError(f"{what} ended early (exit {process.poll()}); see its log")
    return line.strip()


def _send(process: subprocess.Popen[str], line: str) -> None:
    assert process.stdin is not None
    process.stdin.write(line + "\n")
    process.stdin.flush()


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        try:
            _send(process, "quit")
            process.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            process.kill()
            process.wait()


def measure(pods: int, models: int, events: int, work: Path) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    fake = _spawn(
        ["bench.kube_fake", "--pods", str(pods), "--models", str(models)], work / "fake.log"
    )
    probe = None
    try:
        ready, port, created_s = _read(fake, "fake API server").split()
        if ready != "READY":
            raise RuntimeError(f"fake API server said {ready!r}")
        kubeconfig = write_kubeconfig(work / "kubeconfig", f"http://127.0.0.1:{port}")
        probe = _spawn(
            [
                "bench.kube_probe",
                "--kubeconfig",
                str(kubeconfig),
                "--pods",
                str(pods),
                "--timeout",
                str(PROBE_TIMEOUT),
            ],
            work / "probe.log",
        )
        synced = json.loads(_read(probe, "informer probe"))
        _send(probe, f"expect {events}")
        _send(fake, f"churn {events}")
        _, _, began, ended = _read(fake, "fake API server").split()
        applied = json.loads(_read(probe, "informer probe"))
        probe.wait(30)
    finally:
        if probe is not None and probe.poll() is None:
            probe.kill()
            probe.wait()
        _stop(fake)
    if applied["applied"] < events:
        raise RuntimeError(f"only {applied['applied']} of {events} watch events arrived")
    began_s, ended_s = float(began), float(ended)
    return {
        "pods": pods,
        "models": models,
        "fake_create_s": float(created_s),
        "sync_s": synced["sync_s"],
        "registry_s": synced["registry_s"],
        "rss_delta_mib": (synced["rss_after"] - synced["rss_before"]) / 2**20,
        "events": events,
        "events_per_s": events / (applied["last_at"] - began_s),
        "fake_events_per_s": events / (ended_s - began_s),
        "first_event_lag_ms": (applied["first_at"] - began_s) * 1e3,
    }


def run(mode: RunMode) -> Section:
    pods = mode.pick(10_000, 2_000)
    events = mode.pick(2_000, 300)
    # A small fleet first: its RSS delta is the informer's fixed cost (client, threads,
    # lazily imported API models), so the large ones give the cost per pod.
    layouts = ((100, 1), (pods, 1), (pods, 100))
    results = [
        measure(n, models, min(events, n), mode.work_dir / NAME / f"{n}-{models}")
        for n, models in layouts
    ]
    fixed = results[0]["rss_delta_mib"]
    for r in results[1:]:
        r["rss_marginal_kib_per_pod"] = (r["rss_delta_mib"] - fixed) * 1024 / (r["pods"] - 100)
    rows = [
        [
            f"{r['pods']:,} pods, {r['models']} model{'s' if r['models'] > 1 else ''}",
            fmt(r["sync_s"], 2),
            fmt(r["registry_s"], 2),
            f"{fmt(r['rss_delta_mib'], 1)} MiB",
            fmt(r["rss_marginal_kib_per_pod"], 2) if "rss_marginal_kib_per_pod" in r else "-",
            fmt(r["events_per_s"], 0),
            fmt(r["fake_events_per_s"], 0),
        ]
        for r in results
    ]
    section = Section(NAME, TITLE, data={"layouts": results})
    one_model = results[1]
    section.body = "\n\n".join(
        [
            "The fake API server (tests/fakes/kube_apiserver.py) and the informer run as "
            "separate processes; the informer is `KubernetesSource` feeding a "
            "`ModelRegistry` on uvloop, paging the list 500 pods at a time, resync off. "
            f"Watch events: {events:,} readiness flips (MODIFIED), each one a pod "
            "changing between routable and not.",
            table(
                [
                    "layout",
                    "initial sync s",
                    "of it in registry.replace_all s",
                    "RSS delta after sync",
                    "KiB per pod beyond 100 pods",
                    "watch events applied /s",
                    "fake commits /s",
                ],
                rows,
            ),
            f"The 100-pod row is the informer's fixed cost ({fmt(fixed, 1)} MiB: the "
            "kubernetes client, its threads and connection pool); the per-pod column is "
            "what each further pod adds. With all pods in one model, "
            f"{fmt(one_model['registry_s'], 1)} s of the {fmt(one_model['sync_s'], 1)} s "
            "sync is spent in `ModelRegistry.replace_all`, and each watch event costs "
            f"{fmt(1e3 / one_model['events_per_s'], 2)} ms.",
        ]
    )
    return section
