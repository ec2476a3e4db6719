"""Errors of the transport layer: identity, keys, framing, dialing and RPC."""

from __future__ import annotations

from shoal.errors import Error


class TransportError(Error):
    """Base class of transport errors."""


class IdentityError(TransportError):
    """The node's identity key file is unusable (corrupt, or readable by others)."""


class SwarmKeyError(TransportError):
    """A swarm (pnet) key file is malformed."""


class FrameError(TransportError):
    """Bytes on a stream do not form a valid shoal frame."""


class FrameTooLarge(FrameError):
    """A frame declares more bytes than the protocol allows; nothing was allocated."""

    def __init__(self, what: str, size: int, limit: int) -> None:
        super().__init__(f"{what} of {size} bytes exceeds the limit of {limit} bytes")
        self.what = what
        self.size = size
        self.limit = limit


class DialError(TransportError):
    """A peer could not be reached at any of its addresses."""

    def __init__(self, target: str, reason: str) -> None:
        super().__init__(f"cannot reach {target}: {reason}")
        self.target = target
        self.reason = reason


class RemoteError(TransportError):
    """The remote peer answered an RPC with an error.

    ``code`` is a short machine-readable string (``bad_request``, ``too_large``,
    ``internal``, ...); ``message`` is meant for humans.
    """

    def __init__(self, peer: str, code: str, message: str) -> None:
        super().__init__(f"peer {peer} failed: [{code}] {message}")
        self.peer = peer
        self.code = code
        self.message = message


class RpcError(TransportError):
    """Raised by an RPC handler to send a typed error reply to the caller."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message


class RelayError(TransportError):
    """A relay refused or failed a reservation (Circuit Relay v2)."""

    def __init__(self, relay: str, reason: str) -> None:
        super().__init__(f"relay {relay}: {reason}")
        self.relay = relay
        self.reason = reason


class BulkError(TransportError):
    """A bulk stream's bytes failed to decrypt or broke the framing."""


class BulkUnavailable(TransportError):
    """No bulk stream to that peer (relayed, unreachable port, or it does not serve the
    protocol in bulk): use a libp2p stream."""
