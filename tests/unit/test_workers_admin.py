"""The `serve --workers N` supervisor's /readyz speaks for its workers, notes included."""

from __future__ import annotations

import shutil

from gateway_extproc.config import Settings
from gateway_extproc.workers import Supervisor, Worker

FAILED = "the last reload of /etc/models.yaml failed (the file is empty); the dictionary stays"


async def test_readyz_passes_on_what_ready_workers_add_once():
    supervisor = Supervisor(Settings(workers=3))
    answers = {0: (200, f"ready\n{FAILED}\n"), 1: (200, f"ready\n{FAILED}\n"), 2: (200, "ready\n")}

    async def ask(worker: Worker, path: str) -> tuple[int, str]:
        assert path == "/readyz"
        return answers[worker.index]

    supervisor._ask = ask  # type: ignore[method-assign]
    try:
        reply = await supervisor._readyz(None)  # type: ignore[arg-type]
        assert reply.status == 200
        assert reply.text == f"ready (3 workers)\n{FAILED}\n"
        answers[0] = answers[1] = (200, "ready\n")
        reply = await supervisor._readyz(None)  # type: ignore[arg-type]
        assert reply.text == "ready (3 workers)\n"
    finally:
        shutil.rmtree(supervisor._dir, ignore_errors=True)
