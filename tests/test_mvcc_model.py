"""Property tests: the LMDB MvccStore agrees with the naive model (tests/mvcc_model.py).

Goal: every response, revision and error of the real store equals the
model's for random histories of puts, deletes, txns (nested), compactions,
leases and alarms, with reads at past revisions, limits, sorts, filters and
long keys. Method: hypothesis draws a list of steps; write steps are grouped
into one `apply()` call (one LMDB transaction) of several raft entries;
physical compaction steps run at random points and must never change an
answer. The store's inline key length is 4 bytes so most keys take the
long-key path (prefix + digest, group sort by full key).

Longer runs: QUORUMKV_HYPOTHESIS_PROFILE=long (or set max examples with
QUORUMKV_HYPOTHESIS_EXAMPLES).
"""

from __future__ import annotations

import os
import tempfile

from hypothesis import HealthCheck, Phase, given, settings, strategies as st

from actors.mvcc import MvccStore
from protocol.codec import STATUS_OK
from protocol.errors import QuorumError
from protocol.limits import Limits
from protocol.messages import validate_request

try:
    from tests.mvcc_model import Model
except ImportError:  # tests/ is not a package: pytest puts it on sys.path
    from mvcc_model import Model

settings.register_profile("ci", max_examples=120, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("long", max_examples=int(os.environ.get("QUORUMKV_HYPOTHESIS_EXAMPLES", "3000")),
                          deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# For checking that a deliberately broken store fails fast (no shrinking).
settings.register_profile("noshrink", parent=settings.get_profile("ci"),
                          phases=[Phase.explicit, Phase.reuse, Phase.generate])
settings.load_profile(os.environ.get("QUORUMKV_HYPOTHESIS_PROFILE", "ci"))

LIMITS = Limits(compaction_batch_revisions=3)
INLINE = 4

short_keys = st.lists(st.sampled_from(b"ab\x00\xff"), min_size=1, max_size=INLINE).map(bytes)
# Long keys share a few INLINE-byte prefixes so groups sorted by full key are common.
long_keys = st.tuples(st.sampled_from([b"abab", b"aaaa", b"b\xff\xff\xff"]),
                      st.lists(st.sampled_from(b"ab\x00\xff"), min_size=1, max_size=3).map(bytes)).map(
    lambda parts: parts[0] + parts[1])
keys = st.one_of(short_keys, long_keys)
values = st.sampled_from([b"", b"x", b"y", b"zz", b"x" * 40])
range_ends = st.one_of(st.just(b""), st.just(b""), st.just(b"\x00"), keys)
lease_ids = st.sampled_from([0, 0, 0, 1, 2, 3])
revision_choice = st.tuples(st.sampled_from(["zero", "past", "future", "compacted", "current"]),
                            st.integers(0, 1000))


def put_body():
    rare = st.sampled_from([False, False, False, True])
    return st.fixed_dictionaries({"key": keys, "value": values, "lease": lease_ids},
                                 optional={"prev_kv": st.booleans(), "ignore_value": rare, "ignore_lease": rare})


def delete_body():
    return st.fixed_dictionaries({"key": keys, "range_end": range_ends, "prev_kv": st.booleans()})


def range_body():
    return st.fixed_dictionaries(
        {"key": keys, "range_end": range_ends, "revision": revision_choice},
        optional={"limit": st.integers(0, 4), "sort_order": st.integers(0, 2), "sort_target": st.integers(0, 4),
                  "keys_only": st.booleans(), "count_only": st.booleans(),
                  "min_mod_revision": st.integers(0, 15), "max_mod_revision": st.integers(0, 15),
                  "min_create_revision": st.integers(0, 15), "max_create_revision": st.integers(0, 15)})


compares = st.fixed_dictionaries(
    {"key": keys, "result": st.integers(0, 3), "target": st.integers(0, 4)},
    optional={"range_end": range_ends, "version": st.integers(0, 3), "create_revision": st.integers(0, 12),
              "mod_revision": st.integers(0, 12), "value": values, "lease": lease_ids})


def txn_body(depth: int):
    item = st.one_of(put_body().map(lambda b: {"request_put": b}),
                     delete_body().map(lambda b: {"request_delete_range": b}),
                     range_body().map(lambda b: {"request_range": b}))
    if depth > 0:
        item = st.one_of(item, txn_body(depth - 1).map(lambda b: {"request_txn": b}))
    return st.fixed_dictionaries({"compare": st.lists(compares, max_size=3),
                                  "success": st.lists(item, max_size=4), "failure": st.lists(item, max_size=4)})


write_ops = st.one_of(
    st.tuples(st.just("put"), put_body()),
    st.tuples(st.just("put"), put_body()),
    st.tuples(st.just("put"), put_body()),
    st.tuples(st.just("delete_range"), delete_body()),
    st.tuples(st.just("txn"), txn_body(1)),
    st.tuples(st.just("txn"), txn_body(1)),
    st.tuples(st.just("compaction"), st.fixed_dictionaries({"revision": revision_choice})),
    st.tuples(st.just("compaction"), st.fixed_dictionaries({"revision": st.tuples(
        st.just("above_compacted"), st.integers(0, 1000))})),
    st.tuples(st.just("lease_grant"), st.fixed_dictionaries({"ID": lease_ids, "TTL": st.sampled_from(
        [5, 60, 9_000_000_001])})),
    st.tuples(st.just("lease_revoke"), st.fixed_dictionaries({"ID": lease_ids})),
    # NOSPACE blocks puts: deactivation is drawn more often than activation.
    st.tuples(st.just("alarm"), st.fixed_dictionaries({"action": st.sampled_from([0, 1, 2, 2, 2]),
                                                       "member_id": st.sampled_from([7, 7, 0]),
                                                       "alarm": st.sampled_from([0, 1, 1, 2])})),
)
steps = st.lists(st.one_of(
    st.tuples(st.just("batch"), st.lists(st.lists(write_ops, min_size=1, max_size=6), min_size=1, max_size=3)),
    st.tuples(st.just("batch"), st.lists(st.lists(write_ops, min_size=1, max_size=6), min_size=1, max_size=3)),
    st.tuples(st.just("range"), range_body()),
    st.tuples(st.just("compact_step"), st.just(None)),
    st.tuples(st.just("lease_ttl"), st.fixed_dictionaries({"ID": lease_ids, "keys": st.booleans()})),
    st.tuples(st.just("hash"), revision_choice),
), min_size=4, max_size=30)


def pick_revision(choice, model: Model) -> int:
    mode, number = choice
    if mode == "zero":
        return 0
    if mode == "future":
        return model.revision + 1 + number % 2
    if mode == "compacted":
        return max(0, model.compact_revision - number % 2)
    if mode == "above_compacted" and model.revision > model.compact_revision:
        return model.compact_revision + 1 + number % (model.revision - model.compact_revision)
    if mode == "current":
        return model.revision
    return number % (model.revision + 1)


def materialise(value, model: Model):
    """Replace revision choices (tuples) by concrete revisions for the current model state."""
    if isinstance(value, tuple):
        return pick_revision(value, model)
    if isinstance(value, dict):
        return {k: materialise(v, model) for k, v in value.items()}
    if isinstance(value, list):
        return [materialise(v, model) for v in value]
    return value


def valid(op: str, body: dict):
    try:
        return validate_request(op, body, LIMITS)
    except QuorumError:
        return None


def call(read):
    try:
        return STATUS_OK, read()
    except QuorumError as error:
        return 1, error.to_wire()


def run_history(store: MvccStore, model: Model, history, apply_index: list[int]) -> None:
    for kind, arg in history:
        if kind == "batch":
            entries = []
            expected = []
            for requests in arg:
                apply_index[0] += 1
                entry = []
                for op, raw in requests:
                    body = valid(op, materialise(raw, model))
                    if body is None:
                        continue
                    entry.append((len(expected), op, body))
                    # The model applies in order; materialising later ops sees its new state.
                    expected.append((len(expected), *model.apply(op, body)))
                entries.append((apply_index[0], 3, entry))
            assert store.apply(entries) == expected
            assert store.applied_index() == apply_index[0]
        elif kind == "range":
            body = valid("range", materialise(arg, model))
            if body is not None:
                assert call(lambda: store.range(body)) == call(lambda: model.range(body))
        elif kind == "compact_step":
            store.compact_step()
        elif kind == "lease_ttl":
            assert store.lease_time_to_live(arg) == model.lease_time_to_live(arg)
        elif kind == "hash":
            revision = pick_revision(arg, model)
            status, expected = call(lambda: model.hash_kv_revision_check(revision))
            store_status, body = call(lambda: store.hash_kv(revision))
            assert store_status == status
            if status != STATUS_OK:
                assert body == expected
        assert store.revision() == model.revision
        assert store.compact_revision() == model.compact_revision
    # Every revision still readable answers the same, whole key space.
    for revision in range(max(model.compact_revision, 1), model.revision + 1):
        body = validate_request("range", {"key": b"\x00", "range_end": b"\x00", "revision": revision}, LIMITS)
        assert store.range(body) == model.range(body)
    # The revision table holds exactly each revision's changes (what watchers are sent).
    start = model.compact_revision + 1
    events = dict((revision, evs) for revision, evs in store.events(start, model.revision, 1 << 30))
    for revision in range(start, model.revision + 1):
        before, after = model.history[revision - 1], model.history[revision]
        expected = sorted([("PUT", key, tuple(sorted(kv.items()))) for key, kv in after.items()
                           if before.get(key) != kv] +
                          [("DELETE", key, ()) for key in before if key not in after])
        got = sorted((e["type"], e["kv"]["key"], tuple(sorted(e["kv"].items())) if e["type"] == "PUT" else ())
                     for e in events.get(revision, []))
        assert got == expected, revision
    assert store.lease_leases() == model.lease_leases()
    assert store.alarms() == [{"member_id": m, "alarm": a} for m, a in model.alarms]


def open_store(directory: str) -> MvccStore:
    return MvccStore.open(directory, writer=True, map_size_bytes=64 << 20, quota_backend_bytes=32 << 20,
                          limits=LIMITS, inline_key_bytes=INLINE, sync=False)


@given(steps)
def test_store_agrees_with_model(history):
    with tempfile.TemporaryDirectory() as directory:
        store = open_store(directory)
        try:
            run_history(store, Model(), history, [0])
            # Finishing physical compaction changes no answer and no hash.
            before = store.hash_kv(0)
            while not store.compact_step():
                pass
            assert not store.compaction_pending()
            assert store.hash_kv(0) == before
        finally:
            store.close()


@given(steps, st.integers(0, 10))
def test_hash_equal_for_equal_histories(history, compact_steps):
    """Goal: HashKV depends only on the logical history, not on physical compaction progress.
    Method: replay one history into two stores; run compact_step only on the second; hashes agree."""
    with tempfile.TemporaryDirectory() as first_dir, tempfile.TemporaryDirectory() as second_dir:
        first, second = open_store(first_dir), open_store(second_dir)
        try:
            run_history(first, Model(), [step for step in history if step[0] != "compact_step"], [0])
            run_history(second, Model(), history, [0])
            for _ in range(compact_steps):
                second.compact_step()
            assert first.hash_kv(0) == second.hash_kv(0)
        finally:
            first.close()
            second.close()
