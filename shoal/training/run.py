"""A whole DiLoCo run among real peers: rounds, an agreed member list per round, retries
of a failed average with the survivors, joiner and diverged-peer sync, checkpoints.

    run = TrainingRun(host, driver, peer, RunConfig(run_id="r1", rounds=20))
    await nursery.start(run.run, bootstrap)      # bootstrap=(): found the run

A round ``r`` on every member (``membership.py`` says who decides what):

1. the inner phase (H local steps) on a worker thread -> pseudo-gradient;
2. READY(r, attempt, state hash) to the coordinator (the lowest live peer id among the
   last round's members), which answers every reporter with the same member list once
   all live candidates and registered joiners reported; a reporter whose hash is not
   the majority's is told it diverged;
3. the all-reduce of the pseudo-gradient among those members (``round_tag(run, r, a)``);
   if it fails (:class:`OperationFailed`: ``NoQuorum``, ``ChunkUnavailable``,
   ``Stalled``...) the survivors go back to 2 with attempt ``a+1`` and the same
   pseudo-gradient (no live peer applied a failed attempt, docs/collectives.md);
4. the outer step; the record's members are the all-reduce's contributors (the
   candidates of round ``r+1``); the state is exported for joiners (``statesync.py``),
   checkpointed, and reported (``publish``: the run log in the swarm state).

A peer that is told it is behind (the round was decided or completed without it) or
diverged, and a joiner, runs :meth:`TrainingRun.join`: ask the known peers where the run
is (``hello``), download the majority's state in parts from several members, register
with the coordinator for the next round (``join``), then go on as a member.

Protocol ``/shoal/train-round/1`` (channels; msgpack bodies, no payloads, 64 KiB limit):
``{"t": "hello", "run"}`` -> ``{round, members, state_hash}``;
``{"t": "join", "run", "round"}`` -> ``{}``;
``{"t": "ready", "run", "round", "attempt", "hash"}`` -> ``{members, hash}`` (held until
the coordinator decides). Typed errors: ``bad_request``, ``unknown_run``, ``not_member``,
``not_coordinator`` (message: the coordinator's id), ``late``, ``not_ready``, ``behind``,
``diverged``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import trio
from libp2p.peer.id import ID

from shoal.collectives import Member, make_view
from shoal.collectives.driver import CollectivesDriver
from shoal.collectives.errors import OperationFailed
from shoal.training.checkpoint import save_checkpoint
from shoal.training.diloco import DilocoPeer
from shoal.training.errors import NoConsensus, SyncFailed, TrainingError
from shoal.training.membership import Barrier, Decision, coordinator
from shoal.training.runlog import RoundRecord
from shoal.training.statesync import StateServer, agreed_manifest, fetch_state
from shoal.training.swarm import round_tag
from shoal.training.sync import DEFAULT_PART_BYTES
from shoal.transport.channel import ChannelProtocol
from shoal.transport.errors import DialError, RemoteError, RpcError
from shoal.transport.host import Host
from shoal.transport.rpc import Message

if TYPE_CHECKING:
    # trio-typing's stale stubs (pulled in by libp2p) shadow trio's own types.
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

ROUND_PROTOCOL = ChannelProtocol(
    name="train-round",
    max_request=64 << 10,
    max_response=64 << 10,
    timeout=900.0,  # READY is held until the coordinator decides (inner phases differ)
    max_concurrent=256,
)
MAX_ADDRS = 8
MAX_MEMBERS = 256


class Behind(TrainingError):
    """This peer cannot take part in the round it prepared (decided or completed without
    it, its state diverged, or every retry failed): it must sync and join again."""


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """How a peer takes part in a run.

    run_id: the run's name (every peer of the run uses the same).
    rounds: stop once the state reaches this round (None: run until cancelled).
    codec: the all-reduce codec of the pseudo-gradients (fp32 exact, int8, fp16).
    min_members: a founder's first round waits until this many members are ready.
    quorum: every round waits until this many members are ready, past ``ready_timeout``
        too: a peer cut off from the others waits for them instead of training alone
        (1, the default: it goes on alone, and resyncs from the majority when it meets
        the run again).
    ready_timeout: seconds the coordinator waits for expected peers' READY after its own.
    max_attempts: all-reduce attempts per round before this peer resyncs instead.
    part_bytes: the size of the parts the state is served in.
    join_timeout: seconds a joiner keeps trying to find, sync and enter the run.
    linger: seconds a peer keeps serving after its last round (peers still gathering).
    """

    run_id: str
    rounds: int | None = None
    codec: str = "fp32"
    min_members: int = 1
    quorum: int = 1
    ready_timeout: float = 60.0
    max_attempts: int = 4
    part_bytes: int = DEFAULT_PART_BYTES
    join_timeout: float = 180.0
    linger: float = 5.0


@dataclass(frozen=True, slots=True)
class RunEvent:
    """What the run reports to a progress display: ``phase`` (inner, ready, average,
    sync, join), ``round`` (a record), ``sync`` (a state adopted from the swarm)."""

    kind: str
    round: int
    detail: str = ""
    record: RoundRecord | None = None
    attempts: int = 1
    peers: int = 0


@dataclass(slots=True)
class SyncReport:
    """One state download: the round, the hash, how many parts came from whom."""

    round: int
    state_hash: str
    parts_from: dict[str, int] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)


class TrainingRun:
    """One peer's part in a run over ``host`` (channels) and ``driver`` (all-reduce)."""

    def __init__(
        self,
        host: Host,
        driver: CollectivesDriver,
        peer: DilocoPeer,
        config: RunConfig,
        *,
        checkpoint: Path | None = None,
        publish: Callable[[RoundRecord], None] | None = None,
        events: Callable[[RunEvent], None] | None = None,
    ) -> None:
        self.host = host
        self.driver = driver
        self.peer = peer
        self.config = config
        self.checkpoint = checkpoint
        self.publish = publish
        self.events = events
        self.me = str(host.peer_id)
        self.server = StateServer(config.run_id, part_bytes=config.part_bytes)
        self.members: tuple[str, ...] = ()
        self.member = False
        self.known: set[str] = set()
        #: Members' advertised addresses, exchanged in every call (joiners dial them).
        self.addrs: dict[str, list[str]] = {}
        self.syncs: list[SyncReport] = []
        self.attempts: dict[int, int] = {}
        self.bytes_sent = 0
        self._hash = peer.state.state_hash()
        self._min_members = 1
        self._barriers: dict[tuple[int, int], Barrier] = {}
        self._roles: dict[tuple[int, int], str] = {}
        self._decisions: dict[tuple[int, int], Decision] = {}
        self._joiners: dict[int, set[str]] = {}
        self._attempt_now: dict[int, int] = {}
        self._changed = trio.Event()

    # ------------------------------------------------------------------ service

    async def run(
        self,
        bootstrap: Sequence[str] = (),
        *,
        task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve the run's protocols, found the run (no ``bootstrap`` peer ids) or join it,
        then run rounds until ``config.rounds``; keeps serving ``linger`` seconds."""
        self.server.serve(self.host.channels)
        self.host.channels.serve(ROUND_PROTOCOL, self._rpc_round)
        task_status.started()
        if bootstrap:
            self.known |= set(bootstrap) - {self.me}
            await self.join()
        else:
            self._found()
        rounds = self.config.rounds
        while rounds is None or self.peer.state.round < rounds:
            try:
                await self.round()
            except Behind as exc:
                log.info("%s: %s; syncing with the run", self.me[-8:], exc)
                await self.join()
        self._emit("phase", self.peer.state.round, "done")
        await trio.sleep(self.config.linger)

    def _found(self) -> None:
        self.members = (self.me,)
        self.member = True
        self._min_members = self.config.min_members
        self.server.publish(self.peer.state, self.members)
        log.info("founded run %s at round %d", self.config.run_id, self.peer.state.round)

    def _alive(self, peer: str) -> bool:
        return peer == self.me or self.host.is_connected(ID.from_base58(peer))

    def _addr_book(self, peers: Sequence[str]) -> dict[str, list[str]]:
        book = {p: self.addrs[p] for p in peers if p in self.addrs}
        book[self.me] = self.host.advertised_addrs()[:MAX_ADDRS]
        return book

    def _learn(self, book: Any) -> None:
        if not isinstance(book, dict):
            return
        for peer, addrs in list(book.items())[:MAX_MEMBERS]:
            if isinstance(peer, str) and peer != self.me and isinstance(addrs, list):
                good = [a for a in addrs[:MAX_ADDRS] if isinstance(a, str) and len(a) < 512]
                if good:
                    self.addrs[peer] = good

    async def _connect(self, peers: Sequence[str]) -> None:
        """Dial the peers this host has no connection to (addresses from the book)."""

        async def dial(peer: str) -> None:
            # Every address at once: a peer behind a NAT gives its private listen address
            # first, which costs a whole dial timeout before its relayed one is tried.
            errors: list[str] = []
            async with trio.open_nursery() as attempts:

                async def attempt(addr: str) -> None:
                    try:
                        await self.host.connect(addr)
                    except DialError as exc:
                        errors.append(str(exc))
                        return
                    attempts.cancel_scope.cancel()  # connected: the others can stop

                for addr in self.addrs.get(peer, ()):
                    attempts.start_soon(attempt, addr)
            if errors and not self._alive(peer):
                log.info("%s: cannot dial %s: %s", self.me[-8:], peer[-8:], "; ".join(errors))

        async with trio.open_nursery() as nursery:
            for peer in peers:
                if not self._alive(peer):
                    nursery.start_soon(dial, peer)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _wait_change(self, seconds: float) -> None:
        with trio.move_on_after(seconds):
            await self._changed.wait()

    def _emit(self, kind: str, round_: int, detail: str = "", **extra: Any) -> None:
        if self.events is not None:
            self.events(RunEvent(kind, round_, detail, **extra))

    # ------------------------------------------------------------------ one round

    async def round(self) -> RoundRecord:
        """One round as a member; raises :class:`Behind` when this peer must resync."""
        r = self.peer.state.round + 1
        self._emit("phase", r, "inner steps", peers=len(self.members))
        pseudo_gradient = await trio.to_thread.run_sync(self.peer.inner_phase)
        candidates = self.members
        attempt = 0
        while True:
            self._emit("phase", r, f"waiting for members (attempt {attempt})")
            decision = await self._agree(r, attempt, candidates)
            attempt = decision.attempt
            self._emit("phase", r, f"averaging with {len(decision.members)} peers")
            try:
                average, contributors, sent = await self._average(decision, pseudo_gradient)
                break
            except OperationFailed as exc:
                log.warning("%s: round %d attempt %d failed: %s", self.me[-8:], r, attempt, exc)
                attempt += 1
                if attempt >= self.config.max_attempts:
                    raise Behind(f"round {r}: {attempt} attempts failed") from exc
                candidates = tuple(p for p in decision.members if self._alive(p))
        self.bytes_sent += sent

        def outer() -> RoundRecord:
            return self.peer.outer_phase(average, contributors, bytes_sent=sent)

        record = await trio.to_thread.run_sync(outer)
        self.attempts[r] = attempt + 1
        await self._adopted(record.members)
        if self.publish is not None:
            self.publish(record)
        self._emit("round", r, record=record, attempts=attempt + 1, peers=len(record.members))
        return record

    async def _adopted(self, members: Sequence[str]) -> None:
        """After a round or a sync: the new members, the export for joiners, a checkpoint."""
        self.members = tuple(sorted(members))
        self.known |= set(self.members) - {self.me}
        export = await trio.to_thread.run_sync(self.server.export, self.peer.state, self.members)
        self.server.publish_export(export)
        self._hash = export.manifest.state_hash
        self._min_members = 1
        current = self.peer.state.round
        for store in (self._barriers, self._roles, self._decisions):
            for key in [k for k in store if k[0] < current - 2]:
                del store[key]
        for table in (self._attempt_now, self._joiners):
            for r in [r for r in table if r <= current - 2]:
                del table[r]
        self._notify()
        if self.checkpoint is not None:
            await trio.to_thread.run_sync(save_checkpoint, self.checkpoint, self.peer)

    async def _average(
        self, decision: Decision, pseudo_gradient: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[str, ...], int]:
        if decision.members == (self.me,):  # alone: the average of one is itself
            return pseudo_gradient, (self.me,), 0
        view = make_view(
            round_tag(self.config.run_id, decision.round, decision.attempt),
            [Member(p) for p in decision.members],
            (self.peer.state.layout.numel,),
            codec=self.config.codec,
            attempt=decision.attempt,
        )
        before = self.driver.bytes_sent
        result = await self.driver.all_reduce(view, pseudo_gradient)
        return result.tensor, tuple(result.contributors), self.driver.bytes_sent - before

    # ------------------------------------------------------------------ membership

    async def _agree(self, r: int, attempt: int, candidates: Sequence[str]) -> Decision:
        """The member list of round ``r``: decided here if this peer is the coordinator,
        else asked of the coordinator. A coordinator that fails ends the attempt (it may
        have answered some members before it died, and they run that attempt's
        all-reduce): the next one decides attempt + 1."""
        suspects: set[str] = set()
        started = time.monotonic()
        while True:
            key = (r, attempt)
            self._attempt_now[r] = attempt
            alive = [p for p in candidates if p not in suspects and self._alive(p)]
            chosen = coordinator(candidates, alive)
            if chosen is None:
                raise Behind(f"round {r}: no member of the last round is left")
            if chosen == self.me:
                return await self._coordinate(r, attempt, alive)
            self._roles[key] = chosen
            self._notify()  # callers that came here go to the coordinator
            body = {"t": "ready", "run": self.config.run_id, "round": r, "attempt": attempt}
            try:
                body |= {"hash": self._hash, "addrs": self._addr_book(())}
                reply = await self.host.channels.call(
                    ID.from_base58(chosen), ROUND_PROTOCOL, Message(body)
                )
            except RemoteError as exc:
                if exc.code in ("behind", "diverged", "late"):
                    raise Behind(f"round {r}: coordinator {chosen[-8:]}: {exc.message}") from exc
                if exc.code == "stale_attempt" and exc.message.isdigit():
                    attempt = max(attempt, int(exc.message))  # it moved on after a failure
                    continue
                if exc.code == "not_coordinator" and time.monotonic() - started < 60:
                    await trio.sleep(0.3)  # it sees a lower peer alive that we do not, yet
                    continue
                log.info("%s: coordinator %s failed: %s", self.me[-8:], chosen[-8:], exc)
                suspects.add(chosen)
                attempt += 1
                continue
            members = tuple(str(m) for m in reply.body.get("members", ()))
            if self.me not in members:
                raise Behind(f"round {r}: the coordinator left this peer out")
            self._learn(reply.body.get("addrs"))
            await self._connect(members)
            return Decision(r, attempt, members, str(reply.body.get("hash", "")))

    def _barrier(self, key: tuple[int, int]) -> Barrier:
        barrier = self._barriers.get(key)
        if barrier is None:
            barrier = self._barriers[key] = Barrier(key[0], key[1])
        return barrier

    async def _coordinate(self, r: int, attempt: int, candidates: Sequence[str]) -> Decision:
        key = (r, attempt)
        decided = self._decisions.get(key)
        if decided is not None:  # decided before this peer resynced: not again
            raise Behind(f"round {r} attempt {attempt} was decided without this peer")
        self._roles[key] = self.me
        barrier = self._barrier(key)
        barrier.min_members = max(self._min_members, self.config.quorum)
        barrier.expect(candidates)
        if attempt == 0:
            barrier.expect(self._joiners.get(r, ()))
        barrier.report(self.me, self._hash)
        self._notify()
        deadline = trio.current_time() + self.config.ready_timeout
        while True:
            alive = [p for p in barrier.expected | set(barrier.reports) if self._alive(p)]
            if barrier.complete(alive):
                break
            enough = len(barrier.reports) >= barrier.min_members
            if enough and trio.current_time() >= deadline:
                late = barrier.waiting_for(alive)
                log.warning("round %d: deciding without %s (no READY in time)", r, sorted(late))
                break
            await self._wait_change(0.25)
        decision = barrier.decide()
        self._decisions[key] = decision
        self._notify()
        await self._connect(decision.members)
        log.info(
            "round %d attempt %d: members %s%s",
            r,
            attempt,
            [m[-8:] for m in decision.members],
            f", diverged {sorted(decision.diverged)}" if decision.diverged else "",
        )
        if self.me not in decision.members:
            raise Behind(f"round {r}: this peer's state diverged from the majority's")
        return decision

    # ------------------------------------------------------------------ joining

    async def join(self) -> None:
        """Find the run, adopt the majority's state (downloaded in verified parts unless
        this peer already holds it), and register for the next round."""
        self.member = False
        try:
            with trio.fail_after(self.config.join_timeout):
                await self._join()
        except trio.TooSlowError:
            asked = ", ".join(p[-8:] for p in sorted(self.known)) or "nobody"
            raise TrainingError(
                f"could not join run {self.config.run_id!r} within "
                f"{self.config.join_timeout:.0f}s (asked {asked}); check --run, and that "
                "--bootstrap names a peer of that run"
            ) from None

    async def _join(self) -> None:
        # A peer registers for a round before it downloads the state that round starts
        # from: the coordinator then waits for its READY (up to ready_timeout). Registering
        # after the download lost the race to members whose rounds were shorter than the
        # download, and such a peer chased the run one sync per round.
        ahead = 0  # the round this peer is registered for
        while True:
            round_, members, digest = await self._hello()
            if ahead > round_ + 1:  # registered for the round after the one in progress
                await trio.sleep(0.2)
                continue
            if ahead < round_ + 1:
                ahead = await self._register(members, round_ + 1)
                if ahead != round_ + 1:  # the round after, or no coordinator: ask again
                    await trio.sleep(0.2)
                    continue
            if not (self.peer.state.round == round_ and self._hash == digest):
                try:
                    members = await self._sync(members, round_)
                except (NoConsensus, SyncFailed) as exc:
                    log.info("%s: sync failed (%s); asking again", self.me[-8:], exc)
                    await trio.sleep(0.5)
                    continue
            if self.peer.state.round + 1 != ahead:  # it synced a later round: register again
                continue
            self.member = True
            self.members = tuple(sorted(members))
            self._emit("phase", self.peer.state.round, "joined", peers=len(members))
            return

    async def _hello(self) -> tuple[int, tuple[str, ...], str]:
        """(round, members, state hash) of the most advanced member among the known peers.
        Raises :class:`TrainingError` at once if every known peer says it does not train
        this run (or does not train at all), several times in a row."""
        refusals = 0
        while True:
            answers: list[tuple[int, tuple[str, ...], str]] = []
            errors: dict[str, str] = {}
            with trio.move_on_after(10):
                async with trio.open_nursery() as nursery:
                    for peer in sorted(self.known):
                        nursery.start_soon(self._ask_hello, peer, answers, errors)
            if answers:
                best = max(answers)
                self.known |= set(best[1]) - {self.me}
                await self._connect(best[1])
                return best
            definitive = {"unknown_run", "unsupported_protocol"}
            refused = bool(errors) and set(errors.values()) <= definitive
            refusals = refusals + 1 if refused and len(errors) == len(self.known) else 0
            if refusals >= 3:
                names = ", ".join(f"{p[-8:]} ({code})" for p, code in sorted(errors.items()))
                raise TrainingError(
                    f"no peer asked trains run {self.config.run_id!r}: {names}; check --run, "
                    "or give --bootstrap the address a peer of the run printed (a plain "
                    "`shoal node` does not train)"
                )
            self._emit("phase", self.peer.state.round, "looking for the run's peers")
            await trio.sleep(1.0)

    async def _ask_hello(
        self,
        peer: str,
        answers: list[tuple[int, tuple[str, ...], str]],
        errors: dict[str, str],
    ) -> None:
        body = {"t": "hello", "run": self.config.run_id, "addrs": self._addr_book(())}
        try:
            reply = await self.host.channels.call(
                ID.from_base58(peer), ROUND_PROTOCOL, Message(body)
            )
            members = tuple(str(m) for m in reply.body["members"])
            self._learn(reply.body.get("addrs"))
            answers.append((int(reply.body["round"]), members, str(reply.body["hash"])))
        except RemoteError as exc:
            errors[peer] = exc.code
            log.debug("hello to %s: %r", peer, exc)
        except (KeyError, TypeError, ValueError) as exc:
            errors[peer] = "bad_reply"
            log.debug("hello to %s: %r", peer, exc)

    async def _sync(self, members: Sequence[str], round_: int) -> tuple[str, ...]:
        self._emit("phase", self.peer.state.round, "downloading the state")
        peers = [p for p in members if p != self.me and self._alive(p)]
        manifest, holders, members = await agreed_manifest(
            self.host.channels, peers, self.config.run_id, round_=round_
        )
        state, fetch = await fetch_state(
            self.host.channels, manifest, holders, self.peer.state.layout
        )
        self.peer.adopt(state)
        report = SyncReport(manifest.round, manifest.state_hash)
        for index in fetch.parts:
            source = fetch.tried[index][-1]
            report.parts_from[source] = report.parts_from.get(source, 0) + 1
        report.refused = [str(r) for r in fetch.rejections]
        self.syncs.append(report)
        log.info(
            "%s: synced round %d (%s…) in %d parts from %d peers",
            self.me[-8:],
            manifest.round,
            manifest.state_hash[:12],
            len(fetch.parts),
            len(report.parts_from),
        )
        await self._adopted(members)
        self._emit("sync", manifest.round, manifest.state_hash)
        return tuple(members)

    async def _register(self, members: Sequence[str], r: int) -> int:
        """Ask the coordinator to expect this peer in round ``r``, or in ``r + 1`` when
        ``r`` is decided already or counts on this peer (it is listed among the members
        of round ``r - 1``: it diverged, or restarted with its identity, and did not
        prepare round ``r``). Returns the round registered for; 0 when the run moved on
        further or no member is left to ask (ask the run again)."""
        first = r + 1 if self.me in members else r
        r = first
        suspects = {self.me}  # (it coordinated the round it diverged in: not the next)
        hint: str | None = None
        while True:
            alive = [p for p in members if p not in suspects and self._alive(p)]
            chosen = hint if hint is not None else coordinator(members, alive)
            hint = None
            if chosen is None:
                return 0
            body = {
                "t": "join",
                "run": self.config.run_id,
                "round": r,
                "addrs": self._addr_book(()),
            }
            try:
                await self.host.channels.call(ID.from_base58(chosen), ROUND_PROTOCOL, Message(body))
                return r
            except RemoteError as exc:
                if exc.code == "late":
                    if r > first:
                        return 0
                    r += 1
                    continue
                if exc.code == "not_coordinator" and exc.message in self.known:
                    hint = exc.message  # the coordinator it names
                    await trio.sleep(0.05)
                elif exc.code in ("not_coordinator", "not_ready", "not_member"):
                    await trio.sleep(0.3)
                else:
                    suspects.add(chosen)

    # ------------------------------------------------------------------ serving

    async def _rpc_round(self, peer: ID, request: Message) -> Message:
        body = request.body
        kind, run = body.get("t"), body.get("run")
        if not isinstance(kind, str) or not isinstance(run, str):
            raise RpcError("bad_request", "fields 't' and 'run' must be strings")
        if run != self.config.run_id:
            raise RpcError("unknown_run", f"this peer is not training run {run[:80]!r}")
        self._learn(body.get("addrs"))
        if not self.member:
            raise RpcError("not_member", "this peer is joining the run; ask another")
        if kind == "hello":
            return Message(
                {
                    "round": self.peer.state.round,
                    "members": list(self.members),
                    "hash": self._hash,
                    "addrs": self._addr_book(self.members),
                }
            )
        r = body.get("round")
        if not isinstance(r, int) or isinstance(r, bool) or r < 0:
            raise RpcError("bad_request", "field 'round' must be a non-negative integer")
        if kind == "join":
            return self._on_join(str(peer), r)
        if kind == "ready":
            attempt, digest = body.get("attempt"), body.get("hash")
            if not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 0:
                raise RpcError("bad_request", "field 'attempt' must be a non-negative integer")
            if not isinstance(digest, str) or len(digest) > 128:
                raise RpcError("bad_request", "field 'hash' must be a hex string")
            return await self._on_ready(str(peer), r, attempt, digest)
        raise RpcError("bad_request", f"unknown request type {kind[:40]!r}")

    def _on_join(self, peer: str, r: int) -> Message:
        current = self.peer.state.round
        if r <= current or (r, 0) in self._decisions:
            raise RpcError("late", f"round {r} is decided here (at round {current}); sync again")
        if r > current + 2:  # (+2: it registers before the round in progress ends)
            raise RpcError("not_ready", f"this peer is at round {current}")
        # (a joiner listed among the members, having diverged, coordinates nothing now)
        chosen = coordinator(
            self.members, [p for p in self.members if p != peer and self._alive(p)]
        )
        if chosen != self.me:
            raise RpcError("not_coordinator", str(chosen))
        self._joiners.setdefault(r, set()).add(peer)
        barrier = self._barriers.get((r, 0))
        if barrier is not None:
            barrier.expect({peer})
        self._notify()
        log.info("round %d: %s registered to join", r, peer[-8:])
        return Message({})

    async def _on_ready(self, peer: str, r: int, attempt: int, digest: str) -> Message:
        key = (r, attempt)
        if r <= self.peer.state.round:
            raise RpcError("behind", f"round {r} is complete here; sync and join again")
        while True:
            decision = self._decisions.get(key)
            if decision is not None:
                if peer in decision.members:
                    body = {
                        "members": list(decision.members),
                        "hash": decision.state_hash,
                        "addrs": self._addr_book(decision.members),
                    }
                    return Message(body)
                if peer in decision.diverged:
                    raise RpcError("diverged", f"state hash {digest[:16]}… is not the majority's")
                raise RpcError("behind", f"round {r} attempt {attempt} was decided without you")
            if self._attempt_now.get(r, 0) > attempt:
                raise RpcError("stale_attempt", str(self._attempt_now[r]))
            role = self._roles.get(key)
            if role is not None and role != self.me:
                raise RpcError("not_coordinator", role)
            barrier = self._barrier(key)
            if barrier.reports.get(peer) != digest:
                # notify on news only: two waiting handlers that notified on every wake-up
                # would wake each other forever (a busy loop that starved the host)
                barrier.report(peer, digest)
                self._notify()
            await self._wait_change(1.0)
            if r <= self.peer.state.round and key not in self._decisions:
                raise RpcError("behind", f"round {r} completed here without you")


async def run_local(
    peer: DilocoPeer,
    rounds: int,
    *,
    checkpoint: Path | None = None,
    events: Callable[[RunEvent], None] | None = None,
) -> list[RoundRecord]:
    """The same rounds without a swarm: this peer is the only member (the average of one
    pseudo-gradient is itself), for comparison with a swarm run. Checkpoints every round."""
    records = []
    me = "local"
    while peer.state.round < rounds:
        r = peer.state.round + 1
        if events is not None:
            events(RunEvent("phase", r, "inner steps", peers=1))

        def one_round() -> RoundRecord:
            return peer.outer_phase(peer.inner_phase(), (me,))

        record = await trio.to_thread.run_sync(one_round)
        if checkpoint is not None:
            await trio.to_thread.run_sync(save_checkpoint, checkpoint, peer)
        records.append(record)
        if events is not None:
            events(RunEvent("round", r, record=record, peers=1))
    return records


__all__ = [
    "ROUND_PROTOCOL",
    "Behind",
    "RunConfig",
    "RunEvent",
    "SyncReport",
    "TrainingRun",
    "run_local",
]
