"""KVBlockIndex: per pod, the blocks its engine reports cached, under the gateway's keys.

A BlockStored event names each block by the engine's hash and carries its tokens; the
block is filed under the gateway's own chained key over those tokens (`keys.py`), found
from its parent's key, so requests can be matched without knowing the engine's hash seed.
Each pod keeps engine hash -> key (per KV-cache group and medium) so that BlockRemoved,
which names engine hashes only, finds what to drop; AllBlocksCleared and pod deletion
drop everything. A reverse map key -> pods answers "which pods hold this prefix" in one
lookup per block.

Blocks the index cannot key are skipped, never guessed: a block whose parent it never saw
(it joined the stream late, or lost events), blocks of sliding-window or other
non-full-attention cache groups (they do not make a prefix hit on their own), and blocks
whose engine hash also covers extra keys other than the adapter (multimodal inputs, a
cache salt) that a text request cannot match.

Beside the keys, `texts` (`texts.py`) keeps the bytes of the blocks the events store in
batches, decoded on arrival by `decoder` (set by the request side, which owns the
tokenizers: model name -> ids-to-bytes function, or None when that model's tokenizer is
not loaded or not byte-level), so a long prompt can be matched by its text first.

Memory is bounded per pod (`max_blocks_per_pod` engine blocks, about 200 bytes each):
past it, the oldest blocks go first. Everything runs on the event loop; the request side
may read `holds` from a worker thread (single dict lookups, safe under the GIL).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from gateway_extproc.kvevents.keys import Adapter, chain_keys, root_key
from gateway_extproc.kvevents.texts import BlockTexts
from gateway_extproc.kvevents.wire import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EngineHash,
    Event,
)

FULL_ATTENTION = "full_attention"

# (KV-cache group, medium): engines that report neither have one tier, (None, None).
Tier = tuple[int | None, str | None]
# Token ids, block size -> the UTF-8 bytes each full block of them stands for.
Decode = Callable[[Sequence[int], int], list[bytes]]
# The name of a vocabulary (its tokenizer's) and its decoder: blocks decoded by one
# vocabulary are matched only against prompts tokenized by it.
TextDecoder = tuple[str, Decode]


@dataclass(slots=True)
class PodBlocks:
    """One pod's blocks. `trusted` is set by whoever watches the pod's event stream: False
    while that stream cannot be relied on (not connected, events lost)."""

    tiers: dict[Tier, dict[EngineHash, int]] = field(default_factory=dict)
    refs: dict[int, int] = field(default_factory=dict)  # key -> engine blocks filed under it
    block_size: int = 0
    trusted: bool = False
    size: int = 0  # engine blocks held, over every tier
    unkeyed: int = 0  # blocks skipped because they could not be keyed (see module doc)
    model: str = ""  # the (base) model the pod serves, whose tokenizer decodes its blocks


class KVBlockIndex:
    def __init__(
        self, *, max_blocks_per_pod: int = 262_144, max_text_blocks: int = 262_144
    ) -> None:
        if max_blocks_per_pod <= 0:
            raise ValueError("max_blocks_per_pod must be positive")
        self.max_blocks_per_pod = max_blocks_per_pod
        self.texts = BlockTexts(max_blocks=max_text_blocks)
        self.decoder: Callable[[str], TextDecoder | None] | None = None
        self._pods: dict[str, PodBlocks] = {}
        self._holders: dict[int, frozenset[str]] = {}
        # One shared frozenset per pod for keys only it holds (most keys): a set per key
        # would cost several times the key itself.
        self._alone: dict[str, frozenset[str]] = {}

    # -- reading ------------------------------------------------------------------------

    def pod(self, pod_key: str) -> PodBlocks | None:
        return self._pods.get(pod_key)

    def trusted(self, pod_key: str) -> bool:
        blocks = self._pods.get(pod_key)
        return blocks is not None and blocks.trusted

    def block_size(self, pod_key: str) -> int:
        """Tokens per block on this pod (0 until a BlockStored event said)."""
        blocks = self._pods.get(pod_key)
        return blocks.block_size if blocks is not None else 0

    def holds(self, key: int) -> bool:
        """Some pod holds the block (and so the prefix) `key` stands for."""
        return key in self._holders

    def longest_prefixes(self, keys: Sequence[int], pod_keys: Iterable[str]) -> dict[str, int]:
        """Pod -> number of leading blocks of `keys` it holds, for the pods among `pod_keys`
        holding at least the first (as the engine's own lookup, it stops at the first miss)."""
        found: dict[str, int] = {}
        alive: set[str] | None = None
        holders_of = self._holders
        depth = 0
        for depth, key in enumerate(keys):
            holders = holders_of.get(key)
            if holders is None:
                break
            if alive is None:
                alive = set(pod_keys) & holders
            elif not alive <= holders:
                kept = alive & holders
                for pod_key in alive - kept:
                    found[pod_key] = depth
                alive = kept
            if not alive:
                break
        else:
            depth = len(keys)
        for pod_key in alive or ():
            found[pod_key] = depth
        return found

    def pods(self) -> list[str]:
        return list(self._pods)

    # -- writing ------------------------------------------------------------------------

    def track(self, pod_key: str, model: str | None = None) -> PodBlocks:
        """The pod's entry, created empty (untrusted) if new; `model` names the model whose
        tokenizer decodes its blocks' text."""
        blocks = self._pods.get(pod_key)
        if blocks is None:
            blocks = self._pods[pod_key] = PodBlocks()
        if model is not None:
            blocks.model = model
        return blocks

    def set_trusted(self, pod_key: str, trusted: bool) -> None:
        self.track(pod_key).trusted = trusted

    def apply(self, pod_key: str, events: Iterable[Event]) -> None:
        blocks = self.track(pod_key)
        for event in events:
            if isinstance(event, BlockStored):
                self._stored(pod_key, blocks, event)
            elif isinstance(event, BlockRemoved):
                self._removed(pod_key, blocks, event)
            elif isinstance(event, AllBlocksCleared):
                self.clear(pod_key)

    def clear(self, pod_key: str) -> None:
        """Drop every block of the pod, keeping its entry (and whether it is trusted)."""
        blocks = self._pods.get(pod_key)
        if blocks is None:
            return
        for key in blocks.refs:
            self._unlink(key, pod_key)
        blocks.tiers.clear()
        blocks.refs.clear()
        blocks.size = 0

    def forget(self, pod_key: str) -> None:
        """The pod is gone: drop it and everything known about it."""
        self.clear(pod_key)
        self._pods.pop(pod_key, None)
        self._alone.pop(pod_key, None)

    # -- events -------------------------------------------------------------------------

    def _stored(self, pod_key: str, blocks: PodBlocks, event: BlockStored) -> None:
        if event.spec_kind not in (None, FULL_ATTENTION):
            return
        tier: Tier = (event.group_idx, event.medium)
        if not event.token_ids:
            self._relocated(pod_key, blocks, tier, event.block_hashes)
            return
        adapter: Adapter = event.lora_name
        if adapter is None and event.lora_id is not None:
            adapter = event.lora_id  # an older engine names adapters by number only
        if event.parent_hash is None:
            parent: int | None = root_key(adapter)
        else:
            parent = self._key_of(blocks, tier, event.parent_hash)
        size = event.block_size
        usable = _usable_blocks(event)
        if parent is None or usable == 0:
            blocks.unkeyed += len(event.block_hashes)
            return
        blocks.unkeyed += len(event.block_hashes) - usable
        blocks.block_size = size
        keys = chain_keys(parent, event.token_ids[: usable * size], size)
        table = blocks.tiers.setdefault(tier, {})
        for engine_hash, key in zip(event.block_hashes, keys, strict=False):
            self._file(pod_key, blocks, table, engine_hash, key)
        if len(keys) >= 2:  # a prefill's blocks, not generated ones (texts.py says why)
            self._keep_texts(blocks, parent, keys, event.token_ids, size)

    def _keep_texts(
        self, blocks: PodBlocks, parent: int, keys: list[int], tokens: Sequence[int], size: int
    ) -> None:
        found = self.decoder(blocks.model) if self.decoder is not None else None
        if found is None:
            return
        vocabulary, decode = found
        # Only blocks still held (the size bound may have dropped the first ones already).
        self.texts.add_chain(vocabulary, parent, size, decode(tokens, size), keys, self._holders)

    def _relocated(
        self, pod_key: str, blocks: PodBlocks, tier: Tier, hashes: Sequence[EngineHash]
    ) -> None:
        """Known blocks now also held in another medium (offloaded): same keys."""
        table = blocks.tiers.setdefault(tier, {})
        for engine_hash in hashes:
            key = self._key_of(blocks, tier, engine_hash)
            if key is None:
                blocks.unkeyed += 1
            else:
                self._file(pod_key, blocks, table, engine_hash, key)

    def _removed(self, pod_key: str, blocks: PodBlocks, event: BlockRemoved) -> None:
        table = blocks.tiers.get((event.group_idx, event.medium))
        if table is None:
            return
        for engine_hash in event.block_hashes:
            key = table.pop(engine_hash, None)
            if key is not None:
                blocks.size -= 1
                self._unref(pod_key, blocks, key)

    def _key_of(self, blocks: PodBlocks, tier: Tier, engine_hash: EngineHash) -> int | None:
        table = blocks.tiers.get(tier)
        key = table.get(engine_hash) if table is not None else None
        if key is not None:
            return key
        # The parent may live in another medium of the same group (offloaded).
        for (group, _), other in blocks.tiers.items():
            if group == tier[0] and (key := other.get(engine_hash)) is not None:
                return key
        return None

    def _file(
        self,
        pod_key: str,
        blocks: PodBlocks,
        table: dict[EngineHash, int],
        engine_hash: EngineHash,
        key: int,
    ) -> None:
        old = table.get(engine_hash)
        if old == key:
            return  # a duplicate (a replay overlapping what was already seen)
        if old is not None:
            self._unref(pod_key, blocks, old)
        else:
            blocks.size += 1
        table[engine_hash] = key
        count = blocks.refs.get(key, 0)
        blocks.refs[key] = count + 1
        if count == 0:
            self._link(key, pod_key)
        if blocks.size > self.max_blocks_per_pod:
            self._drop_oldest(pod_key, blocks)

    def _drop_oldest(self, pod_key: str, blocks: PodBlocks) -> None:
        # Dicts keep insertion order: the first entry of the largest tier is its oldest.
        table = max(blocks.tiers.values(), key=len)
        engine_hash = next(iter(table))
        key = table.pop(engine_hash)
        blocks.size -= 1
        self._unref(pod_key, blocks, key)

    def _unref(self, pod_key: str, blocks: PodBlocks, key: int) -> None:
        count = blocks.refs[key] - 1
        if count:
            blocks.refs[key] = count
        else:
            del blocks.refs[key]
            self._unlink(key, pod_key)

    def _link(self, key: int, pod_key: str) -> None:
        holders = self._holders.get(key)
        if holders is None:
            alone = self._alone.get(pod_key)
            if alone is None:
                alone = self._alone[pod_key] = frozenset((pod_key,))
            self._holders[key] = alone
        else:
            self._holders[key] = holders | {pod_key}

    def _unlink(self, key: int, pod_key: str) -> None:
        holders = self._holders.get(key)
        if holders is None or pod_key not in holders:
            return
        if len(holders) == 1:
            del self._holders[key]
            self.texts.discard(key)
            return
        rest = holders - {pod_key}
        if len(rest) == 1:
            (other,) = rest
            rest = self._alone.get(other, rest)
        self._holders[key] = rest


def _usable_blocks(event: BlockStored) -> int:
    """How many leading blocks of the event a text request can match: those whose extra
    hash keys are none or the adapter name alone."""
    extra = event.extra_keys
    count = len(event.block_hashes)
    if not extra:
        return count
    for i in range(count):
        keys = extra[i] if i < len(extra) else None
        if keys is None:
            continue
        if not isinstance(keys, (list, tuple)) or any(k != event.lora_name for k in keys):
            return i
    return count
