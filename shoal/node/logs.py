"""Logging for the daemon: every line carries the node's (short) peer id."""

from __future__ import annotations

import logging
import sys

from shoal.transport.logs import route_libp2p_logs


class _PeerTag(logging.Filter):
    def __init__(self, tag: str) -> None:
        super().__init__()
        self.tag = tag

    def filter(self, record: logging.LogRecord) -> bool:
        record.peer = self.tag
        return True


def setup_logging(level: str, peer_id: str | None = None) -> None:
    """Log to stderr as ``time level [peer] logger: message``."""
    handler = logging.StreamHandler(sys.stderr)
    tag = peer_id[-8:] if peer_id else "-"
    handler.addFilter(_PeerTag(tag))
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)-7s [%(peer)s] %(name)s: %(message)s")
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    route_libp2p_logs()
