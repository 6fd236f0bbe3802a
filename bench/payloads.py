"""Request and response bodies shaped like real traffic: an OpenAI chat request, the
completion a pod answers with, SSE chunks, and a vLLM V1 /metrics exposition."""

from __future__ import annotations

import json
import random

from gateway_extproc.devtools.simulator.metrics import E2E_BUCKETS, ITL_BUCKETS, TTFT_BUCKETS

BENCH_MODEL = "bench-model"
STREAM_MODEL = "bench-stream"
PACED_STREAM_MODEL = "bench-stream-paced"

_SYSTEM_PROMPT = (
    "You are a helpful assistant for an online store. Answer questions about orders, "
    "shipping, returns and products. Be concise, cite the order number when the user "
    "gives one, never invent tracking numbers, and ask a clarifying question when the "
    "request is ambiguous. Policies: returns within 30 days with receipt; refunds go to "
    "the original payment method within 5 business days; express shipping is 2 days, "
    "standard shipping 5 to 7 days; international orders may take up to 3 weeks. "
) * 2


def chat_request(model: str = BENCH_MODEL, *, stream: bool = False) -> bytes:
    """A chat completion request as an application sends it (~1.6 KB)."""
    doc = {
        "model": model,
        "messages": [
            {"role": "system", "content": _SYSTEM_PROMPT},
            {"role": "user", "content": "Where is my order 1042-778? It was due on Monday."},
            {
                "role": "assistant",
                "content": "Order 1042-778 left the warehouse on Friday with standard "
                "shipping; it is in transit and should arrive within two days.",
            },
            {"role": "user", "content": "Can I still change the delivery address?"},
        ],
        "max_tokens": 128,
        "temperature": 0.7,
        "stream": stream,
    }
    return json.dumps(doc).encode()


def chat_completion(model: str = BENCH_MODEL) -> bytes:
    """The non-streamed answer a vLLM pod sends (OpenAI `chat.completion`, with usage)."""
    doc = {
        "id": "chatcmpl-4f9a0c2be8d54c3a9d6f1b7e2a8c0d11",
        "object": "chat.completion",
        "created": 1763700000,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Yes. As long as the parcel has not been handed to the "
                    "local courier you can change the address from the order page; "
                    "after that, contact support with the order number.",
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 412, "completion_tokens": 38, "total_tokens": 450},
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def sse_chunk(index: int, model: str = STREAM_MODEL) -> bytes:
    """One `data:` event of a streamed chat completion carrying one token."""
    doc = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1763700000,
        "model": model,
        "choices": [{"index": 0, "delta": {"content": f" tok{index}"}, "finish_reason": None}],
    }
    return b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


# -- vLLM /metrics -------------------------------------------------------------------------

# Families a vLLM V1 engine exposes besides the ones routing reads, with their bucket
# layouts; the parser must skip all of them, which is where most of its time goes.
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 32768)
_ITERATION_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
_HISTOGRAMS: tuple[tuple[str, tuple[float, ...]], ...] = (
    ("vllm:time_to_first_token_seconds", TTFT_BUCKETS),
    ("vllm:time_per_output_token_seconds", ITL_BUCKETS),
    ("vllm:inter_token_latency_seconds", ITL_BUCKETS),
    ("vllm:e2e_request_latency_seconds", E2E_BUCKETS),
    ("vllm:request_queue_time_seconds", E2E_BUCKETS),
    ("vllm:request_inference_time_seconds", E2E_BUCKETS),
    ("vllm:request_prefill_time_seconds", E2E_BUCKETS),
    ("vllm:request_decode_time_seconds", E2E_BUCKETS),
    ("vllm:request_prompt_tokens", _TOKEN_BUCKETS),
    ("vllm:request_generation_tokens", _TOKEN_BUCKETS),
    ("vllm:request_params_max_tokens", _TOKEN_BUCKETS),
    ("vllm:request_max_num_generation_tokens", _TOKEN_BUCKETS),
    ("vllm:iteration_tokens_total", _ITERATION_BUCKETS),
    ("vllm:request_params_n", (1, 2, 5, 10, 20)),
)


def vllm_metrics_text(model: str = BENCH_MODEL, seed: int = 7) -> str:
    """A vLLM V1 (0.8-0.10 era) /metrics page for one engine: process and Python
    collector families, every vllm: gauge, counter and histogram with `_created` lines,
    as prometheus_client renders them (~33 KB)."""
    rng = random.Random(seed)
    labels = f'engine="0",model_name="{model}"'
    out: list[str] = []

    def family(name: str, kind: str, help_text: str) -> None:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")

    for gen in range(3):
        family("python_gc_objects_collected_total", "counter", "Objects collected during gc")
        out.append(
            f'python_gc_objects_collected_total{{generation="{gen}"}} {rng.randint(1, 900_000)}.0'
        )
    for name, value in (
        ("process_virtual_memory_bytes", 3.2e10),
        ("process_resident_memory_bytes", 5.1e9),
        ("process_start_time_seconds", 1.7637e9),
        ("process_cpu_seconds_total", 8123.4),
        ("process_open_fds", 187.0),
        ("process_max_fds", 1048576.0),
    ):
        family(name, "gauge", "Process metric.")
        out.append(f"{name} {value}")
    out.append('python_info{implementation="CPython",major="3",minor="12",patchlevel="9"} 1.0')

    for name, value in (
        ("vllm:num_requests_running", rng.randint(0, 64)),
        ("vllm:num_requests_waiting", rng.randint(0, 8)),
        ("vllm:kv_cache_usage_perc", round(rng.random(), 4)),
    ):
        family(name, "gauge", "Engine state.")
        out.append(f"{name}{{{labels}}} {float(value)}")
    for name in (
        "vllm:num_preemptions",
        "vllm:prompt_tokens",
        "vllm:generation_tokens",
        "vllm:prefix_cache_queries",
        "vllm:prefix_cache_hits",
    ):
        family(f"{name}_total", "counter", "Engine counter.")
        out.append(f"{name}_total{{{labels}}} {float(rng.randint(100_000, 1_000_000_000))}")
        out.append(f"{name}_created{{{labels}}} 1.7637e9")
    family("vllm:request_success_total", "counter", "Count of successfully processed requests.")
    for reason in ("stop", "length", "abort"):
        out.append(
            f'vllm:request_success_total{{{labels},finished_reason="{reason}"}} '
            f"{float(rng.randint(0, 1_000_000))}"
        )
    for name, buckets in _HISTOGRAMS:
        family(name, "histogram", "Engine histogram.")
        count = rng.randint(10_000, 1_000_000)
        cumulative = 0
        for bound in buckets:
            cumulative = min(count, cumulative + rng.randint(0, count // len(buckets) + 1))
            out.append(f'{name}_bucket{{{labels},le="{float(bound)}"}} {float(cumulative)}')
        out.append(f'{name}_bucket{{{labels},le="+Inf"}} {float(count)}')
        out.append(f"{name}_count{{{labels}}} {float(count)}")
        out.append(f"{name}_sum{{{labels}}} {rng.random() * count}")
        out.append(f"{name}_created{{{labels}}} 1.7637e9")
    family("vllm:cache_config_info", "gauge", "Information of the LLMEngine CacheConfig")
    out.append(
        'vllm:cache_config_info{block_size="16",cache_dtype="auto",enable_prefix_caching="True",'
        'gpu_memory_utilization="0.9",num_gpu_blocks="27386",num_cpu_blocks="0",'
        f'engine="0",model_name="{model}"}} 1.0'
    )
    family("vllm:lora_requests_info", "gauge", "Running stats on lora requests.")
    out.append(
        'vllm:lora_requests_info{max_lora="4",running_lora_adapters="",'
        'waiting_lora_adapters=""} 1.7637e9'
    )
    return "\n".join(out) + "\n"
