"""Star all-reduce for small, latency-bound tensors (TPI-LLM's finding): one round trip.

Every member sends its (encoded) contribution to the leader; the leader reduces in sorted
peer order in fp32 (the same :func:`reduce_chunk` as the butterfly), encodes the result
once, and sends the same bytes, with their digest and the contributor set, to everyone.
No commit round: the leader is the single computation, so every peer that completes holds
the leader's bytes (verified against the digest). A member that fails or sends a bad
contribution before the leader reduces is left out of the average. If the leader fails
before a member got the result, that member fails with :class:`LeaderFailed` (the caller
retries with another leader, e.g. the view's next coordinator); it never returns another
value.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from shoal.collectives import codec as chunk_codec
from shoal.collectives import wire
from shoal.collectives.allreduce import AllReduceResult, Receiver, Send, digest, reduce_chunk
from shoal.collectives.errors import (
    BadContribution,
    CollectiveError,
    LeaderFailed,
    MalformedMessage,
    OperationFailed,
    Rejected,
    Stalled,
)
from shoal.collectives.view import View


class StarAllReduce(Receiver):
    """One peer's side of a star all-reduce; same event API as :class:`AllReduce`."""

    def __init__(self, view: View, me: str, *, leader: str | None = None) -> None:
        if me not in view.peers:
            raise CollectiveError(f"{me} is not a member of {view.tag!r}")
        self.view = view
        self.me = me
        self.leader = leader if leader is not None else view.coordinator(0)
        if self.leader not in view.peers:
            raise CollectiveError(f"leader {self.leader} is not a member of {view.tag!r}")
        self.result: AllReduceResult | None = None
        self.error: OperationFailed | None = None
        self.rejections: list[Rejected] = []
        self.numel = view.numel
        self.nbytes = chunk_codec.payload_nbytes(view.codec, self.numel, view.block)
        self.max_message_bytes = wire.max_message_bytes(self.nbytes)
        self._slots: dict[str, chunk_codec.Slot] = {}
        self._out: list[Send] = []
        self._failed: set[str] = set()
        self._refused: set[str] = set()
        self._contributed = False
        self._deadlines = 0

    @property
    def finished(self) -> bool:
        return self.result is not None or self.error is not None

    def contribute(self, tensor: torch.Tensor) -> list[Send]:
        chunk_codec.check_contribution(self.me, tensor, self.view.shape, self.view.codec)
        if self._contributed:
            raise CollectiveError(f"{self.me} already contributed to {self.view.tag!r}")
        self._contributed = True
        [(header, payload)] = chunk_codec.encode_contribution(
            self.me,
            tensor.detach().reshape(-1),
            [(0, self.numel)],
            self.view.codec,
            self.view.block,
        )
        self._deliver(self.leader, "SDATA", {"x": header}, payload)
        return self._flush()

    def _accept(self, sender: str, msg: wire.Message) -> list[Send]:
        self._deliver_local(sender, msg)
        return self._flush()

    def peer_failed(self, peer: str) -> list[Send]:
        if peer in self.view.peers and peer != self.me and not self.finished:
            if peer == self.leader:
                self.error = LeaderFailed(self.view.tag, f"leader {peer} failed")
            else:
                self._failed.add(peer)
                self._maybe_reduce()
        return self._flush()

    def deadline(self) -> list[Send]:
        if not self.finished:
            self._deadlines += 1
            if self.me != self.leader:
                self.peer_failed(self.leader)
            else:
                missing = set(self.view.peers) - self._slots.keys() - self._gone() - {self.me}
                if not missing and self._deadlines >= 2:
                    self.error = Stalled(self.view.tag, "the leader's own contribution never came")
                for peer in sorted(missing):
                    self.peer_failed(peer)
        return self._flush()

    def _gone(self) -> set[str]:
        return self._failed | self._refused

    def _flush(self) -> list[Send]:
        out, self._out = self._out, []
        return out

    def _deliver(
        self, to: str, kind: str, fields: Mapping[str, Any], payload: wire.Payload
    ) -> None:
        if to == self.me:
            self._deliver_local(
                self.me, wire.Message(kind, self.view.tag, self.view.vh, fields, payload)
            )
        else:
            self._out.append(
                Send(to, *wire.encode_parts(kind, self.view.tag, self.view.vh, fields, payload))
            )

    def _deliver_local(self, sender: str, msg: wire.Message) -> None:
        if msg.type == "SDATA" and self.me == self.leader:
            self._on_data(sender, msg)
        elif msg.type == "SRESULT" and sender == self.leader:
            self._on_result(sender, msg)
        else:
            self.rejections.append(MalformedMessage(sender, f"unexpected {msg.type} in a star"))

    def _on_data(self, sender: str, msg: wire.Message) -> None:
        if sender in self._slots or sender in self._gone() or self.finished:
            return
        try:
            self._slots[sender] = chunk_codec.accept_chunk(
                sender,
                msg.fields["x"],
                msg.payload,
                codec=self.view.codec,
                n=self.numel,
                block=self.view.block,
            )
        except BadContribution as exc:
            self.rejections.append(exc)
            self._refused.add(sender)
        self._maybe_reduce()

    def _maybe_reduce(self) -> None:
        if self.me != self.leader or self.finished:
            return
        expected = set(self.view.peers) - self._gone()
        if not expected <= self._slots.keys():
            return
        contributors = tuple(sorted(expected))
        if not contributors:
            self.error = OperationFailed(self.view.tag, "no contribution left")
            return
        try:
            payload = reduce_chunk(self.view, contributors, self._slots, self.numel)
        except chunk_codec.NonFiniteParts as exc:
            for peer in exc.peers:
                self.rejections.append(BadContribution(peer, "nonfinite", "NaN or infinity"))
                self._refused.add(peer)
            self._maybe_reduce()  # with the others
            return
        fields = {"h": digest(payload), "s": list(contributors)}
        for peer in self.view.peers:
            if peer not in self._failed:  # refused peers still learn the result
                self._deliver(peer, "SRESULT", fields, payload)

    def _on_result(self, sender: str, msg: wire.Message) -> None:
        if self.finished:
            return
        h, contributors = msg.fields["h"], tuple(msg.fields["s"])
        if len(msg.payload) != self.nbytes or digest(msg.payload) != h:
            self.rejections.append(MalformedMessage(sender, "result does not match its digest"))
            return
        if not contributors or not set(contributors) <= set(self.view.peers):
            self.rejections.append(MalformedMessage(sender, "result names unknown contributors"))
            return
        flat = torch.empty(self.numel, dtype=torch.float32)
        chunk_codec.decode_into(flat, msg.payload, self.view.codec, self.view.block)
        tensor = flat.reshape(self.view.shape)
        self.result = AllReduceResult(self.view.tag, tensor, contributors, (h,))
