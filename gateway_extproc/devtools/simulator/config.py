"""The simulator's settings: one frozen dataclass, validated once when it is built."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SimulatorConfig:
    """What one simulated engine serves and how fast it pretends to be.

    `models` are the served model names (the first is the base model and the
    `model_name` label of every metric, as with vLLM's `--served-model-name`);
    `loras` are adapter names served on top of it. Port 0 binds an ephemeral port.
    """

    models: tuple[str, ...]
    loras: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8001
    ttft_ms: float = 20.0
    itl_ms: float = 5.0
    max_num_seqs: int = 256
    prefill_us_per_token: float = 50.0
    # One prefill at a time per engine (FIFO), as when prompts share the GPU's compute:
    # a long prompt's prefill delays the first token of the requests behind it.
    serial_prefill: bool = False
    kv_blocks: int = 2048
    block_size: int = 16
    max_tokens_default: int = 16
    seed: int = 0
    # A Hugging Face tokenizer directory: prompts are rendered and tokenized as vLLM does.
    tokenizer: str = ""
    # Publish KV-cache events on this port (None: off; 0: any free port), with a replay
    # socket on the other when it is set.
    kv_events_port: int | None = None
    kv_events_replay_port: int | None = None

    def __post_init__(self) -> None:
        # Lists are accepted for convenience; the stored value stays hashable and frozen.
        object.__setattr__(self, "models", tuple(self.models))
        object.__setattr__(self, "loras", tuple(self.loras))
        if not self.models:
            raise ValueError("at least one --model is required")
        names = [*self.models, *self.loras]
        for name in names:
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"model and adapter names must be non-empty, got {name!r}")
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"names served twice: {', '.join(duplicates)}")
        for name in ("port", "kv_events_port", "kv_events_replay_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 65535:
                raise ValueError(f"{name} {value} is out of range")
        if self.kv_events_replay_port is not None and self.kv_events_port is None:
            raise ValueError("a replay port needs --kv-events-port")
        for field in ("ttft_ms", "itl_ms", "prefill_us_per_token"):
            if getattr(self, field) < 0:
                raise ValueError(f"{field} must not be negative")
        for field in ("max_num_seqs", "kv_blocks", "block_size", "max_tokens_default"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be at least 1")

    @property
    def base_model(self) -> str:
        return self.models[0]

    @property
    def max_model_len(self) -> int:
        """Longest prompt + completion that fits: the whole KV cache, as vLLM caps it."""
        return self.kv_blocks * self.block_size
