"""Deterministic synthetic MoE checkpoints, for tests, demos and benchmarks.

Every tensor's values are a function of ``(seed, checkpoint layer, expert, part)``
alone (a ``torch.Generator`` seeded from a BLAKE2 digest of those, never Python's
salted ``hash``), so a test regenerates the expected bytes of any one expert with
:func:`expert_tensors` / :func:`expected_row` instead of keeping a second copy. The
values do not depend on the naming scheme or the sharding: the same spec written as
``deepseek`` and as ``mixtral`` holds the same numbers under different names.

Layout on disk, as Hugging Face writes it: ``model.safetensors`` when ``shards == 1``,
else ``model-0000i-of-0000n.safetensors`` and ``model.safetensors.index.json``; and a
``config.json`` of the family the naming scheme belongs to (:func:`hf_config`). Beside
the experts each layer holds an input norm, an attention output projection and a
router (MoE layers) or a dense MLP (the first ``dense_layers`` layers, as in
DeepSeek-V3), and the model an embedding and a final norm, so loaders meet realistic
files.

Example: ``make_checkpoint(d, SyntheticSpec(layers=2, experts=8, shards=3))`` writes
2 MoE layers x 8 experts of ``hidden=64, intermediate=32`` bf16 (12 KiB per expert).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
from safetensors.torch import save_file

from elastic_ep.errors import ConfigError

from loaders.layout import ExpertLayout, moe_layout
from loaders.checkpoint.naming import NamingScheme, get_scheme
from loaders.checkpoint.safetensors_format import INDEX_SUFFIX

DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "fp8": torch.float8_e4m3fn,
}
"""``--dtype`` choices; ``fp8`` is e4m3 weights with float32 ``weight_scale_inv``."""

VOCAB = 64
"""Rows of the synthetic embedding: small, it only makes the file look like a model."""


@dataclass(frozen=True)
class SyntheticSpec:
    """What :func:`make_checkpoint` writes.

    Attributes:
        layers: MoE layers; their checkpoint layer numbers are
            ``dense_layers .. dense_layers + layers - 1`` (:attr:`moe_layer_ids`).
        experts: logical experts per MoE layer.
        hidden, intermediate: an expert's gate/up are ``[intermediate, hidden]``, its
            down ``[hidden, intermediate]``.
        dtype: a key of :data:`DTYPES`.
        shards: files to spread the tensors over (by bytes, in layer order).
        seed: the root of every tensor's values.
        scheme: a built-in scheme's name or a :class:`NamingScheme`.
        dense_layers: dense layers before the first MoE layer.
        scale_block: FP8 block size of ``weight_scale_inv`` (``fp8`` only).
    """

    layers: int = 2
    experts: int = 8
    hidden: int = 64
    intermediate: int = 32
    dtype: str = "bf16"
    shards: int = 1
    seed: int = 0
    scheme: str | NamingScheme = "deepseek"
    dense_layers: int = 0
    scale_block: int = 128
    naming: NamingScheme = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        sizes = dict(layers=self.layers, experts=self.experts, hidden=self.hidden,
                     intermediate=self.intermediate, shards=self.shards, scale_block=self.scale_block)
        bad = {k: v for k, v in sizes.items() if v < 1}
        if bad or self.dense_layers < 0:
            raise ConfigError(f"synthetic checkpoint sizes must be positive, got {bad or sizes}"
                              f"{'' if self.dense_layers >= 0 else f', dense_layers={self.dense_layers}'}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} unknown; choose one of {sorted(DTYPES)}")
        naming = get_scheme(self.scheme) if isinstance(self.scheme, str) else self.scheme
        object.__setattr__(self, "naming", naming)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def dense_dtype(self) -> torch.dtype:
        """The dtype of non-expert tensors: bf16 beside FP8 experts (as DeepSeek-V3)."""
        return torch.bfloat16 if self.dtype == "fp8" else self.torch_dtype

    @property
    def moe_layer_ids(self) -> list[int]:
        """MoE layer index -> checkpoint layer number."""
        return list(range(self.dense_layers, self.dense_layers + self.layers))

    def layout(self, fused: bool = True) -> ExpertLayout:
        """The serving layout matching this checkpoint's experts."""
        return moe_layout(
            self.hidden, self.intermediate, self.torch_dtype, fused,
            self.scale_block if self.dtype == "fp8" else None,
        )

    @property
    def expert_bytes(self) -> int:
        return self.layout().expert_bytes

    def expected_row(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """What a slot of the fused serving layout holding ``expert`` must contain."""
        return expected_row(self, self.layout(), layer, expert)


@dataclass(frozen=True)
class CheckpointSummary:
    """What :func:`make_checkpoint` wrote: ``files`` as ``(path, bytes)``, the sum of
    tensor bytes, the tensor count and one expert's bytes."""

    directory: str
    files: tuple[tuple[str, int], ...]
    tensor_bytes: int
    tensors: int
    expert_bytes: int


# -- values ----------------------------------------------------------------------------
def _generator(*key: object) -> torch.Generator:
    digest = hashlib.blake2b("/".join(map(str, key)).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def _values(shape: tuple[int, ...], dtype: torch.dtype, param: str, *key: object) -> torch.Tensor:
    g = _generator(*key)
    if param == "weight_scale_inv":
        # Positive, like real inverse block scales.
        return torch.rand(shape, generator=g).mul_(1e-3).add_(1e-4).to(dtype)
    scale = 0.5 if dtype == torch.float8_e4m3fn else 0.02
    return torch.randn(shape, generator=g).mul_(scale).to(dtype)


def _check_layer(spec: SyntheticSpec, layer: int, expert: int) -> int:
    if not (0 <= layer < spec.layers and 0 <= expert < spec.experts):
        raise ConfigError(
            f"(layer {layer}, expert {expert}) outside the synthetic checkpoint's "
            f"{spec.layers} MoE layers x {spec.experts} experts"
        )
    return spec.moe_layer_ids[layer]


def _expert_parts(spec: SyntheticSpec, layer: int, expert: int) -> dict[str, torch.Tensor]:
    """Part key (``"gate.weight"``) -> tensor, for MoE layer index ``layer``."""
    ckpt_layer = _check_layer(spec, layer, expert)
    return {
        s.part.key: _values(s.part.shape, s.dtype, s.part.param, spec.seed, ckpt_layer, expert, s.part.key)
        for s in spec.layout(fused=False).spans
    }


def expert_tensors(spec: SyntheticSpec, layer: int, expert: int) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of ``expert`` in MoE layer ``layer`` (the placement's
    index, mapped to checkpoint layer ``spec.moe_layer_ids[layer]``), by tensor name."""
    parts = _expert_parts(spec, layer, expert)
    ckpt_layer = spec.moe_layer_ids[layer]
    out = {}
    for key, t in parts.items():
        role, param = key.split(".", 1)
        out[spec.naming.tensor_name(ckpt_layer, expert, role, param)] = t
    return out


def expected_row(spec: SyntheticSpec, layout: ExpertLayout, layer: int, expert: int) -> dict[str, torch.Tensor]:
    """What a slot of MoE layer ``layer`` holding ``expert`` must contain in ``layout``
    (fused or not): serving tensor name -> row."""
    return layout.assemble_row(_expert_parts(spec, layer, expert))


# -- files -----------------------------------------------------------------------------
def _tensor_plan(spec: SyntheticSpec) -> list[tuple[str, tuple[int, ...], torch.dtype, Callable[[], torch.Tensor]]]:
    """Every tensor of the checkpoint in layer order: name, shape, dtype, and how to
    make it (lazily, so one shard at a time is in memory)."""
    H, I, D = spec.hidden, spec.intermediate, spec.dense_dtype
    plan: list[tuple[str, tuple[int, ...], torch.dtype, Callable[[], torch.Tensor]]] = []

    def add(name: str, shape: tuple[int, ...], dtype: torch.dtype, make: Callable[[], torch.Tensor] | None = None) -> None:
        plan.append((name, shape, dtype, make or partial(_values, shape, dtype, "weight", spec.seed, name)))

    add("model.embed_tokens.weight", (VOCAB, H), D)
    layout = spec.layout(fused=False)
    for ckpt_layer in range(spec.dense_layers + spec.layers):
        prefix = f"model.layers.{ckpt_layer}"
        add(f"{prefix}.input_layernorm.weight", (H,), D)
        add(f"{prefix}.self_attn.o_proj.weight", (H, H), D)
        if ckpt_layer < spec.dense_layers:
            for role, shape in (("gate", (I, H)), ("up", (I, H)), ("down", (H, I))):
                add(f"{prefix}.mlp.{role}_proj.weight", shape, D)
            continue
        router = spec.naming.router_name(ckpt_layer)
        if router is not None:
            add(router, (spec.experts, H), D)
        for expert in range(spec.experts):
            for s in layout.spans:
                p = s.part
                name = spec.naming.tensor_name(ckpt_layer, expert, p.role, p.param)
                add(name, p.shape, s.dtype,
                    partial(_values, p.shape, s.dtype, p.param, spec.seed, ckpt_layer, expert, p.key))
    add("model.norm.weight", (H,), D)
    return plan


def hf_config(spec: SyntheticSpec) -> dict[str, object] | None:
    """A ``config.json`` describing the checkpoint as the model family its scheme names
    (DeepSeek-V3, Qwen3-MoE, Mixtral), so :func:`loaders.checkpoint.hf_model.open_model` reads it
    like a downloaded model; ``None`` for a user template or Mixtral with dense layers."""
    H, I, E, n = spec.hidden, spec.intermediate, spec.experts, spec.dense_layers + spec.layers
    base: dict[str, object] = {"hidden_size": H, "num_hidden_layers": n, "intermediate_size": I,
                               "torch_dtype": {"fp8": "bfloat16"}.get(spec.dtype, str(spec.torch_dtype)[6:])}
    name = spec.naming.name
    if name == "deepseek":
        cfg = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "n_routed_experts": E,
               "moe_intermediate_size": I, "first_k_dense_replace": spec.dense_layers, "moe_layer_freq": 1,
               "n_shared_experts": 0, "num_nextn_predict_layers": 0}
    elif name == "qwen":
        cfg = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "num_experts": E,
               "moe_intermediate_size": I, "mlp_only_layers": list(range(spec.dense_layers)), "decoder_sparse_step": 1}
    elif name == "mixtral" and spec.dense_layers == 0:
        cfg = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_local_experts": E}
    else:
        return None
    if spec.dtype == "fp8":
        cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [spec.scale_block, spec.scale_block]}
    return {**cfg, **base}


def make_checkpoint(directory: str | os.PathLike[str], spec: SyntheticSpec, force: bool = False) -> CheckpointSummary:
    """Write the checkpoint of ``spec`` into ``directory`` (created if needed).

    ``directory`` must be new or empty; with ``force`` it may hold other files, and the
    checkpoint files there (``*.safetensors``, the index, ``config.json``) are replaced.
    Files are written beside their final name and renamed into place, so a symlink in
    the directory is never followed to a file outside it (and is refused).

    Shards split the tensors in layer order at even byte boundaries; a shard that
    would hold nothing (a few huge tensors) is dropped, so fewer files may be written.
    """
    directory = os.fspath(directory)
    plan = _tensor_plan(spec)
    if spec.shards > len(plan):
        raise ConfigError(f"shards={spec.shards} exceeds the {len(plan)} tensors of the checkpoint")
    sizes = [math.prod(shape) * torch.empty((), dtype=dtype).element_size() for _, shape, dtype, _ in plan]
    total = sum(sizes)
    shard_of, start = [], 0
    for n in sizes:
        shard_of.append(min(spec.shards - 1, start * spec.shards // max(total, 1)))
        start += n
    used = sorted(set(shard_of))
    count = len(used)
    names = (
        ["model.safetensors"] if count == 1
        else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    )
    _prepare_directory(directory, force)
    files, weight_map = [], {}
    for i, shard in enumerate(used):
        tensors = {name: make() for (name, _, _, make), s in zip(plan, shard_of) if s == shard}
        path = _write_into(directory, names[i], partial(save_file, tensors, metadata={"format": "pt"}))
        files.append((path, os.path.getsize(path)))
        weight_map.update(dict.fromkeys(tensors, names[i]))
    if count > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _write_into(directory, "model" + INDEX_SUFFIX, partial(_dump_json, index))
    config = hf_config(spec)
    if config is not None:
        _write_into(directory, "config.json", partial(_dump_json, config))
    return CheckpointSummary(directory, tuple(files), total, len(plan), spec.expert_bytes)


def _is_checkpoint_file(name: str) -> bool:
    return name.endswith((".safetensors", INDEX_SUFFIX)) or name == "config.json"


def _prepare_directory(directory: str, force: bool) -> None:
    """Make ``directory`` ready to receive a checkpoint, or raise :class:`ConfigError`
    naming it and the fix: not a directory, not empty (without ``force``), or holding
    a checkpoint file that is a symlink or not a regular file. With ``force`` the old
    checkpoint files are removed, so two checkpoints never mix."""
    if os.path.lexists(directory) and not os.path.isdir(directory):
        raise ConfigError(f"{directory} exists and is not a directory; pass a new or empty directory "
                          "to write the checkpoint into")
    try:
        os.makedirs(directory, exist_ok=True)
        entries = sorted(os.listdir(directory))
    except OSError as e:
        raise ConfigError(f"{directory}: cannot create or list the directory ({e.strerror}); "
                          "pass a directory this process can write") from e
    if entries and not force:
        raise ConfigError(
            f"{directory} is not empty (it holds {entries[:4]}{' ...' if len(entries) > 4 else ''}); writing "
            "there would overwrite or mix with its files: pass an empty or new directory, or --force to "
            "replace the checkpoint files in it"
        )
    old = [e for e in entries if _is_checkpoint_file(e)]
    irregular = [e for e in old if os.path.islink(os.path.join(directory, e))
                 or not os.path.isfile(os.path.join(directory, e))]
    if irregular:
        raise ConfigError(
            f"{directory}: {irregular[:4]} is a symlink or not a regular file; a checkpoint is never "
            "written through one, even with --force: remove it or pass another directory"
        )
    for e in old:
        os.remove(os.path.join(directory, e))


def _write_into(directory: str, name: str, write: Callable[[str], object]) -> str:
    """``write(path)`` into a new file of ``directory``, then renamed to ``name``.

    The temporary file is created with ``O_EXCL | O_NOFOLLOW`` and the rename replaces
    the directory entry itself: whatever ``name`` was (a symlink planted after the
    checks), no file outside ``directory`` is written."""
    final = os.path.join(directory, name)
    tmp = os.path.join(directory, f".{name}.{secrets.token_hex(6)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(tmp, flags, 0o644)
        mode = os.fstat(fd).st_mode & 0o777  # 0o644 under the umask
        os.close(fd)
        write(tmp)
        os.chmod(tmp, mode)  # the safetensors writer leaves its files 0o600
        os.replace(tmp, final)
    except OSError as e:
        _remove_quietly(tmp)
        raise ConfigError(f"{final}: cannot write ({e.strerror or e}); check the directory's space and "
                          "permissions") from e
    except BaseException:
        _remove_quietly(tmp)
        raise
    return final


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _dump_json(doc: object, path: str) -> None:
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
