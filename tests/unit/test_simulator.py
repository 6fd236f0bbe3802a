"""The simulated engine over real HTTP: OpenAI shapes, streaming, errors, metrics that
follow the engine's state, prefix caching that changes TTFT, and runtime faults."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import math
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway_extproc.devtools.simulator import SimulatorConfig, running_simulator
from gateway_extproc.devtools.simulator import app as simulator_app

FAST = {"ttft_ms": 2.0, "itl_ms": 1.0, "prefill_us_per_token": 1.0}


@dataclass
class Pod:
    port: int
    http: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def post(self, path: str, body: Any) -> tuple[int, dict[str, Any], dict[str, str]]:
        data = body if isinstance(body, bytes) else orjson.dumps(body)
        async with self.http.post(self.url + path, data=data) as reply:
            return reply.status, orjson.loads(await reply.read()), dict(reply.headers)

    async def get_json(self, path: str) -> Any:
        async with self.http.get(self.url + path) as reply:
            assert reply.status == 200
            return orjson.loads(await reply.read())

    async def metrics(self) -> dict[str, list[Any]]:
        """Samples by metric family name."""
        async with self.http.get(self.url + "/metrics") as reply:
            assert reply.status == 200
            body = await reply.text()
        return {family.name: family.samples for family in text_string_to_metric_families(body)}

    async def value(self, sample_name: str) -> float:
        """The value of the (single-series) sample called `sample_name`."""
        families = await self.metrics()
        values = [s.value for f in families.values() for s in f if s.name == sample_name]
        assert len(values) == 1, (sample_name, values)
        return values[0]

    async def stream(self, path: str, body: dict[str, Any]) -> tuple[list[Any], float]:
        """SSE events (decoded JSON, or the string "[DONE]") and seconds to the first one."""
        started = time.perf_counter()
        first = 0.0
        events: list[Any] = []
        async with self.http.post(self.url + path, json={**body, "stream": True}) as reply:
            assert reply.status == 200
            assert reply.headers["Content-Type"].startswith("text/event-stream")
            async for line in reply.content:
                if not line.startswith(b"data: "):
                    assert line == b"\n"
                    continue
                if not events:
                    first = time.perf_counter() - started
                payload = line[len(b"data: ") :].strip()
                events.append("[DONE]" if payload == b"[DONE]" else orjson.loads(payload))
        return events, first


@contextlib.asynccontextmanager
async def simulator(**overrides: Any) -> AsyncIterator[Pod]:
    settings: dict[str, Any] = {
        "models": ("m1",),
        "loras": ("lora-a",),
        "port": 0,
        "max_tokens_default": 4,
        **FAST,
    }
    settings.update(overrides)
    config = SimulatorConfig(**settings)
    async with running_simulator(config) as port, aiohttp.ClientSession() as http:
        yield Pod(port, http)


def chat(content: str, model: str = "m1", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def long_prompt(words: int, salt: str = "") -> str:
    return " ".join(f"w{salt}{index}" for index in range(words))


async def test_chat_completion_shape_names_the_pod():
    async with simulator() as pod:
        status, body, headers = await pod.post(
            "/v1/chat/completions", chat("hello there", max_completion_tokens=6)
        )
        assert status == 200
        assert headers["x-simulator-pod"] == f"127.0.0.1:{pod.port}"
        assert body["object"] == "chat.completion"
        assert body["id"].startswith("chatcmpl-")
        assert body["model"] == "m1"
        assert isinstance(body["created"], int)
        (choice,) = body["choices"]
        assert choice["message"]["role"] == "assistant"
        assert choice["message"]["content"].startswith(f"sim-{pod.port}: ")
        assert choice["finish_reason"] == "length"
        usage = body["usage"]
        assert usage["completion_tokens"] == 6
        assert usage["prompt_tokens"] > 2
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

        # Deterministic: the same prompt gets the same reply; max_tokens unset -> default.
        _, again, _ = await pod.post("/v1/chat/completions", chat("hello there", max_tokens=6))
        assert again["choices"][0]["message"] == choice["message"]
        _, default, _ = await pod.post("/v1/chat/completions", chat("hello there"))
        assert default["usage"]["completion_tokens"] == 4


async def test_completions_accept_text_and_token_ids():
    async with simulator() as pod:
        status, body, _ = await pod.post(
            "/v1/completions", {"model": "lora-a", "prompt": "one two three", "max_tokens": 3}
        )
        assert status == 200
        assert body["object"] == "text_completion"
        assert body["id"].startswith("cmpl-")
        assert body["model"] == "lora-a"
        assert body["choices"][0]["text"].startswith(f"sim-{pod.port}:")
        assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 6, "completion_tokens": 3}

        status, body, _ = await pod.post(
            "/v1/completions", {"model": "m1", "prompt": [[1, 2, 3, 4, 5]], "max_tokens": 1}
        )
        assert status == 200
        assert body["choices"][0]["text"] == f"sim-{pod.port}:"
        assert body["usage"]["prompt_tokens"] == 5


async def test_embeddings_one_unit_vector_per_input():
    async with simulator() as pod:
        request = {"model": "m1", "input": ["a b c", "d"], "dimensions": 8}
        status, body, _ = await pod.post("/v1/embeddings", request)
        assert status == 200
        assert body["object"] == "list"
        assert [item["index"] for item in body["data"]] == [0, 1]
        for item in body["data"]:
            assert item["object"] == "embedding"
            assert len(item["embedding"]) == 8
            assert math.isclose(math.hypot(*item["embedding"]), 1.0, rel_tol=1e-9)
        assert body["usage"]["prompt_tokens"] == 4
        assert body["usage"]["total_tokens"] == 4

        request = {"model": "m1", "input": "d", "dimensions": 8, "encoding_format": "base64"}
        _, encoded, _ = await pod.post("/v1/embeddings", request)
        raw = base64.b64decode(encoded["data"][0]["embedding"])
        floats = struct.unpack("<8f", raw)
        assert floats == pytest.approx(body["data"][1]["embedding"], rel=1e-6)


async def test_chat_stream_carries_usage_only_when_asked():
    async with simulator() as pod:
        _, plain, _ = await pod.post("/v1/chat/completions", chat("stream me", max_tokens=5))
        events, _ = await pod.stream(
            "/v1/chat/completions",
            chat("stream me", max_tokens=5, stream_options={"include_usage": True}),
        )
        assert events[-1] == "[DONE]"
        *chunks, usage_chunk, _ = events
        assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        token_chunks = chunks[1:]
        assert len(token_chunks) == 5
        assert [c["choices"][0]["finish_reason"] for c in token_chunks] == [None] * 4 + ["length"]
        content = "".join(c["choices"][0]["delta"]["content"] for c in token_chunks)
        assert content == plain["choices"][0]["message"]["content"]
        assert usage_chunk["choices"] == []
        assert usage_chunk["usage"] == plain["usage"]

        events, _ = await pod.stream("/v1/chat/completions", chat("stream me", max_tokens=5))
        assert events[-1] == "[DONE]"
        assert all("usage" not in event for event in events[:-1])
        assert len(events) == 1 + 5 + 1


async def test_completions_stream():
    async with simulator() as pod:
        request = {
            "model": "m1",
            "prompt": "go",
            "max_tokens": 3,
            "stream_options": {"include_usage": True},
        }
        events, _ = await pod.stream("/v1/completions", request)
        *chunks, usage_chunk, done = events
        assert done == "[DONE]"
        assert [chunk["object"] for chunk in chunks] == ["text_completion"] * 3
        assert chunks[0]["choices"][0]["text"] == f"sim-{pod.port}:"
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert usage_chunk["usage"] == {
            "prompt_tokens": 1,
            "total_tokens": 4,
            "completion_tokens": 3,
        }


async def test_models_list_base_models_and_adapters():
    async with simulator(models=("m1", "m1-alias"), loras=("lora-a", "lora-b")) as pod:
        listing = await pod.get_json("/v1/models")
        assert listing["object"] == "list"
        by_id = {model["id"]: model for model in listing["data"]}
        assert set(by_id) == {"m1", "m1-alias", "lora-a", "lora-b"}
        for model in listing["data"]:
            assert model["object"] == "model"
            assert {"created", "owned_by", "root", "parent"} <= set(model)
        assert by_id["m1"]["parent"] is None
        assert by_id["lora-b"]["parent"] == "m1"
        status, _, _ = await pod.post("/v1/chat/completions", chat("hi", model="m1-alias"))
        assert status == 200
        async with pod.http.get(pod.url + "/health") as reply:
            assert reply.status == 200


BAD_REQUESTS = [
    ("/v1/chat/completions", b"{not json", 400, "invalid_json"),
    ("/v1/chat/completions", b"", 400, "invalid_json"),
    ("/v1/chat/completions", b"[1, 2]", 400, "invalid_json"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}]}', 400,
     "missing_required_parameter"),
    ("/v1/chat/completions", b'{"model": "m1"}', 400, "missing_required_parameter"),
    ("/v1/chat/completions", b'{"model": "m1", "messages": "hi"}', 400, "invalid_value"),
    ("/v1/chat/completions", b'{"model": "m1", "messages": [{"content": "x"}]}', 400,
     "invalid_value"),
    ("/v1/chat/completions", b'{"model": 7, "messages": [{"role": "user"}]}', 400,
     "invalid_value"),
    ("/v1/chat/completions",
     b'{"model": "m1", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', 400,
     "invalid_value"),
    ("/v1/chat/completions",
     b'{"model": "m1", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}', 400,
     "invalid_value"),
    ("/v1/completions", b'{"model": "m1", "prompt": ""}', 400, "invalid_value"),
    ("/v1/completions", b'{"model": "m1", "prompt": "x", "n": 2}', 400, "invalid_value"),
    ("/v1/completions", b'{"model": "m1", "prompt": [1, "x"]}', 400, "invalid_value"),
    ("/v1/completions", b'{"model": "m1", "prompt": "x", "max_tokens": 100000}', 400,
     "context_length_exceeded"),
    ("/v1/embeddings", b'{"model": "m1", "input": []}', 400, "invalid_value"),
    ("/v1/embeddings", b'{"model": "m1", "input": "x", "dimensions": -1}', 400, "invalid_value"),
    ("/v1/chat/completions", b'{"model": "nope", "messages": [{"role": "user"}]}', 404,
     "model_not_found"),
    ("/v1/embeddings", b'{"model": "nope", "input": "x"}', 404, "model_not_found"),
    ("/v1/nowhere", b"{}", 404, "not_found"),
]  # fmt: skip


async def test_bad_requests_get_openai_errors():
    async with simulator() as pod:
        for path, body, status, code in BAD_REQUESTS:
            got_status, got, _ = await pod.post(path, body)
            assert (got_status, got["error"]["code"]) == (status, code), (path, body, got)
            assert set(got["error"]) == {"message", "type", "param", "code"}
            assert "Traceback" not in got["error"]["message"]
        # The server survived all of it.
        status, _, _ = await pod.post("/v1/chat/completions", chat("still alive"))
        assert status == 200


async def test_metrics_have_vllm_names_and_the_model_label():
    async with simulator(kv_blocks=64, block_size=8) as pod:
        await pod.post("/v1/chat/completions", chat("warm up", max_tokens=3))
        families = await pod.metrics()
        expected = {
            "vllm:num_requests_running",
            "vllm:num_requests_waiting",
            "vllm:kv_cache_usage_perc",
            "vllm:prefix_cache_queries",
            "vllm:prefix_cache_hits",
            "vllm:time_to_first_token_seconds",
            "vllm:inter_token_latency_seconds",
            "vllm:e2e_request_latency_seconds",
            "vllm:prompt_tokens",
            "vllm:generation_tokens",
            "vllm:lora_requests_info",
            "vllm:cache_config_info",
        }
        assert expected <= set(families)
        for samples in families.values():
            assert all(sample.labels["model_name"] == "m1" for sample in samples)
        names = {sample.name for samples in families.values() for sample in samples}
        assert {
            "vllm:prefix_cache_queries_total",
            "vllm:generation_tokens_total",
            "vllm:time_to_first_token_seconds_bucket",
            "vllm:time_to_first_token_seconds_sum",
            "vllm:e2e_request_latency_seconds_count",
        } <= names
        (info,) = families["vllm:cache_config_info"]
        assert info.labels["block_size"] == "8"
        assert info.labels["num_gpu_blocks"] == "64"
        assert await pod.value("vllm:generation_tokens_total") == 3
        assert await pod.value("vllm:time_to_first_token_seconds_count") == 1
        assert await pod.value("vllm:inter_token_latency_seconds_count") == 2


async def test_running_and_waiting_follow_the_load():
    async with simulator(max_num_seqs=1, itl_ms=10.0) as pod:
        requests = [
            asyncio.create_task(
                pod.post("/v1/chat/completions", chat(f"job {index}", "lora-a", max_tokens=20))
            )
            for index in range(3)
        ]
        seen: set[tuple[float, float]] = set()
        lora_running: set[str] = set()
        kv_in_use = 0.0
        while not all(task.done() for task in requests):
            families = await pod.metrics()
            running = families["vllm:num_requests_running"][0].value
            waiting = families["vllm:num_requests_waiting"][0].value
            seen.add((running, waiting))
            kv_in_use = max(kv_in_use, families["vllm:kv_cache_usage_perc"][0].value)
            newest = max(families["vllm:lora_requests_info"], key=lambda sample: sample.value)
            lora_running.add(newest.labels["running_lora_adapters"])
            await asyncio.sleep(0.02)
        assert all(status == 200 for status, _, _ in await asyncio.gather(*requests))
        assert (1.0, 2.0) in seen and (1.0, 1.0) in seen
        assert all(running <= 1 for running, _ in seen)
        assert 0 < kv_in_use <= 1
        assert "lora-a" in lora_running
        families = await pod.metrics()
        assert families["vllm:num_requests_running"][0].value == 0
        assert families["vllm:num_requests_waiting"][0].value == 0
        # Finished requests leave their blocks cached but not in use.
        assert families["vllm:kv_cache_usage_perc"][0].value == 0


async def test_repeated_long_prompt_hits_the_prefix_cache_on_that_pod_only():
    slow_prefill = {"prefill_us_per_token": 200.0, "ttft_ms": 5.0}
    prompt = long_prompt(1500)  # ~0.3 s of prefill when nothing is cached
    request = chat(prompt, max_tokens=2)
    async with simulator(**slow_prefill) as warm, simulator(**slow_prefill) as cold:
        _, cold_first = await warm.stream("/v1/chat/completions", request)
        hits_before = await warm.value("vllm:prefix_cache_hits_total")
        _, warm_again = await warm.stream("/v1/chat/completions", request)
        hits = await warm.value("vllm:prefix_cache_hits_total") - hits_before
        queries = await warm.value("vllm:prefix_cache_queries_total")
        _, other_pod = await cold.stream("/v1/chat/completions", request)

    assert hits_before == 0
    assert hits >= 1500 - 16  # all but the last (partial or recomputed) block
    assert queries >= 2 * 1500
    assert warm_again < cold_first / 3
    assert other_pod > warm_again * 3


@pytest.mark.parametrize("serial", [False, True])
async def test_serial_prefill_makes_a_short_prompt_wait_for_a_long_one(serial: bool):
    """A long prompt is admitted just before a short one: with serial prefill the short
    one's first token waits for the long prefill; without, it comes first."""
    async with simulator(prefill_us_per_token=200.0, ttft_ms=1.0, serial_prefill=serial) as pod:
        order: list[str] = []

        async def first_token(name: str, words: int) -> None:
            await pod.stream("/v1/chat/completions", chat(long_prompt(words, name), max_tokens=1))
            order.append(name)

        long = asyncio.create_task(first_token("long", 3000))  # ~0.6 s of prefill
        for _ in range(500):  # until it is admitted and prefilling (bounded)
            if await pod.value("vllm:num_requests_running") == 1:
                break
            await asyncio.sleep(0.002)
        await first_token("short", 5)
        await long
    assert order == (["long", "short"] if serial else ["short", "long"])


async def test_next_chat_turn_hits_the_generated_reply():
    async with simulator(block_size=4) as pod:
        history = [{"role": "user", "content": long_prompt(40)}]
        _, first, _ = await pod.post(
            "/v1/chat/completions", {"model": "m1", "messages": history, "max_tokens": 12}
        )
        reply = first["choices"][0]["message"]["content"]
        history += [{"role": "assistant", "content": reply}, {"role": "user", "content": "more"}]
        before = await pod.value("vllm:prefix_cache_hits_total")
        _, second, _ = await pod.post(
            "/v1/chat/completions", {"model": "m1", "messages": history, "max_tokens": 1}
        )
        hits = await pod.value("vllm:prefix_cache_hits_total") - before
        # Everything up to the end of the reply was cached: prompt and generated blocks.
        cached_span = first["usage"]["total_tokens"]
        assert hits >= cached_span - 4
        assert second["usage"]["prompt_tokens"] > cached_span


async def test_client_that_hangs_up_frees_its_slot():
    async with simulator(max_num_seqs=1, itl_ms=20.0) as pod:
        async with pod.http.post(
            pod.url + "/v1/chat/completions", json=chat("long", max_tokens=500, stream=True)
        ) as reply:
            await reply.content.readline()
            assert await pod.value("vllm:num_requests_running") == 1
        # Without the abandoned stream's slot back this would wait ~10 s.
        started = time.perf_counter()
        status, _, _ = await pod.post("/v1/chat/completions", chat("next", max_tokens=2))
        assert status == 200
        assert time.perf_counter() - started < 1.0
        assert await pod.value("vllm:num_requests_running") == 0


async def test_fault_modes_switch_at_runtime():
    async with simulator(ttft_ms=20.0) as pod:
        faults = await pod.get_json("/admin/faults")
        assert faults == {"metrics": "ok", "slow_factor": 1.0, "fail_requests": 0.0}

        status, faults, _ = await pod.post("/admin/faults", {"metrics": "error"})
        assert status == 200 and faults["metrics"] == "error"
        async with pod.http.get(pod.url + "/metrics") as reply:
            assert reply.status == 500

        await pod.post("/admin/faults", {"metrics": "garbage"})
        async with pod.http.get(pod.url + "/metrics") as reply:
            assert reply.status == 200
            garbage = await reply.text()
        with pytest.raises(ValueError):
            list(text_string_to_metric_families(garbage))

        await pod.post("/admin/faults", {"metrics": "hang"})
        with pytest.raises(asyncio.TimeoutError):
            await pod.http.get(pod.url + "/metrics", timeout=aiohttp.ClientTimeout(total=0.3))

        # Partial updates keep the other settings.
        status, faults, _ = await pod.post("/admin/faults", {"fail_requests": 1.0})
        assert faults == {"metrics": "hang", "slow_factor": 1.0, "fail_requests": 1.0}
        status, body, _ = await pod.post("/v1/chat/completions", chat("x"))
        assert status == 500
        assert body["error"]["code"] == "simulated_failure"

        for bad in ({"metrics": "sometimes"}, {"slow_factor": 0}, {"fail_requests": 2},
                    {"nope": 1}, [1]):  # fmt: skip
            status, body, _ = await pod.post("/admin/faults", bad)
            assert status == 400 and "error" in body

        status, faults, _ = await pod.post("/admin/faults/reset", b"")
        assert faults == {"metrics": "ok", "slow_factor": 1.0, "fail_requests": 0.0}
        assert (await pod.metrics())["vllm:num_requests_running"][0].value == 0

        _, normal = await pod.stream("/v1/chat/completions", chat("timing", max_tokens=1))
        await pod.post("/admin/faults", {"slow_factor": 8.0})
        _, slowed = await pod.stream("/v1/chat/completions", chat("timing", max_tokens=1))
        assert slowed >= 0.16 > normal


def test_cli_flags_build_the_config():
    import argparse

    parser = argparse.ArgumentParser()
    simulator_app.add_arguments(parser)
    args = parser.parse_args(["--model", "base", "--model", "alias", "--lora", "a", "--port", "0"])
    config = simulator_app.config_from_args(args)
    assert config == SimulatorConfig(models=("base", "alias"), loras=("a",), port=0)
    assert (config.ttft_ms, config.itl_ms, config.max_num_seqs) == (20.0, 5.0, 256)
    assert (config.kv_blocks, config.block_size, config.max_tokens_default) == (2048, 16, 16)
    assert config.host == "127.0.0.1"
    assert not config.serial_prefill
    serial = parser.parse_args(["--model", "m", "--serial-prefill"])
    assert simulator_app.config_from_args(serial).serial_prefill
    with pytest.raises(SystemExit):
        parser.parse_args([])  # --model is required
    bad = parser.parse_args(["--model", "m", "--lora", "m"])
    assert simulator_app.run(bad) == 2
