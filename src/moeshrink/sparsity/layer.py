"""Unstructured or N:M sparsity inside one decoder layer: its routed experts and, by scope, its other
linear layers (attention projections; shared experts and dense MLPs).

Wanda scores each weight by |W_ij| * ||X_j||, with X the inputs of *that* matrix: for a routed expert
the hidden states of the tokens routed to it (gate/up projections) or their intermediate activations
(down projection); for any other linear layer every token's input. An expert that received no
calibration tokens has no such norms and falls back to magnitude, and the plan says which. OWL uses
Wanda's scores with a sparsity per layer (more outliers, less sparsity). Biases and routers stay dense.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moeshrink.arch import FamilyAdapter, MoELayer
from moeshrink.engine.observers import INPUT_NORMS, LayerStats
from moeshrink.errors import MoeShrinkError
from moeshrink.sparsity.masks import (
    OWL_LAMBDA,
    linear_view,
    magnitude_scores,
    nm_mask,
    outlier_fraction,
    unstructured_mask,
    validate_sparsity,
    wanda_scores,
)

SPARSITY_METHODS = ("wanda", "magnitude", "owl")
# What a sparsity scope can name: routed experts, attention projections, and every other linear layer
# of a decoder layer (shared experts, dense MLPs). Routers, embeddings and the LM head are never pruned.
SCOPE_PARTS = ("experts", "attention", "dense")
SCOPE_ALIASES = {"all": SCOPE_PARTS}


def parse_scope(scope: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"experts,attention"`` / ``["experts"]`` / ``"all"`` -> the parts in canonical order."""
    if scope is None:
        return ("experts",)
    items = scope.split(",") if isinstance(scope, str) else list(scope)
    parts: set[str] = set()
    for item in (i.strip().lower() for i in items):
        if item in SCOPE_ALIASES:
            parts.update(SCOPE_ALIASES[item])
        elif item in SCOPE_PARTS:
            parts.add(item)
        else:
            raise MoeShrinkError(
                f"unknown sparsity scope {item!r}: use a comma-separated list of {', '.join(SCOPE_PARTS)}, "
                "or 'all'"
            )
    if not parts:
        raise MoeShrinkError("the sparsity scope is empty: name at least one of experts, attention, dense")
    return tuple(p for p in SCOPE_PARTS if p in parts)


@dataclass(frozen=True)
class SparsitySpec:
    """What to zero inside a decoder layer: a fraction per output row (``sparsity``; OWL varies it per
    layer around that mean), or an N:M pattern, over the parts named by ``scope``."""

    sparsity: float
    method: str = "wanda"
    nm: tuple[int, int] | None = None
    scope: tuple[str, ...] = ("experts",)
    owl_m: float = 5.0
    owl_lambda: float = OWL_LAMBDA

    def __post_init__(self) -> None:
        if self.method not in SPARSITY_METHODS:
            raise MoeShrinkError(
                f"sparsity method must be one of {', '.join(SPARSITY_METHODS)}, got {self.method!r}"
            )
        if self.method == "owl" and self.nm:
            raise MoeShrinkError(
                "OWL sets a sparsity per layer and N:M fixes it: use --nm with wanda or magnitude"
            )
        validate_sparsity(self.sparsity)
        object.__setattr__(self, "scope", parse_scope(self.scope))

    @classmethod
    def parse(
        cls,
        sparsity: float | None,
        method: str = "wanda",
        nm: str | None = None,
        scope: str | Sequence[str] | None = None,
    ) -> SparsitySpec | None:
        """From the command-line form (``--sparsity 0.5`` or ``--nm 2:4``); None when neither is given."""
        if nm:
            try:
                n, m = (int(x) for x in nm.split(":"))
            except ValueError:
                raise MoeShrinkError(f"--nm takes N:M, e.g. 2:4, got {nm!r}") from None
            if not 0 < n < m:
                raise MoeShrinkError(f"--nm {nm}: need 0 < N < M, e.g. 2:4")
            return cls(sparsity=1 - n / m, method=method, nm=(n, m), scope=parse_scope(scope))
        if sparsity is None or sparsity == 0:
            return None
        return cls(sparsity=validate_sparsity(sparsity), method=method, scope=parse_scope(scope))

    def with_sparsity(self, sparsity: float) -> SparsitySpec:
        return SparsitySpec(sparsity, self.method, self.nm, self.scope, self.owl_m, self.owl_lambda)

    @property
    def uses_wanda(self) -> bool:
        return self.method in ("wanda", "owl")

    @property
    def needs(self) -> frozenset[str]:
        """Statistics of the MoE layer this needs (Wanda's per-expert input norms)."""
        return frozenset({INPUT_NORMS}) if self.uses_wanda and "experts" in self.scope else frozenset()

    @property
    def covers_linears(self) -> bool:
        """Whether linear layers outside the routed experts are pruned too."""
        return any(p in self.scope for p in ("attention", "dense"))

    def to_dict(self) -> dict[str, Any]:
        out = {
            "method": self.method,
            "sparsity": self.sparsity,
            "nm": list(self.nm) if self.nm else None,
            "scope": list(self.scope),
        }
        return out | ({"owl_m": self.owl_m, "owl_lambda": self.owl_lambda} if self.method == "owl" else {})


def expert_weight_names(layer: MoELayer) -> list[str]:
    """The expert tensors that are weight matrices (what sparsity prunes; biases are left alone)."""
    return [t.name for t in layer.expert_tensors if t.layout != "none" and not t.name.endswith("_bias")]


def scoped_linears(
    decoder_layer: nn.Module, moe: MoELayer | None, scope: Sequence[str]
) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules of ``decoder_layer`` in ``scope``, by name inside the layer: attention
    projections (under ``self_attn``) and/or every other linear outside the router and routed experts."""
    excluded: set[int] = set()
    if moe is not None:
        excluded = {id(m) for part in (moe.router, moe.experts) for m in part.modules()}
    found = {}
    for name, module in decoder_layer.named_modules():
        if not isinstance(module, nn.Linear) or id(module) in excluded:
            continue
        part = "attention" if name.split(".")[0] in ("self_attn", "attn", "attention") else "dense"
        if part in scope:
            found[name] = module
    return found


def scoped_weight_count(decoder_layer: nn.Module, moe: MoELayer | None, scope: Sequence[str]) -> int:
    """Number of weights in ``scope`` in one decoder layer (weight matrices only)."""
    total = sum(m.weight.numel() for m in scoped_linears(decoder_layer, moe, scope).values())
    if moe is not None and "experts" in scope:
        total += sum(moe.param(name).numel() for name in expert_weight_names(moe))
    return total


def inside_sparsity(
    model: nn.Module, adapter: FamilyAdapter, scope: Sequence[str], kept: dict[int, int], total: float
) -> tuple[float, dict[str, float]]:
    """The sparsity inside what remains after expert pruning such that ``total`` of the original
    model's in-scope weights are gone, counting the weights of removed (or merged-away) experts.

    ``model`` is the uncompressed model (the meta device will do); ``kept`` the experts kept per MoE
    layer. Returns the fraction and the accounting behind it. Every expert of a layer has the same
    number of weights, so this is exact before any expert is touched.
    """
    total = validate_sparsity(total, "total sparsity")
    moe_by_index = {m.index: m for m in adapter.moe_layers(model)}
    weights = removed = 0
    for index, decoder_layer in enumerate(adapter.decoder_layers(model)):
        moe = moe_by_index.get(index)
        weights += scoped_weight_count(decoder_layer, moe, scope)
        if moe is not None and "experts" in scope:
            per_expert = sum(moe.param(n).numel() for n in expert_weight_names(moe)) // moe.num_experts
            removed += (moe.num_experts - kept[index]) * per_expert
    by_experts = removed / weights
    if by_experts > total + 1e-12:
        raise MoeShrinkError(
            f"total sparsity {total:g} is less than the {by_experts:.1%} of the in-scope weights that removing "
            "experts already takes away: ask for a higher total sparsity or keep more experts"
        )
    inside = (total * weights - removed) / (weights - removed)
    return max(0.0, inside), {
        "total_sparsity": total,
        "removed_by_experts": by_experts,
        "inside_sparsity": max(0.0, inside),
        "scope_weights": weights,
    }


def scoped_parameter_names(model: nn.Module, adapter: FamilyAdapter, scope: Sequence[str]) -> set[str]:
    """Full names of the weight parameters in ``scope`` (works on a weightless skeleton too)."""
    names = {id(m): n for n, m in model.named_modules()}
    moe_by_index = {m.index: m for m in adapter.moe_layers(model)}
    found = set()
    for index, decoder_layer in enumerate(adapter.decoder_layers(model)):
        moe = moe_by_index.get(index)
        found.update(names[id(m)] + ".weight" for m in scoped_linears(decoder_layer, moe, scope).values())
        if moe is not None and "experts" in scope:
            found.update(f"{names[id(moe.experts)]}.{n}" for n in expert_weight_names(moe))
    return found


@dataclass
class _Matrix:
    """One weight matrix to prune: an ``[out, in]`` view sharing storage, and its importance scores."""

    weight: torch.Tensor
    scores: torch.Tensor


def _matrices(
    decoder_layer: nn.Module,
    moe: MoELayer | None,
    stats: LayerStats | None,
    linear_norms: dict[str, torch.Tensor],
    spec: SparsitySpec,
    fallback: list[int],
) -> Iterator[_Matrix]:
    """Every matrix of the layer in scope with its scores, one at a time (a layer's scores are never
    all held at once). Experts without routed tokens are scored by magnitude and listed in ``fallback``."""
    if moe is not None and "experts" in spec.scope:
        for expert in range(moe.num_experts):
            use_wanda = (
                spec.uses_wanda
                and stats is not None
                and stats.counts is not None
                and float(stats.counts[expert]) > 0
            )
            if spec.uses_wanda and not use_wanda:
                fallback.append(expert)
            for name in expert_weight_names(moe):
                weight, _ = linear_view(moe, name, expert)
                if use_wanda:
                    norms = (
                        stats.intermediate_sq[expert] if name.startswith("down") else stats.input_sq[expert]
                    )
                    yield _Matrix(weight, wanda_scores(weight, norms.to(weight.device)))
                else:
                    yield _Matrix(weight, magnitude_scores(weight))
    for name, module in scoped_linears(decoder_layer, moe, spec.scope).items():
        weight = module.weight.detach()
        if spec.uses_wanda and name in linear_norms:
            yield _Matrix(weight, wanda_scores(weight, linear_norms[name].to(weight.device)))
        else:
            yield _Matrix(weight, magnitude_scores(weight))


@torch.no_grad()
def layer_outlier_fraction(
    decoder_layer: nn.Module,
    moe: MoELayer | None,
    stats: LayerStats | None,
    linear_norms: dict[str, torch.Tensor],
    spec: SparsitySpec,
) -> float:
    """OWL's outlier fraction of one layer: scores above ``owl_m`` times the layer's mean score."""
    matrices = list(_matrices(decoder_layer, moe, stats, linear_norms, spec, []))
    return outlier_fraction([m.scores for m in matrices], spec.owl_m) if matrices else 0.0


@torch.no_grad()
def sparsify_decoder_layer(
    decoder_layer: nn.Module,
    moe: MoELayer | None,
    stats: LayerStats | None,
    linear_norms: dict[str, torch.Tensor],
    spec: SparsitySpec,
) -> dict[str, Any]:
    """Zero weights of every matrix of ``decoder_layer`` in ``spec.scope`` in place; returns what was
    done (for the plan). ``spec.sparsity`` is this layer's own fraction (OWL passes each layer its own)."""
    fallback: list[int] = []
    for matrix in _matrices(decoder_layer, moe, stats, linear_norms, spec, fallback):
        mask = (
            nm_mask(matrix.scores, *spec.nm) if spec.nm else unstructured_mask(matrix.scores, spec.sparsity)
        )
        matrix.weight.mul_(mask.to(matrix.weight.dtype))
    done = spec.to_dict()
    if spec.uses_wanda and moe is not None and "experts" in spec.scope:
        done["magnitude_fallback_experts"] = fallback
    return done


def sparsify_layer(layer: MoELayer, stats: LayerStats | None, spec: SparsitySpec) -> dict[str, Any]:
    """Sparsify only the routed experts of one MoE layer (``spec.scope`` must be experts only)."""
    if spec.covers_linears:
        raise ValueError(
            "sparsify_layer prunes routed experts only: use sparsify_decoder_layer for other scopes"
        )
    return sparsify_decoder_layer(layer.experts, layer, stats, {}, spec)
