import json
import os

import pytest
import torch
from safetensors import safe_open

from elastic_ep.tools.cli import main
from elastic_ep.errors import ConfigError
from loaders.checkpoint.naming import get_scheme
from loaders.checkpoint.safetensors_format import INDEX_SUFFIX, read_header
from loaders.checkpoint.synthetic import SyntheticSpec, expected_row, expert_tensors, make_checkpoint

TEMPLATES = {
    "gate": "blocks.{layer}.moe.experts.{expert}.wi_0",
    "up": "blocks.{layer}.moe.experts.{expert}.wi_1",
    "down": "blocks.{layer}.moe.experts.{expert}.wo",
}


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def read_all(directory: str) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, through the safetensors library."""
    out = {}
    for f in sorted(os.listdir(directory)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(directory, f), "pt") as st:
                for name in st.keys():
                    assert name not in out, f"{name} written twice"
                    out[name] = st.get_tensor(name)
    return out


@pytest.mark.parametrize("dtype,shards", [("bf16", 1), ("fp32", 2), ("fp16", 3), ("fp8", 4)])
def test_header_parser_matches_safe_open(tmp_path, dtype, shards):
    spec = SyntheticSpec(layers=2, experts=4, hidden=32, intermediate=16, dtype=dtype, shards=shards,
                         dense_layers=1, scale_block=8)
    summary = make_checkpoint(tmp_path, spec)
    assert len(summary.files) == shards
    seen = 0
    for path, size in summary.files:
        fd = os.open(path, os.O_RDONLY)
        try:
            header = read_header(fd, path)
            assert header.file_size == size
            with safe_open(path, "pt") as st:
                assert sorted(header.names()) == sorted(st.keys())
                for name in st.keys():
                    ref = st.get_tensor(name)
                    info = header.tensor(name)
                    assert info.dtype == ref.dtype and info.shape == tuple(ref.shape)
                    assert torch.equal(torch.frombuffer(bytearray(os.pread(fd, info.nbytes, info.begin)), dtype=torch.uint8),
                                       as_bytes(ref))
                    seen += 1
        finally:
            os.close(fd)
    assert seen == summary.tensors


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_files_hold_exactly_what_the_generator_regenerates(tmp_path, dtype):
    spec = SyntheticSpec(layers=3, experts=5, hidden=32, intermediate=24, dtype=dtype, shards=2, dense_layers=2,
                         scale_block=16)
    make_checkpoint(tmp_path, spec)
    stored = read_all(str(tmp_path))
    expert_names = set()
    for layer in range(spec.layers):
        for expert in range(spec.experts):
            want = expert_tensors(spec, layer, expert)
            assert len(want) == (6 if dtype == "fp8" else 3)
            for name, t in want.items():
                assert torch.equal(as_bytes(stored[name]), as_bytes(t)), name
            expert_names |= set(want)
    assert {int(n.split(".")[2]) for n in expert_names} == set(spec.moe_layer_ids) == {2, 3, 4}
    others = set(stored) - expert_names
    # Realistic neighbours: routers of MoE layers, dense MLPs, attention, embedding.
    assert "model.layers.2.mlp.gate.weight" in others and "model.layers.1.mlp.gate_proj.weight" in others
    assert "model.layers.0.self_attn.o_proj.weight" in others and "model.embed_tokens.weight" in others
    assert "model.layers.0.mlp.gate.weight" not in others  # layer 0 is dense
    assert stored["model.layers.2.mlp.gate.weight"].shape == (spec.experts, spec.hidden)


def test_deterministic_and_distinct(tmp_path):
    spec = SyntheticSpec(layers=2, experts=4, shards=2)
    a, b = make_checkpoint(tmp_path / "a", spec), make_checkpoint(tmp_path / "b", spec)
    for (pa, _), (pb, _) in zip(a.files, b.files):
        with open(pa, "rb") as fa, open(pb, "rb") as fb:
            assert fa.read() == fb.read()
    e0, e1 = expert_tensors(spec, 0, 0), expert_tensors(spec, 0, 1)
    gate = spec.naming.tensor_name(0, 0, "gate")
    assert not torch.equal(e0[gate], e1[spec.naming.tensor_name(0, 1, "gate")])
    assert not torch.equal(e0[gate], e0[spec.naming.tensor_name(0, 0, "up")])
    reseeded = expert_tensors(SyntheticSpec(layers=2, experts=4, seed=1), 0, 0)
    assert not torch.equal(e0[gate], reseeded[gate])
    assert e0[gate].float().std() > 0.01  # real values, not zeros


def test_values_do_not_depend_on_scheme_or_shards():
    a = SyntheticSpec(layers=2, experts=3, scheme="deepseek", shards=1)
    b = SyntheticSpec(layers=2, experts=3, scheme="mixtral", shards=3)
    for layer in range(2):
        for expert in range(3):
            ra, rb = expected_row(a, a.layout(), layer, expert), expected_row(b, b.layout(), layer, expert)
            assert all(torch.equal(ra[n], rb[n]) for n in ra)


def test_sharded_index_and_single_file(tmp_path):
    spec = SyntheticSpec(layers=3, experts=4, shards=3)
    summary = make_checkpoint(tmp_path / "sharded", spec)
    with open(tmp_path / "sharded" / ("model" + INDEX_SUFFIX)) as f:
        index = json.load(f)
    stored = read_all(str(tmp_path / "sharded"))
    assert set(index["weight_map"]) == set(stored) and len(stored) == summary.tensors
    assert index["metadata"]["total_size"] == summary.tensor_bytes == sum(t.nbytes for t in stored.values())
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    for name, shard in index["weight_map"].items():
        with safe_open(str(tmp_path / "sharded" / shard), "pt") as st:
            assert name in st.keys()
    single = make_checkpoint(tmp_path / "single", SyntheticSpec(layers=3, experts=4))
    assert [os.path.basename(p) for p, _ in single.files] == ["model.safetensors"]
    assert sorted(os.listdir(tmp_path / "single")) == ["config.json", "model.safetensors"]


def test_naming_schemes():
    ds = get_scheme("deepseek")
    assert ds.tensor_name(3, 17, "up") == "model.layers.3.mlp.experts.17.up_proj.weight"
    assert ds.tensor_name(3, 17, "down", "weight_scale_inv") == "model.layers.3.mlp.experts.17.down_proj.weight_scale_inv"
    assert get_scheme("qwen").tensor_name(0, 1, "gate") == "model.layers.0.mlp.experts.1.gate_proj.weight"
    mx = get_scheme("mixtral")
    assert [mx.tensor_name(1, 2, r) for r in ("gate", "up", "down")] == [
        f"model.layers.1.block_sparse_moe.experts.2.{w}.weight" for w in ("w1", "w3", "w2")
    ]
    assert mx.router_name(4) == "model.layers.4.block_sparse_moe.gate.weight"
    tp = get_scheme("template", TEMPLATES)
    assert tp.tensor_name(5, 6, "down") == "blocks.5.moe.experts.6.wo.weight" and tp.router_name(0) is None


@pytest.mark.parametrize("name,templates,text", [
    ("template", {**TEMPLATES, "up": "blocks.{layer}.wi_1"}, "expected exactly"),
    ("template", {"gate": TEMPLATES["gate"]}, "no template for roles"),
    ("template", {**TEMPLATES, "gate": "blocks.{layer}.{expert}.{bad"}, "malformed"),
    ("template", None, "no template for roles"),
    ("deepseek", TEMPLATES, "only for the 'template' scheme"),
    ("llama", None, "unknown naming scheme"),
])
def test_naming_scheme_errors(name, templates, text):
    with pytest.raises(ConfigError, match=text):
        get_scheme(name, templates)


def test_expected_row_fused_and_unfused():
    spec = SyntheticSpec(layers=1, experts=2, hidden=16, intermediate=8, scheme=get_scheme("template", TEMPLATES))
    parts = expert_tensors(spec, 0, 1)
    gate, up, down = (parts[spec.naming.tensor_name(0, 1, r)] for r in ("gate", "up", "down"))
    fused = expected_row(spec, spec.layout(fused=True), 0, 1)
    assert torch.equal(fused["w13_weight"], torch.cat([gate, up])) and torch.equal(fused["w2_weight"], down)
    unfused = expected_row(spec, spec.layout(fused=False), 0, 1)
    assert [torch.equal(unfused[n], t) for n, t in (("w1_weight", gate), ("w3_weight", up), ("w2_weight", down))] == [True] * 3
    with pytest.raises(ConfigError, match="outside"):
        expert_tensors(spec, 0, 2)


@pytest.mark.parametrize("kwargs,text", [
    ({"shards": 1000}, "exceeds"),
    ({"dtype": "int4"}, "unknown"),
    ({"experts": 0}, "positive"),
    ({"dense_layers": -1}, "dense_layers"),
])
def test_spec_errors(tmp_path, kwargs, text):
    with pytest.raises(ConfigError, match=text):
        make_checkpoint(tmp_path, SyntheticSpec(**{"layers": 1, "experts": 2, **kwargs}))


def test_cli_make_checkpoint(tmp_path, capsys):
    args = ["make-checkpoint", str(tmp_path / "ck"), "--layers", "2", "--experts", "4", "--hidden", "32",
            "--intermediate", "16", "--shards", "2", "--scheme", "mixtral", "--dense-layers", "1", "--dtype", "fp32"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "expert_bytes=6144" in out and "model-00002-of-00002.safetensors" in out
    stored = read_all(str(tmp_path / "ck"))
    spec = SyntheticSpec(layers=2, experts=4, hidden=32, intermediate=16, shards=2, scheme="mixtral",
                         dense_layers=1, dtype="fp32")
    for name, t in expert_tensors(spec, 1, 3).items():
        assert name.startswith("model.layers.2.block_sparse_moe.experts.3.") and torch.equal(stored[name], t)
    assert main(args) == 2  # refuses to write a second checkpoint beside the first
    assert "is not empty" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0  # or replaces it when told to


def test_make_checkpoint_leaves_other_files_alone(tmp_path):
    spec = SyntheticSpec(layers=1, experts=2, hidden=16, intermediate=8)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is not empty"):
        make_checkpoint(tmp_path, spec)
    assert os.listdir(tmp_path) == ["notes.txt"]
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.write_text("keep")
    os.symlink(outside, tmp_path / "config.json")
    with pytest.raises(ConfigError, match="symlink"):
        make_checkpoint(tmp_path, spec, force=True)
    os.remove(tmp_path / "config.json")
    make_checkpoint(tmp_path, spec, force=True)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors", "notes.txt"]
    assert outside.read_text() == "keep" and (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("scheme,dtype,dense,family", [
    ("deepseek", "fp8", 2, "deepseek_v3"), ("deepseek", "bf16", 0, "deepseek_v3"),
    ("qwen", "bf16", 1, "qwen3_moe"), ("mixtral", "fp16", 0, "mixtral"),
])
def test_synthetic_checkpoint_is_a_model_directory(tmp_path, scheme, dtype, dense, family):
    """The config.json written beside the shards makes the checkpoint readable as the
    family its scheme names, with exactly the spec's layers and serving layout."""
    from loaders.checkpoint.hf_model import open_model

    spec = SyntheticSpec(layers=3, experts=4, hidden=256, intermediate=192, dtype=dtype, shards=2, scheme=scheme,
                         dense_layers=dense)
    make_checkpoint(tmp_path, spec)
    m = open_model(tmp_path)
    assert m.family == family
    assert list(m.moe_layer_ids) == spec.moe_layer_ids and m.experts == spec.experts
    assert m.expert_layout == spec.layout()
    for layer, e in ((0, 0), (2, 3)):
        a, b = m.expected_row(layer, e), spec.expected_row(layer, e)
        assert all(torch.equal(as_bytes(a[k]), as_bytes(b[k])) for k in b)
