"""The informer under measurement, in a fresh process of its own (so its resident memory
is its own): the product's KubernetesSource feeding a ModelRegistry on a uvloop loop,
as `gateway-extproc serve --discovery kubernetes` runs them.

    python -m bench.kube_probe --kubeconfig PATH --pods 10000

Prints one JSON line when the first list is applied (sync time, time spent in the
registry, RSS before and after), then reads `expect K` on stdin, waits until K more pod
changes have reached the registry and prints a JSON line with the monotonic times of the
first and last of them.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import time
from collections.abc import Iterable

import uvloop

from bench.common import rss_bytes
from gateway_extproc import telemetry
from gateway_extproc.models.kubernetes import KubernetesOptions, KubernetesSource
from gateway_extproc.models.registry import ModelRegistry, Pod


class CountingRegistry(ModelRegistry):
    """The real registry, noting when changes arrive and how long whole lists take."""

    applied = 0
    first_at = 0.0
    last_at = 0.0
    replace_s = 0.0

    def upsert_pod(self, pod: Pod) -> None:
        super().upsert_pod(pod)
        self.applied += 1
        self.last_at = time.monotonic()
        if not self.first_at:
            self.first_at = self.last_at

    def replace_all(self, pods: Iterable[Pod]) -> None:
        started = time.monotonic()
        super().replace_all(pods)
        self.replace_s += time.monotonic() - started


async def probe(kubeconfig: str, pods: int, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    registry = CountingRegistry()
    gc.collect()
    rss_before = rss_bytes()
    source = KubernetesSource(
        registry,
        loop,
        KubernetesOptions(kubeconfig=kubeconfig, resync_period=0, list_page_size=500),
    )
    started = time.monotonic()
    await source.start()
    try:
        if not await source.wait_synced(timeout):
            raise SystemExit(f"not synced within {timeout} s")
        synced = time.monotonic() - started
        gc.collect()
        report = {
            "sync_s": synced,
            "registry_s": registry.replace_s,
            "pods": len(registry.pods()),
            "rss_before": rss_before,
            "rss_after": rss_bytes(),
        }
        if report["pods"] != pods:
            raise SystemExit(f"registry holds {report['pods']} pods, expected {pods}")
        print(json.dumps(report), flush=True)
        line = await loop.run_in_executor(None, sys.stdin.readline)
        expect = int(line.split()[1])
        base = registry.applied
        registry.first_at = 0.0
        deadline = time.monotonic() + timeout
        while registry.applied - base < expect and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        print(
            json.dumps(
                {
                    "applied": registry.applied - base,
                    "first_at": registry.first_at,
                    "last_at": registry.last_at,
                    "rss_after_events": rss_bytes(),
                }
            ),
            flush=True,
        )
    finally:
        await source.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--pods", type=int, required=True)
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args()
    # Logs go to stderr (stdout carries the results); model state changes are info.
    telemetry.configure_logging("warning", "json")
    uvloop.run(probe(args.kubeconfig, args.pods, args.timeout))


if __name__ == "__main__":
    main()
