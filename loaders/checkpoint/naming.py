"""Naming schemes: where a checkpoint keeps the tensors of one expert.

A scheme maps ``(checkpoint layer number, logical expert, role)`` to a module path, and
the tensor name is that path plus a parameter name (``weight``, or ``weight_scale_inv``
for DeepSeek-style block-scaled FP8). Roles are the three projections of a SwiGLU
expert: ``gate`` and ``up`` (both ``[intermediate, hidden]``) and ``down``
(``[hidden, intermediate]``).

Built-ins, chosen by name with :func:`get_scheme`:

- ``deepseek`` / ``qwen``: ``model.layers.{layer}.mlp.experts.{expert}.gate_proj.weight``
  (``up_proj``, ``down_proj``); router ``model.layers.{layer}.mlp.gate.weight``.
- ``mixtral``: ``model.layers.{layer}.block_sparse_moe.experts.{expert}.w1.weight``
  with ``w1`` = gate, ``w3`` = up, ``w2`` = down; router
  ``model.layers.{layer}.block_sparse_moe.gate.weight``.
- ``template``: user-given format strings with ``{layer}`` and ``{expert}``, e.g.
  ``get_scheme("template", templates={"gate": "blocks.{layer}.moe.{expert}.wi_0",
  "up": "blocks.{layer}.moe.{expert}.wi_1", "down": "blocks.{layer}.moe.{expert}.wo"})``.

Stacked schemes (gpt-oss, Llama 4) keep every expert of a layer in one tensor per
parameter, the expert as dim 0 (``model.layers.{layer}.mlp.experts.gate_up_proj`` is
``[num_experts, hidden, 2 * intermediate]``): their templates have ``{layer}`` only, and
an expert is the slice ``[expert]`` of the tensor, one contiguous byte range.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Mapping

from elastic_ep.errors import ConfigError

ROLES: tuple[str, ...] = ("gate", "up", "down")
"""The projections of one expert, in the order fused tensors concatenate them."""


@dataclass(frozen=True)
class NamingScheme:
    """Module paths of one expert's projections and of a layer's router.

    Attributes:
        name: the scheme's name (``"deepseek"``).
        modules: role -> module path template with ``{layer}`` and ``{expert}``, e.g.
            ``{"gate": "model.layers.{layer}.mlp.experts.{expert}.gate_proj", ...}``.
        router: the router weight's name template with ``{layer}``, or ``None`` when
            unknown (synthetic checkpoints then write no router).
        stacked: the expert is dim 0 of each tensor rather than part of its name
            (templates then have ``{layer}`` only), e.g.
            ``NamingScheme("gpt_oss", {"experts": "model.layers.{layer}.mlp.experts"}, stacked=True)``.

    ``layer`` is always the checkpoint's layer number, not the index among MoE layers.
    Roles are free names; the built-in SwiGLU layouts use :data:`ROLES`.
    """

    name: str
    modules: Mapping[str, str]
    router: str | None = None
    stacked: bool = False

    def __post_init__(self) -> None:
        if not self.modules:
            raise ConfigError(f"naming scheme {self.name!r} has no module templates")
        fields = {"layer"} if self.stacked else {"layer", "expert"}
        for role, template in self.modules.items():
            _check_fields(self.name, role, template, fields)
        if self.router is not None:
            _check_fields(self.name, "router", self.router, {"layer"})
        # A frozen copy, so that a caller's dict changing later cannot rename tensors.
        object.__setattr__(self, "modules", dict(self.modules))

    def tensor_name(self, layer: int, expert: int, role: str, param: str = "weight") -> str:
        """``tensor_name(3, 17, "up")`` -> ``model.layers.3.mlp.experts.17.up_proj.weight``;
        stacked: the name of the tensor holding every expert (slice ``[expert]`` of it)."""
        try:
            module = self.modules[role]
        except KeyError:
            raise ConfigError(
                f"naming scheme {self.name!r} has no role {role!r}; roles: {list(self.modules)}"
            ) from None
        path = module.format(layer=layer) if self.stacked else module.format(layer=layer, expert=expert)
        return f"{path}.{param}"

    def router_name(self, layer: int) -> str | None:
        return None if self.router is None else self.router.format(layer=layer)


def _check_fields(scheme: str, what: str, template: str, required: set[str]) -> None:
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise ConfigError(f"naming scheme {scheme!r}: template for {what} {template!r} is malformed: {e}") from e
    if fields != required:
        raise ConfigError(
            f"naming scheme {scheme!r}: template for {what} {template!r} has fields "
            f"{sorted(fields)}, expected exactly {sorted(required)} (e.g. "
            "'model.layers.{layer}.mlp.experts.{expert}.gate_proj')"
        )


_DEEPSEEK = {role: f"model.layers.{{layer}}.mlp.experts.{{expert}}.{role}_proj" for role in ROLES}
_MIXTRAL_PROJ = {"gate": "w1", "up": "w3", "down": "w2"}
_MIXTRAL = {
    role: f"model.layers.{{layer}}.block_sparse_moe.experts.{{expert}}.{w}"
    for role, w in _MIXTRAL_PROJ.items()
}

BUILTIN_SCHEMES: dict[str, NamingScheme] = {
    "deepseek": NamingScheme("deepseek", _DEEPSEEK, "model.layers.{layer}.mlp.gate.weight"),
    "qwen": NamingScheme("qwen", _DEEPSEEK, "model.layers.{layer}.mlp.gate.weight"),
    "mixtral": NamingScheme("mixtral", _MIXTRAL, "model.layers.{layer}.block_sparse_moe.gate.weight"),
}


def get_scheme(
    name: str, templates: Mapping[str, str] | None = None, router: str | None = None
) -> NamingScheme:
    """A built-in scheme by name, or ``"template"`` with ``templates`` (role -> module
    path with ``{layer}`` and ``{expert}``) and optionally a ``router`` template."""
    if name == "template":
        missing = [r for r in ROLES if r not in (templates or {})]
        if missing:
            raise ConfigError(
                f"naming scheme 'template' has no template for roles {missing}: give a module "
                f"path for each of {list(ROLES)} with {{layer}} and {{expert}}, e.g. "
                "gate=model.layers.{layer}.moe.experts.{expert}.w_in"
            )
        return NamingScheme("template", templates, router)  # type: ignore[arg-type]
    if templates is not None:
        raise ConfigError(f"templates are only for the 'template' scheme, not {name!r}")
    try:
        return BUILTIN_SCHEMES[name]
    except KeyError:
        raise ConfigError(
            f"unknown naming scheme {name!r}; choose one of {sorted(BUILTIN_SCHEMES) + ['template']}"
        ) from None
