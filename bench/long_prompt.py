"""Benchmark 7: what a 400 KB chat request costs the processor with precise prefix routing.

In process, the way the processor handles a request: an ext_proc Session fed the request's
headers and body frames (body parsing, rendering with the chat template, tokenizing with
the model's tokenizer, keying the KV blocks, ranking, the routing answer), with the
tokenization in the worker thread the processor uses. CPU is `time.process_time()` over
all threads, per request; the event loop's longest stall while the request is prepared is
measured by a ticker task. gRPC and Envoy are left out (the overhead section has them).

Cases, each over several requests with a fresh document per request unless said:

- first sight, no pod holds it: keying stops at the first block nobody holds;
- first sight, one pod's engine holds it all: the prompt's text is matched against the
  text of the blocks held (decoded from the events' token ids when they arrived), and
  only the last lines of the match and what follows are tokenized;
- first sight, one pod's engine holds its first 30%: the same, then keying stops at most
  one group of pieces (64 KiB of text) past the match;
- both first-sight cases again, interleaved request by request, as the processor did
  before 2026-12-08 (no text view: tokenized from the start up to where the match ends):
  the same-run comparison for that change;
- repeated document: the same 400 KB document with a new question each time (a RAG
  pattern, or a conversation's history), matched by text each time: its first request
  was matched by text too, so its pieces were never tokenized (a prompt whose pieces
  are cached is keyed from them instead);
- approximate `prefix-cache` on the same requests, for comparison.

The tokenizer is the repository's test tokenizer (tests/data/tiny-tokenizer, a byte-level
BPE with 2,048 tokens): it cuts text into more tokens than a production vocabulary
(about 3.3 characters per token here against about 4 for Llama 3 on English), so the
tokenizing cases are if anything pessimistic.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import statistics
import time
from collections.abc import Iterator
from typing import Any

import orjson

from bench.common import REPO_ROOT, RunMode, Section, Target, fmt, table
from gateway_extproc.extproc.session import Session, SessionConfig
from gateway_extproc.kvevents.index import KVBlockIndex
from gateway_extproc.kvevents.texts import BlockTexts
from gateway_extproc.kvevents.wire import BlockStored
from gateway_extproc.models.registry import ModelRegistry, Pod
from gateway_extproc.routing.catalog import build_catalog
from gateway_extproc.routing.inflight import InFlightCounter
from gateway_extproc.routing.prompt_blocks import PromptPreparer
from gateway_extproc.routing.router import Router
from gateway_extproc.tokenize.catalog import TokenizerCatalog
from gateway_extproc.tokenize.tokenizer import ModelTokenizer
from tests import frames

BEFORE = "as before (no text view)"
NAME = "long-prompt"
TITLE = "7. Long prompts: processor CPU for a 400 KB chat request"
TOKENIZER = REPO_ROOT / "tests" / "data" / "tiny-tokenizer"
BODY_BYTES = 400_000
PODS = 8
BLOCK_SIZE = 16
TARGET_MS = 50.0
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "policy",
    "customer",
    "support",
    "document",
    "question",
    "answer",
    "please",
    "explain",
    "summarise",
    "following",
    "text",
    "sentence",
    "translate",
    "code",
    "review",
]


def document(rng: random.Random, size: int) -> str:
    """Text of `size` characters: common words and made-up ones (names, codes), in lines."""
    lines = []
    total = 0
    while total < size:
        words = [
            rng.choice(WORDS)
            if rng.random() < 0.75
            else "".join(
                rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 10))
            )
            for _ in range(rng.randint(8, 24))
        ]
        line = " ".join(words) + rng.choice([".", ",", ":", "?"]) + "\n"
        lines.append(line)
        total += len(line)
    return "".join(lines)[:size]


def chat_body(doc: str, question: str) -> bytes:
    return orjson.dumps(
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "Answer from the document.\n" + doc},
                {"role": "user", "content": question},
            ],
        }
    )


class Processor:
    """The routing side of the processor: registry, index, tokenizers, router."""

    def __init__(self) -> None:
        self.registry = ModelRegistry()
        self.pods = [Pod(f"p{i}", f"10.7.0.{i}:8000", ("m",)) for i in range(PODS)]
        self.registry.replace_all(self.pods)
        self.index = KVBlockIndex()
        for pod in self.pods:
            self.index.track(pod.key, model="m")  # as the event subscriber does
            self.index.set_trusted(pod.key, True)
            self.index.apply(pod.key, [BlockStored((0,), None, tuple(range(16)), BLOCK_SIZE)])
        self.preparer = PromptPreparer(TokenizerCatalog({"m": str(TOKENIZER)}), self.index)
        inflight = InFlightCounter()
        catalog = build_catalog(
            None,
            inflight,
            rng=random.Random(1),
            registry=self.registry,
            shared={KVBlockIndex: self.index},
        )
        self.router = Router(self.registry, catalog, "random", inflight, preparer=self.preparer)
        self.config = SessionConfig(max_body_bytes=8 * 1024 * 1024, access_log=False)
        self.tokenizer = ModelTokenizer.load(TOKENIZER)  # for what engines report
        self._next_hash = 1  # engine block hashes, unique over the run

    @contextlib.contextmanager
    def as_before(self, before: bool) -> Iterator[None]:
        """With `before`, match as the processor did before 2026-12-08: the index's text
        view looks empty, so the prompt is tokenized from its start."""
        if not before:
            yield
            return
        texts = self.index.texts
        self.index.texts = BlockTexts()
        try:
            yield
        finally:
            self.index.texts = texts

    def engine_holds(
        self, pod: str, body: bytes, share: float = 1.0, *, texts: bool = True
    ) -> float:
        """The pod's engine reports holding the first `share` of the request's blocks;
        the CPU ms the index took to file them (keys, and unless not `texts`, the text of
        each block)."""
        ids = self.tokenizer.prompt_ids("/v1/chat/completions", orjson.loads(body))
        assert ids is not None
        n = int(len(ids) * share) // BLOCK_SIZE
        self._next_hash += n
        hashes = tuple(range(self._next_hash - n, self._next_hash))
        decoder = self.index.decoder
        if not texts:
            self.index.decoder = None
        started = time.process_time()
        self.index.apply(pod, [BlockStored(hashes, None, tuple(ids[: n * BLOCK_SIZE]), BLOCK_SIZE)])
        spent = (time.process_time() - started) * 1000
        self.index.decoder = decoder
        return spent

    async def handle(self, body: bytes, strategy: str) -> str:
        """One request through a Session, as the servicer drives it; the chosen pod."""
        session = Session(self.router, self.config)
        headers = {"routing-strategy": strategy, "content-length": str(len(body))}
        session.handle(frames.request_headers(headers=headers))
        answers = session.handle(frames.request_body(body))
        if session.preparing is not None:
            await asyncio.wait((session.preparing,))
            answers = session.resume()
        address = frames.set_headers(answers[0])["target-pod"]
        session.close()
        return next(p.key for p in self.pods if p.address == address)


async def _measure(
    processor: Processor, bodies: list[bytes], strategy: str
) -> tuple[list[float], float, list[str]]:
    """CPU ms per request, the longest event-loop stall (ms) and the pods picked."""
    loop = asyncio.get_running_loop()
    stall = 0.0
    stop = False

    async def ticker() -> None:
        nonlocal stall
        last = loop.time()
        while not stop:
            await asyncio.sleep(0.001)
            now = loop.time()
            stall = max(stall, (now - last) * 1000)
            last = now

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    cpu: list[float] = []
    picks: list[str] = []
    for body in bodies:
        started = time.process_time()
        picks.append(await processor.handle(body, strategy))
        cpu.append((time.process_time() - started) * 1000)
    stop = True
    await tick
    return cpu, stall, picks


async def _run(mode: RunMode) -> tuple[list[list[Any]], dict[str, Any]]:
    count = mode.pick(12, 3)
    rng = random.Random(7)
    processor = Processor()
    warm = chat_body(document(rng, 20_000), "warm-up")
    await processor.handle(warm, "precise-prefix-cache")  # loads the tokenizer
    rows: list[list[Any]] = []
    data: dict[str, Any] = {}

    def add(case: str, strategy: str, cpu: list[float], stall: float, note: str) -> None:
        median = statistics.median(cpu)
        rows.append([case, f"`{strategy}`", fmt(median, 1), fmt(max(cpu), 1), fmt(stall, 1), note])
        data[f"{case} ({strategy})"] = {
            "cpu_ms_median": median,
            "cpu_ms_max": max(cpu),
            "loop_stall_ms": stall,
        }

    fresh = [chat_body(document(rng, BODY_BYTES), f"question {i}") for i in range(count)]
    cpu, stall, _ = await _measure(processor, fresh, "precise-prefix-cache")
    add("first sight, no pod holds it", "precise-prefix-cache", cpu, stall, "keying stops early")

    # CPU ms the index takes to file a whole document's blocks: with their text, keys only.
    filing: dict[bool, list[float]] = {True: [], False: []}

    async def first_sight(share: float) -> dict[bool, tuple[list[float], float, int]]:
        """Fresh documents whose first `share` of blocks one engine holds, matched as
        now and as before (`before`: True) in turn: CPU per request, longest loop stall,
        requests routed to the holder."""
        out: dict[bool, tuple[list[float], float, int]] = {}
        for i in range(count):
            for before in (False, True) if i % 2 == 0 else (True, False):
                body = chat_body(document(rng, BODY_BYTES), f"question {i}")
                pod = f"p{i % PODS}"
                processor.engine_holds(pod, body, share=share)
                with processor.as_before(before):
                    cpu, stall, picks = await _measure(processor, [body], "precise-prefix-cache")
                cpus, stalls, right = out.get(before, ([], 0.0, 0))
                out[before] = (cpus + cpu, max(stalls, stall), right + (picks == [pod]))
        return out

    for share, case, note in (
        (1.0, "first sight, one engine holds it all", "matched by text, the last lines tokenized"),
        (
            0.3,
            "first sight, one engine holds its first 30%",
            "matched by text, then at most one group of pieces past the match",
        ),
    ):
        for before, (cpu, stall, right) in sorted((await first_sight(share)).items()):
            label = f"{case}, {BEFORE}" if before else case
            shown = "tokenized from the start, for comparison" if before else note
            add(
                label,
                "precise-prefix-cache",
                cpu,
                stall,
                f"{shown}; routed to the holder {right}/{count}",
            )

    for i in range(count):  # the event side: filing a document's blocks, in turn
        for with_text in (True, False) if i % 2 == 0 else (False, True):
            body = chat_body(document(rng, BODY_BYTES), f"filed {i}")
            filed = processor.engine_holds(f"p{i % PODS}", body, texts=with_text)
            filing[with_text].append(filed)

    shared = document(rng, BODY_BYTES)
    processor.engine_holds("p3", chat_body(shared, "first"))
    await processor.handle(chat_body(shared, "seen once"), "precise-prefix-cache")
    repeated = [chat_body(shared, f"new question {i}") for i in range(count)]
    cpu, stall, picks = await _measure(processor, repeated, "precise-prefix-cache")
    add(
        "repeated document, new question",
        "precise-prefix-cache",
        cpu,
        stall,
        "matched by text again: the document was never tokenized whole; "
        f"routed to the holder {picks.count('p3')}/{len(picks)}",
    )

    cpu, stall, _ = await _measure(processor, repeated, "prefix-cache")
    add(
        "repeated document, new question", "prefix-cache", cpu, stall, "approximate, for comparison"
    )
    processor.preparer.close()
    data["tokens"] = len(
        processor.tokenizer.prompt_ids("/v1/chat/completions", orjson.loads(fresh[0])) or []
    )
    data["body_bytes"] = len(fresh[0])
    data["filing_ms_median"] = statistics.median(filing[True])
    data["filing_keys_only_ms_median"] = statistics.median(filing[False])
    texts = processor.index.texts
    data["text_blocks"] = len(texts)
    data["text_bytes_estimate"] = texts.memory_estimate()
    return rows, data


def run(mode: RunMode) -> Section:
    rows, data = asyncio.run(_run(mode))
    whole_case = "first sight, one engine holds it all"
    whole = data[f"{whole_case} (precise-prefix-cache)"]["cpu_ms_median"]
    before = data[f"{whole_case}, {BEFORE} (precise-prefix-cache)"]["cpu_ms_median"]
    body = (
        f"One chat request of {data['body_bytes']:,} bytes ({data['tokens']:,} tokens with the "
        f"test tokenizer), {PODS} pods, engine block size {BLOCK_SIZE}. CPU is the process's "
        "(every thread) per request, median and worst over the requests of a case. The loop "
        "stall is the longest gap between the ticks of a 1 ms timer task on the event loop while "
        "a case ran; the approximate row, which tokenizes nothing, shows this shared machine's "
        "own floor. 'First sight, one engine holds it all': the engine's cache was filled by "
        "requests this processor did not tokenize. The prompt's text is matched block by "
        "block against the text of the blocks the engines hold (decoded from the events' "
        "token ids when they arrived), and tokenizing starts at the last line break before "
        "the end of the match; the answer is the one tokenizing it all gives "
        "(tests/unit/test_prompt_text_match.py checks it). As before, tokenizing from the "
        f"start, it costs x{before / whole:.1f} the CPU in this run ({before:.1f} ms). "
        "The cost moves to the event side, in part: filing a 400 KB document's blocks took "
        f"{data['filing_ms_median']:.1f} ms of CPU on the event loop with their text against "
        f"{data['filing_keys_only_ms_median']:.1f} ms for the keys only (medians, in turn); "
        f"at the end of the run the text view held {data['text_blocks']:,} blocks, about "
        f"{data['text_bytes_estimate'] / 2**20:.1f} MiB "
        f"({data['text_bytes_estimate'] / max(data['text_blocks'], 1):.0f} bytes a block). "
        "The 'as before' rows take turns with the rows above them, request by request, so "
        "they share this machine's noise; compare them with each other rather than with "
        "other runs, since absolute CPU per request grows with the machine's load.\n\n"
        + table(
            ["case", "strategy", "CPU ms (median)", "CPU ms (max)", "loop stall ms", "note"], rows
        )
    )
    section = Section(NAME, TITLE, body=body, data=data)
    for case in ("first sight, no pod holds it", "repeated document, new question"):
        median = data[f"{case} (precise-prefix-cache)"]["cpu_ms_median"]
        section.targets.append(
            Target(
                f"400 KB chat request, processor CPU, {case}",
                f"<= {TARGET_MS:.0f} ms",
                f"{median:.1f} ms",
                median <= TARGET_MS,
            )
        )
    section.targets.append(
        Target(
            "400 KB chat request, processor CPU, first sight and cached on an engine",
            f"<= {TARGET_MS:.0f} ms",
            f"{whole:.1f} ms (matched by text, the last lines tokenized; {before:.1f} ms "
            "tokenized from the start, same run)",
            whole <= TARGET_MS,
        )
    )
    return section
