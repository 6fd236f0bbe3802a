"""BlockTexts: the text (UTF-8 bytes) of each block some pod holds, found from its parent.

The index keys blocks by token ids, so matching a prompt against it needs the prompt's
token ids: for a 100k-token prompt, tokenizing all of it (hundreds of milliseconds) only
to learn how far an engine's blocks go. The events carry each block's token ids, and the
bytes they decode to are known when the block arrives, so this view keeps, per held
block, (parent key, block size, bytes) -> key: a rendered prompt's bytes can then be
walked from the root block by block, one dict lookup per block, to the end of the
longest chain of held blocks whose text it continues. The request side
(routing/prompt_blocks.py) decides how much of that match to trust and tokenizes only
from near its end.

A block's text is kept while some pod holds its key and its event stored two or more
blocks: an engine stores the blocks of a prompt's prefill together, and the blocks of
generated tokens one at a time; generated tokens need not be what tokenizing their text
gives, so a match through them could claim blocks a re-sent conversation would not hit.
Memory is bounded (`max_blocks`, oldest first past it); a block without text (not kept,
evicted, its model's tokenizer not loaded when it arrived) ends a walk there, which costs
tokenizing more, never a wrong answer. Written on the event loop; read from worker
threads (single dict lookups, safe under the GIL; a walk that races a removal sees a
shorter or an outdated chain, which the request side re-checks by its token keys).
"""

from __future__ import annotations

# Rough bytes per kept block besides its text: two dict entries, a tuple, the bytes
# object's header, the per-parent length table (measured with tracemalloc, CPython 3.11).
OVERHEAD_PER_BLOCK = 330


class BlockTexts:
    def __init__(self, *, max_blocks: int = 262_144) -> None:
        if max_blocks <= 0:
            raise ValueError("max_blocks must be positive")
        self.max_blocks = max_blocks
        # (parent key, block size, bytes) -> key, and the reverse (in insertion order,
        # the oldest first) to remove a block by its key.
        self._child: dict[tuple[int, int, bytes], int] = {}
        self._node: dict[int, tuple[int, int, bytes]] = {}
        # (parent key, block size) -> {byte length of a child: children of that length}
        self._lengths: dict[tuple[int, int], dict[int, int]] = {}
        self.text_bytes = 0  # the kept texts' total length

    def __len__(self) -> int:
        return len(self._node)

    def memory_estimate(self) -> int:
        """Approximate bytes this view holds."""
        return self.text_bytes + OVERHEAD_PER_BLOCK * len(self._node)

    def add(self, parent: int, size: int, text: bytes, key: int) -> None:
        if key in self._node:
            return
        found = (parent, size, text)
        if found in self._child:
            return  # another key with the same text under the same parent: keep the first
        self._child[found] = key
        self._node[key] = found
        lengths = self._lengths.setdefault((parent, size), {})
        lengths[len(text)] = lengths.get(len(text), 0) + 1
        self.text_bytes += len(text)
        if len(self._node) > self.max_blocks:
            self.discard(next(iter(self._node)))

    def discard(self, key: int) -> None:
        found = self._node.pop(key, None)
        if found is None:
            return
        parent, size, text = found
        del self._child[found]
        self.text_bytes -= len(text)
        lengths = self._lengths[(parent, size)]
        count = lengths[len(text)] - 1
        if count:
            lengths[len(text)] = count
        else:
            del lengths[len(text)]
            if not lengths:
                del self._lengths[(parent, size)]

    def clear(self) -> None:
        self._child.clear()
        self._node.clear()
        self._lengths.clear()
        self.text_bytes = 0

    def walk(self, root: int, size: int, data: bytes) -> list[tuple[int, int]]:
        """The longest chain of kept blocks from `root` whose texts, one after another, are
        the start of `data`: (key, byte offset where the block's text ends) per block."""
        chain: list[tuple[int, int]] = []
        child = self._child
        lengths_of = self._lengths
        parent = root
        at = 0
        while True:
            lengths = lengths_of.get((parent, size))
            if not lengths:
                return chain
            for length in lengths:
                key = child.get((parent, size, data[at : at + length]))
                if key is not None:
                    break
            else:
                return chain
            at += length
            chain.append((key, at))
            parent = key
