"""NAT traversal: relay reservations, relayed dials, DCUtR hole punching, dial-back.

Two layers:

- loopback (any machine): hosts in one process; a node that announces an address nobody
  listens on must come out PRIVATE, reserve on the relay and be reachable through it,
  also in a private (pnet) swarm; the dial-back server's validation and rate limit;
- network namespaces (root only, tests/netns/topology.py): real ``shoal node`` daemons,
  one process each, behind real iptables NATs: hole punching through port-preserving
  NATs, and the relay carrying the traffic when a symmetric NAT defeats punching.
"""

from __future__ import annotations

import hashlib
import random
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import multiaddr
import pytest
import trio
from libp2p.abc import INetConn, INetwork
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.relay.circuit_v2.dcutr import MAX_HOLE_PUNCH_ATTEMPTS
from training_peer import CORPUS, write_checkpoint

from shoal.state.document import SwarmState
from shoal.state.store import load_state, state_path
from shoal.training.runlog import SECTION
from shoal.transport.circuit import is_circuit_addr, split_circuit_addr
from shoal.transport.dialback import DIALBACK, call_dialback
from shoal.transport.errors import DialError, RemoteError
from shoal.transport.host import Host, HostConfig, PeerLink, Reachability, open_host
from shoal.transport.identity import load_or_create_identity, peer_id_of
from shoal.transport.nat import NatService, _DCUtR
from shoal.transport.nat_logic import PunchState
from shoal.transport.notifee import ConnectionNotifee
from shoal.transport.rpc import Message, Protocol
from tests.netns import topology
from tests.netns.nodes import NsNode, stop_all

ECHO = Protocol(name="nat-test-echo", max_request=1 << 20, max_response=1 << 20)
PSK = "ab" * 32


async def _echo(peer: object, request: Message) -> Message:
    return Message({"n": len(request.payload)}, bytes(request.payload))


@asynccontextmanager
async def _node(*, relay: bool = False, **config: object) -> AsyncIterator[NatService]:
    host_config = HostConfig(
        key_pair=create_new_key_pair(),
        listen=("/ip4/127.0.0.1/tcp/0",),
        **config,  # type: ignore[arg-type]
    )
    async with open_host(host_config) as host, trio.open_nursery() as nursery:
        host.rpc.serve(ECHO, _echo)
        service = NatService(host, relay_hop=relay)
        await nursery.start(service.run)
        yield service
        # Not an outer cancel: py-libp2p's connection cleanup is not shielded, and
        # connections torn down under a cancelled scope leave their sockets open.
        nursery.cancel_scope.cancel()


def _link(host: Host, peer: Host) -> PeerLink:
    [link] = [ln for ln in host.links() if ln.peer_id == str(peer.peer_id)]
    return link


async def _until(predicate: Callable[[], object], seconds: float) -> None:
    with trio.fail_after(seconds):
        # Polling: the state lives in py-libp2p's swarm, which has no event to wait on.
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(0.02)


def _settled(*services: NatService) -> bool:
    """No dial-back check or hole punch still running (a host closing mid-dial makes
    py-libp2p leave sockets for the garbage collector)."""
    return all(
        s.host.reachability is not Reachability.UNKNOWN
        and all(p.state is not PunchState.RUNNING for p in s.punches().values())
        for s in services
    )


# ---- loopback -------------------------------------------------------------------------


@pytest.mark.parametrize("psk", [None, PSK], ids=["open", "pnet"])
async def test_unreachable_node_reserves_and_is_reached_through_the_relay(psk: str | None) -> None:
    async with (
        _node(relay=True, psk=psk) as relay_svc,
        # Nothing listens on port 1: the relay's fresh dial-back is refused.
        _node(announce=("/ip4/127.0.0.1/tcp/1",), psk=psk) as hidden_svc,
        _node(psk=psk) as dialer_svc,
    ):
        relay, hidden, dialer = relay_svc.host, hidden_svc.host, dialer_svc.host
        await hidden.connect(relay.listen_addrs()[0])
        await dialer.connect(relay.listen_addrs()[0])
        await _until(lambda: hidden.relayed_addrs, 10)
        # The relay was reached on a fresh connection by both others.
        await _until(lambda: relay.reachability is Reachability.PUBLIC, 10)
        assert hidden.reachability is Reachability.PRIVATE
        await _until(lambda: dialer.reachability is not Reachability.UNKNOWN, 10)
        assert dialer.reachability is Reachability.PUBLIC
        assert not dialer.relayed_addrs and not relay.relayed_addrs
        [slot] = hidden_svc.reservations()
        assert slot.relay == str(relay.peer_id)

        [relayed] = hidden.relayed_addrs
        relay_addr, relay_id, target = split_circuit_addr(relayed)
        assert (relay_id, target) == (relay.peer_id, hidden.peer_id)
        assert relay_addr == relay.listen_addrs()[0]
        assert relayed in hidden.advertised_addrs()

        assert await dialer.connect(relayed) == hidden.peer_id
        assert _link(dialer, hidden).relayed
        payload = random.Random(1).randbytes(300_000)
        reply = await dialer.rpc.call(hidden.peer_id, ECHO, Message({}, payload))
        assert bytes(reply.payload) == payload

        # DCUtR, started by the relayed connection's inbound end (hidden): the dialer is
        # reachable, so the link turns direct.
        # The wait allows for a failed punch and its quick retry (NatConfig).
        await _until(lambda: not _link(dialer, hidden).relayed, 45)
        reply = await dialer.rpc.call(hidden.peer_id, ECHO, Message({}, payload[:1000]))
        assert bytes(reply.payload) == payload[:1000]
        await _until(lambda: _settled(relay_svc, hidden_svc, dialer_svc), 15)
        assert hidden_svc.punches()[str(dialer.peer_id)].state is PunchState.DIRECT
        assert str(hidden.peer_id) not in dialer_svc.punches()  # one end punches


async def test_punching_goes_on_after_py_libp2p_would_have_given_up() -> None:
    """py-libp2p refuses a fourth punch to a peer until it disconnects; NatService's
    backoff decides instead (docs/nat.md)."""
    config = HostConfig(key_pair=create_new_key_pair(), listen=("/ip4/127.0.0.1/tcp/0",))
    async with open_host(config) as host:
        dcutr = _DCUtR(host.libp2p, dial_timeout=1)
        peer = peer_id_of(create_new_key_pair())
        dcutr._hole_punch_attempts[peer] = MAX_HOLE_PUNCH_ATTEMPTS
        # Not connected: the attempt fails at its first stream, but it is made.
        assert not await dcutr.initiate_hole_punch(peer)
        assert dcutr._hole_punch_attempts[peer] == 1


class _SlowConnectedNotifee(ConnectionNotifee):
    """A loaded machine's swarm: it runs its "connected" notifees inline, before a
    dial returns, and they take a while."""

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        await trio.sleep(0.5)


async def test_a_punch_dial_keeps_its_connection_when_the_round_ends() -> None:
    """A punch round cancels its dials once the swarm lists a direct connection, which it
    does before running its notifees; a dial cancelled there made the swarm close the
    connection it had just made (docs/nat.md). Each dial now runs to its own end."""

    def config() -> HostConfig:
        return HostConfig(key_pair=create_new_key_pair(), listen=("/ip4/127.0.0.1/tcp/0",))

    async with open_host(config()) as a, open_host(config()) as b:
        b.rpc.serve(ECHO, _echo)
        a.libp2p.get_network().register_notifee(_SlowConnectedNotifee())
        dcutr = _DCUtR(a.libp2p, dial_timeout=5)
        target = multiaddr.Multiaddr(b.listen_addrs()[0])
        async with trio.open_nursery() as punch_round:
            punch_round.start_soon(dcutr._dial_peer, b.peer_id, target)
            await _until(lambda: a.is_connected(b.peer_id), 5)
            punch_round.cancel_scope.cancel()  # as DCUtR's round does
        assert a.is_connected(b.peer_id)
        reply = await a.rpc.call(b.peer_id, ECHO, Message({}, b"still here"))
        assert bytes(reply.payload) == b"still here"


async def test_addresses_settle_with_a_relayed_address_or_when_no_relay_is_offered() -> None:
    hidden_addr = ("/ip4/127.0.0.1/tcp/1",)  # nothing listens there: PRIVATE
    async with _node() as plain, _node(announce=hidden_addr) as hidden:
        assert not hidden.addresses_settled()  # reachability not known yet
        await hidden.host.connect(plain.host.listen_addrs()[0])
        await _until(lambda: hidden.host.reachability is Reachability.PRIVATE, 10)
        await _until(hidden.addresses_settled, 5)  # its only peer does not relay
        assert not hidden.host.relayed_addrs
        await _until(lambda: _settled(plain, hidden), 15)
    async with _node(relay=True) as relay, _node(announce=hidden_addr) as hidden:
        await hidden.host.connect(relay.host.listen_addrs()[0])
        await _until(hidden.addresses_settled, 10)  # only once it holds a relayed address
        assert hidden.host.reachability is Reachability.PRIVATE and hidden.host.relayed_addrs
        await _until(lambda: _settled(relay, hidden), 15)


async def test_circuit_dial_to_a_peer_without_reservation_fails_cleanly() -> None:
    async with _node(relay=True) as relay_svc, _node() as dialer_svc:
        relay, dialer = relay_svc.host, dialer_svc.host
        stranger = peer_id_of(create_new_key_pair())
        addr = f"{relay.listen_addrs()[0]}/p2p-circuit/p2p/{stranger}"
        assert is_circuit_addr(addr)
        with pytest.raises(DialError, match="NO_RESERVATION"):
            await dialer.connect(addr)
        assert not dialer.is_connected(stranger)
        assert dialer.is_connected(relay.peer_id)  # the relay itself was reached
        await _until(lambda: _settled(relay_svc, dialer_svc), 10)


async def test_dialback_server_validates_and_rate_limits() -> None:
    config = HostConfig(key_pair=create_new_key_pair(), listen=("/ip4/127.0.0.1/tcp/0",))
    async with _node() as asked_svc, open_host(config) as asker:  # asker: no NatService
        asked = asked_svc.host
        await asker.connect(asked.listen_addrs()[0])
        with pytest.raises(RemoteError) as bad:
            await asker.rpc.call(asked.peer_id, DIALBACK, Message({"addrs": "nope"}))
        assert bad.value.code == "bad_request"
        # A fresh handshake reaches the asker at its listen address...
        answer = await call_dialback(asker, asked.peer_id, dial_seconds=3)
        assert (answer.reachable, answer.ip) == (True, "127.0.0.1")
        # ...and the next request within the rate limit is refused, not served.
        with pytest.raises(RemoteError) as limited:
            await call_dialback(asker, asked.peer_id, dial_seconds=3)
        assert limited.value.code == "rate_limited"


# ---- network namespaces ---------------------------------------------------------------

_why_not = topology.missing_requirement()
netns = pytest.mark.skipif(_why_not is not None, reason=_why_not or "")


@pytest.fixture
def cone_nat() -> Iterator[None]:
    with topology.running(symmetric=False):
        yield


@pytest.fixture
def symmetric_nat() -> Iterator[None]:
    with topology.running(symmetric=True):
        yield


@pytest.fixture
def nodes() -> Iterator[list[NsNode]]:
    started: list[NsNode] = []
    yield started
    stop_all(started)


def _reachability(node: NsNode, value: str) -> bool:
    status = node.status()
    return status is not None and status["reachability"] == value


def _relayed_addr(node: NsNode) -> str | None:
    status = node.status() or {"addrs": []}
    return next((a for a in status["addrs"] if is_circuit_addr(a)), None)


def _punch_result(initiators: list[NsNode], target: NsNode) -> str | None:
    """A finished hole punch to ``target`` as /v1/status reports it, if any."""
    for node in initiators:
        punch = ((node.status() or {}).get("hole_punches") or {}).get(target.peer_id)
        if punch and punch["state"] != "running":
            return f"{punch['state']} ({punch['seconds']}s, {node.name})"
    return None


def _check_ping(
    src: NsNode, dst: NsNode, size: int, seed: int, *, bulk: bool = False
) -> dict[str, object]:
    result = src.ping(dst, size, seed, bulk=bulk)
    expected = hashlib.sha256(random.Random(seed).randbytes(size)).hexdigest()
    assert result.get("intact") is True, result
    assert result["sent_sha256"] == result["remote_sha256"] == result["echoed_sha256"] == expected
    return result


def _start_swarm(
    tmp_path: Path, nodes: list[NsNode], *, with_fw: bool
) -> tuple[NsNode, NsNode, NsNode]:
    """Start the relay, B behind NAT B, and F, all bootstrapping from the relay; A is
    made but not started (it needs B's relayed address first)."""
    relay = NsNode("relay", topology.PUB, topology.RELAY_IP, tmp_path / "relay", relay=True)
    a = NsNode("a", topology.LAN_A, topology.A_IP, tmp_path / "a")
    b = NsNode("b", topology.LAN_B, topology.B_IP, tmp_path / "b")
    nodes += [relay.start(), b.start(relay.addr)]
    if with_fw:
        nodes.append(NsNode("f", topology.FW, topology.FW_IP, tmp_path / "f").start(relay.addr))
    return relay, a, b


@netns
@pytest.mark.netns
@pytest.mark.slow
def test_cone_nat_relay_then_hole_punch(
    cone_nat: None, tmp_path: Path, nodes: list[NsNode]
) -> None:
    relay, a, b = _start_swarm(tmp_path, nodes, with_fw=True)
    f = nodes[-1]
    started = time.monotonic()
    b_relayed = b.wait(_relayed_addr, 30, "B advertises a relayed address")
    reserved_after = time.monotonic() - started
    assert split_circuit_addr(b_relayed)[0] == relay.addr
    assert b_relayed.endswith(f"/p2p-circuit/p2p/{b.peer_id}")
    reservations = (b.status() or {})["relay_reservations"]
    assert [r["relay"] for r in reservations] == [relay.peer_id], reservations

    # A knows only the relay and B's relayed address.
    nodes.append(a.start(relay.addr, b_relayed))
    dial_started = time.monotonic()
    a.wait(lambda n: n.link(b), 20, "A connected to B")
    _check_ping(a, b, 256 << 10, seed=7)
    # DCUtR: the link turns direct, through both NATs, to B's listen port on NAT B. The
    # wait allows for a failed punch (3 rounds, 21 s) and its quick retry.
    link = a.wait(lambda n: (ln := n.link(b)) and not ln["relayed"] and ln, 60, "A-B direct")
    direct_after = time.monotonic() - dial_started
    assert f"/ip4/{topology.NAT_B_IP}/tcp/4001" in link["addrs"], link
    # The relayed connection A opened first is kept as a fallback (DCUtR closes it only
    # after a 60 s grace period).
    assert b_relayed in link["addrs"], link
    outcome = a.wait(lambda n: _punch_result([a, b], b) or _punch_result([a, b], a), 10, "punch")
    assert outcome.startswith("direct"), outcome
    _check_ping(a, b, 1 << 20, seed=8)
    # Tensors' path: B's bulk port has no NAT mapping, so the bulk stream is punched too
    # (the ping channel then keeps that stream; tests/test_transport_bulk.py opens more).
    assert _check_ping(a, b, 4 << 20, seed=9, bulk=True)["via"] == "bulk"

    # Reachability from fresh dial-backs: the relay is public; A, B (NAT) and F (public IP,
    # firewalled: what py-libp2p's AutoNAT calls PUBLIC) are not.
    relay.wait(lambda n: _reachability(n, "public"), 20, "relay PUBLIC")
    for node in (a, b, f):
        node.wait(lambda n: _reachability(n, "private"), 20, f"{node.name} PRIVATE")
    print(f"B reserved after {reserved_after:.1f}s; A-B direct {direct_after:.1f}s after A started")


@netns
@pytest.mark.netns
@pytest.mark.slow
def test_symmetric_nat_punch_fails_and_relay_carries_rpcs(
    symmetric_nat: None, tmp_path: Path, nodes: list[NsNode]
) -> None:
    relay, a, b = _start_swarm(tmp_path, nodes, with_fw=False)
    b_relayed = b.wait(_relayed_addr, 30, "B advertises a relayed address")
    nodes.append(a.start(relay.addr, b_relayed))
    a.wait(lambda n: n.link(b), 20, "A connected to B")
    link = a.link(b)
    assert link is not None and link["relayed"], link
    _check_ping(a, b, 256 << 10, seed=11)

    # Random external ports: DCUtR's dials miss each other's mappings and it gives up.
    outcome = a.wait(
        lambda n: _punch_result([a, b], b) or _punch_result([a, b], a), 60, "punch ends"
    )
    assert outcome.startswith("failed"), outcome
    _check_ping(a, b, 1 << 20, seed=12)
    assert _check_ping(a, b, 1 << 20, seed=13, bulk=True)["via"] == "libp2p"  # relayed
    link = a.link(b)
    assert link is not None and link["relayed"], link
    assert all(is_circuit_addr(addr) for addr in link["addrs"]), link
    a.wait(lambda n: _reachability(n, "private"), 20, "A PRIVATE")


def _train(
    name: str, namespace: str, ip: str, root: Path, model: Path, *args: str
) -> subprocess.Popen[bytes]:
    """``shoal train`` in ``namespace`` (3 rounds of 5 inner steps on shard ``--shard``)."""
    command = [
        "ip", "netns", "exec", namespace,
        sys.executable, "-m", "shoal.node.cli", "train", "--run", "nat-run",
        "--model", str(model), "--data", str(CORPUS), "--inner-steps", "5", "--rounds", "3",
        "--batch", "4", "--seq", "32", "--shards", "3",
        "--listen", f"/ip4/{ip}/tcp/4001", "--data-dir", str(root / name), *args,
    ]  # fmt: skip
    with (root / f"{name}.out").open("wb") as out, (root / f"{name}.err").open("wb") as err:
        return subprocess.Popen(command, stdout=out, stderr=err)


def _own_run_entry(data_dir: Path) -> dict[str, Any]:
    """What a peer recorded of the run in its own document of its saved swarm state."""
    me = str(peer_id_of(load_or_create_identity(data_dir)))
    state = SwarmState("main", create_new_key_pair())
    assert load_state(state, state_path(data_dir, "main")) > 0
    return dict(state.section(SECTION)[me]["nat-run"])


@netns
@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_diloco_across_two_nats_keeps_every_peer_in_every_round(
    cone_nat: None, tmp_path: Path
) -> None:
    """A founder with a public address (it relays), A and B each behind its own NAT: every
    round has all three members, and all end with the same state. Before the joiners
    waited for their relayed address, A and B knew only each other's private address,
    dropped each other from round 1, and one of them trained alone."""
    model = write_checkpoint(tmp_path / "tiny")
    (tmp_path / "relay.toml").write_text("relay = true\n")
    procs = {"f": _train("f", topology.PUB, topology.RELAY_IP, tmp_path, model,
                         "--shard", "0", "--min-peers", "3", "--config", str(tmp_path / "relay.toml"))}  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (found := re.search(r"--bootstrap (\S+)", (tmp_path / "f.err").read_text())):
            assert procs["f"].poll() is None, (tmp_path / "f.err").read_text()[-3000:]
            assert time.monotonic() < deadline, "the founder printed no address"
            time.sleep(0.2)
        for name, namespace, ip, shard in (
            ("a", topology.LAN_A, topology.A_IP, "1"),
            ("b", topology.LAN_B, topology.B_IP, "2"),
        ):
            args = ("--shard", shard, "--bootstrap", found.group(1))
            procs[name] = _train(name, namespace, ip, tmp_path, model, *args)
        for name in ("a", "b", "f"):
            code = procs[name].wait(400)
            assert code == 0, (tmp_path / f"{name}.err").read_text()[-3000:]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    entries = {name: _own_run_entry(tmp_path / name) for name in ("f", "a", "b")}
    everyone = sorted(str(peer_id_of(load_or_create_identity(tmp_path / n))) for n in entries)
    for name, entry in entries.items():
        assert entry["round"] == 3 and sorted(entry["members"]) == everyone, (name, entry)
        assert sorted(entry["hashes"], key=int) == ["1", "2", "3"], (name, entry)
    assert entries["a"]["hashes"] == entries["b"]["hashes"] == entries["f"]["hashes"]
    final = {re.search(r"state hash (\w+)", (tmp_path / f"{n}.out").read_text()) for n in entries}
    assert {m.group(1) for m in final if m} == {entries["f"]["hashes"]["3"]}
