"""BlockTexts: the text (UTF-8 bytes) of each block some pod holds, found from its parent.

The index keys blocks by token ids, so matching a prompt against it needs the prompt's
token ids: for a 100k-token prompt, tokenizing all of it (hundreds of milliseconds) only
to learn how far an engine's blocks go. The events carry each block's token ids, and the
bytes they decode to are known when the block arrives, so this view keeps, per held
block, a hash of (parent key, block size, bytes) -> key (not the text itself): a
rendered prompt's bytes can then be walked from the root block by block, one dict
lookup per block, to the end of the longest chain of held blocks whose text it
continues. The request side (routing/prompt_blocks.py) decides how much of that match
to trust and tokenizes only from near its end.

A block is in this view while some pod holds its key and its event stored two or more
blocks: an engine stores the blocks of a prompt's prefill together, and the blocks of
generated tokens one at a time; generated tokens need not be what tokenizing their text
gives, so a match through them could claim blocks a re-sent conversation would not hit.
Memory is bounded (`max_blocks`, the oldest first past it, but a block matched since
gets a second chance; about 200 bytes a block). A block not in the view (one at a time,
evicted, its model's tokenizer not loaded when it arrived) ends a walk there, which
costs tokenizing more, never a wrong answer. Written on the event loop; read from
worker threads (dict and set operations, each atomic under the GIL; a walk racing a
removal may return a key no pod holds any more, which then counts for no pod, as the
scorer looks every key up in the index).
"""

from __future__ import annotations

from collections.abc import Container, Sequence

# Rough bytes per kept block: three dict entries and two ints (measured with tracemalloc
# on CPython 3.11, 400 KB of text in 16-token blocks). The text itself is not kept.
BYTES_PER_BLOCK = 200
BYTES_PER_MARK = 32  # a block matched since the bound last dropped blocks: a set entry


class BlockTexts:
    def __init__(self, *, max_blocks: int = 262_144) -> None:
        if max_blocks <= 0:
            raise ValueError("max_blocks must be positive")
        self.max_blocks = max_blocks
        # Blocks are found by a hash of (parent key, block size, text), the way the index
        # keys blocks by a hash of their tokens: hash -> key, and key -> hash in insertion
        # order (the oldest first) to remove a block by its key.
        self._child: dict[int, int] = {}
        self._node: dict[int, int] = {}
        # parent key -> the byte length of its children's texts (of any vocabulary and
        # block size), or a tuple of them when they differ. Not counted down when a
        # child goes (a stale length costs a failed lookup); dropped with the parent.
        self._lengths: dict[int, int | tuple[int, ...]] = {}
        self._recent: set[int] = set()  # blocks matched since `_shrink` last saw them

    def __len__(self) -> int:
        return len(self._node)

    def memory_estimate(self) -> int:
        """Approximate bytes this view holds."""
        return BYTES_PER_BLOCK * len(self._node) + BYTES_PER_MARK * len(self._recent)

    def add(self, vocabulary: str, parent: int, size: int, text: bytes, key: int) -> None:
        """File block `key` under its parent by its text, as decoded by `vocabulary` (the
        tokenizer's name: a walk matches only blocks decoded by the prompt's own)."""
        if key in self._node:
            return
        found = hash((vocabulary, parent, size, text))
        if found in self._child:
            return  # another key with the same text under the same parent: keep the first
        self._child[found] = key
        self._node[key] = found
        lengths = self._lengths.get(parent)
        if lengths is None:
            self._lengths[parent] = len(text)
        elif lengths != len(text):
            self._more_lengths(parent, lengths, len(text))
        if len(self._node) > self.max_blocks:
            self._shrink()

    def add_chain(
        self,
        vocabulary: str,
        parent: int,
        size: int,
        texts: Sequence[bytes],
        keys: Sequence[int],
        keep: Container[int],
    ) -> None:
        """`add` for a chain of blocks (each the parent of the next), those in `keep`."""
        node = self._node
        child = self._child
        lengths_of = self._lengths
        for text, key in zip(texts, keys, strict=False):
            if key in keep and key not in node:
                found = hash((vocabulary, parent, size, text))
                if found not in child:
                    child[found] = key
                    node[key] = found
                    lengths = lengths_of.get(parent)
                    length = len(text)
                    if lengths is None:
                        lengths_of[parent] = length
                    elif lengths != length:
                        self._more_lengths(parent, lengths, length)
            parent = key
        if len(node) > self.max_blocks:
            self._shrink()

    def _more_lengths(self, slot: int, lengths: int | tuple[int, ...], length: int) -> None:
        if isinstance(lengths, int):
            self._lengths[slot] = (lengths, length)
        elif length not in lengths:
            self._lengths[slot] = (*lengths, length)

    def discard(self, key: int) -> None:
        found = self._node.pop(key, None)
        if found is None:
            return
        self._recent.discard(key)
        del self._child[found]
        self._lengths.pop(key, None)

    def clear(self) -> None:
        self._child.clear()
        self._node.clear()
        self._lengths.clear()
        self._recent.clear()

    def walk(self, vocabulary: str, root: int, size: int, data: bytes) -> list[tuple[int, int]]:
        """The longest chain of kept blocks from `root` whose texts, one after another, are
        the start of `data`: (key, byte offset where the block's text ends) per block."""
        chain: list[tuple[int, int]] = []
        child = self._child
        lengths_of = self._lengths
        parent = root
        at = 0
        while True:
            lengths = lengths_of.get(parent)
            if lengths is None:
                break
            for length in (lengths,) if isinstance(lengths, int) else lengths:
                key = child.get(hash((vocabulary, parent, size, data[at : at + length])))
                if key is not None:
                    break
            else:
                break
            at += length
            chain.append((key, at))
            parent = key
        self._used(chain)
        return chain

    def _used(self, chain: list[tuple[int, int]]) -> None:
        """Matched blocks get a second chance when their turn to be dropped comes: a
        prefix many prompts share (a system prompt, a document) stays however many
        blocks arrive after it. One set update (atomic under the GIL: this runs in a
        worker thread) rather than moving each block to the back of the line here."""
        self._recent.update([key for key, _ in chain])

    def _shrink(self) -> None:
        """Drop blocks, oldest first, down to the bound; a block matched since it was last
        looked at here goes to the back of the line instead, once."""
        node = self._node
        recent = self._recent
        if len(recent) > len(node):  # marks a walk added after their block went
            recent.intersection_update(node)
        while len(node) > self.max_blocks:
            oldest = next(iter(node))
            if oldest in recent:
                recent.discard(oldest)
                node[oldest] = node.pop(oldest)
            else:
                self.discard(oldest)
