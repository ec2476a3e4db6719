"""Wire messages of the all-reduce and the star all-reduce.

A message is one shoal frame (:mod:`shoal.transport.framing`)::

    u32 header length | msgpack map {t, v, o: tag, vh: view hash, ...fields} | payload

Tensors travel as the raw payload (a chunk encoded by :mod:`shoal.collectives.codec`),
never inside msgpack. :func:`decode` checks the total size against the operation's limit
and the header length before parsing, then every field's type against the schema of the
message type; it never unpickles and never allocates for a payload it has not sized.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shoal.collectives.codec import Payload
from shoal.collectives.errors import MalformedMessage, MessageTooLarge, NotAMember, ViewMismatch
from shoal.transport.errors import FrameError
from shoal.transport.framing import PREFIX_SIZE, decode_header, encode_header

if TYPE_CHECKING:
    from shoal.collectives.view import View

VERSION = 3  # 3: BLAKE3 chunk digests; 2: sha256 (blake2b before), no crc32 in DATA, DONE
MAX_HEADER = 64 * 1024
_PREFIX = struct.Struct(">I")

Check = Callable[[Any], bool]


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**31


def _str(v: Any) -> bool:
    return isinstance(v, str) and 0 < len(v) <= 256


def _digest(v: Any) -> bool:
    return isinstance(v, bytes) and len(v) == 16


def _peers(v: Any) -> bool:
    return isinstance(v, list) and len(v) <= 256 and all(_str(p) for p in v)


def _map(v: Any) -> bool:
    return isinstance(v, dict) and len(v) <= 16


def _decision(v: Any) -> bool:
    return (
        isinstance(v, dict)
        and _int(v.get("ve"))
        and _int(v.get("vn"))
        and _peers(v.get("s"))
        and isinstance(v.get("d"), list)
        and len(v["d"]) <= 256
        and all(_digest(d) for d in v["d"])
    )


def _optional_decision(v: Any) -> bool:
    return v is None or _decision(v)


def _accepted_epoch(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and -1 <= v < 2**31


# type -> {field: check} ("n" is the frame's payload size, so never a field). Payload-carrying types are listed in PAYLOAD.
SCHEMA: dict[str, dict[str, Check]] = {
    # all-reduce, data plane
    "DATA": {"c": _int, "x": _map},
    "REPL": {"c": _int, "h": _digest},
    "REPL_ACK": {"c": _int, "h": _digest},
    "FETCH": {"c": _int, "h": _digest},
    "CHUNK": {"c": _int, "h": _digest},
    "NOHAVE": {"c": _int, "h": _digest},
    "DONE": {},
    # all-reduce, control plane
    "SUSPECT": {"p": _str, "k": _str},
    "AMEND": {"e": _int, "m": _int, "s": _peers},
    "CHUNK_DONE": {"c": _int, "e": _int, "m": _int, "h": _digest},
    "RCOMMIT": {"e": _int, "val": _decision},
    "RC_ACK": {"e": _int},
    "CHOSEN": {"e": _int, "val": _decision},
    "NACK": {"e": _int},
    "RECOVER": {"e": _int},
    "RSTATE": {
        "e": _int,
        "ae": _accepted_epoch,
        "acc": _optional_decision,
        "ve": _int,
        "vn": _int,
        "s": _peers,
        "sus": _peers,
    },
    "ABORT": {"why": _str},
    # star all-reduce
    "SDATA": {"x": _map},
    "SRESULT": {"h": _digest, "s": _peers},
}
PAYLOAD = frozenset({"DATA", "REPL", "CHUNK", "SDATA", "SRESULT"})


@dataclass(frozen=True, slots=True)
class Message:
    type: str
    tag: str
    vh: bytes
    fields: Mapping[str, Any]
    payload: Payload = b""


def encode_parts(
    kind: str, tag: str, vh: bytes, fields: Mapping[str, Any], payload: Payload = b""
) -> tuple[bytes, Payload]:
    """One frame as (length prefix and header, payload): the payload is not copied, the
    driver writes the two parts in turn."""
    header = {"t": kind, "v": VERSION, "o": tag, "vh": vh, **fields}
    return encode_header(header, len(payload)), payload


def encode(
    kind: str, tag: str, vh: bytes, fields: Mapping[str, Any], payload: Payload = b""
) -> bytes:
    """One frame as one bytes object (the payload copied into it)."""
    return b"".join(encode_parts(kind, tag, vh, fields, payload))


def header_of(
    peer: str, raw: bytes | memoryview, *, max_header: int = MAX_HEADER
) -> dict[str, Any]:
    """Parse only the header (after checking its declared length): for routing by tag."""
    if len(raw) < PREFIX_SIZE:
        raise MalformedMessage(peer, "shorter than a frame prefix")
    (hlen,) = _PREFIX.unpack_from(raw)
    if hlen > max_header:
        raise MessageTooLarge(peer, hlen, max_header)
    if len(raw) < PREFIX_SIZE + hlen:
        raise MalformedMessage(peer, "truncated header")
    try:
        header = decode_header(bytes(raw[PREFIX_SIZE : PREFIX_SIZE + hlen]))
    except FrameError as exc:
        raise MalformedMessage(peer, str(exc)) from exc
    check_envelope(peer, header)
    return header


def check_envelope(peer: str, header: Mapping[str, Any]) -> None:
    """The fields every message carries: the protocol version, the tag, the view hash."""
    if header.get("v") != VERSION:
        raise MalformedMessage(peer, f"protocol version {header.get('v')!r}, expected {VERSION}")
    if not _str(header.get("o")) or not _digest(header.get("vh")):
        raise MalformedMessage(peer, "no operation tag or view hash")


def decode(peer: str, raw: bytes | memoryview, *, max_bytes: int) -> Message:
    """Validate and parse one message from ``peer`` (``max_bytes``: the whole frame)."""
    if len(raw) > max_bytes:
        raise MessageTooLarge(peer, len(raw), max_bytes)
    header = header_of(peer, raw)
    start = PREFIX_SIZE + _PREFIX.unpack_from(raw)[0]
    return _message(peer, header, memoryview(raw)[start:])


def decode_parsed(
    peer: str, header: Mapping[str, Any], payload: Payload, *, max_bytes: int
) -> Message:
    """:func:`decode` of a frame whose header a transport's ``FrameDecoder`` parsed
    already (and whose payload it read into its own buffer, sized from the header after
    checking it against its limit)."""
    if len(payload) > max_bytes:
        raise MessageTooLarge(peer, len(payload), max_bytes)
    check_envelope(peer, header)
    return _message(peer, header, payload)


def _message(peer: str, header: Mapping[str, Any], payload: Payload) -> Message:
    kind = header["t"]
    schema = SCHEMA.get(kind)
    if schema is None:
        raise MalformedMessage(peer, f"unknown message type {kind!r}")
    for name, check in schema.items():
        if not check(header.get(name)):
            raise MalformedMessage(peer, f"{kind}: bad field {name!r}: {header.get(name)!r}")
    size = header.get("n", 0)
    if not _int(size) or (size and kind not in PAYLOAD):
        raise MalformedMessage(peer, f"{kind}: bad payload size {size!r}")
    if len(payload) != size:
        raise MalformedMessage(peer, f"{kind}: payload is {len(payload)} bytes, header says {size}")
    fields = {k: header[k] for k in schema}
    return Message(kind, header["o"], header["vh"], fields, payload)


def max_message_bytes(max_payload: int) -> int:
    """The frame limit for an operation whose largest payload is ``max_payload`` bytes."""
    return PREFIX_SIZE + MAX_HEADER + max_payload


def decode_for(view: View, sender: str, raw: bytes | memoryview, *, max_bytes: int) -> Message:
    """:func:`decode`, then check that ``sender`` is a member of ``view`` and that the
    message belongs to this operation (its tag and view hash); raises ``Rejected``."""
    return _check_for(view, sender, decode(sender, raw, max_bytes=max_bytes))


def frame_for(
    view: View, sender: str, header: Mapping[str, Any], payload: Payload, *, max_bytes: int
) -> Message:
    """:func:`decode_for` of a frame a transport parsed already (:func:`decode_parsed`)."""
    return _check_for(view, sender, decode_parsed(sender, header, payload, max_bytes=max_bytes))


def _check_for(view: View, sender: str, msg: Message) -> Message:
    """``msg`` from ``sender``, after checking that ``sender`` is a member of ``view`` and
    that the message belongs to this operation (its tag and view hash)."""
    if sender not in view.peers:
        raise NotAMember(sender, f"not a member of {view.tag!r}")
    if msg.tag != view.tag or msg.vh != view.vh:
        raise ViewMismatch(sender, f"operation {msg.tag!r} with another view hash")
    return msg
