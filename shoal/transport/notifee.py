"""A py-libp2p notifee base that ignores every event (subclasses override what they need)."""

from __future__ import annotations

import multiaddr
from libp2p.abc import INetConn, INetStream, INetwork, INotifee


class ConnectionNotifee(INotifee):
    """A py-libp2p notifee that ignores everything; override what you need."""

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        return None

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        return None

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def listen(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        return None

    async def listen_close(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        return None
