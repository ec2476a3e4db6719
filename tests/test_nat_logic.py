"""NAT traversal decisions: pure logic with the clock passed in (nat_logic.py)."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from shoal.transport.backoff import Backoff
from shoal.transport.host import Reachability
from shoal.transport.nat_logic import (
    CheckSchedule,
    MinInterval,
    PunchBook,
    PunchState,
    ReachabilityTracker,
    RelayBook,
    choose_dialback_peer,
    initiates_punch,
    is_local_ip,
    parse_tcp_addr,
    plan_dialback,
)

P, Q, R = "12D3KooWP", "12D3KooWQ", "12D3KooWR"


# ---- backoff and rate limit -----------------------------------------------------------


def test_backoff_doubles_caps_resets_and_is_per_key() -> None:
    backoff: Backoff[str] = Backoff(base=1.0, cap=8.0)
    assert [backoff.failed(P, 100.0) for _ in range(5)] == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert not backoff.ready(P, 107.9) and backoff.ready(P, 108.0)
    assert backoff.ready(Q, 100.0)
    assert backoff.next_retry(100.0) == 108.0 and backoff.next_retry(108.0) is None
    backoff.succeeded(P)
    assert backoff.ready(P, 0.0) and backoff.failed(P, 0.0) == 1.0


@given(st.lists(st.floats(0, 1000), min_size=1, max_size=30), st.floats(0.1, 100))
def test_min_interval_never_allows_two_events_closer_than_the_interval(
    gaps: list[float], interval: float
) -> None:
    limiter: MinInterval[str] = MinInterval(interval)
    now, allowed = 0.0, []
    for gap in gaps:
        now += gap
        if limiter.allow(P, now):
            allowed.append(now)
    assert allowed[0] == gaps[0]
    assert all(b - a >= interval for a, b in itertools.pairwise(allowed))
    assert limiter.allow(Q, now)  # other keys are independent


# ---- dial-back planning -----------------------------------------------------------------


def test_parse_tcp_addr_accepts_only_plain_tcp() -> None:
    assert parse_tcp_addr("/ip4/100.64.0.2/tcp/4001") == ("100.64.0.2", 4001)
    assert parse_tcp_addr(f"/ip4/100.64.0.2/tcp/4001/p2p/{P}") == ("100.64.0.2", 4001)
    assert parse_tcp_addr("/ip6/::1/tcp/9") == ("::1", 9)
    for bad in (
        "/ip4/1.2.3.4/udp/4001/quic-v1",
        "/ip4/1.2.3.4/tcp/4001/ws",
        "/ip4/1.2.3.4/tcp/0",
        "/ip4/1.2.3.4/tcp/70000",
        "/ip4/::1/tcp/1",
        "/dns4/example.com/tcp/1",
        f"/ip4/1.2.3.4/tcp/1/p2p/{P}/p2p-circuit/p2p/{Q}",
        "ip4/1.2.3.4/tcp/1",
        "/ip4/1.2.3/tcp/1",
    ):
        assert parse_tcp_addr(bad) is None, bad


def test_dialback_dials_only_the_observed_ip() -> None:
    requested = [
        "/ip4/10.1.0.2/tcp/4001",  # a LAN address: the observed IP with its port instead
        "/ip4/100.64.0.2/tcp/4002",  # already the observed IP
        "/ip4/8.8.8.8/tcp/4001",  # someone else's: becomes the observed IP, deduplicated
        "/ip6/2001:db8::1/tcp/4001",  # no observed IPv6: dropped
        "/ip4/1.2.3.4/udp/4001/quic-v1",  # not TCP: dropped
    ]
    assert plan_dialback(requested, ["100.64.0.2"], limit=8) == [
        ("100.64.0.2", 4001),
        ("100.64.0.2", 4002),
    ]
    assert plan_dialback(requested, [], limit=8) == []
    assert plan_dialback(requested, ["100.64.0.2"], limit=1) == [("100.64.0.2", 4001)]


@given(
    st.lists(
        st.tuples(st.ip_addresses(v=4).map(str), st.integers(1, 65535)).map(
            lambda t: f"/ip4/{t[0]}/tcp/{t[1]}"
        ),
        max_size=20,
    ),
    st.lists(st.ip_addresses(v=4).map(str), max_size=3),
    st.integers(0, 6),
)
def test_dialback_never_targets_an_unobserved_ip(
    requested: list[str], observed: list[str], limit: int
) -> None:
    plan = plan_dialback(requested, observed, limit=limit)
    assert len(plan) <= limit and len(set(plan)) == len(plan)
    assert all(ip in observed for ip, _ in plan)


def test_local_ips() -> None:
    assert all(map(is_local_ip, ["10.1.0.2", "192.168.1.5", "127.0.0.1", "169.254.1.1", "fd00::1"]))
    # 100.64/10 (carrier-grade NAT space) is what the namespace test's "internet" uses.
    assert not any(map(is_local_ip, ["100.64.0.1", "8.8.8.8", "2001:4860::1", "nonsense"]))


# ---- reachability -----------------------------------------------------------------------


def test_reachability_unknown_until_someone_answers() -> None:
    assert ReachabilityTracker(ttl=60).status(0.0) is Reachability.UNKNOWN


def test_reachability_failure_means_private() -> None:
    tracker = ReachabilityTracker(ttl=60)
    tracker.record(P, reachable=False, ip=None, now=0.0)
    assert tracker.status(1.0) is Reachability.PRIVATE


def test_reachability_success_from_outside_wins_over_failures() -> None:
    tracker = ReachabilityTracker(ttl=60)
    tracker.record(P, reachable=False, ip=None, now=0.0)
    tracker.record(Q, reachable=True, ip="100.64.0.1", now=1.0)
    assert tracker.status(2.0) is Reachability.PUBLIC
    assert tracker.confirmations(2.0) == 2


def test_reachability_lan_success_does_not_outvote_an_outside_failure() -> None:
    tracker = ReachabilityTracker(ttl=60)
    tracker.record(P, reachable=True, ip="192.168.1.7", now=0.0)
    assert tracker.status(1.0) is Reachability.PUBLIC  # a LAN-only swarm: fine
    tracker.record(Q, reachable=False, ip=None, now=1.0)
    assert tracker.status(2.0) is Reachability.PRIVATE


def test_reachability_results_expire_and_the_latest_per_peer_counts() -> None:
    tracker = ReachabilityTracker(ttl=60)
    tracker.record(P, reachable=False, ip=None, now=0.0)
    tracker.record(P, reachable=True, ip="100.64.0.9", now=10.0)  # port forward added
    assert tracker.status(11.0) is Reachability.PUBLIC
    assert tracker.status(70.0) is Reachability.UNKNOWN
    assert tracker.confirmations(70.0) == 0


# ---- check schedule ---------------------------------------------------------------------


def _schedule() -> CheckSchedule:
    return CheckSchedule(
        interval=600.0, min_gap=10.0, confirmations=2, retry=Backoff(base=2.0, cap=120.0)
    )


def test_first_check_waits_for_a_peer_then_runs_at_once() -> None:
    schedule = _schedule()
    assert not schedule.due(1e9)
    schedule.on_peer_connected(5.0, confirmations=0)
    assert schedule.due(5.0)


def test_conclusive_check_then_second_opinion_then_interval() -> None:
    schedule = _schedule()
    schedule.on_peer_connected(0.0, confirmations=0)
    schedule.on_checked(1.0, conclusive=True)
    assert not schedule.due(599.0) and schedule.due(601.0)
    schedule.on_peer_connected(3.0, confirmations=1)  # a second peer: ask it soon
    assert not schedule.due(10.9) and schedule.due(11.0)
    schedule.on_checked(11.0, conclusive=True)
    schedule.on_peer_connected(12.0, confirmations=2)  # enough opinions: no extra check
    assert not schedule.due(610.0) and schedule.due(611.0)


def test_inconclusive_checks_back_off_and_no_peer_waits() -> None:
    schedule = _schedule()
    schedule.on_peer_connected(0.0, confirmations=0)
    schedule.on_checked(0.0, conclusive=False)
    schedule.on_checked(2.0, conclusive=False)
    assert not schedule.due(5.9) and schedule.due(6.0)
    schedule.on_no_peer()
    assert not schedule.due(1e9)


def test_choose_dialback_peer_prefers_never_or_longest_ago_asked() -> None:
    asked = {P: 100.0, Q: 50.0}
    assert choose_dialback_peer([P, Q, R], asked, 200.0, cooldown=60.0) == R
    assert choose_dialback_peer([P, Q], asked, 200.0, cooldown=60.0) == Q
    assert choose_dialback_peer([P, Q], asked, 120.0, cooldown=60.0) == Q
    assert choose_dialback_peer([P], asked, 120.0, cooldown=60.0) is None
    assert choose_dialback_peer([], asked, 120.0, cooldown=60.0) is None


# ---- relays -----------------------------------------------------------------------------


def _book(want: int = 2) -> RelayBook:
    return RelayBook(want=want, refresh_margin=300.0, backoff=Backoff(base=2.0, cap=300.0))


def test_relay_book_fills_up_to_want_in_preference_order() -> None:
    book = _book()
    assert book.to_reserve([P, Q, R, P], 0.0) == [P, Q]
    book.reserved(P, expires_at=3600.0, addrs=[f"/ip4/100.64.0.1/tcp/4001/p2p/{P}"])
    assert book.to_reserve([P, Q, R], 1.0) == [Q]
    book.failed(Q, 1.0)  # refused: back off, take the next one
    assert book.to_reserve([P, Q, R], 2.0) == [R]
    book.reserved(R, expires_at=3600.0, addrs=[f"/ip4/100.64.0.5/tcp/4001/p2p/{R}"])
    assert book.to_reserve([P, Q, R], 3.0) == []
    assert book.relayed_addrs("ME", 3.0) == [
        f"/ip4/100.64.0.1/tcp/4001/p2p/{P}/p2p-circuit/p2p/ME",
        f"/ip4/100.64.0.5/tcp/4001/p2p/{R}/p2p-circuit/p2p/ME",
    ]


def test_relay_book_refreshes_before_expiry_and_forgets_lost_relays() -> None:
    book = _book(want=1)
    book.reserved(P, expires_at=3600.0, addrs=["/a"])
    assert book.next_wake(0.0) == 3300.0
    assert book.to_reserve([P, Q], 3299.0) == []
    assert book.to_reserve([P, Q], 3300.0) == [P]  # refresh, and no new one (want=1)
    book.failed(P, 3300.0)
    assert book.to_reserve([P, Q], 3301.0) == []  # refresh is backing off
    assert book.slots(3600.0) == []  # expired
    assert book.to_reserve([P, Q], 3600.0) == [P]  # a new reservation, P still first
    book.reserved(Q, expires_at=9999.0, addrs=["/q"])
    book.lost(Q)
    assert book.relayed_addrs("ME", 4000.0) == []


def test_relay_book_clear_drops_everything() -> None:
    book = _book()
    book.reserved(P, expires_at=100.0, addrs=["/a"])
    book.clear()
    assert book.slots(0.0) == [] and book.next_wake(0.0) is None


# ---- hole punching ----------------------------------------------------------------------


@given(st.text(min_size=1), st.text(min_size=1), st.booleans(), st.booleans())
def test_exactly_one_end_initiates_a_punch(a: str, b: str, a_dialed: bool, b_dialed: bool) -> None:
    """a_dialed: a opened a relayed connection to b (so b has it inbound), and vice versa."""
    if a == b or not (a_dialed or b_dialed):
        return
    a_goes = initiates_punch(a, b, inbound=b_dialed, outbound=a_dialed)
    b_goes = initiates_punch(b, a, inbound=a_dialed, outbound=b_dialed)
    assert a_goes != b_goes


def test_punch_book_one_at_a_time_and_backoff_after_failure() -> None:
    book = PunchBook(backoff=Backoff(base=60.0, cap=1800.0))
    assert book.should_start(P, 0.0)
    book.started(P, 0.0)
    assert not book.should_start(P, 1.0)
    book.finished(P, direct=False, now=23.0)
    outcome = book.outcomes()[P]
    assert (outcome.state, outcome.attempts, outcome.took) == (PunchState.FAILED, 1, 23.0)
    assert not book.should_start(P, 82.9) and book.should_start(P, 83.0)
    book.started(P, 83.0)
    book.finished(P, direct=True, now=83.5)
    assert book.outcomes()[P].state is PunchState.DIRECT and book.outcomes()[P].attempts == 2
    book.forget(P)
    assert P not in book.outcomes() and book.should_start(P, 84.0)


def test_punch_book_retries_quickly_before_backing_off() -> None:
    book = PunchBook(backoff=Backoff(base=60.0, cap=1800.0), quick_retries=2, quick_delay=3.0)
    now = 0.0
    for attempt in (1, 2):  # the quick retries
        book.started(P, now)
        book.finished(P, direct=False, now=now + 1.0)
        assert book.outcomes()[P].attempts == attempt
        assert not book.should_start(P, now + 3.9) and book.should_start(P, now + 4.0)
        now += 4.0
    book.started(P, now)  # the third failure in a row: the backoff's first delay
    book.finished(P, direct=False, now=now + 1.0)
    assert not book.should_start(P, now + 60.9) and book.should_start(P, now + 61.0)
    book.started(P, now + 61.0)
    book.finished(P, direct=False, now=now + 62.0)
    assert not book.should_start(P, now + 181.9) and book.should_start(P, now + 182.0)
    # A success resets both: the next failure is retried quickly again.
    book.started(P, 500.0)
    book.finished(P, direct=True, now=501.0)
    book.started(P, 600.0)
    book.finished(P, direct=False, now=601.0)
    assert book.should_start(P, 604.0)
    # So does the peer leaving.
    book.forget(P)
    book.started(P, 700.0)
    for start in (700.0, 704.0):
        book.finished(P, direct=False, now=start + 1.0)
        assert book.should_start(P, start + 4.0)
        book.started(P, start + 4.0)
    book.finished(P, direct=False, now=709.0)
    assert not book.should_start(P, 768.9) and book.should_start(P, 769.0)


def test_punch_book_keeps_a_running_attempt_when_the_peer_goes() -> None:
    book = PunchBook(backoff=Backoff(base=60.0, cap=1800.0))
    book.started(P, 0.0)
    book.forget(P)
    assert book.outcomes()[P].state is PunchState.RUNNING
