"""A simulated vLLM-compatible engine for the demo, integration tests and benchmarks.

It speaks the OpenAI HTTP API as vLLM does (chat, completions, embeddings, models,
SSE streaming) and exposes vLLM's Prometheus metrics, driven by a small but real engine
model: a FIFO scheduler bounded by `max_num_seqs`, a block-hashed prefix cache with LRU
eviction that makes repeated prompts faster, and faults switchable at runtime.

Modules: `config` (SimulatorConfig), `app` (HTTP layer and the `simulate` command),
`protocol` (OpenAI request/response shapes), `engine` (scheduler and timing),
`prefix_cache` (KV blocks), `metrics` (Prometheus), `faults`, `text` (tokenizer and
synthetic replies).
"""

from gateway_extproc.devtools.simulator.app import (
    create_app,
    running_simulator,
    start_simulator,
)
from gateway_extproc.devtools.simulator.config import SimulatorConfig

__all__ = ["SimulatorConfig", "create_app", "running_simulator", "start_simulator"]
