import pytest
import torch

from elastic_ep.errors import ConfigError
from loaders.layout import CheckpointPart, ExpertLayout, SlotTensor, moe_layout


def test_deepseek_v3_expert_bytes():
    bf16 = moe_layout(7168, 2048)
    assert bf16.expert_bytes == 88_080_384
    assert [(t.name, t.row_shape) for t in bf16.tensors] == [("w13_weight", (4096, 7168)), ("w2_weight", (7168, 2048))]
    fp8 = moe_layout(7168, 2048, torch.float8_e4m3fn, scale_block=128)
    weights = 3 * 2048 * 7168
    scales = 4 * (2 * 16 * 56 + 56 * 16)
    assert fp8.expert_bytes == weights + scales
    assert {t.name: t.dtype for t in fp8.tensors}["w13_weight_scale_inv"] == torch.float32


def test_spans_pack_parts_in_order():
    lay = moe_layout(8, 4, torch.float8_e4m3fn, fused=True, scale_block=3)
    spans = [(s.tensor, s.part.key, s.offset, s.nbytes) for s in lay.spans]
    # gate/up weights 4x8 = 32 B each, down 8x4 = 32 B; scales ceil(4/3) x ceil(8/3) = 2x3 f32 = 24 B.
    assert spans == [
        ("w13_weight", "gate.weight", 0, 32),
        ("w13_weight", "up.weight", 32, 32),
        ("w2_weight", "down.weight", 64, 32),
        ("w13_weight_scale_inv", "gate.weight_scale_inv", 96, 24),
        ("w13_weight_scale_inv", "up.weight_scale_inv", 120, 24),
        ("w2_weight_scale_inv", "down.weight_scale_inv", 144, 24),
    ]
    assert lay.offsets == (0, 64, 96, 144) and lay.expert_bytes == 168


@pytest.mark.parametrize("fused", [True, False])
def test_pack_unpack_roundtrip_mixed_dtypes(rng, fused):
    lay = moe_layout(16, 8, torch.float8_e4m3fn, fused=fused, scale_block=4)
    src = lay.allocate(3)
    for t in src.values():
        t.view(torch.uint8).copy_(torch.from_numpy(rng.integers(0, 256, t.view(torch.uint8).shape, dtype="uint8")))
    dst = lay.allocate(5, fill_byte=0)
    packed = lay.pack_slot(src, 2)
    assert packed.shape == (lay.expert_bytes,)
    lay.unpack_slot(packed, list(dst.values()), 4)  # positional, vLLM's list form
    for name in lay.names:
        assert torch.equal(dst[name][4].view(torch.uint8), src[name][2].view(torch.uint8))
        assert not dst[name][:4].view(torch.uint8).any()


def test_assemble_row_concatenates_on_dim0():
    lay = moe_layout(6, 4, torch.float32)
    parts = {"gate.weight": torch.zeros(4, 6), "up.weight": torch.ones(4, 6), "down.weight": torch.full((6, 4), 2.0)}
    row = lay.assemble_row(parts)
    assert row["w13_weight"].shape == (8, 6)
    assert row["w13_weight"][:4].eq(0).all() and row["w13_weight"][4:].eq(1).all()
    assert torch.equal(row["w2_weight"], parts["down.weight"])


def test_check_weights_names_the_problem():
    lay = moe_layout(6, 4)
    good = lay.allocate(2)
    assert lay.check_weights(good)[1] == 2
    cases = [
        ({"w13_weight": good["w13_weight"]}, "no serving tensor 'w2_weight'"),
        ({**good, "w2_weight": good["w2_weight"].float()}, "torch.float32"),
        ({**good, "w2_weight": torch.empty(3, 6, 4, dtype=torch.bfloat16)}, "3 slots"),
        ({**good, "w2_weight": torch.empty(2, 4, 6, dtype=torch.bfloat16).transpose(1, 2)}, "contiguous"),
        ([good["w13_weight"]], "1 tensors given"),
    ]
    for weights, text in cases:
        with pytest.raises(ConfigError, match=text):
            lay.check_weights(weights)


def test_bad_layouts_refused():
    with pytest.raises(ConfigError):
        SlotTensor("w", torch.float32, (CheckpointPart("gate", "weight", (2, 3)), CheckpointPart("up", "weight", (2, 4))))
    t = SlotTensor("w", torch.float32, (CheckpointPart("gate", "weight", (2, 3)),))
    with pytest.raises(ConfigError):
        ExpertLayout((t, t))
    with pytest.raises(ConfigError):
        moe_layout(0, 4)
