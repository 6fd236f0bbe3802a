"""KVBlockIndex: blocks filed under the gateway's token-id keys, whatever the engine's hashes."""

from __future__ import annotations

from gateway_extproc.kvevents.index import KVBlockIndex
from gateway_extproc.kvevents.keys import chain_keys, root_key
from gateway_extproc.kvevents.wire import AllBlocksCleared, BlockRemoved, BlockStored

SIZE = 4
PROMPT = list(range(100, 124))  # six blocks of four tokens


def request_keys(tokens: list[int] = PROMPT, adapter: str | None = None) -> list[int]:
    return chain_keys(root_key(adapter), tokens, SIZE)


def store(hashes: list, tokens: list[int], parent: object = None, **extra: object) -> BlockStored:
    return BlockStored(tuple(hashes), parent, tuple(tokens), SIZE, **extra)  # type: ignore[arg-type]


def test_blocks_match_the_request_whatever_hashes_the_engine_used() -> None:
    index = KVBlockIndex()
    # Two engines with different hash seeds store the same first three blocks.
    index.apply("a", [store([1, 2, 3], PROMPT[:12])])
    index.apply("b", [store([b"x", b"y"], PROMPT[:8]), store([b"z"], PROMPT[8:12], parent=b"y")])
    assert index.longest_prefixes(request_keys(), ["a", "b"]) == {"a": 3, "b": 3}


def test_a_block_chained_to_its_parent_across_events_extends_the_prefix() -> None:
    index = KVBlockIndex()
    index.apply("a", [store([1], PROMPT[:4])])
    index.apply("a", [store([2, 3], PROMPT[4:12], parent=1)])
    assert index.longest_prefixes(request_keys(), ["a"]) == {"a": 3}


def test_a_block_whose_parent_was_never_seen_is_not_guessed() -> None:
    index = KVBlockIndex()
    index.apply("a", [store([2], PROMPT[4:8], parent=1)])
    assert index.longest_prefixes(request_keys(), ["a"]) == {}
    blocks = index.pod("a")
    assert blocks is not None and blocks.unkeyed == 1


def test_removal_by_engine_hash_shortens_the_prefix_and_stops_at_the_hole() -> None:
    index = KVBlockIndex()
    index.apply("a", [store([1, 2, 3, 4], PROMPT[:16])])
    index.apply("a", [BlockRemoved((3,))])
    # The engine's lookup stops at the first missing block; so does the index's.
    assert index.longest_prefixes(request_keys(), ["a"]) == {"a": 2}
    index.apply("a", [BlockRemoved((1,))])
    assert index.longest_prefixes(request_keys(), ["a"]) == {}


def test_all_blocks_cleared_empties_the_pod_only() -> None:
    index = KVBlockIndex()
    index.apply("a", [store([1, 2], PROMPT[:8])])
    index.apply("b", [store([1, 2], PROMPT[:8])])
    index.apply("a", [AllBlocksCleared()])
    assert index.longest_prefixes(request_keys(), ["a", "b"]) == {"b": 2}


def test_forgetting_a_pod_drops_its_blocks_and_its_entry() -> None:
    index = KVBlockIndex()
    index.apply("a", [store([1, 2], PROMPT[:8])])
    index.apply("b", [store([9], PROMPT[:4])])
    index.forget("a")
    assert index.pod("a") is None
    assert index.longest_prefixes(request_keys(), ["a", "b"]) == {"b": 1}
    index.forget("b")
    assert not any(index.holds(k) for k in request_keys())


def test_pods_holding_different_depths_each_get_their_own() -> None:
    index = KVBlockIndex()
    index.apply("a", [store([1, 2, 3, 4, 5, 6], PROMPT)])
    index.apply("b", [store([1, 2], PROMPT[:8])])
    index.apply("c", [store([1], PROMPT[:4])])
    index.apply("d", [store([1], [9, 9, 9, 9])])
    assert index.longest_prefixes(request_keys(), ["a", "b", "c", "d"]) == {"a": 6, "b": 2, "c": 1}
    assert index.longest_prefixes(request_keys(), ["b", "c"]) == {"b": 2, "c": 1}


def test_adapters_have_their_own_blocks() -> None:
    index = KVBlockIndex()
    index.apply("a", [store([1, 2], PROMPT[:8], lora_name="sql-lora")])
    assert index.longest_prefixes(request_keys(), ["a"]) == {}
    assert index.longest_prefixes(request_keys(adapter="sql-lora"), ["a"]) == {"a": 2}


def test_blocks_with_extra_hash_keys_beyond_the_adapter_are_not_matched() -> None:
    index = KVBlockIndex()
    # A cache salt (or an image) on the first block: a text request cannot share it.
    index.apply("a", [store([1, 2], PROMPT[:8], extra_keys=(("salt-123",), None))])
    assert index.longest_prefixes(request_keys(), ["a"]) == {}
    # The adapter name alone as extra key is what the adapter's own keys cover.
    index.apply("b", [store([1, 2], PROMPT[:8], lora_name="l", extra_keys=(("l",), ("l",)))])
    assert index.longest_prefixes(request_keys(adapter="l"), ["b"]) == {"b": 2}


def test_sliding_window_groups_are_not_indexed_and_their_removals_do_not_hit_full_ones() -> None:
    index = KVBlockIndex()
    index.apply(
        "a",
        [
            store([1, 2], PROMPT[:8], group_idx=0, spec_kind="full_attention"),
            store([1, 2], PROMPT[:8], group_idx=1, spec_kind="sliding_window"),
        ],
    )
    index.apply("a", [BlockRemoved((1, 2), group_idx=1)])
    assert index.longest_prefixes(request_keys(), ["a"]) == {"a": 2}


def test_offloaded_copies_keep_a_block_until_every_medium_dropped_it() -> None:
    index = KVBlockIndex()
    index.apply("a", [store([1, 2], PROMPT[:8], medium="GPU")])
    # An offloading connector reports the same blocks stored on CPU, without tokens.
    index.apply("a", [BlockStored((1, 2), None, (), SIZE, medium="CPU")])
    index.apply("a", [BlockRemoved((1, 2), medium="GPU")])
    assert index.longest_prefixes(request_keys(), ["a"]) == {"a": 2}
    index.apply("a", [BlockRemoved((1, 2), medium="CPU")])
    assert index.longest_prefixes(request_keys(), ["a"]) == {}


def test_a_replayed_duplicate_is_filed_once() -> None:
    index = KVBlockIndex()
    event = store([1, 2], PROMPT[:8])
    index.apply("a", [event, event])
    index.apply("a", [BlockRemoved((1, 2))])
    assert index.longest_prefixes(request_keys(), ["a"]) == {}
    blocks = index.pod("a")
    assert blocks is not None and blocks.size == 0 and not blocks.refs


def test_memory_is_bounded_per_pod_oldest_first() -> None:
    index = KVBlockIndex(max_blocks_per_pod=3)
    index.apply("a", [store([1, 2, 3, 4, 5, 6], PROMPT)])
    blocks = index.pod("a")
    assert blocks is not None and blocks.size == 3
    # The first three went; the prefix is broken at its start.
    assert index.longest_prefixes(request_keys(), ["a"]) == {}
    assert all(index.holds(k) for k in request_keys()[3:])


def test_block_size_and_trust_are_per_pod() -> None:
    index = KVBlockIndex()
    assert not index.trusted("a") and index.block_size("a") == 0
    index.apply("a", [store([1], PROMPT[:4])])
    index.set_trusted("a", True)
    assert index.trusted("a") and index.block_size("a") == SIZE
