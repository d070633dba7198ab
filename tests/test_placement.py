import numpy as np
import pytest
from hypothesis import given, settings

from elastic_ep.errors import PlacementError
from elastic_ep.core.placement import ExpertPlacement, balance, initial_placement, rank_loads

from strategies import placements


def test_initial_placement_deepseek_v3():
    p = initial_placement(58, 256, 32, 9)
    p.validate()
    assert p.phy2log.shape == (58, 288)
    assert p.rank_slots(0)[0].tolist() == list(range(9))
    assert p.rank_slots(31)[0].tolist() == list(range(23, 32))  # slots 279..287
    assert p.phy2log[0, 256:].tolist() == list(range(32))
    assert p.logcnt[0, :32].tolist() == [2] * 32 and p.logcnt[0, 32:].tolist() == [1] * 224
    assert p.log2phy.shape == (58, 256, 33)
    assert p.log2phy[0, 5, :3].tolist() == [5, 261, -1]


def test_vllm_docstring_example():
    p = ExpertPlacement(np.array([[0, 1, 2, 3, 0, 1], [0, 2, 0, 1, 0, 3]]), 3, 4)
    p.validate()
    assert p.ep_size == 2 and p.num_redundant == 2
    assert p.logcnt.tolist() == [[2, 2, 1, 1], [3, 1, 1, 1]]
    assert p.log2phy[1, 0].tolist() == [0, 2, 4]
    assert p.log2phy[0, 3].tolist() == [3, -1, -1]


@settings(max_examples=60, deadline=None)
@given(placements())
def test_derived_maps_agree_with_phy2log(p: ExpertPlacement):
    for layer in range(p.num_layers):
        for e in range(p.num_logical):
            slots = np.flatnonzero(p.phy2log[layer] == e).tolist()
            assert p.logcnt[layer, e] == len(slots)
            got = p.log2phy[layer, e]
            assert got[: len(slots)].tolist() == slots
            assert (got[len(slots):] == -1).all()


def test_validate_names_layer_of_missing_expert():
    phy = np.array([[0, 1, 2, 3], [0, 1, 1, 3]])
    with pytest.raises(PlacementError, match=r"layer 1: logical experts \[2\] have no replica"):
        ExpertPlacement(phy, 2, 4).validate()


def test_validate_rejects_out_of_range_ids():
    with pytest.raises(PlacementError, match=r"layer 0: slot 3 holds logical expert 7"):
        ExpertPlacement(np.array([[0, 1, 2, 7]]), 2, 4).validate()
    with pytest.raises(PlacementError, match="slot 1 holds logical expert -1"):
        ExpertPlacement(np.array([[0, -1, 2, 3]]), 2, 4).validate()


def test_wrong_slot_count_is_rejected():
    with pytest.raises(PlacementError, match="not a multiple of slots_per_rank=2"):
        ExpertPlacement(np.array([[0, 1, 2]]), 2, 3)
    with pytest.raises(PlacementError, match="must hold integers"):
        ExpertPlacement(np.array([[0.0, 1.0]]), 1, 2)
    with pytest.raises(PlacementError, match="cannot hold"):
        initial_placement(1, 10, 2, 3)


def test_round_trip_and_malformed_record():
    p = initial_placement(2, 6, 2, 4)
    assert ExpertPlacement.from_dict(p.to_dict()) == p
    with pytest.raises(PlacementError, match="malformed"):
        ExpertPlacement.from_dict({"phy2log": [[0, 1]]})


def test_rank_loads_split_load_over_replicas():
    p = ExpertPlacement(np.array([[0, 1, 0, 2]]), 2, 3)
    load = np.array([[10.0, 4.0, 6.0]])
    assert rank_loads(p, load).tolist() == [[9.0, 11.0]]
    assert balance(p, load) == pytest.approx(10.0 / 11.0)
