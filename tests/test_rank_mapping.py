import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from elastic_ep.errors import RankMappingError
from elastic_ep.core.placement import ExpertPlacement, initial_placement
from elastic_ep.core.rank_mapping import RankMapping


def test_build_failure_leave_and_join():
    m = RankMapping.build(6, dead=[1], leaving=[4], num_joining=2)
    assert m.old_to_new == (0, -1, 1, 2, -1, 3)
    assert m.new_ep_size == 6 and m.num_surviving == 4
    assert m.new_to_old() == [0, 2, 3, 5, -1, -1]
    assert m.live_sources == frozenset({0, 2, 3, 4, 5})  # leaving rank 4 still sends
    assert not m.is_identity() and RankMapping.build(3).is_identity()


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 12).flatmap(lambda n: st.tuples(
    st.just(n), st.lists(st.integers(0, n - 1), unique=True, max_size=n - 1), st.integers(0, 3))))
def test_build_is_dense_and_ordered(args):
    n, removed, joining = args
    m = RankMapping.build(n, dead=removed[::2], leaving=removed[1::2], num_joining=joining)
    survivors = [r for r in range(n) if r not in removed]
    assert [m.old_to_new[r] for r in survivors] == list(range(len(survivors)))
    assert all(m.old_to_new[r] == -1 for r in removed)
    assert m.new_ep_size == len(survivors) + joining
    assert RankMapping.from_dict(m.to_dict()) == m


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(old_to_new=(0, 2, 1)), "not dense and ordered"),
        (dict(old_to_new=(1, -1, 0), dead=frozenset({1})), "not dense and ordered"),
        (dict(old_to_new=(0, -1, 1)), r"removed ranks \[1\] must be exactly dead"),
        (dict(old_to_new=(0, -2)), "map below -1"),
        (dict(old_to_new=(-1,), dead=frozenset({0})), "no rank"),
        (dict(old_to_new=(0, -1), dead=frozenset({1}), leaving=frozenset({1})), "both dead and leaving"),
    ],
)
def test_invalid_mappings_are_refused(kwargs, match):
    with pytest.raises(RankMappingError, match=match):
        RankMapping(**kwargs)


def test_build_rejects_unknown_ranks():
    with pytest.raises(RankMappingError, match=r"dead ranks \[7\] are outside 0..3"):
        RankMapping.build(4, dead=[7])


def test_carry_over_moves_surviving_rows():
    p = ExpertPlacement(np.array([[0, 1, 2, 3, 4, 5]]), 2, 6)
    m = RankMapping.build(3, dead=[1], num_joining=1)
    assert m.carry_over(p).tolist() == [[0, 1, 4, 5, -1, -1]]
    with pytest.raises(RankMappingError, match="mapping is for 3 ranks"):
        m.carry_over(initial_placement(1, 4, 2, 2))


def test_malformed_record():
    with pytest.raises(RankMappingError, match="malformed"):
        RankMapping.from_dict({"dead": [1]})
