"""The write-ahead log: recovery, torn tails, corruption, segments, group commit."""

from __future__ import annotations

import os

import pytest

from actors.wal import HEADER_BYTES, RECORD_ENTRIES, Wal, WalCorruptError, encode_record


def entries(first: int, count: int, term: int = 1, size: int = 10) -> list:
    return [(index, term, 0, b"x" * size + str(index).encode()) for index in range(first, first + count)]


def open_wal(path, segment_bytes=1 << 20, fsync=None):
    return Wal.open(str(path), segment_bytes, fsync=fsync or os.fdatasync)


def segment_files(path) -> list[str]:
    return sorted(name for name in os.listdir(path) if name.endswith(".wal"))


def test_round_trip_entries_hard_state_snapshot(tmp_path):
    """Goal: what was appended and synced is what replay returns."""
    wal, recovery = open_wal(tmp_path)
    assert recovery.entries == [] and recovery.hard_state.term == 0
    wal.append_entries(entries(1, 5))
    wal.set_hard_state(3, 7, 4)
    wal.save_snapshot(2, 1, {"voters": [7]})
    wal.sync()
    wal.close()
    _, recovery = open_wal(tmp_path)
    assert recovery.entries == entries(1, 5)
    assert (recovery.hard_state.term, recovery.hard_state.vote, recovery.hard_state.commit) == (3, 7, 4)
    assert recovery.snapshot.index == 2 and recovery.snapshot.conf_state == {"voters": [7]}


def test_overwrite_later_records_win(tmp_path):
    """Goal: an append at an existing index replaces it and all after (Raft truncation)."""
    wal, _ = open_wal(tmp_path)
    wal.append_entries(entries(1, 10, term=1))
    wal.append_entries(entries(6, 2, term=2))
    wal.sync()
    wal.close()
    wal, recovery = open_wal(tmp_path)
    assert [entry[:2] for entry in recovery.entries] == [(i, 1) for i in range(1, 6)] + [(6, 2), (7, 2)]
    # Appending continues after the recovered last index.
    wal.append_entries(entries(8, 1, term=2))
    wal.sync()
    wal.close()
    _, recovery = open_wal(tmp_path)
    assert recovery.last_index == 8


def _write_base_and_last(tmp_path) -> tuple[str, int, int]:
    wal, _ = open_wal(tmp_path)
    wal.append_entries(entries(1, 3))
    wal.sync()
    wal.append_entries(entries(4, 1, size=40))
    wal.sync()
    wal.close()
    (name,) = segment_files(tmp_path)
    path = os.path.join(tmp_path, name)
    size = os.path.getsize(path)
    last_record = len(encode_record(RECORD_ENTRIES, [entries(4, 1, size=40)[0]]))
    return path, size, last_record


def test_torn_tail_at_every_offset_is_truncated(tmp_path):
    """Goal: a crash mid-write of the last record loses only that record.
    Method: cut the file at every byte offset inside the last record; reopen."""
    path, size, last_record = _write_base_and_last(tmp_path / "base")
    original = open(path, "rb").read()
    for cut in range(size - last_record, size):
        directory = tmp_path / f"cut{cut}"
        directory.mkdir()
        target = directory / os.path.basename(path)
        target.write_bytes(original[:cut])
        wal, recovery = open_wal(directory)
        assert recovery.entries == entries(1, 3), cut
        assert recovery.truncated_tail_bytes == cut - (size - last_record)
        assert os.path.getsize(target) == size - last_record
        wal.append_entries(entries(4, 1))  # the log goes on after the truncation
        wal.sync()
        wal.close()
        _, recovery = open_wal(directory)
        assert recovery.last_index == 4


def test_garbled_last_record_is_truncated(tmp_path):
    """Goal: a last record with a bad checksum (torn sector) is cut, not fatal."""
    path, size, _ = _write_base_and_last(tmp_path)
    data = bytearray(open(path, "rb").read())
    data[-3] ^= 0xFF
    open(path, "wb").write(bytes(data))
    _, recovery = open_wal(tmp_path)
    assert recovery.entries == entries(1, 3)


def test_flipped_byte_in_the_middle_is_refused(tmp_path):
    """Goal: damage followed by more data is corruption: refuse, naming file and offset."""
    wal, _ = open_wal(tmp_path)
    for first in range(1, 30, 3):
        wal.append_entries(entries(first, 3))
        wal.sync()
    wal.close()
    (name,) = segment_files(tmp_path)
    path = os.path.join(tmp_path, name)
    data = bytearray(open(path, "rb").read())
    position = len(data) // 2
    data[position] ^= 0x01
    open(path, "wb").write(bytes(data))
    with pytest.raises(WalCorruptError) as info:
        open_wal(tmp_path)
    assert info.value.path == path
    assert 0 <= info.value.offset <= position
    assert name in str(info.value)


def test_damage_in_a_non_last_segment_is_refused(tmp_path):
    """Goal: a torn record anywhere but the end of the last segment is fatal."""
    wal, _ = open_wal(tmp_path, segment_bytes=600)
    for first in range(1, 60, 5):
        wal.append_entries(entries(first, 5))
        wal.sync()
    wal.close()
    names = segment_files(tmp_path)
    assert len(names) > 2
    first_path = os.path.join(tmp_path, names[0])
    with open(first_path, "r+b") as handle:
        handle.truncate(os.path.getsize(first_path) - 2)
    with pytest.raises(WalCorruptError, match=names[0]):
        open_wal(tmp_path)


def test_many_entries_across_segments_and_release(tmp_path):
    """Goal: segments roll over, replay spans them, release deletes only whole
    segments below the index, and what is left still replays."""
    wal, _ = open_wal(tmp_path, segment_bytes=4096)
    for first in range(1, 2001, 10):
        wal.append_entries(entries(first, 10, size=30))
        wal.set_hard_state(1, 1, first + 9)
        wal.sync()
    names = segment_files(tmp_path)
    assert len(names) > 10
    wal.save_snapshot(1500, 1)
    wal.sync()
    removed = wal.release(1000)
    assert removed > 0
    assert len(segment_files(tmp_path)) == len(names) - removed
    wal.close()
    _, recovery = open_wal(tmp_path, segment_bytes=4096)
    assert recovery.entries[0][0] <= 1000
    assert recovery.entries[-1][0] == 2000
    assert recovery.hard_state.commit == 2000
    assert recovery.snapshot.index == 1500
    indexes = [entry[0] for entry in recovery.entries]
    assert indexes == list(range(indexes[0], 2001))


def test_group_commit_one_fsync_per_batch(tmp_path):
    """Goal: one sync() = one fdatasync however many records were appended."""
    calls = []

    def counting_fsync(fd):
        calls.append(fd)
        os.fdatasync(fd)

    wal, _ = open_wal(tmp_path, fsync=counting_fsync)
    calls.clear()
    for batch in range(10):
        base = batch * 50 + 1
        for offset in range(0, 50, 5):
            wal.append_entries(entries(base + offset, 5))
        wal.set_hard_state(1, 1, base + 49)
        before = len(calls)
        assert wal.sync() is True
        assert len(calls) - before == 1
    assert wal.sync() is False  # nothing new: no fsync
    assert len(calls) == 10
    wal.close()


def test_header_size_is_stable():
    assert HEADER_BYTES == 9


def test_replay_matches_a_model_under_random_appends_and_overwrites(tmp_path_factory):
    """Goal: property: whatever mix of appends, Raft-style overwrites, hard
    states and segment roll-overs, replay returns exactly the model log."""
    from hypothesis import given, settings, strategies as st

    operations = st.lists(st.tuples(st.integers(0, 10), st.integers(1, 8), st.booleans()), min_size=1, max_size=30)

    @settings(max_examples=60, deadline=None)
    @given(operations)
    def check(ops):
        directory = tmp_path_factory.mktemp("wal")
        wal, _ = open_wal(directory, segment_bytes=300)
        model: list = []
        term = 1
        for back, count, sync in ops:
            first = max(1, len(model) + 1 - back)
            term += 1 if back else 0
            batch = [(index, term, 0, b"d%d-%d" % (index, term)) for index in range(first, first + count)]
            wal.append_entries(batch)
            del model[first - 1:]
            model.extend(batch)
            wal.set_hard_state(term, 1, 0)
            if sync:
                wal.sync()
        wal.close()
        _, recovery = open_wal(directory, segment_bytes=300)
        assert recovery.entries == model
        assert recovery.hard_state.term == term

    check()
