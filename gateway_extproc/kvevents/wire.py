"""vLLM's KV-cache event wire format, read leniently.

An engine started with `--kv-events-config '{"enable_kv_cache_events": true, "publisher":
"zmq", ...}'` publishes ZMQ multipart messages `[topic, seq, payload]`: `seq` is an 8-byte
big-endian counter from 0, `payload` a msgpack `EventBatch`. Engines have written the
batch and its events two ways, and both are read here:

- arrays (msgspec `array_like`): `[ts, events, data_parallel_rank?]`, each event a tagged
  array `["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id,
  medium, lora_name, extra_keys, group_idx, kv_cache_spec_kind, ...]`,
  `["BlockRemoved", block_hashes, medium, group_idx, ...]`, `["AllBlocksCleared", ...]`;
- maps: `{"ts", "events", "data_parallel_rank"}` with events `{"type": "BlockStored",
  "block_hashes": ..., ...}`.

Block hashes are ints (older engines) or bytes (sha256 digests). Fields after the ones
read here are ignored, so newer engines' additions do no harm. An event that cannot be
read is counted in `EventBatch.malformed` and skipped; the others of its batch stand. A
message or payload that cannot be read at all raises `WireError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

import msgpack

EngineHash = int | bytes

STORED = "BlockStored"
REMOVED = "BlockRemoved"
CLEARED = "AllBlocksCleared"

SEQ_BYTES = 8
# The replay socket's end-of-replay marker: -1 as a signed 8-byte big-endian integer.
END_OF_REPLAY = (-1).to_bytes(SEQ_BYTES, "big", signed=True)


class WireError(ValueError):
    """A message or payload that is not the event format; the message says what."""


@dataclass(frozen=True, slots=True)
class BlockStored:
    """Full blocks the engine cached: `token_ids` holds `block_size` tokens per hash."""

    block_hashes: tuple[EngineHash, ...]
    parent_hash: EngineHash | None
    token_ids: tuple[int, ...]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: tuple[Any, ...] | None = None
    group_idx: int | None = None
    spec_kind: str | None = None


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: tuple[EngineHash, ...]
    medium: str | None = None
    group_idx: int | None = None


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    medium: str | None = None


Event = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True, slots=True)
class EventBatch:
    ts: float
    events: tuple[Event, ...]
    data_parallel_rank: int | None = None
    malformed: int = 0  # events skipped because they could not be read
    unknown: int = 0  # events of a kind this reader does not know (a newer engine's)


def split_message(frames: Sequence[bytes]) -> tuple[bytes, int, bytes]:
    """`[topic, seq, payload]` -> (topic, seq, payload)."""
    if len(frames) != 3:
        raise WireError(f"expected 3 frames [topic, seq, payload], got {len(frames)}")
    topic, seq, payload = frames
    if len(seq) != SEQ_BYTES:
        raise WireError(f"the sequence frame has {len(seq)} bytes, not {SEQ_BYTES}")
    return bytes(topic), int.from_bytes(seq, "big"), bytes(payload)


def decode_batch(payload: bytes) -> EventBatch:
    try:
        doc = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise WireError(f"the payload is not msgpack: {type(exc).__name__}") from None
    if isinstance(doc, dict):
        ts, events, rank = doc.get("ts"), doc.get("events"), doc.get("data_parallel_rank")
    elif isinstance(doc, list) and len(doc) >= 2:
        ts, events = doc[0], doc[1]
        rank = doc[2] if len(doc) > 2 else None
    else:
        raise WireError("the payload is not an event batch [ts, events, ...]")
    if not _is_number(ts) or not isinstance(events, list):
        raise WireError("the event batch needs a number `ts` and a list `events`")
    decoded: list[Event] = []
    malformed = unknown = 0
    for raw in events:
        try:
            event = _event(raw)
        except _Unknown:
            unknown += 1
            continue
        except (WireError, TypeError, ValueError):
            malformed += 1
            continue
        decoded.append(event)
    return EventBatch(
        ts=float(ts),
        events=tuple(decoded),
        data_parallel_rank=rank if _is_int(rank) else None,
        malformed=malformed,
        unknown=unknown,
    )


class _Unknown(Exception):
    pass


_STORED_FIELDS = (
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
    "extra_keys",
    "group_idx",
    "kv_cache_spec_kind",
)
_REMOVED_FIELDS = ("block_hashes", "medium", "group_idx")
_CLEARED_FIELDS = ("medium",)


def _event(raw: Any) -> Event:
    if isinstance(raw, list) and raw and isinstance(raw[0], str):
        tag, values = raw[0], raw[1:]
        fields = _fields_for(tag)
        found = dict(zip(fields, values, strict=False))
    elif isinstance(raw, dict) and isinstance(raw.get("type"), str):
        tag = raw["type"]
        found = {name: raw.get(name) for name in _fields_for(tag)}
    else:
        raise WireError("an event is a tagged array or a map with `type`")
    if tag == STORED:
        return _stored(found)
    if tag == REMOVED:
        return BlockRemoved(
            block_hashes=_hashes(found.get("block_hashes")),
            medium=_optional_str(found.get("medium")),
            group_idx=_optional_int(found.get("group_idx")),
        )
    return AllBlocksCleared(medium=_optional_str(found.get("medium")))


def _fields_for(tag: str) -> tuple[str, ...]:
    if tag == STORED:
        return _STORED_FIELDS
    if tag == REMOVED:
        return _REMOVED_FIELDS
    if tag == CLEARED:
        return _CLEARED_FIELDS
    raise _Unknown(tag)


def _stored(found: dict[str, Any]) -> BlockStored:
    hashes = _hashes(found.get("block_hashes"))
    parent = found.get("parent_block_hash")
    if parent is not None and not _is_hash(parent):
        raise WireError("parent_block_hash is not an int, bytes or nil")
    tokens = found.get("token_ids")
    if not isinstance(tokens, list) or not all(_is_int(t) for t in tokens):
        raise WireError("token_ids is not a list of ints")
    size = found.get("block_size")
    if not _is_int(size) or size <= 0:
        raise WireError("block_size is not a positive int")
    # Without tokens the event only says where known blocks now also live (offloading).
    if tokens and len(tokens) != len(hashes) * size:
        raise WireError("token_ids do not fill block_size tokens per block hash")
    extra = found.get("extra_keys")
    return BlockStored(
        block_hashes=hashes,
        parent_hash=parent,
        token_ids=tuple(tokens),
        block_size=size,
        lora_id=_optional_int(found.get("lora_id")),
        medium=_optional_str(found.get("medium")),
        lora_name=_optional_str(found.get("lora_name")),
        extra_keys=tuple(extra) if isinstance(extra, list) else None,
        group_idx=_optional_int(found.get("group_idx")),
        spec_kind=_optional_str(found.get("kv_cache_spec_kind")),
    )


def _hashes(raw: Any) -> tuple[EngineHash, ...]:
    if not isinstance(raw, list) or not all(_is_hash(h) for h in raw):
        raise WireError("block_hashes is not a list of ints or bytes")
    return tuple(raw)


def _is_hash(value: Any) -> bool:
    return (_is_int(value)) or (isinstance(value, bytes) and len(value) > 0)


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _optional_int(value: Any) -> int | None:
    return value if _is_int(value) else None


def _optional_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


# -- writing (the simulator publishes in this format) -------------------------------------


def encode_batch(
    ts: float, events: Sequence[Event], data_parallel_rank: int | None = None
) -> bytes:
    """`events` as an array-like msgpack EventBatch, as vLLM's publisher writes it."""
    body: list[Any] = [ts, [_encode_event(e) for e in events]]
    if data_parallel_rank is not None:
        body.append(data_parallel_rank)
    return msgpack.packb(body, use_bin_type=True)  # type: ignore[no-any-return]


def _encode_event(event: Event) -> list[Any]:
    if isinstance(event, BlockStored):
        return [
            STORED,
            list(event.block_hashes),
            event.parent_hash,
            list(event.token_ids),
            event.block_size,
            event.lora_id,
            event.medium,
            event.lora_name,
        ]
    if isinstance(event, BlockRemoved):
        return [REMOVED, list(event.block_hashes), event.medium]
    return [CLEARED]


def message(topic: bytes, seq: int, payload: bytes) -> list[bytes]:
    """The multipart message publishing `payload` as number `seq`."""
    return [topic, seq.to_bytes(SEQ_BYTES, "big"), payload]
