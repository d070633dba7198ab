"""Turning ranks' suspicions into confirmed deaths, so that one confused rank cannot
evict a healthy one.

Ranks watch a few peers over a light liveness channel
(:mod:`elastic_ep.runtime.liveness`) and report what they see under their own lease
(``suspects/<reporter>/<target>``, :class:`~controller.records.SuspectRecord`). A
suspicion is confirmed when:

- the target reports itself broken (``self``: an engine that saw a CUDA error);
- reporters on at least ``quorum`` distinct ranks suspect it; or
- the controller's own probe of the target's liveness endpoint fails within its
  deadline (a crashed process refuses the connection at once; a stopped one sends no
  heartbeat).

A confirmed member's lease is revoked (the fence: its keys go at once, and a live but
evicted process sees its lease gone, stops serving and registers again as a new
member), and its death settles in ``confirm_settle_s`` instead of the membership
settle window. The lease stays the backstop for what no peer sees (a whole node lost
with every peer that watched it).

Example: ``judge(view, quorum=2)`` with two live reporters suspecting ``r3#c`` ->
``Judgement(confirmed={"r3#c": "suspected by 2 ranks (r1, r4): closed, silent"}, probe={})``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from controller.records import member_id
from controller.view import ClusterView


@dataclass(frozen=True)
class Judgement:
    """Members confirmed dead (token -> why), how each was (token -> ``self`` or
    ``quorum``), and those a probe must decide (token -> the liveness address their
    registration published)."""

    confirmed: dict[str, str] = field(default_factory=dict)
    probe: dict[str, str] = field(default_factory=dict)
    how: dict[str, str] = field(default_factory=dict)


def judge(view: ClusterView, quorum: int = 2) -> Judgement:
    """What the suspicions in ``view`` establish; pure. A single reporter's suspicion
    of a target that published no liveness address is left to the lease."""
    by_target: dict[str, dict[str, str]] = defaultdict(dict)
    for s in view.suspects:
        by_target[s.target][member_id(s.reporter)] = s.kind
    out = Judgement()
    for target, reports in sorted(by_target.items()):
        names = ", ".join(sorted(reports))
        if reports.get(member_id(target)) == "self":
            out.confirmed[target], out.how[target] = "reported itself broken", "self"
        elif len(reports) >= quorum:
            out.confirmed[target] = (f"suspected by {len(reports)} ranks ({names}): "
                                     f"{', '.join(sorted(set(reports.values())))}")
            out.how[target] = "quorum"
        else:
            address = view.ranks[member_id(target)].endpoint.get("liveness")
            if isinstance(address, str) and address:
                out.probe[target] = address
    return out
