"""What the control plane keeps in etcd: the key layout and the JSON values.

Every key of a deployment lives under ``root = <prefix>/<deployment>``:

===========================  =================================================  ==========
key                          value                                              written by
===========================  =================================================  ==========
``ranks/<id>``               :class:`RankRecord` (with the rank's lease)        that rank
``load/<id>``                :class:`LoadRecord`                                that rank
``acks/<id>``                :class:`AckRecord` of its newest plan              that rank
``store/...``                scratch of plan execution (barriers, endpoints)    ranks
``leader``                   the leader controller's id (with its lease)        controllers
``epoch``                    the newest published epoch, decimal                leader
``plan``                     :class:`PlanRecord`                                leader
``committed``                :class:`CommitRecord`                              leader
===========================  =================================================  ==========

Values carry a ``schema`` version. Parsing checks every field and raises
:class:`MalformedValueError` naming the key: a bad value is reported and skipped,
never allowed to crash a controller or agent.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from elastic_ep.errors import ElasticEPError, MalformedValueError
from elastic_ep.core.placement import ExpertPlacement
from elastic_ep.core.plan import TransferPlan

SCHEMA = 1
STATES = ("joining", "active", "draining")


def member_token(rank_id: str, incarnation: str) -> str:
    """A member of a placement: ``"pod-3#1f0c9a2e"``. Members are named by id and
    incarnation, so a rank that registers again is a new member."""
    return f"{rank_id}#{incarnation}"


def member_id(token: str) -> str:
    """The rank id of a member token: ``member_id("pod-3#1f0c9a2e") == "pod-3"``."""
    return token.partition("#")[0]


def _load(key: str, raw: bytes | str) -> dict[str, Any]:
    try:
        d = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise MalformedValueError(f"{key}: not JSON ({e}): {bytes(raw)[:80]!r}") from None
    if not isinstance(d, dict):
        raise MalformedValueError(f"{key}: expected a JSON object, got {type(d).__name__}")
    if d.get("schema") != SCHEMA:
        raise MalformedValueError(f"{key}: schema {d.get('schema')!r}, this version reads schema {SCHEMA}")
    return d


def _field(key: str, d: dict[str, Any], name: str, typ: type | tuple[type, ...], optional: bool = False) -> Any:
    if name not in d or d[name] is None:
        if optional:
            return None
        raise MalformedValueError(f"{key}: field {name!r} missing")
    v = d[name]
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        raise MalformedValueError(f"{key}: field {name!r} is {type(v).__name__}, expected {typ}")
    return v


@dataclass(frozen=True)
class RankRecord:
    """One rank's registration: ``RankRecord("pod-3", host="10.0.0.7", device="cuda:3",
    node="node-0", state="active", endpoint={"transport": "nixl"})``."""

    id: str
    host: str
    device: str
    node: str
    state: str
    endpoint: dict[str, Any] = field(default_factory=dict)
    pid: int = 0
    incarnation: str = ""

    @property
    def token(self) -> str:
        """This registration's member token (``id#incarnation``)."""
        return member_token(self.id, self.incarnation)

    def to_json(self) -> str:
        return json.dumps({"schema": SCHEMA, **asdict(self)})

    @classmethod
    def parse(cls, key: str, raw: bytes | str) -> "RankRecord":
        d = _load(key, raw)
        rec = cls(
            id=_field(key, d, "id", str), host=_field(key, d, "host", str), device=_field(key, d, "device", str),
            node=_field(key, d, "node", str), state=_field(key, d, "state", str),
            endpoint=_field(key, d, "endpoint", dict, True) or {}, pid=_field(key, d, "pid", int, True) or 0,
            incarnation=_field(key, d, "incarnation", str, True) or "",
        )
        if rec.state not in STATES:
            raise MalformedValueError(f"{key}: state {rec.state!r} is not one of {STATES}")
        if not key.endswith("/" + rec.id):
            raise MalformedValueError(f"{key}: holds the record of rank {rec.id!r}")
        return rec


@dataclass(frozen=True)
class LoadRecord:
    """A rank's expert load window: ``load[layer][logical]`` tokens over ``window_s``;
    ``served``: requests it answered so far, ``{"ok": n, "bad": m}`` (bad: a slot whose
    bytes were wrong, from a rank that checks)."""

    id: str
    load: list[list[float]]
    window_s: float
    served: dict[str, int] = field(default_factory=dict)
    epochs: list[int] = field(default_factory=list)
    """Plan epochs this rank has seen, in the order it saw them (must only increase)."""

    def to_json(self) -> str:
        return json.dumps({"schema": SCHEMA, **asdict(self)})

    @classmethod
    def parse(cls, key: str, raw: bytes | str) -> "LoadRecord":
        d = _load(key, raw)
        load = _field(key, d, "load", list)
        if not all(isinstance(row, list) and all(isinstance(x, (int, float)) and x >= 0 for x in row) for row in load):
            raise MalformedValueError(f"{key}: load must be a list of lists of non-negative numbers")
        return cls(_field(key, d, "id", str), load, float(_field(key, d, "window_s", (int, float))),
                   _field(key, d, "served", dict, True) or {}, _field(key, d, "epochs", list, True) or [])


@dataclass(frozen=True)
class PlanRecord:
    """A published plan: ``old_members[r]`` is the id of old rank ``r``, ``new_members[n]``
    the id of new rank ``n``; ``bootstrap`` plans load every slot from disk (no old ranks)."""

    epoch: int
    leader: str
    old_members: list[str]
    new_members: list[str]
    plan: TransferPlan | None
    placement: ExpertPlacement
    reason: str = ""

    def to_json(self) -> str:
        return json.dumps({
            "schema": SCHEMA, "epoch": self.epoch, "leader": self.leader, "reason": self.reason,
            "old_members": self.old_members, "new_members": self.new_members,
            "plan": None if self.plan is None else json.loads(self.plan.to_json()),
            "placement": self.placement.to_dict(),
        })

    @classmethod
    def parse(cls, key: str, raw: bytes | str) -> "PlanRecord":
        d = _load(key, raw)
        try:
            plan = None if d.get("plan") is None else TransferPlan.from_json(json.dumps(d["plan"]))
            placement = ExpertPlacement.from_dict(_field(key, d, "placement", dict))
        except ElasticEPError as e:
            raise MalformedValueError(f"{key}: {e}") from e
        rec = cls(
            epoch=_field(key, d, "epoch", int), leader=_field(key, d, "leader", str),
            old_members=_field(key, d, "old_members", list), new_members=_field(key, d, "new_members", list),
            plan=plan, placement=placement, reason=str(d.get("reason", "")),
        )
        if plan is not None and (plan.epoch != rec.epoch or len(rec.old_members) != plan.mapping.old_ep_size
                                 or len(rec.new_members) != plan.mapping.new_ep_size):
            raise MalformedValueError(f"{key}: plan epoch/sizes disagree with the record")
        if len(rec.new_members) != placement.ep_size:
            raise MalformedValueError(f"{key}: {len(rec.new_members)} members for {placement.ep_size} ranks")
        return rec

    def participants(self) -> list[str]:
        """Ids that execute the plan: live old members, then joiners."""
        if self.plan is None:
            return list(self.new_members)
        m = self.plan.mapping
        return [self.old_members[r] for r in sorted(m.live_sources)] + self.new_members[m.num_surviving:]


@dataclass(frozen=True)
class AckRecord:
    """A rank's result for a plan: ``ok``, bytes by route, seconds by phase, or ``error``."""

    epoch: int
    id: str
    ok: bool
    bytes: dict[str, int] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)
    error: str = ""
    mismatched: int = -1
    """Slots found not bit-exact by a rank that checks (synthetic weights); -1: not checked."""

    def to_json(self) -> str:
        return json.dumps({"schema": SCHEMA, **asdict(self)})

    @classmethod
    def parse(cls, key: str, raw: bytes | str) -> "AckRecord":
        d = _load(key, raw)
        return cls(_field(key, d, "epoch", int), _field(key, d, "id", str), _field(key, d, "ok", bool),
                   _field(key, d, "bytes", dict, True) or {}, _field(key, d, "phases", dict, True) or {},
                   str(d.get("error", "")), int(d.get("mismatched", -1)))


@dataclass(frozen=True)
class CommitRecord:
    """The placement serving uses: ``members[r]`` is the id of rank ``r``."""

    epoch: int
    members: list[str]
    placement: ExpertPlacement
    phases: dict[str, float] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"schema": SCHEMA, "epoch": self.epoch, "members": self.members,
                           "placement": self.placement.to_dict(), "phases": self.phases, "bytes": self.bytes})

    @classmethod
    def parse(cls, key: str, raw: bytes | str) -> "CommitRecord":
        d = _load(key, raw)
        try:
            placement = ExpertPlacement.from_dict(_field(key, d, "placement", dict))
        except ElasticEPError as e:
            raise MalformedValueError(f"{key}: {e}") from e
        rec = cls(_field(key, d, "epoch", int), _field(key, d, "members", list), placement,
                  _field(key, d, "phases", dict, True) or {}, _field(key, d, "bytes", dict, True) or {})
        if len(rec.members) != placement.ep_size:
            raise MalformedValueError(f"{key}: {len(rec.members)} members for {placement.ep_size} ranks")
        return rec
