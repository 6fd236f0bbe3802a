"""ModelTokenizer: a request's prompt as the engine tokenizes it.

Loaded from a Hugging Face tokenizer directory: `tokenizer.json` (read by the `tokenizers`
library) and, when present, `tokenizer_config.json` (special tokens, chat template) or a
`chat_template.jinja` file beside it (newer repositories keep the template there; it
wins, as in `transformers`). Chat requests are rendered with the chat template and
encoded without special tokens (the template writes them); completions prompts are
encoded with them (the BOS token), as vLLM does; a completions prompt given as token ids
is used as it is.

Long prompts stay cheap: the text is cut into pieces at line starts (`_cut`) and each
piece's tokens are kept in a bounded LRU, so a prefix seen before (a system prompt, a
document, the earlier turns of a conversation) is not tokenized again. Pieces are encoded
in batch calls (without offsets), which release the GIL, in groups growing to 8 pieces, so a reader
that stops early (no pod holds the prefix so far) leaves the rest untouched. The cut is
exact only for tokenizers whose pre-tokenizer does not look across it, so at load a
self-check compares piecewise and whole encodings of probe texts; a tokenizer that fails
it is encoded whole.

For a byte-level vocabulary (each id stands for exact bytes; special tokens for their
text) `token_bytes` maps ids back to bytes, checked at load on probe texts: the KV-event
index decodes the blocks engines store with it, so a prompt can be matched by its text
(routing/prompt_blocks.py) and tokenized only from a cut point near the match's end.
"""

from __future__ import annotations

import array
import json
import os
import threading
import unicodedata
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from gateway_extproc.tokenize.chat_template import ChatTemplate, ChatTemplateError

# The library's own thread pool (rayon) would encode the pieces of one prompt in parallel:
# the processor already tokenizes off the event loop in its own worker threads, and that
# pool's idle spinning costs CPU on cores shared with gRPC. An explicit setting wins.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"

# Pieces are about this long; a line longer than this is one piece.
PIECE_CHARS = 8192
# Pieces are encoded in groups doubling from 2 up to this many (a 400 KB prompt in 8
# calls): a reader that stops where the pods' cached prefix ends has encoded at most one
# group (64 KiB of text, ~20k tokens) beyond it, not as much again as it needed.
MAX_GROUP_PIECES = 8
# Tokens kept in the piece cache, per tokenizer (4 bytes each, plus the text's hash).
CACHE_TOKENS = 4_000_000

_PROBES = (
    "You are a helpful assistant.\nAnswer briefly.\n\nContext:\nthe quick brown fox",
    "line one\nline two  \n\tindented\nsecond\r\nthird 123\n456 end.\n\n\nfinal",
    "def f(x):\n    return x\nclass A:\n  pass\nprint('hi')\n",
    "Über straße\nnaïve café\n日本語のテキスト\nemoji 🙂 here\nok",
)


_SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
    "sep_token",
    "cls_token",
)


class TokenizerLoadError(ValueError):
    """The directory does not hold a usable tokenizer; the message says why."""


class PromptError(ValueError):
    """The request cannot be rendered the way the engine would (bad messages, a template
    that raises): routing goes on without its tokens."""


def _special_token(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken map."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


class ModelTokenizer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        chat_template: ChatTemplate | None,
        *,
        name: str = "",
        cache_tokens: int = CACHE_TOKENS,
    ) -> None:
        self.name = name
        self._tokenizer = tokenizer
        self.chat_template = chat_template
        self._cache: OrderedDict[tuple[int, int], array.array[int]] = OrderedDict()
        self._cached = 0
        self._cache_tokens = cache_tokens
        self._lock = threading.Lock()
        # Offsets (where each token lies in the text) are not needed to route: the fast
        # batch encoder (tokenizers >= 0.21) skips them and encodes long prompts in about
        # two thirds of the time, with the same ids.
        self._encode_batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
        self._around = self._special_around()
        self.piecewise = self._check_piecewise()
        # id -> the UTF-8 bytes it stands for, when every token maps to exact bytes
        # (byte-level BPE, special tokens as their text): None otherwise.
        self.token_bytes = _byte_table(tokenizer, self._encode_batch) if self.piecewise else None
        self._nfc = _normalizer_type(tokenizer) == "NFC"

    @classmethod
    def load(cls, directory: str | Path) -> ModelTokenizer:
        """Blocking (file reads, parsing megabytes of JSON): call off the event loop."""
        root = Path(directory)
        path = root / "tokenizer.json"
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # the library raises its own exception types
            raise TokenizerLoadError(f"{path}: {exc}") from None
        config: dict[str, Any] = {}
        config_path = root / "tokenizer_config.json"
        if config_path.exists():
            try:
                loaded = json.loads(config_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise TokenizerLoadError(f"{config_path}: {exc}") from None
            if not isinstance(loaded, dict):
                raise TokenizerLoadError(f"{config_path}: not a JSON object")
            config = loaded
        source = _template_source(root, config)
        special = {
            name: token
            for name in _SPECIAL_TOKEN_NAMES
            if (token := _special_token(config.get(name))) is not None
        }
        try:
            template = ChatTemplate(source, special) if source else None
        except ChatTemplateError as exc:
            raise TokenizerLoadError(f"{root}: {exc}") from None
        return cls(tokenizer, template, name=str(root))

    # -- requests -----------------------------------------------------------------------

    def prompt(self, endpoint: str, doc: Mapping[str, Any]) -> PromptTokens | None:
        """The request body's prompt, to be encoded as the engine will encode it, or None
        when it is not a generation request with one prompt (embeddings, a batch).
        Rendering happens here; encoding as the returned object's chunks are read."""
        if endpoint == CHAT_PATH or (endpoint != COMPLETIONS_PATH and "messages" in doc):
            return PromptTokens(self, self.render_chat(doc), add_special_tokens=False)
        if endpoint != COMPLETIONS_PATH and "prompt" not in doc:
            return None
        prompt = doc.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            add = doc.get("add_special_tokens", True) is not False
            return PromptTokens(self, prompt, add_special_tokens=add)
        if isinstance(prompt, list) and prompt and all(_is_token(t) for t in prompt):
            return PromptTokens(self, "", add_special_tokens=False, ids=list(prompt))
        return None

    def prompt_ids(self, endpoint: str, doc: Mapping[str, Any]) -> list[int] | None:
        """Every token id of the request's prompt (see `prompt`)."""
        prompt = self.prompt(endpoint, doc)
        return prompt.ids() if prompt is not None else None

    def render_chat(self, doc: Mapping[str, Any]) -> str:
        if self.chat_template is None:
            raise PromptError("the tokenizer has no chat template")
        messages = doc.get("messages")
        if not isinstance(messages, list) or not messages:
            raise PromptError("`messages` is not a non-empty list")
        kwargs = doc.get("chat_template_kwargs")
        extra = dict(kwargs) if isinstance(kwargs, Mapping) else {}
        add_generation_prompt = extra.pop("add_generation_prompt", None)
        if add_generation_prompt is None:
            add_generation_prompt = doc.get("add_generation_prompt", True)
        continue_final = bool(doc.get("continue_final_message", False))
        try:
            return self.chat_template.render(
                [_message(m) for m in messages],
                add_generation_prompt=bool(add_generation_prompt) and not continue_final,
                continue_final_message=continue_final,
                tools=doc.get("tools"),
                documents=doc.get("documents"),
                extra=extra,
            )
        except ChatTemplateError as exc:
            raise PromptError(f"the chat template failed: {exc}") from None

    # -- encoding -----------------------------------------------------------------------

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        return PromptTokens(self, text, add_special_tokens=add_special_tokens).ids()

    def special_around(self, add_special_tokens: bool) -> tuple[list[int], list[int]]:
        return self._around if add_special_tokens else ([], [])

    def pieces(self, text: str) -> list[str]:
        return _cut(text, PIECE_CHARS) if self.piecewise else [text]

    def mostly_cached(self, text: str) -> bool:
        """`text` has several pieces and every one but the last is in the piece cache (a
        document or a conversation seen before): encoding it costs lookups and its last
        piece."""
        pieces = self.pieces(text)
        with self._lock:
            return len(pieces) > 1 and all((len(p), hash(p)) in self._cache for p in pieces[:-1])

    def encode_pieces(self, pieces: Sequence[str]) -> list[array.array[int]]:
        """Token ids of each piece (no special tokens), from the cache where it has them."""
        keys = [(len(p), hash(p)) for p in pieces]
        found: list[array.array[int] | None] = []
        with self._lock:
            for key in keys:
                hit = self._cache.get(key)
                if hit is not None:
                    self._cache.move_to_end(key)
                found.append(hit)
        missing = [i for i, hit in enumerate(found) if hit is None]
        if missing:
            encoded = self._encode_batch([pieces[i] for i in missing], add_special_tokens=False)
            with self._lock:
                for i, encoding in zip(missing, encoded, strict=True):
                    ids = array.array("I", encoding.ids)
                    found[i] = ids
                    self._remember(keys[i], ids)
        return [ids for ids in found if ids is not None]

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The UTF-8 bytes the ids stand for (`token_bytes` must be set); a block may end
        inside a character."""
        table = self.token_bytes
        assert table is not None
        return b"".join([table[i] for i in ids])

    def decode_blocks(self, ids: Sequence[int], size: int) -> list[bytes]:
        """`decode_bytes` of each full block of `size` ids."""
        table = self.token_bytes
        assert table is not None
        parts = list(map(table.__getitem__, ids))
        join = b"".join
        return [join(parts[at : at + size]) for at in range(0, len(parts) - size + 1, size)]

    def bytes_comparable(self, text: str) -> bool:
        """The text's UTF-8 bytes are what its ids decode to (`token_bytes` set, and the
        text already in the form the normalizer would give it)."""
        if self.token_bytes is None:
            return False
        return not self._nfc or unicodedata.is_normalized("NFC", text)

    def _remember(self, key: tuple[int, int], ids: array.array[int]) -> None:
        if len(ids) > self._cache_tokens or key in self._cache:
            return
        self._cache[key] = ids
        self._cached += len(ids)
        while self._cached > self._cache_tokens:
            _, old = self._cache.popitem(last=False)
            self._cached -= len(old)

    def _special_around(self) -> tuple[list[int], list[int]]:
        """The ids the post-processor puts before and after a single sequence (BOS, EOS)."""
        probe = "probe text"
        bare = self._tokenizer.encode(probe, add_special_tokens=False).ids
        full = self._tokenizer.encode(probe, add_special_tokens=True).ids
        for start in range(len(full) - len(bare) + 1):
            if full[start : start + len(bare)] == bare:
                return full[:start], full[start + len(bare) :]
        return [], []

    def _check_piecewise(self) -> bool:
        for text in _PROBES:
            whole = self._tokenizer.encode(text, add_special_tokens=False).ids
            pieces = self._encode_batch(_cut(text, 1), add_special_tokens=False)
            if [i for p in pieces for i in p.ids] != whole:
                return False
        return True


class PromptTokens:
    """A prompt whose token ids are read in chunks, so that a reader that has seen enough
    (no pod caches the prefix so far) stops before the rest is tokenized."""

    def __init__(
        self,
        tokenizer: ModelTokenizer,
        text: str,
        *,
        add_special_tokens: bool,
        ids: list[int] | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self.text = text
        self._add = add_special_tokens
        self._ids = ids

    def chunks(self) -> Iterator[tuple[list[int], float]]:
        """(ids, share of the prompt covered so far) in order; the last share is 1.0.
        Pieces are encoded in groups doubling in size up to MAX_GROUP_PIECES, so stopping
        early costs little (at most one group beyond the point the reader needed) and
        reading it all costs few calls."""
        if self._ids is not None:
            yield self._ids, 1.0
            return
        before, after = self._tokenizer.special_around(self._add)
        pieces = self._tokenizer.pieces(self.text)
        total = max(len(self.text), 1)
        done = 0
        start, group = 0, 2
        while start < len(pieces):
            chosen = pieces[start : start + group]
            ids: list[int] = list(before) if start == 0 else []
            for piece_ids in self._tokenizer.encode_pieces(chosen):
                ids.extend(piece_ids)
            start += group
            group = min(group * 2, MAX_GROUP_PIECES)
            done += sum(map(len, chosen))
            last = start >= len(pieces)
            if last:
                ids.extend(after)
            yield ids, 1.0 if last else done / total

    @property
    def tokenizer(self) -> ModelTokenizer:
        return self._tokenizer

    def plain(self) -> bool:
        """Text encoded as it is, nothing added around it (a rendered chat): the ids of
        any part of it depend on that part's text alone, cut where `cut_points` says."""
        return self._ids is None and not any(self._tokenizer.special_around(self._add))

    def suffix(self, start: int) -> PromptTokens:
        """The text from character `start` on; with `start` a cut point (or 0) of a plain
        prompt, its ids are exactly the rest of the whole prompt's ids."""
        return PromptTokens(self._tokenizer, self.text[start:], add_special_tokens=False)

    def ids(self) -> list[int]:
        out: list[int] = []
        for ids, _ in self.chunks():
            out.extend(ids)
        return out


def _cut(text: str, size: int) -> list[str]:
    """`text` in pieces of about `size` characters, each ending with a newline that has
    no whitespace on either side: where the common pre-tokenizers end a token anyway."""
    pieces: list[str] = []
    start = 0
    end = len(text)
    while end - start > size:
        at = start + size
        while True:
            at = text.find("\n", at)
            if at < 0 or at + 1 >= end:
                at = -1
                break
            if not text[at - 1].isspace() and not text[at + 1].isspace():
                break
            at += 1
        if at < 0:
            break
        pieces.append(text[start : at + 1])
        start = at + 1
    pieces.append(text[start:])
    return pieces


def is_cut_point(text: str, at: int) -> bool:
    """`text` may be encoded in two parts split before character `at` with the same ids as
    whole: just after a newline with no whitespace on either side (as `_cut` splits)."""
    return (
        2 <= at < len(text)
        and text[at - 1] == "\n"
        and not text[at - 2].isspace()
        and not text[at].isspace()
    )


def last_cut_point(text: str, end: int) -> int:
    """The last cut point before character `end` (the character at it lies before `end`),
    or 0 (the start, always a cut)."""
    at = text.rfind("\n", 0, end - 1)
    while at >= 1:
        if is_cut_point(text, at + 1):
            return at + 1
        at = text.rfind("\n", 0, at)
    return 0


# GPT-2's printable stand-ins for bytes in byte-level BPE vocabularies.
def _byte_level_alphabet() -> dict[str, int]:
    kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = list(kept)
    extra = 0
    for b in range(256):
        if b not in kept:
            kept.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(kept, chars, strict=True)}


_BYTE_PROBES = (
    *_PROBES,
    "<|bos|><|system|>\nHi<|end|>\n<|user|>\n<|im_start|>user\nq?<|im_end|>\n",
    "mixed \u00e9\u00e8 \u4e2d\u6587 \U0001f600\U0001f601\n"
    "\u0928\u092e\u0938\u094d\u0924\u0947 end\n",
)


def _normalizer_type(tokenizer: Tokenizer) -> str | None:
    normalizer = json.loads(tokenizer.to_str()).get("normalizer")
    return str(normalizer.get("type")) if isinstance(normalizer, dict) else None


def _byte_table(tokenizer: Tokenizer, encode_batch: Any) -> list[bytes] | None:
    """Each id's bytes, or None when the vocabulary is not byte-level or a check fails:
    a normalizer other than NFC, an added token that strips whitespace around it, or a
    probe text whose ids do not give back its bytes."""
    if _normalizer_type(tokenizer) not in (None, "NFC"):
        return None
    added = tokenizer.get_added_tokens_decoder()
    if any(token.lstrip or token.rstrip for token in added.values()):
        return None
    alphabet = _byte_level_alphabet()
    table: list[bytes] = [b""] * tokenizer.get_vocab_size(with_added_tokens=True)
    for token, token_id in tokenizer.get_vocab(with_added_tokens=True).items():
        if token_id >= len(table):
            return None
        if token_id in added:
            table[token_id] = added[token_id].content.encode("utf-8")
            continue
        try:
            table[token_id] = bytes([alphabet[ch] for ch in token])
        except KeyError:
            return None  # not a byte-level vocabulary (SentencePiece, WordPiece)
    for encoding, text in zip(
        encode_batch(list(_BYTE_PROBES), add_special_tokens=False), _BYTE_PROBES, strict=True
    ):
        if b"".join(table[i] for i in encoding.ids) != text.encode("utf-8"):
            return None
    return table


def _message(raw: Any) -> Mapping[str, Any]:
    """A message as vLLM hands it to the template: text content parts joined by newlines
    (the "string" content format most templates expect)."""
    if not isinstance(raw, Mapping):
        raise PromptError("a message is not an object")
    content = raw.get("content")
    if isinstance(content, list):
        texts = [
            part["text"]
            for part in content
            if isinstance(part, Mapping) and isinstance(part.get("text"), str)
        ]
        if len(texts) != len(content):
            raise PromptError("a message has content parts other than text")
        return {**raw, "content": "\n".join(texts)}
    return raw


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _template_source(root: Path, config: Mapping[str, Any]) -> str | None:
    jinja_file = root / "chat_template.jinja"
    if jinja_file.exists():
        try:
            return jinja_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise TokenizerLoadError(f"{jinja_file}: {exc}") from None
    source = config.get("chat_template")
    if isinstance(source, str):
        return source
    if isinstance(source, list):  # named templates: the default one serves chat requests
        for entry in source:
            if isinstance(entry, Mapping) and entry.get("name") == "default":
                template = entry.get("template")
                return template if isinstance(template, str) else None
    return None
