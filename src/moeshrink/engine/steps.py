"""Layer steps: everything that changes a decoder layer, behind one protocol.

A step declares the statistics it needs (``needs``: MoE statistics from :mod:`engine.observers`;
``linears``: plain linear layers whose input norms it reads), whether it also visits decoder layers
without routed experts, and what it does to one layer (:meth:`LayerStep.apply`, which returns what it
did, for the plan). A step may ask for a *global pass* first (``global_needs`` is not None): the
runner then runs the model as the earlier steps left it, calls :meth:`LayerStep.measure` on every
layer, and :meth:`LayerStep.prepare` turns the measures into the step that is applied (a new object:
steps are never changed in place). Global budgets, OWL's layer ratios and STUN's shared threshold
are such passes.

The steps here: :class:`ExpertsStep` (an expert-level method and its budget), :class:`TopKStep`
(active experts per token), :class:`RecoverStep` (re-fit router rows and down projections after an
expert-level method) and :class:`SparsifyStep` (zeros inside experts and other linears).
A new kind of step subclasses :class:`LayerStep` and is listed in ``moeshrink.job``.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from moeshrink.arch import FamilyAdapter, MoELayer
from moeshrink.engine.observers import INPUTS, LayerStats
from moeshrink.methods import ExpertMethod, LayerBudget
from moeshrink.sparsity.layer import (
    SparsitySpec,
    inside_sparsity,
    layer_outlier_fraction,
    scoped_linears,
    scoped_weight_count,
    sparsify_decoder_layer,
)
from moeshrink.sparsity.masks import owl_ratios
from moeshrink.surgery import set_top_k
from moeshrink.surgery.recover import Recovered, recover_layer


@dataclass
class LayerView:
    """One decoder layer as a step sees it: its module, its MoE view (None in a dense layer), and the
    statistics the step asked for, measured on the layer as the earlier steps left it."""

    index: int
    decoder_layer: nn.Module
    moe: MoELayer | None
    stats: LayerStats | None = None
    linear_norms: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    # A copy of the MoE block as it was before any step of this pass changed it (for steps with
    # ``needs_original``), and what the earlier steps of this pass did to this layer, by kind.
    original: MoELayer | None = None
    earlier: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class LayerStep(ABC):
    """What every step is; see the module docstring."""

    kind: ClassVar[str]
    # Decoder layers without routed experts are visited too.
    visits_dense: ClassVar[bool] = False
    # The runner copies each MoE block before the first step of the pass changes it (``view.original``).
    needs_original: ClassVar[bool] = False

    @property
    def needs(self) -> frozenset[str]:
        """MoE statistics :meth:`apply` reads."""
        return frozenset()

    def linears(self, decoder_layer: nn.Module, moe: MoELayer | None) -> dict[str, nn.Module]:
        """Plain linear layers of ``decoder_layer`` whose input norms :meth:`apply` reads."""
        return {}

    @property
    def global_needs(self) -> frozenset[str] | None:
        """MoE statistics of the global pass; None: this step has none."""
        return None

    def global_linears(self, decoder_layer: nn.Module, moe: MoELayer | None) -> dict[str, nn.Module]:
        """Plain linear layers whose input norms :meth:`measure` reads."""
        return {}

    def resolve(self, before: Sequence[LayerStep], model: nn.Module, adapter: FamilyAdapter) -> LayerStep:
        """The step to run given the steps before it, as prepared (default: itself)."""
        return self

    @property
    def expert_counts(self) -> dict[int, int] | None:
        """Experts each MoE layer has after this step, when it changes them."""
        return None

    def measure(self, view: LayerView) -> Any:
        """What the global pass keeps of one layer (default: its statistics)."""
        return view.stats

    def prepare(self, measures: dict[int, Any], layers: dict[int, MoELayer]) -> LayerStep:
        """The step to apply, from every layer's measure (``layers``: the model's MoE layers)."""
        return self

    @abstractmethod
    def apply(self, view: LayerView) -> Any:
        """Change one layer in place; returns what was done (for the plan) or None."""


@dataclass(frozen=True)
class ExpertsStep(LayerStep):
    """An expert-level method: plan each MoE layer from its statistics and apply the plan.

    ``per_layer`` holds each layer's budget (uniform, or shared out by the method's global pass when
    ``global_total`` is set: the experts kept over all layers)."""

    kind: ClassVar[str] = "experts"
    method: ExpertMethod
    per_layer: dict[int, int]
    top_k: int
    groups: int = 1
    global_total: int | None = None
    global_minimum: int = 1

    @property
    def needs(self) -> frozenset[str]:
        return self.method.needs

    @property
    def expert_counts(self) -> dict[int, int]:
        return self.per_layer

    @property
    def global_needs(self) -> frozenset[str] | None:
        return self.method.global_needs if self.global_total is not None else None

    def prepare(self, measures: dict[int, LayerStats], layers: dict[int, MoELayer]) -> ExpertsStep:
        per_layer, method = self.method.allocate_global(
            layers, measures, self.global_total, self.global_minimum, self.groups
        )
        return dataclasses.replace(self, per_layer=per_layer, method=method, global_total=None)

    def apply(self, view: LayerView) -> Any:
        budget = LayerBudget(keep=self.per_layer[view.index], top_k=self.top_k, groups=self.groups)
        return self.method.compress(view.moe, view.stats, budget)


@dataclass(frozen=True)
class TopKStep(LayerStep):
    """Route every token to ``top_k`` experts (set on the router and block, which copy it at build)."""

    kind: ClassVar[str] = "top_k"
    top_k: int

    def apply(self, view: LayerView) -> None:
        set_top_k(view.moe, self.top_k)


@dataclass(frozen=True)
class RecoverStep(LayerStep):
    """After an expert-level method in the same pass: re-fit the kept experts' router rows and down
    projections so the layer's routed output matches the original layer's on the calibration tokens
    (:mod:`moeshrink.surgery.recover`). ``ridge`` pulls each fit towards the weights it starts from."""

    kind: ClassVar[str] = "recover"
    needs_original: ClassVar[bool] = True
    ridge: float
    router: bool = True
    down: bool = True

    @property
    def needs(self) -> frozenset[str]:
        return frozenset({INPUTS})

    def apply(self, view: LayerView) -> Recovered:
        plan = view.earlier.get("experts")
        if plan is None or view.original is None:
            raise AssertionError("a recover step runs in the same pass as an experts step, after it")
        return recover_layer(
            view.original,
            view.moe,
            plan,
            view.stats.inputs,
            ridge=self.ridge,
            router=self.router,
            down=self.down,
        )


@dataclass(frozen=True)
class SparsifyStep(LayerStep):
    """Zero weights inside the routed experts and, by scope, other linear layers (Wanda, magnitude,
    N:M; with OWL a global pass first sets each layer's sparsity from its outliers)."""

    kind: ClassVar[str] = "sparsify"
    spec: SparsitySpec
    layer_sparsity: dict[int, float] | None = None  # OWL's, after its global pass
    # STUN's budget: this fraction of the original in-scope weights gone, removed experts included;
    # resolved into ``spec.sparsity`` inside the survivors (``accounting`` says how).
    total: float | None = None
    accounting: dict[str, float] | None = None

    @property
    def visits_dense(self) -> bool:  # type: ignore[override]
        return self.spec.covers_linears

    @property
    def needs(self) -> frozenset[str]:
        return self.spec.needs

    def linears(self, decoder_layer: nn.Module, moe: MoELayer | None) -> dict[str, nn.Module]:
        return scoped_linears(decoder_layer, moe, self.spec.scope) if self.spec.uses_wanda else {}

    @property
    def global_needs(self) -> frozenset[str] | None:
        return self.spec.needs if self.spec.method == "owl" and self.layer_sparsity is None else None

    def global_linears(self, decoder_layer: nn.Module, moe: MoELayer | None) -> dict[str, nn.Module]:
        return self.linears(decoder_layer, moe)

    def resolve(self, before: Sequence[LayerStep], model: nn.Module, adapter: FamilyAdapter) -> SparsifyStep:
        """With a total budget: the sparsity inside what the expert steps before it keep."""
        if self.total is None or self.accounting is not None:
            return self
        kept = dict.fromkeys(range(len(adapter.decoder_layers(model))), 0)
        for layer in adapter.moe_layers(model):
            kept[layer.index] = layer.num_experts
        for step in before:
            kept |= step.expert_counts or {}
        inside, accounting = inside_sparsity(model, adapter, self.spec.scope, kept, self.total)
        return dataclasses.replace(self, spec=self.spec.with_sparsity(inside), accounting=accounting)

    def measure(self, view: LayerView) -> tuple[float, int]:
        """OWL: the layer's outlier fraction of Wanda scores, and its in-scope weight count."""
        fraction = layer_outlier_fraction(
            view.decoder_layer, view.moe, view.stats, view.linear_norms, self.spec
        )
        return fraction, scoped_weight_count(view.decoder_layer, view.moe, self.spec.scope)

    def prepare(self, measures: dict[int, tuple[float, int]], layers: dict[int, MoELayer]) -> SparsifyStep:
        """OWL's sparsity per layer, weighted so the in-scope weights overall reach ``spec.sparsity``."""
        spec = self.spec
        indices = sorted(i for i, (_, size) in measures.items() if size)
        ratios = owl_ratios([measures[i][0] for i in indices], spec.sparsity, spec.owl_lambda)
        weight = torch.tensor([float(measures[i][1]) for i in indices], dtype=torch.float64)
        mean = float((torch.tensor(ratios, dtype=torch.float64) * weight).sum() / weight.sum())
        shift = spec.sparsity - mean
        layer_sparsity = {i: min(max(r + shift, 0.0), 1 - 1e-9) for i, r in zip(indices, ratios, strict=True)}
        return dataclasses.replace(self, layer_sparsity=layer_sparsity)

    def apply(self, view: LayerView) -> dict[str, Any]:
        spec = self.spec
        if self.layer_sparsity is not None:
            spec = spec.with_sparsity(self.layer_sparsity.get(view.index, spec.sparsity))
        return sparsify_decoder_layer(view.decoder_layer, view.moe, view.stats, view.linear_norms, spec)


@dataclass(frozen=True)
class MeasureStep(LayerStep):
    """Changes nothing: a global pass that keeps each MoE layer's statistics (``collect_layer_stats``)."""

    kind: ClassVar[str] = "measure"
    statistics: frozenset[str] = frozenset()

    @property
    def global_needs(self) -> frozenset[str]:
        return self.statistics

    def apply(self, view: LayerView) -> None:
        """Nothing to change."""
