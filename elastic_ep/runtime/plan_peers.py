"""What a rank executing a plan asks etcd about the plan's other participants: whether
the controller confirmed one dead (it revokes the lease of a confirmed death, so the
registration under ``ranks/`` goes), and whether a newer plan superseded this one.

The executor's waits depend on their peers: a layer barrier waits for every live
participant, a read waits for its source, a two-sided transport's group for all. A
participant that crashed or froze would hold each of them until its own deadline
(heartbeat staleness, source timeout); asking etcd ends them once the death is
confirmed. Answers are cached ``period_s`` per participant: a barrier of hundreds of
ranks waiting on one dead rank costs each of them one small read per period.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from controller.etcd_client import call
from controller.records import MirrorRecord, PlanRecord, RankRecord, member_id, parse_epoch
from controller.view import parse_value

from elastic_ep.core.rank_mapping import RankMapping
from elastic_ep.runtime.executor import Participants


class PlanPeers:
    """The participants of plan ``rec`` in the executor's numbering, and which of them
    are gone. Example: old members ``[a, b, c]`` with ``b`` dead in the plan and no
    joiner -> ``tokens == [a, c]``; ``gone(1)`` turns True once ``c``'s registration
    is revoked or replaced by a new incarnation of ``c``.
    """

    def __init__(self, client: Any, root: str, rec: PlanRecord, mapping: RankMapping, period_s: float = 0.1) -> None:
        self.client, self.root, self.rec, self.period_s = client, root, rec, period_s
        parts = Participants.of(mapping)
        self.tokens = [rec.old_members[o] for o in parts.old] + [rec.new_members[n] for n in parts.joining]
        self._seen: dict[int, tuple[float, bool]] = {}  # participant -> (monotonic time asked, gone)
        self._lock = threading.Lock()  # the barrier and a transport may ask from two threads

    def gone(self, participant: int) -> bool:
        """True once participant ``participant``'s registration is absent or holds
        another incarnation; False also when etcd cannot say (no answer is no death)."""
        if not 0 <= participant < len(self.tokens):
            return False
        now = time.monotonic()
        with self._lock:
            seen = self._seen.get(participant)
        if seen is not None and (seen[1] or now - seen[0] < self.period_s):
            return seen[1]
        token = self.tokens[participant]
        answered, rec = self._record("ranks", token, RankRecord.parse)
        if not answered:
            return False
        dead = rec is None or (isinstance(rec, RankRecord) and rec.token != token)
        with self._lock:
            self._seen[participant] = (now, dead)
        return dead

    def mirror_rows(self, old_rank: int) -> Any:
        """What old rank ``old_rank``'s mirror report says each row holds now (int64
        ``[rows]``, flat ``layer * num_logical + logical`` ids, ``-1`` empty), or None
        when its report is absent, malformed, of another incarnation, or etcd cannot
        say. A rank publishes a row as empty before it rewrites it, so a row read and
        then still reported with its expert was read whole."""
        if not 0 <= old_rank < len(self.rec.old_members):
            return None
        token = self.rec.old_members[old_rank]
        _, rec = self._record("mirrors", token, MirrorRecord.parse)
        return rec.rows if isinstance(rec, MirrorRecord) and rec.token == token else None

    def _record(self, kind: str, token: str, parse: Callable[..., Any]) -> tuple[bool, Any]:
        """``(answered, value)`` of ``<kind>/<id>`` of ``token``'s rank: the record, None
        when the key is absent, the MalformedValueError of a value that does not parse;
        ``answered`` False when etcd cannot say."""
        key = f"{self.root}/{kind}/{member_id(token)}"
        try:
            raw, meta = call(self.client.get, f"read {key}", key)
        except Exception:
            return False, None
        return True, None if raw is None else parse_value(parse, key, raw, meta.mod_revision)

    def abort_reason(self) -> str:
        """Why this plan's waits should end now: a newer plan is out, or a participant's
        registration key is gone; "" otherwise, and when etcd cannot say. Two reads
        (the epoch, the keys under ``ranks/``) whatever the number of participants."""
        try:
            raw, _ = call(self.client.get, "read epoch", f"{self.root}/epoch")
            newest = parse_epoch(f"{self.root}/epoch", raw) if raw is not None else 0
            if newest > self.rec.epoch:
                return f"plan epoch {newest} superseded epoch {self.rec.epoch}"
            keys = call(self.client.get_prefix, "read rank keys", f"{self.root}/ranks/", keys_only=True)
            here = {m.key.decode().rpartition("/")[2] for _, m in keys}
        except Exception:  # no answer is no reason to give up
            return ""
        gone = [t for t in self.tokens if member_id(t) not in here]
        return f"participants {gone} of epoch {self.rec.epoch} are gone" if gone else ""
