"""libp2p transport: everything shoal needs to reach peers and talk to them. Bytes only.

- ``host.py``: ``open_host(config)``, a py-libp2p host (TCP + Noise + Yamux) with the
  workarounds of design/libp2p-notes.md applied; ``Host`` adds links and reachability.
- ``identity.py``: the persistent Ed25519 identity (mode 0600, refuses corrupt keys).
- ``swarmkey.py``: pnet swarm keys for private swarms.
- ``framing.py``: sans-io frames (msgpack header + raw payload), limits before allocation.
- ``rpc.py``: typed request/response and server-streaming RPC over streams.
- ``peering.py``: bootstrap with backoff and peer exchange (``/shoal/peers/1``).
- ``ping.py``: ``/shoal/ping/1``, payload echo with hashes (path checks, RTT).
- ``nat.py``, ``nat_logic.py``, ``circuit.py``, ``dialback.py``: reachability by
  dial-back, Circuit Relay v2 reservations, DCUtR hole punching (docs/nat.md).
- ``backoff.py``: keyed exponential backoff with jitter (dials, relays, punches).
- ``logs.py``: routes and quietens py-libp2p's logging.
- ``errors.py``: ``TransportError`` and its subclasses (``RemoteError`` and friends).
"""
