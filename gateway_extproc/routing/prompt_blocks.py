"""PromptPreparer: before ranking, the request's prompt as the engine will see it, cut into
KV blocks under the gateway's keys, for the precise prefix scorer.

Only when it can matter: the strategy scores with tokens, the model (or, for a LoRA
adapter, its base model) has a tokenizer, and some candidate's event index is trusted (its
block size known). Otherwise the request is ranked as it is (approximate matching).

Rendering and tokenizing a long prompt takes milliseconds to a few hundred (a 400 KB
chat request, the first time its text is seen), so anything but a short prompt is
prepared in a worker thread while the event loop goes on (`tokenizers` releases the GIL
while it encodes); `prepare` then returns a future. Keying stops at the first block no
pod holds: the rest of the prompt cannot change any pod's score, so a long prompt nobody
caches costs its first pieces only.

A prompt some engine holds far into would need tokenizing up to where the match ends.
Instead, with one block size and a byte-level tokenizer, its text is matched first
against the text of the blocks held (kvevents/texts.py), and tokenizing starts near the
end of that match (`_matched_by_text`), so the answer is the one tokenizing it all gives,
at the cost of a few lines of it. Too many preparations waiting, a tokenizer that will
not load, a request the chat template refuses: the request is ranked without blocks, and
the outcome is counted in `gateway_prompt_tokenizations_total`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Sequence

import structlog

from gateway_extproc import telemetry
from gateway_extproc.kvevents.index import KVBlockIndex, TextDecoder
from gateway_extproc.kvevents.keys import Adapter, chain_keys, root_key
from gateway_extproc.kvevents.texts import BlockTexts
from gateway_extproc.models.registry import Pod
from gateway_extproc.routing.base import PromptBlocks, RoutingRequest
from gateway_extproc.tokenize.catalog import TokenizerCatalog
from gateway_extproc.tokenize.tokenizer import PromptError, PromptTokens, last_cut_point

log = structlog.get_logger("gateway_extproc.routing")

# Prompts shorter than this (characters of their text) are prepared on the loop once the
# tokenizer is loaded: a thread hop costs more than tokenizing them.
INLINE_CHARS = 4096


class PromptPreparer:
    def __init__(
        self,
        tokenizers: TokenizerCatalog,
        index: KVBlockIndex,
        *,
        workers: int = 2,
        max_waiting: int = 32,
    ) -> None:
        self.tokenizers = tokenizers
        self.index = index
        self.max_waiting = max_waiting
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="tokenize"
        )
        self._waiting = 0
        index.decoder = self._decoder

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _decoder(self, model: str) -> TextDecoder | None:
        """The event side's decoder of a model's blocks: on the event loop, so only from a
        tokenizer already loaded (never a load), and only a byte-level one."""
        tokenizer = self.tokenizers.if_loaded(model) if model else None
        if tokenizer is None or tokenizer.token_bytes is None:
            return None
        return tokenizer.name, tokenizer.decode_blocks

    def prepare(
        self, request: RoutingRequest, pods: Sequence[Pod]
    ) -> RoutingRequest | asyncio.Future[RoutingRequest]:
        """`request` with its blocks, now or (a long prompt) as a future that never fails."""
        if request.document is None or not pods or not self.tokenizers.configured():
            return request
        sizes = sorted(
            {self.index.block_size(p.key) for p in pods if self.index.trusted(p.key)} - {0}
        )
        if not sizes:
            return request  # no pod's events can be used: nothing to key for
        base = pods[0].models[0] if pods[0].models else request.model
        adapter: Adapter = None if request.model == base else request.model
        names = (request.model, base) if adapter is not None else (request.model,)
        short = len(request.prompt) < INLINE_CHARS
        if short and any(self.tokenizers.loaded(name) for name in names):
            return _with(request, self._blocks(request, names, sizes, adapter))
        if self._waiting >= self.max_waiting:
            telemetry.PROMPT_TOKENIZE.labels("busy").inc()
            return request
        loop = asyncio.get_running_loop()
        self._waiting += 1
        work = loop.run_in_executor(self._executor, self._blocks, request, names, sizes, adapter)
        done: asyncio.Future[RoutingRequest] = loop.create_future()

        def finish(future: asyncio.Future[PromptBlocks | None]) -> None:
            self._waiting -= 1
            if done.cancelled():
                return
            blocks = None if future.cancelled() or future.exception() else future.result()
            done.set_result(_with(request, blocks))

        work.add_done_callback(finish)
        return done

    def _blocks(
        self,
        request: RoutingRequest,
        names: Sequence[str],
        sizes: Sequence[int],
        adapter: Adapter,
    ) -> PromptBlocks | None:
        """Runs in a worker thread (or inline): never raises."""
        try:
            tokenizer = None
            for name in names:
                tokenizer = self.tokenizers.get(name)
                if tokenizer is not None:
                    break
            if tokenizer is None:
                telemetry.PROMPT_TOKENIZE.labels("no_tokenizer").inc()
                return None
            assert request.document is not None
            prompt = tokenizer.prompt(request.endpoint, request.document)
            if prompt is None:
                telemetry.PROMPT_TOKENIZE.labels("unsupported").inc()
                return None
            blocks = prompt_blocks(prompt, sizes, adapter, self.index.holds, self.index.texts)
        except PromptError as exc:
            telemetry.PROMPT_TOKENIZE.labels("failed").inc()
            log.debug("prompt_not_tokenized", request_id=request.request_id, problem=str(exc))
            return None
        except Exception:  # a bug must cost this request its precise score, nothing more
            telemetry.PROMPT_TOKENIZE.labels("failed").inc()
            log.exception("prompt_tokenization_failed", request_id=request.request_id)
            return None
        telemetry.PROMPT_TOKENIZE.labels("done").inc()
        return blocks


def _with(request: RoutingRequest, blocks: PromptBlocks | None) -> RoutingRequest:
    if blocks is None:
        return request
    return RoutingRequest(
        model=request.model,
        request_id=request.request_id,
        prompt=request.prompt,
        session_id=request.session_id,
        user=request.user,
        document=request.document,
        endpoint=request.endpoint,
        blocks=blocks,
    )


class _Chain:
    __slots__ = ("keys", "live", "next_token", "parent")

    def __init__(self, parent: int) -> None:
        self.parent = parent
        self.keys: list[int] = []
        self.next_token = 0  # first token not yet in a keyed block
        self.live = True  # some pod may still hold the prefix keyed so far


def prompt_blocks(
    prompt: PromptTokens,
    sizes: Sequence[int],
    adapter: Adapter,
    held: Callable[[int], bool],
    texts: BlockTexts | None = None,
) -> PromptBlocks:
    """Key the prompt's blocks for each block size, reading its tokens chunk by chunk and
    stopping once, for every size, no pod holds the last block keyed (`held`); with
    `texts`, starting after the blocks its text matches when that can be proved exact."""
    root = root_key(adapter)
    if texts is not None and len(sizes) == 1 and len(texts):
        matched = _matched_by_text(prompt, sizes[0], root, texts)
        found = _keyed_after(prompt, sizes[0], held, *matched) if matched is not None else None
        telemetry.PROMPT_TEXT_MATCHES.labels("tokenized" if found is None else "matched").inc()
        if found is not None:
            return found
    chains = {size: _Chain(root) for size in sizes}
    tokens: list[int] = []
    covered = 1.0
    for ids, share in prompt.chunks():
        covered = share
        tokens.extend(ids)
        _extend(chains, tokens, held)
        if not any(chain.live for chain in chains.values()):
            break
    return _blocks_of(chains, len(tokens), covered)


def _extend(chains: dict[int, _Chain], tokens: list[int], held: Callable[[int], bool]) -> None:
    """Key the full blocks of `tokens` not keyed yet, for each size still live."""
    for size, chain in chains.items():
        if not chain.live:
            continue
        end = len(tokens) - (len(tokens) - chain.next_token) % size
        new = chain_keys(chain.parent, tokens[chain.next_token : end], size)
        if new:
            chain.keys.extend(new)
            chain.parent = new[-1]
            chain.next_token = end
            chain.live = held(new[-1])


def _blocks_of(chains: dict[int, _Chain], read: int, covered: float) -> PromptBlocks:
    # Read to the end: exact. Stopped early: the share of the text read says how long the
    # whole prompt is, which only sets the scale of every pod's score alike.
    total_tokens = read if covered >= 1.0 else int(read / max(covered, 1e-9))
    return PromptBlocks(
        keys={size: chain.keys for size, chain in chains.items()},
        totals={size: max(total_tokens // size, len(chain.keys)) for size, chain in chains.items()},
    )


def _keyed_after(
    prompt: PromptTokens,
    size: int,
    held: Callable[[int], bool],
    keys: list[int],
    start: int,
    skip: int,
) -> PromptBlocks | None:
    """`prompt_blocks` for one size, the first `keys` known: tokenizing from character
    `start`, whose first ids (`skip` bytes of text) belong to those blocks. None if no
    id ends `skip` bytes in (it cannot happen when `_matched_by_text` holds; the caller
    then tokenizes from the start)."""
    table = prompt.tokenizer.token_bytes
    assert table is not None
    chain = _Chain(keys[-1])
    chain.keys.extend(keys)
    chains = {size: chain}
    tokens: list[int] = []
    text_chars = max(len(prompt.text), 1)
    covered = 1.0
    for ids, share in prompt.suffix(start).chunks():
        covered = (start + share * (text_chars - start)) / text_chars
        if skip > 0:
            at = 0
            while skip > 0 and at < len(ids):
                skip -= len(table[ids[at]])
                at += 1
            if skip < 0:
                log.warning("prompt_text_match_inconsistent", tokenizer=prompt.tokenizer.name)
                return None
            ids = ids[at:]
        tokens.extend(ids)
        _extend(chains, tokens, held)
        if not chain.live:
            break
    return _blocks_of(chains, len(keys) * size + len(tokens), covered)


def _matched_by_text(
    prompt: PromptTokens, size: int, root: int, texts: BlockTexts
) -> tuple[list[int], int, int] | None:
    """The leading blocks of the prompt known without tokenizing them, from their text:
    (their keys, the character to tokenize from, the bytes of the ids from there that
    still belong to those blocks), or None to tokenize from the start.

    The prompt is encoded exactly in parts split at cut points (tokenize/tokenizer.py
    checks it per tokenizer: what the piece cache relies on), and so was the text of
    every held block, by its engine. If the prompt's text continues a chain of held
    blocks up to byte B, take the last cut point c whose neighbours lie before B: the
    prompt's ids up to c are those of the engine's text up to c, since the two texts are
    the same there, so every block ending by c is the prompt's own, key included. The
    ids after the last such block are the ids of the text from the cut point before
    that block's end, minus those ending by it; past it, keying goes on as usual."""
    if not prompt.plain() or not prompt.tokenizer.bytes_comparable(prompt.text):
        return None
    if prompt.tokenizer.mostly_cached(prompt.text):
        return None  # tokenized before: its pieces' ids are cheaper than a walk
    text = prompt.text
    data = text.encode("utf-8")
    chain = texts.walk(prompt.tokenizer.name, root, size, data)
    if not chain:
        return None
    matched_chars = len(data[: chain[-1][1]].decode("utf-8", "ignore"))
    cut = last_cut_point(text, matched_chars)
    cut_byte = len(text[:cut].encode("utf-8"))
    kept = 0
    while kept < len(chain) and chain[kept][1] <= cut_byte:
        kept += 1
    if kept == 0:
        return None
    end_byte = chain[kept - 1][1]
    end_char = len(data[:end_byte].decode("utf-8", "ignore"))
    start = last_cut_point(text, end_char + 1)  # at or before the block's end
    start_byte = len(text[:start].encode("utf-8"))
    return [key for key, _ in chain[:kept]], start, end_byte - start_byte
