"""Hugging Face model directories of every supported family, written by transformers:
what ``elastic-ep inspect`` reports, bit-exact loads into the serving layout, bytes
read, typed errors for bad directories, and one recovery per family through real
rank processes (and the whole demo on two of them)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file

pytest.importorskip("transformers", reason="the model-directory tests write checkpoints with transformers "
                                           "(pip install -e '.[dev]')")

from elastic_ep.tools.cli import main  # noqa: E402
from elastic_ep.errors import CheckpointError, ConfigError, CorruptCheckpointError, MissingFileError  # noqa: E402
from elastic_ep.errors import MissingTensorError  # noqa: E402
from elastic_ep.errors import TensorMismatchError, UnsupportedModelError  # noqa: E402
from elastic_ep.runtime.executor import Participants  # noqa: E402
from elastic_ep.tools.synthetic_rank import RankJob, scenario  # noqa: E402
from loaders.checkpoint.hf_model import open_model  # noqa: E402
from loaders.layout import moe_layout  # noqa: E402
from loaders.checkpoint.safetensors_source import ExpertRequest, SafetensorsExpertSource  # noqa: E402
from tests.hf_models import EXPERTS, Variant, write_model  # noqa: E402
from tests.procs import check_exact, run_jobs  # noqa: E402

VARIANTS = [
    Variant("deepseek_v3"), Variant("deepseek_v3", fp8=True, mtp=True), Variant("deepseek_v2"),
    Variant("qwen2_moe"), Variant("qwen3_moe"), Variant("qwen3_moe", fp8=True), Variant("mixtral"),
    Variant("gpt_oss"), Variant("gpt_oss", mxfp4=True), Variant("llama4"),
]
BY_ID = {v.id: v for v in VARIANTS}

# family -> (MoE layer numbers, pieces of the "left out" entries); 4 layers each.
EXPECTED = {
    "deepseek_v3": ([1, 2, 3], ["layer 0", "layer 4", "mlp.shared_experts"]),
    "deepseek_v2": ([1, 2, 3], ["layer 0", "mlp.shared_experts"]),
    "qwen2_moe": ([1, 2, 3], ["layer 0", "mlp.shared_expert.*", "mlp.shared_expert_gate"]),
    "qwen3_moe": ([1, 3], ["layers 0, 2"]),
    "mixtral": ([0, 1, 2, 3], []),
    "gpt_oss": ([0, 1, 2, 3], []),
    "llama4": ([1, 3], ["layers 0, 2", "feed_forward.shared_expert"]),
}
FAMILY = {"llama4": "llama4_text"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Variant id -> its model directory, written on first use."""
    root = tmp_path_factory.mktemp("models")
    made: dict[str, str] = {}

    def get(vid: str) -> str:
        if vid not in made:
            made[vid] = write_model(str(root / vid), BY_ID[vid], seed=len(made) + 1)
        return made[vid]

    return get


def _copy(models, vid: str, tmp_path) -> str:
    d = str(tmp_path / vid)
    shutil.copytree(models(vid), d)
    return d


def _inspect(capsys, *args: str) -> dict:
    assert main(["inspect", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _expert_files_bytes(directory: str, prefix: str, stacked: bool) -> int:
    """Bytes of expert 0 as the files hold them, found by name prefix with the
    safetensors library: every tensor under the expert (scales, biases), nothing else."""
    with open(os.path.join(directory, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    total = 0
    for name, shard in weight_map.items():
        if not name.startswith(prefix) or (stacked and "." in name[len(prefix):]):
            continue
        with safe_open(os.path.join(directory, shard), "pt") as f:
            t = f.get_slice(name)[0] if stacked else f.get_tensor(name)
        total += t.numel() * t.element_size()
    return total


# -- inspect -------------------------------------------------------------------------------
@pytest.mark.parametrize("vid", list(BY_ID))
def test_inspect_reports_layers_experts_and_expert_bytes(vid, models, capsys):
    v = BY_ID[vid]
    d = models(vid)
    r = _inspect(capsys, d)
    moe, left = EXPECTED[v.family]
    assert r["family"] == FAMILY.get(v.family, v.family)
    assert r["moe_layers"] == moe and r["num_experts"] == EXPERTS
    stacked = v.family in ("gpt_oss", "llama4")
    module = {"mixtral": "block_sparse_moe.experts", "llama4": "feed_forward.experts"}.get(v.family, "mlp.experts")
    prefix = f"model.layers.{moe[0]}.{module}." + ("" if stacked else "0.")
    assert r["expert_bytes"] == _expert_files_bytes(d, prefix, stacked) > 0
    assert r["expert_bytes"] == sum(t["bytes"] for t in r["expert_tensors"])
    text = json.dumps(r["left_out"])
    for piece in left:
        assert piece in text, (piece, r["left_out"])
    assert len(r["left_out"]) == len(left)
    assert r["tensors_checked"] > 0
    if v.fp8:
        assert r["quantization"].startswith("fp8") and "32x32" in r["quantization"]
        assert {t["name"] for t in r["serving_layout"]} == {
            "w13_weight", "w2_weight", "w13_weight_scale_inv", "w2_weight_scale_inv"}
        dtypes = {t["name"]: t["dtype"] for t in r["serving_layout"]}
        assert dtypes["w13_weight"] == "F8_E4M3" and dtypes["w13_weight_scale_inv"] == "F32"
    elif v.mxfp4:
        assert r["quantization"] == "mxfp4"
        assert {t["name"] for t in r["serving_layout"]} == {
            "gate_up_proj_blocks", "gate_up_proj_scales", "gate_up_proj_bias",
            "down_proj_blocks", "down_proj_scales", "down_proj_bias"}
    else:
        assert r["quantization"] == "none (BF16)"


def test_mtp_layer_holds_experts_but_is_left_out(models):
    d = models("deepseek_v3-fp8-mtp")
    with open(os.path.join(d, "model.safetensors.index.json")) as f:
        names = json.load(f)["weight_map"]
    assert "model.layers.4.mlp.experts.0.gate_proj.weight" in names  # the files hold it ...
    m = open_model(d)
    assert 4 not in m.moe_layer_ids and m.moe_layer_ids == (1, 2, 3)  # ... the placement does not


def test_inspect_text_output(models):
    d = models("deepseek_v3-fp8-mtp")
    out = subprocess.run([sys.executable, "-m", "elastic_ep.tools.cli", "inspect", d], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    for piece in ("family deepseek_v3", "fp8 e4m3, block 32x32", "MoE layers: 3 (model layers 1-3)",
                  "weight_scale_inv", "multi-token prediction", "shared expert"):
        assert piece in out.stdout, (piece, out.stdout)


# -- loads ----------------------------------------------------------------------------------
@pytest.mark.parametrize("vid", list(BY_ID))
def test_every_expert_loads_bit_exact_into_the_serving_layout(vid, models):
    d = models(vid)
    m = open_model(d)
    layout = m.layout()
    weights = [layout.allocate(EXPERTS, fill_byte=0xA5) for _ in range(m.layers)]
    slot_of = {e: (3 * e + 1) % EXPERTS for e in range(EXPERTS)}  # a permutation, so no slot is its expert
    src = m.source()
    for layer in range(m.layers):
        rep = src.load([ExpertRequest(layer, e, slot_of[e]) for e in range(EXPERTS)], weights)
        assert rep.bytes_read == EXPERTS * m.expert_bytes
    # The reference reads each checkpoint tensor with the safetensors library and puts
    # it where vLLM's layout says: w13 = gate rows then up rows; stacked slices as stored.
    files = json.load(open(os.path.join(d, "model.safetensors.index.json")))["weight_map"]

    def ckpt(name: str, expert: int | None = None) -> torch.Tensor:
        with safe_open(os.path.join(d, files[name]), "pt") as f:
            return f.get_slice(name)[expert] if expert is not None else f.get_tensor(name)

    for layer, ckpt_layer in enumerate(m.moe_layer_ids):
        for e in range(EXPERTS):
            w = {n: t[slot_of[e]] for n, t in weights[layer].items()}
            if m.naming.stacked:
                module = "feed_forward.experts" if v_family(vid) == "llama4" else "mlp.experts"
                for n, row in w.items():
                    assert torch.equal(row.view(torch.uint8), ckpt(f"model.layers.{ckpt_layer}.{module}.{n}", e)
                                       .contiguous().view(torch.uint8)), (layer, e, n)
                continue
            proj = {"mixtral": ("block_sparse_moe.experts", "w1", "w3", "w2")}.get(
                v_family(vid), ("mlp.experts", "gate_proj", "up_proj", "down_proj"))
            base = f"model.layers.{ckpt_layer}.{proj[0]}.{e}"
            for param in ("weight", "weight_scale_inv") if BY_ID[vid].fp8 else ("weight",):
                gate, up, down = (ckpt(f"{base}.{p}.{param}") for p in proj[1:])
                w13, w2 = w[f"w13_{param}"], w[f"w2_{param}"]
                rows = gate.shape[0]
                assert torch.equal(w13[:rows].view(torch.uint8), gate.view(torch.uint8)), (layer, e, param)
                assert torch.equal(w13[rows:].view(torch.uint8), up.view(torch.uint8)), (layer, e, param)
                assert torch.equal(w2.view(torch.uint8), down.view(torch.uint8)), (layer, e, param)


def v_family(vid: str) -> str:
    return BY_ID[vid].family


@pytest.mark.parametrize("vid", ["gpt_oss", "llama4", "gpt_oss-mxfp4"])
def test_stacked_experts_are_read_by_slice(vid, models):
    """One expert of a stacked layout costs its own bytes, not the stacked tensors'."""
    m = open_model(models(vid))
    layout = m.layout()
    weights = [layout.allocate(1, fill_byte=0) for _ in range(m.layers)]
    rep = m.source().load([ExpertRequest(m.layers - 1, EXPERTS - 1, 0)], weights)
    assert rep.bytes_read == m.expert_bytes
    stacked_bytes = EXPERTS * m.expert_bytes
    assert rep.bytes_read * EXPERTS == stacked_bytes
    want = m.expected_row(m.layers - 1, EXPERTS - 1)
    for n, t in weights[-1].items():
        assert torch.equal(t[0].view(torch.uint8), want[n].contiguous().view(torch.uint8)), n


# -- bad directories ------------------------------------------------------------------------
def test_no_config_json(models, tmp_path):
    d = _copy(models, "mixtral", tmp_path)
    os.remove(os.path.join(d, "config.json"))
    with pytest.raises(MissingFileError, match=r"config\.json.*copy the model's config\.json"):
        open_model(d)
    assert main(["inspect", d]) == 2


def test_config_not_json(models, tmp_path):
    d = _copy(models, "mixtral", tmp_path)
    with open(os.path.join(d, "config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(CheckpointError, match="not a JSON config"):
        open_model(d)


@pytest.mark.parametrize("raw,text", [
    (b'{"num_hidden_layers": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", "nested deeper"),
    (b'{"n": ' + b"7" * 5000 + b"}", "digits"),
    (b"\x00\xff garbage", "not a JSON config"),
])
def test_config_nested_deep_or_garbage(models, tmp_path, raw, text):
    d = _copy(models, "mixtral", tmp_path)
    with open(os.path.join(d, "config.json"), "wb") as f:
        f.write(raw)
    with pytest.raises(CorruptCheckpointError, match=text) as e:
        open_model(d)
    assert os.path.join(d, "config.json") in str(e.value) and "copy it again" in str(e.value)


def test_config_values_of_the_wrong_type(models, tmp_path):
    d = _copy(models, "mixtral", tmp_path)
    _edit_json(d, "config.json", lambda c: c.update(model_type=["mixtral"], architectures={"a": 1}))
    with pytest.raises(UnsupportedModelError, match="'\\?'"):
        open_model(d)
    _edit_json(d, "config.json", lambda c: c.update(model_type="mixtral", num_hidden_layers=10**15))
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        open_model(d)


def _edit_json(d: str, name: str, edit) -> None:
    """Rewrite ``d/name`` (config.json, the index) with ``edit(doc)`` applied."""
    p = os.path.join(d, name)
    with open(p) as f:
        doc = json.load(f)
    edit(doc)
    with open(p, "w") as f:
        json.dump(doc, f)


def _retype(d: str, model_type: str) -> None:
    _edit_json(d, "config.json", lambda c: c.update(model_type=model_type, architectures=["AcmeMoeForCausalLM"]))


def test_unknown_architecture_needs_a_template(models, tmp_path, capsys):
    d = _copy(models, "deepseek_v3-fp8-mtp", tmp_path)
    _retype(d, "acme_moe")
    with pytest.raises(UnsupportedModelError, match=r"'AcmeMoeForCausalLM'.*naming template"):
        open_model(d)
    # With a template, MoE layers and the expert count come from the files (below
    # num_hidden_layers: the MTP layer stays out); quantization still from the config.
    tpl = {r: f"model.layers.{{layer}}.mlp.experts.{{expert}}.{r}_proj" for r in ("gate", "up", "down")}
    r = _inspect(capsys, d, *[f"--template={k}={v}" for k, v in tpl.items()])
    known = open_model(models("deepseek_v3-fp8-mtp"))
    assert r["family"] == "template" and r["moe_layers"] == [1, 2, 3] and r["num_experts"] == EXPERTS
    assert r["expert_bytes"] == known.expert_bytes
    with pytest.raises(ConfigError, match="no template for roles"):
        open_model(d, templates={"gate": tpl["gate"]})


def test_index_naming_a_missing_shard(models, tmp_path):
    d = _copy(models, "qwen3_moe", tmp_path)
    files = json.load(open(os.path.join(d, "model.safetensors.index.json")))["weight_map"]
    shard = files["model.layers.3.mlp.experts.5.down_proj.weight"]
    os.remove(os.path.join(d, shard))
    with pytest.raises(MissingFileError, match=rf"{shard}: shard not found, named by .*index\.json"):
        open_model(d)


def test_moe_layer_missing_an_expert(models, tmp_path):
    d = _copy(models, "deepseek_v2", tmp_path)

    def drop_expert(idx: dict) -> None:
        gone = [k for k in idx["weight_map"] if k.startswith("model.layers.2.mlp.experts.5.")]
        assert gone
        for k in gone:
            del idx["weight_map"][k]

    _edit_json(d, "model.safetensors.index.json", drop_expert)
    with pytest.raises(MissingTensorError, match=r"MoE layer 2 has no .*expert 5 of 8 is missing"):
        open_model(d)


def _rewrite_tensor(d: str, name: str, make) -> None:
    files = json.load(open(os.path.join(d, "model.safetensors.index.json")))["weight_map"]
    path = os.path.join(d, files[name])
    tensors = load_file(path)
    tensors[name] = make(tensors[name])
    save_file(tensors, path, metadata={"format": "pt"})


def test_experts_whose_shapes_disagree(models, tmp_path):
    d = _copy(models, "mixtral", tmp_path)
    name = "model.layers.2.block_sparse_moe.experts.3.w2.weight"
    _rewrite_tensor(d, name, lambda t: t[:, :-8].contiguous())
    with pytest.raises(TensorMismatchError, match=r"w2\.weight' \(layer 2, expert 3\) is BF16 \[64, 88\].*must agree"):
        open_model(d)


def test_experts_whose_dtypes_disagree(models, tmp_path):
    d = _copy(models, "deepseek_v3-fp8-mtp", tmp_path)
    name = "model.layers.3.mlp.experts.6.up_proj.weight_scale_inv"
    _rewrite_tensor(d, name, lambda t: t.to(torch.bfloat16))
    with pytest.raises(TensorMismatchError, match=r"expert 6\) is BF16"):
        open_model(d)


def test_stacked_tensor_with_fewer_experts_than_the_config(models, tmp_path):
    d = _copy(models, "gpt_oss", tmp_path)
    _edit_json(d, "config.json", lambda c: c.update(num_local_experts=16))
    with pytest.raises(TensorMismatchError, match=r"expected \[16, \.\.\.\]"):
        open_model(d)


def test_block_size_that_does_not_match_the_scales(models, tmp_path):
    d = _copy(models, "qwen3_moe-fp8", tmp_path)
    _edit_json(d, "config.json", lambda c: c["quantization_config"].update(weight_block_size=[128, 128]))
    with pytest.raises(TensorMismatchError, match="weight_block_size"):
        open_model(d)


def test_source_refuses_a_scheme_without_the_layouts_roles(models):
    m = open_model(models("gpt_oss"))
    with pytest.raises(ConfigError, match=r"no template for the layout's roles \['experts'\]"):
        SafetensorsExpertSource(m.directory, "deepseek", m.layout(), m.moe_layer_ids)
    with pytest.raises(ConfigError, match="no template for the layout's roles"):
        SafetensorsExpertSource(m.directory, m.naming, moe_layout(64, 32), m.moe_layer_ids)


# -- recovery through real rank processes -------------------------------------------------
@pytest.fixture
def store():
    s = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    yield s
    del s


def _recover(m, backend: str, store, rng) -> None:
    """A rank of four dies; three processes load their slots from the model directory,
    move experts from peers and disk, and check every slot against the checkpoint."""
    for _ in range(20):  # a change that leaves some expert with no live replica, so disk is used too
        plan = scenario(rng, "fail", processes=3, layers=m.layers, experts=m.experts, slots_per_rank=3,
                        expert_bytes=m.expert_bytes)
        if any(plan.missing):
            break
    plan.validate()
    base = dict(transport=backend, store_host="127.0.0.1", store_port=store.port, ckpt_dir=m.directory, spec=m,
                plan_json=plan.to_json())
    out = run_jobs([RankJob(old_rank=r, **base) for r in Participants.of(plan.mapping).old], store, timeout=120)
    check_exact(plan, out)
    planned = plan.bytes_by_route()
    moved = {route: sum(r["report"]["bytes"][route] for r in out.values()) for route in planned}
    assert moved == planned
    assert moved["disk"] >= sum(len(x) for x in plan.missing) * m.expert_bytes > 0


@pytest.mark.parametrize("vid", list(BY_ID))
def test_recovery_bit_exact_per_family(vid, models, store, rng):
    _recover(open_model(models(vid)), "torch", store, rng)


@pytest.mark.parametrize("backend", ["nixl", "mooncake"])
@pytest.mark.parametrize("vid", ["deepseek_v3-fp8-mtp", "gpt_oss-mxfp4"])
def test_mixed_dtype_experts_through_one_sided_transports(vid, backend, models, store, rng):
    pytest.importorskip({"nixl": "nixl", "mooncake": "mooncake.engine"}[backend])
    _recover(open_model(models(vid)), backend, store, rng)


@pytest.mark.parametrize("vid", ["deepseek_v3-fp8-mtp", "gpt_oss-mxfp4"])
def test_demo_on_a_model_directory(vid, models):
    if shutil.which("etcd") is None:
        pytest.skip("etcd is not installed (apt-get install etcd-server)")
    d = models(vid)
    m = open_model(d)
    out = subprocess.run([sys.executable, "-m", "elastic_ep.tools.cli", "demo", "--model", d, "--json", "--seed", "3"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    r = json.loads(out.stdout)
    assert r["ok"], [c for c in r["checks"] if not c["ok"]]
    assert r["model"]["family"] == m.family and r["model"]["expert_bytes"] == m.expert_bytes
    disk_experts = sum(len(es) for es in r["disk_experts"].values())
    assert disk_experts > 0 and r["bytes"]["disk"] == disk_experts * m.expert_bytes
    exact = [c for c in r["checks"] if "bit-exact" in c["name"]]
    assert exact and all(c["ok"] for c in exact)


def test_controller_takes_the_placement_shape_from_the_model(models):
    import argparse

    from elastic_ep.tools.cli import model_shape, parse_templates

    m = open_model(models("gpt_oss-mxfp4"))
    shape = model_shape(argparse.Namespace(model=m.directory, template=None, slots=5, layers=None, experts=None,
                                           expert_bytes=None))
    assert (shape.num_layers, shape.num_logical, shape.slots_per_rank, shape.expert_bytes) == (
        m.layers, m.experts, 5, m.expert_bytes)
    with pytest.raises(ConfigError, match="--model MODEL_DIR, or all of"):
        model_shape(argparse.Namespace(model=None, template=None, slots=5, layers=4, experts=None, expert_bytes=None))
    with pytest.raises(ConfigError, match="ROLE=MODULE_PATH"):
        parse_templates(["gate"])


def test_multimodal_llama4_checkpoint_nests_the_language_model(models, tmp_path):
    """Released Llama 4 checkpoints wrap the text config in ``text_config`` and keep the
    decoder under ``language_model.model.layers``: the same experts are found there."""
    from tests.hf_models import _save_sharded

    src = models("llama4")
    d = tmp_path / "llama4-mm"
    d.mkdir()
    tensors = {}
    for name in sorted(os.listdir(src)):
        if name.endswith(".safetensors"):
            tensors.update({f"language_model.{k}": t for k, t in load_file(os.path.join(src, name)).items()})
    _save_sharded(str(d), tensors, 150_000)
    text = json.load(open(os.path.join(src, "config.json")))
    json.dump({"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4", "text_config": text},
              open(d / "config.json", "w"))
    m, flat = open_model(d), open_model(src)
    assert m.moe_layer_ids == flat.moe_layer_ids == (1, 3) and m.expert_layout == flat.expert_layout
    assert m.naming.tensor_name(1, 0, "experts", "gate_up_proj") == "language_model.model.layers.1.feed_forward.experts.gate_up_proj"
    weights = [m.layout().allocate(1, fill_byte=0) for _ in range(m.layers)]
    m.source().load([ExpertRequest(1, 5, 0)], weights)
    want = flat.expected_row(1, 5)
    assert all(torch.equal(weights[1][n][0].view(torch.uint8), want[n].contiguous().view(torch.uint8)) for n in want)
