"""Deterministic stand-ins for the model: tokenizer, chat template, sampler and embedder.

None of this is a real model; it only has to be stable (same input, same tokens, same
reply) so that prefix caching, token accounting and tests behave the same on every run.
A token is a word, a run of digits/letters or one punctuation mark; the pod tag that
starts every reply (`sim-8001:`) is one token so a reply re-tokenises to the same ids
when a later chat turn sends it back as part of the prompt.
"""

from __future__ import annotations

import array
import base64
import math
import random
import re
import sys
import zlib
from collections.abc import Sequence
from functools import lru_cache

_TOKEN_RE = re.compile(r"sim-\d+:|\w+|[^\w\s]")

# A small fixed vocabulary: replies read as words, and every word is one token.
_VOCABULARY = """
the quick brown fox jumps over lazy dog a simulated engine answers every request with
tokens paced by its clock while gateway routes traffic between pods that share nothing
but prefix cache of blocks kept warm repeated prompts and long conversations about
queues latency batches adapters models metrics faults
"""
_WORDS = tuple(_VOCABULARY.split())


@lru_cache(maxsize=65536)
def token_id(token: str) -> int:
    # crc32 rather than hash(): str hashes are salted per process, and ids should be
    # the same in every simulator so their caches agree on what a block holds.
    return zlib.crc32(token.encode())


def encode(text: str) -> list[int]:
    return [token_id(token) for token in _TOKEN_RE.findall(text)]


def render_chat(messages: Sequence[tuple[str, str]]) -> str:
    """A chat template in the spirit of real ones: each turn tagged by role, then the
    assistant tag that asks for a reply (so a conversation's turns stay a shared prefix)."""
    parts = [f"<|{role}|>\n{content}\n" for role, content in messages]
    parts.append("<|assistant|>\n")
    return "".join(parts)


def reply_tokens(pod_tag: str, prompt_ids: Sequence[int], count: int, seed: int) -> list[str]:
    """The `count` token texts of the reply: the pod tag, then words chosen by the prompt.

    Texts carry their leading space so joining them gives the reply and each one is a
    streaming delta.
    """
    if count <= 0:
        return []
    rng = random.Random(hash((seed, *prompt_ids)))
    words = [" " + rng.choice(_WORDS) for _ in range(count - 1)]
    return [pod_tag, *words]


def reply_ids(tokens: Sequence[str]) -> list[int]:
    return [token_id(token.strip()) for token in tokens]


def embedding(prompt_ids: Sequence[int], dimensions: int, seed: int) -> list[float]:
    """A unit vector that depends only on the tokens (and the seed)."""
    rng = random.Random(hash((seed, len(prompt_ids), *prompt_ids)))
    vector = [rng.gauss(0.0, 1.0) for _ in range(dimensions)]
    norm = math.sqrt(sum(value * value for value in vector)) or 1.0
    return [value / norm for value in vector]


def embedding_base64(vector: Sequence[float]) -> str:
    """The `encoding_format: base64` form: little-endian float32s, as OpenAI sends them."""
    packed = array.array("f", vector)
    if sys.byteorder == "big":  # pragma: no cover - the wire format is little-endian
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode()
