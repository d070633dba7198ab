"""Small Hugging Face model directories of each MoE family, written by ``transformers``
(``from_config`` + ``save_pretrained``), with the variants released checkpoints ship:
DeepSeek-V3's FP8 block-scaled experts and its MTP layer, gpt-oss's MXFP4 experts.

Every parameter gets seeded random values before saving (initialisers leave biases
at zero, and experts that are all alike would hide a slot filled with the wrong one).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file

SMALL = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
             intermediate_size=96)
EXPERTS = 8
FP8_MAX = 448.0
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


@dataclass(frozen=True)
class Variant:
    """One model directory to write: ``family`` with ``fp8`` block-scaled experts
    (DeepSeek-V3 style, block ``fp8_block``), ``mxfp4`` experts (gpt-oss) or an ``mtp``
    layer appended (DeepSeek-V3's layer ``num_hidden_layers``)."""

    family: str
    fp8: bool = False
    mxfp4: bool = False
    mtp: bool = False
    fp8_block: int = 32

    @property
    def id(self) -> str:
        return self.family + ("-fp8" if self.fp8 else "") + ("-mxfp4" if self.mxfp4 else "") + ("-mtp" if self.mtp else "")


def _config(family: str):  # noqa: ANN202 - a transformers config
    import transformers as T

    mla = dict(q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
    if family == "deepseek_v3":
        return T.DeepseekV3Config(**SMALL, **mla, moe_intermediate_size=32, n_routed_experts=EXPERTS, n_shared_experts=1,
                                  first_k_dense_replace=1, num_experts_per_tok=2, n_group=2, topk_group=1)
    if family == "deepseek_v2":
        return T.DeepseekV2Config(**SMALL, **mla, moe_intermediate_size=32, n_routed_experts=EXPERTS,
                                  n_shared_experts=1, first_k_dense_replace=1, num_experts_per_tok=2)
    if family == "qwen2_moe":
        return T.Qwen2MoeConfig(**SMALL, moe_intermediate_size=32, num_experts=EXPERTS,
                                shared_expert_intermediate_size=48, decoder_sparse_step=1, mlp_only_layers=[0])
    if family == "qwen3_moe":
        return T.Qwen3MoeConfig(**SMALL, moe_intermediate_size=32, num_experts=EXPERTS, decoder_sparse_step=2,
                                mlp_only_layers=[])
    if family == "mixtral":
        return T.MixtralConfig(**SMALL, num_local_experts=EXPERTS)
    if family == "gpt_oss":
        return T.GptOssConfig(**SMALL, num_local_experts=EXPERTS, head_dim=16)
    if family == "llama4":
        return T.Llama4TextConfig(**SMALL, intermediate_size_mlp=96, num_local_experts=EXPERTS,
                                  interleave_moe_layer_step=2, head_dim=16)
    raise ValueError(family)


def write_model(directory: str, v: Variant, seed: int = 0, shard_bytes: int = 150_000) -> str:
    """Write ``v`` into ``directory`` (bf16 weights) and return it."""
    import transformers as T

    cfg = _config(v.family)
    torch.manual_seed(seed)
    model = T.Llama4ForCausalLM(cfg) if v.family == "llama4" else T.AutoModelForCausalLM.from_config(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model = model.to(torch.bfloat16)
    model.save_pretrained(directory, max_shard_size=f"{shard_bytes // 1000}KB")
    if v.fp8 or v.mxfp4 or v.mtp:
        _rewrite(directory, v, shard_bytes)
    return directory


# -- variants ------------------------------------------------------------------------------
def fp8_block_quantize(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[rows, cols]`` -> (float8_e4m3fn weight, float32 ``weight_scale_inv``
    ``[ceil(rows / block), ceil(cols / block)]``) with ``w ~= weight * scale_inv`` per block."""
    rows, cols = w.shape
    br, bc = math.ceil(rows / block), math.ceil(cols / block)
    padded = torch.zeros(br * block, bc * block, dtype=torch.float32)
    padded[:rows, :cols] = w.float()
    blocks = padded.view(br, block, bc, block)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX
    q = (blocks / scale[:, None, :, None]).view(br * block, bc * block)[:rows, :cols]
    return q.to(torch.float8_e4m3fn), scale.float()


def mxfp4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[..., n]`` (``n % 32 == 0``) -> (uint8 blocks ``[..., n / 32, 16]``, two e2m1
    codes per byte, low nibble first; uint8 e8m0 scales ``[..., n / 32]``)."""
    x = w.float().reshape(*w.shape[:-1], -1, 32)
    amax = x.abs().amax(dim=-1).clamp(min=2.0**-126)
    exp = torch.floor(torch.log2(amax)) - 2  # e2m1's largest value is 6 = 1.5 * 2**2
    y = x / torch.exp2(exp)[..., None]
    idx = (y.abs()[..., None] - E2M1).abs().argmin(dim=-1)
    code = (idx | ((y < 0).long() << 3)).to(torch.uint8)
    packed = code[..., 0::2] | (code[..., 1::2] << 4)
    return packed.contiguous(), (exp + 127).clamp(0, 255).to(torch.uint8)


def _rewrite(directory: str, v: Variant, shard_bytes: int) -> None:
    with open(os.path.join(directory, "config.json")) as f:
        cfg = json.load(f)
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(directory, name)))
            os.remove(os.path.join(directory, name))
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        os.remove(index)
    if v.mtp:
        n = cfg["num_hidden_layers"]
        last = f"model.layers.{n - 1}."
        for name in [k for k in tensors if k.startswith(last)]:
            tensors[f"model.layers.{n}." + name[len(last):]] = tensors[name].clone()
        h = cfg["hidden_size"]
        for extra, shape in (("eh_proj.weight", (h, 2 * h)), ("enorm.weight", (h,)), ("hnorm.weight", (h,)),
                             ("shared_head.norm.weight", (h,))):
            tensors[f"model.layers.{n}.{extra}"] = torch.ones(shape, dtype=torch.bfloat16)
        cfg["num_nextn_predict_layers"] = 1
    if v.fp8:
        for name in [k for k in tensors if ".experts." in k and k.endswith("_proj.weight")]:
            q, s = fp8_block_quantize(tensors[name], v.fp8_block)
            tensors[name] = q
            tensors[name.replace(".weight", ".weight_scale_inv")] = s
        cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [v.fp8_block, v.fp8_block]}
    if v.mxfp4:
        for name in [k for k in tensors if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
            # gpt-oss stores [experts, out, in / 32, 16]: the transposed weight, blocked on its input dim.
            blocks, scales = mxfp4_quantize(tensors.pop(name).transpose(1, 2))
            tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
        cfg["quantization_config"] = {"quant_method": "mxfp4",
                                      "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                                 "model.embed_tokens", "lm_head"]}
    _save_sharded(directory, tensors, shard_bytes)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def _save_sharded(directory: str, tensors: dict[str, torch.Tensor], shard_bytes: int) -> None:
    """Hugging Face's layout: ``model-0000i-of-0000n.safetensors`` filled in name order up
    to ``shard_bytes`` each, and the index."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors, key=_layer_order):
        t = tensors[name].contiguous()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(directory, fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def _layer_order(name: str) -> tuple[int, str]:
    parts = name.split(".")
    if len(parts) > 2 and parts[1] == "layers" and parts[2].isdigit():
        return int(parts[2]), name
    return -1, name
