"""Circuit Relay v2, client side: reserve a slot on a relay and dial a peer through one.

A relayed address has the form ``<relay addr>/p2p/<relay>/p2p-circuit/p2p/<target>``.
py-libp2p 0.8.1's swarm drops such addresses before dialing (``Swarm.dial_peer``), and
its ``CircuitV2Transport`` first walks every circuit address cached in the peerstore and
tries a reservation on each dial. Both steps are a few lines of wire protocol, so they are
done here directly: one HOP stream, one message each way, then the normal security and
muxer upgrade on top of the stream.

The relay side (the HOP service) is py-libp2p's ``CircuitV2Protocol``; see nat.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.connection_types import ConnectionType
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as PbPeerId
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from libp2p.security.pnet.protector import new_protected_conn
from libp2p.security.pnet.psk_conn import PskConn

from shoal.transport.errors import DialError, RelayError

__all__ = [
    "HOP_PROTOCOL",
    "Reservation",
    "circuit_addr",
    "conn_is_relayed",
    "dial_circuit",
    "is_circuit_addr",
    "reserve",
    "split_circuit_addr",
]

CIRCUIT = "/p2p-circuit"
# One HOP exchange is a single small message each way; a relay slower than this is
# treated as down (the caller moves on to another relay).
HOP_TIMEOUT = 5.0


# py-libp2p 0.8.1's pnet wrapper (PskConn) does not pass on the connection type and the
# transport addresses of the connection it wraps, so in a private swarm every connection,
# relayed ones included, reads as UNKNOWN with the peerstore's addresses: relayed links
# looked direct. Process-wide by nature, like host.py's dial-delay workaround.
def _psk_transport_addresses(self: PskConn) -> list[multiaddr.Multiaddr]:
    return list(self._conn.get_transport_addresses())


def _psk_connection_type(self: PskConn) -> ConnectionType:
    return self._conn.get_connection_type()


PskConn.get_transport_addresses = _psk_transport_addresses
PskConn.get_connection_type = _psk_connection_type


@dataclass(frozen=True, slots=True)
class Reservation:
    """A slot on a relay: other peers may reach us through it until ``expires_at``.

    ``expires_at`` is on trio's clock (``trio.current_time()``), not wall time.
    ``relay_addrs`` are the relay's own full addresses (ending in /p2p/<relay>).
    """

    relay: ID
    expires_at: float
    relay_addrs: tuple[str, ...]


def is_circuit_addr(addr: str) -> bool:
    return CIRCUIT + "/" in addr or addr.endswith(CIRCUIT)


def conn_is_relayed(conn: object) -> bool:
    """Whether a swarm connection runs through a relay (py-libp2p marks it two ways)."""
    try:
        kind = conn.get_connection_type()  # type: ignore[attr-defined]
        if kind != ConnectionType.UNKNOWN:
            return bool(kind == ConnectionType.RELAYED)
        addrs = conn.get_transport_addresses()  # type: ignore[attr-defined]
    except Exception:
        return False
    return any(is_circuit_addr(str(a)) for a in addrs)


def circuit_addr(relay_addr: str, target: ID) -> str:
    """``relay_addr`` (ending in /p2p/<relay>) extended to reach ``target`` through it."""
    return f"{relay_addr}{CIRCUIT}/p2p/{target}"


def split_circuit_addr(addr: str) -> tuple[str, ID, ID]:
    """``(relay_addr, relay_id, target_id)`` of a full circuit address.

    Raises ValueError for anything that is not ``<addr>/p2p/<relay>/p2p-circuit/p2p/<id>``.
    """
    relay_part, sep, target_part = addr.partition(CIRCUIT)
    if not sep or not target_part.startswith("/p2p/") or "/p2p/" not in relay_part:
        raise ValueError(f"not a circuit address <relay>/p2p/<id>/p2p-circuit/p2p/<id>: {addr}")
    target = ID.from_base58(target_part.removeprefix("/p2p/").strip("/"))
    relay = ID.from_base58(relay_part.rsplit("/p2p/", 1)[1].strip("/"))
    return relay_part, relay, target


async def reserve(host: IHost, relay: ID) -> Reservation:
    """Ask ``relay`` (already connected) for a reservation; raises RelayError if refused."""
    try:
        with trio.fail_after(HOP_TIMEOUT):
            stream = await host.new_stream(relay, [HOP_PROTOCOL])
            try:
                request = HopMessage(
                    type=HopMessage.RESERVE, peer=PbPeerId(id=host.get_id().to_bytes())
                )
                await write_delimited_msg(stream, request)
                reply = await read_delimited_msg(stream, HopMessage)
            finally:
                await _close_quietly(stream)
    except trio.TooSlowError as exc:
        raise RelayError(str(relay), f"no reservation reply within {HOP_TIMEOUT}s") from exc
    except RelayError:
        raise
    except Exception as exc:
        raise RelayError(str(relay), f"reservation failed: {exc!r}") from exc
    status = StatusCode(reply.status) if reply.HasField("status") else StatusCode.OK
    if status != StatusCode.OK or not reply.HasField("reservation"):
        raise RelayError(str(relay), f"reservation refused: {status.name}")
    # The relay states expiry as Unix time; our schedule runs on trio's clock.
    ttl = max(0.0, reply.reservation.expire - time.time())
    addrs = tuple(_relay_addrs(reply.reservation.addrs, relay))
    return Reservation(relay=relay, expires_at=trio.current_time() + ttl, relay_addrs=addrs)


def _relay_addrs(raw: list[bytes], relay: ID) -> list[str]:
    out = []
    for blob in raw:
        try:
            addr = str(multiaddr.Multiaddr(blob))
        except Exception:
            continue  # a malformed address is the relay's problem, not a reason to fail
        if is_circuit_addr(addr):
            continue
        if "/p2p/" not in addr:
            addr = f"{addr}/p2p/{relay}"
        if addr.endswith(f"/p2p/{relay}") and addr not in out:
            out.append(addr)
    return out


async def dial_circuit(host: IHost, addr: str) -> ID:
    """Open a relayed connection to the target of circuit address ``addr``.

    The new connection is registered with the swarm like any other, marked RELAYED, so
    streams, identify and DCUtR all see it. Raises DialError; the caller bounds the time.
    """
    try:
        relay_addr, relay, target = split_circuit_addr(addr)
    except ValueError as exc:
        raise DialError(addr, str(exc)) from exc
    try:
        await host.connect(_relay_info(relay_addr, relay))
    except Exception as exc:
        raise DialError(addr, f"cannot reach relay {relay}: {exc}") from exc
    stream = await _open_hop(host, relay, target, addr)
    raw = RawConnection(
        stream=stream,
        initiator=True,
        connection_type=ConnectionType.RELAYED,
        addresses=[multiaddr.Multiaddr(addr)],
    )
    # Swarm._dial_addr_single_attempt wraps raw connections in pnet before upgrading, but
    # upgrade_outbound_connection does not, while the target's inbound upgrade does: a
    # private swarm's relayed connections would fail their handshake without this.
    psk = getattr(host.get_network(), "psk", None)
    conn = new_protected_conn(raw, psk) if psk else raw
    try:
        await host.upgrade_outbound_connection(conn, target)
    except BaseException as exc:
        with trio.CancelScope(shield=True):
            await _close_quietly(raw)
        if isinstance(exc, Exception):
            raise DialError(addr, f"handshake through relay failed: {exc}") from exc
        raise
    return target


def _relay_info(relay_addr: str, relay: ID) -> PeerInfo:
    # "/p2p/<relay>" alone (no transport part) means: use what the peerstore knows.
    transport = relay_addr.rsplit("/p2p/", 1)[0]
    return PeerInfo(relay, [multiaddr.Multiaddr(transport)] if transport else [])


async def _open_hop(host: IHost, relay: ID, target: ID, addr: str) -> object:
    try:
        with trio.fail_after(HOP_TIMEOUT):
            stream = await host.new_stream(relay, [HOP_PROTOCOL])
    except Exception as exc:
        raise DialError(addr, f"relay {relay} does not relay: {exc!r}") from exc
    try:
        with trio.fail_after(HOP_TIMEOUT):
            request = HopMessage(type=HopMessage.CONNECT, peer=PbPeerId(id=target.to_bytes()))
            await write_delimited_msg(stream, request)
            reply = await read_delimited_msg(stream, HopMessage)
        status = StatusCode(reply.status) if reply.HasField("status") else StatusCode.OK
        if status != StatusCode.OK:
            raise DialError(addr, f"relay refused the circuit: {status.name}")
    except BaseException as exc:
        with trio.CancelScope(shield=True):
            await _close_quietly(stream)
        if isinstance(exc, DialError) or not isinstance(exc, Exception):
            raise
        raise DialError(addr, f"relay {relay} did not open the circuit: {exc!r}") from exc
    return stream


async def _close_quietly(closeable: object) -> None:
    try:
        with trio.move_on_after(1):
            await closeable.close()  # type: ignore[attr-defined]
    except Exception:
        pass  # the other end may be gone already; nothing left to release
