"""The controller's decisions: one pure function from what etcd holds to what to do next.

Each pass of the leader's loop reads a :class:`~controller.view.ClusterView`, calls
:func:`decide` with the :class:`Memory` the previous pass left, and carries out the
:class:`Action` it returns (:mod:`controller.controller`: fenced writes, metrics, logs,
the wait before the next pass). ``decide`` touches neither etcd nor metrics and mutates
nothing, so a test drives it through every state with hand-built views: decide, then
act, as torch.distributed.elastic's dynamic rendezvous does.

The questions, in the order ``decide`` asks them:

1. A plan in flight (published, not committed): are the acks of all its live
   participants in? No: ``WAIT_ACKS``; once ``ack_timeout_s`` passed, ``ACK_TIMEOUT``
   with the silent participants' leases to revoke (the fence: their keys go, their
   agents register again as new members, and the next pass plans without them).
   All succeeded (ok and bit-exact: an ack with mismatched slots is a failure) and no
   new member dead: ``COMMIT`` (a draining source that died took nothing with it).
   Otherwise the live ones finished (or failed) and the next plan starts from there.
2. No base placement (nothing committed or finished): ``BOOTSTRAP`` once ``min_ranks``
   ranks stayed the same for ``settle_s`` (``WAIT_BOOTSTRAP`` until then);
   ``WAIT_FAILED`` while a participant of the plan in flight reports failure (it
   fences itself and registers again as a new member, which then counts as dead and is
   never a source); past ``ack_timeout_s`` its lease is revoked (``ACK_TIMEOUT``).
3. Members dead, draining or joining: ``SETTLING`` for ``settle_s`` (a plan in flight
   is replaced at once), then ``PUBLISH`` the next plan, or ``TOO_FEW_RANKS`` when the
   ranks left cannot hold every logical expert. At most ``max_joiners_per_plan``
   joining ranks enter one plan, oldest registration first; the rest join next.
4. No change: ``WAIT_IN_FLIGHT`` if a plan is still out; a rebalance when the load
   balance fell below ``imbalance_threshold`` after the cooldown (``PUBLISH``, or
   ``BALANCED`` when the policy would move nothing); else ``STEADY``.

Example (three ranks registered, nothing published yet)::

    cfg = DecideConfig(ModelShape(2, 8, 4, 1024), min_ranks=3, settle_s=1.0)
    a = decide(view, Memory(last_rebalance=0.0), cfg, now=10.0)  # a.kind is Kind.WAIT_BOOTSTRAP
    a = decide(view, a.memory, cfg, now=11.0)                     # a.kind is Kind.BOOTSTRAP
    a.record.epoch == view.epoch + 1 and a.record.new_members == ["r0#a", "r1#b", "r2#c"]
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping

import numpy as np

from elastic_ep.errors import ConfigError
from elastic_ep.core.mirrors import MirrorAssignment, assign_mirrors
from elastic_ep.core.placement import ExpertPlacement, balance, initial_placement
from elastic_ep.core.plan import build_plan
from elastic_ep.core.policy import RebalancePolicy, get_policy
from elastic_ep.core.rank_mapping import RankMapping

from controller.coverage import ready_mirrors
from controller.records import PlanRecord, member_id
from controller.view import ClusterView

Signature = tuple[Any, ...]
"""What a settle window watches stay the same:

- ``("boot", ("r0", "r1", "r2"))``: the rank ids ready for the bootstrap plan;
- ``("change", (1,), (), ("r4",))``: old ranks dead, old ranks draining (indices into
  the base's members) and rank ids joining.
"""


@dataclass(frozen=True)
class ModelShape:
    """What placement needs of the model: ``ModelShape(58, 256, 9, 88_080_384)``
    (DeepSeek-V3: 58 MoE layers, 256 experts, 9 slots a rank, bytes of one expert)."""

    num_layers: int
    num_logical: int
    slots_per_rank: int
    expert_bytes: int

    def __post_init__(self) -> None:
        bad = {k: v for k, v in self.__dict__.items() if type(v) is not int or v < 1}
        if bad:
            raise ConfigError(f"a model shape needs positive integers, got {bad}")


@dataclass(frozen=True)
class DecideConfig:
    """The settings decisions depend on (the rest of ``ControllerConfig`` is I/O).

    Example: ``DecideConfig(ModelShape(2, 8, 4, 1024), leader="ctl-a", min_ranks=3,
    settle_s=0.3, imbalance_threshold=0.9, rebalance_cooldown_s=60.0)``.
    """

    model: ModelShape
    leader: str = "controller-0"
    """Written into every plan record: the id of the controller that publishes it."""
    min_ranks: int = 1
    max_joiners_per_plan: int = 16
    """Joining ranks one plan takes in (oldest registration first; the rest join in the
    next plan); a bootstrap takes at most ``max(min_ranks, max_joiners_per_plan)``
    ranks. Bounds the cost of one plan whatever registers."""
    settle_s: float = 1.0
    confirm_settle_s: float = 0.05
    """The settle window of a change whose dead members were all confirmed by
    :mod:`controller.suspicion` (their deaths are known, not inferred from a lease)."""
    ack_timeout_s: float = 300.0
    imbalance_threshold: float = 0.0
    """Rebalance when mean/max rank load falls below this (0 disables)."""
    rebalance_cooldown_s: float = 60.0
    policy: RebalancePolicy = field(default_factory=lambda: get_policy("min_migration"))
    """Places experts after a membership change or for load; the bootstrap always
    spreads load with DeepSeek's policy."""

    def __post_init__(self) -> None:
        if self.max_joiners_per_plan < 1:
            raise ConfigError(f"max_joiners_per_plan must be at least 1, got {self.max_joiners_per_plan}")


@dataclass(frozen=True)
class Memory:
    """What the leader keeps between passes (monotonic seconds); ``decide`` returns the
    next one and never changes the one it was given.

    Example: epoch 2's plan out since t=7.5 (detected at 7.2, planned in 0.05 s), and
    since t=9.6 the loss of old rank 1 settling::

        Memory(last_rebalance=3.0, seen=(("change", (1,), (), ()), 9.6), shortage=None,
               detected_at=9.6, sent={2: 7.5}, phases={2: {"detect": 0.3, "plan": 0.05}})
    """

    last_rebalance: float
    """When a plan last committed (or the policy found nothing to move): the imbalance
    cooldown counts from here."""
    seen: tuple[Signature, float] | None = None
    """The :data:`Signature` being settled, and since when."""
    shortage: int | None = None
    """The number of ranks last reported as too few to hold every expert (a shortage is
    logged once, not every pass)."""
    detected_at: float | None = None
    """When the change the next plan answers was first seen: its detect phase starts."""
    sent: Mapping[int, float] = field(default_factory=dict)
    """epoch -> when its plan went out: its transfer phase starts."""
    phases: Mapping[int, Mapping[str, float]] = field(default_factory=dict)
    """epoch -> seconds of its detect and plan phases, for its commit record."""
    confirmed: frozenset[str] = frozenset()
    """Members whose deaths the controller confirmed (their leases revoked) since the
    last plan went out."""

    def plan_sent(self, epoch: int, at: float, plan_s: float | None = None) -> Memory:
        """This memory after the plan of ``epoch`` went out at ``at``; ``plan_s``: the
        seconds deciding it took (None for a bootstrap plan: it has no detect or plan
        phase). Older epochs' entries go: a plan replaces every plan before it."""
        mine = self.phases.get(epoch)
        if mine is not None and plan_s is not None:
            mine = {**mine, "plan": plan_s}
        return replace(self, sent={epoch: at}, phases={} if mine is None else {epoch: mine})


class Kind(enum.Enum):
    """What a pass does. Only BOOTSTRAP, PUBLISH and COMMIT write to etcd."""

    WAIT_BOOTSTRAP = "waiting for ranks to bootstrap"
    BOOTSTRAP = "publish the bootstrap plan"
    WAIT_ACKS = "waiting for acks"
    ACK_TIMEOUT = "acks overdue"
    COMMIT = "commit"
    WAIT_FAILED = "waiting for failed participants to register again"
    SETTLING = "settling"
    PUBLISH = "publish a plan"
    TOO_FEW_RANKS = "too few ranks"
    WAIT_IN_FLIGHT = "waiting on the plan in flight"
    BALANCED = "balanced as well as the policy can"
    STEADY = "steady"


@dataclass(frozen=True)
class Action:
    """One pass's decision, with the memory for the next pass.

    Fields by kind:

    - ``epoch``: the plan to publish (BOOTSTRAP, PUBLISH), the plan in flight (WAIT_ACKS,
      ACK_TIMEOUT, COMMIT, WAIT_FAILED, WAIT_IN_FLIGHT), else the newest published epoch;
    - ``record``: the plan to write with epoch ``record.epoch - 1`` expected (BOOTSTRAP,
      PUBLISH), or the plan to commit (COMMIT);
    - ``phases``: COMMIT: seconds of detect, plan and transfer for the commit record;
    - ``ranks``: WAIT_BOOTSTRAP: the rank ids ready; WAIT_ACKS: the live participants
      (member tokens) with no ack yet; ACK_TIMEOUT: the participants to fence (silent,
      or failed and not registered again);
    - ``leases``: ACK_TIMEOUT: the leases of ``ranks`` to revoke;
    - ``dead``, ``failed``: participants of a finished plan in flight that died or reported
      failure, on whatever follows it (PUBLISH, WAIT_FAILED, TOO_FEW_RANKS, ...);
    - ``report``: TOO_FEW_RANKS: the shortage is new (log it once, not every pass);
    - ``reason``: why, for logs (``"dead ['r1#b'] leaving [] joining []"``).

    Example: ``Action(Kind.WAIT_ACKS, memory, epoch=3, ranks=("r2#c",))``.
    """

    kind: Kind
    memory: Memory
    epoch: int = 0
    record: PlanRecord | None = None
    phases: Mapping[str, float] = field(default_factory=dict)
    ranks: tuple[str, ...] = ()
    leases: tuple[int, ...] = ()
    dead: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()
    report: bool = False
    reason: str = ""

    def __str__(self) -> str:
        text = f"{self.kind.value} (epoch {self.epoch})"
        return f"{text}: {self.reason}" if self.reason else text


@dataclass(frozen=True)
class _Flight:
    """The plan in flight and where its participants (member tokens) stand."""

    plan: PlanRecord
    pending: tuple[str, ...]
    """Live, no ack yet."""
    dead: tuple[str, ...]
    """No longer registered as that incarnation."""
    failed: tuple[str, ...]
    """Live, acked with a failure or with slots that are not bit-exact."""


@dataclass(frozen=True)
class _Base:
    """What the ranks hold now: the committed state, or a plan every live participant
    finished. ``members[r]`` is the member token of rank ``r``."""

    epoch: int
    members: list[str]
    placement: ExpertPlacement
    mirrors: MirrorAssignment | None = None


@dataclass(frozen=True)
class _Change:
    """A membership change against the base: old ranks ``dead`` and ``leaving`` (indices
    into the base's members), rank ids ``joining``."""

    dead: tuple[int, ...] = ()
    leaving: tuple[int, ...] = ()
    joining: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.dead or self.leaving or self.joining)

    @property
    def signature(self) -> Signature:
        return ("change", self.dead, self.leaving, self.joining)

    def describe(self, members: list[str]) -> str:
        return (f"dead {[members[i] for i in self.dead]} leaving {[members[i] for i in self.leaving]} "
                f"joining {list(self.joining)}")


@dataclass(frozen=True)
class _Pass:
    """The read-only inputs of one pass."""

    view: ClusterView
    cfg: DecideConfig
    now: float
    flight: _Flight | None

    def act(self, kind: Kind, memory: Memory, **data: Any) -> Action:
        """An action; the epoch defaults to the plan in flight's, and a finished plan's
        dead and failed participants ride along."""
        f = self.flight
        data.setdefault("epoch", f.plan.epoch if f is not None else self.view.epoch)
        if f is not None and not f.pending:
            data.setdefault("dead", f.dead)
            data.setdefault("failed", f.failed)
        return Action(kind, memory, **data)


def decide(view: ClusterView, memory: Memory, cfg: DecideConfig, now: float) -> Action:
    """The next step for the leader, given the deployment ``view`` read at monotonic
    time ``now`` and the ``memory`` of the previous pass. Pure: the returned action
    holds the next memory. Raises :class:`~elastic_ep.errors.ElasticEPError` where the
    core cannot build a placement or plan (the loop reports it and tries again)."""
    ps = _Pass(view, cfg, now, _flight(view))
    f = ps.flight
    if f is not None and f.pending:
        return _wait_for(ps, memory, f.pending, Kind.WAIT_ACKS)
    # A dead participant that is not a new member (a draining source) takes nothing
    # with it: every new member finished, so the plan commits.
    if f is not None and not f.failed and not set(f.dead) & set(f.plan.new_members):
        return _commit(ps, memory)
    base = _base(view, f)
    if base is not None:
        return _reconcile(ps, base, memory)
    if f is not None:
        # Some live participant failed its part: it fences itself and registers again,
        # after which it counts as dead and the next plan refills its slots.
        return _wait_for(ps, memory, f.failed, Kind.WAIT_FAILED)
    return _bootstrap(ps, memory)


def _flight(view: ClusterView) -> _Flight | None:
    p = view.plan
    if p is None or not view.in_flight:
        return None
    participants = p.participants()
    live = [m for m in participants if view.is_live(m)]
    return _Flight(
        p,
        pending=tuple(m for m in live if m not in view.acks),
        dead=tuple(m for m in participants if m not in live),
        failed=tuple(m for m in live if m in view.acks and not view.acks[m].succeeded),
    )


def _base(view: ClusterView, flight: _Flight | None) -> _Base | None:
    if flight is not None:
        if flight.pending or flight.failed:
            return None
        p = flight.plan
        return _Base(p.epoch, list(p.new_members), p.placement, p.mirrors)
    c = view.committed
    return None if c is None else _Base(c.epoch, list(c.members), c.placement, c.mirrors)


def _wait_for(ps: _Pass, memory: Memory, members: tuple[str, ...], kind: Kind) -> Action:
    """``kind`` while the plan in flight waits on ``members`` (live participants);
    ACK_TIMEOUT with their leases once it waited ``ack_timeout_s``: a participant that
    stays silent, or failed and does not register again, is fenced by the controller."""
    assert ps.flight is not None
    epoch = ps.flight.plan.epoch
    # A plan this controller did not send (it took over mid-flight) is timed from now.
    started = memory.sent.get(epoch, ps.now)
    if epoch not in memory.sent:
        memory = replace(memory, sent={**memory.sent, epoch: started})
    if ps.now - started <= ps.cfg.ack_timeout_s:
        return ps.act(kind, memory, ranks=members) if kind is Kind.WAIT_ACKS else ps.act(kind, memory)
    leases = tuple(ps.view.leases[r] for r in map(member_id, members) if r in ps.view.leases)
    return ps.act(Kind.ACK_TIMEOUT, memory, ranks=members, leases=leases,
                  reason=f"no ack within {ps.cfg.ack_timeout_s:g} s" if kind is Kind.WAIT_ACKS
                  else f"failed and not registered again within {ps.cfg.ack_timeout_s:g} s")


def _commit(ps: _Pass, memory: Memory) -> Action:
    assert ps.flight is not None
    p = ps.flight.plan
    phases = {**memory.phases.get(p.epoch, {}), "transfer": ps.now - memory.sent.get(p.epoch, ps.now)}
    memory = replace(
        memory, last_rebalance=ps.now,
        sent={e: t for e, t in memory.sent.items() if e != p.epoch},
        phases={e: ph for e, ph in memory.phases.items() if e != p.epoch},
    )
    return ps.act(Kind.COMMIT, memory, record=p, phases=phases)


def _settle(memory: Memory, signature: Signature, now: float, settle_s: float) -> tuple[bool, Memory]:
    """(settled, next memory): settled once the same ``signature`` has been seen for
    ``settle_s``, so that failures arriving together go into one plan."""
    if memory.seen is None or memory.seen[0] != signature:
        return settle_s <= 0, replace(memory, seen=(signature, now))
    return now - memory.seen[1] >= settle_s, memory


def _load(view: ClusterView, model: ModelShape) -> np.ndarray:
    """``[num_layers, num_logical]`` summed over the windows of registered ranks (ones
    while none reported any, so that policies spread experts evenly). A window of a
    rank that is not registered (gone, or never there) is not counted."""
    shape = (model.num_layers, model.num_logical)
    total = np.zeros(shape)
    for ld in (ld for rid, ld in view.read_loads().items() if rid in view.ranks):
        arr = np.asarray(ld.load, dtype=np.float64)
        if arr.shape == shape:  # a rank of another model shape: not ours to count
            total += arr
    return total if total.sum() > 0 else np.ones(shape)


def _by_registration(view: ClusterView, ids: Iterable[str], most: int) -> tuple[str, ...]:
    """The first ``most`` of rank ``ids`` in registration order (ties by id), sorted by id."""
    return tuple(sorted(sorted(ids, key=lambda r: (view.registered.get(r, 0), r))[:most]))


def _bootstrap(ps: _Pass, memory: Memory) -> Action:
    view, cfg, ms = ps.view, ps.cfg, ps.cfg.model
    ready = _by_registration(view, (rid for rid, r in view.ranks.items() if r.state != "draining"),
                             max(cfg.min_ranks, cfg.max_joiners_per_plan))
    waiting = ps.act(Kind.WAIT_BOOTSTRAP, memory, ranks=ready, reason=f"{len(ready)}/{cfg.min_ranks} ranks")
    if len(ready) < cfg.min_ranks:
        return waiting
    settled, memory = _settle(memory, ("boot", ready), ps.now, cfg.settle_s)
    if not settled:
        return replace(waiting, memory=memory)
    members = [view.ranks[r].token for r in ready]
    node_of, load = [view.ranks[r].node for r in ready], _load(view, ms)
    placement = initial_placement(ms.num_layers, ms.num_logical, len(members), ms.slots_per_rank)
    if len(members) > 1:
        # Spread over nodes from the start: the first recovery then moves no more for it.
        placement = get_policy("deepseek").rebalance(placement, RankMapping.build(len(members)), load,
                                                     node_of=node_of)
    mirrors = _assign(view, members, placement, node_of, load, None)
    rec = PlanRecord(view.epoch + 1, cfg.leader, [], members, None, placement, "bootstrap", mirrors=mirrors)
    return ps.act(Kind.BOOTSTRAP, replace(memory, phases={}), epoch=rec.epoch, record=rec, reason=rec.reason)


def _change(view: ClusterView, base: _Base, max_joiners: int) -> _Change:
    members = base.members
    dead = tuple(i for i, m in enumerate(members) if not view.is_live(m))
    leaving = tuple(i for i, m in enumerate(members)
                    if i not in dead and view.ranks[member_id(m)].state == "draining")
    # A rank that registered again is a new incarnation: it joins, its old member is dead.
    joining = (r.id for r in view.ranks.values() if r.state == "joining" and r.token not in members)
    return _Change(dead, leaving, _by_registration(view, joining, max_joiners))


def _reconcile(ps: _Pass, base: _Base, memory: Memory) -> Action:
    change = _change(ps.view, base, ps.cfg.max_joiners_per_plan)
    if change:
        if memory.detected_at is None:
            memory = replace(memory, detected_at=ps.now)
        dead = {base.members[i] for i in change.dead}
        confirmed = bool(dead) and dead <= memory.confirmed and not change.leaving and not change.joining
        settled, memory = _settle(memory, change.signature, ps.now,
                                  ps.cfg.confirm_settle_s if confirmed else ps.cfg.settle_s)
        reason = change.describe(base.members)
        # A plan in flight that lost a participant is replaced at once: waiting would
        # only delay the ranks already waiting on it.
        if not settled and ps.flight is None:
            return ps.act(Kind.SETTLING, memory, reason=reason)
        return _replan(ps, base, change, memory, reason)
    if ps.flight is not None:
        return ps.act(Kind.WAIT_IN_FLIGHT, memory)
    imbalance = _imbalance(ps, base, memory)
    if imbalance is None:
        return ps.act(Kind.STEADY, replace(memory, seen=None, shortage=None))
    return _replan(ps, base, change, memory, f"load imbalance {imbalance:.3f} < {ps.cfg.imbalance_threshold}")


def _imbalance(ps: _Pass, base: _Base, memory: Memory) -> float | None:
    """The balance of the base placement when it is below the threshold and the
    cooldown since the last rebalance has passed; None otherwise."""
    cfg = ps.cfg
    if cfg.imbalance_threshold <= 0 or ps.now - memory.last_rebalance <= cfg.rebalance_cooldown_s:
        return None
    b = balance(base.placement, _load(ps.view, cfg.model))
    return b if b < cfg.imbalance_threshold else None


def _replan(ps: _Pass, base: _Base, change: _Change, memory: Memory, reason: str) -> Action:
    """The plan from ``base`` to its members after ``change`` (none: a rebalance)."""
    view, ms = ps.view, ps.cfg.model
    members = base.members
    mapping = RankMapping.build(len(members), dead=change.dead, leaving=change.leaving,
                                num_joining=len(change.joining))
    if mapping.new_ep_size * ms.slots_per_rank < ms.num_logical:
        return _too_few(ps, mapping.new_ep_size, memory)
    nodes = ([view.ranks[member_id(m)].node if member_id(m) in view.ranks else "" for m in members]
             + [view.ranks[r].node for r in change.joining])
    # Summed once over every rank's window: the policy and the mirrors both weigh by it.
    load, new_nodes = _load(view, ms), _new_nodes(mapping, nodes)
    new = ps.cfg.policy.rebalance(base.placement, mapping, load, nodes=_node_count(mapping, nodes),
                                  node_of=new_nodes)
    plan = build_plan(base.placement, new, mapping, ms.expert_bytes, epoch=view.epoch + 1, nodes=nodes,
                      mirrors=ready_mirrors(view, base.members))
    if not change and not plan.transfers:
        return ps.act(Kind.BALANCED, replace(memory, last_rebalance=ps.now), reason=reason)
    new_members = ([members[o] for o in mapping.new_to_old()[: mapping.num_surviving]]
                   + [view.ranks[r].token for r in change.joining])
    previous = base.mirrors.renumbered(mapping.old_to_new) if base.mirrors is not None else None
    mirrors = _assign(view, new_members, new, new_nodes, load, previous)
    rec = PlanRecord(view.epoch + 1, ps.cfg.leader, list(members), new_members, plan, new, reason, mirrors=mirrors)
    detect = ps.now - memory.detected_at if memory.detected_at is not None else 0.0
    memory = replace(memory, seen=None, shortage=None, detected_at=None, phases={rec.epoch: {"detect": detect}},
                     confirmed=frozenset())
    return ps.act(Kind.PUBLISH, memory, epoch=rec.epoch, record=rec, reason=reason)


def _assign(view: ClusterView, members: list[str], placement: ExpertPlacement, node_of: list[str],
            load: np.ndarray, previous: MirrorAssignment | None) -> MirrorAssignment | None:
    """The mirrors the ranks of ``placement`` (``members[r]``: rank ``r``'s token) keep,
    each within the rows its registration offers, by ``load`` ``[L, E]``; None when none
    offers any."""
    most = placement.num_layers * placement.num_logical
    capacity = [min(view.ranks[member_id(m)].mirror_rows, most) if member_id(m) in view.ranks else 0
                for m in members]
    if not any(capacity):
        return None
    return assign_mirrors(placement, node_of, capacity, load, previous)


def _new_nodes(mapping: RankMapping, nodes: list[str]) -> list[str]:
    """The node label of each new rank (``nodes``: one per old rank, then one per
    joining rank; ``""`` unknown): the policy spreads replicas over them."""
    return [nodes[o] for o in mapping.new_to_old()[: mapping.num_surviving]] + nodes[mapping.old_ep_size:]


def _node_count(mapping: RankMapping, nodes: list[str]) -> int | None:
    """Distinct non-empty node labels of the new ranks (``nodes`` as for
    :func:`_new_nodes`), or None when none has a label (the policy then keeps its
    configured count)."""
    return len(set(_new_nodes(mapping, nodes)) - {""}) or None


def _too_few(ps: _Pass, ranks: int, memory: Memory) -> Action:
    ms = ps.cfg.model
    return ps.act(Kind.TOO_FEW_RANKS, replace(memory, shortage=ranks), report=memory.shortage != ranks,
                  reason=f"{ranks} ranks x {ms.slots_per_rank} slots cannot hold {ms.num_logical} experts; "
                         "waiting for ranks to join")
