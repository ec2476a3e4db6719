"""Route py-libp2p's logging into ours and quieten what it logs on normal operation.

py-libp2p 0.8.1 sets its ``libp2p`` logger to ``propagate=False`` without a handler, so
its records reach only Python's last-resort stderr handler, and several of its modules
log a WARNING or ERROR for every normal stream close (design/libp2p-notes.md, bugs 4, 15,
17). We re-enable propagation, raise the level to WARNING, and drop the known noise.
"""

from __future__ import annotations

import logging

# Messages that py-libp2p logs on perfectly normal events (clean EOF, closed hop stream,
# an undialable private address), matched by prefix.
_NOISE = (
    "Failed to read DHT message from stream",
    "Error getting transport addresses",
    "Failed to open TCP stream",
    "fail to deliver message to subscription",
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.strip():  # the relay logs empty ERRORs on normal hop-stream close
            return False
        return not message.startswith(_NOISE)


_installed = False


def route_libp2p_logs(level: int = logging.WARNING) -> None:
    """Idempotent: make libp2p's records flow to the root handlers, filtered."""
    global _installed
    lib = logging.getLogger("libp2p")
    lib.setLevel(level)
    lib.propagate = True
    # Some modules (the auto-connector) pin their own logger to INFO: make them inherit.
    for name, child in logging.root.manager.loggerDict.items():
        if name.startswith("libp2p.") and isinstance(child, logging.Logger):
            child.setLevel(logging.NOTSET)
    if not _installed:
        for handler in list(lib.handlers):
            lib.removeHandler(handler)
        lib.addFilter(_DropNoise())
        # Filters on a parent logger do not apply to records of its children, so the
        # filter goes on every handler that libp2p's records reach too.
        for handler in logging.getLogger().handlers:
            handler.addFilter(_DropNoise())
        _installed = True
