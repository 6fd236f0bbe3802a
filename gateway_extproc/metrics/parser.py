"""A small, fast reader for the few engine metric families routing uses.

The scraper runs this for every routable pod several times a second, so it does not build
a full Prometheus model: it walks the exposition text once, looks each sample's name up in
a table of wanted names, and sums what it finds. Everything else (buckets, `_created`,
families we do not use, HELP/TYPE lines) is skipped after one dict lookup.

Several series of one name (vLLM's data-parallel `engine="0"`, `engine="1"`, or several
`model_name` labels) are added up, except for cache usage, which is averaged because it is
a fraction per engine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace


class MetricsParseError(ValueError):
    """The text is not engine metrics we can use (garbage, truncated, or none of ours)."""


@dataclass(frozen=True, slots=True)
class EngineSample:
    """One scrape's raw values; None where the engine did not expose the family.

    Counters and histogram sums/counts are cumulative, as exposed; the store turns
    successive samples into rates and recent means.
    """

    running: float | None = None
    waiting: float | None = None
    kv_cache_usage: float | None = None
    prefix_cache_queries: float | None = None
    prefix_cache_hits: float | None = None
    prompt_tokens: float | None = None
    generation_tokens: float | None = None
    ttft_sum: float | None = None
    ttft_count: float | None = None
    itl_sum: float | None = None
    itl_count: float | None = None
    e2e_sum: float | None = None
    e2e_count: float | None = None
    running_lora_adapters: tuple[str, ...] | None = None
    waiting_lora_adapters: tuple[str, ...] | None = None
    max_lora: int | None = None
    # From vllm:cache_config_info: the KV cache's block size (tokens) and its capacity
    # in tokens (num_gpu_blocks x block_size, summed over the engines of the pod).
    kv_block_size: int | None = None
    kv_capacity_tokens: int | None = None


# Slots in the accumulator arrays. Old names get their own slot so that an engine which
# exposes both the new and the deprecated name is not counted twice: the new one wins.
(
    _RUNNING,
    _WAITING,
    _KV,
    _KV_OLD,
    _PREFIX_QUERIES,
    _PREFIX_HITS,
    _PROMPT_TOKENS,
    _GENERATION_TOKENS,
    _TTFT_SUM,
    _TTFT_COUNT,
    _ITL_SUM,
    _ITL_COUNT,
    _TPOT_SUM,
    _TPOT_COUNT,
    _E2E_SUM,
    _E2E_COUNT,
    _SLOTS,
) = range(17)

_WANTED: dict[str, int] = {
    "vllm:num_requests_running": _RUNNING,
    "vllm:num_requests_waiting": _WAITING,
    "vllm:kv_cache_usage_perc": _KV,
    "vllm:gpu_cache_usage_perc": _KV_OLD,
    "vllm:prefix_cache_queries_total": _PREFIX_QUERIES,
    "vllm:prefix_cache_hits_total": _PREFIX_HITS,
    "vllm:prompt_tokens_total": _PROMPT_TOKENS,
    "vllm:generation_tokens_total": _GENERATION_TOKENS,
    "vllm:time_to_first_token_seconds_sum": _TTFT_SUM,
    "vllm:time_to_first_token_seconds_count": _TTFT_COUNT,
    "vllm:inter_token_latency_seconds_sum": _ITL_SUM,
    "vllm:inter_token_latency_seconds_count": _ITL_COUNT,
    "vllm:time_per_output_token_seconds_sum": _TPOT_SUM,
    "vllm:time_per_output_token_seconds_count": _TPOT_COUNT,
    "vllm:e2e_request_latency_seconds_sum": _E2E_SUM,
    "vllm:e2e_request_latency_seconds_count": _E2E_COUNT,
}
_AVERAGED = frozenset((_KV, _KV_OLD))
_LORA_INFO = "vllm:lora_requests_info"
_CACHE_INFO = "vllm:cache_config_info"
_INFO = frozenset((_LORA_INFO, _CACHE_INFO))

_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_engine_metrics(text: str) -> EngineSample:
    """Read the families routing uses from Prometheus text exposition.

    Raises MetricsParseError when a wanted sample is malformed or when the text holds none
    of the wanted families (an HTML error page, a different exporter, random bytes).
    """
    totals = [0.0] * _SLOTS
    seen = [0] * _SLOTS
    wanted = _WANTED
    lora_labels = ""
    lora_stamp = float("-inf")
    cache_labels: list[str] = []
    found = False
    for line in text.split("\n"):
        if not line or line[0] == "#":
            continue
        brace = line.find("{")
        space = line.find(" ")
        if brace != -1 and (space == -1 or brace < space):
            name = line[:brace]
            slot = wanted.get(name)
            if slot is None and name not in _INFO:
                continue
            # Label values may hold spaces or braces; the value starts after the last '}'.
            close = line.rfind("}")
            if close < brace:
                raise MetricsParseError(f"unterminated labels in {name}")
            rest = line[close + 1 :]
        else:
            if space == -1:
                # A bare token: a wanted name without a value is truncated text.
                if line.rstrip() in wanted:
                    raise MetricsParseError(f"no value for {line.strip()}")
                continue
            name = line[:space]
            slot = wanted.get(name)
            if slot is None and name not in _INFO:
                continue
            close = -1
            rest = line[space:]
        fields = rest.split()
        if not fields:
            raise MetricsParseError(f"no value for {name}")
        try:
            value = float(fields[0])
        except ValueError:
            raise MetricsParseError(f"bad value {fields[0]!r} for {name}") from None
        found = True
        if name == _CACHE_INFO:
            if close > 0:
                cache_labels.append(line[brace + 1 : close])
            continue
        if slot is None:
            # The lora info gauge's value is the time it was set; vLLM leaves older label
            # sets behind, so the newest one describes the adapters now.
            if value >= lora_stamp:
                lora_stamp = value
                lora_labels = line[brace + 1 : close] if close > 0 else ""
            continue
        totals[slot] += value
        seen[slot] += 1
    if not found:
        raise MetricsParseError("no engine metrics in the text")
    sample = _sample(totals, seen, lora_labels if lora_stamp > float("-inf") else None)
    if cache_labels:
        block_size, capacity = _cache_capacity(cache_labels)
        sample = replace(sample, kv_block_size=block_size, kv_capacity_tokens=capacity)
    return sample


def _cache_capacity(series: list[str]) -> tuple[int | None, int | None]:
    """(block size, capacity in tokens) from cache_config_info label sets, one per engine
    of the pod; None where a value is missing or not a positive integer (vLLM writes
    "None" for values not known yet)."""
    block_size: int | None = None
    capacity = 0
    for raw in series:
        labels = dict(_LABEL.findall(raw))
        size = _positive_int(labels.get("block_size", ""))
        blocks = _positive_int(labels.get("num_gpu_blocks", ""))
        if size is None or blocks is None:
            return size if block_size is None else block_size, None
        block_size = block_size or size
        capacity += size * blocks
    return block_size, capacity


def _positive_int(raw: str) -> int | None:
    try:
        value = int(raw)
    except ValueError:
        return None
    return value if value > 0 else None


def _sample(totals: list[float], seen: list[int], lora_labels: str | None) -> EngineSample:
    def pick(slot: int, old: int | None = None) -> float | None:
        if not seen[slot]:
            if old is not None and seen[old]:
                return pick(old)
            return None
        if slot in _AVERAGED:
            return totals[slot] / seen[slot]
        return totals[slot]

    running_lora: tuple[str, ...] | None = None
    waiting_lora: tuple[str, ...] | None = None
    max_lora: int | None = None
    if lora_labels is not None:
        labels = dict(_LABEL.findall(lora_labels))
        running_lora = _adapters(labels.get("running_lora_adapters", ""))
        waiting_lora = _adapters(labels.get("waiting_lora_adapters", ""))
        try:
            max_lora = int(labels["max_lora"])
        except (KeyError, ValueError):
            max_lora = None
    # Sum and count of one histogram must come from the same family (new or old name).
    itl_new = bool(seen[_ITL_SUM] and seen[_ITL_COUNT])
    return EngineSample(
        running=pick(_RUNNING),
        waiting=pick(_WAITING),
        kv_cache_usage=pick(_KV, _KV_OLD),
        prefix_cache_queries=pick(_PREFIX_QUERIES),
        prefix_cache_hits=pick(_PREFIX_HITS),
        prompt_tokens=pick(_PROMPT_TOKENS),
        generation_tokens=pick(_GENERATION_TOKENS),
        ttft_sum=pick(_TTFT_SUM),
        ttft_count=pick(_TTFT_COUNT),
        itl_sum=pick(_ITL_SUM) if itl_new else pick(_TPOT_SUM),
        itl_count=pick(_ITL_COUNT) if itl_new else pick(_TPOT_COUNT),
        e2e_sum=pick(_E2E_SUM),
        e2e_count=pick(_E2E_COUNT),
        running_lora_adapters=running_lora,
        waiting_lora_adapters=waiting_lora,
        max_lora=max_lora,
    )


def _adapters(raw: str) -> tuple[str, ...]:
    return tuple(name for name in raw.split(",") if name)
