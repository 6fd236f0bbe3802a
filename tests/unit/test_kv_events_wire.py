"""vLLM's KV-cache event wire format: every event kind, both shapes engines have written,
int and bytes hashes, newer engines' extra fields, and garbage that must only be counted."""

from __future__ import annotations

import msgpack
import pytest

from gateway_extproc.kvevents.wire import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    WireError,
    decode_batch,
    encode_batch,
    split_message,
)

SHA = bytes(range(32))  # a sha256-sized hash, as newer engines send


def pack(doc: object) -> bytes:
    return msgpack.packb(doc, use_bin_type=True)


def stored(hashes: list, parent: object = None, tokens: list[int] | None = None, size: int = 4):
    tokens = tokens if tokens is not None else list(range(len(hashes) * size))
    return ["BlockStored", hashes, parent, tokens, size, None, "GPU"]


def test_array_shaped_batch_with_every_event_kind() -> None:
    payload = pack(
        [
            1700000000.5,
            [
                stored([11, 12], parent=None, tokens=[1, 2, 3, 4, 5, 6, 7, 8]),
                ["BlockRemoved", [11], "GPU"],
                ["AllBlocksCleared"],
            ],
            3,
        ]
    )
    batch = decode_batch(payload)
    assert batch.ts == 1700000000.5
    assert batch.data_parallel_rank == 3
    assert batch.malformed == batch.unknown == 0
    first, second, third = batch.events
    assert first == BlockStored(
        block_hashes=(11, 12),
        parent_hash=None,
        token_ids=(1, 2, 3, 4, 5, 6, 7, 8),
        block_size=4,
        medium="GPU",
    )
    assert second == BlockRemoved(block_hashes=(11,), medium="GPU")
    assert isinstance(third, AllBlocksCleared)


def test_map_shaped_events_as_engines_without_array_like_send_them() -> None:
    payload = pack(
        [
            2.0,
            [
                {
                    "type": "BlockStored",
                    "block_hashes": [SHA],
                    "parent_block_hash": None,
                    "token_ids": [5, 6, 7, 8],
                    "block_size": 4,
                    "lora_id": None,
                    "medium": "GPU",
                    "lora_name": "adapter-x",
                    "extra_keys": [None],
                    "group_idx": 0,
                    "kv_cache_spec_kind": "full_attention",
                },
                {"type": "BlockRemoved", "block_hashes": [SHA], "medium": "GPU", "group_idx": 0},
                {"type": "AllBlocksCleared"},
            ],
            0,
        ]
    )
    batch = decode_batch(payload)
    event = batch.events[0]
    assert isinstance(event, BlockStored)
    assert event.block_hashes == (SHA,)
    assert event.lora_name == "adapter-x"
    assert event.group_idx == 0 and event.spec_kind == "full_attention"
    assert batch.events[1] == BlockRemoved(block_hashes=(SHA,), medium="GPU", group_idx=0)
    assert isinstance(batch.events[2], AllBlocksCleared)


def test_a_map_shaped_batch_reads_too() -> None:
    batch = decode_batch(pack({"ts": 1, "events": [["AllBlocksCleared"]]}))
    assert batch.events == (AllBlocksCleared(),) and batch.data_parallel_rank is None


def test_bytes_hashes_and_a_bytes_parent() -> None:
    batch = decode_batch(pack([0.0, [stored([SHA, b"\x01" * 8], parent=b"\xff" * 32)]]))
    (event,) = batch.events
    assert isinstance(event, BlockStored)
    assert event.block_hashes == (SHA, b"\x01" * 8)
    assert event.parent_hash == b"\xff" * 32


def test_fields_a_newer_engine_appends_are_ignored() -> None:
    event = [*stored([1]), "lora", [None], 0, "full_attention", None, "a field from 2030", 42]
    removed = ["BlockRemoved", [1], "GPU", 0, "more", {"x": 1}]
    cleared = ["AllBlocksCleared", "GPU", "more"]
    batch = decode_batch(pack([0.0, [event, removed, cleared], 0, "batch extra"]))
    assert batch.malformed == 0
    assert [type(e).__name__ for e in batch.events] == [
        "BlockStored",
        "BlockRemoved",
        "AllBlocksCleared",
    ]


def test_events_missing_their_optional_tail_read_as_older_engines_sent_them() -> None:
    # vLLM's first version: no medium, no lora_name.
    batch = decode_batch(
        pack([0.0, [["BlockStored", [1], None, [1, 2], 2, None], ["BlockRemoved", [1]]]])
    )
    assert batch.malformed == 0
    assert batch.events[0].medium is None  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "bad_event",
    [
        ["BlockStored", "not a list", None, [1, 2], 2, None, "GPU"],
        ["BlockStored", [1], None, [1, 2, 3], 2, None, "GPU"],  # tokens do not fill the block
        ["BlockStored", [1], None, [1, "x"], 2, None, "GPU"],
        ["BlockStored", [1], None, [1, 2], 0, None, "GPU"],
        ["BlockStored", [1], 1.5, [1, 2], 2, None, "GPU"],
        ["BlockStored", [True], None, [1, 2], 2, None, "GPU"],
        ["BlockStored", [1]],  # fields missing
        ["BlockRemoved", [b""], "GPU"],
        ["BlockRemoved"],
        [7, 1, 2],
        "BlockStored",
        None,
        {"no": "type"},
    ],
)
def test_an_unreadable_event_is_counted_and_the_rest_of_its_batch_stands(bad_event: object) -> None:
    batch = decode_batch(pack([0.0, [bad_event, ["AllBlocksCleared"]]]))
    assert batch.malformed == 1
    assert batch.events == (AllBlocksCleared(),)


def test_an_unknown_event_kind_is_counted_apart_and_skipped() -> None:
    batch = decode_batch(pack([0.0, [["BlockUpdated", 1, 2], ["AllBlocksCleared"]]]))
    assert (batch.unknown, batch.malformed) == (1, 0)
    assert batch.events == (AllBlocksCleared(),)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",  # a byte msgpack never uses
        b"not msgpack at all \x00\xff",
        pack("a string"),
        pack([1.0]),
        pack(["ts", []]),
        pack([1.0, "events"]),
        pack({"events": []}),
        pack([1.0, [["BlockStored"]]])[:-3],  # truncated
    ],
)
def test_a_payload_that_is_not_an_event_batch_raises_a_wire_error(payload: bytes) -> None:
    with pytest.raises(WireError):
        decode_batch(payload)


def test_split_message_reads_topic_sequence_and_payload() -> None:
    topic, seq, payload = split_message([b"kv@pod@m", (2**40 + 7).to_bytes(8, "big"), b"x"])
    assert (topic, seq, payload) == (b"kv@pod@m", 2**40 + 7, b"x")


@pytest.mark.parametrize(
    "frames",
    [[b"x"], [b"t", b"\x00" * 8], [b"t", b"\x00" * 7, b"p"], [b"t", b"\x00" * 8, b"p", b"q"]],
)
def test_split_message_refuses_other_shapes(frames: list[bytes]) -> None:
    with pytest.raises(WireError):
        split_message(frames)


def test_what_the_simulator_writes_reads_back() -> None:
    events = [
        BlockStored((2**64 - 1,), None, (1, 2), 2, lora_name="a", medium="GPU"),
        BlockRemoved((2**64 - 1,), "GPU"),
        AllBlocksCleared(),
    ]
    assert decode_batch(encode_batch(5.0, events)).events == tuple(events)
