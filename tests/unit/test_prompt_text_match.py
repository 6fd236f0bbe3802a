"""Matching a long prompt by its text: an engine's held blocks are found from the text
they decode to, and only the last lines of the match are tokenized, with the answer
tokenizing the whole prompt gives (same keys, same depth for every pod)."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from gateway_extproc.kvevents.index import KVBlockIndex
from gateway_extproc.kvevents.keys import chain_keys, root_key
from gateway_extproc.kvevents.texts import BlockTexts
from gateway_extproc.kvevents.wire import AllBlocksCleared, BlockStored
from gateway_extproc.routing import prompt_blocks as prompt_blocks_module
from gateway_extproc.routing.prompt_blocks import PromptPreparer, prompt_blocks
from gateway_extproc.tokenize.catalog import TokenizerCatalog
from gateway_extproc.tokenize.tokenizer import ModelTokenizer

TINY = Path(__file__).resolve().parents[1] / "data" / "tiny-tokenizer"
CHAT = "/v1/chat/completions"
SIZE = 16
WORDS = [
    "the",
    "policy",
    "customer",
    "naïve",
    "café",
    "日本語",
    "のテキスト",
    "🙂",
    "👩‍💻",
    "Straße",
    "x=1;",
    "<|end|>",
    "<|user|>",
    "  ",
    "\t",
    "123",
    "ÿ",
]


@pytest.fixture(scope="module")
def tokenizer() -> ModelTokenizer:
    return ModelTokenizer.load(TINY)


def fresh(tokenizer: ModelTokenizer) -> ModelTokenizer:
    """The same tokenizer with an empty piece cache (nothing seen before)."""
    return ModelTokenizer(tokenizer._tokenizer, tokenizer.chat_template, name=tokenizer.name)


def text(rng: random.Random, chars: int) -> str:
    lines: list[str] = []
    total = 0
    while total < chars:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
        line += rng.choice(["\n", "\n", "\n", " \n", "\n\n", "\r\n"])
        lines.append(line)
        total += len(line)
    return "".join(lines)


def chat(system: str, question: str) -> dict[str, object]:
    return {
        "model": "m",
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
    }


class Engine:
    """An index fed by one pod's engine, its blocks decoded by the test tokenizer."""

    def __init__(self, tokenizer: ModelTokenizer) -> None:
        self.tokenizer = tokenizer
        self.index = KVBlockIndex()
        self.index.decoder = lambda model: (
            (tokenizer.name, tokenizer.decode_blocks) if model == "m" else None
        )
        self.index.track("p", model="m")
        self.index.set_trusted("p", True)
        self._hash = 0

    def store(self, ids: list[int], parent: int | None = None, per_event: int = 0) -> int | None:
        """Publish the full blocks of `ids` after `parent` (engine hash), in events of
        `per_event` blocks (0: one event); the last block's engine hash."""
        blocks = len(ids) // SIZE
        step = per_event or blocks
        for start in range(0, blocks, step):
            count = min(step, blocks - start)
            hashes = tuple(range(self._hash, self._hash + count))
            self._hash += count
            tokens = tuple(ids[start * SIZE : (start + count) * SIZE])
            self.index.apply("p", [BlockStored(hashes, parent, tokens, SIZE)])
            parent = hashes[-1]
        return parent

    def ids(self, doc: dict[str, object]) -> list[int]:
        found = self.tokenizer.prompt_ids(CHAT, doc)
        assert found is not None
        return found


@pytest.fixture
def matched_by_text(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bool]]:
    """Per prompt keyed, whether its text matched held blocks (and tokenizing skipped them)."""
    seen: list[bool] = []
    real = prompt_blocks_module._matched_by_text

    def spy(*args: object, **kwargs: object) -> object:
        found = real(*args, **kwargs)  # type: ignore[arg-type]
        seen.append(found is not None)
        return found

    monkeypatch.setattr(prompt_blocks_module, "_matched_by_text", spy)
    yield seen


def keyed(engine: Engine, tokenizer: ModelTokenizer, doc: dict[str, object]) -> list[int]:
    prompt = tokenizer.prompt(CHAT, doc)
    assert prompt is not None
    blocks = prompt_blocks(prompt, [SIZE], None, engine.index.holds, engine.index.texts)
    return list(blocks.keys[SIZE])


def text_matches(outcome: str) -> float:
    sample = REGISTRY.get_sample_value("gateway_prompt_text_matches_total", {"outcome": outcome})
    return sample or 0.0


def truth(engine: Engine, doc: dict[str, object]) -> list[int]:
    """Keys of every block of the prompt, tokenized whole."""
    return chain_keys(root_key(None), engine.ids(doc), SIZE)


def test_the_blocks_matched_by_text_are_those_tokenizing_the_whole_prompt_finds(
    tokenizer: ModelTokenizer, matched_by_text: list[bool]
) -> None:
    rng = random.Random(20261208)
    for case in range(150):
        engine = Engine(fresh(tokenizer))
        held = text(rng, rng.randint(2_000, 8_000))
        stored = engine.ids(chat(held, "what was held?"))
        share = rng.choice([1.0, 1.0, rng.random()])
        kept = stored[: int(len(stored) * share)]
        engine.store(kept, per_event=rng.choice([0, 2, 7, 64]))
        # The request shares the held text up to a character near where a held block ends
        # (inside a word, a multi-byte character, a special token's text) and goes on
        # differently: a letter that extends the word, another word, other lines.
        held_bytes = engine.tokenizer.decode_bytes(kept[: len(kept) // SIZE * SIZE])
        ends = len(held_bytes.decode("utf-8", "ignore"))
        prefix = engine.tokenizer.render_chat(chat(held, "")).index(held)
        cut = max(0, min(len(held), ends - prefix - rng.randint(-4, 12)))
        cut = rng.choice([cut, rng.randint(0, len(held))])
        system = held[:cut] + rng.choice(["", "s", "é", "ing", " ", "\n", "<|end|>", "日", "🙂 x"])
        system += rng.choice(["", held[cut:], text(rng, 300)])
        doc = chat(system, rng.choice(["what was held?", "something else"]))
        expected = truth(engine, doc)
        found = keyed(engine, fresh(tokenizer), doc)
        assert found == expected[: len(found)], case
        assert engine.index.longest_prefixes(found, ["p"]) == engine.index.longest_prefixes(
            expected, ["p"]
        ), case
    assert matched_by_text.count(True) >= 100  # most requests skipped tokenizing the match


def test_an_engine_holding_a_long_prompt_is_found_tokenizing_only_its_last_lines(
    tokenizer: ModelTokenizer, matched_by_text: list[bool]
) -> None:
    engine = Engine(tokenizer)
    document = text(random.Random(3), 200_000)
    engine.store(engine.ids(chat(document, "first question")))
    reader = fresh(tokenizer)
    before = text_matches("matched")
    found = keyed(engine, reader, chat(document, "a new question"))
    assert text_matches("matched") == before + 1  # an operator sees the path taken
    expected = truth(engine, chat(document, "a new question"))
    assert found == expected[: len(found)]
    depth = engine.index.longest_prefixes(found, ["p"])["p"]
    assert depth == engine.index.longest_prefixes(expected, ["p"])["p"] > 1000
    assert matched_by_text == [True]
    encoded = sum(length for length, _ in reader._cache)
    assert encoded < 2_000  # characters tokenized, of a 200,000-character prompt
    # Once tokenized (here by a request no pod held), the document's pieces are cached
    # and cheaper than a walk: the next question is keyed from them, as exactly.
    reader.prompt_ids(CHAT, chat(document, "a question no pod held"))
    again = chat(document, "a third question")
    assert keyed(engine, reader, again) == truth(engine, again)
    assert matched_by_text == [True, False]


def test_blocks_stored_one_at_a_time_are_not_matched_by_text(
    tokenizer: ModelTokenizer, matched_by_text: list[bool]
) -> None:
    # Generated tokens are stored a block at a time, and need not be what tokenizing their
    # text gives: a conversation sent again must not be credited with them.
    engine = Engine(tokenizer)
    document = text(random.Random(4), 4_000)
    prompt_ids = engine.ids(chat(document, "q"))
    full = len(prompt_ids) // SIZE * SIZE
    parent = engine.store(prompt_ids[:full])
    lines = [f"line {i} of the answer, with some words in it\n" for i in range(40)]
    # The model spelled its first line a character at a time (not how its text
    # tokenizes), then the rest as tokenizing it would.
    generated = [i for ch in lines[0] for i in tokenizer.encode(ch, add_special_tokens=False)]
    for line in lines[1:]:
        generated += tokenizer.encode(line, add_special_tokens=False)
    engine.store(prompt_ids[full:] + generated, parent=parent, per_event=1)
    doc = chat(document, "q")
    doc["messages"].append({"role": "assistant", "content": "".join(lines)})  # type: ignore[attr-defined]
    expected = truth(engine, doc)
    found = keyed(engine, fresh(tokenizer), doc)
    assert found == expected[: len(found)]
    assert engine.index.longest_prefixes(found, ["p"]) == engine.index.longest_prefixes(
        expected, ["p"]
    )
    assert engine.index.longest_prefixes(found, ["p"])["p"] == full // SIZE


def test_the_text_of_blocks_goes_with_the_blocks(tokenizer: ModelTokenizer) -> None:
    engine = Engine(tokenizer)
    engine.store(engine.ids(chat(text(random.Random(5), 5_000), "q")))
    assert len(engine.index.texts) > 50
    assert engine.index.texts.memory_estimate() > 0
    engine.index.apply("p", [AllBlocksCleared()])
    assert len(engine.index.texts) == 0
    assert engine.index.texts.memory_estimate() == 0


def test_the_text_view_keeps_at_most_its_bound_and_walks_to_its_first_gap() -> None:
    texts = BlockTexts(max_blocks=3)
    for i in range(5):
        texts.add("v", i, SIZE, b"ab", i + 1)  # a chain 0 -> 1 -> ... -> 5, each "ab"
    assert len(texts) == 3
    assert texts.walk("v", 0, SIZE, b"ababab") == []  # its first blocks were dropped
    assert texts.walk("v", 3, SIZE, b"abababab") == [(4, 2), (5, 4)]
    assert texts.walk("v", 3, SIZE, b"abxbab") == [(4, 2)]
    assert texts.walk("v", 3, SIZE * 2, b"abab") == []  # another block size, another chain
    assert texts.walk("w", 3, SIZE, b"abab") == []  # decoded by another vocabulary


def test_a_prefix_that_prompts_keep_matching_stays_however_many_blocks_arrive_after_it() -> None:
    texts = BlockTexts(max_blocks=4)
    texts.add("v", 0, SIZE, b"sys", 1)
    texts.add("v", 1, SIZE, b"tem", 2)
    for i in range(10):  # other prompts' blocks, each matched after the shared prefix
        texts.add("v", 100 + i, SIZE, b"x", 200 + i)
        assert texts.walk("v", 0, SIZE, b"system prompt") == [(1, 3), (2, 6)]
    assert len(texts) == 4


def test_blocks_get_their_text_once_the_models_tokenizer_is_loaded(
    tokenizer: ModelTokenizer,
) -> None:
    # The event loop never loads a tokenizer: blocks stored before the first request of
    # their model loaded it stay without text (and are matched by tokenizing).
    catalog = TokenizerCatalog({"m": str(TINY)})
    index = KVBlockIndex()
    PromptPreparer(catalog, index)
    index.track("p", model="m")
    ids = tokenizer.prompt_ids(CHAT, chat(text(random.Random(7), 2_000), "q"))
    assert ids is not None
    index.apply("p", [BlockStored((1, 2), None, tuple(ids[: 2 * SIZE]), SIZE)])
    assert len(index.texts) == 0
    assert catalog.get("m") is not None
    index.apply("p", [BlockStored((3, 4), 2, tuple(ids[2 * SIZE : 4 * SIZE]), SIZE)])
    assert len(index.texts) == 2


def test_a_tokenizer_that_is_not_byte_level_decodes_no_text(tmp_path: Path) -> None:
    # Metaspace vocabularies (and any whose ids do not give back the text's bytes) keep
    # the index keyed by tokens only: prompts are tokenized from the start, as before.
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    spm = Tokenizer(models.BPE(unk_token="<unk>"))
    spm.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    spm.train_from_iterator(
        ["the quick brown fox\n" * 50], trainers.BpeTrainer(special_tokens=["<unk>"])
    )
    spm.save(str(tmp_path / "tokenizer.json"))
    catalog = TokenizerCatalog({"m": str(tmp_path)})
    index = KVBlockIndex()
    PromptPreparer(catalog, index)
    assert index.decoder is not None
    assert index.decoder("m") is None  # not loaded: never loaded from the event loop
    loaded = catalog.get("m")
    assert loaded is not None and loaded.token_bytes is None
    assert index.decoder("m") is None


def test_a_normalizing_tokenizer_matches_only_text_already_normalized(tmp_path: Path) -> None:
    # With an NFC normalizer the ids give back the normalized text: a prompt not in that
    # form is tokenized from the start rather than compared byte for byte.
    config = json.loads((TINY / "tokenizer.json").read_text(encoding="utf-8"))
    config["normalizer"] = {"type": "NFC"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(config), encoding="utf-8")
    nfc = ModelTokenizer.load(tmp_path)
    assert nfc.token_bytes is not None
    assert nfc.bytes_comparable("caf\u00e9")
    assert not nfc.bytes_comparable("cafe\u0301")
    config["normalizer"] = {"type": "Lowercase"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(config), encoding="utf-8")
    assert ModelTokenizer.load(tmp_path).token_bytes is None


def test_the_byte_table_gives_back_every_text(tokenizer: ModelTokenizer) -> None:
    sample = text(random.Random(6), 3_000) + "\x00\x7f\u2028 end"
    ids = tokenizer.encode(sample, add_special_tokens=False)
    assert tokenizer.decode_bytes(ids) == sample.encode("utf-8")
