"""The engine-metrics parser against vLLM-shaped exposition text."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway_extproc.devtools.simulator.config import SimulatorConfig
from gateway_extproc.devtools.simulator.metrics import EngineMetrics, EngineSnapshot
from gateway_extproc.metrics import EngineSample, MetricsParseError, parse_engine_metrics

LABELS = ("model_name", "engine")


def vllm_v1_text(engines: int = 1) -> str:
    """What a vLLM V1 server exposes, rendered by prometheus_client as vLLM does
    (HELP/TYPE lines, _created samples, every histogram bucket)."""
    registry = CollectorRegistry()
    running = Gauge("vllm:num_requests_running", "Running.", LABELS, registry=registry)
    waiting = Gauge("vllm:num_requests_waiting", "Waiting.", LABELS, registry=registry)
    kv = Gauge("vllm:kv_cache_usage_perc", "KV usage.", LABELS, registry=registry)
    queries = Counter("vllm:prefix_cache_queries", "Queries.", LABELS, registry=registry)
    hits = Counter("vllm:prefix_cache_hits", "Hits.", LABELS, registry=registry)
    prompt = Counter("vllm:prompt_tokens", "Prompt tokens.", LABELS, registry=registry)
    gen = Counter("vllm:generation_tokens", "Generation tokens.", LABELS, registry=registry)
    ttft = Histogram(
        "vllm:time_to_first_token_seconds", "TTFT.", LABELS, registry=registry,
        buckets=(0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
    )  # fmt: skip
    itl = Histogram(
        "vllm:inter_token_latency_seconds", "ITL.", LABELS, registry=registry,
        buckets=(0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5),
    )  # fmt: skip
    e2e = Histogram("vllm:e2e_request_latency_seconds", "E2E.", LABELS, registry=registry)
    info = Gauge(
        "vllm:lora_requests_info",
        "LoRA.",
        [*LABELS, "max_lora", "running_lora_adapters", "waiting_lora_adapters"],
        registry=registry,
    )
    Gauge("vllm:num_preemptions", "Unused family.", LABELS, registry=registry).labels("m", "0")
    for engine in range(engines):
        values = ("meta-llama/Llama-3.1-8B-Instruct", str(engine))
        running.labels(*values).set(3)
        waiting.labels(*values).set(2)
        kv.labels(*values).set(0.25 + 0.5 * engine)
        queries.labels(*values).inc(1000)
        hits.labels(*values).inc(400)
        prompt.labels(*values).inc(5000)
        gen.labels(*values).inc(700)
        for seconds in (0.1, 0.3):
            ttft.labels(*values).observe(seconds)
        for seconds in (0.02, 0.04, 0.06):
            itl.labels(*values).observe(seconds)
        e2e.labels(*values).observe(4.0)
    info.labels("m", "0", "4", "adapter-a", "").set(1_700_000_000.0)
    info.labels("m", "0", "4", "adapter-a,adapter-b", "adapter-c").set(1_700_000_100.0)
    return generate_latest(registry).decode()


def test_reads_every_family_from_v1_text() -> None:
    sample = parse_engine_metrics(vllm_v1_text())
    assert sample.running == 3
    assert sample.waiting == 2
    assert sample.kv_cache_usage == pytest.approx(0.25)
    assert sample.prefix_cache_queries == 1000
    assert sample.prefix_cache_hits == 400
    assert sample.prompt_tokens == 5000
    assert sample.generation_tokens == 700
    assert sample.ttft_sum == pytest.approx(0.4)
    assert sample.ttft_count == 2
    assert sample.itl_sum == pytest.approx(0.12)
    assert sample.itl_count == 3
    assert sample.e2e_sum == pytest.approx(4.0)
    assert sample.e2e_count == 1
    # The newest lora_requests_info series (largest value) describes the adapters now.
    assert sample.running_lora_adapters == ("adapter-a", "adapter-b")
    assert sample.waiting_lora_adapters == ("adapter-c",)
    assert sample.max_lora == 4


def test_agrees_with_prometheus_client_parser() -> None:
    text = vllm_v1_text(engines=2)
    reference: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            reference[s.name] = reference.get(s.name, 0.0) + s.value
    sample = parse_engine_metrics(text)
    assert sample.running == reference["vllm:num_requests_running"]
    assert sample.prompt_tokens == reference["vllm:prompt_tokens_total"]
    assert sample.ttft_sum == pytest.approx(reference["vllm:time_to_first_token_seconds_sum"])
    assert sample.ttft_count == reference["vllm:time_to_first_token_seconds_count"]
    assert sample.itl_count == reference["vllm:inter_token_latency_seconds_count"]


def test_data_parallel_engines_add_up_but_cache_usage_is_averaged() -> None:
    sample = parse_engine_metrics(vllm_v1_text(engines=2))
    assert sample.running == 6
    assert sample.waiting == 4
    assert sample.prompt_tokens == 10_000
    assert sample.kv_cache_usage == pytest.approx((0.25 + 0.75) / 2)


OLD_ENGINE = """\
# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="facebook/opt-125m"} 1.0
vllm:num_requests_waiting{model_name="facebook/opt-125m"} 0.0
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="facebook/opt-125m"} 0.125
vllm:time_per_output_token_seconds_bucket{le="0.01",model_name="facebook/opt-125m"} 3.0
vllm:time_per_output_token_seconds_bucket{le="+Inf",model_name="facebook/opt-125m"} 4.0
vllm:time_per_output_token_seconds_sum{model_name="facebook/opt-125m"} 0.05
vllm:time_per_output_token_seconds_count{model_name="facebook/opt-125m"} 4.0
"""


def test_accepts_older_names() -> None:
    sample = parse_engine_metrics(OLD_ENGINE)
    assert sample.kv_cache_usage == pytest.approx(0.125)
    assert sample.itl_sum == pytest.approx(0.05)
    assert sample.itl_count == 4
    assert sample.ttft_sum is None  # not exposed: unknown, not zero
    assert sample.running_lora_adapters is None


def test_new_name_wins_over_deprecated_alias() -> None:
    text = (
        "vllm:kv_cache_usage_perc 0.5\n"
        "vllm:gpu_cache_usage_perc 0.9\n"
        "vllm:inter_token_latency_seconds_sum 2.0\n"
        "vllm:inter_token_latency_seconds_count 4\n"
        "vllm:time_per_output_token_seconds_sum 99\n"
        "vllm:time_per_output_token_seconds_count 1\n"
    )
    sample = parse_engine_metrics(text)
    assert sample.kv_cache_usage == 0.5
    assert (sample.itl_sum, sample.itl_count) == (2.0, 4)


def test_labels_with_spaces_and_braces_and_timestamps() -> None:
    text = (
        'vllm:num_requests_running{model_name="odd } name {x}",engine="0"} 7 1700000000000\n'
        "vllm:num_requests_waiting 1e1\n"
    )
    sample = parse_engine_metrics(text)
    assert sample.running == 7
    assert sample.waiting == 10


def test_special_values_are_passed_on_for_the_store_to_judge() -> None:
    sample = parse_engine_metrics("vllm:kv_cache_usage_perc NaN\nvllm:num_requests_waiting -1\n")
    assert sample.kv_cache_usage is not None and math.isnan(sample.kv_cache_usage)
    assert sample.waiting == -1


@pytest.mark.parametrize(
    "text",
    [
        "",
        "<html><body>502 Bad Gateway</body></html>",
        "\x00\x01\x02 garbage \xff",
        "# HELP only comments\n# TYPE x gauge\n",
        "process_cpu_seconds_total 12.5\n",  # an exporter, but not an engine
    ],
)
def test_text_without_engine_metrics_is_an_error(text: str) -> None:
    with pytest.raises(MetricsParseError):
        parse_engine_metrics(text)


@pytest.mark.parametrize(
    "text",
    [
        'vllm:num_requests_running{engine="0"} not-a-number\n',
        'vllm:num_requests_running{engine="0"}\n',
        "vllm:num_requests_running\n",
        'vllm:num_requests_running{engine="0" 3\n',
    ],
)
def test_malformed_wanted_sample_is_an_error(text: str) -> None:
    with pytest.raises(MetricsParseError):
        parse_engine_metrics(text)


def test_unknown_lines_are_ignored() -> None:
    text = "some garbage line without meaning\nvllm:num_requests_running 2\n{weird\n"
    assert parse_engine_metrics(text) == EngineSample(running=2.0)


def cache_info(engines: list[tuple[str, str]]) -> str:
    """vllm:cache_config_info as vLLM writes it: one series per engine, the config in
    its labels, value 1."""
    lines = [
        "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig",
        "# TYPE vllm:cache_config_info gauge",
    ]
    for engine, (block_size, blocks) in enumerate(engines):
        lines.append(
            f'vllm:cache_config_info{{block_size="{block_size}",cache_dtype="auto",'
            f'enable_prefix_caching="True",engine="{engine}",gpu_memory_utilization="0.9",'
            f'num_cpu_blocks="None",num_gpu_blocks="{blocks}",prefix_caching_hash_algo='
            f'"sha256"}} 1.0'
        )
    return "\n".join(lines) + "\nvllm:num_requests_running 0.0\n"


def test_cache_capacity_comes_from_cache_config_info() -> None:
    sample = parse_engine_metrics(cache_info([("16", "2048")]))
    assert sample.kv_block_size == 16
    assert sample.kv_capacity_tokens == 16 * 2048


def test_cache_capacity_adds_up_over_data_parallel_engines() -> None:
    sample = parse_engine_metrics(cache_info([("16", "1000"), ("16", "3000")]))
    assert sample.kv_capacity_tokens == 16 * 4000


@pytest.mark.parametrize("blocks", ["None", "", "-5", "0", "lots"])
def test_unknown_cache_size_is_none_not_an_error(blocks: str) -> None:
    sample = parse_engine_metrics(cache_info([("16", blocks)]))
    assert sample.kv_capacity_tokens is None
    assert sample.kv_block_size == 16
    assert sample.running == 0.0


def test_the_simulators_cache_info_is_read() -> None:
    config = SimulatorConfig(models=("m",), kv_blocks=300, block_size=32)
    metrics = EngineMetrics(config, lambda: EngineSnapshot(0, 0, 0.0, (), ()))
    sample = parse_engine_metrics(metrics.render().decode())
    assert sample.kv_block_size == 32
    assert sample.kv_capacity_tokens == 300 * 32
