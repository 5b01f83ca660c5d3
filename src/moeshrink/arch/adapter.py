"""What a model family adapter declares, and the checks every family shares."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from moeshrink.arch.base import ExpertTensor, MoELayer, ScoringRule
from moeshrink.errors import MoeShrinkError

# The expert layout of Mixtral, Qwen-MoE, OLMoE, DeepSeek, PhiMoE, GraniteMoE in transformers 5.x:
# gate_up_proj [E, 2I, H] ([gate; up] rows), down_proj [E, H, I].
FUSED_GATE_UP = (
    ExpertTensor("gate_up_proj", neuron_dim=0, layout="halves"),
    ExpertTensor("down_proj", neuron_dim=1, layout="plain"),
)


@dataclass(frozen=True)
class FamilyAdapter:
    """Where a family keeps its MoE pieces and how it routes.

    ``moe_block``/``router``/``experts`` are attribute names (on the decoder layer, then on the
    block); ``shared`` names shared-expert modules on the block, which expert-level methods leave
    alone. ``expert_count_keys`` are all config keys that hold the routed expert count: every one is
    rewritten on export, since different serving stacks read different aliases.
    """

    model_type: str
    moe_block: str
    router: str
    scoring: ScoringRule
    probabilities: Callable[[torch.Tensor], torch.Tensor]
    expert_count_keys: tuple[str, ...]
    expert_tensors: tuple[ExpertTensor, ...] = FUSED_GATE_UP
    experts: str = "experts"
    shared: tuple[str, ...] = ()
    fixed_top_k: int | None = None

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def moe_layers(self, model: nn.Module) -> list[MoELayer]:
        """The MoE layers of ``model`` in order (dense layers, e.g. DeepSeek's first ones, are skipped)."""
        return [layer for i, d in enumerate(self.decoder_layers(model)) if (layer := self.moe_layer(d, i))]

    def moe_layer(self, decoder_layer: nn.Module, index: int) -> MoELayer | None:
        block = getattr(decoder_layer, self.moe_block, None)
        if block is None or not hasattr(block, self.experts) or not hasattr(block, self.router):
            return None
        return MoELayer(
            index=index,
            block=block,
            router=getattr(block, self.router),
            experts=getattr(block, self.experts),
            expert_tensors=self.expert_tensors,
            scoring=self.scoring,
            probabilities=self.probabilities,
            shared_modules=tuple(getattr(block, name) for name in self.shared if hasattr(block, name)),
        )

    def num_experts(self, config) -> int:
        return int(getattr(config, self.expert_count_keys[0]))

    def set_num_experts(self, config, count: int) -> None:
        for key in self.expert_count_keys:
            setattr(config, key, count)

    def check_budget(self, config, keep: int, top_k: int) -> None:
        """Raise a one-line error when keeping ``keep`` experts per layer with ``top_k`` active cannot work."""
        total = self.num_experts(config)
        if keep >= total:
            raise MoeShrinkError(
                f"keeping {keep} of {total} experts removes nothing: ask for fewer than {total} (--keep or --ratio)"
            )
        self.check_top_k(config, top_k, keep)

    def check_top_k(self, config, top_k: int, experts: int) -> None:
        """Raise a one-line error when ``top_k`` active experts out of ``experts`` cannot work."""
        if experts < top_k:
            raise MoeShrinkError(
                f"keeping {experts} experts is fewer than the {top_k} each token uses (top-k): keep at least "
                f"{top_k}, or lower the active experts with --top-k"
            )
        if self.fixed_top_k is not None and top_k != self.fixed_top_k:
            raise MoeShrinkError(
                f"{self.model_type} always routes each token to {self.fixed_top_k} experts; "
                f"its top-k cannot be changed: drop --top-k"
            )
        if top_k < 1:
            raise MoeShrinkError(f"top-k must be at least 1, got {top_k}")

    def check_weights_layout(self, layer: MoELayer) -> None:
        for t in self.expert_tensors:
            if not isinstance(getattr(layer.experts, t.name, None), torch.Tensor):
                raise MoeShrinkError(
                    f"{self.model_type} layer {layer.index}: expected expert tensor '{t.name}' is missing; "
                    "this transformers version stores experts differently: use transformers 5.x"
                )


@dataclass(frozen=True)
class GroupedFamilyAdapter(FamilyAdapter):
    """DeepSeek families: group-limited routing needs the expert count divisible by ``n_group``."""

    def check_budget(self, config, keep: int, top_k: int) -> None:
        super().check_budget(config, keep, top_k)
        groups = int(getattr(config, "n_group", 1) or 1)
        if groups <= 1 or getattr(config, "topk_method", "noaux_tc") == "greedy":
            return
        if keep % groups:
            raise MoeShrinkError(
                f"{self.model_type} routes within {groups} expert groups: keep a multiple of {groups} experts "
                f"(got {keep}; e.g. {max(groups * 2, keep - keep % groups)})"
            )
        per_group = keep // groups
        if per_group < 2:
            raise MoeShrinkError(
                f"{self.model_type} scores each of its {groups} groups by its best 2 experts: keep at least "
                f"{2 * groups} experts (2 per group), got {keep}"
            )
        topk_group = int(getattr(config, "topk_group", groups))
        if top_k > topk_group * per_group:
            raise MoeShrinkError(
                f"top-k {top_k} exceeds the {topk_group} chosen groups x {per_group} experts per group left: "
                f"keep more experts or lower --top-k"
            )

    @staticmethod
    def num_groups(config) -> int:
        if getattr(config, "topk_method", "noaux_tc") == "greedy":
            return 1
        return int(getattr(config, "n_group", 1) or 1)
