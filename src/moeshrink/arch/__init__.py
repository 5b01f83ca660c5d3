"""Architecture adapters: one per model family, chosen from ``config.model_type``."""

from __future__ import annotations

from moeshrink.arch import deepseek, gpt_oss, granitemoe, mixtral, olmoe, phimoe, qwen_moe
from moeshrink.arch.adapter import FamilyAdapter, GroupedFamilyAdapter
from moeshrink.arch.base import ExpertTensor, MoELayer, join_router_output, split_router_output
from moeshrink.errors import MoeShrinkError

ADAPTERS: dict[str, FamilyAdapter] = {
    a.model_type: a
    for a in (
        mixtral.ADAPTER,
        qwen_moe.QWEN2_MOE,
        qwen_moe.QWEN3_MOE,
        olmoe.ADAPTER,
        deepseek.DEEPSEEK_V2,
        deepseek.DEEPSEEK_V3,
        phimoe.ADAPTER,
        granitemoe.ADAPTER,
        gpt_oss.ADAPTER,
    )
}

# Config keys that mark a model as a mixture of experts, for telling "dense" from "unsupported MoE".
_EXPERT_COUNT_KEYS = frozenset({"num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"})


def _has_experts(config_dict: dict) -> bool:
    """Whether any (nested) config entry counts more than one expert (DBRX nests it in ``ffn_config``)."""
    for key, value in config_dict.items():
        if key in _EXPERT_COUNT_KEYS and isinstance(value, int) and value > 1:
            return True
        if isinstance(value, dict) and _has_experts(value):
            return True
    return False


def get_adapter(config) -> FamilyAdapter:
    """The adapter for ``config.model_type`` (a config object or the raw config.json dict), or a
    one-line error saying why there is none."""
    raw = config if isinstance(config, dict) else config.to_dict()
    model_type = raw.get("model_type")
    if model_type in ADAPTERS:
        return ADAPTERS[model_type]
    supported = ", ".join(sorted(ADAPTERS))
    if not _has_experts(raw):
        raise MoeShrinkError(
            f"'{model_type}' is not a mixture-of-experts model (its config has no expert count): "
            f"moeshrink needs an MoE checkpoint, one of: {supported}"
        )
    raise MoeShrinkError(f"model family '{model_type}' is not supported yet; supported families: {supported}")


__all__ = [
    "ADAPTERS",
    "ExpertTensor",
    "FamilyAdapter",
    "GroupedFamilyAdapter",
    "MoELayer",
    "get_adapter",
    "join_router_output",
    "split_router_output",
]
