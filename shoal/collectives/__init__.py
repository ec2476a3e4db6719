"""Fault-tolerant all-reduce (design/allreduce-protocol.md), sans-io.

Files:

- ``view.py``      the view of one operation: members (weight, bandwidth), chunk bounds
                   proportional to bandwidth, owner/backup under a contributor set, the
                   coordinator ranking, the view hash.
- ``codec.py``     chunk compression (fp32 exact, fp16, int8 blockwise) over
                   :mod:`shoal.kernels.codecs`, contribution checks, stated error bounds.
- ``wire.py``      msgpack-headed frames with a schema per message type, sized before
                   anything is allocated.
- ``allreduce.py`` :class:`AllReduce`, one peer's state machine: reduce-scatter, AMEND on
                   failure, a majority-committed digest vector (RCOMMIT/CHOSEN, takeover by
                   RECOVER/RSTATE), pull all-gather with fallback holders.
- ``star.py``      :class:`StarAllReduce`: everyone to a leader and back, for small tensors.
- ``mux.py``       :class:`Collectives`: several operations in flight, routed by tag.
- ``memnet.py``    an in-memory network with a declared fault plan, for tests.
- ``errors.py``    rejections (recorded, the round goes on) and operation failures.
- ``driver.py``    :class:`CollectivesDriver`, the trio/libp2p I/O shell: long-lived
                   streams per peer, failure detection, deadlines, worker threads for
                   torch work (:func:`open_collectives`).

Apart from ``driver.py``, none of these modules imports trio or libp2p: the driver feeds
events and delivers bytes.
"""

from shoal.collectives.allreduce import AllReduce, AllReduceResult, Decision, Send
from shoal.collectives.mux import Collectives
from shoal.collectives.star import StarAllReduce
from shoal.collectives.view import Member, View, make_view

__all__ = [
    "AllReduce",
    "AllReduceResult",
    "Collectives",
    "Decision",
    "Member",
    "Send",
    "StarAllReduce",
    "View",
    "make_view",
]
