"""Goal: the lessor core decides expiry as etcd's lessor does: promotion
extends and never cuts, leases expire in expiry order, expired() is bounded
and does not hand a lease out twice while its revoke is in flight, renewals
restart the TTL, and the minimum TTL is etcd's. Method: drive the pure core
with a hand-held millisecond clock."""

from __future__ import annotations

from actors.lessor import Lessor, min_ttl_s, seconds_truncated


def primary(now_ms=0, leases=(), extend_ms=0, revoke_retry_ms=1000) -> Lessor:
    lessor = Lessor(extend_ms=extend_ms, revoke_retry_ms=revoke_retry_ms)
    lessor.promote(now_ms, leases)
    return lessor


def test_min_ttl_is_etcds():
    assert min_ttl_s(1000, 100) == 2  # etcd's defaults: 15 ticks of 100 ms = 1.5 s -> 2 s
    assert min_ttl_s(500, 50) == 1  # 15 ticks of 50 ms = 0.75 s -> 1 s
    assert min_ttl_s(5000, 100) == 8  # 75 ticks of 100 ms = 7.5 s -> 8 s
    assert min_ttl_s(1100, 200) == 2  # 5 ticks: (3*5)//2 = 7 ticks (integer division as etcd) = 1.4 s -> 2 s


def test_seconds_truncate_toward_zero_as_go():
    assert [seconds_truncated(ms) for ms in (9999, 1000, 999, 0, -1, -999, -1000, -1500)] == [9, 1, 0, 0, 0, 0, -1, -1]


def test_promotion_extends_every_lease_by_ttl_and_election_timeout():
    lessor = primary(now_ms=10_000, leases=[(1, 5), (2, 60)], extend_ms=500)
    assert lessor.remaining_ms(1, 10_000) == 5_500
    assert lessor.remaining_ms(2, 10_000) == 60_500
    # A later promotion (leader change, restart) never cuts: remaining starts over.
    lessor.demote()
    assert len(lessor) == 0 and not lessor.primary
    lessor.promote(14_000, [(1, 5), (2, 60)])
    assert lessor.remaining_ms(1, 14_000) == 5_500


def test_follower_lessor_holds_and_expires_nothing():
    lessor = Lessor(extend_ms=0, revoke_retry_ms=1000)
    lessor.grant(1, 1, now_ms=0)
    assert len(lessor) == 0
    assert lessor.expired(1_000_000, 10) == []
    assert lessor.renew(1, 0) is None


def test_expiry_order_and_not_before_ttl():
    lessor = primary()
    lessor.grant(3, 3, now_ms=0)
    lessor.grant(1, 1, now_ms=0)
    lessor.grant(2, 2, now_ms=0)
    assert lessor.expired(999, 10) == []
    assert lessor.expired(1000, 10) == [1]
    lessor.revoke(1)
    assert lessor.expired(5000, 10) == [2, 3]


def test_expired_is_bounded_per_call():
    lessor = primary()
    for lease_id in range(1, 101):
        lessor.grant(lease_id, 1, now_ms=0)
    batches = [lessor.expired(2000, 30) for _ in range(4)]
    assert [len(batch) for batch in batches] == [30, 30, 30, 10]
    assert sorted(sum(batches, [])) == list(range(1, 101))


def test_revoke_in_flight_is_not_handed_out_again_until_retry():
    lessor = primary(revoke_retry_ms=1000)
    lessor.grant(7, 1, now_ms=0)
    assert lessor.expired(1000, 10) == [7]
    assert lessor.expired(1500, 10) == []  # its revoke is in flight
    assert lessor.renew(7, 1500) is None  # an expired lease cannot be renewed
    assert lessor.expired(2000, 10) == [7]  # the revoke was lost: retried
    lessor.revoke(7)  # the revoke is applied
    assert lessor.expired(10_000, 10) == [] and 7 not in lessor


def test_renew_restarts_the_ttl_and_unknown_is_none():
    lessor = primary()
    lessor.grant(1, 2, now_ms=0)
    assert lessor.renew(1, 1500) == 2
    assert lessor.remaining_ms(1, 1500) == 2000
    assert lessor.expired(2000, 10) == []  # the old expiry is stale
    assert lessor.expired(3500, 10) == [1]
    assert lessor.renew(99, 0) is None and lessor.remaining_ms(99, 0) is None


def test_grant_of_a_known_lease_keeps_its_longer_expiry():
    lessor = primary(now_ms=0, leases=[(1, 5)], extend_ms=500)
    lessor.grant(1, 5, now_ms=100)  # the report of a grant the store already had
    assert lessor.remaining_ms(1, 100) == 5_400


def test_many_renewals_keep_the_heap_bounded():
    lessor = primary()
    lessor.grant(1, 10, now_ms=0)
    for now_ms in range(0, 100_000, 10):
        lessor.renew(1, now_ms)
    assert len(lessor._heap) <= 2 * len(lessor) + 65
    assert lessor.expired(99_990 + 9_999, 10) == []
    assert lessor.expired(99_990 + 10_000, 10) == [1]


def test_reconcile_adds_missing_extended_and_drops_gone():
    lessor = primary(now_ms=0, leases=[(1, 5), (2, 5)], extend_ms=500)
    assert lessor.reconcile(1000, [(2, 5), (3, 10)]) == (1, 1)
    assert 1 not in lessor
    assert lessor.remaining_ms(2, 1000) == 4_500  # unchanged
    assert lessor.remaining_ms(3, 1000) == 10_500  # as on promotion
