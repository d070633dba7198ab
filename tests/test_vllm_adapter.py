"""The vLLM adapter: layouts from vLLM-shaped tensors, the maps rewritten in place, and a
placement committed through a real etcd and controller reaching an engine's maps and
weights (bit-exact against the checkpoint), with the example engine as a second rank."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import pytest
import torch

from elastic_ep.runtime.agent import AgentConfig
from elastic_ep.errors import ConfigError, PlanError
from elastic_ep.core.placement import ExpertPlacement, initial_placement
from elastic_ep.core.plan import build_plan
from elastic_ep.tools.polling import wait_for
from elastic_ep.core.rank_mapping import RankMapping
from elastic_ep.runtime.slots import disk_reference, fill_rank_slots, mismatched_slots, model_reference
from elastic_ep.runtime.vllm_adapter import AdapterState, VllmExpertAdapter, infer_layout
from loaders.checkpoint.safetensors_source import SafetensorsExpertSource
from loaders.checkpoint.synthetic import SyntheticSpec, expected_row, make_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BF16 = SyntheticSpec(layers=2, experts=8, hidden=64, intermediate=32, dtype="bf16", seed=5)
FP8 = SyntheticSpec(layers=2, experts=8, hidden=64, intermediate=32, dtype="fp8", seed=6)
SLOTS = 6


def vllm_weights(spec: SyntheticSpec, slots: int, flat: bool = False) -> list[list[torch.Tensor]]:
    """What vLLM's FusedMoE holds per layer: w13 [S, 2I, H], w2 [S, H, I] (+ FP8 block
    scales), or flattened [S, -1] as get_expert_weights() hands them out."""
    H, I, dt = spec.hidden, spec.intermediate, spec.torch_dtype
    shapes = [((slots, 2 * I, H), dt), ((slots, H, I), dt)]
    if spec.dtype == "fp8":
        b = spec.scale_block
        shapes += [((slots, 2 * -(-I // b), -(-H // b)), torch.float32), ((slots, -(-H // b), -(-I // b)), torch.float32)]
    out = [[torch.zeros(shape, dtype=d) for shape, d in shapes] for _ in range(spec.layers)]
    return [[t.view(slots, -1) for t in layer] for layer in out] if flat else out


def assert_bit_exact(spec, adapter, placement, rank):
    for layer in range(placement.num_layers):
        for slot, e in enumerate(placement.rank_slots(rank)[layer]):
            want = expected_row(spec, adapter.layout, layer, int(e))
            for w, t in zip(adapter.weights[layer], adapter.layout.tensors):
                assert torch.equal(w[slot].view(torch.uint8), want[t.name].view(torch.uint8)), (layer, slot, int(e))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    out = {}
    for spec in (BF16, FP8):
        d = tmp_path_factory.mktemp(spec.dtype)
        make_checkpoint(d, spec)
        out[spec.dtype] = str(d)
    return out


# -- layouts ------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [BF16, FP8], ids=["bf16", "fp8"])
def test_layout_from_vllm_tensors(spec):
    assert infer_layout(vllm_weights(spec, SLOTS)[0]) == spec.layout()
    flat = vllm_weights(spec, SLOTS, flat=True)[0]
    with pytest.raises(ConfigError, match="hidden= and intermediate="):
        infer_layout(flat)
    assert infer_layout(flat, hidden=spec.hidden, intermediate=spec.intermediate) == spec.layout()


def test_engine_tensors_that_do_not_fit_are_config_errors():
    w = vllm_weights(BF16, SLOTS)
    bad_dtype = [[w[0][0].float(), w[0][1]]]
    with pytest.raises(ConfigError, match="w13_weight.*expected torch.bfloat16"):
        VllmExpertAdapter(bad_dtype, torch.zeros(1, 12, dtype=torch.int64), layout=BF16.layout())
    with pytest.raises(ConfigError, match="different slots_per_rank"):
        VllmExpertAdapter(w + vllm_weights(BF16, SLOTS + 1)[:1], torch.zeros(3, 12, dtype=torch.int64))
    with pytest.raises(ConfigError, match="contiguous"):
        VllmExpertAdapter([[w[0][0].transpose(1, 2), w[0][1]]], torch.zeros(1, 12, dtype=torch.int64),
                          layout=BF16.layout())
    with pytest.raises(ConfigError, match="MoE layers"):
        VllmExpertAdapter(w, torch.zeros(3, 12, dtype=torch.int64))
    with pytest.raises(ConfigError, match="3 expert tensors"):
        infer_layout(w[0] + w[0][:1])


# -- bootstrap and maps -----------------------------------------------------------------------
def test_bootstrap_fills_flattened_fp8_slots_and_rewrites_maps_in_place(ckpts):
    weights = vllm_weights(FP8, SLOTS, flat=True)
    p2l = torch.full((2, 2 * SLOTS), -1, dtype=torch.int64)
    l2p = torch.full((2, 8, 2), -1, dtype=torch.int64)  # narrower than the placement's 5
    cnt = torch.zeros(2, 8, dtype=torch.int64)
    ptrs = [t.data_ptr() for t in (p2l, l2p, cnt)]
    a = VllmExpertAdapter(weights, p2l, logical_to_physical_map=l2p, logical_replica_count=cnt,
                          hidden=FP8.hidden, intermediate=FP8.intermediate)
    disk = SafetensorsExpertSource(ckpts["fp8"], FP8.naming, a.layout)
    placement = initial_placement(2, 8, 2, SLOTS)
    with a.step() as ok:
        assert not ok and a.state is AdapterState.EMPTY
    assert a.load_initial(disk, placement, 1) == SLOTS * 2 * FP8.expert_bytes
    assert a.state is AdapterState.SERVING and a.rank == 1
    assert_bit_exact(FP8, a, placement, 1)
    assert a.mismatched_slots(disk, placement, 1) == 0
    assert [t.data_ptr() for t in (p2l, l2p, cnt)] == ptrs, "maps keep their storage"
    assert np.array_equal(p2l.numpy(), placement.phy2log)
    assert np.array_equal(l2p.numpy(), placement.log2phy[:, :, :2])
    assert np.array_equal(cnt.numpy(), np.minimum(placement.logcnt, 2)), "counts match the listed replicas"
    weights[1][0][3].view(torch.uint8)[0] ^= 1  # one flipped bit in layer 1, slot 3
    assert a.mismatched_slots(disk, placement, 1) == 1


def test_slot_checks_against_disk_and_model_find_the_same_flipped_bit(ckpts):
    """One fill and one check for every rank kind: engine tensors in layout order here,
    the synthetic rank's named tensors elsewhere; both references see one flipped bit."""
    layout = FP8.layout()
    weights = vllm_weights(FP8, SLOTS)
    disk = SafetensorsExpertSource(ckpts["fp8"], FP8.naming, layout)
    placement = initial_placement(2, 8, 2, SLOTS)
    assert fill_rank_slots(disk, placement, 1, weights) == SLOTS * 2 * FP8.expert_bytes
    refs = {"disk": disk_reference(disk), "model": model_reference(FP8, layout)}
    assert all(mismatched_slots(layout, placement, 1, weights, r) == [] for r in refs.values())
    weights[0][2][4].view(torch.uint8).view(-1)[7] ^= 0x10  # a scale of layer 0, slot 4
    e = int(placement.rank_slots(1)[0, 4])
    assert {k: mismatched_slots(layout, placement, 1, weights, r) for k, r in refs.items()} == {
        "disk": [(0, 4, e)], "model": [(0, 4, e)]}


def test_bootstrap_reads_only_slots_the_engine_does_not_hold(ckpts):
    placement = initial_placement(2, 8, 2, SLOTS)
    warm = VllmExpertAdapter(vllm_weights(BF16, SLOTS), torch.zeros(2, 2 * SLOTS, dtype=torch.int64))
    disk = SafetensorsExpertSource(ckpts["bf16"], BF16.naming, warm.layout)
    warm.load_initial(disk, placement, 0)
    # An engine started with rank 0's experts loaded (its map says so), given rank 0 again:
    # nothing to read. Given a placement that moves two slots: two reads.
    again = VllmExpertAdapter(warm.weights, torch.tensor(placement.phy2log), ep_rank=0)
    assert again.load_initial(disk, placement, 0) == 0
    phy = placement.phy2log.copy()
    phy[0, [0, 1]] = phy[0, [1, 0]]
    moved = ExpertPlacement(phy, SLOTS, 8)
    assert again.load_initial(disk, moved, 0) == 2 * BF16.expert_bytes
    assert_bit_exact(BF16, again, moved, 0)


def test_maps_resized_in_place_when_ranks_join():
    p2l = torch.zeros(2, 2 * SLOTS, dtype=torch.int64)
    l2p = torch.zeros(2, 8, 5, dtype=torch.int64)
    seen = []
    a = VllmExpertAdapter(vllm_weights(BF16, SLOTS), p2l, logical_to_physical_map=l2p,
                          on_maps_resized=lambda maps: seen.append({k: tuple(v.shape) for k, v in maps.items()}))
    three = initial_placement(2, 8, 3, SLOTS)
    a.write_maps(three)
    assert a.maps["physical_to_logical_map"] is p2l and tuple(p2l.shape) == (2, 3 * SLOTS)
    assert np.array_equal(p2l.numpy(), three.phy2log) and np.array_equal(l2p.numpy(), three.log2phy[:, :, :5])
    assert seen == [{"physical_to_logical_map": (2, 18), "logical_to_physical_map": (2, 8, 5)}]


def test_failed_plan_leaves_weights_unknown_and_steps_refused(ckpts):
    a = VllmExpertAdapter(vllm_weights(BF16, SLOTS), torch.zeros(2, 2 * SLOTS, dtype=torch.int64))
    disk = SafetensorsExpertSource(ckpts["bf16"], BF16.naming, a.layout)
    old = initial_placement(2, 8, 2, SLOTS)
    a.load_initial(disk, old, 0)
    ex = a.executor(None, disk)
    wrong = build_plan(old, old, RankMapping.build(2), expert_bytes=1, epoch=1)
    with pytest.raises(PlanError, match="expert_bytes"):
        ex.execute(wrong, 0)
    assert a.state is AdapterState.UNKNOWN
    with a.step() as ok:
        assert not ok


def test_physical_load_becomes_a_logical_window(ckpts):
    a = VllmExpertAdapter(vllm_weights(BF16, SLOTS), torch.zeros(2, 2 * SLOTS, dtype=torch.int64))
    a.record_physical_load(np.ones((2, 12)))  # before any placement: nothing to attribute
    placement = initial_placement(2, 8, 2, SLOTS)  # slots 8..11 hold experts 0..3 again
    a.load_initial(SafetensorsExpertSource(ckpts["bf16"], BF16.naming, a.layout), placement, 0)
    a.record_physical_load(torch.ones(2, 12, dtype=torch.int64))
    a.record_physical_load(np.ones((2, 12)))
    window = a.load_window()
    assert window.shape == (2, 8) and window[0].tolist() == [4, 4, 4, 4, 2, 2, 2, 2]
    assert a.load_window().sum() == 0
    with pytest.raises(ConfigError, match="do not match"):
        a.record_physical_load(np.ones((2, 11)))


# -- through etcd and the controller ----------------------------------------------------------------
def _wait(pred, timeout: float, what: str):
    v = wait_for(pred, timeout, 0.02)
    assert v, f"timed out after {timeout} s waiting for {what}"
    return v


@contextmanager
def _two_engines(ckpt: str, log_path: str) -> Iterator[dict]:
    """A controller in a thread, the example engine as a process (``engine-b``), and an
    engine in this process through the adapter (``engine-a``), all on a fresh etcd."""
    from controller.controller import Controller, ControllerConfig, ModelShape
    from controller.etcd_client import EtcdConfig, connect
    from elastic_ep.tools.entrypoint import agent_settings_from_env
    from elastic_ep.tools.etcd_server import EtcdServer

    spec = BF16
    with EtcdServer() as srv, open(log_path, "w") as log:
        base_env = {"ELASTIC_EP_ETCD_ENDPOINT": srv.endpoint, "ELASTIC_EP_DEPLOYMENT": "vllm",
                    "ELASTIC_EP_CHECKPOINT": ckpt}
        ctl = Controller(ControllerConfig(
            EtcdConfig(srv.endpoint, deployment="vllm", timeout_s=2.0),
            ModelShape(spec.layers, spec.experts, SLOTS, spec.expert_bytes), id="ctl", min_ranks=2,
            settle_s=0.2, leader_ttl_s=2, imbalance_threshold=0.99, rebalance_cooldown_s=0.0))
        stop = threading.Event()
        t_ctl = threading.Thread(target=ctl.run, args=(stop,), daemon=True)
        t_ctl.start()
        other = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "examples", "vllm_style_engine.py"), "--slots", str(SLOTS),
             "--ep-size", "2", "--verify", "--step-interval", "0.2", "--drain-timeout", "0.5"],
            env={**os.environ, **base_env, "ELASTIC_EP_ID": "engine-b"}, stdout=log, stderr=subprocess.STDOUT)
        p2l = torch.full((spec.layers, 2 * SLOTS), -1, dtype=torch.int64)
        adapter = VllmExpertAdapter(vllm_weights(spec, SLOTS), p2l)
        agent = adapter.agent(agent_settings_from_env({**base_env, "ELASTIC_EP_ID": "engine-a"}, lease_ttl_s=2),
                              verify=True, source_timeout_s=5.0, dead_after_s=1.5, heartbeat_s=0.2)
        t_agent = threading.Thread(target=agent.run, args=(stop,), daemon=True)
        t_agent.start()
        try:
            yield {"ctl": ctl, "adapter": adapter, "p2l": p2l, "root": "/elastic-ep/vllm",
                   "client": connect(EtcdConfig(srv.endpoint, deployment="vllm"))}
        finally:
            stop.set()
            agent.stop()
            other.terminate()
            t_ctl.join(10)
            t_agent.join(10)
            agent.executor.transport.close()
            try:
                other.wait(30)
            except subprocess.TimeoutExpired:
                other.kill()
                other.wait(5)


@pytest.mark.skipif(shutil.which("etcd") is None, reason="needs an etcd binary")
def test_committed_placement_rewrites_an_engines_maps_in_place(ckpts, tmp_path):
    """Two ranks: an engine in this process through the adapter, and the example engine
    as a process configured by the environment. Bootstrap, then a load-driven rebalance
    that keeps the rank count: the engine's maps keep their storage, say the committed
    placement, and every slot is bit-exact."""
    from controller import plan_chunks
    from controller.records import AckRecord, CommitRecord, PlanRecord

    spec = BF16
    with _two_engines(ckpts["bf16"], str(tmp_path / "engine.log")) as e:
        adapter, p2l, client, root = e["adapter"], e["p2l"], e["client"], e["root"]
        ptr = p2l.data_ptr()

        def committed():
            v, _ = client.get(f"{root}/committed")
            return None if v is None else CommitRecord.parse("committed", v)

        t0 = time.monotonic()
        c1 = _wait(committed, 60, "bootstrap commit")
        print(f"bootstrap committed after {time.monotonic() - t0:.1f} s")
        assert len(c1.members) == 2
        with adapter.step() as ok:
            assert ok and p2l.data_ptr() == ptr
            assert np.array_equal(p2l.numpy(), c1.placement.phy2log)
            assert_bit_exact(spec, adapter, c1.placement, adapter.rank)
        # This rank routes every token to its first slot's expert: the controller rebalances.
        load = np.zeros((spec.layers, 2 * SLOTS))
        load[:, adapter.rank * SLOTS] = 1e6
        adapter.record_physical_load(load)

        def rebalance_published():
            v, _ = client.get(f"{root}/plan")
            p = PlanRecord.parse("plan", v)
            return plan_chunks.load_plan(client, root, p) if p.epoch > c1.epoch else None

        p2 = _wait(rebalance_published, 30, "a rebalance plan")
        print(f"rebalance published after {time.monotonic() - t0:.1f} s")
        e["ctl"].cfg.rebalance_cooldown_s = 3600.0  # one rebalance is what this test looks at
        assert "imbalance" in p2.reason and p2.plan.mapping.is_identity and p2.plan.transfers
        c2 = _wait(lambda: (c := committed()) and c.epoch == p2.epoch and c, 30, "rebalance commit")
        print(f"rebalance committed after {time.monotonic() - t0:.1f} s")
        assert c2.members == c1.members and not np.array_equal(c2.placement.phy2log, c1.placement.phy2log)
        with adapter.step() as ok:
            assert ok and p2l.data_ptr() == ptr, "the map was rewritten in place"
            assert np.array_equal(p2l.numpy(), c2.placement.phy2log) and adapter.placement == c2.placement
            assert_bit_exact(spec, adapter, c2.placement, adapter.rank)
        acks = [AckRecord.parse(m.key.decode(), v) for v, m in client.get_prefix(f"{root}/acks/")]
        acks = {a.id.split("#")[0]: a for a in acks if a.epoch == c2.epoch}
        assert set(acks) == {"engine-a", "engine-b"}
        assert all(a.ok and a.mismatched == 0 for a in acks.values()), acks
    print((tmp_path / "engine.log").read_text()[-2000:])


def test_agent_reads_the_model_directory_and_refuses_another_models_layout(ckpts, tmp_path):
    """With no naming scheme the adapter reads the checkpoint as a model directory; an
    engine whose slots do not have that model's expert layout is refused by name."""
    from controller.etcd_client import EtcdConfig
    from elastic_ep.tools.entrypoint import AgentSettings

    settings = AgentSettings(AgentConfig(EtcdConfig("127.0.0.1:1"), "engine-x"), checkpoint=ckpts["bf16"])
    other = SyntheticSpec(layers=2, experts=8, hidden=64, intermediate=48, dtype="bf16")
    a = VllmExpertAdapter(vllm_weights(other, SLOTS), torch.zeros(2, 2 * SLOTS, dtype=torch.int64))
    with pytest.raises(ConfigError, match=r"its experts are .*this engine's slots .*serve the model"):
        a.agent(settings)


@pytest.mark.skipif(shutil.which("etcd") is None, reason="needs an etcd binary")
def test_a_fenced_rank_stops_the_engines_steps_until_it_is_refilled(ckpts):
    """The adapter's agent fenced (its lease lost): the engine's steps are refused at
    once, the weights count as unknown, and re-registering does not serve them again."""
    from controller.etcd_client import EtcdConfig, connect
    from controller.records import PlanRecord
    from elastic_ep.runtime.wiring import AgentSettings
    from elastic_ep.tools.etcd_server import EtcdServer

    with EtcdServer() as srv:
        cfg = EtcdConfig(srv.endpoint, deployment="fence", timeout_s=2.0)
        client = connect(cfg)
        adapter = VllmExpertAdapter(vllm_weights(BF16, SLOTS), torch.zeros(2, 2 * SLOTS, dtype=torch.int64))
        agent = adapter.agent(AgentSettings(AgentConfig(cfg, "engine-a", lease_ttl_s=2), checkpoint=ckpts["bf16"]),
                              scheme=BF16.naming)
        try:
            agent.register()
            # The leader's publish: epoch and plan in one transaction (engine-a is rank 0 of 2).
            rec = PlanRecord(1, "ctl", [], [agent.token, "engine-b#0"], None, initial_placement(2, 8, 2, SLOTS))
            tx = client.transactions
            client.put(f"{cfg.root}/leader", "ctl")
            client.transaction(compare=[], success=[tx.put(f"{cfg.root}/epoch", "1"),
                                                    tx.put(f"{cfg.root}/plan", rec.to_json())], failure=[])
            assert agent.poll_once() == "acked"
            with adapter.step() as ok:
                assert ok and adapter.rank == 0
            agent.fenced.set()  # what the lease thread raises when the lease is lost
            with adapter.step() as ok:
                assert not ok, "a fenced rank's engine must not step"
            assert agent.poll_once() == "re-registered"
            assert adapter.state is AdapterState.UNKNOWN and (adapter.held == -1).all()
            with adapter.step() as ok:
                assert not ok, "registering again does not make the old weights servable"
        finally:
            agent.stop()
            agent.executor.transport.close()
            client.close()


def test_a_plans_layer_switch_rewrites_only_that_layers_router_rows(ckpts):
    from elastic_ep.runtime.serving import ServingMap

    p2l = torch.full((2, 2 * SLOTS), -1, dtype=torch.int64)
    l2p = torch.full((2, 8, 5), -1, dtype=torch.int64)
    cnt = torch.zeros(2, 8, dtype=torch.int64)
    a = VllmExpertAdapter(vllm_weights(BF16, SLOTS), p2l, logical_to_physical_map=l2p, logical_replica_count=cnt)
    placement = initial_placement(2, 8, 2, SLOTS)
    a.load_initial(SafetensorsExpertSource(ckpts["bf16"], BF16.naming, a.layout), placement, 0)
    ptrs = [t.data_ptr() for t in (p2l, l2p, cnt)]
    m = ServingMap.of(placement, 0)
    m.phy2log[1, :SLOTS] = -1  # layer 1 of rank 0 in transition: none of its slots routed to
    a.on_serving(m, [1])
    assert [t.data_ptr() for t in (p2l, l2p, cnt)] == ptrs, "rows rewritten in place"
    assert np.array_equal(l2p[0].numpy(), placement.log2phy[0]), "layer 0 untouched"
    layer1 = ExpertPlacement(m.phy2log[[1]], SLOTS, 8)
    assert np.array_equal(l2p[1].numpy(), layer1.log2phy[0, :, :5])
    assert np.array_equal(cnt[1].numpy(), layer1.logcnt[0]) and cnt[1].sum() == SLOTS
    left = set(m.phy2log[1][m.phy2log[1] >= 0].tolist())
    assert a.unavailable == [[], sorted(set(range(8)) - left)] and np.array_equal(p2l.numpy(), placement.phy2log)
