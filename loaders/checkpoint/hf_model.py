"""Hugging Face model directories: where the routed experts are, read from ``config.json``
and the safetensors headers alone.

:func:`open_model` detects the family from ``config.json``, decides which layers are MoE
layers of the main model, finds the tensors of one expert in the checkpoint (weights,
block scales, biases, MXFP4 blocks: whatever the files hold) and builds the serving
layout from them, then checks every expert of every MoE layer against it.

Families and what is left out of the placement:

============================  =================================  ==============================
family (``model_type``)       experts                            not routed experts
============================  =================================  ==============================
``deepseek_v2/v3``            ``mlp.experts.{E}.{gate,up,down}   first ``first_k_dense_replace``
                              _proj``                            layers, ``moe_layer_freq``,
                                                                 ``mlp.shared_experts``, MTP
                                                                 layers ``>= num_hidden_layers``
``qwen2_moe``, ``qwen3_moe``  same names                         ``mlp_only_layers``,
                                                                 ``decoder_sparse_step``,
                                                                 ``mlp.shared_expert(_gate)``
``mixtral``                   ``block_sparse_moe.experts.{E}.    none
                              w1/w3/w2`` (gate/up/down)
``gpt_oss``                   stacked ``mlp.experts.gate_up_     none
                              proj[E]``, ``down_proj[E]``,
                              biases, MXFP4 ``*_blocks/_scales``
``llama4(_text)``             stacked ``feed_forward.experts.    dense layers between
                              gate_up_proj[E]``, ``down_proj``   ``interleave_moe_layer_step``,
                                                                 ``feed_forward.shared_expert``
============================  =================================  ==============================

Serving layout (what a slot holds, as vLLM's fused-MoE layers keep it): per-expert
families fuse ``w13_<param>`` = gate's then up's ``<param>`` on dim 0 and
``w2_<param>`` = down's, for each parameter the checkpoint has (``weight``, then
``weight_scale_inv`` for DeepSeek's FP8, ``bias`` ...); stacked families keep each
stacked tensor's slice as it is (``gate_up_proj`` ``[hidden, 2 * intermediate]`` with
gpt-oss's interleaved gate/up columns untouched).

Any other architecture: pass ``templates`` (role -> module path with ``{layer}`` and
``{expert}``, roles ``gate``, ``up``, ``down``); MoE layers and the expert count are then
found in the checkpoint.

Example::

    m = open_model("/models/DeepSeek-V3")
    m.family, m.moe_layer_ids[:2], m.experts, m.expert_bytes
    # ('deepseek_v3', (3, 4), 256, 44_050_944): FP8 weights and their block scales
    src = m.source()  # a SafetensorsExpertSource reading this directory
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Mapping, Sequence

import torch

from elastic_ep.errors import CheckpointError, ConfigError, CorruptCheckpointError, MissingFileError, MissingTensorError
from elastic_ep.errors import TensorMismatchError, UnsupportedModelError

from loaders.layout import CheckpointPart, ExpertLayout, SlotTensor
from loaders.checkpoint.naming import NamingScheme, get_scheme
from loaders.checkpoint.safetensors_format import (
    DTYPE_NAMES,
    CheckpointFiles,
    SafetensorsHeader,
    TensorInfo,
    brief,
    read_header,
    read_json_file,
)

LAYER_PREFIXES: tuple[str, ...] = ("model.layers", "language_model.model.layers", "model.language_model.layers")
"""Where decoder layers live: text models, and multimodal checkpoints (Llama 4) that
nest the language model."""


@dataclass(frozen=True)
class LeftOut:
    """Tensors or layers of the model that are not routed experts of the main model,
    and why: ``LeftOut("layers 0-2", "dense MLP (first_k_dense_replace=3)")``."""

    what: str
    why: str


@dataclass(frozen=True)
class Family:
    """Where one architecture keeps its routed experts.

    Attributes:
        name: ``"deepseek_v3"``.
        experts_module: the experts' module under a layer, ``"mlp.experts"``.
        projections: role -> module under one expert (``{"gate": "gate_proj", ...}``);
            ``None`` for stacked families (every expert in one tensor per parameter).
        router: the router weight under a layer, ``"mlp.gate.weight"``.
        experts_keys: config keys that may give the routed expert count (the first set).
        moe_layers: ``config -> (MoE layer numbers, what was left out)``.
        shared: ``(module under a layer, config key that enables it)`` of shared
            experts (``None``: always there when present in the files).
    """

    name: str
    experts_module: str
    projections: Mapping[str, str] | None
    router: str
    experts_keys: tuple[str, ...]
    moe_layers: Callable[[Mapping[str, Any]], tuple[list[int], list[LeftOut]]]
    shared: tuple[tuple[str, str | None], ...] = ()


def _span(layers: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"layers 0-2, 5"``."""
    out: list[str] = []
    for i in sorted(layers):
        if out and out[-1].split("-")[-1] == str(i - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{i}"
        else:
            out.append(str(i))
    return ("layer " if len(layers) == 1 else "layers ") + ", ".join(out)


MAX_CONFIG_INT = 1 << 20
"""Larger layer or expert counts are garbage (DeepSeek-V3: 61 layers, 256 experts), and
would make the layer scans below run for hours."""


def _int(cfg: Mapping[str, Any], key: str, default: int | None = None) -> int:
    v = cfg.get(key, default)
    if v is None:
        v = default
    if type(v) is not int or not 0 <= v <= MAX_CONFIG_INT:
        raise ConfigError(f"config.json: {key}={brief(v)}, expected an integer in 0..{MAX_CONFIG_INT}; "
                          "the config does not describe this model: copy it again from the model repository")
    return v


def _deepseek_layers(cfg: Mapping[str, Any]) -> tuple[list[int], list[LeftOut]]:
    n = _int(cfg, "num_hidden_layers")
    k = _int(cfg, "first_k_dense_replace", 0)
    freq = max(1, _int(cfg, "moe_layer_freq", 1))
    moe = [i for i in range(n) if i >= k and i % freq == 0]
    left = []
    dense = [i for i in range(n) if i not in moe]
    if dense:
        left.append(LeftOut(_span(dense), f"dense MLP (first_k_dense_replace={k}, moe_layer_freq={freq})"))
    mtp = _int(cfg, "num_nextn_predict_layers", 0)
    if mtp:
        left.append(LeftOut(
            _span(range(n, n + mtp)),
            f"multi-token prediction (num_nextn_predict_layers={mtp}): a draft module beside the "
            "main model, not part of its placement",
        ))
    return moe, left


def _qwen_layers(cfg: Mapping[str, Any]) -> tuple[list[int], list[LeftOut]]:
    n = _int(cfg, "num_hidden_layers")
    step = max(1, _int(cfg, "decoder_sparse_step", 1))
    only = cfg.get("mlp_only_layers") or []
    if not isinstance(only, list) or not all(type(i) is int for i in only):
        raise ConfigError(f"config.json: mlp_only_layers={brief(only)}, expected a list of layer numbers")
    dense_only = set(only)
    moe = [i for i in range(n) if i not in dense_only and (i + 1) % step == 0]
    dense = [i for i in range(n) if i not in moe]
    left = [LeftOut(_span(dense), f"dense MLP (mlp_only_layers={only}, decoder_sparse_step={step})")] if dense else []
    return moe, left


def _every_layer(cfg: Mapping[str, Any]) -> tuple[list[int], list[LeftOut]]:
    return list(range(_int(cfg, "num_hidden_layers"))), []


def _llama4_layers(cfg: Mapping[str, Any]) -> tuple[list[int], list[LeftOut]]:
    n = _int(cfg, "num_hidden_layers")
    step = max(1, _int(cfg, "interleave_moe_layer_step", 1))
    moe = cfg.get("moe_layers")
    if moe is None:
        moe = list(range(step - 1, n, step))
    if not isinstance(moe, list) or not all(type(i) is int and 0 <= i < n for i in moe):
        raise ConfigError(f"config.json: moe_layers={brief(moe)}, expected layer numbers below num_hidden_layers={n}")
    moe_set = set(moe)
    dense = [i for i in range(n) if i not in moe_set]
    left = [LeftOut(_span(dense), f"dense MLP (interleave_moe_layer_step={step})")] if dense else []
    return sorted(moe_set), left


_SWIGLU = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("deepseek_v3", "mlp.experts", _SWIGLU, "mlp.gate.weight", ("n_routed_experts",), _deepseek_layers,
               (("mlp.shared_experts", "n_shared_experts"),)),
        Family("deepseek_v2", "mlp.experts", _SWIGLU, "mlp.gate.weight", ("n_routed_experts",), _deepseek_layers,
               (("mlp.shared_experts", "n_shared_experts"),)),
        Family("qwen2_moe", "mlp.experts", _SWIGLU, "mlp.gate.weight", ("num_experts", "num_local_experts"), _qwen_layers,
               (("mlp.shared_expert", "shared_expert_intermediate_size"), ("mlp.shared_expert_gate", None))),
        Family("qwen3_moe", "mlp.experts", _SWIGLU, "mlp.gate.weight", ("num_experts", "num_local_experts"), _qwen_layers),
        Family("mixtral", "block_sparse_moe.experts", {"gate": "w1", "up": "w3", "down": "w2"},
               "block_sparse_moe.gate.weight", ("num_local_experts",), _every_layer),
        Family("gpt_oss", "mlp.experts", None, "mlp.router.weight", ("num_local_experts",), _every_layer),
        Family("llama4_text", "feed_forward.experts", None, "feed_forward.router.weight", ("num_local_experts",),
               _llama4_layers, (("feed_forward.shared_expert", None),)),
    )
}
_ALIASES = {"llama4": "llama4_text"}


@dataclass(frozen=True)
class ModelCheckpoint:
    """The routed experts of a model directory, as the disk path and the ranks see them.

    Attributes:
        directory: the model directory.
        family: ``"deepseek_v3"``, ... or ``"template"``.
        architecture: ``config.json``'s ``architectures[0]`` (or its ``model_type``).
        moe_layer_ids: model layer numbers of the main model's MoE layers, in order
            (placement layer ``i`` is checkpoint layer ``moe_layer_ids[i]``).
        experts: routed experts per MoE layer.
        naming: where each expert tensor is (:class:`NamingScheme`).
        expert_layout: the serving layout of one expert.
        quantization: ``"none"``, ``"fp8 e4m3, block 128x128 (weight_scale_inv)"``,
            ``"mxfp4"``, ...
        left_out: what is not part of the placement, and why.

    Same interface as :class:`loaders.checkpoint.synthetic.SyntheticSpec` where the ranks use one
    (``layers``, ``experts``, ``naming``, ``moe_layer_ids``, ``layout()``,
    ``expert_bytes``, ``expected_row``).
    """

    directory: str
    family: str
    architecture: str
    moe_layer_ids: tuple[int, ...]
    experts: int
    naming: NamingScheme
    expert_layout: ExpertLayout
    quantization: str
    left_out: tuple[LeftOut, ...] = ()
    tensors_checked: int = field(default=0, compare=False)

    @property
    def layers(self) -> int:
        return len(self.moe_layer_ids)

    def layout(self) -> ExpertLayout:
        return self.expert_layout

    @property
    def expert_bytes(self) -> int:
        return self.expert_layout.expert_bytes

    def source(self, **kwargs: Any) -> Any:
        """A :class:`SafetensorsExpertSource` over this directory (``kwargs``: its
        ``num_threads``, ``read_chunk_bytes``)."""
        from loaders.checkpoint.safetensors_source import SafetensorsExpertSource

        return SafetensorsExpertSource(self.directory, self.naming, self.expert_layout, self.moe_layer_ids, **kwargs)

    def expert_tensors(self, layer: int = 0, expert: int = 0) -> list[dict[str, Any]]:
        """The checkpoint tensors of one expert: name, shape, dtype, bytes, and for a
        stacked family the index into the stacked tensor."""
        out = []
        for s in self.expert_layout.spans:
            name = self.naming.tensor_name(self.moe_layer_ids[layer], expert, s.part.role, s.part.param)
            row = {"name": name, "shape": list(s.part.shape), "dtype": DTYPE_NAMES[s.dtype], "bytes": s.nbytes,
                   "serving_tensor": s.tensor}
            if self.naming.stacked:
                row["index"] = expert
            out.append(row)
        return out

    def expected_row(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """What a slot of MoE layer ``layer`` holding ``expert`` must contain (serving
        tensor name -> row), read with the ``safetensors`` library: a reference that
        shares no code with the disk loader."""
        from safetensors import safe_open

        if not (0 <= layer < self.layers and 0 <= expert < self.experts):
            raise ConfigError(f"(layer {layer}, expert {expert}) outside {self.layers} MoE layers x {self.experts} experts")
        files = self._files
        parts = {}
        for s in self.expert_layout.spans:
            p = s.part
            name = self.naming.tensor_name(self.moe_layer_ids[layer], expert, p.role, p.param)
            with safe_open(files.file_of(name), "pt") as f:
                parts[p.key] = f.get_slice(name)[expert] if self.naming.stacked else f.get_tensor(name)
        return self.expert_layout.assemble_row(parts)

    @cached_property
    def _files(self) -> CheckpointFiles:
        """The index, parsed once (DeepSeek-V3's names about 90k tensors)."""
        return CheckpointFiles(self.directory)

    def to_dict(self) -> dict[str, Any]:
        """``elastic-ep inspect --json``."""
        return {
            "directory": self.directory,
            "family": self.family,
            "architecture": self.architecture,
            "moe_layers": list(self.moe_layer_ids),
            "num_moe_layers": self.layers,
            "num_experts": self.experts,
            "expert_bytes": self.expert_bytes,
            "routed_expert_bytes": self.expert_bytes * self.experts * self.layers,
            "quantization": self.quantization,
            "stacked": self.naming.stacked,
            "expert_tensors": self.expert_tensors(),
            "serving_layout": [
                {"name": t.name, "row_shape": list(t.row_shape), "dtype": DTYPE_NAMES[t.dtype],
                 "row_bytes": t.row_bytes, "parts": [p.key for p in t.parts]}
                for t in self.expert_layout.tensors
            ],
            "left_out": [{"what": x.what, "why": x.why} for x in self.left_out],
            "tensors_checked": self.tensors_checked,
        }


# -- opening a directory -----------------------------------------------------------------
def read_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """``directory/config.json`` as a dict; a missing, unreadable or non-JSON file (too
    big, nested too deep, not an object) raises a :class:`CheckpointError` naming it."""
    path = os.path.join(os.fspath(directory), "config.json")
    if not os.path.isdir(os.fspath(directory)):
        raise MissingFileError(f"{os.fspath(directory)}: model directory not found; pass the directory holding "
                               "config.json and the safetensors shards")
    fix = "copy it again from the model repository"
    try:
        cfg = read_json_file(path, "a JSON config", fix)
    except FileNotFoundError:
        raise MissingFileError(
            f"{path}: no config.json; elastic-ep reads the model's layers and experts from it: copy the "
            "model's config.json beside its safetensors files"
        ) from None
    if not isinstance(cfg, dict):
        raise CorruptCheckpointError(
            f"{path}: not a JSON config: a JSON {type(cfg).__name__}, expected an object; {fix}")
    return cfg


def _family_of(cfg: dict[str, Any]) -> tuple[Family | None, dict[str, Any]]:
    """The family and the config that describes the decoder (a nested ``text_config``
    for multimodal checkpoints)."""
    for c in (cfg.get("text_config"), cfg):
        if isinstance(c, dict) and isinstance(mt := c.get("model_type"), str):
            mt = _ALIASES.get(mt, mt)
            if mt in FAMILIES:
                return FAMILIES[mt], c
    return None, cfg


def _architecture(cfg: Mapping[str, Any]) -> str:
    """``architectures[0]``, else ``model_type``, else ``"?"``; garbage reads as ``"?"``."""
    archs = cfg.get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        return archs[0]
    mt = cfg.get("model_type")
    return mt if isinstance(mt, str) else "?"


def _quantization(cfg: Mapping[str, Any]) -> tuple[str, tuple[int, int] | None]:
    q = cfg.get("quantization_config")
    if not isinstance(q, dict):
        return "none", None
    method = q.get("quant_method")
    method = method if isinstance(method, str) else "unknown"
    block = q.get("weight_block_size")
    if method == "fp8" and block is not None:
        if not (isinstance(block, list) and len(block) == 2 and all(type(b) is int and b > 0 for b in block)):
            raise ConfigError(f"config.json: quantization_config.weight_block_size={brief(block)}, "
                              "expected [rows, cols]")
        fmt = q.get("fmt")
        fmt = fmt if isinstance(fmt, str) else "e4m3"
        return f"fp8 {fmt[:40]}, block {block[0]}x{block[1]} (weight_scale_inv)", (block[0], block[1])
    return method, None


class _Headers:
    """Headers of a checkpoint's files, read once each."""

    def __init__(self, files: CheckpointFiles) -> None:
        self.files = files
        self._by_path: dict[str, SafetensorsHeader] = {}

    def names(self) -> set[str]:
        """Every tensor name: the index's, or the single file's header (read once)."""
        single = self.files.single_file
        if single is None:
            return set(self.files.weight_map)
        return set(self._header(single, "its tensor names").names())

    def info(self, name: str) -> TensorInfo:
        return self._header(self.files.file_of(name), f"tensor {name!r}").tensor(name)

    def _header(self, path: str, what: str) -> SafetensorsHeader:
        h = self._by_path.get(path)
        if h is None:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise MissingFileError(
                    f"{path}: shard not found" + (f", named by {self.files.index_path}" if self.files.index_path else "")
                    + f" for {what}; download the missing shard"
                ) from None
            except OSError as e:
                raise CheckpointError(f"{path}: cannot open ({e}); check that the shard is a readable file") from e
            try:
                h = self._by_path[path] = read_header(fd, path)
            finally:
                os.close(fd)
        return h


def _expert_parts(
    names: set[str], headers: _Headers, naming: NamingScheme, layer: int, experts: int, where: str
) -> list[tuple[str, str, TensorInfo]]:
    """``(role, param, info)`` of every tensor of expert 0 in checkpoint layer ``layer``."""
    out = []
    for role, template in naming.modules.items():
        module = template.format(layer=layer) if naming.stacked else template.format(layer=layer, expert=0)
        params = sorted(
            n[len(module) + 1 :] for n in names if n.startswith(module + ".") and "." not in n[len(module) + 1 :]
        )
        if not params:
            raise MissingTensorError(
                f"{where}: no tensors under {module}.* for layer {layer}; the checkpoint does not hold this "
                "layer's experts where its architecture keeps them: check the files are complete"
            )
        # A fixed order: weights first, then their scales and biases; stacked tensors
        # gate/up before down, as the projections run.
        params.sort(key=lambda p: (p != "weight", p.startswith("down"), p))
        for param in params:
            info = headers.info(f"{module}.{param}")
            if info.dtype is None:
                raise TensorMismatchError(f"{where}: tensor {info.name!r} has dtype {info.dtype_str}, which "
                                          "elastic-ep cannot move (unknown to torch)")
            if naming.stacked and (not info.shape or info.shape[0] != experts):
                raise TensorMismatchError(
                    f"{where}: stacked tensor {info.name!r} is {list(info.shape)}, expected "
                    f"[{experts}, ...] (one row per routed expert, config {experts} experts)"
                )
            out.append((role, param, info))
    return out


def _layout(parts: list[tuple[str, str, TensorInfo]], naming: NamingScheme, where: str) -> ExpertLayout:
    if naming.stacked:
        return ExpertLayout(tuple(
            SlotTensor(param, info.dtype, (CheckpointPart(role, param, info.shape[1:]),))  # type: ignore[arg-type]
            for role, param, info in parts
        ))
    by_role: dict[str, dict[str, TensorInfo]] = {}
    for role, param, info in parts:
        by_role.setdefault(role, {})[param] = info
    params = [p for r, p, _ in parts if r == "gate"]
    for role in ("up", "down"):
        if set(by_role[role]) != set(params):
            raise TensorMismatchError(
                f"{where}: an expert's gate has parameters {params} but its {role} has "
                f"{sorted(by_role[role])}; every projection needs the same ones"
            )
    tensors = []
    for param in params:
        gate, up = by_role["gate"][param], by_role["up"][param]
        if gate.dtype != up.dtype or gate.shape[1:] != up.shape[1:]:
            raise TensorMismatchError(
                f"{where}: {gate.name} is {gate.dtype_str} {list(gate.shape)} but {up.name} is {up.dtype_str} "
                f"{list(up.shape)}; gate and up are fused on dim 0 and must agree on dtype and trailing dims"
            )
        tensors.append(SlotTensor(f"w13_{param}", gate.dtype, (  # type: ignore[arg-type]
            CheckpointPart("gate", param, gate.shape), CheckpointPart("up", param, up.shape))))
        down = by_role["down"][param]
        tensors.append(SlotTensor(f"w2_{param}", down.dtype, (CheckpointPart("down", param, down.shape),)))  # type: ignore[arg-type]
    # Weights of both projections, then scales: the order of vLLM's fused-MoE parameters.
    tensors.sort(key=lambda t: (t.name.split("_", 1)[1] != "weight",))
    return ExpertLayout(tuple(tensors))


def _layer_prefix(names: set[str], family: Family, layer: int, directory: str) -> str:
    for prefix in LAYER_PREFIXES:
        probe = f"{prefix}.{layer}.{family.experts_module}."
        if any(n.startswith(probe) for n in names):
            return prefix
    raise MissingTensorError(
        f"{directory}: no expert tensors of MoE layer {layer} under "
        f"{[f'{p}.{layer}.{family.experts_module}' for p in LAYER_PREFIXES]}; the checkpoint is incomplete "
        f"or is not a {family.name} model: check config.json and the files"
    )


def _naming(family: Family, prefix: str) -> NamingScheme:
    base = f"{prefix}.{{layer}}.{family.experts_module}"
    if family.projections is None:
        return NamingScheme(family.name, {"experts": base}, f"{prefix}.{{layer}}.{family.router}", stacked=True)
    return NamingScheme(
        family.name, {role: f"{base}.{{expert}}.{mod}" for role, mod in family.projections.items()},
        f"{prefix}.{{layer}}.{family.router}",
    )


def _shared_left_out(family: Family, cfg: Mapping[str, Any], names: set[str], prefix: str, moe: list[int]) -> list[LeftOut]:
    out = []
    for module, key in family.shared:
        if key is not None and not cfg.get(key):
            continue
        if any(n.startswith(f"{prefix}.{layer}.{module}.") for layer in moe[:1] for n in names):
            out.append(LeftOut(f"{module}.* of every MoE layer",
                               "shared expert: every token goes through it on every rank, it is not routed"))
    return out


def _template_layers(names: set[str], naming: NamingScheme, cfg: Mapping[str, Any], directory: str) -> tuple[list[int], int]:
    """MoE layers and the expert count of an unknown architecture, found in the files."""
    if cfg.get("num_hidden_layers") is not None:
        top = _int(cfg, "num_hidden_layers")
    else:
        top = 1 + max((int(p) for name in names for p in name.split(".") if p.isdigit()), default=-1)

    # Every module path above a tensor, built once: each probe below is then one lookup.
    modules = {n[:i] for n in names for i, c in enumerate(n) if c == "."}

    def has(layer: int, expert: int) -> bool:
        return naming.modules["gate"].format(layer=layer, expert=expert) in modules

    moe = [layer for layer in range(top) if has(layer, 0)]
    if not moe:
        raise MissingTensorError(
            f"{directory}: no tensor matches the gate template {naming.modules['gate']!r} for any layer below "
            f"{top}; check the template against the names in the index"
        )
    experts = 0
    while has(moe[0], experts):
        experts += 1
    return moe, experts


def open_model(
    directory: str | os.PathLike[str],
    templates: Mapping[str, str] | None = None,
    validate: bool = True,
) -> ModelCheckpoint:
    """The routed experts of a Hugging Face model directory.

    Args:
        directory: holds ``config.json`` and the safetensors files (with their index).
        templates: for an architecture not in :data:`FAMILIES`: role (``gate``, ``up``,
            ``down``) -> module path with ``{layer}`` and ``{expert}``.
        validate: check every tensor of every expert of every MoE layer (names in the
            index, shapes and dtypes in the headers); only headers are read.

    Raises :class:`MissingFileError` (no directory, no ``config.json``, a shard the index
    names is missing), :class:`UnsupportedModelError`, :class:`MissingTensorError` (a MoE
    layer missing experts), :class:`TensorMismatchError` (experts that disagree).
    """
    directory = os.fspath(directory)
    raw = read_config(directory)
    family, cfg = _family_of(raw)
    arch = _architecture(raw)
    files = CheckpointFiles(directory)
    headers = _Headers(files)
    names = headers.names()
    left: list[LeftOut] = []
    if templates is not None:
        naming = get_scheme("template", templates)
        if naming.stacked:  # pragma: no cover - templates are per-expert by construction
            raise ConfigError("templates describe per-expert tensors ({layer} and {expert})")
        moe, experts = _template_layers(names, naming, cfg, directory)
        name = "template"
    elif family is None:
        known = sorted(FAMILIES) + sorted(_ALIASES)
        raise UnsupportedModelError(
            f"{directory}/config.json: architecture {arch!r} (model_type {brief(raw.get('model_type'))}) is not one "
            f"elastic-ep knows ({', '.join(known)}); give a naming template (--template "
            "gate=...,up=...,down=... with {layer} and {expert}) that says where its experts are"
        )
    else:
        moe, left = family.moe_layers(cfg)
        key = next((k for k in family.experts_keys if cfg.get(k) is not None), family.experts_keys[0])
        experts = _int(cfg, key)
        if not moe or experts == 0:
            raise UnsupportedModelError(f"{directory}/config.json: {family.name} with no MoE layers "
                                        f"({key}={experts}); nothing to place")
        prefix = _layer_prefix(names, family, moe[0], directory)
        naming = _naming(family, prefix)
        left += _shared_left_out(family, cfg, names, prefix, moe)
        name = family.name
    parts = _expert_parts(names, headers, naming, moe[0], experts, directory)
    quant, block = _quantization(cfg if "quantization_config" in cfg else raw)
    if quant == "none":
        quant = f"none ({', '.join(sorted({info.dtype_str for _, _, info in parts}))})"
    layout = _layout(parts, naming, directory)
    if block is not None:
        _check_block_scales(layout, block, directory)
    hidden = cfg.get("hidden_size")
    if not naming.stacked and type(hidden) is int:
        gate = next(info for role, param, info in parts if role == "gate" and param == "weight")
        if gate.dtype_str != "U8" and gate.shape[-1] != hidden:
            raise TensorMismatchError(f"{gate.name} is {list(gate.shape)} but config.json has hidden_size={hidden}; "
                                      "the config and the weights are from different models")
    model = ModelCheckpoint(directory, name, str(arch), tuple(moe), experts, naming, layout, quant, tuple(left))
    if validate:
        object.__setattr__(model, "tensors_checked", _validate(model, names, headers))
    return model


def _check_block_scales(layout: ExpertLayout, block: tuple[int, int], where: str) -> None:
    parts = {(s.part.role, s.part.param): s.part for s in layout.spans}
    for (role, param), p in parts.items():
        if param != "weight_scale_inv":
            continue
        w = parts.get((role, "weight"))
        want = tuple(math.ceil(d / b) for d, b in zip(w.shape, block)) if w is not None else None
        if want != p.shape:
            raise TensorMismatchError(
                f"{where}: {role} weight_scale_inv is {list(p.shape)}, but weight {list(w.shape) if w else '?'} "
                f"with weight_block_size {list(block)} needs {list(want) if want else '?'}; "
                "config.json's quantization_config does not describe these files"
            )


def _validate(model: ModelCheckpoint, names: set[str], headers: _Headers) -> int:
    """Every expert of every MoE layer present, with the layout's shapes and dtypes."""
    naming, checked = model.naming, 0
    for layer in model.moe_layer_ids:
        experts = [0] if naming.stacked else range(model.experts)
        for e in experts:
            for s in model.expert_layout.spans:
                p = s.part
                name = naming.tensor_name(layer, e, p.role, p.param)
                if name not in names:
                    raise MissingTensorError(
                        f"{model.directory}: MoE layer {layer} has no {name!r}: expert {e} of "
                        f"{model.experts} is missing; the checkpoint is incomplete: download it again"
                    )
                info = headers.info(name)
                shape = info.shape[1:] if naming.stacked else info.shape
                if info.dtype != s.dtype or shape != p.shape or (naming.stacked and info.shape[0] != model.experts):
                    first = naming.tensor_name(model.moe_layer_ids[0], 0, p.role, p.param)
                    want = ([model.experts] if naming.stacked else []) + list(p.shape)
                    raise TensorMismatchError(
                        f"{info.name!r} (layer {layer}, expert {e}) is {info.dtype_str} {list(info.shape)} but "
                        f"{first!r} is {DTYPE_NAMES[s.dtype]} {want}; experts of a model must agree: "
                        "the files mix two checkpoints"
                    )
                checked += 1
    return checked
