"""A naive, obviously-correct reference model of etcd's MVCC semantics.

The whole key space is kept as one full {key: KV} map per revision
(`history[r]` is the state after revision r), so a read at a past revision
is a dict lookup and a range is a sort of that dict. Nothing is ever
deleted physically; compaction only records the compact revision.
Used by the property tests to check `MvccStore` answer for answer.
"""

from __future__ import annotations

from protocol.codec import STATUS_ERROR, STATUS_OK
from protocol.errors import QuorumError
from protocol.messages import (
    ALARM_ACTIVATE, ALARM_GET, ALARM_NONE, ALARM_NOSPACE,
    COMPARE_EQUAL, COMPARE_GREATER, COMPARE_LESS,
    SORT_ASCEND, SORT_BY_KEY, SORT_DESCEND, SORT_NONE,
    TARGET_CREATE, TARGET_LEASE, TARGET_MOD, TARGET_VALUE, TARGET_VERSION,
    key_in_range,
)

MAX_LEASE_TTL = 9_000_000_000
SORT_FIELDS = ["key", "version", "create_revision", "mod_revision", "value"]


def in_range(key: bytes, start: bytes, end: bytes) -> bool:
    if end and end != b"\x00" and end <= start:
        return False
    return key_in_range(key, start, end)


class Model:
    def __init__(self, member_id: int = 0):
        # As etcd, an empty store is at revision 1: history[0] and history[1] are empty.
        self.history: list[dict[bytes, dict]] = [{}, {}]
        self.compact_revision = 0
        # etcd's compact revision starts at -1: a never-compacted store takes compaction 0 once.
        self.compacted_ever = False
        self.leases: dict[int, int] = {}
        self.alarms: list[list[int]] = []
        self.member_id = member_id

    @property
    def revision(self) -> int:
        return len(self.history) - 1

    # -- reads ------------------------------------------------------------

    def check_revision(self, revision: int) -> None:
        if revision > self.revision:
            raise QuorumError("FutureRev")
        if 0 < revision < self.compact_revision:
            raise QuorumError("Compacted")

    def range(self, body: dict, state: dict | None = None, header_revision: int | None = None) -> dict:
        if state is None:
            self.check_revision(body["revision"])
            state = self.history[body["revision"] or self.revision]
        elif body["revision"]:
            state = self.history[body["revision"]]
        matching = [dict(state[key]) for key in sorted(state) if in_range(key, body["key"], body["range_end"])]
        count = len(matching)
        limit = body["limit"]
        filters = (body["min_mod_revision"], body["max_mod_revision"],
                   body["min_create_revision"], body["max_create_revision"])
        order, target = body["sort_order"], body["sort_target"]
        kvs = [] if body["count_only"] else matching
        if order == SORT_NONE and not any(filters) and limit:
            kvs = kvs[: limit + 1]
        lo_mod, hi_mod, lo_create, hi_create = filters
        kvs = [kv for kv in kvs
               if (not hi_mod or kv["mod_revision"] <= hi_mod) and (not lo_mod or kv["mod_revision"] >= lo_mod)
               and (not hi_create or kv["create_revision"] <= hi_create)
               and (not lo_create or kv["create_revision"] >= lo_create)]
        if target != SORT_BY_KEY and order == SORT_NONE:
            order = SORT_ASCEND
        if order != SORT_NONE:
            kvs = sorted(kvs, key=lambda kv: kv[SORT_FIELDS[target]], reverse=order == SORT_DESCEND)
        more = bool(limit) and len(kvs) > limit
        if more:
            kvs = kvs[:limit]
        if body["keys_only"]:
            for kv in kvs:
                kv["value"] = b""
        return {"header": {"revision": self.revision if header_revision is None else header_revision},
                "kvs": kvs, "more": more, "count": count}

    def hash_kv_revision_check(self, revision: int) -> None:
        # As etcd's HashByRev: hashing AT the compact revision is Compacted too.
        if revision > self.revision:
            raise QuorumError("FutureRev")
        if 0 < revision <= self.compact_revision:
            raise QuorumError("Compacted")

    def lease_time_to_live(self, body: dict) -> dict:
        lease_id = body["ID"]
        if lease_id not in self.leases:
            return {"header": {"revision": self.revision}, "ID": lease_id, "TTL": -1, "grantedTTL": 0, "keys": []}
        ttl = self.leases[lease_id]
        keys = sorted(key for key, kv in self.history[-1].items() if kv["lease"] == lease_id) if body["keys"] else []
        return {"header": {"revision": self.revision}, "ID": lease_id, "TTL": ttl, "grantedTTL": ttl, "keys": keys}

    def lease_leases(self) -> dict:
        return {"header": {"revision": self.revision}, "leases": [{"ID": i} for i in sorted(self.leases)]}

    # -- writes -----------------------------------------------------------

    def apply(self, op: str, body: dict) -> tuple[int, dict]:
        try:
            return STATUS_OK, getattr(self, "apply_" + op)(body)
        except QuorumError as error:
            return STATUS_ERROR, error.to_wire()

    def _nospace(self) -> bool:
        return any(alarm == ALARM_NOSPACE for _, alarm in self.alarms)

    def _check_put(self, body: dict, lease_first: bool) -> None:
        missing_lease = body["lease"] != 0 and body["lease"] not in self.leases
        if lease_first and missing_lease:
            raise QuorumError("LeaseNotFound")
        if (body["ignore_value"] or body["ignore_lease"]) and body["key"] not in self.history[-1]:
            raise QuorumError("KeyNotFound")
        if missing_lease:
            raise QuorumError("LeaseNotFound")

    def _put(self, state: dict, body: dict, revision: int) -> dict:
        old = state.get(body["key"])
        value = old["value"] if body["ignore_value"] else body["value"]
        lease = old["lease"] if body["ignore_lease"] else body["lease"]
        state[body["key"]] = {"key": body["key"], "create_revision": old["create_revision"] if old else revision,
                              "mod_revision": revision, "version": old["version"] + 1 if old else 1,
                              "value": value, "lease": lease}
        return {"header": {"revision": revision}, "prev_kv": dict(old) if old and body["prev_kv"] else None}

    def _delete(self, state: dict, body: dict, revision: int, changed: bool) -> dict:
        victims = sorted(key for key in state if in_range(key, body["key"], body["range_end"]))
        prev = [dict(state.pop(key)) for key in victims]
        changed = changed or bool(victims)
        return {"header": {"revision": revision if changed else revision - 1}, "deleted": len(victims),
                "prev_kvs": prev if body["prev_kv"] else []}

    def _commit(self, state: dict, changed: bool) -> None:
        if changed:
            self.history.append(state)

    def apply_put(self, body: dict) -> dict:
        if self._nospace():
            raise QuorumError("NoSpace")
        self._check_put(body, lease_first=True)
        state = dict(self.history[-1])
        response = self._put(state, body, self.revision + 1)
        self._commit(state, True)
        return response

    def apply_delete_range(self, body: dict) -> dict:
        state = dict(self.history[-1])
        response = self._delete(state, body, self.revision + 1, False)
        self._commit(state, response["deleted"] > 0)
        return response

    def _compare(self, compare: dict) -> bool:
        state = self.history[-1]
        kvs = [state[key] for key in sorted(state) if in_range(key, compare["key"], compare["range_end"])]
        target = compare["target"]
        if not kvs:
            if target == TARGET_VALUE:
                return False
            kvs = [{"key": compare["key"], "create_revision": 0, "mod_revision": 0, "version": 0,
                    "value": b"", "lease": 0}]
        field = {TARGET_VERSION: ("version", "version"), TARGET_CREATE: ("create_revision", "create_revision"),
                 TARGET_MOD: ("mod_revision", "mod_revision"), TARGET_VALUE: ("value", "value"),
                 TARGET_LEASE: ("lease", "lease")}[target]
        for kv in kvs:
            left, right = kv[field[0]], compare[field[1]]
            ok = {COMPARE_EQUAL: left == right, COMPARE_GREATER: left > right,
                  COMPARE_LESS: left < right}.get(compare["result"], left != right)
            if not ok:
                return False
        return True

    def _path(self, body: dict) -> list:
        """Branch choice for this txn and, recursively, nested ones: [ok, [nested paths in order]]."""
        ok = all(self._compare(c) for c in body["compare"])
        nested = [self._path(item["request_txn"]) for item in body["success" if ok else "failure"]
                  if "request_txn" in item]
        return [ok, nested]

    def _check(self, body: dict, path: list, what: str) -> None:
        ok, nested = path
        nested = iter(nested)
        for item in body["success" if ok else "failure"]:
            (field, sub), = item.items()
            if field == "request_txn":
                self._check(sub, next(nested), what)
            elif field == "request_put" and what == "put":
                self._check_put(sub, lease_first=False)
            elif field == "request_range" and what == "range" and sub["revision"]:
                self.check_revision(sub["revision"])

    def apply_txn(self, body: dict) -> dict:
        if self._nospace() and any("request_put" in i for i in body["success"] + body["failure"]):
            raise QuorumError("NoSpace")
        path = self._path(body)
        self._check(body, path, "put")
        self._check(body, path, "range")
        state = dict(self.history[-1])
        flag = {"changed": False}
        response = self._run_txn(state, body, path, flag)
        self._commit(state, flag["changed"])
        response["header"]["revision"] = self.revision  # nested txn headers stay 0, as etcd
        return response

    def _run_txn(self, state: dict, body: dict, path: list, flag: dict) -> dict:
        ok, nested = path
        nested = iter(nested)
        revision = self.revision + 1
        responses = []
        for item in body["success" if ok else "failure"]:
            (field, sub), = item.items()
            if field == "request_range":
                header = revision if flag["changed"] else revision - 1
                responses.append({"response_range": self.range(sub, state=state, header_revision=header)})
            elif field == "request_put":
                flag["changed"] = True
                responses.append({"response_put": self._put(state, sub, revision)})
            elif field == "request_delete_range":
                response = self._delete(state, sub, revision, flag["changed"])
                flag["changed"] = flag["changed"] or response["deleted"] > 0
                responses.append({"response_delete_range": response})
            else:
                responses.append({"response_txn": self._run_txn(state, sub, next(nested), flag)})
        return {"header": {"revision": 0}, "succeeded": ok, "responses": responses}

    def apply_compaction(self, body: dict) -> dict:
        if body["revision"] <= self.compact_revision and self.compacted_ever:
            raise QuorumError("Compacted")
        if body["revision"] > self.revision:
            raise QuorumError("FutureRev")
        self.compact_revision = body["revision"]
        self.compacted_ever = True
        return {"header": {"revision": self.revision}}

    def apply_alarm(self, body: dict) -> dict:
        action, pair = body["action"], [body["member_id"], body["alarm"]]
        if action == ALARM_GET:
            changed = [p for p in self.alarms if body["alarm"] == ALARM_NONE or p[1] == body["alarm"]]
        elif action == ALARM_ACTIVATE:
            changed = [] if pair in self.alarms or body["alarm"] == ALARM_NONE else [pair]
            self.alarms = sorted(self.alarms + changed)
        else:
            changed = [pair] if pair in self.alarms else []
            self.alarms = [p for p in self.alarms if p != pair]
        return {"header": {"revision": self.revision},
                "alarms": [{"member_id": m, "alarm": a} for m, a in changed]}

    def apply_lease_grant(self, body: dict) -> dict:
        if self._nospace():
            raise QuorumError("NoSpace")
        if body["ID"] == 0:
            raise QuorumError("LeaseNotFound")
        if body["TTL"] > MAX_LEASE_TTL:
            raise QuorumError("LeaseTTLTooLarge")
        if body["ID"] in self.leases:
            raise QuorumError("LeaseExist")
        self.leases[body["ID"]] = body["TTL"]
        return {"header": {"revision": self.revision}, "ID": body["ID"], "TTL": body["TTL"], "error": ""}

    def apply_lease_revoke(self, body: dict) -> dict:
        if body["ID"] not in self.leases:
            raise QuorumError("LeaseNotFound")
        del self.leases[body["ID"]]
        state = dict(self.history[-1])
        victims = [key for key, kv in state.items() if kv["lease"] == body["ID"]]
        for key in victims:
            del state[key]
        self._commit(state, bool(victims))
        return {"header": {"revision": self.revision}}
