"""Every value in etcd is untrusted: random and adversarial values thrown at every
record's parse, at the core's record readers and at ``read_view`` (against a real etcd)
give a valid record or the one typed error, never anything else."""

from __future__ import annotations

import copy
import json
from typing import Any, Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from controller.etcd_client import EtcdConfig, connect
from controller.records import (
    MAX_BYTES, MAX_DEPTH, AckRecord, CommitRecord, LoadRecord, MirrorRecord, PlanRecord, RankRecord, RoutingRecord, SuspectRecord, json_depth, load_json,
    member_token, parse_epoch, parse_leader,
)
from controller.view import ClusterView, read_view
from elastic_ep.core.mirrors import assign_mirrors
from elastic_ep.core.placement import ExpertPlacement, initial_placement
from elastic_ep.core.plan import TransferPlan, build_plan
from elastic_ep.core.rank_mapping import RankMapping
from elastic_ep.errors import MalformedValueError, PlacementError, PlanError, RankMappingError
from elastic_ep.tools.etcd_server import EtcdServer

ROOT = "/elastic-ep/h"


# -- valid records to start from ---------------------------------------------------------
def _plan_record() -> PlanRecord:
    old = initial_placement(2, 8, 3, 4)
    mapping = RankMapping.build(3, dead=[1], num_joining=1)
    new = initial_placement(2, 8, 3, 4)
    plan = build_plan(old, new, mapping, 1024, epoch=2)
    mirrors = assign_mirrors(new, ["n0", "n0", "n1"], [4, 4, 4])
    return PlanRecord(2, "ctl-a", ["r0#a", "r1#a", "r2#a"], ["r0#a", "r2#a", "r3#b"], plan, new, "dead ['r1#a']",
                      mirrors=mirrors)


VALID: dict[str, Any] = {
    "ranks/r0": RankRecord("r0", "h", "cuda:0", "n0", "active", {"transport": "torch"}, 42, "a"),
    "load/r0": LoadRecord("r0", [[1.0, 2.0, 0.0, 3.0]] * 2, 10.0, {"ok": 3, "bad": 0}, [1, 2]),
    "acks/r0": AckRecord(2, "r0#a", True, {"peer": 2048}, {"transfer": 0.25}, "", 0),
    "suspects/r0/r1": SuspectRecord("r0#a", "r1#a", "closed", "connection reset"),
    "routing": RoutingRecord(3, ["r1#a"]),
    "plan": _plan_record(),
    "committed": CommitRecord(1, ["r0#a", "r1#a", "r2#a"], initial_placement(2, 8, 3, 4), {"transfer": 1.0},
                              {"disk": 4096}, assign_mirrors(initial_placement(2, 8, 3, 4), ["", "", ""], [2, 2, 2]),
                              1024),
    "mirrors/r0": MirrorRecord("r0#a", np.array([3, -1, 12])),
}
PARSERS: dict[str, Callable[..., Any]] = {
    "ranks/r0": RankRecord.parse, "load/r0": LoadRecord.parse, "acks/r0": AckRecord.parse,
    "suspects/r0/r1": SuspectRecord.parse, "mirrors/r0": MirrorRecord.parse, "plan": PlanRecord.parse, "routing": RoutingRecord.parse, "committed": CommitRecord.parse, "epoch": parse_epoch, "leader": parse_leader,
}
TYPES = {"ranks/r0": RankRecord, "load/r0": LoadRecord, "acks/r0": AckRecord, "suspects/r0/r1": SuspectRecord,
         "routing": RoutingRecord, "mirrors/r0": MirrorRecord,
         "plan": PlanRecord,
         "committed": CommitRecord, "epoch": int, "leader": str}


def parses_or_refuses(name: str, raw: Any) -> Any:
    """The record, or None when refused with MalformedValueError naming the key; any
    other exception fails the test."""
    key = f"{ROOT}/{name}"
    try:
        rec = PARSERS[name](key, raw)
    except MalformedValueError as e:
        assert str(e).startswith(key), e
        assert len(str(e)) < 2000, "messages stay short whatever the value"
        return None
    assert isinstance(rec, TYPES[name]), rec
    return rec


def test_valid_records_round_trip() -> None:
    for name, rec in VALID.items():
        assert parses_or_refuses(name, rec.to_json()) == rec or name in ("plan", "mirrors/r0")
    for name in ("plan", "mirrors/r0"):
        again = parses_or_refuses(name, VALID[name].to_json())
        assert again.to_json() == VALID[name].to_json()
    plan = parses_or_refuses("plan", VALID["plan"].to_json())
    assert plan.mirrors is not None and plan.mirrors == VALID["plan"].mirrors and plan.mirrors.count() > 0


# -- adversarial values --------------------------------------------------------------------
SPECIAL_TEXT = [
    "NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1e-400", str(10**30), str(-(10**30)), "9" * 5000,
    "[" * 100_000, '{"a":' * 50_000, "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), '"' + "\\\"" * 1000,
    "\"\\ud800\"", "null", "true", "[]", "{}", "\"x\"", "0", "-1", "1.5",
]
SPECIAL_VALUES = [
    None, True, False, 0, -1, 1, 2**31, 2**63, -(2**63) - 1, 10**30, 1.5, -0.0, 1e308, "", "x", "x" * 100_000,
    "\ud800", "a/b", "a#b", " ", [], {}, [[1], [1, 2]], [[]], [None], {"": None}, [[1.0] * 3] * 2, [-1], [2**64],
]
json_leaf = st.none() | st.booleans() | st.integers(-(10**40), 10**40) | st.floats() | st.text(max_size=20)
json_values = st.recursive(json_leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                         max_size=4), max_leaves=20)
adversarial = st.sampled_from(SPECIAL_VALUES) | json_values


def dump(value: Any) -> str:
    """JSON text as a writer could produce it, NaN and Infinity included."""
    return json.dumps(value, allow_nan=True)


@st.composite
def mutated(draw: st.DrawFn, base: Any) -> Any:
    """``base`` (decoded JSON) with one place deep inside changed: a value replaced by
    an adversarial one, a key dropped or added, a list grown (ragged)."""
    d = copy.deepcopy(base)
    node = d
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            break
        k = draw(st.sampled_from(keys))
        child = node[k]
        if isinstance(child, (dict, list)) and child and draw(st.integers(0, 3)) > 0:
            node = child
            continue
        op = draw(st.sampled_from(["replace", "replace", "drop", "grow"]))
        if op == "replace":
            node[k] = draw(adversarial)
        elif op == "drop":
            del node[k]
        elif isinstance(node, list):
            node.append(draw(adversarial))
        else:
            node[draw(st.text(max_size=8))] = draw(adversarial)
        break
    return d


def _base(name: str) -> Any:
    return json.loads(VALID[name].to_json())


RECORD_NAMES = sorted(VALID)


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(sorted(PARSERS)), raw=st.binary(max_size=300))
def test_random_bytes(name: str, raw: bytes) -> None:
    parses_or_refuses(name, raw)


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(sorted(PARSERS)), value=json_values)
def test_random_json(name: str, value: Any) -> None:
    parses_or_refuses(name, dump(value))


@settings(max_examples=len(SPECIAL_TEXT) * 3, deadline=None)
@given(name=st.sampled_from(sorted(PARSERS)), text=st.sampled_from(SPECIAL_TEXT))
def test_special_texts(name: str, text: str) -> None:
    assert parses_or_refuses(name, text.encode("utf-8", "surrogatepass")) is None or name in ("epoch", "leader")


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), name=st.sampled_from(RECORD_NAMES))
def test_mutated_records(data: st.DataObject, name: str) -> None:
    value = data.draw(mutated(_base(name)))
    try:
        raw = dump(value)
    except (ValueError, RecursionError):  # a value json itself cannot write
        return
    parses_or_refuses(name, raw)


@pytest.mark.parametrize("name", RECORD_NAMES)
@pytest.mark.parametrize("field_value", ['"x"', "null", "1e400", "-1e400", "NaN", str(10**30), "[[1],[1,2]]",
                                         "[" * 100_000 + "]" * 100_000, '"' + "y" * 100_000 + '"'])
def test_every_field_refuses_every_bad_value(name: str, field_value: str) -> None:
    """Each top-level field of each record, set to each bad value (written as raw text,
    as a hostile writer would), is refused or, where the value fits, accepted."""
    for field in _base(name):
        if field == "schema":
            continue
        d = _base(name)
        d[field] = "@@"
        raw = json.dumps(d).replace('"@@"', field_value)
        rec = parses_or_refuses(name, raw)
        if rec is not None:  # only free text and optional fields may take a string or null
            assert field_value in ('"x"', "null") or field == "reason", (name, field, field_value)


def test_the_ack_values_that_killed_controllers() -> None:
    for bad in ('"x"', "null", "1e400"):
        raw = '{"schema": 1, "epoch": 2, "id": "r0#a", "ok": true, "mismatched": %s}' % bad
        with pytest.raises(MalformedValueError, match=f"{ROOT}/acks/r0: .*mismatched|not finite"):
            AckRecord.parse(f"{ROOT}/acks/r0", raw)


def test_loads_must_be_finite_and_rectangular() -> None:
    for load, match in (("[[1],[1,2]]", "ragged"), ("[[1e400]]", "not finite"), ("[[-1]]", "numbers in"),
                        ("[[1e19]]", "numbers in"), ('[["1"]]', "numbers in")):
        raw = '{"schema": 1, "id": "r0", "load": %s, "window_s": 1}' % load
        with pytest.raises(MalformedValueError, match=match):
            LoadRecord.parse(f"{ROOT}/load/r0", raw)


def test_size_and_depth_are_checked_before_decoding() -> None:
    for name, cap in MAX_BYTES.items():
        if name == "chunk":  # read with its digest checked first: tests/test_plan_chunks.py
            continue
        key = {"ranks": "ranks/r0", "load": "load/r0", "acks": "acks/r0", "suspects": "suspects/r0/r1",
               "mirrors": "mirrors/r0"}.get(name, name)
        with pytest.raises(MalformedValueError, match="bytes, more than|not a"):
            PARSERS[key](f"{ROOT}/{key}", b"1" * (cap + 1))
    with pytest.raises(MalformedValueError, match="nested"):
        load_json("k", b"[" * 100_000, 1 << 20)
    assert json_depth(b'[[1], {"a": "[[[", "b": "\\\\"}, "\\"["]') == 2


def test_a_key_holds_only_its_own_rank() -> None:
    with pytest.raises(MalformedValueError, match="holds the record of rank 'r0'"):
        RankRecord.parse(f"{ROOT}/ranks/r9", VALID["ranks/r0"].to_json())
    with pytest.raises(MalformedValueError, match="holds the record of rank 'r0'"):
        AckRecord.parse(f"{ROOT}/acks/r1", VALID["acks/r0"].to_json())


def test_mismatched_slots_are_a_failure() -> None:
    assert AckRecord(2, "r0#a", True, mismatched=0).succeeded
    assert AckRecord(2, "r0#a", True, mismatched=-1).succeeded, "not checked: ok decides"
    assert not AckRecord(2, "r0#a", True, mismatched=3).succeeded
    assert not AckRecord(2, "r0#a", False, mismatched=0).succeeded


# -- the core's record readers ---------------------------------------------------------------
CORE = {
    "placement": (ExpertPlacement.from_dict, PlacementError, initial_placement(2, 8, 3, 4).to_dict()),
    "mapping": (RankMapping.from_dict, RankMappingError, RankMapping.build(4, dead=[1], num_joining=2).to_dict()),
    "plan": (TransferPlan.from_dict, PlanError, json.loads(VALID["plan"].plan.to_json())),
}


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), name=st.sampled_from(sorted(CORE)))
def test_core_readers_raise_only_their_typed_errors(data: st.DataObject, name: str) -> None:
    read, error, base = CORE[name]
    value = data.draw(mutated(base) | adversarial)
    try:
        read(value)
    except error:
        pass


@settings(max_examples=200, deadline=None)
@given(text=st.sampled_from(SPECIAL_TEXT) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_plan_from_json_raises_only_plan_errors(text: str) -> None:
    with pytest.raises(PlanError):
        TransferPlan.from_json(text.encode("utf-8", "surrogatepass"))


def test_absurd_sizes_are_refused_before_allocating() -> None:
    with pytest.raises(RankMappingError, match="out of range"):
        RankMapping.from_dict({"old_to_new": [0], "num_joining": 10**30})
    with pytest.raises(RankMappingError, match="at most"):
        RankMapping.from_dict({"old_to_new": [-1] * (1 << 17)})
    with pytest.raises(PlacementError, match="more than"):
        ExpertPlacement.from_dict({"phy2log": [[0] * 4096] * 4096, "slots_per_rank": 1, "num_logical": 1})
    with pytest.raises(PlacementError, match="out of range"):
        ExpertPlacement.from_dict({"phy2log": [[0, 10**30]], "slots_per_rank": 1, "num_logical": 2})


# -- read_view against a real etcd ------------------------------------------------------------
@pytest.fixture(scope="module")
def etcd_client():
    with EtcdServer() as srv:
        yield connect(EtcdConfig(srv.endpoint, deployment="h", timeout_s=5.0))


KEYS = ["ranks/r0", "ranks/r1", "ranks/r1/x", "load/r0", "load/zz", "acks/r0", "acks/r1", "plan", "committed",
        "epoch", "leader", "store/7/x", "mirrors/r0", "mirrors/r1/x"]
raw_values = (st.binary(max_size=200) | json_values.map(dump).map(str.encode)
              | st.sampled_from(SPECIAL_TEXT).map(lambda t: t.encode("utf-8", "surrogatepass")))


@st.composite
def deployments(draw: st.DrawFn) -> list[tuple[str, bytes, bool]]:
    """Keys with values: valid records, mutated records, random bytes; some leased."""
    out = []
    for key in draw(st.lists(st.sampled_from(KEYS), unique=True, min_size=1)):
        base = key if key in VALID else None
        if base is not None and draw(st.booleans()):
            value = dump(draw(mutated(_base(base)))).encode() if draw(st.booleans()) else VALID[base].to_json().encode()
        else:
            value = draw(raw_values)
        out.append((key, value, draw(st.booleans())))
    if draw(st.booleans()):
        out.append(("ranks/\udcff", b"{}", True))
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(deployment=deployments())
def test_read_view_never_raises_for_values(etcd_client: Any, deployment: list[tuple[str, bytes, bool]]) -> None:
    client = etcd_client
    client.delete_prefix(ROOT + "/")
    lease = client.lease(60)
    for key, value, leased in deployment:
        full = (ROOT + "/" + key).encode("utf-8", "surrogateescape")
        client.put(full, value, lease=lease if leased else None)
    seen: list[tuple[str, int]] = []
    view = read_view(client, ROOT, lambda k, e: seen.append((k, e.revision)))
    view.read_mirrors()
    assert isinstance(view, ClusterView) and len(seen) == len(view.malformed)
    assert all(rev > 0 for _, rev in seen), seen
    assert set(view.mirrors) <= set(view.ranks)
    assert set(view.ranks) <= {"r0", "r1"} and all(view.leases[r] == lease.id for r in view.ranks)
    assert view.epoch >= max([0] + [r.epoch for r in (view.plan, view.committed) if r is not None])
    client.revoke_lease(lease.id)


def test_read_view_skips_leaseless_ranks_and_reports_the_revision(etcd_client: Any) -> None:
    client = etcd_client
    client.delete_prefix(ROOT + "/")
    rec = RankRecord("r5", "h", "cpu", "n0", "joining", incarnation="q")
    client.put(f"{ROOT}/ranks/r5", rec.to_json())
    rev = dict((m.key.decode(), m.mod_revision) for _, m in client.get_prefix(ROOT + "/"))[f"{ROOT}/ranks/r5"]
    seen: list[MalformedValueError] = []
    view = read_view(client, ROOT, lambda k, e: seen.append(e))
    assert view.ranks == {} and len(seen) == 1 and seen[0].revision == rev and "without a lease" in str(seen[0])
    lease = client.lease(60)
    client.put(f"{ROOT}/ranks/r5", rec.to_json(), lease=lease)
    view = read_view(client, ROOT)
    assert view.ranks["r5"].token == member_token("r5", "q") and view.leases["r5"] == lease.id
    client.revoke_lease(lease.id)


def test_read_view_parses_a_value_once_per_revision(etcd_client: Any) -> None:
    client = etcd_client
    client.delete_prefix(ROOT + "/")
    lease = client.lease(60)
    client.put(f"{ROOT}/ranks/r0", VALID["ranks/r0"].to_json(), lease=lease)
    client.put(f"{ROOT}/acks/r0", "[" * 1000)
    client.put(f"{ROOT}/plan", VALID["plan"].to_json())
    cache: dict = {}
    first = read_view(client, ROOT, cache=cache)
    again = read_view(client, ROOT, cache=cache)
    assert again.ranks["r0"] is first.ranks["r0"] and again.plan is first.plan
    assert again.malformed == first.malformed and len(first.malformed) == 1
    client.put(f"{ROOT}/ranks/r0", VALID["ranks/r0"].to_json(), lease=lease)  # same value, new revision
    third = read_view(client, ROOT, cache=cache)
    assert third.ranks["r0"] == first.ranks["r0"] and third.ranks["r0"] is not first.ranks["r0"]
    assert len(cache) == 3
    client.revoke_lease(lease.id)




def test_a_load_window_travels_packed_in_whole_tokens() -> None:
    rec = LoadRecord("r0", [[0.4, 2.5, 7.0]], 2.0)
    raw = rec.to_json()
    assert isinstance(json.loads(raw)["load"], dict), "packed, not a list of lists"
    assert LoadRecord.parse(f"{ROOT}/load/r0", raw).load == [[0.0, 2.0, 7.0]]
