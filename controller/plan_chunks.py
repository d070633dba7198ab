"""A plan's bulk in etcd: chunks written before the head that names them.

A plan at production size does not fit one record (DeepSeek-V3 on 128 ranks with the
``deepseek`` policy: 4-5 MB of JSON), and no rank needs all of it. So the leader writes:

- under ``<root>/plans/<epoch>/<nonce>/``: ``old`` (the old placement, packed) and
  ``part-<p>`` for each participant ``p`` (in :meth:`PlanRecord.participants` order)
  that has transfers: the ones it receives and the ones planned to read from it, as
  packed rows (:func:`~elastic_ep.core.plan.transfer_rows`);
- then the head (``plan`` key) in the fenced transaction that moves ``epoch``; the head
  lists each chunk with its size and sha256.

Chunks are inert until a head names them, and a reader checks the digest before it
parses, so a chunk written by anyone else (a deposed leader, a rank's credentials) is
never executed: the fence stays on the head alone. A participant reads ``old`` and its
own part (:func:`load_part`); tools read every part (:func:`load_plan`). Chunks of
epochs before the committed one are deleted after each commit (:func:`remove_before`).

Example (DeepSeek-V3, 256 ranks x 9 slots, one rank lost): head ~140 KB, ``old`` ~95 KB,
each part a few KB; a participant reads ~100 KB where the single record was megabytes.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections import defaultdict
from dataclasses import replace
from typing import Any

import numpy as np

from elastic_ep.core.packed import pack, unpack
from elastic_ep.core.placement import MAX_ELEMENTS, ExpertPlacement
from elastic_ep.core.plan import REMOTE, Transfer, TransferPlan, transfer_rows, transfers_from_rows
from elastic_ep.core.rank_mapping import RankMapping
from elastic_ep.errors import ElasticEPError, MalformedValueError, PlanError

from controller.etcd_client import call, delete_range
from controller.records import MAX_BYTES, SCHEMA, ChunkRef, PlanRecord, load_json

OLD = "old"
TXN_OPS, TXN_BYTES = 64, 1 << 20
"""Chunks written per transaction: within etcd's 128 operations and 1.5 MiB per request."""


def part_name(participant: int) -> str:
    return f"part-{participant}"


def participant_ranks(mapping: RankMapping) -> list[tuple[int | None, int | None]]:
    """``(old_rank, new_rank)`` of each participant: live old ranks in old order (a
    leaving rank has no new rank), then joiners (no old rank)."""
    o2n = mapping.old_to_new
    kept = [(o, o2n[o] if o2n[o] >= 0 else None) for o in sorted(mapping.live_sources)]
    return kept + [(None, n) for n in range(mapping.num_surviving, mapping.new_ep_size)]


# -- encoding (pure) --------------------------------------------------------------------
def _value(epoch: int, name: str, body: dict[str, Any]) -> bytes:
    return json.dumps({"schema": SCHEMA, "epoch": epoch, "name": name, **body}, separators=(",", ":")).encode()


def encode(rec: PlanRecord) -> dict[str, bytes]:
    """The chunk values of ``rec`` (which holds its whole plan): ``old``, and a part for
    each participant with transfers. A bootstrap plan has none."""
    plan = rec.plan
    if plan is None:
        return {}
    out = {OLD: _value(rec.epoch, OLD, {"placement": plan.old.to_dict()})}
    by_new: dict[int, list[Transfer]] = defaultdict(list)
    by_old: dict[int, list[Transfer]] = defaultdict(list)
    o2n = plan.mapping.old_to_new
    for t in plan.transfers:
        by_new[t.dst_rank].append(t)
        if t.route in REMOTE and o2n[t.sources[0].rank] != t.dst_rank:
            by_old[t.sources[0].rank].append(t)
    for p, (o, n) in enumerate(participant_ranks(plan.mapping)):
        # A read from o's own GPU or mirror is o's receive only: the two lists never overlap.
        ts = (by_new.get(n, []) if n is not None else []) + (by_old.get(o, []) if o is not None else [])
        if ts:
            out[part_name(p)] = _value(rec.epoch, part_name(p), {"rows": pack(transfer_rows(ts))})
    return out


def head(rec: PlanRecord, values: dict[str, bytes], nonce: str) -> PlanRecord:
    """``rec`` naming ``values`` (its chunks) under ``nonce``."""
    refs = tuple(ChunkRef(name, len(v), hashlib.sha256(v).hexdigest()) for name, v in values.items())
    return replace(rec, nonce=nonce, chunks=refs)


# -- writing and deleting ----------------------------------------------------------------
def write(client: Any, root: str, rec: PlanRecord) -> PlanRecord:
    """Write ``rec``'s chunks under a fresh nonce, a few per transaction; the head to
    publish. Raises :class:`~elastic_ep.errors.RecordTooLargeError` (via etcd) or
    :class:`PlanError` for a chunk over :data:`MAX_BYTES` ``["chunk"]``."""
    values = encode(rec)
    out = head(rec, values, secrets.token_hex(8))
    for name, v in values.items():
        if len(v) > MAX_BYTES["chunk"]:
            raise PlanError(f"plan epoch {rec.epoch}: chunk {name} is {len(v)} bytes, more than the "
                            f"{MAX_BYTES['chunk']} a chunk may hold")
    tx, prefix = client.transactions, out.prefix(root)
    batch: list[Any] = []
    size = 0
    for name, v in values.items():
        if batch and (len(batch) >= TXN_OPS or size + len(v) > TXN_BYTES):
            call(client.transaction, f"write plan epoch {rec.epoch} chunks", compare=[], success=batch, failure=[])
            batch, size = [], 0
        batch.append(tx.put(prefix + name, v))
        size += len(v)
    if batch:
        call(client.transaction, f"write plan epoch {rec.epoch} chunks", compare=[], success=batch, failure=[])
    return out


def remove_before(client: Any, root: str, epoch: int) -> None:
    """Delete the chunks of every epoch before ``epoch`` (one range delete)."""
    delete_range(client, f"delete plan chunks before epoch {epoch}", f"{root}/plans/", f"{root}/plans/{epoch:020d}")


# -- reading -----------------------------------------------------------------------------
def read(client: Any, root: str, rec: PlanRecord, name: str) -> dict[str, Any] | None:
    """Chunk ``name`` of ``rec``, its digest checked, parsed; None when the head names
    no such chunk. Raises :class:`MalformedValueError` naming the key when the chunk is
    missing, of another size or digest, or not a chunk of this plan."""
    if rec.chunk(name) is None:
        return None
    key = rec.prefix(root) + name
    value, _ = call(client.get, f"read {key}", key)
    if value is None:
        raise MalformedValueError(f"{key}: chunk {name} of plan epoch {rec.epoch} is missing", key)
    return parse(key, value, rec, name)


def parse(key: str, value: bytes, rec: PlanRecord, name: str) -> dict[str, Any]:
    """Chunk ``name`` of head ``rec`` as read at ``key``: its size and digest checked
    before it is decoded, then its JSON (capped) and identity."""
    ref = rec.chunk(name)
    if ref is None:
        raise MalformedValueError(f"{key}: plan epoch {rec.epoch} names no chunk {name}", key)
    if len(value) != ref.size or hashlib.sha256(value).hexdigest() != ref.sha256:
        raise MalformedValueError(f"{key}: chunk {name} of plan epoch {rec.epoch} is {len(value)} bytes with sha256 "
                                  f"{hashlib.sha256(value).hexdigest()[:16]}..., the head says {ref.size} bytes, "
                                  f"{ref.sha256[:16]}...: it is not the leader's chunk", key)
    d = load_json(key, value, MAX_BYTES["chunk"])
    if not isinstance(d, dict) or d.get("schema") != SCHEMA or d.get("epoch") != rec.epoch or d.get("name") != name:
        raise MalformedValueError(f"{key}: not chunk {name} of plan epoch {rec.epoch}", key)
    return d


def _old(client: Any, root: str, rec: PlanRecord) -> ExpertPlacement:
    d = read(client, root, rec, OLD)
    key = rec.prefix(root) + OLD
    if d is None:
        raise MalformedValueError(f"{key}: plan epoch {rec.epoch} names no old placement", key)
    try:
        return ExpertPlacement.from_dict(d.get("placement"))
    except ElasticEPError as e:
        raise MalformedValueError(f"{key}: {e}", key) from None


def _rows(client: Any, root: str, rec: PlanRecord, p: int) -> np.ndarray:
    d = read(client, root, rec, part_name(p))
    if d is None:
        return np.zeros((0, 6), dtype=np.int64)
    try:
        return unpack(d.get("rows"), f"{rec.prefix(root)}{part_name(p)} rows", MAX_ELEMENTS, PlanError, ndim=2)
    except PlanError as e:
        key = rec.prefix(root) + part_name(p)
        raise MalformedValueError(f"{key}: {e}", key) from None


def _empty(rec: PlanRecord, old: ExpertPlacement) -> TransferPlan:
    assert rec.mapping is not None
    return TransferPlan(rec.epoch, rec.mapping, old, rec.placement, rec.expert_bytes, (), ())


def load_part(client: Any, root: str, rec: PlanRecord, token: str) -> PlanRecord:
    """``rec`` holding participant ``token``'s part of its plan, validated
    (:meth:`TransferPlan.validate`). Raises :class:`MalformedValueError` or
    :class:`PlanError` when a chunk is missing, forged or inconsistent."""
    if rec.bootstrap:
        return rec
    assert rec.mapping is not None
    p = rec.participants().index(token)
    o, n = participant_ranks(rec.mapping)[p]
    base = _empty(rec, _old(client, root, rec))
    ts = transfers_from_rows(_rows(client, root, rec, p), rec.mapping, rec.placement)
    part = base.with_transfers(ts, (o, n))
    part.validate()
    return replace(rec, plan=part)


def load_plan(client: Any, root: str, rec: PlanRecord) -> PlanRecord:
    """``rec`` holding its whole plan, from every part's receives, validated."""
    if rec.bootstrap or rec.plan is not None:
        return rec
    assert rec.mapping is not None
    base = _empty(rec, _old(client, root, rec))
    received: list[Transfer] = []
    for p, (_, n) in enumerate(participant_ranks(rec.mapping)):
        if n is not None:
            received += [t for t in transfers_from_rows(_rows(client, root, rec, p), rec.mapping, rec.placement)
                         if t.dst_rank == n]
    plan = base.with_transfers(tuple(received), None)
    plan.validate()
    return replace(rec, plan=plan)
