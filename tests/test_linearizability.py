"""Goal: the linearizability checker (tools/linearizability.py) accepts every
history a real register can produce and rejects every history it cannot.

Method: hand-made histories for each kind of anomaly (stale read, lost
write, a value nobody wrote, CAS anomalies, unknown outcomes both ways,
revision anomalies); the search compared with a brute-force enumeration of
every order on thousands of small random histories (linearizable or not);
and histories simulated from a real register with random overlaps, timeouts
and failures, which must pass, then the same with one anomaly injected,
which must fail (never "gave up").
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import random

import pytest

from tools import linearizability as lin
from tools.linearizability import CAS, FAIL, GET, OK, PUT, UNKNOWN, Op


def op(kind, start, end, outcome=OK, *, client=None, key=b"k", **fields) -> Op:
    return Op(client=client, op=kind, key=key, start_ns=start, end_ns=end, outcome=outcome, **fields)


def put(start, end, value, outcome=OK, **fields) -> Op:
    return op(PUT, start, end, outcome, value=value, **fields)


def get(start, end, result, outcome=OK, **fields) -> Op:
    return op(GET, start, end, outcome, result=result, **fields)


def cas(start, end, expected, new, result=None, outcome=OK, **fields) -> Op:
    return op(CAS, start, end, outcome, expected=expected, new=new, result=result, **fields)


def verdict(*operations, **options) -> str:
    return lin.check(list(operations), **options).verdict


LINEARIZABLE, NOT_LINEARIZABLE = lin.LINEARIZABLE, lin.NOT_LINEARIZABLE


# ---- hand-made histories -------------------------------------------------------------


def test_sequential_history_is_linearizable():
    assert verdict(get(0, 1, None), put(2, 3, b"a"), get(4, 5, b"a"), put(6, 7, b"b"), get(8, 9, b"b")) == LINEARIZABLE


def test_a_read_concurrent_with_a_write_may_see_either_value():
    assert verdict(put(0, 1, b"a"), put(2, 10, b"b"), get(3, 4, b"a")) == LINEARIZABLE
    assert verdict(put(0, 1, b"a"), put(2, 10, b"b"), get(3, 4, b"b")) == LINEARIZABLE


def test_reads_may_not_flip_back_once_a_newer_value_was_seen():
    # Both reads overlap the write, but the second starts after the first saw "b".
    assert verdict(put(0, 1, b"a"), put(2, 20, b"b"), get(3, 4, b"b"), get(5, 6, b"a")) == NOT_LINEARIZABLE


def test_stale_read_after_a_completed_write_is_caught():
    assert verdict(put(0, 1, b"a"), put(2, 3, b"b"), get(4, 5, b"a")) == NOT_LINEARIZABLE


def test_lost_write_is_caught():
    assert verdict(put(0, 1, b"a"), get(2, 3, None)) == NOT_LINEARIZABLE
    assert verdict(put(0, 1, b"a"), put(2, 3, b"b"), get(4, 5, b"a"), get(6, 7, b"a")) == NOT_LINEARIZABLE


def test_read_of_a_value_never_written_is_caught():
    assert verdict(put(0, 1, b"a"), get(2, 3, b"zzz")) == NOT_LINEARIZABLE


def test_read_before_the_write_started_is_caught():
    assert verdict(get(0, 1, b"a"), put(2, 3, b"a")) == NOT_LINEARIZABLE


def test_cas_semantics():
    # Succeeds on the expected value, fails on another, "absent" compares with no key.
    assert verdict(cas(0, 1, None, b"a", True), cas(2, 3, b"a", b"b", True), cas(4, 5, b"a", b"c", False),
                   get(6, 7, b"b")) == LINEARIZABLE
    # The same expected value cannot be swapped away twice.
    assert verdict(put(0, 1, b"a"), cas(2, 3, b"a", b"b", True), cas(4, 5, b"a", b"c", True)) == NOT_LINEARIZABLE
    # A CAS that failed although the value matched.
    assert verdict(put(0, 1, b"a"), cas(2, 3, b"a", b"b", False)) == NOT_LINEARIZABLE
    # A CAS that succeeded although the value did not match.
    assert verdict(put(0, 1, b"a"), cas(2, 3, b"x", b"b", True)) == NOT_LINEARIZABLE
    # A CAS whose write is then not seen.
    assert verdict(put(0, 1, b"a"), cas(2, 3, b"a", b"b", True), get(4, 5, b"a")) == NOT_LINEARIZABLE


def test_failed_cas_reporting_the_current_value():
    assert verdict(put(0, 1, b"a"), cas(2, 3, b"x", b"b", False, current=b"a")) == LINEARIZABLE
    assert verdict(put(0, 1, b"a"), cas(2, 3, b"x", b"b", False, current=None)) == NOT_LINEARIZABLE
    # "Found the expected value, and failed": impossible.
    assert verdict(put(0, 1, b"a"), cas(2, 3, b"a", b"b", False, current=b"a")) == NOT_LINEARIZABLE


def test_unknown_write_may_have_taken_effect_or_not():
    taken = [put(0, 1, b"a"), put(2, None, b"b", UNKNOWN), get(10, 11, b"b")]
    not_taken = [put(0, 1, b"a"), put(2, None, b"b", UNKNOWN), get(10, 11, b"a")]
    assert verdict(*taken) == LINEARIZABLE
    assert verdict(*not_taken) == LINEARIZABLE


def test_unknown_write_can_take_effect_long_after_the_client_gave_up():
    history = [put(0, 1, b"a"), put(2, None, b"b", UNKNOWN), get(10, 11, b"a"), get(20, 21, b"b")]
    assert verdict(*history) == LINEARIZABLE


def test_unknown_write_takes_effect_at_most_once_and_not_before_its_start():
    assert verdict(get(0, 1, b"b"), put(2, None, b"b", UNKNOWN)) == NOT_LINEARIZABLE
    # Seen, then gone, then seen again: it would have taken effect twice.
    assert verdict(put(0, 1, b"a"), put(2, None, b"b", UNKNOWN), get(10, 11, b"b"), put(12, 13, b"c"),
                   get(14, 15, b"b")) == NOT_LINEARIZABLE


def test_unknown_cas_both_ways():
    base = [put(0, 1, b"a"), cas(2, None, b"a", b"b", outcome=UNKNOWN)]
    assert verdict(*base, get(5, 6, b"b")) == LINEARIZABLE
    assert verdict(*base, get(5, 6, b"a")) == LINEARIZABLE
    # It can only apply where its expected value is there.
    assert verdict(put(0, 1, b"a"), put(2, 3, b"c"), cas(4, None, b"a", b"b", outcome=UNKNOWN),
                   get(5, 6, b"b")) == NOT_LINEARIZABLE


def test_failed_write_never_takes_effect():
    assert verdict(put(0, 1, b"a"), put(2, 3, b"b", FAIL), get(4, 5, b"a")) == LINEARIZABLE
    assert verdict(put(0, 1, b"a"), put(2, 3, b"b", FAIL), get(4, 5, b"b")) == NOT_LINEARIZABLE


def test_unobserved_unknown_write_still_explains_a_failed_cas_without_current_value():
    # The CAS failed, so the value was not "a": only the unknown put can explain it.
    history = [put(0, 1, b"a"), put(2, None, b"v", UNKNOWN), cas(5, 6, b"a", b"b", False)]
    assert verdict(*history) == LINEARIZABLE
    assert verdict(put(0, 1, b"a"), cas(5, 6, b"a", b"b", False)) == NOT_LINEARIZABLE


def test_keys_are_independent():
    history = [put(0, 10, b"a", key=b"x"), put(0, 10, b"b", key=b"y"), get(11, 12, b"a", key=b"x"),
               get(11, 12, b"b", key=b"y")]
    assert verdict(*history) == LINEARIZABLE
    result = lin.check(history + [get(13, 14, b"a", key=b"y")])
    assert [(key.key, key.verdict) for key in result.keys] == [(b"x", LINEARIZABLE), (b"y", NOT_LINEARIZABLE)]
    assert "get(b'y') -> b'a'" in result.summary()


def test_initial_values():
    assert verdict(get(0, 1, b"seed"), initial={b"k": b"seed"}) == LINEARIZABLE
    assert verdict(get(0, 1, None), initial={b"k": b"seed"}) == NOT_LINEARIZABLE


def test_overlapping_calls_of_one_client_are_a_harness_bug():
    with pytest.raises(ValueError, match="overlapping"):
        lin.check([put(0, 5, b"a", client=1), get(3, 4, b"a", client=1)])
    # After a timeout the client moves on: no overlap.
    assert verdict(put(0, None, b"a", UNKNOWN, client=1), get(3, 4, None, client=1)) == LINEARIZABLE


def test_invalid_operations_cannot_be_built():
    with pytest.raises(ValueError):
        op("delete", 0, 1)
    with pytest.raises(ValueError):
        put(5, 4, b"a")
    with pytest.raises(ValueError):
        cas(0, 1, b"a", b"b", result=None)
    with pytest.raises(ValueError):
        put(0, None, b"a", UNKNOWN, revision=3)


def test_search_bound_gives_up_rather_than_passing():
    # Twelve concurrent puts, then a read of a value none wrote: every order
    # of the puts is tried before the search can say no.
    history = [put(0, 100, b"v%d" % i) for i in range(12)] + [get(200, 201, b"nobody")]
    result = lin.check(history, max_steps=50)
    assert result.verdict == lin.GAVE_UP and not result.ok
    assert "max_steps" in result.summary()
    assert lin.check(history).verdict == NOT_LINEARIZABLE


# ---- revision checks -----------------------------------------------------------------


def test_two_writes_at_one_revision():
    history = [put(0, 1, b"a", revision=2), put(0, 1, b"b", key=b"other", revision=2)]
    result = lin.check(history)
    assert result.verdict == NOT_LINEARIZABLE and "two writes at revision 2" in result.anomalies[0]


def test_revision_going_back_in_real_time_across_keys():
    history = [put(0, 1, b"a", key=b"x", revision=5), get(2, 3, None, key=b"y", revision=4)]
    result = lin.check(history)
    assert result.verdict == NOT_LINEARIZABLE and "went back" in result.anomalies[0]
    # A write after a read at R must be above R; a read after a write may equal it.
    assert verdict(get(0, 1, None, key=b"y", revision=5), put(2, 3, b"a", key=b"x", revision=5)) == NOT_LINEARIZABLE
    assert verdict(put(0, 1, b"a", key=b"x", revision=5), get(2, 3, None, key=b"y", revision=5)) == LINEARIZABLE
    # Concurrent operations may come in any revision order.
    assert verdict(put(0, 10, b"a", key=b"x", revision=5), get(2, 3, None, key=b"y", revision=4)) == LINEARIZABLE


def test_read_that_missed_a_write_below_its_own_revision():
    # Value-wise fine (the read overlaps the write), but the read says "as of
    # revision 9" and the write happened at 8.
    history = [put(0, 1, b"a", revision=2), put(2, 20, b"b", revision=8), get(3, 4, b"a", revision=9, mod_revision=2)]
    result = lin.check(history)
    assert result.verdict == NOT_LINEARIZABLE and "missed the write at revision 8" in result.anomalies[0]
    assert all(key.verdict == LINEARIZABLE for key in result.keys)


def test_value_seen_with_another_mod_revision_than_it_was_written_at():
    history = [put(0, 1, b"a", revision=2), get(2, 3, b"a", revision=3, mod_revision=3)]
    assert "written at revision 2 and 3" in lin.check(history).anomalies[0]


def test_read_of_absent_key_after_it_was_written_below_the_read_revision():
    history = [put(0, 10, b"a", revision=2), get(1, 2, None, revision=3)]
    assert "initial value" in lin.check(history).anomalies[0]


def test_cas_that_succeeded_on_a_value_already_overwritten():
    history = [put(0, 1, b"a", revision=2), put(0, 9, b"b", revision=3, key=b"k"),
               cas(0, 9, b"a", b"c", True, revision=4)]
    result = lin.check(history)
    assert any("missed the write at revision 3" in anomaly for anomaly in result.anomalies)


def test_revisions_of_a_consistent_history_pass():
    history = [put(0, 1, b"a", revision=2), get(2, 3, b"a", revision=2, mod_revision=2),
               put(4, 5, b"z", key=b"o", revision=3), cas(6, 7, b"a", b"b", True, revision=4),
               cas(8, 9, b"a", b"c", False, current=b"b", revision=4), get(10, 11, b"b", revision=4, mod_revision=4)]
    assert verdict(*history) == LINEARIZABLE


# ---- saving and the command line -----------------------------------------------------


def test_history_round_trips_through_json_lines(tmp_path, capsys):
    history = [put(0, 1, b"a", client=1, revision=2), get(2, 3, None, client=2, key=b"o", revision=2),
               cas(4, None, b"a", b"b", outcome=UNKNOWN, client=1), cas(5, 6, b"q", b"r", False, current=b"a", client=3)]
    path = str(tmp_path / "history.jsonl")
    lin.save_history(path, history)
    assert lin.load_history(path) == history
    assert lin.main([path]) == 0
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(get(10, 11, b"zz", client=2).to_dict()) + "\n")
    assert lin.main([path]) == 1
    assert "not linearizable" in capsys.readouterr().out


def test_history_per_client_mapping():
    history = {"c1": [{"op": "put", "key": "k", "value": "a", "start_ns": 0, "end_ns": 1, "outcome": "ok"}],
               "c2": [{"op": "get", "key": "k", "result": "a", "start_ns": 2, "end_ns": 3, "outcome": "ok"},
                      {"op": "cas", "key": "k", "expected": "a", "new": "b", "start_ns": 4, "end_ns": 5,
                       "outcome": "ok", "result": False, "current": "a"}]}
    assert lin.check(history).verdict == NOT_LINEARIZABLE


# ---- the search against brute force --------------------------------------------------


def brute_force_linearizable(operations: list[Op], initial=None) -> bool:
    """Every subset of unknown operations, every order: the definition, literally."""
    certain = [o for o in operations if o.outcome == OK]
    maybe = [o for o in operations if o.outcome == UNKNOWN]
    for size in range(len(maybe) + 1):
        for chosen in itertools.combinations(maybe, size):
            for order in itertools.permutations(certain + list(chosen)):
                if _respects_real_time(order) and _legal(order, initial):
                    return True
    return False


def _respects_real_time(order) -> bool:
    for i, later in enumerate(order):
        for earlier in order[i + 1:]:
            if earlier.outcome == OK and earlier.end_ns < later.start_ns:
                return False
    return True


def _legal(order, state) -> bool:
    for o in order:
        if o.op == GET:
            if state != o.result:
                return False
        elif o.op == PUT:
            state = o.value
        elif o.outcome == UNKNOWN:
            state = o.new if state == o.expected else state
        elif o.result:
            if state != o.expected:
                return False
            state = o.new
        else:
            if state == o.expected or (o.current is not lin.NOT_READ and state != o.current):
                return False
    return True


def random_small_history(rng: random.Random, unique: bool) -> list[Op]:
    values = [None, b"a", b"b", b"c"]
    operations = []
    written = itertools.count()
    for _ in range(rng.randint(1, 6)):
        start = rng.randint(0, 20)
        end = start + rng.randint(0, 10)
        outcome = rng.choice([OK, OK, OK, UNKNOWN, FAIL])
        kind = rng.choice([GET, PUT, CAS])
        new = (b"w%d" % next(written)) if unique else rng.choice(values[1:])
        pool = values + [b"w%d" % i for i in range(3)]
        if kind == GET:
            operations.append(get(start, end, rng.choice(pool), outcome))
        elif kind == PUT:
            operations.append(put(start, end, new, outcome))
        else:
            result = rng.choice([True, False]) if outcome == OK else None
            current = rng.choice([lin.NOT_READ, rng.choice(pool)]) if result is False else lin.NOT_READ
            operations.append(cas(start, end, rng.choice(pool), new, result, outcome, current=current))
    return [dataclasses.replace(o, end_ns=None) if o.outcome == UNKNOWN else o for o in operations]


@pytest.mark.parametrize("unique", [True, False])
def test_search_agrees_with_brute_force_on_small_random_histories(unique):
    rng = random.Random(1234 + unique)
    seen = {True: 0, False: 0}
    for _ in range(3000):
        history = random_small_history(rng, unique)
        expected = brute_force_linearizable([o for o in history if o.outcome != FAIL])
        got = lin.check(history, check_revisions_too=False).verdict
        assert got == (LINEARIZABLE if expected else NOT_LINEARIZABLE), "\n".join(o.describe() for o in history)
        seen[expected] += 1
    assert min(seen.values()) > 300, seen  # both verdicts well exercised


# ---- histories simulated from a real register ----------------------------------------


def simulate(rng: random.Random, *, clients: int = 6, keys: int = 3, calls_per_client: int = 40,
             unknown_rate: float = 0.1, fail_rate: float = 0.05, max_latency: int = 30) -> list[Op]:
    """Clients call a real store (one revision counter, registers per key); each
    call takes effect at a random instant inside its interval (an unknown one at
    any instant after its start, or never)."""
    key_names = [b"key%d" % i for i in range(keys)]
    planned = []  # (op fields, linearization point or None)
    values = itertools.count()
    written: dict[bytes, list] = {key: [None] for key in key_names}
    for client in range(clients):
        now = rng.randint(0, 10)
        for _ in range(calls_per_client):
            start = now + rng.randint(0, 5)
            end = start + rng.randint(0, max_latency)
            key = rng.choice(key_names)
            kind = rng.choice([GET, GET, PUT, CAS])
            outcome = OK if rng.random() > unknown_rate + fail_rate else rng.choice([UNKNOWN, FAIL])
            if kind == GET and outcome == FAIL:
                outcome = OK
            fields = {"client": client, "op": kind, "key": key, "start_ns": start, "end_ns": end, "outcome": outcome}
            if kind == PUT:
                fields["value"] = b"v%d" % next(values)
                written[key].append(fields["value"])
            elif kind == CAS:
                fields["expected"] = rng.choice(written[key][-3:])
                fields["new"] = b"v%d" % next(values)
                written[key].append(fields["new"])
            if outcome == OK:
                point = rng.uniform(start, end)
            elif outcome == UNKNOWN and rng.random() < 0.5:
                point = start + rng.uniform(0, 5 * max_latency)
            else:
                point = None
            planned.append((fields, point))
            now = end
    state = {key: None for key in key_names}
    mod = {key: None for key in key_names}
    revision = 1
    for fields, point in sorted((p for p in planned if p[1] is not None), key=lambda p: (p[1], rng.random())):
        key = fields["key"]
        if fields["op"] == GET:
            fields.update(result=state[key], mod_revision=mod[key], revision=revision)
        elif fields["op"] == PUT:
            revision += 1
            state[key], mod[key] = fields["value"], revision
            fields["revision"] = revision
        elif state[key] == fields["expected"]:
            revision += 1
            state[key], mod[key] = fields["new"], revision
            fields.update(result=True, revision=revision)
        else:
            fields.update(result=False, current=state[key], revision=revision)
    operations = []
    for fields, _point in planned:
        if fields["outcome"] != OK:
            fields = {name: value for name, value in fields.items()
                      if name not in ("result", "current", "revision", "mod_revision")}
            if fields["outcome"] == UNKNOWN:
                fields["end_ns"] = None
        operations.append(Op(**fields))
    # Final reads once everything settled, as the harness does.
    last = max(max(o.end_ns or o.start_ns for o in operations), max(p[1] or 0 for p in planned)) + 1
    for key in key_names:
        operations.append(Op(client="final", op=GET, key=key, start_ns=int(last) + 1, end_ns=int(last) + 2,
                             outcome=OK, result=state[key], mod_revision=mod[key], revision=revision))
        last += 2
    return operations


def test_simulated_histories_are_linearizable():
    for seed in range(150):
        rng = random.Random(seed)
        history = simulate(rng, clients=rng.randint(2, 8), keys=rng.randint(1, 3),
                           unknown_rate=rng.choice([0.0, 0.1, 0.3]))
        result = lin.check(history)
        assert result.ok, f"seed {seed}: {result.summary()}"


def test_a_large_history_with_many_timeouts_is_checked_in_bounds():
    history = simulate(random.Random(7), clients=12, keys=2, calls_per_client=150, unknown_rate=0.2)
    result = lin.check(history)
    assert result.ok, result.summary()
    assert max(key.steps for key in result.keys) < lin.DEFAULT_MAX_STEPS // 10


# Anomaly injections: each returns a changed history that no register can
# produce, or None when this history offers no place for it.


def _replace(history, old, new):
    return [new if o is old else o for o in history]


def inject_never_written_read(rng, history):
    reads = [o for o in history if o.op == GET and o.outcome == OK]
    target = rng.choice(reads)
    return _replace(history, target, dataclasses.replace(target, result=b"never-written", mod_revision=None))


def _ok_writes(history, key):
    return [o for o in history if o.key == key and o.outcome == OK and (o.op == PUT or (o.op == CAS and o.result))]


def inject_stale_read(rng, history):
    """A read that returns a value overwritten by a write that ended before it began."""
    reads = [o for o in history if o.op == GET and o.outcome == OK]
    rng.shuffle(reads)
    for read in reads:
        writes = _ok_writes(history, read.key)
        for newer in writes:
            if newer.end_ns < read.start_ns:
                older = [w for w in writes if w.end_ns < newer.start_ns]
                if older:
                    stale = rng.choice(older)
                    return _replace(history, read, dataclasses.replace(read, result=stale.written,
                                                                        mod_revision=stale.revision))
    return None


def inject_lost_write(rng, history):
    """A read says "absent" after an acknowledged write to the key had ended."""
    reads = [o for o in history if o.op == GET and o.outcome == OK]
    rng.shuffle(reads)
    for read in reads:
        if any(w.end_ns < read.start_ns for w in _ok_writes(history, read.key)):
            return _replace(history, read, dataclasses.replace(read, result=None, mod_revision=None))
    return None


def inject_cas_found_expected(rng, history):
    """A failed CAS reporting that it found exactly the value it expected."""
    failed = [o for o in history if o.op == CAS and o.outcome == OK and not o.result]
    if not failed:
        return None
    target = rng.choice(failed)
    return _replace(history, target, dataclasses.replace(target, current=target.expected))


def inject_cas_applied_twice(rng, history):
    """A second CAS from the same expected value succeeds after the first finished."""
    succeeded = [o for o in history if o.op == CAS and o.outcome == OK and o.result and o.expected is not None]
    if not succeeded:
        return None
    first = rng.choice(succeeded)
    last = max(o.end_ns or o.start_ns for o in history)
    again = Op(client="injected", op=CAS, key=first.key, start_ns=last + 10, end_ns=last + 11, outcome=OK,
               expected=first.expected, new=b"injected-new", result=True)
    return history + [again]


def inject_unknown_write_seen_before_it_started(rng, history):
    """An unknown put whose value a read returned before the put was even sent."""
    reads = [o for o in history if o.op == GET and o.outcome == OK and o.end_ns > 0]
    target = rng.choice(reads)
    early = Op(client="injected", op=PUT, key=target.key, start_ns=target.end_ns + 1, end_ns=None,
               outcome=UNKNOWN, value=b"from-the-future")
    return _replace(history, target, dataclasses.replace(target, result=b"from-the-future", mod_revision=None)) + [early]


INJECTIONS = [inject_never_written_read, inject_stale_read, inject_lost_write, inject_cas_found_expected,
              inject_cas_applied_twice, inject_unknown_write_seen_before_it_started]


@pytest.mark.parametrize("inject", INJECTIONS, ids=lambda f: f.__name__.removeprefix("inject_"))
def test_injected_anomalies_are_caught_by_the_search_alone(inject):
    caught = 0
    for seed in range(60):
        rng = random.Random(seed)
        history = simulate(rng, clients=rng.randint(2, 6), keys=rng.randint(1, 3), unknown_rate=0.15)
        broken = inject(rng, history)
        if broken is None:
            continue
        # Revisions off: the register search must see it on its own.
        result = lin.check(broken, check_revisions_too=False)
        assert result.verdict == NOT_LINEARIZABLE, f"seed {seed}: {result.summary()}"
        caught += 1
    assert caught >= 30


def test_injected_revision_anomalies_are_caught():
    for seed in range(60):
        rng = random.Random(seed)
        history = simulate(rng, clients=4, keys=2, unknown_rate=0.1)
        writes = sorted((o for o in history if o.outcome == OK and o.revision is not None
                         and (o.op == PUT or (o.op == CAS and o.result))), key=lambda o: o.revision)
        first, second = writes[0], writes[-1]
        if rng.random() < 0.5:
            broken = _replace(history, second, dataclasses.replace(second, revision=first.revision))
        else:  # swap: the later write gets the earlier revision
            broken = _replace(_replace(history, first, dataclasses.replace(first, revision=second.revision)),
                              second, dataclasses.replace(second, revision=first.revision))
        result = lin.check(broken)
        assert result.verdict == NOT_LINEARIZABLE and result.anomaly_count > 0, f"seed {seed}"
