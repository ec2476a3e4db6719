"""The root of shoal's exceptions.

Every package defines its own errors in its own ``errors.py``, each a subclass of
:class:`Error`, so a caller can catch "anything shoal raised" without catching bugs.
"""

from __future__ import annotations


class Error(Exception):
    """Base class of every error shoal raises on purpose."""
