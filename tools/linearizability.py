"""A linearizability checker for quorumkv client histories.

Theory of operation
-------------------

A history is every call that clients made: get, put and compare-and-swap
(CAS) on a few keys, each with its start and end time (one monotonic clock
for all clients) and its outcome:

- ``ok``: the server answered; the operation took effect exactly once,
  somewhere between its start and its end, and its result is what it saw.
- ``fail``: the server refused it for sure; it never took effect.
- ``unknown``: no answer (a timeout) or an answer that does not settle it;
  the operation either never took effect, or took effect exactly once at
  any time after its start, also long after the client gave up.

Keys are independent registers (no deletes, no range reads in these
histories), so each key's sub-history is checked on its own: a history is
linearizable iff each key's is (Herlihy & Wing's locality).

Per key the search is Wing & Gong's, in the form of Lowe's "just-in-time
linearization" (as in Porcupine and Knossos): the calls and returns sorted
by time form a doubly linked list; the search walks it from the front,
linearizes any call whose operation is allowed in the current register
state (lifting the call and its return out of the list), and backtracks
when it meets a return whose call is still in the list: that operation has
ended, so it must take effect before anything later, and no order found so
far allows it. Lowe's cache remembers every (set of linearized operations,
register state) reached, so an equivalent configuration is never explored
twice; operations are numbered in call order and the linearized set is kept
in the cache as (how many from the first on, bits of the rest), so an entry
is small however long the history. An unknown operation has no return in the list: it never forces a
backtrack and may stay unlinearized for good (which is the same as taking
effect after everything else, i.e. never). The search is bounded in steps;
past the bound the verdict is GAVE_UP, which is not a pass.

Two reductions make histories with many timeouts cheap, both exact when
written values are unique per key (the harness writes unique values):

- An unknown write whose value nobody observed (no ok read returned it, no
  CAS compared with it; an unknown CAS that is itself dropped does not
  count, so this runs to a fixed point) is dropped: taking effect could only
  be needed to be seen. (Not done if some failed CAS did not report the
  current value, since "the value is not X" can be satisfied by a write
  nobody saw.)
- An unknown write whose value was observed did take effect, and before
  the earliest end of the operations that observed it: it becomes an ok
  operation ending there.

Revisions give checks across keys, independent of the search (quorumkv has
one store-wide revision counter, +1 per write request, as etcd):

- ok writes have distinct revisions;
- real-time order: if A ended before B started, rev(A) <= rev(B), and
  rev(A) < rev(B) when B is a write;
- per key (MVCC): the revision a value was written at (an ok write's
  revision, or a read's mod_revision) is the same wherever it is seen; a
  read at revision R of a value written at M sees no other write of the key
  in (M, R]; a read of "absent" at R sees no write at or below R; a CAS
  that succeeded at R compared with the latest write below R.

The checker is pure: no clock, randomness or I/O (only `load_history`,
`save_history` and the command line touch files). The command line
(`python -m tools.linearizability history.jsonl`) checks a history saved as
JSON lines; exit status 0 linearizable, 1 not, 2 gave up.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import json
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping

GET, PUT, CAS = "get", "put", "cas"
OK, FAIL, UNKNOWN = "ok", "fail", "unknown"
OPS = (GET, PUT, CAS)
OUTCOMES = (OK, FAIL, UNKNOWN)

LINEARIZABLE = "linearizable"
NOT_LINEARIZABLE = "not linearizable"
GAVE_UP = "gave up"

# The register state of a key that was never written.
ABSENT = None
# Search steps per key before giving up (about 3 s of CPU per million): by
# default this many, or STEPS_PER_OPERATION per operation of the key if more.
# A linearizable history from the harness needs about 80 per operation.
DEFAULT_MAX_STEPS = 2_000_000
STEPS_PER_OPERATION = 500
# Anomalies reported in full per check (the count is always exact).
MAX_ANOMALIES_REPORTED = 20


class _NotRead:
    """The `current` of a CAS whose failure did not report the current value."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NOT_READ"


NOT_READ = _NotRead()


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Op:
    """One client call. Values are bytes (or any hashable); None means absent.

    get: `result` is the value read (None: key absent), `mod_revision` its
    mod revision. put: `value` is written. cas: if the value equals
    `expected` (None: the key is absent) write `new`; `result` is whether it
    did; a failed CAS may report the value it found in `current`.
    `revision` is the response header's revision (ok operations only).
    """

    client: object
    op: str
    key: object
    start_ns: int
    end_ns: int | None
    outcome: str
    value: object = None
    expected: object = None
    new: object = None
    result: object = None
    current: object = NOT_READ
    revision: int | None = None
    mod_revision: int | None = None

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {self.op!r}")
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {self.outcome!r}")
        if type(self.start_ns) is not int:
            raise ValueError(f"start_ns must be an int, got {self.start_ns!r}")
        if self.outcome != UNKNOWN and (type(self.end_ns) is not int or self.end_ns < self.start_ns):
            raise ValueError(f"an {self.outcome} operation needs end_ns >= start_ns, got {self.end_ns!r}")
        if self.op == PUT and self.value is None:
            raise ValueError("a put needs a value")
        if self.op == CAS and self.new is None:
            raise ValueError("a cas needs a new value")
        if self.op == CAS and self.outcome == OK and type(self.result) is not bool:
            raise ValueError(f"an ok cas needs result True or False, got {self.result!r}")
        if self.op == CAS and self.outcome == OK and self.result and self.current is not NOT_READ:
            raise ValueError("only a failed cas reports a current value")
        if self.revision is not None and self.outcome != OK:
            raise ValueError("only an ok operation has a revision")

    @property
    def is_write(self) -> bool:
        """Could change the register (a put, or a CAS not known to have failed)."""
        return self.op == PUT or (self.op == CAS and not (self.outcome == OK and not self.result))

    @property
    def written(self) -> object:
        return self.value if self.op == PUT else self.new

    def describe(self) -> str:
        if self.op == GET:
            what = f"get({self.key!r}) -> {self.result!r}"
        elif self.op == PUT:
            what = f"put({self.key!r}, {self.value!r})"
        else:
            what = f"cas({self.key!r}, {self.expected!r} -> {self.new!r})"
            if self.outcome == OK:
                what += f" -> {self.result}"
                if self.current is not NOT_READ:
                    what += f" (found {self.current!r})"
        end = "?" if self.outcome == UNKNOWN else self.end_ns
        revision = "" if self.revision is None else f" rev {self.revision}"
        return f"client {self.client}: {what} [{self.outcome}{revision}] @{self.start_ns}..{end}"

    @classmethod
    def from_dict(cls, item: Mapping, client: object = None) -> "Op":
        """From the history's dict form; str values become bytes (UTF-8)."""
        fields = {name: item[name] for name in _DICT_FIELDS if name in item}
        if client is not None:
            fields.setdefault("client", client)
        fields.setdefault("client", None)
        fields.setdefault("end_ns", None)
        for name in ("key", "value", "expected", "new", "current"):
            if isinstance(fields.get(name), str):
                fields[name] = fields[name].encode()
        if fields.get("op") == GET and isinstance(fields.get("result"), str):
            fields["result"] = fields["result"].encode()
        if "current" in item and item["current"] is None:
            fields["current"] = ABSENT  # reported: the key was absent
        return cls(**fields)

    def to_dict(self) -> dict:
        """JSON-friendly (bytes as UTF-8 text with surrogate escapes)."""
        item = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is NOT_READ or (value is None and field.name not in ("result", "current", "end_ns")):
                continue
            if isinstance(value, bytes):
                value = value.decode("utf-8", "surrogateescape")
            item[field.name] = value
        return item


_DICT_FIELDS = tuple(field.name for field in dataclasses.fields(Op))


@dataclasses.dataclass(slots=True)
class KeyResult:
    key: object
    verdict: str
    operations: int  # after dropping what cannot matter
    steps: int
    detail: str = ""


@dataclasses.dataclass(slots=True)
class CheckResult:
    verdict: str
    keys: list[KeyResult]
    anomalies: list[str]  # from the revision checks (at most MAX_ANOMALIES_REPORTED)
    anomaly_count: int
    operations: int

    @property
    def ok(self) -> bool:
        return self.verdict == LINEARIZABLE

    def summary(self) -> str:
        lines = [f"{self.verdict}: {self.operations} operations on {len(self.keys)} keys, "
                 f"{self.anomaly_count} revision anomalies"]
        for key_result in self.keys:
            if key_result.verdict != LINEARIZABLE:
                lines.append(f"key {key_result.key!r}: {key_result.verdict} after {key_result.steps} steps "
                             f"({key_result.operations} operations)")
                if key_result.detail:
                    lines.append("  " + key_result.detail.replace("\n", "\n  "))
        lines.extend(f"revision anomaly: {anomaly}" for anomaly in self.anomalies)
        return "\n".join(lines)


# ---- the whole history ---------------------------------------------------------------


def normalise_history(history) -> list[Op]:
    """A list of Op or dicts, or {client: [ops]} -> a list of Op."""
    if isinstance(history, Mapping):
        items = [(client, item) for client, ops in history.items() for item in ops]
    else:
        items = [(None, item) for item in history]
    return [item if isinstance(item, Op) else Op.from_dict(item, client) for client, item in items]


def check(history, *, initial: Mapping | None = None, max_steps: int | None = None,
          check_revisions_too: bool = True) -> CheckResult:
    """Is the history linearizable? `initial` maps key -> value before it (default:
    absent); `max_steps` bounds the search per key (default: see DEFAULT_MAX_STEPS)."""
    assert max_steps is None or max_steps > 0
    operations = normalise_history(history)
    check_client_order(operations)
    by_key: dict[object, list[Op]] = defaultdict(list)
    for operation in operations:
        by_key[operation.key].append(operation)
    initial = initial or {}
    keys = [check_register(by_key[key], initial=initial.get(key, ABSENT), max_steps=max_steps, key=key)
            for key in sorted(by_key, key=repr)]
    anomalies = check_revisions(operations, initial=initial) if check_revisions_too else []
    if anomalies or any(result.verdict == NOT_LINEARIZABLE for result in keys):
        verdict = NOT_LINEARIZABLE
    elif any(result.verdict == GAVE_UP for result in keys):
        verdict = GAVE_UP
    else:
        verdict = LINEARIZABLE
    return CheckResult(verdict, keys, anomalies[:MAX_ANOMALIES_REPORTED], len(anomalies), len(operations))


def check_client_order(operations: list[Op]) -> None:
    """Each client is sequential: its next call starts after its previous one ended
    (or was given up on). A harness bug otherwise, so ValueError."""
    by_client: dict[object, list[Op]] = defaultdict(list)
    for operation in operations:
        if operation.client is not None:
            by_client[operation.client].append(operation)
    for client, ops in by_client.items():
        ops.sort(key=lambda operation: operation.start_ns)
        for before, after in zip(ops, ops[1:]):
            if before.outcome != UNKNOWN and before.end_ns > after.start_ns:
                raise ValueError(f"client {client!r} has overlapping calls: {before.describe()} and {after.describe()}")


# ---- one key: Wing & Gong / Lowe search ----------------------------------------------


def _step(state, operation: Op) -> tuple[bool, object]:
    """May `operation` take effect in `state`, and the state after it."""
    if operation.op == GET:
        return state == operation.result, state
    if operation.op == PUT:
        return True, operation.value
    matches = state == operation.expected
    if operation.outcome == UNKNOWN:
        return True, (operation.new if matches else state)
    if operation.result:
        return matches, operation.new
    if operation.current is not NOT_READ:
        return (not matches and state == operation.current), state
    return not matches, state


def _observed_values(operations: list[Op]) -> set:
    """Values some ok operation required the register to hold."""
    seen = set()
    for operation in operations:
        if operation.outcome != OK:
            continue
        if operation.op == GET:
            seen.add(operation.result)
        elif operation.op == CAS and operation.result:
            seen.add(operation.expected)
        elif operation.op == CAS and operation.current is not NOT_READ:
            seen.add(operation.current)
    return seen


def reduce_register_history(operations: list[Op], initial=ABSENT) -> list[Op]:
    """Drop what cannot matter and settle unknown writes that were observed (see the
    module comment). The result has the same linearizability as the input."""
    kept = [operation for operation in operations
            if operation.outcome != FAIL and not (operation.op == GET and operation.outcome == UNKNOWN)]
    writers: dict[object, int] = defaultdict(int)
    for operation in kept:
        if operation.is_write:
            writers[operation.written] += 1
    unique = all(count == 1 for count in writers.values()) and initial not in writers
    if not unique:
        return kept
    observed = _observed_values(kept)
    negative_only = any(operation.op == CAS and operation.outcome == OK and not operation.result
                        and operation.current is NOT_READ for operation in kept)
    # An unknown CAS that is itself dropped needs nothing: iterate to a fixed point.
    dropped: set[int] = set()
    for _round in range(len(kept) + 1):
        needed = observed | {operation.expected for index, operation in enumerate(kept)
                             if operation.op == CAS and operation.outcome == UNKNOWN and index not in dropped}
        newly = {index for index, operation in enumerate(kept)
                 if operation.outcome == UNKNOWN and operation.is_write and not negative_only
                 and operation.written not in observed and operation.written not in needed}
        if newly == dropped:
            break
        dropped = newly
    first_seen_end: dict[object, int] = {}
    for operation in kept:
        if operation.outcome != OK:
            continue
        for value in _values_required(operation):
            if value not in first_seen_end or operation.end_ns < first_seen_end[value]:
                first_seen_end[value] = operation.end_ns
    reduced = []
    for index, operation in enumerate(kept):
        if index in dropped:
            continue
        if operation.outcome == UNKNOWN and operation.is_write and operation.written in first_seen_end:
            end_ns = max(first_seen_end[operation.written], operation.start_ns)
            operation = dataclasses.replace(operation, outcome=OK, end_ns=end_ns,
                                            result=True if operation.op == CAS else None)
        reduced.append(operation)
    return reduced


def _values_required(operation: Op) -> tuple:
    if operation.op == GET:
        return (operation.result,)
    if operation.op == CAS and operation.result:
        return (operation.expected,)
    if operation.op == CAS and operation.current is not NOT_READ:
        return (operation.current,)
    return ()


_CALL, _RETURN = 0, 1
_END = -1


def check_register(operations: list[Op], *, initial=ABSENT, max_steps: int | None = None,
                   key: object = None) -> KeyResult:
    """Wing & Gong / Lowe search over one key's operations."""
    if max_steps is None:
        max_steps = max(DEFAULT_MAX_STEPS, STEPS_PER_OPERATION * len(operations))
    # Numbered in call order, so the linearized set is mostly a prefix (see the cache key).
    ops = sorted(reduce_register_history(operations, initial), key=lambda operation: operation.start_ns)
    # Entries 1..n of the linked list; 0 is the head. A call sorts before a
    # return at the same instant, so touching operations count as overlapping.
    events = []
    for index, operation in enumerate(ops):
        events.append((operation.start_ns, _CALL, index))
        if operation.outcome == OK:
            events.append((operation.end_ns, _RETURN, index))
    events.sort()
    count = len(events)
    kind = [_CALL] + [event[1] for event in events]
    op_of = [-1] + [event[2] for event in events]
    nxt = list(range(1, count + 1)) + [_END]
    prv = [_END] + list(range(count))
    nxt[count] = _END
    return_entry = {}
    for entry in range(1, count + 1):
        if kind[entry] == _RETURN:
            return_entry[op_of[entry]] = entry
    match = [return_entry.get(op_of[entry], 0) if kind[entry] == _CALL else 0 for entry in range(count + 1)]

    def lift(entry: int) -> None:
        for node in (entry, match[entry]):
            if node:
                nxt[prv[node]] = nxt[node]
                if nxt[node] != _END:
                    prv[nxt[node]] = prv[node]

    def unlift(entry: int) -> None:
        for node in (match[entry], entry):  # the reverse of lift (dancing links)
            if node:
                nxt[prv[node]] = node
                if nxt[node] != _END:
                    prv[nxt[node]] = node

    returns_left = len(return_entry)
    cache: set = set()
    stack: list[tuple[int, object]] = []
    state, linearized, steps = initial, 0, 0
    deepest, blocker, blocker_state = -1, None, None
    entry = nxt[0]
    while returns_left:
        steps += 1
        if steps > max_steps:
            return KeyResult(key, GAVE_UP, len(ops), steps - 1,
                             f"no verdict within {max_steps} search steps (raise max_steps)")
        assert entry != _END, "a return must be met before the end of the list"
        operation = ops[op_of[entry]]
        if kind[entry] == _CALL:
            allowed, new_state = _step(state, operation)
            if allowed:
                new_linearized = linearized | (1 << op_of[entry])
                # Lowe's cache key, compact: the run of operations linearized
                # from the first on is a count, only the rest are bits.
                prefix = (~new_linearized & (new_linearized + 1)).bit_length() - 1
                cache_key = (prefix, new_linearized >> prefix, new_state)
                if cache_key not in cache:
                    cache.add(cache_key)
                    stack.append((entry, state))
                    state, linearized = new_state, new_linearized
                    lift(entry)
                    returns_left -= 1 if match[entry] else 0
                    entry = nxt[0]
                    continue
            entry = nxt[entry]
            continue
        # A return whose call is still in the list: backtrack.
        if len(stack) > deepest:
            deepest, blocker, blocker_state = len(stack), operation, state
        if not stack:
            return KeyResult(key, NOT_LINEARIZABLE, len(ops), steps, _explain(ops, deepest, blocker, blocker_state))
        entry, state = stack.pop()
        linearized &= ~(1 << op_of[entry])
        unlift(entry)
        returns_left += 1 if match[entry] else 0
        entry = nxt[entry]
    return KeyResult(key, LINEARIZABLE, len(ops), steps)


def _explain(ops: list[Op], deepest: int, blocker: Op, state) -> str:
    concurrent = [operation for operation in ops if operation is not blocker and operation.start_ns <= blocker.end_ns
                  and (operation.outcome == UNKNOWN or operation.end_ns >= blocker.start_ns)]
    lines = [f"no order puts this operation in place (after at best {deepest} others, the register then held {state!r}):",
             f"  {blocker.describe()}",
             f"concurrent with it ({len(concurrent)}):"]
    lines.extend(f"  {operation.describe()}" for operation in concurrent[:10])
    return "\n".join(lines)


# ---- revisions, across keys ----------------------------------------------------------


def check_revisions(operations: list[Op], initial: Mapping | None = None) -> list[str]:
    """The revision checks of the module comment; a list of anomalies (empty: none)."""
    initial = initial or {}
    with_revision = [operation for operation in operations if operation.outcome == OK and operation.revision is not None]
    anomalies = _duplicate_write_revisions(with_revision)
    anomalies += _real_time_revisions(with_revision)
    anomalies += _mvcc_revisions(operations, initial)
    return anomalies


def _is_ok_write(operation: Op) -> bool:
    return operation.outcome == OK and (operation.op == PUT or (operation.op == CAS and operation.result))


def _duplicate_write_revisions(operations: list[Op]) -> list[str]:
    first: dict[int, Op] = {}
    anomalies = []
    for operation in operations:
        if _is_ok_write(operation):
            if operation.revision in first:
                anomalies.append(f"two writes at revision {operation.revision}: "
                                 f"{first[operation.revision].describe()} and {operation.describe()}")
            else:
                first[operation.revision] = operation
    return anomalies


def _real_time_revisions(operations: list[Op]) -> list[str]:
    by_end = sorted(operations, key=lambda operation: operation.end_ns)
    ends = [operation.end_ns for operation in by_end]
    # best[i]: the operation with the highest revision among by_end[:i + 1].
    best: list[Op] = []
    for operation in by_end:
        best.append(operation if not best or operation.revision > best[-1].revision else best[-1])
    anomalies = []
    for operation in operations:
        ended_before = bisect.bisect_left(ends, operation.start_ns)  # end_ns < start_ns
        if not ended_before:
            continue
        earlier = best[ended_before - 1]
        write = _is_ok_write(operation)
        if operation.revision < earlier.revision or (write and operation.revision == earlier.revision):
            anomalies.append(f"revision went back in real time: {earlier.describe()} ended before "
                             f"{operation.describe()} started")
    return anomalies


def _mvcc_revisions(operations: list[Op], initial: Mapping) -> list[str]:
    """Per key: the revision each value was written at, and what reads at R may see."""
    anomalies = []
    written_at: dict[object, dict[object, int]] = defaultdict(dict)  # key -> value -> revision

    def learn(key, value, revision: int, source: Op) -> None:
        known = written_at[key].setdefault(value, revision)
        if known != revision:
            anomalies.append(f"value {value!r} of key {key!r} written at revision {known} and {revision} "
                             f"(seen by {source.describe()})")

    for operation in operations:
        if _is_ok_write(operation) and operation.revision is not None:
            learn(operation.key, operation.written, operation.revision, operation)
        elif (operation.op == GET and operation.outcome == OK and operation.result is not None
              and operation.mod_revision is not None):
            learn(operation.key, operation.result, operation.mod_revision, operation)
    write_revisions = {key: sorted(values.values()) for key, values in written_at.items()}
    for operation in operations:
        if operation.outcome != OK or operation.revision is None:
            continue
        revisions = write_revisions.get(operation.key, [])
        if operation.op == GET:
            seen, at = operation.result, operation.revision
        elif operation.op == CAS and operation.result:
            seen, at = operation.expected, operation.revision - 1  # compared just below its own write
        elif operation.op == CAS and operation.current is not NOT_READ:
            seen, at = operation.current, operation.revision
        else:
            continue
        problem = _read_problem(seen, at, revisions, written_at.get(operation.key, {}),
                                initial.get(operation.key, ABSENT))
        if problem:
            anomalies.append(f"{problem}: {operation.describe()}")
    return anomalies


def _read_problem(seen, at: int, revisions: list[int], written_at: dict, initial) -> str:
    """Why seeing `seen` at revision `at` contradicts the known writes of the key ('' if it does not)."""
    if seen == initial and seen not in written_at:
        missed = bisect.bisect_right(revisions, at)
        return f"saw the initial value though the key was written at revision {revisions[0]}" if missed else ""
    if seen not in written_at:
        return ""  # written by an operation of unknown revision: the search judges it
    since = written_at[seen]
    if since > at:
        return f"saw a value written at revision {since}, after its own revision {at}"
    newer = bisect.bisect_right(revisions, since)
    if newer < len(revisions) and revisions[newer] <= at:
        return f"missed the write at revision {revisions[newer]} (saw the one at {since}, read at {at})"
    return ""


# ---- command line --------------------------------------------------------------------


def load_history(path: str) -> list[Op]:
    """JSON lines, one operation per line (Op.to_dict's form)."""
    with open(path, encoding="utf-8") as handle:
        return [Op.from_dict(json.loads(line)) for line in handle if line.strip()]


def save_history(path: str, operations: Iterable[Op]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for operation in operations:
            handle.write(json.dumps(operation.to_dict()) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.linearizability",
                                     description="Check a saved client history (JSON lines) for linearizability.")
    parser.add_argument("history")
    parser.add_argument("--max-steps", type=int, default=None,
                        help=f"search steps per key (default: {DEFAULT_MAX_STEPS} or {STEPS_PER_OPERATION} per operation)")
    args = parser.parse_args(argv)
    result = check(load_history(args.history), max_steps=args.max_steps)
    print(result.summary())
    return 0 if result.ok else (2 if result.verdict == GAVE_UP else 1)


if __name__ == "__main__":
    sys.exit(main())
