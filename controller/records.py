"""What the control plane keeps in etcd: the key layout and the JSON values.

Every key of a deployment lives under ``root = <prefix>/<deployment>``:

===========================  =================================================  ===========  ==========
key                          value                                              written by   at most
===========================  =================================================  ===========  ==========
``ranks/<id>``               :class:`RankRecord`, under the rank's lease        that rank    16 KiB
``load/<id>``                :class:`LoadRecord`, under the rank's lease        that rank    4 MiB
``mirrors/<id>``             :class:`MirrorRecord`, under the rank's lease      that rank    256 KiB
``acks/<id>``                :class:`AckRecord` of its newest plan              that rank    64 KiB
``suspects/<id>/<target>``   :class:`SuspectRecord`, under the reporter's lease  that rank    4 KiB
``store/...``                scratch of plan execution (barriers, endpoints)    ranks        (not read)
``leader``                   the leader controller's id (with its lease)        controllers  256 B
``epoch``                    the newest published epoch, decimal                leader       24 B
``plan``                     the head of a :class:`PlanRecord`                  leader       1 MiB
``plans/<epoch>/<nonce>/..`` the plan's chunks (:mod:`controller.plan_chunks`)  leader       512 KiB
``committed``                :class:`CommitRecord`                              leader       1 MiB
``routing``                  :class:`RoutingRecord`: members to route around    leader       64 KiB
===========================  =================================================  ===========  ==========

Sizes follow the deployment, not the plan: placements are packed
(:mod:`elastic_ep.core.packed`), and a plan's transfers live in one chunk per
participant, each read only by its participant. DeepSeek-V3 on 256 ranks x 9 slots:
head about 140 KB, largest chunk about 100 KB.

``plan`` and ``epoch`` are written in one transaction, so they always carry the same
mod revision: a reader accepts a plan only if the two keys' mod revisions are equal and
the plan's epoch equals the ``epoch`` value (anything else is a torn or forged write).
Every write of the leader is fenced on the ``epoch`` key's mod revision as it read it,
never on its value, so a malformed ``epoch`` value is overwritten by the next publish.

Every value is untrusted: a rank's credentials can write anything under its own keys.
:func:`load_json` and each record's ``parse`` are the one place a value is checked:
size (the last column), nesting depth (:data:`MAX_DEPTH`), numbers (no NaN or
Infinity, no ``1e400``, integers within int64), then every field's type, range and
shape. Anything wrong raises :class:`MalformedValueError` naming the key and the
defect; readers skip the value and report it, and nothing else can escape a parse.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from elastic_ep.errors import ElasticEPError, MalformedValueError
from elastic_ep.core.mirrors import MirrorAssignment
from elastic_ep.core.packed import pack, unpack
from elastic_ep.core.placement import MAX_ELEMENTS, MAX_LOGICAL, ExpertPlacement, describe, record_int, record_ints
from elastic_ep.core.plan import MAX_EPOCH, MAX_EXPERT_BYTES, TransferPlan
from elastic_ep.core.rank_mapping import MAX_RANKS, RankMapping

SCHEMA = 1
STATES = ("joining", "active", "draining")

KiB, MiB = 1 << 10, 1 << 20
MAX_BYTES = {"ranks": 16 * KiB, "load": 4 * MiB, "mirrors": 256 * KiB, "acks": 64 * KiB, "suspects": 4 * KiB, "leader": 256, "epoch": 24,
             "plan": 1 * MiB, "committed": 1 * MiB, "chunk": 512 * KiB,
             "routing": 64 * KiB}
"""The largest raw value read per key kind: a registration is a few hundred bytes, a
load window of DeepSeek-V3 (58 x 256 numbers) about 300 KB, a plan head for 320 ranks
of DeepSeek-V3 under 200 KB. A larger value is refused before it is decoded."""
MAX_DEPTH = 16
"""The deepest nesting of a value (a plan's transfer sources sit 5 levels down)."""
INT64_MAX = (1 << 63) - 1
MAX_TEXT = 256
"""Longest id, host, node, device or member token."""
MAX_ENTRIES = 64
"""Most entries of a by-name map (bytes by route, seconds by phase, requests served)."""
MAX_LOAD = 1e18
"""Largest load of one expert in one window: a sum over thousands of ranks stays finite."""
MAX_SECONDS = 1e9
MAX_COUNT = 1 << 46
"""Largest count of a by-name map (bytes by route, requests served): a sum over
:data:`MAX_RANKS` ranks stays within int64."""


def member_token(rank_id: str, incarnation: str) -> str:
    """A member of a placement: ``"pod-3#1f0c9a2e"``. Members are named by id and
    incarnation, so a rank that registers again is a new member."""
    return f"{rank_id}#{incarnation}"


def member_id(token: str) -> str:
    """The rank id of a member token: ``member_id("pod-3#1f0c9a2e") == "pod-3"``."""
    return token.partition("#")[0]


# -- decoding ----------------------------------------------------------------------------
class _Refused(ValueError):
    """A number JSON can spell but a record must not hold."""


def _parse_int(text: str) -> int:
    if len(text) > 20:  # more digits than int64 has; also spares int() a huge string
        raise _Refused(f"integer {text[:24]}... is out of the int64 range")
    v = int(text)
    if not -INT64_MAX - 1 <= v <= INT64_MAX:
        raise _Refused(f"integer {text} is out of the int64 range")
    return v


def _parse_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise _Refused(f"number {text[:24]} is not finite (it overflows a double)")
    return v


def _parse_constant(name: str) -> Any:
    raise _Refused(f"{name} is not a number a record may hold")


_CHUNK = 1 << 18


def _scan_chunk(b: np.ndarray, depth: int, run: int, parity: int) -> tuple[int, int, int, int]:
    """One chunk of :func:`json_depth`: (depth, backslash run, quote parity) carried in
    and out, and the deepest level inside the chunk."""
    idx = np.arange(b.size, dtype=np.int64)
    last_other = np.maximum.accumulate(np.where(b == 92, -1, idx))  # last non-backslash so far
    before = np.empty(b.size, dtype=np.int64)  # backslashes right before each byte
    before[0] = run
    before[1:] = np.where(last_other[:-1] < 0, run + idx[1:], idx[:-1] - last_other[:-1])
    quote = (b == 34) & (before % 2 == 0)
    inside = (np.cumsum(quote) - quote + parity) % 2 == 1
    step = ((b == 91) | (b == 123)).astype(np.int64) - ((b == 93) | (b == 125))
    levels = depth + np.cumsum(np.where(inside, 0, step))
    end_run = run + b.size if last_other[-1] < 0 else b.size - 1 - int(last_other[-1])
    return int(levels[-1]), end_run, int((parity + quote.sum()) % 2), int(levels.max())


def json_depth(data: bytes, limit: int = MAX_DEPTH) -> int:
    """The deepest nesting of ``[`` and ``{`` outside strings in ``data`` (JSON text),
    without recursion; stops early once past ``limit``. ``json_depth(b'[[1], {"a": "["}]') == 2``.

    Why: ``json.loads`` recurses once per level and raises RecursionError on a deep
    enough value; checking first keeps every decode shallow. On text that is not JSON
    the count may be off, but only past the point where the decoder fails anyway."""
    depth = run = parity = deepest = 0
    view = np.frombuffer(data, dtype=np.uint8)
    for start in range(0, view.size, _CHUNK):
        depth, run, parity, most = _scan_chunk(view[start:start + _CHUNK], depth, run, parity)
        deepest = max(deepest, most)
        if deepest > limit:
            break
    return deepest


def load_json(key: str, raw: Any, max_bytes: int, revision: int = 0) -> Any:
    """The JSON value of ``raw`` (bytes or str) read at ``key``, or MalformedValueError:
    larger than ``max_bytes``, not UTF-8, nested deeper than :data:`MAX_DEPTH`, NaN,
    Infinity, a number that overflows a double, an integer outside int64, not JSON."""
    def bad(what: str) -> MalformedValueError:
        return MalformedValueError(f"{key}: {what}", key, revision)

    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise bad(f"value is {describe(raw)}, not bytes")
    data = bytes(raw)
    if len(data) > max_bytes:
        raise bad(f"value is {len(data)} bytes, more than the {max_bytes} this key may hold")
    # Fewer openers than the limit cannot nest past it: most values skip the scan.
    if data.count(b"[") + data.count(b"{") > MAX_DEPTH and (depth := json_depth(data)) > MAX_DEPTH:
        raise bad(f"value is nested {depth}+ levels deep, more than {MAX_DEPTH}")
    try:
        return json.loads(data.decode("utf-8"), parse_int=_parse_int, parse_float=_parse_float,
                          parse_constant=_parse_constant)
    except _Refused as e:
        raise bad(str(e)) from None
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise bad(f"not JSON ({str(e)[:120]}): {data[:80]!r}") from None


def _record(key: str, raw: Any, kind: str, revision: int) -> "_Fields":
    d = load_json(key, raw, MAX_BYTES[kind], revision)
    if not isinstance(d, dict):
        raise MalformedValueError(f"{key}: expected a JSON object, got {describe(d)}", key, revision)
    if d.get("schema") != SCHEMA:
        raise MalformedValueError(f"{key}: schema {describe(d.get('schema'))}, this version reads schema {SCHEMA}",
                                  key, revision)
    return _Fields(key, d, revision)


def _ident(s: str, token: bool) -> bool:
    """An id (no ``#``) or a member token: printable, no space, no ``/``."""
    return s.isprintable() and not any(c in s for c in (" /" if token else " /#"))


_REQUIRED: Any = object()


class _Fields:
    """The fields of one JSON object read at ``key``. Each getter checks type, range and
    shape and raises MalformedValueError naming the key and the field. A field that is
    absent takes ``default`` when there is one; ``null`` is never a valid value."""

    def __init__(self, key: str, d: dict[str, Any], revision: int) -> None:
        self.key, self.d, self.revision = key, d, revision

    def bad(self, what: str) -> MalformedValueError:
        return MalformedValueError(f"{self.key}: {what}", self.key, self.revision)

    def _get(self, name: str, default: Any) -> Any:
        if name not in self.d:
            if default is _REQUIRED:
                raise self.bad(f"field {name!r} missing")
            return default
        return self.d[name]

    def _error(self) -> Callable[[str], Exception]:
        return lambda what: self.bad(f"field {what}")

    def text(self, name: str, max_len: int = MAX_TEXT, default: Any = _REQUIRED, ident: str = "") -> str:
        """A string; ``ident="id"``: a rank id or incarnation, ``"token"``: a member token."""
        v = self._get(name, default)
        if not isinstance(v, str) or len(v) > max_len:
            raise self.bad(f"field {name!r} is {describe(v)}, expected a string of at most {max_len} characters")
        if ident and not _ident(v, ident == "token"):
            raise self.bad(f"field {name!r} is {describe(v)}: ids are printable, without spaces, '/' or '#'")
        return v.encode("utf-8", "replace").decode("utf-8")  # lone surrogates never reach a log or a put

    def integer(self, name: str, lo: int, hi: int, default: Any = _REQUIRED) -> int:
        return record_int(self._get(name, default), repr(name), lo, hi, self._error())

    def number(self, name: str, lo: float, hi: float, default: Any = _REQUIRED) -> float:
        v = self._get(name, default)
        if type(v) not in (int, float) or not lo <= v <= hi:
            raise self.bad(f"field {name!r} is {describe(v)}, expected a number in {lo}..{hi}")
        return float(v)

    def flag(self, name: str) -> bool:
        v = self._get(name, _REQUIRED)
        if not isinstance(v, bool):
            raise self.bad(f"field {name!r} is {describe(v)}, expected true or false")
        return v

    def choice(self, name: str, allowed: tuple[str, ...]) -> str:
        v = self._get(name, _REQUIRED)
        if v not in allowed:
            raise self.bad(f"{name} {describe(v)} is not one of {allowed}")
        return v

    def obj(self, name: str, default: Any = _REQUIRED) -> dict[str, Any]:
        v = self._get(name, default)
        if not isinstance(v, dict):
            raise self.bad(f"field {name!r} is {describe(v)}, expected a JSON object")
        return v

    def integers(self, name: str, lo: int, hi: int, max_len: int, default: Any = _REQUIRED) -> list[int]:
        return record_ints(self._get(name, default), repr(name), lo, hi, self._error(), max_len)

    def tokens(self, name: str) -> list[str]:
        """A list of distinct member tokens."""
        v = self._get(name, _REQUIRED)
        if not isinstance(v, list) or len(v) > MAX_RANKS:
            raise self.bad(f"field {name!r} is {describe(v)}, expected a list of at most {MAX_RANKS} member tokens")
        if not all(isinstance(t, str) and 0 < len(t) <= MAX_TEXT and _ident(t, True) for t in v):
            raise self.bad(f"field {name!r}: every member must be a token 'id#incarnation'")
        if len(set(v)) != len(v):
            raise self.bad(f"field {name!r} names a member twice")
        return v

    def by_name(self, name: str, number: bool) -> dict[str, Any]:
        """A map of short names to counts ``0 .. MAX_COUNT``, or (``number``) to seconds."""
        v = self.obj(name, {})
        if len(v) > MAX_ENTRIES or not all(len(k) <= 64 for k in v):
            raise self.bad(f"field {name!r} has {len(v)} entries, expected at most {MAX_ENTRIES} short names")
        for k, x in v.items():
            ok = type(x) in (int, float) and 0 <= x <= MAX_SECONDS if number else type(x) is int and 0 <= x <= MAX_COUNT
            if not ok:
                want = f"seconds in 0..{MAX_SECONDS:g}" if number else f"an integer in 0..{MAX_COUNT}"
                raise self.bad(f"field {name!r}: {describe(k)} is {describe(x)}, expected {want}")
        return {k: float(x) for k, x in v.items()} if number else dict(v)

    def table(self, name: str, hi: float) -> list[list[float]]:
        """``[rows][cols]`` finite numbers in ``0..hi``: rectangular, at most
        :data:`MAX_ELEMENTS` entries, at most :data:`MAX_LOGICAL` columns; packed
        (integers) or a list of lists."""
        v = self._get(name, _REQUIRED)
        if isinstance(v, dict):
            arr = unpack(v, f"field {name!r}", MAX_ELEMENTS, self.bad, ndim=2)
            if arr.shape[1] > MAX_LOGICAL or (arr.size and (arr.min() < 0 or arr.max() > hi)):
                raise self.bad(f"field {name!r} is {list(arr.shape)} or holds numbers outside 0..{hi:g}")
            return arr.astype(np.float64).tolist()
        if not isinstance(v, list) or not all(isinstance(row, list) for row in v):
            raise self.bad(f"field {name!r} is {describe(v)}, expected a list of lists of numbers")
        cols = len(v[0]) if v else 0
        if any(len(row) != cols for row in v):
            raise self.bad(f"field {name!r} is ragged: every row must have {cols} entries like row 0")
        if len(v) * max(cols, 1) > MAX_ELEMENTS or cols > MAX_LOGICAL:
            raise self.bad(f"field {name!r} is {len(v)} x {cols}, larger than a record may hold")
        if not all(type(x) in (int, float) and 0 <= x <= hi for row in v for x in row):
            raise self.bad(f"field {name!r} must hold numbers in 0..{hi:g} only")
        return [[float(x) for x in row] for row in v]

    def suffix(self, rank_id: str) -> None:
        """The key ends in ``/<rank_id>``: a rank writes only its own keys."""
        if self.key.rpartition("/")[2] != rank_id:
            raise self.bad(f"holds the record of rank {rank_id!r}; a rank's key ends with its id")


def parse_epoch(key: str, raw: Any, revision: int = 0) -> int:
    """The ``epoch`` key's value: a decimal ``0 .. MAX_EPOCH``, nothing else."""
    raw = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    if not isinstance(raw, (bytes, bytearray)) or not 0 < len(raw) <= MAX_BYTES["epoch"] or not raw.isdigit():
        shown = bytes(raw[:40]) if isinstance(raw, (bytes, bytearray)) else describe(raw)
        raise MalformedValueError(f"{key}: not a decimal epoch: {shown!r}", key, revision)
    epoch = int(raw)
    if epoch > MAX_EPOCH:
        raise MalformedValueError(f"{key}: epoch {epoch} is beyond {MAX_EPOCH}", key, revision)
    return epoch


def parse_leader(key: str, raw: Any, revision: int = 0) -> str:
    """The ``leader`` key's value: a controller id (printable UTF-8, at most 256 bytes)."""
    raw = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    try:
        text = bytes(raw).decode("utf-8") if isinstance(raw, (bytes, bytearray)) and len(raw) <= 256 else None
    except UnicodeDecodeError:
        text = None
    if text is None or not text.isprintable():
        raise MalformedValueError(f"{key}: not a controller id: {describe(raw)}", key, revision)
    return text


# -- records -----------------------------------------------------------------------------
@dataclass(frozen=True)
class RankRecord:
    """One rank's registration: ``RankRecord("pod-3", host="10.0.0.7", device="cuda:3",
    node="node-0", state="active", endpoint={"transport": "nixl"}, pid=4242,
    incarnation="1f0c9a2e", mirror_rows=96)``. ``id``: printable, no space, ``/`` or ``#``;
    ``mirror_rows``: experts its host-memory mirror holds (0: none)."""

    id: str
    host: str
    device: str
    node: str
    state: str
    endpoint: dict[str, Any] = field(default_factory=dict)
    pid: int = 0
    incarnation: str = ""
    mirror_rows: int = 0

    @property
    def token(self) -> str:
        """This registration's member token (``id#incarnation``)."""
        return member_token(self.id, self.incarnation)

    def to_json(self) -> str:
        return json.dumps({"schema": SCHEMA, **asdict(self)})

    @classmethod
    def parse(cls, key: str, raw: Any, revision: int = 0) -> "RankRecord":
        f = _record(key, raw, "ranks", revision)
        rec = cls(
            id=f.text("id", ident="id"), host=f.text("host"), device=f.text("device"), node=f.text("node"),
            state=f.choice("state", STATES), endpoint=f.obj("endpoint", {}), pid=f.integer("pid", 0, 1 << 32, 0),
            incarnation=f.text("incarnation", 64, "", ident="id"), mirror_rows=f.integer("mirror_rows", 0, MAX_ELEMENTS, 0),
        )
        if not rec.id:
            raise f.bad("field 'id' is empty")
        f.suffix(rec.id)
        return rec


@dataclass(frozen=True)
class LoadRecord:
    """A rank's expert load window: ``load[layer][logical]`` tokens over ``window_s``
    (``[num_layers][num_logical]``, finite, ``0 .. MAX_LOAD``); ``served``: requests it
    answered so far, ``{"ok": n, "bad": m}`` (bad: a slot whose bytes were wrong, from a
    rank that checks). Example: ``LoadRecord("r0", [[3.0, 0.0], [1.0, 2.0]], 10.0, {"ok": 7}, [1, 2])``.

    In etcd the window is packed (whole tokens, :mod:`elastic_ep.core.packed`): about
    a third of its JSON list of lists for DeepSeek-V3."""

    id: str
    load: list[list[float]]
    window_s: float
    served: dict[str, int] = field(default_factory=dict)
    epochs: list[int] = field(default_factory=list)
    """Plan epochs this rank has seen, in the order it saw them (must only increase)."""

    def to_json(self) -> str:
        tokens = np.clip(np.rint(np.asarray(self.load, dtype=np.float64).reshape(len(self.load), -1)), 0, MAX_LOAD)
        return json.dumps({"schema": SCHEMA, **asdict(self), "load": pack(tokens.astype(np.int64))},
                          separators=(",", ":"))

    @classmethod
    def parse(cls, key: str, raw: Any, revision: int = 0) -> "LoadRecord":
        f = _record(key, raw, "load", revision)
        rec = cls(f.text("id", ident="id"), f.table("load", MAX_LOAD), f.number("window_s", 0, MAX_SECONDS),
                  f.by_name("served", number=False), f.integers("epochs", 0, MAX_EPOCH, 4096, []))
        f.suffix(rec.id)
        return rec


@dataclass(frozen=True, eq=False)
class MirrorRecord:
    """What a rank's host-memory mirror holds ready to be read: ``rows[i]`` is the flat id
    ``layer * num_logical + logical`` of the expert row ``i`` holds, ``-1`` for a row empty
    or being written. ``token``: the registration (``id#incarnation``) whose memory it
    is; a new incarnation starts empty. Example: ``MirrorRecord("r2#c", np.array([17, -1, 300]))``
    (row 0 holds layer 0 expert 17, row 2 layer 1 expert 44 of a 256-expert model)."""

    token: str
    rows: np.ndarray

    def to_json(self) -> str:
        return json.dumps({"schema": SCHEMA, "token": self.token, "rows": pack(np.asarray(self.rows, dtype=np.int64))},
                          separators=(",", ":"))

    @classmethod
    def parse(cls, key: str, raw: Any, revision: int = 0) -> "MirrorRecord":
        f = _record(key, raw, "mirrors", revision)
        token = f.text("token", ident="token")
        rows = unpack(f.d.get("rows"), "field 'rows'", MAX_ELEMENTS, f.bad, ndim=1)
        if rows.size and (rows.min() < -1 or rows.max() >= MAX_ELEMENTS):
            raise f.bad(f"field 'rows' holds ids outside -1..{MAX_ELEMENTS - 1}")
        f.suffix(member_id(token))
        return cls(token, rows)


SUSPICIONS = ("closed", "silent", "self")


@dataclass(frozen=True)
class SuspectRecord:
    """A rank's report that member ``target`` may be dead: ``kind`` is ``closed`` (its
    liveness connection was refused, reset or closed: the process is gone), ``silent``
    (no heartbeat within the tolerance: hung, stopped or cut off) or ``self`` (the
    target reports itself broken, e.g. a CUDA error). Written by ``reporter`` under its
    own lease at ``suspects/<reporter id>/<target id>``.
    Example: ``SuspectRecord("r1#b", "r2#c", "closed", "connection reset")``."""

    reporter: str
    target: str
    kind: str
    detail: str = ""

    def to_json(self) -> str:
        return json.dumps({"schema": SCHEMA, **asdict(self)})

    @classmethod
    def parse(cls, key: str, raw: Any, revision: int = 0) -> "SuspectRecord":
        f = _record(key, raw, "suspects", revision)
        rec = cls(f.text("reporter", ident="token"), f.text("target", ident="token"), f.choice("kind", SUSPICIONS),
                  f.text("detail", 1024, ""))
        parts = key.rsplit("/", 2)
        if parts[-2:] != [member_id(rec.reporter), member_id(rec.target)]:
            raise f.bad(f"holds the report of {member_id(rec.reporter)!r} on {member_id(rec.target)!r}; it belongs "
                        f"at suspects/{member_id(rec.reporter)}/{member_id(rec.target)}")
        if (rec.kind == "self") != (rec.reporter == rec.target):
            raise f.bad("kind 'self' is a rank's report on itself, and only that")
        return rec


@dataclass(frozen=True)
class RoutingRecord:
    """Coverage before balance: members of committed epoch ``epoch`` confirmed dead,
    whose slots serving must route around until the next commit (the engine's maps
    become :meth:`ExpertPlacement.masked`). Example: ``RoutingRecord(3, ["r1#b"])``."""

    epoch: int
    dead: list[str]

    def to_json(self) -> str:
        return json.dumps({"schema": SCHEMA, **asdict(self)})

    @classmethod
    def parse(cls, key: str, raw: Any, revision: int = 0) -> "RoutingRecord":
        f = _record(key, raw, "routing", revision)
        return cls(f.integer("epoch", 0, MAX_EPOCH), f.tokens("dead"))


@dataclass(frozen=True)
class ChunkRef:
    """A chunk a plan head names: its ``name`` under the plan's prefix, its ``size`` in
    bytes and its ``sha256`` (hex). Example: ``ChunkRef("part-3", 5120, "9f2c...")``."""

    name: str
    size: int
    sha256: str


CHUNK_NAME = re.compile(r"^(old|part-[0-9]{1,5})$")
HEX = re.compile(r"^[0-9a-f]*$")


@dataclass(frozen=True)
class PlanRecord:
    """A plan: ``old_members[r]`` is the member token of old rank ``r``, ``new_members[n]``
    that of new rank ``n``; ``placement`` is the new placement. A ``bootstrap`` plan
    (no ``mapping``) loads every slot from disk.

    The ``plan`` key holds the *head*: every field but ``plan``, with the new
    placement packed, and ``chunks``, the names, sizes and digests of the bulk written
    before it under :meth:`prefix` (the old placement, and each participant's
    transfers). A head read from etcd has ``plan is None``;
    :mod:`controller.plan_chunks` fills in one participant's part or the whole plan.
    Example: ``PlanRecord(2, "ctl-a", ["r0#a", "r1#b"], ["r0#a"], <TransferPlan epoch 2>,
    <placement on 1 rank>, "dead ['r1#b'] ...")``.
    """

    epoch: int
    leader: str
    old_members: list[str]
    new_members: list[str]
    plan: TransferPlan | None
    placement: ExpertPlacement
    reason: str = ""
    mapping: RankMapping | None = None
    """Old -> new ranks (the plan's, when it is given); None for a bootstrap."""
    expert_bytes: int = 0
    nonce: str = ""
    """Hex that names this head's chunk prefix, so no other writer's chunks collide."""
    chunks: tuple[ChunkRef, ...] = ()
    mirrors: MirrorAssignment | None = None
    """The host-memory mirrors each new rank keeps once the plan commits (new ranks)."""

    def __post_init__(self) -> None:
        if self.plan is not None:
            object.__setattr__(self, "mapping", self.plan.mapping)
            object.__setattr__(self, "expert_bytes", self.plan.expert_bytes)

    @property
    def bootstrap(self) -> bool:
        return self.mapping is None

    def prefix(self, root: str) -> str:
        """Where this plan's chunks live: ``<root>/plans/<epoch, 20 digits>/<nonce>/``
        (zero-padded, so that the chunks of older epochs sort before it)."""
        return f"{root}/plans/{self.epoch:020d}/{self.nonce}/"

    def to_json(self) -> str:
        return json.dumps({
            "schema": SCHEMA, "epoch": self.epoch, "leader": self.leader, "reason": self.reason,
            "old_members": self.old_members, "new_members": self.new_members,
            "mapping": None if self.mapping is None else self.mapping.to_dict(), "expert_bytes": self.expert_bytes,
            "placement": self.placement.to_dict(), "nonce": self.nonce,
            "chunks": [[c.name, c.size, c.sha256] for c in self.chunks],
            **_mirrors_field(self.mirrors),
        }, separators=(",", ":"))

    @classmethod
    def parse(cls, key: str, raw: Any, revision: int = 0) -> "PlanRecord":
        f = _record(key, raw, "plan", revision)
        mapping_dict = f.d.get("mapping")
        try:
            mapping = None if mapping_dict is None else RankMapping.from_dict(mapping_dict)
            placement = ExpertPlacement.from_dict(f.obj("placement"))
        except ElasticEPError as e:
            raise f.bad(str(e)) from None
        rec = cls(f.integer("epoch", 0, MAX_EPOCH), f.text("leader"), f.tokens("old_members"), f.tokens("new_members"),
                  None, placement, f.text("reason", 4096, ""), mapping,
                  f.integer("expert_bytes", 0 if mapping is None else 1, MAX_EXPERT_BYTES, 0),
                  f.text("nonce", 32, ""), _chunk_refs(f), _read_mirrors(f, placement))
        if mapping is not None and (len(rec.old_members) != mapping.old_ep_size
                                    or len(rec.new_members) != mapping.new_ep_size):
            raise f.bad(f"{len(rec.old_members)} -> {len(rec.new_members)} members for a mapping of "
                        f"{mapping.old_ep_size} -> {mapping.new_ep_size} ranks")
        if len(rec.new_members) != placement.ep_size:
            raise f.bad(f"{len(rec.new_members)} members for {placement.ep_size} ranks")
        if not HEX.match(rec.nonce):
            raise f.bad(f"field 'nonce' is {describe(rec.nonce)}, expected hex digits")
        return rec

    def participants(self) -> list[str]:
        """Ids that execute the plan: live old members, then joiners."""
        m = self.mapping
        if m is None:
            return list(self.new_members)
        return [self.old_members[r] for r in sorted(m.live_sources)] + self.new_members[m.num_surviving:]

    def chunk(self, name: str) -> ChunkRef | None:
        """The chunk named ``name``, None when the head names none (nothing to read)."""
        return next((c for c in self.chunks if c.name == name), None)


def _mirrors_field(m: MirrorAssignment | None) -> dict[str, Any]:
    return {} if m is None else {"mirrors": m.to_dict()}


def _read_mirrors(f: "_Fields", placement: ExpertPlacement) -> MirrorAssignment | None:
    """The optional ``mirrors`` field: an assignment on ``placement``'s ranks."""
    v = f.d.get("mirrors")
    if v is None:
        return None
    try:
        return MirrorAssignment.from_dict(v, placement.num_layers, placement.num_logical, placement.ep_size,
                                          placement.num_layers * placement.num_logical)
    except ElasticEPError as e:
        raise f.bad(f"field 'mirrors': {e}") from None


def _chunk_refs(f: "_Fields") -> tuple[ChunkRef, ...]:
    v = f.d.get("chunks", [])
    if not isinstance(v, list) or len(v) > MAX_RANKS + 1:
        raise f.bad(f"field 'chunks' is {describe(v)}, expected a list of at most {MAX_RANKS + 1} chunks")
    out = []
    for c in v:
        if (not isinstance(c, list) or len(c) != 3 or not isinstance(c[0], str) or not CHUNK_NAME.match(c[0])
                or type(c[1]) is not int or not 0 <= c[1] <= MAX_BYTES["chunk"]
                or not isinstance(c[2], str) or len(c[2]) != 64 or not HEX.match(c[2])):
            raise f.bad(f"field 'chunks' holds {describe(c)}, expected [name, size <= {MAX_BYTES['chunk']}, "
                        "sha256 hex]")
        out.append(ChunkRef(c[0], c[1], c[2]))
    if len({c.name for c in out}) != len(out):
        raise f.bad("field 'chunks' names a chunk twice")
    return tuple(out)


@dataclass(frozen=True)
class AckRecord:
    """A rank's result for a plan: ``ok``, bytes by route, seconds by phase, or ``error``.
    Example: ``AckRecord(3, "r1#b", True, {"peer": 4096}, {"transfer": 0.2}, mismatched=0)``."""

    epoch: int
    id: str
    ok: bool
    bytes: dict[str, int] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)
    error: str = ""
    mismatched: int = -1
    """Slots found not bit-exact by a rank that checks (synthetic weights); -1: not checked."""

    @property
    def succeeded(self) -> bool:
        """Done and bit-exact: ``ok`` with no slot found mismatched. Bytes that differ
        from the checkpoint are a failure, whatever ``ok`` says."""
        return self.ok and self.mismatched <= 0

    def to_json(self) -> str:
        return json.dumps({"schema": SCHEMA, **asdict(self)})

    @classmethod
    def parse(cls, key: str, raw: Any, revision: int = 0) -> "AckRecord":
        f = _record(key, raw, "acks", revision)
        rec = cls(f.integer("epoch", 0, MAX_EPOCH), f.text("id", ident="token"), f.flag("ok"),
                  f.by_name("bytes", number=False), f.by_name("phases", number=True), f.text("error", 8192, ""),
                  f.integer("mismatched", -1, INT64_MAX, -1))
        f.suffix(member_id(rec.id))
        return rec


@dataclass(frozen=True)
class CommitRecord:
    """The placement serving uses: ``members[r]`` is the member token of rank ``r``.
    Example: ``CommitRecord(2, ["r0#a", "r2#c"], <placement on 2 ranks>, {"transfer": 1.5}, {"peer": 8192})``."""

    epoch: int
    members: list[str]
    placement: ExpertPlacement
    phases: dict[str, float] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    mirrors: MirrorAssignment | None = None
    """The host-memory mirrors each rank keeps (the committed plan's)."""
    expert_bytes: int = 0
    """Bytes of one expert (0: not recorded), for tools that size mirrors and losses."""

    def to_json(self) -> str:
        return json.dumps({"schema": SCHEMA, "epoch": self.epoch, "members": self.members,
                           "placement": self.placement.to_dict(), "phases": self.phases, "bytes": self.bytes,
                           "expert_bytes": self.expert_bytes, **_mirrors_field(self.mirrors)})

    @classmethod
    def parse(cls, key: str, raw: Any, revision: int = 0) -> "CommitRecord":
        f = _record(key, raw, "committed", revision)
        placement_dict = f.obj("placement")
        try:
            placement = ExpertPlacement.from_dict(placement_dict)
        except ElasticEPError as e:
            raise f.bad(str(e)) from None
        rec = cls(f.integer("epoch", 0, MAX_EPOCH), f.tokens("members"), placement,
                  f.by_name("phases", number=True), f.by_name("bytes", number=False), _read_mirrors(f, placement),
                  f.integer("expert_bytes", 0, MAX_EXPERT_BYTES, 0))
        if len(rec.members) != placement.ep_size:
            raise f.bad(f"{len(rec.members)} members for {placement.ep_size} ranks")
        return rec

