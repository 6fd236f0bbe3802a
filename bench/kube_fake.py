"""The fake Kubernetes API server of the tests, filled with pods, in its own process, so
that its memory and CPU never count against the informer being measured.

    python -m bench.kube_fake --pods 10000 --models 1

Prints `READY <port> <seconds to create the pods>`, then reads commands on stdin:
`churn K` flips the readiness of K pods (K MODIFIED watch events, as fast as the fake
commits them) and prints `CHURNED <K> <monotonic start> <monotonic end>`; `quit` stops.
Run from the repository root (the fake lives in tests/fakes).
"""

from __future__ import annotations

import argparse
import sys
import time

from tests.fakes.kube_apiserver import FakeKubeApiServer

NAMESPACE = "bench"


def pod_name(i: int) -> str:
    return f"engine-{i:05d}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pods", type=int, required=True)
    parser.add_argument("--models", type=int, default=1)
    parser.add_argument("--history", type=int, default=50_000)
    args = parser.parse_args()
    fake = FakeKubeApiServer(history_limit=args.history)
    fake.start()
    started = time.monotonic()
    for i in range(args.pods):
        fake.create_pod(
            pod_name(i),
            NAMESPACE,
            model=f"model-{i % args.models}",
            ip=f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}",
            phase="Running",
            ready=True,
        )
    print(f"READY {fake.port} {time.monotonic() - started:.3f}", flush=True)
    ready = dict.fromkeys(range(args.pods), True)
    cursor = 0
    for line in sys.stdin:
        command, *rest = line.split()
        if command == "quit":
            break
        if command == "churn":
            count = int(rest[0])
            began = time.monotonic()
            for _ in range(count):
                i = cursor % args.pods
                cursor += 1
                ready[i] = not ready[i]
                fake.update_pod(pod_name(i), NAMESPACE, ready=ready[i])
            print(f"CHURNED {count} {began:.6f} {time.monotonic():.6f}", flush=True)
    fake.stop()


if __name__ == "__main__":
    main()
